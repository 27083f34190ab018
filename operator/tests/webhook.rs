//! The Alertmanager webhook over real HTTP, against the in-memory Kubernetes API
//! (`kube-fake-client`): firing alerts scale, repeats do not, the cooldown and the state survive a
//! restart, resolved alerts scale back after the window, bad input is refused.

use std::sync::Arc;

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use kube::api::Api;
use kube::Client;
use kube_fake_client::ClientBuilder;
use mall_operator::autoscale::{self, Webhook};
use mall_operator::controller::{reconcile_once, Context};
use mall_operator::crd::MallDeployment;
use serde_json::{json, Value};

const NS: &str = "shop";
const TOKEN: &str = "alertmanager-token";

fn mall(name: &str, mode: &str, stabilization: u32) -> MallDeployment {
    let mut md: MallDeployment = serde_json::from_value(json!({
        "apiVersion": "mall.example.com/v1alpha1", "kind": "MallDeployment",
        "metadata": { "name": name, "namespace": NS },
        "spec": { "replicas": 2, "minReplicas": 2, "maxReplicas": 5,
                  "database": { "primary": { "name": "mall-db" } },
                  "autoscaling": { "mode": mode, "scaleFactor": 2.0, "cooldownSeconds": 300, "stabilizationSeconds": stabilization } }
    }))
    .unwrap();
    md.metadata.generation = Some(1);
    md
}

/// Serves the webhook on a loopback port with a fresh Context (a restarted operator).
async fn serve(client: &Client) -> (String, Arc<Context>) {
    let ctx = Arc::new(Context::new(client.clone()));
    let hook = Arc::new(Webhook {
        ctx: ctx.clone(),
        token: TOKEN.into(),
    });
    let app = axum::Router::new()
        .route("/alerts", axum::routing::post(autoscale::handle))
        .with_state(hook);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/alerts", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, ctx)
}

fn payload(target: &str, status: &str) -> Value {
    json!({
        "version": "4", "groupKey": "{}:{alertname=\"CriticalQPS\"}", "status": status, "receiver": "mall-operator",
        "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {}, "externalURL": "http://alertmanager", "truncatedAlerts": 0,
        "alerts": [{
            "status": status,
            "labels": { "alertname": "CriticalQPS", "severity": "critical", "action": "scale_up", "malldeployment": target, "namespace": NS, "pod": "p1" },
            "annotations": {}, "startsAt": "2026-11-22T00:00:00Z", "endsAt": "0001-01-01T00:00:00Z", "fingerprint": format!("fp-{target}")
        }]
    })
}

