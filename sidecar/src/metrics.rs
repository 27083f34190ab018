//! The sidecar's Prometheus metrics, in one registry served on the admin port.

use std::collections::HashMap;

use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::upstreams::Group;

pub struct Metrics {
    registry: Registry,
    /// Requests by route prefix (the matching cache or limit rule, else `other`), method and status.
    pub requests: IntCounterVec,
    /// Response times by instance and its group (`stable`, `canary`; see `upstreams::Group`).
    pub upstream_latency: HistogramVec,
    /// Attempts by the group of the instance (`stable`, `canary`) and the status class of its
    /// answer (`2xx`..`5xx`; `error`: none). With `upstream_latency`, what a canary release is
    /// judged by: the two groups compared over the same window.
    pub upstream_requests: IntCounterVec,
    /// Its series, looked up once: `[group][status class]`.
    upstream_request_series: [[IntCounter; 5]; 2],
    /// The canary's configured share of the calls (0 without a canary), and the instances in its
    /// group: the operator reads the first to know a new split has reached the pod.
    pub canary_percent: IntGauge,
    pub canary_instances: IntGauge,
    /// `HIT`, `MISS`, `STALE`, `BYPASS` per response.
    pub cache_results: IntCounterVec,
    pub cache_purges: IntCounterVec,
    /// Invalidations received, by source: local_write, fleet, purge_tag, reconnect.
    pub cache_invalidations: IntCounterVec,
    /// Cache entries removed by invalidations, by the same sources.
    pub cache_invalidated_entries: IntCounterVec,
    pub bytes_in: IntCounter,
    pub bytes_out: IntCounter,
    pub compression_saved: IntCounterVec,
    /// Compressed copies of cached entries made, by algorithm (one per entry and coding; every
    /// later hit in that coding is served from the copy).
    pub compressed_copies: IntCounterVec,
    pub rate_limited: IntCounterVec,
    pub rate_limit_redis_fallbacks: IntCounter,
    pub upstream_healthy: IntGaugeVec,
    pub upstream_in_flight: IntGaugeVec,
    pub upstream_ejections: IntCounterVec,
    pub upstream_retries: IntCounter,
    pub no_healthy_upstream: IntCounter,
    /// 1 while the instances' DNS name does not answer (the sidecar serves through the pod's own
    /// app and the instances found before); lookups by result (`ok`, `error`, `timeout`, `empty`).
    pub discovery_failing: IntGauge,
    pub discovery_lookups: IntCounterVec,
    /// New connections to app instances, by transport (`unix` for the pod's own app through its
    /// socket, `tcp` otherwise): says whether the in-pod hop takes the socket.
    pub upstream_connections: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub in_flight: IntGauge,
    /// Connections closed because a request header did not arrive in time (slowloris).
    pub header_timeouts: IntCounter,
    /// Library log lines dropped by the per-call-site cap (`log_limit`), copied at scrape time.
    pub log_lines_dropped: IntCounter,
    /// Pooled app connections found closed when reused (ordinary keep-alive churn).
    pub stale_pooled_connections: IntCounter,
    /// (HIT + STALE) / (HIT + STALE + MISS) since start, refreshed at scrape time so dashboards
    /// without PromQL arithmetic see it too.
    pub cache_hit_ratio: Gauge,
    /// `cache_results`' series, looked up once (`HIT`, `MISS`, `STALE`, `BYPASS`, `PURGE`).
    cache_result_series: [IntCounter; 5],
    /// The waiting room: tickets by outcome (`issued`, `admitted` with a ticket, `direct`
    /// without one, `expired`, `rejected`), buyers ahead of the last one seen, the wait of those
    /// admitted with a ticket, and whether the line is the fleet's (1, Redis) or this pod's (0).
    pub waiting_room_tickets: IntCounterVec,
    pub waiting_room_queue: Gauge,
    pub waiting_room_wait: prometheus::Histogram,
    pub waiting_room_shared: Gauge,
}

const CACHE_RESULTS: [&str; 5] = ["HIT", "MISS", "STALE", "BYPASS", "PURGE"];

