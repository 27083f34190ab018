//! Two-level cache: L1 in-process (moka, bounded in bytes, TTL per category) and optional L2
//! Redis shared by every instance.
//!
//! - Concurrent misses on one key are coalesced: the loader (L2, then the database) runs once.
//! - Writes call [`Cache::invalidate`] after commit: L1 and L2 drop the key and every instance is
//!   told over Redis pub/sub. A second, delayed invalidation closes the window where a read that
//!   started before the commit puts the old row back ("delayed double delete").
//! - When Redis is down the cache serves from L1 and the database; when the subscription comes
//!   back, L1 is cleared, because invalidations may have been missed meanwhile.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use moka::future::Cache as Moka;
use moka::Expiry;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use tracing::Instrument;

use crate::error::{AppError, AppResult};
use crate::metrics::Metrics;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Category {
    Product,
    Order,
    User,
}

impl Category {
    pub fn name(self) -> &'static str {
        match self {
            Category::Product => "product",
            Category::Order => "order",
            Category::User => "user",
        }
    }

    fn from_name(name: &str) -> Option<Category> {
        [Category::Product, Category::Order, Category::User]
            .into_iter()
            .find(|c| c.name() == name)
    }
}

/// `scope` separates entries visible to different users (an order is cached under its owner).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub category: Category,
    pub scope: i64,
    pub id: i64,
}

impl Key {
    pub fn product(id: i64) -> Key {
        Key {
            category: Category::Product,
            scope: 0,
            id,
        }
    }

    pub fn user(id: i64) -> Key {
        Key {
            category: Category::User,
            scope: 0,
            id,
        }
    }

    pub fn order(user_id: i64, id: i64) -> Key {
        Key {
            category: Category::Order,
            scope: user_id,
            id,
        }
    }

    /// `category:scope:id`, as invalidation records store it.
    pub fn encode(&self) -> String {
        format!("{}:{}:{}", self.category.name(), self.scope, self.id)
    }

    pub fn parse(s: &str) -> Option<Key> {
        let mut parts = s.split(':');
        let category = Category::from_name(parts.next()?)?;
        let scope = parts.next()?.parse().ok()?;
        let id = parts.next()?.parse().ok()?;
        if parts.next().is_some() {
            return None;
        }
        Some(Key { category, scope, id })
    }

    /// The tag shared caches (the sidecar) file responses holding this object under:
    /// `product:12`, or with the owner for objects scoped to a user, `order:7:42`.
    pub fn tag(&self) -> String {
        if self.scope == 0 {
            format!("{}:{}", self.category.name(), self.id)
        } else {
            self.encode()
        }
    }

    fn redis_key(&self, prefix: &str) -> String {
        format!("{prefix}:{}", self.encode())
    }

    fn parse_redis_key(prefix: &str, s: &str) -> Option<Key> {
        Key::parse(s.strip_prefix(prefix)?.strip_prefix(':')?)
    }

    /// Which of [`GENERATIONS`] counts this key's invalidations.
    fn stripe(&self) -> usize {
        let h = (self.id as u64)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(self.scope as u64)
            .wrapping_add(self.category as u64);
        (h >> 52) as usize % GENERATIONS
    }
}

/// Invalidations are counted in this many stripes (by key hash): a load that saw its key's stripe
/// change while it ran may hold the old value, and is not kept.
const GENERATIONS: usize = 1024;

#[derive(Debug, Clone, Copy)]
pub struct Ttls {
    pub product: Duration,
    pub order: Duration,
    pub user: Duration,
}

impl Ttls {
    fn of(&self, category: Category) -> Duration {
        match category {
            Category::Product => self.product,
            Category::Order => self.order,
            Category::User => self.user,
        }
    }
}

struct PerCategoryTtl(Ttls);

impl Expiry<Key, Bytes> for PerCategoryTtl {
    fn expire_after_create(&self, key: &Key, _: &Bytes, _: Instant) -> Option<Duration> {
        Some(self.0.of(key.category))
    }
    fn expire_after_update(&self, key: &Key, _: &Bytes, _: Instant, _: Option<Duration>) -> Option<Duration> {
        Some(self.0.of(key.category))
    }
}

pub struct CacheSettings {
    pub l1_bytes: u64,
    pub ttls: Ttls,
    pub redis_url: Option<String>,
    pub redis_prefix: String,
    pub redis_timeout: Duration,
}

struct L2 {
    client: redis::Client,
    conn: ConnectionManager,
    prefix: String,
    timeout: Duration,
    channel: String,
}

pub struct Cache {
    l1: Moka<Key, Bytes>,
    l2: Option<L2>,
    ttls: Ttls,
    metrics: Arc<Metrics>,
    generations: Box<[AtomicU64]>,
    /// L2 keys whose deletion failed (Redis was down): L2 is not read until they are deleted.
    l2_pending: std::sync::Mutex<HashSet<Key>>,
    /// Whether the invalidation follower is keeping up; without one, always.
    follower: Freshness,
}

