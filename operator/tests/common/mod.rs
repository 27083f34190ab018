//! The in-memory Kubernetes API (`kube-fake-client`) with what a real API server does that the
//! tests depend on and the fake does not model:
//! - every request is recorded (method, path, query, content type, User-Agent), so tests can map
//!   them to RBAC (apiGroup, resource, verb) and count requests per reconcile;
//! - quantities are canonicalised on write (`0.5` -> `500m`, `0.5Gi` -> `512Mi`), as the API
//!   server stores them;
//! - the API can be taken down (connection errors) to model an API server restart;
//! - a Service's `spec.ports` is merged by server-side apply as the API server merges it: a
//!   list-map keyed by port and protocol, where entries another manager set (kubectl changing a
//!   port) stay beside the applier's, and a merged list with a name twice is refused with the API
//!   server's 422 (`spec.ports[1].name: Duplicate value: "http"`). Only Service ports are merged
//!   so; the fake replaces every other list whole;
//! - chosen writes can be made to fail with a given status (`fail_writes_to`).
//!
//! Not modelled: watches (the fake has none; `Context::sync` stands for a caught-up watch),
//! admission, the garbage collector, RBAC enforcement itself (checked against the chart instead).

#![allow(dead_code)]

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};

use kube::client::Body;
use kube::Client;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub user_agent: Option<String>,
}

/// What RBAC sees of a request: (apiGroup, resource[/subresource], verb, name).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Access {
    pub group: String,
    pub resource: String,
    pub verb: String,
    pub name: Option<String>,
}

impl Call {
    /// The RBAC checks this request needs. A server-side apply is a `patch`, and a `create` when
    /// the object does not exist yet, so it needs both (except on a subresource).
    pub fn accesses(&self) -> Vec<Access> {
        let segments: Vec<&str> = self.path.split('/').filter(|s| !s.is_empty()).collect();
        let (group, rest) = match segments.first() {
            Some(&"api") => (String::new(), &segments[2..]),
            Some(&"apis") => (segments[1].to_string(), &segments[3..]),
            _ => return Vec::new(),
        };
        let rest = if rest.first() == Some(&"namespaces") && rest.len() > 2 {
            &rest[2..]
        } else {
            rest
        };
        let resource = match rest.get(2) {
            Some(sub) => format!("{}/{sub}", rest[0]),
            None => rest[0].to_string(),
        };
        let name = rest.get(1).map(|n| n.to_string());
        let watch = self.query.split('&').any(|kv| kv == "watch=true" || kv == "watch=1");
        let verbs: Vec<&str> = match (self.method.as_str(), &name) {
            ("GET", Some(_)) => vec!["get"],
            ("GET", None) if watch => vec!["watch"],
            ("GET", None) => vec!["list"],
            ("POST", _) => vec!["create"],
            ("PUT", _) => vec!["update"],
            // Applying to a subresource of an existing object is never a create.
            ("PATCH", _) if self.content_type.starts_with("application/apply-patch") && !resource.contains('/') => {
                vec!["patch", "create"]
            }
            ("PATCH", _) => vec!["patch"],
            ("DELETE", Some(_)) => vec!["delete"],
            ("DELETE", None) => vec!["deletecollection"],
            _ => vec![],
        };
        verbs
            .into_iter()
            .map(|verb| Access {
                group: group.clone(),
                resource: resource.clone(),
                verb: verb.into(),
                name: if self.method == "POST" { None } else { name.clone() },
            })
            .collect()
    }

    pub fn is_write(&self) -> bool {
        matches!(self.method.as_str(), "POST" | "PUT" | "PATCH" | "DELETE")
    }

    pub fn field_manager(&self) -> Option<String> {
        self.query
            .split('&')
            .find_map(|kv| kv.strip_prefix("fieldManager="))
            .map(str::to_string)
    }
}

/// A client whose requests go through the recording, canonicalising, fault-injecting layer.
#[derive(Clone)]
pub struct Recorded {
    pub client: Client,
    pub calls: Arc<Mutex<Vec<Call>>>,
    pub down: Arc<AtomicBool>,
    failing: Arc<Mutex<Vec<Failure>>>,
}

/// An injected failure: writes (of `method`, when given) to paths ending with `suffix` answer
/// `code`, `times` times (forever when `None`).
#[derive(Clone)]
struct Failure {
    suffix: String,
    method: Option<String>,
    code: u16,
    times: Option<usize>,
}

impl Recorded {
    pub fn wrap(inner: Client) -> Recorded {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let down = Arc::new(AtomicBool::new(false));
        let failing = Arc::new(Mutex::new(Vec::new()));
        let service = Layer {
            inner,
            calls: calls.clone(),
            down: down.clone(),
            failing: failing.clone(),
            applied_ports: Arc::default(),
        };
        Recorded {
            client: Client::new(service, "default"),
            calls,
            down,
            failing,
        }
    }

    /// Every write whose path ends with `path_suffix` fails with `code` (as an API server would
    /// answer it: a Status body), until `clear_failures`.
    pub fn fail_writes_to(&self, path_suffix: &str, code: u16) {
        self.failing.lock().unwrap().push(Failure {
            suffix: path_suffix.into(),
            method: None,
            code,
            times: None,
        });
    }

