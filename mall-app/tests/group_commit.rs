//! Group commit decides every order of a batch exactly as the same orders placed one at a time,
//! in arrival order, would be decided: against SQLite, PostgreSQL and MySQL.
//!
//! The same requests go, in the same order, to two fresh malls: one places each order in its own
//! transaction (`--order-batch-max=1`), waiting for each answer before sending the next; the other
//! receives them all at once with a flush timeout long enough for them to form one batch. Together
//! they ask for more than the stock, mix explicit and cart orders, repeat keys (inside the batch
//! and from before it), refuse a missing and an unsellable product and an oversized total. Every
//! answer, the stock left, the carts and the stored keys must be the same.

mod common;

use std::collections::BTreeMap;

use common::{database, spawn_app, Backend, TestApp};
use mall_app::error::AppResult;
use mall_app::store::order_batch::{KeyClaim, OrderRequest};
use mall_app::store::orders::{Placed, Source};
use serde_json::json;
use sqlx::{Connection, Row};

backend_tests!(a_batch_decides_as_serial_orders);

/// A refused order's claim is released by its key alone. Releasing it by `order_id`, which has no
/// index, scanned every stored key: on PostgreSQL that was a scan per batch of refusals (95 ms at
/// 128,000 keys, the flash-sale collapse of BENCHMARKS.md 2c), and on MySQL/MariaDB the scan
/// also locks every key it reads, so it waited for any transaction holding an unrelated key.
/// Here another buyer's key is held locked while a batch refuses an order: the batch must finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_released_claim_touches_no_other_key() {
    for arrays in ["--order-batch-arrays=false", "--order-batch-arrays=true"] {
        let Some(db) = database(Backend::MySql).await else {
            return;
        };
        let app = spawn_app(
            &db,
            &[
                "--order-batch-max=64",
                "--order-batch-flush-us=100000",
                "--order-batch-writers=1",
                arrays,
            ],
        )
        .await;
        let admin = app.login("admin").await;
        let r = app
            .post(
                "/api/products",
                Some(&admin),
                json!({"name": "last one", "category": "sale", "price": 100, "stock": 1}),
            )
            .await;
        let product = r.body["id"].as_i64().unwrap();
        let mut user_ids = Vec::new();
        for i in 1..=3 {
            let token = app.login(&format!("user{i}")).await;
            user_ids.push(app.get("/api/me", Some(&token)).await.body["id"].as_i64().unwrap());
        }
        // Another buyer's claim, locked by its own transaction (its primary key alone: no gap lock).
        let mut other = sqlx::AnyConnection::connect(db.url.as_deref().unwrap()).await.unwrap();
        sqlx::query("INSERT INTO idempotency_keys (user_id, idem_key, request_hash, order_id, created_at) VALUES (?, 'theirs', 'h', 1, 0)")
            .bind(user_ids[2])
            .execute(&mut other)
            .await
            .unwrap();
        sqlx::query("BEGIN").execute(&mut other).await.unwrap();
        sqlx::query("SELECT order_id FROM idempotency_keys WHERE user_id = ? AND idem_key = 'theirs' FOR UPDATE")
            .bind(user_ids[2])
            .fetch_all(&mut other)
            .await
            .unwrap();

        let order = |user_id: i64, key: &str| OrderRequest {
            user_id,
            source: Source::Items(vec![(product, 1)]),
            key: Some(KeyClaim {
                key: key.into(),
                request_hash: format!("h-{key}"),
            }),
        };
        // A lone order first, so the next two queue behind it and form one batch.
        let requests = [
            order(user_ids[0], "warm-up"),
            order(user_ids[0], "mine"),
            order(user_ids[1], "mine"),
        ];
        let placed = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            futures_util::future::join_all(requests.iter().map(|r| app.state.orders.place(r.clone()))),
        )
        .await
        .unwrap_or_else(|_| panic!("{arrays}: the batch waited on another buyer's locked key"));
        assert!(
            placed[0].is_ok(),
            "{arrays}: the lone order sells the last unit: {:?}",
            placed[0].as_ref().err()
        );
        for p in &placed[1..] {
            assert!(
                p.is_err(),
                "{arrays}: sold out, yet order {:?}",
                p.as_ref().map(|p| p.order.id)
            );
        }
        assert_eq!(
            app.state.metrics.order_batch_splits.get(),
            0,
            "{arrays}: the batch was not split"
        );
        sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    }
}

