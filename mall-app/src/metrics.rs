//! Prometheus metrics of the mall app: HTTP, database pools, cache levels, orders.
//!
//! Names follow seed 000 (`http_requests_total`, `http_request_duration_seconds`) so the alert
//! rules the operator generates match what the app exports.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub slow_requests: IntCounter,
    pub db_pool: IntGaugeVec,
    pub db_pool_timeouts: prometheus::GaugeVec,
    pub db_operations: IntCounterVec,
    pub cache_hits: IntCounterVec,
    pub cache_misses: IntCounterVec,
    pub cache_errors: IntCounterVec,
    pub cache_invalidations: IntCounterVec,
    pub orders_created: IntCounter,
    pub stock_conflicts: IntCounter,
    pub idempotent_replays: IntCounter,
    pub transaction_retries: IntCounter,
    pub order_batch_size: prometheus::Histogram,
    pub order_batch_splits: IntCounter,
    pub invalidation_records: IntCounter,
    pub invalidation_polls: IntCounter,
    pub invalidation_errors: IntCounter,
    pub invalidation_lag: prometheus::Histogram,
    pub replica_lag: prometheus::GaugeVec,
    pub replica_in_rotation: IntGaugeVec,
    pub reads_fenced: IntCounter,
    pub fence_checks: IntCounterVec,
    pub read_after_write_waits: IntCounterVec,
}

fn register<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    registry.register(Box::new(c.clone())).expect("metric names are unique");
    c
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        registry,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    register(registry, IntCounter::new(name, help).expect("valid metric"))
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))
            .expect("process collector registers once");
        // Statement timings come from the process's tracing subscriber (telemetry.rs).
        register(&registry, crate::telemetry::statement_histogram());
        if let Some(exporter) = crate::telemetry::exporter() {
            registry
                .register(exporter.stats.collector())
                .expect("metric names are unique");
        }
        let http_duration = register(
            &registry,
            HistogramVec::new(
                HistogramOpts::new("http_request_duration_seconds", "HTTP request latency.").buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0,
                ]),
                &["method", "route"],
            )
            .expect("valid metric"),
        );
        let db_pool = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "db_pool_connections",
                    "Database pool connections by state (idle, in_use) and configured bounds (max, min).",
                ),
                &["pool", "state"],
            )
            .expect("valid metric"),
        );
        Metrics {
            http_requests: counter_vec(
                &registry,
                "http_requests_total",
                "HTTP requests served.",
                &["method", "route", "status"],
            ),
            http_duration,
            slow_requests: counter(
                &registry,
                "http_slow_requests_total",
                "Requests slower than the slow-request threshold.",
            ),
            db_pool,
            db_pool_timeouts: register(
                &registry,
                prometheus::GaugeVec::new(
                    Opts::new(
                        "db_pool_timeout_seconds",
                        "Configured pool timeouts: acquire, idle, max_lifetime.",
                    ),
                    &["pool", "setting"],
                )
                .expect("valid metric"),
            ),
            db_operations: counter_vec(
                &registry,
                "db_operations_total",
                "Database round trips started, by pool and kind (read, write).",
                &["pool", "kind"],
            ),
            cache_hits: counter_vec(
                &registry,
                "cache_hits_total",
                "Cache hits by level (l1, l2) and category.",
                &["level", "category"],
            ),
            cache_misses: counter_vec(
                &registry,
                "cache_misses_total",
                "Cache misses by level (l1, l2) and category.",
                &["level", "category"],
            ),
            cache_errors: counter_vec(
                &registry,
                "cache_errors_total",
                "Cache backend errors by level and operation.",
                &["level", "op"],
            ),
            cache_invalidations: counter_vec(
                &registry,
                "cache_invalidations_total",
                "Cache invalidations by source (local: this instance's writes; remote: Redis pub/sub; record: keys of the database's invalidation records; reconnect).",
                &["source"],
            ),
            orders_created: counter(&registry, "orders_created_total", "Orders created."),
            stock_conflicts: counter(
                &registry,
                "stock_conflicts_total",
                "Order attempts refused for insufficient stock.",
            ),
            idempotent_replays: counter(
                &registry,
                "idempotent_replays_total",
                "Order requests answered from an earlier request with the same Idempotency-Key.",
            ),
            transaction_retries: counter(
                &registry,
                "db_transaction_retries_total",
                "Transactions retried after a deadlock or serialization failure.",
            ),
            order_batch_size: register(
                &registry,
                prometheus::Histogram::with_opts(
                    HistogramOpts::new(
                        "order_batch_size",
                        "Orders placed per transaction (group commit); 1 when batching is off.",
                    )
                    .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0]),
                )
                .expect("valid metric"),
            ),
            order_batch_splits: counter(
                &registry,
                "order_batch_splits_total",
                "Order batches that failed as a whole and were placed one order at a time.",
            ),
            invalidation_records: counter(
                &registry,
                "cache_invalidation_records_total",
                "Invalidation records applied (evicted from L1, L2 and the sidecar).",
            ),
            invalidation_polls: counter(
                &registry,
                "cache_invalidation_queries_total",
                "Queries the invalidation follower ran for records (polls and catch-ups).",
            ),
            invalidation_errors: counter(
                &registry,
                "cache_invalidation_errors_total",
                "Invalidation follower failures: records unreadable, listener lost, sidecar purge refused.",
            ),
            invalidation_lag: register(
                &registry,
                prometheus::Histogram::with_opts(
                    HistogramOpts::new(
                        "cache_invalidation_lag_seconds",
                        "From a record's commit-time clock to its keys evicted here.",
                    )
                    .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0]),
                )
                .expect("valid metric"),
            ),
            replica_lag: register(
                &registry,
                prometheus::GaugeVec::new(
                    Opts::new(
                        "db_replica_lag_seconds",
                        "How long the oldest write this instance knows of has waited for the replica to replay it (0: none waits).",
                    ),
                    &["replica"],
                )
                .expect("valid metric"),
            ),
            replica_in_rotation: register(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "db_replica_in_rotation",
                        "1 while the replica takes reads: healthy and lagging no more than MALL_DB_REPLICA_MAX_LAG_MS.",
                    ),
                    &["replica"],
                )
                .expect("valid metric"),
            ),
            fence_checks: counter_vec(
                &registry,
                "db_fence_checks_total",
                "Queries asking a server which fenced invalidation records it holds (replicas; the primary for old fences).",
                &["pool"],
            ),
            reads_fenced: counter(
                &registry,
                "db_reads_fenced_total",
                "Reads sent to the primary because no replica in rotation had replayed a write they must see.",
            ),
            read_after_write_waits: counter_vec(
                &registry,
                "read_after_write_waits_total",
                "Requests carrying Mall-Min-Seq that waited for this instance to apply a write's invalidation, by outcome (applied, timed_out).",
                &["outcome"],
            ),
            registry,
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding of gathered metrics cannot fail");
        String::from_utf8(buf).expect("prometheus text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
