//! Reconcile against an in-memory Kubernetes API (`kube-fake-client`: no API server can run on
//! these machines). It implements CRUD, server-side apply, the status subresource and
//! resourceVersions, which is what these tests rely on.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use kube_fake_client::ClientBuilder;
use mall_operator::controller::{reconcile_once, Context};
use mall_operator::crd::MallDeployment;
use mall_operator::desired::CONFIG_HASH;
use serde_json::json;

const NS: &str = "shop";

/// A mall with a shared database (several pods need one), plus `spec`.
fn mall(name: &str, mut spec: serde_json::Value) -> MallDeployment {
    if spec.get("database").is_none() {
        spec["database"] = json!({ "primary": { "name": "mall-db" } });
    }
    let mut md: MallDeployment = serde_json::from_value(json!({
        "apiVersion": "mall.example.com/v1alpha1", "kind": "MallDeployment",
        "metadata": { "name": name, "namespace": NS }, "spec": spec
    }))
    .unwrap();
    md.metadata.generation = Some(1);
    md
}

async fn setup(md: MallDeployment) -> (Client, Arc<Context>) {
    let client = ClientBuilder::new()
        .with_resource::<MallDeployment>()
        .with_status_subresource::<MallDeployment>()
        .with_status_subresource::<Deployment>()
        .with_object(md)
        .build()
        .await
        .unwrap();
    let ctx = Arc::new(Context::new(client.clone()));
    (client, ctx)
}

async fn pass(client: &Client, ctx: &Context, name: &str) -> mall_operator::controller::Outcome {
    // The in-memory API has no watch: bring the operator's caches up to date, as its watches would.
    ctx.sync().await.unwrap();
    let md = Api::<MallDeployment>::namespaced(client.clone(), NS)
        .get(name)
        .await
        .unwrap();
    reconcile_once(&md, ctx, mall_operator::autoscale::now())
        .await
        .unwrap()
        .1
}

async fn versions(client: &Client, name: &str) -> Vec<Option<String>> {
    vec![
        Api::<Deployment>::namespaced(client.clone(), NS)
            .get(name)
            .await
            .unwrap()
            .resource_version(),
        Api::<Service>::namespaced(client.clone(), NS)
            .get(name)
            .await
            .unwrap()
            .resource_version(),
        Api::<ConfigMap>::namespaced(client.clone(), NS)
            .get(&format!("{name}-sidecar"))
            .await
            .unwrap()
            .resource_version(),
        Api::<PodDisruptionBudget>::namespaced(client.clone(), NS)
            .get(name)
            .await
            .unwrap()
            .resource_version(),
        Api::<MallDeployment>::namespaced(client.clone(), NS)
            .get(name)
            .await
            .unwrap()
            .resource_version(),
    ]
}

fn condition(md: &MallDeployment, type_: &str) -> (String, String, String) {
    let c = md
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition"));
    (c.status.clone(), c.reason.clone(), c.last_transition_time.clone())
}

#[tokio::test]
async fn creates_children_then_a_second_pass_writes_nothing() {
    let (client, ctx) = setup(mall("shop", json!({}))).await;
    let first = pass(&client, &ctx, "shop").await;
    assert!(first.status_written);
    for kind in [
        "ConfigMap/shop-sidecar",
        "Service/shop",
        "Service/shop-app",
        "Deployment/shop",
        "PodDisruptionBudget/shop",
        "HorizontalPodAutoscaler/shop",
    ] {
        assert!(
            first.applied.iter().any(|a| a == kind),
            "{kind} applied: {:?}",
            first.applied
        );
    }
    let md = Api::<MallDeployment>::namespaced(client.clone(), NS)
        .get("shop")
        .await
        .unwrap();
    let deployment = Api::<Deployment>::namespaced(client.clone(), NS)
        .get("shop")
        .await
        .unwrap();
    let owner = &deployment.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("MallDeployment", "shop", Some(true))
    );
    let pod = deployment.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let names: Vec<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["app", "sidecar"]);
    let status = md.status.clone().unwrap();
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(
        status.selector,
        "app.kubernetes.io/instance=shop,app.kubernetes.io/name=mall"
    );
    assert_eq!(status.tuning.as_ref().unwrap().db_max_connections, 5);
    assert_eq!(condition(&md, "Ready").0, "False", "no pods are ready yet");
    assert_eq!(condition(&md, "Paused").0, "False");
    assert!(
        status.monitoring.message.contains("not installed"),
        "{:?}",
        status.monitoring
    );

    // Steady state: nothing is written, no resourceVersion moves.
    let before = versions(&client, "shop").await;
    let second = pass(&client, &ctx, "shop").await;
    assert_eq!(second, Default::default(), "second pass wrote {second:?}");
    assert_eq!(versions(&client, "shop").await, before);
}

