//! The connection allowance (`MALL_DB_ALLOWANCE_FILE`): a running app shrinks and grows its
//! primary pool when the file changes, without a restart, and once shrunk never holds more
//! connections open than the file allows, under load, counted by the real PostgreSQL server
//! (`pg_stat_activity`).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{database, spawn_app, Backend};
use sqlx::Connection;

/// The app's connections to `db`: client backends (not autovacuum workers, which PostgreSQL also
/// lists under the database), less the bootstrap lock's, which the allowance leaves out.
async fn open_connections(admin: &mut sqlx::AnyConnection, db: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND backend_type = 'client backend' \
         AND application_name <> '{}'",
        mall_app::db::BOOTSTRAP_CONNECTION
    ))
    .fetch_one(admin)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_app_resizes_its_pool_to_the_allowance_file_and_stays_within_it() {
    let Some(db) = database(Backend::Postgres).await else {
        return;
    };
    let url = db.url.clone().unwrap();
    let db_name = url.rsplit('/').next().unwrap().to_string();
    let file = db.dir.path().join("allowance.json");
    std::fs::write(&file, r#"{"primary": 8}"#).unwrap();
    let app = spawn_app(
        &db,
        &[
            &format!("--db-allowance-file={}", file.display()),
            "--db-max-connections=12",
        ],
    )
    .await;
    let token = app.login("user1").await;
    let admin_url =
        std::env::var("MALL_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://mall:mall@127.0.0.1:5432/test".into());
    let mut admin = sqlx::AnyConnection::connect(&admin_url).await.unwrap();

    // 32 clients adding to carts (a transaction each) until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let bad = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for i in 0..32 {
        let (client, base, token) = (app.client.clone(), app.base.clone(), token.clone());
        let (stop, bad, done) = (stop.clone(), bad.clone(), done.clone());
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = client
                    .post(format!("{base}/api/cart/items"))
                    .bearer_auth(&token)
                    .json(&serde_json::json!({"product_id": 1 + i % 10, "quantity": 1}))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().is_success() || r.status().as_u16() == 409 => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        bad.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let mut most = 0;
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        most = most.max(open_connections(&mut admin, &db_name).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        most <= 8,
        "{most} connections open with an allowance of 8: {:?}",
        app.state.db.allowances()
    );

    // The operator writes a smaller share (maxReplicas went up): the pool shrinks under load.
    std::fs::write(&file, r#"{"primary": 3}"#).unwrap();
    let started = Instant::now();
    loop {
        let state = app.state.db.allowances();
        if (state[0].1, state[0].2) == (3, 3) && open_connections(&mut admin, &db_name).await <= 3 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "never converged: {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let converged = started.elapsed();
    let before = done.load(Ordering::Relaxed);
    let mut most = 0;
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        most = most.max(open_connections(&mut admin, &db_name).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(most <= 3, "{most} connections open after shrinking to 3");
    assert!(
        done.load(Ordering::Relaxed) > before,
        "requests kept being served while shrunk"
    );

    // And grows again (maxReplicas went down).
    std::fs::write(&file, r#"{"primary": 6}"#).unwrap();
    let started = Instant::now();
    while app.state.db.allowances()[0].2 != 6 {
        assert!(started.elapsed() < Duration::from_secs(15), "never grew");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(bad.load(Ordering::Relaxed), 0, "requests failed during the resizes");
    eprintln!(
        "shrunk 8 -> 3 in {converged:?} under load; {} requests served",
        done.load(Ordering::Relaxed)
    );
    // A malformed file changes nothing.
    std::fs::write(&file, r#"{"primary": "lots"}"#).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(app.state.db.allowances()[0].1, 6);
    app.stop().await;
}
