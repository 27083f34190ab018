//! The sidecar's configuration: one TOML document, typed and validated here so that the sidecar
//! (which parses it) and the operator (which renders it into a ConfigMap) share one schema without
//! the operator pulling in pingora.
//!
//! Every number has a default with its reason next to it. Environment variables override any field:
//! `SIDECAR__CACHE__MAX_BYTES=1048576` sets `cache.max_bytes` (path segments joined by `__`, values
//! parsed as TOML and taken as a string when they do not parse).

mod net;

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub use net::Cidr;

/// The prefix of environment variables that override fields of the file.
pub const ENV_PREFIX: &str = "SIDECAR__";

/// A configuration that failed to load, naming the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("invalid `{field}`: {message}")]
    Invalid { field: String, message: String },
}

impl ConfigError {
    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The whole sidecar configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SidecarConfig {
    pub server: Server,
    pub upstream: Upstream,
    pub cache: Cache,
    pub compression: Compression,
    pub rate_limit: RateLimit,
    pub waiting_room: WaitingRoom,
    pub access_log: AccessLog,
}

/// Listening sockets, threads, request size limits and shutdown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    /// Where clients connect.
    pub listen: SocketAddr,
    /// `/metrics`, `/health` and `/ready`; keep it off the public Service.
    pub admin_listen: SocketAddr,
    /// Proxy worker threads; 0 means one per available CPU (the operator sets it from the CPU limit).
    pub threads: usize,
    /// In-flight requests get this long to finish on SIGTERM. Kubernetes kills at 30 s by default,
    /// so the default leaves room for the pod's preStop and the app's own drain.
    pub shutdown_grace_seconds: u64,
    /// On SIGTERM, `/ready` fails at once and the sidecar keeps accepting and serving for this
    /// long before it drains: in Kubernetes the pod leaves the Service's endpoints only after
    /// the signal, so connections keep arriving for a few seconds (the operator sets 5). 0 drains
    /// at once.
    #[serde(default)]
    pub shutdown_delay_seconds: u64,
    /// Largest request header block accepted; larger is 431.
    pub max_request_header_bytes: usize,
    /// Largest request body accepted; larger is 413 (the app's own default limit is 1 MiB).
    pub max_request_body_bytes: u64,
    /// How long an idle client keep-alive connection is kept.
    pub keepalive_timeout_seconds: u64,
    /// A request's whole header block must arrive within this long (from the accept for a new
    /// connection, from the request's first byte on a kept-alive one), else 408 and the
    /// connection is closed: a slowloris client cannot hold a connection by trickling bytes.
    pub request_header_timeout_seconds: u64,
    /// Bearer token that `POST /reload` and the profiles on the admin port require. Unset: the
    /// admin port is read-only (metrics, health, readiness) and only SIGHUP or a change of the
    /// file reloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<String>,
    /// Profiles on demand on the admin port: `GET /debug/pprof/profile?seconds=N` (CPU, pprof
    /// protobuf, 1..=60 s, one at a time) behind `admin_token`, which it requires. Off by default:
    /// a running profile interrupts the process 99 times a second to record a stack, and with it
    /// off the port answers 404.
    // Left out of the rendered TOML when off, so configurations written before it read the same.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub profiling: bool,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            listen: ([0, 0, 0, 0], 8080).into(),
            admin_listen: ([0, 0, 0, 0], 9901).into(),
            threads: 0,
            shutdown_grace_seconds: 20,
            shutdown_delay_seconds: 0,
            max_request_header_bytes: 16 * 1024,
            max_request_body_bytes: 1024 * 1024,
            keepalive_timeout_seconds: 60,
            request_header_timeout_seconds: 10,
            admin_token: None,
            profiling: false,
        }
    }
}

/// How app instances are found and chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Upstream {
    /// A static list of app instances. Used when `dns` is not set.
    pub servers: Vec<UpstreamServer>,
    /// A DNS name re-resolved periodically (a headless Service); replaces `servers` when set.
    pub dns: Option<DnsDiscovery>,
    /// The app instance in this pod, reached through a Unix domain socket instead of loopback TCP.
    /// With `dns`, it is an instance whatever DNS answers (see [`Upstream::own_app`]).
    pub local: Option<LocalInstance>,
    pub balance: Balance,
    /// Connecting to an instance gives up after this long (then the next instance is tried).
    pub connect_timeout_ms: u64,
    /// A response must start within this long; the app's slowest path (an order) is far below it.
    pub read_timeout_ms: u64,
    /// Idempotent requests (GET, HEAD, PUT, DELETE, OPTIONS) are retried on another instance this
    /// many times when the connection fails.
    pub retries: usize,
    /// Idle keep-alive connections kept to the instances, shared by all of them (in all: each
    /// proxy worker keeps an equal part).
    pub keepalive_pool_size: usize,
    pub health_check: HealthCheck,
    pub passive: PassiveEjection,
    /// A canary release in progress (the operator's `spec.rollout`): the instances of a second
    /// group, found by their own DNS name, take `percent` % of the requests this sidecar sends
    /// upstream; the rest (every other instance) is the stable group. Unset: one group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryGroup>,
}

/// The canary group of a release and its share of the requests.
///
/// Each sidecar sends `percent` % of its upstream requests to the canary instances and the rest to
/// the stable ones, choosing within a group by `balance`; a group with no instance available
/// gives its share to the other, so a canary that never becomes ready costs no request. Changing
/// `percent` (a reload, no restart) moves the split at once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanaryGroup {
    /// The canary instances' DNS name (their headless Service), on `upstream.dns`'s port and
    /// refresh interval. What it answers is canary; every other instance `upstream.dns` finds is
    /// stable. "No such name" (cluster DNS answers NXDOMAIN for a headless Service without
    /// ready pods) is an empty canary group, not a discovery failure.
    pub dns_name: String,
    /// Share of the requests for the canary group, 0..=100.
    pub percent: u8,
    /// Whether this pod's own app (`upstream.local`) is a canary instance: true in the canary
    /// pods. It decides the own app's group whatever DNS answers (also before the first lookup
    /// and while DNS is down).
    #[serde(default)]
    pub own_app_is_canary: bool,
}

