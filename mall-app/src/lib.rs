//! The bundled mall app: catalog, cart and orders over SQLite, PostgreSQL or MySQL, with a
//! two-level cache, read/write split, Prometheus metrics, health and readiness.
//!
//! [`App::start`] wires the parts together; [`api::app`] is the router the binary serves and
//! the tests drive over a real socket.

pub mod admin;
pub mod api;
pub mod auth;
pub mod cache;
pub mod config;
pub mod db;
pub mod error;
pub mod extract;
pub mod fences;
pub mod ids;
pub mod invalidation;
pub mod metrics;
pub mod seed;
pub mod slow_plans;
pub mod state;
pub mod store;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tuning;

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::cache::{Cache, CacheSettings, Key, Ttls};
use crate::config::Config;
use crate::db::Db;
use crate::metrics::Metrics;
use crate::state::{AppState, Inner, Readiness};
use crate::store::order_batch::{BatchSettings, OrderDesk};

/// A started app: migrated, background tasks running, warm-up under way.
pub struct App {
    pub state: AppState,
}

/// How often the allowance file is read: a changed share is in effect this long (plus the time
/// the kubelet takes to update the mounted ConfigMap) after the operator writes it.
pub const ALLOWANCE_READ_EVERY: Duration = Duration::from_secs(2);

impl App {
    pub async fn start(config: Config) -> anyhow::Result<App> {
        let args = &config.args;
        let metrics = Arc::new(Metrics::new());
        let db = Arc::new(Db::connect(&args.db, &config.tuning, metrics.clone()).await?);
        if let Some(path) = &args.db.db_allowance_file {
            // At start the file must be right: a pod must not open more than its share.
            db.load_allowance(path)
                .map_err(|e| anyhow::anyhow!("MALL_DB_ALLOWANCE_FILE: {e}"))?;
        }
        // Migrations, seeding and the admin account once per database: pods starting together
        // take turns on a database-wide lock (each step is idempotent too).
        db.with_bootstrap_lock(|| async {
            db.migrate().await?;
            if args.seed {
                let report = seed::seed(&db, &args.seed_args).await?;
                tracing::info!(
                    products_added = report.products_added,
                    users_added = report.users_added,
                    "seeded"
                );
            }
            if let Some(password) = &args.admin_password {
                let done = seed::ensure_admin(&db, &password.0).await?;
                tracing::info!(admin = done, "admin account from MALL_ADMIN_PASSWORD");
            }
            Ok(())
        })
        .await?;
        let cache = Cache::new(
            CacheSettings {
                l1_bytes: config.tuning.cache_bytes,
                ttls: Ttls {
                    product: Duration::from_secs(args.cache_ttl_product_secs),
                    order: Duration::from_secs(args.cache_ttl_order_secs),
                    user: Duration::from_secs(args.cache_ttl_user_secs),
                },
                redis_url: args.redis_url.clone(),
                redis_prefix: args.redis_prefix.clone(),
                redis_timeout: Duration::from_millis(args.redis_timeout_ms),
            },
            metrics.clone(),
        )?;
        tokio::spawn(cache.clone().follow_invalidations());
        let applied = Arc::new(invalidation::Applied::default());
        let poll = Duration::from_millis(args.invalidation_poll_ms);
        let follower = invalidation::Follower::start(
            db.clone(),
            cache.clone(),
            metrics.clone(),
            invalidation::FollowerSettings {
                poll,
                // PostgreSQL is caught up once a second besides its notifications; a poll may
                // be slow for a while under load before the cache is bypassed.
                max_lag: if db.dialect == db::Dialect::Postgres {
                    Duration::from_secs(3)
                } else {
                    (poll * 10).max(Duration::from_secs(1))
                },
                retain: Duration::from_secs(args.invalidation_retain_secs),
                purge_url: args.sidecar_purge_url.clone(),
            },
            applied.clone(),
        )
        .await?;
        tokio::spawn(db.clone().watch_fences());
        telemetry::set_slow_statement_ms(args.db.db_slow_ms);
        telemetry::set_db_system(match db.dialect {
            db::Dialect::Postgres => "postgresql",
            db::Dialect::MySql => "mysql",
            db::Dialect::Sqlite => "sqlite",
        });
        slow_plans::start(db.clone());
        tokio::spawn(follower.run());
        tokio::spawn(
            db.clone()
                .watch_replicas(Duration::from_secs(args.db.db_replica_check_secs.max(1))),
        );
        // Without a file the allowances never change: nothing to follow.
        if let Some(path) = args.db.db_allowance_file.clone() {
            tokio::spawn(db.clone().follow_allowance(path, ALLOWANCE_READ_EVERY));
        }

        let ids = Arc::new(ids::Snowflake::new(args.worker_id));
        let orders = OrderDesk::start(
            db.clone(),
            ids.clone(),
            metrics.clone(),
            BatchSettings {
                max_orders: args.order_batch_max,
                flush_after: Duration::from_micros(args.order_batch_flush_us),
                writers: args.order_batch_writers,
                arrays: args.order_batch_arrays,
            },
        );
        let state = AppState::new(Inner {
            ids,
            orders,
            tokens: auth::Tokens::new(&config.jwt_secret, args.jwt_ttl_secs),
            readiness: Readiness::default(),
            in_flight_keys: Default::default(),
            applied,
            config,
            db,
            cache,
            metrics,
        });
        tokio::spawn(warm_up(state.clone()));
        tokio::spawn(expire_idempotency_keys(state.clone()));
        Ok(App { state })
    }

