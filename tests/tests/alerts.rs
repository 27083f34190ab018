//! The alert -> scale loop end to end: a mall app behind the sidecar, a real Prometheus scraping
//! both with the alert rules the operator generates (thresholds set low), a real Alertmanager routed
//! to the operator's webhook, and the operator's decisions applied to an in-memory Kubernetes API
//! (`kube-fake-client`: no API server can run here). Load makes CriticalQPS fire; the replicas
//! double within bounds; Alertmanager's repeats do not double them again. Then Prometheus is killed
//! under load: Alertmanager resolves the alert (and the heartbeat stops), which must not scale the
//! mall down: the floor is held and `MonitoringStale` says why. Prometheus comes back, the load
//! stops, and the replicas come back down after a stabilisation window watched by heartbeats.
//!
//! The rules keep the operator's `for:` durations, so this takes about three minutes.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::api::Api;
use kube_fake_client::ClientBuilder;
use mall_app::testing::RunningApp;
use mall_operator::autoscale::{self, Webhook};
use mall_operator::controller::{reconcile_once, Context};
use mall_operator::crd::MallDeployment;
use mall_sidecar_config::SidecarConfig;
use serde_json::json;

const NS: &str = "shop";
const NAME: &str = "e2e";
const TOKEN: &str = "e2e-alertmanager-token";

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A child process killed when the test ends, whatever happens.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tool(name: &str, package: &str) -> bool {
    if Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{name} not found: apt-get install {package} (scripts/test.sh does it)");
    }
    eprintln!("SKIPPED: {name} not installed (apt-get install {package})");
    false
}

/// Waits for `check`; on timeout, panics with what `explain` says (the state and the logs).
async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F, explain: &dyn Fn() -> String)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if check().await {
            eprintln!("{what}: after {:.0} s", start.elapsed().as_secs_f64());
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("{what}: not within {limit:?}\n{}", explain());
}