async fn post(url: &str, body: &Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(url)
        .bearer_auth(TOKEN)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn md(client: &Client, name: &str) -> MallDeployment {
    Api::<MallDeployment>::namespaced(client.clone(), NS)
        .get(name)
        .await
        .unwrap()
}

async fn reconcile(client: &Client, ctx: &Context, name: &str) {
    ctx.sync().await.unwrap();
    reconcile_once(&md(client, name).await, ctx, autoscale::now())
        .await
        .unwrap();
}

async fn hpa_min(client: &Client, name: &str) -> Option<i32> {
    Api::<HorizontalPodAutoscaler>::namespaced(client.clone(), NS)
        .get(name)
        .await
        .unwrap()
        .spec
        .unwrap()
        .min_replicas
}

#[tokio::test]
async fn firing_scales_repeats_do_not_and_resolved_scales_back() {
    let client = ClientBuilder::new()
        .with_resource::<MallDeployment>()
        .with_status_subresource::<MallDeployment>()
        .with_object(mall("hpa-shop", "both", 0))
        .with_object(mall("solo", "alerts", 3600))
        .build()
        .await
        .unwrap();
    let (url, ctx) = serve(&client).await;
    reconcile(&client, &ctx, "hpa-shop").await;
    assert_eq!(hpa_min(&client, "hpa-shop").await, Some(2));

    // `both` mode: the alert raises the HPA's floor, it does not touch replicas.
    let (status, body) = post(&url, &payload("hpa-shop", "firing")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["to"], 4);
    let state = md(&client, "hpa-shop").await.status.unwrap();
    assert_eq!(state.alert_scaling.floor, Some(4));
    assert_eq!(state.last_scale.as_ref().map(|e| (e.from, e.to)), Some((2, 4)));
    reconcile(&client, &ctx, "hpa-shop").await;
    assert_eq!(hpa_min(&client, "hpa-shop").await, Some(4));
    assert_eq!(
        md(&client, "hpa-shop").await.spec.replicas,
        2,
        "replicas stay the HPA's business"
    );

    // Alertmanager repeats the notification, and the operator restarts in between: the cooldown
    // is in status, so nothing scales twice.
    let (url, ctx) = serve(&client).await;
    let (status, body) = post(&url, &payload("hpa-shop", "firing")).await;
    assert_eq!((status, body["results"][0]["unchanged"].clone()), (200, json!(true)));
    assert_eq!(
        md(&client, "hpa-shop").await.status.unwrap().alert_scaling.floor,
        Some(4)
    );

    // `alerts` mode: spec.replicas itself, within maxReplicas.
    post(&url, &payload("solo", "firing")).await;
    assert_eq!(md(&client, "solo").await.spec.replicas, 4);

    // Unknown targets are ignored and counted.
    let (status, _) = post(&url, &payload("nobody", "firing")).await;
    assert_eq!(status, 200);
    assert_eq!(ctx.metrics.webhook.with_label_values(&["unknown_target"]).get(), 1);

    // Resolved: after the (zero-second) stabilisation window the next reconcile scales back.
    post(&url, &payload("hpa-shop", "resolved")).await;
    reconcile(&client, &ctx, "hpa-shop").await;
    assert_eq!(hpa_min(&client, "hpa-shop").await, Some(2));
    let state = md(&client, "hpa-shop").await.status.unwrap();
    assert_eq!(state.alert_scaling.floor, None);
    assert_eq!(state.last_scale.as_ref().map(|e| (e.from, e.to)), Some((4, 2)));

    // `solo` has a one-hour window: resolved, but not yet scaled back.
    post(&url, &payload("solo", "resolved")).await;
    reconcile(&client, &ctx, "solo").await;
    assert_eq!(md(&client, "solo").await.spec.replicas, 4);
    assert!(md(&client, "solo")
        .await
        .status
        .unwrap()
        .alert_scaling
        .resolved_since
        .is_some());
}

#[tokio::test]
async fn bad_requests_are_refused() {
    let client = ClientBuilder::new()
        .with_resource::<MallDeployment>()
        .with_status_subresource::<MallDeployment>()
        .build()
        .await
        .unwrap();
    let (url, ctx) = serve(&client).await;
    let http = reqwest::Client::new();
    let no_token = http.post(&url).json(&payload("x", "firing")).send().await.unwrap();
    assert_eq!(no_token.status(), 401);
    let wrong = http
        .post(&url)
        .bearer_auth("guess")
        .json(&payload("x", "firing"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let malformed = http
        .post(&url)
        .bearer_auth(TOKEN)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 400);
    let mut old = payload("x", "firing");
    old["version"] = json!("3");
    let (status, body) = post(&url, &old).await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("version"));
    let mut odd = payload("x", "firing");
    odd["alerts"][0]["status"] = json!("exploding");
    assert_eq!(post(&url, &odd).await.0, 400);
    assert_eq!(ctx.metrics.webhook.with_label_values(&["bad_request"]).get(), 3);
    assert_eq!(ctx.metrics.webhook.with_label_values(&["unauthorized"]).get(), 2);
}

/// The Watchdog pattern over real HTTP: heartbeats are recorded; when they stop for longer than
/// the window, a resolved scale-up alert does not scale the mall down, `MonitoringStale` and a
/// Warning event say so; when they return, the scale-down happens.
#[tokio::test]
async fn a_silent_monitoring_holds_the_floor_until_heartbeats_return() {
    // Scale back after 1 s of resolved alerts; heartbeats expected at least every 100 s.
    let mut spec_md = mall("watched", "alerts", 1);
    spec_md.spec.autoscaling.monitoring_heartbeat_seconds = 100;
    let client = ClientBuilder::new()
        .with_resource::<MallDeployment>()
        .with_status_subresource::<MallDeployment>()
        .with_object(spec_md)
        .build()
        .await
        .unwrap();
    let (url, ctx) = serve(&client).await;
    let heartbeat = |status: &str| {
        let mut p = payload("watched", status);
        p["alerts"][0]["labels"] = json!({ "alertname": "MallMonitoringHeartbeat", "severity": "none",
            "action": "heartbeat", "malldeployment": "watched", "namespace": NS });
        p
    };
    let (status, body) = post(&url, &heartbeat("firing")).await;
    assert_eq!((status, body["heartbeats"].clone()), (200, json!(1)));
    let beat = md(&client, "watched")
        .await
        .status
        .unwrap()
        .alert_scaling
        .last_heartbeat;
    assert!(beat.is_some_and(|t| (autoscale::now() - t).abs() < 5));

    post(&url, &payload("watched", "firing")).await;
    assert_eq!(md(&client, "watched").await.spec.replicas, 4);
    post(&url, &payload("watched", "resolved")).await;

    // The heartbeat is old (monitoring went away with the alert): reconciling later holds the floor.
    let later = autoscale::now() + 120;
    ctx.sync().await.unwrap();
    reconcile_once(&md(&client, "watched").await, &ctx, later)
        .await
        .unwrap();
    let held = md(&client, "watched").await;
    assert_eq!(held.spec.replicas, 4, "no scale-down without heartbeats");
    let stale = held
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "MonitoringStale")
        .unwrap()
        .clone();
    assert_eq!((stale.status.as_str(), stale.reason.as_str()), ("True", "NoHeartbeat"));
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), NS)
        .list(&Default::default())
        .await
        .unwrap();
    assert!(events
        .items
        .iter()
        .any(|e| e.reason.as_deref() == Some("MonitoringStale") && e.type_.as_deref() == Some("Warning")));

    // Heartbeats come again after the (1 s) window has passed: now the quiet was watched to its
    // end, and the scale-down proceeds. Without such a heartbeat it would wait.
    ctx.sync().await.unwrap();
    reconcile_once(&md(&client, "watched").await, &ctx, autoscale::now() + 2)
        .await
        .unwrap();
    assert_eq!(
        md(&client, "watched").await.spec.replicas,
        4,
        "no heartbeat since the window ended"
    );
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    post(&url, &heartbeat("firing")).await;
    ctx.sync().await.unwrap();
    reconcile_once(&md(&client, "watched").await, &ctx, autoscale::now())
        .await
        .unwrap();
    let back = md(&client, "watched").await;
    assert_eq!(back.spec.replicas, 2);
    let condition = back
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "MonitoringStale")
        .unwrap();
    assert_eq!(condition.status, "False");
}

