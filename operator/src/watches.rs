//! The controller's watch wiring: which watches trigger a reconcile (the MallDeployments, every
//! child kind, the Prometheus Operator's kinds while their CRDs exist) and the probe that says
//! whether those CRDs exist. `controller` builds the kube-runtime `Controller` from `Sources`, so
//! tests can feed it streams of their own (a watch that fails, a CRD that goes).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures_util::stream::BoxStream;
use futures_util::{stream, Stream, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Controller;
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch, Notify};

use crate::context::{monitoring_crds_exist, monitoring_crds_probe, Context, Writers, MONITORING_PROBE};
use crate::crd::MallDeployment;
use crate::desired;
use crate::metrics::Metrics;

/// One watch's events, as `kube::runtime::watcher` yields them.
pub type Events<K> = BoxStream<'static, watcher::Result<watcher::Event<K>>>;

/// Starts a watch of one Prometheus Operator kind; called each time its CRD appears.
pub type StartWatch = Box<dyn FnMut() -> Events<DynamicObject> + Send>;

/// What the controller watches.
pub struct Sources {
    pub malls: Events<MallDeployment>,
    pub deployments: Events<Deployment>,
    pub services: Events<Service>,
    pub config_maps: Events<ConfigMap>,
    pub hpas: Events<HorizontalPodAutoscaler>,
    pub pdbs: Events<PodDisruptionBudget>,
    /// The generated token Secrets, metadata only.
    pub secrets: Events<PartialObjectMeta<Secret>>,
    pub prometheus_rules: StartWatch,
    pub service_monitors: StartWatch,
    /// Whether the Prometheus Operator's CRDs exist, as the probe last saw them.
    pub monitoring: watch::Receiver<bool>,
    /// Reconcile every mall (the CRDs came or went).
    pub reconcile_all: BoxStream<'static, ()>,
    /// Notified when a watch of an optional kind fails: its CRD may just have gone, so the probe
    /// looks at once rather than at its next tick.
    pub probe_now: Arc<Notify>,
}

/// The operator watches its own objects only: those labelled `managed-by: mall-operator`.
fn managed_watch() -> watcher::Config {
    watcher::Config::default().labels(&desired::managed_selector())
}

fn watch_all<K>(client: &Client) -> Events<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    watcher(Api::<K>::all(client.clone()), managed_watch()).boxed()
}

fn start_dynamic(client: Client, resource: ApiResource) -> StartWatch {
    Box::new(move || {
        watcher(
            Api::<DynamicObject>::all_with(client.clone(), &resource),
            managed_watch(),
        )
        .boxed()
    })
}

/// Runs the controller until the stream ends (shutdown).
pub async fn run(ctx: Arc<Context>) {
    let client = ctx.client.clone();
    let writers = ctx
        .writers
        .lock()
        .expect("writers lock")
        .take()
        .expect("the controller runs once per Context");

    // The Prometheus Operator may be installed after the operator, or removed: probe for its
    // CRDs, and when they arrive or go, reconcile every mall so `status.monitoring` says so at
    // once (and start or stop watching its kinds). The first probe is made before the first
    // reconcile, so no mall is told its rules are applied when they cannot be.
    let first = monitoring_crds_exist(&ctx.client).await;
    ctx.monitoring.store(first, Ordering::Relaxed);
    let (installed_tx, installed_rx) = watch::channel(first);
    let (changed_tx, mut changed_rx) = mpsc::unbounded_channel::<()>();
    let probe_ctx = ctx.clone();
    let probe_now = Arc::new(Notify::new());
    let kicked = probe_now.clone();
    tokio::spawn(async move {
        loop {
            // Every 5 s, or at once when a watch of either kind fails (paced by its backoff).
            tokio::select! {
                _ = tokio::time::sleep(MONITORING_PROBE) => {}
                _ = kicked.notified() => {}
            }
            let Ok(now) = monitoring_crds_probe(&probe_ctx.client).await else {
                continue;
            };
            let before = probe_ctx.monitoring.swap(now, Ordering::Relaxed);
            if now != before {
                if now {
                    tracing::info!("Prometheus Operator CRDs found: managing PrometheusRules and ServiceMonitors");
                } else {
                    tracing::warn!(
                        "Prometheus Operator CRDs gone: alert rules and ServiceMonitors can no longer be applied"
                    );
                }
                let _ = installed_tx.send(now);
                let _ = changed_tx.send(());
            }
        }
    });

    let sources = Sources {
        malls: watcher(Api::<MallDeployment>::all(client.clone()), watcher::Config::default()).boxed(),
        deployments: watch_all(&client),
        services: watch_all(&client),
        config_maps: watch_all(&client),
        hpas: watch_all(&client),
        pdbs: watch_all(&client),
        secrets: watch_all::<PartialObjectMeta<Secret>>(&client),
        prometheus_rules: start_dynamic(client.clone(), desired::prometheus_rule_resource()),
        service_monitors: start_dynamic(client.clone(), desired::service_monitor_resource()),
        monitoring: installed_rx,
        reconcile_all: stream::poll_fn(move |cx| changed_rx.poll_recv(cx)).boxed(),
        probe_now,
    };
    controller(sources, writers, ctx.metrics.clone())
        .shutdown_on_signal()
        .run(crate::controller::reconcile, crate::controller::error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile stream");
            }
        })
        .await;
}

