//! What should exist for a MallDeployment, as pure functions of the spec and the tuning: the
//! Deployment (app + sidecar), the Services, the sidecar ConfigMap, the HPA, the PDB, and the
//! Prometheus Operator's PrometheusRule and ServiceMonitor. No I/O here; `controller.rs` applies.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HPAScalingPolicy, HPAScalingRules, HorizontalPodAutoscaler,
    HorizontalPodAutoscalerBehavior, HorizontalPodAutoscalerSpec, MetricIdentifier, MetricSpec, MetricTarget,
    PodsMetricSource, ResourceMetricSource,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, SecretKeySelector, SecurityContext, Service, ServicePort, ServiceSpec,
    Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::Resource;
use mall_sidecar_config::{Balance, DnsDiscovery, LocalInstance, SidecarConfig};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::crd::{AutoscalingMode, MallDeployment, Quantities, SecretKeyRef, SecretValue};
use crate::sale::SalePlan;
use crate::tuning::Tuning;

pub const APP_PORT: i32 = 3000;
pub const PROXY_PORT: i32 = 8080;
pub const ADMIN_PORT: i32 = 9901;
pub const CONFIG_HASH: &str = "mall.example.com/config-hash";
pub const SIDECAR_CONFIG_KEY: &str = "sidecar.toml";

/// Everything the operator applies for one MallDeployment.
pub struct Children {
    pub deployment: Deployment,
    pub service: Service,
    pub app_service: Service,
    pub metrics_service: Service,
    pub config_map: ConfigMap,
    pub hpa: Option<HorizontalPodAutoscaler>,
    pub pdb: PodDisruptionBudget,
    pub prometheus_rule: DynamicObject,
    pub service_monitor: DynamicObject,
}

/// `floor`: the replica floor alert-driven scaling asked for (HPA minReplicas in `hpa`/`both`);
/// `sale`: what the sale windows in effect change (floor, warm-up, order limits);
/// `monitoring_labels`: extra labels for the PrometheusRule and ServiceMonitor (what the
/// Prometheus selects them by).
pub fn children(
    md: &MallDeployment,
    tuning: &Tuning,
    floor: Option<i32>,
    sale: &SalePlan,
    monitoring_labels: &BTreeMap<String, String>,
) -> Children {
    let config_map = config_map(md, tuning, sale);
    Children {
        deployment: deployment(md, tuning, &config_map, sale),
        service: service(md),
        app_service: app_service(md),
        metrics_service: metrics_service(md),
        hpa: hpa(md, floor.max(sale.floor)),
        pdb: pdb(md),
        prometheus_rule: with_labels(prometheus_rule(md, tuning), monitoring_labels),
        service_monitor: with_labels(service_monitor(md), monitoring_labels),
        config_map,
    }
}

fn with_labels(mut o: DynamicObject, extra: &BTreeMap<String, String>) -> DynamicObject {
    if let Some(labels) = o.metadata.labels.as_mut() {
        for (k, v) in extra {
            labels.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    o
}

pub fn name(md: &MallDeployment) -> String {
    md.metadata.name.clone().unwrap_or_default()
}

pub fn namespace(md: &MallDeployment) -> String {
    md.metadata.namespace.clone().unwrap_or_else(|| "default".into())
}

pub fn selector_labels(md: &MallDeployment) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "mall".to_string()),
        ("app.kubernetes.io/instance".to_string(), name(md)),
    ])
}

