//! Reconcile: compute the desired children (pure, `desired.rs`), apply what differs (`apply.rs`,
//! the token Secret in `token_secret.rs`), then write status (`status.rs` says what). Children are
//! read from the watch caches (label-selected: the operator caches its own objects, not the
//! cluster's), so a steady-state pass makes no API request. Which watches trigger a reconcile,
//! and how their failures are kept from the others, is `watches.rs`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::ResourceExt;
use serde_json::{json, Value};

pub use crate::apply::{contains, Outcome};
use crate::apply::{hand_over_replicas, Applier, ChildResult, ChildResults};
use crate::context::{rfc3339, Stores};
pub use crate::context::{Context, MANAGER};
pub use crate::context::{MONITORING_CRDS, MONITORING_PROBE};
use crate::crd::{MallDeployment, MallDeploymentStatus};
use crate::desired::{self, Children};
pub use crate::status::set_condition;
use crate::status::{sale_started_note, sale_status, verify_monitoring};
pub use crate::watches::run;
use crate::{autoscale, budget, rollout, room_counts, sale, token_secret, tuning, validation};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    #[error("serialisation: {0}")]
    Serde(#[from] serde_json::Error),
    /// The children's watches have not listed yet: a reconcile would take every child for missing.
    #[error("the watch caches are not filled after 30 s: can the operator list and watch its children (RBAC)?")]
    CachesNotReady,
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(e)) if e.code == 409 => "conflict",
            Error::Kube(_) => "api",
            Error::InvalidSpec(_) => "invalid_spec",
            Error::Serde(_) => "serde",
            Error::CachesNotReady => "caches_not_ready",
        }
    }
}

pub fn error_policy(md: Arc<MallDeployment>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_errors
        .with_label_values(&[error.metric_label()])
        .inc();
    tracing::warn!(name = %md.name_any(), error = %error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(15))
}

pub async fn reconcile(md: Arc<MallDeployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    if tokio::time::timeout(Duration::from_secs(30), ctx.stores.ready())
        .await
        .is_err()
    {
        return Err(Error::CachesNotReady);
    }
    let started = Instant::now();
    let result = reconcile_once(&md, &ctx, autoscale::now()).await;
    ctx.metrics.reconcile_duration.observe(started.elapsed().as_secs_f64());
    let outcome = match &result {
        Ok((_, o)) if !o.applied.is_empty() || o.status_written => "changed",
        Ok(_) => "unchanged",
        Err(_) => "error",
    };
    ctx.metrics.reconciles.with_label_values(&[outcome]).inc();
    result.map(|(action, _)| action)
}

