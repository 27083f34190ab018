//! Products: the catalog, keyset pagination with filters and projection, admin writes.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sqlx::any::AnyRow;

use super::{int, text};
use crate::cache::Key;
use crate::db::Db;
use crate::error::{AppError, AppResult};
use crate::ids::now_ms;
use crate::invalidation;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Product {
    pub id: i64,
    pub name: String,
    pub category: String,
    pub status: String,
    /// Price in cents.
    pub price: i64,
    pub stock: i64,
    pub version: i64,
    /// Unix milliseconds.
    pub created_at: i64,
    pub updated_at: i64,
}

/// Every field a client may ask for with `fields=`; the names are also the column names.
pub const FIELDS: [&str; 9] = [
    "id",
    "name",
    "category",
    "status",
    "price",
    "stock",
    "version",
    "created_at",
    "updated_at",
];
const TEXT_FIELDS: [&str; 3] = ["name", "category", "status"];
pub const STATUSES: [&str; 2] = ["active", "inactive"];
const ALL_COLUMNS: &str = "id, name, category, status, price, stock, version, created_at, updated_at";

/// A validated `fields=` projection, in the order the fields are defined.
#[derive(Debug, Clone, PartialEq)]
pub struct Projection(Vec<&'static str>);

impl Projection {
    /// Every field, the default when `fields=` is absent.
    pub fn all() -> Projection {
        Projection(FIELDS.to_vec())
    }

    pub fn parse(spec: &str) -> AppResult<Projection> {
        let mut chosen = Vec::new();
        for raw in spec.split(',') {
            let name = raw.trim();
            if name.is_empty() {
                continue;
            }
            let Some(field) = FIELDS.iter().find(|f| **f == name) else {
                return Err(AppError::BadRequest {
                    code: "unknown_field",
                    message: format!("fields: unknown field {name:?}; known fields are {}", FIELDS.join(", ")),
                });
            };
            if !chosen.contains(field) {
                chosen.push(*field);
            }
        }
        if chosen.is_empty() {
            return Err(AppError::BadRequest {
                code: "unknown_field",
                message: "fields: name at least one field".into(),
            });
        }
        chosen.sort_by_key(|f| FIELDS.iter().position(|x| x == f));
        Ok(Projection(chosen))
    }

    pub fn apply(&self, product: &Product) -> Map<String, Value> {
        let full = serde_json::to_value(product).expect("products serialize");
        let Value::Object(full) = full else {
            unreachable!("a struct serializes to an object")
        };
        self.0
            .iter()
            .filter_map(|f| full.get(*f).map(|v| (f.to_string(), v.clone())))
            .collect()
    }
}

pub fn from_row(r: &AnyRow) -> Result<Product, sqlx::Error> {
    Ok(Product {
        id: int(r, "id")?,
        name: text(r, "name")?,
        category: text(r, "category")?,
        status: text(r, "status")?,
        price: int(r, "price")?,
        stock: int(r, "stock")?,
        version: int(r, "version")?,
        created_at: int(r, "created_at")?,
        updated_at: int(r, "updated_at")?,
    })
}

pub async fn get(db: &Db, id: i64, primary: bool) -> AppResult<Option<Product>> {
    let pool = if primary {
        db.read_primary().await?
    } else {
        db.read_key(&Key::product(id)).await?
    };
    let row = sqlx::query(&db.sql(&format!("SELECT {ALL_COLUMNS} FROM products WHERE id = ?")))
        .bind(id)
        .fetch_optional(&*pool)
        .await?;
    Ok(row.as_ref().map(from_row).transpose()?)
}

/// Several products in one round trip (cache warm-up).
pub async fn get_many(db: &Db, ids: &[i64]) -> AppResult<Vec<Product>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let marks = vec!["?"; ids.len()].join(", ");
    let sql = format!("SELECT {ALL_COLUMNS} FROM products WHERE id IN ({marks})");
    let sql = db.sql(&sql);
    let mut query = sqlx::query(&sql);
    for id in ids {
        query = query.bind(*id);
    }
    let rows = query.fetch_all(&*db.read().await?).await?;
    Ok(rows.iter().map(from_row).collect::<Result<_, _>>()?)
}

