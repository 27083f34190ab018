//! The app's admin port (`MALL_ADMIN_LISTEN`), apart from the public one that the sidecar
//! forwards to the world: profiles on demand ([`mall_telemetry::profile`], shared with the
//! sidecar's admin port) behind the bearer token `MALL_ADMIN_TOKEN`.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use mall_telemetry::profile::{self, Profile, ProfileError};
use tokio::net::TcpListener;

/// The admin router: `GET /debug/pprof/profile?seconds=N` and `GET /debug/pprof/heap`, both for
/// the bearer of `token` only.
pub fn router(token: String) -> Router {
    Router::new()
        .route(profile::CPU_PATH, get(take_profile))
        .route(profile::HEAP_PATH, get(take_profile))
        .with_state(std::sync::Arc::<str>::from(token))
}

/// Serves the admin router on `listener` until the process exits: a profile in progress when
/// the app shuts down has no one left to read it.
pub async fn serve(listener: TcpListener, token: String) -> std::io::Result<()> {
    axum::serve(listener, router(token)).await
}

/// Takes the profile on a blocking thread: the port's other requests (and the app's) go on.
async fn take_profile(State(token): State<std::sync::Arc<str>>, uri: Uri, headers: HeaderMap) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let asked = Profile::from_request(uri.path(), uri.query()).expect("routed to a profile's path");
    let taken = tokio::task::spawn_blocking(move || profile::answer(authorization.as_deref(), &token, asked))
        .await
        .unwrap_or_else(|e| Err(ProfileError::Failed(e.to_string())));
    if taken.is_ok() {
        tracing::info!(path = uri.path(), "profile taken");
    }
    match taken {
        Ok(pprof) => (
            [
                (header::CONTENT_TYPE, "application/octet-stream"),
                (header::CONTENT_DISPOSITION, "attachment; filename=\"profile.pb\""),
            ],
            pprof,
        )
            .into_response(),
        Err(e) => {
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = (status, format!("{e}\n")).into_response();
            if status == StatusCode::UNAUTHORIZED {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            if let Some(seconds) = e.retry_after() {
                response.headers_mut().insert(header::RETRY_AFTER, seconds.into());
            }
            response
        }
    }
}
