//! The controller's watch wiring (`watches::controller`) fed with streams of the tests' own: the
//! in-memory API has no watch, and what broke on a real cluster was what the watches do when the
//! Prometheus Operator's CRDs go (issue 33: a failing watch of an optional kind paused every
//! trigger, the MallDeployment watch's included, for up to 53 s). Modelled here: a watch that
//! fails for good (410 Gone, then 404 for a CRD that is gone), a CRD deleted while its kind is
//! watched, and one that comes back. Not modelled: the API server's own timing.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{stream, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::DynamicObject;
use kube::runtime::controller::Action;
use kube::runtime::watcher;
use kube::ResourceExt;
use kube_fake_client::ClientBuilder;
use mall_operator::context::{Context, Writers};
use mall_operator::crd::MallDeployment;
use mall_operator::desired;
use mall_operator::watches::{self, Events, Sources, StartWatch};
use serde_json::json;
use tokio::sync::{mpsc, watch};

fn mall(name: &str, uid: &str) -> MallDeployment {
    serde_json::from_value(json!({
        "apiVersion": "mall.example.com/v1alpha1", "kind": "MallDeployment",
        "metadata": { "name": name, "namespace": "shop", "uid": uid },
        "spec": {}
    }))
    .unwrap()
}

fn rule_of(owner: &str, uid: &str) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
        "metadata": { "name": owner, "namespace": "shop", "labels": { "app.kubernetes.io/managed-by": "mall-operator" },
                      "ownerReferences": [{ "apiVersion": "mall.example.com/v1alpha1", "kind": "MallDeployment",
                                            "name": owner, "uid": uid, "controller": true }] },
        "spec": { "groups": [] }
    }))
    .unwrap()
}

/// A watch that has listed nothing and then waits: the core kinds, quiet.
fn listed_empty<K: Send + 'static>() -> Events<K> {
    stream::iter([Ok(watcher::Event::Init), Ok(watcher::Event::InitDone)])
        .chain(stream::pending())
        .boxed()
}

fn gone(code: u16) -> watcher::Error {
    let status = kube::core::Status::failure(
        if code == 410 {
            "too old resource version"
        } else {
            "the server could not find the requested resource"
        },
        if code == 410 { "Expired" } else { "NotFound" },
    )
    .with_code(code);
    watcher::Error::WatchError(Box::new(status))
}

/// A watch of a kind whose CRD is gone: it fails at once, every time it is polled (a watcher
/// without a backoff of its own retries at once).
fn failing_for_good() -> StartWatch {
    Box::new(|| {
        let mut n = 0u32;
        stream::repeat_with(move || {
            n += 1;
            Err(gone(if n % 2 == 0 { 410 } else { 404 }))
        })
        .boxed()
    })
}

/// The MallDeployment watch, fed by the test; the reconciles, recorded (name, when).
struct Harness {
    malls: mpsc::UnboundedSender<watcher::Result<watcher::Event<MallDeployment>>>,
    installed: watch::Sender<bool>,
    /// What the CRD probe is woken by.
    probe_now: Arc<tokio::sync::Notify>,
    reconciled: Arc<Mutex<Vec<(String, Instant)>>>,
    ctx: Arc<Context>,
}

async fn start(prometheus_rules: StartWatch, service_monitors: StartWatch, installed: bool) -> Harness {
    start_with(listed_empty(), prometheus_rules, service_monitors, installed).await
}

