//! The mall operator: `MallDeployment` custom resources become a tuned, observed and
//! alert-autoscaled mall (app + sidecar Deployment, Services, sidecar ConfigMap, HPA, PDB,
//! PrometheusRule, ServiceMonitor).
//!
//! - `crd.rs`: the resource's schema; `tuning.rs`: sizes from resources (pure, table-tested);
//! - `desired.rs`: the children as pure functions of the spec; `alerts.rs`: the alert rules;
//! - `controller.rs`: reconcile (apply + status); `autoscale.rs`: the Alertmanager webhook;
//! - `leader.rs`: Lease-based leader election; `render.rs`: the offline `operator render`.

pub mod alerts;
pub mod autoscale;
pub mod controller;
pub mod crd;
pub mod desired;
pub mod leader;
pub mod metrics;
pub mod render;
pub mod tuning;
