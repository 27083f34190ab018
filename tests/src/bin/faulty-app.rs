//! A bad version of the mall app, for the canary release tests (`tests/tests/pods.rs`, test j):
//! the entrypoint of an image built `FROM` the app's, in place of `mall-app`. It starts the real
//! `/usr/local/bin/mall-app` with its own arguments and environment, except that the app listens
//! on a private loopback port only, and takes the app's addresses itself (`MALL_LISTEN`, and
//! `MALL_LISTEN_SOCKET`, where the sidecar reaches its own pod's app). Every request goes to the
//! app unchanged, keep-alive and bodies included; only product reads (`GET /api/products...`)
//! get the fault the image's environment names:
//! - `FAULT_ERROR_PERCENT=p`: exactly `p` of every 100 are answered 500 (by a counter, spread
//!   evenly, not drawn at random), as the app's internal error, without asking the app;
//! - `FAULT_DELAY_MS=ms`: every answer is held this long.
//!
//! SIGTERM and SIGINT go to the app; this exits with the app's status when the app exits. The
//! product itself has no fault switch: a bad version is a different image, as in a real release.

use std::convert::Infallible;
use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::signal::unix::{signal, SignalKind};

/// The real app, as the app's image installs it.
const APP: &str = "/usr/local/bin/mall-app";
/// Where the real app listens instead: inside the pod's network namespace only.
const PRIVATE: &str = "127.0.0.1:3100";

/// The fault, from the image's environment.
struct Fault {
    error_percent: usize,
    delay: Duration,
    /// Product reads so far.
    reads: AtomicUsize,
}

impl Fault {
    fn from_env() -> Result<Fault, String> {
        let number = |name: &str| -> Result<u64, String> {
            match std::env::var(name) {
                Ok(v) => v.parse().map_err(|e| format!("{name}={v}: {e}")),
                Err(_) => Ok(0),
            }
        };
        let error_percent = number("FAULT_ERROR_PERCENT")?;
        if error_percent > 100 {
            return Err(format!("FAULT_ERROR_PERCENT={error_percent}: must be 0..=100"));
        }
        Ok(Fault {
            error_percent: error_percent as usize,
            delay: Duration::from_millis(number("FAULT_DELAY_MS")?),
            reads: AtomicUsize::new(0),
        })
    }

    /// Whether this product read fails: the `n`th does when `n * p / 100` steps up at `n + 1`, so
    /// any 100 reads in a row hold exactly `p` failures, spread evenly (20 %: every fifth).
    fn fails(&self) -> bool {
        let n = self.reads.fetch_add(1, Ordering::Relaxed) % 100;
        (n + 1) * self.error_percent / 100 != n * self.error_percent / 100
    }
}

type Body = BoxBody<Bytes, hyper::Error>;

struct Proxy {
    fault: Fault,
    app: Client<HttpConnector, Incoming>,
}

impl Proxy {
    async fn answer(&self, mut req: Request<Incoming>) -> Response<Body> {
        let product_read = req.method() == Method::GET && req.uri().path().starts_with("/api/products");
        if product_read && self.fault.fails() {
            return Self::reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                r#"{"error":{"code":"internal","message":"internal error"}}"#,
            );
        }
        let target = format!(
            "http://{PRIVATE}{}",
            req.uri().path_and_query().map_or("/", |p| p.as_str())
        );
        *req.uri_mut() = match target.parse() {
            Ok(uri) => uri,
            Err(e) => return Self::reply(StatusCode::BAD_REQUEST, &format!("{e}")),
        };
        let answer = match self.app.request(req).await {
            Ok(r) => r.map(BodyExt::boxed),
            Err(e) => Self::reply(StatusCode::BAD_GATEWAY, &format!("the app at {PRIVATE}: {e}")),
        };
        if product_read && !self.fault.delay.is_zero() {
            tokio::time::sleep(self.fault.delay).await;
        }
        answer
    }

    fn reply(status: StatusCode, json: &str) -> Response<Body> {
        let mut r = Response::new(Full::new(Bytes::from(json.to_string())).map_err(|n| match n {}).boxed());
        *r.status_mut() = status;
        r.headers_mut().insert(
            "content-type",
            hyper::header::HeaderValue::from_static("application/json"),
        );
        r.headers_mut()
            .insert("cache-control", hyper::header::HeaderValue::from_static("no-store"));
        r
    }
}

/// Serves one client connection (HTTP/1.1, keep-alive) through `proxy`.
fn serve<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(stream: S, proxy: Arc<Proxy>) {
    tokio::spawn(async move {
        let service = hyper::service::service_fn(move |req| {
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(proxy.answer(req).await) }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .serve_connection(TokioIo::new(stream), service)
            .await;
    });
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let fail = |why: String| -> ! {
        eprintln!("faulty-app: {why}");
        std::process::exit(2)
    };
    let fault = Fault::from_env().unwrap_or_else(|e| fail(e));
    let listen = std::env::var("MALL_LISTEN").unwrap_or_else(|_| "0.0.0.0:3000".into());
    let tcp = tokio::net::TcpListener::bind(&listen)
        .await
        .unwrap_or_else(|e| fail(format!("MALL_LISTEN: cannot bind {listen}: {e}")));
    let unix = std::env::var("MALL_LISTEN_SOCKET").ok().map(|path| {
        // A socket left by an earlier run of the container (an emptyDir outlives restarts).
        let _ = std::fs::remove_file(&path);
        tokio::net::UnixListener::bind(&path)
            .unwrap_or_else(|e| fail(format!("MALL_LISTEN_SOCKET: cannot bind {path}: {e}")))
    });
    eprintln!(
        "faulty-app: product reads {} % answered 500, held {} ms; the app on {PRIVATE}",
        fault.error_percent,
        fault.delay.as_millis()
    );
    let mut app = tokio::process::Command::new(APP)
        .args(std::env::args_os().skip(1))
        .env("MALL_LISTEN", PRIVATE)
        .env_remove("MALL_LISTEN_SOCKET")
        .spawn()
        .unwrap_or_else(|e| fail(format!("{APP}: {e}")));
    // No Nagle on either side, as the app has none: a response written in two parts would
    // otherwise wait for the delayed ACK of the first (40 ms on Linux).
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let proxy = Arc::new(Proxy {
        fault,
        app: Client::builder(TokioExecutor::new()).build(connector),
    });
    let on_tcp = proxy.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = tcp.accept().await {
            let _ = stream.set_nodelay(true);
            serve(stream, on_tcp.clone());
        }
    });
    if let Some(unix) = unix {
        let on_unix = proxy.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = unix.accept().await {
                serve(stream, on_unix.clone());
            }
        });
    }
    let mut term = signal(SignalKind::terminate()).unwrap_or_else(|e| fail(format!("SIGTERM: {e}")));
    let mut int = signal(SignalKind::interrupt()).unwrap_or_else(|e| fail(format!("SIGINT: {e}")));
    let pid = app.id().map(|p| p as libc::pid_t);
    let forward = |sig: libc::c_int| {
        if let Some(pid) = pid {
            // SAFETY: kill(2) on the child's pid; no memory is involved.
            unsafe { libc::kill(pid, sig) };
        }
    };
    loop {
        tokio::select! {
            status = app.wait() => {
                let code = match status {
                    Ok(s) => s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)),
                    Err(e) => fail(format!("{APP}: {e}")),
                };
                std::process::exit(code);
            }
            _ = term.recv() => forward(libc::SIGTERM),
            _ = int.recv() => forward(libc::SIGINT),
        }
    }
}
