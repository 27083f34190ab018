//! Finding app instances through DNS: the headless Service's name (`upstream.dns`), looked up
//! every `refresh_seconds`. An answer replaces the discovered peers in the pool; the pod's own app
//! (`Upstream::own_app`) stays an instance whatever DNS says, so a DNS outage, or a first lookup
//! made before the Service lists this pod, never leaves the sidecar without one. A failed or
//! empty lookup keeps the peers found before, is tried again sooner, and is shown in `/ready` and
//! `sidecar_upstream_discovery_failing`.
//!
//! With a canary release (`upstream.canary`) the canary's own name is looked up alongside, and
//! its answer is the canary group. A name without addresses is normal there (no canary pod is
//! ready yet: cluster DNS answers NXDOMAIN for a headless Service without ready endpoints) and
//! empties the group; only a failed lookup (timeout, server failure) keeps the group found before.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mall_sidecar_config::{CanaryGroup, DnsDiscovery};

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
    /// The canary's name's lookups, with a canary configured.
    pub canary: Option<CanaryStatus>,
}

/// What the canary's name found.
#[derive(Debug, Clone, Default)]
pub struct CanaryStatus {
    pub name: String,
    /// Instances in its last answer (0 while no canary pod is ready).
    pub found: usize,
    /// Why the last lookup failed (the group found before is kept meanwhile).
    pub error: Option<String>,
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

