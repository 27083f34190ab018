//! Alert-driven autoscaling: Alertmanager (webhook payload version 4) posts firing and resolved
//! alerts; those labelled `action: scale_up` multiply the mall's replica floor by `scaleFactor`
//! within min/max, at most once per cooldown, and the floor returns to where it was once every such
//! alert has stayed resolved for the stabilisation window. The state lives in the MallDeployment's
//! status, so an operator restart forgets nothing. In `hpa` and `both` modes the floor is the HPA's
//! `minReplicas` (the HPA still owns replicas); in `alerts` mode it is `spec.replicas`.
//!
//! The decisions are pure functions (`on_alerts`, `settle`); `handle` does the I/O.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use kube::api::{Api, Patch, PatchParams};
use kube::ResourceExt;
use serde::Deserialize;
use serde_json::json;

pub use crate::context::now;
use crate::context::{rfc3339, Context, AUTOSCALER_MANAGER};
use crate::crd::{AlertScaling, AutoscalingMode, MallDeployment, MallDeploymentSpec, ScaleEvent};

/// Every write of the autoscaler names its own field manager.
fn autoscaler_params() -> PatchParams {
    PatchParams {
        field_manager: Some(AUTOSCALER_MANAGER.into()),
        ..PatchParams::default()
    }
}

/// The replica floor alerts scale from: spec.replicas in `alerts` mode, else the HPA's floor.
pub fn current_floor(md: &MallDeployment) -> i32 {
    let state = md.status.as_ref().map(|s| &s.alert_scaling);
    match md.spec.autoscaling.mode {
        AutoscalingMode::Alerts => md.spec.replicas,
        _ => state.and_then(|s| s.floor).unwrap_or(md.spec.min_replicas),
    }
}

/// In `alerts` mode scaling writes spec.replicas (what `kubectl scale` writes too); otherwise the
/// floor lives in the status and the reconciler carries it into the HPA.
pub async fn apply_scale(mds: &Api<MallDeployment>, md: &MallDeployment, replicas: i32) -> Result<(), kube::Error> {
    if md.spec.autoscaling.mode == AutoscalingMode::Alerts {
        let patch = json!({ "spec": { "replicas": replicas } });
        mds.patch(&md.name_any(), &autoscaler_params(), &Patch::Merge(&patch))
            .await?;
    }
    Ok(())
}

/// A replica change decided by the autoscaler.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleChange {
    pub from: i32,
    pub to: i32,
    pub reason: String,
}

impl ScaleChange {
    pub fn event(&self, now: i64) -> ScaleEvent {
        ScaleEvent {
            time: rfc3339(now),
            from: self.from,
            to: self.to,
            reason: self.reason.clone(),
        }
    }
}

/// The new state and the change to make, if any.
#[derive(Debug, Clone, PartialEq)]
pub struct Settled {
    pub state: AlertScaling,
    pub change: Option<ScaleChange>,
}

/// One alert of the payload, reduced to what scaling needs.
#[derive(Debug, Clone)]
pub struct AlertView {
    pub firing: bool,
    pub fingerprint: String,
    pub name: String,
}

/// Folds a payload's alerts for one MallDeployment into its state. `floor` is the current floor.
pub fn on_alerts(
    spec: &MallDeploymentSpec,
    state: &AlertScaling,
    floor: i32,
    alerts: &[AlertView],
    now: i64,
) -> Settled {
    let mut s = state.clone();
    for a in alerts {
        s.firing.retain(|f| f != &a.fingerprint);
        if a.firing {
            s.firing.push(a.fingerprint.clone());
        }
    }
    s.firing.sort();
    if s.firing.is_empty() {
        if s.baseline.is_some() && s.resolved_since.is_none() {
            s.resolved_since = Some(now);
        }
        return settle(spec, &s, floor, now);
    }
    s.resolved_since = None;
    let a = &spec.autoscaling;
    let cooled = s.last_scale_up.is_none_or(|t| now - t >= a.cooldown_seconds as i64);
    let target = ((floor as f64) * a.scale_factor).ceil() as i32;
    let target = target.clamp(spec.min_replicas, spec.max_replicas);
    if !cooled || target <= floor {
        return Settled { state: s, change: None };
    }
    let names: Vec<&str> = alerts.iter().filter(|a| a.firing).map(|a| a.name.as_str()).collect();
    s.baseline = s.baseline.or(Some(floor));
    s.floor = Some(target);
    s.last_scale_up = Some(now);
    Settled {
        state: s,
        change: Some(ScaleChange {
            from: floor,
            to: target,
            reason: format!("alerts firing: {}", names.join(", ")),
        }),
    }
}

