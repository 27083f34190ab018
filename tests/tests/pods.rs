//! The mall as it ships: the images `scripts/images.sh` builds, run as the pods `operator render`
//! describes, by the pod runner (`mall_e2e::pod_runner`, standing in for the kubelet, which
//! cannot run here) on the machine's real Docker Engine: the pods' security context, limits,
//! volumes and probes as a kubelet applies them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mall_e2e::pod_runner::{self, docker, Cluster, Network, Pod, Service};
use serde_json::Value;

const TAG: &str = "0.1.0";

fn images_ready() -> bool {
    if !pod_runner::engine_available() {
        return false;
    }
    let images = [
        format!("ghcr.io/mall-operator/mall-app:{TAG}"),
        format!("ghcr.io/mall-operator/sidecar:{TAG}"),
        format!("ghcr.io/mall-operator/operator:{TAG}"),
        pod_runner::INFRA_IMAGE.to_string(),
    ];
    let missing: Vec<&String> = images
        .iter()
        .filter(|i| docker(&["image", "inspect", i]).is_err())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let how = "scripts/test.sh builds them (scripts/images.sh)";
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("images missing: {missing:?}; {how}");
    }
    eprintln!("SKIPPED: images missing: {missing:?}; {how}");
    false
}

fn render(example: &str) -> String {
    let text = std::fs::read_to_string(pod_runner::repo(example)).unwrap();
    mall_operator::render::render(&text).unwrap()
}

/// The Secrets a mall references: the generated token key, and what the test gives.
fn secrets(md_name: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    BTreeMap::from([(
        format!("{md_name}-jwt"),
        BTreeMap::from([("secret".to_string(), "k".repeat(48))]),
    )])
}

/// One pod of the demo example behind its Service, ready.
struct Demo {
    pod: Pod,
    service: Service,
    _world: World,
}

async fn demo(tag: &str) -> Demo {
    // The demo has no database server: the URL its World makes is unused.
    let w = world(tag, &render("examples/mall.yaml"), "unused").await;
    let pod = w.start(&format!("demo-{tag}")).await;
    w.publish(&[&pod]);
    let took = pod_runner::wait_ready(&pod, Duration::from_secs(60)).await.unwrap();
    eprintln!("{tag}: pod ready {took:?} after its containers started");
    let endpoints = Arc::new(Mutex::new(vec![pod_runner::endpoint(&pod)]));
    let service = Service::start(endpoints, 8080).await;
    Demo {
        pod,
        service,
        _world: w,
    }
}

/// The demo pod started while cluster DNS knows nothing of its headless Service (a CoreDNS
/// outage, or the first lookup before the Service lists the new pod; issue 32): it turns Ready
/// as soon as its app is, serves through its own app, and its sidecar says discovery is failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_started_during_a_dns_outage_serves_through_its_own_app() {
    if !images_ready() {
        return;
    }
    let w = world("dns", &render("examples/mall.yaml"), "unused").await;
    // Never published: the Service's name resolves to nothing for the whole test.
    let pod = w.start("demo-dns").await;
    let took = pod_runner::wait_ready(&pod, Duration::from_secs(60)).await;
    let http = reqwest::Client::new();
    let ready = http
        .get(format!("http://{}:9901/ready", pod.ip))
        .send()
        .await
        .map(|r| r.status().as_u16());
    let body = match http.get(format!("http://{}:9901/ready", pod.ip)).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(e) => e.to_string(),
    };
    let product = http
        .get(format!("http://{}:8080/api/products/1", pod.ip))
        .send()
        .await
        .map(|r| r.status().as_u16());
    pod.delete();
    let took = took.unwrap_or_else(|e| panic!("the pod never turned Ready without DNS: {e}; sidecar /ready: {body}"));
    eprintln!("dns outage: pod ready {took:?} after its containers started");
    assert_eq!(ready.ok(), Some(200), "{body}");
    assert!(
        body.contains("discovery: failing"),
        "/ready says discovery is failing: {body}"
    );
    assert_eq!(product.ok(), Some(200), "served through its own app");
}

/// Replaces the demo's rendered sidecar configuration with `edit` of it.
fn edit_sidecar_config(cluster: &mut Cluster, edit: impl Fn(&str) -> String) {
    let file = cluster
        .config_maps
        .get_mut("demo-sidecar")
        .and_then(|cm| cm.get_mut("sidecar.toml"))
        .expect("the demo's sidecar config");
    *file = edit(file);
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.pod.delete();
    }
}

