//! The chart's RBAC is derived from what the operator does: every request the operator makes in
//! the reconcile, webhook, leader-election and controller-watch paths (recorded by the layer in
//! `common/`) must be granted by the ClusterRole/Role `helm template` renders, and every grant
//! must be used. A server-side apply counts as `patch` and `create` (the API server treats the
//! apply of a missing object as a create). Every write names a field manager.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::{chart_grants, crd_named, granted, grants, Access, PrometheusRule, Recorded, ServiceMonitor};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, Patch, PatchParams};
use kube_fake_client::ClientBuilder;
use mall_operator::autoscale::{self, AlertView};
use mall_operator::controller::{self, reconcile_once, Context};
use mall_operator::crd::MallDeployment;
use mall_operator::leader::{self, Elector};
use serde_json::json;

const NS: &str = "shop";

fn mall(mode: &str) -> MallDeployment {
    let mut md: MallDeployment = serde_json::from_value(json!({
        "apiVersion": "mall.example.com/v1alpha1", "kind": "MallDeployment",
        "metadata": { "name": "shop", "namespace": NS, "uid": "u-1" },
        "spec": { "replicas": 2, "minReplicas": 2, "maxReplicas": 6,
                  "database": { "primary": { "name": "db" } },
                  "autoscaling": { "mode": mode } }
    }))
    .unwrap();
    md.metadata.generation = Some(1);
    md
}

/// The operator's own Deployment and pod, as the chart makes them (release `mall-operator`).
fn operator_deployment() -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": { "name": "mall-operator", "namespace": "mall-system" },
        "spec": { "selector": { "matchLabels": { "app": "op" } },
                  "template": { "metadata": { "labels": { "app": "op" } }, "spec": { "containers": [] } } }
    }))
    .unwrap()
}

fn operator_pod() -> k8s_openapi::api::core::v1::Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "mall-operator-abc12", "namespace": "mall-system", "labels": { "app": "op" } },
        "spec": { "containers": [] }
    }))
    .unwrap()
}

async fn everything_the_operator_does() -> Vec<common::Call> {
    let fake = ClientBuilder::new()
        .with_resource::<MallDeployment>()
        .with_status_subresource::<MallDeployment>()
        .with_status_subresource::<Deployment>()
        .with_resource::<PrometheusRule>()
        .with_resource::<ServiceMonitor>()
        .with_object(mall("both"))
        .with_object(crd_named("prometheusrules.monitoring.coreos.com"))
        .with_object(crd_named("servicemonitors.monitoring.coreos.com"))
        .with_object(operator_deployment())
        .with_object(operator_pod())
        .build()
        .await
        .unwrap();
    let api = Recorded::wrap(fake.clone());
    let client = api.client.clone();
    // The test's own reads and edits go straight to the fake, unrecorded.
    let mds: Api<MallDeployment> = Api::namespaced(fake.clone(), NS);
    let ctx = Arc::new(Context::new(client.clone()));
    let pass = || async {
        ctx.sync().await.unwrap();
        let md = mds.get("shop").await.unwrap();
        reconcile_once(&md, &ctx, autoscale::now()).await.unwrap().1
    };

    // Reconcile: create everything, then a deleted child is recreated.
    let first = pass().await;
    assert!(first.applied.iter().any(|a| a == "PrometheusRule/shop"), "{first:?}");
    Api::<Service>::namespaced(fake.clone(), NS)
        .delete("shop-app", &Default::default())
        .await
        .unwrap();
    assert_eq!(pass().await.applied, ["Service/shop-app"]);
    // Drift that server-side apply cannot merge (a 422): a Service's ports are replaced (a merge
    // patch), and each kind that is recreated instead is deleted and applied again.
    Api::<Service>::namespaced(fake.clone(), NS)
        .patch(
            "shop",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "ports": [{ "name": "http", "port": 81, "targetPort": "http" }] } })),
        )
        .await
        .unwrap();
    let drifted = [
        (
            "/api/v1/namespaces/shop/configmaps/shop-sidecar",
            "data",
            json!({ "data": { "sidecar.toml": "edited" } }),
        ),
        (
            "/apis/policy/v1/namespaces/shop/poddisruptionbudgets/shop",
            "spec",
            json!({ "spec": { "maxUnavailable": 3 } }),
        ),
        (
            "/apis/monitoring.coreos.com/v1/namespaces/shop/prometheusrules/shop",
            "spec",
            json!({ "spec": { "groups": [] } }),
        ),
        (
            "/apis/monitoring.coreos.com/v1/namespaces/shop/servicemonitors/shop",
            "spec",
            json!({ "spec": { "endpoints": [] } }),
        ),
    ];
    for (path, _, patch) in &drifted {
        let request = http::Request::patch(*path)
            .header(http::header::CONTENT_TYPE, "application/merge-patch+json")
            .body(serde_json::to_vec(patch).unwrap())
            .unwrap();
        fake.request::<serde_json::Value>(request).await.unwrap();
        api.fail_next("PATCH", path, 422, 1);
    }
    let repaired = pass().await;
    assert_eq!(repaired.applied.len(), 5, "{repaired:?}");
    // Switching to alerts-only scaling deletes the HPA.
    mds.patch(
        "shop",
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "autoscaling": { "mode": "alerts" } } })),
    )
    .await
    .unwrap();
    pass().await;
    // A sale window's waiting room: the mall's pods are listed to read their rooms' counts.
    mds.patch(
        "shop",
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "saleWindows": [{
            "name": "all-year", "start": "2026-01-01T00:00", "end": "2099-12-31T23:00", "timeZone": "UTC",
            "minReplicas": 2, "waitingRoom": { "admitPerSecond": 100 } }] } })),
    )
    .await
    .unwrap();
    pass().await;
    // A canary release: a new image starts one (the canary's Deployment, ConfigMap and headless
    // Service are applied), and going back to the stable image deletes them.
    let image = |image: &str| json!({ "spec": { "rollout": {}, "app": { "image": image } } });
    for spec in [
        image(mall_operator::crd::defaults::APP_IMAGE),
        image("mall-app:canary"),
        image(mall_operator::crd::defaults::APP_IMAGE),
    ] {
        mds.patch("shop", &PatchParams::default(), &Patch::Merge(spec))
            .await
            .unwrap();
        pass().await;
    }
    assert!(Api::<Deployment>::namespaced(fake.clone(), NS)
        .get_opt("shop-canary")
        .await
        .unwrap()
        .is_none());

    // The webhook: a scale-up alert patches spec.replicas and the autoscaler's status.
    let alert = AlertView {
        firing: true,
        fingerprint: "f".into(),
        name: "CriticalQPS".into(),
    };
    let change = autoscale::apply_alerts(&ctx, NS, "shop", &[alert], autoscale::now())
        .await
        .unwrap();
    assert_eq!(change.map(|c| c.to), Some(4));
    pass().await;

    // A repeated event (same reason and note) is patched as a series.
    let md = mds.get("shop").await.unwrap();
    for _ in 0..2 {
        ctx.event(&md, true, "InvalidSpec", "the same note".into()).await;
    }

    // Leader election: the Lease's owner (the operator's Deployment), a starting replica takes the
    // leader label off its pod, takes the free lease, labels its pod, renews.
    let owner = leader::deployment_owner(&client, "mall-system", "mall-operator")
        .await
        .unwrap();
    leader::label_pod(&client, "mall-system", "mall-operator-abc12", false)
        .await
        .unwrap();
    let elector = Elector::new(
        client.clone(),
        "mall-system",
        "mall-operator-leader",
        "a",
        Duration::from_secs(15),
    )
    .with_owner(Some(owner));
    assert!(elector.try_lead(k8s_openapi::jiff::Timestamp::now()).await.unwrap());
    leader::label_pod(&client, "mall-system", "mall-operator-abc12", true)
        .await
        .unwrap();
    assert!(elector.try_lead(k8s_openapi::jiff::Timestamp::now()).await.unwrap());
    // SIGTERM: the lease is released.
    assert!(elector.release().await.unwrap());

    // The controller's own requests: its label-selected lists and watches, the CRD probe.
    let run_ctx = Arc::new(Context::new(client.clone()));
    let controller = tokio::spawn(controller::run(run_ctx));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    controller.abort();
    api.take()
}

