//! The `MallDeployment` custom resource (mall.example.com/v1alpha1): what a platform team writes,
//! and the status the operator reports back. Defaults and validation live in the schema so
//! `kubectl explain` and the API server both know them.

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use mall_sidecar_config::{Balance, CacheRule, LimitRule};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub const GROUP: &str = "mall.example.com";

/// `metadata.name`: a DNS label of at most 59 characters, so that `<name>-app` is a valid
/// Service name and `<name>` a valid label value.
pub const NAME_PATTERN: &str = "^[a-z]([-a-z0-9]*[a-z0-9])?$";
pub const NAME_MAX: u64 = 59;

/// The CRD as the API server gets it (crdgen, the chart, `operator render` and every reconcile's
/// validation use this one): kube's derive, plus two things the derive cannot say.
/// - `metadata.name` is restricted in the schema (the only place a structural schema allows it),
///   so a refusal names the field; a root CEL rule would be reported at `<nil>`.
/// - A fractional `minimum` on a number also gets a CEL rule: the API server's OpenAPI validator
///   compares a JSON integer with the minimum truncated to an integer (kube-openapi's
///   `MinimumNativeType`), so `0` passes `minimum: 0.001` and `1` passes `minimum: 1.1`. CEL sees
///   the value as a double and compares it exactly.
pub fn definition() -> CustomResourceDefinition {
    let mut crd = serde_json::to_value(MallDeployment::crd()).expect("the CRD serialises");
    let schema = &mut crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    schema["properties"]["metadata"] = json!({
        "type": "object",
        "properties": {
            "name": {
                "type": "string",
                "maxLength": NAME_MAX,
                "pattern": NAME_PATTERN,
            }
        }
    });
    exact_fractional_minimums(schema);
    drop_unknown_formats(schema);
    serde_json::from_value(crd).expect("the CRD deserialises")
}

/// schemars marks Rust's unsigned integers `format: uint32` / `uint64`, which the API server does
/// not know (every apply of the CRD warned `unrecognized format`); their `minimum: 0` stays.
fn drop_unknown_formats(schema: &mut Value) {
    match schema {
        Value::Object(object) => {
            let unknown = object
                .get("format")
                .and_then(Value::as_str)
                .is_some_and(|f| matches!(f, "uint" | "uint8" | "uint16" | "uint32" | "uint64" | "int8" | "int16"));
            if unknown {
                object.remove("format");
            }
            object.values_mut().for_each(drop_unknown_formats);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_unknown_formats),
        _ => {}
    }
}

fn exact_fractional_minimums(schema: &mut Value) {
    let Some(object) = schema.as_object_mut() else { return };
    if object.get("type").and_then(Value::as_str) == Some("number") {
        if let Some(min) = object
            .get("minimum")
            .and_then(Value::as_f64)
            .filter(|m| m.fract() != 0.0)
        {
            let rule = json!({ "rule": format!("self >= {min:?}"), "message": format!("must be at least {min}") });
            match object.get_mut("x-kubernetes-validations").and_then(Value::as_array_mut) {
                Some(rules) => rules.push(rule),
                None => {
                    object.insert("x-kubernetes-validations".into(), json!([rule]));
                }
            }
        }
    }
    for key in ["properties", "additionalProperties", "items"] {
        match object.get_mut(key) {
            Some(Value::Object(children)) if key == "properties" => {
                children.values_mut().for_each(exact_fractional_minimums)
            }
            Some(child) if key != "properties" => exact_fractional_minimums(child),
            _ => {}
        }
    }
}