/// The controller over `sources`, feeding the children's caches through `writers`.
///
/// kube-runtime pauses *every* trigger after any trigger stream yields an error (one backoff for
/// them all): a watch that kept failing (the Prometheus Operator's kinds once their CRDs were
/// deleted) held back the MallDeployment watch itself for up to 53 s on a real cluster, so
/// created malls waited and deleted ones were reconciled from a stale cache, their children
/// re-created against the garbage collector. Here each watch backs off on its own (client-go's
/// backoff, 0.8 s doubling to 30 s) and its errors are logged and go no further: no error ever
/// reaches the controller's trigger stream.
pub fn controller(sources: Sources, writers: Writers, metrics: Arc<Metrics>) -> Controller<MallDeployment> {
    let (malls, malls_writer) = reflector::store();
    let m = &metrics;
    let malls_stream = logged(
        "MallDeployment",
        m,
        sources.malls.default_backoff().reflect(malls_writer).applied_objects(),
    );
    Controller::for_stream(malls_stream, malls)
        .owns_stream(cached("Deployment", m, sources.deployments, writers.deployments))
        .owns_stream(cached("Service", m, sources.services, writers.services))
        .owns_stream(cached("ConfigMap", m, sources.config_maps, writers.config_maps))
        .owns_stream(cached("HorizontalPodAutoscaler", m, sources.hpas, writers.hpas))
        .owns_stream(cached("PodDisruptionBudget", m, sources.pdbs, writers.pdbs))
        .owns_stream(cached("Secret", m, sources.secrets, writers.secrets))
        .owns_stream_with(
            watch_while_installed(
                "PrometheusRule",
                m,
                sources.probe_now.clone(),
                sources.monitoring.clone(),
                sources.prometheus_rules,
                writers.prometheus_rules,
            ),
            desired::prometheus_rule_resource(),
        )
        .owns_stream_with(
            watch_while_installed(
                "ServiceMonitor",
                m,
                sources.probe_now,
                sources.monitoring,
                sources.service_monitors,
                writers.service_monitors,
            ),
            desired::service_monitor_resource(),
        )
        .reconcile_all_on(sources.reconcile_all)
}

/// One child kind's watch, with its own backoff, feeding its cache; yields the objects it touched
/// (the controller reconciles their owners).
fn cached<K>(
    kind: &'static str,
    metrics: &Metrics,
    events: Events<K>,
    writer: Writer<K>,
) -> impl Stream<Item = watcher::Result<K>>
where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    logged(
        kind,
        metrics,
        events.default_backoff().reflect(writer).touched_objects(),
    )
}

/// Logs and counts a watch's errors and drops them (the watch itself retries after its own
/// backoff).
fn logged<K>(
    kind: &'static str,
    metrics: &Metrics,
    objects: impl Stream<Item = watcher::Result<K>>,
) -> impl Stream<Item = watcher::Result<K>> {
    let errors = metrics.watch_errors.with_label_values(&[kind]);
    objects.filter_map(move |item| {
        let errors = errors.clone();
        async move {
            match item {
                Ok(object) => Some(Ok(object)),
                Err(e) => {
                    errors.inc();
                    tracing::warn!(kind, error = %e, "watch failed; it retries after its own backoff");
                    None
                }
            }
        }
    })
}

/// A Prometheus Operator kind, watched only while its CRD exists: the watch starts (in its own
/// task, with its own backoff) when `installed` turns true, stops when it turns false, and starts
/// again when it returns. Its objects reach the controller through a channel, never an error.
fn watch_while_installed(
    kind: &'static str,
    metrics: &Metrics,
    probe_now: Arc<Notify>,
    installed: watch::Receiver<bool>,
    start: StartWatch,
    writer: Writer<DynamicObject>,
) -> impl Stream<Item = watcher::Result<DynamicObject>> {
    let (tx, mut rx) = mpsc::channel(64);
    let errors = metrics.watch_errors.with_label_values(&[kind]);
    tokio::spawn(supervise(kind, errors, probe_now, installed, start, writer, tx));
    stream::poll_fn(move |cx| rx.poll_recv(cx)).map(Ok)
}

