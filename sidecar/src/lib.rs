//! The mall sidecar: a pingora reverse proxy in front of mall app instances that caches, compresses,
//! rate-limits and load-balances, configured by one TOML file (see `mall-sidecar-config`).

pub mod cache;
pub mod discovery;
pub mod header_deadline;
pub mod invalidation;
pub mod limits;
pub mod log_limit;
pub mod metrics;
pub mod negotiate;
pub mod proxy;
pub mod redis_breaker;
pub mod services;
pub mod state;
#[cfg(test)]
mod test_redis;
pub mod trace;
pub mod upstreams;
pub mod waiting_room;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mall_sidecar_config::SidecarConfig;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use pingora_core::services::background::background_service;
use pingora_core::services::listening::Service;

pub use mall_sidecar_config as config;

/// The cgroup's CPU quota in CPUs (v2 `cpu.max`, then v1 `cpu.cfs_quota_us`), if one is set.
fn cgroup_cpus() -> Option<f64> {
    let read = |p: &str| std::fs::read_to_string(std::path::Path::new("/sys/fs/cgroup").join(p)).ok();
    let v2 = read("cpu.max").and_then(|s| {
        let mut parts = s.split_whitespace();
        let quota = parts.next()?.parse::<f64>().ok()?;
        let period = parts.next().unwrap_or("100000").parse::<f64>().ok()?;
        (period > 0.0).then_some(quota / period)
    });
    v2.or_else(|| {
        let quota = read("cpu/cpu.cfs_quota_us")?.trim().parse::<f64>().ok()?;
        let period = read("cpu/cpu.cfs_period_us")?.trim().parse::<f64>().ok()?;
        (quota > 0.0 && period > 0.0).then_some(quota / period)
    })
}

/// Builds the pingora server for `config` and runs it until SIGTERM or SIGINT (both drain; a
/// second SIGINT exits at once).
pub fn run(config: SidecarConfig, config_path: Option<PathBuf>) -> anyhow::Result<()> {
    raise_open_files_limit();
    if config.server.profiling {
        // Heap profiles: the allocator samples from now on (mall_telemetry::heap).
        mall_telemetry::heap::enable();
    }
    // Unset: one worker per CPU of the cgroup's quota (as automaxprocs), else of the host.
    let (threads, threads_from) = match config.server.threads {
        0 => match cgroup_cpus() {
            Some(cpus) => ((cpus.floor() as usize).max(1), "cgroup"),
            None => (
                std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
                "host",
            ),
        },
        n => (n, "config"),
    };
    let conf = ServerConf {
        threads,
        // The Drain service exits as soon as in-flight requests finish; this is only the cap.
        grace_period_seconds: Some(config.server.shutdown_grace_seconds),
        graceful_shutdown_timeout_seconds: Some(1),
        // Each worker keeps its own pool (see `add_workers`): the configured size is their total.
        upstream_keepalive_pool_size: config.upstream.keepalive_pool_size.div_ceil(threads),
        max_retries: config.upstream.retries + 1,
        // The proxy runs as single-thread workers (see `add_workers`); the admin and background
        // services each have one thread of their own.
        work_stealing: false,
        ..ServerConf::default()
    };
    // The workers bind with SO_REUSEPORT, so a second sidecar on the same port would start
    // without complaint and silently take part of the first one's connections. A plain bind
    // (dropped before the workers bind) first refuses a port someone already listens on.
    for (field, addr) in [
        ("server.listen", config.server.listen),
        ("server.admin_listen", config.server.admin_listen),
    ] {
        std::net::TcpListener::bind(addr)
            .map_err(|e| anyhow::anyhow!("{field} = {addr}: {e} (is another sidecar still running?)"))?;
    }
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();

    let listen = config.server.listen;
    let admin_listen = config.server.admin_listen;
    // Traces: the standard OpenTelemetry variables (OTEL_EXPORTER_OTLP_ENDPOINT and the rest).
    let tracer = mall_telemetry::TraceConfig::from_env("mall-sidecar")
        .map_err(|e| anyhow::anyhow!(e))?
        .map(|c| mall_telemetry::Exporter::start(c, "mall-sidecar"));
    let shared = state::Shared::new(config, config_path, tracer);

    let header_timeout = Duration::from_secs(shared.live.load().config.server.request_header_timeout_seconds);
    let configuration = server.configuration.clone();
    add_workers(&mut server, "mall sidecar", listen, threads, || {
        let proxy_app = pingora_proxy::http_proxy(&configuration, proxy::MallProxy { shared: shared.clone() });
        header_deadline::HeaderDeadline::new(proxy_app, header_timeout, shared.metrics.header_timeouts.clone())
    });

    let mut admin = Service::new("admin".into(), services::Admin(shared.clone()));
    admin.threads = Some(1);
    admin.add_tcp(&admin_listen.to_string());
    server.add_service(admin);
    server.add_service(background_service("upstreams", services::Upstreams(shared.clone())));
    server.add_service(background_service("discovery", services::Discovery(shared.clone())));
    server.add_service(background_service("reload", services::Reloader(shared.clone())));
    server.add_service(background_service(
        "invalidation",
        invalidation::Invalidations(shared.clone()),
    ));
    server.add_service(background_service("drain", services::Drain(shared.clone())));
    tracing::info!(%listen, %admin_listen, threads, threads_from, "sidecar starting");
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals(shared)),
    });
    std::process::exit(0)
}

