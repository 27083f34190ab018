//! Two app instances sharing one database and one Redis: L2 hits and cross-instance
//! invalidation.

mod common;

use common::{database, redis_url, spawn_app, Backend};
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_share_l2_and_invalidate_each_other() {
    let Some(redis) = redis_url() else { return };
    let Some(db) = database(Backend::Postgres).await else {
        return;
    };
    let prefix = format!("--redis-prefix=malltest{}", std::process::id());
    let extra = [format!("--redis-url={redis}"), prefix];
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let a = spawn_app(&db, &extra).await;
    let b = spawn_app(&db, &extra).await;

    // Warm-up put product 42 in both L1s and in Redis; changing it evicts it everywhere, so A's
    // next read loads it from the database into L1 and L2, and B then finds it in L2.
    let admin = a.login("admin").await;
    a.post("/api/products/42/stock", Some(&admin), json!({"delta": 1}))
        .await;
    assert_eq!(a.get("/api/products/42", None).await.body["stock"], 101);
    let l2_hits = b.metric("cache_hits_total", r#"category="product",level="l2""#).await;
    assert_eq!(b.get("/api/products/42", None).await.body["stock"], 101);
    assert!(
        b.metric("cache_hits_total", r#"category="product",level="l2""#).await > l2_hits,
        "B read A's entry from Redis"
    );
    // Now both hold it in L1.
    assert_eq!(b.get("/api/products/42", None).await.body["stock"], 101);

    // A write through A is visible on B's next read.
    let r = a
        .post("/api/products/42/stock", Some(&admin), json!({"delta": -11}))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(b.get("/api/products/42", None).await.body["stock"], 90);
    let user = b.login("user1").await;
    let r = b
        .post(
            "/api/orders",
            Some(&user),
            json!({"items": [{"product_id": 42, "quantity": 3}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(a.get("/api/products/42", None).await.body["stock"], 87);
    assert!(a.metric("cache_invalidations_total", r#"source="remote""#).await >= 1.0);
    a.stop().await;
    b.stop().await;
}

/// A sale window's hot products (`MALL_WARMUP_PRODUCT_IDS`, set by the operator) are in the cache
/// when `/ready` first says yes, besides the hottest ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sales_hot_products_are_warm_before_ready() {
    let Some(db) = database(Backend::Sqlite).await else {
        return;
    };
    let app = spawn_app(&db, &["--warmup-products=2", "--warmup-product-ids=41,7"]).await;
    let l1 = r#"category="product",level="l1""#;
    for (id, warm) in [(41, true), (7, true), (1, true), (2, true), (30, false)] {
        let before = app.metric("cache_hits_total", l1).await;
        assert_eq!(
            app.get(&format!("/api/products/{id}"), None).await.status,
            StatusCode::OK
        );
        let hit = app.metric("cache_hits_total", l1).await > before;
        assert_eq!(hit, warm, "product {id} warm: {warm}");
    }
    app.stop().await;
}
