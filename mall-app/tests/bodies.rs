//! Property test: random JSON bodies (right shape with wrong types, missing and unknown fields,
//! nonsense) on every write endpoint of the real app never produce a 5xx or a non-JSON error, and
//! never change stock unless an order succeeded.

mod common;

use common::{database, spawn_app, Backend};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use reqwest::Method;
use serde_json::{json, Map, Value};

/// Any JSON value, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        (-1e12f64..1e12).prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Objects with the endpoints' real field names but any values, plus stray fields.
fn near_miss() -> impl Strategy<Value = Value> {
    let names = prop::sample::select(vec![
        "product_id",
        "quantity",
        "items",
        "delta",
        "name",
        "price",
        "stock",
        "category",
        "status",
        "version",
        "username",
        "password",
        "description",
        "extra",
    ]);
    prop::collection::btree_map(names, any_json(), 0..5).prop_map(|m| {
        let mut o = Map::new();
        for (k, v) in m {
            o.insert(k.to_string(), v);
        }
        Value::Object(o)
    })
}

#[test]
fn random_bodies_never_cause_a_server_error() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = rt
        .block_on(database(Backend::Sqlite))
        .expect("SQLite is always available");
    let app = rt.block_on(spawn_app(&db, &[]));
    let user = rt.block_on(app.login("user1"));
    let admin = rt.block_on(app.login("admin"));
    let endpoints: Vec<(Method, &str, bool)> = vec![
        (Method::POST, "/api/cart/items", false),
        (Method::PUT, "/api/cart/items/3", false),
        (Method::POST, "/api/orders", false),
        (Method::POST, "/api/products", true),
        (Method::PATCH, "/api/products/2", true),
        (Method::POST, "/api/products/4/stock", true),
        (Method::POST, "/api/auth/register", false),
        (Method::POST, "/api/auth/login", false),
    ];
    let mut runner = TestRunner::new(Config {
        cases: 400,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (0..endpoints.len(), prop_oneof![any_json(), near_miss()]);
    let result = runner.run(&strategy, |(i, body)| {
        let (method, path, as_admin) = &endpoints[i];
        let token = if *as_admin { &admin } else { &user };
        let reply = rt.block_on(app.request(method.clone(), path, Some(token), Some(body.clone()), &[]));
        prop_assert!(
            reply.status.as_u16() < 500,
            "{method} {path} {body} -> {} {}",
            reply.status,
            reply.body
        );
        if !reply.status.is_success() {
            prop_assert!(
                !reply.code().is_empty() && !reply.message().is_empty(),
                "{method} {path} {body}: error body {}",
                reply.body
            );
        }
        Ok(())
    });
    result.unwrap();
    rt.block_on(app.stop());
}