/// Grants the API server requires without the operator calling them: with the
/// OwnerReferencesPermissionEnforcement admission plugin, setting `blockOwnerDeletion` on a child
/// needs `update` on the owner's `finalizers` subresource.
fn required_without_a_call(a: &Access) -> bool {
    a.group == "mall.example.com" && a.resource == "malldeployments/finalizers" && a.verb == "update"
}

#[tokio::test]
async fn the_chart_grants_exactly_what_the_operator_uses() {
    let calls = everything_the_operator_does().await;
    let Some(rules) = chart_grants() else { return };
    let used: BTreeSet<Access> = calls.iter().flat_map(|c| c.accesses()).collect();
    for want in ["list", "watch", "get", "create", "patch", "delete", "update"] {
        assert!(
            used.iter().any(|a| a.verb == want),
            "the scenario exercises `{want}`: {used:#?}"
        );
    }
    let missing: Vec<&Access> = used.iter().filter(|a| !rules.iter().any(|r| grants(r, a))).collect();
    assert!(missing.is_empty(), "the chart does not grant: {missing:#?}");
    let unused: Vec<Access> = rules
        .iter()
        .flat_map(granted)
        .filter(|g| !required_without_a_call(g))
        .filter(|g| {
            !used.iter().any(|u| {
                u.group == g.group
                    && u.resource == g.resource
                    && u.verb == g.verb
                    && (g.name.is_none() || g.name == u.name)
            })
        })
        .collect();
    assert!(
        unused.is_empty(),
        "the chart grants what the operator never uses: {unused:#?}"
    );

    // Every write names its manager (the audit log and managedFields say who wrote).
    let anonymous: Vec<&common::Call> = calls
        .iter()
        .filter(|c| c.is_write() && c.method != "DELETE" && c.field_manager().is_none())
        .collect();
    assert!(anonymous.is_empty(), "writes without a fieldManager: {anonymous:#?}");
    assert!(
        calls
            .iter()
            .any(|c| c.field_manager().as_deref() == Some("mall-operator-autoscaler")),
        "alert scaling writes as mall-operator-autoscaler"
    );
    // The watches cache the operator's own objects only; the one list of pods (a waiting room's
    // counts) selects one mall's pods.
    for c in calls
        .iter()
        .filter(|c| c.method == "GET" && c.accesses().iter().any(|a| a.verb == "list" || a.verb == "watch"))
    {
        if c.path.ends_with("/pods") {
            assert!(
                c.query.contains("app.kubernetes.io%2Finstance%3Dshop") && !c.query.contains("watch"),
                "pods are listed for one mall only, never watched: {c:?}"
            );
        } else if !c.path.contains("malldeployments") && !c.path.contains("customresourcedefinitions") {
            assert!(
                c.query
                    .contains("labelSelector=app.kubernetes.io%2Fmanaged-by%3Dmall-operator"),
                "unselected list/watch: {c:?}"
            );
        }
    }
}
