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

#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub config: Config,
    pub db: Arc<Db>,
    pub cache: Arc<Cache>,
    pub metrics: Arc<Metrics>,
    pub ids: Snowflake,
    pub tokens: Tokens,
    pub readiness: Readiness,
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
