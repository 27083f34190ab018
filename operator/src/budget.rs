//! The database connection budget across a change of `maxReplicas`, without restarting pods.
//!
//! Each pod may hold `connectionBudget / maxReplicas` connections (its share, capped by its CPU:
//! `tuning.rs`). The share reaches the app through a ConfigMap it reads at run time
//! (`MALL_DB_ALLOWANCE_FILE`), not through its environment, so a new `maxReplicas` resizes the
//! running pools instead of rolling every pod at the moment a platform team raises the ceiling
//! during a spike. The pods see a ConfigMap change only after the kubelet syncs the volume, so
//! the order of the two changes keeps `pods x share <= budget` at every moment:
//! - the share shrinks (maxReplicas up): the smaller share is written at once, and the HPA's
//!   ceiling stays where the old share allows until every pod has had [`PROPAGATION`] to take
//!   the new one;
//! - the share grows (maxReplicas down): the HPA's ceiling drops at once, and the larger share is
//!   written only once the Deployment runs no more pods than the new ceiling and the pods above
//!   it have had their termination grace period ([`GRACE`]) to close their connections.
//!
//! Pure: the controller reads the live ConfigMap and Deployment and applies the plan.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;

use crate::crd::MallDeployment;
use crate::desired;

/// How long a ConfigMap change takes to reach every pod's app. The kubelet refreshes a pod's
/// ConfigMap volume when it syncs the pod, every `--sync-frequency` (1 min) plus a jitter of up to
/// half of it: 60-90 s (measured on a real kubelet: the slowest pod applied a new share after
/// 73.5 s). Then the app reads the file every 2 s. 120 s covers the jitter's ceiling with about
/// 30 s for a loaded node and the watch that brings the change to the kubelet. A margin rather
/// than evidence: no pod reports which share it applied.
pub const PROPAGATION_SECS: i64 = 120;
/// The kubelet's default `--sync-frequency`, and the jitter it adds to a pod's resync (a factor).
pub const KUBELET_SYNC_SECS: i64 = 60;
pub const KUBELET_SYNC_JITTER: f64 = 0.5;
/// The pods' `terminationGracePeriodSeconds`: a pod being removed may hold its connections
/// this long.
pub const GRACE_SECS: i64 = 30;

pub use crate::desired::{allowance_config_map_name as config_map_name, ALLOWANCE_KEY};
/// The share before the last change (while the pods may still hold it).
const PREVIOUS: &str = "mall.example.com/previous-share";
/// When the share now in the ConfigMap was written (Unix seconds).
const WRITTEN_AT: &str = "mall.example.com/share-written-at";
/// Since when a larger share has been waiting for the extra pods to be gone (Unix seconds).
const PENDING_SINCE: &str = "mall.example.com/larger-share-pending-since";

/// What the live allowance ConfigMap says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub share: u32,
    pub previous: Option<u32>,
    pub written_at: i64,
    pub pending_since: Option<i64>,
}

impl Written {
    /// `share` written now, over `previous` (what the pods may still hold).
    pub fn new(share: u32, previous: Option<u32>, now: i64) -> Written {
        Written {
            share,
            previous,
            written_at: now,
            pending_since: None,
        }
    }

    pub fn read(cm: &ConfigMap) -> Option<Written> {
        let data = cm.data.as_ref()?.get(ALLOWANCE_KEY)?;
        let share = serde_json::from_str::<serde_json::Value>(data).ok()?["primary"].as_u64()? as u32;
        let note = |k: &str| cm.metadata.annotations.as_ref()?.get(k)?.parse::<i64>().ok();
        Some(Written {
            share,
            previous: note(PREVIOUS).map(|p| p as u32),
            written_at: note(WRITTEN_AT).unwrap_or(0),
            pending_since: note(PENDING_SINCE),
        })
    }
}

/// What to write and which replica ceiling is safe now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub written: Written,
    /// The HPA's `maxReplicas` (and the cap on any replica count) for now.
    pub max_replicas: i32,
    /// Why the ceiling or the share waits, for the `ConnectionBudget` condition.
    pub waiting: Option<String>,
    /// When to look again (Unix seconds), while waiting.
    pub recheck_at: Option<i64>,
}

