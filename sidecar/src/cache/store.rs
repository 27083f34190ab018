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
use std::sync::{Arc, OnceLock};
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
    /// What a fresh hit needs to be answered without pingora-cache; `None` for an entry only
    /// pingora's path may serve (it varies on request headers, or has no `Content-Length`).
    fast: Option<Fast>,
}

/// A content coding the sidecar keeps a compressed copy of an entry in (RFC 9110 8.4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coding {
    Gzip,
    Zstd,
    /// Brotli (RFC 7932), for fresh hits only: the copy is made here, once per entry, as one
    /// finished stream. Misses stream through pingora's compression, whose brotli encoder flushes
    /// without finishing the stream (pingora issue #1013), so they never get br.
    Br,
}

impl Coding {
    /// The coding a (negotiated, single-token) `Accept-Encoding` value names.
    pub fn from_token(token: &[u8]) -> Option<Coding> {
        match token {
            b"gzip" => Some(Coding::Gzip),
            b"zstd" => Some(Coding::Zstd),
            b"br" => Some(Coding::Br),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Coding::Gzip => "gzip",
            Coding::Zstd => "zstd",
            Coding::Br => "br",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// The whole of `body` in this coding, as one complete stream (gzip trailer, zstd frame end).
    fn encode(self, body: &[u8], level: u32) -> std::io::Result<Vec<u8>> {
        match self {
            Coding::Gzip => {
                use std::io::Write;
                let mut encoder =
                    flate2::write::GzEncoder::new(Vec::with_capacity(body.len() / 4), flate2::Compression::new(level));
                encoder.write_all(body)?;
                encoder.finish()
            }
            Coding::Zstd => zstd::bulk::compress(body, level as i32),
            Coding::Br => {
                use std::io::Write;
                let params = brotli::enc::BrotliEncoderParams {
                    quality: brotli_quality(level),
                    // Windows past the body's size buy nothing; 2^22 bounds the decoder's memory.
                    lgwin: 22,
                    size_hint: body.len(),
                    ..Default::default()
                };
                let out = Vec::with_capacity(body.len() / 4);
                let mut encoder = brotli::CompressorWriter::with_params(out, 4096, &params);
                encoder.write_all(body)?;
                // `into_inner` finishes the stream (ISLAST), where a flush would leave it open.
                Ok(encoder.into_inner())
            }
        }
    }
}

/// Brotli's quality for compression level `level` (gzip's 1..=9 scale): the copy is made once per
/// entry, so it gets more effort than a streamed response would (level 6 is quality 9; brotli's
/// 10 and 11 cost tens of times more for a few per cent).
fn brotli_quality(level: u32) -> i32 {
    (level as i32 + 3).clamp(1, 9)
}

/// A fresh hit's answer, kept with the entry: the header as clients get it (no tags, HTTP/1.1)
/// and, made on the first request that asks for each, the body in each coding with its header.
struct Fast {
    fresh_until: SystemTime,
    /// What `Age` counts from (RFC 9111 4.2.3): pingora's epoch (the last update, or its override).
    epoch: SystemTime,
    header: ResponseHeader,
    variants: [OnceLock<Variant>; 3],
}

/// An entry's body in one coding, made once at one compression level.
pub struct Variant {
    pub level: u32,
    pub header: ResponseHeader,
    pub body: Bytes,
}

impl Fast {
    fn new(meta: &CacheMeta) -> Option<Fast> {
        let header = meta.response_header();
        // Only pingora's path looks up variants of a response that varies on request headers
        // (`Accept-Encoding` aside: the stored bytes are identity and the coding is ours).
        let varies = meta.variance().is_some()
            || header.headers.get_all(http::header::VARY).iter().any(|v| {
                v.as_bytes()
                    .split(|b| *b == b',')
                    .map(<[u8]>::trim_ascii)
                    .any(|name| !name.is_empty() && !name.eq_ignore_ascii_case(b"accept-encoding"))
            });
        let sized = header.headers.contains_key(http::header::CONTENT_LENGTH)
            && !header.headers.contains_key(http::header::TRANSFER_ENCODING);
        if varies || !sized || matches!(header.status.as_u16(), 204 | 304) {
            return None;
        }
        let mut header = header.clone();
        header.remove_header(TAG_HEADER);
        header.set_version(http::Version::HTTP_11);
        // A stored 200 can be served in ranges (through pingora's path, which a `Range` request
        // takes), and pingora's hits say so, as nginx's do (RFC 9110 14.3).
        if header.status == http::StatusCode::OK {
            header.insert_header(http::header::ACCEPT_RANGES, "bytes").ok()?;
        }
        Some(Fast {
            fresh_until: meta.fresh_until(),
            epoch: meta.epoch(),
            header,
            variants: Default::default(),
        })
    }
}

/// A fresh entry, to be answered from the store (see `MallProxy`'s fast path).
pub struct FreshHit(Arc<Object>);

impl FreshHit {
    fn fast(&self) -> &Fast {
        self.0.fast.as_ref().expect("a fresh hit has its fast form")
    }

    /// The stored response header as clients get it, identity coded.
    pub fn header(&self) -> &ResponseHeader {
        &self.fast().header
    }

    pub fn body(&self) -> &Bytes {
        &self.0.body
    }

    /// Seconds of freshness left (the `ttl` of RFC 9211's `Cache-Status`).
    pub fn ttl(&self, now: SystemTime) -> u64 {
        self.fast()
            .fresh_until
            .duration_since(now)
            .map_or(0, |left| left.as_secs())
    }

    /// The `Age` to send (RFC 9111 5.1).
    pub fn age(&self, now: SystemTime) -> u64 {
        now.duration_since(self.fast().epoch).map_or(0, |age| age.as_secs())
    }

    /// The body in `coding` at `level`, and whether this call made it. Made once per entry and
    /// coding, by the first request that asks (a second request racing it makes its own copy
    /// and the first one kept wins); a request at another level (after a reload) gets a copy
    /// made for it alone. `None` if encoding failed.
    pub fn variant(&self, coding: Coding, level: u32) -> Option<(VariantRef<'_>, bool)> {
        let slot = &self.fast().variants[coding.index()];
        if let Some(made) = slot.get().filter(|v| v.level == level) {
            return Some((VariantRef::Kept(made), false));
        }
        let variant = self.encode(coding, level)?;
        if slot.get().is_some() {
            return Some((VariantRef::Made(Box::new(variant)), true));
        }
        let _ = slot.set(variant);
        slot.get().map(|kept| (VariantRef::Kept(kept), true))
    }

    fn encode(&self, coding: Coding, level: u32) -> Option<Variant> {
        let body = coding.encode(&self.0.body, level).ok()?;
        Some(Variant {
            level,
            header: coded_header(self.header(), coding, body.len())?,
            body: Bytes::from(body),
        })
    }
}

/// `identity`'s header for the same content in `coding`, `length` bytes long.
fn coded_header(identity: &ResponseHeader, coding: Coding, length: usize) -> Option<ResponseHeader> {
    use http::header::{ACCEPT_RANGES, CONTENT_ENCODING, CONTENT_LENGTH, ETAG};
    let mut header = identity.clone();
    header.insert_header(CONTENT_ENCODING, coding.as_str()).ok()?;
    header.insert_header(CONTENT_LENGTH, length).ok()?;
    // Ranges of the identity bytes do not apply to these.
    header.remove_header(&ACCEPT_RANGES);
    // RFC 9110 8.8.1 and 8.8.3: another representation's validator is weak (as nginx's and
    // pingora's compression do: a strong tag is weakened, a malformed one dropped).
    if let Some(etag) = header.headers.get(ETAG).map(|v| v.as_bytes().to_vec()) {
        if etag.starts_with(b"\"") {
            header.insert_header(ETAG, [&b"W/"[..], &etag].concat()).ok()?;
        } else if !etag.starts_with(b"W/") {
            header.remove_header(&ETAG);
        }
    }
    Some(header)
}

/// A variant kept with the entry, or one made for a single response.
pub enum VariantRef<'a> {
    Kept(&'a Variant),
    Made(Box<Variant>),
}

impl std::ops::Deref for VariantRef<'_> {
    type Target = Variant;

    fn deref(&self) -> &Variant {
        match self {
            VariantRef::Kept(v) => v,
            VariantRef::Made(v) => v,
        }
    }
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

/// An object without its body: what a miss knows before the body arrives.
struct Head {
    meta: StoredMeta,
    tags: Box<[Box<str>]>,
    fast: Option<Fast>,
}

impl Head {
    fn new(meta: &CacheMeta) -> Result<Head> {
        Ok(Head {
            meta: StoredMeta::new(meta)?,
            tags: tags_of(meta.response_header()),
            fast: Fast::new(meta),
        })
    }
}

impl Object {
    fn new(head: Head, body: Bytes) -> Object {
        Object {
            meta: head.meta,
            body,
            tags: head.tags,
            fast: head.fast,
        }
    }

    fn weight(&self) -> u32 {
        // A fixed overhead per entry keeps millions of empty bodies from looking free. An entry
        // the fast path serves keeps a second header, ready for clients; a body that may be
        // compressed is weighed with room for its gzip, zstd and br copies and their headers,
        // made later (the three bodies together under half of JSON's size at the default level).
        let fast = self.fast.as_ref().map_or(0, |fast| {
            let header = header_bytes(&fast.header);
            let variants = if self.body.len() >= 1024 {
                self.body.len() / 2 + 3 * header
            } else {
                0
            };
            header + variants
        });
        (self.meta.bytes() + self.body.len() + fast + 128).min(u32::MAX as usize) as u32
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
        fixed + header_bytes(header)
    }
}

/// Roughly what a parsed header occupies.
fn header_bytes(header: &ResponseHeader) -> usize {
    header
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 32)
        .sum()
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

    /// The entry under `key` if it is fresh at `now` and may be answered without pingora-cache.
    pub fn fresh_hit(&self, key: &CacheKey, now: SystemTime) -> Option<FreshHit> {
        let object = self.objects.get(&key.combined_bin())?;
        let fast = object.fast.as_ref()?;
        // pingora's `CacheMeta::is_fresh`: fresh through the `fresh_until` instant.
        (fast.fresh_until >= now).then(|| FreshHit(object))
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
            head: Head::new(meta)?,
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
        let updated = Object::new(Head::new(meta)?, old.body.clone());
        // A revalidation keeps the body (RFC 9111 4.3.4): the compressed copies made of it still
        // hold, under the updated header.
        if let (Some(fast), Some(old_fast)) = (&updated.fast, &old.fast) {
            for coding in [Coding::Gzip, Coding::Zstd, Coding::Br] {
                let Some(kept) = old_fast.variants[coding.index()].get() else {
                    continue;
                };
                if let Some(header) = coded_header(&fast.header, coding, kept.body.len()) {
                    let _ = fast.variants[coding.index()].set(Variant {
                        level: kept.level,
                        header,
                        body: kept.body.clone(),
                    });
                }
            }
        }
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
    head: Head,
    body: BytesMut,
}

#[async_trait]
impl HandleMiss for Miss {
    async fn write_body(&mut self, data: Bytes, _eof: bool) -> Result<()> {
        self.body.extend_from_slice(&data);
        Ok(())
    }

    async fn finish(self: Box<Self>) -> Result<MissFinishType> {
        let object = Object::new(self.head, self.body.freeze());
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

    #[test]
    fn a_coded_copy_has_its_own_length_and_a_weak_validator() {
        let mut identity = header();
        identity.insert_header("content-length", "100").unwrap();
        identity.insert_header("accept-ranges", "bytes").unwrap();
        let gz = coded_header(&identity, Coding::Gzip, 40).unwrap();
        assert_eq!(gz.headers["content-encoding"], "gzip");
        assert_eq!(gz.headers["content-length"], "40");
        assert!(gz.headers.get("accept-ranges").is_none());
        assert_eq!(gz.headers["etag"], "W/\"v1\"");
        identity.insert_header("etag", "W/\"weak\"").unwrap();
        assert_eq!(
            coded_header(&identity, Coding::Zstd, 1).unwrap().headers["etag"],
            "W/\"weak\""
        );
        identity.insert_header("etag", "unquoted").unwrap();
        assert!(coded_header(&identity, Coding::Zstd, 1)
            .unwrap()
            .headers
            .get("etag")
            .is_none());
    }

    #[test]
    fn only_fresh_entries_that_do_not_vary_are_fast_hits_and_copies_are_made_once() {
        let store: &'static MemoryStore = Box::leak(Box::new(MemoryStore::new(1 << 20)));
        let body = Bytes::from(r#"{"products":[{"id":1,"name":"a thing"}]}"#.repeat(64));
        let now = SystemTime::now();
        let put = |path: &str, fresh_for: i64, extra: &[(&str, &str)]| {
            let mut h = header();
            h.insert_header("content-length", body.len()).unwrap();
            h.insert_header(TAG_HEADER, "product:1").unwrap();
            for (name, value) in extra {
                h.insert_header(name.to_string(), *value).unwrap();
            }
            let fresh_until = if fresh_for >= 0 {
                now + Duration::from_secs(fresh_for as u64)
            } else {
                now - Duration::from_secs((-fresh_for) as u64)
            };
            let meta = CacheMeta::new(fresh_until, now - Duration::from_secs(2), 10, 60, h);
            let key = CacheKey::new(path.as_bytes().to_vec(), "");
            store.insert(key.combined_bin(), Object::new(Head::new(&meta).unwrap(), body.clone()));
            key
        };
        let fresh = put("/fresh", 5, &[]);
        let expired = put("/expired", -1, &[]);
        let varies = put("/varies", 5, &[("vary", "Accept-Language")]);
        let coded = put("/coded", 5, &[("vary", "accept-encoding")]);

        assert!(store.fresh_hit(&expired, now).is_none(), "stale entries go to pingora");
        assert!(store.fresh_hit(&varies, now).is_none(), "so do entries that vary");
        assert!(
            store.fresh_hit(&coded, now).is_some(),
            "the coding is the sidecar's own"
        );
        let hit = store.fresh_hit(&fresh, now).unwrap();
        assert!(
            hit.header().headers.get(TAG_HEADER).is_none(),
            "tags never reach clients"
        );
        assert_eq!(hit.age(now), 2);
        assert_eq!(hit.ttl(now), 5);

        let (gz, made) = hit.variant(Coding::Gzip, 6).unwrap();
        assert!(made);
        let mut decoded = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz.body[..]), &mut decoded).unwrap();
        assert_eq!(decoded, body);
        assert_eq!(gz.header.headers["content-length"], gz.body.len().to_string().as_str());
        let again = store.fresh_hit(&fresh, now).unwrap();
        let (_, made) = again.variant(Coding::Gzip, 6).unwrap();
        assert!(!made, "the copy is kept with the entry");
        let (other_level, made) = again.variant(Coding::Gzip, 1).unwrap();
        assert!(
            made && matches!(other_level, VariantRef::Made(_)),
            "another level: a copy of its own"
        );
        let (zst, _) = again.variant(Coding::Zstd, 6).unwrap();
        assert_eq!(zstd::bulk::decompress(&zst.body, body.len()).unwrap(), body);
        let (br, made) = again.variant(Coding::Br, 6).unwrap();
        assert!(made);
        assert_eq!(br.header.headers["content-encoding"], "br");
        // (sidecar/tests decode br strictly; this reader stops at the stream's end.)
        let mut decoded = Vec::new();
        std::io::Read::read_to_end(&mut brotli::Decompressor::new(&br.body[..], 4096), &mut decoded).unwrap();
        assert_eq!(decoded, body);
    }
}
