//! Database access: the primary and replica pools, read/write split, SQL dialects, migrations.
//!
//! All queries are written once with `?` placeholders and rewritten for PostgreSQL's `$n`.
//! Reads go round-robin over healthy replicas and fall back to the primary; reads that must see
//! the caller's own write use [`Db::read_primary`]. With the embedded SQLite default the
//! "primary" is a single-connection writer (SQLite allows one writer at a time, so queueing in
//! our pool beats spinning on the file lock) and the one "replica" is a read-only reader pool.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use prometheus::IntCounter;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::{Any, AnyPool, Connection, Executor, Transaction};

use crate::config::DbArgs;
use crate::metrics::Metrics;
use crate::tuning::{PoolSize, Tuning};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
    MySql,
}

impl Dialect {
    pub fn from_url(url: &str) -> anyhow::Result<Dialect> {
        let scheme = url.split(':').next().unwrap_or_default();
        match scheme {
            "sqlite" => Ok(Dialect::Sqlite),
            "postgres" | "postgresql" => Ok(Dialect::Postgres),
            "mysql" | "mariadb" => Ok(Dialect::MySql),
            other => anyhow::bail!(
                "MALL_DATABASE_URL: unsupported scheme {other:?} (use sqlite://, postgres:// or mysql://)"
            ),
        }
    }

    /// Rewrites `?` placeholders to `$1, $2, ...` for PostgreSQL. Our SQL has no `?` in literals.
    pub fn sql<'a>(self, query: &'a str) -> Cow<'a, str> {
        if self != Dialect::Postgres || !query.contains('?') {
            return Cow::Borrowed(query);
        }
        let mut out = String::with_capacity(query.len() + 8);
        let mut n = 0;
        for ch in query.chars() {
            if ch == '?' {
                n += 1;
                out.push('$');
                out.push_str(&n.to_string());
            } else {
                out.push(ch);
            }
        }
        Cow::Owned(out)
    }
}

/// One pool and what we track about it.
pub struct PoolHandle {
    pub name: String,
    pub pool: AnyPool,
    size: PoolSize,
    timeouts: [(&'static str, Duration); 3],
    healthy: AtomicBool,
    reads: IntCounter,
    writes: IntCounter,
}

pub struct Db {
    pub dialect: Dialect,
    primary: PoolHandle,
    replicas: Vec<PoolHandle>,
    next_replica: AtomicUsize,
    metrics: Arc<Metrics>,
}

impl Db {
    pub async fn connect(args: &DbArgs, tuning: &Tuning, metrics: Arc<Metrics>) -> anyhow::Result<Db> {
        sqlx::any::install_default_drivers();
        let (primary_url, dialect) = match &args.database_url {
            Some(url) => (url.clone(), Dialect::from_url(url)?),
            None => {
                std::fs::create_dir_all(&args.data_dir)
                    .map_err(|e| anyhow::anyhow!("MALL_DATA_DIR: cannot create {}: {e}", args.data_dir.display()))?;
                let path = args.data_dir.join("mall.db");
                (format!("sqlite://{}?mode=rwc", path.display()), Dialect::Sqlite)
            }
        };
        let handle = |name: &str, pool: AnyPool, size: PoolSize| PoolHandle {
            name: name.to_string(),
            pool,
            size,
            timeouts: [
                ("acquire", Duration::from_millis(args.db_acquire_timeout_ms)),
                ("idle", Duration::from_secs(args.db_idle_timeout_secs)),
                ("max_lifetime", Duration::from_secs(args.db_max_lifetime_secs)),
            ],
            healthy: AtomicBool::new(true),
            reads: metrics.db_operations.with_label_values(&[name, "read"]),
            writes: metrics.db_operations.with_label_values(&[name, "write"]),
        };

        let (primary, replicas) = if dialect == Dialect::Sqlite {
            let writer = PoolSize { max: 1, min: 1 };
            let reader = tuning.replica_pool;
            let primary = handle("primary", sqlite_pool(args, &primary_url, writer, false).await?, writer);
            let reader_pool = sqlite_pool(args, &primary_url, reader, true).await?;
            (primary, vec![handle("sqlite-reader", reader_pool, reader)])
        } else {
            let primary = handle(
                "primary",
                server_pool(args, &primary_url, tuning.primary_pool)?,
                tuning.primary_pool,
            );
            let mut replicas = Vec::new();
            for (i, url) in args.replica_urls.iter().filter(|u| !u.trim().is_empty()).enumerate() {
                if Dialect::from_url(url)? != dialect {
                    anyhow::bail!(
                        "MALL_DATABASE_REPLICA_URLS: replica {i} is not the same kind of database as the primary"
                    );
                }
                let name = format!("replica{i}");
                replicas.push(handle(
                    &name,
                    server_pool(args, url, tuning.replica_pool)?,
                    tuning.replica_pool,
                ));
            }
            (primary, replicas)
        };
        Ok(Db {
            dialect,
            primary,
            replicas,
            next_replica: AtomicUsize::new(0),
            metrics,
        })
    }

    pub fn sql<'a>(&self, query: &'a str) -> Cow<'a, str> {
        self.dialect.sql(query)
    }

