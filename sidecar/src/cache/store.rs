//! The production in-memory cache storage behind pingora-cache: a moka (TinyLFU) table bounded in
//! bytes of header + body, so a flood of one-off URLs cannot push out the hot products. Objects are
//! written whole when the upstream response ends; concurrent misses wait on pingora's cache lock
//! instead of reading a partial write (pingora's own `MemCache` is for tests only).
//!
//! Entries are indexed by tag: the words of the stored response's `Surrogate-Key` (the app's
//! `product:1002 list:products ...`, and the sidecar's own `path:/api/products/1002`), so a write
//! can purge every entry that holds an object, whichever URL it was cached under.

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use moka::notification::RemovalCause;
use moka::sync::Cache;
use parking_lot::Mutex;
use pingora_cache::key::{CacheHashKey, HashBinary};
use pingora_cache::storage::{
    HandleHit, HandleMiss, HitHandler, MissFinishType, MissHandler, PurgeOutcome, PurgeTarget, PurgeType,
};
use pingora_cache::trace::SpanHandle;
use pingora_cache::{CacheKey, CacheMeta, Storage};
use pingora_error::{ErrorType, OrErr, Result};
use pingora_http::ResponseHeader;

/// The header that carries an entry's tags (stripped before clients see it).
pub const TAG_HEADER: &str = "surrogate-key";

struct Object {
    meta: StoredMeta,
    body: Bytes,
    tags: Box<[Box<str>]>,
}

/// The tags of a response: the whitespace-separated words of its `Surrogate-Key` fields.
pub fn tags_of(header: &ResponseHeader) -> Box<[Box<str>]> {
    header
        .headers
        .get_all(TAG_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(str::split_whitespace)
        .map(Box::from)
        .collect()
}

type TagIndex = Arc<Mutex<HashMap<Box<str>, HashSet<HashBinary>>>>;

impl Object {
    fn weight(&self) -> u32 {
        // A fixed overhead per entry keeps millions of empty bodies from looking free.
        (self.meta.bytes() + self.body.len() + 128).min(u32::MAX as usize) as u32
    }
}

/// What a hit needs to rebuild its [`CacheMeta`]. pingora's own serialisation compresses the
/// response header with zstd; decompressing and re-parsing it on every hit was about a tenth of
/// the sidecar's CPU on the cache-hit path (perf), so the header is kept parsed and cloned
/// instead. Metadata that [`CacheMeta::new`] cannot rebuild exactly (a revalidated or
/// stale-while-revalidate-refreshed entry, whose `updated` or provenance differs from `created`:
/// with the app's `max-age=5` that is every entry after its first 5 s) keeps pingora's small
/// uncompressed internal form, decoded with a placeholder header, and its header parsed: decoding
/// the compressed header on every hit was 15 % of the sidecar's CPU on steady-state hits.
enum StoredMeta {
    Parts {
        fresh_until: SystemTime,
        created: SystemTime,
        stale_while_revalidate_sec: u32,
        stale_if_error_sec: u32,
        variance: Option<HashBinary>,
        epoch_override: Option<SystemTime>,
        header: Box<ResponseHeader>,
    },
    Revalidated {
        internal: Vec<u8>,
        header: Box<ResponseHeader>,
    },
}

/// pingora's serialised form of a minimal response header, decoded in place of an entry's own
/// header (which is then put back parsed): a few bytes to decompress instead of the whole header.
fn placeholder_header() -> &'static [u8] {
    static PLACEHOLDER: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    PLACEHOLDER.get_or_init(|| {
        let header = ResponseHeader::build(200, Some(0)).expect("a 200 header builds");
        let now = SystemTime::now();
        CacheMeta::new(now, now, 0, 0, header)
            .serialize()
            .expect("a minimal header serialises")
            .1
    })
}

impl StoredMeta {
    fn new(meta: &CacheMeta) -> Result<StoredMeta> {
        let created = meta.created();
        if meta.updated() != created || meta.provenance() != created {
            let (internal, _) = meta.serialize()?;
            return Ok(StoredMeta::Revalidated {
                internal,
                header: Box::new(meta.response_header_copy()),
            });
        }
        Ok(StoredMeta::Parts {
            fresh_until: meta.fresh_until(),
            created,
            stale_while_revalidate_sec: meta.stale_while_revalidate_sec(),
            stale_if_error_sec: meta.stale_if_error_sec(),
            variance: meta.variance(),
            epoch_override: meta.epoch_override(),
            header: Box::new(meta.response_header_copy()),
        })
    }

