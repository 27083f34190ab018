//! The defects a real API server showed and the in-memory one hid, each against a stand-in that
//! models the behaviour that matters (`common/`: quantity canonicalisation, a request log, an API
//! outage): canonical quantities make the second pass a no-op, a mall being deleted is left to the
//! garbage collector, a steady state makes no request at all, unrelated objects are not cached,
//! the latest Event says what last happened, leadership survives an outage shorter than the renew
//! deadline, and the sidecar's defaults are its own.

mod common;

use std::time::Duration;

use common::{crd_named, PrometheusRule, Recorded, ServiceMonitor};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::Api;
use kube::{Client, ResourceExt};
use kube_fake_client::ClientBuilder;
use mall_operator::autoscale;
use mall_operator::controller::{reconcile_once, Context};
use mall_operator::crd::MallDeployment;
use mall_operator::leader::{default_identity, Elector, Timing};
use serde_json::json;

const NS: &str = "shop";

fn mall(spec: serde_json::Value) -> MallDeployment {
    let mut md: MallDeployment = serde_json::from_value(json!({
        "apiVersion": "mall.example.com/v1alpha1", "kind": "MallDeployment",
        "metadata": { "name": "shop", "namespace": NS }, "spec": spec
    }))
    .unwrap();
    md.metadata.generation = Some(1);
    md
}

async fn fake(md: MallDeployment, extra: Vec<ConfigMap>) -> Client {
    ClientBuilder::new()
        .with_resource::<MallDeployment>()
        .with_status_subresource::<MallDeployment>()
        .with_status_subresource::<Deployment>()
        .with_resource::<PrometheusRule>()
        .with_resource::<ServiceMonitor>()
        .with_object(md)
        .with_objects(extra)
        .build()
        .await
        .unwrap()
}

async fn pass(fake: &Client, ctx: &Context) -> mall_operator::controller::Outcome {
    ctx.sync().await.unwrap();
    let md = Api::<MallDeployment>::namespaced(fake.clone(), NS)
        .get("shop")
        .await
        .unwrap();
    reconcile_once(&md, ctx, autoscale::now()).await.unwrap().1
}

fn sqlite_spec() -> serde_json::Value {
    json!({ "replicas": 1, "minReplicas": 1, "maxReplicas": 1 })
}

#[tokio::test]
async fn non_canonical_quantities_still_make_the_second_pass_a_no_op() {
    let spec = json!({ "replicas": 1, "minReplicas": 1, "maxReplicas": 1,
        "app": { "cpu": { "request": "0.5", "limit": "1.5" }, "memory": { "request": "0.5Gi", "limit": "1.5Gi" } },
        "autoscaling": { "targetRequestsPerSecond": 1000 } });
    let fake = fake(mall(spec), vec![]).await;
    let api = Recorded::wrap(fake.clone());
    let ctx = Context::new(api.client.clone());
    let first = pass(&fake, &ctx).await;
    assert!(first.applied.iter().any(|a| a == "Deployment/shop"));
    // What the API server stored.
    let d = Api::<Deployment>::namespaced(fake.clone(), NS)
        .get("shop")
        .await
        .unwrap();
    let limits = d.spec.unwrap().template.spec.unwrap().containers[0]
        .resources
        .clone()
        .unwrap()
        .limits
        .unwrap();
    assert_eq!(
        (limits["cpu"].0.as_str(), limits["memory"].0.as_str()),
        ("1500m", "1536Mi")
    );

    ctx.sync().await.unwrap();
    api.take();
    let second = pass(&fake, &ctx).await;
    assert_eq!(second, Default::default(), "the second pass wrote {second:?}");
    let calls: Vec<_> = api
        .take()
        .into_iter()
        .filter(|c| !c.path.contains("customresourcedefinitions"))
        .collect();
    // Steady state: no write and no GET; only the caches' stand-in LISTs.
    assert!(
        calls
            .iter()
            .all(|c| c.method == "GET" && c.query.contains("labelSelector")),
        "steady-state requests: {calls:#?}"
    );
    let events = Api::<Event>::namespaced(fake.clone(), NS)
        .list(&Default::default())
        .await
        .unwrap();
    let applied = events
        .items
        .iter()
        .filter(|e| e.reason.as_deref() == Some("Applied"))
        .count();
    assert_eq!(applied, 1, "one Applied event, for the first pass only");
}

#[tokio::test]
async fn a_mall_being_deleted_is_left_to_the_garbage_collector() {
    let fake = fake(mall(sqlite_spec()), vec![]).await;
    let api = Recorded::wrap(fake.clone());
    let ctx = Context::new(api.client.clone());
    ctx.sync().await.unwrap();
    api.take();
    let mut md = Api::<MallDeployment>::namespaced(fake.clone(), NS)
        .get("shop")
        .await
        .unwrap();
    md.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    let (_, outcome) = reconcile_once(&md, &ctx, autoscale::now()).await.unwrap();
    assert_eq!(outcome, Default::default());
    assert_eq!(api.take(), vec![], "no child recreated, no status patched");
}