/// One pass, at `now` (Unix seconds): returns when to look again and what it wrote.
pub async fn reconcile_once(md: &MallDeployment, ctx: &Context, now: i64) -> Result<(Action, Outcome), Error> {
    // Being deleted: the garbage collector removes the children; recreating them (and then
    // patching the status of an object about to vanish) only fights it.
    if md.metadata.deletion_timestamp.is_some() {
        return Ok((Action::await_change(), Outcome::default()));
    }
    let ns = desired::namespace(md);
    let name = desired::name(md);
    let client = &ctx.client;
    let mds: Api<MallDeployment> = Api::namespaced(client.clone(), &ns);
    let old_status = md.status.clone().unwrap_or_default();
    let mut status = old_status.clone();
    status.observed_generation = md.metadata.generation;
    status.selector = desired::selector_string(md);
    let mut outcome = Outcome::default();

    if let Err(message) = validation::validate(md) {
        if !old_status
            .conditions
            .iter()
            .any(|c| c.type_ == "Degraded" && c.reason == "InvalidSpec" && c.message == message)
        {
            ctx.event(md, true, "InvalidSpec", message.clone()).await;
        }
        set_condition(&mut status, md, "Degraded", true, "InvalidSpec", &message);
        set_condition(&mut status, md, "Ready", false, "InvalidSpec", &message);
        outcome.status_written = write_status(&mds, &name, &old_status, &status).await?;
        return Ok((Action::requeue(Duration::from_secs(300)), outcome));
    }
    let tuning = tuning::tune(&md.spec);
    status.tuning = Some(tuning.clone());

    if md.spec.paused {
        if !old_status
            .conditions
            .iter()
            .any(|c| c.type_ == "Paused" && c.status == "True")
        {
            ctx.event(
                md,
                false,
                "Paused",
                "spec.paused is true: children are left alone".into(),
            )
            .await;
        }
        set_condition(
            &mut status,
            md,
            "Paused",
            true,
            "Paused",
            "spec.paused is true: children are left alone",
        );
        outcome.status_written = write_status(&mds, &name, &old_status, &status).await?;
        return Ok((Action::requeue(Duration::from_secs(300)), outcome));
    }
    set_condition(
        &mut status,
        md,
        "Paused",
        false,
        "Reconciling",
        "children follow the spec",
    );

    // Alert-driven scale-back happens on time, not only when a webhook arrives.
    let settled = autoscale::settle(&md.spec, &status.alert_scaling, autoscale::current_floor(md), now);
    if settled.state != status.alert_scaling {
        if let Some(change) = &settled.change {
            autoscale::apply_scale(&mds, md, change.to).await?;
            ctx.metrics.scale_events.with_label_values(&["down"]).inc();
            tracing::info!(%ns, %name, from = change.from, to = change.to, reason = %change.reason, "alert-driven scale back");
            ctx.event(
                md,
                false,
                "ScaledDown",
                format!("replica floor {} -> {}: {}", change.from, change.to, change.reason),
            )
            .await;
        }
        let event = settled.change.as_ref().map(|c| c.event(now));
        autoscale::write_alert_state(&mds, &name, &settled.state, event.clone()).await?;
        status.last_scale = event.or(status.last_scale);
        status.alert_scaling = settled.state;
    }

    // Scale-down without heartbeats would trust a silence that may be monitoring's own outage.
    let heartbeat = status.alert_scaling.last_heartbeat;
    if autoscale::monitoring_stale(&md.spec, &status.alert_scaling, now) {
        let message = format!(
            "no monitoring heartbeat since {}: alert-driven scale-down is held at the current floor",
            rfc3339(heartbeat.unwrap_or_default())
        );
        if !old_status
            .conditions
            .iter()
            .any(|c| c.type_ == "MonitoringStale" && c.status == "True")
        {
            ctx.event(md, true, "MonitoringStale", message.clone()).await;
        }
        set_condition(&mut status, md, "MonitoringStale", true, "NoHeartbeat", &message);
    } else {
        let (reason, message) = match heartbeat {
            Some(_) => ("HeartbeatsArriving", "monitoring heartbeats arrive"),
            None => (
                "NoHeartbeatYet",
                "no monitoring heartbeat received yet: the scale-down guard waits for the first",
            ),
        };
        set_condition(&mut status, md, "MonitoringStale", false, reason, message);
    }

    // The connection budget: the share each pod holds and the replica ceiling that keeps
    // pods x share within the budget while a new maxReplicas takes effect (budget.rs).
    let allowance = md.spec.database.primary.is_some().then(|| {
        let live = Stores::get(&ctx.stores.config_maps, &ns, &budget::config_map_name(md))
            .and_then(|cm| budget::Written::read(&cm));
        let running = Stores::get(&ctx.stores.deployments, &ns, &name)
            .and_then(|d| d.status.as_ref()?.replicas)
            .unwrap_or(0);
        budget::plan(
            md.spec.database.connection_budget,
            md.spec.max_replicas,
            tuning.db_max_connections,
            live.as_ref(),
            running,
            now,
        )
    });
    let ceiling = allowance.as_ref().map_or(md.spec.max_replicas, |p| p.max_replicas);
    match allowance.as_ref().and_then(|p| p.waiting.as_deref()) {
        Some(waiting) => set_condition(&mut status, md, "ConnectionBudget", false, "Waiting", waiting),
        None if allowance.is_some() => set_condition(
            &mut status,
            md,
            "ConnectionBudget",
            true,
            "InEffect",
            &format!(
                "each pod may hold {} database connections; at most {} pods: {} of the {} allowed",
                tuning.db_max_connections,
                md.spec.max_replicas,
                tuning.db_max_connections * md.spec.max_replicas as u32,
                md.spec.database.connection_budget
            ),
        ),
        None => status.conditions.retain(|c| c.type_ != "ConnectionBudget"),
    }
    // The children are built for the ceiling in force.
    let hold = |m: &MallDeployment| -> MallDeployment {
        let mut m = m.clone();
        if ceiling < m.spec.max_replicas {
            m.spec.max_replicas = ceiling;
            m.spec.replicas = m.spec.replicas.min(ceiling);
            m.spec.min_replicas = m.spec.min_replicas.min(ceiling);
        }
        m
    };
    let md_now = &hold(md);

    // Sale windows: what is in effect now, said in status, events and a metric.
    let schedule = sale::Schedule::at(&md.spec, now);
    let sale = schedule.plan(ceiling);
    status.sale = sale_status(&schedule);
    let was = old_status.sale.active.clone();
    if status.sale.active != was {
        match &status.sale.active {
            Some(active) => {
                let message = sale_started_note(
                    active,
                    status.sale.active_end.as_deref().unwrap_or("?"),
                    &sale,
                    md.spec.min_replicas,
                );
                ctx.event(md, false, "SaleWindowStarted", message).await;
            }
            None => {
                let message = format!(
                    "sale window {} ended: floor, warm-up and order limits back to the spec",
                    was.as_deref().unwrap_or("?")
                );
                ctx.event(md, false, "SaleWindowEnded", message).await;
            }
        }
    }
    let gauge = &ctx.metrics.sale_window_active;
    for window in &md.spec.sale_windows {
        let on = sale.windows.contains(&window.name);
        gauge
            .with_label_values(&[ns.as_str(), name.as_str(), window.name.as_str()])
            .set(i64::from(on));
    }
    // A window removed from the spec while in effect would otherwise read 1 forever.
    for gone in was.iter().flat_map(|w| w.split(',')) {
        if !md.spec.sale_windows.iter().any(|w| w.name == gone) {
            let _ = gauge.remove_label_values(&[ns.as_str(), name.as_str(), gone]);
        }
    }
    match (&status.sale.active, &status.sale.next) {
        (Some(active), _) => {
            let message = format!(
                "{active} in effect until {}",
                status.sale.active_end.as_deref().unwrap_or("?")
            );
            set_condition(&mut status, md, "SaleWindow", true, "Active", &message)
        }
        (None, Some(next)) => {
            let message = format!(
                "next: {next}, in effect from {}",
                status.sale.next_applies.as_deref().unwrap_or("?")
            );
            set_condition(&mut status, md, "SaleWindow", false, "Scheduled", &message)
        }
        (None, None) if !md.spec.sale_windows.is_empty() => set_condition(
            &mut status,
            md,
            "SaleWindow",
            false,
            "NoneAhead",
            "no sale window ahead",
        ),
        (None, None) => status.conditions.retain(|c| c.type_ != "SaleWindow"),
    }
    // While a window's waiting room is on: whether every pod admits from the fleet's line.
    // And what it issued, handed back and refused, read from the pods (room_counts.rs).
    if sale.waiting_room.is_some() {
        status.waiting_room = room_counts::refresh(ctx, md, old_status.waiting_room.as_ref(), now).await;
        let counts = status
            .waiting_room
            .as_ref()
            .map(|r| format!("; {}", room_counts::summary(r)))
            .unwrap_or_default();
        let local = &status.alert_scaling.waiting_room_local;
        if local.is_empty() {
            let message = format!("every pod admits from one line through Redis{counts}");
            set_condition(&mut status, md, "WaitingRoom", true, "SharedLine", &message);
        } else {
            let message = format!(
                "{} cannot reach Redis: each admits admitPerSecond / maxReplicas from a line of its own{counts}",
                local.join(", ")
            );
            set_condition(&mut status, md, "WaitingRoom", false, "LocalLines", &message);
        }
    } else {
        status.waiting_room = None;
        status.conditions.retain(|c| c.type_ != "WaitingRoom");
    }

    // Canary releases (rollout.rs): which spec the stable pods run, and the canary's objects.
    let live_stable = Stores::get(&ctx.stores.deployments, &ns, &name);
    let live_canary = Stores::get(&ctx.stores.deployments, &ns, &rollout::canary_name(md));
    let plan = match &md.spec.rollout {
        // Boxed: the release's pass is a large future, and reconcile's is large already.
        Some(r) => Some(
            Box::pin(rollout::step(
                client,
                &ctx.rollout_windows,
                ctx.prometheus.as_ref(),
                md,
                r,
                old_status.rollout.as_ref(),
                rollout::Live {
                    stable: live_stable.as_deref(),
                    canary: live_canary.as_deref(),
                },
                now,
            ))
            .await,
        ),
        None => None,
    };
    // A finished release's canary pods outlive their Deployment by their grace period, under
    // the app's name all along: until none is left, the stable sidecars keep them in a canary
    // group at 0 % (found through the canary's Service, kept as long), or they would take them
    // for stable apps. Only while that Service exists are the pods listed.
    let mut plan = plan;
    if let Some(p) = plan.as_mut().filter(|p| p.canary_weight.is_none()) {
        let canary_service = Stores::get(&ctx.stores.services, &ns, &rollout::canary_service_name(md));
        if canary_service.is_some() && rollout::canary_pods_left(client, md).await {
            p.drain_canary = true;
            p.requeue = Some(rollout::POLL);
        }
    }
    let stable_source = plan.as_ref().and_then(|p| p.stable.as_ref()).map(hold);
    let stable_tuning = stable_source.as_ref().map(|m| tuning::tune(&m.spec));
    let mut children = desired::children(
        stable_source.as_ref().unwrap_or(md_now),
        stable_tuning.as_ref().unwrap_or(&tuning),
        status.alert_scaling.floor,
        &sale,
        &ctx.monitoring_labels,
    );
    if let Some(p) = &plan {
        if p.stable_weight > 0 || p.drain_canary {
            rollout::set_canary(&mut children.config_map, md, p.stable_weight, false);
        }
        let stable_revision = match &p.stable {
            Some(_) => p.status.stable_revision.clone(),
            None => rollout::revision(md),
        };
        children
            .deployment
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(rollout::REVISION.into(), stable_revision);
    }
    let Children {
        deployment,
        service,
        app_service,
        metrics_service,
        config_map,
        hpa,
        pdb,
        prometheus_rule,
        service_monitor,
    } = children;
    let stores = &ctx.stores;
    let pp = PatchParams::apply(MANAGER).force();
    // Each child on its own: a failure is collected and reported, never stops the others.
    let mut children = ChildResults::default();
    let applier = Applier {
        client,
        ns: &ns,
        pp: &pp,
    };
    children.record(applier.apply(&stores.config_maps, &config_map, &mut outcome).await);
    if let Some(plan) = &allowance {
        let cm = budget::config_map(md, &plan.written);
        children.record(applier.apply(&stores.config_maps, &cm, &mut outcome).await);
    }
    children.record(applier.apply(&stores.services, &service, &mut outcome).await);
    children.record(applier.apply(&stores.services, &app_service, &mut outcome).await);
    children.record(applier.apply(&stores.services, &metrics_service, &mut outcome).await);
    if md.spec.auth.jwt_secret.is_none() {
        // Before the Deployment: its pods read the key at start.
        children.record(token_secret::ensure(ctx, md, &ns, &mut outcome).await);
    }
    // A new HPA-mode Deployment starts at the HPA's floor rather than Kubernetes' default of one
    // pod; the field is then handed over and left to the HPA.
    let hpa_floor = hpa
        .as_ref()
        .and_then(|h| h.spec.as_ref())
        .map(|s| s.min_replicas.unwrap_or(1));
    let live_deployment = Stores::get(&stores.deployments, &ns, &name);
    let mut deployment = deployment;
    if let (Some(floor), None, Some(spec)) = (hpa_floor, &live_deployment, deployment.spec.as_mut()) {
        spec.replicas = Some(floor);
    }
    let deployment_result = applier.apply(&stores.deployments, &deployment, &mut outcome).await;
    let deployment_applied = !matches!(deployment_result, ChildResult::Failed(_));
    children.record(deployment_result);
    if let (Some(floor), None, true) = (hpa_floor, &live_deployment, deployment_applied) {
        // Created just now at the floor: hand the field over before the next apply leaves it
        // out. (Should the operator stop between the two writes, the next apply drops the field
        // and Kubernetes defaults it to 1 until the HPA's next sync, as before this existed.)
        children.record(hand_over_replicas(client, &ns, &name, floor).await);
    }
    // The canary's Deployment, ConfigMap and headless Service while a release runs; none after.
    let canary_weight = plan.as_ref().and_then(|p| p.canary_weight);
    match (canary_weight, &plan) {
        (Some(weight), Some(p)) => {
            let stable_replicas = live_stable
                .as_ref()
                .and_then(|d| d.spec.as_ref()?.replicas)
                .unwrap_or(md.spec.replicas);
            let rendered = desired::children(md_now, &tuning, None, &sale, &ctx.monitoring_labels);
            let (mut canary, canary_config, canary_service) =
                rollout::canary_children(rendered, md, rollout::canary_replicas(stable_replicas, weight), weight);
            canary
                .metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(rollout::REVISION.into(), p.status.canary_revision.clone());
            children.record(applier.apply(&stores.config_maps, &canary_config, &mut outcome).await);
            children.record(applier.apply(&stores.services, &canary_service, &mut outcome).await);
            if p.canary_pods {
                children.record(applier.apply(&stores.deployments, &canary, &mut outcome).await);
            }
        }
        _ => {
            let keep_service = plan.as_ref().is_some_and(|p| p.drain_canary);
            for removed in Box::pin(remove_canary(ctx, md, &ns, keep_service, &mut outcome)).await {
                children.record(removed);
            }
        }
    }
    children.record(applier.apply(&stores.pdbs, &pdb, &mut outcome).await);
    match &hpa {
        Some(hpa) => children.record(applier.apply(&stores.hpas, hpa, &mut outcome).await),
        None => {
            let api: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), &ns);
            if Stores::get(&stores.hpas, &ns, &name).is_some_and(|h| {
                h.owner_references()
                    .iter()
                    .any(|o| o.uid == md.uid().unwrap_or_default())
            }) {
                let deleted = api.delete(&name, &Default::default()).await.map(|_| ());
                children.record(ChildResult::from_delete(
                    &format!("HorizontalPodAutoscaler/{name}"),
                    deleted,
                ));
                outcome.applied.push(format!(
                    "HorizontalPodAutoscaler/{name} (deleted: autoscaling.mode is alerts)"
                ));
            }
        }
    }

    // The truth about monitoring, as of this pass: what was applied, what failed, or why not.
    let monitoring_before = children.failed.len();
    status.monitoring.message = if ctx.monitoring_available() {
        children.record(
            applier
                .apply_dynamic(
                    &stores.prometheus_rules,
                    &prometheus_rule,
                    &desired::prometheus_rule_resource(),
                    &mut outcome,
                )
                .await,
        );
        children.record(
            applier
                .apply_dynamic(
                    &stores.service_monitors,
                    &service_monitor,
                    &desired::service_monitor_resource(),
                    &mut outcome,
                )
                .await,
        );
        match &children.failed[monitoring_before..] {
            [] => "PrometheusRule and ServiceMonitor applied".into(),
            failed => format!(
                "not applied: {}",
                failed.iter().map(|f| f.child.as_str()).collect::<Vec<_>>().join(", ")
            ),
        }
    } else {
        "Prometheus Operator CRDs not installed: alert rules and ServiceMonitor skipped (`operator render` prints them)"
            .into()
    };
    for repaired in &children.repaired {
        ctx.metrics
            .child_apply
            .with_label_values(&[repaired.kind(), repaired.how])
            .inc();
        ctx.event(md, true, "DriftRepaired", repaired.message.clone()).await;
    }
    for failed in &children.failed {
        ctx.metrics
            .child_apply
            .with_label_values(&[failed.kind(), "failed"])
            .inc();
    }
    if let Some(check) = &ctx.prometheus {
        verify_monitoring(check, md, &tuning, &mut status).await;
    }

    // Observe the Deployment (from the cache: its status changes arrive through the watch).
    let live: Option<Arc<Deployment>> = Stores::get(&stores.deployments, &ns, &name);
    let live_status = live.as_ref().and_then(|d| d.status.clone()).unwrap_or_default();
    let want = live
        .as_ref()
        .and_then(|d| d.spec.as_ref()?.replicas)
        .unwrap_or(md.spec.replicas);
    status.replicas = live_status.replicas.unwrap_or(0);
    status.ready_replicas = live_status.ready_replicas.unwrap_or(0);
    let updated = live_status.updated_replicas.unwrap_or(0);
    let rolled = live
        .as_ref()
        .is_some_and(|d| d.metadata.generation == live_status.observed_generation);
    let progressing = !rolled || updated < want || status.replicas > want;
    if progressing {
        set_condition(
            &mut status,
            md,
            "Progressing",
            true,
            "RollingOut",
            &format!("{updated} of {want} pods updated"),
        );
    } else {
        set_condition(
            &mut status,
            md,
            "Progressing",
            false,
            "Complete",
            "all pods run the current spec",
        );
    }
    let ready_message = format!("{} of {want} pods ready", status.ready_replicas);
    if status.ready_replicas >= want.max(1) {
        set_condition(&mut status, md, "Ready", true, "AllReady", &ready_message);
    } else {
        set_condition(&mut status, md, "Ready", false, "PodsNotReady", &ready_message);
    }
    if children.failed.is_empty() {
        set_condition(
            &mut status,
            md,
            "Degraded",
            false,
            "Reconciled",
            "the children match the spec",
        );
    } else {
        let message = children
            .failed
            .iter()
            .map(|f| format!("{}: {}", f.child, f.message))
            .collect::<Vec<_>>()
            .join("; ");
        // One event per new failure, not one per retry.
        if !old_status
            .conditions
            .iter()
            .any(|c| c.type_ == "Degraded" && c.reason == "ChildNotApplied" && c.message == message)
        {
            for failed in &children.failed {
                ctx.event(
                    md,
                    true,
                    "ChildNotApplied",
                    format!("{}: {}", failed.child, failed.message),
                )
                .await;
            }
        }
        set_condition(&mut status, md, "Degraded", true, "ChildNotApplied", &message);
    }

    let mut release_running = false;
    match plan {
        Some(p) => {
            let r = &p.status;
            let (ok, reason) = match r.phase.as_str() {
                rollout::phase::ROLLED_BACK => (false, r.phase.as_str()),
                other => (true, other),
            };
            set_condition(&mut status, md, "Rollout", ok, reason, &r.message.clone());
            release_running = !r.canary_revision.is_empty();
            ctx.metrics
                .rollout_weight
                .with_label_values(&[ns.as_str(), name.as_str()])
                .set(if release_running { i64::from(r.weight) } else { 0 });
            if let Some(how) = p.finished {
                ctx.metrics
                    .rollouts
                    .with_label_values(&[ns.as_str(), name.as_str(), how])
                    .inc();
            }
            for (warning, reason, note) in p.events {
                ctx.event(md, warning, reason, note).await;
            }
            if p.clear_annotation {
                let patch = json!({ "metadata": { "annotations": { rollout::ANNOTATION: null } } });
                if let Err(e) = mds.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                    tracing::warn!(%ns, %name, error = %e, "the rollout annotation could not be removed");
                }
            }
            status.rollout = Some(p.status);
        }
        None => {
            status.rollout = None;
            status.conditions.retain(|c| c.type_ != "Rollout");
        }
    }

    outcome.status_written = write_status(&mds, &name, &old_status, &status).await?;
    if !outcome.applied.is_empty() {
        tracing::info!(%ns, %name, applied = ?outcome.applied, "reconciled");
        ctx.event(md, false, "Applied", format!("applied {}", outcome.applied.join(", ")))
            .await;
    }
    let mut next = autoscale::next_check(&md.spec, &status.alert_scaling, now).unwrap_or(Duration::from_secs(300));
    if let Some(check) = &ctx.prometheus {
        // Look again when the Prometheus answer may have changed.
        next = next.min(check.ttl);
    }
    if let Some(at) = schedule.next_change() {
        // Be there when a sale window takes effect or ends.
        next = next.min(Duration::from_secs((at - now).max(1) as u64));
    }
    if let Some(at) = allowance.as_ref().and_then(|p| p.recheck_at) {
        // Be there when the held ceiling or the waiting share can move.
        next = next.min(Duration::from_secs((at - now).max(1) as u64));
    }
    if status.waiting_room.is_some() {
        // Keep the room's counts current while it is on.
        next = next.min(Duration::from_secs(room_counts::REFRESH_SECS as u64));
    }
    if release_running {
        // A release is judged every few seconds.
        next = next.min(rollout::POLL);
    }
    if !children.failed.is_empty() {
        // The others are applied and reported; retry the failed ones as error_policy would.
        ctx.metrics.reconcile_errors.with_label_values(&["child"]).inc();
        next = next.min(Duration::from_secs(15));
    }
    Ok((Action::requeue(next.min(Duration::from_secs(300))), outcome))
}