impl Default for Upstream {
    fn default() -> Self {
        Upstream {
            servers: vec![UpstreamServer {
                address: "127.0.0.1:3000".into(),
                weight: 1,
            }],
            dns: None,
            local: None,
            balance: Balance::RoundRobin,
            connect_timeout_ms: 1_000,
            read_timeout_ms: 30_000,
            retries: 2,
            keepalive_pool_size: 128,
            health_check: HealthCheck::default(),
            passive: PassiveEjection::default(),
            canary: None,
        }
    }
}

/// One app instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamServer {
    /// `ip:port`.
    pub address: String,
    /// Relative share of traffic for `weighted`, `least_connections` and `consistent_hash`.
    #[serde(default = "one")]
    pub weight: usize,
}

fn one() -> usize {
    1
}

/// The instance that shares the sidecar's pod (or host), reached through a Unix domain socket: the
/// same app, listening on the socket as well (`MALL_LISTEN_SOCKET`). It stays in the pool under
/// its address (balancing, health checks and metrics are unchanged); only the connection differs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalInstance {
    /// The app's socket, in a volume both containers mount.
    pub socket: String,
    /// Which instance is the local one: `ip` (any port) or `ip:port`. Unset: the address in the
    /// `POD_IP` environment variable (Kubernetes' downward API); without either, none is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

impl LocalInstance {
    /// Which instance is local: `address`, else `pod_ip`; `None` when neither names one.
    pub fn resolve(&self, pod_ip: Option<&str>) -> Option<LocalAddress> {
        self.address.as_deref().or(pod_ip).and_then(parse_local_address)
    }
}

impl Upstream {
    /// The pod's own app as an instance of its own, whatever DNS answers: with `dns` and `local`
    /// set, `local.address` when it is `ip:port`, else that IP (or `pod_ip`) on `dns.port`.
    /// Discovery only adds peers to it, so a DNS outage, or a first lookup made before the
    /// headless Service lists this pod, never leaves the sidecar without an instance. `None` for
    /// a static list (which names every instance itself) or when no address is known.
    pub fn own_app(&self, pod_ip: Option<&str>) -> Option<SocketAddr> {
        let dns = self.dns.as_ref()?;
        match self.local.as_ref()?.resolve(pod_ip)? {
            LocalAddress::Exact(addr) => Some(addr),
            LocalAddress::Ip(ip) => Some(SocketAddr::new(ip, dns.port)),
        }
    }
}

/// The local instance's address: exactly `ip:port`, or an IP on any port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalAddress {
    Exact(std::net::SocketAddr),
    Ip(std::net::IpAddr),
}

impl LocalAddress {
    pub fn matches(&self, addr: std::net::SocketAddr) -> bool {
        match self {
            LocalAddress::Exact(exact) => *exact == addr,
            LocalAddress::Ip(ip) => *ip == addr.ip(),
        }
    }
}

fn parse_local_address(text: &str) -> Option<LocalAddress> {
    let text = text.trim();
    text.parse()
        .map(LocalAddress::Exact)
        .or_else(|_| text.parse().map(LocalAddress::Ip))
        .ok()
}

/// Instances found through DNS: every A/AAAA record of `name`, on `port`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsDiscovery {
    pub name: String,
    pub port: u16,
    /// Pods come and go; ten seconds matches the default headless-Service record TTL order.
    #[serde(default = "ten")]
    pub refresh_seconds: u64,
}

fn ten() -> u64 {
    10
}

/// The balancing algorithm.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Each instance in turn, weights ignored.
    RoundRobin,
    /// Round robin in proportion to `weight`.
    Weighted,
    /// Ketama hashing of the cache key, so each instance's in-process cache stays hot.
    ConsistentHash,
    /// The instance with the fewest requests in flight (relative to its weight).
    LeastConnections,
}

/// Active health checks: `GET path` on every instance every `interval_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheck {
    pub path: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Consecutive successes before an unhealthy instance takes traffic again.
    pub healthy_threshold: u32,
    /// Consecutive failures before an instance stops taking traffic.
    pub unhealthy_threshold: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        // `/ready`, not `/health`: the app fails `/ready` the moment it is told to stop and keeps
        // serving for its shutdown delay (5 s), so 2 failed checks a second apart take it out of
        // rotation before it closes its listener.
        HealthCheck {
            path: "/ready".into(),
            interval_ms: 1_000,
            timeout_ms: 1_000,
            healthy_threshold: 2,
            unhealthy_threshold: 2,
        }
    }
}

/// Passive ejection: an instance that refuses connections is taken out at once, without waiting
/// for the next active check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PassiveEjection {
    pub enabled: bool,
    /// Connection failures in a row that eject an instance.
    pub failures: u32,
    /// How long an ejected instance stays out (an active check success also brings it back).
    pub eject_seconds: u64,
}

impl Default for PassiveEjection {
    fn default() -> Self {
        PassiveEjection {
            enabled: true,
            failures: 1,
            eject_seconds: 10,
        }
    }
}

