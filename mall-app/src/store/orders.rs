//! Orders: placing one deducts stock in the same transaction with a conditional update, taking
//! products in id order, so stock never goes negative and two orders never deadlock each other.
//! An `Idempotency-Key` is claimed first in that transaction: a repeat of the same key waits for
//! the first to commit, then replays its order instead of creating a second.

use crate::db::Tx;
use serde::{Deserialize, Serialize, Serializer};
use sqlx::Any;

use super::{int, text};
use crate::cache::Key;
use crate::db::{is_unique_violation, Db, Dialect};
use crate::error::{AppError, AppResult};
use crate::ids::{now_ms, Snowflake};
use crate::invalidation;

fn as_string<S: Serializer>(id: &i64, s: S) -> Result<S::Ok, S::Error> {
    // Snowflake ids exceed 2^53: JSON numbers would lose digits in JavaScript clients.
    s.collect_str(id)
}

fn from_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OrderItem {
    pub product_id: i64,
    pub name: String,
    /// Unit price in cents when the order was placed.
    pub unit_price: i64,
    pub quantity: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Order {
    #[serde(serialize_with = "as_string", deserialize_with = "from_string")]
    pub id: i64,
    pub order_no: String,
    pub user_id: i64,
    pub status: String,
    /// Total in cents.
    pub total: i64,
    pub items: Vec<OrderItem>,
    /// Unix milliseconds.
    pub created_at: i64,
}

/// What to order: explicit lines, or everything in the cart.
#[derive(Debug, Clone)]
pub enum Source {
    Items(Vec<(i64, i64)>),
    Cart,
}

pub struct Placed {
    pub order: Order,
    /// True when an earlier request with the same Idempotency-Key created it.
    pub replayed: bool,
}

pub struct Idempotency<'a> {
    pub key: &'a str,
    /// Hash of the request, so a key reused for a different request is refused.
    pub request_hash: &'a str,
}

const MAX_ATTEMPTS: u32 = 4;

pub async fn place(
    db: &Db,
    ids: &Snowflake,
    user_id: i64,
    source: &Source,
    idempotency: Option<&Idempotency<'_>>,
    on_retry: impl Fn(),
) -> AppResult<Placed> {
    let mut attempt = 1;
    loop {
        match try_place(db, ids, user_id, source, idempotency).await {
            Err(Attempt::Retryable(e)) if attempt < MAX_ATTEMPTS => {
                tracing::debug!(error = %e, attempt, "order transaction retried");
                on_retry();
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(5 * attempt as u64)).await;
            }
            Err(Attempt::Retryable(e)) => return Err(e.into()),
            Err(Attempt::Failed(e)) => return Err(e),
            Err(Attempt::KeyTaken) => {
                let key = idempotency.expect("only keyed requests can find their key taken");
                return replay(db, user_id, key).await;
            }
            Ok(order) => return Ok(Placed { order, replayed: false }),
        }
    }
}

enum Attempt {
    Retryable(sqlx::Error),
    Failed(AppError),
    KeyTaken,
}

impl From<sqlx::Error> for Attempt {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Database(db) if crate::db::is_retryable(db.as_ref()) => Attempt::Retryable(e),
            _ => Attempt::Failed(e.into()),
        }
    }
}

impl From<AppError> for Attempt {
    fn from(e: AppError) -> Self {
        Attempt::Failed(e)
    }
}