    pub fn router(&self) -> axum::Router {
        api::app(self.state.clone())
    }

    /// Serves until `shutdown` resolves; then `/ready` fails at once while requests are still
    /// served for the shutdown delay (so load balancers stop sending first), then in-flight
    /// requests drain for at most the configured timeout.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        self.serve_on(listener, None, shutdown).await
    }

    /// [`App::serve`] on a TCP listener and, when given, a Unix socket as well: both stop and
    /// drain together.
    pub async fn serve_on(
        self,
        listener: TcpListener,
        unix: Option<tokio::net::UnixListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let state = self.state.clone();
        let grace = Duration::from_secs(state.config.args.shutdown_timeout_secs);
        let delay = Duration::from_millis(state.config.args.shutdown_delay_ms);
        let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
        let readiness_state = state.clone();
        tokio::spawn(async move {
            shutdown.await;
            readiness_state.readiness.set_shutting_down();
            if !delay.is_zero() {
                tracing::info!(
                    delay_ms = delay.as_millis() as u64,
                    "shutting down: not ready, still serving"
                );
                tokio::time::sleep(delay).await;
            }
            tracing::info!("shutting down: draining in-flight requests");
            let _ = stopping_tx.send(true);
        });
        let stopped = |mut stopping: tokio::sync::watch::Receiver<bool>| async move {
            let _ = stopping.wait_for(|s| *s).await;
        };
        let tcp = axum::serve(listener, self.router()).with_graceful_shutdown(stopped(stopping.clone()));
        let servers = async {
            match unix {
                Some(unix) => {
                    let unix = axum::serve(unix, self.router()).with_graceful_shutdown(stopped(stopping.clone()));
                    tokio::try_join!(tcp.into_future(), unix.into_future()).map(|_| ())
                }
                None => tcp.await,
            }
        };
        let mut draining = stopping.clone();
        let drain_deadline = async move {
            let _ = draining.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        };
        tokio::select! {
            result = servers => result?,
            _ = drain_deadline => tracing::warn!(grace_secs = grace.as_secs(), "drain timed out; closing remaining connections"),
        }
        state.db.close().await;
        Ok(())
    }
}

/// Binds a Unix domain socket at `path`, replacing a socket file a previous run left behind (a
/// restarted container finds its emptyDir as it was). Anything else at `path` is left alone.
pub fn bind_unix(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        }
    }
    tokio::net::UnixListener::bind(path)
}

/// Deletes expired Idempotency-Keys every quarter of their lifetime (at most every 10 minutes),
/// so a key is forgotten at most that long after it expires.
async fn expire_idempotency_keys(state: AppState) {
    let ttl = Duration::from_secs(state.config.args.idempotency_key_ttl_secs.max(1));
    let every = (ttl / 4).clamp(Duration::from_secs(1), Duration::from_secs(600));
    loop {
        tokio::time::sleep(every).await;
        let before = ids::now_ms() as i64 - ttl.as_millis() as i64;
        match store::orders::expire_keys(&state.db, before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "expired idempotency keys deleted"),
            Err(e) => tracing::warn!(error = %e, "expired idempotency keys not deleted; retrying later"),
        }
    }
}

/// Loads the hottest products into the cache in one query, then marks the app ready.
async fn warm_up(state: AppState) {
    let n = state.config.args.warmup_products;
    let mut attempt = 0u32;
    loop {
        let result = async {
            let mut ids = state.config.args.warmup_product_ids.clone();
            for id in store::products::hottest_ids(&state.db, n).await? {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
            let products = store::products::get_many(&state.db, &ids).await?;
            let count = products.len();
            state
                .cache
                .preload(products.into_iter().map(|p| (Key::product(p.id), p)))
                .await;
            Ok::<usize, error::AppError>(count)
        }
        .await;
        match result {
            Ok(count) => {
                tracing::info!(products = count, "cache warmed up");
                state.readiness.set_warmed_up();
                return;
            }
            Err(e) => {
                attempt += 1;
                tracing::warn!(error = %e, attempt, "cache warm-up failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