/// The autoscaler's state write carries the state it read earlier; it must not move a heartbeat
/// recorded meanwhile back in time (that would make monitoring look silent and hold scale-downs).
#[tokio::test]
async fn writing_the_scaling_state_keeps_a_newer_heartbeat() {
    let client = ClientBuilder::new()
        .with_resource::<MallDeployment>()
        .with_status_subresource::<MallDeployment>()
        .with_object(mall("beat", "alerts", 60))
        .build()
        .await
        .unwrap();
    let (_url, ctx) = serve(&client).await;
    let read_earlier = md(&client, "beat").await.status.unwrap_or_default().alert_scaling;
    autoscale::record_heartbeat(&ctx, NS, "beat", 2_000).await.unwrap();
    let mut state = read_earlier;
    state.last_heartbeat = Some(1_000);
    let api = Api::<MallDeployment>::namespaced(client.clone(), NS);
    autoscale::write_alert_state(&api, "beat", &state, None).await.unwrap();
    assert_eq!(
        md(&client, "beat").await.status.unwrap().alert_scaling.last_heartbeat,
        Some(2_000)
    );
}

/// `md` with a sale window in effect all year whose waiting room is on.
fn with_a_waiting_room(mut md: MallDeployment) -> MallDeployment {
    md.spec.sale_windows = serde_json::from_value(json!([{
        "name": "all-year", "start": "2026-01-01T00:00", "end": "2099-12-31T23:00", "timeZone": "UTC",
        "minReplicas": 2, "waitingRoom": { "admitPerSecond": 100 }
    }]))
    .unwrap();
    md
}