/// The selector string for the scale subresource's status.
pub fn selector_string(md: &MallDeployment) -> String {
    selector_labels(md)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The label every child carries; the operator's watches select on it, so its caches hold its own
/// objects and nothing else of the cluster.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "mall-operator");

/// `app.kubernetes.io/managed-by=mall-operator`, for watches.
pub fn managed_selector() -> String {
    format!("{}={}", MANAGED_BY.0, MANAGED_BY.1)
}

fn labels(md: &MallDeployment) -> BTreeMap<String, String> {
    let mut l = selector_labels(md);
    l.insert(MANAGED_BY.0.into(), MANAGED_BY.1.into());
    l
}

/// The controller reference to the MallDeployment, once it has a uid (a stored object). Offline
/// renders have none: their objects carry only the labels, and the operator adopts them.
/// `blockOwnerDeletion` keeps a foreground deletion of the mall waiting for its children.
fn owner(md: &MallDeployment) -> Option<OwnerReference> {
    md.metadata.uid.as_ref()?;
    let mut owner = md.controller_owner_ref(&())?;
    owner.block_owner_deletion = Some(true);
    Some(owner)
}

pub fn meta(md: &MallDeployment, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(namespace(md)),
        labels: Some(labels(md)),
        owner_references: owner(md).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

/// The sidecar's configuration for this mall, in the schema the sidecar parses.
pub fn sidecar_config(md: &MallDeployment, tuning: &Tuning, sale: &SalePlan) -> SidecarConfig {
    let s = &md.spec;
    let mut c = SidecarConfig::default();
    c.server.listen = ([0, 0, 0, 0], PROXY_PORT as u16).into();
    c.server.admin_listen = ([0, 0, 0, 0], ADMIN_PORT as u16).into();
    c.server.threads = tuning.sidecar_threads as usize;
    // As the app: not ready but serving for 5 s after SIGTERM while the pod leaves the endpoints,
    // then 20 s to drain; 25 s, inside Kubernetes' 30 s.
    c.server.shutdown_delay_seconds = 5;
    // Every sidecar balances over every app instance through the headless Service, so the
    // algorithm (consistent hashing keeps each app's L1 cache hot) works across pods.
    c.upstream.servers = Vec::new();
    c.upstream.dns = Some(DnsDiscovery {
        name: format!("{}-app.{}.svc.cluster.local", name(md), namespace(md)),
        port: APP_PORT as u16,
        refresh_seconds: 5,
    });
    // This pod's app (the instance at POD_IP) through its Unix socket: measured faster than
    // loopback TCP for the sidecar and the app both (BENCHMARKS.md section 1).
    c.upstream.local = Some(LocalInstance {
        socket: APP_SOCKET.into(),
        address: None,
    });
    c.upstream.balance = s.load_balancing;
    if s.load_balancing == Balance::Weighted {
        // All pods are equal: weighted is round robin here.
        c.upstream.balance = Balance::RoundRobin;
    }
    c.cache.enabled = s.cache.enabled;
    c.cache.max_bytes = tuning.sidecar_cache_bytes;
    c.cache.max_object_bytes = c.cache.max_object_bytes.min((tuning.sidecar_cache_bytes / 4) as usize);
    c.cache.rules = s.cache.rules.clone();
    // Purges come from inside the pod (the app, an operator's `kubectl exec`) only.
    c.compression.enabled = s.compression.enabled;
    c.compression.min_bytes = s.compression.min_bytes as usize;
    c.rate_limit.enabled = s.rate_limits.enabled;
    if let Some(rules) = &s.rate_limits.rules {
        c.rate_limit.rules = rules.clone();
    }
    if let Some(limit) = &sale.order_limit {
        // A sale tightens every rule for placing orders (never loosens one), or adds one.
        let mut found = false;
        for rule in &mut c.rate_limit.rules {
            let orders = rule.path_prefix.starts_with("/api/orders")
                && (rule.methods.is_empty() || rule.methods.iter().any(|m| m == "POST"));
            if orders {
                found = true;
                rule.requests_per_second = rule.requests_per_second.min(limit.requests_per_second);
                rule.burst = rule.burst.min(limit.burst);
            }
        }
        if !found {
            c.rate_limit.rules.insert(
                0,
                mall_sidecar_config::LimitRule {
                    name: "sale-orders".into(),
                    path_prefix: "/api/orders".into(),
                    methods: vec!["POST".into()],
                    requests_per_second: limit.requests_per_second,
                    burst: limit.burst,
                },
            );
        }
    }
    if let Some(room) = &sale.waiting_room {
        // The secret (the app's token key, from its Secret) and Redis come from the environment.
        c.waiting_room.enabled = true;
        c.waiting_room.admit_per_second = room.admit_per_second;
        c.waiting_room.burst = room.burst.unwrap_or(c.waiting_room.burst);
        c.waiting_room.ticket_ttl_seconds = room
            .ticket_ttl_seconds
            .map_or(c.waiting_room.ticket_ttl_seconds, u64::from);
        c.waiting_room.no_show_grace_ms = room.no_show_grace_ms.map_or(c.waiting_room.no_show_grace_ms, u64::from);
        c.waiting_room.numbers_per_address_per_minute = room
            .numbers_per_address_per_minute
            .unwrap_or(c.waiting_room.numbers_per_address_per_minute);
        c.waiting_room.readmit_after_seconds = room
            .readmit_after_seconds
            .map_or(c.waiting_room.readmit_after_seconds, u64::from);
        c.waiting_room.refusal_delay_ms = room.refusal_delay_ms.map_or(c.waiting_room.refusal_delay_ms, u64::from);
        // Without Redis each pod admits its share; with as many pods as may run, the fleet
        // never admits more than the budget.
        c.waiting_room.replicas = s.max_replicas.max(1) as u32;
    }
    // Only the proxies the user names may speak for their clients (validation refuses a range
    // that does not parse, naming its field, before anything is rendered for a cluster).
    c.rate_limit.trusted_proxies = s
        .rate_limits
        .trusted_proxies
        .iter()
        .filter_map(|range| range.parse().ok())
        .collect();
    c.rate_limit.allow_broad_trusted_proxies = s.rate_limits.allow_broad_trusted_proxies;
    c
}

fn config_map(md: &MallDeployment, tuning: &Tuning, sale: &SalePlan) -> ConfigMap {
    ConfigMap {
        metadata: meta(md, format!("{}-sidecar", name(md))),
        data: Some(BTreeMap::from([(
            SIDECAR_CONFIG_KEY.to_string(),
            sidecar_config(md, tuning, sale).to_toml(),
        )])),
        ..ConfigMap::default()
    }
}

fn env(name: &str, value: impl ToString) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.to_string()),
        ..EnvVar::default()
    }
}

