//! Each child is reconciled on its own: a failing child is reported (condition, event, metric)
//! and never stops the others, and drift that server-side apply cannot merge is repaired. Against
//! the in-memory API with `common/`'s model of how the API server merges a Service's ports.

mod common;

use common::{crd_named, PrometheusRule, Recorded, ServiceMonitor};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::Client;
use kube_fake_client::ClientBuilder;
use mall_operator::autoscale;
use mall_operator::controller::{reconcile_once, Context, Outcome};
use mall_operator::crd::MallDeployment;
use serde_json::json;

const NS: &str = "shop";

fn mall(spec: serde_json::Value) -> MallDeployment {
    let mut md: MallDeployment = serde_json::from_value(json!({
        "apiVersion": "mall.example.com/v1alpha1", "kind": "MallDeployment",
        "metadata": { "name": "shop", "namespace": NS, "uid": "mall-uid" }, "spec": spec
    }))
    .unwrap();
    md.metadata.generation = Some(1);
    md
}

fn production() -> serde_json::Value {
    json!({ "replicas": 4, "minReplicas": 4, "maxReplicas": 10, "database": { "primary": { "name": "mall-db" } } })
}

async fn fake(md: MallDeployment) -> Client {
    ClientBuilder::new()
        .with_resource::<MallDeployment>()
        .with_status_subresource::<MallDeployment>()
        .with_status_subresource::<Deployment>()
        .with_resource::<PrometheusRule>()
        .with_resource::<ServiceMonitor>()
        .with_object(md)
        .build()
        .await
        .unwrap()
}

async fn pass(api: &Recorded, ctx: &Context) -> Outcome {
    ctx.sync().await.unwrap();
    let md = Api::<MallDeployment>::namespaced(api.client.clone(), NS)
        .get("shop")
        .await
        .unwrap();
    reconcile_once(&md, ctx, autoscale::now())
        .await
        .unwrap_or_else(|e| panic!("the reconcile failed as a whole: {e}"))
        .1
}

async fn events(client: &Client, reason: &str) -> Vec<String> {
    Api::<Event>::namespaced(client.clone(), NS)
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .map(|e| e.note.unwrap_or_default())
        .collect()
}

fn metric(ctx: &Context, line_start: &str) -> Option<String> {
    String::from_utf8(ctx.metrics.render())
        .unwrap()
        .lines()
        .find(|l| l.starts_with(line_start))
        .map(str::to_string)
}

#[tokio::test]
async fn a_service_port_changed_by_kubectl_is_repaired_by_replacing_the_ports() {
    let fake = fake(mall(production())).await;
    let api = Recorded::wrap(fake.clone());
    let ctx = Context::new(api.client.clone());
    pass(&api, &ctx).await;
    let services: Api<Service> = Api::namespaced(api.client.clone(), NS);
    let ports = |s: Service| -> Vec<(i32, Option<String>)> {
        s.spec
            .unwrap()
            .ports
            .unwrap()
            .into_iter()
            .map(|p| (p.port, p.name))
            .collect()
    };
    let before = ports(services.get("shop").await.unwrap());
    assert_eq!(before.len(), 1, "{before:?}");
    // kubectl patch svc shop --type=json -p '[{"op":"replace","path":"/spec/ports/0/port","value":81}]'
    let mut drifted = serde_json::to_value(services.get("shop").await.unwrap().spec.unwrap().ports.unwrap()).unwrap();
    drifted[0]["port"] = json!(81);
    services
        .patch(
            "shop",
            &PatchParams {
                field_manager: Some("kubectl-patch".into()),
                ..Default::default()
            },
            &Patch::Merge(json!({ "spec": { "ports": drifted } })),
        )
        .await
        .unwrap();
    // The model refuses a plain forced apply now, as the API server did (422, every 15 s, forever).
    let refused = services
        .patch(
            "shop",
            &PatchParams::apply("mall-operator").force(),
            &Patch::Apply(
                json!({ "apiVersion": "v1", "kind": "Service", "metadata": { "name": "shop" },
                "spec": { "ports": [{ "name": before[0].1, "port": before[0].0, "protocol": "TCP" }] } }),
            ),
        )
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("Duplicate value"), "{refused}");

    let outcome = pass(&api, &ctx).await;
    assert!(outcome.applied.contains(&"Service/shop".to_string()), "{outcome:?}");
    assert_eq!(ports(services.get("shop").await.unwrap()), before);
    let repaired = events(&api.client, "DriftRepaired").await;
    assert!(
        repaired
            .iter()
            .any(|n| n.contains("Service/shop") && n.contains("Duplicate value") && n.contains("replaced /spec/ports")),
        "{repaired:?}"
    );
    assert_eq!(
        metric(
            &ctx,
            "mall_operator_child_apply_total{kind=\"Service\",result=\"replaced\"}"
        )
        .as_deref(),
        Some("mall_operator_child_apply_total{kind=\"Service\",result=\"replaced\"} 1")
    );
    // Repaired: the next pass writes nothing.
    ctx.sync().await.unwrap();
    assert_eq!(pass(&api, &ctx).await, Outcome::default());
}

