//! Lease-based leader election (coordination.k8s.io/v1), so two operator replicas can run: one
//! reconciles and answers the webhook, the other waits to take over when the lease expires.
//!
//! Timing follows client-go's leader election: a lease of 15 s, renewed every 2 s (the retry
//! period), and given up only when no renewal has succeeded for 10 s (the renew deadline). An API
//! server outage shorter than the renew deadline therefore does not restart the leader, and the
//! deadline is shorter than the lease, so a standby cannot take over while the old leader still
//! thinks it leads.
//!
//! Also here: what a replica says about its standing (its log, `/ready`), the Lease's owner (the
//! operator's Deployment, so `helm uninstall` leaves no Lease), and the pod label that routes the
//! webhook Service to the leader alone (every replica is Ready, so rollouts can proceed).

use std::hash::{BuildHasher, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::Client;

/// The label the leader puts on its own pod; the chart's webhook Service selects it, so webhook
/// calls reach the leader while every replica (standbys too) is Ready.
pub const LEADER_LABEL: &str = "mall.example.com/leader";

/// client-go's `LeaseDuration`, `RenewDeadline` and `RetryPeriod` defaults.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub lease: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            lease: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// This process's identity in the Lease when `POD_NAME` is not set: the host name plus a random
/// suffix, so two processes on one host (or two pods with a shared name) never both lead.
pub fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "mall-operator".into());
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    format!("{host}-{:08x}", hasher.finish() as u32)
}

pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// Put on the Lease, so the garbage collector deletes it with its owner.
    owner: Option<OwnerReference>,
    standing: Mutex<Standing>,
}

/// What this replica last saw of the Lease.
#[derive(Debug, Clone, Default)]
pub struct Standing {
    pub leading: bool,
    /// Who holds the Lease (another replica while standing by), as last read.
    pub leader: Option<String>,
    /// When the Lease was last read or written successfully.
    pub seen: Option<Instant>,
    /// The last failure to read or write it.
    pub error: Option<String>,
}

impl Standing {
    /// Whether this replica is ready, and what `/ready` says. The leader is; a standby is once it
    /// can read the Lease (so it can take over): readiness gates a rollout, and a standby that
    /// never became Ready held every upgrade (a surge pod is a standby until the old leader goes).
    pub fn readiness(&self, identity: &str, within: Duration) -> (bool, String) {
        if self.leading {
            return (true, format!("leader: {identity}\n"));
        }
        let fresh = self.seen.is_some_and(|t| t.elapsed() < within);
        match (&self.leader, fresh) {
            (Some(leader), true) => (
                true,
                format!(
                    "standby: {leader} leads; {identity} takes over when it releases the Lease or stops renewing it\n"
                ),
            ),
            (None, true) => (
                true,
                format!("standby: the Lease is free; {identity} takes it at its next try\n"),
            ),
            (_, false) => (
                false,
                format!(
                    "standby: cannot read the Lease{}\n",
                    self.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
                ),
            ),
        }
    }
}

