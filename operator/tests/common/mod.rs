//! The in-memory Kubernetes API (`kube-fake-client`) with what a real API server does that the
//! tests depend on and the fake does not model:
//! - every request is recorded (method, path, query, content type, User-Agent), so tests can map
//!   them to RBAC (apiGroup, resource, verb) and count requests per reconcile;
//! - quantities are canonicalised on write (`0.5` -> `500m`, `0.5Gi` -> `512Mi`), as the API
//!   server stores them;
//! - the API can be taken down (connection errors) to model an API server restart.
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
}

impl Recorded {
    pub fn wrap(inner: Client) -> Recorded {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let down = Arc::new(AtomicBool::new(false));
        let service = Layer {
            inner,
            calls: calls.clone(),
            down: down.clone(),
        };
        Recorded {
            client: Client::new(service, "default"),
            calls,
            down,
        }
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
        let inner = self.inner.clone();
        Box::pin(async move {
            let req = canonicalise(req).await?;
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
