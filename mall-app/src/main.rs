//! `mall-app`: serve (default), seed or migrate. `mall-app serve --help` lists every setting.

use std::process::ExitCode;

use clap::Parser;
use mall_app::config::{Cli, Command, Config, LogFormat, ServeArgs};
use mall_app::{db::Db, metrics::Metrics, tuning, App};

/// Every request allocates (headers, JSON, sqlx rows) on tokio's worker threads; mimalloc's
/// per-thread heaps spend less on it than glibc's malloc (measured in BENCHMARKS.md's orders runs).
#[global_allocator]
static ALLOCATOR: mall_telemetry::heap::Sampled<mimalloc::MiMalloc> = mall_telemetry::heap::Sampled(mimalloc::MiMalloc);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve(cli.serve));
    let result = match command {
        Command::Serve(args) => serve(*args),
        Command::Seed { db, seed } => {
            init_logging(LogFormat::Text);
            one_shot(&db, |db| async move {
                let report = mall_app::seed::seed(&db, &seed).await?;
                println!(
                    "seeded: {} products and {} users added",
                    report.products_added, report.users_added
                );
                Ok(())
            })
        }
        Command::Migrate { db } => {
            init_logging(LogFormat::Text);
            one_shot(&db, |_| async { Ok(()) })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mall-app: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let config = Config::resolve(args, tuning::detect())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.tuning.worker_threads)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        if config.uses_dev_secret() {
            tracing::warn!(
                "MALL_JWT_SECRET is not set: using the development secret (refused when MALL_ENV=production)"
            );
        }
        tracing::info!(
            cpus = config.resources.cpus,
            cpus_from = if config.resources.cpus_from_cgroup {
                "cgroup"
            } else {
                "host"
            },
            memory_bytes = config.resources.memory_bytes,
            worker_threads = config.tuning.worker_threads,
            primary_pool_max = config.tuning.primary_pool.max,
            replica_pool_max = config.tuning.replica_pool.max,
            cache_bytes = config.tuning.cache_bytes,
            "tuning"
        );
        let listen = config.args.listen;
        let socket = config.args.listen_socket.clone();
        // Config::resolve refuses an admin port without its token.
        let admin = config.args.admin_listen.zip(config.args.admin_token.clone());
        let app = App::start(config).await?;
        if let Some((admin, token)) = admin {
            let listener = tokio::net::TcpListener::bind(admin)
                .await
                .map_err(|e| anyhow::anyhow!("MALL_ADMIN_LISTEN: cannot bind {admin}: {e}"))?;
            tracing::info!(url = %format!("http://{}", listener.local_addr()?), "admin port (profiles) listening");
            tokio::spawn(mall_app::admin::serve(listener, token.0));
            // Heap profiles: the allocator samples from now on (mall_telemetry::heap).
            mall_telemetry::heap::enable();
        }
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| anyhow::anyhow!("MALL_LISTEN: cannot bind {listen}: {e}"))?;
        let addr = listener.local_addr()?;
        tracing::info!(url = %format!("http://{addr}"), "mall app listening");
        let unix = match socket {
            Some(path) => {
                let unix = mall_app::bind_unix(&path)
                    .map_err(|e| anyhow::anyhow!("MALL_LISTEN_SOCKET: cannot bind {}: {e}", path.display()))?;
                tracing::info!(socket = %path.display(), "mall app listening on a Unix socket too");
                Some(unix)
            }
            None => None,
        };
        app.serve_on(listener, unix, shutdown_signal()).await
    })
}

/// Runs a database-only command on a small runtime.
fn one_shot<F, Fut>(args: &mall_app::config::DbArgs, f: F) -> anyhow::Result<()>
where
    F: FnOnce(std::sync::Arc<Db>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let tuning = tuning::derive(&tuning::detect());
        let db = std::sync::Arc::new(Db::connect(args, &tuning, std::sync::Arc::new(Metrics::new())).await?);
        db.migrate().await?;
        f(db.clone()).await?;
        db.close().await;
        Ok(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// Log lines, statement timings and (with OTEL_* set) spans: `mall_app::telemetry`. A bad
/// OTEL_* variable stops the start with its name.
fn init_logging(format: LogFormat) {
    if let Err(e) = mall_app::telemetry::install(format) {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
}