/// How recently the invalidation follower caught up with the database's records. While it is
/// behind by more than `max_lag`, neither L1 nor L2 is trusted: reads go to the database.
#[derive(Default)]
pub struct Freshness {
    /// 0: no follower (cache entries live until invalidated or expired).
    max_lag_ms: AtomicU64,
    synced_at_ms: AtomicU64,
    started: std::sync::OnceLock<Instant>,
}

impl Freshness {
    fn now_ms(&self) -> u64 {
        self.started.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
    }

    fn current(&self) -> bool {
        let max_lag = self.max_lag_ms.load(Ordering::Relaxed);
        max_lag == 0 || self.now_ms().saturating_sub(self.synced_at_ms.load(Ordering::Relaxed)) <= max_lag
    }
}

/// Why a load produced no value: nothing there, or it failed.
#[derive(Debug)]
enum LoadOutcome {
    Missing,
    Failed(AppError),
}

impl Cache {
    pub fn new(settings: CacheSettings, metrics: Arc<Metrics>) -> anyhow::Result<Arc<Cache>> {
        let l1 = Moka::builder()
            // Weigh entries by their encoded size (plus the key and bookkeeping), so the budget is bytes.
            .weigher(|_: &Key, v: &Bytes| (v.len() + 64).min(u32::MAX as usize) as u32)
            .max_capacity(settings.l1_bytes)
            .expire_after(PerCategoryTtl(settings.ttls))
            .build();
        let l2 = match settings.redis_url {
            Some(url) => {
                let client = redis::Client::open(url.as_str()).map_err(|e| anyhow::anyhow!("MALL_REDIS_URL: {e}"))?;
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(settings.redis_timeout))
                    .set_response_timeout(Some(settings.redis_timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_secs(2));
                let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)
                    .map_err(|e| anyhow::anyhow!("MALL_REDIS_URL: {e}"))?;
                let channel = format!("{}:invalidate", settings.redis_prefix);
                Some(L2 {
                    client,
                    conn,
                    prefix: settings.redis_prefix,
                    timeout: settings.redis_timeout,
                    channel,
                })
            }
            None => None,
        };
        Ok(Arc::new(Cache {
            l1,
            l2,
            ttls: settings.ttls,
            metrics,
            generations: (0..GENERATIONS).map(|_| AtomicU64::new(0)).collect(),
            l2_pending: Default::default(),
            follower: Freshness::default(),
        }))
    }

    /// The cached value, else the loader's (which runs once however many callers miss together).
    /// `Ok(None)` means the loader found nothing; that is not cached.
    pub async fn get_or_load<F, Fut>(&self, key: Key, load: F) -> AppResult<Option<Bytes>>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = AppResult<Option<Bytes>>>,
    {
        // A span of a sampled request's trace (DEBUG: nothing is built while tracing is off);
        // Redis calls and the loader's statements are its children.
        let span = tracing::debug_span!(
            "cache",
            cache.category = key.category.name(),
            cache.l1 = tracing::field::Empty,
            cache.l2 = tracing::field::Empty
        );
        self.lookup(key, load).instrument(span).await
    }

    async fn lookup<F, Fut>(&self, key: Key, load: F) -> AppResult<Option<Bytes>>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = AppResult<Option<Bytes>>>,
    {
        let span = tracing::Span::current();
        let category = key.category.name();
        if !self.follower.current() {
            // The follower is behind: any entry may be stale, so the database answers.
            self.metrics.cache_misses.with_label_values(&["l1", category]).inc();
            span.record("cache.l1", "bypassed");
            return load().await;
        }
        if let Some(v) = self.l1.get(&key).await {
            self.metrics.cache_hits.with_label_values(&["l1", category]).inc();
            span.record("cache.l1", "hit");
            return Ok(Some(v));
        }
        self.metrics.cache_misses.with_label_values(&["l1", category]).inc();
        span.record("cache.l1", "miss");
        let generation = &self.generations[key.stripe()];
        let before = generation.load(Ordering::Acquire);
        let result = self
            .l1
            .try_get_with(key.clone(), async {
                if let Some(v) = self.l2_get(&key).await {
                    return Ok(v);
                }
                match load().await {
                    Ok(Some(v)) => {
                        // A value read before an invalidation that arrived meanwhile may be
                        // the old one: not stored for others.
                        if generation.load(Ordering::Acquire) == before {
                            self.l2_set(&key, &v).await;
                        }
                        Ok(v)
                    }
                    Ok(None) => Err(LoadOutcome::Missing),
                    Err(e) => Err(LoadOutcome::Failed(e)),
                }
            })
            .await;
        if generation.load(Ordering::Acquire) != before {
            self.l1.invalidate(&key).await;
        }
        match result {
            Ok(v) => Ok(Some(v)),
            Err(outcome) => match &*outcome {
                LoadOutcome::Missing => Ok(None),
                LoadOutcome::Failed(e) => Err(e.clone()),
            },
        }
    }

    /// [`Cache::get_or_load`] for a value cached as its JSON encoding, which is also the response
    /// body, so a hit is served without decoding or encoding anything.
    pub async fn get_or_load_json<T, F, Fut>(&self, key: Key, load: F) -> AppResult<Option<Bytes>>
    where
        T: serde::Serialize,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = AppResult<Option<T>>>,
    {
        self.get_or_load(key, || async move { Ok(load().await?.map(|v| encode(&v))) })
            .await
    }

    /// Fills L1, and L2 in one pipeline, with values just read from the database (warm-up).
    /// Not counted as hits or misses: no request asked for them.
    pub async fn preload<T: serde::Serialize>(&self, entries: impl IntoIterator<Item = (Key, T)>) {
        let mut pipe = redis::pipe();
        for (key, value) in entries {
            let bytes = encode(&value);
            if let Some(l2) = &self.l2 {
                let ttl = self.ttls.of(key.category).as_secs().max(1);
                pipe.set_ex(key.redis_key(&l2.prefix), bytes.as_ref(), ttl).ignore();
            }
            self.l1.insert(key, bytes).await;
        }
        let Some(l2) = &self.l2 else { return };
        let mut conn = l2.conn.clone();
        if !matches!(
            tokio::time::timeout(l2.timeout, pipe.query_async::<()>(&mut conn)).await,
            Ok(Ok(()))
        ) {
            self.metrics.cache_errors.with_label_values(&["l2", "set"]).inc();
        }
    }

    /// Drops `keys` everywhere, now and once more shortly after (see the module comment).
    pub async fn invalidate(self: &Arc<Self>, keys: Vec<Key>) {
        if keys.is_empty() {
            return;
        }
        self.invalidate_everywhere(&keys).await;
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            this.invalidate_everywhere(&keys).await;
        });
    }

    async fn invalidate_everywhere(&self, keys: &[Key]) {
        self.evict_local(keys).await;
        self.metrics
            .cache_invalidations
            .with_label_values(&["local"])
            .inc_by(keys.len() as u64);
        let Some(l2) = &self.l2 else { return };
        let redis_keys: Vec<String> = keys.iter().map(|k| k.redis_key(&l2.prefix)).collect();
        let mut pipe = redis::pipe();
        pipe.del(&redis_keys).ignore();
        for k in &redis_keys {
            pipe.publish(&l2.channel, k).ignore();
        }
        let mut conn = l2.conn.clone();
        match tokio::time::timeout(l2.timeout, pipe.query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => {}
            _ => self.metrics.cache_errors.with_label_values(&["l2", "invalidate"]).inc(),
        }
    }

    /// Drops `keys` from L1, and makes a load of them that is running now not keep its value.
    async fn evict_local(&self, keys: &[Key]) {
        for key in keys {
            self.generations[key.stripe()].fetch_add(1, Ordering::AcqRel);
            self.l1.invalidate(key).await;
        }
    }

    /// Applies other writers' invalidations (the follower's records): L1 at once, then L2.
    /// Keys L2 could not drop are kept, and L2 is not read until they are dropped.
    pub async fn evict(&self, keys: &[Key]) {
        self.evict_local(keys).await;
        self.metrics
            .cache_invalidations
            .with_label_values(&["record"])
            .inc_by(keys.len() as u64);
        if self.l2.is_some() {
            self.l2_pending.lock().expect("pending").extend(keys.iter().cloned());
            self.flush_l2_deletes().await;
        }
    }

    /// Deletes the L2 keys still pending; true when none is left.
    pub async fn flush_l2_deletes(&self) -> bool {
        let Some(l2) = &self.l2 else { return true };
        let keys: Vec<Key> = self.l2_pending.lock().expect("pending").iter().cloned().collect();
        if keys.is_empty() {
            return true;
        }
        let redis_keys: Vec<String> = keys.iter().map(|k| k.redis_key(&l2.prefix)).collect();
        let mut conn = l2.conn.clone();
        match tokio::time::timeout(l2.timeout, conn.del::<_, ()>(&redis_keys)).await {
            Ok(Ok(())) => {
                let mut pending = self.l2_pending.lock().expect("pending");
                for k in &keys {
                    pending.remove(k);
                }
                pending.is_empty()
            }
            _ => {
                self.metrics.cache_errors.with_label_values(&["l2", "invalidate"]).inc();
                false
            }
        }
    }

    /// Drops every L1 entry (the follower fell further behind than its records reach).
    pub fn clear_l1(&self) {
        for g in self.generations.iter() {
            g.fetch_add(1, Ordering::AcqRel);
        }
        self.l1.invalidate_all();
    }

    /// The follower's heartbeat: entries are trusted for `max_lag` after each catch-up.
    pub fn follower_synced(&self, max_lag: Duration) {
        let f = &self.follower;
        f.max_lag_ms.store(max_lag.as_millis().max(1) as u64, Ordering::Relaxed);
        f.synced_at_ms.store(f.now_ms(), Ordering::Relaxed);
    }

    async fn l2_get(&self, key: &Key) -> Option<Bytes> {
        let l2 = self.l2.as_ref()?;
        if !self.l2_pending.lock().expect("pending").is_empty() {
            // An invalidation has not reached L2 yet: it may hold old values.
            return None;
        }
        let category = key.category.name();
        let mut conn = l2.conn.clone();
        let get = tokio::time::timeout(l2.timeout, conn.get(key.redis_key(&l2.prefix)));
        let got: Result<Result<Option<Vec<u8>>, _>, _> = get
            .instrument(tracing::debug_span!(
                "redis GET",
                db.system.name = "redis",
                db.operation.name = "GET"
            ))
            .await;
        match got {
            Ok(Ok(Some(v))) => {
                self.metrics.cache_hits.with_label_values(&["l2", category]).inc();
                tracing::Span::current().record("cache.l2", "hit");
                Some(Bytes::from(v))
            }
            Ok(Ok(None)) => {
                self.metrics.cache_misses.with_label_values(&["l2", category]).inc();
                tracing::Span::current().record("cache.l2", "miss");
                None
            }
            _ => {
                self.metrics.cache_errors.with_label_values(&["l2", "get"]).inc();
                tracing::Span::current().record("cache.l2", "error");
                None
            }
        }
    }

    async fn l2_set(&self, key: &Key, value: &Bytes) {
        let Some(l2) = &self.l2 else { return };
        let mut conn = l2.conn.clone();
        let ttl = self.ttls.of(key.category).as_secs().max(1);
        let set = conn.set_ex::<_, _, ()>(key.redis_key(&l2.prefix), value.as_ref(), ttl);
        let set = tokio::time::timeout(l2.timeout, set).instrument(tracing::debug_span!(
            "redis SETEX",
            db.system.name = "redis",
            db.operation.name = "SETEX"
        ));
        if !matches!(set.await, Ok(Ok(()))) {
            self.metrics.cache_errors.with_label_values(&["l2", "set"]).inc();
        }
    }

    /// Applies other instances' invalidations to L1, reconnecting forever. Does nothing without L2.
    pub async fn follow_invalidations(self: Arc<Self>) {
        let Some(l2) = &self.l2 else { return };
        let mut first = true;
        loop {
            match l2.client.get_async_pubsub().await {
                Ok(mut pubsub) => match pubsub.subscribe(&l2.channel).await {
                    Ok(()) => {
                        if !first {
                            // Messages sent while we were away are lost: start L1 afresh.
                            self.clear_l1();
                            self.metrics.cache_invalidations.with_label_values(&["reconnect"]).inc();
                            tracing::info!("cache invalidation channel reconnected; L1 cleared");
                        }
                        let mut messages = pubsub.into_on_message();
                        while let Some(msg) = messages.next().await {
                            let Ok(payload) = msg.get_payload::<String>() else {
                                continue;
                            };
                            if let Some(key) = Key::parse_redis_key(&l2.prefix, &payload) {
                                self.evict_local(std::slice::from_ref(&key)).await;
                                self.metrics.cache_invalidations.with_label_values(&["remote"]).inc();
                            }
                        }
                        tracing::warn!("cache invalidation channel lost; reconnecting");
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot subscribe to cache invalidations"),
                },
                Err(e) => {
                    self.metrics.cache_errors.with_label_values(&["l2", "subscribe"]).inc();
                    tracing::debug!(error = %e, "redis unavailable for invalidations");
                }
            }
            // Any L1 entry may go stale from here on; the next subscription clears L1.
            first = false;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// The JSON encoding the cache stores. Our types have string keys and no fallible `Serialize`.
pub fn encode<T: serde::Serialize>(value: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(value).expect("cached values serialize to JSON"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_keys_round_trip() {
        let k = Key::order(42, 7_000_000_000);
        let s = k.redis_key("mall");
        assert_eq!(s, "mall:order:42:7000000000");
        assert_eq!(Key::parse_redis_key("mall", &s), Some(k));
        assert_eq!(Key::parse_redis_key("other", &s), None);
        assert_eq!(Key::parse_redis_key("mall", "mall:bogus:1:2"), None);
    }
}