    /// A pool for a read that may be slightly behind: a healthy replica, else the primary.
    pub fn read(&self) -> &AnyPool {
        let n = self.replicas.len();
        if n > 0 {
            let start = self.next_replica.fetch_add(1, Ordering::Relaxed);
            for i in 0..n {
                let replica = &self.replicas[(start + i) % n];
                if replica.healthy.load(Ordering::Relaxed) {
                    replica.reads.inc();
                    return &replica.pool;
                }
            }
        }
        self.read_primary()
    }

    /// A pool for a read that must see this caller's own committed writes.
    pub fn read_primary(&self) -> &AnyPool {
        self.primary.reads.inc();
        &self.primary.pool
    }

    pub fn write(&self) -> &AnyPool {
        self.primary.writes.inc();
        &self.primary.pool
    }

    /// Starts a write transaction. SQLite takes the write lock up front (`BEGIN IMMEDIATE`) so a
    /// read-then-write transaction never fails to upgrade its lock half-way.
    pub async fn begin(&self) -> Result<Transaction<'static, Any>, sqlx::Error> {
        self.primary.writes.inc();
        match self.dialect {
            Dialect::Sqlite => self.primary.pool.begin_with("BEGIN IMMEDIATE").await,
            _ => self.primary.pool.begin().await,
        }
    }

    pub async fn migrate(&self) -> anyhow::Result<()> {
        let migrator = Migrator::new(EmbeddedMigrations(self.dialect)).await?;
        migrator.run(&self.primary.pool).await?;
        Ok(())
    }

    /// Is the primary answering? Used by `/ready`.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        self.primary.pool.execute("SELECT 1").await.map(|_| ())
    }

    /// Checks every replica forever; an unhealthy one gets no reads until it answers again.
    pub async fn watch_replicas(self: Arc<Self>, every: Duration) {
        if self.replicas.is_empty() {
            return;
        }
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            for replica in &self.replicas {
                let ok = matches!(
                    tokio::time::timeout(Duration::from_secs(2), replica.pool.execute("SELECT 1")).await,
                    Ok(Ok(_))
                );
                let was = replica.healthy.swap(ok, Ordering::Relaxed);
                if was != ok {
                    tracing::warn!(replica = %replica.name, healthy = ok, "replica health changed");
                }
            }
        }
    }

    /// Copies pool occupancy and bounds into the `db_pool_connections` gauge.
    pub fn observe_pools(&self) {
        for p in std::iter::once(&self.primary).chain(&self.replicas) {
            let size = p.pool.size() as i64;
            let idle = p.pool.num_idle() as i64;
            let g = &self.metrics.db_pool;
            g.with_label_values(&[&p.name, "idle"]).set(idle);
            g.with_label_values(&[&p.name, "in_use"]).set(size - idle);
            g.with_label_values(&[&p.name, "max"]).set(p.size.max as i64);
            g.with_label_values(&[&p.name, "min"]).set(p.size.min as i64);
            for (setting, value) in p.timeouts {
                self.metrics
                    .db_pool_timeouts
                    .with_label_values(&[&p.name, setting])
                    .set(value.as_secs_f64());
            }
        }
    }

    pub async fn close(&self) {
        for p in std::iter::once(&self.primary).chain(&self.replicas) {
            p.pool.close().await;
        }
    }
}

fn server_pool(args: &DbArgs, url: &str, size: PoolSize) -> anyhow::Result<AnyPool> {
    let options: AnyConnectOptions = url.parse().map_err(|e| anyhow::anyhow!("database URL: {e}"))?;
    Ok(pool_options(args, size).connect_lazy_with(options))
}