/// A mall: the app and its sidecar, tuned from their resources, with a Service, an autoscaler, a
/// disruption budget and Prometheus alert rules.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
#[kube(
    group = "mall.example.com",
    version = "v1alpha1",
    kind = "MallDeployment",
    doc = "A mall: app and sidecar pods tuned from their resources, with Services, an autoscaler, a disruption budget and alert rules.",
    namespaced,
    shortname = "mall",
    status = "MallDeploymentStatus",
    derive = "Default",
    derive = "PartialEq",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".status.replicas"),
    printcolumn(name = "Rollout", type_ = "string", json_path = ".status.rollout.phase"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    cel,
    validation = Rule::new("self.spec.minReplicas <= self.spec.maxReplicas")
        .message("spec.minReplicas must not exceed spec.maxReplicas")
        .field_path(".spec.minReplicas"),
    validation = Rule::new("self.spec.replicas >= self.spec.minReplicas && self.spec.replicas <= self.spec.maxReplicas")
        .message("spec.replicas must be within spec.minReplicas..spec.maxReplicas")
        .field_path(".spec.replicas"),
    validation = Rule::new("self.spec.database.connectionBudget >= self.spec.maxReplicas")
        .message("spec.database.connectionBudget must be at least spec.maxReplicas (one connection per pod)")
        .field_path(".spec.database.connectionBudget"),
    validation = Rule::new("self.spec.slo.highQps < self.spec.slo.criticalQps")
        .message("spec.slo.highQps must be below spec.slo.criticalQps")
        .field_path(".spec.slo.highQps"),
    validation = Rule::new("self.spec.autoscaling.mode == 'alerts' || !isQuantity(string(self.spec.app.cpu.limit)) || !isQuantity(string(self.spec.app.cpu.request)) || sign(quantity(string(self.spec.app.cpu.request))) <= 0 || quantity(string(self.spec.app.cpu.request)).compareTo(quantity(string(self.spec.app.cpu.limit))) > 0 || double(self.spec.autoscaling.targetCpuPercent) * 1.1 <= 100.0 * quantity(string(self.spec.app.cpu.limit)).asApproximateFloat() / quantity(string(self.spec.app.cpu.request)).asApproximateFloat()")
        .message("spec.autoscaling.targetCpuPercent cannot be reached: the HPA scales at 110 % of the target, and the app can use at most its CPU limit, measured against its request; lower the target or raise spec.app.cpu.limit above the request")
        .field_path(".spec.autoscaling.targetCpuPercent"),
    validation = Rule::new("has(self.spec.database.primary) || self.spec.maxReplicas == 1")
        .message("without spec.database.primary every pod sells from its own embedded SQLite stock: set spec.database.primary, or replicas, minReplicas and maxReplicas to 1")
        .field_path(".spec.maxReplicas")
)]
#[serde(rename_all = "camelCase")]
pub struct MallDeploymentSpec {
    /// The mall app container.
    #[serde(default)]
    pub app: Container,
    /// The sidecar proxy container.
    #[serde(default)]
    pub sidecar: SidecarContainer,
    /// Desired pods (the scale subresource: `kubectl scale` and alert-driven scaling set it).
    #[serde(default = "defaults::replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub replicas: i32,
    /// Fewest pods the autoscalers may leave.
    #[serde(default = "defaults::min_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: i32,
    /// Most pods the autoscalers may create; the database budget is divided by this.
    #[serde(default = "defaults::max_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// The database. Without a primary, each pod uses an embedded SQLite file (demo only).
    #[serde(default)]
    pub database: Database,
    /// Redis for the shared L2 cache and shared rate limits; optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<Redis>,
    /// The sidecar's response cache.
    #[serde(default)]
    pub cache: CacheSpec,
    /// The sidecar's response compression.
    #[serde(default)]
    pub compression: CompressionSpec,
    /// The sidecar's rate limits.
    #[serde(default)]
    pub rate_limits: RateLimitSpec,
    /// How the sidecar picks an app instance: round_robin, weighted, consistent_hash or least_connections.
    #[serde(default = "defaults::balance")]
    pub load_balancing: Balance,
    /// Alert thresholds (defaults are seed 001's rules).
    #[serde(default)]
    pub slo: Slo,
    /// Who changes the replica count.
    #[serde(default)]
    pub autoscaling: Autoscaling,
    /// Planned sales: from a lead time before each starts until it ends, the replica floor is
    /// raised, the pods start with the sale's hot products warm, and order limits tighten.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("maxItems" = 32, "x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub sale_windows: Vec<SaleWindow>,
    /// Leave every child object alone (for manual surgery); status says so.
    #[serde(default)]
    pub paused: bool,
    /// Seed a demo catalog at start: products 1..1000, customers user1..user100 with the
    /// password `mall-password`, and `admin` with that password unless `auth.adminPassword` is
    /// set. Default: on with the embedded database (no `database.primary`), off with a primary;
    /// a mall that is not a demo never gets a default password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub demo: Option<bool>,
    /// Accounts and the key that signs login tokens.
    #[serde(default)]
    pub auth: Auth,
    /// What the pods report besides their Prometheus metrics: traces, and CPU profiles on demand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observability: Option<Observability>,
    /// How a change to the pods reaches them. Unset: a rolling update of every pod at the
    /// Deployment's pace. `canary`: the change runs first in canary pods that get a share of the
    /// requests, step by step, and is promoted, or rolled back by itself when it does worse than
    /// the stable pods (docs/operator.md, "Canary releases").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
}

/// A canary release of every change to the pods (images, resources, env, sidecar settings, cache
/// rules). Changes that leave the pods alone (replicas, autoscaling, sale windows) apply at once.
///
/// Manual control is the annotation `mall.example.com/rollout` on the MallDeployment: `pause`
/// holds the current step while it is set, `promote` ends the release with the canary promoted,
/// `abort` rolls it back; the operator removes `promote` and `abort` once done.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "camelCase")]
pub struct Rollout {
    /// `canary` (the only strategy so far; leave `spec.rollout` out for a rolling update).
    #[serde(default)]
    pub strategy: RolloutStrategy,
    /// The canary's share of the requests at each step, in percent, strictly increasing, each
    /// watched for `watchSeconds`; after the last the canary is promoted to every pod.
    #[serde(default = "defaults::rollout_steps")]
    #[schemars(length(min = 1, max = 10))]
    #[x_kube(
        validation = Rule::new("[1, 2, 3, 4, 5, 6, 7, 8, 9].all(i, i >= size(self) || self[i - 1].weight < self[i].weight)")
            .message("weights must increase from step to step")
    )]
    pub steps: Vec<RolloutStep>,
    /// What the canary may do worse than the stable pods in the same window before it is rolled
    /// back.
    #[serde(default)]
    pub thresholds: RolloutThresholds,
    /// A canary whose pods are not all ready this long after the release started (a crash loop, a
    /// refused sidecar config, a failing readiness probe), the split's arrival at every sidecar
    /// included, or this long after a ready canary lost a pod, is rolled back.
    #[serde(default = "defaults::ready_timeout_seconds")]
    #[schemars(range(min = 10, max = 3600))]
    pub ready_timeout_seconds: u32,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RolloutStrategy {
    #[default]
    Canary,
}

