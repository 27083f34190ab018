//! What every reconcile and the webhook share: the client, the metrics, the event recorder, the
//! caches of the children (fed by the controller's label-selected watches), whether the
//! Prometheus Operator is installed, the field managers, and the clock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, ListParams};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, store::Writer, ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource};
use serde::de::DeserializeOwned;

use crate::crd::MallDeployment;
use crate::desired;
use crate::events::EventRecorder;
use crate::metrics::Metrics;

/// The field manager of everything the reconciler writes (server-side apply).
pub const MANAGER: &str = "mall-operator";
/// The field manager that keeps a new HPA-mode Deployment's first `spec.replicas` (the floor)
/// once the reconciler stops applying it, until the HPA takes the field over: Kubernetes'
/// documented way of handing a field from one manager to another without it being removed.
pub const HANDOVER_MANAGER: &str = "mall-operator-handover";
/// The field manager of alert-driven scaling (`spec.replicas` in `alerts` mode, the autoscaler's
/// part of the status), so the audit log and `managedFields` say who scaled.
pub const AUTOSCALER_MANAGER: &str = "mall-operator-autoscaler";

pub use crate::user_agent;

/// Unix seconds now.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub fn rfc3339(secs: i64) -> String {
    k8s_openapi::jiff::Timestamp::from_second(secs)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// The Prometheus Operator's CRDs the operator needs before it applies or watches their kinds.
pub const MONITORING_CRDS: [&str; 2] = [
    "prometheusrules.monitoring.coreos.com",
    "servicemonitors.monitoring.coreos.com",
];

/// How often the operator looks for the Prometheus Operator's CRDs (one GET each): they are
/// noticed within this long of being installed.
pub const MONITORING_PROBE: Duration = Duration::from_secs(5);

/// Whether both Prometheus Operator CRDs exist.
pub async fn monitoring_crds_exist(client: &Client) -> bool {
    monitoring_crds_probe(client).await.unwrap_or(false)
}

