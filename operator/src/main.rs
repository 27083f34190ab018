//! `operator run` (controller, webhook, metrics, leader election), `operator render -f FILE`,
//! `operator crd`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use clap::{Parser, Subcommand};
use mall_operator::autoscale::{self, Webhook};
use mall_operator::controller::{self, Context};
use mall_operator::leader::{self, Elector, Timing};
use mall_operator::render;
use mall_operator::user_agent;

#[derive(Parser)]
#[command(name = "operator", version, about = "MallDeployment operator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller and the HTTP endpoints (/metrics, /health, /ready, POST /alerts).
    Run(RunArgs),
    /// Print the manifests the operator would apply for the MallDeployments in FILE.
    Render {
        #[arg(short = 'f', long)]
        file: PathBuf,
        /// Render the objects as they will be at this time (RFC 3339, e.g. 2026-11-27T09:00:00Z):
        /// with the sale windows in effect then. Default: now.
        #[arg(long, value_parser = mall_operator::sale::parse_instant)]
        at: Option<i64>,
    },
    /// Print the MallDeployment CRD.
    Crd,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Where /metrics, /health, /ready and POST /alerts listen.
    #[arg(long, env = "OPERATOR_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Bearer token Alertmanager presents on POST /alerts; without it the webhook is off.
    #[arg(long, env = "OPERATOR_WEBHOOK_TOKEN")]
    webhook_token: Option<String>,
    /// Namespace of the leader-election Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "mall-system")]
    namespace: String,
    /// A Prometheus to ask whether it loaded each mall's alert rules and scrapes its pods
    /// (`http://prometheus-operated.monitoring:9090`), reported in status.monitoring, and to
    /// judge canary releases through (without one, they are judged from the pods' metrics).
    #[arg(long, env = "OPERATOR_PROMETHEUS_URL")]
    prometheus_url: Option<String>,
    /// Labels for every PrometheusRule and ServiceMonitor, `key=value,...` (what your
    /// Prometheus selects them by, e.g. `release=kube-prometheus-stack`).
    #[arg(long, env = "OPERATOR_MONITORING_LABELS", default_value = "", value_parser = parse_labels)]
    monitoring_labels: std::collections::BTreeMap<String, String>,
    /// This replica's identity in the Lease (default: the host name plus a random suffix).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// The operator's own Deployment (in `POD_NAMESPACE`): made the Lease's owner, so deleting
    /// it (`helm uninstall`) deletes the Lease.
    #[arg(long, env = "OPERATOR_DEPLOYMENT")]
    deployment: Option<String>,
}

/// SIGTERM (what the kubelet sends) or SIGINT. As PID 1 in a container the process has no default
/// handler for either: without this a standby waited out the whole grace period and was killed.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// How recently a standby must have read the Lease to be Ready (five tries of the retry period).
const READY_WITHIN: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Render { file, at } => {
            let input = std::fs::read_to_string(&file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let rendered = match at {
                Some(at) => render::render_at(&input, at),
                None => render::render(&input),
            };
            match rendered {
                Ok(out) => print!("{out}"),
                Err(e) => {
                    eprintln!("{}: {e}", file.display());
                    std::process::exit(2);
                }
            }
            Ok(())
        }
        Command::Crd => {
            print!("{}", render::crd_yaml());
            Ok(())
        }
        Command::Run(args) => run(args).await,
    }
}

