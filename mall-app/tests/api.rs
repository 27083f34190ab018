//! The API suite, run against SQLite, PostgreSQL and MySQL through the real router on a real
//! socket.

mod common;

use common::{database, spawn_app, Backend, TestApp};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

backend_tests!(
    catalog,
    auth_and_bad_input,
    cart_and_orders,
    concurrent_orders_never_oversell,
    writes_are_visible_on_next_read,
    idempotency_keys_in_flight_and_expired
);

async fn start(backend: Backend) -> Option<(TestApp, common::TestDb)> {
    let db = database(backend).await?;
    let app = spawn_app(&db, &[]).await;
    Some((app, db))
}

async fn admin_token(app: &TestApp) -> String {
    app.login("admin").await
}

async fn catalog(backend: Backend) {
    let Some((app, _db)) = start(backend).await else { return };

    // Warm-up preloaded the catalog without counting misses; the first read is already a hit.
    assert_eq!(app.metric("cache_misses_total", r#"level="l1""#).await, 0.0);
    let r = app.get("/api/products/7", None).await;
    assert_eq!(
        app.metric("cache_hits_total", r#"category="product",level="l1""#).await,
        1.0
    );
    assert_eq!(app.metric("cache_misses_total", r#"level="l1""#).await, 0.0);
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["id"], 7);
    assert_eq!(r.body["stock"], 100);
    assert_eq!(r.headers["cache-control"], "public, max-age=5");

    let r = app.get("/api/products/999999", None).await;
    assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "not_found"));
    let r = app.get("/api/products/abc", None).await;
    assert_eq!((r.status, r.code()), (StatusCode::BAD_REQUEST, "invalid_path"));

    // Cursor pagination visits every product once, in id order.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/products?limit=7&cursor={c}"),
            None => "/api/products?limit=7".to_string(),
        };
        let r = app.get(&path, None).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        let items = r.body["items"].as_array().unwrap();
        assert!(items.len() <= 7);
        seen.extend(items.iter().map(|p| p["id"].as_i64().unwrap()));
        match r.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(seen, (1..=50).collect::<Vec<i64>>());

    // Filters.
    let r = app
        .get(
            "/api/products?category=books&min_price=1000&max_price=60000&limit=100",
            None,
        )
        .await;
    let items = r.body["items"].as_array().unwrap();
    assert!(!items.is_empty());
    for p in items {
        assert_eq!(p["category"], "books");
        let price = p["price"].as_i64().unwrap();
        assert!((1000..=60000).contains(&price), "price {price} outside the filter");
    }

    // Projection returns exactly the asked fields.
    let r = app.get("/api/products?limit=3&fields=name,price", None).await;
    for p in r.body["items"].as_array().unwrap() {
        let keys: Vec<&String> = p.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["name", "price"]);
    }
    let r = app.get("/api/products/3?fields=id,stock", None).await;
    assert_eq!(r.body, json!({"id": 3, "stock": 100}));

    // Bad parameters name themselves.
    for (path, code, needle) in [
        ("/api/products?fields=id,secret", "unknown_field", "secret"),
        ("/api/products/1?fields=password", "unknown_field", "password"),
        ("/api/products?limit=101", "invalid_request", "limit"),
        ("/api/products?limit=0", "invalid_request", "limit"),
        ("/api/products?limit=abc", "invalid_query", "limit"),
        ("/api/products?cursor=%21%21", "invalid_cursor", "cursor"),
        ("/api/products?status=deleted", "invalid_request", "status"),
        ("/api/products?min_price=10&max_price=5", "invalid_request", "min_price"),
    ] {
        let r = app.get(path, None).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {:?}", r.body);
        assert_eq!(r.code(), code, "{path}");
        assert!(r.message().contains(needle), "{path}: {:?}", r.message());
    }

    // Operations endpoints.
    assert_eq!(app.get("/health", None).await.status, StatusCode::OK);
    let r = app.get("/ready", None).await;
    assert_eq!(r.body["checks"]["warmup"], "ok");
    let metrics = app.metrics().await;
    for needle in [
        r#"http_requests_total{method="GET",route="/api/products/{id}",status="200"}"#,
        r#"http_request_duration_seconds_bucket{method="GET",route="/api/products"#,
        r#"db_pool_connections{pool="primary",state="max"}"#,
        r#"cache_hits_total{category="product",level="l1"}"#,
        "process_resident_memory_bytes",
    ] {
        assert!(metrics.contains(needle), "metrics lack {needle}");
    }
    let r = app.get("/no/such/route", None).await;
    assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "not_found"));
    app.stop().await;
}