/// a. The demo example's pod starts and turns Ready, and the documented curl lines work through
/// the Service: MISS then HIT, gzip, login, cart, order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_the_demo_pod_serves_the_documented_first_look() {
    if !images_ready() {
        return;
    }
    let d = demo("a").await;
    let http = reqwest::Client::new();
    let first = http.get(d.service.url("/api/products/1")).send().await.unwrap();
    assert_eq!(first.status(), 200, "day one has a catalog");
    assert_eq!(first.headers()["x-cache"], "MISS");
    let second = http.get(d.service.url("/api/products/1")).send().await.unwrap();
    assert_eq!(second.headers()["x-cache"], "HIT");
    let body: Value = second.json().await.unwrap();
    assert_eq!(body["id"], 1);

    let list = http
        .get(d.service.url("/api/products?limit=50"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(list.status(), 200);
    assert_eq!(
        list.headers().get("content-encoding").map(|v| v.to_str().unwrap()),
        Some("gzip")
    );

    let login: Value = http
        .post(d.service.url("/api/auth/login"))
        .json(&serde_json::json!({"username": "user1", "password": "mall-password"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = login["token"].as_str().expect("the demo user logs in").to_string();
    let cart = http
        .post(d.service.url("/api/cart/items"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"product_id": 3, "quantity": 2}))
        .send()
        .await
        .unwrap();
    assert!(cart.status().is_success(), "cart: {}", cart.status());
    let order = http
        .post(d.service.url("/api/orders"))
        .bearer_auth(&token)
        .header("idempotency-key", "first-order")
        .send()
        .await
        .unwrap();
    assert_eq!(order.status(), 201, "order");
    let admin = http
        .post(d.service.url("/api/auth/login"))
        .json(&serde_json::json!({"username": "admin", "password": "mall-password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status(), 200, "the demo's admin logs in");

    // The sidecar reached its own pod's app through the app's Unix socket (POD_IP from the
    // downward API picks the local instance among those DNS returns), never over TCP.
    let metrics = http
        .get(format!("http://{}:9901/metrics", d.pod.ip))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let connections = |transport: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with(&format!(
                    "sidecar_upstream_connections_total{{transport=\"{transport}\"}}"
                ))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(
        connections("unix") >= 1.0,
        "the in-pod hop takes the socket:\n{metrics}"
    );
    assert_eq!(connections("tcp"), 0.0, "no TCP connection to the pod's own app");
}

/// h. A client on a pod address (the host's forwarder reaches the pod from the pod network's
/// gateway, a 172.16/12 address like any pod's or SNATed node's) cannot choose its rate-limit key by
/// rotating `X-Forwarded-For`: the demo trusts no proxy, so every request counts against the peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_a_rotating_forwarded_for_from_a_pod_address_gets_no_fresh_budget() {
    if !images_ready() {
        return;
    }
    let d = demo("h").await;
    let http = reqwest::Client::new();
    let (mut limited, mut passed) = (0, 0);
    // The orders rule allows a burst of 40 at 20/s: 100 requests in well under a second pass at
    // most about 45 when they share one key.
    for i in 0..100 {
        let status = http
            .post(d.service.url("/api/orders"))
            .header("x-forwarded-for", format!("203.0.113.{i}"))
            .send()
            .await
            .unwrap()
            .status();
        if status == 429 {
            limited += 1;
        } else {
            passed += 1;
        }
    }
    assert!(
        limited >= 40,
        "{passed} requests passed and {limited} were limited: a rotating X-Forwarded-For bought fresh budgets"
    );
}

/// e. The containers run as 65532 with no capabilities, and with a read-only root filesystem
/// nothing fails; d (CPU). With a 500m limit and no tuning environment, each starts one worker,
/// read from the cgroup, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e_containers_run_unprivileged_on_a_read_only_root_within_their_limits() {
    if !images_ready() {
        return;
    }
    let d = demo("e").await;
    for name in ["app", "sidecar"] {
        let inspect = d.pod.inspect(name);
        let config = &inspect["HostConfig"];
        assert_eq!(inspect["Config"]["User"], "65532:65532", "{name}");
        assert_eq!(config["ReadonlyRootfs"], true, "{name}");
        assert_eq!(config["CapDrop"], serde_json::json!(["ALL"]), "{name}");
        assert!(
            config["SecurityOpt"].to_string().contains("no-new-privileges"),
            "{name}: {}",
            config["SecurityOpt"]
        );
        assert_eq!(config["NanoCpus"], 500_000_000, "{name}: the 500m limit");
        // What the kernel says of the running process.
        let pid = inspect["State"]["Pid"].as_u64().unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |k: &str| {
            status
                .lines()
                .find(|l| l.starts_with(k))
                .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
                .unwrap_or_default()
        };
        assert!(
            field("Uid:").starts_with("65532 65532"),
            "{name}: Uid {}",
            field("Uid:")
        );
        assert_eq!(field("CapEff:"), "0000000000000000", "{name}: effective capabilities");
        assert_eq!(field("CapPrm:"), "0000000000000000", "{name}: permitted capabilities");
        assert_eq!(field("NoNewPrivs:"), "1", "{name}");
        assert_eq!(
            field("Seccomp:"),
            "2",
            "{name}: a seccomp filter (Docker's default profile)"
        );
    }
    // It served and wrote (SQLite in its emptyDir, a cart) without a writable root.
    let http = reqwest::Client::new();
    let login: Value = http
        .post(d.service.url("/api/auth/login"))
        .json(&serde_json::json!({"username": "user2", "password": "mall-password"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = login["token"].as_str().unwrap();
    let cart = http
        .post(d.service.url("/api/cart/items"))
        .bearer_auth(token)
        .json(&serde_json::json!({"product_id": 5, "quantity": 1}))
        .send()
        .await
        .unwrap();
    assert!(cart.status().is_success());
    for name in ["app", "sidecar"] {
        let logs = d.pod.logs(name);
        assert!(
            !logs.contains("Read-only file system") && !logs.to_lowercase().contains("permission denied"),
            "{name}: {logs}"
        );
    }
    // The sidecar's worker count: the operator tunes it from the same 500m limit.
    let sidecar_logs = d.pod.logs("sidecar");
    assert!(
        sidecar_logs.contains("\"threads\":1") || sidecar_logs.contains("threads=1"),
        "{sidecar_logs}"
    );
}

/// d. Without the operator's tuning environment, the app and the sidecar read the cgroup's CPU
/// quota (500m: one worker each) and say so in their logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_with_a_500m_limit_and_no_tuning_each_starts_one_worker_from_the_cgroup() {
    if !images_ready() {
        return;
    }
    let mut w = world("d", &render("examples/mall.yaml"), "unused").await;
    for c in w.template["spec"]["containers"].as_array_mut().unwrap() {
        if let Some(env) = c["env"].as_array_mut() {
            let tuning = [
                "MALL_WORKER_THREADS",
                "MALL_DB_MAX_CONNECTIONS",
                "MALL_DB_MIN_CONNECTIONS",
                "MALL_DB_REPLICA_MAX_CONNECTIONS",
                "MALL_CACHE_BYTES",
            ];
            env.retain(|e| !tuning.iter().any(|t| e["name"] == *t));
        }
    }
    // Keep the rendered file (listeners, upstreams) but drop its `threads`, so the sidecar decides.
    edit_sidecar_config(&mut w.cluster, |toml| {
        toml.lines()
            .filter(|l| !l.trim_start().starts_with("threads"))
            .map(|l| format!("{l}\n"))
            .collect()
    });
    let pod = w.start("demo-d").await;
    w.publish(&[&pod]);
    let ready = pod_runner::wait_ready(&pod, Duration::from_secs(60)).await;
    let (app, sidecar) = (pod.logs("app"), pod.logs("sidecar"));
    pod.delete();
    ready.unwrap();
    assert!(
        app.contains("\"worker_threads\":1") && app.contains("cgroup"),
        "the app's log says one worker from the cgroup: {app}"
    );
    assert!(
        sidecar.contains("\"threads\":1") && sidecar.contains("cgroup"),
        "the sidecar's log says one worker from the cgroup: {sidecar}"
    );
}

/// f. The operator image runs `operator render` (it has no shell), and `operator run` without a
/// cluster exits non-zero saying what is missing.
#[test]
fn f_the_operator_image_renders_and_says_what_a_run_without_a_cluster_lacks() {
    if !images_ready() {
        return;
    }
    let image = format!("ghcr.io/mall-operator/operator:{TAG}");
    let examples = pod_runner::repo("examples");
    let mount = format!("{}:/examples:ro", examples.display());
    let out = docker(&[
        "run",
        "--rm",
        "-v",
        &mount,
        &image,
        "render",
        "-f",
        "/examples/mall.yaml",
    ])
    .unwrap();
    assert!(
        out.contains("kind: Deployment") && out.contains("kind: ConfigMap"),
        "{out}"
    );
    let shell = docker(&["run", "--rm", "--entrypoint", "/bin/sh", &image, "-c", "true"]);
    assert!(shell.is_err(), "the image has a shell");
    let run = std::process::Command::new("docker")
        .args(["run", "--rm", &image, "run"])
        .output()
        .unwrap();
    assert!(!run.status.success(), "operator run without a cluster succeeded");
    let said = String::from_utf8_lossy(&run.stderr).to_string() + &String::from_utf8_lossy(&run.stdout);
    assert!(
        said.to_lowercase().contains("kubeconfig") || said.contains("KUBERNETES_SERVICE_HOST"),
        "the message says what is missing: {said}"
    );
}

/// g. A pod whose sidecar configuration is refused never turns Ready, and the sidecar's log says
/// why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g_a_refused_sidecar_config_keeps_the_pod_unready_and_the_log_says_why() {
    if !images_ready() {
        return;
    }
    let mut w = world("g", &render("examples/mall.yaml"), "unused").await;
    // A rate limit of zero requests per second: the sidecar's validator refuses it.
    let before = w.cluster.config_maps["demo-sidecar"]["sidecar.toml"].clone();
    edit_sidecar_config(&mut w.cluster, |toml| {
        toml.replacen("requests_per_second = ", "requests_per_second = 0.0 # was ", 1)
    });
    assert_ne!(
        w.cluster.config_maps["demo-sidecar"]["sidecar.toml"], before,
        "the rendered config has a rate-limit rule to break"
    );
    let pod = w.start("demo-g").await;
    let ready = pod_runner::wait_ready(&pod, Duration::from_secs(15)).await;
    let log = pod.logs("sidecar");
    pod.delete();
    assert!(ready.is_err(), "the pod turned Ready with a refused config");
    assert!(log.contains("requests_per_second"), "the log names the field: {log}");
}

/// A fresh PostgreSQL database on the host (scripts/test.sh starts the server).
async fn postgres_database(tag: &str) -> Option<(String, String)> {
    let admin =
        std::env::var("MALL_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://mall:mall@127.0.0.1:5432/test".into());
    let name = format!("mall_t_pods_{tag}_{}", std::process::id());
    let out = std::process::Command::new("psql")
        .args([
            admin.as_str(),
            "-qc",
            &format!("DROP DATABASE IF EXISTS {name}"),
            "-qc",
            &format!("CREATE DATABASE {name}"),
        ])
        .output();
    match out {
        Ok(o) if o.status.success() => Some((admin, name)),
        other => {
            let why = format!("PostgreSQL at {admin}: {other:?}");
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{why}: scripts/test.sh starts it");
            }
            eprintln!("SKIPPED: {why}");
            None
        }
    }
}

fn psql(admin: &str, db: &str, sql: &str) -> String {
    let url = format!("{}/{db}", admin.rsplit_once('/').unwrap().0);
    let out = std::process::Command::new("psql")
        .args([url.as_str(), "-qAtc", sql])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A mall on its own pod network with every Secret it may reference: the PostgreSQL database
/// `db` (primary and replica) and Redis of the host, reached through forwarders on the network's
/// gateway, the admin password and the token key.
struct World {
    cluster: Cluster,
    template: Value,
    hosts: tempfile::NamedTempFile,
    /// The headless `<name>-app` Service's DNS name.
    app_host: String,
    name: String,
    /// PostgreSQL as the pods reach it (`host:port`).
    pg: String,
    _forwards: Vec<tokio::task::JoinHandle<()>>,
    network: Network,
}

const ADMIN_PASSWORD: &str = "an-admin-password";

async fn world(tag: &str, rendered: &str, db: &str) -> World {
    let network = Network::create(&format!("mall-pods-{tag}-{}", std::process::id()));
    let (pg, pg_forward) = network.forward_host_port(5432).await;
    let (redis, redis_forward) = network.forward_host_port(6379).await;
    let deployment = pod_runner::objects(rendered)
        .into_iter()
        .find(|o| o["kind"] == "Deployment")
        .expect("a Deployment");
    let name = deployment["metadata"]["name"].as_str().unwrap().to_string();
    let ns = deployment["metadata"]["namespace"].as_str().unwrap().to_string();
    let mut cluster = Cluster::from_rendered(rendered);
    cluster.secrets = secrets(&name);
    let url = BTreeMap::from([("url".to_string(), format!("postgres://mall:mall@{pg}/{db}"))]);
    cluster.secrets.insert("mall-db".into(), url.clone());
    cluster.secrets.insert("mall-db-replica".into(), url);
    cluster.secrets.insert(
        "mall-redis".into(),
        BTreeMap::from([("url".into(), format!("redis://{redis}"))]),
    );
    cluster.secrets.insert(
        "mall-admin".into(),
        BTreeMap::from([("password".into(), ADMIN_PASSWORD.into())]),
    );
    let hosts = tempfile::NamedTempFile::new_in("/var/tmp").unwrap();
    cluster.hosts_file = Some(hosts.path().to_path_buf());
    World {
        cluster,
        template: deployment["spec"]["template"].clone(),
        hosts,
        app_host: format!("{name}-app.{ns}.svc.cluster.local"),
        name,
        pg,
        _forwards: vec![pg_forward, redis_forward],
        network,
    }
}

impl World {
    async fn start(&self, pod: &str) -> Pod {
        pod_runner::start_pod(
            &self.network,
            &self.cluster,
            &self.template,
            &format!("{pod}-{}", std::process::id()),
        )
        .await
        .unwrap()
    }

    /// The headless Service publishes not-ready addresses (as rendered): every pod.
    fn publish(&self, pods: &[&Pod]) {
        let ips: Vec<String> = pods.iter().map(|p| p.ip.clone()).collect();
        pod_runner::write_hosts(self.hosts.path(), &self.app_host, &ips);
    }
}

/// A mall named `shop` with a PostgreSQL primary, alert-scaled, rate limits off, `extra` merged
/// into its spec, as `operator render` prints it.
fn render_shop(extra: Value) -> String {
    mall_operator::render::render(&serde_yaml::to_string(&shop_mall(extra)).unwrap()).unwrap()
}

/// The MallDeployment `render_shop` renders.
fn shop_mall(extra: Value) -> Value {
    let mut spec = serde_json::json!({
        "replicas": 2, "minReplicas": 2, "maxReplicas": 4,
        "autoscaling": { "mode": "alerts" },
        "rateLimits": { "enabled": false },
        "database": { "primary": { "name": "mall-db" } },
        "auth": { "adminPassword": { "name": "mall-admin", "key": "password" } }
    });
    spec.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    serde_json::json!({
        "apiVersion": "mall.example.com/v1alpha1", "kind": "MallDeployment",
        "metadata": { "name": "shop", "namespace": "shop" }, "spec": spec
    })
}

/// The pod runner's liveness probe: a container whose liveness probe fails its threshold is
/// restarted (with its grace period), keeps its emptyDir (the demo's SQLite file), and the pod is
/// Ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_liveness_probe_restarts_the_container_and_the_pod_recovers() {
    if !images_ready() {
        return;
    }
    let d = demo("live").await;
    let app = d.pod.containers.iter().find(|c| c.name == "app").unwrap().id.clone();
    docker(&["kill", &app]).unwrap();
    // Liveness: every 10 s, 3 failures (as rendered), then the restart.
    let started = std::time::Instant::now();
    while d.pod.restarts.lock().unwrap().get("app").copied().unwrap_or(0) == 0 {
        assert!(started.elapsed() < Duration::from_secs(90), "no liveness restart");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    pod_runner::wait_ready(&d.pod, Duration::from_secs(60)).await.unwrap();
    // Served by the restarted app (a login is never cached), from the data it kept.
    let login = reqwest::Client::new()
        .post(d.service.url("/api/auth/login"))
        .json(&serde_json::json!({"username": "user1", "password": "mall-password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200);
    let inspect = d.pod.inspect("app");
    assert_eq!(inspect["State"]["Running"], true);
    eprintln!("restarted after {:?}", started.elapsed());
}

/// c. Pods replaced under load, as a rolling update does (a new pod turns Ready, then an old one
/// gets SIGTERM with its grace period), twice: every response is 2xx, 409 or 429, and every order
/// is stored exactly once (clients resend with the same Idempotency-Key after a broken
/// connection, as they should).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_pods_replaced_under_load_lose_no_request_and_store_every_order_once() {
    if !images_ready() {
        return;
    }
    let Some((admin_url, db)) = postgres_database("c").await else {
        return;
    };
    let w = world("c", &render_shop(serde_json::json!({})), &db).await;
    let endpoints: pod_runner::Endpoints = Arc::new(Mutex::new(Vec::new()));
    let mut pods: Vec<Pod> = Vec::new();
    let refresh = |pods: &[Pod]| {
        w.publish(&pods.iter().collect::<Vec<_>>());
        *endpoints.lock().unwrap() = pods.iter().map(pod_runner::endpoint).collect();
    };
    for i in 0..2 {
        let pod = w.start(&format!("shop-c{i}")).await;
        pods.push(pod);
        refresh(&pods);
        pod_runner::wait_ready(pods.last().unwrap(), Duration::from_secs(90))
            .await
            .unwrap();
        refresh(&pods);
    }
    let service = Service::start(endpoints.clone(), 8080).await;
    let shop = Shop::open(&service).await;
    let load = OrderLoad::start(&service, &shop);

    // Two rolling replacements under that load.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for round in 0..2 {
        let pod = w.start(&format!("shop-c{}", round + 2)).await;
        pods.push(pod);
        refresh(&pods);
        pod_runner::wait_ready(pods.last().unwrap(), Duration::from_secs(90))
            .await
            .unwrap();
        refresh(&pods);
        let old = pods.remove(0);
        // SIGTERM: the pod leaves the endpoints as its readiness fails, and drains.
        let deleting = std::thread::spawn(move || old.delete());
        tokio::time::sleep(Duration::from_secs(1)).await;
        refresh(&pods);
        while !deleting.is_finished() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let answers = load.finish().await;
    for pod in &pods {
        pod.delete();
    }
    let statuses = answers.all();
    let stored = orders_stored_once(&admin_url, &db, &shop, &statuses, &answers.placed);
    eprintln!("rolling replacement: {statuses:?}, {} orders stored once each", stored);
    psql(&admin_url, "test", &format!("DROP DATABASE IF EXISTS {db}"));
}

/// A stand-in for the Deployment controller and the kubelet, for the objects the operator keeps
/// in the in-memory API: each Deployment's pods run on the pod runner, replaced one at a time when
/// the template changes (a new pod Ready first, then an old one gets SIGTERM); each ConfigMap's
/// new contents reach the running pods' files (the sidecars reload them); the headless Services
/// `shop-app` (every pod) and `shop-can` (the canary's) are the pods' hosts entries; the pods
/// appear in the API (Running, their IPs and ports, the template's labels) for the operator to
/// read their metrics; each Deployment's status says how many pods run, are updated and ready.
///
/// Not modelled: pods of one Deployment starting in parallel, restart backoff, an image that
/// fails to pull being retried more often than every 10 s.
/// A pod the stand-in runs: the pod, the template it runs, and the sidecar config files it was
/// given (by volume).
type RunPod = (Pod, Value, BTreeMap<String, String>);

struct Kubelet<'a> {
    w: &'a World,
    client: kube::Client,
    /// Running pods by Deployment, each with the template it runs and the config it was given.
    pods: BTreeMap<String, Vec<RunPod>>,
    endpoints: pod_runner::Endpoints,
    /// When a Deployment's pod last failed to start.
    failed: BTreeMap<String, std::time::Instant>,
    /// Why the last start failed, by Deployment.
    pub start_errors: BTreeMap<String, String>,
    serial: usize,
}

impl<'a> Kubelet<'a> {
    fn new(w: &'a World, client: kube::Client) -> Self {
        Kubelet {
            w,
            client,
            pods: BTreeMap::new(),
            endpoints: Arc::new(Mutex::new(Vec::new())),
            failed: BTreeMap::new(),
            start_errors: BTreeMap::new(),
            serial: 0,
        }
    }

    fn api<K>(&self) -> kube::Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        kube::Api::namespaced(self.client.clone(), "shop")
    }

    /// The ConfigMaps as the pod runner mounts them.
    async fn cluster(&self) -> Cluster {
        let mut cluster = Cluster {
            secrets: self.w.cluster.secrets.clone(),
            hosts_file: self.w.cluster.hosts_file.clone(),
            ..Cluster::default()
        };
        for cm in self
            .api::<k8s_openapi::api::core::v1::ConfigMap>()
            .list(&Default::default())
            .await
            .unwrap()
            .items
        {
            cluster
                .config_maps
                .insert(cm.metadata.name.clone().unwrap(), cm.data.clone().unwrap_or_default());
        }
        cluster
    }

    /// The sidecar config a template mounts, from `cluster`.
    fn config_of(cluster: &Cluster, template: &Value) -> BTreeMap<String, String> {
        template["spec"]["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| {
                let cm = v["configMap"]["name"].as_str()?;
                let text = cluster.config_maps.get(cm)?.get("sidecar.toml")?;
                Some((v["name"].as_str()?.to_string(), text.clone()))
            })
            .collect()
    }

    /// One pass: pods, files, hosts, endpoints, the API's pods and Deployments' status.
    async fn sync(&mut self) {
        let cluster = self.cluster().await;
        let deployments = self
            .api::<k8s_openapi::api::apps::v1::Deployment>()
            .list(&Default::default())
            .await
            .unwrap()
            .items;
        let names: Vec<String> = deployments.iter().map(|d| d.metadata.name.clone().unwrap()).collect();
        // Deployments gone: their pods get SIGTERM.
        let gone: Vec<String> = self.pods.keys().filter(|n| !names.contains(n)).cloned().collect();
        for name in gone {
            for (pod, _, _) in self.pods.remove(&name).unwrap() {
                self.delete(pod).await;
            }
        }
        for d in &deployments {
            let name = d.metadata.name.clone().unwrap();
            let spec = d.spec.clone().unwrap();
            let template = serde_json::to_value(&spec.template).unwrap();
            let want = spec.replicas.unwrap_or(1) as usize;
            let running = self.pods.entry(name.clone()).or_default();
            let old = running.iter().position(|(_, t, _)| *t != template);
            let retry = self
                .failed
                .get(&name)
                .is_none_or(|t| t.elapsed() > Duration::from_secs(10));
            if (old.is_some() || running.len() < want) && retry {
                self.serial += 1;
                // Unique across the tests running at once in this process (i and j both run
                // a `shop`): the pod runner first removes a container of the same name.
                let pod_name = format!("{name}-{}-{}", self.serial, self.w.network.name);
                match pod_runner::start_pod(&self.w.network, &cluster, &template, &pod_name).await {
                    Ok(pod) => {
                        let config = Self::config_of(&cluster, &template);
                        self.pods.get_mut(&name).unwrap().push((pod, template.clone(), config));
                        self.publish().await;
                        let (pod, _, _) = self.pods[&name].last().unwrap();
                        match pod_runner::wait_ready(pod, Duration::from_secs(90)).await {
                            // Then one old pod goes (maxUnavailable 0).
                            Ok(_) => {
                                if let Some(i) = old {
                                    let (pod, _, _) = self.pods.get_mut(&name).unwrap().remove(i);
                                    self.delete(pod).await;
                                }
                            }
                            Err(e) => {
                                self.start_errors.insert(name.clone(), e);
                            }
                        }
                    }
                    Err(e) => {
                        self.failed.insert(name.clone(), std::time::Instant::now());
                        self.start_errors.insert(name.clone(), e);
                    }
                }
            } else if running.len() > want {
                let (pod, _, _) = running.remove(0);
                self.delete(pod).await;
            }
        }
        // New ConfigMap contents reach the files of the pods that mount them.
        for (pod, template, written) in self.pods.values_mut().flatten() {
            for (volume, text) in Self::config_of(&cluster, template) {
                if written.get(&volume) != Some(&text) {
                    pod.update_config_map_file(&volume, "sidecar.toml", &text).unwrap();
                    written.insert(volume, text);
                }
            }
        }
        self.publish().await;
        // Each Deployment's status, as its controller reports it.
        for d in &deployments {
            let name = d.metadata.name.clone().unwrap();
            let template = serde_json::to_value(&d.spec.as_ref().unwrap().template).unwrap();
            let pods = &self.pods[&name];
            let updated = pods.iter().filter(|(_, t, _)| *t == template).count();
            let ready = pods.iter().filter(|(p, t, _)| *t == template && p.is_ready()).count();
            let status = serde_json::json!({ "status": {
                "replicas": pods.len(), "updatedReplicas": updated, "readyReplicas": ready,
                "availableReplicas": ready, "observedGeneration": d.metadata.generation } });
            self.api::<k8s_openapi::api::apps::v1::Deployment>()
                .patch_status(&name, &Default::default(), &kube::api::Patch::Merge(&status))
                .await
                .unwrap();
        }
    }

    /// SIGTERM: the pod leaves the endpoints as its readiness fails, and drains.
    async fn delete(&mut self, pod: Pod) {
        let deleting = std::thread::spawn(move || pod.delete());
        tokio::time::sleep(Duration::from_secs(1)).await;
        self.publish().await;
        while !deleting.is_finished() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Hosts entries, the Service's endpoints and the API's pods, from the running pods.
    async fn publish(&self) {
        let all: Vec<&RunPod> = self.pods.values().flatten().collect();
        let everyone: Vec<String> = all.iter().map(|(p, _, _)| p.ip.clone()).collect();
        // The canary's name resolves only while its Service exists, as cluster DNS answers.
        let canary_service = self
            .api::<k8s_openapi::api::core::v1::Service>()
            .get_opt("shop-can")
            .await
            .unwrap()
            .is_some();
        let canaries: Vec<String> = all
            .iter()
            .filter(|(_, t, _)| canary_service && t["metadata"]["labels"]["mall.example.com/track"] == "canary")
            .map(|(p, _, _)| p.ip.clone())
            .collect();
        pod_runner::write_hosts_for(
            self.w.hosts.path(),
            &[
                (self.w.app_host.as_str(), &everyone),
                ("shop-can.shop.svc.cluster.local", &canaries),
            ],
        );
        *self.endpoints.lock().unwrap() = all.iter().map(|(p, _, _)| pod_runner::endpoint(p)).collect();
        let api = self.api::<k8s_openapi::api::core::v1::Pod>();
        let listed: Vec<String> = api
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect();
        for (pod, template, _) in &all {
            if listed.contains(&pod.name) {
                continue;
            }
            let mut object = serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": { "name": pod.name, "namespace": "shop", "uid": format!("uid-{}", pod.name),
                              "labels": template["metadata"]["labels"] },
                "spec": template["spec"],
                "status": { "phase": "Running", "podIP": pod.ip }
            });
            object["spec"]["volumes"] = Value::Null;
            api.create(&Default::default(), &serde_json::from_value(object).unwrap())
                .await
                .unwrap();
        }
        for name in listed {
            if !all.iter().any(|(p, _, _)| p.name == name) {
                api.delete(&name, &Default::default()).await.unwrap();
            }
        }
    }
}

/// A canary release of the mall `shop` on the images as pods: the operator's own reconcile
/// against the in-memory API (no API server runs here), the `Kubelet` above making its
/// Deployments, ConfigMaps and Services real on the pod runner, a Service in front of the pods.
/// The judgement reads the real pods' sidecar and app metrics over the pod network.
struct Release<'w> {
    kubelet: Kubelet<'w>,
    ctx: mall_operator::controller::Context,
    mds: kube::Api<mall_operator::crd::MallDeployment>,
    service: Service,
}

/// Whether the release has been decided (promoted, promoting or rolled back).
fn is_decided(r: &mall_operator::crd::RolloutStatus) -> bool {
    ["Stable", "RolledBack", "Promoting"].contains(&r.phase.as_str())
}

impl<'w> Release<'w> {
    /// `w` (rendered with `shop_mall(rollout)`) under the operator; returns once both stable pods
    /// are Ready behind the Service.
    async fn start(w: &'w World, rollout: Value) -> Release<'w> {
        let mut md: mall_operator::crd::MallDeployment = serde_json::from_value(shop_mall(rollout)).unwrap();
        md.metadata.uid = Some("u-shop".into());
        md.metadata.generation = Some(1);
        let client = kube_fake_client::ClientBuilder::new()
            .with_resource::<mall_operator::crd::MallDeployment>()
            .with_status_subresource::<mall_operator::crd::MallDeployment>()
            .with_status_subresource::<k8s_openapi::api::apps::v1::Deployment>()
            .with_object(md)
            .build()
            .await
            .unwrap();
        let kubelet = Kubelet::new(w, client.clone());
        let service = Service::start(kubelet.endpoints.clone(), 8080).await;
        let mut release = Release {
            kubelet,
            ctx: mall_operator::controller::Context::new(client.clone()),
            mds: kube::Api::namespaced(client, "shop"),
            service,
        };
        assert_eq!(release.reconcile().await.phase, "Stable");
        while release
            .kubelet
            .pods
            .get("shop")
            .is_none_or(|p| p.len() < 2 || !p.iter().all(|(p, _, _)| p.is_ready()))
        {
            release.kubelet.sync().await;
        }
        release
    }

    /// One pass of the operator's reconcile; the release's status after it.
    async fn reconcile(&self) -> mall_operator::crd::RolloutStatus {
        self.ctx.sync().await.unwrap();
        let md = self.mds.get("shop").await.unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        Box::pin(mall_operator::controller::reconcile_once(&md, &self.ctx, now))
            .await
            .unwrap();
        self.mds.get("shop").await.unwrap().status.unwrap().rollout.unwrap()
    }

    /// A change to the MallDeployment's spec, as `kubectl patch --type merge` makes it.
    async fn patch(&self, spec: Value) {
        self.mds
            .patch(
                "shop",
                &Default::default(),
                &kube::api::Patch::Merge(serde_json::json!({ "spec": spec })),
            )
            .await
            .unwrap();
    }

    /// Reconciles and syncs the pods every second until the status is `done` (printing each
    /// phase and step as it comes), failing after `limit`. Returns the status and the phases and
    /// steps seen.
    async fn until(
        &mut self,
        done: impl Fn(&mall_operator::crd::RolloutStatus) -> bool,
        limit: Duration,
    ) -> (mall_operator::crd::RolloutStatus, Vec<(String, u32)>) {
        let started = std::time::Instant::now();
        let mut steps: Vec<(String, u32)> = Vec::new();
        loop {
            let r = self.reconcile().await;
            if steps.last() != Some(&(r.phase.clone(), r.step)) {
                eprintln!("{:?} {}: {}", started.elapsed(), r.phase, r.message);
                steps.push((r.phase.clone(), r.step));
            }
            if done(&r) {
                return (r, steps);
            }
            assert!(started.elapsed() < limit, "no decision after {limit:?}: {r:?}");
            self.kubelet.sync().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// The running pods of a Deployment.
    fn pod_names(&self, deployment: &str) -> Vec<String> {
        self.kubelet
            .pods
            .get(deployment)
            .into_iter()
            .flatten()
            .map(|(p, _, _)| p.name.clone())
            .collect()
    }

    /// Calls the running pods' sidecars have made to the apps, by group (`stable`, `canary`), as
    /// each sidecar counts them (`sidecar_upstream_requests_total`), and how many of them were
    /// answered 5xx or failed (`stable_failed`, `canary_failed`). A pod whose metrics cannot be
    /// read is left out, and says so on stderr: its counts are then missing from the totals. (It
    /// was added for failures that turned out to be tests i and j removing each other's pods,
    /// fixed since by naming pods after the test's network; no unreadable pod has been seen
    /// after that fix.)
    async fn upstream_calls(&self) -> BTreeMap<&'static str, f64> {
        let mut by_group = BTreeMap::new();
        for (pod, _, _) in self.kubelet.pods.values().flatten() {
            let read = async {
                reqwest::get(format!("http://{}:9901/metrics", pod.ip))
                    .await?
                    .text()
                    .await
            };
            let text = match read.await {
                Ok(text) => text,
                Err(e) => {
                    eprintln!("{}: metrics not read ({e}); left out", pod.name);
                    continue;
                }
            };
            for line in text
                .lines()
                .filter(|l| l.starts_with("sidecar_upstream_requests_total{"))
            {
                let canary = line.contains("group=\"canary\"");
                let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
                *by_group.entry(if canary { "canary" } else { "stable" }).or_insert(0.0) += n;
                if line.contains("status_class=\"5xx\"") || line.contains("status_class=\"error\"") {
                    let failed = if canary { "canary_failed" } else { "stable_failed" };
                    *by_group.entry(failed).or_insert(0.0) += n;
                }
            }
        }
        by_group
    }

    /// Every pod gets SIGTERM.
    fn stop(&self) {
        for (pod, _, _) in self.kubelet.pods.values().flatten() {
            pod.delete();
        }
    }
}

/// `after - before`, counter by counter.
fn calls_since(
    after: &BTreeMap<&'static str, f64>,
    before: &BTreeMap<&'static str, f64>,
) -> BTreeMap<&'static str, f64> {
    after
        .iter()
        .map(|(k, n)| (*k, n - before.get(k).copied().unwrap_or(0.0)))
        .collect()
}

/// The canary's share of `calls` in percent.
fn canary_share(calls: &BTreeMap<&'static str, f64>) -> f64 {
    let (canary, stable) = (
        calls.get("canary").copied().unwrap_or(0.0),
        calls.get("stable").copied().unwrap_or(0.0),
    );
    100.0 * canary / (canary + stable).max(1.0)
}

/// i. Canary releases (issue 36) on the images as pods, under order load the whole time, through
/// `Release`:
/// - A change whose app cannot start (an image the engine does not have, as a mistyped tag): the
///   canary never becomes ready and is rolled back after `readyTimeoutSeconds`; no user request
///   fails, and the stable pods are never touched.
/// - A good change (a compression setting, so the pod template changes): the canary takes its
///   share from every sidecar, passes each step and is promoted, the stable pods replaced one at a
///   time; no request fails and every order is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn i_canary_releases_roll_back_a_canary_that_cannot_start_and_promote_a_good_one() {
    if !images_ready() {
        return;
    }
    let Some((admin_url, db)) = postgres_database("i").await else {
        return;
    };
    let rollout = serde_json::json!({ "rollout": {
        "steps": [{ "weight": 20, "watchSeconds": 10 }, { "weight": 50, "watchSeconds": 10 }],
        // p99 is not judged here (test j does): on CI's busy machine two groups of the same app
        // differed by more than the default 25 ms.
        "thresholds": { "minRequests": 20, "maxP99IncreaseMs": 1000 }, "readyTimeoutSeconds": 40 } });
    let w = world("i", &render_shop(rollout.clone()), &db).await;
    let mut release = Release::start(&w, rollout).await;
    let shop = Shop::open(&release.service).await;
    let load = OrderLoad::start(&release.service, &shop);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stable_pods = release.pod_names("shop");

    // A canary that cannot start: rolled back once readyTimeoutSeconds is up.
    release
        .patch(serde_json::json!({ "app": { "image": "ghcr.io/mall-operator/mall-app:no-such-tag" } }))
        .await;
    let started = std::time::Instant::now();
    let (outcome, _) = release.until(is_decided, Duration::from_secs(120)).await;
    release.kubelet.sync().await;
    let decided = started.elapsed();
    assert_eq!(outcome.phase, "RolledBack", "{outcome:?}");
    assert!(outcome.message.contains("canary pods ready"), "{}", outcome.message);
    assert!(
        release.kubelet.start_errors.contains_key("shop-canary"),
        "the canary was never started?"
    );
    assert!(!release.kubelet.pods.contains_key("shop-canary"));
    assert_eq!(
        release.pod_names("shop"),
        stable_pods,
        "the stable pods were never touched"
    );
    let failed_then = load.failed();
    eprintln!(
        "canary that cannot start: rolled back after {decided:?}, {failed_then} failed requests: {}",
        outcome.message
    );
    assert_eq!(failed_then, 0);

    // A good change: every step passed, promoted, the stable pods replaced.
    release
        .patch(
            serde_json::json!({ "app": { "image": format!("ghcr.io/mall-operator/mall-app:{TAG}") },
                                  "compression": { "minBytes": 2048 } }),
        )
        .await;
    let started = std::time::Instant::now();
    let (promoting, mut steps) = release.until(is_decided, Duration::from_secs(300)).await;
    assert_eq!(promoting.phase, "Promoting", "{promoting:?}");
    // What reached the canary before promotion, as every sidecar counted it.
    let by_group = release.upstream_calls().await;
    let (outcome, promoted) = release
        .until(
            |r| r.phase == "Stable" || r.phase == "RolledBack",
            Duration::from_secs(300).saturating_sub(started.elapsed()),
        )
        .await;
    steps.extend(promoted);
    let decided = started.elapsed();
    assert_eq!(outcome.phase, "Stable", "{outcome:?}");
    assert!(
        steps.iter().any(|(p, s)| p == "Progressing" && *s == 2),
        "both steps watched: {steps:?}"
    );
    release.kubelet.sync().await;
    assert!(
        !release.kubelet.pods.contains_key("shop-canary"),
        "the canary's pods are gone"
    );
    let answers = load.finish().await;
    release.stop();
    let stored = orders_stored_once(&admin_url, &db, &shop, &answers.all(), &answers.placed);
    let canary = by_group.get("canary").copied().unwrap_or(0.0);
    let total = canary + by_group.get("stable").copied().unwrap_or(0.0);
    assert!(canary > 0.0, "the canary served part of the calls: {by_group:?}");
    eprintln!(
        "good change: promoted after {decided:?}; answers {:?}; {stored} orders stored once; \
         calls to the apps before promotion: {canary} of {total} to the canary ({:.0} %)",
        answers.all(),
        canary_share(&by_group)
    );
    psql(&admin_url, "test", &format!("DROP DATABASE IF EXISTS {db}"));
}

/// A bad version of the app image: `FROM` the tests' app image, its entrypoint the tests' own
/// `faulty-app` (src/bin/faulty-app.rs), which runs the real app behind the fault `env` names
/// (`FAULT_ERROR_PERCENT`, `FAULT_DELAY_MS`). Built by `docker build` from the binary cargo built;
/// returns the image's name, tagged `<TAG>-<suffix>`.
fn bad_app_image(suffix: &str, env: &[(&str, &str)]) -> String {
    let image = format!("ghcr.io/mall-operator/mall-app:{TAG}-{suffix}");
    let context = tempfile::tempdir().unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_faulty-app"), context.path().join("faulty-app")).unwrap();
    let env: String = env.iter().map(|(k, v)| format!("ENV {k}={v}\n")).collect();
    let dockerfile = format!(
        "FROM ghcr.io/mall-operator/mall-app:{TAG}\n\
         COPY faulty-app /usr/local/bin/faulty-app\n\
         {env}\
         ENTRYPOINT [\"/usr/local/bin/faulty-app\"]\n\
         CMD [\"serve\"]\n"
    );
    std::fs::write(context.path().join("Dockerfile"), dockerfile).unwrap();
    docker(&["build", "-q", "-t", &image, &context.path().display().to_string()]).unwrap();
    image
}

/// A bad change's release, from the patch until its canary's pods are gone.
struct Judged {
    outcome: mall_operator::crd::RolloutStatus,
    /// The phases and steps the release went through.
    steps: Vec<(String, u32)>,
    /// From the patch to the decision.
    decided: Duration,
    /// The calls the sidecars made to the apps from the patch to the decision (`upstream_calls`).
    calls: BTreeMap<&'static str, f64>,
    /// Those of them from the start of the step's watched window.
    watched: BTreeMap<&'static str, f64>,
    /// Users' product reads from the patch until the canary's pods were gone, and those failed.
    reads: u64,
    failed: u64,
    /// Users' failed product reads from the patch to the decision (counted before `calls`).
    failed_by_decision: u64,
}

impl Judged {
    fn report(&self, change: &str) {
        eprintln!(
            "{change}: {} after {:?}: {}; users' product reads from the change until the canary was \
             gone: {} failed of {}; calls to the apps in the watched window: {:?}, {:.1} % to the \
             canary; from the change to the decision (the canary takes none until ready): {:?}, \
             {:.1} % to the canary",
            self.outcome.phase,
            self.decided,
            self.outcome.message,
            self.failed,
            self.reads,
            self.watched,
            canary_share(&self.watched),
            self.calls,
            canary_share(&self.calls)
        );
    }
}

impl Release<'_> {
    /// Releases `spec` and waits for the decision and the canary's pods to go; `user_reads`
    /// counts users' reads and failed reads so far.
    async fn bad_change(&mut self, spec: Value, user_reads: impl Fn() -> (u64, u64)) -> Judged {
        let calls_before = self.upstream_calls().await;
        let reads_before = user_reads();
        self.patch(spec).await;
        let started = std::time::Instant::now();
        let limit = Duration::from_secs(180);
        let (_, mut steps) = self.until(|r| r.window_since_unix > 0 || is_decided(r), limit).await;
        let window_start = self.upstream_calls().await;
        let (outcome, judged) = self.until(is_decided, limit.saturating_sub(started.elapsed())).await;
        steps.extend(judged);
        let decided = started.elapsed();
        let reads_at_decision = user_reads();
        // Read while the canary still runs: its sidecar's counters go with it.
        let at_decision = self.upstream_calls().await;
        let (calls, watched) = (
            calls_since(&at_decision, &calls_before),
            calls_since(&at_decision, &window_start),
        );
        self.kubelet.sync().await;
        assert!(
            !self.kubelet.pods.contains_key("shop-canary"),
            "the canary's pods are gone"
        );
        let reads_after = user_reads();
        Judged {
            outcome,
            steps,
            decided,
            calls,
            watched,
            reads: reads_after.0 - reads_before.0,
            failed: reads_after.1 - reads_before.1,
            failed_by_decision: reads_at_decision.1 - reads_before.1,
        }
    }
}

