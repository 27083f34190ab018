//! Read-your-writes in every topology the product supports (issue #25): two app instances on one
//! database, the real sidecar round-robin in front of them (as `scripts/run.sh` runs them), each
//! app purging the sidecar of the objects in the invalidation records it follows
//! (`MALL_SIDECAR_PURGE_URL`). After an admin's write through the sidecar is acknowledged, no
//! instance and no sidecar may serve the old value 100 ms later: the product, and the list page
//! holding it.
//!
//! Topologies: SQLite without Redis; PostgreSQL without and with Redis; MariaDB; and PostgreSQL
//! with a Redis that is killed and restarted in the middle. Each prints the staleness it measured
//! (the latest moment after the acknowledgement at which some reader still got the old value):
//! p50, p99 and max over its writes.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{free_addr, fresh_database, redis};

use mall_app::testing::{RunningApp, PASSWORD};
use mall_sidecar_config::SidecarConfig;
use serde_json::{json, Value};

/// What no reader may see once this long has passed since the write was acknowledged.
const BOUND: Duration = Duration::from_millis(100);
/// How long after each write the readers keep reading.
const WATCH: Duration = Duration::from_millis(400);

struct Mall {
    apps: Vec<RunningApp>,
    sidecar: SocketAddr,
    http: reqwest::Client,
    admin: String,
    _dir: tempfile::TempDir,
}