#[tokio::test]
async fn children_block_their_owners_deletion_and_render_has_no_owner() {
    let fake = fake(mall(sqlite_spec()), vec![]).await;
    let ctx = Context::new(fake.clone());
    pass(&fake, &ctx).await;
    let d = Api::<Deployment>::namespaced(fake.clone(), NS)
        .get("shop")
        .await
        .unwrap();
    let owner = &d.owner_references()[0];
    assert_eq!((owner.controller, owner.block_owner_deletion), (Some(true), Some(true)));

    let yaml = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/mall.yaml")).unwrap();
    let rendered = mall_operator::render::render(&yaml).unwrap();
    assert!(!rendered.contains("ownerReferences"), "render must not invent an owner");
    assert!(rendered.contains("app.kubernetes.io/managed-by: mall-operator"));
}

#[tokio::test]
async fn unrelated_configmaps_are_not_cached() {
    let unrelated: Vec<ConfigMap> = (0..10_000)
        .map(|i| ConfigMap {
            metadata: ObjectMeta {
                name: Some(format!("other-{i}")),
                namespace: Some(format!("team-{}", i % 50)),
                ..ObjectMeta::default()
            },
            data: Some([("k".to_string(), "x".repeat(100))].into()),
            ..ConfigMap::default()
        })
        .collect();
    let fake = fake(mall(sqlite_spec()), unrelated).await;
    let ctx = Context::new(fake.clone());
    pass(&fake, &ctx).await;
    ctx.sync().await.unwrap();
    let cached: Vec<String> = ctx.stores.config_maps.state().iter().map(|c| c.name_any()).collect();
    assert_eq!(
        cached,
        ["shop-sidecar"],
        "the cache holds the operator's own ConfigMap only"
    );
}

#[tokio::test]
async fn the_latest_event_says_what_last_happened() {
    let fake = fake(mall(sqlite_spec()), vec![]).await;
    let ctx = Context::new(fake.clone());
    let md = Api::<MallDeployment>::namespaced(fake.clone(), NS)
        .get("shop")
        .await
        .unwrap();
    for note in [
        "replicas 1 -> 2: alerts firing: CriticalQPS",
        "replicas 2 -> 4: alerts firing: CriticalQPS",
        "replicas 2 -> 4: alerts firing: CriticalQPS",
    ] {
        ctx.event(&md, false, "ScaledUp", note.into()).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut events = Api::<Event>::namespaced(fake.clone(), NS)
        .list(&Default::default())
        .await
        .unwrap()
        .items;
    events.sort_by_key(|e| {
        e.series
            .as_ref()
            .map(|s| s.last_observed_time.0)
            .or(e.event_time.as_ref().map(|t| t.0))
    });
    let latest = events.last().unwrap();
    assert_eq!(
        latest.note.as_deref(),
        Some("replicas 2 -> 4: alerts firing: CriticalQPS")
    );
    assert_eq!(
        latest.series.as_ref().map(|s| s.count),
        Some(2),
        "a repeat of the same note is a series"
    );
    assert_eq!(events.len(), 2);
}

#[tokio::test]
async fn leadership_survives_an_outage_shorter_than_the_renew_deadline() {
    let api = Recorded::wrap(ClientBuilder::new().build().await.unwrap());
    let timing = Timing {
        lease: Duration::from_millis(1500),
        renew_deadline: Duration::from_millis(1000),
        retry_period: Duration::from_millis(100),
    };
    let elector = Elector::new(api.client.clone(), "mall-system", "lease", "a", timing.lease);
    elector.acquire(timing).await;

    // An outage of 0.5 s (shorter than the deadline): still leading afterwards.
    let holding = tokio::spawn(async move { elector.hold(timing).await });
    api.set_down(true);
    tokio::time::sleep(Duration::from_millis(500)).await;
    api.set_down(false);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!holding.is_finished(), "a short outage must not end leadership");

    // An outage longer than the deadline: leadership ends, naming why.
    api.set_down(true);
    let why = tokio::time::timeout(Duration::from_secs(3), holding)
        .await
        .unwrap()
        .unwrap();
    assert!(why.contains("renew deadline"), "{why}");
}

#[tokio::test]
async fn a_config_the_sidecar_would_refuse_is_degraded_and_never_applied() {
    // The in-memory API does not run the CRD's schema, so the object gets in as it would on a
    // cluster whose CRD predates the rule; the reconciler must still refuse it.
    let spec = json!({ "replicas": 1, "minReplicas": 1, "maxReplicas": 1,
        "rateLimits": { "rules": [{ "name": "orders", "path_prefix": "/api/orders", "requests_per_second": 2, "burst": 0 }] } });
    let fake = fake(mall(spec), vec![]).await;
    let ctx = Context::new(fake.clone());
    let outcome = pass(&fake, &ctx).await;
    assert!(outcome.applied.is_empty(), "{outcome:?}");
    assert!(Api::<ConfigMap>::namespaced(fake.clone(), NS)
        .get_opt("shop-sidecar")
        .await
        .unwrap()
        .is_none());
    let md = Api::<MallDeployment>::namespaced(fake.clone(), NS)
        .get("shop")
        .await
        .unwrap();
    let degraded = md
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert_eq!(degraded.status, "True");
    assert!(
        degraded.message.contains("spec.rateLimits.rules[0].burst"),
        "{}",
        degraded.message
    );
}

