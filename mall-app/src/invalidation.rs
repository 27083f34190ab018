//! Invalidation that travels with the data.
//!
//! A write that changes cached objects inserts an invalidation record (the keys, and a sequence
//! number the database assigns) in its own transaction: the record exists exactly when the write
//! does. Every instance follows the records by sequence and evicts the keys from L1, from L2
//! (Redis, where configured) and from its pod's sidecar (`MALL_SIDECAR_PURGE_URL`) before it
//! serves them again:
//!
//! - PostgreSQL: `LISTEN mall_cache`; the record's insert notifies in the same transaction, so the
//!   notification is delivered at commit. A catch-up query by sequence runs after any gap (a lost
//!   connection) and once a second besides.
//! - SQLite and MySQL: a poll, one indexed query every `MALL_INVALIDATION_POLL_MS` (50 ms).
//!
//! Redis pub/sub stays as the fast path; it is no longer the only one. A database assigns a
//! sequence number at insert, not at commit, so a record can appear after a higher one (two
//! writers committing out of order; MySQL and PostgreSQL): [`Progress`] keeps reading from the
//! lowest hole for [`HOLE_PATIENCE`] before it takes the hole for a rolled-back insert.
//!
//! While the follower cannot reach the records for longer than its allowed lag, the cache is
//! not trusted (reads go to the database); when it catches up after longer than that, L1 is
//! dropped whole. Records older than `MALL_INVALIDATION_RETAIN_SECS` are pruned, and a new
//! instance starts from the current sequence (less the last [`HOLE_PATIENCE`]).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::Row;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufStream};

use crate::cache::{Cache, Key};
use crate::db::{Db, Dialect, Tx};
use crate::ids::now_ms;
use crate::metrics::Metrics;

/// The PostgreSQL notification channel (per database, so malls on other databases never hear it).
pub const CHANNEL: &str = "mall_cache";

/// How long a missing sequence number below ones already seen is waited for: longer than any
/// write transaction stays open between its insert and its commit.
pub const HOLE_PATIENCE: Duration = Duration::from_secs(5);

/// Records read per query at most (the rest in the next).
const PAGE: i64 = 1000;

/// The longest record text: it fits PostgreSQL's notification payload (8000 bytes with the
/// sequence number) and the columns (`VARCHAR(7900)` on MySQL).
const MAX_RECORD: usize = 7900 - 24;

pub fn encode_keys(keys: &[Key]) -> String {
    keys.iter().map(Key::encode).collect::<Vec<_>>().join(" ")
}

pub fn decode_keys(text: &str) -> Vec<Key> {
    text.split_whitespace().filter_map(Key::parse).collect()
}

/// Inserts the records for `keys` in the write's transaction `tx` (on PostgreSQL, with their
/// notifications, delivered when `tx` commits): one record per [`MAX_RECORD`] bytes of keys.
/// `tx` notes each record's sequence number, to fence its keys once it commits (`fences.rs`).
pub async fn record(db: &Db, tx: &mut Tx<'_>, keys: &[Key]) -> Result<(), sqlx::Error> {
    let now = now_ms() as i64;
    for text in chunks(keys) {
        let seq = if db.dialect == Dialect::Postgres {
            let sql = format!(
                "WITH r AS (INSERT INTO cache_invalidations (cache_keys, created_at) VALUES ($1, $2) RETURNING seq) \
                 SELECT r.seq AS seq, pg_notify('{CHANNEL}', r.seq || ' ' || $1)::text AS notified FROM r"
            );
            let row = sqlx::query(&sql).bind(&text).bind(now).fetch_one(&mut **tx).await?;
            row.try_get::<i64, _>("seq")?
        } else if db.dialect == Dialect::Sqlite {
            let row =
                sqlx::query("INSERT INTO cache_invalidations (cache_keys, created_at) VALUES (?, ?) RETURNING seq")
                    .bind(&text)
                    .bind(now)
                    .fetch_one(&mut **tx)
                    .await?;
            row.try_get::<i64, _>("seq")?
        } else {
            let done = sqlx::query("INSERT INTO cache_invalidations (cache_keys, created_at) VALUES (?, ?)")
                .bind(&text)
                .bind(now)
                .execute(&mut **tx)
                .await?;
            done.last_insert_id()
                .ok_or_else(|| sqlx::Error::Protocol("no sequence number for an invalidation record".into()))?
        };
        tx.recorded(seq, &decode_keys(&text));
    }
    Ok(())
}