/// Whether both Prometheus Operator CRDs exist, or the API server's error: an outage says
/// nothing about the CRDs, so the probe loop keeps what it knew.
pub async fn monitoring_crds_probe(client: &Client) -> Result<bool, kube::Error> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in MONITORING_CRDS {
        if crds.get_opt(name).await?.is_none() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Read-only caches of the children, one per kind. A reconcile reads these instead of GETting
/// each child, so a steady-state pass makes no API request at all.
#[derive(Clone)]
pub struct Stores {
    pub deployments: Store<Deployment>,
    pub services: Store<Service>,
    pub config_maps: Store<ConfigMap>,
    pub hpas: Store<HorizontalPodAutoscaler>,
    pub pdbs: Store<PodDisruptionBudget>,
    /// The generated token Secrets, metadata only (`token_secret.rs`).
    pub secrets: Store<PartialObjectMeta<Secret>>,
    pub prometheus_rules: Store<DynamicObject>,
    pub service_monitors: Store<DynamicObject>,
    /// Set once every core cache has listed; every reconcile waits on this (see `ready`).
    ready: Arc<tokio::sync::OnceCell<()>>,
}

/// The writing ends of the stores; the controller's watches (or, in tests, `Context::sync`) feed them.
pub struct Writers {
    pub deployments: Writer<Deployment>,
    pub services: Writer<Service>,
    pub config_maps: Writer<ConfigMap>,
    pub hpas: Writer<HorizontalPodAutoscaler>,
    pub pdbs: Writer<PodDisruptionBudget>,
    pub secrets: Writer<PartialObjectMeta<Secret>>,
    pub prometheus_rules: Writer<DynamicObject>,
    pub service_monitors: Writer<DynamicObject>,
}

impl Stores {
    fn new() -> (Stores, Writers) {
        let (deployments, w_deployments) = reflector::store();
        let (services, w_services) = reflector::store();
        let (config_maps, w_config_maps) = reflector::store();
        let (hpas, w_hpas) = reflector::store();
        let (pdbs, w_pdbs) = reflector::store();
        let (secrets, w_secrets) = reflector::store();
        let w_rules = Writer::new(desired::prometheus_rule_resource());
        let w_monitors = Writer::new(desired::service_monitor_resource());
        let stores = Stores {
            deployments,
            services,
            config_maps,
            hpas,
            pdbs,
            secrets,
            prometheus_rules: w_rules.as_reader(),
            service_monitors: w_monitors.as_reader(),
            ready: Arc::default(),
        };
        let writers = Writers {
            deployments: w_deployments,
            services: w_services,
            config_maps: w_config_maps,
            hpas: w_hpas,
            pdbs: w_pdbs,
            secrets: w_secrets,
            prometheus_rules: w_rules,
            service_monitors: w_monitors,
        };
        (stores, writers)
    }

    /// Waits until the core kinds' caches hold their first full list (a reconcile before that
    /// would take every child for missing). A store's own wait wakes only the task that polled
    /// it last (a oneshot channel underneath): with every mall's first reconcile waiting at once,
    /// all but one slept until their 30 s timeout (seen on a real API server: 2 of 3 malls
    /// reconciled 30 s late after a restart). One task waits on the stores; every reconcile
    /// waits on a cell that wakes them all.
    pub async fn ready(&self) {
        self.ready
            .get_or_init(|| async {
                let _ = self.deployments.wait_until_ready().await;
                let _ = self.services.wait_until_ready().await;
                let _ = self.config_maps.wait_until_ready().await;
                let _ = self.hpas.wait_until_ready().await;
                let _ = self.pdbs.wait_until_ready().await;
                let _ = self.secrets.wait_until_ready().await;
            })
            .await;
    }

    pub fn get<K>(store: &Store<K>, ns: &str, name: &str) -> Option<Arc<K>>
    where
        K: Resource<DynamicType = ()> + Clone + 'static,
    {
        store.get(&ObjectRef::new(name).within(ns))
    }

    pub fn get_dynamic(
        store: &Store<DynamicObject>,
        resource: &ApiResource,
        ns: &str,
        name: &str,
    ) -> Option<Arc<DynamicObject>> {
        store.get(&ObjectRef::new_with(name, resource.clone()).within(ns))
    }
}

/// Shared by every reconcile and the webhook.
pub struct Context {
    pub client: Client,
    pub metrics: Arc<Metrics>,
    pub events: EventRecorder,
    pub stores: Stores,
    /// Taken by `controller::run` to feed the stores from its watches.
    pub writers: Mutex<Option<Writers>>,
    /// Whether the Prometheus Operator's CRDs exist (`controller::run`'s probe keeps it).
    pub monitoring: AtomicBool,
    /// The Prometheus asked whether rules are loaded and pods scraped (`--prometheus-url`).
    pub prometheus: Option<crate::verify::PrometheusCheck>,
    /// Labels put on every PrometheusRule and ServiceMonitor, so the Prometheus selects them
    /// (`--monitoring-labels`, the chart's `monitoring.labels`).
    pub monitoring_labels: std::collections::BTreeMap<String, String>,
    /// Each canary release's window baseline: the pods' counters when the step's window began
    /// (`rollout.rs`), by `namespace/name`, tagged with the revision, step and weight.
    pub rollout_windows: RolloutWindows,
}

pub type RolloutWindows =
    Mutex<std::collections::HashMap<String, (String, std::collections::HashMap<String, crate::rollout::PodSample>)>>;

impl Context {
    pub fn new(client: Client) -> Self {
        let (stores, writers) = Stores::new();
        Context {
            events: EventRecorder::new(client.clone(), MANAGER, std::env::var("POD_NAME").ok()),
            client,
            metrics: Arc::new(Metrics::new()),
            stores,
            writers: Mutex::new(Some(writers)),
            monitoring: AtomicBool::new(false),
            prometheus: None,
            monitoring_labels: Default::default(),
            rollout_windows: Default::default(),
        }
    }

    /// Checks rules and targets in the Prometheus at `url`.
    pub fn with_prometheus(mut self, check: crate::verify::PrometheusCheck) -> Self {
        self.prometheus = Some(check);
        self
    }

    /// Puts `labels` on every PrometheusRule and ServiceMonitor.
    pub fn with_monitoring_labels(mut self, labels: std::collections::BTreeMap<String, String>) -> Self {
        self.monitoring_labels = labels;
        self
    }

    /// Publishes an Event on the MallDeployment (`kubectl describe` shows it). Events are best
    /// effort: a failure is logged, never fails the caller.
    pub async fn event(&self, md: &MallDeployment, warning: bool, reason: &str, note: String) {
        if let Err(e) = self.events.publish(&md.object_ref(&()), warning, reason, &note).await {
            tracing::debug!(error = %e, reason, "event not recorded");
        }
    }

    pub fn monitoring_available(&self) -> bool {
        self.monitoring.load(Ordering::Relaxed)
    }

    /// Fills the caches with one label-selected LIST per kind and sets whether the Prometheus
    /// Operator is installed: what the controller's watches and CRD probe keep current. Tests call it
    /// to stand for a watch that has caught up (the in-memory API has no watch).
    pub async fn sync(&self) -> Result<(), kube::Error> {
        let monitoring = monitoring_crds_exist(&self.client).await;
        self.monitoring.store(monitoring, Ordering::Relaxed);
        let client = &self.client;
        let lp = ListParams::default().labels(&desired::managed_selector());
        let deployments = list::<Deployment>(client, &lp).await?;
        let services = list::<Service>(client, &lp).await?;
        let config_maps = list::<ConfigMap>(client, &lp).await?;
        let hpas = list::<HorizontalPodAutoscaler>(client, &lp).await?;
        let pdbs = list::<PodDisruptionBudget>(client, &lp).await?;
        let secrets = Api::<Secret>::all(client.clone()).list_metadata(&lp).await?.items;
        let (rules, monitors) = if monitoring {
            (
                list_dynamic(client, &desired::prometheus_rule_resource(), &lp).await?,
                list_dynamic(client, &desired::service_monitor_resource(), &lp).await?,
            )
        } else {
            (Vec::new(), Vec::new())
        };
        let mut guard = self.writers.lock().expect("writers lock");
        let w = guard.as_mut().expect("sync after the controller took the writers");
        fill(&mut w.deployments, deployments);
        fill(&mut w.services, services);
        fill(&mut w.config_maps, config_maps);
        fill(&mut w.hpas, hpas);
        fill(&mut w.pdbs, pdbs);
        fill(&mut w.secrets, secrets);
        fill(&mut w.prometheus_rules, rules);
        fill(&mut w.service_monitors, monitors);
        Ok(())
    }
}

async fn list<K>(client: &Client, lp: &ListParams) -> Result<Vec<K>, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    Ok(Api::<K>::all(client.clone()).list(lp).await?.items)
}

async fn list_dynamic(
    client: &Client,
    resource: &ApiResource,
    lp: &ListParams,
) -> Result<Vec<DynamicObject>, kube::Error> {
    Ok(Api::<DynamicObject>::all_with(client.clone(), resource)
        .list(lp)
        .await?
        .items)
}

fn fill<K>(writer: &mut Writer<K>, objects: Vec<K>)
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    writer.apply_watcher_event(&watcher::Event::Init);
    for o in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(o));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
}