async fn auth_and_bad_input(backend: Backend) {
    let Some((app, _db)) = start(backend).await else { return };

    let token = app.register("alice").await;
    let r = app
        .post(
            "/api/auth/register",
            None,
            json!({"username": "alice", "password": "another-pass"}),
        )
        .await;
    assert_eq!((r.status, r.code()), (StatusCode::CONFLICT, "username_taken"));
    let r = app
        .post(
            "/api/auth/register",
            None,
            json!({"username": "al", "password": "longenough"}),
        )
        .await;
    assert!(
        r.status == StatusCode::BAD_REQUEST && r.message().contains("username"),
        "{:?}",
        r.body
    );
    let r = app
        .post(
            "/api/auth/login",
            None,
            json!({"username": "alice", "password": "wrong-password"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(app.get("/api/cart", Some(&token)).await.status, StatusCode::OK);
    let me = app.get("/api/me", Some(&token)).await;
    assert_eq!(
        (me.body["username"].as_str(), me.body["role"].as_str()),
        (Some("alice"), Some("customer"))
    );
    assert!(me.body.get("password_hash").is_none());
    let hits = app.metric("cache_hits_total", r#"category="user""#).await;
    app.get("/api/me", Some(&token)).await;
    assert!(
        app.metric("cache_hits_total", r#"category="user""#).await > hits,
        "profiles come from the user cache"
    );

    // Missing, forged and expired tokens.
    let r = app.get("/api/cart", None).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, "unauthorized"));
    let mut forged = token.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == 'A' { 'B' } else { 'A' });
    assert_eq!(
        app.get("/api/cart", Some(&forged)).await.status,
        StatusCode::UNAUTHORIZED
    );
    let other_key = mall_app::auth::Tokens::new(&"k".repeat(32), 3600)
        .issue(1, mall_app::store::users::Role::Admin)
        .unwrap();
    let r = app.get("/api/cart", Some(&other_key)).await;
    assert!(
        r.status == StatusCode::UNAUTHORIZED && r.message().contains("signature"),
        "{:?}",
        r.body
    );
    let expired = app
        .state
        .tokens
        .issue_expiring(1, mall_app::store::users::Role::Customer, 1_000_000)
        .unwrap();
    let r = app.get("/api/cart", Some(&expired)).await;
    assert!(
        r.status == StatusCode::UNAUTHORIZED && r.message().contains("expired"),
        "{:?}",
        r.body
    );

    // Admin-only writes.
    let new = json!({"name": "Lamp", "category": "home", "price": 2500, "stock": 3});
    let r = app.post("/api/products", Some(&token), new.clone()).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let admin = admin_token(&app).await;
    let r = app.post("/api/products", Some(&admin), new).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert!(
        r.body["id"].as_i64().unwrap() > 50,
        "admin-created ids do not collide with seeded ones"
    );

    // Malformed bodies: syntax, types, unknown fields, wrong content type, size.
    let r = app
        .raw(
            Method::POST,
            "/api/cart/items",
            Some(&token),
            "application/json",
            b"{\"product_id\": 1,".to_vec(),
        )
        .await;
    assert_eq!((r.status, r.code()), (StatusCode::BAD_REQUEST, "invalid_json"));
    let r = app
        .post(
            "/api/cart/items",
            Some(&token),
            json!({"product_id": "one", "quantity": 1}),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.message().contains("product_id"), "{:?}", r.body);
    let r = app
        .post(
            "/api/cart/items",
            Some(&token),
            json!({"product_id": 1, "quantity": 1, "discount": 50}),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.message().contains("discount"), "{:?}", r.body);
    let r = app
        .raw(
            Method::POST,
            "/api/cart/items",
            Some(&token),
            "text/plain",
            b"{}".to_vec(),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
    );
    let huge = format!("{{\"username\": \"{}\", \"password\": \"x\"}}", "a".repeat(200_000));
    let r = app
        .raw(
            Method::POST,
            "/api/auth/login",
            None,
            "application/json",
            huge.into_bytes(),
        )
        .await;
    assert_eq!((r.status, r.code()), (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"));
    assert_eq!(
        r.headers["connection"], "close",
        "the unread body ends the connection; clients must not reuse it"
    );
    let r = app
        .post(
            "/api/orders",
            Some(&token),
            json!({"items": [{"product_id": 1, "quantity": 1}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "a valid order after all that bad input");
    let r = app
        .raw(
            Method::POST,
            "/api/orders",
            Some(&token),
            "application/json",
            b"{\"items\" ]".to_vec(),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = app
        .request(Method::DELETE, "/api/products/1", Some(&admin), None, &[])
        .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.code(), "method_not_allowed");
    app.stop().await;
}

async fn cart_and_orders(backend: Backend) {
    let Some((app, _db)) = start(backend).await else { return };
    let alice = app.login("user1").await;
    let bob = app.login("user2").await;

    let r = app
        .post("/api/cart/items", Some(&alice), json!({"product_id": 3, "quantity": 2}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    app.post("/api/cart/items", Some(&alice), json!({"product_id": 3, "quantity": 1}))
        .await;
    app.post("/api/cart/items", Some(&alice), json!({"product_id": 5, "quantity": 1}))
        .await;
    let r = app
        .request(
            Method::PUT,
            "/api/cart/items/5",
            Some(&alice),
            Some(json!({"quantity": 4})),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let cart = app.get("/api/cart", Some(&alice)).await;
    assert_eq!(cart.headers["cache-control"], "private, no-store");
    let lines: Vec<(i64, i64)> = cart.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["product_id"].as_i64().unwrap(), l["quantity"].as_i64().unwrap()))
        .collect();
    assert_eq!(lines, [(3, 3), (5, 4)]);
    let p3 = app.get("/api/products/3", None).await.body["price"].as_i64().unwrap();
    let p5 = app.get("/api/products/5", None).await.body["price"].as_i64().unwrap();
    assert_eq!(cart.body["total"].as_i64().unwrap(), 3 * p3 + 4 * p5);

    // Another user's cart is their own.
    assert_eq!(app.get("/api/cart", Some(&bob)).await.body["items"], json!([]));

    // Bad cart input.
    for (body, needle) in [
        (json!({"product_id": 3, "quantity": 0}), "quantity"),
        (json!({"product_id": 3, "quantity": -2}), "quantity"),
        (json!({"product_id": 3, "quantity": 1_000_000_000}), "quantity"),
    ] {
        let r = app.post("/api/cart/items", Some(&alice), body).await;
        assert!(
            r.status == StatusCode::BAD_REQUEST && r.message().contains(needle),
            "{:?}",
            r.body
        );
    }
    let r = app
        .post(
            "/api/cart/items",
            Some(&alice),
            json!({"product_id": 424242, "quantity": 1}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    // Order the cart: stock drops, the cart empties.
    let r = app.request(Method::POST, "/api/orders", Some(&alice), None, &[]).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let order = r.body.clone();
    assert_eq!(order["total"].as_i64().unwrap(), 3 * p3 + 4 * p5);
    assert!(order["id"].is_string(), "snowflake ids are strings in JSON");
    assert!(order["order_no"].as_str().unwrap().starts_with("MO"));
    assert_eq!(app.get("/api/cart", Some(&alice)).await.body["items"], json!([]));
    assert_eq!(app.get("/api/products/3", None).await.body["stock"], 97);
    assert_eq!(app.get("/api/products/5", None).await.body["stock"], 96);
    let r = app.request(Method::POST, "/api/orders", Some(&alice), None, &[]).await;
    assert!(
        r.status == StatusCode::BAD_REQUEST && r.message().contains("cart is empty"),
        "{:?}",
        r.body
    );

    // Reading orders: the owner sees it, another user does not.
    let id = order["id"].as_str().unwrap();
    let r = app.get(&format!("/api/orders/{id}"), Some(&alice)).await;
    assert_eq!(r.body, order);
    assert_eq!(
        app.get(&format!("/api/orders/{id}"), Some(&bob)).await.status,
        StatusCode::NOT_FOUND
    );

    // Explicit items; insufficient stock changes nothing.
    let r = app
        .post(
            "/api/orders",
            Some(&alice),
            json!({"items": [{"product_id": 8, "quantity": 2}, {"product_id": 9, "quantity": 101}]}),
        )
        .await;
    assert_eq!((r.status, r.code()), (StatusCode::CONFLICT, "insufficient_stock"));
    assert!(r.message().contains("product 9"), "{:?}", r.body);
    assert_eq!(
        app.get("/api/products/8", None).await.body["stock"],
        100,
        "the failed order rolled back"
    );
    let r = app
        .post(
            "/api/orders",
            Some(&alice),
            json!({"items": [{"product_id": 8, "quantity": 1}, {"product_id": 8, "quantity": 1}]}),
        )
        .await;
    assert!(
        r.status == StatusCode::BAD_REQUEST && r.message().contains("items[1].product_id"),
        "{:?}",
        r.body
    );
    let r = app
        .post(
            "/api/orders",
            Some(&alice),
            json!({"items": [{"product_id": 777, "quantity": 1}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    // Idempotency: the same key replays, a different body under the same key is refused.
    let body = json!({"items": [{"product_id": 10, "quantity": 2}]});
    let key = [("idempotency-key", "order-abc-1")];
    let first = app
        .request(Method::POST, "/api/orders", Some(&alice), Some(body.clone()), &key)
        .await;
    assert_eq!(first.status, StatusCode::CREATED);
    let again = app
        .request(Method::POST, "/api/orders", Some(&alice), Some(body.clone()), &key)
        .await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(again.body, first.body);
    assert_eq!(
        app.get("/api/products/10", None).await.body["stock"],
        98,
        "stock deducted once"
    );
    let other = app
        .request(
            Method::POST,
            "/api/orders",
            Some(&alice),
            Some(json!({"items": [{"product_id": 10, "quantity": 3}]})),
            &key,
        )
        .await;
    // draft-ietf-httpapi-idempotency-key-header: a key reused for a different request is 422.
    assert_eq!(
        (other.status, other.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused")
    );
    assert_eq!(
        first.headers["idempotency-key-lifetime"], "86400",
        "the key's lifetime is published"
    );
    // Keys are per user: bob's same key is his own order.
    let bobs = app
        .request(Method::POST, "/api/orders", Some(&bob), Some(body), &key)
        .await;
    assert_eq!(bobs.status, StatusCode::CREATED);
    assert_ne!(bobs.body["id"], first.body["id"]);

    // Listing with a cursor, newest first.
    let page1 = app.get("/api/orders?limit=1", Some(&alice)).await;
    assert_eq!(page1.body["items"][0]["id"], first.body["id"]);
    let cursor = page1.body["next_cursor"].as_str().unwrap();
    let page2 = app
        .get(&format!("/api/orders?limit=5&cursor={cursor}"), Some(&alice))
        .await;
    let ids: Vec<&Value> = page2.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| &o["id"])
        .collect();
    assert_eq!(ids, [&order["id"]]);
    assert!(page2.body["next_cursor"].is_null());

    // Keys are opaque strings compared exactly: one differing only in case is another key, so
    // another order (MySQL/MariaDB's default collation once replayed the first order here).
    let upper = app
        .request(
            Method::POST,
            "/api/orders",
            Some(&alice),
            Some(json!({"items": [{"product_id": 10, "quantity": 2}]})),
            &[("idempotency-key", "ORDER-ABC-1")],
        )
        .await;
    assert_eq!(upper.status, StatusCode::CREATED);
    assert!(
        upper.headers.get("idempotent-replayed").is_none(),
        "a new key is not a replay"
    );
    assert_ne!(upper.body["id"], first.body["id"]);

    assert!(app.metric("orders_created_total", "").await >= 3.0);
    assert!(app.metric("stock_conflicts_total", "").await >= 1.0);
    assert!(app.metric("idempotent_replays_total", "").await >= 1.0);
    app.stop().await;
}

async fn concurrent_orders_never_oversell(backend: Backend) {
    let Some((app, _db)) = start(backend).await else { return };
    let admin = admin_token(&app).await;
    let r = app
        .post(
            "/api/products",
            Some(&admin),
            json!({"name": "Flash sale", "category": "toys", "price": 100, "stock": 25}),
        )
        .await;
    let product_id = r.body["id"].as_i64().unwrap();
    let mut tokens = Vec::new();
    for i in 1..=5 {
        tokens.push(app.login(&format!("user{i}")).await);
    }

    // 60 orders of 1 or 2 units race for 25 units.
    let app = std::sync::Arc::new(app);
    let mut tasks = Vec::new();
    for i in 0..60 {
        let app = app.clone();
        let token = tokens[i % tokens.len()].clone();
        let quantity = 1 + (i % 2) as i64;
        tasks.push(tokio::spawn(async move {
            let r = app
                .post(
                    "/api/orders",
                    Some(&token),
                    json!({"items": [{"product_id": product_id, "quantity": quantity}]}),
                )
                .await;
            (r.status, quantity, r.code().to_string())
        }));
    }
    let mut sold = 0;
    for t in tasks {
        let (status, quantity, code) = t.await.unwrap();
        match status {
            StatusCode::CREATED => sold += quantity,
            StatusCode::CONFLICT => assert_eq!(code, "insufficient_stock"),
            other => panic!("unexpected {other} ({code}) under contention"),
        }
    }
    let stock = app.get(&format!("/api/products/{product_id}"), None).await.body["stock"]
        .as_i64()
        .unwrap();
    assert!(stock >= 0);
    assert_eq!(sold + stock, 25, "units sold plus units left equal the starting stock");
    assert!(
        stock <= 1,
        "orders of 1 unit kept coming, so at most 1 unit can be left ({stock})"
    );

    // The units in orders (read back per user) equal the units sold.
    let mut in_orders = 0;
    for token in &tokens {
        let mut cursor = String::new();
        loop {
            let r = app.get(&format!("/api/orders?limit=100{cursor}"), Some(token)).await;
            for o in r.body["items"].as_array().unwrap() {
                for item in o["items"].as_array().unwrap() {
                    if item["product_id"] == product_id {
                        in_orders += item["quantity"].as_i64().unwrap();
                    }
                }
            }
            match r.body["next_cursor"].as_str() {
                Some(c) => cursor = format!("&cursor={c}"),
                None => break,
            }
        }
    }
    assert_eq!(in_orders, sold);

    // Ten concurrent requests with one Idempotency-Key make one order: each gets the order, or 409
    // `idempotency_key_in_use` with Retry-After while the first is being processed, and then the
    // order when it retries.
    let token = tokens[0].clone();
    let before = app.get("/api/products/20", None).await.body["stock"].as_i64().unwrap();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let app = app.clone();
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let body = json!({"items": [{"product_id": 20, "quantity": 1}]});
                let r = app
                    .request(
                        Method::POST,
                        "/api/orders",
                        Some(&token),
                        Some(body),
                        &[("idempotency-key", "same-key")],
                    )
                    .await;
                if r.status == StatusCode::CONFLICT {
                    assert_eq!(r.code(), "idempotency_key_in_use");
                    assert!(r.headers.contains_key("retry-after"));
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
                assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
                return r.body["id"].as_str().unwrap().to_string();
            }
        }));
    }
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        ids.insert(t.await.unwrap());
    }
    assert_eq!(ids.len(), 1, "one idempotency key, one order");
    let after = app.get("/api/products/20", None).await.body["stock"].as_i64().unwrap();
    assert_eq!(before - after, 1);
    std::sync::Arc::into_inner(app).unwrap().stop().await;
}

async fn writes_are_visible_on_next_read(backend: Backend) {
    let Some((app, _db)) = start(backend).await else { return };
    let admin = admin_token(&app).await;
    assert_eq!(app.get("/api/products/4", None).await.body["stock"], 100);
    let hits = app.metric("cache_hits_total", r#"level="l1""#).await;
    assert_eq!(app.get("/api/products/4", None).await.body["stock"], 100);
    assert!(
        app.metric("cache_hits_total", r#"level="l1""#).await > hits,
        "the second read is an L1 hit"
    );

    let r = app
        .post("/api/products/4/stock", Some(&admin), json!({"delta": -30}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(app.get("/api/products/4", None).await.body["stock"], 70);
    let r = app
        .post("/api/products/4/stock", Some(&admin), json!({"delta": -71}))
        .await;
    assert_eq!((r.status, r.code()), (StatusCode::CONFLICT, "insufficient_stock"));
    let r = app
        .request(
            Method::PATCH,
            "/api/products/4",
            Some(&admin),
            Some(json!({"price": 12345})),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let p = app.get("/api/products/4", None).await.body;
    assert_eq!((p["price"].as_i64(), p["stock"].as_i64()), (Some(12345), Some(70)));
    let version = p["version"].as_i64().unwrap();
    let r = app
        .request(
            Method::PATCH,
            "/api/products/4",
            Some(&admin),
            Some(json!({"price": 1, "version": version - 1})),
            &[],
        )
        .await;
    assert_eq!((r.status, r.code()), (StatusCode::CONFLICT, "version_conflict"));

    let user = app.login("user3").await;
    app.post(
        "/api/orders",
        Some(&user),
        json!({"items": [{"product_id": 4, "quantity": 5}]}),
    )
    .await;
    assert_eq!(
        app.get("/api/products/4", None).await.body["stock"],
        65,
        "an order's deduction is visible at once"
    );
    app.stop().await;
}

/// draft-ietf-httpapi-idempotency-key-header: the same key while its first request is still being
/// processed is 409 with `Retry-After`; an expired key is deleted in the background and may then
/// be used again (a new order, not a replay).
async fn idempotency_keys_in_flight_and_expired(backend: Backend) {
    let Some((app, _db)) = start(backend).await else { return };
    let alice = app.login("user1").await;
    let me = app.get("/api/me", Some(&alice)).await;
    let user_id = me.body["id"].as_i64().expect("/api/me names the user");
    let body = json!({"items": [{"product_id": 11, "quantity": 1}]});
    let key = [("idempotency-key", "in-flight-1")];

    // The first request with this key is still being processed on this instance.
    let held = app.state.in_flight_keys.claim(user_id, "in-flight-1").unwrap();
    let busy = app
        .request(Method::POST, "/api/orders", Some(&alice), Some(body.clone()), &key)
        .await;
    assert_eq!(
        (busy.status, busy.code()),
        (StatusCode::CONFLICT, "idempotency_key_in_use")
    );
    assert_eq!(busy.headers["retry-after"], "1");
    drop(held);
    let first = app
        .request(Method::POST, "/api/orders", Some(&alice), Some(body.clone()), &key)
        .await;
    assert_eq!(first.status, StatusCode::CREATED);

    // Past its lifetime the key is deleted, and using it again places a new order.
    let later = mall_app::ids::now_ms() as i64 + 1_000;
    let deleted = mall_app::store::orders::expire_keys(&app.state.db, later)
        .await
        .unwrap();
    assert!(deleted >= 1, "the key was deleted");
    let again = app
        .request(Method::POST, "/api/orders", Some(&alice), Some(body), &key)
        .await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert!(again.headers.get("idempotent-replayed").is_none());
    assert_ne!(again.body["id"], first.body["id"]);
}
