//! Canary releases (issue 36) through the controller, against the in-memory Kubernetes API
//! (`kube-fake-client`): a change to the pods starts a canary instead of rolling every pod; the
//! operator reads the pods' metrics over real HTTP and promotes, holds or rolls back.
//!
//! Stand-ins, and what they do not model: the in-memory API has no Deployment controller and no
//! kubelet, so the test writes the Deployments' status and creates the pods (Running, on
//! 127.0.0.1, each container port a real loopback listener) as those would; each pod's sidecar
//! and app `/metrics` serve counters the test sets, in the format and names the real sidecar and
//! app expose (`sidecar/src/metrics.rs`, `mall-app/src/metrics.rs`). That the real sidecar splits
//! traffic by the weight the operator writes is tested with the real binaries in
//! `tests/tests/canary.rs`.

use std::sync::{Arc, Mutex};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::Client;
use kube_fake_client::ClientBuilder;
use mall_operator::controller::{reconcile_once, Context};
use mall_operator::crd::MallDeployment;
use mall_operator::verify::PrometheusCheck;
use mall_sidecar_config::SidecarConfig;
use serde_json::{json, Value};

const NS: &str = "shop";

/// A `/metrics` endpoint on a loopback port serving whatever the test last set.
#[derive(Clone)]
struct Board(Arc<Mutex<String>>);

impl Board {
    async fn serve() -> (Board, u16) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let board = Board(Arc::new(Mutex::new(String::new())));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let text = board.0.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let body = text.lock().unwrap().clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(head.as_bytes()).await;
                });
            }
        });
        (board, port)
    }

    fn set(&self, text: String) {
        *self.0.lock().unwrap() = text;
    }
}

/// What one sidecar counted, per group: requests, failed (5xx), and how many answered within
/// 10 ms, 25 ms, 50 ms, 75 ms and 100 ms.
#[derive(Clone, Copy, Default)]
struct Counted {
    ok: u64,
    failed: u64,
    slow_ms: u64,
}

fn sidecar_text(percent: u8, stable: Counted, canary: Counted) -> String {
    let instances = u8::from(percent > 0);
    let mut t = format!(
        "# TYPE sidecar_canary_percent gauge\nsidecar_canary_percent {percent}\nsidecar_canary_instances {instances}\n"
    );
    for (group, c) in [("stable", stable), ("canary", canary)] {
        t += &format!(
            "sidecar_upstream_requests_total{{group=\"{group}\",status_class=\"2xx\"}} {}\n\
             sidecar_upstream_requests_total{{group=\"{group}\",status_class=\"5xx\"}} {}\n",
            c.ok, c.failed
        );
        let total = c.ok + c.failed;
        for le in [0.01, 0.025, 0.05, 0.075, 0.1] {
            let within = if (c.slow_ms as f64) / 1000.0 <= le { total } else { 0 };
            t += &format!("sidecar_upstream_response_seconds_bucket{{group=\"{group}\",le=\"{le}\"}} {within}\n");
        }
        t += &format!("sidecar_upstream_response_seconds_bucket{{group=\"{group}\",le=\"+Inf\"}} {total}\n");
    }
    t
}

fn app_text(orders: u64, failed: u64) -> String {
    format!(
        "http_requests_total{{method=\"POST\",route=\"/api/orders\",status=\"201\"}} {orders}\n\
         http_requests_total{{method=\"POST\",route=\"/api/orders\",status=\"500\"}} {failed}\n"
    )
}

/// A pod as the Deployment controller and kubelet would make it: Running on 127.0.0.1.
struct FakePod {
    sidecar: Board,
    app: Board,
    /// Where its boards are served: what Prometheus scrapes.
    targets: [u16; 2],
}

async fn pod(client: &Client, name: &str, canary: bool) -> FakePod {
    pod_reached(client, name, canary, true).await
}

/// A pod whose metrics the operator can read (`direct`), or not: then its Pod names ports where
/// nothing listens, and only a Prometheus given `targets` reads its boards (a network policy
/// that admits Prometheus alone).
async fn pod_reached(client: &Client, name: &str, canary: bool, direct: bool) -> FakePod {
    let (sidecar, admin) = Board::serve().await;
    let (app, app_port) = Board::serve().await;
    sidecar.set(sidecar_text(0, Counted::default(), Counted::default()));
    app.set(app_text(0, 0));
    let closed = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (admin_seen, app_seen) = if direct {
        (admin, app_port)
    } else {
        (closed(), closed())
    };
    let mut labels = json!({ "app.kubernetes.io/name": "mall", "app.kubernetes.io/instance": "shop" });
    if canary {
        labels["mall.example.com/track"] = json!("canary");
    }
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": NS, "uid": format!("uid-{name}"), "labels": labels },
        "spec": { "containers": [
            { "name": "app", "image": "mall-app", "ports": [{ "name": "app", "containerPort": app_seen }] },
            { "name": "sidecar", "image": "sidecar", "ports": [{ "name": "admin", "containerPort": admin_seen }] }
        ] },
        "status": { "phase": "Running", "podIP": "127.0.0.1" }
    }))
    .unwrap();
    Api::<Pod>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();
    FakePod {
        sidecar,
        app,
        targets: [admin, app_port],
    }
}

