//! Faults: PostgreSQL restarted under order load (a private cluster on a free port, so the shared
//! server other tests use is left alone). During the outage requests fail fast with 503; they
//! recover by themselves; every order that got a 2xx exists exactly once; an order that got an
//! error, retried with its idempotency key after recovery, exists exactly once too.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mall_app::testing::{RunningApp, PASSWORD};
use serde_json::{json, Value};
use sqlx::Row;
use tokio::sync::Mutex;

fn pg_bin() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .collect();
    versions.sort();
    versions.pop().filter(|b| b.join("initdb").exists())
}

fn as_postgres(bin: &Path, tool: &str, args: &[&str]) {
    let status = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin.join(tool))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("runuser runs");
    assert!(status.success(), "{tool} {args:?} failed");
}

/// Per idempotency key: the HTTP status (0: no response), the order id, how long it took.
type Outcome = (u16, Option<String>, Duration);

struct Cluster {
    bin: PathBuf,
    data: String,
    options: String,
}

impl Cluster {
    fn start(&self) {
        as_postgres(
            &self.bin,
            "pg_ctl",
            &["-D", &self.data, "-o", &self.options, "-w", "-t", "30", "start"],
        );
    }
    fn stop(&self) {
        as_postgres(&self.bin, "pg_ctl", &["-D", &self.data, "-m", "fast", "-w", "stop"]);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", &self.data, "-m", "immediate", "stop"])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_restart_fails_fast_recovers_and_loses_no_order() {
    let Some(bin) = pg_bin() else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "PostgreSQL server binaries not found: apt-get install postgresql"
        );
        eprintln!("SKIPPED: no PostgreSQL server binaries");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    Command::new("chown")
        .args(["-R", "postgres"])
        .arg(dir.path())
        .status()
        .unwrap();
    Command::new("chmod").args(["755"]).arg(dir.path()).status().unwrap();
    let data = data.to_str().unwrap().to_string();
    as_postgres(
        &bin,
        "initdb",
        &["-D", &data, "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"],
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cluster = Cluster {
        bin,
        options: format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            dir.path().display()
        ),
        data,
    };
    cluster.start();

    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let app = RunningApp::start(&[&format!("--database-url={url}"), "--db-acquire-timeout-ms=500"]).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let token = mall_loadgen::login(&http, &format!("http://{}", app.addr), "user1", PASSWORD)
        .await
        .unwrap();

    // Four clients order one unit each, again and again, each order with its own key.
    let outcomes: Arc<Mutex<BTreeMap<String, Outcome>>> = Arc::default();
    let stop_at = Arc::new(Mutex::new(None::<Instant>));
    let mut clients = Vec::new();
    for c in 0..4 {
        let (http, token, outcomes, stop_at, url) = (
            http.clone(),
            token.clone(),
            outcomes.clone(),
            stop_at.clone(),
            app.url("/api/orders"),
        );
        clients.push(tokio::spawn(async move {
            for n in 0.. {
                if stop_at.lock().await.is_some_and(|t| Instant::now() >= t) {
                    break;
                }
                let key = format!("pg-restart-{c}-{n}");
                let started = Instant::now();
                let r = http
                    .post(&url)
                    .bearer_auth(&token)
                    .header("idempotency-key", &key)
                    .json(&json!({"items": [{"product_id": 1 + (n % 20), "quantity": 1}]}))
                    .send()
                    .await;
                let (status, id) = match r {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let body: Value = r.json().await.unwrap_or(Value::Null);
                        (status, body["id"].as_str().map(str::to_string))
                    }
                    Err(_) => (0, None),
                };
                outcomes.lock().await.insert(key, (status, id, started.elapsed()));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.start();
    // Keep going until orders succeed again for a while.
    let recovered_by = Instant::now() + Duration::from_secs(20);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let last_ok = outcomes
            .lock()
            .await
            .values()
            .filter(|(s, _, _)| (200..300).contains(s))
            .count();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now_ok = outcomes
            .lock()
            .await
            .values()
            .filter(|(s, _, _)| (200..300).contains(s))
            .count();
        if now_ok > last_ok + 5 {
            break;
        }
        assert!(
            Instant::now() < recovered_by,
            "orders did not recover after PostgreSQL came back"
        );
    }
    *stop_at.lock().await = Some(Instant::now());
    for c in clients {
        c.await.unwrap();
    }

    let outcomes = outcomes.lock().await.clone();
    let failed: Vec<(&String, &Outcome)> = outcomes
        .iter()
        .filter(|(_, (s, _, _))| !(200..300).contains(s))
        .collect();
    assert!(!failed.is_empty(), "the outage was observed");
    for (key, (status, _, took)) in &failed {
        assert_eq!(*status, 503, "{key}: an outage is a 503, not {status}");
        assert!(*took < Duration::from_secs(3), "{key}: failed fast ({took:?})");
    }

    // Every key that got an error, retried now, yields exactly one order.
    for (key, _) in &failed {
        let r = http.post(app.url("/api/orders")).bearer_auth(&token).header("idempotency-key", key.as_str())
            .json(&json!({"items": [{"product_id": 1 + (key.rsplit('-').next().unwrap().parse::<u64>().unwrap() % 20), "quantity": 1}]}))
            .send().await.unwrap();
        assert!(
            r.status().is_success(),
            "{key}: retry after recovery got {}",
            r.status()
        );
    }
    sqlx::any::install_default_drivers();
    let db = sqlx::AnyPool::connect(&url).await.unwrap();
    for (key, (status, id, _)) in &outcomes {
        let rows = sqlx::query(&format!(
            "SELECT CAST(order_id AS BIGINT) FROM idempotency_keys WHERE idem_key = '{key}'"
        ))
        .fetch_all(&db)
        .await
        .unwrap();
        assert_eq!(rows.len(), 1, "{key}: exactly one order");
        let order_id: i64 = rows[0].get(0);
        let orders: i64 = sqlx::query(&format!("SELECT COUNT(*) FROM orders WHERE id = {order_id}"))
            .fetch_one(&db)
            .await
            .unwrap()
            .get(0);
        assert_eq!(orders, 1, "{key}: the order row exists once");
        if (200..300).contains(status) {
            assert_eq!(
                id.as_deref(),
                Some(order_id.to_string().as_str()),
                "{key}: the 2xx order is the stored one"
            );
        }
    }
    eprintln!(
        "{} orders, {} failed during the outage and were retried",
        outcomes.len(),
        failed.len()
    );
    drop(app);
}