/// The products most often ordered, then the lowest ids, up to `limit`.
pub async fn hottest_ids(db: &Db, limit: u32) -> AppResult<Vec<i64>> {
    let limit = limit as i64;
    let rows = sqlx::query(
        &db.sql("SELECT product_id FROM order_items GROUP BY product_id ORDER BY COUNT(*) DESC, product_id LIMIT ?"),
    )
    .bind(limit)
    .fetch_all(&*db.read().await?)
    .await?;
    let mut ids: Vec<i64> = rows.iter().map(|r| int(r, "product_id")).collect::<Result<_, _>>()?;
    if (ids.len() as i64) < limit {
        let rows = sqlx::query(&db.sql("SELECT id FROM products WHERE status = 'active' ORDER BY id LIMIT ?"))
            .bind(limit)
            .fetch_all(&*db.read().await?)
            .await?;
        for r in &rows {
            let id = int(r, "id")?;
            if (ids.len() as i64) < limit && !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    Ok(ids)
}

#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub category: Option<String>,
    pub status: Option<String>,
    pub min_price: Option<i64>,
    pub max_price: Option<i64>,
}

/// One page in id order after `after_id`; rows hold only `projection`'s fields (plus `id`,
/// which the caller needs for the next cursor). Returns up to `limit + 1` rows so the caller
/// can tell whether another page exists.
pub async fn list(
    db: &Db,
    filter: &Filter,
    after_id: i64,
    limit: u32,
    projection: &Projection,
) -> AppResult<Vec<Map<String, Value>>> {
    let mut columns: Vec<&str> = projection.0.clone();
    if !columns.contains(&"id") {
        columns.insert(0, "id");
    }
    let mut sql = format!("SELECT {} FROM products WHERE id > ?", columns.join(", "));
    if filter.category.is_some() {
        sql.push_str(" AND category = ?");
    }
    if filter.status.is_some() {
        sql.push_str(" AND status = ?");
    }
    if filter.min_price.is_some() {
        sql.push_str(" AND price >= ?");
    }
    if filter.max_price.is_some() {
        sql.push_str(" AND price <= ?");
    }
    sql.push_str(" ORDER BY id LIMIT ?");
    let sql = db.sql(&sql);
    let mut query = sqlx::query(&sql).bind(after_id);
    if let Some(c) = &filter.category {
        query = query.bind(c.as_str());
    }
    if let Some(s) = &filter.status {
        query = query.bind(s.as_str());
    }
    if let Some(p) = filter.min_price {
        query = query.bind(p);
    }
    if let Some(p) = filter.max_price {
        query = query.bind(p);
    }
    let rows = query.bind(limit as i64 + 1).fetch_all(&*db.read().await?).await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let mut obj = Map::new();
        for c in &columns {
            let v = if TEXT_FIELDS.contains(c) {
                Value::from(text(r, c)?)
            } else {
                Value::from(int(r, c)?)
            };
            obj.insert(c.to_string(), v);
        }
        out.push(obj);
    }
    Ok(out)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewProduct {
    pub name: String,
    pub category: String,
    pub price: i64,
    pub stock: i64,
    #[serde(default = "active")]
    pub status: String,
}

fn active() -> String {
    "active".into()
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProductPatch {
    pub name: Option<String>,
    pub category: Option<String>,
    pub price: Option<i64>,
    pub status: Option<String>,
    /// When given, the update applies only if the product still has this version.
    pub version: Option<i64>,
}

pub fn validate_fields(
    name: Option<&str>,
    category: Option<&str>,
    price: Option<i64>,
    status: Option<&str>,
) -> AppResult<()> {
    if let Some(n) = name {
        if n.trim().is_empty() || n.chars().count() > 200 {
            return Err(AppError::bad_request("name: must be 1..=200 characters"));
        }
    }
    if let Some(c) = category {
        if c.trim().is_empty() || c.chars().count() > 64 {
            return Err(AppError::bad_request("category: must be 1..=64 characters"));
        }
    }
    if let Some(p) = price {
        if !(0..=100_000_000_000).contains(&p) {
            return Err(AppError::bad_request("price: must be 0..=100000000000 cents"));
        }
    }
    if let Some(s) = status {
        if !STATUSES.contains(&s) {
            return Err(AppError::bad_request(format!(
                "status: must be one of {}",
                STATUSES.join(", ")
            )));
        }
    }
    Ok(())
}

pub async fn create(db: &Db, p: &NewProduct) -> AppResult<Product> {
    validate_fields(Some(&p.name), Some(&p.category), Some(p.price), Some(&p.status))?;
    if !(0..=1_000_000_000).contains(&p.stock) {
        return Err(AppError::bad_request("stock: must be 0..=1000000000"));
    }
    let now = now_ms() as i64;
    let insert = "INSERT INTO products (name, category, status, price, stock, version, created_at, updated_at) VALUES (?, ?, ?, ?, ?, 0, ?, ?)";
    let returning = match db.dialect {
        crate::db::Dialect::MySql => "",
        _ => " RETURNING id",
    };
    let sql = db.sql(&format!("{insert}{returning}")).into_owned();
    let query = sqlx::query(&sql)
        .bind(p.name.trim())
        .bind(p.category.trim())
        .bind(p.status.as_str())
        .bind(p.price)
        .bind(p.stock)
        .bind(now)
        .bind(now);
    let mut tx = db.begin().await?;
    let id = if returning.is_empty() {
        query
            .execute(&mut *tx)
            .await?
            .last_insert_id()
            .ok_or_else(|| AppError::Internal("no insert id".into()))?
    } else {
        int(&query.fetch_one(&mut *tx).await?, "id")?
    };
    tx.commit().await?;
    get(db, id, true)
        .await?
        .ok_or_else(|| AppError::Internal("product vanished after insert".into()))
}

pub async fn update(db: &Db, id: i64, patch: &ProductPatch) -> AppResult<Product> {
    validate_fields(
        patch.name.as_deref(),
        patch.category.as_deref(),
        patch.price,
        patch.status.as_deref(),
    )?;
    let mut sets = vec!["version = version + 1", "updated_at = ?"];
    if patch.name.is_some() {
        sets.push("name = ?");
    }
    if patch.category.is_some() {
        sets.push("category = ?");
    }
    if patch.price.is_some() {
        sets.push("price = ?");
    }
    if patch.status.is_some() {
        sets.push("status = ?");
    }
    let mut sql = format!("UPDATE products SET {} WHERE id = ?", sets.join(", "));
    if patch.version.is_some() {
        sql.push_str(" AND version = ?");
    }
    let sql = db.sql(&sql);
    let mut query = sqlx::query(&sql).bind(now_ms() as i64);
    if let Some(v) = &patch.name {
        query = query.bind(v.trim());
    }
    if let Some(v) = &patch.category {
        query = query.bind(v.trim());
    }
    if let Some(v) = patch.price {
        query = query.bind(v);
    }
    if let Some(v) = &patch.status {
        query = query.bind(v.as_str());
    }
    query = query.bind(id);
    if let Some(v) = patch.version {
        query = query.bind(v);
    }
    // The change and its invalidation record commit together (src/invalidation.rs).
    let mut tx = db.begin().await?;
    let updated = query.execute(&mut *tx).await?.rows_affected();
    if updated > 0 {
        invalidation::record(db, &mut tx, &[Key::product(id)]).await?;
    }
    tx.commit().await?;
    let current = get(db, id, true)
        .await?
        .ok_or_else(|| AppError::not_found(format!("product {id} does not exist")))?;
    if updated == 0 {
        return Err(AppError::Conflict {
            code: "version_conflict",
            message: format!(
                "version: product {id} is at version {}, not {}",
                current.version,
                patch.version.unwrap_or_default()
            ),
        });
    }
    Ok(current)
}

/// Adds `delta` (negative to remove) to the stock; never lets it go below zero.
pub async fn adjust_stock(db: &Db, id: i64, delta: i64) -> AppResult<Product> {
    if delta == 0 || delta.abs() > 1_000_000_000 {
        return Err(AppError::bad_request("delta: must be non-zero and within ±1000000000"));
    }
    let sql = db.sql(
        "UPDATE products SET stock = stock + ?, version = version + 1, updated_at = ? WHERE id = ? AND stock + ? >= 0",
    );
    let updated = sqlx::query(&sql).bind(delta).bind(now_ms() as i64).bind(id).bind(delta);
    let mut tx = db.begin().await?;
    let updated = updated.execute(&mut *tx).await?.rows_affected();
    if updated > 0 {
        invalidation::record(db, &mut tx, &[Key::product(id)]).await?;
    }
    tx.commit().await?;
    let current = get(db, id, true)
        .await?
        .ok_or_else(|| AppError::not_found(format!("product {id} does not exist")))?;
    if updated == 0 {
        return Err(AppError::Conflict {
            code: "insufficient_stock",
            message: format!(
                "delta: product {id} has {} in stock, cannot remove {}",
                current.stock, -delta
            ),
        });
    }
    Ok(current)
}

impl Projection {
    pub fn contains(&self, field: &str) -> bool {
        self.0.contains(&field)
    }
}