fn mall(rollout: Value) -> MallDeployment {
    let mut md: MallDeployment = serde_json::from_value(json!({
        "apiVersion": "mall.example.com/v1alpha1", "kind": "MallDeployment",
        "metadata": { "name": "shop", "namespace": NS, "uid": "u-1" },
        "spec": { "replicas": 2, "minReplicas": 2, "maxReplicas": 4,
                  "app": { "image": "mall-app:1" },
                  "database": { "primary": { "name": "db" } },
                  "rollout": rollout }
    }))
    .unwrap();
    md.metadata.generation = Some(1);
    md
}

fn steps() -> Value {
    json!({ "steps": [{ "weight": 20, "watchSeconds": 30 }, { "weight": 50, "watchSeconds": 30 }],
            "thresholds": { "minRequests": 20 }, "readyTimeoutSeconds": 120 })
}

async fn setup(rollout: Value) -> (Client, Arc<Context>) {
    setup_judged_by(rollout, None).await
}

/// With `prometheus`, the operator judges through the Prometheus at that URL.
async fn setup_judged_by(rollout: Value, prometheus: Option<&str>) -> (Client, Arc<Context>) {
    let client = ClientBuilder::new()
        .with_resource::<MallDeployment>()
        .with_status_subresource::<MallDeployment>()
        .with_status_subresource::<Deployment>()
        .with_object(mall(rollout))
        .build()
        .await
        .unwrap();
    let mut ctx = Context::new(client.clone());
    if let Some(url) = prometheus {
        ctx = ctx.with_prometheus(PrometheusCheck::new(url).unwrap());
    }
    (client, Arc::new(ctx))
}

async fn get(client: &Client) -> MallDeployment {
    Api::<MallDeployment>::namespaced(client.clone(), NS)
        .get("shop")
        .await
        .unwrap()
}

async fn pass(client: &Client, ctx: &Context, now: i64) -> MallDeployment {
    ctx.sync().await.unwrap();
    // Boxed: a reconcile is a large future for a test thread's stack in a debug build.
    Box::pin(reconcile_once(&get(client).await, ctx, now)).await.unwrap();
    get(client).await
}

fn rollout_status(md: &MallDeployment) -> mall_operator::crd::RolloutStatus {
    let status = md.status.as_ref().unwrap();
    status
        .rollout
        .clone()
        .unwrap_or_else(|| panic!("no status.rollout in {status:?}"))
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
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

async fn deployment(client: &Client, name: &str) -> Option<Deployment> {
    Api::<Deployment>::namespaced(client.clone(), NS)
        .get_opt(name)
        .await
        .unwrap()
}

fn image(d: &Deployment) -> String {
    d.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0]
        .image
        .clone()
        .unwrap()
}

fn config_hash(d: &Deployment) -> String {
    d.spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .as_ref()
        .unwrap()["mall.example.com/config-hash"]
        .clone()
}

async fn sidecar_config(client: &Client, name: &str) -> Option<SidecarConfig> {
    let cm = Api::<ConfigMap>::namespaced(client.clone(), NS)
        .get_opt(name)
        .await
        .unwrap()?;
    Some(SidecarConfig::from_toml(&cm.data.unwrap()["sidecar.toml"]).unwrap())
}

/// What the Deployment controller reports once every pod of the Deployment's template is ready.
async fn rolled(client: &Client, name: &str) {
    let api = Api::<Deployment>::namespaced(client.clone(), NS);
    let d = api.get(name).await.unwrap();
    let want = d.spec.as_ref().unwrap().replicas.unwrap_or(1);
    let status = json!({ "status": { "replicas": want, "readyReplicas": want, "updatedReplicas": want,
                                      "availableReplicas": want, "observedGeneration": d.metadata.generation } });
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

async fn set_image(client: &Client, image: &str) {
    Api::<MallDeployment>::namespaced(client.clone(), NS)
        .patch(
            "shop",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "app": { "image": image } } })),
        )
        .await
        .unwrap();
}

async fn annotate(client: &Client, value: Option<&str>) {
    Api::<MallDeployment>::namespaced(client.clone(), NS)
        .patch(
            "shop",
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "annotations": { "mall.example.com/rollout": value } } })),
        )
        .await
        .unwrap();
}

async fn event_notes(client: &Client) -> Vec<(String, String)> {
    Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), NS)
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect()
}

/// The mall at rest on `mall-app:1`, two stable pods serving; a new image then starts a canary.
struct Release {
    client: Client,
    ctx: Arc<Context>,
    stable: Vec<FakePod>,
    t0: i64,
    stable_hash: String,
}

async fn started(rollout: Value) -> Release {
    started_judged_by(rollout, None, 1_800_000_000, true).await
}