#[tokio::test]
async fn a_child_that_cannot_be_applied_never_blocks_the_others() {
    let fake = fake(mall(production())).await;
    let api = Recorded::wrap(fake.clone());
    let ctx = Context::new(api.client.clone());
    pass(&api, &ctx).await;

    // The Service now fails on every write; meanwhile the Deployment is deleted and the PDB edited.
    api.fail_writes_to("/services/shop", 500);
    let deployments: Api<Deployment> = Api::namespaced(api.client.clone(), NS);
    deployments.delete("shop", &Default::default()).await.unwrap();
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(api.client.clone(), NS);
    let mut pdb = pdbs.get("shop").await.unwrap();
    let wanted = pdb.spec.clone().unwrap();
    pdb.spec.as_mut().unwrap().max_unavailable =
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(3));
    pdbs.replace("shop", &PostParams::default(), &pdb).await.unwrap();
    // Deleted behind the failing layer's back, so the operator has to write it.
    Api::<Service>::namespaced(fake.clone(), NS)
        .delete("shop", &Default::default())
        .await
        .unwrap();
    let services: Api<Service> = Api::namespaced(api.client.clone(), NS);

    let outcome = pass(&api, &ctx).await;
    assert!(outcome.applied.contains(&"Deployment/shop".to_string()), "{outcome:?}");
    assert!(
        deployments.get_opt("shop").await.unwrap().is_some(),
        "the Deployment is back"
    );
    assert_eq!(
        pdbs.get("shop").await.unwrap().spec.unwrap(),
        wanted,
        "the PDB is repaired"
    );
    let md = Api::<MallDeployment>::namespaced(api.client.clone(), NS)
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
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "ChildNotApplied")
    );
    assert!(
        degraded.message.contains("Service/shop") && degraded.message.contains("injected failure"),
        "{}",
        degraded.message
    );
    let noted = events(&api.client, "ChildNotApplied").await;
    assert!(noted.iter().any(|n| n.starts_with("Service/shop: ")), "{noted:?}");
    assert!(metric(
        &ctx,
        "mall_operator_child_apply_total{kind=\"Service\",result=\"failed\"}"
    )
    .is_some());

    // Once the Service can be written again, it is created and Degraded clears.
    api.clear_failures();
    pass(&api, &ctx).await;
    assert!(services.get_opt("shop").await.unwrap().is_some());
    let md = Api::<MallDeployment>::namespaced(api.client.clone(), NS)
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
    assert_eq!(degraded.status, "False", "{}", degraded.message);
}

#[tokio::test]
async fn monitoring_status_names_what_could_not_be_applied() {
    let fake = ClientBuilder::new()
        .with_resource::<MallDeployment>()
        .with_status_subresource::<MallDeployment>()
        .with_status_subresource::<Deployment>()
        .with_resource::<PrometheusRule>()
        .with_resource::<ServiceMonitor>()
        .with_resource::<CustomResourceDefinition>()
        .with_object(mall(production()))
        .with_object(crd_named("prometheusrules.monitoring.coreos.com"))
        .with_object(crd_named("servicemonitors.monitoring.coreos.com"))
        .build()
        .await
        .unwrap();
    let api = Recorded::wrap(fake.clone());
    api.fail_writes_to("/prometheusrules/shop", 500);
    let ctx = Context::new(api.client.clone());
    pass(&api, &ctx).await;
    let md = Api::<MallDeployment>::namespaced(api.client.clone(), NS)
        .get("shop")
        .await
        .unwrap();
    let monitoring = md.status.unwrap().monitoring.message;
    assert_eq!(monitoring, "not applied: PrometheusRule/shop");
}

#[tokio::test]
async fn an_hpa_mode_deployment_starts_at_the_floor_and_is_then_left_to_the_hpa() {
    let fake = fake(mall(production())).await;
    let api = Recorded::wrap(fake.clone());
    let ctx = Context::new(api.client.clone());
    pass(&api, &ctx).await;
    let deployments: Api<Deployment> = Api::namespaced(api.client.clone(), NS);
    let replicas = |d: Deployment| d.spec.unwrap().replicas;
    assert_eq!(
        replicas(deployments.get("shop").await.unwrap()),
        Some(4),
        "created at minReplicas"
    );

    // The HPA scales (through the scale subresource, as kube-controller-manager).
    deployments
        .patch(
            "shop",
            &PatchParams {
                field_manager: Some("horizontal-pod-autoscaler".into()),
                ..Default::default()
            },
            &Patch::Merge(json!({ "spec": { "replicas": 7 } })),
        )
        .await
        .unwrap();
    for _ in 0..2 {
        pass(&api, &ctx).await;
        assert_eq!(
            replicas(deployments.get("shop").await.unwrap()),
            Some(7),
            "the HPA's count is kept"
        );
    }
    // Created with the floor, handed over once, then never written by the operator again.
    let writes: Vec<String> = api
        .take()
        .into_iter()
        .filter(|c| c.is_write() && c.path.ends_with("/deployments/shop"))
        .map(|c| c.field_manager().unwrap_or_default())
        .collect();
    assert_eq!(
        writes,
        ["mall-operator", "mall-operator-handover", "horizontal-pod-autoscaler"],
        "writes to the Deployment, by field manager"
    );
}