/// Which records this instance has applied, for requests that must read after a write
/// (`Mall-Min-Seq`, set by the sidecar after a write it proxied): they wait until the
/// write's record is applied here, asking the follower to catch up at once.
#[derive(Default)]
pub struct Applied {
    progress: std::sync::Mutex<Option<(i64, BTreeSet<i64>)>>,
    changed: tokio::sync::Notify,
    wanted: tokio::sync::Notify,
}

impl Applied {
    fn publish(&self, progress: &Progress) {
        *self.progress.lock().expect("applied") = Some((progress.floor, progress.above.clone()));
        self.changed.notify_waiters();
    }

    /// Has record `seq` been applied here? (Always, without a follower.)
    pub fn has(&self, seq: i64) -> bool {
        match &*self.progress.lock().expect("applied") {
            Some((floor, above)) => seq <= *floor || above.contains(&seq),
            None => true,
        }
    }

    /// Waits until record `seq` is applied, at most `limit`; false when it was not in time.
    pub async fn wait_for(&self, seq: i64, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.has(seq) {
                return true;
            }
            self.wanted.notify_one();
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.has(seq);
            }
        }
    }
}

/// The keys as record texts of at most [`MAX_RECORD`] bytes each.
fn chunks(keys: &[Key]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for key in keys {
        let key = key.encode();
        match out.last_mut() {
            Some(text) if text.len() + 1 + key.len() <= MAX_RECORD => {
                text.push(' ');
                text.push_str(&key);
            }
            _ => out.push(key),
        }
    }
    out
}

/// Which sequence numbers have been applied: all up to `floor`, and the ones in `above`.
#[derive(Debug)]
pub struct Progress {
    floor: i64,
    above: BTreeSet<i64>,
    /// Since when the lowest hole above `floor` has been waited for.
    hole_since: Option<Instant>,
}

impl Progress {
    pub fn starting_at(floor: i64) -> Progress {
        Progress {
            floor,
            above: BTreeSet::new(),
            hole_since: None,
        }
    }

    /// Where the next catch-up reads from (exclusive).
    pub fn floor(&self) -> i64 {
        self.floor
    }

    /// Marks `seq` applied; false when it already was.
    pub fn accept(&mut self, seq: i64) -> bool {
        seq > self.floor && self.above.insert(seq)
    }

    /// Moves the floor over what is contiguous; a hole waited for longer than `patience` is a
    /// number that will never commit, and is stepped over.
    pub fn advance(&mut self, now: Instant, patience: Duration) {
        loop {
            while self.above.remove(&(self.floor + 1)) {
                self.floor += 1;
                self.hole_since = None;
            }
            let Some(&lowest) = self.above.first() else {
                self.hole_since = None;
                return;
            };
            let since = *self.hole_since.get_or_insert(now);
            if now.duration_since(since) < patience {
                return;
            }
            self.floor = lowest - 1;
            self.hole_since = None;
        }
    }
}

/// What the follower needs to know.
#[derive(Debug, Clone)]
pub struct FollowerSettings {
    /// SQLite and MySQL: how often the records are read.
    pub poll: Duration,
    /// How far behind the follower may be before the cache stops being trusted.
    pub max_lag: Duration,
    pub retain: Duration,
    /// `http://127.0.0.1:8080`: the pod's sidecar, purged of the keys' tags.
    pub purge_url: Option<String>,
}

pub struct Follower {
    db: Arc<Db>,
    applied: Arc<Applied>,
    cache: Arc<Cache>,
    metrics: Arc<Metrics>,
    settings: FollowerSettings,
    progress: Progress,
    sidecar: Option<SidecarPurge>,
    /// When records were last read in full (for the lag and the "fell behind" decision).
    synced: Instant,
    /// Whether the last catch-up failed (its error was logged; the next ones are not).
    failing: bool,
}

