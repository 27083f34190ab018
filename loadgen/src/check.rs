//! After the run: does the database agree with what the mall told the load generator?
//! - stock consumed per product = units in the orders it accepted + units the stock endpoint took;
//! - new orders = distinct idempotency keys that made an order (a key never made two), and their
//!   items add up per product;
//! - no stock below zero; every replayed key answered with its original order.
//!
//! Run it against a mall nobody else is using during the run: other traffic changes stock too.

use std::collections::BTreeMap;

use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Row};

use crate::scenario::LedgerData;

/// Products the write scenarios touch: stock on 1..10, orders on 1..20, cart on 1..5.
const WATCHED: u64 = 20;

pub struct Snapshot {
    stock: BTreeMap<u64, i64>,
    orders: i64,
    mysql: bool,
}

pub async fn connect(url: &str) -> anyhow::Result<AnyPool> {
    sqlx::any::install_default_drivers();
    Ok(AnyPoolOptions::new().max_connections(2).connect(url).await?)
}

async fn stock_of(db: &AnyPool, id: u64) -> anyhow::Result<Option<i64>> {
    let row = sqlx::query(&format!("SELECT stock FROM products WHERE id = {id}"))
        .fetch_optional(db)
        .await?;
    Ok(row.map(|r| r.get::<i64, _>(0)))
}

pub async fn snapshot(db: &AnyPool) -> anyhow::Result<Snapshot> {
    let rows = sqlx::query(&format!("SELECT id, stock FROM products WHERE id <= {WATCHED}"))
        .fetch_all(db)
        .await?;
    let stock = rows
        .iter()
        .map(|r| (r.get::<i64, _>(0) as u64, r.get::<i64, _>(1)))
        .collect();
    let orders: i64 = sqlx::query("SELECT COUNT(*) FROM orders").fetch_one(db).await?.get(0);
    let mysql = db.connect_options().database_url.scheme().starts_with("mysql");
    Ok(Snapshot { stock, orders, mysql })
}

/// The problems found (empty: consistent), and a line per check that passed.
pub async fn verify(
    db: &AnyPool,
    before: &Snapshot,
    ledger: &LedgerData,
) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let after = snapshot(db).await?;
    let mut problems = Vec::new();
    let mut passed = Vec::new();

    let mut consumed_total = 0i64;
    // Products the run created (the flash sale's) started at the stock it gave them.
    let mut watched = before.stock.clone();
    watched.extend(ledger.created.iter().map(|(id, stock)| (*id, *stock)));
    for (id, was) in &watched {
        let now = match after.stock.get(id) {
            Some(now) => *now,
            None => stock_of(db, *id).await?.unwrap_or(*was),
        };
        let consumed = was - now;
        let expected =
            (ledger.ordered.get(id).copied().unwrap_or(0) + ledger.deducted.get(id).copied().unwrap_or(0)) as i64;
        let agrees = consumed == expected && now >= 0;
        if consumed != expected {
            problems.push(format!(
                "product {id}: stock fell by {consumed}, but the mall confirmed {expected} units"
            ));
        }
        if now < 0 {
            problems.push(format!("product {id}: stock is negative ({now})"));
        }
        if agrees && ledger.created.contains_key(id) {
            passed.push(format!(
                "product {id}: {consumed} of {was} units sold, {now} left, none oversold"
            ));
        }
        consumed_total += consumed;
    }
    passed.push(format!(
        "stock consumed ({consumed_total} units) = units confirmed in orders and deductions, none below zero"
    ));

    let new_orders = after.orders - before.orders;
    if new_orders != ledger.orders.len() as i64 {
        problems.push(format!(
            "{new_orders} orders were created, but {} idempotency keys made one",
            ledger.orders.len()
        ));
    } else {
        passed.push(format!(
            "{new_orders} new orders = distinct idempotency keys that made one"
        ));
    }
    let pattern = format!("lg-{}-%", ledger.run_id);
    let keyed: i64 = sqlx::query(&format!(
        "SELECT COUNT(*) FROM idempotency_keys WHERE idem_key LIKE '{pattern}'"
    ))
    .fetch_one(db)
    .await?
    .get(0);
    if keyed != ledger.orders.len() as i64 {
        problems.push(format!(
            "{keyed} idempotency keys stored for this run, {} expected",
            ledger.orders.len()
        ));
    }
    let items = sqlx::query(&format!(
        // SUM is NUMERIC on PostgreSQL and DECIMAL on MySQL: cast to a 64-bit integer.
        "SELECT oi.product_id, CAST(SUM(oi.quantity) AS {}) FROM order_items oi JOIN idempotency_keys k ON k.order_id = oi.order_id \
         WHERE k.idem_key LIKE '{pattern}' GROUP BY oi.product_id",
        if before.mysql { "SIGNED" } else { "BIGINT" }
    ))
    .fetch_all(db)
    .await?;
    let in_orders: BTreeMap<u64, u64> = items
        .iter()
        .map(|r| (r.get::<i64, _>(0) as u64, r.get::<i64, _>(1) as u64))
        .collect();
    if in_orders != ledger.ordered {
        problems.push(format!(
            "order items per product {in_orders:?} differ from the confirmed orders {:?}",
            ledger.ordered
        ));
    } else {
        passed.push("order items per product = confirmed orders".into());
    }
    if ledger.replays_mismatched > 0 {
        problems.push(format!(
            "{} replayed keys answered with a different order or failed",
            ledger.replays_mismatched
        ));
    } else if ledger.replays_ok > 0 {
        passed.push(format!(
            "{} replayed keys answered with their original order",
            ledger.replays_ok
        ));
    }
    Ok((problems, passed))
}