/// Whether monitoring has gone quiet: heartbeats arrived once and none for the configured window.
/// While it has, a resolved scale-up alert proves nothing, so no alert-driven scale-down happens.
pub fn monitoring_stale(spec: &MallDeploymentSpec, state: &AlertScaling, now: i64) -> bool {
    let window = spec.autoscaling.monitoring_heartbeat_seconds as i64;
    window > 0 && state.last_heartbeat.is_some_and(|t| now - t > window)
}

/// When the next step of a scale-back is due: the stabilisation window after the alerts
/// resolved, and a cooldown after the previous step.
fn step_due(spec: &MallDeploymentSpec, state: &AlertScaling, since: i64) -> i64 {
    let a = &spec.autoscaling;
    let after_window = since + a.stabilization_seconds as i64;
    let after_step = state
        .last_scale_down
        .map_or(i64::MIN, |t| t + a.cooldown_seconds as i64);
    after_window.max(after_step)
}

/// Scales back towards the baseline once no scale-up alert has fired for the stabilisation
/// window, one step per cooldown (the floor divided by `scaleFactor`: the scale-ups in reverse),
/// and only while monitoring is alive (see `monitoring_stale`).
pub fn settle(spec: &MallDeploymentSpec, state: &AlertScaling, floor: i32, now: i64) -> Settled {
    let mut s = state.clone();
    if monitoring_stale(spec, state, now) {
        return Settled { state: s, change: None };
    }
    let (true, Some(baseline), Some(since)) = (s.firing.is_empty(), s.baseline, s.resolved_since) else {
        return Settled { state: s, change: None };
    };
    let due = step_due(spec, state, since);
    // Monitoring must be seen alive after the step fell due: when Prometheus dies, Alertmanager
    // resolves its alerts and the heartbeat together, so "resolved, and no heartbeat since" is
    // monitoring's death, not the end of the load.
    if now < due || !heartbeat_after(spec, state, due) {
        return Settled { state: s, change: None };
    }
    let baseline = baseline.clamp(spec.min_replicas, spec.max_replicas);
    let step = ((floor as f64) / spec.autoscaling.scale_factor).ceil() as i32;
    let to = step.clamp(baseline, floor.max(baseline));
    if to <= baseline {
        s.baseline = None;
        s.floor = None;
        s.resolved_since = None;
        s.last_scale_down = None;
    } else {
        s.floor = Some(to);
        s.last_scale_down = Some(now);
    }
    let window = spec.autoscaling.stabilization_seconds;
    let change = (to != floor).then(|| ScaleChange {
        from: floor,
        to,
        reason: if to > baseline {
            format!("scale-up alerts resolved for {window} s: one step down per cooldown, towards {baseline}")
        } else {
            format!("scale-up alerts resolved for {window} s: back to {baseline}")
        },
    });
    Settled { state: s, change }
}

