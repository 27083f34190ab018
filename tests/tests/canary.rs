//! Issue 36: a canary group in the sidecar's balancing. A real mall app is the stable instance
//! (127.0.0.1:P) and a Python `http.server` that fails every read with 500 is the canary
//! (127.0.0.2:P, the same port on another loopback address, as pods share a port). The sidecar
//! finds them as in a cluster: `upstream.dns.name = "localhost"` and `canary.dns_name =
//! "127.0.0.2"`, both looked up through the system's resolver every second (no hosts entry, no
//! DNS server of our own: the canary's name is an address literal, so it is also not in the
//! instances' answer and is added to the pool by its own). It checks:
//!
//! - at 20 %, 500 reads: exactly 100 reach the canary (the split is a counter, not a draw), each
//!   a 500 to the client and a `group="canary",status_class="5xx"` in
//!   `sidecar_upstream_requests_total`, the other 400 a stable `2xx`;
//! - `POST /reload` moves the split to 50 % at once (`sidecar_canary_percent` says so);
//! - a canary name without addresses (`.invalid`, RFC 6761: NXDOMAIN, as cluster DNS answers for a
//!   canary Service without ready pods) is an empty canary group, not a discovery failure;
//! - with the canary process killed, 500 reads: not one fails;
//! - the canary removed, every call is stable and the gauge is 0.
//!
//! The operator's judgement of a canary (`mall_operator::rollout`) reads this sidecar's metrics
//! as it reads each pod's, and would roll this canary back.
//!
//! Not covered: a DNS server answering several records for one name (this machine resolves
//! `localhost` from /etc/hosts only), and the operator writing the config (its tests, on the
//! in-memory API: operator/tests/rollout.rs); the sidecar runs in this process (as in the other
//! tests here), configured from a file.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{ci, free_addr, metric_sum_where};
use mall_app::testing::RunningApp;
use mall_sidecar_config::{CanaryGroup, DnsDiscovery, SidecarConfig};

const TOKEN: &str = "canary-test-admin-token";