/// j. Two bad changes under canary releases (issue 36), on the images as pods, with orders and
/// shoppers' product reads going on the whole time. Each bad version is its own image
/// (`bad_app_image`): the real app behind a fault, as a release that broke something would be.
/// - Product reads answered 500 one time in five: rolled back on failed requests while still at
///   its first step (20 %); the reads users saw fail are at most the canary's share of those
///   that reached an app, 20 % of 20 %, and no more than the canary's 5xx answers.
/// - Product reads 50 ms slower: rolled back on p99 response time.
///
/// Both: no order fails, every order is stored once, the stable pods are never touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn j_canary_releases_roll_back_500s_on_reads_and_50ms_slower_reads() {
    if !images_ready() {
        return;
    }
    let Some((admin_url, db)) = postgres_database("j").await else {
        return;
    };
    let errors_image = bad_app_image("errors20", &[("FAULT_ERROR_PERCENT", "20")]);
    let slow_image = bad_app_image("slow50", &[("FAULT_DELAY_MS", "50")]);
    let no_fault_image = bad_app_image("nofault", &[]);
    // A failed-request share 5 points above the stable pods' (0 here) is an outage for one user in
    // twenty; 40 ms on the p99 is what a shopper notices over a page's calls, and above what the
    // proxy alone costs on a loaded 2-core machine (measured: +26 ms with a 25 ms threshold it
    // was rolled back for); 100 calls (a second of the canary's share) keep one slow call from
    // being the p99; a step watched 15 s sees several of the sidecars' 5 s cache lifetimes.
    let rollout = serde_json::json!({ "rollout": {
        "steps": [{ "weight": 20, "watchSeconds": 15 }, { "weight": 50, "watchSeconds": 15 }],
        "thresholds": { "maxErrorRatioIncrease": 0.05, "maxP99IncreaseMs": 40, "minRequests": 100 },
        "readyTimeoutSeconds": 60 } });
    let w = world("j", &render_shop(rollout.clone()), &db).await;
    let mut release = Release::start(&w, rollout).await;
    let shop = Shop::open(&release.service).await;
    let catalogue = Catalogue::stock(&release.service, &shop, 40).await;
    let orders = OrderLoad::start(&release.service, &shop);
    let reads = ReadLoad::start(&release.service, &catalogue, 4);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stable_pods = release.pod_names("shop");
    // Product reads by users so far (the shoppers' and the buyers' between orders), and failed.
    let seen = || {
        let (a, b) = (answered(&orders.reads()), answered(&reads.answers()));
        (a.0 + b.0, a.1 + b.1)
    };

    // 0. The proxy alone, without a fault: it passes the first step (then it is aborted), so the
    // failed requests below are the fault's doing. Its p99 is not judged here (an allowance of
    // 1 s): with the other pods tests running beside it in CI, stable p99 reached 194 ms and the
    // proxy alone measured +44 ms once, over the 40 ms the scenarios use; by hand, on a quieter
    // machine, it passed step 1 at 40 ms (p99 84 ms against 56 ms).
    release
        .patch(serde_json::json!({ "app": { "image": no_fault_image },
                                     "rollout": { "thresholds": { "maxP99IncreaseMs": 1000 } } }))
        .await;
    let (control, _) = release
        .until(|r| r.step >= 2 || is_decided(r), Duration::from_secs(120))
        .await;
    assert_eq!(
        control.phase, "Progressing",
        "the proxy alone passes step 1: {control:?}"
    );
    let abort = serde_json::json!({ "metadata": { "annotations": { "mall.example.com/rollout": "abort" } } });
    release
        .mds
        .patch("shop", &Default::default(), &kube::api::Patch::Merge(abort))
        .await
        .unwrap();
    let (aborted, _) = release.until(is_decided, Duration::from_secs(60)).await;
    assert_eq!(aborted.phase, "RolledBack", "{aborted:?}");
    release.kubelet.sync().await;
    assert_eq!(
        release.pod_names("shop"),
        stable_pods,
        "the stable pods were never touched"
    );

    // 1. 500s on 20 % of product reads.
    let errors = release
        .bad_change(
            serde_json::json!({ "app": { "image": errors_image },
                                  "rollout": { "thresholds": { "maxP99IncreaseMs": 40 } } }),
            seen,
        )
        .await;
    errors.report("500s on 20 % of product reads");
    let (outcome, calls) = (&errors.outcome, &errors.calls);
    assert_eq!(outcome.phase, "RolledBack", "{outcome:?}");
    assert!(
        outcome.message.contains("at step 1 (20 %)") && outcome.message.contains("failed requests"),
        "{}",
        outcome.message
    );
    assert!(
        errors.steps.iter().all(|(_, step)| *step <= 1),
        "never at step 2: {:?}",
        errors.steps
    );
    // Every sidecar's split is exact per 100 calls.
    let share = canary_share(&errors.watched);
    assert!((15.0..=25.0).contains(&share), "{share:.1} % to the canary at 20 %");
    let failed_calls = ["canary_failed", "stable_failed"].map(|k| calls.get(k).copied().unwrap_or(0.0));
    assert!(failed_calls[0] > 0.0, "the canary answered 500s: {calls:?}");
    // Only the canary answers 500s: one counted as stable is a canary pod some sidecar took for
    // a stable app (before the split reached it, or after the rollback).
    assert_eq!(failed_calls[1], 0.0, "a canary counted as stable: {calls:?}");
    // A read a user saw fail is a failed call to an app (the sidecars serve a stale copy where
    // they hold one, and revalidate in the background), and the canary's 500s are 20 % of its
    // reads, which are 20 % of the sidecars' calls to the apps: 4 % of the reads that reached an
    // app, at most 4 % of all. The slack: the sidecars' split and the fault's counter are exact
    // per 100 calls, so each of the three sidecars may be one canary call ahead, and the fault
    // one 500.
    assert!(
        errors.failed_by_decision as f64 <= failed_calls[0] + failed_calls[1],
        "{} failed reads, {calls:?}",
        errors.failed_by_decision
    );
    let (read, failed) = (errors.reads, errors.failed);
    assert!(
        failed as f64 <= 0.2 * 0.2 * read as f64 + 4.0,
        "{failed} failed of {read} reads: more than the canary's 20 % of 20 %"
    );
    assert_eq!(
        release.pod_names("shop"),
        stable_pods,
        "the stable pods were never touched"
    );

    // 2. 50 ms more on every product read.
    let slow = release
        .bad_change(serde_json::json!({ "app": { "image": slow_image } }), seen)
        .await;
    slow.report("50 ms more on every product read");
    assert_eq!(slow.outcome.phase, "RolledBack", "{:?}", slow.outcome);
    assert!(
        slow.outcome.message.contains("p99 response time"),
        "{}",
        slow.outcome.message
    );
    assert_eq!(slow.failed, 0, "a slower read is not a failed one");
    assert_eq!(
        release.pod_names("shop"),
        stable_pods,
        "the stable pods were never touched"
    );

    let shoppers = reads.finish().await;
    let answers = orders.finish().await;
    release.stop();
    let stored = orders_stored_once(&admin_url, &db, &shop, &answers.orders, &answers.placed);
    eprintln!(
        "orders {:?}, {stored} stored once each; product reads: shoppers {shoppers:?}, buyers {:?}",
        answers.orders, answers.reads
    );
    psql(&admin_url, "test", &format!("DROP DATABASE IF EXISTS {db}"));
}