impl Follower {
    /// Starts from the records of the last [`HOLE_PATIENCE`] (re-applying them costs nothing on
    /// an empty cache, and covers a write in flight as this instance starts).
    pub async fn start(
        db: Arc<Db>,
        cache: Arc<Cache>,
        metrics: Arc<Metrics>,
        settings: FollowerSettings,
        applied: Arc<Applied>,
    ) -> anyhow::Result<Follower> {
        let before = now_ms() as i64 - HOLE_PATIENCE.as_millis() as i64;
        let floor: i64 = {
            let pool = db.read_latest().await?;
            let sql = db.sql("SELECT COALESCE(MAX(seq), 0) AS seq FROM cache_invalidations WHERE created_at < ?");
            let row = sqlx::query(&sql).bind(before).fetch_one(&*pool).await?;
            row.try_get::<i64, _>("seq")?
        };
        let sidecar = settings.purge_url.as_deref().map(SidecarPurge::new).transpose()?;
        cache.follower_synced(settings.max_lag);
        let progress = Progress::starting_at(floor);
        applied.publish(&progress);
        Ok(Follower {
            db,
            applied,
            cache,
            metrics,
            settings,
            progress,
            sidecar,
            synced: Instant::now(),
            failing: false,
        })
    }

    /// Follows the records forever.
    pub async fn run(mut self) {
        let mut prune =
            tokio::time::interval((self.settings.retain / 10).clamp(Duration::from_secs(5), Duration::from_secs(60)));
        prune.tick().await;
        // The listener's connection comes out of the pod's allowance (or it polls).
        if self.db.reserve_listener() {
            self.listen(&mut prune).await
        } else {
            let mut tick = tokio::time::interval(self.settings.poll);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let wanted = self.applied.clone();
                tokio::select! {
                    _ = tick.tick() => self.catch_up().await,
                    _ = wanted.wanted.notified() => self.catch_up().await,
                    _ = prune.tick() => self.prune().await,
                }
            }
        }
    }

    async fn listen(&mut self, prune: &mut tokio::time::Interval) {
        let mut every_second = tokio::time::interval(Duration::from_secs(1));
        every_second.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut listener = match sqlx::postgres::PgListener::connect(self.db.primary_url()).await {
                Ok(l) => l,
                Err(e) => {
                    self.metrics.invalidation_errors.inc();
                    tracing::warn!(error = %e, "cannot listen for cache invalidations; polling meanwhile");
                    self.catch_up().await;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if let Err(e) = listener.listen(CHANNEL).await {
                self.metrics.invalidation_errors.inc();
                tracing::warn!(error = %e, "LISTEN {CHANNEL} failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            // Anything committed before LISTEN took effect is read by sequence.
            self.catch_up().await;
            loop {
                let wanted = self.applied.clone();
                tokio::select! {
                    _ = wanted.wanted.notified() => self.catch_up().await,
                    n = listener.try_recv() => match n {
                        Ok(Some(first)) => {
                            let mut batch = vec![first];
                            while let Some(n) = listener.next_buffered() {
                                batch.push(n);
                            }
                            let mut need_catch_up = false;
                            let mut records = Vec::with_capacity(batch.len());
                            for n in &batch {
                                match parse_notification(n.payload()) {
                                    Some((seq, Some(keys))) => records.push((seq, keys, None)),
                                    _ => need_catch_up = true,
                                }
                            }
                            self.apply(records).await;
                            if need_catch_up {
                                self.catch_up().await;
                            } else {
                                self.progress.advance(Instant::now(), HOLE_PATIENCE);
                                self.applied.publish(&self.progress);
                            }
                        }
                        // The connection was lost (sqlx reconnects on the next call): what was
                        // committed meanwhile is read by sequence.
                        Ok(None) => {
                            self.metrics.invalidation_errors.inc();
                            self.catch_up().await;
                        }
                        Err(e) => {
                            self.metrics.invalidation_errors.inc();
                            tracing::warn!(error = %e, "cache invalidation listener failed; reconnecting");
                            break;
                        }
                    },
                    _ = every_second.tick() => self.catch_up().await,
                    _ = prune.tick() => self.prune().await,
                }
            }
        }
    }

    /// Reads the records above the floor, applies the new ones, and counts as synced.
    async fn catch_up(&mut self) {
        let started = Instant::now();
        let mut after = self.progress.floor();
        loop {
            let rows = match self.fetch(after).await {
                Ok(rows) => rows,
                Err(e) => {
                    self.metrics.invalidation_errors.inc();
                    if !std::mem::replace(&mut self.failing, true) {
                        tracing::warn!(error = %e, "cannot read cache invalidation records; the cache is bypassed if this lasts");
                    }
                    return;
                }
            };
            let full = rows.len() as i64 == PAGE;
            if let Some(last) = rows.last() {
                after = last.0;
            }
            self.apply(rows).await;
            if !full {
                break;
            }
        }
        self.progress.advance(Instant::now(), HOLE_PATIENCE);
        self.applied.publish(&self.progress);
        if std::mem::replace(&mut self.failing, false) {
            tracing::info!("cache invalidation records readable again");
        }
        if started.duration_since(self.synced) > self.settings.max_lag {
            // The follower was behind for longer than the cache may trust it: records may
            // have been pruned meanwhile, so nothing in L1 is proven fresh.
            self.cache.clear_l1();
            tracing::info!("cache invalidation follower caught up after a gap; L1 cleared");
        }
        self.synced = started;
        self.cache.follower_synced(self.settings.max_lag);
        self.cache.flush_l2_deletes().await;
    }

    async fn fetch(&self, after: i64) -> Result<Vec<(i64, Vec<Key>, Option<i64>)>, sqlx::Error> {
        let pool = self.db.read_latest().await?;
        let sql = self
            .db
            .sql("SELECT seq, cache_keys, created_at FROM cache_invalidations WHERE seq > ? ORDER BY seq LIMIT ?");
        let rows = sqlx::query(&sql).bind(after).bind(PAGE).fetch_all(&*pool).await?;
        self.metrics.invalidation_polls.inc();
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get::<i64, _>("seq")?,
                    decode_keys(&r.try_get::<String, _>("cache_keys")?),
                    Some(r.try_get::<i64, _>("created_at")?),
                ))
            })
            .collect()
    }

    /// Evicts the keys of the records not applied yet: L1, L2, then the sidecar.
    async fn apply(&mut self, records: Vec<(i64, Vec<Key>, Option<i64>)>) {
        let mut keys: Vec<Key> = Vec::new();
        let now = now_ms() as i64;
        let fenced_at = Instant::now();
        for (seq, record_keys, created_at) in records {
            if !self.progress.accept(seq) {
                continue;
            }
            // Fenced before evicted: a read after the eviction must not re-read the old value
            // from a replica that has not replayed this write.
            self.db.fences.fence(seq, &record_keys, fenced_at);
            self.metrics.invalidation_records.inc();
            if let Some(at) = created_at {
                self.metrics.invalidation_lag.observe((now - at).max(0) as f64 / 1000.0);
            }
            keys.extend(record_keys);
        }
        if keys.is_empty() {
            return;
        }
        keys.sort_unstable_by_key(|k| (k.category as u8, k.scope, k.id));
        keys.dedup();
        self.cache.evict(&keys).await;
        if let Some(sidecar) = &mut self.sidecar {
            if let Err(e) = sidecar.purge(&keys).await {
                self.metrics.invalidation_errors.inc();
                tracing::warn!(error = %e, "cannot purge the sidecar");
            }
        }
    }

    async fn prune(&self) {
        let before = now_ms() as i64 - self.settings.retain.as_millis() as i64;
        let result = async {
            let pool = self.db.write().await?;
            sqlx::query(&self.db.sql("DELETE FROM cache_invalidations WHERE created_at < ?"))
                .bind(before)
                .execute(&*pool)
                .await
        }
        .await;
        match result {
            Ok(done) if done.rows_affected() > 0 => {
                tracing::debug!(pruned = done.rows_affected(), "old cache invalidation records pruned")
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "cannot prune cache invalidation records"),
        }
    }
}

