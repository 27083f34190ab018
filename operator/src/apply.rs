//! Applying one child: server-side apply under one field manager, skipped when the watch cache
//! already holds every desired field (a steady state writes nothing), and repaired when the API
//! server cannot merge the live object (a 422). Each child's result is its own: a failure is
//! collected and reported, never stops the others.

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use crate::context::{Stores, MANAGER};

/// What one reconcile wrote, for tests and logs.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Outcome {
    pub applied: Vec<String>,
    pub status_written: bool,
}

/// Applies `spec.replicas` alone under `HANDOVER_MANAGER`, not forced: where the HPA already set
/// another value it owns the field and nothing is fought over.
pub(crate) async fn hand_over_replicas(client: &Client, ns: &str, name: &str, replicas: i32) -> ChildResult {
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let patch = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": name },
        "spec": { "replicas": replicas },
    });
    match api
        .patch(
            name,
            &PatchParams::apply(crate::context::HANDOVER_MANAGER),
            &Patch::Apply(&patch),
        )
        .await
    {
        Ok(_) => ChildResult::Ok,
        Err(kube::Error::Api(status)) if status.code == 409 => ChildResult::Ok,
        Err(e) => ChildResult::Failed(Failed {
            child: format!("Deployment/{name}"),
            message: format!("handing spec.replicas over to the HPA: {}", api_message(&e)),
        }),
    }
}

/// One child's apply: done (or already right), repaired after server-side apply could not merge
/// the live object, or failed.
pub enum ChildResult {
    Ok,
    Repaired(Repaired),
    Failed(Failed),
}

impl ChildResult {
    pub(crate) fn from_delete(child: &str, result: Result<(), kube::Error>) -> ChildResult {
        match result {
            Ok(()) => ChildResult::Ok,
            Err(e) => ChildResult::Failed(Failed {
                child: child.into(),
                message: api_message(&e),
            }),
        }
    }
}

pub struct Repaired {
    /// `Kind/name`.
    pub child: String,
    /// `replaced` (a field) or `recreated` (the object).
    pub how: &'static str,
    pub message: String,
}

pub struct Failed {
    /// `Kind/name`.
    pub child: String,
    /// The API server's message.
    pub message: String,
}

fn kind_of(child: &str) -> &str {
    child.split('/').next().unwrap_or_default()
}

impl Repaired {
    pub(crate) fn kind(&self) -> &str {
        kind_of(&self.child)
    }
}

impl Failed {
    pub(crate) fn kind(&self) -> &str {
        kind_of(&self.child)
    }
}

#[derive(Default)]
pub(crate) struct ChildResults {
    pub(crate) repaired: Vec<Repaired>,
    pub(crate) failed: Vec<Failed>,
}

impl ChildResults {
    pub(crate) fn record(&mut self, result: ChildResult) {
        match result {
            ChildResult::Ok => {}
            ChildResult::Repaired(r) => self.repaired.push(r),
            ChildResult::Failed(f) => self.failed.push(f),
        }
    }
}

pub(crate) fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) => format!("{} ({})", status.message, status.code),
        other => other.to_string(),
    }
}

/// The fields whose list-maps server-side apply merges by key (Service ports by port and
/// protocol, containers by name, and the like). A drift keyed differently from what the operator
/// owns (kubectl changing a Service's port) makes the merged object invalid, and the forced
/// apply fails with 422 however often it is retried; replacing these fields with the spec's,
/// then applying again, repairs it. Kinds without an entry are recreated instead: nothing runs
/// from them, so recreating costs nothing.
fn replaceable_fields(kind: &str) -> &'static [&'static str] {
    match kind {
        "Service" => &["/spec/ports"],
        // Recreating a Deployment would delete every pod.
        "Deployment" => &["/spec/template/spec/containers", "/spec/template/spec/volumes"],
        _ => &[],
    }
}

pub(crate) struct Applier<'a> {
    pub(crate) client: &'a Client,
    pub(crate) ns: &'a str,
    pub(crate) pp: &'a PatchParams,
}