async fn supervise(
    kind: &'static str,
    errors: prometheus::IntCounter,
    probe_now: Arc<Notify>,
    mut installed: watch::Receiver<bool>,
    mut start: StartWatch,
    mut writer: Writer<DynamicObject>,
    tx: mpsc::Sender<DynamicObject>,
) {
    loop {
        if installed.wait_for(|on| *on).await.is_err() {
            return;
        }
        tracing::info!(kind, "CRD present: watching");
        let mut events = Box::pin(start().default_backoff());
        loop {
            tokio::select! {
                changed = installed.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if !*installed.borrow_and_update() {
                        break;
                    }
                }
                event = events.next() => match event {
                    Some(Ok(event)) => {
                        for object in apply_event(&mut writer, event) {
                            if tx.send(object).await.is_err() {
                                return;
                            }
                        }
                    }
                    Some(Err(e)) => {
                        errors.inc();
                        probe_now.notify_one();
                        tracing::warn!(kind, error = %e, "watch failed; it retries after its own backoff");
                    }
                    // A watcher does not end; should one, wait for the CRD to go before anything else.
                    None => {
                        if installed.wait_for(|on| !*on).await.is_err() {
                            return;
                        }
                        break;
                    }
                },
            }
        }
        drop(events);
        // The CRD took its objects along: forget them, so the next apply after the CRD returns
        // creates them rather than finding them "already there" in the cache; their owners are
        // reconciled.
        let vanished = forget_all(&mut writer);
        tracing::info!(kind, "CRD gone: stopped watching");
        for object in vanished {
            if tx.send(object).await.is_err() {
                return;
            }
        }
    }
}

/// Applies one event to the cache; returns the objects whose owners should be reconciled: the
/// object touched, or, when a re-list completes (after a 410, or a watch that failed while the
/// CRD was deleted and created again), the objects it no longer lists.
fn apply_event(writer: &mut Writer<DynamicObject>, event: watcher::Event<DynamicObject>) -> Vec<DynamicObject> {
    let before = matches!(event, watcher::Event::InitDone).then(|| writer.as_reader().state());
    writer.apply_watcher_event(&event);
    match event {
        watcher::Event::Apply(o) | watcher::Event::Delete(o) | watcher::Event::InitApply(o) => vec![o],
        watcher::Event::Init => Vec::new(),
        watcher::Event::InitDone => {
            let now: std::collections::HashSet<(Option<String>, Option<String>)> = writer
                .as_reader()
                .state()
                .iter()
                .map(|o| (o.metadata.namespace.clone(), o.metadata.name.clone()))
                .collect();
            before
                .unwrap_or_default()
                .into_iter()
                .filter(|o| !now.contains(&(o.metadata.namespace.clone(), o.metadata.name.clone())))
                .map(|o| (*o).clone())
                .collect()
        }
    }
}

/// Empties the cache; returns what it held.
fn forget_all(writer: &mut Writer<DynamicObject>) -> Vec<DynamicObject> {
    let held = writer.as_reader().state();
    writer.apply_watcher_event(&watcher::Event::Init);
    writer.apply_watcher_event(&watcher::Event::InitDone);
    held.into_iter().map(|o| (*o).clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str) -> DynamicObject {
        DynamicObject::new(name, &desired::prometheus_rule_resource()).within("shop")
    }

    /// A CRD deleted and created again between two probes: its watch fails and re-lists, and the
    /// objects the re-list no longer finds are handed on (their malls are reconciled, which
    /// re-creates them), as are the objects it forgets when the CRD goes.
    #[test]
    fn a_relist_hands_on_what_it_no_longer_finds() {
        let mut writer = Writer::new(desired::prometheus_rule_resource());
        let names = |objects: Vec<DynamicObject>| -> Vec<String> {
            objects.into_iter().filter_map(|o| o.metadata.name).collect()
        };
        assert!(apply_event(&mut writer, watcher::Event::Init).is_empty());
        assert_eq!(
            names(apply_event(&mut writer, watcher::Event::InitApply(rule("a")))),
            ["a"]
        );
        assert_eq!(
            names(apply_event(&mut writer, watcher::Event::InitApply(rule("b")))),
            ["b"]
        );
        assert!(apply_event(&mut writer, watcher::Event::InitDone).is_empty());
        // The re-list after the watch failed: `a` went with the CRD, `b` was created again.
        apply_event(&mut writer, watcher::Event::Init);
        apply_event(&mut writer, watcher::Event::InitApply(rule("b")));
        assert_eq!(names(apply_event(&mut writer, watcher::Event::InitDone)), ["a"]);
        assert_eq!(writer.as_reader().state().len(), 1);
        assert_eq!(names(forget_all(&mut writer)), ["b"]);
        assert!(writer.as_reader().state().is_empty());
    }
}