fn room_alert(target: &str, pod: &str, status: &str) -> Value {
    json!({
        "version": "4", "groupKey": "{}:{alertname=\"WaitingRoomLocalLine\"}", "status": status, "receiver": "mall-operator",
        "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {}, "externalURL": "http://alertmanager", "truncatedAlerts": 0,
        "alerts": [{
            "status": status,
            "labels": { "alertname": "WaitingRoomLocalLine", "severity": "warning", "action": "waiting_room", "malldeployment": target, "namespace": NS, "pod": pod },
            "annotations": {}, "startsAt": "2026-11-22T00:00:00Z", "endsAt": "0001-01-01T00:00:00Z", "fingerprint": format!("room-{pod}")
        }]
    })
}

fn condition(md: &MallDeployment, type_: &str) -> Option<(String, String, String)> {
    md.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

#[tokio::test]
async fn a_pod_whose_waiting_room_lost_redis_shows_in_the_waiting_room_condition() {
    let shop = with_a_waiting_room(mall("room", "alerts", 60));
    let client = ClientBuilder::new()
        .with_resource::<MallDeployment>()
        .with_status_subresource::<MallDeployment>()
        .with_object(shop)
        .build()
        .await
        .unwrap();
    let (url, ctx) = serve(&client).await;
    reconcile(&client, &ctx, "room").await;
    let (status, reason, _) = condition(&md(&client, "room").await, "WaitingRoom").expect("a WaitingRoom condition");
    assert_eq!((status.as_str(), reason.as_str()), ("True", "SharedLine"));

    assert_eq!(post(&url, &room_alert("room", "room-abc", "firing")).await.0, 200);
    let local = md(&client, "room")
        .await
        .status
        .unwrap()
        .alert_scaling
        .waiting_room_local;
    assert_eq!(local, vec!["room-abc".to_string()]);
    reconcile(&client, &ctx, "room").await;
    let (status, reason, message) = condition(&md(&client, "room").await, "WaitingRoom").unwrap();
    assert_eq!((status.as_str(), reason.as_str()), ("False", "LocalLines"));
    assert!(message.contains("room-abc"), "{message}");

    assert_eq!(post(&url, &room_alert("room", "room-abc", "resolved")).await.0, 200);
    reconcile(&client, &ctx, "room").await;
    let (status, _, _) = condition(&md(&client, "room").await, "WaitingRoom").unwrap();
    assert_eq!(status, "True");
}

/// Serves `body` as a sidecar's `/metrics` on a loopback port; counts the requests. Like the
/// sidecar's admin port, it answers with a `Content-Length` and keeps the connection open.
async fn metrics_server(body: &'static str) -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(head.as_bytes()).await;
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_secs(10)).await;
                drop(s);
            });
        }
    });
    (port, hits)
}

fn pod(name: &str, admin_port: u16, phase: &str) -> k8s_openapi::api::core::v1::Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": NS,
                      "labels": { "app.kubernetes.io/name": "mall", "app.kubernetes.io/instance": "room" } },
        "spec": { "containers": [
            { "name": "app", "image": "mall-app", "ports": [{ "name": "http", "containerPort": 8080 }] },
            { "name": "sidecar", "image": "mall-sidecar", "ports": [
                { "name": "http", "containerPort": 8000 }, { "name": "admin", "containerPort": admin_port }] }
        ] },
        "status": { "phase": phase, "podIP": "127.0.0.1" }
    }))
    .unwrap()
}