/// The response cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Cache {
    pub enabled: bool,
    /// Bytes of headers and bodies kept in memory; the least valuable entries are evicted (TinyLFU).
    /// Changing it needs a restart; every other cache field reloads.
    pub max_bytes: u64,
    /// Responses larger than this are passed through and not stored.
    pub max_object_bytes: usize,
    /// Concurrent misses on one key wait this long for the first one's response before going to the
    /// upstream themselves.
    pub lock_timeout_ms: u64,
    /// Serve a stale entry while one background request refreshes it, for this long after expiry.
    pub stale_while_revalidate_seconds: u32,
    /// Serve a stale entry when the upstream fails, for this long after expiry.
    pub stale_if_error_seconds: u32,
    /// Request headers that select a different cached body; they are part of the key and forwarded.
    /// Every other request header except the request id and tracing is dropped on cacheable
    /// requests, so no unkeyed header can change a cached body.
    pub key_headers: Vec<String>,
    /// Per-route rules; the first whose prefix matches applies. Routes without a rule are never
    /// cached (and never wait on the cache lock).
    pub rules: Vec<CacheRule>,
    pub purge: Purge,
    /// Fleet-wide invalidation through Redis (the app's `<prefix>:invalidate` channel). Without it
    /// a write reaching another pod's sidecar is seen here after the entry's max-age.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalidation: Option<CacheInvalidation>,
}

/// The app publishes the cache keys of every committed write on Redis `<prefix>:invalidate`
/// (`<prefix>:product:0:1002`); the sidecar subscribes and purges the entries tagged
/// `product:1002` (the app's `Surrogate-Key`), so a write through any pod reaches every sidecar.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheInvalidation {
    /// `redis://` or `rediss://` URL of the Redis the app publishes on.
    pub redis_url: String,
    /// The app's `MALL_REDIS_PREFIX`.
    #[serde(default = "default_invalidation_prefix")]
    pub prefix: String,
}

fn default_invalidation_prefix() -> String {
    "mall".into()
}

impl Default for Cache {
    fn default() -> Self {
        Cache {
            enabled: true,
            max_bytes: 64 * 1024 * 1024,
            max_object_bytes: 1024 * 1024,
            lock_timeout_ms: 3_000,
            stale_while_revalidate_seconds: 10,
            stale_if_error_seconds: 300,
            key_headers: Vec::new(),
            rules: CacheRule::seed_defaults(),
            purge: Purge::default(),
            invalidation: None,
        }
    }
}

/// A caching rule for the routes under `path_prefix`.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheRule {
    /// Requests whose normalised path starts with this use the rule (starts with `/`).
    #[cfg_attr(feature = "schema", schemars(regex(pattern = r"^/")))]
    pub path_prefix: String,
    /// Lifetime when the upstream's `Cache-Control` gives none; 0 caches only what the upstream
    /// gives a lifetime.
    pub ttl_seconds: u64,
    /// Use `ttl_seconds` even when the upstream gives a lifetime (`no-store` and `private` still win).
    #[serde(default)]
    pub override_upstream: bool,
    /// Cache responses to requests that carry `Authorization` or `Cookie` (shared by every caller).
    #[serde(default)]
    pub cache_authorized: bool,
}

impl CacheRule {
    /// Seed 000's categories: goods 10 min, users 30 min, orders 5 min. Users and orders are per
    /// caller and carry `Authorization`, so they are only cached if an operator says so.
    pub fn seed_defaults() -> Vec<CacheRule> {
        vec![CacheRule {
            path_prefix: "/api/products".into(),
            ttl_seconds: 600,
            override_upstream: false,
            cache_authorized: false,
        }]
    }
}

/// Who may purge: `PURGE /path` from an address in `allow_from`, or with `Authorization: Bearer
/// <token>` matching one of `tokens`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Purge {
    pub allow_from: Vec<Cidr>,
    pub tokens: Vec<String>,
}

impl Default for Purge {
    fn default() -> Self {
        Purge {
            allow_from: vec![
                "127.0.0.1/32".parse().expect("valid"),
                "::1/128".parse().expect("valid"),
            ],
            tokens: Vec::new(),
        }
    }
}

/// Response compression (zstd or gzip, as the client's Accept-Encoding q-values choose).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Compression {
    pub enabled: bool,
    /// Seed 000: compressing less than 1 KB saves little and costs a header and CPU.
    pub min_bytes: usize,
    /// 1 (fast) to 9 (small); 6 is gzip's own default balance.
    pub level: u32,
    /// Content types (prefix match, parameters ignored) worth compressing.
    pub content_types: Vec<String>,
}

