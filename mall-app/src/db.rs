//! Database access: the primary and replica pools, read/write split, SQL dialects, migrations.
//!
//! All queries are written once with `?` placeholders and rewritten for PostgreSQL's `$n`.
//! Reads go round-robin over healthy replicas and fall back to the primary; reads that must see
//! the caller's own write use [`Db::read_primary`]. With the embedded SQLite default the
//! "primary" is a single-connection writer (SQLite allows one writer at a time, so queueing in
//! our pool beats spinning on the file lock) and the one "replica" is a read-only reader pool.
//!
//! Every use of a pool holds one of its pool's permits ([`Allowance`]): the pool itself is built
//! at its ceiling (from the CPU), and the permits are the connections this pod may have open
//! now, its share of the database's connection budget. The operator changes the share (it is
//! the budget divided by `maxReplicas`) through a mounted file, not the pod's environment, so
//! raising `maxReplicas` resizes the pools of running pods instead of restarting them.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use prometheus::IntCounter;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::{Any, AnyConnection, AnyPool, ConnectOptions, Connection, Executor, Transaction};
use tokio::sync::Semaphore;

use crate::cache::Key;
use crate::config::DbArgs;
use crate::fences::{Fences, CHECK_EVERY};
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

/// How many connections a pool may have open, changeable at run time. The pool is a set of
/// slots, each a sqlx pool of one connection (so sqlx's health checks, idle timeout and lifetime
/// still apply, and a slot's connection is counted until sqlx has really closed it); a user
/// takes a free slot for as long as it runs statements. Growing adds slots; shrinking retires
/// slots as they come back (and free ones at once), closing their connections. A retired
/// slot is never replaced, so the connections open never exceed the larger of the old and the
/// new allowance, and reach the new one as the slots in use come back.
///
/// One sqlx pool of the full size with a semaphore in front would not do: sqlx returns a
/// connection to its pool in a background task, so the next user, holding the freed permit,
/// finds no idle connection and opens another (seen: 12 open with 8 permits).
/// The PostgreSQL `application_name` of the bootstrap lock's connection, the one connection a
/// pod opens outside its allowance (for the moments migrations and seeding take at start).
pub const BOOTSTRAP_CONNECTION: &str = "mall-bootstrap";

pub struct Allowance {
    free_slots: Semaphore,
    free: std::sync::Mutex<Vec<AnyPool>>,
    /// Slots in existence: free plus in use.
    live: AtomicUsize,
    /// Retired slots whose connection is still being closed: they count against the allowance
    /// until it is (otherwise a slot added meanwhile opens one more than allowed).
    retiring: Arc<AtomicUsize>,
    target: AtomicUsize,
    make_slot: Box<dyn Fn() -> AnyPool + Send + Sync>,
}

impl Allowance {
    fn new(n: u32, make_slot: Box<dyn Fn() -> AnyPool + Send + Sync>) -> Allowance {
        let free: Vec<AnyPool> = (0..n).map(|_| make_slot()).collect();
        Allowance {
            free_slots: Semaphore::new(free.len()),
            free: std::sync::Mutex::new(free),
            live: AtomicUsize::new(n as usize),
            retiring: Arc::new(AtomicUsize::new(0)),
            target: AtomicUsize::new(n as usize),
            make_slot,
        }
    }

    /// The allowance asked for (what the pool converges to).
    pub fn target(&self) -> u32 {
        self.target.load(Ordering::Relaxed) as u32
    }

    /// Slots in existence now, counting retired ones still closing: at most this many
    /// connections are open.
    pub fn live(&self) -> u32 {
        (self.live.load(Ordering::Relaxed) + self.retiring.load(Ordering::Relaxed)) as u32
    }

    /// Slots not in use.
    fn free(&self) -> usize {
        self.free.lock().expect("slots lock").len()
    }

    /// Connections open in free slots.
    fn idle_connections(&self) -> u32 {
        self.free.lock().expect("slots lock").iter().map(AnyPool::size).sum()
    }

    fn set(&self, n: u32) {
        self.target.store(n.max(1) as usize, Ordering::Relaxed);
        self.converge();
    }