/// One step of a canary release.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStep {
    /// The canary's share of the requests every sidecar sends to the apps, 1 to 100 %.
    #[schemars(range(min = 1, max = 100))]
    pub weight: u8,
    /// How long the step is watched once every pod balances with its weight.
    #[serde(default = "defaults::watch_seconds")]
    #[schemars(range(min = 10, max = 86400))]
    pub watch_seconds: u32,
}

/// The canary against the stable pods, both measured by every sidecar over the same window.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "camelCase")]
pub struct RolloutThresholds {
    /// How much higher the canary's share of failed requests (5xx, connection errors) may be
    /// than the stable pods', as a fraction: 0.01 allows 1.5 % where stable has 0.5 %.
    #[serde(default = "defaults::max_ratio_increase")]
    #[schemars(range(max = 1))]
    #[x_kube(validation = Rule::new("self > 0.0").message("must be above 0: 0 would roll back on one failed request"))]
    pub max_error_ratio_increase: f64,
    /// How many milliseconds the canary's p99 response time may exceed the stable pods'.
    #[serde(default = "defaults::max_p99_increase_ms")]
    #[schemars(range(min = 1, max = 60000))]
    pub max_p99_increase_ms: u32,
    /// How much higher the canary's share of failed orders (`POST /api/orders` answered 5xx by
    /// the app) may be than the stable pods'.
    #[serde(default = "defaults::max_ratio_increase")]
    #[schemars(range(max = 1))]
    #[x_kube(validation = Rule::new("self > 0.0").message("must be above 0: 0 would roll back on one failed order"))]
    pub max_order_failure_ratio_increase: f64,
    /// Requests the canary must have answered in a step before it is judged; a step with fewer
    /// is watched longer.
    #[serde(default = "defaults::min_requests")]
    #[schemars(range(min = 1, max = 1000000))]
    pub min_requests: u32,
}

impl Default for RolloutThresholds {
    fn default() -> Self {
        RolloutThresholds {
            max_error_ratio_increase: defaults::max_ratio_increase(),
            max_p99_increase_ms: defaults::max_p99_increase_ms(),
            max_order_failure_ratio_increase: defaults::max_ratio_increase(),
            min_requests: defaults::min_requests(),
        }
    }
}

/// Telemetry beyond metrics.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "camelCase")]
pub struct Observability {
    /// Traces of the app and the sidecar, exported over OTLP/HTTP (protobuf) to an OpenTelemetry
    /// collector. Without it neither program traces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<Tracing>,
    /// CPU profiles of a live pod on demand (pprof's protobuf format; `scripts/profile.sh` turns
    /// one into a flame graph). Without it no pod serves a profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profiling: Option<Profiling>,
}

/// Who may take a profile. The app serves `/debug/pprof/profile?seconds=N` on its admin port
/// (127.0.0.1:9902 in the pod: reach it with `kubectl port-forward`), the sidecar on its admin
/// port (9901); both ask for this token as a bearer token.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "camelCase")]
pub struct Profiling {
    /// The bearer token, a key of a Secret in the MallDeployment's namespace (a long random
    /// value; pods do not start until it exists). The sidecar's `POST /reload` takes the same
    /// token.
    pub token_secret: SecretValue,
}

/// Where the app and the sidecar send their spans, and how many traces they keep. Both read it
/// from the standard OpenTelemetry variables the operator sets in their containers
/// (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_TRACES_SAMPLER`, ...; docs/operator.md, "Tracing").
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "camelCase")]
pub struct Tracing {
    /// The collector's OTLP/HTTP base URL, such as `http://otel-collector.monitoring:4318`:
    /// `http://` or `https://`, a host, an optional port and path, no query, fragment or
    /// credentials (those go in `headersSecret`). Each program posts to `<endpoint>/v1/traces`.
    #[schemars(length(min = 8, max = 2048), regex(pattern = r"^https?://[^\s/?#@]+(/[^\s?#]*)?$"))]
    #[x_kube(
        validation = Rule::new("!self.endsWith('/v1/traces') && !self.endsWith('/v1/traces/')")
            .message("must be the collector's base URL: each program appends /v1/traces itself")
    )]
    pub endpoint: String,
    /// Share of the traces that start in the mall to keep, from 0 to 1 (default 0.01). A request
    /// that arrives with a W3C `traceparent` follows its caller's decision instead, so 0 keeps
    /// only traces a caller sampled.
    #[serde(default = "defaults::sample_ratio")]
    #[schemars(range(min = 0, max = 1))]
    pub sample_ratio: f64,
    /// Headers sent with every export (an API key for a hosted backend), as a key of a Secret in
    /// the MallDeployment's namespace holding `name=value` pairs separated by commas, values
    /// percent-encoded (the format of `OTEL_EXPORTER_OTLP_HEADERS`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers_secret: Option<SecretValue>,
}

/// The mall's secrets, each a key of a Secret in the MallDeployment's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "camelCase")]
pub struct Auth {
    /// The `admin` account's password (at least 12 characters): the account is created with it,
    /// or its password set to it, when a pod starts. Without it, `admin` exists only in a demo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_password: Option<SecretValue>,
    /// The key that signs login tokens (at least 32 bytes), shared by every pod. Without it the
    /// operator creates the Secret `<name>-jwt` with 48 random bytes (key `secret`) and keeps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_secret: Option<SecretValue>,
}

