//! Kubernetes Events (events.k8s.io/v1) on MallDeployments, for `kubectl describe`.
//!
//! kube's `Recorder` folds every event with the same reason into one series that keeps its first
//! note, so `describe` showed "ScaledUp replicas 1 -> 2 (x2)" after a 2 -> 4 scale. Here an event
//! is folded into a series only when its note is the same too (client-go's aggregation key includes
//! the message); a new note is a new Event, so the latest one says what last happened.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::Client;
use serde_json::json;
use tokio::sync::Mutex;

/// How long a repeat of the same event joins its series instead of making a new Event (client-go
/// uses a few minutes too).
const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);

#[derive(Hash, PartialEq, Eq, Clone)]
struct Key {
    namespace: String,
    uid: String,
    warning: bool,
    reason: String,
    note: String,
}

struct Seen {
    name: String,
    count: i32,
    last: Instant,
}

pub struct EventRecorder {
    client: Client,
    controller: String,
    instance: String,
    seen: Mutex<HashMap<Key, Seen>>,
}

impl EventRecorder {
    pub fn new(client: Client, controller: &str, instance: Option<String>) -> Self {
        EventRecorder {
            client,
            controller: controller.into(),
            instance: instance.unwrap_or_else(|| controller.to_string()),
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Publishes an Event about `regarding`: a new Event, or the next count of the same one.
    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        warning: bool,
        reason: &str,
        note: &str,
    ) -> Result<(), kube::Error> {
        let namespace = regarding.namespace.clone().unwrap_or_else(|| "default".into());
        let api: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        let key = Key {
            namespace,
            uid: regarding.uid.clone().unwrap_or_default(),
            warning,
            reason: reason.into(),
            note: note.into(),
        };
        let mut seen = self.seen.lock().await;
        seen.retain(|_, s| s.last.elapsed() < SERIES_WINDOW);
        let now = Timestamp::now();
        if let Some(s) = seen.get_mut(&key) {
            s.count += 1;
            s.last = Instant::now();
            let series = EventSeries {
                count: s.count,
                last_observed_time: MicroTime(now),
            };
            let patch = json!({ "series": series });
            let pp = PatchParams {
                field_manager: Some(self.controller.clone()),
                ..PatchParams::default()
            };
            api.patch(&s.name, &pp, &Patch::Merge(&patch)).await?;
            return Ok(());
        }
        let name = format!(
            "{}.{:x}",
            regarding.name.as_deref().unwrap_or("mall"),
            now.as_nanosecond()
        );
        let event = Event {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some(if warning { "Warning" } else { "Normal" }.into()),
            reason: Some(reason.into()),
            action: Some(reason.into()),
            note: Some(note.chars().take(1024).collect()),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Event::default()
        };
        let pp = PostParams {
            field_manager: Some(self.controller.clone()),
            ..PostParams::default()
        };
        api.create(&pp, &event).await?;
        seen.insert(
            key,
            Seen {
                name,
                count: 1,
                last: Instant::now(),
            },
        );
        Ok(())
    }
}