/// `started`, at `t0`, judged through `prometheus`, with pods the operator can read or not.
async fn started_judged_by(rollout: Value, prometheus: Option<&str>, t0: i64, direct: bool) -> Release {
    let (client, ctx) = setup_judged_by(rollout, prometheus).await;
    let md = pass(&client, &ctx, t0).await;
    let r = rollout_status(&md);
    assert_eq!(r.phase, "Stable");
    rolled(&client, "shop").await;
    let stable = vec![
        pod_reached(&client, "shop-a", false, direct).await,
        pod_reached(&client, "shop-b", false, direct).await,
    ];
    let stable_hash = config_hash(&deployment(&client, "shop").await.unwrap());
    set_image(&client, "mall-app:2").await;
    let md = pass(&client, &ctx, t0 + 1).await;
    let r = rollout_status(&md);
    assert_eq!((r.phase.as_str(), r.step, r.weight), ("Progressing", 1, 20), "{r:?}");
    // No canary pod before every sidecar has taken the split: one that had not would count it
    // as one more stable instance.
    assert!(
        r.message
            .contains("waiting for 2 sidecars to take the split before the canary pods start"),
        "{}",
        r.message
    );
    assert!(deployment(&client, "shop-canary").await.is_none());
    let split = sidecar_config(&client, "shop-sidecar").await.unwrap().upstream.canary;
    assert_eq!(split.map(|c| c.percent), Some(20), "the split is written first");
    if direct {
        for p in &stable {
            p.sidecar.set(sidecar_text(20, Counted::default(), Counted::default()));
        }
        let r = rollout_status(&pass(&client, &ctx, t0 + 2).await);
        assert_eq!(r.canary_since_unix, t0 + 1, "{r:?}");
        assert!(deployment(&client, "shop-canary").await.is_some());
    }
    Release {
        client,
        ctx,
        stable,
        t0,
        stable_hash,
    }
}

impl Release {
    async fn pass(&self, at: i64) -> MallDeployment {
        pass(&self.client, &self.ctx, self.t0 + at).await
    }

    /// The canary's pod ready and every sidecar at 20 %, found the canary, counted nothing: the
    /// first step's window starts (5 s in).
    async fn canary_watched(&self) -> FakePod {
        rolled(&self.client, "shop-canary").await;
        let cp = pod(&self.client, "shop-canary-x", true).await;
        self.report(&cp, 20, Counted::default(), Counted::default());
        let md = self.pass(5).await;
        assert_eq!(rollout_status(&md).window_since_unix, self.t0 + 5);
        cp
    }

    /// Every sidecar balances at `percent`; the first stable pod's sidecar counted `stable` and
    /// `canary` (the others nothing), so the sums over the pods are exactly these.
    fn report(&self, canary_pod: &FakePod, percent: u8, stable: Counted, canary: Counted) {
        self.stable[0].sidecar.set(sidecar_text(percent, stable, canary));
        for p in self.stable[1..].iter().chain([canary_pod]) {
            p.sidecar
                .set(sidecar_text(percent, Counted::default(), Counted::default()));
        }
    }
}