    /// Adds slots while the allowance has room (slots still closing take room), or retires free
    /// ones. Called again when a retirement finishes.
    fn converge(&self) {
        let target = self.target.load(Ordering::Relaxed);
        while self.live.load(Ordering::Relaxed) + self.retiring.load(Ordering::Relaxed) < target {
            self.live.fetch_add(1, Ordering::Relaxed);
            self.free.lock().expect("slots lock").push((self.make_slot)());
            self.free_slots.add_permits(1);
        }
        while self.live.load(Ordering::Relaxed) > target {
            let Ok(permit) = self.free_slots.try_acquire() else {
                break;
            };
            let slot = self.take_free_slot(permit);
            self.live.fetch_sub(1, Ordering::Relaxed);
            self.retire(slot);
        }
    }

    /// The free slot a permit stands for (one permit per free slot, so there is one).
    fn take_free_slot(&self, permit: tokio::sync::SemaphorePermit<'_>) -> AnyPool {
        permit.forget();
        self.free
            .lock()
            .expect("slots lock")
            .pop()
            .expect("a permit per free slot")
    }

    async fn lease(&self, timeout: Duration) -> Result<Lease<'_>, sqlx::Error> {
        match tokio::time::timeout(timeout, self.free_slots.acquire()).await {
            Ok(Ok(permit)) => Ok(Lease {
                allowance: self,
                slot: Some(self.take_free_slot(permit)),
            }),
            Ok(Err(_)) => Err(sqlx::Error::PoolClosed),
            Err(_) => Err(sqlx::Error::PoolTimedOut),
        }
    }

    fn give_back(&self, slot: AnyPool) {
        let mut live = self.live.load(Ordering::Relaxed);
        while live > self.target.load(Ordering::Relaxed) {
            match self
                .live
                .compare_exchange(live, live - 1, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return self.retire(slot),
                Err(now) => live = now,
            }
        }
        self.free.lock().expect("slots lock").push(slot);
        self.free_slots.add_permits(1);
    }

    /// Closes a slot's pool (waits for its connection to come back, then closes it), counted
    /// in `retiring` until closed. Slots wanted meanwhile are added by the allowance's next
    /// convergence (the file watcher's tick), not here: the task cannot borrow the allowance.
    fn retire(&self, slot: AnyPool) {
        let retiring = self.retiring.clone();
        retiring.fetch_add(1, Ordering::Relaxed);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    slot.close().await;
                    retiring.fetch_sub(1, Ordering::Relaxed);
                });
            }
            Err(_) => {
                drop(slot);
                retiring.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    async fn close(&self) {
        self.free_slots.close();
        let slots: Vec<AnyPool> = std::mem::take(&mut *self.free.lock().expect("slots lock"));
        for slot in slots {
            slot.close().await;
        }
    }
}

/// A pool to run statements on (a slot), held until dropped.
pub struct Lease<'a> {
    allowance: &'a Allowance,
    slot: Option<AnyPool>,
}

impl std::ops::Deref for Lease<'_> {
    type Target = AnyPool;
    fn deref(&self) -> &AnyPool {
        self.slot.as_ref().expect("a lease holds its slot until dropped")
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.allowance.give_back(slot);
        }
    }
}

/// A transaction on the primary, holding its slot until it ends. Derefs to its connection, as
/// sqlx's `Transaction` does, so statements run on `&mut *tx`.
pub struct Tx<'a> {
    // Declared first: dropped (rolled back, its connection on its way back) before the slot is.
    tx: Transaction<'static, Any>,
    _lease: Lease<'a>,
    db: &'a Db,
    /// The invalidation records this transaction inserted: fenced once it commits.
    records: Vec<(i64, Vec<Key>)>,
}

impl Tx<'_> {
    /// Commits; then the records it inserted fence their keys on the replicas (this instance's
    /// next read of them must not come from a replica that has not replayed this write) and
    /// count as this instance's latest write (`Mall-Seq`).
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        let Tx {
            tx,
            _lease,
            db,
            records,
        } = self;
        tx.commit().await?;
        let now = Instant::now();
        for (seq, keys) in &records {
            db.fences.fence(*seq, keys, now);
            db.last_write_seq.fetch_max(*seq, Ordering::AcqRel);
        }
        Ok(())
    }

    /// Notes an invalidation record inserted in this transaction.
    pub fn recorded(&mut self, seq: i64, keys: &[Key]) {
        self.records.push((seq, keys.to_vec()));
    }
}

impl std::ops::Deref for Tx<'_> {
    type Target = AnyConnection;
    fn deref(&self) -> &AnyConnection {
        &self.tx
    }
}