/// A canary that fails every read: `/ready` answers 200 (it passes its checks and takes its
/// share), anything else 500. HTTP/1.1 keep-alive, as the app.
const FAILING_CANARY: &str = r#"
import http.server, sys
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        ok = self.path == "/ready"
        body = b"ok\n" if ok else b'{"error":"canary_broken"}\n'
        self.send_response(200 if ok else 500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    def handle_error(self, request, client_address):
        pass  # the sidecar's health check hangs up once it has the status line
server = Server((sys.argv[1], int(sys.argv[2])), Handler)
print("listening", flush=True)
server.serve_forever()
"#;

struct Canary(Child);

impl Drop for Canary {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The failing canary on `addr`; `None`, loudly, when python3 is missing outside CI.
fn failing_canary(addr: SocketAddr) -> Option<Canary> {
    use std::io::BufRead;
    let child = Command::new("python3")
        .args(["-c", FAILING_CANARY, &addr.ip().to_string(), &addr.port().to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn();
    let Ok(mut child) = child else {
        assert!(!ci(), "python3 not found");
        eprintln!("SKIPPED: python3 not found");
        return None;
    };
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "listening", "the canary did not start on {addr}");
    Some(Canary(child))
}

struct Sidecar {
    base: String,
    admin: String,
    path: std::path::PathBuf,
    config: SidecarConfig,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Sidecar {
    /// The sidecar, configured from a file, in front of whatever `localhost` and the canary's
    /// name resolve to on `port`.
    async fn start(port: u16, canary: CanaryGroup) -> Sidecar {
        let dir = tempfile::tempdir().unwrap();
        let mut config = SidecarConfig::default();
        config.server.listen = free_addr();
        config.server.admin_listen = free_addr();
        config.server.threads = 1;
        config.server.admin_token = Some(TOKEN.into());
        config.upstream.servers = Vec::new();
        config.upstream.dns = Some(DnsDiscovery {
            name: "localhost".into(),
            port,
            refresh_seconds: 1,
        });
        config.upstream.canary = Some(canary);
        config.upstream.health_check.interval_ms = 200;
        config.upstream.health_check.healthy_threshold = 1;
        config.upstream.health_check.unhealthy_threshold = 1;
        // Every read reaches an instance.
        config.cache.enabled = false;
        config.rate_limit.enabled = false;
        config.access_log.enabled = false;
        let path = dir.path().join("sidecar.toml");
        std::fs::write(&path, config.to_toml()).unwrap();
        let sidecar = Sidecar {
            base: format!("http://{}", config.server.listen),
            admin: format!("http://{}", config.server.admin_listen),
            path: path.clone(),
            config: config.clone(),
            http: reqwest::Client::new(),
            _dir: dir,
        };
        std::thread::spawn(move || mall_sidecar::run(config, Some(path)));
        sidecar
    }

    /// Rewrites the file with `change` applied and reloads it over the admin port.
    async fn reload(&mut self, change: impl FnOnce(&mut SidecarConfig)) {
        change(&mut self.config);
        std::fs::write(&self.path, self.config.to_toml()).unwrap();
        let response = self
            .http
            .post(format!("{}/reload", self.admin))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    }

    /// This sidecar as the operator's canary judgement reads a pod (`rollout::read_sidecar`).
    async fn operator_sample(&self) -> mall_operator::rollout::PodSample {
        let text = self
            .http
            .get(format!("{}/metrics", self.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let mut sample = mall_operator::rollout::PodSample::default();
        mall_operator::rollout::read_sidecar(&text, &mut sample);
        assert_eq!(
            sample.percent,
            Some(20),
            "sidecar_canary_percent, read as the operator reads it"
        );
        sample
    }

    async fn metric(&self, name: &str, label: &str) -> f64 {
        metric_sum_where(&self.http, &format!("{}/metrics", self.admin), name, label).await
    }

    /// Attempts the canary (or stable) group was sent and answered with `class`.
    async fn answered(&self, group: &str, class: &str) -> f64 {
        let label = format!("group=\"{group}\",status_class=\"{class}\"");
        self.metric("sidecar_upstream_requests_total", &label).await
    }

    async fn ready_report(&self) -> (u16, String) {
        match self.http.get(format!("{}/ready", self.admin)).send().await {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        }
    }

    /// Waits until `/ready` answers 200 with a line containing `line`.
    async fn until_ready_with(&self, line: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (status, report) = self.ready_report().await;
            if status == 200 && report.contains(line) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "never ready with `{line}`: {status} {report}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `n` reads one after another.
    async fn reads(&self, n: usize) -> Reads {
        let retries_before = self.metric("sidecar_upstream_retries_total", "").await;
        let mut reads = Reads::default();
        for i in 0..n {
            let url = format!("{}/api/products/{}", self.base, 1 + i % 40);
            match self.http.get(&url).send().await.map(|r| r.status().as_u16()) {
                Ok(200) => reads.ok += 1,
                Ok(500) => reads.from_canary += 1,
                Ok(status) => reads.other.push(status),
                Err(_) => reads.other.push(0),
            }
        }
        reads.retries = self.metric("sidecar_upstream_retries_total", "").await - retries_before;
        reads
    }
}

/// What a run of reads got.
#[derive(Debug, Default)]
struct Reads {
    /// 200: the app, the stable instance.
    ok: usize,
    /// 500: the failing canary.
    from_canary: usize,
    /// Anything else (0: no response).
    other: Vec<u16>,
    /// Attempts sent again after a failed one: each is one more call in the split.
    retries: f64,
}

impl Reads {
    /// Whether `want` of the reads reached the canary, as exactly as the retries allow.
    fn canary_share_is(&self, want: usize) -> bool {
        (self.from_canary as f64 - want as f64).abs() <= self.retries
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_canary_takes_its_exact_share_and_costs_no_request_once_it_is_gone() {
    let stable = RunningApp::start(&[]).await;
    let port = stable.addr.port();
    let canary_addr = SocketAddr::from(([127, 0, 0, 2], port));
    let Some(canary) = failing_canary(canary_addr) else {
        return;
    };
    let canary_at = |percent| CanaryGroup {
        dns_name: "127.0.0.2".into(),
        percent,
        own_app_is_canary: false,
    };
    let mut sidecar = Sidecar::start(port, canary_at(20)).await;
    sidecar
        .until_ready_with("canary: 20 % of calls, 1 of 1 canary instances available")
        .await;
    assert_eq!(sidecar.metric("sidecar_canary_percent", "").await, 20.0);

    // 20 %: exactly one read in five reaches the canary, and is counted in its group.
    let before = (
        sidecar.answered("canary", "5xx").await,
        sidecar.answered("stable", "2xx").await,
        sidecar
            .metric("sidecar_upstream_response_seconds_count", "group=\"canary\"")
            .await,
    );
    let judged_from = sidecar.operator_sample().await;
    let reads = sidecar.reads(500).await;
    eprintln!("20 %: {reads:?}");
    // The operator's judgement (operator/src/rollout.rs), read from this real sidecar's metrics
    // as it reads every pod's: the canary failed every call it got, the stable apps none.
    let window = mall_operator::rollout::window(
        &std::collections::HashMap::from([("pod".to_string(), sidecar.operator_sample().await)]),
        &std::collections::HashMap::from([("pod".to_string(), judged_from)]),
    );
    let rollout: mall_operator::crd::Rollout = serde_json::from_value(serde_json::json!({})).unwrap();
    match mall_operator::rollout::judge(&rollout, &window) {
        mall_operator::rollout::Verdict::Fail(why) => assert!(
            why.starts_with(&format!(
                "failed requests: canary 100.0 % of {}, stable 0.0 % of {}",
                reads.from_canary, reads.ok
            )),
            "{why}"
        ),
        other => panic!("the operator would not roll this canary back: {other:?} from {window:?}"),
    }
    assert!(
        reads.other.is_empty(),
        "only the app's 200 and the canary's 500: {reads:?}"
    );
    assert!(
        reads.canary_share_is(100),
        "exactly 100 of 500 calls go to the canary at 20 %: {reads:?}"
    );
    assert_eq!(
        sidecar.answered("canary", "5xx").await - before.0,
        reads.from_canary as f64
    );
    assert_eq!(sidecar.answered("stable", "2xx").await - before.1, reads.ok as f64);
    let canary_timed = sidecar
        .metric("sidecar_upstream_response_seconds_count", "group=\"canary\"")
        .await;
    assert_eq!(
        canary_timed - before.2,
        reads.from_canary as f64,
        "each canary answer timed in its group"
    );

    // A reload moves the split at once.
    sidecar.reload(|c| c.upstream.canary = Some(canary_at(50))).await;
    assert_eq!(sidecar.metric("sidecar_canary_percent", "").await, 50.0);
    let reads = sidecar.reads(100).await;
    assert!(
        reads.other.is_empty() && reads.canary_share_is(50),
        "50 % after the reload: {reads:?}"
    );

    // A canary name without addresses: an empty group, all to stable, and DNS is not failing.
    sidecar
        .reload(|c| {
            c.upstream.canary = Some(CanaryGroup {
                dns_name: "no-canary-pod-ready-yet.invalid".into(),
                ..canary_at(50)
            })
        })
        .await;
    sidecar
        .until_ready_with("canary: 50 % of calls, 0 of 0 canary instances available")
        .await;
    let reads = sidecar.reads(100).await;
    assert_eq!(reads.ok, 100, "no canary instance: every call is stable: {reads:?}");
    tokio::time::sleep(Duration::from_millis(1500)).await; // another lookup of both names
    assert_eq!(sidecar.metric("sidecar_upstream_discovery_failing", "").await, 0.0);
    assert_eq!(sidecar.metric("sidecar_canary_instances", "").await, 0.0);
    let (status, report) = sidecar.ready_report().await;
    assert!(status == 200 && report.contains("discovery: ok"), "{report}");

    // The canary back, then gone: not one read fails.
    sidecar.reload(|c| c.upstream.canary = Some(canary_at(20))).await;
    sidecar
        .until_ready_with("canary: 20 % of calls, 1 of 1 canary instances available")
        .await;
    drop(canary);
    let errors_before = sidecar.answered("canary", "error").await;
    let reads = sidecar.reads(500).await;
    let errors = sidecar.answered("canary", "error").await - errors_before;
    eprintln!("canary gone: {reads:?}; {errors} attempts on the canary counted as errors");
    assert_eq!(reads.ok, 500, "a canary that is gone costs no request: {reads:?}");

    // The canary removed: one group again.
    sidecar.reload(|c| c.upstream.canary = None).await;
    assert_eq!(sidecar.metric("sidecar_canary_percent", "").await, 0.0);
    let stable_before = sidecar.answered("stable", "2xx").await;
    let reads = sidecar.reads(50).await;
    assert_eq!(reads.ok, 50, "{reads:?}");
    assert_eq!(sidecar.answered("stable", "2xx").await - stable_before, 50.0);
    drop(stable);
}
