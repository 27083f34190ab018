//! What the end-to-end tests share: free ports, private Redis servers, fresh databases, an OTLP
//! trace receiver (`otlp`).

#![allow(dead_code)]

pub mod otlp;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::Connection;

pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

pub fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A sidecar's configuration in front of one app at `app`: one thread, listening on `listen`
/// and `admin`, with the cache, the access log and the rate limit off (a test turns on what it
/// tests).
pub fn sidecar_in_front_of(
    app: SocketAddr,
    listen: SocketAddr,
    admin: SocketAddr,
) -> mall_sidecar_config::SidecarConfig {
    let mut config = mall_sidecar_config::SidecarConfig::default();
    config.server.listen = listen;
    config.server.admin_listen = admin;
    config.server.threads = 1;
    config.upstream.servers = vec![mall_sidecar_config::UpstreamServer {
        address: app.to_string(),
        weight: 1,
    }];
    config.access_log.enabled = false;
    config.cache.enabled = false;
    config.rate_limit.enabled = false;
    config
}

/// A private redis-server on `port` (no persistence: a restart starts empty, as a killed pod's).
pub fn redis(port: u16) -> Option<Proc> {
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(child) = child else {
        assert!(
            !ci(),
            "redis-server not found: apt-get install redis-server (scripts/test.sh does it)"
        );
        eprintln!("SKIPPED: redis-server not installed");
        return None;
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(Proc(child))
}

/// A fresh database on the test server (`MALL_TEST_POSTGRES_URL` / `MALL_TEST_MYSQL_URL`).
pub async fn fresh_database(env: &str, default: &str) -> Option<String> {
    fresh_database_named(env, default, "ryw").await
}

/// [`fresh_database`] whose name starts with `prefix` (`mall_r`: the MariaDB replicas of
/// scripts/lib/services.sh replicate only the databases named `mall_r_*`).
#[allow(dead_code)]
pub async fn fresh_database_named(env: &str, default: &str, prefix: &str) -> Option<String> {
    sqlx::any::install_default_drivers();
    let admin_url = std::env::var(env).unwrap_or_else(|_| default.into());
    let mut admin = match sqlx::AnyConnection::connect(&admin_url).await {
        Ok(c) => c,
        Err(e) => {
            assert!(
                !ci(),
                "{admin_url} unreachable ({e}): run scripts/test.sh, which installs and starts it, or set {env}"
            );
            eprintln!("SKIPPED: {admin_url} unreachable ({e})");
            return None;
        }
    };
    let name = format!(
        "{prefix}_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
            % 1_000_000_000
    );
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .unwrap();
    Some(format!("{}/{name}", admin_url.rsplit_once('/').unwrap().0))
}

/// Waits until `url` answers 200, failing with `what` at `deadline`.
#[allow(dead_code)]
pub async fn until_ok(http: &reqwest::Client, url: &str, deadline: Instant, what: &str) {
    while http.get(url).send().await.map(|r| r.status().as_u16()).ok() != Some(200) {
        assert!(Instant::now() < deadline, "{what} never answered 200 at {url}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The sum of every series of metric `name` in the Prometheus text at `url`.
#[allow(dead_code)]
pub async fn metric_sum(http: &reqwest::Client, url: &str, name: &str) -> f64 {
    metric_sum_where(http, url, name, "").await
}

/// [`metric_sum`] over the samples whose line contains `label` (e.g. `outcome="exported"`).
pub async fn metric_sum_where(http: &reqwest::Client, url: &str, name: &str, label: &str) -> f64 {
    let text = http.get(url).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.split([' ', '{']).next() == Some(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
