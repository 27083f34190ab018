//! What status says, as pure functions of what a reconcile found: conditions (whose
//! `lastTransitionTime` moves only on a flip), the sale windows in effect and their event text,
//! and the `MonitoringVerified` verdict. `controller.rs` writes the result.

use crate::context::rfc3339;
use crate::crd::{Condition, MallDeployment, MallDeploymentStatus};
use crate::{desired, sale};

/// The `SaleWindowStarted` event's note: what the windows in effect change, and only that.
pub(crate) fn sale_started_note(active: &str, until: &str, sale: &sale::SalePlan, spec_floor: i32) -> String {
    let mut changes = vec![format!("replica floor {}", sale.floor.unwrap_or(spec_floor))];
    match (sale.warm_ids.len(), sale.warm_top) {
        (0, None) => {}
        (0, Some(top)) => changes.push(format!("pods warm the {top} most ordered products")),
        (ids, None) => changes.push(format!("pods warm {ids} listed products")),
        (ids, Some(top)) => changes.push(format!("pods warm {ids} listed products and the {top} most ordered")),
    }
    if let Some(l) = &sale.order_limit {
        changes.push(format!(
            "orders limited to {}/s (burst {})",
            l.requests_per_second, l.burst
        ));
    }
    if let Some(room) = &sale.waiting_room {
        changes.push(format!(
            "a waiting room in front of orders admits {}/s for the whole fleet (burst {})",
            room.admit_per_second,
            room.burst.unwrap_or(10)
        ));
    }
    format!("sale window {active} in effect until {until}: {}", changes.join(", "))
}

/// Which windows are in effect at `now`, and which comes next.
pub(crate) fn sale_status(schedule: &sale::Schedule) -> crate::crd::SaleStatus {
    let (active, next) = (&schedule.active, &schedule.next);
    let mut names: Vec<&str> = active.iter().map(|o| o.window.name.as_str()).collect();
    names.dedup();
    crate::crd::SaleStatus {
        active: (!names.is_empty()).then(|| names.join(",")),
        active_start: active.iter().map(|o| o.start).min().map(rfc3339),
        active_end: active.iter().map(|o| o.end).max().map(rfc3339),
        next: next.as_ref().map(|o| o.window.name.clone()),
        next_applies: next.as_ref().map(|o| rfc3339(o.applies)),
        next_start: next.as_ref().map(|o| rfc3339(o.start)),
    }
}

/// Asks the configured Prometheus whether it loaded this mall's rules and scrapes its pods, and
/// says so in `status.monitoring` and the `MonitoringVerified` condition.
pub(crate) async fn verify_monitoring(
    check: &crate::verify::PrometheusCheck,
    md: &MallDeployment,
    tuning: &crate::tuning::Tuning,
    status: &mut MallDeploymentStatus,
) {
    use crate::verify::Verdict;
    let alerts: Vec<String> = crate::alerts::rules(md, tuning).into_iter().map(|r| r.alert).collect();
    let verdict = check
        .verdict(&desired::namespace(md), &desired::name(md), &alerts)
        .await;
    let (ok, reason, message) = match verdict {
        Verdict::Checked {
            rules_found,
            rules_expected,
            targets,
            targets_up,
        } => {
            status.monitoring.rules_loaded = Some(rules_found == rules_expected);
            status.monitoring.targets = Some(targets);
            status.monitoring.targets_up = Some(targets_up);
            if rules_found < rules_expected {
                (
                    false,
                    "RulesNotLoaded",
                    format!("Prometheus has loaded {rules_found} of the {rules_expected} alert rules: its ruleSelector does not select the PrometheusRule's labels (the chart's monitoring.labels)"),
                )
            } else if targets_up == 0 {
                (
                    false,
                    "NoTargetsUp",
                    format!("Prometheus scrapes {targets} targets of this mall, none up: its serviceMonitorSelector does not select the ServiceMonitor's labels, or the pods are down"),
                )
            } else {
                (
                    true,
                    "Verified",
                    format!("Prometheus has loaded every alert rule and scrapes {targets_up} of {targets} targets"),
                )
            }
        }
        Verdict::Unreachable(e) => {
            status.monitoring.rules_loaded = None;
            status.monitoring.targets = None;
            status.monitoring.targets_up = None;
            (false, "PrometheusUnreachable", format!("cannot ask Prometheus: {e}"))
        }
    };
    set_condition(status, md, "MonitoringVerified", ok, reason, &message);
}

/// Sets a condition; `lastTransitionTime` moves only when the status flips.
pub fn set_condition(
    status: &mut MallDeploymentStatus,
    md: &MallDeployment,
    type_: &str,
    on: bool,
    reason: &str,
    message: &str,
) {
    let value = if on { "True" } else { "False" };
    let generation = md.metadata.generation;
    match status.conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != value {
                c.last_transition_time = rfc3339(crate::context::now());
            }
            c.status = value.into();
            c.reason = reason.into();
            c.message = message.into();
            c.observed_generation = generation;
        }
        None => status.conditions.push(Condition {
            type_: type_.into(),
            status: value.into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time: rfc3339(crate::context::now()),
            observed_generation: generation,
        }),
    }
}