impl Applier<'_> {
    /// Applies `desired` unless the live object already holds every field of it (then nothing is
    /// written, so a steady state makes no API writes and no watch events).
    pub(crate) async fn apply<K>(&self, store: &Store<K>, desired: &K, outcome: &mut Outcome) -> ChildResult
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + Serialize
            + DeserializeOwned
            + std::fmt::Debug
            + 'static,
    {
        let api: Api<K> = Api::namespaced(self.client.clone(), self.ns);
        let kind = K::kind(&()).to_string();
        let name = desired.meta().name.clone().unwrap_or_default();
        let want = match serde_json::to_value(desired) {
            Ok(v) => v,
            Err(e) => {
                return ChildResult::Failed(Failed {
                    child: format!("{kind}/{name}"),
                    message: e.to_string(),
                })
            }
        };
        if let Some(live) = Stores::get(store, self.ns, &name) {
            if serde_json::to_value(&*live).is_ok_and(|live| contains(&live, &want)) {
                return ChildResult::Ok;
            }
        }
        let patch = Patch::Apply(desired);
        let result = self
            .apply_repairing(&kind, &name, &want, || api.patch(&name, self.pp, &patch), &api)
            .await;
        if !matches!(result, ChildResult::Failed(_)) {
            outcome.applied.push(format!("{kind}/{name}"));
        }
        result
    }

    pub(crate) async fn apply_dynamic(
        &self,
        store: &Store<DynamicObject>,
        desired: &DynamicObject,
        resource: &ApiResource,
        outcome: &mut Outcome,
    ) -> ChildResult {
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), self.ns, resource);
        let name = desired.name_any();
        let want = serde_json::to_value(desired).unwrap_or_default();
        if let Some(live) = Stores::get_dynamic(store, resource, self.ns, &name) {
            if serde_json::to_value(&*live).is_ok_and(|live| contains(&live, &want)) {
                return ChildResult::Ok;
            }
        }
        let patch = Patch::Apply(desired);
        let result = self
            .apply_repairing(&resource.kind, &name, &want, || api.patch(&name, self.pp, &patch), &api)
            .await;
        if !matches!(result, ChildResult::Failed(_)) {
            outcome.applied.push(format!("{}/{name}", resource.kind));
        }
        result
    }

    /// Applies; on a 422 (the merged object is invalid), replaces the list-map fields with the
    /// spec's or recreates the object, and applies again.
    async fn apply_repairing<K, F, Fut>(
        &self,
        kind: &str,
        name: &str,
        want: &Value,
        apply: F,
        api: &Api<K>,
    ) -> ChildResult
    where
        K: Clone + DeserializeOwned + std::fmt::Debug,
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<K, kube::Error>>,
    {
        let child = format!("{kind}/{name}");
        let refused = match apply().await {
            Ok(_) => return ChildResult::Ok,
            Err(kube::Error::Api(status)) if status.code == 422 => status.message.clone(),
            Err(e) => {
                return ChildResult::Failed(Failed {
                    child,
                    message: api_message(&e),
                })
            }
        };
        let fields = replaceable_fields(kind);
        let how = if fields.is_empty() {
            if let Err(e) = api.delete(name, &Default::default()).await {
                return ChildResult::Failed(Failed {
                    child,
                    message: format!("{refused}; recreating it failed: {}", api_message(&e)),
                });
            }
            "recreated"
        } else {
            // A JSON merge patch (RFC 7386) replaces a list whole, keys and all.
            let mut patch = json!({});
            for path in fields {
                if let Some(value) = want.pointer(path) {
                    let mut at = &mut patch;
                    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
                    for (i, segment) in segments.iter().enumerate() {
                        let next = if i + 1 == segments.len() {
                            value.clone()
                        } else {
                            json!({})
                        };
                        at = at
                            .as_object_mut()
                            .expect("patch levels are objects")
                            .entry(segment.to_string())
                            .or_insert(next);
                    }
                }
            }
            let params = PatchParams {
                field_manager: Some(MANAGER.into()),
                ..PatchParams::default()
            };
            if let Err(e) = api.patch(name, &params, &Patch::Merge(&patch)).await {
                return ChildResult::Failed(Failed {
                    child,
                    message: format!("{refused}; replacing {} failed: {}", fields.join(", "), api_message(&e)),
                });
            }
            "replaced"
        };
        match apply().await {
            Ok(_) => {
                let what = if how == "recreated" {
                    "deleted and created it again".to_string()
                } else {
                    format!("replaced {} with the spec's", fields.join(" and "))
                };
                ChildResult::Repaired(Repaired {
                    message: format!("{child}: server-side apply could not merge the live object ({refused}); {what}"),
                    child,
                    how,
                })
            }
            Err(e) => ChildResult::Failed(Failed {
                child,
                message: format!("{refused}; after the repair: {}", api_message(&e)),
            }),
        }
    }
}

/// Whether every field of `want` is in `live` with the same value (extra live fields are fine:
/// defaults and other managers' fields).
pub fn contains(live: &Value, want: &Value) -> bool {
    match (live, want) {
        (Value::Object(l), Value::Object(w)) => w.iter().all(|(k, wv)| l.get(k).is_some_and(|lv| contains(lv, wv))),
        (Value::Array(l), Value::Array(w)) => l.len() == w.len() && l.iter().zip(w).all(|(lv, wv)| contains(lv, wv)),
        (l, w) => l == w,
    }
}

#[cfg(test)]
mod tests {
    use super::contains;
    use serde_json::json;

    #[test]
    fn contains_ignores_extra_live_fields_but_not_changed_ones() {
        let live = json!({"a": 1, "b": {"c": [1, {"d": 2, "e": 3}]}, "x": true});
        assert!(contains(&live, &json!({"b": {"c": [1, {"d": 2}]}})));
        assert!(!contains(&live, &json!({"b": {"c": [1, {"d": 3}]}})));
        assert!(!contains(&live, &json!({"b": {"c": [1]}})));
        assert!(!contains(&live, &json!({"missing": 1})));
    }
}
