//! One middleware for what every request gets: a request id, metrics, and a log line when it
//! is slow or failed.

use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

use crate::state::AppState;

const REQUEST_ID: &str = "x-request-id";

pub async fn observe(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let matched = req.extensions().get::<MatchedPath>().cloned();
    let route = matched.as_ref().map_or("unmatched", MatchedPath::as_str);
    // Keep a caller's (or the sidecar's) id so one request can be followed across hops.
    let request_id = req
        .headers()
        .get(REQUEST_ID)
        .filter(|v| v.len() <= 128 && v.to_str().is_ok_and(|s| !s.is_empty()))
        .cloned()
        .unwrap_or_else(new_request_id);
    // The caller's trace (the sidecar's upstream span), continued: the trace id goes into every
    // log line of this request and, when sampled, the spans go to the collector (telemetry.rs).
    // Probes and scrapes (a kubelet's, the sidecar's, Prometheus's: several a second) start no
    // trace of their own; one that comes with a sampled caller's trace is still recorded.
    let probe = matches!(route, "/health" | "/ready" | "/metrics");
    let trace = crate::telemetry::incoming(req.headers().get("traceparent").and_then(|v| v.to_str().ok()), !probe);
    // Two shapes of one span: a sampled request's carries its trace (its log lines name the trace
    // to open; telemetry.rs's span layer looks for the `sampled` field). An unsampled request has
    // no trace to open and keeps the plain shape: formatting a trace id into every request's log
    // context cost 4-6 % of a pass-through (BENCHMARKS.md, section 6); `x-request-id` ties its
    // lines to the sidecar's access line.
    let sampled = trace.as_ref().is_some_and(|t| t.sampled);
    let span = match trace.as_ref().filter(|t| t.sampled) {
        None => {
            tracing::info_span!("request", request_id = request_id.to_str().unwrap_or(""), method = %method, route = %route)
        }
        Some(t) => tracing::info_span!(
            "request",
            request_id = request_id.to_str().unwrap_or(""),
            method = %method,
            route = %route,
            trace_id = %t.trace_id,
            parent_span_id = t.parent.map(|p| p.to_string()).unwrap_or_default(),
            sampled = true,
            http.response.status_code = tracing::field::Empty,
            error = tracing::field::Empty,
        ),
    };

    let mut response = next.run(req).instrument(span.clone()).await;
    response.headers_mut().insert(REQUEST_ID, request_id);

    let elapsed = start.elapsed();
    let status = response.status();
    if sampled {
        span.record("http.response.status_code", status.as_u16());
        if status.is_server_error() {
            span.record("error", status.as_str());
        }
    }
    let m = &state.metrics;
    m.http_requests
        .with_label_values(&[method.as_str(), route, status.as_str()])
        .inc();
    m.http_duration
        .with_label_values(&[method.as_str(), route])
        .observe(elapsed.as_secs_f64());
    let _enter = span.enter();
    if elapsed >= Duration::from_millis(state.config.args.slow_request_ms) {
        m.slow_requests.inc();
        tracing::warn!(
            status = status.as_u16(),
            elapsed_ms = elapsed.as_millis() as u64,
            "slow request"
        );
    } else if status.is_server_error() {
        tracing::warn!(
            status = status.as_u16(),
            elapsed_ms = elapsed.as_millis() as u64,
            "request failed"
        );
    } else {
        tracing::debug!(
            status = status.as_u16(),
            elapsed_ms = elapsed.as_millis() as u64,
            "request"
        );
    }
    response
}

fn new_request_id() -> HeaderValue {
    let id: u128 = rand::random();
    HeaderValue::from_str(&format!("{id:032x}")).expect("hex is a valid header value")
}
