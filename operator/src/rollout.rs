//! Canary releases (`spec.rollout`): a change to the pods runs first in canary pods, which every
//! sidecar sends a share of its requests to, step by step; the operator compares the canary with
//! the stable pods over the same window, from the pods' own metrics, and promotes it, holds it,
//! or rolls it back.
//!
//! - A **revision** is a hash of the pod template the spec renders to without a sale in effect,
//!   so replicas, autoscaling and sale windows never start a release; images, resources, env,
//!   sidecar and cache settings do.
//! - While a release runs, the stable pods stay on the spec of the stable revision
//!   (`status.rollout.stableSpec`), the canary pods (Deployment `<name>-canary`, headless Service
//!   `<name>-can`, ConfigMap `<name>-canary-sidecar`) on the new one. Every sidecar's config gets
//!   `upstream.canary` with the step's weight; that block is left out of the pods' config hash, so
//!   moving the weight rolls no pod (the sidecars reload the file when the kubelet updates it).
//! - A step's window starts once every running sidecar reports the step's weight
//!   (`sidecar_canary_percent`). The judgement uses what every sidecar counted per group in that
//!   window (`sidecar_upstream_requests_total`, `sidecar_upstream_response_seconds`), and the
//!   apps' failed orders by track: the same clients, the same time, two groups.
//! - With a Prometheus (`--prometheus-url`), the split and the window's counts come from it:
//!   `increase()` over the window of the series the mall's ServiceMonitor gives each pod, so an
//!   operator restart keeps the step's window. Without one, or while it does not answer, they
//!   are read directly from each pod's metrics port, as `room_counts.rs` reads them, and kept per
//!   pod: a pod that restarts (its counters back at zero) or appears counts from zero. That
//!   window's baseline lives in the operator's memory; an operator restart, or a fallback from
//!   Prometheus, starts the step's window again.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::api::{Api, ListParams};
use mall_sidecar_config::CanaryGroup;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::crd::{MallDeployment, MallDeploymentSpec, Rollout, RolloutStatus};
use crate::desired::{self, Children};
use crate::room_counts;
use crate::sale::SalePlan;
use crate::tuning;
use crate::verify::PrometheusCheck;

/// The annotation for manual control: `pause`, `promote` or `abort`.
pub const ANNOTATION: &str = "mall.example.com/rollout";
/// The pod label that tells canary pods from stable ones.
pub const TRACK: &str = "mall.example.com/track";

/// How often a release in progress is looked at.
pub const POLL: Duration = Duration::from_secs(5);

/// Phases, as `status.rollout.phase` and the `Rollout` condition's reason say them.
pub mod phase {
    pub const STABLE: &str = "Stable";
    pub const PROGRESSING: &str = "Progressing";
    pub const PAUSED: &str = "Paused";
    pub const PROMOTING: &str = "Promoting";
    pub const ROLLED_BACK: &str = "RolledBack";
}

pub fn canary_name(md: &MallDeployment) -> String {
    format!("{}-canary", desired::name(md))
}

/// The canary's headless Service: `<name>-can` fits the 63 characters of a Service name for every
/// mall name (at most 59).
pub fn canary_service_name(md: &MallDeployment) -> String {
    format!("{}-can", desired::name(md))
}

pub fn canary_config_map_name(md: &MallDeployment) -> String {
    format!("{}-canary-sidecar", desired::name(md))
}

/// The revision `md` renders to: a hash of its pod template without a sale in effect.
pub fn revision(md: &MallDeployment) -> String {
    let tuning = tuning::tune(&md.spec);
    let c = desired::children(md, &tuning, None, &SalePlan::default(), &BTreeMap::new());
    let template = c.deployment.spec.map(|s| s.template).unwrap_or_default();
    let mut hasher = Sha256::new();
    hasher.update(serde_json::to_vec(&template).expect("json"));
    hasher.finalize().iter().take(5).map(|b| format!("{b:02x}")).collect()
}

/// The mall as the stable pods run it: the stable revision's spec, with what leaves the pods
/// alone (replicas, autoscaling, sale windows, the SLO, the rollout itself) from the current spec.
pub fn stable_mall(md: &MallDeployment, stable_spec: &MallDeploymentSpec, stable_revision: &str) -> MallDeployment {
    let mut stable = md.clone();
    let mut spec = stable_spec.clone();
    spec.replicas = md.spec.replicas;
    spec.min_replicas = md.spec.min_replicas;
    spec.autoscaling = md.spec.autoscaling.clone();
    spec.sale_windows = md.spec.sale_windows.clone();
    spec.slo = md.spec.slo.clone();
    spec.paused = md.spec.paused;
    spec.rollout = md.spec.rollout.clone();
    stable.spec = spec;
    if revision(&stable) != stable_revision {
        // One of those fields reaches the pods after all: keep the stable spec whole but its
        // replica counts, so the stable pods stay exactly as they are.
        stable.spec = stable_spec.clone();
        stable.spec.replicas = md
            .spec
            .replicas
            .clamp(stable_spec.min_replicas, stable_spec.max_replicas);
        stable.spec.min_replicas = md.spec.min_replicas.min(stable.spec.replicas);
    }
    stable
}

/// What the manual-control annotation asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Manual {
    None,
    Pause,
    Promote,
    Abort,
}

pub fn manual(md: &MallDeployment) -> Result<Manual, String> {
    match md
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION))
        .map(String::as_str)
    {
        None | Some("") | Some("resume") => Ok(Manual::None),
        Some("pause") => Ok(Manual::Pause),
        Some("promote") => Ok(Manual::Promote),
        Some("abort") => Ok(Manual::Abort),
        Some(other) => Err(format!(
            "annotation {ANNOTATION}: {other:?} is not pause, resume, promote or abort"
        )),
    }
}

/// The canary pods at `weight` % of `replicas` stable pods: at least one, rounded up.
pub fn canary_replicas(replicas: i32, weight: u8) -> i32 {
    ((i64::from(replicas.max(1)) * i64::from(weight) + 99) / 100).max(1) as i32
}

