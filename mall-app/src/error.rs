//! The one error type every handler returns, and how it looks on the wire.
//!
//! Clients always get a stable JSON body `{"error": {"code", "message"}}`; internal details are
//! logged, never sent. Database outages become 503 so callers (and the sidecar) retry elsewhere.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

#[derive(Debug, Clone, thiserror::Error)]
pub enum AppError {
    /// The request is well-formed HTTP but its content is wrong; the message names the field.
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    /// The body could not be read as the expected JSON (syntax, types, size, content type).
    #[error("{message}")]
    Body { status: StatusCode, message: String },
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with current state (not enough stock, ...).
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    /// The same request is being processed now (an `Idempotency-Key` in flight): retry after
    /// `retry_after` seconds.
    #[error("{message}")]
    InProgress { message: String, retry_after: u64 },
    /// Well-formed, but its content cannot be processed (an `Idempotency-Key` reused for a
    /// different request).
    #[error("{message}")]
    Unprocessable { code: &'static str, message: String },
    /// A dependency (the database) is down or saturated; safe to retry later.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected failure; the detail is logged, the client sees a generic message.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type AppResult<T> = Result<T, AppError>;

impl AppError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        AppError::BadRequest {
            code: "invalid_request",
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        AppError::NotFound(message.into())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            AppError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            AppError::Body { status, .. } => *status,
            AppError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            AppError::Forbidden(_) => StatusCode::FORBIDDEN,
            AppError::NotFound(_) => StatusCode::NOT_FOUND,
            AppError::Conflict { .. } | AppError::InProgress { .. } => StatusCode::CONFLICT,
            AppError::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            AppError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            AppError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            AppError::BadRequest { code, .. }
            | AppError::Conflict { code, .. }
            | AppError::Unprocessable { code, .. } => code,
            AppError::InProgress { .. } => "idempotency_key_in_use",
            AppError::Body { status, .. } if *status == StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
            AppError::Body { status, .. } if *status == StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            AppError::Body { .. } => "invalid_json",
            AppError::Unauthorized(_) => "unauthorized",
            AppError::Forbidden(_) => "forbidden",
            AppError::NotFound(_) => "not_found",
            AppError::Unavailable(_) => "unavailable",
            AppError::Internal(_) => "internal",
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = match &self {
            AppError::Internal(detail) => {
                tracing::error!(error = %detail, "internal error");
                "internal error".to_string()
            }
            AppError::Unavailable(detail) => {
                tracing::warn!(error = %detail, "dependency unavailable");
                "service temporarily unavailable, retry later".to_string()
            }
            other => other.to_string(),
        };
        let retry_after = match &self {
            AppError::InProgress { retry_after, .. } => Some(*retry_after),
            _ => None,
        };
        let body = serde_json::json!({ "error": { "code": self.code(), "message": message } });
        let mut response = (status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        headers.insert("cache-control", HeaderValue::from_static("no-store"));
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the body was never read, so the server drops this connection; saying
            // so stops the client from reusing it for its next request and failing mid-send.
            headers.insert("connection", HeaderValue::from_static("close"));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert("retry-after", HeaderValue::from_static("1"));
        }
        if let Some(secs) = retry_after {
            headers.insert("retry-after", HeaderValue::from(secs));
        }
        response
    }
}

impl From<sqlx::Error> for AppError {
    fn from(err: sqlx::Error) -> Self {
        match &err {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => AppError::Unavailable(format!("database: {err}")),
            sqlx::Error::Database(db) if crate::db::is_retryable(db.as_ref()) => {
                AppError::Unavailable(format!("database busy: {err}"))
            }
            sqlx::Error::Database(db) if is_shutdown(db.code().as_deref()) => {
                AppError::Unavailable(format!("database shutting down: {err}"))
            }
            _ => AppError::Internal(format!("database: {err}")),
        }
    }
}

/// PostgreSQL's admin-shutdown and cannot-connect-now classes: the server is restarting.
fn is_shutdown(code: Option<&str>) -> bool {
    matches!(code, Some("57P01" | "57P02" | "57P03"))
}

impl From<JsonRejection> for AppError {
    fn from(rejection: JsonRejection) -> Self {
        AppError::Body {
            status: rejection.status(),
            message: rejection.body_text(),
        }
    }
}

impl From<PathRejection> for AppError {
    fn from(rejection: PathRejection) -> Self {
        AppError::BadRequest {
            code: "invalid_path",
            message: rejection.body_text(),
        }
    }
}

impl From<QueryRejection> for AppError {
    fn from(rejection: QueryRejection) -> Self {
        AppError::BadRequest {
            code: "invalid_query",
            message: rejection.body_text(),
        }
    }
}
