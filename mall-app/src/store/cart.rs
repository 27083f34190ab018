//! Cart lines: one per (user, product), always read from the primary so a user sees their own
//! changes at once.

use serde::Serialize;

use super::{int, text};
use crate::db::{Db, Dialect};
use crate::error::{AppError, AppResult};
use crate::ids::now_ms;

#[derive(Debug, Clone, Serialize)]
pub struct CartLine {
    pub product_id: i64,
    pub name: String,
    /// Current unit price in cents.
    pub price: i64,
    pub quantity: i64,
    /// Whether the product can currently be ordered in this quantity.
    pub available: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Cart {
    pub items: Vec<CartLine>,
    /// Sum of price × quantity, in cents.
    pub total: i64,
}

pub async fn get(db: &Db, user_id: i64) -> AppResult<Cart> {
    let rows = sqlx::query(&db.sql(
        "SELECT c.product_id, c.quantity, p.name, p.price, p.stock, p.status \
         FROM cart_items c JOIN products p ON p.id = c.product_id \
         WHERE c.user_id = ? ORDER BY c.product_id",
    ))
    .bind(user_id)
    .fetch_all(&*db.read_primary().await?)
    .await?;
    let mut items = Vec::with_capacity(rows.len());
    for r in &rows {
        let quantity = int(r, "quantity")?;
        items.push(CartLine {
            product_id: int(r, "product_id")?,
            name: text(r, "name")?,
            price: int(r, "price")?,
            quantity,
            available: text(r, "status")? == "active" && int(r, "stock")? >= quantity,
        });
    }
    let total = items
        .iter()
        .map(|l| l.price.saturating_mul(l.quantity))
        .fold(0i64, i64::saturating_add);
    Ok(Cart { items, total })
}

/// How a cart line changes.
#[derive(Debug, Clone, Copy)]
pub enum Change {
    /// Add to whatever is there.
    Add(i64),
    /// Replace whatever is there.
    Set(i64),
}

pub async fn change(db: &Db, user_id: i64, product_id: i64, change: Change, max_quantity: i64) -> AppResult<()> {
    let mut tx = db.begin().await?;
    let status = sqlx::query(&db.sql("SELECT status FROM products WHERE id = ?"))
        .bind(product_id)
        .fetch_optional(&mut *tx)
        .await?;
    match status {
        None => {
            return Err(AppError::not_found(format!(
                "product_id: product {product_id} does not exist"
            )))
        }
        Some(r) if text(&r, "status")? != "active" => {
            return Err(AppError::Conflict {
                code: "product_unavailable",
                message: format!("product_id: product {product_id} is not for sale"),
            })
        }
        Some(_) => {}
    }
    // The increment happens in SQL, so concurrent adds to one line never lose an update; the
    // limit is checked on the result and the transaction rolled back when it is exceeded.
    let (amount, on_mysql, on_others) = match change {
        Change::Add(n) => (
            n,
            "quantity = quantity + VALUES(quantity)",
            "quantity = cart_items.quantity + excluded.quantity",
        ),
        Change::Set(n) => (n, "quantity = VALUES(quantity)", "quantity = excluded.quantity"),
    };
    let upsert = match db.dialect {
        Dialect::MySql => format!(
            "INSERT INTO cart_items (user_id, product_id, quantity, created_at, updated_at) VALUES (?, ?, ?, ?, ?) \
             ON DUPLICATE KEY UPDATE {on_mysql}, updated_at = VALUES(updated_at)"
        ),
        _ => format!(
            "INSERT INTO cart_items (user_id, product_id, quantity, created_at, updated_at) VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT (user_id, product_id) DO UPDATE SET {on_others}, updated_at = excluded.updated_at"
        ),
    };
    let now = now_ms() as i64;
    sqlx::query(&db.sql(&upsert))
        .bind(user_id)
        .bind(product_id)
        .bind(amount)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    let row = sqlx::query(&db.sql("SELECT quantity FROM cart_items WHERE user_id = ? AND product_id = ?"))
        .bind(user_id)
        .bind(product_id)
        .fetch_one(&mut *tx)
        .await?;
    let quantity = int(&row, "quantity")?;
    if quantity > max_quantity {
        return Err(AppError::bad_request(format!(
            "quantity: the cart line would hold {quantity}, more than the limit of {max_quantity}"
        )));
    }
    tx.commit().await?;
    Ok(())
}

pub async fn remove(db: &Db, user_id: i64, product_id: i64) -> AppResult<()> {
    sqlx::query(&db.sql("DELETE FROM cart_items WHERE user_id = ? AND product_id = ?"))
        .bind(user_id)
        .bind(product_id)
        .execute(&*db.write().await?)
        .await?;
    Ok(())
}