/// Answers counted (`0` for a transport error): how many, and how many failed (not 2xx).
fn answered(statuses: &BTreeMap<u16, u64>) -> (u64, u64) {
    let all = statuses.values().sum();
    let failed = statuses
        .iter()
        .filter(|(c, _)| !(200..=299).contains(*c))
        .map(|(_, n)| n)
        .sum();
    (all, failed)
}

/// The products shoppers browse: `n` more, in four categories, added by the admin.
struct Catalogue {
    products: Vec<i64>,
    categories: Vec<&'static str>,
}

impl Catalogue {
    async fn stock(service: &Service, shop: &Shop, n: usize) -> Catalogue {
        let categories = vec!["books", "games", "garden", "kitchen"];
        let mut products = vec![shop.product_id];
        for i in 0..n {
            let product = serde_json::json!({"name": format!("Item {i}"), "category": categories[i % 4],
                                             "price": 100 + i, "stock": 1000});
            products.push(add_product(service, &shop.admin_token, &product).await);
        }
        Catalogue { products, categories }
    }
}

/// Shoppers browsing through the Service as a storefront's users do: without cookies or
/// cache-busting, each in turn a product's page and a category's first list page. What reaches
/// the apps is what the sidecars' caches do not answer: entries older than the app's
/// `max-age=5`, the product every order changes and the list pages every order purges
/// (`Surrogate-Key`), as in a shop taking orders.
struct ReadLoad {
    stop: Arc<std::sync::atomic::AtomicBool>,
    statuses: Arc<Mutex<BTreeMap<u16, u64>>>,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

impl ReadLoad {
    fn start(service: &Service, catalogue: &Catalogue, shoppers: usize) -> ReadLoad {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let statuses: Arc<Mutex<BTreeMap<u16, u64>>> = Arc::default();
        let mut clients = Vec::new();
        for s in 0..shoppers {
            let pages: Vec<String> = catalogue
                .products
                .iter()
                .map(|id| service.url(&format!("/api/products/{id}")))
                .collect();
            let lists: Vec<String> = catalogue
                .categories
                .iter()
                .map(|c| service.url(&format!("/api/products?category={c}&limit=20")))
                .collect();
            let (stop, statuses, http) = (stop.clone(), statuses.clone(), reqwest::Client::new());
            clients.push(tokio::spawn(async move {
                let mut n = s * 7;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for url in [&pages[n % pages.len()], &lists[n % lists.len()]] {
                        let code = match http.get(url).timeout(Duration::from_secs(10)).send().await {
                            Ok(r) => r.status().as_u16(),
                            Err(_) => 0,
                        };
                        *statuses.lock().unwrap().entry(code).or_insert(0) += 1;
                    }
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }));
        }
        ReadLoad {
            stop,
            statuses,
            clients,
        }
    }

