//! Faults: Redis killed under load. The app keeps serving reads from its in-process cache and the
//! database (no failed read), writes still land, and once Redis is back cross-instance
//! invalidation resumes by itself.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use mall_app::testing::{RunningApp, PASSWORD};
use serde_json::{json, Value};

async fn price(http: &reqwest::Client, app: &RunningApp, id: u32) -> (u16, i64) {
    let r = http.get(app.url(&format!("/api/products/{id}"))).send().await.unwrap();
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    (status, body["price"].as_i64().unwrap_or(-1))
}

async fn set_price(http: &reqwest::Client, app: &RunningApp, admin: &str, id: u32, price: i64) -> u16 {
    http.patch(app.url(&format!("/api/products/{id}")))
        .bearer_auth(admin)
        .json(&json!({ "price": price }))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_under_load_loses_no_read_and_invalidation_resumes() {
    if Command::new("redis-server").arg("--version").output().is_err() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "redis-server not found: apt-get install redis-server"
        );
        eprintln!("SKIPPED: redis-server not installed");
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = common::redis(port).expect("redis-server was found above");
    let shared = tempfile::tempdir().unwrap();
    let flags = [
        format!("--redis-url=redis://127.0.0.1:{port}"),
        format!("--redis-prefix=faults-{port}"),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    // Two instances on one database, sharing Redis for L2 and invalidation.
    let a = RunningApp::start_in(shared.path(), &flags).await;
    let b = RunningApp::start_in(shared.path(), &flags).await;
    let http = reqwest::Client::new();
    let admin = mall_loadgen::login(&http, &format!("http://{}", a.addr), "admin", PASSWORD)
        .await
        .unwrap();

    // Invalidation works: B caches product 7, A changes it, B sees the change.
    assert_eq!(price(&http, &b, 7).await.0, 200);
    assert_eq!(set_price(&http, &a, &admin, 7, 1111).await, 200);
    wait_price(&http, &b, 7, 1111).await;

    // Kill Redis while reads go on against both instances.
    drop(server);
    let mut statuses = Vec::new();
    for i in 0..200u32 {
        let app = if i % 2 == 0 { &a } else { &b };
        statuses.push(price(&http, app, 1 + i % 40).await.0);
    }
    assert!(
        statuses.iter().all(|s| *s == 200),
        "every read succeeded without Redis: {statuses:?}"
    );
    // Writes land in the database even though the invalidation cannot be published.
    assert_eq!(set_price(&http, &a, &admin, 9, 2222).await, 200);
    let errors = metric(
        &reqwest::get(a.url("/metrics")).await.unwrap().text().await.unwrap(),
        "cache_errors_total",
    );
    assert!(errors > 0.0, "Redis was really down (the app counted its errors)");

    // Redis returns on the same port: invalidation resumes by itself.
    let _server = common::redis(port).expect("redis-server was found above");
    assert_eq!(price(&http, &b, 11).await.0, 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut round = 0;
    loop {
        round += 1;
        let target = 3000 + round;
        assert_eq!(set_price(&http, &a, &admin, 11, target).await, 200);
        tokio::time::sleep(Duration::from_millis(300)).await;
        if price(&http, &b, 11).await.1 == target {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "invalidation did not resume after Redis came back"
        );
    }
}

async fn wait_price(http: &reqwest::Client, app: &RunningApp, id: u32, want: i64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while price(http, app, id).await.1 != want {
        assert!(Instant::now() < deadline, "product {id} never showed price {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