impl std::ops::DerefMut for Tx<'_> {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        &mut self.tx
    }
}

/// One pool and what we track about it.
pub struct PoolHandle {
    pub name: String,
    size: PoolSize,
    pub allowance: Allowance,
    acquire_timeout: Duration,
    timeouts: [(&'static str, Duration); 3],
    healthy: AtomicBool,
    /// Lagging no more than the bound (see `Db::watch_fences`).
    in_rotation: AtomicBool,
    reads: IntCounter,
    writes: IntCounter,
}

impl PoolHandle {
    async fn lease(&self) -> Result<Lease<'_>, sqlx::Error> {
        self.allowance.lease(self.acquire_timeout).await
    }
}

/// What `/ready` says of a replica.
#[derive(Debug, Clone)]
pub struct ReplicaState {
    pub name: String,
    pub healthy: bool,
    pub lag: Duration,
    pub in_rotation: bool,
}

/// `MALL_DB_ALLOWANCE_FILE`'s content, written by the operator.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowanceFile {
    primary: Option<u32>,
    replicas: Option<u32>,
}

pub struct Db {
    pub dialect: Dialect,
    primary_url: String,
    primary: PoolHandle,
    replicas: Vec<PoolHandle>,
    next_replica: AtomicUsize,
    metrics: Arc<Metrics>,
    /// The primary's allowance as asked (0: none asked), and whether one connection of it is
    /// the invalidation follower's `LISTEN` (held outside the pool, so the pool gets one less).
    primary_asked: AtomicU32,
    listener: AtomicBool,
    /// What each replica has replayed of the writes this instance knows of (see `fences.rs`).
    pub fences: Fences,
    /// A replica whose oldest unreplayed write is older than this takes no reads.
    max_lag: Duration,
    /// The highest invalidation record this instance's own writes committed.
    last_write_seq: AtomicI64,
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
        let acquire_timeout = Duration::from_millis(args.db_acquire_timeout_ms);
        let handle = |name: &str, size: PoolSize, make_slot: Box<dyn Fn() -> AnyPool + Send + Sync>| PoolHandle {
            name: name.to_string(),
            size,
            allowance: Allowance::new(size.max, make_slot),
            acquire_timeout,
            timeouts: [
                ("acquire", acquire_timeout),
                ("idle", Duration::from_secs(args.db_idle_timeout_secs)),
                ("max_lifetime", Duration::from_secs(args.db_max_lifetime_secs)),
            ],
            healthy: AtomicBool::new(true),
            in_rotation: AtomicBool::new(true),
            reads: metrics.db_operations.with_label_values(&[name, "read"]),
            writes: metrics.db_operations.with_label_values(&[name, "write"]),
        };