/// The canary's objects: its Deployment, ConfigMap and headless Service, rendered from `md` (the
/// new spec) and told apart from the stable pods by the `track` label.
pub fn canary_children(
    children: Children,
    md: &MallDeployment,
    replicas: i32,
    weight: u8,
) -> (Deployment, ConfigMap, Service) {
    let Children {
        mut deployment,
        mut config_map,
        mut app_service,
        ..
    } = children;
    let stable_config_map = config_map.metadata.name.clone().unwrap_or_default();
    deployment.metadata.name = Some(canary_name(md));
    if let Some(spec) = deployment.spec.as_mut() {
        spec.replicas = Some(replicas);
        spec.selector
            .match_labels
            .get_or_insert_with(Default::default)
            .insert(TRACK.into(), "canary".into());
        let template_meta = spec.template.metadata.get_or_insert_with(Default::default);
        template_meta
            .labels
            .get_or_insert_with(Default::default)
            .insert(TRACK.into(), "canary".into());
        if let Some(pod) = spec.template.spec.as_mut() {
            for volume in pod.volumes.iter_mut().flatten() {
                if let Some(cm) = volume.config_map.as_mut().filter(|cm| cm.name == stable_config_map) {
                    cm.name = canary_config_map_name(md);
                }
            }
        }
    }
    config_map.metadata.name = Some(canary_config_map_name(md));
    set_canary(&mut config_map, md, weight, true);
    app_service.metadata.name = Some(canary_service_name(md));
    if let Some(spec) = app_service.spec.as_mut() {
        spec.selector
            .get_or_insert_with(Default::default)
            .insert(TRACK.into(), "canary".into());
    }
    (deployment, config_map, app_service)
}

/// Writes `upstream.canary` into a rendered sidecar ConfigMap. The pods' config hash was taken
/// without it, so this changes the file the sidecars reload and rolls no pod.
pub fn set_canary(config_map: &mut ConfigMap, md: &MallDeployment, weight: u8, own_app_is_canary: bool) {
    let Some(text) = config_map
        .data
        .as_mut()
        .and_then(|d| d.get_mut(desired::SIDECAR_CONFIG_KEY))
    else {
        return;
    };
    let Ok(mut config) = mall_sidecar_config::SidecarConfig::from_toml(text) else {
        return;
    };
    config.upstream.canary = Some(CanaryGroup {
        dns_name: format!(
            "{}.{}.svc.cluster.local",
            canary_service_name(md),
            desired::namespace(md)
        ),
        percent: weight,
        own_app_is_canary,
    });
    *text = config.to_toml();
}

/// What one pod's metrics said.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodSample {
    pub canary_pod: bool,
    /// The weight its sidecar balances with (`sidecar_canary_percent`); `None` when unread.
    pub percent: Option<u8>,
    /// Instances its sidecar has in the canary group (`sidecar_canary_instances`). Until its
    /// lookup of the canary's name finds them, it counts their answers as stable.
    pub canary_instances: u32,
    /// What its sidecar counted per group of the instance that answered.
    pub stable: Group,
    pub canary: Group,
    /// Orders its app placed and failed (`POST /api/orders` answered 5xx).
    pub orders: f64,
    pub orders_failed: f64,
}

/// Counts for one group, as cumulative counters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Group {
    pub requests: f64,
    pub failed: f64,
    /// The response-time histogram's cumulative buckets, by upper bound in seconds.
    pub buckets: Vec<(f64, f64)>,
    pub orders: f64,
    pub orders_failed: f64,
}

impl Group {
    fn add(&mut self, other: &Group) {
        self.requests += other.requests;
        self.failed += other.failed;
        self.orders += other.orders;
        self.orders_failed += other.orders_failed;
        for (le, n) in &other.buckets {
            match self.buckets.iter_mut().find(|(l, _)| l == le) {
                Some((_, m)) => *m += n,
                None => self.buckets.push((*le, *n)),
            }
        }
        self.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }

    /// `self - base`, or `self` when a counter went backwards (the pod restarted).
    fn since(&self, base: &Group) -> Group {
        let restarted = self.requests < base.requests || self.orders < base.orders;
        if restarted {
            return self.clone();
        }
        Group {
            requests: self.requests - base.requests,
            failed: (self.failed - base.failed).max(0.0),
            orders: self.orders - base.orders,
            orders_failed: (self.orders_failed - base.orders_failed).max(0.0),
            buckets: self
                .buckets
                .iter()
                .map(|(le, n)| {
                    let before = base.buckets.iter().find(|(l, _)| l == le).map_or(0.0, |(_, m)| *m);
                    (*le, (n - before).max(0.0))
                })
                .collect(),
        }
    }

    pub fn error_ratio(&self) -> f64 {
        if self.requests > 0.0 {
            self.failed / self.requests
        } else {
            0.0
        }
    }

    pub fn order_failure_ratio(&self) -> f64 {
        if self.orders > 0.0 {
            self.orders_failed / self.orders
        } else {
            0.0
        }
    }

    /// The 99th percentile in milliseconds, interpolated within its bucket as Prometheus'
    /// `histogram_quantile` does; `None` without requests.
    pub fn p99_ms(&self) -> Option<f64> {
        let total = self.buckets.last().map(|(_, n)| *n)?;
        if total <= 0.0 {
            return None;
        }
        let rank = 0.99 * total;
        let mut lower = (0.0, 0.0);
        for (le, n) in &self.buckets {
            if *n >= rank {
                if le.is_infinite() {
                    return Some(lower.0 * 1000.0);
                }
                let within = if n - lower.1 > 0.0 {
                    (rank - lower.1) / (n - lower.1)
                } else {
                    1.0
                };
                return Some((lower.0 + (le - lower.0) * within) * 1000.0);
            }
            lower = (*le, *n);
        }
        Some(lower.0 * 1000.0)
    }
}

/// The two groups over one window, summed over the pods.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Window {
    pub stable: Group,
    pub canary: Group,
}

/// Sums the pods' counts since `base` (per pod; a pod absent from `base` counts from zero).
pub fn window(now: &HashMap<String, PodSample>, base: &HashMap<String, PodSample>) -> Window {
    let mut w = Window::default();
    for (pod, sample) in now {
        let empty = PodSample::default();
        let before = base.get(pod).unwrap_or(&empty);
        w.stable.add(&sample.stable.since(&before.stable));
        w.canary.add(&sample.canary.since(&before.canary));
        let orders = Group {
            orders: sample.orders,
            orders_failed: sample.orders_failed,
            ..Group::default()
        }
        .since(&Group {
            orders: before.orders,
            orders_failed: before.orders_failed,
            ..Group::default()
        });
        let track = if sample.canary_pod {
            &mut w.canary
        } else {
            &mut w.stable
        };
        track.orders += orders.orders;
        track.orders_failed += orders.orders_failed;
    }
    w
}