/// Whether the pods seed the demo catalog (`spec.demo`, by default with the embedded database).
pub fn demo(md: &MallDeployment) -> bool {
    md.spec.demo.unwrap_or(md.spec.database.primary.is_none())
}

/// The Secret the operator creates when `spec.auth.jwtSecret` is not set.
pub fn generated_jwt_secret_name(md: &MallDeployment) -> String {
    format!("{}-jwt", name(md))
}

/// Where the token-signing key is: the spec's Secret, or the one the operator creates.
pub fn jwt_secret(md: &MallDeployment) -> SecretValue {
    md.spec.auth.jwt_secret.clone().unwrap_or_else(|| SecretValue {
        name: generated_jwt_secret_name(md),
        key: "secret".into(),
    })
}

fn secret_value_env(name: &str, r: &SecretValue) -> EnvVar {
    secret_env(
        name,
        &SecretKeyRef {
            name: r.name.clone(),
            key: r.key.clone(),
        },
    )
}

fn secret_env(name: &str, r: &SecretKeyRef) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: r.name.clone(),
                key: r.key.clone(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// A quantity as the API server stores it (`0.5` -> `500m`), so a live object compares equal to
/// what the operator would apply again.
fn quantity(q: &str) -> Quantity {
    Quantity(crate::quantity::canonical_or_same(q))
}

fn resources(cpu: &Quantities, memory: &Quantities) -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), quantity(&cpu.request)),
            ("memory".to_string(), quantity(&memory.request)),
        ])),
        limits: Some(BTreeMap::from([
            ("cpu".to_string(), quantity(&cpu.limit)),
            ("memory".to_string(), quantity(&memory.limit)),
        ])),
        ..ResourceRequirements::default()
    }
}