/// A key of a Secret in the MallDeployment's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretValue {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key within the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// The app container: an image and its resources (seed 003's Deployment by default).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    /// Container image.
    #[serde(default = "defaults::app_image")]
    pub image: String,
    /// CPU request and limit (Kubernetes quantities, e.g. `500m`).
    #[serde(default = "defaults::app_cpu")]
    pub cpu: Quantities,
    /// Memory request and limit (e.g. `512Mi`).
    #[serde(default = "defaults::app_memory")]
    pub memory: Quantities,
}

impl Default for Container {
    fn default() -> Self {
        Container {
            image: defaults::app_image(),
            cpu: defaults::app_cpu(),
            memory: defaults::app_memory(),
        }
    }
}

/// The sidecar container: an image and its resources. Its defaults are its own, field by field,
/// so setting only `image` keeps the sidecar's small requests.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "camelCase")]
pub struct SidecarContainer {
    /// Container image.
    #[serde(default = "defaults::sidecar_image")]
    pub image: String,
    /// CPU request and limit (Kubernetes quantities, e.g. `100m`).
    #[serde(default = "defaults::sidecar_cpu")]
    pub cpu: Quantities,
    /// Memory request and limit (e.g. `64Mi`).
    #[serde(default = "defaults::sidecar_memory")]
    pub memory: Quantities,
}

impl Default for SidecarContainer {
    fn default() -> Self {
        SidecarContainer {
            image: defaults::sidecar_image(),
            cpu: defaults::sidecar_cpu(),
            memory: defaults::sidecar_memory(),
        }
    }
}

/// A request and a limit.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(deny_unknown_fields)]
#[x_kube(
    validation = Rule::new("isQuantity(string(self.request)) && sign(quantity(string(self.request))) >= 0")
        .message("request must be a Kubernetes quantity such as 500m, 2 or 512Mi")
        .field_path(".request"),
    validation = Rule::new("isQuantity(string(self.limit)) && sign(quantity(string(self.limit))) > 0")
        .message("limit must be a positive Kubernetes quantity such as 500m, 2 or 512Mi")
        .field_path(".limit"),
    validation = Rule::new("!isQuantity(string(self.request)) || !isQuantity(string(self.limit)) || quantity(string(self.request)).compareTo(quantity(string(self.limit))) <= 0")
        .message("request must not exceed limit")
        .field_path(".request")
)]
pub struct Quantities {
    /// What the scheduler reserves.
    #[serde(deserialize_with = "quantity")]
    #[schemars(schema_with = "int_or_string")]
    pub request: String,
    /// The most the container may use; tuning reads this.
    #[serde(deserialize_with = "quantity")]
    #[schemars(schema_with = "int_or_string")]
    pub limit: String,
}

/// Kubernetes quantities are written `cpu: 2` as often as `cpu: "2"`.
fn quantity<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Q {
        S(String),
        I(i64),
        F(f64),
    }
    Ok(
        match Q::deserialize(d).map_err(|_| serde::de::Error::custom("expected a quantity such as 500m, 2 or 512Mi"))? {
            Q::S(s) => s,
            Q::I(i) => i.to_string(),
            Q::F(f) => f.to_string(),
        },
    )
}

/// A quantity is never long; the bound also keeps the CEL rules' estimated cost small (the API
/// server estimates an unbounded string at the 3 MiB request limit).
fn int_or_string(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "x-kubernetes-int-or-string": true, "maxLength": 64 })
}

/// A key of a Secret in the MallDeployment's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretKeyRef {
    /// The Secret's name.
    pub name: String,
    /// The key within the Secret.
    #[serde(default = "defaults::url_key")]
    pub key: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "camelCase")]
pub struct Database {
    /// The primary's URL (postgres://, mysql://) in a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<SecretKeyRef>,
    /// Read replicas' URLs, each in a Secret.
    #[serde(default)]
    pub replicas: Vec<SecretKeyRef>,
    /// Connections the database server allows this mall in total; pools are sized so that
    /// `maxReplicas` pods never exceed it.
    #[serde(default = "defaults::connection_budget")]
    #[schemars(range(min = 1, max = 100000))]
    pub connection_budget: u32,
}