    fn meta(&self) -> Result<CacheMeta> {
        match self {
            StoredMeta::Parts {
                fresh_until,
                created,
                stale_while_revalidate_sec,
                stale_if_error_sec,
                variance,
                epoch_override,
                header,
            } => {
                let mut meta = CacheMeta::new(
                    *fresh_until,
                    *created,
                    *stale_while_revalidate_sec,
                    *stale_if_error_sec,
                    ResponseHeader::clone(header),
                );
                if let Some(variance) = variance {
                    meta.set_variance(*variance);
                }
                if let Some(epoch) = epoch_override {
                    meta.set_epoch_override(*epoch);
                }
                Ok(meta)
            }
            StoredMeta::Revalidated { internal, header } => {
                let mut meta = CacheMeta::deserialize(internal, placeholder_header())?;
                *meta.response_header_mut() = ResponseHeader::clone(header);
                Ok(meta)
            }
        }
    }

    /// Roughly what the metadata occupies, for the cache's byte budget.
    fn bytes(&self) -> usize {
        let (fixed, header) = match self {
            StoredMeta::Parts { header, .. } => (64, header),
            StoredMeta::Revalidated { internal, header } => (internal.len(), header),
        };
        fixed
            + header
                .headers
                .iter()
                .map(|(name, value)| name.as_str().len() + value.len() + 32)
                .sum::<usize>()
    }
}

pub struct MemoryStore {
    objects: Cache<HashBinary, Arc<Object>>,
    tags: TagIndex,
}

impl MemoryStore {
    pub fn new(max_bytes: u64) -> Self {
        let tags: TagIndex = Arc::default();
        let index = tags.clone();
        MemoryStore {
            objects: Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_, o: &Arc<Object>| o.weight())
                // Keep the index as small as the cache: an entry that leaves takes its tags along.
                // (A replaced entry's new tags are already indexed under the same key.)
                .eviction_listener(move |key: Arc<HashBinary>, object: Arc<Object>, cause| {
                    if cause == RemovalCause::Replaced {
                        return;
                    }
                    let mut index = index.lock();
                    for tag in object.tags.iter() {
                        if let Some(keys) = index.get_mut(tag) {
                            keys.remove(&*key);
                            if keys.is_empty() {
                                index.remove(tag);
                            }
                        }
                    }
                })
                .build(),
            tags,
        }
    }

    /// Removes every entry carrying any of `tags`; returns how many were removed.
    pub fn purge_tags<'a>(&self, tags: impl IntoIterator<Item = &'a str>) -> u64 {
        let keys: Vec<HashBinary> = {
            let mut index = self.tags.lock();
            tags.into_iter().filter_map(|t| index.remove(t)).flatten().collect()
        };
        keys.iter().filter(|k| self.objects.remove(*k).is_some()).count() as u64
    }

    /// Removes every entry (when invalidations may have been missed); returns how many there were.
    pub fn purge_all(&self) -> u64 {
        self.objects.run_pending_tasks();
        let count = self.objects.entry_count();
        self.objects.invalidate_all();
        self.objects.run_pending_tasks();
        self.tags.lock().clear();
        count
    }

    fn insert(&self, key: HashBinary, object: Object) {
        if !object.tags.is_empty() {
            let mut index = self.tags.lock();
            for tag in object.tags.iter() {
                index.entry(tag.clone()).or_default().insert(key);
            }
        }
        self.objects.insert(key, Arc::new(object));
    }

    /// Entries and their weighed bytes (after pending maintenance).
    pub fn usage(&self) -> (u64, u64) {
        self.objects.run_pending_tasks();
        (self.objects.entry_count(), self.objects.weighted_size())
    }
}

#[async_trait]
impl Storage for MemoryStore {
    async fn lookup(&'static self, key: &CacheKey, _trace: &SpanHandle) -> Result<Option<(CacheMeta, HitHandler)>> {
        let Some(object) = self.objects.get(&key.combined_bin()) else {
            return Ok(None);
        };
        let meta = object.meta.meta()?;
        let end = object.body.len();
        Ok(Some((
            meta,
            Box::new(Hit {
                body: object.body.clone(),
                start: 0,
                end,
                done: false,
            }),
        )))
    }