/// Two apps on `database` (None: one SQLite file), the sidecar in front of both; with Redis, the
/// apps' L2 and both fast paths (the apps' pub/sub, the sidecar's subscription) are on.
async fn mall(database: Option<String>, redis_url: Option<&str>) -> Mall {
    let dir = tempfile::tempdir().unwrap();
    let sidecar = free_addr();
    let mut flags = vec![format!("--sidecar-purge-url=http://{sidecar}")];
    if let Some(url) = &database {
        flags.push(format!("--database-url={url}"));
    }
    if let Some(url) = redis_url {
        flags.push(format!("--redis-url={url}"));
        flags.push(format!("--redis-prefix=ryw-{}", sidecar.port()));
    }
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let a = RunningApp::start_in(dir.path(), &flags).await;
    let b = RunningApp::start_in(dir.path(), &flags).await;

    let mut config = SidecarConfig::default();
    config.server.listen = sidecar;
    config.server.admin_listen = free_addr();
    config.server.threads = 1;
    config.upstream.servers = [&a, &b]
        .iter()
        .map(|app| mall_sidecar_config::UpstreamServer {
            address: app.addr.to_string(),
            weight: 1,
        })
        .collect();
    config.rate_limit.enabled = false;
    config.access_log.enabled = false;
    if let Some(url) = redis_url {
        config.cache.invalidation = Some(mall_sidecar_config::CacheInvalidation {
            redis_url: url.to_string(),
            prefix: format!("ryw-{}", sidecar.port()),
        });
    }
    std::thread::spawn(move || mall_sidecar::run(config, None));
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while http
        .get(format!("http://{sidecar}/api/products/1"))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .ok()
        != Some(200)
    {
        assert!(Instant::now() < deadline, "the sidecar never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let admin = mall_loadgen::login(&http, &format!("http://{sidecar}"), "admin", PASSWORD)
        .await
        .unwrap();
    Mall {
        apps: vec![a, b],
        sidecar,
        http,
        admin,
        _dir: dir,
    }
}

impl Mall {
    /// Every way a client reads the product: through the sidecar (twice, so both instances are
    /// asked), each instance directly, and the list page holding it through the sidecar.
    fn readers(&self, id: u32) -> Vec<(String, String)> {
        let s = self.sidecar;
        let mut readers = vec![
            ("sidecar".into(), format!("http://{s}/api/products/{id}")),
            ("sidecar".into(), format!("http://{s}/api/products/{id}")),
            ("sidecar list".into(), format!("http://{s}/api/products?limit=100")),
        ];
        for (i, app) in self.apps.iter().enumerate() {
            readers.push((format!("app {i}"), app.url(&format!("/api/products/{id}"))));
        }
        readers
    }

    async fn price(&self, url: &str, id: u32) -> Option<i64> {
        let body: Value = self.http.get(url).send().await.ok()?.json().await.ok()?;
        if let Some(items) = body["items"].as_array() {
            return items
                .iter()
                .find(|p| p["id"].as_i64() == Some(id as i64))
                .and_then(|p| p["price"].as_i64());
        }
        body["price"].as_i64()
    }

    /// Writes a new price through the sidecar and watches every reader; returns the staleness
    /// (the latest start, after the acknowledgement, of a read that got the old price) and the
    /// readers that got it later than [`BOUND`].
    async fn write_and_watch(&self, id: u32, old: i64, new: i64) -> (Duration, Vec<String>) {
        let readers = self.readers(id);
        // Every cache holds the old price first.
        for _ in 0..2 {
            for (_, url) in &readers {
                assert_eq!(self.price(url, id).await, Some(old), "{url} before the write");
            }
        }
        let r = self
            .http
            .patch(format!("http://{}/api/products/{id}", self.sidecar))
            .bearer_auth(&self.admin)
            .json(&json!({ "price": new }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "the write");
        let acked = Instant::now();
        let mut staleness = Duration::ZERO;
        let mut late = Vec::new();
        while acked.elapsed() < WATCH {
            let reads = readers.iter().map(|(name, url)| async move {
                let started = acked.elapsed();
                (name, started, self.price(url, id).await)
            });
            for (name, started, price) in futures_util::future::join_all(reads).await {
                match price {
                    Some(p) if p == new => {}
                    Some(p) if p == old => {
                        staleness = staleness.max(started);
                        if started >= BOUND {
                            late.push(format!("{name} at {started:?}"));
                        }
                    }
                    other => panic!("{name}: unexpected price {other:?} (old {old}, new {new})"),
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (staleness, late)
    }
}

/// Runs `writes` writes and checks the bound; returns the staleness of each.
async fn writes(mall: &Mall, topology: &str, rounds: u32, first_price: i64) -> Vec<Duration> {
    let mut seen = Vec::new();
    for round in 0..rounds {
        let id = 1 + (round % 30);
        let old = mall
            .price(&mall.apps[0].url(&format!("/api/products/{id}")), id)
            .await
            .unwrap();
        let new = first_price + round as i64;
        let (staleness, late) = mall.write_and_watch(id, old, new).await;
        assert!(
            late.is_empty(),
            "{topology}: the old price of product {id} was served {BOUND:?} after the write was acknowledged: {late:?}"
        );
        seen.push(staleness);
    }
    seen
}

fn report(topology: &str, mut seen: Vec<Duration>) {
    seen.sort();
    let at = |q: f64| seen[((seen.len() - 1) as f64 * q).round() as usize];
    // One JSON line per topology, which scripts/bench.sh collects for BENCHMARKS.md.
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    eprintln!(
        "STALENESS {}",
        json!({
            "group": "staleness", "topology": topology, "writes": seen.len(),
            "p50_ms": ms(at(0.5)), "p99_ms": ms(at(0.99)), "max_ms": ms(*seen.last().unwrap()),
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_without_redis() {
    let mall = mall(None, None).await;
    let seen = writes(&mall, "sqlite", 20, 10_000).await;
    report("sqlite, 2 instances, no Redis", seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_without_redis() {
    let Some(url) = fresh_database("MALL_TEST_POSTGRES_URL", "postgres://mall:mall@127.0.0.1:5432/test").await else {
        return;
    };
    let mall = mall(Some(url), None).await;
    let seen = writes(&mall, "postgres", 20, 20_000).await;
    report("postgres, 2 instances, no Redis", seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_with_redis() {
    let Some(url) = fresh_database("MALL_TEST_POSTGRES_URL", "postgres://mall:mall@127.0.0.1:5432/test").await else {
        return;
    };
    let port = free_addr().port();
    let Some(_redis) = redis(port) else { return };
    let mall = mall(Some(url), Some(&format!("redis://127.0.0.1:{port}"))).await;
    let seen = writes(&mall, "postgres + redis", 20, 30_000).await;
    report("postgres, 2 instances, Redis", seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mariadb_without_redis() {
    let Some(url) = fresh_database("MALL_TEST_MYSQL_URL", "mysql://mall:mall@127.0.0.1:3306/test").await else {
        return;
    };
    let mall = mall(Some(url), None).await;
    let seen = writes(&mall, "mariadb", 20, 40_000).await;
    report("mariadb, 2 instances, no Redis", seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_and_restarted_in_the_middle() {
    let Some(url) = fresh_database("MALL_TEST_POSTGRES_URL", "postgres://mall:mall@127.0.0.1:5432/test").await else {
        return;
    };
    let port = free_addr().port();
    let Some(redis_server) = redis(port) else { return };
    let mall = mall(Some(url), Some(&format!("redis://127.0.0.1:{port}"))).await;
    let mut seen = writes(&mall, "redis up", 6, 50_000).await;
    drop(redis_server);
    seen.extend(writes(&mall, "redis down", 8, 51_000).await);
    let _redis = redis(port).unwrap();
    seen.extend(writes(&mall, "redis restarted", 8, 52_000).await);
    report("postgres, 2 instances, Redis killed and restarted", seen);
}
