//! Users: accounts and their roles.

use serde::{Deserialize, Serialize};

use super::{int, text};
use crate::db::{is_unique_violation, Db};
use crate::error::{AppError, AppResult};
use crate::ids::now_ms;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Customer,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Customer => "customer",
            Role::Admin => "admin",
        }
    }

    fn parse(s: &str) -> Role {
        if s == "admin" {
            Role::Admin
        } else {
            Role::Customer
        }
    }
}

const COLUMNS: &str = "id, username, password_hash, role";

fn from_row(r: &sqlx::any::AnyRow) -> Result<User, sqlx::Error> {
    Ok(User {
        id: int(r, "id")?,
        username: text(r, "username")?,
        password_hash: text(r, "password_hash")?,
        role: Role::parse(&text(r, "role")?),
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct User {
    pub id: i64,
    pub username: String,
    pub role: Role,
    #[serde(skip)]
    pub password_hash: String,
}

pub async fn create(db: &Db, username: &str, password_hash: &str, role: Role) -> AppResult<User> {
    let result =
        sqlx::query(&db.sql("INSERT INTO users (username, password_hash, role, created_at) VALUES (?, ?, ?, ?)"))
            .bind(username)
            .bind(password_hash)
            .bind(role.as_str())
            .bind(now_ms() as i64)
            .execute(&*db.write().await?)
            .await;
    match result {
        Ok(_) => find_by_username(db, username)
            .await?
            .ok_or_else(|| AppError::Internal("user vanished after insert".into())),
        Err(e) if is_unique_violation(&e) => Err(AppError::Conflict {
            code: "username_taken",
            message: format!("username {username:?} is already registered"),
        }),
        Err(e) => Err(e.into()),
    }
}

/// Reads from the primary: a login right after registering must find the account.
pub async fn find_by_username(db: &Db, username: &str) -> AppResult<Option<User>> {
    let pool = db.read_primary().await?;
    let row = sqlx::query(&db.sql(&format!("SELECT {COLUMNS} FROM users WHERE username = ?")))
        .bind(username)
        .fetch_optional(&*pool)
        .await?;
    Ok(row.as_ref().map(from_row).transpose()?)
}

/// The public profile of a user (no password hash), for `/api/me`.
pub async fn get(db: &Db, id: i64) -> AppResult<Option<User>> {
    let row = sqlx::query(&db.sql(&format!("SELECT {COLUMNS} FROM users WHERE id = ?")))
        .bind(id)
        .fetch_optional(&*db.read_key(&crate::cache::Key::user(id)).await?)
        .await?;
    Ok(row.as_ref().map(from_row).transpose()?)
}