impl Default for Compression {
    fn default() -> Self {
        Compression {
            enabled: true,
            min_bytes: 1024,
            level: 6,
            content_types: [
                "application/json",
                "text/",
                "application/javascript",
                "image/svg+xml",
                "application/xml",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

/// Rate limits (GCRA, a token bucket without a refill timer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimit {
    pub enabled: bool,
    /// What a limit counts per: the client address, or a request header (an API key, a user id).
    pub key: LimitKey,
    /// `X-Forwarded-For` is believed only from these peers (the ingress controller's addresses).
    /// Any peer in them can name its own limit key, so a range covering a whole shared block
    /// (`10.0.0.0/8`: every pod of most clusters) is refused unless `allow_broad_trusted_proxies`.
    pub trusted_proxies: Vec<Cidr>,
    /// The user insists on a trusted range covering a whole private block.
    pub allow_broad_trusted_proxies: bool,
    /// The first rule whose prefix (and method, when given) matches applies; no match, no limit.
    pub rules: Vec<LimitRule>,
    /// Limits shared by every pod through Redis; local limits take over while Redis is down.
    pub redis: Option<RedisLimits>,
    /// Besides the current IETF draft's `RateLimit-Policy` and `RateLimit` fields, also send the
    /// older drafts' `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset`, which many
    /// clients still read.
    pub legacy_headers: bool,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            enabled: true,
            key: LimitKey::ClientIp,
            trusted_proxies: Vec::new(),
            allow_broad_trusted_proxies: false,
            rules: vec![
                LimitRule {
                    name: "orders".into(),
                    path_prefix: "/api/orders".into(),
                    methods: vec!["POST".into()],
                    requests_per_second: 20.0,
                    burst: 40,
                },
                LimitRule {
                    name: "api".into(),
                    path_prefix: "/api/".into(),
                    methods: Vec::new(),
                    requests_per_second: 500.0,
                    burst: 1000,
                },
            ],
            redis: None,
            legacy_headers: true,
        }
    }
}

/// A waiting room in front of one route (the order path in a flash sale): while admissions
/// stay under `admit_per_second` requests pass; above it each new buyer gets a signed ticket and
/// is let through in arrival order at that rate, across every pod through Redis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WaitingRoom {
    pub enabled: bool,
    /// The route in front of which the room stands: this method and exactly this path.
    pub method: String,
    pub path: String,
    /// Admissions per second the route sustains (the whole fleet's budget).
    pub admit_per_second: f64,
    /// Admissions at once when nobody waits (a burst above the rate).
    pub burst: u32,
    /// How long after its turn a ticket is still honoured.
    pub ticket_ttl_seconds: u64,
    /// The HMAC-SHA256 key tickets are signed with (at least 32 bytes), the same on every pod:
    /// from a Secret (`SIDECAR__WAITING_ROOM__SECRET`).
    pub secret: String,
    /// The request header a ticket is bound to (whose value only its buyer sends). A buyer is
    /// the `sub` of an HS256 bearer token the room's `secret` verifies (the mall's tokens: one
    /// place per user, however often they log in), else the header's value. A request without
    /// the header takes no number: the room refuses it (401 with `authorization`, else 400).
    pub bind_header: String,
    /// How long after its turn a ticket's holder has to come back before the turn passes to the
    /// next buyer: numbers nobody uses do not consume the admission rate.
    pub no_show_grace_ms: u64,
    /// New numbers one client address may take per minute (after a burst of as many), judged by
    /// the rate limiter's trusted-proxy rules; per pod. 0: no limit. A buyer's repeat of its own
    /// place never counts.
    pub numbers_per_address_per_minute: u32,
    /// A buyer let through gets no new place for this long (429 `already_admitted`): one
    /// order per buyer in a sale, however many requests it sends. 0: a new place at once.
    pub readmit_after_seconds: u64,
    /// Answers that give a client nothing new (a refusal, or a ticketless repeat's own place
    /// again) are held about this long before they are sent (from half to one and a half of
    /// it, so clients that start together do not come back together): a bot that sends its
    /// next request when the last is answered is slowed to about one request per this per
    /// connection, at the cost of a timer, while an honest buyer's first answer and its
    /// admission are never held. 0: at once.
    pub refusal_delay_ms: u64,
    /// Shared admission through Redis; without it, or while Redis is down, each pod admits
    /// `admit_per_second / replicas` from a queue of its own.
    pub redis: Option<RoomRedis>,
    /// How many pods share the budget (the local fallback's divisor).
    pub replicas: u32,
}

impl Default for WaitingRoom {
    fn default() -> Self {
        WaitingRoom {
            enabled: false,
            method: "POST".into(),
            path: "/api/orders".into(),
            admit_per_second: 100.0,
            burst: 10,
            ticket_ttl_seconds: 60,
            secret: String::new(),
            bind_header: "authorization".into(),
            no_show_grace_ms: 2000,
            numbers_per_address_per_minute: 30,
            readmit_after_seconds: 60,
            refusal_delay_ms: 1000,
            redis: None,
            replicas: 1,
        }
    }
}

/// The Redis the waiting room keeps its counters in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoomRedis {
    pub url: String,
    #[serde(default = "default_room_prefix")]
    pub key_prefix: String,
    /// A Redis slower than this counts as down for that request (the local queue decides);
    /// after three such calls in a row over at least this long, for every request, a second at a
    /// time (the sidecar's `redis_breaker`).
    #[serde(default = "default_room_timeout")]
    pub timeout_ms: u64,
}

fn default_room_prefix() -> String {
    "sidecar:room".into()
}

fn default_room_timeout() -> u64 {
    100
}

/// The key a limit counts per.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitKey {
    ClientIp,
    /// A request header; requests without it are counted by client address.
    Header(String),
}

/// One limit.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitRule {
    /// Used in metrics and in the `RateLimit-Policy` header: `[A-Za-z0-9_-]`, unique.
    #[cfg_attr(
        feature = "schema",
        schemars(length(min = 1, max = 63), regex(pattern = r"^[A-Za-z0-9_-]+$"))
    )]
    pub name: String,
    /// Requests whose normalised path starts with this use the rule (starts with `/`).
    #[cfg_attr(feature = "schema", schemars(regex(pattern = r"^/")))]
    pub path_prefix: String,
    /// Empty means every method; otherwise upper-case methods such as `POST`.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(inner(regex(pattern = r"^[A-Z]+$"))))]
    pub methods: Vec<String>,
    /// Sustained rate per key (at least 0.001, one request per 1,000 s).
    #[cfg_attr(feature = "schema", schemars(range(min = 0.001)))]
    pub requests_per_second: f64,
    /// Requests a key may make at once above the sustained rate (at least 1).
    #[cfg_attr(feature = "schema", schemars(range(min = 1)))]
    pub burst: u32,
}