async fn try_place(
    db: &Db,
    ids: &Snowflake,
    user_id: i64,
    source: &Source,
    idempotency: Option<&Idempotency<'_>>,
) -> Result<Order, Attempt> {
    let order_id = ids.next_id();
    let now = now_ms() as i64;
    let mut tx = db.begin().await?;

    if let Some(key) = idempotency {
        let claimed = sqlx::query(&db.sql(
            "INSERT INTO idempotency_keys (user_id, idem_key, request_hash, order_id, created_at) VALUES (?, ?, ?, ?, ?)",
        ))
        .bind(user_id)
        .bind(key.key)
        .bind(key.request_hash)
        .bind(order_id)
        .bind(now)
        .execute(&mut *tx)
        .await;
        match claimed {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => return Err(Attempt::KeyTaken),
            Err(e) => return Err(e.into()),
        }
    }

    let mut lines = match source {
        Source::Items(items) => items.clone(),
        Source::Cart => cart_lines(db, &mut tx, user_id).await?,
    };
    if lines.is_empty() {
        return Err(empty_cart().into());
    }
    // One global lock order (product id) means concurrent orders cannot deadlock.
    lines.sort_unstable_by_key(|(product_id, _)| *product_id);

    let mut items = Vec::with_capacity(lines.len());
    for &(product_id, quantity) in &lines {
        let (name, unit_price) = deduct(db, &mut tx, product_id, quantity, now).await?;
        items.push(OrderItem {
            product_id,
            name,
            unit_price,
            quantity,
        });
    }
    let total = total(&items).ok_or_else(total_too_large)?;

    let order = Order {
        id: order_id,
        order_no: format!("MO{order_id}"),
        user_id,
        status: "created".into(),
        total,
        items,
        created_at: now,
    };
    insert_order(db, &mut tx, &order).await.map_err(|e| {
        // Two instances configured with one worker id can mint the same id in the same
        // millisecond; the next attempt takes a fresh one instead of failing the order.
        if is_unique_violation(&e) {
            Attempt::Retryable(e)
        } else {
            e.into()
        }
    })?;
    if matches!(source, Source::Cart) {
        sqlx::query(&db.sql("DELETE FROM cart_items WHERE user_id = ?"))
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
    }
    // The stock of each product changed: its cached copies go, everywhere.
    let changed: Vec<Key> = order.items.iter().map(|i| Key::product(i.product_id)).collect();
    invalidation::record(db, &mut tx, &changed).await?;
    tx.commit().await?;
    Ok(order)
}

/// Takes `quantity` units of a product if it has them and is for sale; returns its name and price
/// for the order. Where the database can return rows from an UPDATE (PostgreSQL, SQLite) that is
/// one round trip; MySQL has no `UPDATE ... RETURNING`, so it reads the row after. Each round trip
/// saved here is time the product's row lock is not held.
async fn deduct(db: &Db, tx: &mut Tx<'_>, product_id: i64, quantity: i64, now: i64) -> Result<(String, i64), Attempt> {
    macro_rules! deduct {
        () => {
            "UPDATE products SET stock = stock - ?, version = version + 1, updated_at = ? \
             WHERE id = ? AND stock >= ? AND status = 'active'"
        };
    }
    const DEDUCT: &str = deduct!();
    const DEDUCT_RETURNING: &str = concat!(deduct!(), " RETURNING name, price");
    let deducted = if db.dialect == Dialect::MySql {
        let n = sqlx::query(DEDUCT)
            .bind(quantity)
            .bind(now)
            .bind(product_id)
            .bind(quantity)
            .execute(&mut **tx)
            .await?
            .rows_affected();
        if n == 1 {
            sqlx::query("SELECT name, price FROM products WHERE id = ?")
                .bind(product_id)
                .fetch_optional(&mut **tx)
                .await?
        } else {
            None
        }
    } else {
        sqlx::query(&db.sql(DEDUCT_RETURNING))
            .bind(quantity)
            .bind(now)
            .bind(product_id)
            .bind(quantity)
            .fetch_optional(&mut **tx)
            .await?
    };
    if let Some(row) = deducted {
        return Ok((text(&row, "name")?, int(&row, "price")?));
    }
    // Nothing deducted: say why.
    let row = sqlx::query(&db.sql("SELECT stock, status FROM products WHERE id = ?"))
        .bind(product_id)
        .fetch_optional(&mut **tx)
        .await?;
    let Some(row) = row else {
        return Err(LineRefused::Missing.error(product_id, quantity).into());
    };
    let refused = if text(&row, "status")? != "active" {
        LineRefused::NotForSale
    } else {
        LineRefused::Short {
            stock: int(&row, "stock")?,
        }
    };
    Err(refused.error(product_id, quantity).into())
}

/// Why an order line cannot be filled; the one place its answer is worded, so a batched order
/// is refused exactly as an order placed alone.
pub(crate) enum LineRefused {
    Missing,
    NotForSale,
    Short { stock: i64 },
}