/// Deletes the canary's Deployment, ConfigMap and headless Service where the caches hold them;
/// the Service stays while `keep_service` (its pods are still terminating).
async fn remove_canary(
    ctx: &Context,
    md: &MallDeployment,
    ns: &str,
    keep_service: bool,
    outcome: &mut Outcome,
) -> Vec<ChildResult> {
    let stores = &ctx.stores;
    let mut results = Vec::new();
    let dp = kube::api::DeleteParams::default();
    let name = rollout::canary_name(md);
    if Stores::get(&stores.deployments, ns, &name).is_some() {
        let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
        let deleted = api.delete(&name, &dp).await.map(|_| ());
        results.push(ChildResult::from_delete(&format!("Deployment/{name}"), deleted));
        outcome
            .applied
            .push(format!("Deployment/{name} (deleted: no release in progress)"));
    }
    let name = rollout::canary_config_map_name(md);
    if Stores::get(&stores.config_maps, ns, &name).is_some() {
        let api: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
        let deleted = api.delete(&name, &dp).await.map(|_| ());
        results.push(ChildResult::from_delete(&format!("ConfigMap/{name}"), deleted));
        outcome.applied.push(format!("ConfigMap/{name} (deleted)"));
    }
    let name = rollout::canary_service_name(md);
    if !keep_service && Stores::get(&stores.services, ns, &name).is_some() {
        let api: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(ctx.client.clone(), ns);
        let deleted = api.delete(&name, &dp).await.map(|_| ());
        results.push(ChildResult::from_delete(&format!("Service/{name}"), deleted));
        outcome.applied.push(format!("Service/{name} (deleted)"));
    }
    results
}

async fn write_status(
    mds: &Api<MallDeployment>,
    name: &str,
    old: &MallDeploymentStatus,
    new: &MallDeploymentStatus,
) -> Result<bool, Error> {
    // The autoscaler owns alertScaling and lastScale (merge-patched, see autoscale.rs).
    let strip = |s: &MallDeploymentStatus| -> Result<Value, Error> {
        let mut v = serde_json::to_value(s)?;
        if let Some(o) = v.as_object_mut() {
            o.remove("alertScaling");
            o.remove("lastScale");
        }
        Ok(v)
    };
    let (old, new) = (strip(old)?, strip(new)?);
    if old == new {
        return Ok(false);
    }
    let patch = json!({ "apiVersion": "mall.example.com/v1alpha1", "kind": "MallDeployment", "status": new });
    mds.patch_status(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch))
        .await?;
    Ok(true)
}