impl Default for Database {
    fn default() -> Self {
        Database {
            primary: None,
            replicas: Vec::new(),
            connection_budget: defaults::connection_budget(),
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Redis {
    /// The Redis URL in a Secret.
    pub url: SecretKeyRef,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "camelCase", default)]
pub struct CacheSpec {
    /// Cache responses in the sidecar.
    pub enabled: bool,
    /// Per-route rules; routes without one are not cached by the sidecar.
    #[serde(default = "CacheRule::seed_defaults")]
    #[schemars(length(max = 64))]
    pub rules: Vec<CacheRule>,
}

impl Default for CacheSpec {
    fn default() -> Self {
        CacheSpec {
            enabled: true,
            rules: CacheRule::seed_defaults(),
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "camelCase", default)]
pub struct CompressionSpec {
    /// Compress responses (zstd or gzip) for clients that accept it.
    pub enabled: bool,
    /// Smallest body worth compressing (seed 000: 1 KB).
    #[serde(default = "defaults::min_bytes")]
    #[schemars(range(min = 0, max = 1048576))]
    pub min_bytes: u32,
}

impl Default for CompressionSpec {
    fn default() -> Self {
        CompressionSpec {
            enabled: true,
            min_bytes: defaults::min_bytes(),
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "camelCase", default)]
pub struct RateLimitSpec {
    /// Enforce rate limits in the sidecar.
    pub enabled: bool,
    /// Per-route limits per client address; the sidecar's defaults when omitted. Names are unique.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxItems" = 64, "x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub rules: Option<Vec<LimitRule>>,
    /// Share the limits across pods through `redis` (when set), so they hold as the mall scales.
    #[serde(default = "defaults::yes")]
    pub shared: bool,
    /// The proxies in front of the mall (the ingress controller's pod range, a load balancer's
    /// addresses), as addresses or CIDR ranges: `X-Forwarded-For` is believed only from these,
    /// and limits count per client address behind them. None by default: every peer is the client.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("maxItems" = 32), inner(length(min = 2, max = 43)))]
    pub trusted_proxies: Vec<String>,
    /// Allow a trusted range that covers a whole private block (`10.0.0.0/8`): every pod and node
    /// in it could then choose its own rate-limit key. Refused unless set.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_broad_trusted_proxies: bool,
}

impl Default for RateLimitSpec {
    fn default() -> Self {
        RateLimitSpec {
            enabled: true,
            rules: None,
            shared: true,
            trusted_proxies: Vec::new(),
            allow_broad_trusted_proxies: false,
        }
    }
}

/// Alert thresholds; each alert is also labelled with the MallDeployment's name and namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "camelCase", default)]
pub struct Slo {
    /// HighQPS: requests per second per pod, for 2 minutes (warning).
    pub high_qps: f64,
    /// CriticalQPS: requests per second per pod, for 1 minute (critical, scales up).
    pub critical_qps: f64,
    /// HighResponseTime: p95 in milliseconds, for 3 minutes (scales up).
    pub p95_latency_ms: f64,
    /// HighErrorRate: percentage of 5xx responses, for 2 minutes.
    #[schemars(range(min = 0, max = 100))]
    pub error_rate_percent: f64,
    /// DatabaseConnectionsHigh: percentage of the pool in use, for 5 minutes (scales up).
    #[schemars(range(min = 1, max = 100))]
    pub db_connections_percent: f64,
    /// HighMemoryUsage: percentage of the memory limit, for 5 minutes.
    #[schemars(range(min = 1, max = 100))]
    pub memory_percent: f64,
    /// CacheHitRateLow: sidecar hit ratio below this percentage, for 10 minutes (seed 000: 85).
    #[schemars(range(min = 0, max = 100))]
    pub cache_hit_rate_percent: f64,
}

impl Default for Slo {
    fn default() -> Self {
        Slo {
            high_qps: 1000.0,
            critical_qps: 5000.0,
            p95_latency_ms: 100.0,
            error_rate_percent: 1.0,
            db_connections_percent: 80.0,
            memory_percent: 80.0,
            cache_hit_rate_percent: 85.0,
        }
    }
}

/// Who changes replicas: an HPA on CPU and request rate, the operator on alerts, or both (then
/// alerts raise the HPA's floor instead of fighting it).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AutoscalingMode {
    Hpa,
    Alerts,
    Both,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "camelCase", default)]
pub struct Autoscaling {
    pub mode: AutoscalingMode,
    /// Replicas are multiplied by this on a scale-up alert (seed 001: 2).
    #[schemars(range(min = 1.1, max = 10))]
    pub scale_factor: f64,
    /// Minimum seconds between two alert-driven scale-ups.
    #[schemars(range(min = 0, max = 86400))]
    pub cooldown_seconds: u32,
    /// Seconds all scale-up alerts must stay resolved before scaling back.
    #[schemars(range(min = 0, max = 86400))]
    pub stabilization_seconds: u32,
    /// HPA target: average CPU utilisation percentage.
    #[schemars(range(min = 10, max = 100))]
    pub target_cpu_percent: i32,
    /// Alert-driven scale-down is held while the always-firing `MallMonitoringHeartbeat` alert has
    /// not reached the webhook for this long (once one has): a scale-up alert that "resolves"
    /// because Prometheus or Alertmanager went away must not scale the mall down under load.
    /// 0 turns the guard off.
    #[schemars(range(min = 0, max = 86400))]
    pub monitoring_heartbeat_seconds: u32,
    /// HPA target: requests per second per pod (needs the Prometheus adapter's
    /// `sidecar_http_requests_per_second` pods metric).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_requests_per_second: Option<i32>,
}

impl Default for Autoscaling {
    fn default() -> Self {
        Autoscaling {
            mode: AutoscalingMode::Both,
            scale_factor: 2.0,
            cooldown_seconds: 300,
            stabilization_seconds: 600,
            target_cpu_percent: 70,
            monitoring_heartbeat_seconds: 600,
            target_requests_per_second: None,
        }
    }
}

/// A planned sale. Times are wall-clock times in `timeZone` (daylight saving included), so
/// "09:00 every day in Europe/Berlin" stays 09:00 all year.
///
/// The rules compare the wall-clock times as if they were UTC, as `sale.rs` compares them: both
/// are in the same zone. Whether `timeZone` names a zone the operator knows is beyond CEL; the
/// operator reports that one (`Degraded InvalidSpec`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("timestamp(self.end + (size(self.end) == 16 ? ':00Z' : 'Z')) > timestamp(self.start + (size(self.start) == 16 ? ':00Z' : 'Z'))")
        .message("end must be after start")
        .field_path(".end"),
    validation = Rule::new("self.recurrence == 'none' || timestamp(self.end + (size(self.end) == 16 ? ':00Z' : 'Z')) - timestamp(self.start + (size(self.start) == 16 ? ':00Z' : 'Z')) <= duration(self.recurrence == 'daily' ? '24h' : '168h')")
        .message("a daily window must end within 1 day of its start, a weekly one within 7 days")
        .field_path(".end")
)]
pub struct SaleWindow {
    /// Unique among the windows; shown in status, events and the `window` metric label.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    /// When the sale starts: `YYYY-MM-DDTHH:MM[:SS]` in `timeZone`; with a recurrence, the first one.
    #[schemars(
        length(max = 19),
        regex(pattern = r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])T([01]\d|2[0-3]):[0-5]\d(:[0-5]\d)?$")
    )]
    pub start: String,
    /// When it ends, in the same form: after `start`, and within a day (daily) or a week (weekly).
    #[schemars(
        length(max = 19),
        regex(pattern = r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])T([01]\d|2[0-3]):[0-5]\d(:[0-5]\d)?$")
    )]
    pub end: String,
    /// IANA time zone of `start` and `end`, such as `Europe/Berlin`.
    #[serde(default = "defaults::utc")]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z][-+_/A-Za-z0-9]*$"))]
    pub time_zone: String,
    /// Repeat the window: `none`, `daily` or `weekly`.
    #[serde(default)]
    pub recurrence: Recurrence,
    /// Minutes before `start` from which the window applies, so new pods are running and warm
    /// when the sale opens.
    #[serde(default = "defaults::lead_minutes")]
    #[schemars(range(min = 0, max = 1440))]
    pub lead_minutes: u32,
    /// Replica floor during the window (raises the HPA's minReplicas; in `alerts` mode the
    /// Deployment's replicas). Capped at maxReplicas.
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: i32,
    /// Products every pod loads into its cache before it reports ready.
    #[serde(default)]
    pub hot_products: HotProducts,
    /// Order limit per client during the window (the sidecar's `POST /api/orders` rules);
    /// tighter of this and the usual limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_limit: Option<OrderLimit>,
    /// A waiting room in front of `POST /api/orders` during the window: above the budget,
    /// buyers get a ticket and are admitted in arrival order across every pod (docs/sidecar.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_room: Option<WaitingRoomSpec>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "camelCase")]