#[tokio::test]
async fn drift_is_corrected_and_a_spec_change_rolls_the_pods() {
    let (client, ctx) = setup(mall("shop", json!({}))).await;
    pass(&client, &ctx, "shop").await;
    let deployments = Api::<Deployment>::namespaced(client.clone(), NS);

    // Someone edits the Deployment by hand.
    let mut edited = deployments.get("shop").await.unwrap();
    edited.spec.as_mut().unwrap().template.spec.as_mut().unwrap().containers[0].image = Some("evil:latest".into());
    deployments
        .replace("shop", &PostParams::default(), &edited)
        .await
        .unwrap();
    let outcome = pass(&client, &ctx, "shop").await;
    assert_eq!(outcome.applied, ["Deployment/shop"]);
    let image = deployments
        .get("shop")
        .await
        .unwrap()
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .containers[0]
        .image
        .clone();
    assert_eq!(image.as_deref(), Some("ghcr.io/mall-operator/mall-app:0.1.0"));

    // A sidecar setting changes: the ConfigMap changes and so does the pods' config hash.
    let hash = |d: &Deployment| {
        d.spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap()[CONFIG_HASH]
            .clone()
    };
    let old_hash = hash(&deployments.get("shop").await.unwrap());
    let mds = Api::<MallDeployment>::namespaced(client.clone(), NS);
    mds.patch(
        "shop",
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "compression": { "enabled": false, "minBytes": 1024 } } })),
    )
    .await
    .unwrap();
    let outcome = pass(&client, &ctx, "shop").await;
    assert!(
        outcome.applied.contains(&"ConfigMap/shop-sidecar".to_string()),
        "{outcome:?}"
    );
    assert_ne!(hash(&deployments.get("shop").await.unwrap()), old_hash, "the pods roll");
    let toml = Api::<ConfigMap>::namespaced(client.clone(), NS)
        .get("shop-sidecar")
        .await
        .unwrap()
        .data
        .unwrap()["sidecar.toml"]
        .clone();
    let config = mall_sidecar_config::SidecarConfig::from_toml(&toml).unwrap();
    assert!(!config.compression.enabled);
}

#[tokio::test]
async fn paused_leaves_children_alone_and_says_so() {
    let (client, ctx) = setup(mall("shop", json!({}))).await;
    pass(&client, &ctx, "shop").await;
    let mds = Api::<MallDeployment>::namespaced(client.clone(), NS);
    mds.patch(
        "shop",
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "paused": true, "replicas": 3 } })),
    )
    .await
    .unwrap();
    let services = Api::<Service>::namespaced(client.clone(), NS);
    services.delete("shop-app", &Default::default()).await.unwrap();

    let outcome = pass(&client, &ctx, "shop").await;
    assert!(outcome.applied.is_empty());
    assert!(
        services.get_opt("shop-app").await.unwrap().is_none(),
        "paused: the deleted child is not recreated"
    );
    let md = mds.get("shop").await.unwrap();
    let (status, reason, _) = condition(&md, "Paused");
    assert_eq!((status.as_str(), reason.as_str()), ("True", "Paused"));

    mds.patch(
        "shop",
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "paused": false } })),
    )
    .await
    .unwrap();
    pass(&client, &ctx, "shop").await;
    assert!(
        services.get_opt("shop-app").await.unwrap().is_some(),
        "unpaused: recreated"
    );
}