/// The verdict on a window.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Worse than allowed: roll back, saying why.
    Fail(String),
    /// Within every threshold so far.
    Pass(String),
    /// Too few canary requests to judge.
    TooFew(String),
}

/// Compares the canary with the stable pods over `w`.
pub fn judge(rollout: &Rollout, w: &Window) -> Verdict {
    let t = &rollout.thresholds;
    let (c, s) = (&w.canary, &w.stable);
    let pct = |x: f64| format!("{:.1} %", x * 100.0);
    if c.requests < f64::from(t.min_requests) {
        return Verdict::TooFew(format!(
            "canary answered {} of the {} requests needed to judge",
            c.requests, t.min_requests
        ));
    }
    let mut measured = Vec::new();
    let (ce, se) = (c.error_ratio(), s.error_ratio());
    if ce - se > t.max_error_ratio_increase {
        return Verdict::Fail(format!(
            "failed requests: canary {} of {}, stable {} of {}; allowed stable + {}",
            pct(ce),
            c.requests,
            pct(se),
            s.requests,
            pct(t.max_error_ratio_increase)
        ));
    }
    measured.push(format!("failed requests canary {} / stable {}", pct(ce), pct(se)));
    // With the stable pods idle (a 100 % step) there is nothing to compare latency with.
    if let (Some(cp), Some(sp)) = (
        c.p99_ms(),
        s.p99_ms().filter(|_| s.requests >= f64::from(t.min_requests)),
    ) {
        if cp - sp > f64::from(t.max_p99_increase_ms) {
            return Verdict::Fail(format!(
                "p99 response time: canary {cp:.0} ms, stable {sp:.0} ms; allowed stable + {} ms",
                t.max_p99_increase_ms
            ));
        }
        measured.push(format!("p99 canary {cp:.0} ms / stable {sp:.0} ms"));
    }
    if c.orders > 0.0 {
        let (co, so) = (c.order_failure_ratio(), s.order_failure_ratio());
        if co - so > t.max_order_failure_ratio_increase {
            return Verdict::Fail(format!(
                "failed orders: canary {} of {}, stable {} of {}; allowed stable + {}",
                pct(co),
                c.orders,
                pct(so),
                s.orders,
                pct(t.max_order_failure_ratio_increase)
            ));
        }
        measured.push(format!("failed orders canary {} / stable {}", pct(co), pct(so)));
    }
    Verdict::Pass(format!(
        "{}; canary answered {} requests, stable {}",
        measured.join(", "),
        c.requests,
        s.requests
    ))
}

/// The mall's pods (the stable and the canary ones): `None` when they cannot be listed.
pub async fn list_pods(client: &kube::Client, md: &MallDeployment) -> Option<Vec<Pod>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &desired::namespace(md));
    match pods
        .list(&ListParams::default().labels(&desired::selector_string(md)))
        .await
    {
        Ok(list) => Some(list.items),
        Err(e) => {
            tracing::warn!(name = %desired::name(md), error = %e, "cannot list the mall's pods to judge the canary");
            None
        }
    }
}

/// Whether `pod` is a canary's.
fn is_canary_pod(pod: &Pod) -> bool {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(TRACK))
        .is_some_and(|t| t == "canary")
}

/// Whether any pod of a canary is left (terminating ones included), or the pods cannot be listed.
pub async fn canary_pods_left(client: &kube::Client, md: &MallDeployment) -> bool {
    list_pods(client, md)
        .await
        .is_none_or(|pods| pods.iter().any(is_canary_pod))
}

/// Reads every running pod's sidecar and app metrics, by pod.
pub async fn sample_pods(pods: &[Pod]) -> HashMap<String, PodSample> {
    let reads = pods.iter().filter_map(|pod| {
        let admin = room_counts::admin_address(pod)?;
        let app = room_counts::port_address(pod, "app");
        let key = pod.metadata.uid.clone().or_else(|| pod.metadata.name.clone())?;
        let canary_pod = is_canary_pod(pod);
        Some(async move {
            let sidecar = room_counts::scrape(admin).await;
            let app = match app {
                Some(app) => room_counts::scrape(app).await,
                None => Err("no container port named app".to_string()),
            };
            let mut sample = PodSample {
                canary_pod,
                ..PodSample::default()
            };
            match sidecar {
                Ok(text) => read_sidecar(&text, &mut sample),
                Err(e) => tracing::info!(%admin, error = %e, "a pod's sidecar metrics could not be read"),
            }
            if let Ok(text) = app {
                read_app(&text, &mut sample);
            }
            (key, sample)
        })
    });
    futures_util::future::join_all(reads).await.into_iter().collect()
}

/// One Prometheus text-format sample: name, labels, value.
pub fn samples(text: &str) -> impl Iterator<Item = (&str, Vec<(&str, String)>, f64)> {
    text.lines().filter(|l| !l.starts_with('#')).filter_map(|line| {
        let (name_labels, value) = line.rsplit_once(' ')?;
        let value: f64 = value.trim().parse().ok()?;
        let (name, labels) = match name_labels.split_once('{') {
            None => (name_labels.trim(), Vec::new()),
            Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}')?)?),
        };
        Some((name, labels, value))
    })
}

/// `a="x",b="y\"z"`, with the text format's escapes.
fn parse_labels(mut s: &str) -> Option<Vec<(&str, String)>> {
    let mut out = Vec::new();
    while !s.is_empty() {
        let (key, rest) = s.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        out.push((key.trim_start_matches(',').trim(), value));
        s = rest[end + 1..].trim_start_matches(',');
    }
    Some(out)
}

/// The value of label `key`.
pub fn label<'a>(labels: &'a [(&str, String)], key: &str) -> Option<&'a str> {
    labels.iter().find(|(k, _)| *k == key).map(|(_, v)| v.as_str())
}

/// The sidecar's split and per-group counts.
pub fn read_sidecar(text: &str, sample: &mut PodSample) {
    sample.percent = Some(0);
    for (name, labels, value) in samples(text) {
        count_sidecar(sample, name, &labels, value);
    }
    sort_buckets(sample);
}