        let (primary, replicas) = if dialect == Dialect::Sqlite {
            let writer = PoolSize { max: 1, min: 1 };
            let reader = tuning.replica_pool;
            let primary = handle("primary", writer, slots(args, &primary_url, writer, Some(false))?);
            let readers = slots(args, &primary_url, reader, Some(true))?;
            (primary, vec![handle("sqlite-reader", reader, readers)])
        } else {
            let primary = handle(
                "primary",
                tuning.primary_pool,
                slots(args, &primary_url, tuning.primary_pool, None)?,
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
                    tuning.replica_pool,
                    slots(args, url, tuning.replica_pool, None)?,
                ));
            }
            (primary, replicas)
        };
        if dialect == Dialect::Sqlite {
            // Create the file and switch it to WAL before readers open it read-only.
            primary.lease().await?.execute("SELECT 1").await?;
        }
        // SQLite's "replica" is a reader of the same file: it sees every commit at once.
        let fences = Fences::new(if dialect == Dialect::Sqlite { 0 } else { replicas.len() });
        Ok(Db {
            dialect,
            primary_url: primary_url.clone(),
            primary,
            fences,
            max_lag: Duration::from_millis(args.db_replica_max_lag_ms),
            last_write_seq: AtomicI64::new(0),
            replicas,
            next_replica: AtomicUsize::new(0),
            primary_asked: AtomicU32::new(0),
            listener: AtomicBool::new(false),
            metrics,
        })
    }

    pub fn sql<'a>(&self, query: &'a str) -> Cow<'a, str> {
        self.dialect.sql(query)
    }

    /// A pool for a read that may come from a replica (a list page): a replica in rotation that
    /// has replayed every write this instance knows of, else the primary.
    pub async fn read(&self) -> Result<Lease<'_>, sqlx::Error> {
        self.read_fenced(None).await
    }

    /// A pool for a read of one cached object: a replica in rotation that has replayed the
    /// object's last write this instance knows of, else the primary.
    pub async fn read_key(&self, key: &Key) -> Result<Lease<'_>, sqlx::Error> {
        self.read_fenced(Some(key)).await
    }

    async fn read_fenced(&self, key: Option<&Key>) -> Result<Lease<'_>, sqlx::Error> {
        let n = self.replicas.len();
        if n > 0 {
            let start = self.next_replica.fetch_add(1, Ordering::Relaxed);
            let mut fenced = false;
            for i in 0..n {
                let at = (start + i) % n;
                let replica = &self.replicas[at];
                if !replica.healthy.load(Ordering::Relaxed) || !replica.in_rotation.load(Ordering::Relaxed) {
                    continue;
                }
                if !self.fences.readable(at, key) {
                    fenced = true;
                    continue;
                }
                replica.reads.inc();
                return replica.lease().await;
            }
            if fenced {
                self.metrics.reads_fenced.inc();
            }
        }
        self.read_primary().await
    }

    /// The highest invalidation record this instance's own writes committed (0: none yet).
    pub fn last_write_seq(&self) -> i64 {
        self.last_write_seq.load(Ordering::Acquire)
    }

    /// Each replica: its name, whether it answers, its lag, and whether it takes reads.
    pub fn replica_states(&self) -> Vec<ReplicaState> {
        if self.dialect == Dialect::Sqlite {
            return Vec::new();
        }
        let now = Instant::now();
        self.replicas
            .iter()
            .enumerate()
            .map(|(i, r)| ReplicaState {
                name: r.name.clone(),
                healthy: r.healthy.load(Ordering::Relaxed),
                lag: self.fences.lag(i, now),
                in_rotation: r.healthy.load(Ordering::Relaxed) && r.in_rotation.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Asks the replicas which fenced records they hold, forever (see `fences.rs`); keeps each
    /// replica's lag and its place in the read rotation up to date.
    pub async fn watch_fences(self: Arc<Self>) {
        if !self.fences.enabled() {
            return;
        }
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut primary_checked = Instant::now();
        loop {
            tick.tick().await;
            for (i, replica) in self.replicas.iter().enumerate() {
                let waiting = self.fences.waiting_on(i);
                if !waiting.is_empty() && replica.healthy.load(Ordering::Relaxed) {
                    if let Ok(Ok(held)) =
                        tokio::time::timeout(Duration::from_secs(1), self.records_on(replica, &waiting)).await
                    {
                        self.fences.held(i, &held);
                    }
                }
                let lag = self.fences.lag(i, Instant::now());
                let within = lag <= self.max_lag;
                if replica.in_rotation.swap(within, Ordering::Relaxed) != within {
                    tracing::warn!(
                        replica = %replica.name,
                        lag_ms = lag.as_millis() as u64,
                        max_lag_ms = self.max_lag.as_millis() as u64,
                        in_rotation = within,
                        "replica {} the read rotation",
                        if within { "rejoins" } else { "leaves" }
                    );
                }
                self.metrics
                    .replica_lag
                    .with_label_values(&[&replica.name])
                    .set(lag.as_secs_f64());
                self.metrics
                    .replica_in_rotation
                    .with_label_values(&[&replica.name])
                    .set((within && replica.healthy.load(Ordering::Relaxed)) as i64);
            }
            // Fences a replica has not lifted for a long while: is the record still there at all?
            if primary_checked.elapsed() >= Duration::from_secs(1) {
                primary_checked = Instant::now();
                let old = self.fences.older_than(Duration::from_secs(10), primary_checked);
                if !old.is_empty() {
                    if let Ok(Ok(held)) =
                        tokio::time::timeout(Duration::from_secs(1), self.records_on(&self.primary, &old)).await
                    {
                        let gone: Vec<i64> = old.into_iter().filter(|s| !held.contains(s)).collect();
                        self.fences.forget(&gone);
                    }
                }
            }
        }
    }

    /// Which of `seqs` the pool's server holds.
    async fn records_on(&self, pool: &PoolHandle, seqs: &[i64]) -> Result<Vec<i64>, sqlx::Error> {
        let marks = vec!["?"; seqs.len()].join(", ");
        let sql = format!("SELECT seq FROM cache_invalidations WHERE seq IN ({marks})");
        let sql = self.sql(&sql);
        let mut query = sqlx::query(&sql);
        for seq in seqs {
            query = query.bind(*seq);
        }
        let lease = pool.lease().await?;
        self.metrics.fence_checks.with_label_values(&[&pool.name]).inc();
        let rows = query.fetch_all(&*lease).await?;
        rows.iter().map(|r| sqlx::Row::try_get::<i64, _>(r, "seq")).collect()
    }

    /// A pool for a read that must see this caller's own committed writes.
    pub async fn read_primary(&self) -> Result<Lease<'_>, sqlx::Error> {
        self.primary.reads.inc();
        self.primary.lease().await
    }

    /// A pool for a read of what is committed now, off the writer where it can be: SQLite's
    /// readers (WAL), else the primary.
    pub async fn read_latest(&self) -> Result<Lease<'_>, sqlx::Error> {
        match (self.dialect, self.replicas.first()) {
            (Dialect::Sqlite, Some(reader)) => {
                reader.reads.inc();
                reader.lease().await
            }
            _ => self.read_primary().await,
        }
    }

    pub fn primary_url(&self) -> &str {
        &self.primary_url
    }

    pub async fn write(&self) -> Result<Lease<'_>, sqlx::Error> {
        self.primary.writes.inc();
        self.primary.lease().await
    }

    /// Starts a write transaction. SQLite takes the write lock up front (`BEGIN IMMEDIATE`) so a
    /// read-then-write transaction never fails to upgrade its lock half-way.
    pub async fn begin(&self) -> Result<Tx<'_>, sqlx::Error> {
        self.primary.writes.inc();
        let lease = self.primary.lease().await?;
        let tx = match self.dialect {
            Dialect::Sqlite => lease.begin_with("BEGIN IMMEDIATE").await?,
            _ => lease.begin().await?,
        };
        Ok(Tx {
            tx,
            _lease: lease,
            db: self,
            records: Vec::new(),
        })
    }

    /// Sets how many connections each pool may hold open (`None` leaves a pool as it is); each
    /// pool's ceiling (its size from the CPU) still applies. The embedded SQLite's pools are
    /// local files with no connection budget and keep their sizes.
    pub fn set_allowance(&self, primary: Option<u32>, replicas: Option<u32>) {
        if self.dialect == Dialect::Sqlite {
            return;
        }
        if let Some(n) = primary {
            self.primary_asked.store(n, Ordering::Relaxed);
            let n = n
                .saturating_sub(u32::from(self.listener.load(Ordering::Relaxed)))
                .max(1);
            let n = n.min(self.primary.size.max);
            if n != self.primary.allowance.target() {
                tracing::info!(pool = %self.primary.name, from = self.primary.allowance.target(), to = n, "database connection allowance changed");
            }
            self.primary.allowance.set(n);
        }
        if let Some(n) = replicas {
            for r in &self.replicas {
                let n = n.min(r.size.max);
                if n != r.allowance.target() {
                    tracing::info!(pool = %r.name, from = r.allowance.target(), to = n, "database connection allowance changed");
                }
                r.allowance.set(n);
            }
        }
    }

    /// Reads the allowance file (`MALL_DB_ALLOWANCE_FILE`) and applies it; an unreadable or
    /// malformed file is logged and changes nothing (the pools keep their last allowance).
    pub fn load_allowance(&self, path: &std::path::Path) -> Result<(), String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let a: AllowanceFile = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if a.primary == Some(0) || a.replicas == Some(0) {
            return Err(format!("{}: an allowance must be at least 1", path.display()));
        }
        self.set_allowance(a.primary, a.replicas);
        Ok(())
    }

    /// Follows the allowance file: reads it every `every`, applies a change, and keeps the pools
    /// at their allowances (free slots above one retired at once, busy ones as they return).
    pub async fn follow_allowance(self: Arc<Self>, path: std::path::PathBuf, every: Duration) {
        let mut last = None;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut since_read = Duration::MAX;
        loop {
            tick.tick().await;
            since_read = since_read.saturating_add(Duration::from_millis(100));
            if since_read >= every {
                since_read = Duration::ZERO;
                // Kubernetes swaps a ConfigMap volume's files atomically (a symlink flip).
                let text = std::fs::read_to_string(&path).ok();
                if text.is_some() && text != last {
                    if let Err(e) = self.load_allowance(&path) {
                        tracing::warn!(error = %e, "database connection allowance unchanged");
                    }
                    last = text;
                }
            }
            // Free slots above the allowance are retired as soon as they are free.
            self.enforce_allowances();
        }
    }

    /// The pools' allowances: (name, allowance, slots in existence).
    /// Each pool's allowance and the connections it may hold now; the primary's include the
    /// follower's listener.
    pub fn allowances(&self) -> Vec<(String, u32, u32)> {
        let listener = u32::from(self.listener.load(Ordering::Relaxed));
        std::iter::once((&self.primary, listener))
            .chain(self.replicas.iter().map(|r| (r, 0)))
            .map(|(p, extra)| (p.name.clone(), p.allowance.target() + extra, p.allowance.live() + extra))
            .collect()
    }

    /// Takes one connection of the primary's allowance for the invalidation follower's
    /// `LISTEN` (PostgreSQL). False when the allowance is a single connection: then the follower
    /// polls through the pool instead.
    pub fn reserve_listener(&self) -> bool {
        if self.dialect != Dialect::Postgres {
            return false;
        }
        let asked = self.primary_asked.load(Ordering::Relaxed);
        if asked == 1 {
            return false;
        }
        self.listener.store(true, Ordering::Relaxed);
        if asked > 1 {
            self.set_allowance(Some(asked), None);
        }
        true
    }

    /// Retires free slots above each pool's allowance (the ones in use retire as they return).
    pub fn enforce_allowances(&self) {
        for p in std::iter::once(&self.primary).chain(&self.replicas) {
            p.allowance.converge();
        }
    }

    /// Runs `f` holding a lock on the whole database, so pods starting together migrate, seed
    /// and create the admin one at a time: a PostgreSQL session advisory lock, MySQL's
    /// `GET_LOCK`; SQLite has one writer at a time anyway (and one pod).
    pub async fn with_bootstrap_lock<F, Fut>(&self, f: F) -> anyhow::Result<()>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        const KEY: i64 = 0x6d61_6c6c_626f_6f74; // "mallboot"
        let (lock, unlock) = match self.dialect {
            Dialect::Sqlite => return f().await,
            Dialect::Postgres => (
                format!("SELECT pg_advisory_lock({KEY})"),
                format!("SELECT pg_advisory_unlock({KEY})"),
            ),
            Dialect::MySql => (
                "SELECT GET_LOCK('mall-bootstrap', 300)".to_string(),
                "SELECT RELEASE_LOCK('mall-bootstrap')".to_string(),
            ),
        };
        // A session lock: taken and released on one connection, held apart from the pool's
        // allowance so the work inside can use the pool.
        // Named, so whoever counts the pod's connections on the server can tell it apart.
        let url = match self.dialect {
            Dialect::Postgres => {
                let sep = if self.primary_url.contains('?') { '&' } else { '?' };
                format!("{}{sep}application_name={BOOTSTRAP_CONNECTION}", self.primary_url)
            }
            _ => self.primary_url.clone(),
        };
        let options: AnyConnectOptions = url.parse()?;
        let mut conn = sqlx::AnyConnection::connect_with(&options).await?;
        conn.execute(lock.as_str()).await?;
        let result = f().await;
        let _ = conn.execute(unlock.as_str()).await;
        let _ = conn.close().await;
        result
    }

    pub async fn migrate(&self) -> anyhow::Result<()> {
        let migrator = Migrator::new(EmbeddedMigrations(self.dialect)).await?;
        migrator.run(&*self.primary.lease().await?).await?;
        Ok(())
    }

    /// Is the primary answering? Used by `/ready`.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        self.primary.lease().await?.execute("SELECT 1").await.map(|_| ())
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
                let ping = async { replica.lease().await?.execute("SELECT 1").await };
                let ok = matches!(tokio::time::timeout(Duration::from_secs(2), ping).await, Ok(Ok(_)));
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
            let in_use = p.allowance.live() as i64 - p.allowance.free() as i64;
            let idle = p.allowance.idle_connections() as i64;
            let g = &self.metrics.db_pool;
            g.with_label_values(&[&p.name, "idle"]).set(idle);
            g.with_label_values(&[&p.name, "in_use"]).set(in_use);
            // The allowance in force (the configured size, or the operator's share of the budget).
            g.with_label_values(&[&p.name, "max"]).set(p.allowance.target() as i64);
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
            p.allowance.close().await;
        }
    }
}