/// `share`: the share for the spec's `maxReplicas` (tuning); `running`: the Deployment's pods
/// (status.replicas, not counting those terminating).
pub fn plan(budget: u32, max_replicas: i32, share: u32, live: Option<&Written>, running: i32, now: i64) -> Plan {
    let allowed_by = |s: u32| (budget / s.max(1)) as i32;
    let Some(live) = live else {
        return Plan {
            written: Written::new(share, None, now),
            max_replicas,
            waiting: None,
            recheck_at: None,
        };
    };
    if share < live.share {
        // Smaller share first; the ceiling follows once the pods have it.
        let held = max_replicas.min(allowed_by(live.share));
        return Plan {
            written: Written::new(share, Some(live.share), now),
            max_replicas: held,
            waiting: (held < max_replicas).then(|| holding(max_replicas, held, live.share, share)),
            recheck_at: (held < max_replicas).then_some(now + PROPAGATION_SECS),
        };
    }
    if share > live.share {
        // The ceiling drops at once; the larger share waits for the extra pods to be gone.
        let pending_since = if running <= max_replicas {
            Some(live.pending_since.unwrap_or(now))
        } else {
            None
        };
        if pending_since.is_some_and(|since| now >= since + GRACE_SECS) {
            return Plan {
                written: Written::new(share, Some(live.share), now),
                max_replicas,
                waiting: None,
                recheck_at: None,
            };
        }
        return Plan {
            written: Written {
                pending_since,
                ..live.clone()
            },
            max_replicas,
            waiting: Some(format!(
                "each pod keeps {} connections until at most {max_replicas} pods run (now {running}) and the others have had {GRACE_SECS} s to close theirs; then {share}",
                live.share
            )),
            recheck_at: Some(pending_since.map_or(now + 5, |s| s + GRACE_SECS)),
        };
    }
    // The share in the ConfigMap is the spec's: the ceiling waits only while the pods may still
    // hold a larger previous share.
    let in_transit = live
        .previous
        .filter(|p| *p > live.share && now < live.written_at + PROPAGATION_SECS);
    let written = Written {
        pending_since: None,
        ..live.clone()
    };
    match in_transit {
        Some(previous) => {
            let held = max_replicas.min(allowed_by(previous));
            Plan {
                written,
                max_replicas: held,
                waiting: (held < max_replicas).then(|| holding(max_replicas, held, previous, share)),
                recheck_at: Some(live.written_at + PROPAGATION_SECS),
            }
        }
        None => Plan {
            written,
            max_replicas,
            waiting: None,
            recheck_at: None,
        },
    }
}

fn holding(max: i32, held: i32, from: u32, to: u32) -> String {
    format!(
        "maxReplicas {max} takes effect once every pod has gone from {from} to {to} database connections (at most {PROPAGATION_SECS} s); until then at most {held} pods"
    )
}

/// The allowance ConfigMap the app mounts (`MALL_DB_ALLOWANCE_FILE`).
pub fn config_map(md: &MallDeployment, written: &Written) -> ConfigMap {
    let mut meta = desired::meta(md, config_map_name(md));
    let mut notes = BTreeMap::from([(WRITTEN_AT.to_string(), written.written_at.to_string())]);
    if let Some(p) = written.previous {
        notes.insert(PREVIOUS.into(), p.to_string());
    }
    if let Some(p) = written.pending_since {
        notes.insert(PENDING_SINCE.into(), p.to_string());
    }
    meta.annotations = Some(notes);
    ConfigMap {
        metadata: meta,
        data: Some(BTreeMap::from([(
            ALLOWANCE_KEY.to_string(),
            serde_json::json!({ "primary": written.share, "replicas": written.share }).to_string(),
        )])),
        ..ConfigMap::default()
    }
}

#[cfg(test)]
mod tests {

    /// Issue 33: 90 s was the jittered resync's ceiling itself, with nothing for the app's read
    /// or a slow node.
    #[test]
    fn propagation_covers_the_kubelets_jittered_resync_with_a_margin() {
        let slowest_resync = (KUBELET_SYNC_SECS as f64 * (1.0 + KUBELET_SYNC_JITTER)) as i64;
        let app_reads_every = 2;
        assert!(
            PROPAGATION_SECS >= slowest_resync + app_reads_every + 15,
            "{PROPAGATION_SECS} s does not cover a {slowest_resync} s resync, the app's {app_reads_every} s and a margin"
        );
    }

    use super::*;

    fn w(share: u32, previous: Option<u32>, written_at: i64) -> Written {
        Written {
            share,
            previous,
            written_at,
            pending_since: None,
        }
    }

    #[test]
    fn raising_max_replicas_writes_the_smaller_share_first_and_holds_the_ceiling() {
        // budget 100: max 10 -> share 10; max 20 -> share 5.
        let p = plan(100, 20, 5, Some(&w(10, None, 0)), 10, 1000);
        assert_eq!((p.written.share, p.written.previous, p.max_replicas), (5, Some(10), 10));
        assert_eq!(p.recheck_at, Some(1000 + PROPAGATION_SECS));
        // Next pass, still within the propagation time: held.
        let p2 = plan(100, 20, 5, Some(&p.written), 10, 1000 + PROPAGATION_SECS - 1);
        assert_eq!(p2.max_replicas, 10);
        // After it: the new ceiling.
        let p3 = plan(100, 20, 5, Some(&p.written), 10, 1000 + PROPAGATION_SECS);
        assert_eq!((p3.max_replicas, p3.waiting), (20, None));
    }

    #[test]
    fn lowering_max_replicas_lowers_the_ceiling_first_and_grows_the_share_after_the_pods_are_gone() {
        let live = w(5, Some(10), 0);
        let p = plan(100, 10, 10, Some(&live), 20, 1000);
        assert_eq!(
            (p.written.share, p.max_replicas, p.written.pending_since),
            (5, 10, None)
        );
        let p = plan(100, 10, 10, Some(&p.written), 10, 1010);
        assert_eq!((p.written.share, p.written.pending_since), (5, Some(1010)));
        let p = plan(100, 10, 10, Some(&p.written), 10, 1010 + GRACE_SECS - 1);
        assert_eq!(p.written.share, 5);
        let p = plan(100, 10, 10, Some(&p.written), 10, 1010 + GRACE_SECS);
        assert_eq!((p.written.share, p.written.previous, p.max_replicas), (10, Some(5), 10));
    }

    #[test]
    fn a_new_mall_gets_its_share_at_once() {
        let p = plan(100, 10, 10, None, 0, 5);
        assert_eq!((p.written.share, p.max_replicas, p.waiting), (10, 10, None));
    }
}
