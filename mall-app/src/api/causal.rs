//! Read-after-write across the instances behind one sidecar.
//!
//! A successful write answers with `Mall-Seq`: the highest invalidation record this instance's
//! writes have committed. The sidecar remembers the highest it has seen and sends it on every
//! read as `Mall-Min-Seq`; an instance that has not applied that record yet (its follower is a
//! poll or a notification behind) asks its follower to catch up now and waits for it, so the read
//! that follows a write through the same sidecar sees the write whichever instance answers it,
//! with no sleep and no Redis. The wait is bounded ([`WAIT_AT_MOST`]); past it the request is
//! served as before and counted (`read_after_write_waits_total{outcome="timed_out"}`).
//!
//! A write's response also names the objects it changed in `Surrogate-Key`, so the sidecar that
//! proxied it purges them (list pages included) before the client sees the answer.

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;

use crate::state::AppState;

pub const WRITE_SEQ: &str = "mall-seq";
pub const MIN_SEQ: &str = "mall-min-seq";

/// Longer than a poll (50 ms) and a notification under load; short enough that a client which
/// sends a sequence number from another database does not hold a connection for long.
pub const WAIT_AT_MOST: Duration = Duration::from_millis(500);

pub async fn read_after_write(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let safe = req.method().is_safe();
    if safe {
        let wanted = req
            .headers()
            .get(MIN_SEQ)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<i64>().ok());
        if let Some(seq) = wanted.filter(|s| *s > 0 && !state.applied.has(*s)) {
            let outcome = if state.applied.wait_for(seq, WAIT_AT_MOST).await {
                "applied"
            } else {
                "timed_out"
            };
            state.metrics.read_after_write_waits.with_label_values(&[outcome]).inc();
        }
    }
    let mut response = next.run(req).await;
    if !safe && response.status().is_success() {
        let seq = state.db.last_write_seq();
        if seq > 0 {
            response.headers_mut().insert(WRITE_SEQ, HeaderValue::from(seq));
        }
    }
    response
}