impl LineRefused {
    pub(crate) fn error(self, product_id: i64, quantity: i64) -> AppError {
        match self {
            LineRefused::Missing => AppError::not_found(format!("items: product {product_id} does not exist")),
            LineRefused::NotForSale => AppError::Conflict {
                code: "product_unavailable",
                message: format!("items: product {product_id} is not for sale"),
            },
            LineRefused::Short { stock } => AppError::Conflict {
                code: "insufficient_stock",
                message: format!("items: product {product_id} has {stock} in stock, {quantity} requested"),
            },
        }
    }
}

pub(crate) fn empty_cart() -> AppError {
    AppError::bad_request("items: the cart is empty; add items or pass them explicitly")
}

pub(crate) fn total_too_large() -> AppError {
    AppError::bad_request("items: the order total is too large")
}

/// The order's total in cents, `None` when it does not fit in 64 bits.
pub(crate) fn total(items: &[OrderItem]) -> Option<i64> {
    items.iter().try_fold(0i64, |acc, i| {
        i.unit_price.checked_mul(i.quantity).and_then(|v| acc.checked_add(v))
    })
}

/// Writes the order and its lines: one statement on PostgreSQL (a data-modifying CTE; the
/// foreign key from the lines is checked at the statement's end, when the order row exists), two
/// elsewhere.
async fn insert_order(db: &Db, tx: &mut Tx<'_>, order: &Order) -> Result<(), sqlx::Error> {
    const ORDER: &str = "INSERT INTO orders (id, order_no, user_id, status, total, created_at, updated_at) \
                         VALUES (?, ?, ?, ?, ?, ?, ?)";
    let marks = vec!["(?, ?, ?, ?, ?)"; order.items.len()].join(", ");
    let lines = format!("INSERT INTO order_items (order_id, product_id, name, unit_price, quantity) VALUES {marks}");
    type Query<'q> = sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>;
    fn bind_order<'q>(q: Query<'q>, o: &'q Order) -> Query<'q> {
        q.bind(o.id)
            .bind(o.order_no.as_str())
            .bind(o.user_id)
            .bind(o.status.as_str())
            .bind(o.total)
            .bind(o.created_at)
            .bind(o.created_at)
    }
    fn bind_lines<'q>(mut q: Query<'q>, o: &'q Order) -> Query<'q> {
        for i in &o.items {
            q = q
                .bind(o.id)
                .bind(i.product_id)
                .bind(i.name.as_str())
                .bind(i.unit_price)
                .bind(i.quantity);
        }
        q
    }
    if db.dialect == Dialect::Postgres {
        let sql = db.sql(&format!("WITH placed AS ({ORDER}) {lines}")).into_owned();
        bind_lines(bind_order(sqlx::query(&sql), order), order)
            .execute(&mut **tx)
            .await?;
    } else {
        bind_order(sqlx::query(ORDER), order).execute(&mut **tx).await?;
        bind_lines(sqlx::query(&lines), order).execute(&mut **tx).await?;
    }
    Ok(())
}

async fn cart_lines(db: &Db, tx: &mut Tx<'_>, user_id: i64) -> Result<Vec<(i64, i64)>, sqlx::Error> {
    let rows =
        sqlx::query(&db.sql("SELECT product_id, quantity FROM cart_items WHERE user_id = ? ORDER BY product_id"))
            .bind(user_id)
            .fetch_all(&mut **tx)
            .await?;
    rows.iter()
        .map(|r| Ok((int(r, "product_id")?, int(r, "quantity")?)))
        .collect()
}

