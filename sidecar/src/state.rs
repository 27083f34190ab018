//! What the proxy shares across requests: the fixed parts (metrics, the instance pool, the cache
//! storage and lock) and the reloadable parts (`Live`), swapped whole on SIGHUP or a file change
//! so a request sees one consistent configuration from start to end.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use mall_sidecar_config::SidecarConfig;
use pingora_cache::lock::{CacheKeyLockImpl, CacheLock};
use pingora_cache::predictor::{CacheablePredictor, Predictor};

use crate::cache::store::MemoryStore;
use crate::cache::CachePolicy;
use crate::limits::Limiter;
use crate::metrics::Metrics;
use crate::upstreams::Pool;

/// The reloadable configuration and what is compiled from it.
pub struct Live {
    pub config: SidecarConfig,
    pub cache: CachePolicy,
    pub limiter: Limiter,
    /// The waiting room, when enabled (its local line starts afresh on a reload).
    pub waiting_room: Option<crate::waiting_room::Room>,
    /// Route prefixes used as the `route` metric label (bounded, unlike raw paths).
    pub routes: Vec<Arc<str>>,
    /// The label of a path no route matches.
    pub other_route: Arc<str>,
    /// The instance in this pod and the Unix socket it is reached through (`upstream.local`).
    pub local: Option<(mall_sidecar_config::LocalAddress, String)>,
}

impl Live {
    pub fn new(config: SidecarConfig, metrics: Arc<Metrics>) -> Self {
        let mut routes: Vec<String> = config.cache.rules.iter().map(|r| r.path_prefix.clone()).collect();
        routes.extend(config.rate_limit.rules.iter().map(|r| r.path_prefix.clone()));
        routes.sort();
        routes.dedup();
        Live {
            cache: CachePolicy::new(&config.cache),
            limiter: Limiter::new(&config.rate_limit, metrics.clone()),
            waiting_room: crate::waiting_room::Room::new(&config.waiting_room, metrics),
            routes: routes.into_iter().map(Arc::from).collect(),
            other_route: Arc::from("other"),
            local: config.upstream.local.as_ref().and_then(|local| {
                let address = local.resolve(pod_ip().as_deref());
                if address.is_none() {
                    tracing::warn!(
                        socket = %local.socket,
                        "upstream.local names no instance (no address, and POD_IP unset or not an address): no instance is reached through the socket"
                    );
                }
                Some((address?, local.socket.clone()))
            }),
            config,
        }
    }
}

/// This pod's address (Kubernetes' downward API), which names the pod's own app.
fn pod_ip() -> Option<String> {
    std::env::var("POD_IP").ok()
}

pub struct Shared {
    pub metrics: Arc<Metrics>,
    pub pool: Arc<Pool>,
    pub discovery: crate::discovery::Discovery,
    pub store: &'static MemoryStore,
    pub cache_lock: &'static CacheKeyLockImpl,
    /// Remembers keys whose responses were not cacheable, so later requests for them skip the
    /// cache lock instead of queueing behind each other.
    pub predictor: &'static (dyn CacheablePredictor + Sync),
    pub live: ArcSwap<Live>,
    pub config_path: Option<PathBuf>,
    pub in_flight: AtomicUsize,
    pub draining: AtomicBool,
    /// The highest `Mall-Seq` a successful write through this sidecar was answered with: sent on
    /// every read as `Mall-Min-Seq`, so whichever instance answers it has applied that write.
    pub write_seq: std::sync::atomic::AtomicI64,
    /// Spans of sampled requests go here (OTEL_* variables; `None`: tracing off).
    pub tracer: Option<mall_telemetry::Exporter>,
    /// The slowest sampled request of the last minute, for the dashboard's link to its trace.
    pub slowest_traced: crate::trace::SlowestTraced,
    /// Wakes the DNS loop when a reload changes what it looks up (a canary added or renamed).
    pub rediscover: tokio::sync::Notify,
}