    /// The next `times` requests of `method` to paths ending with `path_suffix` answer `code`.
    pub fn fail_next(&self, method: &str, path_suffix: &str, code: u16, times: usize) {
        self.failing.lock().unwrap().push(Failure {
            suffix: path_suffix.into(),
            method: Some(method.into()),
            code,
            times: Some(times),
        });
    }

    pub fn clear_failures(&self) {
        self.failing.lock().unwrap().clear();
    }

    pub fn take(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }

    pub fn snapshot(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
}

#[derive(Clone)]
struct Layer {
    inner: Client,
    calls: Arc<Mutex<Vec<Call>>>,
    down: Arc<AtomicBool>,
    failing: Arc<Mutex<Vec<Failure>>>,
    /// Per Service path: the (port, protocol) keys server-side apply has set, so the keys the
    /// applier owns are told from those another manager set.
    applied_ports: Arc<AppliedPorts>,
}

/// Per Service path, the (port, protocol) keys its server-side applies have set.
type AppliedPorts = Mutex<std::collections::HashMap<String, std::collections::HashSet<(i64, String)>>>;

fn status_response(code: u16, reason: &str, message: String) -> http::Response<Body> {
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    });
    http::Response::builder()
        .status(code)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap()
}

fn port_key(port: &Value) -> (i64, String) {
    (
        port["port"].as_i64().unwrap_or_default(),
        port["protocol"].as_str().unwrap_or("TCP").to_string(),
    )
}

/// Server-side apply of a Service: merges `spec.ports` by key with the live object's and refuses
/// a merged list with a duplicate name, as the API server does. `None` lets the request through.
async fn merge_service_ports(
    inner: &Client,
    applied: &AppliedPorts,
    path: &str,
    body: &Value,
) -> Option<http::Response<Body>> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let ["api", "v1", "namespaces", ns, "services", name] = segments[..] else {
        return None;
    };
    let ours: Vec<Value> = body["spec"]["ports"].as_array().cloned().unwrap_or_default();
    let our_keys: std::collections::HashSet<(i64, String)> = ours.iter().map(port_key).collect();
    let live = kube::Api::<k8s_openapi::api::core::v1::Service>::namespaced(inner.clone(), ns)
        .get_opt(name)
        .await
        .ok()
        .flatten();
    let previously = applied.lock().unwrap().get(path).cloned().unwrap_or_default();
    let mut merged = ours.clone();
    if let Some(live) = live {
        let live = serde_json::to_value(live).unwrap();
        for port in live["spec"]["ports"].as_array().into_iter().flatten() {
            let key = port_key(port);
            // Another manager's entry: kept beside ours.
            if !our_keys.contains(&key) && !previously.contains(&key) {
                merged.push(port.clone());
            }
        }
    }
    let mut names = std::collections::HashSet::new();
    for (i, port) in merged.iter().enumerate() {
        if let Some(n) = port["name"].as_str() {
            if !names.insert(n.to_string()) {
                return Some(status_response(
                    422,
                    "Invalid",
                    format!("Service \"{name}\" is invalid: spec.ports[{i}].name: Duplicate value: \"{n}\""),
                ));
            }
        }
    }
    applied
        .lock()
        .unwrap()
        .entry(path.to_string())
        .or_default()
        .extend(our_keys);
    None
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<http::Response<Body>, kube::Error>> + Send>>;

impl tower::Service<http::Request<Body>> for Layer {
    type Response = http::Response<Body>;
    type Error = kube::Error;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let header = |name: http::header::HeaderName| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        self.calls.lock().unwrap().push(Call {
            method: req.method().to_string(),
            path: req.uri().path().to_string(),
            query: req.uri().query().unwrap_or_default().to_string(),
            content_type: header(http::header::CONTENT_TYPE).unwrap_or_default(),
            user_agent: header(http::header::USER_AGENT),
        });
        if self.down.load(Ordering::SeqCst) {
            return Box::pin(async { Err(kube::Error::Service("connection refused (API server down)".into())) });
        }
        let path = req.uri().path().to_string();
        if req.method() != http::Method::GET {
            let mut failing = self.failing.lock().unwrap();
            let method = req.method().as_str();
            let hit = failing.iter_mut().find(|f| {
                path.ends_with(f.suffix.as_str())
                    && f.method.as_deref().is_none_or(|m| m == method)
                    && f.times != Some(0)
            });
            if let Some(f) = hit {
                if let Some(n) = f.times.as_mut() {
                    *n -= 1;
                }
                let code = f.code;
                let reason = if code == 422 { "Invalid" } else { "InternalError" };
                return Box::pin(
                    async move { Ok(status_response(code, reason, format!("injected failure for {path}"))) },
                );
            }
        }
        let apply = req.method() == http::Method::PATCH
            && header(http::header::CONTENT_TYPE).is_some_and(|c| c.starts_with("application/apply-patch"));
        let inner = self.inner.clone();
        let applied = self.applied_ports.clone();
        Box::pin(async move {
            let req = canonicalise(req).await?;
            if apply {
                let (parts, body) = req.into_parts();
                let bytes = body.collect_bytes().await?;
                if let Ok(value) = serde_json::from_slice::<Value>(&bytes) {
                    if let Some(refused) = merge_service_ports(&inner, &applied, &path, &value).await {
                        return Ok(refused);
                    }
                }
                return inner
                    .send(http::Request::from_parts(parts, Body::from(bytes.to_vec())))
                    .await;
            }
            inner.send(req).await
        })
    }
}

