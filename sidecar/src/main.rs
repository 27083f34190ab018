//! `sidecar [run] -c FILE` serves; `sidecar check-config FILE` validates and exits.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mall_sidecar_config::SidecarConfig;
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// pingora runs several runtimes' worker threads that all allocate per request; glibc's malloc
/// serialises them on its arena locks (the profile showed it), mimalloc's per-thread heaps do not.
#[global_allocator]
static ALLOCATOR: mall_telemetry::heap::Sampled<mimalloc::MiMalloc> = mall_telemetry::heap::Sampled(mimalloc::MiMalloc);

#[derive(Parser)]
#[command(
    name = "sidecar",
    version,
    about = "Caching, compressing, rate-limiting, load-balancing proxy for the mall app"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// The TOML configuration file (SIDECAR__SECTION__FIELD variables override it).
    #[arg(short, long, env = "SIDECAR_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default).
    Run {
        #[arg(short, long, env = "SIDECAR_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Validate FILE (with environment overrides) and print the effective configuration.
    CheckConfig { file: PathBuf },
    /// Print the default configuration, every field with its default.
    Defaults,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = std::env::var("SIDECAR_LOG_FORMAT").map(|f| f != "text").unwrap_or(true);
    let filter = tracing_subscriber::EnvFilter::try_from_env("SIDECAR_LOG")
        .unwrap_or_else(|_| "info,pingora_cache::meta=error".into());
    // Library lines (pingora's per-request failures) are capped per call site; see `log_limit`.
    let filter = filter.and(mall_sidecar::log_limit::PerCallsite::new());
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stdout);
    if json {
        let layer = layer.json().flatten_event(true).with_filter(filter);
        tracing_subscriber::registry().with(layer).init();
    } else {
        tracing_subscriber::registry().with(layer.with_filter(filter)).init();
    }

    let path = match cli.command {
        Some(Command::CheckConfig { file }) => {
            return match SidecarConfig::load(&file) {
                Ok(config) => {
                    println!("{}", config.to_toml());
                    eprintln!("{}: ok", file.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(2)
                }
            };
        }
        Some(Command::Defaults) => {
            print!("{}", SidecarConfig::default().to_toml());
            return ExitCode::SUCCESS;
        }
        Some(Command::Run { config }) => config,
        None => cli.config,
    };
    let loaded = match &path {
        Some(p) => SidecarConfig::load(p),
        None => SidecarConfig::from_toml_with_env("", "defaults", std::env::vars()),
    };
    let config = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match mall_sidecar::run(config, path) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
