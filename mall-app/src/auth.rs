//! Passwords (argon2id) and bearer tokens (HS256 JWT), and the extractors that require them.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::error::{AppError, AppResult};
use crate::state::AppState;
use crate::store::users::Role;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    role: Role,
    iat: u64,
    exp: u64,
}

pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl_secs: u64,
}

impl Tokens {
    pub fn new(secret: &str, ttl_secs: u64) -> Tokens {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Tokens {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            validation,
            ttl_secs,
        }
    }

    pub fn issue(&self, user_id: i64, role: Role) -> AppResult<String> {
        self.issue_expiring(user_id, role, crate::ids::now_ms() / 1000 + self.ttl_secs)
    }

    /// A token that expires at `exp` (Unix seconds); `issue` is this with the configured lifetime.
    pub fn issue_expiring(&self, user_id: i64, role: Role, exp: u64) -> AppResult<String> {
        let iat = (crate::ids::now_ms() / 1000).min(exp);
        let claims = Claims {
            sub: user_id.to_string(),
            role,
            iat,
            exp,
        };
        encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| AppError::Internal(format!("token signing: {e}")))
    }

    pub fn verify(&self, token: &str) -> AppResult<AuthUser> {
        let data = decode::<Claims>(token, &self.decoding, &self.validation).map_err(|e| {
            AppError::Unauthorized(match e.kind() {
                ErrorKind::ExpiredSignature => "token expired; log in again".into(),
                ErrorKind::InvalidSignature => "token signature is invalid".into(),
                _ => "token is malformed".into(),
            })
        })?;
        let id = data
            .claims
            .sub
            .parse()
            .map_err(|_| AppError::Unauthorized("token subject is invalid".into()))?;
        Ok(AuthUser {
            id,
            role: data.claims.role,
        })
    }
}

/// The caller, proven by a valid bearer token.
#[derive(Debug, Clone, Copy)]
pub struct AuthUser {
    pub id: i64,
    pub role: Role,
}

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| AppError::Unauthorized("Authorization: a bearer token is required".into()))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
            .ok_or_else(|| AppError::Unauthorized("Authorization: expected `Bearer <token>`".into()))?;
        state.tokens.verify(token.trim())
    }
}

/// A caller with the admin role.
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let user = AuthUser::from_request_parts(parts, state).await?;
        if user.role != Role::Admin {
            return Err(AppError::Forbidden("this operation needs the admin role".into()));
        }
        Ok(Admin)
    }
}

/// Hashing is deliberately slow (tens of ms), so it runs off the async workers.
pub async fn hash_password(password: String) -> AppResult<String> {
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| AppError::Internal(format!("password hashing: {e}")))
    })
    .await
    .map_err(|e| AppError::Internal(format!("password hashing task: {e}")))?
}

pub async fn verify_password(password: String, hash: String) -> AppResult<bool> {
    tokio::task::spawn_blocking(move || {
        let parsed = PasswordHash::new(&hash).map_err(|e| AppError::Internal(format!("stored hash: {e}")))?;
        Ok(Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
    })
    .await
    .map_err(|e| AppError::Internal(format!("password check task: {e}")))?
}
