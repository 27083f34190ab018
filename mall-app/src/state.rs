//! Everything a handler can reach, shared by `Arc`.

use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::auth::Tokens;
use crate::cache::Cache;
use crate::config::Config;
use crate::db::Db;
use crate::ids::Snowflake;
use crate::metrics::Metrics;
use crate::store::order_batch::OrderDesk;

#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub config: Config,
    pub db: Arc<Db>,
    pub cache: Arc<Cache>,
    pub metrics: Arc<Metrics>,
    pub ids: Arc<Snowflake>,
    pub orders: OrderDesk,
    pub tokens: Tokens,
    pub readiness: Readiness,
    pub in_flight_keys: InFlightKeys,
    /// The invalidation records applied here (read-after-write, `api/causal.rs`).
    pub applied: Arc<crate::invalidation::Applied>,
}

/// The `Idempotency-Key`s this instance is processing now. A repeat that arrives meanwhile gets
/// 409 with `Retry-After` (draft-ietf-httpapi-idempotency-key-header) instead of waiting; on
/// another instance it waits on the key's row and then replays.
#[derive(Default)]
pub struct InFlightKeys(std::sync::Mutex<std::collections::HashSet<(i64, String)>>);

impl InFlightKeys {
    /// Claims `(user_id, key)` until the guard drops; `None` when it is already being processed.
    pub fn claim(&self, user_id: i64, key: &str) -> Option<InFlightKey<'_>> {
        let id = (user_id, key.to_string());
        let fresh = self.0.lock().expect("in-flight keys").insert(id.clone());
        fresh.then_some(InFlightKey { keys: self, id })
    }
}

pub struct InFlightKey<'a> {
    keys: &'a InFlightKeys,
    id: (i64, String),
}

impl Drop for InFlightKey<'_> {
    fn drop(&mut self) {
        self.keys.0.lock().expect("in-flight keys").remove(&self.id);
    }
}

impl AppState {
    pub fn new(inner: Inner) -> Self {
        AppState(Arc::new(inner))
    }
}

impl Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// What `/ready` waits for. Migrations are applied before the server listens; warm-up runs after.
#[derive(Default)]
pub struct Readiness {
    warmed_up: AtomicBool,
    shutting_down: AtomicBool,
}

impl Readiness {
    pub fn set_warmed_up(&self) {
        self.warmed_up.store(true, Ordering::Release);
    }
    pub fn is_warmed_up(&self) -> bool {
        self.warmed_up.load(Ordering::Acquire)
    }
    pub fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::InFlightKeys;

    #[test]
    fn a_key_is_claimed_once_until_released() {
        let keys = InFlightKeys::default();
        let first = keys.claim(1, "k").expect("free");
        assert!(keys.claim(1, "k").is_none(), "in flight");
        assert!(keys.claim(2, "k").is_some(), "keys are per user");
        drop(first);
        assert!(keys.claim(1, "k").is_some(), "released");
    }
}