/// Adds one sample of the sidecar's metrics to `sample`.
fn count_sidecar(sample: &mut PodSample, name: &str, labels: &[(&str, String)], value: f64) {
    let group = match label(labels, "group") {
        Some("canary") => &mut sample.canary,
        _ => &mut sample.stable,
    };
    match name {
        "sidecar_canary_percent" => sample.percent = Some(value.clamp(0.0, 100.0) as u8),
        "sidecar_canary_instances" => sample.canary_instances = value.max(0.0) as u32,
        "sidecar_upstream_requests_total" => {
            group.requests += value;
            if matches!(label(labels, "status_class"), Some("5xx" | "error")) {
                group.failed += value;
            }
        }
        "sidecar_upstream_response_seconds_bucket" => {
            let Some(le) = label(labels, "le").and_then(|l| l.parse::<f64>().ok()) else {
                return;
            };
            match group.buckets.iter_mut().find(|(l, _)| *l == le) {
                Some((_, n)) => *n += value,
                None => group.buckets.push((le, value)),
            }
        }
        _ => {}
    }
}

fn sort_buckets(sample: &mut PodSample) {
    for g in [&mut sample.stable, &mut sample.canary] {
        g.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
}

/// The app's orders: `POST /api/orders` answers, and those that were 5xx.
pub fn read_app(text: &str, sample: &mut PodSample) {
    for (name, labels, value) in samples(text) {
        count_app(sample, name, &labels, value);
    }
}

/// Adds one sample of the app's metrics to `sample`.
fn count_app(sample: &mut PodSample, name: &str, labels: &[(&str, String)], value: f64) {
    if name != "http_requests_total"
        || label(labels, "method") != Some("POST")
        || label(labels, "route") != Some("/api/orders")
    {
        return;
    }
    sample.orders += value;
    if label(labels, "status").is_some_and(|s| s.starts_with('5')) {
        sample.orders_failed += value;
    }
}

/// The series the mall's ServiceMonitor gives each pod: `namespace`, `service` (the mall), `pod`,
/// and `track` from the pod's label.
fn prometheus_selector(md: &MallDeployment) -> String {
    format!(
        "namespace=\"{}\",service=\"{}\"",
        desired::namespace(md),
        desired::name(md)
    )
}

/// Each running pod's split as Prometheus last scraped it (`sidecar_canary_percent`,
/// `sidecar_canary_instances`), for an operator given one (`--prometheus-url`). A running pod it
/// has no series of yet counts as one without the split (0 %). What it holds is up to one scrape
/// interval old.
pub async fn prometheus_split(
    prometheus: &PrometheusCheck,
    md: &MallDeployment,
    pods: &[Pod],
    now: i64,
) -> Result<HashMap<String, PodSample>, String> {
    let sel = prometheus_selector(md);
    // Each pass's queries go together: a slow Prometheus costs one timeout, not one per query.
    let split = ["sidecar_canary_percent", "sidecar_canary_instances"];
    let promqls = split.map(|metric| format!("{metric}{{{sel}}}"));
    let answers = futures_util::future::try_join_all(promqls.iter().map(|q| prometheus.query(q, now))).await?;
    let mut per_pod: HashMap<String, PodSample> = HashMap::new();
    for (metric, answer) in split.into_iter().zip(answers) {
        for (labels, value) in answer {
            if let Some(pod) = labels.get("pod") {
                let sample = per_pod.entry(pod.clone()).or_default();
                count_sidecar(sample, metric, &pairs(&labels), value);
            }
        }
    }
    let running: Vec<String> = pods
        .iter()
        .filter(|p| room_counts::admin_address(p).is_some())
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    if !running.is_empty() && !running.iter().any(|name| per_pod.contains_key(name)) {
        // Not "every sidecar without the split": this Prometheus does not scrape the mall.
        return Err(format!(
            "it has no sidecar_canary_percent series of this mall's pods ({sel}): does it select the mall's ServiceMonitor?"
        ));
    }
    Ok(running
        .into_iter()
        .map(|name| {
            let sample = per_pod.remove(&name).unwrap_or_default();
            let percent = Some(sample.percent.unwrap_or(0));
            (name, PodSample { percent, ..sample })
        })
        .collect())
}

/// Each running pod's split (and, read from the pods, their counts): from Prometheus when the
/// operator has one and it answers, else from the pods' metrics ports; with where it came from,
/// and whether that was Prometheus.
async fn read_split(
    prometheus: Option<&PrometheusCheck>,
    md: &MallDeployment,
    pods: &[Pod],
    now: i64,
) -> (HashMap<String, PodSample>, String, bool) {
    let mut source = "the pods' metrics".to_string();
    if let Some(p) = prometheus {
        match prometheus_split(p, md, pods, now).await {
            Ok(split) => return (split, format!("Prometheus at {}", p.url()), true),
            Err(e) => {
                tracing::warn!(name = %desired::name(md), error = %e, "Prometheus cannot judge the canary; reading the pods");
                source = format!("the pods' metrics, as Prometheus at {} did not answer ({e})", p.url());
            }
        }
    }
    (sample_pods(pods).await, source, false)
}

/// The window's counts from Prometheus: `increase()` from `since` to `now` (Unix seconds), so a
/// pod that restarted or appeared counts as Prometheus counts it.
pub async fn prometheus_window(
    prometheus: &PrometheusCheck,
    md: &MallDeployment,
    since: i64,
    now: i64,
) -> Result<Window, String> {
    let sel = prometheus_selector(md);
    let range = format!("[{}s]", (now - since).max(1));
    let queries = [
        (
            "sidecar_upstream_requests_total",
            format!("sum by (group, status_class) (increase(sidecar_upstream_requests_total{{{sel}}}{range}))"),
        ),
        (
            "sidecar_upstream_response_seconds_bucket",
            format!("sum by (group, le) (increase(sidecar_upstream_response_seconds_bucket{{{sel}}}{range}))"),
        ),
        (
            "http_requests_total",
            format!(
                "sum by (track, method, route, status) \
                 (increase(http_requests_total{{{sel},method=\"POST\",route=\"/api/orders\"}}{range}))"
            ),
        ),
    ];
    let answers =
        futures_util::future::try_join_all(queries.iter().map(|(_, promql)| prometheus.query(promql, now))).await?;
    let (mut stable, mut canary) = (PodSample::default(), PodSample::default());
    canary.canary_pod = true;
    for ((metric, _), answer) in queries.into_iter().zip(answers) {
        for (labels, value) in answer {
            let labels = pairs(&labels);
            if metric == "http_requests_total" {
                let track = if label(&labels, "track") == Some("canary") {
                    &mut canary
                } else {
                    &mut stable
                };
                count_app(track, metric, &labels, value);
            } else {
                count_sidecar(&mut stable, metric, &labels, value);
            }
        }
    }
    sort_buckets(&mut stable);
    let now = HashMap::from([("stable".to_string(), stable), ("canary".to_string(), canary)]);
    Ok(window(&now, &HashMap::new()))
}

fn pairs(labels: &BTreeMap<String, String>) -> Vec<(&str, String)> {
    labels.iter().map(|(k, v)| (k.as_str(), v.clone())).collect()
}

/// Whether every pod whose sidecar answered balances with `weight` and has found the canary's
/// instances, and how many have not. (A sidecar that has the weight but has not looked the
/// canary's name up again would count the canary's answers as stable for up to a refresh.)
pub fn split_reached(samples: &HashMap<String, PodSample>, weight: u8) -> (bool, usize) {
    let behind = samples
        .values()
        .filter(|s| s.percent.is_some_and(|p| p != weight || s.canary_instances == 0))
        .count();
    (behind == 0, behind)
}

/// The stable spec kept in status, read back.
pub fn stored_spec(status: &RolloutStatus) -> Option<MallDeploymentSpec> {
    let mut de = serde_json::Deserializer::from_str(&status.stable_spec);
    MallDeploymentSpec::deserialize(&mut de).ok()
}

/// What a pass decided, for the controller to apply.
#[derive(Debug, Clone)]
pub struct Plan {
    pub status: RolloutStatus,
    /// Render the stable children from this mall instead of the spec's.
    pub stable: Option<MallDeployment>,
    /// The canary at this weight; `None`: no canary objects (deleted where they exist).
    pub canary_weight: Option<u8>,
    /// The weight written into the stable pods' sidecar config; 0 leaves `upstream.canary` out.
    pub stable_weight: u8,
    /// With a canary: whether its Deployment runs yet (not until every sidecar took the split).
    pub canary_pods: bool,
    /// A finished release's canary pods still run: the stable sidecars keep their group at 0 %
    /// and the canary's Service stays (set by the controller, which sees the Service).
    pub drain_canary: bool,
    /// Events to publish: warning, reason, note.
    pub events: Vec<(bool, &'static str, String)>,
    /// `promote` or `abort` was acted on: remove the annotation.
    pub clear_annotation: bool,
    /// A release ended: `promoted`, `rolled_back` or `aborted`.
    pub finished: Option<&'static str>,
    /// Look again this soon.
    pub requeue: Option<Duration>,
}

impl Plan {
    fn new(status: RolloutStatus) -> Self {
        Plan {
            status,
            stable: None,
            canary_weight: None,
            stable_weight: 0,
            canary_pods: true,
            drain_canary: false,
            events: Vec::new(),
            clear_annotation: false,
            finished: None,
            requeue: None,
        }
    }
}

/// What the controller knows of the live Deployments and the pods, for one pass.
pub struct Live<'a> {
    pub stable: Option<&'a Deployment>,
    pub canary: Option<&'a Deployment>,
}

/// The annotation on each Deployment naming the revision it was rendered from.
pub const REVISION: &str = "mall.example.com/revision";

/// Whether `d` was rendered from `revision` and every pod it wants is updated and ready, with
/// its ready and wanted pods (`want` when it does not exist yet).
pub fn rolled_out(d: Option<&Deployment>, revision: &str, want: i32) -> (bool, i32, i32) {
    let Some(d) = d else { return (false, 0, want) };
    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(want);
    let status = d.status.clone().unwrap_or_default();
    let ours = d
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REVISION))
        .map(String::as_str)
        == Some(revision);
    let seen = d.metadata.generation.is_some() && d.metadata.generation == status.observed_generation;
    // Ready pods of this template: until the Deployment controller has seen the template, none
    // of its ready pods is known to run it.
    let ready = match ours && seen {
        true => status
            .ready_replicas
            .unwrap_or(0)
            .min(status.updated_replicas.unwrap_or(0)),
        false => 0,
    };
    let done = ours
        && seen
        && ready >= want
        && status.updated_replicas.unwrap_or(0) >= want
        && status.replicas.unwrap_or(0) <= want;
    (done, ready, want)
}

