//! Background work, run as pingora background services: active health checks, DNS discovery,
//! configuration reload (SIGHUP and file change), the admin endpoints, and the bounded drain on
//! shutdown.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use http::Response;
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use crate::state::Shared;

/// How often the pod's own app is checked until its first check passes: the pod is ready within
/// this of its app, not a whole `health_check.interval_ms` later. A connection refused by the
/// pod's own address costs microseconds.
const OWN_APP_STARTING_CHECK: Duration = Duration::from_millis(100);

/// Health checks every `upstream.health_check.interval_ms` (the pod's own app more often while
/// it starts). DNS has a loop of its own, [`Discovery`]: a lookup hanging on a DNS outage must not
/// hold the checks, and with them readiness, back.
pub struct Upstreams(pub Arc<Shared>);

#[async_trait]
impl BackgroundService for Upstreams {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let shared = &self.0;
        loop {
            shared.pool.check_health().await;
            let interval = Duration::from_millis(shared.live.load().config.upstream.health_check.interval_ms);
            let next_round = tokio::time::Instant::now() + interval;
            loop {
                let starting = shared.pool.own_app().is_some_and(|own| own.awaiting_first_pass());
                let wake = if starting {
                    next_round.min(tokio::time::Instant::now() + OWN_APP_STARTING_CHECK)
                } else {
                    next_round
                };
                tokio::select! {
                    _ = tokio::time::sleep_until(wake) => {}
                    _ = shutdown.changed() => return,
                }
                if wake >= next_round {
                    break;
                }
                shared.pool.check_starting_own_app().await;
            }
        }
    }
}

/// DNS lookups of `upstream.dns.name` (and `upstream.canary.dns_name`): every
/// `refresh_seconds`, sooner after a failure, and at once after a reload that changes them.
pub struct Discovery(pub Arc<Shared>);

