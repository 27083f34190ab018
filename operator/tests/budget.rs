//! Changing `maxReplicas` restarts no pod, and the database's connection budget holds at every
//! replica count while a new ceiling takes effect: the share of the budget reaches running pods
//! through a ConfigMap (the app resizes its pools: mall-app/tests/allowance.rs), in the order
//! `budget.rs` plans. The fleet here is a model of the pods (how many run, which share each has
//! seen), driven by the in-memory API's HPA and ConfigMap, not a real kubelet: new pods read the
//! ConfigMap as it is when they start, running pods see a change 60 s later (the kubelet's sync
//! period), and a removed pod holds its connections for its 30 s grace period.

mod common;

use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use kube::Client;
use kube_fake_client::ClientBuilder;
use mall_operator::budget::{self, PROPAGATION_SECS};
use mall_operator::controller::{reconcile_once, Context};
use mall_operator::crd::MallDeployment;
use serde_json::json;

const NS: &str = "shop";
const BUDGET: u32 = 100;

async fn setup() -> (Client, Arc<Context>) {
    let mut md: MallDeployment = serde_json::from_value(json!({
        "apiVersion": "mall.example.com/v1alpha1", "kind": "MallDeployment",
        "metadata": { "name": "shop", "namespace": NS, "uid": "u-1" },
        "spec": { "replicas": 2, "minReplicas": 2, "maxReplicas": 10,
                  "app": { "cpu": { "request": "1", "limit": "2" } },
                  "database": { "primary": { "name": "db" }, "connectionBudget": BUDGET } }
    }))
    .unwrap();
    md.metadata.generation = Some(1);
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

async fn pass_at(client: &Client, ctx: &Context, now: i64) {
    ctx.sync().await.unwrap();
    let md = Api::<MallDeployment>::namespaced(client.clone(), NS)
        .get("shop")
        .await
        .unwrap();
    reconcile_once(&md, ctx, now).await.unwrap();
}

async fn set_max_replicas(client: &Client, max: i32) {
    Api::<MallDeployment>::namespaced(client.clone(), NS)
        .patch(
            "shop",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "maxReplicas": max } })),
        )
        .await
        .unwrap();
}

async fn hpa_max(client: &Client) -> i32 {
    Api::<HorizontalPodAutoscaler>::namespaced(client.clone(), NS)
        .get("shop")
        .await
        .unwrap()
        .spec
        .unwrap()
        .max_replicas
}

async fn share(client: &Client) -> budget::Written {
    let cm = Api::<ConfigMap>::namespaced(client.clone(), NS)
        .get("shop-db-allowance")
        .await
        .unwrap();
    budget::Written::read(&cm).unwrap()
}

async fn template(client: &Client) -> serde_json::Value {
    let d = Api::<Deployment>::namespaced(client.clone(), NS)
        .get("shop")
        .await
        .unwrap();
    serde_json::to_value(d.spec.unwrap().template).unwrap()
}

#[tokio::test]
async fn raising_max_replicas_restarts_no_pod_and_the_ceiling_waits_for_the_smaller_share() {
    let (client, ctx) = setup().await;
    let t0 = 1_800_000_000;
    pass_at(&client, &ctx, t0).await;
    let before = template(&client).await;
    assert_eq!((share(&client).await.share, hpa_max(&client).await), (10, 10));

    set_max_replicas(&client, 20).await;
    pass_at(&client, &ctx, t0 + 10).await;
    assert_eq!(
        template(&client).await,
        before,
        "the pod template changed: every pod would restart"
    );
    assert_eq!(share(&client).await.share, 5, "the smaller share is written at once");
    assert_eq!(
        hpa_max(&client).await,
        10,
        "the ceiling waits while pods may still hold 10 each"
    );
    let md = Api::<MallDeployment>::namespaced(client.clone(), NS)
        .get("shop")
        .await
        .unwrap();
    let condition = md
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "ConnectionBudget")
        .unwrap();
    assert_eq!(
        (condition.status.as_str(), condition.reason.as_str()),
        ("False", "Waiting")
    );
    assert!(condition.message.contains("maxReplicas 20"), "{}", condition.message);

    pass_at(&client, &ctx, t0 + 10 + PROPAGATION_SECS).await;
    assert_eq!(hpa_max(&client).await, 20);
    assert_eq!(template(&client).await, before);
}

/// Pods of the model: the share each has seen, and until when a removed one holds it.
struct Pod {
    share: u32,
    leaving_until: Option<i64>,
}

#[tokio::test]
async fn the_connection_budget_holds_at_every_replica_count_while_max_replicas_changes() {
    let (client, ctx) = setup().await;
    let t0 = 1_800_000_000;
    let kubelet_sync = 60;
    let script = [(0, 10), (100, 20), (400, 5), (800, 25), (1200, 10), (1500, 2)];
    let mut pods: Vec<Pod> = Vec::new();
    let mut worst = 0;
    let mut t = 0;
    while t <= 1900 {
        if let Some((_, max)) = script.iter().find(|(at, _)| *at == t) {
            set_max_replicas(&client, *max).await;
        }
        // The Deployment's status: pods not being removed.
        let running = pods.iter().filter(|p| p.leaving_until.is_none()).count() as i32;
        Api::<Deployment>::namespaced(client.clone(), NS)
            .patch_status(
                "shop",
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": { "replicas": running } })),
            )
            .await
            .ok();
        pass_at(&client, &ctx, t0 + t).await;

        let written = share(&client).await;
        // Worst case for the budget: the HPA runs as many pods as it may.
        let ceiling = hpa_max(&client).await as usize;
        let mut running: Vec<&mut Pod> = pods.iter_mut().filter(|p| p.leaving_until.is_none()).collect();
        if running.len() > ceiling {
            for p in running.drain(ceiling..) {
                p.leaving_until = Some(t + 30);
            }
        }
        let running = pods.iter().filter(|p| p.leaving_until.is_none()).count();
        for _ in running..ceiling {
            pods.push(Pod {
                share: written.share,
                leaving_until: None,
            });
        }
        // Running pods see the ConfigMap a sync period after it was written.
        if t0 + t >= written.written_at + kubelet_sync {
            for p in pods.iter_mut() {
                p.share = written.share;
            }
        }
        pods.retain(|p| p.leaving_until.is_none_or(|until| until > t));
        let open: u32 = pods.iter().map(|p| p.share).sum();
        worst = worst.max(open);
        assert!(
            open <= BUDGET,
            "at t={t}: {} pods hold {open} connections, over the budget of {BUDGET} (ConfigMap share {}, ceiling {ceiling})",
            pods.len(),
            written.share
        );
        t += 5;
    }
    // Each ceiling in the script was reached in the end.
    assert_eq!(hpa_max(&client).await, 2);
    assert_eq!(worst, BUDGET, "the fleet used the whole budget at some point");
}