fn degraded(md: &MallDeployment) -> (String, String) {
    let c = md
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .expect("a Degraded condition");
    (c.status.clone(), c.message.clone())
}

/// Issue 33, section 2: the generated `<name>-jwt` Secret is a child like the others. Deleted, it is
/// created again at the next reconcile (not once per process); an existing one is never changed
/// (its key signs every session); and after the mall is deleted and created again under the same
/// name, the new mall gets a Secret of its own once the old one is gone, with `Degraded` saying so
/// meanwhile (never "the children match" while the Deployment's `secretKeyRef` points at nothing).
#[tokio::test]
async fn the_token_secret_is_recreated_when_missing_and_never_changed_when_present() {
    use k8s_openapi::api::core::v1::Secret;
    let fake = fake(mall(production())).await;
    let api = Recorded::wrap(fake.clone());
    let ctx = Context::new(api.client.clone());
    let secrets: Api<Secret> = Api::namespaced(fake.clone(), NS);
    let mds: Api<MallDeployment> = Api::namespaced(fake.clone(), NS);

    pass(&api, &ctx).await;
    let first = secrets.get("shop-jwt").await.expect("the Secret is created");
    pass(&api, &ctx).await;
    let again = secrets.get("shop-jwt").await.unwrap();
    assert_eq!(again.data, first.data, "an existing Secret keeps its key");
    assert_eq!(again.metadata.resource_version, first.metadata.resource_version);
    // A second operator process (a new leader) changes nothing either.
    let successor = Context::new(api.client.clone());
    pass(&api, &successor).await;
    assert_eq!(
        secrets.get("shop-jwt").await.unwrap().metadata.resource_version,
        first.metadata.resource_version
    );

    // kubectl delete secret shop-jwt
    secrets.delete("shop-jwt", &Default::default()).await.unwrap();
    pass(&api, &ctx).await;
    assert!(
        secrets.get_opt("shop-jwt").await.unwrap().is_some(),
        "a deleted Secret is created again by the same process"
    );
    assert_eq!(degraded(&mds.get("shop").await.unwrap()).0, "False");

    // The mall is deleted and created again with the same name (the in-memory API deletes the
    // owned Secret with it, as the garbage collector does): the new mall gets a Secret of its own.
    let reborn = |uid: &str| {
        let mut md = mall(production());
        md.metadata.uid = Some(uid.into());
        md
    };
    let owner_of = |s: Secret| s.metadata.owner_references.unwrap()[0].uid.clone();
    mds.delete("shop", &Default::default()).await.unwrap();
    mds.create(&PostParams::default(), &reborn("mall-uid-2")).await.unwrap();
    pass(&api, &ctx).await;
    let owned = secrets
        .get_opt("shop-jwt")
        .await
        .unwrap()
        .expect("the new mall's Secret");
    assert_eq!(owner_of(owned), "mall-uid-2");
    assert_eq!(degraded(&mds.get("shop").await.unwrap()).0, "False");

    // Again, with the garbage collector behind: the old mall's Secret is still there.
    let old = secrets.get("shop-jwt").await.unwrap();
    mds.delete("shop", &Default::default()).await.unwrap();
    mds.create(&PostParams::default(), &reborn("mall-uid-3")).await.unwrap();
    let mut lagging = old.clone();
    lagging.metadata.resource_version = None;
    lagging.metadata.uid = None;
    secrets.create(&PostParams::default(), &lagging).await.unwrap();
    pass(&api, &ctx).await;
    let (status, message) = degraded(&mds.get("shop").await.unwrap());
    assert_eq!(status, "True", "the old mall's Secret is not the new mall's: {message}");
    assert!(message.contains("Secret/shop-jwt"), "{message}");
    assert_eq!(secrets.get("shop-jwt").await.unwrap().data, old.data, "not changed");
    // The garbage collector removes it: the new mall's Secret is created.
    secrets.delete("shop-jwt", &Default::default()).await.unwrap();
    pass(&api, &ctx).await;
    assert_eq!(owner_of(secrets.get("shop-jwt").await.unwrap()), "mall-uid-3");
    assert_eq!(degraded(&mds.get("shop").await.unwrap()).0, "False");
}