#[tokio::test]
async fn the_hpa_owns_replicas_unless_alerts_alone_scale() {
    let (client, ctx) = setup(mall(
        "shop",
        json!({ "replicas": 3, "minReplicas": 2, "maxReplicas": 8 }),
    ))
    .await;
    pass(&client, &ctx, "shop").await;
    let deployments = Api::<Deployment>::namespaced(client.clone(), NS);
    let hpas = Api::<HorizontalPodAutoscaler>::namespaced(client.clone(), NS);
    assert_eq!(
        deployments.get("shop").await.unwrap().spec.unwrap().replicas,
        Some(2),
        "created at the HPA's floor, then left to the HPA"
    );
    let hpa = hpas.get("shop").await.unwrap().spec.unwrap();
    assert_eq!((hpa.min_replicas, hpa.max_replicas), (Some(2), 8));
    let applied: serde_json::Value = serde_json::to_value(
        mall_operator::desired::children(
            &mall("shop", json!({})).with_uid(),
            &mall_operator::tuning::tune(&mall("shop", json!({})).spec),
            None,
            &Default::default(),
            &Default::default(),
        )
        .deployment,
    )
    .unwrap();
    assert!(
        applied["spec"].get("replicas").is_none(),
        "no replicas field while an HPA owns them"
    );

    let mds = Api::<MallDeployment>::namespaced(client.clone(), NS);
    mds.patch(
        "shop",
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "autoscaling": { "mode": "alerts" } } })),
    )
    .await
    .unwrap();
    let outcome = pass(&client, &ctx, "shop").await;
    assert!(
        outcome
            .applied
            .iter()
            .any(|a| a.starts_with("HorizontalPodAutoscaler/shop (deleted")),
        "{outcome:?}"
    );
    assert!(hpas.get_opt("shop").await.unwrap().is_none());
    assert_eq!(deployments.get("shop").await.unwrap().spec.unwrap().replicas, Some(3));
}

#[tokio::test]
async fn conditions_move_their_transition_time_only_on_a_flip() {
    let (client, ctx) = setup(mall("shop", json!({}))).await;
    pass(&client, &ctx, "shop").await;
    let mds = Api::<MallDeployment>::namespaced(client.clone(), NS);
    let first = condition(&mds.get("shop").await.unwrap(), "Ready");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    pass(&client, &ctx, "shop").await;
    assert_eq!(
        condition(&mds.get("shop").await.unwrap(), "Ready"),
        first,
        "unchanged status keeps its time"
    );

    // The Deployment reports its pods ready: Ready flips, with a new time.
    let deployments = Api::<Deployment>::namespaced(client.clone(), NS);
    let d = deployments.get("shop").await.unwrap();
    let generation = d.metadata.generation;
    let status = json!({ "status": { "replicas": 2, "readyReplicas": 2, "updatedReplicas": 2, "availableReplicas": 2, "observedGeneration": generation } });
    deployments
        .patch_status("shop", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    pass(&client, &ctx, "shop").await;
    let md = mds.get("shop").await.unwrap();
    let ready = condition(&md, "Ready");
    assert_eq!(ready.0, "True");
    assert_ne!(ready.2, first.2);
    assert_eq!(condition(&md, "Progressing").0, "False");
    assert_eq!(md.status.unwrap().ready_replicas, 2);
}

#[tokio::test]
async fn an_invalid_spec_is_degraded_and_touches_nothing() {
    let (client, ctx) = setup(mall(
        "shop",
        json!({ "maxReplicas": 200, "database": { "primary": { "name": "db" }, "connectionBudget": 50 } }),
    ))
    .await;
    let outcome = pass(&client, &ctx, "shop").await;
    assert!(outcome.applied.is_empty());
    let md = Api::<MallDeployment>::namespaced(client.clone(), NS)
        .get("shop")
        .await
        .unwrap();
    let (status, reason, _) = condition(&md, "Degraded");
    assert_eq!((status.as_str(), reason.as_str()), ("True", "InvalidSpec"));
    assert!(md
        .status
        .unwrap()
        .conditions
        .iter()
        .any(|c| c.message.contains("connectionBudget")));
    assert!(Api::<Deployment>::namespaced(client.clone(), NS)
        .get_opt("shop")
        .await
        .unwrap()
        .is_none());
}

trait WithUid {
    fn with_uid(self) -> Self;
}

impl WithUid for MallDeployment {
    fn with_uid(mut self) -> Self {
        self.metadata.uid = Some("u".into());
        self
    }
}

#[tokio::test]
async fn important_changes_are_recorded_as_events() {
    let (client, ctx) = setup(mall("shop", json!({}))).await;
    pass(&client, &ctx, "shop").await;
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), NS)
        .list(&Default::default())
        .await
        .unwrap();
    let reasons: Vec<String> = events.items.iter().filter_map(|e| e.reason.clone()).collect();
    assert!(reasons.contains(&"Applied".to_string()), "{reasons:?}");
}

