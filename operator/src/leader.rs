//! Lease-based leader election (coordination.k8s.io/v1), so two operator replicas can run: one
//! reconciles and answers the webhook, the other waits to take over when the lease expires.
//!
//! Timing follows client-go's leader election: a lease of 15 s, renewed every 2 s (the retry
//! period), and given up only when no renewal has succeeded for 10 s (the renew deadline). An API
//! server outage shorter than the renew deadline therefore does not restart the leader, and the
//! deadline is shorter than the lease, so a standby cannot take over while the old leader still
//! thinks it leads.

use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::Client;

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
}

impl Elector {
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str, duration: Duration) -> Self {
        Elector {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            duration,
        }
    }

    /// Waits until this process holds the lease, trying every retry period.
    pub async fn acquire(&self, timing: Timing) {
        loop {
            match tokio::time::timeout(timing.retry_period, self.try_lead(Timestamp::now())).await {
                Ok(Ok(true)) => return,
                Ok(Ok(false)) => {}
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
    /// retry period) instead of after the lease expires, and `helm uninstall` leaves no Lease
    /// behind. The Lease is deleted rather than emptied, with our resourceVersion as a
    /// precondition: a lease another replica took meanwhile is left alone. Returns whether it
    /// was ours.
    pub async fn release(&self) -> Result<bool, kube::Error> {
        let Some(lease) = self.api.get_opt(&self.name).await? else {
            return Ok(false);
        };
        let holder = lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref());
        if holder != Some(self.identity.as_str()) {
            return Ok(false);
        }
        let dp = kube::api::DeleteParams {
            preconditions: Some(kube::api::Preconditions {
                resource_version: lease.metadata.resource_version.clone(),
                uid: lease.metadata.uid.clone(),
            }),
            ..kube::api::DeleteParams::default()
        };
        match self.api.delete(&self.name, &dp).await {
            Ok(_) => Ok(true),
            // Renewed or taken meanwhile (a conflict), or already gone.
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Takes or renews the lease; `Ok(true)` while we hold it. A lost race is `Ok(false)`.
    pub async fn try_lead(&self, now: Timestamp) -> Result<bool, kube::Error> {
        let secs = self.duration.as_secs() as i32;
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return conflict_is_false(self.api.create(&post_params(), &lease).await.map(|_| true));
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let ours = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
            (Some(MicroTime(renewed)), Some(d)) => now.as_second() > renewed.as_second() + d as i64,
            _ => true,
        };
        if !ours && !expired {
            return Ok(false);
        }
        if !ours {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(secs);
        // `replace` carries the resourceVersion we read: two candidates cannot both win.
        conflict_is_false(self.api.replace(&self.name, &post_params(), &lease).await.map(|_| true))
    }
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
