//! The real `operator run` binary as a standby: another replica holds the Lease. Its API server is
//! a stand-in serving just what a standby asks for (its Deployment, its pod, the Lease); no real
//! kube-apiserver runs on these machines. Issue 33: a standby printed nothing, answered `/ready`
//! with a bare 503 (so a rollout's surge pod never became Ready and every upgrade stalled), and
//! ignored SIGTERM (killed after the whole grace period).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{StatusCode, Uri};
use axum::response::IntoResponse;
use axum::routing::any;
use axum::Json;
use serde_json::json;

const LEADER: &str = "mall-operator-7d9f-leader";

/// The stand-in API server: a Lease held (and just renewed) by `LEADER`, the operator's
/// Deployment and pod; everything else is a 404 as a real server would answer it.
async fn api_server() -> u16 {
    let app = axum::Router::new().fallback(any(|method: axum::http::Method, uri: Uri| async move {
        let path = uri.path();
        if path == "/apis/coordination.k8s.io/v1/namespaces/mall-system/leases/mall-operator-leader" && method == "GET"
        {
            let now = k8s_openapi::jiff::Timestamp::now().to_string();
            return Json(json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": { "name": "mall-operator-leader", "namespace": "mall-system", "resourceVersion": "7" },
                "spec": { "holderIdentity": LEADER, "leaseDurationSeconds": 15,
                          "acquireTime": now, "renewTime": now, "leaseTransitions": 3 }
            }))
            .into_response();
        }
        if path == "/apis/apps/v1/namespaces/mall-system/deployments/mall-operator" {
            return Json(json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": { "name": "mall-operator", "namespace": "mall-system", "uid": "d-1" },
                "spec": { "selector": {}, "template": {} }
            }))
            .into_response();
        }
        if let Some(pod) = path.strip_prefix("/api/v1/namespaces/mall-system/pods/") {
            return Json(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": { "name": pod, "namespace": "mall-system" }
            }))
            .into_response();
        }
        (
            StatusCode::NOT_FOUND,
            Json(json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure",
                         "message": format!("{path} not found"), "reason": "NotFound", "code": 404 })),
        )
            .into_response()
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

/// The operator process; killed if a failed assertion leaves it running (std's `kill` signals
/// only a child not yet reaped, never a recycled pid).
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_says_who_leads_is_ready_and_exits_at_once_on_sigterm() {
    let api = api_server().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: stand-in, cluster: {{server: \"http://127.0.0.1:{api}\"}}}}]\n\
             users: [{{name: u, user: {{}}}}]\ncontexts: [{{name: c, context: {{cluster: stand-in, user: u}}}}]\ncurrent-context: c\n"
        ),
    )
    .unwrap();
    let port = free_port();
    let mut child = Running(
        Command::new(env!("CARGO_BIN_EXE_operator"))
            .arg("run")
            .env_clear()
            .env("KUBECONFIG", &kubeconfig)
            .env("OPERATOR_LISTEN", format!("127.0.0.1:{port}"))
            .env("POD_NAME", "mall-operator-7d9f-standby")
            .env("POD_NAMESPACE", "mall-system")
            .env("OPERATOR_DEPLOYMENT", "mall-operator")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let lines = log.clone();
    let stdout = child.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            lines.lock().unwrap().push(line);
        }
    });
    let (stderr, lines) = (child.0.stderr.take().unwrap(), log.clone());
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            lines.lock().unwrap().push(line);
        }
    });

    // `/ready`: Ready (it can take over), and says it is a standby and who leads.
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let (status, body) = loop {
        let answer = http.get(format!("http://127.0.0.1:{port}/ready")).send().await;
        if let Ok(answer) = answer {
            let status = answer.status();
            let body = answer.text().await.unwrap();
            if body.contains(LEADER) || Instant::now() > deadline {
                break (status, body);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no answer on /ready: {:?}",
            log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        status.as_u16(),
        200,
        "a standby that can read the Lease is Ready: {body}"
    );
    assert!(body.contains("standby") && body.contains(LEADER), "{body}");

    // Its log says so too.
    let said = |what: &str| log.lock().unwrap().iter().any(|l| l.contains(what));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(said("standby") && said(LEADER)) {
        assert!(
            Instant::now() < deadline,
            "the log does not say it is a standby and who leads: {:?}",
            log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // SIGTERM: gone at once, and cleanly.
    let sent = Instant::now();
    let kill = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        if sent.elapsed() > Duration::from_secs(5) {
            panic!("a standby still runs 5 s after SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        sent.elapsed() < Duration::from_secs(1),
        "exited {:?} after SIGTERM",
        sent.elapsed()
    );
    assert_eq!(status.code(), Some(0), "a standby exits cleanly on SIGTERM: {status:?}");
}