#[tokio::test]
async fn the_prometheus_operator_installed_later_is_noticed_and_its_objects_kept() {
    let fake = fake(mall(sqlite_spec()), vec![]).await;
    let ctx = Context::new(fake.clone());
    assert!(pass(&fake, &ctx)
        .await
        .applied
        .iter()
        .all(|a| !a.starts_with("PrometheusRule")));
    let crds = Api::<CustomResourceDefinition>::all(fake.clone());
    for name in mall_operator::controller::MONITORING_CRDS {
        crds.create(&Default::default(), &crd_named(name)).await.unwrap();
    }
    // `sync` runs the same probe the controller runs every few seconds.
    let applied = pass(&fake, &ctx).await.applied;
    assert!(applied.contains(&"PrometheusRule/shop".to_string()), "{applied:?}");
    assert!(applied.contains(&"ServiceMonitor/shop".to_string()), "{applied:?}");
    let md = Api::<MallDeployment>::namespaced(fake.clone(), NS)
        .get("shop")
        .await
        .unwrap();
    assert!(md.status.unwrap().monitoring.message.contains("applied"));
}

#[test]
fn two_processes_never_share_an_identity() {
    assert_ne!(default_identity(), default_identity());
}

#[test]
fn setting_only_the_sidecar_image_keeps_the_sidecars_defaults() {
    let with_image = mall(json!({ "sidecar": { "image": "registry.local/sidecar:2" } }));
    let default = mall(json!({}));
    assert_eq!(with_image.spec.sidecar.cpu, default.spec.sidecar.cpu);
    assert_eq!(with_image.spec.sidecar.memory, default.spec.sidecar.memory);
    assert_eq!(
        (
            with_image.spec.sidecar.cpu.request.as_str(),
            with_image.spec.sidecar.memory.request.as_str()
        ),
        ("100m", "64Mi")
    );
}

/// A Prometheus that does not select the mall's PrometheusRule has not loaded its rules: the
/// operator says so in status and a condition naming the likely cause (here a stub Prometheus
/// HTTP API answering as one whose ruleSelector matches nothing).
#[tokio::test]
async fn rules_a_prometheus_ignores_are_reported() {
    use axum::routing::get;
    let api = axum::Router::new()
        .route(
            "/api/v1/rules",
            get(|| async { axum::Json(json!({ "status": "success", "data": { "groups": [] } })) }),
        )
        .route(
            "/api/v1/targets",
            get(|| async {
                axum::Json(json!({ "status": "success", "data": { "activeTargets": [
                    { "labels": { "namespace": NS, "service": "shop" }, "health": "up" }
                ] } }))
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, api).await.unwrap() });

    let fake = fake(mall(sqlite_spec()), vec![]).await;
    let check = mall_operator::verify::PrometheusCheck::new(&url).unwrap();
    let ctx = Context::new(fake.clone()).with_prometheus(check);
    pass(&fake, &ctx).await;
    let status = Api::<MallDeployment>::namespaced(fake.clone(), NS)
        .get("shop")
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(status.monitoring.rules_loaded, Some(false));
    assert_eq!(status.monitoring.targets_up, Some(1));
    let condition = status
        .conditions
        .iter()
        .find(|c| c.type_ == "MonitoringVerified")
        .unwrap();
    assert_eq!(
        (condition.status.as_str(), condition.reason.as_str()),
        ("False", "RulesNotLoaded")
    );
    assert!(condition.message.contains("ruleSelector"), "{}", condition.message);
    assert!(mall_operator::verify::PrometheusCheck::new("https://prom:9090").is_err());
}

/// After a restart every mall's first reconcile waits for the caches at once; all of them go on
/// when the caches fill. (A store's own wait wakes only its last poller: on a real API server 2 of
/// 3 malls were reconciled 30 s late, when their timeout polled them again.)
#[tokio::test]
async fn every_reconcile_waiting_for_the_caches_goes_on_when_they_fill() {
    let fake = fake(mall(sqlite_spec()), vec![]).await;
    let ctx = std::sync::Arc::new(Context::new(fake.clone()));
    let waiting: Vec<_> = (0..5)
        .map(|_| {
            let ctx = ctx.clone();
            tokio::spawn(async move { ctx.stores.ready().await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    ctx.sync().await.unwrap();
    for w in waiting {
        tokio::time::timeout(Duration::from_secs(5), w)
            .await
            .expect("a reconcile still waits for caches that are filled")
            .unwrap();
    }
}