/// A good change goes through every step and is promoted; the stable pods keep their template
/// (and so their pods) until then, while the weight moves in their config alone.
#[tokio::test]
async fn a_good_change_is_promoted_step_by_step() {
    let r = started(steps()).await;
    let c = &r.client;
    // The stable pods stay on the old image and config hash; their config gains the split.
    let stable = deployment(c, "shop").await.unwrap();
    assert_eq!(image(&stable), "mall-app:1");
    assert_eq!(
        config_hash(&stable),
        r.stable_hash,
        "moving the weight must roll no stable pod"
    );
    let split = sidecar_config(c, "shop-sidecar")
        .await
        .unwrap()
        .upstream
        .canary
        .unwrap();
    assert_eq!((split.percent, split.own_app_is_canary), (20, false));
    assert_eq!(split.dns_name, "shop-can.shop.svc.cluster.local");
    // The canary: its own Deployment (one pod for 20 % of two), config and headless Service.
    let canary = deployment(c, "shop-canary").await.expect("the canary Deployment");
    assert_eq!(image(&canary), "mall-app:2");
    assert_eq!(canary.spec.as_ref().unwrap().replicas, Some(1));
    let labels = canary.spec.as_ref().unwrap().selector.match_labels.clone().unwrap();
    assert_eq!(labels["mall.example.com/track"], "canary");
    let own = sidecar_config(c, "shop-canary-sidecar")
        .await
        .unwrap()
        .upstream
        .canary
        .unwrap();
    assert_eq!((own.percent, own.own_app_is_canary), (20, true));
    let svc = Api::<Service>::namespaced(c.clone(), NS).get("shop-can").await.unwrap();
    assert_eq!(svc.spec.unwrap().selector.unwrap()["mall.example.com/track"], "canary");
    let md = get(c).await;
    assert!(
        condition(&md, "Rollout").2.contains("waiting for the canary pods"),
        "{:?}",
        condition(&md, "Rollout")
    );

    // The canary's pod becomes ready; the window waits for every sidecar to balance at 20 %.
    rolled(c, "shop-canary").await;
    let cp = pod(c, "shop-canary-x", true).await;
    let md = r.pass(5).await;
    assert!(
        condition(&md, "Rollout").2.contains("waiting for 1 sidecars"),
        "{:?}",
        condition(&md, "Rollout")
    );
    // One sidecar has the weight but has not found the canary yet: it would count the canary's
    // answers as stable, so the window still waits.
    let first = Counted {
        ok: 100,
        ..Default::default()
    };
    r.report(&cp, 20, first, Counted::default());
    let unfound = sidecar_text(20, Counted::default(), Counted::default())
        .replace("sidecar_canary_instances 1", "sidecar_canary_instances 0");
    r.stable[1].sidecar.set(unfound);
    let md = r.pass(7).await;
    assert!(
        condition(&md, "Rollout").2.contains("waiting for 1 sidecars"),
        "{:?}",
        condition(&md, "Rollout")
    );
    assert_eq!(rollout_status(&md).window_since_unix, 0);
    r.report(&cp, 20, first, Counted::default());
    let md = r.pass(10).await;
    assert_eq!(rollout_status(&md).window_since_unix, r.t0 + 10);
    // 20 s in: healthy but not watched long enough.
    r.report(
        &cp,
        20,
        Counted {
            ok: 500,
            ..Default::default()
        },
        Counted {
            ok: 100,
            ..Default::default()
        },
    );
    let md = r.pass(30).await;
    assert_eq!(rollout_status(&md).step, 1);
    assert!(
        rollout_status(&md).message.contains("20 of 30 s watched"),
        "{}",
        rollout_status(&md).message
    );
    // 30 s in: step 1 passes, the weight moves to 50 % in both configs.
    let md = r.pass(40).await;
    let s = rollout_status(&md);
    assert_eq!((s.step, s.weight), (2, 50), "{s:?}");
    assert_eq!(
        sidecar_config(c, "shop-sidecar")
            .await
            .unwrap()
            .upstream
            .canary
            .unwrap()
            .percent,
        50
    );
    assert_eq!(config_hash(&deployment(c, "shop").await.unwrap()), r.stable_hash);
    r.report(
        &cp,
        50,
        Counted {
            ok: 600,
            ..Default::default()
        },
        Counted {
            ok: 200,
            ..Default::default()
        },
    );
    r.pass(45).await;
    r.report(
        &cp,
        50,
        Counted {
            ok: 900,
            ..Default::default()
        },
        Counted {
            ok: 500,
            ..Default::default()
        },
    );
    let md = r.pass(76).await;
    let s = rollout_status(&md);
    assert_eq!(s.phase, "Promoting", "{s:?}");
    // Promoting: the stable Deployment takes the new template; the canary serves until it has.
    let stable = deployment(c, "shop").await.unwrap();
    assert_eq!(image(&stable), "mall-app:2");
    assert!(sidecar_config(c, "shop-sidecar")
        .await
        .unwrap()
        .upstream
        .canary
        .is_none());
    assert!(deployment(c, "shop-canary").await.is_some());
    let md = r.pass(77).await;
    assert_eq!(
        rollout_status(&md).phase,
        "Promoting",
        "not before the stable pods are rolled"
    );
    rolled(c, "shop").await;
    let md = r.pass(90).await;
    let s = rollout_status(&md);
    assert_eq!((s.phase.as_str(), s.canary_revision.as_str()), ("Stable", ""), "{s:?}");
    assert!(deployment(c, "shop-canary").await.is_none());
    // The canary's Service goes with its last pod.
    let services = Api::<Service>::namespaced(c.clone(), NS);
    assert!(services.get_opt("shop-can").await.unwrap().is_some());
    Api::<Pod>::namespaced(c.clone(), NS)
        .delete("shop-canary-x", &Default::default())
        .await
        .unwrap();
    r.pass(95).await;
    assert!(services.get_opt("shop-can").await.unwrap().is_none());
    assert!(sidecar_config(c, "shop-canary-sidecar").await.is_none());
    let reasons: Vec<String> = event_notes(c).await.into_iter().map(|(r, _)| r).collect();
    for want in ["CanaryStarted", "CanaryStepPassed", "CanaryPassed", "Promoted"] {
        assert!(reasons.iter().any(|r| r == want), "no {want} event in {reasons:?}");
    }
    let metrics = String::from_utf8(r.ctx.metrics.render()).unwrap();
    assert!(
        metrics.contains("mall_operator_rollouts_total{name=\"shop\",namespace=\"shop\",outcome=\"promoted\"} 1"),
        "{metrics}"
    );
}