/// When the next scale-back step is due, if one is pending.
pub fn next_check(spec: &MallDeploymentSpec, state: &AlertScaling, now: i64) -> Option<Duration> {
    let (true, Some(_), Some(since)) = (state.firing.is_empty(), state.baseline, state.resolved_since) else {
        return None;
    };
    let due = step_due(spec, state, since);
    // Held while monitoring is stale or has not been seen since the step fell due: look again in
    // a minute (the next heartbeat wakes the reconciler anyway).
    if monitoring_stale(spec, state, now) || (now >= due && !heartbeat_after(spec, state, due)) {
        return Some(Duration::from_secs(60));
    }
    Some(Duration::from_secs((due - now).max(1) as u64))
}

/// Alertmanager's webhook payload, version 4 (unknown fields are Alertmanager's business).
#[derive(Debug, Deserialize)]
pub struct Payload {
    pub version: String,
    pub alerts: Vec<Alert>,
}

#[derive(Debug, Deserialize)]
pub struct Alert {
    pub status: String,
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub fingerprint: String,
}

/// Parses and checks a payload; the error names what is wrong.
pub fn parse(body: &[u8]) -> Result<Payload, String> {
    let payload: Payload = serde_json::from_slice(body).map_err(|e| format!("invalid payload: {e}"))?;
    if payload.version != "4" {
        return Err(format!("version: expected \"4\", got {:?}", payload.version));
    }
    for (i, a) in payload.alerts.iter().enumerate() {
        if a.status != "firing" && a.status != "resolved" {
            return Err(format!(
                "alerts[{i}].status: expected firing or resolved, got {:?}",
                a.status
            ));
        }
    }
    Ok(payload)
}

pub struct Webhook {
    pub ctx: Arc<Context>,
    pub token: String,
}

