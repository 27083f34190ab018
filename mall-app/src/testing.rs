//! A real mall app on a loopback port, for other crates' tests (the sidecar's, the load
//! generator's): its own SQLite database in a temporary directory, seeded, served by the real
//! router, stoppable so that its port refuses connections.

use std::net::SocketAddr;

use crate::config::Config;
use crate::App;

/// The password of every seeded user in test apps.
pub const PASSWORD: &str = "test-password";

pub struct RunningApp {
    pub addr: SocketAddr,
    /// Where its SQLite database lives.
    pub data_dir: std::path::PathBuf,
    extra: Vec<String>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _dir: Option<tempfile::TempDir>,
}

impl RunningApp {
    /// Starts a seeded app (60 products, 2 users unless `extra` says otherwise) and waits until it
    /// is ready. `extra` are more command-line flags.
    pub async fn start(extra: &[&str]) -> RunningApp {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut app = Self::start_in(dir.path(), extra).await;
        app._dir = Some(dir);
        app
    }

    /// Like `start`, on the SQLite database in `data_dir`, which several apps may share (the seed
    /// is idempotent).
    pub async fn start_in(data_dir: &std::path::Path, extra: &[&str]) -> RunningApp {
        Self::start_on(data_dir, "127.0.0.1:0".parse().expect("address"), extra).await
    }

    /// Terminates (as on SIGTERM) and starts a new instance on the same port and database, as a
    /// rolling restart replaces a process.
    pub async fn restart(&mut self) {
        self.terminate().await;
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let mut next = Self::start_on(&self.data_dir, self.addr, &extra).await;
        next._dir = self._dir.take();
        *self = next;
    }

    async fn start_on(data_dir: &std::path::Path, addr: SocketAddr, extra: &[&str]) -> RunningApp {
        let mut args = vec![
            "--listen=127.0.0.1:0".to_string(),
            format!("--data-dir={}", data_dir.display()),
            "--seed".into(),
            "--seed-products=60".into(),
            format!("--seed-password={PASSWORD}"),
            "--log-format=text".into(),
        ];
        if !extra.iter().any(|a| a.starts_with("--seed-users")) {
            args.push("--seed-users=2".into());
        }
        // Tests stop apps often: no readiness delay unless a test asks for one.
        if !extra.iter().any(|a| a.starts_with("--shutdown-delay-ms")) {
            args.push("--shutdown-delay-ms=0".into());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let config = Config::from_args(args).expect("valid app config");
        crate::telemetry::install_for_tests();
        let socket = config.args.listen_socket.clone();
        let app = App::start(config).await.expect("app starts");
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let unix = socket.map(|path| crate::bind_unix(&path).expect("bind the Unix socket"));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            app.serve_on(listener, unix, async {
                let _ = rx.await;
            })
            .await
            .expect("app serves");
        });
        let running = RunningApp {
            addr,
            data_dir: data_dir.to_path_buf(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            stop: Some(tx),
            task: Some(task),
            _dir: None,
        };
        running.wait_ready().await;
        running
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn wait_ready(&self) {
        for _ in 0..300 {
            if let Ok(mut stream) = tokio::net::TcpStream::connect(self.addr).await {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let _ = stream
                    .write_all(b"GET /ready HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                    .await;
                let mut head = [0u8; 12];
                if stream.read_exact(&mut head).await.is_ok() && &head[9..12] == b"200" {
                    return;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("the app at {} never became ready", self.addr);
    }

    /// What SIGTERM does: `/ready` fails, requests are served for the shutdown delay, in-flight
    /// ones drain, then the port closes. Returns when it has.
    pub async fn terminate(&mut self) {
        self.kill().await;
    }

    /// Stops serving: from now on its port refuses connections.
    pub async fn kill(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}
