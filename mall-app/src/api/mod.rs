//! The HTTP surface: `app(state)` builds the router the binary serves and the tests drive.

mod auth;
mod cart;
pub mod causal;
mod observe;
mod ops;
mod orders;
mod products;

use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderValue, Method, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;

use crate::error::AppError;
use crate::state::AppState;

pub fn app(state: AppState) -> Router {
    let api = Router::new()
        .route("/auth/register", post(auth::register))
        .route("/auth/login", post(auth::login))
        .route("/me", get(auth::me))
        .route("/products", get(products::list).post(products::create))
        .route("/products/{id}", get(products::get_one).patch(products::update))
        .route("/products/{id}/stock", post(products::adjust_stock))
        .route("/cart", get(cart::get_cart))
        .route("/cart/items", post(cart::add_item))
        .route(
            "/cart/items/{product_id}",
            put(cart::set_item).delete(cart::remove_item),
        )
        .route("/orders", get(orders::list).post(orders::create))
        .route("/orders/{id}", get(orders::get_one))
        .method_not_allowed_fallback(method_not_allowed);

    Router::new()
        .nest("/api", api)
        .route("/health", get(ops::health))
        .route("/ready", get(ops::ready))
        .route("/metrics", get(ops::metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(state.config.args.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            causal::read_after_write,
        ))
        .layer(axum::middleware::from_fn_with_state(state.clone(), observe::observe))
        .with_state(state)
}

async fn not_found(method: Method, uri: Uri) -> AppError {
    AppError::not_found(format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let mut r = AppError::BadRequest {
        code: "method_not_allowed",
        message: format!("{method} is not allowed on {}", uri.path()),
    }
    .into_response();
    *r.status_mut() = axum::http::StatusCode::METHOD_NOT_ALLOWED;
    r
}

/// A response whose body is already-encoded JSON (usually straight from the cache).
pub(crate) fn json_body(body: bytes::Bytes, cache_control: HeaderValue) -> Response {
    (
        [
            (
                axum::http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (axum::http::header::CACHE_CONTROL, cache_control),
        ],
        body,
    )
        .into_response()
}

/// `Cache-Control` for per-user data: never stored by a shared cache.
pub(crate) const PRIVATE: HeaderValue = HeaderValue::from_static("private, no-store");

/// Opaque pagination cursors: base64url of `v1:<id>`.
pub(crate) mod cursor {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;

    use crate::error::AppError;

    pub fn encode(id: i64) -> String {
        URL_SAFE_NO_PAD.encode(format!("v1:{id}"))
    }

    pub fn decode(cursor: &str) -> Result<i64, AppError> {
        let bad = || AppError::BadRequest {
            code: "invalid_cursor",
            message: "cursor: not a cursor this API issued".into(),
        };
        let raw = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| bad())?;
        let text = std::str::from_utf8(&raw).map_err(|_| bad())?;
        text.strip_prefix("v1:").and_then(|id| id.parse().ok()).ok_or_else(bad)
    }

    /// Validates `limit`: default 20, 1..=100 (seed 000 caps pages at 100).
    pub fn limit(limit: Option<u32>) -> Result<u32, AppError> {
        match limit {
            None => Ok(20),
            Some(n @ 1..=100) => Ok(n),
            Some(n) => Err(AppError::bad_request(format!("limit: must be 1..=100, got {n}"))),
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn round_trips_and_rejects_garbage() {
            assert_eq!(super::decode(&super::encode(1234)).unwrap(), 1234);
            assert!(super::decode("not-a-cursor!").is_err());
            use base64::Engine;
            let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
            assert!(super::decode(&b64("v2:5")).is_err());
            assert!(super::decode(&b64("v1:abc")).is_err());
            assert_eq!(super::limit(None).unwrap(), 20);
            assert!(super::limit(Some(0)).is_err());
            assert!(super::limit(Some(101)).is_err());
        }
    }
}
