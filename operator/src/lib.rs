//! The mall operator: `MallDeployment` custom resources become a tuned, observed and
//! alert-autoscaled mall (app + sidecar Deployment, Services, sidecar ConfigMap, HPA, PDB,
//! PrometheusRule, ServiceMonitor).
//!
//! The modules form layers, each using only those above it:
//! - `quantity.rs`: Kubernetes quantities (parse, canonical form);
//! - `crd.rs`: the resource's schema, defaults and CEL rules;
//! - `tuning.rs`: sizes from resources (pure, table-tested); `alerts.rs`: the alert rules;
//!   `sale.rs`: when sale windows are in effect and what they change (pure, at a given time);
//! - `desired.rs`: the children as pure functions of the spec; `budget.rs`: the order in which a
//!   new connection share and replica ceiling take effect (pure);
//! - `validation.rs`: what the API server and the sidecar would refuse, checked offline;
//! - `render.rs`: the offline `operator render`;
//! - `events.rs`, `metrics.rs`, `context.rs`: what reconciles and the webhook share;
//! - `apply.rs`: applying one child (skip when the cache matches, repair a 422);
//!   `token_secret.rs`: the generated `<name>-jwt` Secret (created when missing, never changed);
//! - `status.rs`: conditions, sale and monitoring status (pure);
//! - `rollout.rs`: canary releases (revisions, the canary's objects, the judgement from the
//!   pods' metrics, the release's state machine);
//! - `autoscale.rs`: the Alertmanager webhook; `controller.rs`: reconcile (desired state, status);
//!   `watches.rs`: what triggers a reconcile (each watch with its own backoff, the Prometheus
//!   Operator's kinds only while their CRDs exist);
//! - `verify.rs`: asks Prometheus whether it loaded the rules and scrapes the pods;
//! - `leader.rs`: Lease-based leader election.

/// The User-Agent of every request, so the API server's audit log names the operator.
pub fn user_agent() -> String {
    format!("mall-operator/{}", env!("CARGO_PKG_VERSION"))
}

pub mod alerts;
pub mod apply;
pub mod autoscale;
pub mod budget;
pub mod context;
pub mod controller;
pub mod crd;
pub mod desired;
pub mod events;
pub mod leader;
pub mod metrics;
pub mod quantity;
pub mod render;
pub mod rollout;
pub mod room_counts;
pub mod sale;
pub mod status;
pub mod token_secret;
pub mod tuning;
pub mod validation;
pub mod verify;
pub mod watches;