/// Makes the slots of a pool: sqlx pools of one connection, connected on first use. The first
/// `size.min` slots keep their connection open while idle (the warm minimum). `sqlite` is
/// whether the slot is a SQLite reader (`Some(true)`), writer (`Some(false)`), or a server
/// pool (`None`).
fn slots(
    args: &DbArgs,
    url: &str,
    size: PoolSize,
    sqlite: Option<bool>,
) -> anyhow::Result<Box<dyn Fn() -> AnyPool + Send + Sync>> {
    let options: AnyConnectOptions = url.parse().map_err(|e| anyhow::anyhow!("database URL: {e}"))?;
    // Every statement as a DEBUG event for telemetry.rs (which times it, logs it when slow and
    // makes it a span); sqlx's own slow-statement WARN never fires (the threshold is ours).
    let options = options
        .log_statements(log::LevelFilter::Debug)
        .log_slow_statements(log::LevelFilter::Debug, Duration::from_secs(365 * 24 * 3600));
    let args = args.clone();
    let made = AtomicUsize::new(0);
    Ok(Box::new(move || {
        let warm = made.fetch_add(1, Ordering::Relaxed) < size.min as usize;
        let slot = PoolSize {
            max: 1,
            min: u32::from(warm),
        };
        let mut opts = pool_options(&args, slot);
        if let Some(read_only) = sqlite {
            opts = opts.after_connect(move |conn, _| {
                Box::pin(async move {
                    // WAL lets readers run beside the writer; NORMAL sync is durable across
                    // process crashes and only risks the last commits on power loss.
                    conn.execute("PRAGMA journal_mode = WAL").await?;
                    conn.execute("PRAGMA busy_timeout = 5000").await?;
                    conn.execute("PRAGMA synchronous = NORMAL").await?;
                    conn.execute("PRAGMA foreign_keys = ON").await?;
                    if read_only {
                        conn.execute("PRAGMA query_only = ON").await?;
                    }
                    Ok(())
                })
            });
        }
        opts.connect_lazy_with(options.clone())
    }))
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
    (
        3,
        "cache invalidations",
        [
            include_str!("../migrations/sqlite/0003_cache_invalidations.sql"),
            include_str!("../migrations/postgres/0003_cache_invalidations.sql"),
            include_str!("../migrations/mysql/0003_cache_invalidations.sql"),
        ],
    ),
    (
        4,
        "idempotency keys compared exactly",
        [
            include_str!("../migrations/sqlite/0004_idempotency_key_exact.sql"),
            include_str!("../migrations/postgres/0004_idempotency_key_exact.sql"),
            include_str!("../migrations/mysql/0004_idempotency_key_exact.sql"),
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

#[cfg(test)]
mod allowance_tests {
    use super::*;

    /// A slot whose pool holds a connection that takes a while to close: one in use when the
    /// allowance shrinks, so its retirement waits for it to come back.
    fn allowance(n: u32) -> Allowance {
        sqlx::any::install_default_drivers();
        Allowance::new(
            n,
            Box::new(|| {
                sqlx::pool::PoolOptions::<Any>::new()
                    .max_connections(1)
                    .connect_lazy("sqlite::memory:")
                    .expect("lazy pool")
            }),
        )
    }

    #[tokio::test]
    async fn a_slot_still_closing_keeps_its_place_in_the_allowance() {
        let a = allowance(4);
        // A slot in use, with its connection open, when the allowance shrinks to 2 and at once
        // grows back to 4: the slot retires as it comes back, and until its connection is
        // closed no slot may replace it.
        let lease = a.lease(Duration::from_secs(1)).await.unwrap();
        let conn = lease.acquire().await.unwrap();
        a.set(2);
        drop(conn);
        drop(lease);
        a.set(4);
        assert!(a.live() <= 4, "{} slots with an allowance of 4", a.live());
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while a.live() != 4 || a.retiring.load(Ordering::Relaxed) != 0 {
            assert!(std::time::Instant::now() < until, "never converged: {} live", a.live());
            tokio::time::sleep(Duration::from_millis(10)).await;
            a.converge();
        }
        assert_eq!(a.free(), 4);
    }
}