    /// The answers so far, by status (`0`: no answer).
    fn answers(&self) -> BTreeMap<u16, u64> {
        self.statuses.lock().unwrap().clone()
    }

    async fn finish(mut self) -> BTreeMap<u16, u64> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for c in std::mem::take(&mut self.clients) {
            c.await.unwrap();
        }
        self.answers()
    }
}

/// A product with a million units and eight buyers, set up through `service`.
struct Shop {
    product_id: i64,
    tokens: Vec<String>,
    admin_token: String,
}

impl Shop {
    /// The admin (from the Secret) adds a product; buyers register.
    async fn open(service: &Service) -> Shop {
        let http = reqwest::Client::new();
        let admin: Value = http
            .post(service.url("/api/auth/login"))
            .json(&serde_json::json!({"username": "admin", "password": ADMIN_PASSWORD}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let admin_token = admin["token"]
            .as_str()
            .expect("the admin from the Secret logs in")
            .to_string();
        let product = serde_json::json!({"name": "Rolling", "category": "books", "price": 100, "stock": 1_000_000});
        let product_id = add_product(service, &admin_token, &product).await;
        let mut tokens = Vec::new();
        for i in 0..8 {
            let r: Value = http
                .post(service.url("/api/auth/register"))
                .json(&serde_json::json!({"username": format!("buyer{i}"), "password": "buyer-password"}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            tokens.push(r["token"].as_str().unwrap().to_string());
        }
        Shop {
            product_id,
            tokens,
            admin_token,
        }
    }
}

/// The admin adds `product`; its id.
async fn add_product(service: &Service, admin_token: &str, product: &Value) -> i64 {
    let created: Value = reqwest::Client::new()
        .post(service.url("/api/products"))
        .bearer_auth(admin_token)
        .json(product)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    created["id"].as_i64().expect("product created")
}

/// Orders under way: each buyer orders with a fresh key, resending the same key after a
/// transport error (as a client should), and reads the product between orders.
struct OrderLoad {
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// The orders' answers.
    statuses: Arc<Mutex<BTreeMap<u16, u64>>>,
    /// The reads' answers (`0`: none).
    reads: Arc<Mutex<BTreeMap<u16, u64>>>,
    placed: Arc<Mutex<Vec<String>>>,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

/// What an `OrderLoad` was answered.
struct Answers {
    orders: BTreeMap<u16, u64>,
    reads: BTreeMap<u16, u64>,
    /// The keys of the orders placed.
    placed: Vec<String>,
}

impl Answers {
    /// The orders' and the reads' answers together; a read without an answer is left out (the
    /// buyer reads again after the next order).
    fn all(&self) -> BTreeMap<u16, u64> {
        let mut all = self.orders.clone();
        for (code, n) in self.reads.iter().filter(|(c, _)| **c != 0) {
            *all.entry(*code).or_insert(0) += n;
        }
        all
    }
}

impl OrderLoad {
    fn start(service: &Service, shop: &Shop) -> OrderLoad {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let statuses: Arc<Mutex<BTreeMap<u16, u64>>> = Arc::default();
        let reads: Arc<Mutex<BTreeMap<u16, u64>>> = Arc::default();
        let placed: Arc<Mutex<Vec<String>>> = Arc::default();
        let mut clients = Vec::new();
        let product_id = shop.product_id;
        for (b, token) in shop.tokens.iter().enumerate() {
            let (http, url, token) = (reqwest::Client::new(), service.url("/api/orders"), token.clone());
            let read = service.url(&format!("/api/products/{product_id}"));
            let (stop, statuses, placed) = (stop.clone(), statuses.clone(), placed.clone());
            let reads = reads.clone();
            clients.push(tokio::spawn(async move {
                let count = |code: u16| *statuses.lock().unwrap().entry(code).or_insert(0) += 1;
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let key = format!("b{b}-{n}");
                    n += 1;
                    loop {
                        let sent = http
                            .post(&url)
                            .bearer_auth(&token)
                            .header("idempotency-key", &key)
                            .json(&serde_json::json!({"items": [{"product_id": product_id, "quantity": 1}]}))
                            .timeout(Duration::from_secs(10))
                            .send()
                            .await;
                        match sent {
                            Ok(r) => {
                                let code = r.status().as_u16();
                                count(code);
                                if code == 201 || code == 200 {
                                    placed.lock().unwrap().push(key.clone());
                                }
                                if code == 409 {
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                    continue;
                                }
                                break;
                            }
                            // A connection the old pod closed: resend, same key.
                            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                        }
                    }
                    let code = match http.get(&read).timeout(Duration::from_secs(10)).send().await {
                        Ok(r) => r.status().as_u16(),
                        Err(_) => 0,
                    };
                    *reads.lock().unwrap().entry(code).or_insert(0) += 1;
                }
            }));
        }
        OrderLoad {
            stop,
            statuses,
            reads,
            placed,
            clients,
        }
    }

    fn answers(&self) -> Answers {
        Answers {
            orders: self.statuses.lock().unwrap().clone(),
            reads: self.reads.lock().unwrap().clone(),
            placed: self.placed.lock().unwrap().clone(),
        }
    }

    /// The reads' answers so far (`0`: none).
    fn reads(&self) -> BTreeMap<u16, u64> {
        self.reads.lock().unwrap().clone()
    }

    /// Failed answers so far, orders and reads (anything but 2xx, 409 and 429).
    fn failed(&self) -> u64 {
        self.answers()
            .all()
            .iter()
            .filter(|(c, _)| !matches!(**c, 200..=299 | 409 | 429))
            .map(|(_, n)| n)
            .sum()
    }

    async fn finish(mut self) -> Answers {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for c in std::mem::take(&mut self.clients) {
            c.await.unwrap();
        }
        self.answers()
    }
}

/// Every answer 2xx, 409 or 429; every order the clients were told of stored once, with its key,
/// and its unit sold. Returns the orders stored.
fn orders_stored_once(admin_url: &str, db: &str, shop: &Shop, statuses: &BTreeMap<u16, u64>, placed: &[String]) -> i64 {
    let bad: Vec<(&u16, &u64)> = statuses
        .iter()
        .filter(|(c, _)| !matches!(**c, 200..=299 | 409 | 429))
        .collect();
    assert!(
        bad.is_empty(),
        "responses other than 2xx, 409, 429: {bad:?} (all: {statuses:?})"
    );
    assert!(placed.len() > 50, "the load placed {} orders", placed.len());
    let stored: i64 = psql(admin_url, db, "SELECT count(*) FROM orders").parse().unwrap();
    let keys: i64 = psql(
        admin_url,
        db,
        "SELECT count(DISTINCT (user_id, idem_key)) FROM idempotency_keys",
    )
    .parse()
    .unwrap();
    let mut distinct = placed.to_vec();
    distinct.sort();
    distinct.dedup();
    assert_eq!(stored, keys, "an order without its key, or a key with two orders");
    assert_eq!(
        stored as usize,
        distinct.len(),
        "orders stored vs orders the clients were told of"
    );
    let sold: i64 = psql(
        admin_url,
        db,
        &format!("SELECT 1000000 - stock FROM products WHERE id = {}", shop.product_id),
    )
    .parse()
    .unwrap();
    assert_eq!(sold, stored, "units sold vs orders stored");
    stored
}

/// b. Two pods with PostgreSQL and Redis, shaped like examples/production.yaml: 100 ms after a
/// price is PATCHed through one pod, neither pod serves the old price, for the product or for a
/// list page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_a_price_patched_through_one_pod_is_served_by_both_100ms_later() {
    if !images_ready() {
        return;
    }
    let Some((admin_url, db)) = postgres_database("b").await else {
        return;
    };
    let w = world(
        "b",
        &render_shop(serde_json::json!({ "redis": { "url": { "name": "mall-redis" } } })),
        &db,
    )
    .await;
    let mut pods = Vec::new();
    for i in 0..2 {
        pods.push(w.start(&format!("shop-b{i}")).await);
    }
    w.publish(&pods.iter().collect::<Vec<_>>());
    for pod in &pods {
        pod_runner::wait_ready(pod, Duration::from_secs(90)).await.unwrap();
    }
    let http = reqwest::Client::new();
    // Each pod directly (its sidecar port), as the Service's round robin would reach them.
    let via = |pod: &Pod, path: &str| format!("http://{}:8080{path}", pod.ip);
    let admin: Value = http
        .post(via(&pods[0], "/api/auth/login"))
        .json(&serde_json::json!({"username": "admin", "password": ADMIN_PASSWORD}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = admin["token"].as_str().unwrap().to_string();
    let product: Value = http
        .post(via(&pods[0], "/api/products"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"name": "Fresh", "category": "books", "price": 1000, "stock": 10}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = product["id"].as_i64().unwrap();
    let product_path = format!("/api/products/{id}");
    let list_path = "/api/products?category=books&limit=20";
    let price_in_list = |v: &Value| {
        v["items"]
            .as_array()
            .and_then(|items| items.iter().find(|p| p["id"] == id))
            .map(|p| p["price"].clone())
    };
    let mut stale = Vec::new();
    for round in 0..3 {
        // Warm both pods' caches (sidecar and app) with the current price.
        for pod in &pods {
            for _ in 0..3 {
                http.get(via(pod, &product_path)).send().await.unwrap();
                http.get(via(pod, list_path)).send().await.unwrap();
            }
        }
        let price = 2000 + round;
        let patched = http
            .patch(via(&pods[round as usize % 2], &product_path))
            .bearer_auth(&token)
            .json(&serde_json::json!({"price": price}))
            .send()
            .await
            .unwrap();
        assert!(patched.status().is_success(), "PATCH: {}", patched.status());
        tokio::time::sleep(Duration::from_millis(100)).await;
        for pod in &pods {
            for _ in 0..2 {
                let one: Value = http
                    .get(via(pod, &product_path))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                if one["price"] != price {
                    stale.push(format!(
                        "round {round}: pod {} served product price {}",
                        pod.name, one["price"]
                    ));
                }
                let list: Value = http
                    .get(via(pod, list_path))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                if price_in_list(&list) != Some(serde_json::json!(price)) {
                    stale.push(format!(
                        "round {round}: pod {} listed price {:?}",
                        pod.name,
                        price_in_list(&list)
                    ));
                }
            }
        }
    }
    for pod in &pods {
        pod.delete();
    }
    psql(&admin_url, "test", &format!("DROP DATABASE IF EXISTS {db}"));
    assert!(stale.is_empty(), "stale prices 100 ms after the PATCH: {stale:#?}");
}

/// Renders `example` with the sidecar's rate limits off (one test client would otherwise be
/// limited; the sizes the operator tunes stay as they are).
fn render_unlimited(example: &str) -> String {
    let text = std::fs::read_to_string(pod_runner::repo(example)).unwrap();
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    doc["spec"]["rateLimits"]["enabled"] = serde_yaml::Value::Bool(false);
    mall_operator::render::render(&serde_yaml::to_string(&doc).unwrap()).unwrap()
}

/// Opens `n` connections to `addr`, each sending one GET for a different product and reading
/// the answer, and keeps them all open; returns them with how many answered 200.
async fn open_connections(addr: &str, n: usize) -> (Vec<tokio::net::TcpStream>, usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tasks = Vec::new();
    for i in 0..n {
        let addr = addr.to_string();
        tasks.push(tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(&addr).await.ok()?;
            let req = format!("GET /api/products/{} HTTP/1.1\r\nHost: shop\r\n\r\n", i % 1000 + 1);
            s.write_all(req.as_bytes()).await.ok()?;
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let k = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf))
                    .await
                    .ok()?
                    .ok()?;
                if k == 0 {
                    return None;
                }
                got.extend_from_slice(&buf[..k]);
            }
            let ok = got.starts_with(b"HTTP/1.1 200");
            Some((s, ok))
        }));
    }
    let mut open = Vec::new();
    let mut ok = 0;
    for t in tasks {
        if let Ok(Some((s, good))) = t.await {
            ok += usize::from(good);
            open.push(s);
        }
    }
    (open, ok)
}

/// d. During a cache fill with 2,000 open connections, neither container is OOM-killed (the
/// engine says so) at the operator's tuned sizes, for the smallest example and the largest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_two_thousand_connections_filling_the_cache_kill_no_container_at_the_tuned_sizes() {
    if !images_ready() {
        return;
    }
    let Some((admin_url, db)) = postgres_database("oom").await else {
        return;
    };
    for example in ["examples/mall.yaml", "examples/production.yaml"] {
        let rendered = render_unlimited(example);
        let w = world("oom", &rendered, &db).await;
        let pod = w.start(&format!("{}-oom", w.name)).await;
        w.publish(&[&pod]);
        let (network, pg) = (&w.network, &w.pg);
        pod_runner::wait_ready(&pod, Duration::from_secs(90)).await.unwrap();
        if example.ends_with("production.yaml") {
            // 1,000 products, as the demo has (the app's own seeding, run once against this database).
            let seeded = std::process::Command::new("docker")
                .args([
                    "run",
                    "--rm",
                    "--network",
                    &network.name,
                    "--user",
                    "65532:65532",
                    "-e",
                    &format!("MALL_DATABASE_URL=postgres://mall:mall@{pg}/{db}"),
                    "-e",
                    "MALL_SEED_USERS=0",
                    "-e",
                    "MALL_SEED_PASSWORD=not-used-here-x",
                    &format!("ghcr.io/mall-operator/mall-app:{TAG}"),
                    "seed",
                ])
                .output()
                .unwrap();
            assert!(seeded.status.success(), "{}", String::from_utf8_lossy(&seeded.stderr));
        }
        let (open, ok) = open_connections(&format!("{}:8080", pod.ip), 2000).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let stats = docker(&["stats", "--no-stream", "--format", "{{.Name}} {{.MemUsage}}"]).unwrap_or_default();
        let mut report = Vec::new();
        for c in ["app", "sidecar"] {
            let inspect = pod.inspect(c);
            report.push((
                c,
                inspect["State"]["OOMKilled"].clone(),
                inspect["RestartCount"].clone(),
                inspect["State"]["Running"].clone(),
            ));
        }
        let restarts = pod.restarts.lock().unwrap().clone();
        let (app_log, sidecar_log) = (pod.logs("app"), pod.logs("sidecar"));
        drop(open);
        pod.delete();
        eprintln!("{example}: {ok} of 2000 connections answered 200 while all were open; {report:?}\n{stats}");
        for (c, oom, restart_count, running) in &report {
            assert_eq!(
                *oom,
                Value::Bool(false),
                "{example}: {c} was OOM-killed\n{app_log}\n{sidecar_log}"
            );
            assert_eq!(*restart_count, 0, "{example}: {c} restarted");
            assert_eq!(*running, Value::Bool(true), "{example}: {c} is not running");
        }
        assert!(restarts.is_empty(), "{example}: liveness restarts {restarts:?}");
        assert!(ok >= 1900, "{example}: only {ok} of 2000 connections were answered 200");
    }
    psql(&admin_url, "test", &format!("DROP DATABASE IF EXISTS {db}"));
}