/// One pass of the release state machine for `md` with `rollout`, at `now` (Unix seconds).
/// `windows` keeps each mall's window baseline between passes.
#[allow(clippy::too_many_arguments)]
pub async fn step(
    client: &kube::Client,
    windows: &crate::context::RolloutWindows,
    prometheus: Option<&PrometheusCheck>,
    md: &MallDeployment,
    rollout: &Rollout,
    old: Option<&RolloutStatus>,
    live: Live<'_>,
    now: i64,
) -> Plan {
    let rev = revision(md);
    let mut st = old.cloned().unwrap_or_default();
    let key = format!("{}/{}", desired::namespace(md), desired::name(md));
    let stored = stored_spec(&st);
    let Some(stored) = stored.filter(|_| !st.stable_revision.is_empty()) else {
        // The first look with spec.rollout: the pods run the spec as it is.
        let status = RolloutStatus {
            phase: phase::STABLE.into(),
            stable_revision: rev.clone(),
            stable_spec: serde_json::to_string(&md.spec).expect("json"),
            message: format!("every pod runs revision {rev}"),
            ..RolloutStatus::default()
        };
        return Plan::new(status);
    };
    let in_release = matches!(st.phase.as_str(), phase::PROGRESSING | phase::PAUSED | phase::PROMOTING)
        && !st.canary_revision.is_empty();
    if rev == st.stable_revision {
        let mut plan = Plan::new(st.clone());
        if in_release {
            plan.events.push((
                false,
                "CanaryCancelled",
                format!("the spec is back at the stable revision {rev}: the canary is removed"),
            ));
            plan.finished = Some("cancelled");
        }
        plan.status = RolloutStatus {
            phase: phase::STABLE.into(),
            stable_revision: rev.clone(),
            // What leaves the pods alone stays current in the kept spec.
            stable_spec: serde_json::to_string(&md.spec).expect("json"),
            // A release cancelled by reverting the spec is the last release, not a rolled back one.
            failed_revision: if in_release {
                String::new()
            } else {
                st.failed_revision.clone()
            },
            message: match st.failed_revision.as_str() {
                failed if !failed.is_empty() && !in_release => {
                    format!("every pod runs revision {rev}; the last release, {failed}, was rolled back")
                }
                _ => format!("every pod runs revision {rev}"),
            },
            ..RolloutStatus::default()
        };
        windows.lock().expect("windows lock").remove(&key);
        return plan;
    }
    let stable_md = stable_mall(md, &stored, &st.stable_revision);
    let mut manual_error = None;
    let manual = manual(md).unwrap_or_else(|e| {
        manual_error = Some(e);
        Manual::None
    });
    if st.failed_revision == rev && !in_release {
        let mut plan = Plan::new(st);
        plan.status.phase = phase::ROLLED_BACK.into();
        plan.stable = Some(stable_md);
        return plan;
    }
    let mut events = Vec::new();
    if !in_release || st.canary_revision != rev {
        if in_release {
            events.push((
                false,
                "CanaryReplaced",
                format!(
                    "the spec changed during the release of {}: revision {rev} starts over",
                    st.canary_revision
                ),
            ));
        }
        let first = &rollout.steps[0];
        st.canary_revision = rev.clone();
        st.step = 1;
        st.weight = first.weight;
        st.canary_since_unix = now;
        st.window_since_unix = 0;
        st.phase = phase::PROGRESSING.into();
        st.message = format!("revision {rev} starts as a canary at {} %", first.weight);
        events.push((
            false,
            "CanaryStarted",
            format!(
                "revision {rev} starts as a canary at {} % of the requests; the stable pods run {}",
                first.weight, st.stable_revision
            ),
        ));
        windows.lock().expect("windows lock").remove(&key);
    }
    // `spec.rollout` is no part of the revision: steps edited during a release apply to it. A
    // step beyond the new list, or whose weight changed, is the list's nearest step, watched
    // from the start.
    let at_step = (st.step as usize).clamp(1, rollout.steps.len());
    if at_step != st.step as usize || rollout.steps[at_step - 1].weight != st.weight {
        st.step = at_step as u32;
        st.weight = rollout.steps[at_step - 1].weight;
        st.window_since_unix = 0;
    }
    let mut plan = Plan::new(st.clone());
    plan.events = events;
    plan.requeue = Some(POLL);
    plan.stable = Some(stable_md.clone());
    plan.canary_weight = Some(st.weight);
    plan.stable_weight = st.weight;

    let rollback = |mut plan: Plan, st: &RolloutStatus, why: String, outcome: &'static str| {
        let message = format!(
            "revision {rev} rolled back at step {} ({} %): {why}; the stable pods run {}",
            st.step, st.weight, st.stable_revision
        );
        plan.events.push((true, "RolledBack", message.clone()));
        plan.status = RolloutStatus {
            phase: phase::ROLLED_BACK.into(),
            stable_revision: st.stable_revision.clone(),
            stable_spec: st.stable_spec.clone(),
            failed_revision: rev.clone(),
            message,
            ..RolloutStatus::default()
        };
        plan.canary_weight = None;
        plan.stable_weight = 0;
        plan.finished = Some(outcome);
        plan.requeue = None;
        windows.lock().expect("windows lock").remove(&key);
        plan
    };

    if st.phase == phase::PROMOTING {
        // The stable pods take the new revision; the canary serves until they have.
        plan.stable = None;
        plan.stable_weight = 0;
        let (done, ready, want) = rolled_out(live.stable, &rev, md.spec.replicas);
        if done {
            let message = format!("revision {rev} promoted: every pod runs it");
            plan.events.push((false, "Promoted", message.clone()));
            plan.status = RolloutStatus {
                phase: phase::STABLE.into(),
                stable_revision: rev.clone(),
                stable_spec: serde_json::to_string(&md.spec).expect("json"),
                // History now: the spec has moved past it (reapplied later, it starts a release).
                failed_revision: String::new(),
                message,
                ..RolloutStatus::default()
            };
            plan.canary_weight = None;
            plan.finished = Some("promoted");
            plan.requeue = None;
            windows.lock().expect("windows lock").remove(&key);
        } else {
            plan.status.message = format!("promoting revision {rev}: {ready} of {want} stable pods ready on it");
        }
        return plan;
    }

    match manual {
        Manual::Abort => {
            plan.clear_annotation = true;
            return rollback(
                plan,
                &st,
                format!("aborted by the annotation {ANNOTATION}=abort"),
                "aborted",
            );
        }
        Manual::Promote => {
            plan.clear_annotation = true;
            plan.status.phase = phase::PROMOTING.into();
            plan.status.message = format!("promoting revision {rev} (annotation {ANNOTATION}=promote)");
            plan.events
                .push((false, "PromotedManually", plan.status.message.clone()));
            plan.stable = None;
            plan.stable_weight = 0;
            return plan;
        }
        Manual::Pause => plan.status.phase = phase::PAUSED.into(),
        Manual::None => plan.status.phase = phase::PROGRESSING.into(),
    }
    let paused = manual == Manual::Pause;
    let note = manual_error.map(|e| format!(" ({e})")).unwrap_or_default();

    // Where the release stands, at the head of every message of this pass.
    let at = format!("step {} of {} ({} %)", st.step, rollout.steps.len(), st.weight);
    // Before its pods start, the split must have reached every sidecar's config: a canary pod
    // is under the app's name as soon as it runs, and a sidecar still without `upstream.canary`
    // would take it for one more stable instance and send it that share, unjudged (a ConfigMap
    // reaches a pod's file a minute or more after it changed).
    if live.canary.is_none() {
        let since = match st.canary_since_unix {
            0 => now,
            t => t,
        };
        plan.status.canary_since_unix = since;
        plan.canary_pods = false;
        let Some(pods) = list_pods(client, md).await else {
            plan.status.message =
                format!("{at}: the mall's pods cannot be listed to see whether their sidecars took the split");
            return plan;
        };
        let (split, source, _) = read_split(prometheus, md, &pods, now).await;
        // A sidecar that could not be read is no evidence that it took the split.
        let behind = split.values().filter(|s| s.percent != Some(st.weight)).count();
        if behind > 0 {
            let waited = now - since;
            if waited >= i64::from(rollout.ready_timeout_seconds) {
                return rollback(
                    plan,
                    &st,
                    format!(
                        "{behind} sidecars did not take the split of {} % within readyTimeoutSeconds ({}), so the canary pods never started (read from {source})",
                        st.weight, rollout.ready_timeout_seconds
                    ),
                    "rolled_back",
                );
            }
            plan.status.window_since_unix = 0;
            plan.status.message = format!(
                "{at}: waiting for {behind} sidecars to take the split before the canary pods start, {waited} of {} s (read from {source}){note}",
                rollout.ready_timeout_seconds
            );
            return plan;
        }
        // readyTimeoutSeconds keeps running: it bounds the split's arrival and the pods' start
        // together, so a Deployment that cannot be created is rolled back too.
        plan.canary_pods = true;
    }

    // The canary's pods: all of them ready, or rolled back once the timeout is up.
    let stable_replicas = live
        .stable
        .and_then(|d| d.spec.as_ref()?.replicas)
        .unwrap_or(md.spec.replicas);
    let (ready, ready_count, want) = rolled_out(live.canary, &rev, canary_replicas(stable_replicas, st.weight));
    if !ready {
        // Waited for from the pods' start, and again from the moment a ready canary lost a pod
        // (an eviction, a crash, its Deployment deleted by hand, a step that needs one more): a
        // node drain mid-release is not a bad change.
        if plan.status.canary_since_unix == 0 {
            plan.status.canary_since_unix = now;
        }
        let waited = now - plan.status.canary_since_unix;
        if waited >= i64::from(rollout.ready_timeout_seconds) {
            return rollback(
                plan,
                &st,
                format!(
                    "{ready_count} of {want} canary pods ready after {waited} s of waiting (readyTimeoutSeconds {})",
                    rollout.ready_timeout_seconds
                ),
                "rolled_back",
            );
        }
        plan.status.window_since_unix = 0;
        plan.status.message = format!(
            "{at}: waiting for the canary pods, {ready_count} of {want} ready after {waited} of {} s{note}",
            rollout.ready_timeout_seconds
        );
        return plan;
    }
    plan.status.canary_since_unix = 0;
    let Some(pods) = list_pods(client, md).await else {
        plan.status.message = format!("{at}: the mall's pods cannot be listed to read their metrics");
        return plan;
    };
    let (split, source, from_prometheus) = read_split(prometheus, md, &pods, now).await;
    let (_, behind) = split_reached(&split, st.weight);
    if behind > 0 {
        plan.status.window_since_unix = 0;
        plan.status.message = format!(
            "{at}: waiting for {behind} sidecars to balance with the step's weight and find the canary (read from {source}){note}"
        );
        return plan;
    }
    let measured = match (from_prometheus, prometheus) {
        (true, Some(p)) if st.window_since_unix > 0 => {
            match prometheus_window(p, md, st.window_since_unix, now).await {
                Ok(w) => Some(w),
                Err(e) => {
                    plan.status.message = format!(
                        "{at}: Prometheus at {} did not answer ({e}); judged again on the next pass{note}",
                        p.url()
                    );
                    return plan;
                }
            }
        }
        (true, _) => None,
        // Read from the pods: counted from the baseline taken when the window started (a
        // fallback from Prometheus starts a new one).
        (false, _) => {
            // Tagged with the window's start, so a baseline from an earlier window of the same
            // step (before a fallback to Prometheus and back) is never reused.
            let tag = |since: i64| format!("{rev}/{}/{}/{since}", st.step, st.weight);
            let mut w = windows.lock().expect("windows lock");
            match w.get(&key) {
                Some((t, base)) if st.window_since_unix > 0 && *t == tag(st.window_since_unix) => {
                    Some(window(&split, base))
                }
                _ => {
                    w.insert(key.clone(), (tag(now), split));
                    None
                }
            }
        }
    };
    let Some(measured) = measured else {
        plan.status.window_since_unix = now;
        plan.status.message = format!(
            "{at}: watching from now for {} s (read from {source}){note}",
            rollout.steps[st.step as usize - 1].watch_seconds
        );
        return plan;
    };
    let verdict = judge(rollout, &measured);
    let watched = now - st.window_since_unix;
    let watch = i64::from(rollout.steps[st.step as usize - 1].watch_seconds);
    match verdict {
        Verdict::Fail(why) => rollback(plan, &st, format!("{why} (read from {source})"), "rolled_back"),
        Verdict::Pass(m) if watched >= watch && !paused => {
            let passed = format!(
                "step {} ({} %) passed after {watched} s: {m} (read from {source})",
                st.step, st.weight
            );
            if (st.step as usize) < rollout.steps.len() {
                let next = &rollout.steps[st.step as usize];
                plan.status.step = st.step + 1;
                plan.status.weight = next.weight;
                plan.status.window_since_unix = 0;
                plan.status.message = format!("{passed}; now {} %", next.weight);
                plan.canary_weight = Some(next.weight);
                plan.stable_weight = next.weight;
                plan.events
                    .push((false, "CanaryStepPassed", plan.status.message.clone()));
            } else {
                plan.status.phase = phase::PROMOTING.into();
                plan.status.message = format!("{passed}; promoting revision {rev} to every pod");
                plan.events.push((false, "CanaryPassed", plan.status.message.clone()));
                plan.stable = None;
                plan.stable_weight = 0;
            }
            plan
        }
        Verdict::Pass(m) | Verdict::TooFew(m) => {
            plan.status.message = format!(
                "{at}: {watched} of {watch} s watched{}; {m} (read from {source}){note}",
                if paused { ", paused by the annotation" } else { "" }
            );
            plan
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(requests: f64, failed: f64, buckets: &[(f64, f64)]) -> Group {
        Group {
            requests,
            failed,
            buckets: buckets.to_vec(),
            ..Group::default()
        }
    }

    #[test]
    fn p99_interpolates_within_its_bucket_as_histogram_quantile_does() {
        let g = group(
            100.0,
            0.0,
            &[(0.005, 50.0), (0.01, 98.0), (0.05, 100.0), (f64::INFINITY, 100.0)],
        );
        // rank 99: one of the two in (0.01, 0.05] -> 0.01 + 0.04 / 2.
        assert!((g.p99_ms().unwrap() - 30.0).abs() < 1e-9);
        assert_eq!(Group::default().p99_ms(), None);
        let slow = group(10.0, 0.0, &[(0.05, 0.0), (f64::INFINITY, 10.0)]);
        assert_eq!(slow.p99_ms(), Some(50.0));
    }

    #[test]
    fn a_window_counts_per_pod_and_a_restarted_pod_from_zero() {
        let pod = |requests: f64, failed: f64| PodSample {
            percent: Some(10),
            canary: group(requests, failed, &[(f64::INFINITY, requests)]),
            ..PodSample::default()
        };
        let base = HashMap::from([("a".to_string(), pod(100.0, 1.0)), ("b".to_string(), pod(500.0, 0.0))]);
        let now = HashMap::from([
            ("a".to_string(), pod(160.0, 4.0)),
            // b restarted: 20 since.
            ("b".to_string(), pod(20.0, 0.0)),
            ("c".to_string(), pod(5.0, 5.0)),
        ]);
        let w = window(&now, &base);
        assert_eq!(w.canary.requests, 85.0);
        assert_eq!(w.canary.failed, 8.0);
        assert_eq!(w.canary.buckets, vec![(f64::INFINITY, 85.0)]);
    }

    fn rollout() -> Rollout {
        serde_json::from_value(serde_json::json!({})).unwrap()
    }

    #[test]
    fn the_judge_compares_the_canary_with_the_stable_pods() {
        let r = rollout();
        let fast = [(0.01, 990.0), (0.025, 1000.0), (f64::INFINITY, 1000.0)];
        let stable = group(1000.0, 5.0, &fast);
        let w = |canary: Group| Window {
            stable: stable.clone(),
            canary,
        };
        // 20 % failing against 0.5 %.
        assert!(matches!(judge(&r, &w(group(100.0, 20.0, &fast))), Verdict::Fail(m) if m.contains("failed requests")));
        // 1.2 % against 0.5 %: within 1 point.
        assert!(matches!(judge(&r, &w(group(1000.0, 12.0, &fast))), Verdict::Pass(_)));
        // 50 ms slower.
        let slow = [(0.05, 0.0), (0.075, 1000.0), (f64::INFINITY, 1000.0)];
        assert!(matches!(judge(&r, &w(group(1000.0, 0.0, &slow))), Verdict::Fail(m) if m.contains("p99")));
        // Too few to say.
        assert!(matches!(judge(&r, &w(group(10.0, 10.0, &fast))), Verdict::TooFew(_)));
        // Orders failing.
        let mut orders = group(1000.0, 0.0, &fast);
        orders.orders = 100.0;
        orders.orders_failed = 10.0;
        assert!(matches!(judge(&r, &w(orders)), Verdict::Fail(m) if m.contains("failed orders")));
    }

    #[test]
    fn metrics_text_is_read_per_group() {
        let text = "# TYPE sidecar_canary_percent gauge\n\
            sidecar_canary_percent 10\n\
            sidecar_canary_instances 2\n\
            sidecar_upstream_requests_total{group=\"canary\",status_class=\"2xx\"} 90\n\
            sidecar_upstream_requests_total{group=\"canary\",status_class=\"5xx\"} 10\n\
            sidecar_upstream_requests_total{group=\"stable\",status_class=\"2xx\"} 900\n\
            sidecar_upstream_requests_total{group=\"stable\",status_class=\"error\"} 1\n\
            sidecar_upstream_response_seconds_bucket{group=\"canary\",le=\"0.005\"} 50\n\
            sidecar_upstream_response_seconds_bucket{group=\"canary\",le=\"+Inf\"} 100\n";
        let mut s = PodSample::default();
        read_sidecar(text, &mut s);
        assert_eq!((s.percent, s.canary_instances), (Some(10), 2));
        assert_eq!((s.canary.requests, s.canary.failed), (100.0, 10.0));
        assert_eq!((s.stable.requests, s.stable.failed), (901.0, 1.0));
        assert_eq!(s.canary.buckets, vec![(0.005, 50.0), (f64::INFINITY, 100.0)]);
        let app = "http_requests_total{method=\"POST\",route=\"/api/orders\",status=\"201\"} 40\n\
            http_requests_total{method=\"POST\",route=\"/api/orders\",status=\"500\"} 2\n\
            http_requests_total{method=\"GET\",route=\"/api/products\",status=\"500\"} 7\n";
        read_app(app, &mut s);
        assert_eq!((s.orders, s.orders_failed), (42.0, 2.0));
    }

    #[test]
    fn labels_with_escapes_parse() {
        let (name, labels, value) = samples("m{a=\"x\\\"y\",b=\"z\"} 3").next().unwrap();
        assert_eq!(name, "m");
        assert_eq!(labels, vec![("a", "x\"y".to_string()), ("b", "z".to_string())]);
        assert_eq!(value, 3.0);
    }

    #[test]
    fn the_split_has_reached_a_pod_once_it_balances_with_the_weight_and_found_the_canary() {
        let pod = |percent: Option<u8>, canary_instances: u32| PodSample {
            percent,
            canary_instances,
            ..PodSample::default()
        };
        let pods = |list: Vec<PodSample>| -> HashMap<String, PodSample> {
            list.into_iter().enumerate().map(|(i, p)| (i.to_string(), p)).collect()
        };
        assert_eq!(
            split_reached(&pods(vec![pod(Some(20), 1), pod(Some(20), 1)]), 20),
            (true, 0)
        );
        assert_eq!(
            split_reached(&pods(vec![pod(Some(20), 1), pod(Some(10), 1)]), 20),
            (false, 1)
        );
        // The weight, but not yet the canary's instances.
        assert_eq!(
            split_reached(&pods(vec![pod(Some(20), 1), pod(Some(20), 0)]), 20),
            (false, 1)
        );
        // A sidecar that could not be read does not hold the window.
        assert_eq!(
            split_reached(&pods(vec![pod(Some(20), 1), pod(None, 0)]), 20),
            (true, 0)
        );
    }

    #[test]
    fn canary_replicas_round_up_and_keep_one() {
        assert_eq!(canary_replicas(2, 10), 1);
        assert_eq!(canary_replicas(2, 50), 1);
        assert_eq!(canary_replicas(3, 50), 2);
        assert_eq!(canary_replicas(10, 100), 10);
    }
}