/// A canary whose app fails a fifth of its requests is rolled back within its first step, as
/// soon as it has answered enough to judge; the same spec does not start it again.
#[tokio::test]
async fn a_canary_failing_requests_is_rolled_back_in_its_first_step() {
    let r = started(steps()).await;
    let c = &r.client;
    let cp = r.canary_watched().await;
    r.report(
        &cp,
        20,
        Counted {
            ok: 400,
            failed: 1,
            ..Default::default()
        },
        Counted {
            ok: 80,
            failed: 20,
            ..Default::default()
        },
    );
    let md = r.pass(12).await;
    let s = rollout_status(&md);
    assert_eq!(s.phase, "RolledBack", "{s:?}");
    assert!(
        s.message
            .contains("failed requests: canary 20.0 % of 100, stable 0.2 % of 401"),
        "{}",
        s.message
    );
    let (status, reason, message) = condition(&md, "Rollout");
    assert_eq!((status.as_str(), reason.as_str()), ("False", "RolledBack"));
    assert!(message.contains("rolled back at step 1 (20 %)"), "{message}");
    assert!(deployment(c, "shop-canary").await.is_none());
    // The canary's pod outlives its Deployment for its grace period: the stable sidecars keep it
    // in a canary group at 0 % meanwhile, so they never take it for a stable app.
    let split = || async {
        sidecar_config(c, "shop-sidecar")
            .await
            .unwrap()
            .upstream
            .canary
            .map(|g| g.percent)
    };
    assert_eq!(split().await, Some(0));
    assert_eq!(image(&deployment(c, "shop").await.unwrap()), "mall-app:1");
    // The spec still says mall-app:2: no new canary, the stable pods stay.
    let md = r.pass(30).await;
    assert_eq!(rollout_status(&md).phase, "RolledBack");
    assert!(deployment(c, "shop-canary").await.is_none());
    assert_eq!(split().await, Some(0), "the canary's pod is still there");
    // Its Service stays with it: the 0 % group is found through it.
    let services = Api::<Service>::namespaced(c.clone(), NS);
    assert!(services.get_opt("shop-can").await.unwrap().is_some());
    Api::<Pod>::namespaced(c.clone(), NS)
        .delete("shop-canary-x", &Default::default())
        .await
        .unwrap();
    r.pass(35).await;
    assert_eq!(split().await, None, "the canary's pod is gone: so is its group");
    assert!(services.get_opt("shop-can").await.unwrap().is_none());
    assert!(event_notes(c)
        .await
        .iter()
        .any(|(r, n)| r == "RolledBack" && n.contains("failed requests")));
    // A fixed image starts a new release.
    set_image(c, "mall-app:3").await;
    let md = r.pass(40).await;
    assert_eq!(rollout_status(&md).phase, "Progressing");
    r.report(&cp, 20, Counted::default(), Counted::default());
    r.pass(41).await;
    assert_eq!(image(&deployment(c, "shop-canary").await.unwrap()), "mall-app:3");
}

/// 50 ms more on every answer is over the default 25 ms allowance on p99.
#[tokio::test]
async fn a_slower_canary_is_rolled_back_on_latency() {
    let r = started(steps()).await;
    let cp = r.canary_watched().await;
    r.report(
        &cp,
        20,
        Counted {
            ok: 400,
            slow_ms: 10,
            ..Default::default()
        },
        Counted {
            ok: 100,
            slow_ms: 60,
            ..Default::default()
        },
    );
    let md = r.pass(12).await;
    let s = rollout_status(&md);
    assert_eq!(s.phase, "RolledBack", "{s:?}");
    assert!(s.message.contains("p99 response time"), "{}", s.message);
}

/// Orders are a small share of requests: failing them is judged on its own.
#[tokio::test]
async fn a_canary_failing_orders_is_rolled_back() {
    let r = started(steps()).await;
    let cp = r.canary_watched().await;
    r.report(
        &cp,
        20,
        Counted {
            ok: 400,
            ..Default::default()
        },
        Counted {
            ok: 100,
            ..Default::default()
        },
    );
    for p in &r.stable {
        p.app.set(app_text(50, 0));
    }
    cp.app.set(app_text(20, 5));
    let md = r.pass(12).await;
    let s = rollout_status(&md);
    assert_eq!(s.phase, "RolledBack", "{s:?}");
    assert!(
        s.message.contains("failed orders: canary 20.0 % of 25"),
        "{}",
        s.message
    );
}

/// A canary whose pods never become ready (a crash loop, a refused sidecar config) is rolled back
/// once `readyTimeoutSeconds` is up; the stable pods were never touched.
#[tokio::test]
async fn a_canary_that_never_becomes_ready_is_rolled_back_after_the_timeout() {
    let r = started(steps()).await;
    let c = &r.client;
    let md = r.pass(60).await;
    assert_eq!(rollout_status(&md).phase, "Progressing");
    assert!(
        rollout_status(&md).message.contains("0 of 1 ready after 59 of 120 s"),
        "{}",
        rollout_status(&md).message
    );
    let md = r.pass(121).await;
    let s = rollout_status(&md);
    assert_eq!(s.phase, "RolledBack", "{s:?}");
    assert!(
        s.message.contains("0 of 1 canary pods ready after 120 s of waiting"),
        "{}",
        s.message
    );
    assert!(deployment(c, "shop-canary").await.is_none());
    assert_eq!(config_hash(&deployment(c, "shop").await.unwrap()), r.stable_hash);
}

/// Scaling and sale windows leave the pod template alone: no release starts.
#[tokio::test]
async fn scaling_starts_no_release() {
    let (client, ctx) = setup(steps()).await;
    let t0 = 1_800_000_000;
    pass(&client, &ctx, t0).await;
    Api::<MallDeployment>::namespaced(client.clone(), NS)
        .patch(
            "shop",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "replicas": 3, "minReplicas": 3 } })),
        )
        .await
        .unwrap();
    let md = pass(&client, &ctx, t0 + 1).await;
    assert_eq!(rollout_status(&md).phase, "Stable");
    assert!(deployment(&client, "shop-canary").await.is_none());
}