async fn a_batch_decides_as_serial_orders(backend: Backend) {
    let Some(serial) = run(backend, &["--order-batch-max=1"], false).await else {
        return;
    };
    // One writer: the first request, alone when it arrives, is placed at once; the rest queue
    // behind it and form one batch.
    let batched = run(
        backend,
        &[
            "--order-batch-max=64",
            "--order-batch-flush-us=100000",
            "--order-batch-writers=1",
        ],
        true,
    )
    .await
    .expect("the database was reachable a moment ago");
    assert_eq!(batched.answers.len(), serial.answers.len());
    for (i, (b, s)) in batched.answers.iter().zip(&serial.answers).enumerate() {
        assert_eq!(b, s, "request {i}: batched answer differs from the serial one");
    }
    assert_eq!(batched.state, serial.state, "database after the orders");
    if backend != Backend::Sqlite {
        // The array-parameter statements (off by default; PostgreSQL arrays, MySQL/MariaDB
        // JSON_TABLE) decide the same: the names and keys above are ones an array literal or a
        // JSON document must quote.
        let arrays = run(
            backend,
            &[
                "--order-batch-max=64",
                "--order-batch-flush-us=100000",
                "--order-batch-writers=1",
                "--order-batch-arrays=true",
            ],
            true,
        )
        .await
        .expect("the database was reachable a moment ago");
        assert_eq!(arrays.answers, serial.answers, "array batches answer as serial orders");
        assert_eq!(arrays.state, serial.state, "database after the array batches");
    }
    assert!(
        serial.answers.iter().filter(|a| a.starts_with("created")).count() >= 4
            && serial
                .answers
                .iter()
                .filter(|a| a.contains("insufficient_stock"))
                .count()
                >= 2,
        "the scenario must both sell and refuse: {:?}",
        serial.answers
    );
}

struct Outcome {
    /// One line per request: what it was answered, with order ids replaced by the request that
    /// created the order.
    answers: Vec<String>,
    /// Stock of the products involved, cart lines, and stored keys (user, key, creating request).
    state: String,
}

