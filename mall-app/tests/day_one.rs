//! A mall with data on day one: pods starting together on one database migrate, seed and create
//! the admin account once (a database-wide lock), the admin's password comes from
//! `MALL_ADMIN_PASSWORD` (a Secret) and follows it when it changes, and it is never logged.

mod common;

use common::{database, spawn_app, Backend};
use reqwest::StatusCode;

async fn login(app: &common::TestApp, password: &str) -> StatusCode {
    app.post(
        "/api/auth/login",
        None,
        serde_json::json!({"username": "admin", "password": password}),
    )
    .await
    .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_starting_together_bootstrap_once_and_admin_follows_the_secret() {
    let Some(db) = database(Backend::Postgres).await else {
        return;
    };
    let first = "first-admin-password";
    let flag = format!("--admin-password={first}");
    // Two pods at once on an empty database: both start (migrations and seeding take turns).
    let extra = [flag.as_str()];
    let (a, b) = tokio::join!(spawn_app(&db, &extra), spawn_app(&db, &extra));
    assert_eq!(login(&a, first).await, StatusCode::OK);
    assert_eq!(login(&b, first).await, StatusCode::OK);
    assert_eq!(
        login(&a, common::PASSWORD).await,
        StatusCode::UNAUTHORIZED,
        "the seed password no longer opens admin"
    );
    let products = a.get("/api/products/1", None).await;
    assert_eq!(products.status, StatusCode::OK, "seeded once, served by both");
    a.stop().await;
    b.stop().await;

    // The Secret is rotated: the next pod sets the new password.
    let second = "second-admin-password";
    let c = spawn_app(&db, &[&format!("--admin-password={second}")]).await;
    assert_eq!(login(&c, second).await, StatusCode::OK);
    assert_eq!(login(&c, first).await, StatusCode::UNAUTHORIZED);
    c.stop().await;
}

#[test]
fn a_short_admin_password_is_refused_and_never_shown() {
    let err = mall_app::config::Config::from_args(["--admin-password=short-pw"]).unwrap_err();
    let text = format!("{err}");
    assert!(text.contains("MALL_ADMIN_PASSWORD"), "{text}");
    assert!(!text.contains("short-pw"), "the password is in the error: {text}");
    let ok = mall_app::config::Config::from_args(["--admin-password=a-long-enough-password"]).unwrap();
    assert!(
        !format!("{ok:?}").contains("a-long-enough-password"),
        "the password is in the Debug output"
    );
}