#[async_trait]
impl BackgroundService for Discovery {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let shared = &self.0;
        loop {
            // Read each time: a reload may turn DNS or the canary on or off.
            let upstream = shared.live.load().config.upstream.clone();
            let wait = match &upstream.dns {
                Some(dns) => {
                    shared
                        .discovery
                        .refresh(&shared.pool, dns, upstream.canary.as_ref())
                        .await
                }
                None => {
                    shared.metrics.discovery_failing.set(0);
                    Duration::from_secs(1)
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shared.rediscover.notified() => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Reloads on SIGHUP and when the file's modification time changes (a ConfigMap update swaps the
/// file behind a symlink, which changes what `metadata` sees).
pub struct Reloader(pub Arc<Shared>);

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let shared = &self.0;
        let Some(path) = shared.config_path.clone() else { return };
        let stamp = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let mut seen: Option<SystemTime> = stamp(&path);
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP; reload on file change only");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = hangup.recv() => {
                    tracing::info!("SIGHUP: reloading configuration");
                    let _ = shared.reload();
                    seen = stamp(&path);
                }
                _ = tokio::time::sleep(Duration::from_secs(2)) => {
                    let now = stamp(&path);
                    if now.is_some() && now != seen {
                        seen = now;
                        tracing::info!("configuration file changed: reloading");
                        let _ = shared.reload();
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// On shutdown: stop being ready, let in-flight requests finish, then exit, within
/// `server.shutdown_grace_seconds`. pingora would otherwise sleep the whole grace period even when
/// nothing is in flight.
pub struct Drain(pub Arc<Shared>);

#[async_trait]
impl BackgroundService for Drain {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let shared = &self.0;
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                break;
            }
        }
        shared.draining.store(true, Ordering::Relaxed);
        let grace = Duration::from_secs(shared.live.load().config.server.shutdown_grace_seconds);
        let deadline = Instant::now() + grace;
        tracing::info!(
            in_flight = shared.in_flight.load(Ordering::Relaxed),
            grace_seconds = grace.as_secs(),
            "draining"
        );
        while shared.in_flight.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let left = shared.in_flight.load(Ordering::Acquire);
        tracing::info!(abandoned = left, "drained; exiting");
        std::process::exit(0);
    }
}

/// The admin port: `/metrics`, `/health` (the process is up), `/ready` (it can serve), `POST
/// /reload`, and with `server.profiling` the profiles of [`mall_telemetry::profile`].
pub struct Admin(pub Arc<Shared>);

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let shared = &self.0;
        if let Some(response) = profile(shared, session).await {
            return response;
        }
        let (status, content_type, body) = match session.req_header().uri.path() {
            "/metrics" => (200, "text/plain; version=0.0.4", shared.metrics.render()),
            "/health" => (200, "text/plain", b"ok\n".to_vec()),
            "/ready" => {
                let (ready, report) = readiness(shared);
                (if ready { 200 } else { 503 }, "text/plain", report.into_bytes())
            }
            "/reload" if session.req_header().method == http::Method::POST => {
                let token = shared.live.load().config.server.admin_token.clone();
                let presented = session
                    .req_header()
                    .headers
                    .get(http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "));
                match (token, presented) {
                    (None, _) => (
                        403,
                        "text/plain",
                        b"POST /reload is off: set server.admin_token to enable it (SIGHUP and file changes reload)\n"
                            .to_vec(),
                    ),
                    (Some(t), Some(p)) if constant_time_eq(t.as_bytes(), p.as_bytes()) => match shared.reload() {
                        Ok(()) => (200, "text/plain", b"reloaded\n".to_vec()),
                        Err(e) => (400, "text/plain", format!("{e}\n").into_bytes()),
                    },
                    (Some(_), _) => (401, "text/plain", b"missing or wrong bearer token\n".to_vec()),
                }
            }
            _ => (404, "text/plain", b"not found\n".to_vec()),
        };
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .header("content-length", body.len())
            .body(body)
            .expect("valid response")
    }
}

/// `/debug/pprof/profile?seconds=N` and `/debug/pprof/heap`; `None` for other paths. The profile
/// is taken on a blocking thread while this connection waits: pingora serves each admin
/// connection on a task of its own, so probes and scrapes carry on meanwhile.
async fn profile(shared: &Shared, session: &ServerSession) -> Option<Response<Vec<u8>>> {
    use mall_telemetry::profile::{answer, Profile, ProfileError};
    let req = session.req_header();
    let asked = Profile::from_request(req.uri.path(), req.uri.query())?;
    let (profiling, token) = {
        let server = &shared.live.load().config.server;
        (server.profiling, server.admin_token.clone().unwrap_or_default())
    };
    if !profiling {
        let body = b"profiles are off: set server.profiling (and server.admin_token) to serve them\n";
        return Some(text(404, body).body(body.to_vec()).expect("valid response"));
    }
    let authorization = req
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let taken = tokio::task::spawn_blocking(move || answer(authorization.as_deref(), &token, asked))
        .await
        .unwrap_or_else(|e| Err(ProfileError::Failed(e.to_string())));
    if taken.is_ok() {
        tracing::info!(path = req.uri.path(), "profile taken");
    }
    Some(
        match taken {
            Ok(pprof) => Response::builder()
                .status(200)
                .header("content-type", "application/octet-stream")
                .header("content-disposition", "attachment; filename=\"profile.pb\"")
                .header("content-length", pprof.len())
                .body(pprof),
            Err(e) => {
                let body = format!("{e}\n").into_bytes();
                let mut response = text(e.status(), &body);
                if e.status() == 401 {
                    response = response.header(http::header::WWW_AUTHENTICATE, "Bearer");
                }
                if let Some(seconds) = e.retry_after() {
                    response = response.header(http::header::RETRY_AFTER, seconds);
                }
                response.body(body)
            }
        }
        .expect("valid response"),
    )
}

fn text(status: u16, body: &[u8]) -> http::response::Builder {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .header("content-length", body.len())
}

/// Whether the sidecar can serve, and why, for `/ready`: a first line that says it (`ready`,
/// `draining`, `no healthy upstream instance`), then one line per check: the instances, the pod's
/// own app, and DNS discovery (failing says so, with the lookup's error, while the pod's own app
/// and the instances found before serve).
fn readiness(shared: &Shared) -> (bool, String) {
    use std::fmt::Write;
    let ready = shared.ready();
    let mut report = String::from(if ready {
        "ready\n"
    } else if shared.draining.load(Ordering::Relaxed) {
        "draining\n"
    } else {
        "no healthy upstream instance\n"
    });
    let instances = shared.pool.instances();
    let available = instances.iter().filter(|i| i.is_available()).count();
    let _ = writeln!(report, "instances: {available} of {} available", instances.len());
    if let Some(own) = shared.pool.own_app() {
        let state = if own.is_available() {
            "up"
        } else if own.awaiting_first_pass() {
            "starting (no check passed yet)"
        } else {
            "down"
        };
        let _ = writeln!(report, "own app: {} {state}", own.label());
    }
    if let Some(dns) = &shared.live.load().config.upstream.dns {
        let status = shared.discovery.status();
        if status.failing() {
            let since = status.failing_since.map_or(0, |t| t.elapsed().as_secs());
            let _ = writeln!(
                report,
                "discovery: failing for {since} s ({} lookups in a row): {}: {}",
                status.failures,
                dns.name,
                status.error.as_deref().unwrap_or("unknown error"),
            );
        } else if status.name.is_empty() {
            let _ = writeln!(report, "discovery: no answer yet from {}", dns.name);
        } else {
            let _ = writeln!(report, "discovery: ok, {} instances at {}", status.found, dns.name);
        }
    }
    if let Some((percent, canary)) = shared.pool.canary() {
        let available = canary.iter().filter(|i| i.is_available()).count();
        let _ = write!(
            report,
            "canary: {percent} % of calls, {available} of {} canary instances available",
            canary.len()
        );
        match shared.discovery.status().canary {
            Some(crate::discovery::CanaryStatus {
                name,
                error: Some(error),
                ..
            }) => {
                let _ = writeln!(report, "; lookup of {name} failing: {error}");
            }
            Some(c) => {
                let _ = writeln!(report, "; {} found at {}", c.found, c.name);
            }
            None => report.push('\n'),
        }
    }
    (ready, report)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