/// `POST /alerts`: 200 with what was done, 400 on a bad payload, 401 without the token.
pub async fn handle(State(hook): State<Arc<Webhook>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let m = &hook.ctx.metrics;
    let presented = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if !presented.is_some_and(|t| constant_time_eq(t.as_bytes(), hook.token.as_bytes())) {
        m.webhook.with_label_values(&["unauthorized"]).inc();
        return (StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n").into_response();
    }
    let payload = match parse(&body) {
        Ok(p) => p,
        Err(message) => {
            m.webhook.with_label_values(&["bad_request"]).inc();
            return (StatusCode::BAD_REQUEST, axum::Json(json!({ "error": message }))).into_response();
        }
    };
    // Heartbeats first, so the scale decisions below see monitoring alive.
    let mut heartbeats = 0;
    for a in &payload.alerts {
        if a.status != "firing" || a.labels.get("action").map(String::as_str) != Some("heartbeat") {
            continue;
        }
        let (Some(ns), Some(name)) = (a.labels.get("namespace"), a.labels.get("malldeployment")) else {
            continue;
        };
        if let Err(e) = record_heartbeat(&hook.ctx, ns, name, now()).await {
            m.webhook.with_label_values(&["error"]).inc();
            tracing::error!(%ns, %name, error = %e, "heartbeat not recorded");
            return (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response();
        }
        heartbeats += 1;
    }
    // Pods whose waiting room keeps its own line (the `WaitingRoom` condition says so).
    let mut rooms: BTreeMap<(String, String), Vec<(String, bool)>> = BTreeMap::new();
    for a in &payload.alerts {
        if a.labels.get("action").map(String::as_str) != Some("waiting_room") {
            continue;
        }
        let (Some(ns), Some(name), Some(pod)) = (
            a.labels.get("namespace"),
            a.labels.get("malldeployment"),
            a.labels.get("pod"),
        ) else {
            m.webhook.with_label_values(&["unknown_target"]).inc();
            continue;
        };
        rooms
            .entry((ns.clone(), name.clone()))
            .or_default()
            .push((pod.clone(), a.status == "firing"));
    }
    for ((ns, name), pods) in rooms {
        if let Err(e) = record_waiting_room(&hook.ctx, &ns, &name, &pods).await {
            m.webhook.with_label_values(&["error"]).inc();
            tracing::error!(%ns, %name, error = %e, "waiting-room alert not recorded");
            return (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response();
        }
    }
    // Group scale-up alerts by the MallDeployment they name.
    let mut targets: BTreeMap<(String, String), Vec<AlertView>> = BTreeMap::new();
    for a in &payload.alerts {
        if a.labels.get("action").map(String::as_str) != Some("scale_up") {
            continue;
        }
        let (Some(ns), Some(name)) = (a.labels.get("namespace"), a.labels.get("malldeployment")) else {
            m.webhook.with_label_values(&["unknown_target"]).inc();
            continue;
        };
        let fingerprint = if a.fingerprint.is_empty() {
            format!("{:?}", a.labels)
        } else {
            a.fingerprint.clone()
        };
        targets.entry((ns.clone(), name.clone())).or_default().push(AlertView {
            firing: a.status == "firing",
            fingerprint,
            name: a.labels.get("alertname").cloned().unwrap_or_default(),
        });
    }
    let mut results = Vec::new();
    for ((ns, name), alerts) in targets {
        match apply_alerts(&hook.ctx, &ns, &name, &alerts, now()).await {
            Ok(Some(change)) => {
                results.push(json!({ "target": format!("{ns}/{name}"), "from": change.from, "to": change.to }))
            }
            Ok(None) => results.push(json!({ "target": format!("{ns}/{name}"), "unchanged": true })),
            Err(e) => {
                m.webhook.with_label_values(&["error"]).inc();
                tracing::error!(%ns, %name, error = %e, "alert scaling failed");
                return (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response();
            }
        }
    }
    m.webhook.with_label_values(&["ok"]).inc();
    axum::Json(json!({ "results": results, "heartbeats": heartbeats })).into_response()
}

/// Whether a heartbeat arrived at or after `t` (always true with the guard off or before the
/// first heartbeat).
fn heartbeat_after(spec: &MallDeploymentSpec, state: &AlertScaling, t: i64) -> bool {
    spec.autoscaling.monitoring_heartbeat_seconds == 0 || state.last_heartbeat.is_none_or(|h| h >= t)
}

/// The state after a heartbeat at `now`. When monitoring had been silent, the quiet it did not
/// see proves nothing: a pending scale-down waits a whole stabilisation window again, observed
/// with monitoring alive (Prometheus also needs its alerts' `for` to fire again after a restart).
pub fn on_heartbeat(spec: &MallDeploymentSpec, state: &AlertScaling, now: i64) -> AlertScaling {
    let mut s = state.clone();
    if monitoring_stale(spec, state, now) && s.resolved_since.is_some() {
        s.resolved_since = Some(now);
    }
    s.last_heartbeat = Some(now);
    s
}

/// Records a monitoring heartbeat for one MallDeployment (`status.alertScaling`).
pub async fn record_heartbeat(ctx: &Context, ns: &str, name: &str, now: i64) -> Result<(), kube::Error> {
    let api: Api<MallDeployment> = Api::namespaced(ctx.client.clone(), ns);
    // A heartbeat for a mall that does not exist (any more) is nothing to record.
    let Some(md) = api.get_opt(name).await? else {
        return Ok(());
    };
    let state = md.status.as_ref().map(|s| s.alert_scaling.clone()).unwrap_or_default();
    let next = on_heartbeat(&md.spec, &state, now);
    let mut alert_scaling = json!({ "lastHeartbeat": now });
    if next.resolved_since != state.resolved_since {
        alert_scaling["resolvedSince"] = json!(next.resolved_since);
    }
    api.patch_status(
        name,
        &autoscaler_params(),
        &Patch::Merge(&json!({ "status": { "alertScaling": alert_scaling } })),
    )
    .await?;
    Ok(())
}

/// The pods whose waiting room keeps its own line, after `alerts` (pod, firing).
pub fn on_waiting_room_alerts(local: &[String], alerts: &[(String, bool)]) -> Vec<String> {
    let mut pods: std::collections::BTreeSet<String> = local.iter().cloned().collect();
    for (pod, firing) in alerts {
        if *firing {
            pods.insert(pod.clone());
        } else {
            pods.remove(pod);
        }
    }
    pods.into_iter().collect()
}

async fn record_waiting_room(
    ctx: &Context,
    ns: &str,
    name: &str,
    alerts: &[(String, bool)],
) -> Result<(), kube::Error> {
    let api: Api<MallDeployment> = Api::namespaced(ctx.client.clone(), ns);
    let Some(md) = api.get_opt(name).await? else {
        return Ok(());
    };
    let local = md
        .status
        .as_ref()
        .map(|s| s.alert_scaling.waiting_room_local.clone())
        .unwrap_or_default();
    let next = on_waiting_room_alerts(&local, alerts);
    if next != local {
        api.patch_status(
            name,
            &autoscaler_params(),
            &Patch::Merge(&json!({ "status": { "alertScaling": { "waitingRoomLocal": next } } })),
        )
        .await?;
    }
    Ok(())
}

/// Applies one MallDeployment's alerts: decides, scales, persists the state. `Ok(None)` when
/// nothing changed (or the target does not exist, which is counted and ignored).
pub async fn apply_alerts(
    ctx: &Context,
    ns: &str,
    name: &str,
    alerts: &[AlertView],
    now: i64,
) -> Result<Option<ScaleChange>, kube::Error> {
    let api: Api<MallDeployment> = Api::namespaced(ctx.client.clone(), ns);
    let Some(md) = api.get_opt(name).await? else {
        ctx.metrics.webhook.with_label_values(&["unknown_target"]).inc();
        tracing::info!(%ns, %name, "alert for an unknown MallDeployment ignored");
        return Ok(None);
    };
    if md.spec.paused || md.metadata.deletion_timestamp.is_some() {
        return Ok(None);
    }
    let state = md.status.as_ref().map(|s| s.alert_scaling.clone()).unwrap_or_default();
    let settled = on_alerts(&md.spec, &state, current_floor(&md), alerts, now);
    if let Some(change) = &settled.change {
        apply_scale(&api, &md, change.to).await?;
        ctx.metrics
            .scale_events
            .with_label_values(&[if change.to > change.from { "up" } else { "down" }])
            .inc();
        tracing::info!(%ns, %name, from = change.from, to = change.to, reason = %change.reason, "alert-driven scale");
        let what = if md.spec.autoscaling.mode == AutoscalingMode::Alerts {
            "replicas"
        } else {
            "HPA minReplicas"
        };
        ctx.event(
            &md,
            false,
            "ScaledUp",
            format!("{what} {} -> {}: {}", change.from, change.to, change.reason),
        )
        .await;
    }
    write_alert_state(
        &api,
        name,
        &settled.state,
        settled.change.as_ref().map(|c| c.event(now)),
    )
    .await?;
    Ok(settled.change)
}

/// The autoscaler's part of the status, as a merge patch so the reconciler's server-side apply of
/// the rest of the status never drops it.
pub async fn write_alert_state(
    api: &Api<MallDeployment>,
    name: &str,
    state: &AlertScaling,
    event: Option<ScaleEvent>,
) -> Result<(), kube::Error> {
    // A merge patch removes a field only when told `null`: cleared values must be sent as such.
    let mut alert_scaling = serde_json::to_value(state).expect("json");
    let fields = alert_scaling.as_object_mut().expect("object");
    // lastHeartbeat is `record_heartbeat`'s alone: the copy in `state` was read earlier and would
    // move a newer heartbeat back (and make monitoring look silent).
    fields.remove("lastHeartbeat");
    for key in ["lastScaleUp", "resolvedSince", "baseline", "floor"] {
        fields.entry(key).or_insert(serde_json::Value::Null);
    }
    let mut status = json!({ "alertScaling": alert_scaling });
    if let Some(event) = event {
        status["lastScale"] = serde_json::to_value(event).expect("json");
    }
    api.patch_status(name, &autoscaler_params(), &Patch::Merge(&json!({ "status": status })))
        .await?;
    Ok(())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> MallDeploymentSpec {
        let md: MallDeployment = serde_json::from_value(json!({
            "apiVersion": "mall.example.com/v1alpha1", "kind": "MallDeployment",
            "metadata": {"name": "t"},
            "spec": {"replicas": 2, "minReplicas": 2, "maxReplicas": 10,
                     "autoscaling": {"mode": "alerts", "scaleFactor": 2.0, "cooldownSeconds": 300, "stabilizationSeconds": 600}}
        }))
        .unwrap();
        md.spec
    }

    fn alert(firing: bool) -> Vec<AlertView> {
        vec![AlertView {
            firing,
            fingerprint: "f1".into(),
            name: "CriticalQPS".into(),
        }]
    }

    #[test]
    fn fire_scale_cooldown_resolve_stabilise() {
        let spec = spec();
        let s0 = AlertScaling::default();
        let up = on_alerts(&spec, &s0, 2, &alert(true), 1000);
        assert_eq!(up.change.as_ref().map(|c| (c.from, c.to)), Some((2, 4)));
        // Alertmanager repeats the same firing alert: no second scale within the cooldown.
        let repeat = on_alerts(&spec, &up.state, 4, &alert(true), 1100);
        assert_eq!(repeat.change, None);
        // After the cooldown a still-firing alert scales again, up to max.
        let again = on_alerts(&spec, &repeat.state, 4, &alert(true), 1400);
        assert_eq!(again.change.as_ref().map(|c| c.to), Some(8));
        let capped = on_alerts(&spec, &again.state, 8, &alert(true), 1800);
        assert_eq!(capped.change.as_ref().map(|c| c.to), Some(10));
        // Resolved: nothing until the stabilisation window has passed, then one step down per
        // cooldown (the floor divided by the scale factor) until the baseline.
        let resolved = on_alerts(&spec, &capped.state, 10, &alert(false), 2000);
        assert_eq!(resolved.change, None);
        assert_eq!(next_check(&spec, &resolved.state, 2000), Some(Duration::from_secs(600)));
        assert_eq!(settle(&spec, &resolved.state, 10, 2599).change, None);
        let first = settle(&spec, &resolved.state, 10, 2600);
        assert_eq!(first.change.as_ref().map(|c| (c.from, c.to)), Some((10, 5)));
        assert_eq!((first.state.floor, first.state.last_scale_down), (Some(5), Some(2600)));
        assert_eq!(settle(&spec, &first.state, 5, 2899).change, None, "within the cooldown");
        assert_eq!(next_check(&spec, &first.state, 2700), Some(Duration::from_secs(200)));
        let second = settle(&spec, &first.state, 5, 2900);
        assert_eq!(second.change.as_ref().map(|c| (c.from, c.to)), Some((5, 3)));
        let back = settle(&spec, &second.state, 3, 3200);
        assert_eq!(back.change.as_ref().map(|c| (c.from, c.to)), Some((3, 2)));
        assert_eq!(
            (
                back.state.baseline,
                back.state.floor,
                back.state.resolved_since,
                back.state.last_scale_down
            ),
            (None, None, None, None)
        );
        assert_eq!(
            back.state.last_scale_up,
            Some(1800),
            "the cooldown survives the scale-back"
        );
        // A firing alert during the window cancels the scale-back.
        let refire = on_alerts(&spec, &resolved.state, 10, &alert(true), 2100);
        assert_eq!(refire.state.resolved_since, None);
        assert_eq!(settle(&spec, &refire.state, 10, 5000).change, None);
    }

    #[test]
    fn no_scale_down_while_monitoring_is_silent() {
        let mut spec = spec();
        spec.autoscaling.monitoring_heartbeat_seconds = 120;
        let mut state = on_alerts(&spec, &AlertScaling::default(), 2, &alert(true), 1000).state;
        state.last_heartbeat = Some(1000);
        // The alert "resolves" because Prometheus went away: the heartbeats stop too.
        let resolved = on_alerts(&spec, &state, 4, &alert(false), 1100).state;
        assert!(!monitoring_stale(&spec, &resolved, 1100));
        assert!(monitoring_stale(&spec, &resolved, 1121 + 100));
        let held = settle(&spec, &resolved, 4, 1100 + 600 + 10);
        assert_eq!(held.change, None, "stale monitoring holds the floor");
        assert_eq!(next_check(&spec, &resolved, 1710), Some(Duration::from_secs(60)));
        // Heartbeats return: the silent stretch proves nothing, so a whole window must pass again,
        // watched, before the scale-down proceeds.
        let alive = on_heartbeat(&spec, &resolved, 1705);
        assert_eq!((alive.last_heartbeat, alive.resolved_since), (Some(1705), Some(1705)));
        assert_eq!(settle(&spec, &alive, 4, 1710).change, None);
        // The window has passed but no heartbeat has come since its end: still held.
        assert_eq!(settle(&spec, &alive, 4, 2310).change, None);
        let mut watched = alive.clone();
        watched.last_heartbeat = Some(2305);
        let back = settle(&spec, &watched, 4, 2310);
        assert_eq!(back.change.map(|c| (c.from, c.to)), Some((4, 2)));
        // A heartbeat while monitoring is alive moves nothing else.
        assert_eq!(on_heartbeat(&spec, &watched, 2310).resolved_since, Some(1705));
        // Each later step of a scale-back also needs monitoring seen alive after it fell due.
        let mut high = watched.clone();
        high.floor = Some(8);
        let step = settle(&spec, &high, 8, 2310);
        assert_eq!(step.change.as_ref().map(|c| (c.from, c.to)), Some((8, 4)));
        let mut next = step.state.clone();
        next.last_heartbeat = Some(2600);
        assert_eq!(
            settle(&spec, &next, 4, 2615).change,
            None,
            "no heartbeat since the step fell due"
        );
        next.last_heartbeat = Some(2612);
        assert_eq!(settle(&spec, &next, 4, 2615).change.map(|c| c.to), Some(2));
        // Never a heartbeat (monitoring not routed to the webhook): the guard does not apply.
        assert!(!monitoring_stale(&spec, &AlertScaling::default(), 99_999));
        spec.autoscaling.monitoring_heartbeat_seconds = 0;
        assert!(!monitoring_stale(&spec, &resolved, 99_999), "0 turns the guard off");
    }

    #[test]
    fn payload_errors_name_the_problem() {
        assert!(parse(b"{").unwrap_err().contains("invalid payload"));
        assert!(parse(br#"{"version":"3","alerts":[]}"#)
            .unwrap_err()
            .contains("version"));
        assert!(parse(br#"{"version":"4","alerts":[{"status":"odd","labels":{}}]}"#)
            .unwrap_err()
            .contains("alerts[0].status"));
        assert!(parse(br#"{"version":"4","alerts":[{"status":"firing","labels":{"a":1}}]}"#).is_err());
        assert_eq!(
            parse(br#"{"version":"4","status":"firing","alerts":[]}"#)
                .unwrap()
                .alerts
                .len(),
            0
        );
    }
}

#[cfg(test)]
mod waiting_room_tests {
    use super::on_waiting_room_alerts;

    #[test]
    fn pods_join_while_firing_and_leave_when_resolved() {
        let local = on_waiting_room_alerts(&[], &[("b".into(), true), ("a".into(), true)]);
        assert_eq!(local, ["a", "b"]);
        let local = on_waiting_room_alerts(&local, &[("a".into(), false), ("a".into(), false)]);
        assert_eq!(local, ["b"]);
    }
}