/// `"<seq> <keys>"`, or `"<seq>"` when the keys were too long to carry.
fn parse_notification(payload: &str) -> Option<(i64, Option<Vec<Key>>)> {
    let (seq, keys) = match payload.split_once(' ') {
        Some((seq, keys)) => (seq, Some(decode_keys(keys))),
        None => (payload, None),
    };
    Some((seq.parse().ok()?, keys))
}

/// `PURGE` with `Surrogate-Key` to the pod's sidecar over one kept-alive connection.
struct SidecarPurge {
    authority: String,
    conn: Option<BufStream<tokio::net::TcpStream>>,
}

impl SidecarPurge {
    fn new(url: &str) -> anyhow::Result<SidecarPurge> {
        let authority = url
            .strip_prefix("http://")
            .map(|rest| rest.trim_end_matches('/'))
            .filter(|a| !a.is_empty() && !a.contains('/'))
            .ok_or_else(|| anyhow::anyhow!("MALL_SIDECAR_PURGE_URL: must be http://host:port, not {url:?}"))?;
        Ok(SidecarPurge {
            authority: authority.to_string(),
            conn: None,
        })
    }

    async fn purge(&mut self, keys: &[Key]) -> std::io::Result<()> {
        let tags: Vec<String> = keys.iter().map(Key::tag).collect();
        let request = format!(
            "PURGE / HTTP/1.1\r\nHost: {}\r\nSurrogate-Key: {}\r\nContent-Length: 0\r\n\r\n",
            self.authority,
            tags.join(" ")
        );
        // Once more on a fresh connection if the kept one was closed meanwhile.
        for attempt in 0..2 {
            if self.conn.is_none() {
                let stream = tokio::net::TcpStream::connect(&self.authority).await?;
                stream.set_nodelay(true)?;
                self.conn = Some(BufStream::new(stream));
            }
            let conn = self.conn.as_mut().expect("connected");
            match tokio::time::timeout(Duration::from_secs(2), exchange(conn, request.as_bytes())).await {
                Ok(Ok(200)) => return Ok(()),
                Ok(Ok(status)) => {
                    self.conn = None;
                    return Err(std::io::Error::other(format!(
                        "the sidecar answered PURGE with {status}"
                    )));
                }
                Ok(Err(e)) if attempt == 0 => {
                    tracing::debug!(error = %e, "sidecar connection closed; reconnecting");
                    self.conn = None;
                }
                Ok(Err(e)) => {
                    self.conn = None;
                    return Err(e);
                }
                Err(_) => {
                    self.conn = None;
                    return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "PURGE timed out"));
                }
            }
        }
        Ok(())
    }
}