impl Elector {
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str, duration: Duration) -> Self {
        Elector {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            duration,
            owner: None,
            standing: Mutex::default(),
        }
    }

    /// Makes `owner` the Lease's owner (set on create, added on the next renewal otherwise).
    pub fn with_owner(mut self, owner: Option<OwnerReference>) -> Self {
        self.owner = owner;
        self
    }

    pub fn standing(&self) -> Standing {
        self.standing.lock().expect("standing lock").clone()
    }

    fn saw(&self, result: &Result<(bool, Option<String>), kube::Error>) {
        let mut standing = self.standing.lock().expect("standing lock");
        match result {
            Ok((leading, leader)) => {
                standing.leading = *leading;
                standing.leader = leader.clone();
                standing.seen = Some(Instant::now());
                standing.error = None;
            }
            Err(e) => standing.error = Some(e.to_string()),
        }
    }

    /// Waits until this process holds the lease, trying every retry period. A standby says so in
    /// its log, and again whenever the holder changes.
    pub async fn acquire(&self, timing: Timing) {
        let mut said: Option<Option<String>> = None;
        loop {
            match tokio::time::timeout(timing.retry_period, self.try_lead(Timestamp::now())).await {
                Ok(Ok(true)) => return,
                Ok(Ok(false)) => {
                    let leader = self.standing().leader;
                    if said.as_ref() != Some(&leader) {
                        match &leader {
                            Some(leader) => tracing::info!(
                                identity = %self.identity,
                                %leader,
                                "standby: {leader} leads; taking over when it releases the Lease or stops renewing it"
                            ),
                            None => tracing::info!(identity = %self.identity, "standby: the Lease is free; taking it"),
                        }
                        said = Some(leader);
                    }
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "leader election"),
                Err(_) => tracing::warn!("leader election: the API server did not answer in time"),
            }
            tokio::time::sleep(timing.retry_period).await;
        }
    }

    /// Renews the held lease every retry period and returns (why) once leadership is lost: another
    /// holder took it, or no renewal succeeded for the renew deadline. Failed renewals before the
    /// deadline are retried, not fatal.
    pub async fn hold(&self, timing: Timing) -> String {
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(timing.retry_period).await;
            match tokio::time::timeout(timing.retry_period, self.try_lead(Timestamp::now())).await {
                Ok(Ok(true)) => renewed = Instant::now(),
                Ok(Ok(false)) => return "another replica holds the lease".into(),
                Ok(Err(e)) => tracing::warn!(error = %e, "lease renewal failed; retrying"),
                Err(_) => tracing::warn!("lease renewal timed out; retrying"),
            }
            if renewed.elapsed() >= timing.renew_deadline {
                return format!(
                    "no lease renewal succeeded for {} s (the renew deadline)",
                    timing.renew_deadline.as_secs_f64()
                );
            }
        }
    }

    /// Gives the lease up on shutdown (SIGTERM), so a standby leads at its next try (within the
    /// retry period) instead of after the lease expires: the holder is emptied, as client-go's
    /// `ReleaseOnCancel` does, and the Lease kept with its `leaseTransitions`, the history read
    /// when something flaps (deleting it reset the count to 0). The write carries our
    /// resourceVersion: a lease another replica took meanwhile is left alone. Returns whether it
    /// was ours. (`helm uninstall` removes the Lease through its owner, the Deployment.)
    pub async fn release(&self) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(false);
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(false);
        }
        spec.holder_identity = None;
        spec.acquire_time = None;
        spec.renew_time = None;
        match self.api.replace(&self.name, &post_params(), &lease).await {
            Ok(_) => Ok(true),
            // Renewed or taken meanwhile (a conflict), or already gone.
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Takes or renews the lease; `Ok(true)` while we hold it. A lost race is `Ok(false)`.
    pub async fn try_lead(&self, now: Timestamp) -> Result<bool, kube::Error> {
        let result = self.try_lead_seeing(now).await;
        self.saw(&result);
        result.map(|(leading, _)| leading)
    }

    /// As `try_lead`, with the holder seen (or taken over).
    async fn try_lead_seeing(&self, now: Timestamp) -> Result<(bool, Option<String>), kube::Error> {
        let secs = self.duration.as_secs() as i32;
        let me = Some(self.identity.clone());
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    owner_references: self.owner.clone().map(|o| vec![o]),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: me.clone(),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            let created = conflict_is_false(self.api.create(&post_params(), &lease).await.map(|_| true))?;
            return Ok((created, created.then_some(self.identity.clone())));
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let ours = holder == me;
        // Released (no holder), or not renewed within its duration.
        let expired = holder.is_none()
            || match (&spec.renew_time, spec.lease_duration_seconds) {
                (Some(MicroTime(renewed)), Some(d)) => now.as_second() > renewed.as_second() + d as i64,
                _ => true,
            };
        if !ours && !expired {
            return Ok((false, holder));
        }
        if !ours {
            spec.holder_identity = me;
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(secs);
        if let Some(owner) = &self.owner {
            let owners = lease.metadata.owner_references.get_or_insert_with(Vec::new);
            if !owners.iter().any(|o| o.uid == owner.uid) {
                owners.push(owner.clone());
            }
        }
        // `replace` carries the resourceVersion we read: two candidates cannot both win.
        let won = conflict_is_false(self.api.replace(&self.name, &post_params(), &lease).await.map(|_| true))?;
        Ok((won, if won { Some(self.identity.clone()) } else { holder }))
    }
}

/// The operator's own Deployment as the Lease's owner: `helm uninstall` deletes the Deployment,
/// and the garbage collector the Lease with it, whatever the order in which Helm removes the
/// RBAC (the release on SIGTERM then fails with 403). A Lease re-created by a renewal in that
/// window names the same, gone, owner and is collected too.
pub async fn deployment_owner(client: &Client, namespace: &str, name: &str) -> Result<OwnerReference, kube::Error> {
    let deployment = Api::<Deployment>::namespaced(client.clone(), namespace)
        .get(name)
        .await?;
    Ok(OwnerReference {
        api_version: "apps/v1".into(),
        kind: "Deployment".into(),
        name: name.into(),
        uid: deployment.metadata.uid.unwrap_or_default(),
        ..OwnerReference::default()
    })
}

/// Puts `LEADER_LABEL` on this replica's pod (leading) or takes it off (at start: a container
/// restarted after losing the Lease must not keep receiving webhook calls).
pub async fn label_pod(client: &Client, namespace: &str, pod: &str, leading: bool) -> Result<(), kube::Error> {
    let value = if leading {
        serde_json::json!("true")
    } else {
        serde_json::Value::Null
    };
    let patch = serde_json::json!({ "metadata": { "labels": { LEADER_LABEL: value } } });
    let params = PatchParams {
        field_manager: Some(crate::context::MANAGER.into()),
        ..PatchParams::default()
    };
    Api::<Pod>::namespaced(client.clone(), namespace)
        .patch(pod, &params, &Patch::Merge(&patch))
        .await?;
    Ok(())
}

fn post_params() -> PostParams {
    PostParams {
        field_manager: Some(crate::context::MANAGER.into()),
        ..PostParams::default()
    }
}

fn conflict_is_false(r: Result<bool, kube::Error>) -> Result<bool, kube::Error> {
    match r {
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        other => other,
    }
}