/// Global limits through Redis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisLimits {
    pub url: String,
    #[serde(default = "default_redis_prefix")]
    pub key_prefix: String,
    /// A Redis slower than this counts as down for that request (local limits decide); after
    /// three such calls in a row over at least this long, for every request, a second at a time
    /// (the sidecar's `redis_breaker`).
    #[serde(default = "default_redis_timeout")]
    pub timeout_ms: u64,
}

fn default_redis_prefix() -> String {
    "sidecar:rl".into()
}

fn default_redis_timeout() -> u64 {
    50
}

/// The JSON access log on stdout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLog {
    pub enabled: bool,
}

impl Default for AccessLog {
    fn default() -> Self {
        AccessLog { enabled: true }
    }
}

impl SidecarConfig {
    /// Reads, overrides from the process environment, and validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::from_toml_with_env(&text, &path.display().to_string(), std::env::vars())
    }

    /// Parses `text` (named `origin` in errors), applies `SIDECAR__*` overrides from `env`, and
    /// validates.
    pub fn from_toml_with_env(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::Parse {
            origin: origin.into(),
            message: e.to_string(),
        })?;
        for (var, value) in env {
            if let Some(path) = var.strip_prefix(ENV_PREFIX) {
                apply_override(&mut table, &var, path, &value)?;
            }
        }
        let config: SidecarConfig =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    origin: origin.into(),
                    message: e.to_string(),
                })?;
        config.validate()?;
        Ok(config)
    }

    /// Parses and validates without looking at the environment.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::from_toml_with_env(text, "config", std::iter::empty())
    }

    /// The document the sidecar reads: what the operator writes into the ConfigMap.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the config types serialise to TOML")
    }

    /// Checks what the types cannot: ranges, addresses, duplicates, cross-field rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if s.shutdown_grace_seconds == 0 || s.shutdown_grace_seconds >= 30 {
            return Err(ConfigError::invalid(
                "server.shutdown_grace_seconds",
                "must be 1..=29: Kubernetes kills the pod 30 s after SIGTERM",
            ));
        }
        if s.shutdown_delay_seconds + s.shutdown_grace_seconds >= 30 {
            return Err(ConfigError::invalid(
                "server.shutdown_delay_seconds",
                "plus shutdown_grace_seconds must stay under 30: Kubernetes kills the pod 30 s after SIGTERM",
            ));
        }
        if s.listen == s.admin_listen {
            return Err(ConfigError::invalid(
                "server.admin_listen",
                "must differ from server.listen",
            ));
        }
        if s.profiling && s.admin_token.as_deref().is_none_or(str::is_empty) {
            return Err(ConfigError::invalid(
                "server.profiling",
                "requires server.admin_token: profiles are served only to its bearer",
            ));
        }
        if s.max_request_header_bytes < 1024 {
            return Err(ConfigError::invalid(
                "server.max_request_header_bytes",
                "must be at least 1024",
            ));
        }
        if !(1..=300).contains(&s.request_header_timeout_seconds) {
            return Err(ConfigError::invalid(
                "server.request_header_timeout_seconds",
                "must be 1..=300",
            ));
        }
        if s.max_request_body_bytes == 0 {
            return Err(ConfigError::invalid(
                "server.max_request_body_bytes",
                "must be positive",
            ));
        }

        let u = &self.upstream;
        match &u.dns {
            Some(dns) => {
                if dns.name.trim().is_empty() {
                    return Err(ConfigError::invalid("upstream.dns.name", "must not be empty"));
                }
                if dns.port == 0 {
                    return Err(ConfigError::invalid("upstream.dns.port", "must be 1..=65535"));
                }
                if dns.refresh_seconds == 0 {
                    return Err(ConfigError::invalid("upstream.dns.refresh_seconds", "must be positive"));
                }
            }
            None if u.servers.is_empty() => {
                return Err(ConfigError::invalid(
                    "upstream.servers",
                    "list at least one `ip:port`, or set upstream.dns",
                ))
            }
            None => {}
        }
        if let Some(canary) = &u.canary {
            if u.dns.is_none() {
                return Err(ConfigError::invalid(
                    "upstream.canary",
                    "needs upstream.dns: the stable group is what upstream.dns finds beyond the canary's name",
                ));
            }
            if canary.dns_name.trim().is_empty() {
                return Err(ConfigError::invalid("upstream.canary.dns_name", "must not be empty"));
            }
            if canary.percent > 100 {
                return Err(ConfigError::invalid("upstream.canary.percent", "must be 0..=100"));
            }
        }
        if let Some(local) = &u.local {
            // sun_path holds 108 bytes with the terminating NUL.
            if !local.socket.starts_with('/') || local.socket.len() > 107 {
                return Err(ConfigError::invalid(
                    "upstream.local.socket",
                    "must be an absolute path of at most 107 bytes",
                ));
            }
            if let Some(address) = &local.address {
                if parse_local_address(address).is_none() {
                    return Err(ConfigError::invalid(
                        "upstream.local.address",
                        format!("`{address}` is neither `ip` nor `ip:port`"),
                    ));
                }
            }
        }
        let mut seen = HashSet::new();
        for (i, server) in u.servers.iter().enumerate() {
            let addr: SocketAddr = server.address.parse().map_err(|_| {
                ConfigError::invalid(
                    format!("upstream.servers[{i}].address"),
                    format!("`{}` is not ip:port", server.address),
                )
            })?;
            if !seen.insert(addr) {
                return Err(ConfigError::invalid(
                    format!("upstream.servers[{i}].address"),
                    "listed twice",
                ));
            }
            if server.weight == 0 || server.weight > 1000 {
                return Err(ConfigError::invalid(
                    format!("upstream.servers[{i}].weight"),
                    "must be 1..=1000",
                ));
            }
        }
        positive("upstream.connect_timeout_ms", u.connect_timeout_ms)?;
        positive("upstream.read_timeout_ms", u.read_timeout_ms)?;
        if u.retries > 10 {
            return Err(ConfigError::invalid("upstream.retries", "must be 0..=10"));
        }
        let h = &u.health_check;
        if !h.path.starts_with('/') {
            return Err(ConfigError::invalid(
                "upstream.health_check.path",
                "must start with `/`",
            ));
        }
        positive("upstream.health_check.interval_ms", h.interval_ms)?;
        positive("upstream.health_check.timeout_ms", h.timeout_ms)?;
        positive("upstream.health_check.healthy_threshold", h.healthy_threshold.into())?;
        positive(
            "upstream.health_check.unhealthy_threshold",
            h.unhealthy_threshold.into(),
        )?;
        if u.passive.enabled {
            positive("upstream.passive.failures", u.passive.failures.into())?;
            positive("upstream.passive.eject_seconds", u.passive.eject_seconds)?;
        }

        let c = &self.cache;
        if c.enabled {
            if c.max_bytes < 1024 * 1024 {
                return Err(ConfigError::invalid("cache.max_bytes", "must be at least 1 MiB"));
            }
            if c.max_object_bytes == 0 || c.max_object_bytes as u64 > c.max_bytes / 4 {
                return Err(ConfigError::invalid(
                    "cache.max_object_bytes",
                    "must be positive and at most max_bytes / 4",
                ));
            }
            positive("cache.lock_timeout_ms", c.lock_timeout_ms)?;
        }
        for (i, name) in c.key_headers.iter().enumerate() {
            if http_token(name).is_none() {
                return Err(ConfigError::invalid(
                    format!("cache.key_headers[{i}]"),
                    format!("`{name}` is not a header name"),
                ));
            }
        }
        for (i, rule) in c.rules.iter().enumerate() {
            if !rule.path_prefix.starts_with('/') {
                return Err(ConfigError::invalid(
                    format!("cache.rules[{i}].path_prefix"),
                    "must start with `/`",
                ));
            }
        }
        if let Some(inv) = &c.invalidation {
            if !(inv.redis_url.starts_with("redis://") || inv.redis_url.starts_with("rediss://")) {
                return Err(ConfigError::invalid(
                    "cache.invalidation.redis_url",
                    "must start with redis:// or rediss://",
                ));
            }
            if inv.prefix.is_empty() || inv.prefix.contains(char::is_whitespace) {
                return Err(ConfigError::invalid(
                    "cache.invalidation.prefix",
                    "must be non-empty, without spaces",
                ));
            }
        }
        for (i, token) in c.purge.tokens.iter().enumerate() {
            if token.len() < 16 {
                return Err(ConfigError::invalid(
                    format!("cache.purge.tokens[{i}]"),
                    "must be at least 16 characters",
                ));
            }
        }

        let z = &self.compression;
        if !(1..=9).contains(&z.level) {
            return Err(ConfigError::invalid("compression.level", "must be 1..=9"));
        }
        if z.enabled && z.content_types.is_empty() {
            return Err(ConfigError::invalid(
                "compression.content_types",
                "must list at least one type when enabled",
            ));
        }

        let w = &self.waiting_room;
        if w.enabled {
            if w.secret.len() < 32 {
                return Err(ConfigError::invalid(
                    "waiting_room.secret",
                    "must be at least 32 bytes when waiting_room.enabled (set SIDECAR__WAITING_ROOM__SECRET from a Secret)",
                ));
            }
            if !(w.admit_per_second >= 0.001 && w.admit_per_second.is_finite()) {
                return Err(ConfigError::invalid(
                    "waiting_room.admit_per_second",
                    "must be at least 0.001",
                ));
            }
            if !w.path.starts_with('/') {
                return Err(ConfigError::invalid("waiting_room.path", "must start with `/`"));
            }
            if w.method.is_empty() || !w.method.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(ConfigError::invalid(
                    "waiting_room.method",
                    "must be an upper-case method such as POST",
                ));
            }
            if w.replicas == 0 {
                return Err(ConfigError::invalid("waiting_room.replicas", "must be at least 1"));
            }
            if w.burst == 0 {
                return Err(ConfigError::invalid("waiting_room.burst", "must be at least 1"));
            }
            if !(1..=86_400).contains(&w.ticket_ttl_seconds) {
                return Err(ConfigError::invalid(
                    "waiting_room.ticket_ttl_seconds",
                    "must be 1..=86400",
                ));
            }
            if !(100..=600_000).contains(&w.no_show_grace_ms) {
                return Err(ConfigError::invalid(
                    "waiting_room.no_show_grace_ms",
                    "must be 100..=600000: a buyer needs a moment to come back when its turn comes",
                ));
            }
            if w.refusal_delay_ms > 10_000 {
                return Err(ConfigError::invalid(
                    "waiting_room.refusal_delay_ms",
                    "must be 0..=10000: a held answer keeps its connection open",
                ));
            }
            if http_token(&w.bind_header).is_none() {
                return Err(ConfigError::invalid(
                    "waiting_room.bind_header",
                    "must be a header name",
                ));
            }
            if let Some(r) = &w.redis {
                if !(r.url.starts_with("redis://") || r.url.starts_with("rediss://")) {
                    return Err(ConfigError::invalid(
                        "waiting_room.redis.url",
                        "must start with redis:// or rediss://",
                    ));
                }
            }
        }

        let r = &self.rate_limit;
        if let LimitKey::Header(name) = &r.key {
            if http_token(name).is_none() {
                return Err(ConfigError::invalid(
                    "rate_limit.key.header",
                    format!("`{name}` is not a header name"),
                ));
            }
        }
        if !r.allow_broad_trusted_proxies {
            for (i, range) in r.trusted_proxies.iter().enumerate() {
                if let Some(block) = range.whole_shared_block() {
                    return Err(ConfigError::invalid(
                        format!("rate_limit.trusted_proxies[{i}]"),
                        format!(
                            "`{range}` covers all of {block}, where pods and nodes get their addresses: any of \
                             them could choose its own rate-limit key with X-Forwarded-For. Name the ingress \
                             controller's addresses, or set allow_broad_trusted_proxies = true to insist"
                        ),
                    ));
                }
            }
        }
        let mut names = HashSet::new();
        for (i, rule) in r.rules.iter().enumerate() {
            if rule.name.is_empty()
                || !rule
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(ConfigError::invalid(
                    format!("rate_limit.rules[{i}].name"),
                    "must be non-empty [A-Za-z0-9_-]",
                ));
            }
            if !names.insert(rule.name.as_str()) {
                return Err(ConfigError::invalid(
                    format!("rate_limit.rules[{i}].name"),
                    "used twice",
                ));
            }
            if !rule.path_prefix.starts_with('/') {
                return Err(ConfigError::invalid(
                    format!("rate_limit.rules[{i}].path_prefix"),
                    "must start with `/`",
                ));
            }
            if !(rule.requests_per_second.is_finite() && rule.requests_per_second > 0.0) {
                return Err(ConfigError::invalid(
                    format!("rate_limit.rules[{i}].requests_per_second"),
                    "must be positive",
                ));
            }
            if rule.burst == 0 {
                return Err(ConfigError::invalid(
                    format!("rate_limit.rules[{i}].burst"),
                    "must be at least 1",
                ));
            }
            for (j, method) in rule.methods.iter().enumerate() {
                if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
                    return Err(ConfigError::invalid(
                        format!("rate_limit.rules[{i}].methods[{j}]"),
                        "must be an upper-case method such as POST",
                    ));
                }
            }
        }
        if let Some(redis) = &r.redis {
            if !(redis.url.starts_with("redis://") || redis.url.starts_with("rediss://")) {
                return Err(ConfigError::invalid(
                    "rate_limit.redis.url",
                    "must start with redis:// or rediss://",
                ));
            }
            positive("rate_limit.redis.timeout_ms", redis.timeout_ms)?;
        }
        Ok(())
    }
}