/// The last `n` lines of a log file.
fn tail(path: &std::path::Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("({}: {e})", path.display()));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn critical_qps_doubles_replicas_once_and_they_come_back() {
    if !tool("prometheus", "prometheus") || !tool("prometheus-alertmanager", "prometheus-alertmanager") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();

    // The mall: one app instance behind the sidecar (run in this process from its library).
    let app = RunningApp::start(&[]).await;
    let (proxy, admin) = (free_addr(), free_addr());
    let mut config = SidecarConfig::default();
    config.server.listen = proxy;
    config.server.admin_listen = admin;
    config.server.threads = 1;
    config.upstream.servers = vec![mall_sidecar_config::UpstreamServer {
        address: app.addr.to_string(),
        weight: 1,
    }];
    config.rate_limit.enabled = false;
    config.access_log.enabled = false;
    std::thread::spawn(move || mall_sidecar::run(config, None));

    // The MallDeployment, scaled by alerts alone: 1 replica, at most 4, doubling, back after 5 s.
    let md: MallDeployment = serde_json::from_value(json!({
        "apiVersion": "mall.example.com/v1alpha1", "kind": "MallDeployment",
        "metadata": { "name": NAME, "namespace": NS, "generation": 1 },
        "spec": { "replicas": 1, "minReplicas": 1, "maxReplicas": 4,
                  "database": { "primary": { "name": "mall-db" } },
                  "slo": { "highQps": 1, "criticalQps": 2 },
                  "autoscaling": { "mode": "alerts", "scaleFactor": 2.0, "cooldownSeconds": 3600, "stabilizationSeconds": 5,
                                   "monitoringHeartbeatSeconds": 10 } }
    }))
    .unwrap();
    let client = ClientBuilder::new()
        .with_resource::<MallDeployment>()
        .with_status_subresource::<MallDeployment>()
        .with_object(md.clone())
        .build()
        .await
        .unwrap();
    let mds: Api<MallDeployment> = Api::namespaced(client.clone(), NS);
    let ctx = Arc::new(Context::new(client.clone()));

    // The operator's webhook on a loopback port.
    let hook = Arc::new(Webhook {
        ctx: ctx.clone(),
        token: TOKEN.into(),
    });
    let hook_addr = free_addr();
    let listener = tokio::net::TcpListener::bind(hook_addr).await.unwrap();
    let router = axum::Router::new()
        .route("/alerts", axum::routing::post(autoscale::handle))
        .with_state(hook);
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });

    // Alertmanager: every alert to the webhook, quickly, repeated every 4 s while firing.
    let am_addr = free_addr();
    let am_config = dir.path().join("alertmanager.yml");
    let am_log = dir.path().join("alertmanager.log");
    std::fs::write(
        &am_config,
        format!(
            "route:\n  receiver: operator\n  group_by: [namespace, malldeployment, alertname]\n  group_wait: 1s\n  group_interval: 2s\n  repeat_interval: 4s\n\
             receivers:\n  - name: operator\n    webhook_configs:\n      - url: http://{hook_addr}/alerts\n        send_resolved: true\n        http_config:\n          authorization:\n            credentials: {TOKEN}\n"
        ),
    )
    .unwrap();
    let _alertmanager = Proc(
        Command::new("prometheus-alertmanager")
            .arg(format!("--config.file={}", am_config.display()))
            .arg(format!("--storage.path={}", dir.path().join("am").display()))
            .arg(format!("--web.listen-address={am_addr}"))
            .arg("--cluster.listen-address=")
            .arg("--log.level=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&am_log).unwrap())
            .spawn()
            .expect("alertmanager runs"),
    );

    // Prometheus with the operator's rules for this MallDeployment, scraping the sidecar and the app
    // with the labels a ServiceMonitor would give them.
    let tuning = mall_operator::tuning::tune(&md.spec);
    let rules = dir.path().join("rules.yml");
    std::fs::write(
        &rules,
        serde_yaml::to_string(&mall_operator::alerts::rule_groups(&md, &tuning)).unwrap(),
    )
    .unwrap();
    let prom_addr = free_addr();
    let prom_config = dir.path().join("prometheus.yml");
    std::fs::write(
        &prom_config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [{}]\n\
             alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['{am_addr}']\n\
             scrape_configs:\n  - job_name: mall\n    static_configs:\n      - targets: ['{admin}', '{}']\n        labels: {{ namespace: {NS}, service: {NAME}, pod: p1 }}\n",
            rules.display(),
            app.addr
        ),
    )
    .unwrap();
    // Alerts are resent every second, so they end in Alertmanager 4 s after their last evaluation
    // (Prometheus' endsAt is 4 resend delays ahead): a dead Prometheus shows within seconds.
    let start_prometheus = || {
        Proc(
            Command::new("prometheus")
                .arg(format!("--config.file={}", prom_config.display()))
                .arg(format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()))
                .arg(format!("--web.listen-address={prom_addr}"))
                .arg("--rules.alert.resend-delay=1s")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("prometheus runs"),
        )
    };
    let prometheus = start_prometheus();

    // Load: ~25 requests per second through the sidecar, well above criticalQps = 2.
    let loading = Arc::new(AtomicBool::new(true));
    let load = {
        let loading = loading.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            while loading.load(Ordering::Relaxed) {
                let _ = http.get(format!("http://{proxy}/api/products/1")).send().await;
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        })
    };

    // What a timed-out wait shows: the webhook's answers, the last alert state read, and what
    // Alertmanager did (its debug log names every notification and its outcome).
    let last_state = std::sync::Mutex::new(String::from("(not read)"));
    let explain = || {
        let answers: Vec<String> = ["ok", "error", "unauthorized", "bad_request", "unknown_target"]
            .iter()
            .map(|r| format!("{r} {}", ctx.metrics.webhook.with_label_values(&[r]).get()))
            .collect();
        format!(
            "webhook answers: {}\nlast status.alertScaling: {}\nAlertmanager's log (last 60 lines):\n{}",
            answers.join(", "),
            last_state.lock().unwrap(),
            tail(&am_log, 60)
        )
    };

    // CriticalQPS fires (after its `for: 1m`), reaches the webhook, and the replicas double.
    let replicas = || async { mds.get(NAME).await.map(|m| m.spec.replicas).unwrap_or(0) };
    // The webhook writes spec.replicas, then the status that records why: two requests, so wait
    // for both (a read between them saw the new replicas and no last_scale yet).
    wait_until(
        "replicas doubled by CriticalQPS",
        Duration::from_secs(150),
        || async {
            let md = mds.get(NAME).await.ok();
            md.is_some_and(|m| m.spec.replicas == 2 && m.status.is_some_and(|s| s.last_scale.is_some()))
        },
        &explain,
    )
    .await;
    let status = mds.get(NAME).await.unwrap().status.unwrap();
    let event = status.last_scale.expect("the scale is recorded");
    assert_eq!((event.from, event.to), (1, 2));
    assert!(event.reason.contains("CriticalQPS"), "{}", event.reason);

    // Alertmanager repeats the notification every 4 s; within the cooldown nothing doubles again.
    let ok_before = ctx.metrics.webhook.with_label_values(&["ok"]).get();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        ctx.metrics.webhook.with_label_values(&["ok"]).get() > ok_before,
        "repeated notifications arrived"
    );
    assert_eq!(replicas().await, 2, "a repeated alert does not scale twice");
    assert!(
        mds.get(NAME)
            .await
            .unwrap()
            .status
            .unwrap()
            .alert_scaling
            .last_heartbeat
            .is_some(),
        "the heartbeat reaches the webhook"
    );

    // Prometheus dies under load. Alertmanager resolves CriticalQPS (and stops the heartbeat): the
    // danger KEDA's users hit. The floor must hold while monitoring is silent.
    drop(prometheus);
    let reconcile = || async {
        let md = mds.get(NAME).await.unwrap();
        // The in-memory API has no watch: bring the operator's caches up to date first.
        ctx.sync().await.unwrap();
        reconcile_once(&md, &ctx, autoscale::now()).await.unwrap();
        mds.get(NAME).await.unwrap()
    };
    wait_until(
        "CriticalQPS resolved by the dead Prometheus",
        Duration::from_secs(60),
        || async {
            let state = reconcile().await.status.unwrap().alert_scaling;
            *last_state.lock().unwrap() = format!("{state:?} at {}", autoscale::now());
            state.resolved_since.is_some()
        },
        &explain,
    )
    .await;
    let held_from = Instant::now();
    let mut stale = false;
    // Past the 5 s stabilisation window and the 10 s heartbeat window, with the load still on.
    while held_from.elapsed() < Duration::from_secs(25) {
        let md = reconcile().await;
        assert_eq!(md.spec.replicas, 2, "no scale-down while monitoring is dead");
        stale |= md
            .status
            .unwrap()
            .conditions
            .iter()
            .any(|c| c.type_ == "MonitoringStale" && c.status == "True");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(stale, "MonitoringStale says why the floor is held");

    // Prometheus returns and the load stops: heartbeats arrive again, the alert stays resolved, and
    // after a whole window watched by heartbeats the next reconcile (the controller requeues to
    // that moment) scales back.
    let _prometheus = start_prometheus();
    loading.store(false, Ordering::Relaxed);
    load.await.unwrap();
    wait_until(
        "replicas back after the alert resolved",
        Duration::from_secs(150),
        || async {
            let md = reconcile().await;
            *last_state.lock().unwrap() = format!("{:?} at {}", md.status.map(|s| s.alert_scaling), autoscale::now());
            md.spec.replicas == 1
        },
        &explain,
    )
    .await;
    let event = mds.get(NAME).await.unwrap().status.unwrap().last_scale.unwrap();
    assert_eq!((event.from, event.to), (2, 1));

    // Rules proven loaded: asked, this Prometheus says it has every alert rule of the mall and
    // scrapes its two targets.
    let check = mall_operator::verify::PrometheusCheck::new(&format!("http://{prom_addr}")).unwrap();
    let verifying = Context::new(client.clone()).with_prometheus(check);
    verifying.sync().await.unwrap();
    reconcile_once(&mds.get(NAME).await.unwrap(), &verifying, autoscale::now())
        .await
        .unwrap();
    let status = mds.get(NAME).await.unwrap().status.unwrap();
    assert_eq!(status.monitoring.rules_loaded, Some(true), "{:?}", status.monitoring);
    assert_eq!(status.monitoring.targets_up, Some(2), "{:?}", status.monitoring);
    let verified = status
        .conditions
        .iter()
        .find(|c| c.type_ == "MonitoringVerified")
        .unwrap();
    assert_eq!(verified.status, "True", "{}", verified.message);
    drop(app);
}
