//! Test harness: real databases, a real Redis, the real router on a real socket.
//!
//! PostgreSQL, MySQL and Redis come from the machine (see docs/tests.md); their URLs can be
//! overridden with MALL_TEST_POSTGRES_URL, MALL_TEST_MYSQL_URL and MALL_TEST_REDIS_URL. When one
//! is missing, the test fails under CI=true with a message saying how to get it, and otherwise
//! prints SKIPPED loudly.

#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use mall_app::config::Config;
use mall_app::state::AppState;
use mall_app::App;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use sqlx::Connection;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    MySql,
}

pub struct TestDb {
    pub backend: Backend,
    pub url: Option<String>,
    pub dir: tempfile::TempDir,
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn unavailable(what: &str, how: &str) -> Option<TestDb> {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{what} is required under CI=true but is not reachable: {how}");
    }
    eprintln!("SKIPPED: {what} is not reachable ({how}); under CI=true this fails");
    None
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn unique_name() -> String {
    format!(
        "mall_t_{}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        rand_suffix()
    )
}

fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        % 100_000
}

/// A fresh, empty database of `backend`.
pub async fn database(backend: Backend) -> Option<TestDb> {
    sqlx::any::install_default_drivers();
    let dir = tempfile::tempdir().unwrap();
    let (admin_url, how) = match backend {
        Backend::Sqlite => {
            return Some(TestDb {
                backend,
                url: None,
                dir,
            })
        }
        Backend::Postgres => (
            env_or("MALL_TEST_POSTGRES_URL", "postgres://mall:mall@127.0.0.1:5432/test"),
            "run scripts/test.sh, which installs and starts PostgreSQL, or set MALL_TEST_POSTGRES_URL",
        ),
        Backend::MySql => (
            env_or("MALL_TEST_MYSQL_URL", "mysql://mall:mall@127.0.0.1:3306/test"),
            "run scripts/test.sh, which installs and starts MariaDB, or set MALL_TEST_MYSQL_URL",
        ),
    };
    let mut admin = match sqlx::AnyConnection::connect(&admin_url).await {
        Ok(c) => c,
        Err(e) => return unavailable(&format!("{backend:?} at {admin_url} ({e})"), how),
    };
    let name = unique_name();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let base = admin_url.rsplit_once('/').unwrap().0;
    Some(TestDb {
        backend,
        url: Some(format!("{base}/{name}")),
        dir,
    })
}

pub fn redis_url() -> Option<String> {
    let url = env_or("MALL_TEST_REDIS_URL", "redis://127.0.0.1:6379");
    let addr = url.trim_start_matches("redis://").trim_end_matches('/').to_string();
    match std::net::TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(1)) {
        Ok(_) => Some(url),
        Err(e) => {
            unavailable(
                &format!("Redis at {url} ({e})"),
                "run scripts/test.sh, which starts redis-server, or set MALL_TEST_REDIS_URL",
            );
            None
        }
    }
}

pub struct TestApp {
    pub base: String,
    pub state: AppState,
    pub client: reqwest::Client,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

pub const PASSWORD: &str = "test-password";

/// Starts the app on 127.0.0.1:0 over `db`, seeded with 50 products and 5 users, and waits
/// until `/ready` says yes.
pub async fn spawn_app(db: &TestDb, extra: &[&str]) -> TestApp {
    let mut args: Vec<String> = vec![
        "--listen=127.0.0.1:0".into(),
        format!("--data-dir={}", db.dir.path().display()),
        "--seed".into(),
        "--seed-products=50".into(),
        "--seed-users=5".into(),
        "--seed-stock=100".into(),
        format!("--seed-password={PASSWORD}"),
        // Tests stop apps often: no readiness delay on shutdown.
        "--shutdown-delay-ms=0".into(),
        "--worker-id".into(),
        (COUNTER.fetch_add(1, Ordering::Relaxed) % 1000).to_string(),
    ];
    if let Some(url) = &db.url {
        args.push(format!("--database-url={url}"));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let config = Config::from_args(args).expect("test config is valid");
    let app = App::start(config).await.expect("app starts");
    let state = app.state.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        app.serve(listener, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    let client = reqwest::Client::new();
    let t = TestApp {
        base,
        state,
        client,
        shutdown: Some(tx),
        task: Some(task),
    };
    for _ in 0..100 {
        if t.client
            .get(format!("{}/ready", t.base))
            .send()
            .await
            .is_ok_and(|r| r.status() == StatusCode::OK)
        {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("app never became ready");
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Reply {
    /// The error code of a JSON error body.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
    pub fn message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or("")
    }
}

impl TestApp {
    pub async fn stop(mut self) {
        let _ = self.shutdown.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap();
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        send(req).await
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        self.request(Method::GET, path, token, None, &[]).await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> Reply {
        self.request(Method::POST, path, token, Some(body), &[]).await
    }

    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        content_type: &str,
        body: Vec<u8>,
    ) -> Reply {
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.base))
            .header("content-type", content_type)
            .body(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        send(req).await
    }

    pub async fn login(&self, username: &str) -> String {
        self.token_from("/api/auth/login", username, StatusCode::OK).await
    }

    pub async fn register(&self, username: &str) -> String {
        self.token_from("/api/auth/register", username, StatusCode::CREATED)
            .await
    }

    async fn token_from(&self, path: &str, username: &str, expected: StatusCode) -> String {
        let credentials = serde_json::json!({"username": username, "password": PASSWORD});
        let r = self.post(path, None, credentials).await;
        assert_eq!(r.status, expected, "{path} as {username}: {:?}", r.body);
        r.body["token"].as_str().unwrap().to_string()
    }

    pub async fn metrics(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of one sample in `/metrics`, matched by name and label substring.
    pub async fn metric(&self, name: &str, labels: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .filter(|l| l.starts_with(name) && l.contains(labels))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum()
    }
}

/// Sends a request and reads the reply; a non-JSON body is kept as a string.
async fn send(req: reqwest::RequestBuilder) -> Reply {
    let resp = req.send().await.expect("request reaches the app");
    let status = resp.status();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    Reply { status, headers, body }
}

/// Runs one async test body against each backend: `backend_tests!(name_of_async_fn);`
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                use super::common::Backend;
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn sqlite() { super::$name(Backend::Sqlite).await }
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn postgres() { super::$name(Backend::Postgres).await }
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn mysql() { super::$name(Backend::MySql).await }
            }
        )*
    };
}
