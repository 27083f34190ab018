//! Registration and login.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::json;

use super::PRIVATE;
use crate::auth::{hash_password, verify_password, AuthUser};
use crate::cache::Key;
use crate::error::{AppError, AppResult};
use crate::extract::Json;
use crate::state::AppState;
use crate::store::users::{self, Role};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    username: String,
    password: String,
}

fn validate(c: &Credentials) -> AppResult<()> {
    let n = c.username.chars().count();
    if !(3..=64).contains(&n)
        || !c
            .username
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "._-".contains(ch))
    {
        return Err(AppError::bad_request(
            "username: 3..=64 characters of letters, digits, '.', '_' or '-'",
        ));
    }
    if !(8..=128).contains(&c.password.chars().count()) {
        return Err(AppError::bad_request("password: must be 8..=128 characters"));
    }
    Ok(())
}

pub async fn register(State(state): State<AppState>, Json(c): Json<Credentials>) -> AppResult<impl IntoResponse> {
    validate(&c)?;
    let hash = hash_password(c.password).await?;
    let user = users::create(&state.db, &c.username, &hash, Role::Customer).await?;
    let token = state.tokens.issue(user.id, user.role)?;
    Ok((
        StatusCode::CREATED,
        [(axum::http::header::CACHE_CONTROL, PRIVATE)],
        Json(json!({ "token": token, "user": user })),
    ))
}

pub async fn login(State(state): State<AppState>, Json(c): Json<Credentials>) -> AppResult<impl IntoResponse> {
    let denied = || AppError::Unauthorized("invalid username or password".into());
    let user = users::find_by_username(&state.db, &c.username)
        .await?
        .ok_or_else(denied)?;
    if !verify_password(c.password, user.password_hash.clone()).await? {
        return Err(denied());
    }
    let token = state.tokens.issue(user.id, user.role)?;
    Ok((
        [(axum::http::header::CACHE_CONTROL, PRIVATE)],
        Json(json!({ "token": token, "user": user })),
    ))
}

/// The caller's profile, from the user cache (seed 000: users 30 min).
pub async fn me(State(state): State<AppState>, user: AuthUser) -> AppResult<axum::response::Response> {
    let db = state.db.clone();
    let body = state
        .cache
        .get_or_load_json(Key::user(user.id), || async move { users::get(&db, user.id).await })
        .await?
        .ok_or_else(|| AppError::Unauthorized("the token's user no longer exists".into()))?;
    Ok(super::json_body(body, PRIVATE))
}