/// The `status_class` label of `upstream_requests_total`; `error` for an attempt the instance
/// never answered (connect error, timeout, connection closed before a response header).
const STATUS_CLASSES: [&str; 5] = ["2xx", "3xx", "4xx", "5xx", "error"];
const ERROR_CLASS: usize = 4;

/// A route label's address, a method and a status: the key of a remembered series.
type SeriesKey = (usize, http::Method, u16);

thread_local! {
    /// `requests`' series this thread has counted: a label lookup hashes three strings and takes
    /// the vector's lock, once per request otherwise. The route label is kept with its series, so
    /// its address cannot be reused by another label while it is a key here.
    static REQUEST_SERIES: std::cell::RefCell<HashMap<SeriesKey, (std::sync::Arc<str>, IntCounter)>> =
        std::cell::RefCell::new(HashMap::new());
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("sidecar".into()), None).expect("valid prefix");
        let cache_results = IntCounterVec::new(
            Opts::new(
                "cache_requests_total",
                "Responses by cache result (HIT, MISS, STALE, BYPASS, PURGE)",
            ),
            &["result"],
        )
        .expect("metric");
        let upstream_requests = IntCounterVec::new(
            Opts::new(
                "upstream_requests_total",
                "Attempts sent to app instances, by the group of the instance (stable, canary) and the status class of its answer (error: none)",
            ),
            &["group", "status_class"],
        )
        .expect("metric");
        let m = Metrics {
            requests: IntCounterVec::new(
                Opts::new("http_requests_total", "Requests by route, method and status"),
                &["route", "method", "status"],
            )
            .expect("metric"),
            upstream_latency: HistogramVec::new(
                HistogramOpts::new(
                    "upstream_response_seconds",
                    "Time from sending to the upstream to its response header",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ]),
                &["upstream", "group"],
            )
            .expect("metric"),
            upstream_request_series: Group::ALL
                .map(|g| STATUS_CLASSES.map(|class| upstream_requests.with_label_values(&[g.as_str(), class]))),
            upstream_requests,
            canary_percent: IntGauge::new(
                "canary_percent",
                "The canary group's configured share of upstream calls in percent (0 without a canary)",
            )
            .expect("metric"),
            canary_instances: IntGauge::new(
                "canary_instances",
                "Instances in the canary group (found by the canary's DNS name, or this pod's own app)",
            )
            .expect("metric"),
            cache_result_series: CACHE_RESULTS.map(|r| cache_results.with_label_values(&[r])),
            cache_results,
            cache_invalidations: IntCounterVec::new(
                Opts::new(
                    "cache_invalidations_total",
                    "Invalidations received, by source (local_write, fleet, purge_tag, reconnect)",
                ),
                &["source"],
            )
            .expect("metric"),
            cache_invalidated_entries: IntCounterVec::new(
                Opts::new(
                    "cache_invalidated_entries_total",
                    "Cache entries removed by invalidations, by source",
                ),
                &["source"],
            )
            .expect("metric"),
            cache_purges: IntCounterVec::new(
                Opts::new("cache_purges_total", "PURGE requests by outcome"),
                &["outcome"],
            )
            .expect("metric"),
            bytes_in: IntCounter::new("request_body_bytes_total", "Request body bytes received from clients")
                .expect("metric"),
            bytes_out: IntCounter::new("response_body_bytes_total", "Response body bytes sent to clients")
                .expect("metric"),
            compression_saved: IntCounterVec::new(
                Opts::new(
                    "compression_saved_bytes_total",
                    "Bytes not sent thanks to compression, by algorithm",
                ),
                &["algorithm"],
            )
            .expect("metric"),
            compressed_copies: IntCounterVec::new(
                Opts::new(
                    "cache_compressed_copies_total",
                    "Compressed copies of cached entries made, by algorithm",
                ),
                &["algorithm"],
            )
            .expect("metric"),
            rate_limited: IntCounterVec::new(
                Opts::new("rate_limited_total", "Requests refused with 429, by rule"),
                &["rule"],
            )
            .expect("metric"),
            rate_limit_redis_fallbacks: IntCounter::new(
                "rate_limit_redis_fallbacks_total",
                "Limit decisions taken locally because Redis was down or slow",
            )
            .expect("metric"),
            upstream_healthy: IntGaugeVec::new(
                Opts::new("upstream_healthy", "1 when the instance takes traffic"),
                &["upstream"],
            )
            .expect("metric"),
            upstream_in_flight: IntGaugeVec::new(
                Opts::new("upstream_in_flight_requests", "Requests being served by each instance"),
                &["upstream"],
            )
            .expect("metric"),
            upstream_ejections: IntCounterVec::new(
                Opts::new("upstream_ejections_total", "Instances taken out of rotation, by cause"),
                &["upstream", "cause"],
            )
            .expect("metric"),
            upstream_retries: IntCounter::new("upstream_retries_total", "Requests retried on another instance")
                .expect("metric"),
            no_healthy_upstream: IntCounter::new(
                "no_healthy_upstream_total",
                "Requests answered 503 for lack of an instance",
            )
            .expect("metric"),
            discovery_failing: IntGauge::new(
                "upstream_discovery_failing",
                "1 while the instances' DNS name does not answer (the pod's own app and the instances found before serve)",
            )
            .expect("metric"),
            discovery_lookups: IntCounterVec::new(
                Opts::new(
                    "upstream_discovery_lookups_total",
                    "DNS lookups of the instances' name by result (ok, error, timeout, empty)",
                ),
                &["result"],
            )
            .expect("metric"),
            upstream_connections: IntCounterVec::new(
                Opts::new(
                    "upstream_connections_total",
                    "New connections to app instances by transport (unix: the pod's own app through its socket)",
                ),
                &["transport"],
            )
            .expect("metric"),
            config_reloads: IntCounterVec::new(
                Opts::new("config_reloads_total", "Configuration reloads by outcome"),
                &["outcome"],
            )
            .expect("metric"),
            in_flight: IntGauge::new("in_flight_requests", "Client requests being served").expect("metric"),
            header_timeouts: IntCounter::new(
                "request_header_timeouts_total",
                "Connections closed because a request header was not complete in time",
            )
            .expect("metric"),
            cache_hit_ratio: Gauge::new(
                "cache_hit_ratio",
                "Cache hits (fresh or stale) over cacheable lookups since start",
            )
            .expect("metric"),
            log_lines_dropped: IntCounter::new(
                "log_lines_dropped_total",
                "Library log lines dropped because their call site logged too often",
            )
            .expect("metric"),
            stale_pooled_connections: IntCounter::new(
                "upstream_stale_pooled_connections_total",
                "Pooled app connections the app had closed, found when reused (a new one is opened)",
            )
            .expect("metric"),
            waiting_room_tickets: IntCounterVec::new(
                Opts::new(
                    "waiting_room_tickets_total",
                    "Waiting-room decisions: issued, admitted (with a ticket), direct, expired, rejected, reused (a buyer's own place), unbound (no credentials, no number), no_show (a turn passed over), address_limited, readmit_refused (let through already)",
                ),
                &["outcome"],
            )
            .expect("metric"),
            waiting_room_queue: Gauge::new(
                "waiting_room_queue_length",
                "Buyers in the waiting room ahead of the latest one (as this pod last saw the line)",
            )
            .expect("metric"),
            waiting_room_wait: prometheus::Histogram::with_opts(
                HistogramOpts::new("waiting_room_wait_seconds", "From a ticket's issue to its admission")
                    .buckets(vec![0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]),
            )
            .expect("metric"),
            waiting_room_shared: Gauge::new(
                "waiting_room_shared",
                "1 while the waiting room's line is the fleet's (Redis answers), 0 while this pod keeps its own",
            )
            .expect("metric"),
            registry,
        };
        let collectors: [Box<dyn prometheus::core::Collector>; 33] = [
            Box::new(m.upstream_requests.clone()),
            Box::new(m.canary_percent.clone()),
            Box::new(m.canary_instances.clone()),
            Box::new(m.waiting_room_tickets.clone()),
            Box::new(m.waiting_room_queue.clone()),
            Box::new(m.waiting_room_wait.clone()),
            Box::new(m.waiting_room_shared.clone()),
            Box::new(m.cache_invalidations.clone()),
            Box::new(m.cache_invalidated_entries.clone()),
            Box::new(m.requests.clone()),
            Box::new(m.upstream_latency.clone()),
            Box::new(m.cache_results.clone()),
            Box::new(m.cache_purges.clone()),
            Box::new(m.bytes_in.clone()),
            Box::new(m.bytes_out.clone()),
            Box::new(m.compression_saved.clone()),
            Box::new(m.compressed_copies.clone()),
            Box::new(m.rate_limited.clone()),
            Box::new(m.rate_limit_redis_fallbacks.clone()),
            Box::new(m.upstream_healthy.clone()),
            Box::new(m.upstream_in_flight.clone()),
            Box::new(m.upstream_ejections.clone()),
            Box::new(m.upstream_retries.clone()),
            Box::new(m.no_healthy_upstream.clone()),
            Box::new(m.discovery_failing.clone()),
            Box::new(m.discovery_lookups.clone()),
            Box::new(m.upstream_connections.clone()),
            Box::new(m.config_reloads.clone()),
            Box::new(m.in_flight.clone()),
            Box::new(m.header_timeouts.clone()),
            Box::new(m.log_lines_dropped.clone()),
            Box::new(m.stale_pooled_connections.clone()),
            Box::new(m.cache_hit_ratio.clone()),
        ];
        for c in collectors {
            m.registry.register(c).expect("unique metric");
        }
        m
    }

    /// Adds a collector owned elsewhere (the span exporter's counts).
    pub fn register(&self, c: Box<dyn prometheus::core::Collector>) {
        self.registry.register(c).expect("unique metric");
    }

    /// The `cache_requests_total` series of `result`.
    pub fn cache_result(&self, result: &str) -> &IntCounter {
        let index = CACHE_RESULTS.iter().position(|r| *r == result).unwrap_or(3);
        &self.cache_result_series[index]
    }

    /// An instance of `group` answered an attempt with `status` (a final one, not 1xx).
    pub fn upstream_answered(&self, group: Group, status: u16) {
        let class = match status {
            200..=299 => 0,
            300..=399 => 1,
            400..=499 => 2,
            _ => 3,
        };
        self.upstream_request_series[group as usize][class].inc();
    }

    /// An instance of `group` gave an attempt no answer (connect error, timeout, closed).
    pub fn upstream_failed(&self, group: Group) {
        self.upstream_request_series[group as usize][ERROR_CLASS].inc();
    }

    /// The `http_requests_total` series of `route`, `method` and `status` (the status `0` when
    /// no response was written), remembered per thread.
    pub fn request_counter(&self, route: &std::sync::Arc<str>, method: &http::Method, status: u16) -> IntCounter {
        REQUEST_SERIES.with(|cell| {
            let mut series = cell.borrow_mut();
            let key = (
                std::sync::Arc::as_ptr(route) as *const u8 as usize,
                method.clone(),
                status,
            );
            if let Some((_, counter)) = series.get(&key) {
                return counter.clone();
            }
            // Bounded by routes x methods x statuses; a reload's old routes are let go here.
            if series.len() >= 4096 {
                series.clear();
            }
            let counter = self
                .requests
                .with_label_values(&[route, method.as_str(), &status.to_string()]);
            series.insert(key, (route.clone(), counter.clone()));
            counter
        })
    }

    pub fn render(&self) -> Vec<u8> {
        let get = |r: &str| self.cache_results.with_label_values(&[r]).get() as f64;
        let served = get("HIT") + get("STALE");
        let total = served + get("MISS");
        self.cache_hit_ratio.set(if total > 0.0 { served / total } else { 0.0 });
        let dropped = crate::log_limit::DROPPED.load(std::sync::atomic::Ordering::Relaxed);
        self.log_lines_dropped
            .inc_by(dropped.saturating_sub(self.log_lines_dropped.get()));
        let stale = crate::log_limit::STALE_POOLED.load(std::sync::atomic::Ordering::Relaxed);
        self.stale_pooled_connections
            .inc_by(stale.saturating_sub(self.stale_pooled_connections.get()));
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
