//! Placing and reading the caller's orders.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::{cursor, PRIVATE};
use crate::auth::AuthUser;
use crate::cache::Key;
use crate::error::{AppError, AppResult};
use crate::extract::{Json, Path, Query};
use crate::state::AppState;
use crate::store::order_batch::{KeyClaim, OrderRequest};
use crate::store::orders::{self, Order, Source};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct NewOrder {
    /// Explicit lines; when absent the whole cart is ordered.
    items: Option<Vec<NewOrderItem>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewOrderItem {
    product_id: i64,
    quantity: i64,
}

fn source(state: &AppState, order: NewOrder) -> AppResult<Source> {
    let Some(items) = order.items else {
        return Ok(Source::Cart);
    };
    let args = &state.config.args;
    if items.is_empty() {
        return Err(AppError::bad_request(
            "items: must not be empty (omit it to order the cart)",
        ));
    }
    if items.len() > args.max_order_items {
        return Err(AppError::bad_request(format!(
            "items: at most {} lines per order",
            args.max_order_items
        )));
    }
    let mut lines: Vec<(i64, i64)> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        if !(1..=args.max_quantity).contains(&item.quantity) {
            return Err(AppError::bad_request(format!(
                "items[{i}].quantity: must be 1..={}, got {}",
                args.max_quantity, item.quantity
            )));
        }
        if let Some(j) = lines.iter().position(|(p, _)| *p == item.product_id) {
            return Err(AppError::bad_request(format!(
                "items[{i}].product_id: product {} is already in items[{j}]",
                item.product_id
            )));
        }
        lines.push((item.product_id, item.quantity));
    }
    Ok(Source::Items(lines))
}

fn idempotency_key(headers: &HeaderMap) -> AppResult<Option<String>> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .map_err(|_| AppError::bad_request("Idempotency-Key: must be visible ASCII"))?
        .trim();
    if key.is_empty() || key.len() > 255 {
        return Err(AppError::bad_request("Idempotency-Key: must be 1..=255 characters"));
    }
    Ok(Some(key.to_string()))
}

fn request_hash(source: &Source) -> String {
    let mut h = Sha256::new();
    match source {
        Source::Cart => h.update(b"cart"),
        Source::Items(lines) => {
            let mut sorted = lines.clone();
            sorted.sort_unstable();
            for (p, q) in sorted {
                h.update(format!("{p}x{q};").as_bytes());
            }
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

pub async fn create(
    State(state): State<AppState>,
    user: AuthUser,
    headers: HeaderMap,
    body: Bytes,
) -> AppResult<Response> {
    let key = idempotency_key(&headers)?;
    // An empty body orders the cart; otherwise it must be a JSON order.
    let order = if body.iter().all(u8::is_ascii_whitespace) {
        NewOrder::default()
    } else {
        axum::Json::<NewOrder>::from_bytes(&body)?.0
    };
    let source = source(&state, order)?;
    let hash = request_hash(&source);
    // The same key already being processed here: say so at once rather than wait for it.
    let _in_flight = match key.as_deref() {
        Some(k) => Some(
            state
                .in_flight_keys
                .claim(user.id, k)
                .ok_or_else(|| AppError::InProgress {
                    message: "Idempotency-Key: a request with this key is still being processed; retry shortly".into(),
                    retry_after: 1,
                })?,
        ),
        None => None,
    };
    let request = OrderRequest {
        user_id: user.id,
        source,
        key: key.clone().map(|key| KeyClaim {
            key,
            request_hash: hash,
        }),
    };
    let placed = state.orders.place(request).await.inspect_err(|e| {
        if e.code() == "insufficient_stock" {
            state.metrics.stock_conflicts.inc();
        }
    })?;
    let order = placed.order;
    if placed.replayed {
        state.metrics.idempotent_replays.inc();
    } else {
        state.metrics.orders_created.inc();
        let changed = order.items.iter().map(|i| Key::product(i.product_id)).collect();
        state.cache.invalidate(changed).await;
    }
    let ids: Vec<i64> = order.items.iter().map(|i| i.product_id).collect();
    let mut response = (
        StatusCode::CREATED,
        [(header::CACHE_CONTROL, PRIVATE), super::products::changed_tags(&ids)],
        Json(&order),
    )
        .into_response();
    if placed.replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    if key.is_some() {
        // How long the key is remembered (and a repeat replays this answer), in seconds.
        response.headers_mut().insert(
            "idempotency-key-lifetime",
            HeaderValue::from(state.config.args.idempotency_key_ttl_secs),
        );
    }
    Ok(response)
}

pub async fn get_one(State(state): State<AppState>, user: AuthUser, Path(id): Path<i64>) -> AppResult<Response> {
    let db = state.db.clone();
    let user_id = user.id;
    let body = state
        .cache
        .get_or_load_json(Key::order(user_id, id), || async move {
            // A replica may not have the order just placed yet; the primary has.
            match orders::get(&db, user_id, id, false).await? {
                Some(o) => Ok(Some(o)),
                None => orders::get(&db, user_id, id, true).await,
            }
        })
        .await?
        .ok_or_else(|| AppError::not_found(format!("order {id} does not exist")))?;
    Ok(super::json_body(body, PRIVATE))
}

#[derive(Deserialize)]
pub struct ListParams {
    limit: Option<u32>,
    cursor: Option<String>,
}

pub async fn list(
    State(state): State<AppState>,
    user: AuthUser,
    Query(p): Query<ListParams>,
) -> AppResult<impl IntoResponse> {
    let limit = cursor::limit(p.limit)?;
    let before = p.cursor.as_deref().map(cursor::decode).transpose()?.unwrap_or(i64::MAX);
    let mut items: Vec<Order> = orders::list(&state.db, user.id, before, limit).await?;
    let next_cursor = if items.len() > limit as usize {
        items.truncate(limit as usize);
        items.last().map(|o| cursor::encode(o.id))
    } else {
        None
    };
    Ok((
        [(header::CACHE_CONTROL, PRIVATE)],
        Json(json!({ "items": items, "next_cursor": next_cursor })),
    ))
}