/// The annotation: `pause` holds a step however long it is watched, `promote` ends the release
/// at once, `abort` rolls it back; the operator removes `promote` and `abort` once done.
#[tokio::test]
async fn the_annotation_pauses_promotes_and_aborts() {
    let r = started(steps()).await;
    let c = &r.client;
    let cp = r.canary_watched().await;
    annotate(c, Some("pause")).await;
    r.report(
        &cp,
        20,
        Counted {
            ok: 400,
            ..Default::default()
        },
        Counted {
            ok: 100,
            ..Default::default()
        },
    );
    let md = r.pass(100).await;
    let s = rollout_status(&md);
    assert_eq!((s.phase.as_str(), s.step), ("Paused", 1), "{s:?}");
    annotate(c, Some("promote")).await;
    let md = r.pass(101).await;
    assert_eq!(rollout_status(&md).phase, "Promoting");
    assert!(!md
        .metadata
        .annotations
        .unwrap_or_default()
        .contains_key("mall.example.com/rollout"));
    assert_eq!(image(&deployment(c, "shop").await.unwrap()), "mall-app:2");
    rolled(c, "shop").await;
    assert_eq!(rollout_status(&r.pass(102).await).phase, "Stable");

    // The next change, aborted.
    set_image(c, "mall-app:3").await;
    assert_eq!(rollout_status(&r.pass(110).await).phase, "Progressing");
    annotate(c, Some("abort")).await;
    let md = r.pass(111).await;
    let s = rollout_status(&md);
    assert_eq!(s.phase, "RolledBack");
    assert!(s.message.contains("aborted"), "{}", s.message);
    assert!(!md
        .metadata
        .annotations
        .unwrap_or_default()
        .contains_key("mall.example.com/rollout"));
    assert_eq!(image(&deployment(c, "shop").await.unwrap()), "mall-app:2");
    let metrics = String::from_utf8(r.ctx.metrics.render()).unwrap();
    assert!(metrics.contains("outcome=\"aborted\"} 1"), "{metrics}");

    // A later change promoted: the aborted revision is history then, not "the last release".
    set_image(c, "mall-app:4").await;
    annotate(c, Some("promote")).await;
    assert_eq!(rollout_status(&r.pass(120).await).phase, "Promoting");
    rolled(c, "shop").await;
    assert_eq!(rollout_status(&r.pass(125).await).phase, "Stable");
    let s = rollout_status(&r.pass(130).await);
    assert_eq!((s.phase.as_str(), s.failed_revision.as_str()), ("Stable", ""), "{s:?}");
    assert!(!s.message.contains("rolled back"), "{}", s.message);
}

/// Whether `prometheus` runs here; under CI=true its absence fails the test.
fn prometheus_installed() -> bool {
    let found = std::process::Command::new("prometheus")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("prometheus not found: apt-get install prometheus (scripts/test.sh does it)");
        }
        eprintln!("SKIPPED: prometheus not installed (apt-get install prometheus)");
    }
    found
}