/// The key was used before: answer with that order, if the request was the same.
pub(crate) async fn replay(db: &Db, user_id: i64, key: &Idempotency<'_>) -> AppResult<Placed> {
    let row =
        sqlx::query(&db.sql("SELECT request_hash, order_id FROM idempotency_keys WHERE user_id = ? AND idem_key = ?"))
            .bind(user_id)
            .bind(key.key)
            .fetch_optional(&*db.read_primary().await?)
            .await?
            .ok_or_else(|| AppError::Unavailable("idempotency key vanished; retry".into()))?;
    if text(&row, "request_hash")? != key.request_hash {
        // draft-ietf-httpapi-idempotency-key-header: a key reused with a different payload is 422.
        return Err(AppError::Unprocessable {
            code: "idempotency_key_reused",
            message: "Idempotency-Key: this key was already used for a different request".into(),
        });
    }
    let order_id = int(&row, "order_id")?;
    let order = get(db, user_id, order_id, true)
        .await?
        .ok_or_else(|| AppError::Internal(format!("order {order_id} of an idempotency key is missing")))?;
    Ok(Placed { order, replayed: true })
}

/// Deletes the Idempotency-Keys created before `before_ms` (Unix ms); returns how many. Each row
/// is an old, committed claim, so no order in progress waits on these deletes.
pub async fn expire_keys(db: &Db, before_ms: i64) -> AppResult<u64> {
    let done = sqlx::query(&db.sql("DELETE FROM idempotency_keys WHERE created_at < ?"))
        .bind(before_ms)
        .execute(&*db.write().await?)
        .await?;
    Ok(done.rows_affected())
}

/// One of `user_id`'s orders; another user's order is "not found".
pub async fn get(db: &Db, user_id: i64, order_id: i64, primary: bool) -> AppResult<Option<Order>> {
    let pool = if primary {
        db.read_primary().await?
    } else {
        db.read_key(&Key::order(user_id, order_id)).await?
    };
    let row = sqlx::query(
        &db.sql("SELECT id, order_no, user_id, status, total, created_at FROM orders WHERE id = ? AND user_id = ?"),
    )
    .bind(order_id)
    .bind(user_id)
    .fetch_optional(&*pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let mut orders = vec![order_from_row(&row)?];
    attach_items(db, &pool, &mut orders).await?;
    Ok(orders.pop())
}

/// A page of `user_id`'s orders, newest first, older than `before_id`; up to `limit + 1`.
pub async fn list(db: &Db, user_id: i64, before_id: i64, limit: u32) -> AppResult<Vec<Order>> {
    let pool = db.read_primary().await?;
    let rows = sqlx::query(&db.sql(
        "SELECT id, order_no, user_id, status, total, created_at FROM orders WHERE user_id = ? AND id < ? ORDER BY id DESC LIMIT ?",
    ))
    .bind(user_id)
    .bind(before_id)
    .bind(limit as i64 + 1)
    .fetch_all(&*pool)
    .await?;
    let mut orders = rows.iter().map(order_from_row).collect::<Result<Vec<_>, _>>()?;
    attach_items(db, &pool, &mut orders).await?;
    Ok(orders)
}

fn order_from_row(r: &sqlx::any::AnyRow) -> Result<Order, sqlx::Error> {
    Ok(Order {
        id: int(r, "id")?,
        order_no: text(r, "order_no")?,
        user_id: int(r, "user_id")?,
        status: text(r, "status")?,
        total: int(r, "total")?,
        items: Vec::new(),
        created_at: int(r, "created_at")?,
    })
}

/// Loads the items of all `orders` in one query (no N+1).
async fn attach_items(db: &Db, pool: &sqlx::AnyPool, orders: &mut [Order]) -> AppResult<()> {
    if orders.is_empty() {
        return Ok(());
    }
    let marks = vec!["?"; orders.len()].join(", ");
    let sql = format!(
        "SELECT order_id, product_id, name, unit_price, quantity FROM order_items WHERE order_id IN ({marks}) ORDER BY order_id, product_id"
    );
    let sql = db.sql(&sql);
    let mut query = sqlx::query(&sql);
    for o in orders.iter() {
        query = query.bind(o.id);
    }
    for r in query.fetch_all(pool).await? {
        let order_id = int(&r, "order_id")?;
        if let Some(o) = orders.iter_mut().find(|o| o.id == order_id) {
            o.items.push(OrderItem {
                product_id: int(&r, "product_id")?,
                name: text(&r, "name")?,
                unit_price: int(&r, "unit_price")?,
                quantity: int(&r, "quantity")?,
            });
        }
    }
    Ok(())
}
