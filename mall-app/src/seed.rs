//! Seed data: products 1..=N (as seed 001's wrk script expects) and users user1..userM plus
//! `admin`. Idempotent: existing rows are left as they are.

use crate::auth::{hash_password, verify_password};
use crate::config::SeedArgs;
use crate::db::{Db, Dialect};
use crate::error::AppResult;
use crate::ids::now_ms;

pub const CATEGORIES: [&str; 8] = [
    "books",
    "electronics",
    "home",
    "toys",
    "sports",
    "food",
    "fashion",
    "beauty",
];

pub async fn seed(db: &Db, args: &SeedArgs) -> AppResult<SeedReport> {
    let now = now_ms() as i64;
    let ignore = match db.dialect {
        Dialect::MySql => "INSERT IGNORE INTO",
        _ => "INSERT INTO",
    };
    let conflict = match db.dialect {
        Dialect::MySql => "",
        _ => " ON CONFLICT DO NOTHING",
    };
    let mut products = 0u64;
    // Batches keep each statement under every driver's parameter limit.
    for chunk in (1..=args.products as i64).collect::<Vec<_>>().chunks(500) {
        let marks = vec!["(?, ?, ?, 'active', ?, ?, 0, ?, ?)"; chunk.len()].join(", ");
        let sql = format!(
            "{ignore} products (id, name, category, status, price, stock, version, created_at, updated_at) VALUES {marks}{conflict}"
        );
        let sql = db.sql(&sql);
        let mut q = sqlx::query(&sql);
        for &id in chunk {
            let category = CATEGORIES[(id as usize) % CATEGORIES.len()];
            // Prices from 1.99 to 999.99, spread deterministically.
            let price = 199 + (id * 7919) % 99_800;
            q = q
                .bind(id)
                .bind(format!("Product {id}"))
                .bind(category)
                .bind(price)
                .bind(args.stock)
                .bind(now)
                .bind(now);
        }
        products += q.execute(&*db.write().await?).await?.rows_affected();
    }
    if db.dialect == Dialect::Postgres {
        // Explicit ids do not advance the sequence; admin-created products must not collide.
        sqlx::query(
            "SELECT setval(pg_get_serial_sequence('products', 'id'), GREATEST((SELECT MAX(id) FROM products), 1))",
        )
        .execute(&*db.write().await?)
        .await?;
    }

    // One hash for all seeded users: argon2 is slow by design and these share a password.
    let hash = hash_password(args.password.clone()).await?;
    let mut users = 0u64;
    let names: Vec<(String, &str)> = std::iter::once(("admin".to_string(), "admin"))
        .chain((1..=args.users).map(|i| (format!("user{i}"), "customer")))
        .collect();
    for chunk in names.chunks(500) {
        let marks = vec!["(?, ?, ?, ?)"; chunk.len()].join(", ");
        let sql = format!("{ignore} users (username, password_hash, role, created_at) VALUES {marks}{conflict}");
        let sql = db.sql(&sql);
        let mut q = sqlx::query(&sql);
        for (name, role) in chunk {
            q = q.bind(name.as_str()).bind(hash.as_str()).bind(*role).bind(now);
        }
        users += q.execute(&*db.write().await?).await?.rows_affected();
    }
    Ok(SeedReport {
        products_added: products,
        users_added: users,
    })
}

#[derive(Debug)]
pub struct SeedReport {
    pub products_added: u64,
    pub users_added: u64,
}

/// Creates `admin` with `password`, or sets its password when it no longer matches (a rotated
/// Secret). Returns what it did: `created`, `updated` or `unchanged`.
pub async fn ensure_admin(db: &Db, password: &str) -> AppResult<&'static str> {
    let now = now_ms() as i64;
    let existing: Option<(String,)> =
        sqlx::query_as(&db.sql("SELECT password_hash FROM users WHERE username = 'admin'"))
            .fetch_optional(&*db.write().await?)
            .await?;
    match existing {
        Some((hash,)) if verify_password(password.to_string(), hash.clone()).await? => Ok("unchanged"),
        Some(_) => {
            let hash = hash_password(password.to_string()).await?;
            sqlx::query(&db.sql("UPDATE users SET password_hash = ?, role = 'admin' WHERE username = 'admin'"))
                .bind(hash)
                .execute(&*db.write().await?)
                .await?;
            Ok("updated")
        }
        None => {
            let hash = hash_password(password.to_string()).await?;
            sqlx::query(
                &db.sql(
                    "INSERT INTO users (username, password_hash, role, created_at) VALUES ('admin', ?, 'admin', ?)",
                ),
            )
            .bind(hash)
            .bind(now)
            .execute(&*db.write().await?)
            .await?;
            Ok("created")
        }
    }
}
