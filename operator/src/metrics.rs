//! The operator's own Prometheus metrics.

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

pub struct Metrics {
    registry: Registry,
    /// Reconciles by outcome: changed, unchanged, error.
    pub reconciles: IntCounterVec,
    /// Failed reconciles by reason (`Error::metric_label`).
    pub reconcile_errors: IntCounterVec,
    pub reconcile_duration: Histogram,
    /// Webhook calls by outcome: ok, bad_request, unauthorized, unknown_target, error.
    pub webhook: IntCounterVec,
    /// Alert-driven scale changes by direction.
    pub scale_events: IntCounterVec,
    /// 1 while a MallDeployment's sale window is in effect (from its lead time to its end), else 0.
    pub sale_window_active: IntGaugeVec,
    /// Children that could not be applied, by kind and what was done (`failed`, `repaired`,
    /// `recreated`): one child's failure never stops the others, so this is where it shows.
    pub child_apply: IntCounterVec,
    /// Watch failures by kind. Each watch retries on its own backoff and nothing else waits on
    /// it, so this (and the log) is where a failing watch shows.
    pub watch_errors: IntCounterVec,
    /// Canary releases that ended, by namespace, name and outcome: promoted, rolled_back,
    /// aborted, cancelled (the spec went back to the stable revision).
    pub rollouts: IntCounterVec,
    /// The canary's share of the requests, in percent, while a release runs (0 otherwise).
    pub rollout_weight: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("mall_operator".into()), None).expect("valid prefix");
        let m = Metrics {
            reconciles: IntCounterVec::new(Opts::new("reconciles_total", "Reconciles by outcome"), &["outcome"])
                .expect("metric"),
            reconcile_errors: IntCounterVec::new(
                Opts::new("reconcile_errors_total", "Failed reconciles by reason"),
                &["reason"],
            )
            .expect("metric"),
            reconcile_duration: Histogram::with_opts(
                HistogramOpts::new("reconcile_duration_seconds", "Time per reconcile")
                    .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
            )
            .expect("metric"),
            webhook: IntCounterVec::new(
                Opts::new("webhook_requests_total", "Alertmanager webhook calls by outcome"),
                &["outcome"],
            )
            .expect("metric"),
            scale_events: IntCounterVec::new(
                Opts::new("scale_events_total", "Alert-driven scale changes"),
                &["direction"],
            )
            .expect("metric"),
            sale_window_active: IntGaugeVec::new(
                Opts::new(
                    "sale_window_active",
                    "1 while a sale window is in effect (from its lead time to its end)",
                ),
                // Not `namespace`: scraped, that would clash with the target's own label.
                &["malldeployment_namespace", "malldeployment", "window"],
            )
            .expect("metric"),
            child_apply: IntCounterVec::new(
                Opts::new(
                    "child_apply_total",
                    "Children whose apply failed, and drift that server-side apply could not merge, repaired",
                ),
                &["kind", "result"],
            )
            .expect("metric"),
            watch_errors: IntCounterVec::new(
                Opts::new(
                    "watch_errors_total",
                    "Watch failures by kind (each watch retries after its own backoff)",
                ),
                &["kind"],
            )
            .expect("metric"),
            rollouts: IntCounterVec::new(
                Opts::new("rollouts_total", "Canary releases that ended, by outcome"),
                &["namespace", "name", "outcome"],
            )
            .expect("metric"),
            rollout_weight: IntGaugeVec::new(
                Opts::new(
                    "rollout_canary_weight_percent",
                    "The canary's share of the requests while a release runs",
                ),
                &["namespace", "name"],
            )
            .expect("metric"),
            registry,
        };
        m.registry.register(Box::new(m.reconciles.clone())).expect("unique");
        m.registry
            .register(Box::new(m.reconcile_errors.clone()))
            .expect("unique");
        m.registry
            .register(Box::new(m.reconcile_duration.clone()))
            .expect("unique");
        m.registry.register(Box::new(m.webhook.clone())).expect("unique");
        m.registry.register(Box::new(m.scale_events.clone())).expect("unique");
        m.registry
            .register(Box::new(m.sale_window_active.clone()))
            .expect("unique");
        m.registry.register(Box::new(m.child_apply.clone())).expect("unique");
        m.registry.register(Box::new(m.watch_errors.clone())).expect("unique");
        m.registry.register(Box::new(m.rollouts.clone())).expect("unique");
        m.registry.register(Box::new(m.rollout_weight.clone())).expect("unique");
        m
    }

    pub fn render(&self) -> Vec<u8> {
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