/// Rewrites the quantities of a write's JSON body into their canonical form, as the API server
/// stores them.
async fn canonicalise(req: http::Request<Body>) -> Result<http::Request<Body>, kube::Error> {
    if !matches!(req.method().as_str(), "POST" | "PUT" | "PATCH") {
        return Ok(req);
    }
    let (mut parts, body) = req.into_parts();
    let bytes = body.collect_bytes().await?;
    let body = match serde_json::from_slice::<Value>(&bytes) {
        Ok(mut value) => {
            canonicalise_value(&mut value, None);
            parts.headers.remove(http::header::CONTENT_LENGTH);
            Body::from(serde_json::to_vec(&value).unwrap())
        }
        Err(_) => Body::from(bytes.to_vec()),
    };
    Ok(http::Request::from_parts(parts, body))
}

fn canonicalise_value(value: &mut Value, key: Option<&str>) {
    match value {
        Value::Object(map) => {
            let quantities = matches!(key, Some("requests" | "limits"));
            for (k, v) in map.iter_mut() {
                if let (true, Value::String(q)) = (quantities || k == "averageValue", &*v) {
                    if let Some(c) = mall_operator::quantity::canonical(q) {
                        *v = Value::String(c);
                    }
                    continue;
                }
                canonicalise_value(v, Some(k));
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| canonicalise_value(v, key)),
        _ => {}
    }
}

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Stand-ins for the Prometheus Operator's kinds, so the in-memory API serves them.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(group = "monitoring.coreos.com", version = "v1", kind = "PrometheusRule", namespaced)]
pub struct PrometheusRuleSpec {
    pub groups: Vec<serde_json::Value>,
}

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(group = "monitoring.coreos.com", version = "v1", kind = "ServiceMonitor", namespaced)]
#[serde(rename_all = "camelCase")]
pub struct ServiceMonitorSpec {
    pub selector: serde_json::Value,
    pub endpoints: Vec<serde_json::Value>,
}

pub fn crd_named(name: &str) -> CustomResourceDefinition {
    serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": { "name": name },
        "spec": { "group": "monitoring.coreos.com", "scope": "Namespaced",
                  "names": { "plural": name.split('.').next().unwrap(), "kind": "X" },
                  "versions": [] }
    }))
    .unwrap()
}

/// The grants of the chart's ClusterRole and Role, from `helm template`.
pub fn chart_grants() -> Option<Vec<Value>> {
    let found = std::process::Command::new("helm")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("helm not found: scripts/test.sh installs it (ensure_helm in scripts/lib/services.sh)");
        }
        eprintln!("SKIPPED: helm not installed (scripts/test.sh installs it)");
        return None;
    }
    let chart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/mall-operator");
    let out = std::process::Command::new("helm")
        .args([
            "template",
            "mall-operator",
            chart.to_str().unwrap(),
            "--namespace",
            "mall-system",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut rules = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&String::from_utf8(out.stdout).unwrap()) {
        let v: serde_yaml::Value = serde::Deserialize::deserialize(doc).unwrap();
        let v = serde_json::to_value(v).unwrap();
        if matches!(v["kind"].as_str(), Some("ClusterRole" | "Role")) {
            for rule in v["rules"].as_array().unwrap() {
                rules.push(rule.clone());
            }
        }
    }
    Some(rules)
}

fn list(rule: &Value, key: &str) -> Vec<String> {
    rule[key]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

/// Whether `rule` grants `access` (as the RBAC authorizer matches: group, resource, verb, and
/// resourceNames when the rule lists any).
pub fn grants(rule: &Value, access: &Access) -> bool {
    let names = list(rule, "resourceNames");
    list(rule, "apiGroups").contains(&access.group)
        && list(rule, "resources").contains(&access.resource)
        && list(rule, "verbs").contains(&access.verb)
        && (names.is_empty() || access.name.as_ref().is_some_and(|n| names.contains(n)))
}

/// Every (group, resource, verb, name) a rule grants.
pub fn granted(rule: &Value) -> Vec<Access> {
    let mut out = Vec::new();
    let names = list(rule, "resourceNames");
    for group in list(rule, "apiGroups") {
        for resource in list(rule, "resources") {
            for verb in list(rule, "verbs") {
                if names.is_empty() {
                    out.push(Access {
                        group: group.clone(),
                        resource: resource.clone(),
                        verb: verb.clone(),
                        name: None,
                    });
                }
                for name in &names {
                    out.push(Access {
                        group: group.clone(),
                        resource: resource.clone(),
                        verb: verb.clone(),
                        name: Some(name.clone()),
                    });
                }
            }
        }
    }
    out
}