async fn sqlite_pool(args: &DbArgs, url: &str, size: PoolSize, read_only: bool) -> anyhow::Result<AnyPool> {
    let options: AnyConnectOptions = url.parse().map_err(|e| anyhow::anyhow!("database URL: {e}"))?;
    let pool = pool_options(args, size)
        .after_connect(move |conn, _| {
            Box::pin(async move {
                // WAL lets readers run beside the writer; NORMAL sync is durable across process
                // crashes and only risks the last commits on power loss, the usual WAL trade.
                conn.execute("PRAGMA journal_mode = WAL").await?;
                conn.execute("PRAGMA busy_timeout = 5000").await?;
                conn.execute("PRAGMA synchronous = NORMAL").await?;
                conn.execute("PRAGMA foreign_keys = ON").await?;
                if read_only {
                    conn.execute("PRAGMA query_only = ON").await?;
                }
                Ok(())
            })
        })
        .connect_with(options)
        .await?;
    Ok(pool)
}

/// A connection that sat in the pool at least this long is pinged before use.
const PING_IDLE_AFTER: Duration = Duration::from_secs(1);

fn pool_options(args: &DbArgs, size: PoolSize) -> AnyPoolOptions {
    AnyPoolOptions::new()
        // sqlx pings every connection as it goes back into the pool; by default it pings again on
        // the way out, a second round trip per request. Only a connection that has sat idle, where
        // a restarted server or a dropped socket would show, is checked again.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_IDLE_AFTER {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
        .max_connections(size.max)
        .min_connections(size.min)
        .acquire_timeout(Duration::from_millis(args.db_acquire_timeout_ms))
        .idle_timeout(Some(Duration::from_secs(args.db_idle_timeout_secs)))
        .max_lifetime(Some(Duration::from_secs(args.db_max_lifetime_secs)))
}

/// Deadlocks, serialization failures and SQLite's busy errors: the transaction may be retried.
pub fn is_retryable(err: &dyn sqlx::error::DatabaseError) -> bool {
    matches!(
        err.code().as_deref(),
        Some("40001" | "40P01" | "5" | "6" | "261" | "517")
    )
}

pub fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.kind() == sqlx::error::ErrorKind::UniqueViolation)
}

/// Migrations compiled into the binary, one directory per dialect.
#[derive(Debug)]
struct EmbeddedMigrations(Dialect);

const MIGRATIONS: &[(i64, &str, [&str; 3])] = &[
    (
        1,
        "schema",
        [
            include_str!("../migrations/sqlite/0001_schema.sql"),
            include_str!("../migrations/postgres/0001_schema.sql"),
            include_str!("../migrations/mysql/0001_schema.sql"),
        ],
    ),
    (
        2,
        "idempotency expiry",
        [
            include_str!("../migrations/sqlite/0002_idempotency_expiry.sql"),
            include_str!("../migrations/postgres/0002_idempotency_expiry.sql"),
            include_str!("../migrations/mysql/0002_idempotency_expiry.sql"),
        ],
    ),
];

impl<'s> MigrationSource<'s> for EmbeddedMigrations {
    fn resolve(self) -> BoxFuture<'s, Result<Vec<Migration>, sqlx::error::BoxDynError>> {
        let index = match self.0 {
            Dialect::Sqlite => 0,
            Dialect::Postgres => 1,
            Dialect::MySql => 2,
        };
        let migrations = MIGRATIONS
            .iter()
            .map(|(version, description, sql)| {
                Migration::new(
                    *version,
                    Cow::Borrowed(*description),
                    MigrationType::Simple,
                    Cow::Borrowed(sql[index]),
                    false,
                )
            })
            .collect();
        Box::pin(async move { Ok(migrations) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_placeholders_for_postgres_only() {
        let q = "SELECT a FROM t WHERE x = ? AND y > ? LIMIT ?";
        assert_eq!(
            Dialect::Postgres.sql(q),
            "SELECT a FROM t WHERE x = $1 AND y > $2 LIMIT $3"
        );
        assert_eq!(Dialect::MySql.sql(q), q);
        assert_eq!(Dialect::Sqlite.sql(q), q);
    }

    #[test]
    fn dialect_from_url() {
        assert_eq!(Dialect::from_url("postgres://u@h/db").unwrap(), Dialect::Postgres);
        assert_eq!(Dialect::from_url("mysql://root@h/db").unwrap(), Dialect::MySql);
        assert_eq!(Dialect::from_url("sqlite:///tmp/x.db").unwrap(), Dialect::Sqlite);
        let err = Dialect::from_url("oracle://x").unwrap_err().to_string();
        assert!(err.contains("MALL_DATABASE_URL"), "{err}");
    }
}