impl Shared {
    pub fn new(
        config: SidecarConfig,
        config_path: Option<PathBuf>,
        tracer: Option<mall_telemetry::Exporter>,
    ) -> Arc<Self> {
        let metrics = Arc::new(Metrics::new());
        let slowest_traced = crate::trace::SlowestTraced::new();
        if let Some(t) = &tracer {
            metrics.register(t.stats.collector());
            metrics.register(slowest_traced.collector());
        }
        // The storage and lock live as long as the process: pingora-cache takes `&'static`.
        let store: &'static MemoryStore = Box::leak(Box::new(MemoryStore::new(config.cache.max_bytes)));
        let cache_lock: &'static CacheLock = Box::leak(CacheLock::new_boxed(std::time::Duration::from_millis(
            config.cache.lock_timeout_ms,
        )));
        let predictor: &'static Predictor<16> = Box::leak(Box::new(Predictor::new(1024, None)));
        Arc::new(Shared {
            predictor,
            pool: Arc::new(Pool::new(
                &config.upstream,
                config.upstream.own_app(pod_ip().as_deref()),
                metrics.clone(),
            )),
            discovery: crate::discovery::Discovery::new(metrics.clone()),
            live: ArcSwap::from_pointee(Live::new(config, metrics.clone())),
            metrics,
            store,
            cache_lock,
            config_path,
            write_seq: Default::default(),
            tracer,
            slowest_traced,
            rediscover: tokio::sync::Notify::new(),
            in_flight: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
        })
    }

    /// Purges the cache entries carrying any of `tags`, counted under `source`.
    pub fn invalidate<'a>(&self, source: &str, tags: impl IntoIterator<Item = &'a str>) -> u64 {
        let purged = self.store.purge_tags(tags);
        self.metrics.cache_invalidations.with_label_values(&[source]).inc();
        self.metrics
            .cache_invalidated_entries
            .with_label_values(&[source])
            .inc_by(purged);
        purged
    }

    /// Re-reads the file; on success swaps limits, cache rules and upstreams in place. Listening
    /// addresses, threads and the cache size need a restart, and say so.
    pub fn reload(&self) -> Result<(), String> {
        let Some(path) = &self.config_path else {
            return Err("no configuration file to reload".into());
        };
        let loaded = SidecarConfig::load(path);
        let config = match loaded {
            Ok(config) => config,
            Err(e) => {
                self.metrics.config_reloads.with_label_values(&["error"]).inc();
                tracing::error!(error = %e, "configuration reload rejected; keeping the running configuration");
                return Err(e.to_string());
            }
        };
        let current = self.live.load();
        if config == current.config {
            return Ok(());
        }
        let old = &current.config;
        if config.server != old.server || config.cache.max_bytes != old.cache.max_bytes {
            tracing::warn!("server.* and cache.max_bytes changes take effect after a restart");
        }
        self.pool
            .reconfigure(&config.upstream, config.upstream.own_app(pod_ip().as_deref()));
        let names = |u: &mall_sidecar_config::Upstream| {
            (
                u.dns.as_ref().map(|d| (d.name.clone(), d.port)),
                u.canary.as_ref().map(|c| c.dns_name.clone()),
            )
        };
        let look_again = names(&config.upstream) != names(&old.upstream);
        self.live.store(Arc::new(Live::new(config, self.metrics.clone())));
        if look_again {
            self.rediscover.notify_one();
        }
        self.metrics.config_reloads.with_label_values(&["ok"]).inc();
        tracing::info!(path = %path.display(), "configuration reloaded");
        Ok(())
    }

    /// Ready: not draining and at least one instance takes traffic.
    pub fn ready(&self) -> bool {
        !self.draining.load(Ordering::Relaxed) && self.pool.any_available()
    }
}

/// A short unique id for requests that arrive without `X-Request-Id`.
pub fn new_request_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static BASE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let base = BASE.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        (nanos as u64) ^ ((std::process::id() as u64) << 40)
    });
    let next = NEXT.fetch_add(1, Ordering::Relaxed) as u32;
    // `{base:016x}{next:08x}`, without the formatting machinery (one per request).
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = [0u8; 24];
    for (i, byte) in id[..16].iter_mut().enumerate() {
        *byte = HEX[((base >> (60 - 4 * i)) & 0xf) as usize];
    }
    for (i, byte) in id[16..].iter_mut().enumerate() {
        *byte = HEX[((next >> (28 - 4 * i)) & 0xf) as usize];
    }
    id.iter().map(|&b| b as char).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_ids_are_24_hex_digits_and_differ() {
        let (a, b) = (super::new_request_id(), super::new_request_id());
        assert_eq!(a.len(), 24);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(a, b);
        assert_eq!(a[..16], b[..16], "one process, one base");
        let (x, y) = (
            u32::from_str_radix(&a[16..], 16).unwrap(),
            u32::from_str_radix(&b[16..], 16).unwrap(),
        );
        assert!(y > x, "a counter after the base");
    }
}