/// A real Prometheus scraping every second the targets the test lists (file-based discovery, as
/// the Prometheus Operator's ServiceMonitor lists a mall's pods), killed when dropped.
struct Prometheus {
    child: std::process::Child,
    url: String,
    targets: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    async fn start() -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let targets = dir.path().join("targets.json");
        std::fs::write(&targets, "[]").unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: mall\n    file_sd_configs:\n      - files: ['{}']\n        refresh_interval: 1s\n",
                targets.display()
            ),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("prometheus starts");
        let url = format!("http://127.0.0.1:{port}");
        let started = std::time::Instant::now();
        while !reqwest::get(format!("{url}/-/ready"))
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(30),
                "Prometheus not ready"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        Prometheus {
            child,
            url,
            targets,
            _dir: dir,
        }
    }

    /// Scrapes these pods' boards with the labels the mall's ServiceMonitor gives their series.
    fn scrape(&self, pods: &[(&str, &FakePod, bool)]) {
        let list: Vec<Value> = pods
            .iter()
            .flat_map(|(name, p, canary)| {
                p.targets.map(|port| {
                    let mut labels = json!({ "namespace": NS, "service": "shop", "pod": name });
                    if *canary {
                        labels["track"] = json!("canary");
                    }
                    json!({ "targets": [format!("127.0.0.1:{port}")], "labels": labels })
                })
            })
            .collect();
        let next = self.targets.with_extension("next");
        std::fs::write(&next, serde_json::to_string(&list).unwrap()).unwrap();
        std::fs::rename(next, &self.targets).unwrap();
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// With a Prometheus, the judgement reads it, not the pods (here the operator cannot reach their
/// metrics ports at all): a healthy first step passes on Prometheus' counts over the window, and
/// a canary failing requests at the second step is rolled back on them. Real time, real
/// Prometheus scraping each pod's counters every second.
#[tokio::test]
async fn with_a_prometheus_the_canary_is_judged_on_its_series() {
    if !prometheus_installed() {
        return;
    }
    let prometheus = Prometheus::start().await;
    let rollout = json!({ "steps": [{ "weight": 20, "watchSeconds": 10 }, { "weight": 50, "watchSeconds": 60 }],
                          "thresholds": { "minRequests": 20 }, "readyTimeoutSeconds": 120 });
    let t0 = unix_now();
    let until = |what: &'static str| {
        let started = std::time::Instant::now();
        move |s: &mall_operator::crd::RolloutStatus| {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(40),
                "{what}: not within 40 s: {s:?}"
            );
        }
    };
    let r = started_judged_by(rollout, Some(&prometheus.url), t0, false).await;
    let c = &r.client;
    prometheus.scrape(&[("shop-a", &r.stable[0], false), ("shop-b", &r.stable[1], false)]);
    // The canary's pods start once Prometheus has seen both stable sidecars take the split.
    let check = until("the canary pods start");
    let mut held_for_prometheus = false;
    while deployment(c, "shop-canary").await.is_none() {
        for p in &r.stable {
            p.sidecar.set(sidecar_text(20, Counted::default(), Counted::default()));
        }
        let s = rollout_status(&r.pass(unix_now() - t0).await);
        // Held until Prometheus had scraped the split: the pods cannot be read, so only it can
        // open the gate.
        held_for_prometheus |= s.message.contains("to take the split");
        check(&s);
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    assert!(
        held_for_prometheus,
        "the canary started before Prometheus saw the split?"
    );
    rolled(c, "shop-canary").await;
    let cp = pod_reached(c, "shop-canary-x", true, false).await;
    prometheus.scrape(&[
        ("shop-a", &r.stable[0], false),
        ("shop-b", &r.stable[1], false),
        ("shop-canary-x", &cp, true),
    ]);
    // Traffic as the sidecars would count it, a little every quarter second: 80 stable and 20
    // canary answers a second, the canary failing 40 % of them once `failing`.
    let (mut stable, mut canary) = (Counted::default(), Counted::default());
    let mut tick = |percent: u8, failing: bool| {
        stable.ok += 20;
        if failing {
            canary.ok += 3;
            canary.failed += 2;
        } else {
            canary.ok += 5;
        }
        r.report(&cp, percent, stable, canary);
    };

    // Step 1: the window waits until Prometheus has scraped every sidecar at 20 %.
    let mut waited_for_prometheus = false;
    let check = until("step 1's window starts");
    let s = loop {
        tick(20, false);
        let s = rollout_status(&r.pass(unix_now() - t0).await);
        waited_for_prometheus |= s.message.contains("waiting for") && s.message.contains("read from Prometheus at");
        if s.window_since_unix > 0 {
            break s;
        }
        check(&s);
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    };
    assert!(s.message.contains("read from Prometheus at"), "{}", s.message);
    assert!(
        waited_for_prometheus,
        "the window started before Prometheus saw the split?"
    );
    let check = until("step 1 passes");
    let s = loop {
        tick(20, false);
        let s = rollout_status(&r.pass(unix_now() - t0).await);
        if s.step == 2 {
            break s;
        }
        assert_eq!(s.phase, "Progressing", "{s:?}");
        check(&s);
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    };
    eprintln!("{}", s.message);
    assert!(
        s.message.contains("step 1 (20 %) passed") && s.message.contains("read from Prometheus at"),
        "{}",
        s.message
    );

    // Step 2: the canary fails 40 % of its answers, the stable pods none: rolled back.
    let check = until("step 2 rolls back");
    let s = loop {
        tick(50, true);
        let s = rollout_status(&r.pass(unix_now() - t0).await);
        if s.phase != "Progressing" {
            break s;
        }
        check(&s);
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    };
    eprintln!("{}", s.message);
    assert_eq!(s.phase, "RolledBack", "{s:?}");
    assert!(
        s.message
            .contains("rolled back at step 2 (50 %): failed requests: canary 4")
            && s.message.contains("read from Prometheus at"),
        "{}",
        s.message
    );
    assert!(deployment(c, "shop-canary").await.is_none());
}

/// A Prometheus that does not answer leaves the judgement to the pods' own metrics, and the
/// status says so.
#[tokio::test]
async fn a_prometheus_that_does_not_answer_leaves_the_judgement_to_the_pods() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{closed}");
    let r = started_judged_by(steps(), Some(&url), 1_800_000_000, true).await;
    let cp = r.canary_watched().await;
    let md = get(&r.client).await;
    assert!(
        rollout_status(&md).message.contains(&format!(
            "read from the pods' metrics, as Prometheus at {url} did not answer"
        )),
        "{}",
        rollout_status(&md).message
    );
    r.report(
        &cp,
        20,
        Counted {
            ok: 400,
            ..Default::default()
        },
        Counted {
            ok: 80,
            failed: 20,
            ..Default::default()
        },
    );
    let s = rollout_status(&r.pass(12).await);
    assert_eq!(s.phase, "RolledBack", "{s:?}");
    assert!(s.message.contains("failed requests: canary 20.0 %"), "{}", s.message);
}

