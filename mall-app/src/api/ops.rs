//! Health, readiness and metrics for Kubernetes probes and Prometheus.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use serde_json::json;

use crate::state::AppState;

/// The process is alive and serving HTTP.
pub async fn health() -> impl IntoResponse {
    axum::Json(json!({ "status": "ok" }))
}

/// Ready for traffic: the database answers, migrations are applied (done before listening) and
/// the cache warm-up finished. Not ready while shutting down, so load balancers drain us first.
pub async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    let database = match tokio::time::timeout(Duration::from_secs(2), state.db.ping()).await {
        Ok(Ok(())) => "ok".to_string(),
        Ok(Err(e)) => format!("error: {e}"),
        Err(_) => "error: timed out after 2s".to_string(),
    };
    let warmup = if state.readiness.is_warmed_up() {
        "ok"
    } else {
        "in progress"
    };
    let shutting_down = state.readiness.is_shutting_down();
    let ready = database == "ok" && warmup == "ok" && !shutting_down;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    // Replicas never make the instance unready (the primary answers their reads); they are
    // listed so a lagging or unreachable one is seen where the other checks are.
    let replicas: serde_json::Map<String, serde_json::Value> = state
        .db
        .replica_states()
        .into_iter()
        .map(|r| {
            let value = json!({
                "healthy": r.healthy,
                "lag_ms": r.lag.as_millis() as u64,
                "in_rotation": r.in_rotation,
            });
            (r.name, value)
        })
        .collect();
    let mut checks =
        json!({ "database": database, "migrations": "ok", "warmup": warmup, "shutting_down": shutting_down });
    if !replicas.is_empty() {
        checks["replicas"] = serde_json::Value::Object(replicas);
    }
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "checks": checks,
    });
    (status, [(header::CACHE_CONTROL, "no-store")], axum::Json(body))
}

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    state.db.observe_pools();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
}
