//! Test rig: real mall app instances (the library, serving on loopback), small stub upstreams where
//! a test needs an upstream to misbehave on purpose, and the real `sidecar` binary as a child process.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mall_app::testing::RunningApp;

/// A mall app instance on a loopback port, with its own SQLite database.
pub struct AppInstance {
    inner: RunningApp,
    pub addr: SocketAddr,
}

impl AppInstance {
    pub async fn start() -> AppInstance {
        let inner = RunningApp::start(&[]).await;
        AppInstance {
            addr: inner.addr,
            inner,
        }
    }

    /// An instance on the SQLite database in `data_dir` (shared with others) with `extra` flags.
    pub async fn start_in(data_dir: &std::path::Path, extra: &[&str]) -> AppInstance {
        let inner = RunningApp::start_in(data_dir, extra).await;
        AppInstance {
            addr: inner.addr,
            inner,
        }
    }

    /// Requests the app itself counted on `route` (its own `http_requests_total`).
    pub async fn requests(&self, route: &str) -> u64 {
        let text = reqwest::get(self.inner.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let needle = format!("route=\"{route}\"");
        text.lines()
            .filter(|l| l.starts_with("http_requests_total{") && l.contains(&needle))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    /// A rolling restart of this instance: SIGTERM's sequence, then a new process on the same port.
    pub async fn restart(&mut self) {
        self.inner.restart().await;
    }

    /// Stops serving: the port refuses connections from now on.
    pub async fn kill(&mut self) {
        self.inner.kill().await;
    }
}

/// A stub upstream: `/who` names it, `/slow` sleeps `slow_ms` first, `/cookie` sets a cookie on a
/// cacheable response, `/echo` returns the request headers it received as JSON.
pub struct Stub {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
}

impl Stub {
    pub async fn start(name: &'static str, slow_ms: u64) -> Stub {
        use axum::routing::get;
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let app = axum::Router::new()
            .route("/who", get(move || async move { name }))
            .route(
                "/slow",
                get(move || async move {
                    tokio::time::sleep(Duration::from_millis(slow_ms)).await;
                    name
                }),
            )
            .route(
                "/cookie",
                get(move || {
                    let counter = counter.clone();
                    async move {
                        counter.fetch_add(1, Ordering::SeqCst);
                        (
                            [("set-cookie", "session=abc"), ("cache-control", "public, max-age=60")],
                            "with a cookie",
                        )
                    }
                }),
            )
            .route(
                "/echo",
                get(|headers: axum::http::HeaderMap| async move {
                    let map: serde_json::Map<String, serde_json::Value> = headers
                        .iter()
                        .map(|(k, v)| {
                            (
                                k.to_string(),
                                serde_json::Value::String(v.to_str().unwrap_or("").to_string()),
                            )
                        })
                        .collect();
                    (
                        [("cache-control", "public, max-age=60")],
                        axum::Json(serde_json::Value::Object(map)),
                    )
                }),
            )
            .route("/health", get(|| async { "ok" }))
            .route("/ready", get(|| async { "ok" }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Stub { addr, hits }
    }
}

/// The real sidecar binary with a TOML file written for it.
pub struct Sidecar {
    pub base: String,
    pub admin: String,
    pub config_path: std::path::PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Sidecar {
    /// Starts the sidecar with `[server]` filled in and `body` (the rest of the TOML) appended.
    pub async fn start(body: &str) -> Sidecar {
        Self::start_with_env(body, &[]).await
    }

    pub async fn start_with_env(body: &str, env: &[(&str, &str)]) -> Sidecar {
        Self::start_with(body, env, None).await
    }

    /// Starts the sidecar with its soft open-files limit lowered to `soft` (the hard one kept).
    pub async fn start_with_soft_nofile(body: &str, soft: u64) -> Sidecar {
        Self::start_with(body, &[], Some(soft)).await
    }

    async fn start_with(body: &str, env: &[(&str, &str)], soft_nofile: Option<u64>) -> Sidecar {
        // `free_port` hands out a port that another test may bind before the sidecar does (the
        // suite runs in parallel); a sidecar that cannot bind exits, and is started again on
        // other ports.
        for _ in 0..3 {
            if let Some(sidecar) = Self::try_start(body, env, soft_nofile).await {
                return sidecar;
            }
        }
        panic!("the sidecar did not start in three tries (its errors are above)");
    }

    async fn try_start(body: &str, env: &[(&str, &str)], soft_nofile: Option<u64>) -> Option<Sidecar> {
        let (port, admin_port) = (free_port(), free_port());
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("sidecar.toml");
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\nthreads = 2\nshutdown_grace_seconds = 5\n\n{body}"
        );
        std::fs::File::create(&config_path)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_sidecar"));
        command
            .args(["-c", config_path.to_str().unwrap()])
            .env("SIDECAR_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            command.env(k, v);
        }
        if let Some(soft) = soft_nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: only setrlimit between fork and exec, which is async-signal-safe.
            unsafe {
                command.pre_exec(move || {
                    let mut limit = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
                    limit.rlim_cur = soft as libc::rlim_t;
                    libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
                    Ok(())
                });
            }
        }
        let child = command.spawn().expect("sidecar binary runs");
        let sidecar = Sidecar {
            base: format!("http://127.0.0.1:{port}"),
            admin: format!("http://127.0.0.1:{admin_port}"),
            config_path,
            child,
            _dir: dir,
        };
        if !answers(&format!("{}/health", sidecar.admin)).await {
            return None;
        }
        // The proxy port opens alongside the admin port; make sure it accepts.
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Some(sidecar)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A counter or gauge from the admin `/metrics`, summed over series whose labels contain `labels`.
    pub async fn metric(&self, name: &str, labels: &str) -> f64 {
        let text = reqwest::get(format!("{}/metrics", self.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split([' ', '{']).next() == Some(name) && l.contains(labels))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Waits (up to 2 s) until `metric` satisfies `ok`: counters are bumped in the logging phase,
    /// just after the client already has its response.
    pub async fn metric_until(&self, name: &str, labels: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let mut value = 0.0;
        for _ in 0..40 {
            value = self.metric(name, labels).await;
            if ok(value) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        value
    }

    /// Rewrites the file and sends SIGHUP.
    pub fn reload(&self, body: &str) {
        let text = std::fs::read_to_string(&self.config_path).unwrap();
        let server = text.split("\n\n").next().unwrap();
        std::fs::write(&self.config_path, format!("{server}\n\n{body}")).unwrap();
        self.signal("HUP");
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit, returning how long it took and its exit status.
    pub fn wait_exit_status(&mut self, limit: Duration) -> Option<(Duration, std::process::ExitStatus)> {
        let start = std::time::Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some((start.elapsed(), status));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `url` answers with a success within 6 s.
async fn answers(url: &str) -> bool {
    for _ in 0..300 {
        if reqwest::get(url).await.is_ok_and(|r| r.status().is_success()) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// `[upstream]` for these instances (health checks fast, so tests need not wait).
pub fn upstream_section(addrs: &[SocketAddr], balance: &str) -> String {
    let servers: Vec<String> = addrs.iter().map(|a| format!("{{ address = \"{a}\" }}")).collect();
    format!(
        "[upstream]\nbalance = \"{balance}\"\nservers = [{}]\n[upstream.health_check]\ninterval_ms = 200\nunhealthy_threshold = 1\nhealthy_threshold = 1\n",
        servers.join(", ")
    )
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().pool_max_idle_per_host(8).build().unwrap()
}

/// Redis for the shared-limit test: required under CI, skipped loudly otherwise.
pub async fn redis_url() -> Option<String> {
    let url = std::env::var("MALL_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let reachable = tokio::net::TcpStream::connect(url.trim_start_matches("redis://").trim_end_matches('/'))
        .await
        .is_ok();
    if reachable {
        return Some(url);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("Redis is not reachable at {url}; run scripts/test.sh, which installs and starts it");
    }
    eprintln!("SKIPPED: Redis not reachable at {url} (scripts/test.sh starts it)");
    None
}

/// Decodes a whole brotli stream (RFC 7932) and insists it is finished, the last meta-block seen
/// and nothing after it: a stream that was only flushed leaves the decoder wanting more input,
/// which lenient readers take for the end of the data. `None` for an unfinished or broken stream.
pub fn strict_brotli_decode(stream: &[u8]) -> Option<Vec<u8>> {
    use brotli::{BrotliDecompressStream, BrotliResult, BrotliState, HuffmanCode};
    let mut state = BrotliState::new(
        brotli::HeapAlloc::<u8>::new(0),
        brotli::HeapAlloc::<u32>::new(0),
        brotli::HeapAlloc::<HuffmanCode>::new(HuffmanCode::default()),
    );
    let mut output = vec![0u8; 16 << 20];
    let (mut available_in, mut input_offset) = (stream.len(), 0);
    let (mut available_out, mut output_offset, mut total) = (output.len(), 0, 0);
    let result = BrotliDecompressStream(
        &mut available_in,
        &mut input_offset,
        stream,
        &mut available_out,
        &mut output_offset,
        &mut output,
        &mut total,
        &mut state,
    );
    if !matches!(result, BrotliResult::ResultSuccess) || available_in != 0 {
        return None;
    }
    output.truncate(output_offset);
    Some(output)
}

/// An upstream written with Python's `http.server`, as issue 32 found it: HTTP/1.1 keep-alive,
/// `Cache-Control: no-store`, the header block and the body in two writes `pause_ms` apart (the
/// body names the path). `None`, loudly, when python3 is missing outside CI.
pub struct PythonUpstream {
    pub addr: SocketAddr,
    child: Child,
    _dir: tempfile::TempDir,
}

const PYTHON_UPSTREAM: &str = r#"
import http.server, sys, time
pause = float(sys.argv[1]) / 1000
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = ("answer for %s\n" % self.path).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        time.sleep(pause)
        self.wfile.write(body)
    def log_message(self, *args):
        pass
class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    def handle_error(self, request, client_address):
        pass  # the sidecar's health check hangs up once it has the status line
server = Server(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

impl PythonUpstream {
    pub async fn start(pause_ms: u64) -> Option<PythonUpstream> {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("upstream.py");
        std::fs::write(&script, PYTHON_UPSTREAM).unwrap();
        let spawned = Command::new("python3")
            .arg(&script)
            .arg(pause_ms.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => panic!("python3: {e}"),
            Err(e) => {
                eprintln!("SKIPPED: python3 does not run here: {e}");
                return None;
            }
        };
        let stdout = child.stdout.take().unwrap();
        let port = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufReader::new(stdout).read_line(&mut line).unwrap();
            line.trim().parse::<u16>().expect("the upstream prints its port")
        })
        .await
        .unwrap();
        Some(PythonUpstream {
            addr: ([127, 0, 0, 1], port).into(),
            child,
            _dir: dir,
        })
    }
}

impl Drop for PythonUpstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