/// Serves `listen` with `workers` single-thread workers, as nginx does: each worker is a pingora
/// service of one thread with its own socket on the port (SO_REUSEPORT: the kernel spreads new
/// connections over them), its own accept loop and its own app (so its own upstream connection
/// pool). A request, its client connection and its upstream connection then stay on one thread.
/// One pingora service of N threads instead accepts on one thread, runs each connection and each
/// pooled upstream connection's idle watcher on a random thread and shares one pool between
/// threads: 2.3 cross-thread wake-ups per proxied request (measured; BENCHMARKS.md section 1).
///
/// pingora keys listening sockets by their address text (to hand them to a new process on a
/// graceful upgrade) and would give a second service on the same text the first one's socket, so
/// worker `i` spells the port with `i` leading zeros: the same address, a socket of its own.
pub fn add_workers<A, F>(server: &mut Server, name: &str, listen: SocketAddr, workers: usize, mut app: F)
where
    A: pingora_core::apps::ServerApp + Send + Sync + 'static,
    F: FnMut() -> A,
{
    for worker in 0..workers.max(1) {
        let mut service = Service::new(format!("{name} worker {worker}"), app());
        service.threads = Some(1);
        let mut options = pingora_core::listeners::TcpSocketOptions::default();
        options.so_reuseport = Some(true);
        service.add_tcp_with_settings(&worker_address(listen, worker), options);
        server.add_service(service);
    }
}

/// `listen` spelled for worker `worker` (see [`add_workers`]).
fn worker_address(listen: SocketAddr, worker: usize) -> String {
    let zeros = "0".repeat(worker);
    match listen {
        SocketAddr::V4(a) => format!("{}:{zeros}{}", a.ip(), a.port()),
        SocketAddr::V6(a) => format!("[{}]:{zeros}{}", a.ip(), a.port()),
    }
}

/// Raises the soft limit on open files to the hard limit, as nginx's `worker_rlimit_nofile` does.
/// Every client and every app connection is a descriptor; services often start with a soft limit
/// of 1,024, at which 2,000 idle clients stopped the sidecar (accept failing every second, `/ready`
/// timing out). The limit is logged, with a warning when it leaves little room.
pub fn raise_open_files_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            tracing::warn!("cannot read the open-files limit");
            return 0;
        }
        let before = limit.rlim_cur;
        if limit.rlim_cur < limit.rlim_max {
            // An unlimited hard limit is not a valid soft limit on every kernel: cap it.
            limit.rlim_cur = limit.rlim_max.min(1 << 20);
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                limit.rlim_cur = before;
            }
        }
        let soft: u64 = limit.rlim_cur;
        if soft < 4096 {
            tracing::warn!(
                soft,
                hard = limit.rlim_max,
                "open-files limit is low: raise the hard limit (LimitNOFILE, ulimit -Hn)"
            );
        } else {
            tracing::info!(soft, was = before, "open-files limit");
        }
        soft
    }
}

/// SIGTERM and SIGINT both drain: the `Drain` service exits as soon as in-flight requests finish.
/// A second SIGINT exits at once. pingora's own SIGINT "fast shutdown" stops the runtimes under
/// the accept loops, which can then spin on the dead reactor logging `Accept() failed` without
/// end (seen here: a process that never exited and wrote 60 GB of log). SIGQUIT keeps pingora's
/// graceful upgrade.
struct Signals(Arc<state::Shared>);

impl Signals {
    /// The shutdown delay: not ready, still serving, so endpoints drop the pod before the
    /// listeners close (see `server.shutdown_delay_seconds`).
    async fn delay(&self) {
        let delay = self.0.live.load().config.server.shutdown_delay_seconds;
        if delay > 0 {
            self.0.draining.store(true, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(delay_seconds = delay, "shutting down: not ready, still serving");
            tokio::time::sleep(Duration::from_secs(delay)).await;
        }
    }
}

#[async_trait::async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let mut quit = signal(SignalKind::quit()).expect("SIGQUIT handler");
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = quit.recv() => ShutdownSignal::GracefulUpgrade,
            _ = term.recv() => {
                self.delay().await;
                ShutdownSignal::GracefulTerminate
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: draining like SIGTERM; a second SIGINT exits at once");
                tokio::spawn(async move {
                    int.recv().await;
                    tracing::warn!("second SIGINT: exiting without waiting for in-flight requests");
                    std::process::exit(130);
                });
                self.delay().await;
                ShutdownSignal::GracefulTerminate
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_worker_spells_the_same_address_its_own_way() {
        for listen in ["127.0.0.1:8080", "[::1]:8080", "0.0.0.0:80"] {
            let listen: SocketAddr = listen.parse().unwrap();
            let spelled: Vec<String> = (0..3).map(|w| worker_address(listen, w)).collect();
            for text in &spelled {
                let parsed: SocketAddr = text.parse().unwrap();
                assert_eq!(parsed, listen, "{text}");
            }
            assert_eq!(spelled[0], listen.to_string());
            assert!(spelled[1] != spelled[0] && spelled[2] != spelled[1]);
        }
    }
}