pub struct WaitingRoomSpec {
    /// Orders per second the whole fleet admits (what the order path sustains).
    #[schemars(range(min = 0.001))]
    pub admit_per_second: f64,
    /// Admitted at once when nobody waits (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub burst: Option<u32>,
    /// How long after its turn a ticket is still honoured (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub ticket_ttl_seconds: Option<u32>,
    /// How long after its turn a buyer has to come back before the turn passes to the next
    /// buyer, in milliseconds (default 2000): numbers nobody uses do not consume the rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 100, max = 600000))]
    pub no_show_grace_ms: Option<u32>,
    /// New places one client address may take per minute on each pod (default 30; 0: no limit).
    /// Behind an ingress, name it in `spec.rateLimits.trustedProxies` so this counts clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000000))]
    pub numbers_per_address_per_minute: Option<u32>,
    /// A buyer let through gets no new place for this long, in seconds (default 60; 0: at
    /// once): one order per buyer in a sale, however many requests it sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 86400))]
    pub readmit_after_seconds: Option<u32>,
    /// Refusals, and a repeat's own place again, are answered about this many milliseconds late
    /// (default 1000; 0: at once; each from half to one and a half of it): a bot that sends
    /// again as soon as it is answered is slowed to about one request per delay per
    /// connection. New tickets and admissions are never held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10000))]
    pub refusal_delay_ms: Option<u32>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Recurrence {
    #[default]
    None,
    Daily,
    Weekly,
}

/// Which products to warm: these ids, and the `top` most ordered.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "camelCase")]
pub struct HotProducts {
    /// Product ids, warmed first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("maxItems" = 1000))]
    pub ids: Vec<i64>,
    /// How many of the most-ordered products to warm (the app's default is 200).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100000))]
    pub top: Option<u32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "camelCase")]
pub struct OrderLimit {
    /// Sustained orders per second per client.
    #[schemars(range(min = 0.001))]
    pub requests_per_second: f64,
    /// Orders a client may place at once above the sustained rate.
    #[schemars(range(min = 1))]
    pub burst: u32,
}

/// Which sale window applies now, and which comes next.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SaleStatus {
    /// The window in effect (from its lead time to its end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<String>,
    /// When the active window's sale opens (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_start: Option<String>,
    /// When the active window ends and everything returns to the spec (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_end: Option<String>,
    /// The next window to take effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
    /// When it takes effect: its start minus its lead time (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_applies: Option<String>,
    /// When its sale opens (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_start: Option<String>,
}