/// A sale window: from its lead time the HPA's floor is raised, the pods warm the sale's hot
/// products and orders are limited harder; status, a condition, events and the metric say so;
/// after its end everything is back to the spec.
#[tokio::test]
async fn a_sale_window_raises_the_floor_warms_and_limits_then_restores() {
    let spec = json!({
        "minReplicas": 2, "maxReplicas": 12,
        "saleWindows": [{
            "name": "black-friday", "start": "2026-11-27T09:00", "end": "2026-11-27T21:00",
            "timeZone": "Europe/Berlin", "leadMinutes": 30, "minReplicas": 8,
            "hotProducts": { "ids": [7, 42], "top": 300 },
            "orderLimit": { "requestsPerSecond": 2, "burst": 4 }
        }]
    });
    let (client, ctx) = setup(mall("shop", spec)).await;
    let at = |s: &str| mall_operator::sale::parse_instant(s).unwrap();
    let mds = Api::<MallDeployment>::namespaced(client.clone(), NS);
    let hpas = Api::<HorizontalPodAutoscaler>::namespaced(client.clone(), NS);
    let deployments = Api::<Deployment>::namespaced(client.clone(), NS);
    let config_maps = Api::<ConfigMap>::namespaced(client.clone(), NS);
    let pass_at = |now: i64| {
        let (client, ctx) = (client.clone(), ctx.clone());
        async move {
            ctx.sync().await.unwrap();
            let md = Api::<MallDeployment>::namespaced(client, NS).get("shop").await.unwrap();
            reconcile_once(&md, &ctx, now).await.unwrap().0
        }
    };
    let app_env = |d: &Deployment| -> Vec<(String, String)> {
        d.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0]
            .env
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|e| (e.name, e.value.unwrap_or_default()))
            .collect()
    };
    let orders_limit = |cm: &ConfigMap| -> (f64, u32) {
        let toml = &cm.data.as_ref().unwrap()["sidecar.toml"];
        let config = mall_sidecar_config::SidecarConfig::from_toml(toml).unwrap();
        let rule = config.rate_limit.rules.iter().find(|r| r.name == "orders").unwrap();
        (rule.requests_per_second, rule.burst)
    };

    // Before: the floor is the spec's, the next window is announced, and the operator will look
    // again when it takes effect (08:00Z is 09:00 in Berlin; 30 minutes of lead).
    let action = pass_at(at("2026-11-27T07:28:00Z")).await;
    assert!(
        format!("{action:?}").contains("requeue_after: Some(120s)"),
        "{action:?}"
    );
    assert_eq!(hpas.get("shop").await.unwrap().spec.unwrap().min_replicas, Some(2));
    let before = deployments.get("shop").await.unwrap();
    assert!(!app_env(&before).iter().any(|(k, _)| k.starts_with("MALL_WARMUP")));
    assert_eq!(
        orders_limit(&config_maps.get("shop-sidecar").await.unwrap()),
        (20.0, 40)
    );
    let md = mds.get("shop").await.unwrap();
    let sale = &md.status.as_ref().unwrap().sale;
    assert_eq!(sale.next.as_deref(), Some("black-friday"));
    assert_eq!(sale.next_applies.as_deref(), Some("2026-11-27T07:30:00Z"));
    assert_eq!(condition(&md, "SaleWindow").1, "Scheduled");

    // In effect from the lead time.
    pass_at(at("2026-11-27T07:30:00Z")).await;
    assert_eq!(hpas.get("shop").await.unwrap().spec.unwrap().min_replicas, Some(8));
    let during = deployments.get("shop").await.unwrap();
    let env = app_env(&during);
    assert!(
        env.contains(&("MALL_WARMUP_PRODUCT_IDS".into(), "7,42".into())),
        "{env:?}"
    );
    assert!(env.contains(&("MALL_WARMUP_PRODUCTS".into(), "300".into())), "{env:?}");
    assert_eq!(orders_limit(&config_maps.get("shop-sidecar").await.unwrap()), (2.0, 4));
    let md = mds.get("shop").await.unwrap();
    let sale = &md.status.as_ref().unwrap().sale;
    assert_eq!(sale.active.as_deref(), Some("black-friday"));
    assert_eq!(sale.active_end.as_deref(), Some("2026-11-27T20:00:00Z"));
    assert_eq!(condition(&md, "SaleWindow").0, "True");
    let metrics = String::from_utf8(ctx.metrics.render()).unwrap();
    assert!(
        metrics.contains(r#"mall_operator_sale_window_active{malldeployment="shop",malldeployment_namespace="shop",window="black-friday"} 1"#),
        "{metrics}"
    );

    // After the end: back to the spec.
    pass_at(at("2026-11-27T20:00:00Z")).await;
    assert_eq!(hpas.get("shop").await.unwrap().spec.unwrap().min_replicas, Some(2));
    let after = deployments.get("shop").await.unwrap();
    assert_eq!(app_env(&after), app_env(&before));
    assert_eq!(
        orders_limit(&config_maps.get("shop-sidecar").await.unwrap()),
        (20.0, 40)
    );
    let md = mds.get("shop").await.unwrap();
    assert_eq!(condition(&md, "SaleWindow").1, "NoneAhead");

    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), NS)
        .list(&Default::default())
        .await
        .unwrap();
    let reasons: Vec<String> = events.items.iter().filter_map(|e| e.reason.clone()).collect();
    for reason in ["SaleWindowStarted", "SaleWindowEnded"] {
        assert!(reasons.contains(&reason.to_string()), "{reasons:?}");
    }
}