fn probe(path: &str, port: i32, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(port),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

fn app_env(md: &MallDeployment, tuning: &Tuning, sale: &SalePlan) -> Vec<EnvVar> {
    let s = &md.spec;
    let mut e = vec![
        env("MALL_LISTEN", format!("0.0.0.0:{APP_PORT}")),
        // The sidecar in the pod reaches the app here (other pods' sidecars use the port).
        env("MALL_LISTEN_SOCKET", APP_SOCKET),
        // The pod's own sidecar, purged of every object in the invalidation records the app
        // follows: a write through any pod empties every pod's shared cache, Redis or not.
        env("MALL_SIDECAR_PURGE_URL", format!("http://127.0.0.1:{PROXY_PORT}")),
        env("MALL_LOG_FORMAT", "json"),
        env("MALL_WORKER_THREADS", tuning.app_worker_threads),
        // Ceilings from the CPU only: the share of the connection budget (which depends on
        // maxReplicas) comes from the allowance ConfigMap at run time (budget.rs), so changing
        // maxReplicas changes nothing here and rolls no pod.
        env("MALL_DB_MAX_CONNECTIONS", tuning.db_pool_ceiling),
        env("MALL_DB_MIN_CONNECTIONS", tuning.db_min_connections),
        env("MALL_DB_REPLICA_MAX_CONNECTIONS", tuning.db_pool_ceiling),
        env("MALL_CACHE_BYTES", tuning.app_cache_bytes),
        // On SIGTERM the app fails /ready and serves 5 s more (endpoints and the sidecar's checks
        // drop it meanwhile), then drains for up to 15 s: 20 s, inside Kubernetes' 30 s.
        env("MALL_SHUTDOWN_DELAY_MS", 5000),
        env("MALL_SHUTDOWN_TIMEOUT_SECS", 15),
        // Pods share the database: each takes its snowflake worker id from its own name.
        env("MALL_WORKER_ID", "auto"),
        // Production unless a demo: then the app refuses a default password and a missing key.
        env("MALL_ENV", if demo(md) { "development" } else { "production" }),
        secret_value_env("MALL_JWT_SECRET", &jwt_secret(md)),
    ];
    if demo(md) {
        e.push(env("MALL_SEED", "true"));
    }
    if let Some(admin) = &s.auth.admin_password {
        e.push(secret_value_env("MALL_ADMIN_PASSWORD", admin));
    }
    if s.database.primary.is_some() {
        e.push(env(
            "MALL_DB_ALLOWANCE_FILE",
            format!("{ALLOWANCE_DIR}/{}", ALLOWANCE_KEY),
        ));
    }
    // A sale's hot products are in every pod's cache before it reports ready.
    if !sale.warm_ids.is_empty() {
        let ids: Vec<String> = sale.warm_ids.iter().map(i64::to_string).collect();
        e.push(env("MALL_WARMUP_PRODUCT_IDS", ids.join(",")));
    }
    if let Some(top) = sale.warm_top {
        e.push(env("MALL_WARMUP_PRODUCTS", top));
    }
    match &s.database.primary {
        Some(primary) => e.push(secret_env("MALL_DATABASE_URL", primary)),
        None => e.push(env("MALL_DATA_DIR", DATA_DIR)),
    }
    if !s.database.replicas.is_empty() {
        let mut refs = Vec::new();
        for (i, r) in s.database.replicas.iter().enumerate() {
            let var = format!("MALL_REPLICA_URL_{i}");
            e.push(secret_env(&var, r));
            refs.push(format!("$({var})"));
        }
        e.push(env("MALL_DATABASE_REPLICA_URLS", refs.join(",")));
    }
    if let Some(redis) = &s.redis {
        e.push(secret_env("MALL_REDIS_URL", &redis.url));
    }
    e.extend(tracing_env(md, "mall-app"));
    if let Some(p) = profiling(md) {
        // Loopback only: `kubectl port-forward` reaches it, other pods do not, and it is on no
        // Service.
        e.push(env("MALL_ADMIN_LISTEN", format!("127.0.0.1:{APP_ADMIN_PORT}")));
        e.push(secret_value_env("MALL_ADMIN_TOKEN", &p.token_secret));
    }
    e
}

/// The app's admin port (profiles) when `spec.observability.profiling` is on.
pub const APP_ADMIN_PORT: i32 = 9902;

fn profiling(md: &MallDeployment) -> Option<&crate::crd::Profiling> {
    md.spec.observability.as_ref().and_then(|o| o.profiling.as_ref())
}

/// With `spec.observability.tracing`: the standard OpenTelemetry variables both the app and the
/// sidecar read (`mall_telemetry::TraceConfig`; `service` is each one's `service.name`). Nothing without it, so a mall that
/// does not trace renders as before and rolls no pod.
fn tracing_env(md: &MallDeployment, service: &str) -> Vec<EnvVar> {
    let Some(tracing) = md.spec.observability.as_ref().and_then(|o| o.tracing.as_ref()) else {
        return Vec::new();
    };
    // `service.namespace` tells two malls' `mall-app`s apart across the cluster; the pod's name
    // comes from the downward API, and the kubelet expands `$(POD_NAME)` because it is defined
    // first in the same container.
    let resource = [
        format!("service.namespace={}/{}", namespace(md), name(md)),
        format!("k8s.namespace.name={}", namespace(md)),
        format!("k8s.deployment.name={}", name(md)),
        "k8s.pod.name=$(POD_NAME)".to_string(),
    ];
    let mut e = vec![
        field_env("POD_NAME", "metadata.name"),
        env("OTEL_SERVICE_NAME", service),
        env("OTEL_RESOURCE_ATTRIBUTES", resource.join(",")),
        // Each program appends `/v1/traces`; a trailing slash would double it.
        env("OTEL_EXPORTER_OTLP_ENDPOINT", tracing.endpoint.trim_end_matches('/')),
    ];
    if let Some(headers) = &tracing.headers_secret {
        e.push(secret_value_env("OTEL_EXPORTER_OTLP_HEADERS", headers));
    }
    // The ratio decides where a trace starts; every hop after it follows its parent's decision
    // (the W3C `traceparent`), so a kept trace is kept whole.
    e.push(env("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"));
    e.push(env("OTEL_TRACES_SAMPLER_ARG", tracing.sample_ratio));
    e
}

/// A variable from the downward API (`metadata.name`, `status.podIP`).
fn field_env(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field_path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn deployment(md: &MallDeployment, tuning: &Tuning, config_map: &ConfigMap, sale: &SalePlan) -> Deployment {
    let s = &md.spec;
    let app_env = app_env(md, tuning, sale);
    let mut sidecar_env = vec![
        env("SIDECAR_LOG_FORMAT", "json"),
        // Which of the instances DNS returns is this pod's own app (reached through its socket).
        field_env("POD_IP", "status.podIP"),
    ];
    if let (Some(redis), true) = (&s.redis, s.rate_limits.shared) {
        sidecar_env.push(secret_env("SIDECAR__RATE_LIMIT__REDIS__URL", &redis.url));
    }
    if let Some(redis) = &s.redis {
        // Writes through any pod purge every pod's sidecar (the app publishes on this Redis).
        sidecar_env.push(secret_env("SIDECAR__CACHE__INVALIDATION__REDIS_URL", &redis.url));
    }
    if sale.waiting_room.is_some() {
        // Tickets are signed with a key derived from the app's token secret (every pod has it).
        sidecar_env.push(secret_value_env("SIDECAR__WAITING_ROOM__SECRET", &jwt_secret(md)));
        if let Some(redis) = &s.redis {
            sidecar_env.push(secret_env("SIDECAR__WAITING_ROOM__REDIS__URL", &redis.url));
        }
    }
    sidecar_env.extend(tracing_env(md, "mall-sidecar"));
    if let Some(p) = profiling(md) {
        // The token stays in the Secret, not in the ConfigMap (SIDECAR__* overrides the file).
        sidecar_env.push(env("SIDECAR__SERVER__PROFILING", "true"));
        sidecar_env.push(secret_value_env("SIDECAR__SERVER__ADMIN_TOKEN", &p.token_secret));
    }
    // Any change to what the pods run with (sidecar config, env, images, resources) changes the
    // hash and so rolls the pods.
    let mut hasher = Sha256::new();
    hasher.update(serde_json::to_vec(&config_map.data).expect("json"));
    hasher.update(serde_json::to_vec(&app_env).expect("json"));
    hasher.update(serde_json::to_vec(&sidecar_env).expect("json"));
    let hash: String = hasher.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();

    let app = Container {
        name: "app".into(),
        image: Some(s.app.image.clone()),
        args: Some(vec!["serve".into()]),
        ports: Some(vec![ContainerPort {
            name: Some("app".into()),
            container_port: APP_PORT,
            ..ContainerPort::default()
        }]),
        env: Some(app_env),
        resources: Some(resources(&s.app.cpu, &s.app.memory)),
        liveness_probe: Some(probe("/health", APP_PORT, 10, 3)),
        readiness_probe: Some(probe("/ready", APP_PORT, 5, 2)),
        security_context: Some(locked_down()),
        volume_mounts: Some(if s.database.primary.is_some() {
            vec![
                scratch("tmp", "/tmp"),
                scratch("run", RUN_DIR),
                VolumeMount {
                    name: "db-allowance".into(),
                    mount_path: ALLOWANCE_DIR.into(),
                    read_only: Some(true),
                    ..VolumeMount::default()
                },
            ]
        } else {
            // The embedded SQLite file: as long-lived as the pod (a demo's data).
            vec![
                scratch("tmp", "/tmp"),
                scratch("run", RUN_DIR),
                scratch("data", DATA_DIR),
            ]
        }),
        ..Container::default()
    };
    let sidecar = Container {
        name: "sidecar".into(),
        image: Some(s.sidecar.image.clone()),
        args: Some(vec!["-c".into(), format!("/etc/sidecar/{SIDECAR_CONFIG_KEY}")]),
        ports: Some(vec![
            ContainerPort {
                name: Some("http".into()),
                container_port: PROXY_PORT,
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("admin".into()),
                container_port: ADMIN_PORT,
                ..ContainerPort::default()
            },
        ]),
        env: Some(sidecar_env),
        resources: Some(resources(&s.sidecar.cpu, &s.sidecar.memory)),
        liveness_probe: Some(probe("/health", ADMIN_PORT, 10, 3)),
        readiness_probe: Some(probe("/ready", ADMIN_PORT, 5, 2)),
        security_context: Some(locked_down()),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "sidecar-config".into(),
                mount_path: "/etc/sidecar".into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            scratch("tmp", "/tmp"),
            scratch("run", RUN_DIR),
        ]),
        ..Container::default()
    };
    let mut pod_labels = labels(md);
    pod_labels.retain(|k, _| k != "app.kubernetes.io/managed-by");
    Deployment {
        metadata: meta(md, name(md)),
        spec: Some(DeploymentSpec {
            // While an HPA owns replicas the field is left out, so applying never fights it.
            replicas: (s.autoscaling.mode == AutoscalingMode::Alerts)
                .then_some(s.replicas.max(sale.floor.unwrap_or(0))),
            selector: LabelSelector {
                match_labels: Some(selector_labels(md)),
                ..LabelSelector::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_unavailable: Some(IntOrString::Int(0)),
                    max_surge: Some(IntOrString::String("25%".into())),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(BTreeMap::from([
                        (CONFIG_HASH.to_string(), hash),
                        ("prometheus.io/scrape".to_string(), "true".to_string()),
                    ])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![app, sidecar],
                    // The mall never calls the API server: no token to steal from a pod.
                    automount_service_account_token: Some(false),
                    termination_grace_period_seconds: Some(30),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        run_as_group: Some(65532),
                        fs_group: Some(65532),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    volumes: Some(volumes(md)),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// Where the app reads its share of the database's connection budget (budget.rs).
pub const ALLOWANCE_DIR: &str = "/etc/mall/db-allowance";
/// The file in `<name>-db-allowance` the app reads its share from (written by `budget.rs`).
pub const ALLOWANCE_KEY: &str = "allowance.json";

/// The ConfigMap holding each pod's share of the connection budget (`budget.rs` decides its
/// content; the name is here so the Deployment can mount it without depending on budget.rs).
pub fn allowance_config_map_name(md: &MallDeployment) -> String {
    format!("{}-db-allowance", name(md))
}

/// The emptyDir both containers mount, holding the app's Unix socket.
pub const RUN_DIR: &str = "/run/mall";

/// The app's Unix socket: the sidecar's hop to the app in its own pod (docs/sidecar.md).
pub const APP_SOCKET: &str = "/run/mall/app.sock";

/// Where the app keeps its embedded SQLite database (an emptyDir).
pub const DATA_DIR: &str = "/data";

fn empty_dir(name: &str) -> Volume {
    Volume {
        name: name.into(),
        empty_dir: Some(Default::default()),
        ..Volume::default()
    }
}

fn volumes(md: &MallDeployment) -> Vec<Volume> {
    let mut v = vec![
        Volume {
            name: "sidecar-config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: format!("{}-sidecar", name(md)),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        empty_dir("tmp"),
        // In memory: it holds a socket and nothing else.
        Volume {
            name: "run".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: Some(Quantity("1Mi".into())),
            }),
            ..Volume::default()
        },
    ];
    if md.spec.database.primary.is_none() {
        v.push(empty_dir("data"));
    }
    if md.spec.database.primary.is_some() {
        v.push(Volume {
            name: "db-allowance".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: allowance_config_map_name(md),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    v
}

/// An emptyDir mount.
fn scratch(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        ..VolumeMount::default()
    }
}

/// No privilege escalation, no capabilities, a read-only root: neither container needs more.
fn locked_down() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        // What must be written has an emptyDir: /tmp in both containers, /data for SQLite.
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Capabilities::default()
        }),
        ..SecurityContext::default()
    }
}

fn port(name: &str, port: i32, target: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::Int(target)),
        ..ServicePort::default()
    }
}

/// Clients' Service: port 80 to the sidecar, and nothing else. The app's own port would bypass
/// the sidecar's limits, body limit and cache, and the admin port is for probes and Prometheus.
fn service(md: &MallDeployment) -> Service {
    Service {
        metadata: meta(md, name(md)),
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(md)),
            ports: Some(vec![port("http", 80, PROXY_PORT)]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The label that marks the metrics Service, which the ServiceMonitor selects.
pub const METRICS_ROLE: (&str, &str) = ("mall.example.com/role", "metrics");

/// Headless Service of the metrics ports, for the ServiceMonitor only: Prometheus scrapes each
/// pod through it; it balances nothing and clients have no use for it.
fn metrics_service(md: &MallDeployment) -> Service {
    let mut metadata = meta(md, format!("{}-metrics", name(md)));
    if let Some(labels) = metadata.labels.as_mut() {
        labels.insert(METRICS_ROLE.0.into(), METRICS_ROLE.1.into());
    }
    Service {
        metadata,
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(selector_labels(md)),
            ports: Some(vec![
                port("sidecar-metrics", ADMIN_PORT, ADMIN_PORT),
                port("app-metrics", APP_PORT, APP_PORT),
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// Headless Service listing every ready app instance, for the sidecars' DNS discovery.
fn app_service(md: &MallDeployment) -> Service {
    Service {
        metadata: meta(md, format!("{}-app", name(md))),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            // Every pod's sidecar needs every app instance in DNS to become ready itself; the
            // sidecars' own health checks decide which instances take traffic.
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(md)),
            ports: Some(vec![port("app", APP_PORT, APP_PORT)]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn hpa(md: &MallDeployment, floor: Option<i32>) -> Option<HorizontalPodAutoscaler> {
    let s = &md.spec;
    let a = &s.autoscaling;
    if a.mode == AutoscalingMode::Alerts {
        return None;
    }
    let mut metrics = vec![MetricSpec {
        type_: "Resource".into(),
        resource: Some(ResourceMetricSource {
            name: "cpu".into(),
            target: MetricTarget {
                type_: "Utilization".into(),
                average_utilization: Some(a.target_cpu_percent),
                ..MetricTarget::default()
            },
        }),
        ..MetricSpec::default()
    }];
    if let Some(rps) = a.target_requests_per_second {
        metrics.push(MetricSpec {
            type_: "Pods".into(),
            pods: Some(PodsMetricSource {
                metric: MetricIdentifier {
                    name: "sidecar_http_requests_per_second".into(),
                    selector: None,
                },
                target: MetricTarget {
                    type_: "AverageValue".into(),
                    average_value: Some(quantity(&rps.to_string())),
                    ..MetricTarget::default()
                },
            }),
            ..MetricSpec::default()
        });
    }
    let min = s.min_replicas.max(floor.unwrap_or(0)).min(s.max_replicas);
    Some(HorizontalPodAutoscaler {
        metadata: meta(md, name(md)),
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "Deployment".into(),
                name: name(md),
            },
            min_replicas: Some(min),
            max_replicas: s.max_replicas,
            metrics: Some(metrics),
            behavior: Some(HorizontalPodAutoscalerBehavior {
                scale_up: Some(HPAScalingRules {
                    stabilization_window_seconds: Some(0),
                    policies: Some(vec![HPAScalingPolicy {
                        type_: "Percent".into(),
                        value: 100,
                        period_seconds: 30,
                    }]),
                    ..HPAScalingRules::default()
                }),
                scale_down: Some(HPAScalingRules {
                    stabilization_window_seconds: Some(a.stabilization_seconds as i32),
                    policies: Some(vec![HPAScalingPolicy {
                        type_: "Percent".into(),
                        value: 50,
                        period_seconds: 60,
                    }]),
                    ..HPAScalingRules::default()
                }),
            }),
        }),
        ..HorizontalPodAutoscaler::default()
    })
}

fn pdb(md: &MallDeployment) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(md, name(md)),
        spec: Some(PodDisruptionBudgetSpec {
            // One pod at a time, whatever the scale: drains proceed, capacity never halves.
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(md)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

pub fn prometheus_rule_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("monitoring.coreos.com", "v1", "PrometheusRule"),
        "prometheusrules",
    )
}

pub fn service_monitor_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("monitoring.coreos.com", "v1", "ServiceMonitor"),
        "servicemonitors",
    )
}

fn prometheus_rule(md: &MallDeployment, tuning: &Tuning) -> DynamicObject {
    let mut o = DynamicObject::new(&name(md), &prometheus_rule_resource()).within(&namespace(md));
    o.metadata = meta(md, name(md));
    o.data = json!({ "spec": crate::alerts::rule_groups(md, tuning) });
    o
}

fn service_monitor(md: &MallDeployment) -> DynamicObject {
    let mut o = DynamicObject::new(&name(md), &service_monitor_resource()).within(&namespace(md));
    o.metadata = meta(md, name(md));
    let metrics_labels = BTreeMap::from([
        (METRICS_ROLE.0.to_string(), METRICS_ROLE.1.to_string()),
        ("app.kubernetes.io/instance".to_string(), name(md)),
    ]);
    // The Prometheus Operator labels series with the Service's name (`<name>-metrics`); the alert
    // rules and the dashboard select `service="<name>"`, so say that instead. `track` marks a
    // canary pod's series (its label `mall.example.com/track`), which a release's judgement reads.
    let service_label = json!([
        { "action": "replace", "targetLabel": "service", "replacement": name(md) },
        { "action": "replace", "sourceLabels": ["__meta_kubernetes_pod_label_mall_example_com_track"], "targetLabel": "track" }
    ]);
    o.data = json!({ "spec": {
        "selector": { "matchLabels": metrics_labels },
        "endpoints": [
            { "port": "sidecar-metrics", "path": "/metrics", "interval": "15s", "relabelings": service_label },
            { "port": "app-metrics", "path": "/metrics", "interval": "15s", "relabelings": service_label }
        ]
    }});
    o
}