    /// Looks `dns.name` up once (and `canary.dns_name` beside it) and gives `pool` what it
    /// found; returns how long to wait before the next lookup.
    pub async fn refresh(&self, pool: &Pool, dns: &DnsDiscovery, canary: Option<&CanaryGroup>) -> Duration {
        let canary_lookup = async {
            match canary {
                Some(canary) => Some(lookup(&canary.dns_name, dns.port).await),
                None => None,
            }
        };
        let (answer, canary_answer) = tokio::join!(lookup(&dns.name, dns.port), canary_lookup);
        match (canary, canary_answer) {
            (Some(canary), Some(answer)) => self.canary_answered(pool, canary, answer),
            _ => self.status.lock().canary = None,
        }
        let answer = match answer {
            Lookup::Found(found) if found.is_empty() => Err(("empty", "the name has no addresses".to_string())),
            Lookup::Found(found) => Ok(found),
            Lookup::NotFound(error) => Err(("error", error)),
            Lookup::Failed(result, error) => Err((result, error)),
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

    /// The canary's name answered `answer`: an answer, even an empty one, is the canary group; a
    /// failure keeps the group found before. Not a discovery failure either way: the instances'
    /// name says whether DNS works.
    fn canary_answered(&self, pool: &Pool, canary: &CanaryGroup, answer: Lookup) {
        let mut status = self.status.lock();
        let previous = status.canary.take().filter(|c| c.name == canary.dns_name);
        let found = match answer {
            Lookup::Found(found) => found,
            Lookup::NotFound(_) => Vec::new(),
            Lookup::Failed(_, error) => {
                // Said once per run of failures: the instances' name, looked up beside it, says
                // whether DNS as a whole fails.
                if previous.as_ref().is_none_or(|p| p.error.is_none()) {
                    tracing::warn!(name = %canary.dns_name, error = %error, "canary DNS lookup failed; keeping the canary instances found before");
                }
                status.canary = Some(CanaryStatus {
                    name: canary.dns_name.clone(),
                    found: previous.map_or(0, |p| p.found),
                    error: Some(error),
                });
                return;
            }
        };
        status.canary = Some(CanaryStatus {
            name: canary.dns_name.clone(),
            found: found.len(),
            error: None,
        });
        drop(status);
        if pool.set_canary_peers(&found) {
            tracing::info!(name = %canary.dns_name, instances = found.len(), "canary DNS answer changed");
        }
    }
}

/// What a lookup gave.
enum Lookup {
    /// Addresses (sorted, each once); none is possible but rare, as getaddrinfo calls that an error.
    Found(Vec<SocketAddr>),
    /// The name has no address: NXDOMAIN or NODATA, which cluster DNS answers for a headless
    /// Service without a ready endpoint.
    NotFound(String),
    /// No answer: `error` (a server failure, unreachable) or `timeout`, and why.
    Failed(&'static str, String),
}

/// `name` on `port`, through the system's resolver (as any other client in the pod), cut at
/// [`LOOKUP_TIMEOUT`].
async fn lookup(name: &str, port: u16) -> Lookup {
    match tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host((name, port))).await {
        Ok(Ok(addrs)) => {
            let mut found: Vec<SocketAddr> = addrs.collect();
            found.sort();
            found.dedup();
            Lookup::Found(found)
        }
        Ok(Err(e)) if says_no_such_name(&e) => Lookup::NotFound(e.to_string()),
        Ok(Err(e)) => Lookup::Failed("error", e.to_string()),
        Err(_) => Lookup::Failed("timeout", format!("no answer within {} s", LOOKUP_TIMEOUT.as_secs())),
    }
}

/// Whether a failed lookup means the name has no address (getaddrinfo's `EAI_NONAME` or
/// `EAI_NODATA`) rather than that the resolver could not tell (`EAI_AGAIN`, `EAI_FAIL`, ...).
/// The standard library keeps only the resolver's message (`gai_strerror`), so that is compared,
/// asked of the same C library.
fn says_no_such_name(error: &std::io::Error) -> bool {
    let message = error.to_string();
    [libc::EAI_NONAME, libc::EAI_NODATA].into_iter().any(|code| {
        // SAFETY: gai_strerror returns a pointer to a static NUL-terminated string.
        let text = unsafe { std::ffi::CStr::from_ptr(libc::gai_strerror(code)) };
        text.to_str()
            .is_ok_and(|text| !text.is_empty() && message.ends_with(text))
    })
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

    #[test]
    fn a_name_without_addresses_is_told_from_a_resolver_that_cannot_answer() {
        // As the standard library reports a failed getaddrinfo.
        let failed = |code| {
            // SAFETY: gai_strerror returns a pointer to a static NUL-terminated string.
            let text = unsafe { std::ffi::CStr::from_ptr(libc::gai_strerror(code)) };
            std::io::Error::other(format!(
                "failed to lookup address information: {}",
                text.to_string_lossy()
            ))
        };
        assert!(says_no_such_name(&failed(libc::EAI_NONAME)));
        assert!(says_no_such_name(&failed(libc::EAI_NODATA)));
        assert!(!says_no_such_name(&failed(libc::EAI_AGAIN)));
        assert!(!says_no_such_name(&failed(libc::EAI_FAIL)));
        assert!(!says_no_such_name(&std::io::Error::from(std::io::ErrorKind::TimedOut)));
    }

    #[test]
    fn the_canary_group_is_the_canary_names_answer_even_an_empty_one_and_kept_on_failure() {
        let config = mall_sidecar_config::Upstream {
            servers: Vec::new(),
            dns: Some(DnsDiscovery {
                name: "mall-app.invalid".into(),
                port: 3000,
                refresh_seconds: 5,
            }),
            canary: Some(CanaryGroup {
                dns_name: "mall-app-canary.invalid".into(),
                percent: 50,
                own_app_is_canary: false,
            }),
            ..Default::default()
        };
        let canary = config.canary.clone().unwrap();
        let metrics = Arc::new(Metrics::new());
        let pool = Pool::new(&config, None, metrics.clone());
        let discovery = Discovery::new(metrics.clone());
        let (stable, canary_addr): (SocketAddr, SocketAddr) =
            ("10.0.0.1:3000".parse().unwrap(), "10.0.0.9:3000".parse().unwrap());
        pool.set_peers(&[stable, canary_addr]);
        let in_canary = || pool.canary().unwrap().1.iter().map(|i| i.addr).collect::<Vec<_>>();

        discovery.canary_answered(&pool, &canary, Lookup::Found(vec![canary_addr]));
        assert_eq!(in_canary(), [canary_addr]);
        discovery.canary_answered(&pool, &canary, Lookup::Failed("timeout", "no answer".into()));
        assert_eq!(in_canary(), [canary_addr], "a failed lookup keeps the group");
        let status = discovery.status().canary.unwrap();
        assert_eq!((status.found, status.error.as_deref()), (1, Some("no answer")));
        discovery.canary_answered(&pool, &canary, Lookup::NotFound("Name or service not known".into()));
        assert!(in_canary().is_empty(), "no ready canary pod: an empty group");
        assert_eq!(pool.instances().len(), 2, "its instance stays, as a stable one");
        let status = discovery.status();
        assert_eq!((status.canary.unwrap().found, status.failures), (0, 0));
        assert_eq!(metrics.discovery_failing.get(), 0);
    }
}