/// Issue 34: the `WaitingRoom` condition says how many numbers were refused or reused, and why,
/// summed from the pods' own sidecars; a pod that does not answer is counted as not read, a pod
/// not running is not asked, and the pods are read at most every 30 s (the status write this
/// causes triggers the next reconcile, which must not read them again).
#[tokio::test]
async fn the_waiting_room_condition_counts_refusals_and_reused_places_from_the_pods() {
    const ONE: &str = "# TYPE sidecar_waiting_room_tickets_total counter\n\
        sidecar_waiting_room_tickets_total{outcome=\"issued\"} 300\n\
        sidecar_waiting_room_tickets_total{outcome=\"admitted\"} 250\n\
        sidecar_waiting_room_tickets_total{outcome=\"reused\"} 9000\n\
        sidecar_waiting_room_tickets_total{outcome=\"unbound\"} 120\n\
        sidecar_waiting_room_tickets_total{outcome=\"readmit_refused\"} 19\n";
    const TWO: &str = "sidecar_waiting_room_tickets_total{outcome=\"issued\"} 200\n\
        sidecar_waiting_room_tickets_total{outcome=\"reused\"} 980\n\
        sidecar_waiting_room_tickets_total{outcome=\"address_limited\"} 45\n\
        sidecar_waiting_room_tickets_total{outcome=\"no_show\"} 7\n";
    let (one, one_hits) = metrics_server(ONE).await;
    let (two, _) = metrics_server(TWO).await;
    let (pending, pending_hits) = metrics_server(ONE).await;
    // A port nothing listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let shop = with_a_waiting_room(mall("room", "alerts", 60));
    let client = ClientBuilder::new()
        .with_resource::<MallDeployment>()
        .with_status_subresource::<MallDeployment>()
        .with_object(shop)
        .with_object(pod("room-a", one, "Running"))
        .with_object(pod("room-b", two, "Running"))
        .with_object(pod("room-c", dead, "Running"))
        .with_object(pod("room-d", pending, "Pending"))
        .build()
        .await
        .unwrap();
    let (_url, ctx) = serve(&client).await;
    ctx.sync().await.unwrap();
    let now = autoscale::now();
    reconcile_once(&md(&client, "room").await, &ctx, now).await.unwrap();
    let status = md(&client, "room").await.status.unwrap();
    let room = status.waiting_room.clone().expect("status.waitingRoom");
    assert_eq!((room.pods, room.pods_read), (3, 2));
    assert_eq!(room.decisions["reused"], 9980);
    assert_eq!(room.decisions["unbound"], 120);
    assert_eq!(room.decisions["address_limited"], 45);
    let (status_, reason, message) = condition(&md(&client, "room").await, "WaitingRoom").unwrap();
    assert_eq!((status_.as_str(), reason.as_str()), ("True", "SharedLine"));
    assert!(
        message.ends_with(
            "500 numbers issued, 250 admitted; 9980 asks answered with the buyer's own place; 7 no-shows passed over; \
             refused 120 without credentials, 45 over the per-address limit on new numbers, 19 admitted already"
        ),
        "{message}"
    );
    assert!(message.contains("(2 of 3 read at "), "{message}");
    assert_eq!(pending_hits.load(std::sync::atomic::Ordering::SeqCst), 0);

    // The reconcile its own status write triggers does not read the pods again; 30 s later does.
    let read = one_hits.load(std::sync::atomic::Ordering::SeqCst);
    reconcile_once(&md(&client, "room").await, &ctx, now + 5).await.unwrap();
    assert_eq!(one_hits.load(std::sync::atomic::Ordering::SeqCst), read);
    reconcile_once(&md(&client, "room").await, &ctx, now + 31)
        .await
        .unwrap();
    assert_eq!(one_hits.load(std::sync::atomic::Ordering::SeqCst), read + 1);
}