/// A ready canary that loses its pod mid-release (an eviction, a crash, here its Deployment
/// deleted by hand) is waited for again, `readyTimeoutSeconds` from that moment rather than from
/// the release's start, and its window starts over once it is back; one that stays lost is
/// rolled back when that time is up.
#[tokio::test]
async fn a_canary_that_loses_its_pod_is_waited_for_again_from_then() {
    let r = started(steps()).await;
    let c = &r.client;
    let cp = r.canary_watched().await;
    let canaries = Api::<Deployment>::namespaced(c.clone(), NS);
    canaries.delete("shop-canary", &Default::default()).await.unwrap();
    // 200 s into the release, past the 120 s of readyTimeoutSeconds since it started.
    let md = r.pass(200).await;
    let s = rollout_status(&md);
    assert_eq!(s.phase, "Progressing", "{s:?}");
    assert!(s.message.contains("waiting for the canary pods"), "{}", s.message);
    assert_eq!((s.canary_since_unix, s.window_since_unix), (r.t0 + 200, 0));
    assert!(
        deployment(c, "shop-canary").await.is_some(),
        "the operator puts it back"
    );
    // Back and ready: the step's window starts over.
    rolled(c, "shop-canary").await;
    r.report(&cp, 20, Counted::default(), Counted::default());
    let s = rollout_status(&r.pass(210).await);
    assert_eq!((s.canary_since_unix, s.window_since_unix), (0, r.t0 + 210), "{s:?}");
    // Lost again, for good: rolled back 120 s later.
    canaries.delete("shop-canary", &Default::default()).await.unwrap();
    let s = rollout_status(&r.pass(300).await);
    assert_eq!((s.phase.as_str(), s.canary_since_unix), ("Progressing", r.t0 + 300));
    assert_eq!(rollout_status(&r.pass(419).await).phase, "Progressing");
    let s = rollout_status(&r.pass(420).await);
    assert_eq!(s.phase, "RolledBack", "{s:?}");
    assert!(
        s.message.contains("0 of 1 canary pods ready after 120 s of waiting"),
        "{}",
        s.message
    );
}

/// A sidecar that never takes the split (its config file not updated, or not reloaded) holds the
/// canary's pods back, since it would count them as stable instances; the release is rolled back
/// once readyTimeoutSeconds is up, and no canary pod ever ran.
#[tokio::test]
async fn a_split_that_never_reaches_a_sidecar_starts_no_canary_pod_and_is_rolled_back() {
    let (c, ctx) = setup(steps()).await;
    let t0 = 1_800_000_000;
    pass(&c, &ctx, t0).await;
    rolled(&c, "shop").await;
    let stable = [pod(&c, "shop-a", false).await, pod(&c, "shop-b", false).await];
    set_image(&c, "mall-app:2").await;
    pass(&c, &ctx, t0 + 1).await;
    stable[0]
        .sidecar
        .set(sidecar_text(20, Counted::default(), Counted::default()));
    let s = rollout_status(&pass(&c, &ctx, t0 + 60).await);
    assert_eq!(s.phase, "Progressing");
    assert!(
        s.message
            .contains("waiting for 1 sidecars to take the split before the canary pods start, 59 of 120 s"),
        "{}",
        s.message
    );
    assert!(deployment(&c, "shop-canary").await.is_none());
    let s = rollout_status(&pass(&c, &ctx, t0 + 121).await);
    assert_eq!(s.phase, "RolledBack", "{s:?}");
    assert!(
        s.message
            .contains("1 sidecars did not take the split of 20 % within readyTimeoutSeconds (120)"),
        "{}",
        s.message
    );
    assert!(deployment(&c, "shop-canary").await.is_none());
    assert!(sidecar_config(&c, "shop-canary-sidecar").await.is_none());
    assert!(sidecar_config(&c, "shop-sidecar")
        .await
        .unwrap()
        .upstream
        .canary
        .is_none());
}

/// A Prometheus that answers but does not scrape the mall (its ServiceMonitor not selected) is
/// not taken for sidecars without the split: the judgement goes to the pods, and says why.
#[tokio::test]
async fn a_prometheus_without_the_malls_series_leaves_the_judgement_to_the_pods() {
    if !prometheus_installed() {
        return;
    }
    let prometheus = Prometheus::start().await;
    // `started` has both stable sidecars take the split and sees the canary's pods start.
    let r = started_judged_by(steps(), Some(&prometheus.url), 1_800_000_000, true).await;
    r.canary_watched().await;
    let s = rollout_status(&get(&r.client).await);
    assert!(
        s.message.contains("does it select the mall's ServiceMonitor?"),
        "{}",
        s.message
    );
}

/// Steps edited during a release apply to it: a release at step 2 of a list cut to one step is
/// at that step, with its weight, watched from the start (it stayed at step 2 of a one-step
/// list, and indexed past it once judged).
#[tokio::test]
async fn steps_cut_during_a_release_move_it_to_the_nearest_step() {
    let r = started(steps()).await;
    let cp = r.canary_watched().await;
    let ok = |n| Counted {
        ok: n,
        ..Default::default()
    };
    r.report(&cp, 20, ok(500), ok(100));
    assert_eq!(rollout_status(&r.pass(40).await).step, 2);
    Api::<MallDeployment>::namespaced(r.client.clone(), NS)
        .patch(
            "shop",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "rollout": { "steps": [{ "weight": 30, "watchSeconds": 30 }] } } })),
        )
        .await
        .unwrap();
    let s = rollout_status(&r.pass(41).await);
    assert_eq!(
        (s.phase.as_str(), s.step, s.weight, s.window_since_unix),
        ("Progressing", 1, 30, 0),
        "{s:?}"
    );
}