/// `key=value,key2=value2` (empty: none).
fn parse_labels(text: &str) -> Result<std::collections::BTreeMap<String, String>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
            _ => Err(format!("`{kv}` is not key=value")),
        })
        .collect()
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let RunArgs {
        listen,
        webhook_token,
        namespace,
        prometheus_url,
        monitoring_labels,
        identity,
        deployment,
    } = args;
    let identity = identity.unwrap_or_else(leader::default_identity);
    // Already installed (a second call) is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let mut config = kube::Config::infer().await.map_err(|e| {
        anyhow::anyhow!(
            "no Kubernetes API server to talk to: not running in a pod (KUBERNETES_SERVICE_HOST is unset) and no kubeconfig (KUBECONFIG or ~/.kube/config): {e}"
        )
    })?;
    config.headers.push((
        axum::http::header::USER_AGENT,
        axum::http::HeaderValue::from_str(&user_agent())?,
    ));
    let client = kube::Client::try_from(config)?;
    let mut ctx = Context::new(client.clone()).with_monitoring_labels(monitoring_labels);
    if let Some(url) = prometheus_url.filter(|u| !u.is_empty()) {
        let check = mall_operator::verify::PrometheusCheck::new(&url).map_err(|e| anyhow::anyhow!(e))?;
        ctx = ctx.with_prometheus(check);
    }
    let ctx = Arc::new(ctx);

    let timing = Timing::default();
    let owner = match deployment.as_deref().filter(|d| !d.is_empty()) {
        Some(name) => match leader::deployment_owner(&client, &namespace, name).await {
            Ok(owner) => Some(owner),
            Err(e) => {
                tracing::warn!(error = %e, deployment = name, "the Lease gets no owner: it may outlive an uninstall");
                None
            }
        },
        None => None,
    };
    let elector = Arc::new(
        Elector::new(
            client.clone(),
            &namespace,
            "mall-operator-leader",
            &identity,
            timing.lease,
        )
        .with_owner(owner),
    );
    let pod = std::env::var("POD_NAME").ok().filter(|p| !p.is_empty());

    let mut app = axum::Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(|State(ctx): State<Arc<Context>>| async move { ctx.metrics.render() }),
        )
        .with_state(ctx.clone())
        .merge(
            axum::Router::new()
                .route(
                    "/ready",
                    get(
                        |State((elector, identity)): State<(Arc<Elector>, Arc<str>)>| async move {
                            // Every replica that can take over is Ready, so rollouts proceed; the
                            // webhook Service selects the leader by its pod label (leader.rs).
                            let (ready, body) = elector.standing().readiness(&identity, READY_WITHIN);
                            let code = if ready {
                                StatusCode::OK
                            } else {
                                StatusCode::SERVICE_UNAVAILABLE
                            };
                            (code, body)
                        },
                    ),
                )
                .with_state((elector.clone(), Arc::<str>::from(identity.as_str()))),
        );
    match webhook_token {
        Some(token) => {
            let hook = Arc::new(Webhook {
                ctx: ctx.clone(),
                token,
            });
            app = app.merge(
                axum::Router::new()
                    .route("/alerts", post(autoscale::handle))
                    .with_state(hook),
            );
        }
        None => tracing::warn!("OPERATOR_WEBHOOK_TOKEN unset: alert-driven scaling is off"),
    }
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tokio::spawn(async move { axum::serve(listener, app).await });

    // A container restarted after losing the Lease must not keep the leader's label.
    if let Some(pod) = &pod {
        if let Err(e) = leader::label_pod(&client, &namespace, pod, false).await {
            tracing::warn!(error = %e, %pod, "could not take the leader label off this pod");
        }
    }
    tracing::info!(%identity, "standing by for the Lease mall-operator-leader");
    tokio::select! {
        _ = elector.acquire(timing) => {}
        _ = shutdown_signal() => {
            tracing::info!(%identity, "standby: SIGTERM; exiting (nothing to hand over)");
            return Ok(());
        }
    }
    tracing::info!(%identity, "leading");
    if let Some(pod) = pod.clone() {
        let (client, namespace) = (client.clone(), namespace.clone());
        tokio::spawn(async move {
            // Until it succeeds: without the label the webhook Service has no endpoint.
            while let Err(e) = leader::label_pod(&client, &namespace, &pod, true).await {
                tracing::warn!(error = %e, %pod, "could not label this pod as the leader; retrying");
                tokio::time::sleep(timing.retry_period).await;
            }
        });
    }
    let holder = elector.clone();
    let holding = tokio::spawn(async move {
        let why = holder.hold(timing).await;
        // Another replica may lead by now: stop at once rather than reconcile twice.
        tracing::error!(reason = %why, "leadership lost; exiting");
        std::process::exit(1);
    });
    // Returns on SIGTERM or SIGINT, once the reconciles in flight have finished.
    controller::run(ctx).await;
    holding.abort();
    match tokio::time::timeout(Duration::from_secs(5), elector.release()).await {
        Ok(Ok(true)) => tracing::info!(%identity, "lease released: a standby leads at its next try"),
        Ok(Ok(false)) => tracing::info!(%identity, "lease no longer ours; nothing to release"),
        Ok(Err(e)) => tracing::warn!(error = %e, "lease not released; a standby leads once it expires"),
        Err(_) => tracing::warn!("lease release timed out; a standby leads once it expires"),
    }
    Ok(())
}