    async fn get_miss_handler(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<MissHandler> {
        Ok(Box::new(Miss {
            store: self,
            key: key.combined_bin(),
            meta: StoredMeta::new(meta)?,
            tags: tags_of(meta.response_header()),
            body: BytesMut::new(),
        }))
    }

    async fn purge(
        &'static self,
        target: PurgeTarget<'_>,
        _kind: PurgeType,
        _trace: &SpanHandle,
    ) -> Result<PurgeOutcome> {
        // Entries carry no ids: an exact purge of an identified entry and an active purge both
        // remove what sits under the key.
        Ok(match self.objects.remove(&target.key().combined_bin()) {
            Some(_) => PurgeOutcome::Purged(None),
            None => PurgeOutcome::NotFound,
        })
    }

    async fn update_meta(&'static self, key: &CacheKey, meta: &CacheMeta, _trace: &SpanHandle) -> Result<bool> {
        let hash = key.combined_bin();
        let Some(old) = self.objects.get(&hash) else {
            return Ok(false);
        };
        let updated = Object {
            meta: StoredMeta::new(meta)?,
            body: old.body.clone(),
            tags: tags_of(meta.response_header()),
        };
        self.insert(hash, updated);
        Ok(true)
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync + 'static) {
        self
    }
}

struct Hit {
    body: Bytes,
    start: usize,
    end: usize,
    done: bool,
}

#[async_trait]
impl HandleHit for Hit {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        if self.done {
            return Ok(None);
        }
        self.done = true;
        Ok(Some(self.body.slice(self.start..self.end)))
    }

    async fn finish(
        self: Box<Self>,
        _storage: &'static (dyn Storage + Sync),
        _key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<()> {
        Ok(())
    }

    fn can_seek(&self) -> bool {
        true
    }

    fn seek(&mut self, start: usize, end: Option<usize>) -> Result<()> {
        let end = end.unwrap_or(self.body.len());
        if start > end || end > self.body.len() {
            return Err(pingora_error::Error::explain(
                ErrorType::InternalError,
                "seek out of range",
            ));
        }
        self.start = start;
        self.end = end;
        self.done = false;
        Ok(())
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self
    }
}

struct Miss {
    store: &'static MemoryStore,
    key: HashBinary,
    meta: StoredMeta,
    tags: Box<[Box<str>]>,
    body: BytesMut,
}

#[async_trait]
impl HandleMiss for Miss {
    async fn write_body(&mut self, data: Bytes, _eof: bool) -> Result<()> {
        self.body.extend_from_slice(&data);
        Ok(())
    }

    async fn finish(self: Box<Self>) -> Result<MissFinishType> {
        let object = Object {
            meta: self.meta,
            body: self.body.freeze(),
            tags: self.tags,
        };
        let size = object.weight() as usize;
        u32::try_from(size).or_err(ErrorType::InternalError, "object too large")?;
        self.store.insert(self.key, object);
        Ok(MissFinishType::Created(size))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn header() -> ResponseHeader {
        let mut header = ResponseHeader::build(200, None).unwrap();
        header.append_header("content-type", "application/json").unwrap();
        header.append_header("cache-control", "public, max-age=5").unwrap();
        header.append_header("etag", "\"v1\"").unwrap();
        header
    }

    fn same(a: &CacheMeta, b: &CacheMeta) {
        assert_eq!(a.fresh_until(), b.fresh_until());
        assert_eq!(a.created(), b.created());
        assert_eq!(a.updated(), b.updated());
        assert_eq!(a.provenance(), b.provenance());
        assert_eq!(a.epoch(), b.epoch());
        assert_eq!(a.stale_while_revalidate_sec(), b.stale_while_revalidate_sec());
        assert_eq!(a.stale_if_error_sec(), b.stale_if_error_sec());
        assert_eq!(a.variance(), b.variance());
        assert_eq!(a.response_header().status, b.response_header().status);
        assert_eq!(a.headers(), b.headers());
    }

    #[test]
    fn a_stored_meta_rebuilds_the_same_meta_kept_parsed_or_serialised() {
        let created = SystemTime::now() - Duration::from_secs(3);
        let mut fresh = CacheMeta::new(created + Duration::from_secs(5), created, 10, 60, header());
        fresh.set_variance([7; 16]);
        fresh.set_epoch_override(created + Duration::from_secs(1));
        let stored = StoredMeta::new(&fresh).unwrap();
        assert!(matches!(stored, StoredMeta::Parts { .. }));
        same(&fresh, &stored.meta().unwrap());

        // A revalidated entry's `updated` moves past `created`: its internal form keeps that, and
        // its header stays parsed (decompressing it on every hit was the steady-state hit cost).
        let mut revalidated = CacheMeta::new(created + Duration::from_secs(5), created, 0, 0, header());
        revalidated.update_freshness(SystemTime::now() + Duration::from_secs(5), 0, 0);
        let stored = StoredMeta::new(&revalidated).unwrap();
        assert!(matches!(stored, StoredMeta::Revalidated { .. }));
        same(&revalidated, &stored.meta().unwrap());
        // And stays exact when read again (the placeholder header never leaks into a hit).
        let again = stored.meta().unwrap();
        same(&revalidated, &again);
        assert_eq!(again.headers().get("etag").unwrap(), "\"v1\"");
    }
}