/// Memory of a container now (docker stats), in MiB.
fn memory_mib(container: &str) -> f64 {
    let out = docker(&["stats", "--no-stream", "--format", "{{.MemUsage}}", container]).unwrap_or_default();
    let used = out.split('/').next().unwrap_or_default().trim();
    let (n, unit) = used.split_at(used.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(used.len()));
    let n: f64 = n.parse().unwrap_or(0.0);
    match unit {
        "KiB" => n / 1024.0,
        "GiB" => n * 1024.0,
        "B" => n / 1048576.0,
        _ => n,
    }
}

/// Benchmark (not a test; `cargo test -p mall-e2e --test pods bench -- --ignored --nocapture`):
/// a pod's time to Ready from a cold start, the demo (embedded SQLite, seeding its catalog)
/// against a production-shaped pod (PostgreSQL, nothing to seed), in interleaved rounds, and each
/// container's memory at idle and under 64 connections of cache hits for 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run it on a quiet machine"]
async fn bench_pod_cold_start_and_memory() {
    if !images_ready() {
        return;
    }
    let Some((admin_url, db)) = postgres_database("bench").await else {
        return;
    };
    let network = Network::create(&format!("mall-pods-bench-{}", std::process::id()));
    let (pg, _pg) = network.forward_host_port(5432).await;
    let demo = render("examples/mall.yaml");
    let md = serde_json::json!({
        "apiVersion": "mall.example.com/v1alpha1", "kind": "MallDeployment",
        "metadata": { "name": "shop", "namespace": "shop" },
        "spec": { "replicas": 1, "minReplicas": 1, "maxReplicas": 1, "autoscaling": { "mode": "alerts" },
                  "rateLimits": { "enabled": false }, "database": { "primary": { "name": "mall-db" } } }
    });
    let production = mall_operator::render::render(&serde_yaml::to_string(&md).unwrap()).unwrap();
    let mut results: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut memory: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for round in 0..5 {
        for (label, rendered, app_name) in [
            (
                "demo (SQLite, seeds 1,000 products)",
                &demo,
                "demo-app.shop.svc.cluster.local",
            ),
            (
                "production-shaped (PostgreSQL)",
                &production,
                "shop-app.shop.svc.cluster.local",
            ),
        ] {
            let mut cluster = Cluster::from_rendered(rendered);
            cluster.secrets = secrets(if label.starts_with("demo") { "demo" } else { "shop" });
            cluster.secrets.insert(
                "mall-db".into(),
                BTreeMap::from([("url".into(), format!("postgres://mall:mall@{pg}/{db}"))]),
            );
            let hosts = tempfile::NamedTempFile::new_in("/var/tmp").unwrap();
            cluster.hosts_file = Some(hosts.path().to_path_buf());
            let template = pod_runner::pod_template(rendered);
            let started = std::time::Instant::now();
            let pod = pod_runner::start_pod(
                &network,
                &cluster,
                &template,
                &format!("bench-{round}-{}", std::process::id()),
            )
            .await
            .unwrap();
            pod_runner::write_hosts(hosts.path(), app_name, std::slice::from_ref(&pod.ip));
            pod_runner::wait_ready(&pod, Duration::from_secs(90)).await.unwrap();
            results.entry(label).or_default().push(started.elapsed().as_secs_f64());
            if round == 0 {
                tokio::time::sleep(Duration::from_secs(3)).await;
                for c in &pod.containers {
                    memory
                        .entry(format!("{label} {} idle", c.name))
                        .or_default()
                        .push(memory_mib(&c.id));
                }
                // 64 connections of cache hits for 10 s.
                let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let mut load = Vec::new();
                for _ in 0..64 {
                    let (stop, url) = (stop.clone(), format!("http://{}:8080/api/products/1", pod.ip));
                    load.push(tokio::spawn(async move {
                        let http = reqwest::Client::new();
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            let _ = http.get(&url).send().await;
                        }
                    }));
                }
                tokio::time::sleep(Duration::from_secs(8)).await;
                for c in &pod.containers {
                    memory
                        .entry(format!("{label} {} under load", c.name))
                        .or_default()
                        .push(memory_mib(&c.id));
                }
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                for l in load {
                    let _ = l.await;
                }
            }
            pod.delete();
        }
    }
    for (label, mut times) in results {
        times.sort_by(f64::total_cmp);
        eprintln!(
            "BENCH time to Ready, {label}: median {:.2} s (min {:.2}, max {:.2}, {} rounds)",
            times[times.len() / 2],
            times[0],
            times[times.len() - 1],
            times.len()
        );
    }
    for (label, m) in memory {
        eprintln!("BENCH memory, {label}: {:.1} MiB", m[0]);
    }
    psql(&admin_url, "test", &format!("DROP DATABASE IF EXISTS {db}"));
}
