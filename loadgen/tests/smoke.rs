//! A short run of every scenario against a real mall app (SQLite), then the database check: the
//! load generator's numbers and its correctness check are what the benchmarks rely on.

use mall_app::testing::{RunningApp, PASSWORD};
use mall_loadgen::{check, run, Amount, Options, Scenario};

fn options(target: &str, scenario: Scenario) -> Options {
    Options {
        target: target.to_string(),
        scenario,
        concurrency: Some(4),
        amount: Amount::Requests(120),
        rate: None,
        users: 2,
        password: PASSWORD.into(),
        products: 60,
        zipf: scenario == Scenario::Products,
        progress: false,
        flash_stock: 1000,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_scenario_succeeds_and_the_database_agrees() {
    let app = RunningApp::start(&[]).await;
    let target = format!("http://{}", app.addr);
    let db = check::connect(&format!("sqlite://{}/mall.db?mode=ro", app.data_dir.display()))
        .await
        .unwrap();
    for scenario in [
        Scenario::Products,
        Scenario::Stock,
        Scenario::Cart,
        Scenario::Orders,
        Scenario::Mixed,
    ] {
        let before = check::snapshot(&db).await.unwrap();
        let report = run(options(&target, scenario)).await.unwrap();
        assert_eq!(report.requests, 120, "{scenario:?}");
        assert_eq!(report.success_rate, 1.0, "{scenario:?}: {:?}", report.statuses);
        assert!(report.p50_ms > 0.0 && report.p99_ms >= report.p50_ms && report.max_ms >= report.p999_ms);
        let (problems, passed) = check::verify(&db, &before, &report.ledger).await.unwrap();
        assert!(problems.is_empty(), "{scenario:?}: {problems:?}");
        if matches!(scenario, Scenario::Orders) {
            assert!(
                report.ledger.orders.len() >= 100,
                "orders were made: {}",
                report.ledger.orders.len()
            );
            // How many replays a worker sends depends on how the 120 requests spread over the
            // workers (every tenth of a worker's own requests); each must get its original order.
            assert!(report.ledger.replays_sent >= 4, "replays were sent");
            assert_eq!(
                report.ledger.replays_ok, report.ledger.replays_sent,
                "every replay answered with the original order"
            );
            assert!(passed.iter().any(|p| p.contains("new orders")));
        }
        if matches!(scenario, Scenario::Stock) {
            assert_eq!(report.ledger.deducted.values().sum::<u64>(), 120);
        }
    }
}

/// The flash sale: 60 buyers race for 300 units; the run ends when they are sold out, every unit
/// is in exactly one order, and the database check agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flash_sale_sells_out_exactly() {
    let app = RunningApp::start(&[]).await;
    let target = format!("http://{}", app.addr);
    let db = check::connect(&format!("sqlite://{}/mall.db?mode=ro", app.data_dir.display()))
        .await
        .unwrap();
    let before = check::snapshot(&db).await.unwrap();
    let mut options = options(&target, Scenario::FlashSale);
    options.concurrency = Some(60);
    options.amount = Amount::Duration(std::time::Duration::from_secs(60));
    options.flash_stock = 300;
    let report = run(options).await.unwrap();
    let sale = report.flash_sale.clone().expect("a flash-sale summary");
    assert_eq!(sale.stock, 300);
    assert_eq!(sale.sold_units, 300, "sold out: {report}");
    assert!(report.seconds < 60.0, "the run ends when the product is sold out");
    assert!(
        (150..=300).contains(&sale.orders),
        "orders of 1 or 2 units: {}",
        sale.orders
    );
    let (problems, passed) = check::verify(&db, &before, &report.ledger).await.unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    assert!(
        passed.iter().any(|p| p.contains("300 of 300 units sold, 0 left")),
        "{passed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_check_catches_a_write_it_was_not_told_about() {
    let app = RunningApp::start(&[]).await;
    let target = format!("http://{}", app.addr);
    let db = check::connect(&format!("sqlite://{}/mall.db", app.data_dir.display()))
        .await
        .unwrap();
    let before = check::snapshot(&db).await.unwrap();
    let report = run(options(&target, Scenario::Orders)).await.unwrap();
    // Someone else takes a unit of product 3 behind the load generator's back.
    sqlx::query("UPDATE products SET stock = stock - 1 WHERE id = 3")
        .execute(&db)
        .await
        .unwrap();
    let (problems, _) = check::verify(&db, &before, &report.ledger).await.unwrap();
    assert!(problems.iter().any(|p| p.starts_with("product 3")), "{problems:?}");
}

#[test]
fn the_binary_reports_json_at_a_fixed_rate() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let app = runtime.block_on(RunningApp::start(&[]));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mall-load"))
        .args([
            "--target",
            &format!("http://{}", app.addr),
            "--scenario",
            "products",
            "--products",
            "60",
        ])
        .args([
            "--duration",
            "1",
            "--rate",
            "200",
            "--concurrency",
            "4",
            "--users",
            "2",
            "--json",
            "--min-success",
            "100",
        ])
        .env("MALL_SEED_PASSWORD", PASSWORD)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let requests = report["requests"].as_u64().unwrap();
    assert!(
        (150..=230).contains(&requests),
        "about 200 requests at 200/s for 1 s: {requests}"
    );
    assert_eq!(report["success_rate"], 1.0);
    drop(runtime);
}
