//! The production in-memory cache storage behind pingora-cache: a moka (TinyLFU) table bounded in
//! bytes of header + body, so a flood of one-off URLs cannot push out the hot products. Objects are
//! written whole when the upstream response ends; concurrent misses wait on pingora's cache lock
//! instead of reading a partial write (pingora's own `MemCache` is for tests only).

use std::any::Any;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use moka::sync::Cache;
use pingora_cache::key::{CacheHashKey, HashBinary};
use pingora_cache::storage::{
    HandleHit, HandleMiss, HitHandler, MissFinishType, MissHandler, PurgeOutcome, PurgeTarget, PurgeType,
};
use pingora_cache::trace::SpanHandle;
use pingora_cache::{CacheKey, CacheMeta, Storage};
use pingora_error::{ErrorType, OrErr, Result};

struct Object {
    meta: (Vec<u8>, Vec<u8>),
    body: Bytes,
}

impl Object {
    fn weight(&self) -> u32 {
        // A fixed overhead per entry keeps millions of empty bodies from looking free.
        (self.meta.0.len() + self.meta.1.len() + self.body.len() + 128).min(u32::MAX as usize) as u32
    }
}

pub struct MemoryStore {
    objects: Cache<HashBinary, Arc<Object>>,
}

impl MemoryStore {
    pub fn new(max_bytes: u64) -> Self {
        MemoryStore {
            objects: Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_, o: &Arc<Object>| o.weight())
                .build(),
        }
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
        let meta = CacheMeta::deserialize(&object.meta.0, &object.meta.1)?;
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
            meta: meta.serialize()?,
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
        let updated = Arc::new(Object {
            meta: meta.serialize()?,
            body: old.body.clone(),
        });
        self.objects.insert(hash, updated);
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
    meta: (Vec<u8>, Vec<u8>),
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
        };
        let size = object.weight() as usize;
        u32::try_from(size).or_err(ErrorType::InternalError, "object too large")?;
        self.store.objects.insert(self.key, Arc::new(object));
        Ok(MissFinishType::Created(size))
    }
}