async fn start_with(
    deployments: Events<Deployment>,
    prometheus_rules: StartWatch,
    service_monitors: StartWatch,
    installed: bool,
) -> Harness {
    let client = ClientBuilder::new().build().await.unwrap();
    let ctx = Arc::new(Context::new(client));
    let writers: Writers = ctx.writers.lock().unwrap().take().unwrap();
    let (malls, mut malls_rx) = mpsc::unbounded_channel();
    malls.send(Ok(watcher::Event::Init)).unwrap();
    malls.send(Ok(watcher::Event::InitDone)).unwrap();
    let (installed_tx, installed_rx) = watch::channel(installed);
    let probe_now = Arc::new(tokio::sync::Notify::new());
    let sources = Sources {
        malls: stream::poll_fn(move |cx| malls_rx.poll_recv(cx)).boxed(),
        deployments,
        services: listed_empty(),
        config_maps: listed_empty(),
        hpas: listed_empty(),
        pdbs: listed_empty(),
        secrets: listed_empty(),
        prometheus_rules,
        service_monitors,
        monitoring: installed_rx,
        reconcile_all: stream::pending().boxed(),
        probe_now: probe_now.clone(),
    };
    let reconciled: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let record = reconciled.clone();
    let controller = watches::controller(sources, writers, ctx.metrics.clone());
    tokio::spawn(
        controller
            .run(
                move |md: Arc<MallDeployment>, _: Arc<()>| {
                    let record = record.clone();
                    async move {
                        record.lock().unwrap().push((md.name_any(), Instant::now()));
                        // As a reconcile whose child failed: look again soon.
                        Ok::<_, Infallible>(Action::requeue(Duration::from_millis(500)))
                    }
                },
                |_, _: &Infallible, _| Action::await_change(),
                Arc::new(()),
            )
            .for_each(|_| async {}),
    );
    Harness {
        malls,
        installed: installed_tx,
        probe_now,
        reconciled,
        ctx,
    }
}

impl Harness {
    fn reconciles_of(&self, name: &str) -> Vec<Instant> {
        self.reconciled
            .lock()
            .unwrap()
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, t)| *t)
            .collect()
    }

    async fn first_reconcile_of(&self, name: &str, within: Duration) -> Option<Instant> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(t) = self.reconciles_of(name).first() {
                return Some(*t);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }
}

/// Issue 33, section 1: with the Prometheus Operator's CRDs deleted under a running operator, its
/// two watches fail for good; a mall created then is still reconciled within 1 s, and once it is
/// deleted no reconcile (so no write) is made for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_optional_watch_never_delays_a_mall() {
    let h = start(failing_for_good(), failing_for_good(), true).await;
    // A failing watch wakes the CRD probe at once (its CRD may just have gone): the malls hear
    // that monitoring is gone within a second, not at the probe's next 5 s tick.
    assert!(
        tokio::time::timeout(Duration::from_secs(1), h.probe_now.notified())
            .await
            .is_ok(),
        "the CRD probe was not woken by the failing watch"
    );
    // The optional watches fail for a while: long enough for kube-runtime's trigger backoff to
    // have grown to seconds had their errors reached it.
    tokio::time::sleep(Duration::from_secs(4)).await;

    let created = Instant::now();
    h.malls.send(Ok(watcher::Event::Apply(mall("late", "u-late")))).unwrap();
    let first = h.first_reconcile_of("late", Duration::from_secs(10)).await;
    let waited = first.map(|t| t.duration_since(created));
    assert!(
        waited.is_some_and(|w| w < Duration::from_secs(1)),
        "a mall created while the optional watches fail waited {waited:?} for its reconcile"
    );
    // The failures show where a platform team looks: a metric per kind (and the log).
    let metrics = String::from_utf8(h.ctx.metrics.render()).unwrap();
    assert!(
        metrics.contains(r#"mall_operator_watch_errors_total{kind="PrometheusRule"}"#),
        "{metrics}"
    );

    // Deleted: it requeues itself every 0.5 s while it exists; after the deletion none may start.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let deleted = Instant::now();
    h.malls
        .send(Ok(watcher::Event::Delete(mall("late", "u-late"))))
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after: Vec<Duration> = h
        .reconciles_of("late")
        .into_iter()
        .filter(|t| *t > deleted)
        .map(|t| t.duration_since(deleted))
        .collect();
    // One may have been starting as the deletion arrived.
    assert!(
        after.iter().all(|d| *d < Duration::from_millis(200)),
        "a deleted mall was reconciled (written to) after its deletion: {after:?}"
    );
}