fn positive(field: &str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        Err(ConfigError::invalid(field, "must be positive"))
    } else {
        Ok(())
    }
}

/// `Some(name)` when `name` is a valid HTTP header name.
fn http_token(name: &str) -> Option<&str> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    ok.then_some(name)
}

/// Sets `path` (segments separated by `__`, case-insensitive) in `table` to `raw`.
fn apply_override(table: &mut toml::Table, var: &str, path: &str, raw: &str) -> Result<(), ConfigError> {
    let segments: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
    if segments.iter().any(String::is_empty) {
        return Err(ConfigError::Env {
            var: var.into(),
            message: "empty path segment".into(),
        });
    }
    // `SIDECAR__X=5` is the integer 5, `[1, 2]` an array, anything that is not TOML a string.
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let (last, parents) = segments.split_last().expect("at least one segment");
    let mut node = table;
    for segment in parents {
        let entry = node
            .entry(segment.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = match entry {
            toml::Value::Table(t) => t,
            _ => {
                return Err(ConfigError::Env {
                    var: var.into(),
                    message: format!("`{segment}` is not a section"),
                })
            }
        };
    }
    node.insert(last.clone(), value);
    Ok(())
}

impl fmt::Display for Balance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Balance::RoundRobin => "round_robin",
            Balance::Weighted => "weighted",
            Balance::ConsistentHash => "consistent_hash",
            Balance::LeastConnections => "least_connections",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        SidecarConfig::from_toml(text).unwrap_err().to_string()
    }

    #[test]
    fn defaults_are_valid_and_round_trip() {
        let config = SidecarConfig::default();
        config.validate().unwrap();
        let text = config.to_toml();
        assert_eq!(SidecarConfig::from_toml(&text).unwrap(), config);
        assert_eq!(SidecarConfig::from_toml("").unwrap(), config);
    }

    #[test]
    fn the_documented_example_is_valid_and_in_the_readme() {
        let example = include_str!("../../sidecar/sidecar.example.toml");
        let config = SidecarConfig::from_toml(example).unwrap();
        assert_eq!(config.upstream.balance, Balance::LeastConnections);
        assert_eq!(config.upstream.servers[0].weight, 2);
        let readme = include_str!("../../docs/sidecar.md");
        assert!(
            readme.contains(example.trim()),
            "docs/sidecar.md must show sidecar/sidecar.example.toml verbatim"
        );
    }

    #[test]
    fn errors_name_the_field() {
        assert!(
            err("[cache]\nmax_bytez = 1").contains("max_bytez"),
            "{}",
            err("[cache]\nmax_bytez = 1")
        );
        assert!(err("[server]\nshutdown_grace_seconds = 300").contains("server.shutdown_grace_seconds"));
        assert!(err("[server]\nrequest_header_timeout_seconds = 0").contains("server.request_header_timeout_seconds"));
        assert!(err("[server]\nprofiling = true").contains("server.profiling"));
        assert!(err("[server]\nprofiling = true\nadmin_token = \"\"").contains("server.profiling"));
        SidecarConfig::from_toml("[server]\nprofiling = true\nadmin_token = \"t\"").unwrap();
        assert!(err("[server]\nthreads = \"two\"").contains("threads"));
        let bad_addr = "[upstream]\nservers = [{ address = \"127.0.0.1:1\" }, { address = \"nope\" }]";
        assert!(
            err(bad_addr).contains("upstream.servers[1].address"),
            "{}",
            err(bad_addr)
        );
        let bad_rate = "[[rate_limit.rules]]\nname = \"x\"\npath_prefix = \"/\"\nrequests_per_second = 0\nburst = 1";
        assert!(
            err(bad_rate).contains("rate_limit.rules[0].requests_per_second"),
            "{}",
            err(bad_rate)
        );
        assert!(err("[cache.purge]\ntokens = [\"short\"]").contains("cache.purge.tokens[0]"));
        assert!(err("[rate_limit.key]\nheader = \"bad header\"").contains("rate_limit.key.header"));
        assert!(err("[upstream]\nbalance = \"fastest\"").contains("fastest"));
        assert!(err("[upstream.local]\nsocket = \"app.sock\"").contains("upstream.local.socket"));
        assert!(err("[upstream.local]\nsocket = \"/run/a.sock\"\naddress = \"pod\"").contains("upstream.local.address"));
        let broad = "[rate_limit]\ntrusted_proxies = [\"10.1.0.7\", \"172.16.0.0/12\"]";
        assert!(err(broad).contains("rate_limit.trusted_proxies[1]"), "{}", err(broad));
        assert!(SidecarConfig::from_toml(&format!("{broad}\nallow_broad_trusted_proxies = true")).is_ok());
        assert!(err("[[").contains("config"));
    }

    #[test]
    fn the_local_instance_is_named_by_ip_or_ip_and_port_or_the_pod_ip() {
        let by = |address: Option<&str>| LocalInstance {
            socket: "/run/mall/app.sock".into(),
            address: address.map(str::to_string),
        };
        // What the proxy asks: the address resolved once, then matched per connection.
        let is = |local: LocalInstance, addr: std::net::SocketAddr, pod_ip: Option<&str>| {
            local.resolve(pod_ip).is_some_and(|local| local.matches(addr))
        };
        let a: std::net::SocketAddr = "10.1.2.3:8080".parse().unwrap();
        let b: std::net::SocketAddr = "10.1.2.4:8080".parse().unwrap();
        assert!(is(by(Some("10.1.2.3")), a, None));
        assert!(!is(by(Some("10.1.2.3")), b, None));
        assert!(
            is(by(Some("10.1.2.3:8080")), a, Some("10.1.2.4")),
            "the address wins over POD_IP"
        );
        assert!(!is(by(Some("10.1.2.3:9090")), a, None));
        assert!(is(by(None), b, Some("10.1.2.4")));
        assert!(!is(by(None), b, None), "neither: no instance is local");
        assert!(is(by(None), "[fd00::4]:8080".parse().unwrap(), Some("fd00::4")));
    }

    #[test]
    fn the_pods_own_app_is_an_instance_whatever_dns_answers() {
        let upstream = |dns: bool, address: Option<&str>| Upstream {
            dns: dns.then(|| DnsDiscovery {
                name: "demo-app.shop.svc.cluster.local".into(),
                port: 3000,
                refresh_seconds: 5,
            }),
            local: Some(LocalInstance {
                socket: "/run/mall/app.sock".into(),
                address: address.map(str::to_string),
            }),
            ..Default::default()
        };
        let own = |u: Upstream, pod_ip: Option<&str>| u.own_app(pod_ip).map(|a| a.to_string());
        let table = [
            // The operator's pods: POD_IP on the Service's port.
            (upstream(true, None), Some("10.1.2.3"), Some("10.1.2.3:3000")),
            (
                upstream(true, Some("10.1.2.9")),
                Some("10.1.2.3"),
                Some("10.1.2.9:3000"),
            ),
            (upstream(true, Some("127.0.0.1:8080")), None, Some("127.0.0.1:8080")),
            (upstream(true, None), Some("fd00::4"), Some("[fd00::4]:3000")),
            (upstream(true, None), None, None),
            // A static list names its instances itself.
            (upstream(false, Some("127.0.0.1:8080")), None, None),
        ];
        for (config, pod_ip, want) in table {
            let local = config.local.clone();
            assert_eq!(own(config, pod_ip).as_deref(), want, "{local:?} with POD_IP {pod_ip:?}");
        }
        let no_local = Upstream {
            local: None,
            ..upstream(true, None)
        };
        assert_eq!(no_local.own_app(Some("10.1.2.3")), None);
    }

    #[test]
    fn environment_overrides_any_field() {
        let env = [
            ("SIDECAR__CACHE__MAX_BYTES".to_string(), "8388608".to_string()),
            (
                "SIDECAR__UPSTREAM__BALANCE".to_string(),
                "least_connections".to_string(),
            ),
            ("SIDECAR__SERVER__LISTEN".to_string(), "127.0.0.1:1234".to_string()),
            (
                "SIDECAR__RATE_LIMIT__REDIS__URL".to_string(),
                "redis://127.0.0.1:6379".to_string(),
            ),
            ("UNRELATED".to_string(), "x".to_string()),
        ];
        let config = SidecarConfig::from_toml_with_env("[cache]\nmax_bytes = 9999999", "f", env).unwrap();
        assert_eq!(config.cache.max_bytes, 8 * 1024 * 1024);
        assert_eq!(config.upstream.balance, Balance::LeastConnections);
        assert_eq!(config.server.listen, "127.0.0.1:1234".parse().unwrap());
        let redis = config.rate_limit.redis.unwrap();
        assert_eq!((redis.url.as_str(), redis.timeout_ms), ("redis://127.0.0.1:6379", 50));

        let bad = SidecarConfig::from_toml_with_env("", "f", [("SIDECAR__CACHE__MAX_BYTES".into(), "lots".into())]);
        assert!(bad.unwrap_err().to_string().contains("max_bytes"));
    }
}
