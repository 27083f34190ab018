//! Finding app instances through DNS: the headless Service's name (`upstream.dns`), looked up
//! every `refresh_seconds`. An answer replaces the discovered peers in the pool; the pod's own app
//! (`Upstream::own_app`) stays an instance whatever DNS says, so a DNS outage, or a first lookup
//! made before the Service lists this pod, never leaves the sidecar without one. A failed or
//! empty lookup keeps the peers found before, is tried again sooner, and is shown in `/ready` and
//! `sidecar_upstream_discovery_failing`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mall_sidecar_config::DnsDiscovery;

use crate::metrics::Metrics;
use crate::upstreams::Pool;

/// A lookup still unanswered after this long has failed: glibc's resolver would otherwise wait
/// 5 s per server and attempt while the cluster DNS is down, and `/ready` would say nothing.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// The wait after a first failed lookup, doubled after each further one up to `refresh_seconds`:
/// a pod's first lookup usually runs before the headless Service lists it, and its peers should
/// not wait a whole refresh interval for the second.
const FIRST_RETRY: Duration = Duration::from_secs(1);

/// What the lookups have found so far.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// The name looked up; empty before the first lookup.
    pub name: String,
    /// Lookups in a row that failed or found nothing; 0 once one answers.
    pub failures: u32,
    /// Why the last lookup failed.
    pub error: Option<String>,
    /// When the current run of failures began.
    pub failing_since: Option<Instant>,
    /// Instances in the last answer.
    pub found: usize,
}

impl Status {
    pub fn failing(&self) -> bool {
        self.failures > 0
    }
}

pub struct Discovery {
    status: parking_lot::Mutex<Status>,
    metrics: Arc<Metrics>,
}

impl Discovery {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Discovery {
            status: parking_lot::Mutex::new(Status::default()),
            metrics,
        }
    }

    pub fn status(&self) -> Status {
        self.status.lock().clone()
    }

    /// Looks `dns.name` up once and gives `pool` what it found; returns how long to wait before
    /// the next lookup.
    pub async fn refresh(&self, pool: &Pool, dns: &DnsDiscovery) -> Duration {
        let lookup = tokio::net::lookup_host((dns.name.as_str(), dns.port));
        let answer = match tokio::time::timeout(LOOKUP_TIMEOUT, lookup).await {
            Ok(Ok(addrs)) => {
                let mut found: Vec<SocketAddr> = addrs.collect();
                found.sort();
                found.dedup();
                if found.is_empty() {
                    Err(("empty", "the name has no addresses".to_string()))
                } else {
                    Ok(found)
                }
            }
            Ok(Err(e)) => Err(("error", e.to_string())),
            Err(_) => Err(("timeout", format!("no answer within {} s", LOOKUP_TIMEOUT.as_secs()))),
        };
        let refresh = Duration::from_secs(dns.refresh_seconds);
        let mut status = self.status.lock();
        status.name.clone_from(&dns.name);
        match answer {
            Ok(found) => {
                self.metrics.discovery_lookups.with_label_values(&["ok"]).inc();
                self.metrics.discovery_failing.set(0);
                if status.failing() {
                    tracing::info!(name = %dns.name, instances = found.len(), failures = status.failures, "upstream DNS lookup answers again");
                }
                status.failures = 0;
                status.error = None;
                status.failing_since = None;
                status.found = found.len();
                drop(status);
                if pool.set_peers(&found) {
                    tracing::info!(name = %dns.name, instances = found.len(), "upstream DNS answer changed");
                }
                refresh
            }
            Err((result, error)) => {
                self.metrics.discovery_lookups.with_label_values(&[result]).inc();
                self.metrics.discovery_failing.set(1);
                status.failures += 1;
                status.failing_since.get_or_insert_with(Instant::now);
                // The peers found before stay: a DNS hiccup must not empty the pool, and the
                // pod's own app is an instance whatever DNS says.
                tracing::warn!(
                    name = %dns.name,
                    error = %error,
                    failures = status.failures,
                    "upstream DNS lookup failed; keeping the pod's own app and the instances found before"
                );
                status.error = Some(error);
                retry_after(status.failures, refresh)
            }
        }
    }
}

/// The wait before the next lookup after `failures` failed ones in a row.
fn retry_after(failures: u32, refresh: Duration) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    (FIRST_RETRY * 2u32.pow(doublings)).min(refresh)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_lookups_are_retried_sooner_backing_off_to_the_refresh_interval() {
        let refresh = Duration::from_secs(5);
        let waits: Vec<u64> = (1..=6).map(|f| retry_after(f, refresh).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 5, 5, 5]);
        assert_eq!(retry_after(u32::MAX, refresh), refresh);
        assert_eq!(retry_after(1, Duration::from_millis(500)), Duration::from_millis(500));
    }
}