async fn run(backend: Backend, extra: &[&str], batched: bool) -> Option<Outcome> {
    let db = database(backend).await?;
    let app = spawn_app(&db, extra).await;
    let admin = app.login("admin").await;
    let product = |name: &'static str, price: i64, stock: i64| {
        let app = &app;
        let admin = admin.clone();
        async move {
            let r = app
                .post(
                    "/api/products",
                    Some(&admin),
                    json!({"name": name, "category": "sale", "price": price, "stock": stock}),
                )
                .await;
            r.body["id"].as_i64().unwrap()
        }
    };
    // Names and keys that an array literal or JSON must quote, and characters outside ASCII
    // (the array batches bind them inside one parameter).
    let a = product(r#"A "quoted", {braced} \ back, naïve ☕"#, 100, 5).await;
    let b = product("B", 250, 3).await;
    let unsellable = product("C", 100, 10).await;
    let dear = product("D", 100, 10).await;
    sqlx::query(&app.state.db.sql("UPDATE products SET status = 'inactive' WHERE id = ?"))
        .bind(unsellable)
        .execute(&*app.state.db.write().await.unwrap())
        .await
        .unwrap();
    sqlx::query(&app.state.db.sql("UPDATE products SET price = ? WHERE id = ?"))
        .bind(i64::MAX / 2)
        .bind(dear)
        .execute(&*app.state.db.write().await.unwrap())
        .await
        .unwrap();
    let mut users = Vec::new();
    let mut tokens = Vec::new();
    for i in 1..=5 {
        let token = app.login(&format!("user{i}")).await;
        users.push(app.get("/api/me", Some(&token)).await.body["id"].as_i64().unwrap());
        tokens.push(token);
    }
    let (u1, u2, u3, u4, u5) = (users[0], users[1], users[2], users[3], users[4]);
    for (token, product, quantity) in [(&tokens[1], a, 2), (&tokens[1], b, 1), (&tokens[2], b, 3)] {
        let r = app
            .post(
                "/api/cart/items",
                Some(token),
                json!({"product_id": product, "quantity": quantity}),
            )
            .await;
        assert!(r.status.is_success(), "{:?}", r.body);
    }
    let items = |lines: &[(i64, i64)]| Source::Items(lines.to_vec());
    let keyed = |user_id: i64, source: Source, key: &str, hash: &str| OrderRequest {
        user_id,
        source,
        key: Some(KeyClaim {
            key: key.into(),
            request_hash: hash.into(),
        }),
    };
    let plain = |user_id: i64, source: Source| OrderRequest {
        user_id,
        source,
        key: None,
    };
    // An order from before, whose key the batch repeats.
    let earlier = app
        .state
        .orders
        .place(keyed(u1, items(&[(1, 1)]), "earlier", "h-earlier"))
        .await
        .expect("the earlier order is placed");
    let requests = vec![
        plain(u1, items(&[(a, 2)])),                                 // sells: A 5 -> 3
        plain(u2, Source::Cart),                                     // sells A x2, B x1: A 1, B 2
        plain(u2, Source::Cart),                                     // the cart was just ordered: empty
        plain(u3, Source::Cart),                                     // B x3, but 2 left
        keyed(u4, items(&[(b, 2), (a, 1)]), r#"k4 "q",{x}\"#, "h4"), // sells: A 0, B 0
        keyed(u5, items(&[(a, 1)]), "k5", "h5"),                     // A sold out: refused, key released
        keyed(u1, items(&[(1, 1)]), "earlier", "h-earlier"),         // replays the earlier order
        keyed(u1, items(&[(2, 1)]), "earlier", "h-other"),           // same key, other request: 422
        keyed(u4, items(&[(b, 2), (a, 1)]), r#"k4 "q",{x}\"#, "h4"), // repeat inside the batch: replays
        plain(u5, items(&[(999_999, 1)])),                           // no such product
        plain(u5, items(&[(unsellable, 1)])),                        // not for sale
        plain(u3, items(&[(dear, 3)])),                              // total overflows
        keyed(u5, items(&[(a, 1)]), "k5", "h5"),                     // the released key, tried again
        plain(u2, items(&[(2, 3), (1, 1)])),                         // sells from the seeded stock
    ];

    let metrics = &app.state.metrics;
    let (batches_before, splits_before) = (
        metrics.order_batch_size.get_sample_count(),
        metrics.order_batch_splits.get(),
    );
    let answers: Vec<AppResult<Placed>> = if batched {
        // Polled in order, so they reach the queue in this order and wait together.
        futures_util::future::join_all(requests.iter().map(|r| app.state.orders.place(r.clone()))).await
    } else {
        let mut out = Vec::new();
        for r in &requests {
            out.push(app.state.orders.place(r.clone()).await);
        }
        out
    };
    let batches = metrics.order_batch_size.get_sample_count() - batches_before;
    // A batch that fails as a whole falls back to one order per transaction, which would also
    // give the serial answers: the batch must have succeeded as a batch.
    assert_eq!(
        metrics.order_batch_splits.get() - splits_before,
        0,
        "no batch was split"
    );
    if batched {
        // The first alone, the rest as one batch, and one for the two requests whose key repeats
        // an earlier one in it.
        assert_eq!(batches, 3, "a lone order, one batch and a batch of repeated keys");
    } else {
        assert_eq!(batches, requests.len() as u64);
    }

    let mut creator: BTreeMap<i64, String> = BTreeMap::new();
    creator.insert(earlier.order.id, "earlier".into());
    for (i, answer) in answers.iter().enumerate() {
        if let Ok(p) = answer {
            if !p.replayed {
                creator.insert(p.order.id, format!("request {i}"));
            }
        }
    }
    let answers = answers
        .iter()
        .map(|answer| match answer {
            Ok(p) => format!(
                "{} {} by user {}: total {} items {:?}",
                if p.replayed { "replayed" } else { "created" },
                creator.get(&p.order.id).map_or("an unknown order", String::as_str),
                p.order.user_id,
                p.order.total,
                p.order
                    .items
                    .iter()
                    .map(|i| (i.product_id, i.quantity, i.unit_price, i.name.as_str()))
                    .collect::<Vec<_>>()
            ),
            Err(e) => format!("refused {} {}: {}", e.status(), e.code(), e),
        })
        .collect();
    let state = database_state(&app, &[a, b, 1, 2], &creator).await;
    app.stop().await;
    Some(Outcome { answers, state })
}

async fn database_state(app: &TestApp, products: &[i64], creator: &BTreeMap<i64, String>) -> String {
    let db = &app.state.db;
    let mut out = String::new();
    for id in products {
        let row = sqlx::query(&db.sql("SELECT stock FROM products WHERE id = ?"))
            .bind(*id)
            .fetch_one(&*db.read_primary().await.unwrap())
            .await
            .unwrap();
        out += &format!("product {id}: stock {}\n", row.get::<i64, _>(0));
    }
    for row in sqlx::query("SELECT user_id, product_id, quantity FROM cart_items ORDER BY user_id, product_id")
        .fetch_all(&*db.read_primary().await.unwrap())
        .await
        .unwrap()
    {
        out += &format!(
            "cart of user {}: {} x{}\n",
            row.get::<i64, _>(0),
            row.get::<i64, _>(1),
            row.get::<i64, _>(2)
        );
    }
    for row in
        sqlx::query("SELECT user_id, idem_key, request_hash, order_id FROM idempotency_keys ORDER BY user_id, idem_key")
            .fetch_all(&*db.read_primary().await.unwrap())
            .await
            .unwrap()
    {
        let order_id: i64 = row.get(3);
        out += &format!(
            "key {}/{} ({}) -> {}\n",
            row.get::<i64, _>(0),
            row.get::<String, _>(1),
            row.get::<String, _>(2),
            creator.get(&order_id).map_or("an unknown order", String::as_str)
        );
    }
    for row in sqlx::query(
        "SELECT order_id, product_id, name, unit_price, quantity FROM order_items ORDER BY order_id, product_id",
    )
    .fetch_all(&*db.read_primary().await.unwrap())
    .await
    .unwrap()
    {
        let order_id: i64 = row.get(0);
        out += &format!(
            "item of {}: product {} {:?} at {} x{}\n",
            creator.get(&order_id).map_or("an unknown order", String::as_str),
            row.get::<i64, _>(1),
            row.get::<String, _>(2),
            row.get::<i64, _>(3),
            row.get::<i64, _>(4)
        );
    }
    let orders: i64 = sqlx::query("SELECT COUNT(*) FROM orders")
        .fetch_one(&*db.read_primary().await.unwrap())
        .await
        .unwrap()
        .get(0);
    out += &format!("orders: {orders}\n");
    out
}