/// What the operator observed and decided.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MallDeploymentStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Progressing, Degraded, Paused.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Pods the Deployment has.
    #[serde(default)]
    pub replicas: i32,
    /// Pods that pass their readiness probe.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector of the pods (for the scale subresource).
    #[serde(default)]
    pub selector: String,
    /// The sizes chosen from the resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tuning: Option<Tuning>,
    /// The last alert-driven scale decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale: Option<ScaleEvent>,
    /// Alert-driven scaling state, kept here so it survives an operator restart.
    #[serde(default)]
    pub alert_scaling: AlertScaling,
    /// Whether the PrometheusRule and ServiceMonitor are managed and, with a Prometheus URL
    /// configured, whether that Prometheus loaded the rules and scrapes the pods.
    #[serde(default, deserialize_with = "monitoring_status")]
    pub monitoring: MonitoringStatus,
    /// Sale windows: the one in effect and the next.
    #[serde(default)]
    pub sale: SaleStatus,
    /// While a sale's waiting room is on: its decisions, summed over the running pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_room: Option<WaitingRoomStatus>,
    /// With `spec.rollout`: the stable revision, and the canary release in progress or the last
    /// one's outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
}

/// Where a canary release stands (`operator/src/rollout.rs`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// Stable (no release in progress), Progressing, Paused, Promoting (the stable pods take the
    /// new revision), RolledBack (the spec's revision was rolled back; a new change starts a new
    /// release).
    #[serde(default)]
    pub phase: String,
    /// The revision every stable pod runs: a hash of the pod template.
    #[serde(default)]
    pub stable_revision: String,
    /// The spec of the stable revision (JSON), which the stable pods are rendered from while a
    /// canary runs and which a rollback restores.
    #[serde(default)]
    pub stable_spec: String,
    /// The revision under test, while a release is in progress (empty otherwise; always written,
    /// so a status apply clears it).
    #[serde(default)]
    pub canary_revision: String,
    /// The step in progress, from 1.
    #[serde(default)]
    pub step: u32,
    /// The canary's share of the requests now, in percent.
    #[serde(default)]
    pub weight: u8,
    /// Since when the canary pods have been waited for (Unix seconds; 0 while all are ready):
    /// from the release's start, and again from the moment a ready canary lost a pod (an
    /// eviction, a crash, its Deployment deleted). readyTimeoutSeconds runs from it.
    #[serde(default)]
    pub canary_since_unix: i64,
    /// When the current step's window started (Unix seconds; 0 until every pod balances with
    /// the step's weight).
    #[serde(default)]
    pub window_since_unix: i64,
    /// The last revision rolled back, not tried again until the spec changes (empty if none).
    #[serde(default)]
    pub failed_revision: String,
    /// The last judgement, measured against allowed, in words.
    #[serde(default)]
    pub message: String,
}

/// The waiting room's decisions, read from the pods' sidecars (`operator/src/room_counts.rs`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WaitingRoomStatus {
    /// When the pods were read (RFC 3339).
    #[serde(default)]
    pub observed_at: String,
    /// The same instant in Unix seconds (when to read again).
    #[serde(default)]
    pub observed_at_unix: i64,
    /// Running pods.
    #[serde(default)]
    pub pods: u32,
    /// Running pods whose sidecar answered.
    #[serde(default)]
    pub pods_read: u32,
    /// Decisions since each pod started, by outcome: issued, admitted, direct, reused (a buyer
    /// asking again got its own place), no_show (a turn passed over), expired, and the refusals:
    /// unbound (no credentials), address_limited, readmit_refused, rejected.
    #[serde(default)]
    pub decisions: BTreeMap<String, u64>,
}

/// What is known of the mall's monitoring.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MonitoringStatus {
    /// Whether PrometheusRule and ServiceMonitor objects are managed (the Prometheus Operator's
    /// CRDs exist), in words.
    #[serde(default)]
    pub message: String,
    /// With `--prometheus-url`: whether that Prometheus has loaded every alert rule of this mall
    /// (a PrometheusRule its ruleSelector does not match is silently ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules_loaded: Option<bool>,
    /// With `--prometheus-url`: this mall's scrape targets that are up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets_up: Option<u32>,
    /// With `--prometheus-url`: this mall's active scrape targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<u32>,
}

/// Statuses written before `monitoring` became an object held a sentence.
fn monitoring_status<'de, D: serde::Deserializer<'de>>(d: D) -> Result<MonitoringStatus, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Sentence(String),
        Object(MonitoringStatus),
    }
    Ok(match Either::deserialize(d)? {
        Either::Sentence(message) => MonitoringStatus {
            message,
            ..MonitoringStatus::default()
        },
        Either::Object(status) => status,
    })
}

/// What the operator chose for each pod (`tuning.rs` computes it).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Tuning {
    /// App worker threads: floor(CPU limit), at least 1, rounded up where the HPA CPU target needs it.
    pub app_worker_threads: u32,
    /// Primary pool per pod: min(10 per CPU, budget / maxReplicas).
    pub db_max_connections: u32,
    /// Each pool's ceiling from the CPU alone (10 per CPU), in the pods' environment; the share
    /// in force (`dbMaxConnections`) is below it and reaches running pods through a ConfigMap.
    #[serde(default)]
    pub db_pool_ceiling: u32,
    /// Primary connections kept while idle (from the ceiling, within the share).
    pub db_min_connections: u32,
    /// Pool per read replica per pod.
    pub db_replica_max_connections: u32,
    /// App in-process cache: 25 % of its memory limit.
    pub app_cache_bytes: u64,
    /// Sidecar worker threads: floor(its CPU limit), at least 1.
    pub sidecar_threads: u32,
    /// Sidecar response cache: 40 % of its memory limit.
    pub sidecar_cache_bytes: u64,
    /// Database connections the fleet may open at `maxReplicas` (primary only).
    pub fleet_db_connections: u32,
}