/// Writes a request and reads its response (RFC 9112 6.3: the body by `Content-Length`).
async fn exchange(conn: &mut BufStream<tokio::net::TcpStream>, request: &[u8]) -> std::io::Result<u16> {
    conn.write_all(request).await?;
    conn.flush().await?;
    let mut line = String::new();
    if conn.read_line(&mut line).await? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut length = 0usize;
    loop {
        line.clear();
        if conn.read_line(&mut line).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                length = value
                    .trim()
                    .parse()
                    .map_err(|_| std::io::Error::other("bad Content-Length"))?;
            }
        }
    }
    let mut body = vec![0u8; length];
    conn.read_exact(&mut body).await?;
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_a_record() {
        let keys = vec![Key::product(12), Key::order(7, 42)];
        assert_eq!(encode_keys(&keys), "product:0:12 order:7:42");
        assert_eq!(decode_keys("product:0:12 order:7:42 bogus:1:2 product:x:1"), keys);
        assert_eq!(Key::product(12).tag(), "product:12");
        assert_eq!(Key::order(7, 42).tag(), "order:7:42");
    }

    #[test]
    fn long_key_lists_are_split_into_records_that_fit() {
        let keys: Vec<Key> = (0..2000).map(|i| Key::product(1_000_000 + i)).collect();
        let texts = chunks(&keys);
        assert!(texts.len() > 1);
        assert!(texts.iter().all(|t| t.len() <= MAX_RECORD));
        let back: Vec<Key> = texts.iter().flat_map(|t| decode_keys(t)).collect();
        assert_eq!(back, keys);
        assert!(chunks(&[]).is_empty());
    }

    #[test]
    fn notifications_carry_keys_or_only_a_sequence() {
        assert_eq!(
            parse_notification("41 product:0:3"),
            Some((41, Some(vec![Key::product(3)])))
        );
        assert_eq!(parse_notification("42"), Some((42, None)));
        assert_eq!(parse_notification("x product:0:3"), None);
    }

    #[test]
    fn the_floor_waits_at_a_hole_then_steps_over_it() {
        let t0 = Instant::now();
        let patience = Duration::from_secs(5);
        let mut p = Progress::starting_at(10);
        assert!(p.accept(11));
        assert!(p.accept(13), "13 committed before 12");
        assert!(!p.accept(11), "applied once");
        assert!(!p.accept(9), "below the floor");
        p.advance(t0, patience);
        assert_eq!(p.floor(), 11, "12 is still in flight: read from 11 on");
        assert!(p.accept(12));
        p.advance(t0 + Duration::from_secs(1), patience);
        assert_eq!(p.floor(), 13);
        // 14 never commits (rolled back): after the patience the floor moves over it.
        assert!(p.accept(15));
        p.advance(t0 + Duration::from_secs(2), patience);
        assert_eq!(p.floor(), 13);
        p.advance(t0 + Duration::from_secs(6), patience);
        assert_eq!(p.floor(), 13, "waited 4 s so far");
        p.advance(t0 + Duration::from_secs(8), patience);
        assert_eq!(p.floor(), 15);
    }
}
