//! SQL for each aggregate, one module each. Functions take the [`Db`](crate::db::Db) and return
//! plain data; caching and HTTP live elsewhere.

pub mod cart;
pub mod order_batch;
pub mod orders;
pub mod products;
pub mod users;

use sqlx::any::AnyRow;
use sqlx::Row;

/// Reads an integer column whatever width the driver reports.
pub(crate) fn int(row: &AnyRow, col: &str) -> Result<i64, sqlx::Error> {
    row.try_get::<i64, _>(col)
}

pub(crate) fn text(row: &AnyRow, col: &str) -> Result<String, sqlx::Error> {
    row.try_get::<String, _>(col)
}