/// A condition, as in every Kubernetes status.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Ready, Progressing, Degraded or Paused.
    #[serde(rename = "type")]
    pub type_: String,
    /// True, False or Unknown.
    pub status: String,
    /// A CamelCase word for the cause.
    pub reason: String,
    /// What happened, for people.
    pub message: String,
    /// RFC 3339; changes only when `status` changes.
    pub last_transition_time: String,
    /// The spec generation the condition describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScaleEvent {
    /// RFC 3339.
    pub time: String,
    /// The replica floor before.
    pub from: i32,
    /// The replica floor after.
    pub to: i32,
    /// Which alerts, or their resolution.
    pub reason: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AlertScaling {
    /// Scale-up alerts firing now (by fingerprint).
    #[serde(default)]
    pub firing: Vec<String>,
    /// Unix seconds of the last alert-driven scale-up (the cooldown starts here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_up: Option<i64>,
    /// Unix seconds since when no scale-up alert has fired (the stabilisation window starts here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_since: Option<i64>,
    /// The replica floor before alerts raised it, restored step by step when they resolve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<i32>,
    /// Unix seconds of the last step of an alert-driven scale-down (the next waits a cooldown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_down: Option<i64>,
    /// The floor alerts asked for (replicas in `alerts` mode, the HPA's minReplicas otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floor: Option<i32>,
    /// Unix seconds of the last monitoring heartbeat the webhook received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<i64>,
    /// Pods whose waiting room keeps a line of its own (Redis does not answer it): the
    /// `WaitingRoomLocalLine` alert, firing per pod. Drives the `WaitingRoom` condition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting_room_local: Vec<String>,
}

impl Default for MallDeploymentSpec {
    /// Every field at its schema default (what `spec: {}` becomes).
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("every field has a default")
    }
}

/// Every default of the spec, once: the serde defaults, `Default` impls and so the CRD schema's
/// `default`s all come from here.
pub mod defaults {
    use mall_sidecar_config::Balance;

    use super::Quantities;

    pub const APP_IMAGE: &str = "ghcr.io/mall-operator/mall-app:0.1.0";
    pub const SIDECAR_IMAGE: &str = "ghcr.io/mall-operator/sidecar:0.1.0";

    fn q(request: &str, limit: &str) -> Quantities {
        Quantities {
            request: request.into(),
            limit: limit.into(),
        }
    }
    /// Rollout steps: a tenth of the requests, then half, a minute each.
    pub fn rollout_steps() -> Vec<super::RolloutStep> {
        [10, 50]
            .into_iter()
            .map(|weight| super::RolloutStep {
                weight,
                watch_seconds: watch_seconds(),
            })
            .collect()
    }
    pub fn watch_seconds() -> u32 {
        60
    }
    pub fn ready_timeout_seconds() -> u32 {
        120
    }
    pub fn max_ratio_increase() -> f64 {
        0.01
    }
    pub fn max_p99_increase_ms() -> u32 {
        25
    }
    pub fn min_requests() -> u32 {
        50
    }
    pub fn app_image() -> String {
        APP_IMAGE.into()
    }
    /// Seed 003's Deployment: requests 250m, limits 500m.
    pub fn app_cpu() -> Quantities {
        q("250m", "500m")
    }
    /// Seed 003's Deployment: requests 256Mi, limits 512Mi.
    pub fn app_memory() -> Quantities {
        q("256Mi", "512Mi")
    }
    pub fn sidecar_image() -> String {
        SIDECAR_IMAGE.into()
    }
    /// A proxy needs a fraction of the app's CPU at rest; the limit allows bursts.
    pub fn sidecar_cpu() -> Quantities {
        q("100m", "500m")
    }
    /// The sidecar holds little besides its cache (40 % of the limit).
    pub fn sidecar_memory() -> Quantities {
        q("64Mi", "256Mi")
    }

    pub fn replicas() -> i32 {
        2
    }
    pub fn min_replicas() -> i32 {
        2
    }
    pub fn max_replicas() -> i32 {
        10
    }
    pub fn connection_budget() -> u32 {
        100
    }
    pub fn url_key() -> String {
        "url".into()
    }
    pub fn utc() -> String {
        "UTC".into()
    }
    pub fn lead_minutes() -> u32 {
        15
    }
    pub fn min_bytes() -> u32 {
        1024
    }
    pub fn yes() -> bool {
        true
    }
    pub fn balance() -> Balance {
        Balance::LeastConnections
    }
    /// 1 % of the traces that start in the mall: at a few hundred requests per second per pod
    /// that is still several traces a second to find a slow path in, while export stays a small
    /// cost beside serving; raise it for a quiet mall or while chasing a problem.
    pub fn sample_ratio() -> f64 {
        0.01
    }
}
