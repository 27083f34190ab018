//! The catalog: cached reads any proxy may store, admin writes that invalidate every cache.

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::cursor;
use crate::auth::Admin;
use crate::cache::Key;
use crate::error::{AppError, AppResult};
use crate::extract::{Json, Path, Query};
use crate::state::AppState;
use crate::store::products::{self, Filter, NewProduct, Product, ProductPatch, Projection, STATUSES};

/// Catalog reads may be stored by shared caches (the sidecar) this long. Short, because stock
/// changes with every order; the app's own cache is invalidated on write instead.
const CATALOG_CACHE_CONTROL: HeaderValue = HeaderValue::from_static("public, max-age=5");

/// The objects a cacheable response holds, for shared caches that purge by tag (the sidecar;
/// Fastly and Varnish read the same field): `product:<id>` for each product in it, and
/// `list:products` on list pages. Writes publish the product's key, and every sidecar purges
/// the entries tagged with it.
const SURROGATE_KEY: &str = "surrogate-key";

fn product_tag(id: i64) -> String {
    format!("product:{id}")
}

/// A write's `Surrogate-Key`: the products it changed and the list pages (a new price or stock
/// may move a product into or out of a filtered page). The sidecar that proxied the write
/// purges them before the answer leaves (docs/sidecar.md, "Invalidation").
pub(crate) fn changed_tags(ids: &[i64]) -> (header::HeaderName, HeaderValue) {
    let mut tags = String::from("list:products");
    for id in ids {
        tags.push(' ');
        tags.push_str(&product_tag(*id));
    }
    (
        header::HeaderName::from_static(SURROGATE_KEY),
        HeaderValue::from_str(&tags).unwrap_or_else(|_| HeaderValue::from_static("list:products")),
    )
}

#[derive(Deserialize)]
pub struct ListParams {
    category: Option<String>,
    status: Option<String>,
    min_price: Option<i64>,
    max_price: Option<i64>,
    limit: Option<u32>,
    cursor: Option<String>,
    fields: Option<String>,
}

pub async fn list(State(state): State<AppState>, Query(p): Query<ListParams>) -> AppResult<Response> {
    let limit = cursor::limit(p.limit)?;
    let after = p.cursor.as_deref().map(cursor::decode).transpose()?.unwrap_or(0);
    let projection = p.fields.as_deref().map_or(Ok(Projection::all()), Projection::parse)?;
    let status = p.status.unwrap_or_else(|| "active".into());
    if !STATUSES.contains(&status.as_str()) {
        return Err(AppError::bad_request(format!(
            "status: must be one of {}",
            STATUSES.join(", ")
        )));
    }
    if let (Some(lo), Some(hi)) = (p.min_price, p.max_price) {
        if lo > hi {
            return Err(AppError::bad_request("min_price: must not exceed max_price"));
        }
    }
    let filter = Filter {
        category: p.category,
        status: Some(status),
        min_price: p.min_price,
        max_price: p.max_price,
    };
    let mut rows = products::list(&state.db, &filter, after, limit, &projection).await?;
    let next_cursor = if rows.len() > limit as usize {
        rows.truncate(limit as usize);
        rows.last()
            .and_then(|r| r.get("id"))
            .and_then(|v| v.as_i64())
            .map(cursor::encode)
    } else {
        None
    };
    let mut tags = String::from("list:products");
    for id in rows.iter().filter_map(|r| r.get("id")).filter_map(|v| v.as_i64()) {
        tags.push(' ');
        tags.push_str(&product_tag(id));
    }
    if !projection.contains("id") {
        for r in &mut rows {
            r.remove("id");
        }
    }
    let body = json!({ "items": rows, "next_cursor": next_cursor });
    let tags = HeaderValue::from_str(&tags).map_err(|e| AppError::Internal(format!("surrogate key: {e}")))?;
    Ok((
        [
            (header::CACHE_CONTROL, CATALOG_CACHE_CONTROL),
            (header::HeaderName::from_static(SURROGATE_KEY), tags),
        ],
        Json(body),
    )
        .into_response())
}

#[derive(Deserialize)]
pub struct OneParams {
    fields: Option<String>,
}

pub async fn get_one(
    State(state): State<AppState>,
    Path(id): Path<i64>,
    Query(p): Query<OneParams>,
) -> AppResult<Response> {
    let projection = p.fields.as_deref().map(Projection::parse).transpose()?;
    let db = state.db.clone();
    let body = state
        .cache
        .get_or_load_json(Key::product(id), || async move { products::get(&db, id, false).await })
        .await?
        .ok_or_else(|| AppError::not_found(format!("product {id} does not exist")))?;
    let body = match projection {
        // The cached bytes are the response: no decode, no encode.
        None => body,
        Some(projection) => {
            let product: Product =
                serde_json::from_slice(&body).map_err(|e| AppError::Internal(format!("cached product: {e}")))?;
            crate::cache::encode(&projection.apply(&product))
        }
    };
    let mut response = super::json_body(body, CATALOG_CACHE_CONTROL);
    if let Ok(tag) = HeaderValue::from_str(&product_tag(id)) {
        response.headers_mut().insert(SURROGATE_KEY, tag);
    }
    Ok(response)
}

pub async fn create(
    State(state): State<AppState>,
    _admin: Admin,
    Json(p): Json<NewProduct>,
) -> AppResult<impl IntoResponse> {
    let product = products::create(&state.db, &p).await?;
    Ok((
        StatusCode::CREATED,
        [(header::CACHE_CONTROL, super::PRIVATE)],
        Json(product),
    ))
}

pub async fn update(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<i64>,
    Json(patch): Json<ProductPatch>,
) -> AppResult<impl IntoResponse> {
    let product = products::update(&state.db, id, &patch).await?;
    state.cache.invalidate(vec![Key::product(id)]).await;
    Ok((
        [(header::CACHE_CONTROL, super::PRIVATE), changed_tags(&[id])],
        Json(product),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StockChange {
    /// Units to add (positive) or remove (negative).
    delta: i64,
}

pub async fn adjust_stock(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<i64>,
    Json(change): Json<StockChange>,
) -> AppResult<impl IntoResponse> {
    let product = products::adjust_stock(&state.db, id, change.delta).await?;
    state.cache.invalidate(vec![Key::product(id)]).await;
    Ok((
        [(header::CACHE_CONTROL, super::PRIVATE), changed_tags(&[id])],
        Json(product),
    ))
}