/// A window removed from the spec while in effect leaves no series behind reading 1.
#[tokio::test]
async fn a_sale_window_removed_while_active_leaves_no_metric() {
    let spec = json!({
        "saleWindows": [{ "name": "lunch", "start": "2026-11-27T12:00", "end": "2026-11-27T13:00", "minReplicas": 3 }]
    });
    let (client, ctx) = setup(mall("shop", spec)).await;
    let mds = Api::<MallDeployment>::namespaced(client.clone(), NS);
    let now = mall_operator::sale::parse_instant("2026-11-27T12:30:00Z").unwrap();
    let series =
        r#"mall_operator_sale_window_active{malldeployment="shop",malldeployment_namespace="shop",window="lunch"}"#;
    for (windows, present) in [
        (
            json!([{ "name": "lunch", "start": "2026-11-27T12:00", "end": "2026-11-27T13:00", "minReplicas": 3 }]),
            true,
        ),
        (json!([]), false),
    ] {
        let patch = json!({ "spec": { "saleWindows": windows } });
        mds.patch("shop", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
        ctx.sync().await.unwrap();
        reconcile_once(&mds.get("shop").await.unwrap(), &ctx, now)
            .await
            .unwrap();
        let metrics = String::from_utf8(ctx.metrics.render()).unwrap();
        assert_eq!(metrics.contains(series), present, "{metrics}");
    }
}

/// The `SaleWindowStarted` event says what the window changes: the waiting room when it has one,
/// and nothing about warming when no product is listed (issue 33: "pods warm 0 listed products").
#[tokio::test]
async fn the_sale_window_started_event_says_what_changes() {
    let spec = json!({
        "saleWindows": [{ "name": "lunch", "start": "2026-11-27T12:00", "end": "2026-11-27T13:00", "minReplicas": 3,
                          "waitingRoom": { "admitPerSecond": 400, "burst": 40 } }]
    });
    let (client, ctx) = setup(mall("shop", spec)).await;
    let now = mall_operator::sale::parse_instant("2026-11-27T12:30:00Z").unwrap();
    ctx.sync().await.unwrap();
    let md = Api::<MallDeployment>::namespaced(client.clone(), NS)
        .get("shop")
        .await
        .unwrap();
    reconcile_once(&md, &ctx, now).await.unwrap();
    let notes: Vec<String> = Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), NS)
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("SaleWindowStarted"))
        .filter_map(|e| e.note)
        .collect();
    let [note] = &notes[..] else {
        panic!("one SaleWindowStarted event: {notes:?}")
    };
    assert!(note.contains("replica floor 3"), "{note}");
    assert!(note.contains("waiting room") && note.contains("400"), "{note}");
    assert!(!note.contains("warm"), "{note}");
}
