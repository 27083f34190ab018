//! The caller's cart.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use serde::Deserialize;

use super::PRIVATE;
use crate::auth::AuthUser;
use crate::error::{AppError, AppResult};
use crate::extract::{Json, Path};
use crate::state::AppState;
use crate::store::cart::{self, Change};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewLine {
    product_id: i64,
    quantity: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quantity {
    quantity: i64,
}

fn check_quantity(state: &AppState, quantity: i64) -> AppResult<()> {
    let max = state.config.args.max_quantity;
    if !(1..=max).contains(&quantity) {
        return Err(AppError::bad_request(format!(
            "quantity: must be 1..={max}, got {quantity}"
        )));
    }
    Ok(())
}

pub async fn get_cart(State(state): State<AppState>, user: AuthUser) -> AppResult<impl IntoResponse> {
    let cart = cart::get(&state.db, user.id).await?;
    Ok(([(header::CACHE_CONTROL, PRIVATE)], Json(cart)))
}

pub async fn add_item(
    State(state): State<AppState>,
    user: AuthUser,
    Json(line): Json<NewLine>,
) -> AppResult<impl IntoResponse> {
    check_quantity(&state, line.quantity)?;
    cart::change(
        &state.db,
        user.id,
        line.product_id,
        Change::Add(line.quantity),
        state.config.args.max_quantity,
    )
    .await?;
    let cart = cart::get(&state.db, user.id).await?;
    Ok((StatusCode::CREATED, [(header::CACHE_CONTROL, PRIVATE)], Json(cart)))
}

pub async fn set_item(
    State(state): State<AppState>,
    user: AuthUser,
    Path(product_id): Path<i64>,
    Json(q): Json<Quantity>,
) -> AppResult<impl IntoResponse> {
    check_quantity(&state, q.quantity)?;
    cart::change(
        &state.db,
        user.id,
        product_id,
        Change::Set(q.quantity),
        state.config.args.max_quantity,
    )
    .await?;
    let cart = cart::get(&state.db, user.id).await?;
    Ok(([(header::CACHE_CONTROL, PRIVATE)], Json(cart)))
}

pub async fn remove_item(
    State(state): State<AppState>,
    user: AuthUser,
    Path(product_id): Path<i64>,
) -> AppResult<impl IntoResponse> {
    cart::remove(&state.db, user.id, product_id).await?;
    Ok((StatusCode::NO_CONTENT, [(header::CACHE_CONTROL, PRIVATE)]))
}