/// The same holds for the core kinds: a Deployment watch failing for good (RBAC taken away, say)
/// delays no mall either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_child_watch_never_delays_a_mall() {
    let failing: Events<Deployment> = stream::repeat_with(|| Err(gone(410))).boxed();
    let (rules, _, _) = counted_watch(vec![]);
    let (monitors, _, _) = counted_watch(vec![]);
    let h = start_with(failing, rules, monitors, true).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let created = Instant::now();
    h.malls.send(Ok(watcher::Event::Apply(mall("late", "u-late")))).unwrap();
    let waited = h
        .first_reconcile_of("late", Duration::from_secs(10))
        .await
        .map(|t| t.duration_since(created));
    assert!(
        waited.is_some_and(|w| w < Duration::from_secs(1)),
        "a mall created while the Deployment watch fails waited {waited:?}"
    );
}

/// A watch of an optional kind whose objects the test lists, and how often it was started and
/// stopped (dropped).
fn counted_watch(objects: Vec<DynamicObject>) -> (StartWatch, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let started = Arc::new(AtomicUsize::new(0));
    let stopped = Arc::new(AtomicUsize::new(0));
    let (s, d) = (started.clone(), stopped.clone());
    let start: StartWatch = Box::new(move || {
        s.fetch_add(1, Ordering::SeqCst);
        struct Stop(Arc<AtomicUsize>);
        impl Drop for Stop {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let stop = Stop(d.clone());
        let listed = std::iter::once(watcher::Event::Init)
            .chain(objects.clone().into_iter().map(watcher::Event::InitApply))
            .chain(std::iter::once(watcher::Event::InitDone))
            .map(Ok);
        stream::iter(listed)
            .chain(stream::pending())
            .map(move |e| {
                let _keep = &stop;
                e
            })
            .boxed()
    });
    (start, started, stopped)
}

async fn eventually(what: &str, within: Duration, check: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Issue 33, section 1: an optional kind is watched only while its CRD exists. When the CRD goes
/// (deleted while watched) the watch stops and its cache forgets the objects (they went with the
/// CRD; a cache that still held them would keep the next apply from re-creating them); when it
/// comes back the watch starts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_optional_watch_stops_with_its_crd_and_starts_again_when_it_returns() {
    let (rules, rules_started, rules_stopped) = counted_watch(vec![rule_of("shop", "u-shop")]);
    let (monitors, _, _) = counted_watch(vec![]);
    let h = start(rules, monitors, false).await;
    h.malls.send(Ok(watcher::Event::Apply(mall("shop", "u-shop")))).unwrap();
    let store = h.ctx.stores.prometheus_rules.clone();
    let cached = move || {
        store
            .get(
                &kube::runtime::reflector::ObjectRef::new_with("shop", desired::prometheus_rule_resource())
                    .within("shop"),
            )
            .is_some()
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        rules_started.load(Ordering::SeqCst),
        0,
        "not watched before the CRD exists"
    );

    h.installed.send(true).unwrap();
    eventually("the watch starts once the CRD exists", Duration::from_secs(1), || {
        rules_started.load(Ordering::SeqCst) == 1
    })
    .await;
    eventually("its objects are cached", Duration::from_secs(1), &cached).await;

    h.installed.send(false).unwrap();
    eventually("the watch stops when the CRD goes", Duration::from_secs(1), || {
        rules_stopped.load(Ordering::SeqCst) == 1
    })
    .await;
    eventually(
        "the objects that went with the CRD leave the cache",
        Duration::from_secs(1),
        || !cached(),
    )
    .await;

    h.installed.send(true).unwrap();
    eventually(
        "the watch starts again when the CRD returns",
        Duration::from_secs(1),
        || rules_started.load(Ordering::SeqCst) == 2,
    )
    .await;
    eventually("and caches again", Duration::from_secs(1), &cached).await;
    // Deployments are untouched by any of this.
    assert!(h.ctx.stores.deployments.state().is_empty());
}
