//! The app instances behind the sidecar: who they are (a static list, or the pod's own app plus
//! the peers DNS finds: see `discovery`), whether they take traffic (active health checks with
//! thresholds, passive ejection on connect errors), and which one serves a request (round robin,
//! weighted, consistent hashing from pingora-load-balancing, and least-connections, which pingora
//! does not have). With a canary release (`upstream.canary`) the instances form two groups, and
//! each call first chooses a group by the configured split, then an instance within it.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use mall_sidecar_config::{Balance, CanaryGroup, HealthCheck, PassiveEjection, Upstream as UpstreamConfig};
use pingora_load_balancing::selection::{BackendIter, BackendSelection, Consistent, RoundRobin, UniqueIterator};
use pingora_load_balancing::Backend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::metrics::Metrics;

/// One app instance and what the sidecar knows about it.
pub struct Instance {
    pub addr: SocketAddr,
    label: String,
    /// This instance's `upstream_latency` series in each group, looked up once instead of per
    /// response (an instance changes group only when a canary's DNS answer or a reload says so).
    latency: [std::sync::OnceLock<prometheus::Histogram>; 2],
    /// Its `upstream_in_flight` series, likewise (two lookups per request otherwise).
    in_flight_gauge: std::sync::OnceLock<prometheus::IntGauge>,
    weight: AtomicUsize,
    healthy: AtomicBool,
    ok_streak: AtomicU32,
    fail_streak: AtomicU32,
    connect_failures: AtomicU32,
    ejected_until_ms: AtomicU64,
    in_flight: AtomicUsize,
    /// No check has passed yet; the first that does makes the instance healthy at once.
    awaiting_first_pass: AtomicBool,
}

impl Instance {
    fn new(addr: SocketAddr, weight: usize) -> Self {
        Instance {
            addr,
            label: addr.to_string(),
            latency: Default::default(),
            in_flight_gauge: std::sync::OnceLock::new(),
            weight: AtomicUsize::new(weight),
            // Optimistic: a new instance takes traffic until a check or a connect error says not.
            healthy: AtomicBool::new(true),
            ok_streak: AtomicU32::new(0),
            fail_streak: AtomicU32::new(0),
            connect_failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            awaiting_first_pass: AtomicBool::new(false),
        }
    }

    /// The pod's own app: out of rotation until its first check passes, then in at once, so the
    /// sidecar is ready exactly when its app is and sends it nothing before (a refused connection
    /// would eject it for `passive.eject_seconds`).
    fn own_app(addr: SocketAddr) -> Self {
        let instance = Instance::new(addr, 1);
        instance.healthy.store(false, Ordering::Relaxed);
        instance.awaiting_first_pass.store(true, Ordering::Relaxed);
        instance
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// The histogram of this instance's response times while in `group`, in `by_instance`.
    pub fn latency(&self, by_instance: &prometheus::HistogramVec, group: Group) -> &prometheus::Histogram {
        self.latency[group as usize]
            .get_or_init(|| by_instance.with_label_values(&[self.label.as_str(), group.as_str()]))
    }

    fn in_flight_gauge(&self, by_instance: &prometheus::IntGaugeVec) -> &prometheus::IntGauge {
        self.in_flight_gauge
            .get_or_init(|| by_instance.with_label_values(&[self.label.as_str()]))
    }

    fn available(&self, now_ms: u64) -> bool {
        self.healthy.load(Ordering::Relaxed) && self.ejected_until_ms.load(Ordering::Relaxed) <= now_ms
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether it takes traffic now.
    pub fn is_available(&self) -> bool {
        self.available(now_ms())
    }

    /// Whether no check has passed yet.
    pub fn awaiting_first_pass(&self) -> bool {
        self.awaiting_first_pass.load(Ordering::Relaxed)
    }
}

/// The group of a canary release an instance belongs to (`upstream.canary`). Without a canary
/// every instance is stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    Stable = 0,
    Canary = 1,
}

impl Group {
    pub const ALL: [Group; 2] = [Group::Stable, Group::Canary];

    /// The `group` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Group::Stable => "stable",
            Group::Canary => "canary",
        }
    }

    fn other(self) -> Group {
        match self {
            Group::Stable => Group::Canary,
            Group::Canary => Group::Stable,
        }
    }
}

/// A request being served by an instance; counts towards least-connections until dropped.
pub struct Lease {
    pub instance: Arc<Instance>,
    /// The group the instance was chosen in, for the per-group metrics of its answer.
    pub group: Group,
    metrics: Arc<Metrics>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.instance.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.instance.in_flight_gauge(&self.metrics.upstream_in_flight).dec();
    }
}

enum Selector {
    RoundRobin(Arc<RoundRobin>),
    Consistent(Arc<Consistent>),
    LeastConnections,
}

/// Instances to choose among, and how.
struct Choice {
    list: Vec<Arc<Instance>>,
    selector: Selector,
    /// Where least-connections starts looking, so idle instances share.
    next: AtomicUsize,
}

impl Choice {
    fn new(list: Vec<Arc<Instance>>, balance: Balance) -> Self {
        let backends = |weighted: bool| -> BTreeSet<Backend> {
            list.iter()
                .map(|i| {
                    let weight = if weighted { i.weight.load(Ordering::Relaxed) } else { 1 };
                    Backend::new_with_weight(&i.addr.to_string(), weight).expect("a SocketAddr is a valid backend")
                })
                .collect()
        };
        let selector = match balance {
            Balance::RoundRobin => Selector::RoundRobin(Arc::new(RoundRobin::build(&backends(false)))),
            Balance::Weighted => Selector::RoundRobin(Arc::new(RoundRobin::build(&backends(true)))),
            Balance::ConsistentHash => Selector::Consistent(Arc::new(Consistent::build(&backends(true)))),
            Balance::LeastConnections => Selector::LeastConnections,
        };
        Choice {
            list,
            selector,
            next: AtomicUsize::new(0),
        }
    }
}

/// A canary release's split: `percent` of the calls go to the canary group, the rest to stable.
struct Split {
    percent: usize,
    /// Each group's instances and selector, indexed by [`Group`].
    groups: [Choice; 2],
}

impl Split {
    /// The group of the `n`th call: canary when `n * percent / 100` steps up at `n + 1`, so any
    /// 100 calls in a row hold exactly `percent` canary ones, spread evenly (10 %: every tenth).
    fn group_of(&self, n: usize) -> Group {
        let n = n % 100;
        if (n + 1) * self.percent / 100 != n * self.percent / 100 {
            Group::Canary
        } else {
            Group::Stable
        }
    }
}

/// One generation of the instance set, rebuilt on reload or when DNS answers change.
struct Members {
    /// Every instance: the only group without a canary.
    all: Choice,
    by_addr: HashMap<SocketAddr, Arc<Instance>>,
    /// With `upstream.canary`: the split and the two groups.
    split: Option<Box<Split>>,
}

/// Settings that reload with the configuration.
#[derive(Clone)]
struct Settings {
    balance: Balance,
    health: HealthCheck,
    passive: PassiveEjection,
    canary: Option<CanaryGroup>,
}

pub struct Pool {
    members: ArcSwap<Members>,
    /// The instances named by the static list or found by DNS (with their weights).
    peers: parking_lot::Mutex<Vec<(SocketAddr, usize)>>,
    /// What the canary's DNS name found last (`upstream.canary.dns_name`): the canary group,
    /// instances even when `upstream.dns` does not list them (yet).
    canary_peers: parking_lot::Mutex<Vec<SocketAddr>>,
    /// The pod's own app, an instance whatever `peers` holds (`Upstream::own_app`).
    own_app: ArcSwapOption<SocketAddr>,
    settings: ArcSwap<Settings>,
    /// Calls chosen by the canary split so far: the split's position ([`Split::group_of`]).
    calls: AtomicUsize,
    /// One rebuild at a time: reloads and DNS answers arrive on different tasks, and a rebuild
    /// from older state must not replace a newer one.
    rebuilding: parking_lot::Mutex<()>,
    metrics: Arc<Metrics>,
}

impl Pool {
    /// The pool of `config`'s instances, with `own_app` (the pod's own app) among them.
    pub fn new(config: &UpstreamConfig, own_app: Option<SocketAddr>, metrics: Arc<Metrics>) -> Self {
        let pool = Pool {
            members: ArcSwap::from_pointee(Members {
                all: Choice::new(Vec::new(), Balance::LeastConnections),
                by_addr: HashMap::new(),
                split: None,
            }),
            peers: parking_lot::Mutex::new(static_addrs(config)),
            canary_peers: parking_lot::Mutex::new(Vec::new()),
            own_app: ArcSwapOption::new(own_app.map(Arc::new)),
            settings: ArcSwap::from_pointee(settings(config)),
            calls: AtomicUsize::new(0),
            rebuilding: parking_lot::Mutex::new(()),
            metrics,
        };
        pool.rebuild();
        pool
    }

    /// Applies a reloaded configuration: the static list (when DNS is off; with DNS the peers
    /// found so far stay until the next answer), the pod's own app, balancing, checks and the
    /// canary split. Instances that stay keep their health and in-flight counts. A canary
    /// removed or renamed forgets the instances its name found: until the new name answers,
    /// every instance but a canary own app is stable.
    pub fn reconfigure(&self, config: &UpstreamConfig, own_app: Option<SocketAddr>) {
        let old = self.settings.swap(Arc::new(settings(config)));
        let same_canary_name = matches!(
            (&old.canary, &config.canary),
            (Some(old), Some(new)) if old.dns_name == new.dns_name
        );
        if !same_canary_name {
            self.canary_peers.lock().clear();
        }
        self.own_app.store(own_app.map(Arc::new));
        if config.dns.is_none() {
            *self.peers.lock() = static_addrs(config);
        }
        self.rebuild();
    }

    /// Replaces the peers with what discovery found (sorted); `false` when they are the same.
    pub fn set_peers(&self, found: &[SocketAddr]) -> bool {
        {
            let mut peers = self.peers.lock();
            let mut current: Vec<SocketAddr> = peers.iter().map(|(addr, _)| *addr).collect();
            current.sort();
            if current == found {
                return false;
            }
            *peers = found.iter().map(|addr| (*addr, 1)).collect();
        }
        self.rebuild();
        true
    }

    /// Replaces the canary group with what the canary's name found (sorted; empty while no
    /// canary instance is ready); `false` when it is the same.
    pub fn set_canary_peers(&self, found: &[SocketAddr]) -> bool {
        {
            let mut canary = self.canary_peers.lock();
            if canary.as_slice() == found {
                return false;
            }
            *canary = found.to_vec();
        }
        self.rebuild();
        true
    }

    /// The members: the peers, the canary's (with a canary configured), and the pod's own app,
    /// each once.
    fn rebuild(&self) {
        let _one_at_a_time = self.rebuilding.lock();
        let settings = self.settings.load_full();
        let mut addrs = self.peers.lock().clone();
        let canary_peers = match settings.canary {
            Some(_) => self.canary_peers.lock().clone(),
            None => Vec::new(),
        };
        for addr in &canary_peers {
            if !addrs.iter().any(|(a, _)| a == addr) {
                addrs.push((*addr, 1));
            }
        }
        if let Some(own) = self.own_app.load().as_deref() {
            if !addrs.iter().any(|(addr, _)| addr == own) {
                addrs.insert(0, (*own, 1));
            }
        }
        self.set_members(addrs, &settings, &canary_peers);
    }

    fn set_members(&self, addrs: Vec<(SocketAddr, usize)>, settings: &Settings, canary_peers: &[SocketAddr]) {
        let old = self.members.load();
        let balance = settings.balance;
        let own_app = self.own_app.load().as_deref().copied();
        let list: Vec<Arc<Instance>> = addrs
            .into_iter()
            .map(|(addr, weight)| match old.by_addr.get(&addr) {
                Some(existing) => {
                    existing.weight.store(weight, Ordering::Relaxed);
                    existing.clone()
                }
                None if Some(addr) == own_app => Arc::new(Instance::own_app(addr)),
                None => Arc::new(Instance::new(addr, weight)),
            })
            .collect();
        for gone in old.all.list.iter().filter(|i| !list.iter().any(|n| n.addr == i.addr)) {
            let _ = self.metrics.upstream_healthy.remove_label_values(&[&gone.label]);
        }
        for instance in &list {
            self.metrics
                .upstream_healthy
                .with_label_values(&[&instance.label])
                .set(instance.healthy.load(Ordering::Relaxed) as i64);
        }
        // The pod's own app is in the group its configuration says, whatever DNS answers; every
        // other instance is canary exactly when the canary's name found it.
        let split = settings.canary.as_ref().map(|canary| {
            let (canary_list, stable_list): (Vec<_>, Vec<_>) = list.iter().cloned().partition(|i| {
                if Some(i.addr) == own_app {
                    canary.own_app_is_canary
                } else {
                    canary_peers.contains(&i.addr)
                }
            });
            Box::new(Split {
                percent: usize::from(canary.percent.min(100)),
                groups: [Choice::new(stable_list, balance), Choice::new(canary_list, balance)],
            })
        });
        self.metrics
            .canary_percent
            .set(settings.canary.as_ref().map_or(0, |c| i64::from(c.percent)));
        self.metrics.canary_instances.set(
            split
                .as_ref()
                .map_or(0, |s| s.groups[Group::Canary as usize].list.len() as i64),
        );
        let by_addr = list.iter().map(|i| (i.addr, i.clone())).collect();
        self.members.store(Arc::new(Members {
            all: Choice::new(list, balance),
            by_addr,
            split,
        }));
    }

    pub fn instances(&self) -> Vec<Arc<Instance>> {
        self.members.load().all.list.clone()
    }

    /// With a canary configured: its share in percent and the canary group's instances.
    pub fn canary(&self) -> Option<(u8, Vec<Arc<Instance>>)> {
        let members = self.members.load();
        let split = members.split.as_ref()?;
        Some((split.percent as u8, split.groups[Group::Canary as usize].list.clone()))
    }

    /// The pod's own app, when the configuration names one (`Upstream::own_app`).
    pub fn own_app(&self) -> Option<Arc<Instance>> {
        let own = self.own_app.load();
        let own = own.as_deref()?;
        self.members.load().by_addr.get(own).cloned()
    }

    /// Picks an available instance for `key` (the cache key, used by consistent hashing), skipping
    /// `tried` ones; `None` when no instance is available.
    ///
    /// With a canary, the call's group comes first ([`Split::group_of`]), then an instance within
    /// it by `balance`; a group with no instance available gives the call to the other one, so a
    /// canary that is not ready costs no request. A retry (`tried` not empty) is a call like any
    /// other: its group is drawn again, and it falls back to the other group likewise.
    pub fn select(&self, key: &[u8], tried: &[SocketAddr]) -> Option<Lease> {
        let members = self.members.load();
        let now = now_ms();
        let usable = |i: &Instance| i.available(now) && !tried.contains(&i.addr);
        let (chosen, group) = match &members.split {
            None => (self.choose(&members.all, &members, key, &usable)?, Group::Stable),
            Some(split) => {
                let drawn = split.group_of(self.calls.fetch_add(1, Ordering::Relaxed));
                [drawn, drawn.other()].into_iter().find_map(|group| {
                    let chosen = self.choose(&split.groups[group as usize], &members, key, &usable)?;
                    Some((chosen, group))
                })?
            }
        };
        chosen.in_flight.fetch_add(1, Ordering::Relaxed);
        chosen.in_flight_gauge(&self.metrics.upstream_in_flight).inc();
        Some(Lease {
            instance: chosen,
            group,
            metrics: self.metrics.clone(),
        })
    }

    /// An instance of `choice` that is `usable`, by the configured balancing.
    fn choose(
        &self,
        choice: &Choice,
        members: &Members,
        key: &[u8],
        usable: &impl Fn(&Instance) -> bool,
    ) -> Option<Arc<Instance>> {
        match &choice.selector {
            Selector::RoundRobin(sel) => pick(sel.iter(key), members, usable),
            Selector::Consistent(sel) => pick(sel.iter(key), members, usable),
            Selector::LeastConnections => {
                // Fewest in flight per unit of weight; ties go round robin so idle instances share.
                let list = &choice.list;
                let n = list.len();
                let start = choice.next.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .map(|k| &list[(start + k) % n.max(1)])
                    .filter(|i| usable(i))
                    .min_by_key(|i| i.in_flight() * 1000 / i.weight.load(Ordering::Relaxed).max(1))
                    .cloned()
            }
        }
    }

    /// Whether any instance takes traffic now.
    pub fn any_available(&self) -> bool {
        let now = now_ms();
        self.members.load().all.list.iter().any(|i| i.available(now))
    }

    /// A connection to `addr` failed: eject it after `passive.failures` in a row.
    pub fn report_connect_failure(&self, addr: SocketAddr) {
        let Some(instance) = self.members.load().by_addr.get(&addr).cloned() else {
            return;
        };
        let passive = self.settings.load().passive.clone();
        let failures = instance.connect_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if passive.enabled && failures >= passive.failures {
            instance.connect_failures.store(0, Ordering::Relaxed);
            instance
                .ejected_until_ms
                .store(now_ms() + passive.eject_seconds * 1000, Ordering::Relaxed);
            self.metrics
                .upstream_ejections
                .with_label_values(&[&instance.label, "connect_error"])
                .inc();
            self.metrics
                .upstream_healthy
                .with_label_values(&[&instance.label])
                .set(0);
            tracing::warn!(upstream = %instance.label, eject_seconds = passive.eject_seconds, "instance ejected after connect errors");
        }
    }

    pub fn report_connected(&self, addr: SocketAddr) {
        if let Some(instance) = self.members.load().by_addr.get(&addr) {
            instance.connect_failures.store(0, Ordering::Relaxed);
        }
    }

    /// One round of active checks on every instance, concurrently.
    pub async fn check_health(&self) {
        self.check(self.instances()).await
    }

    /// A check of the pod's own app alone, while none of its checks has passed yet: the health
    /// loop runs it between rounds so the sidecar is ready as soon as its app is.
    pub async fn check_starting_own_app(&self) {
        if let Some(own) = self.own_app().filter(|i| i.awaiting_first_pass()) {
            self.check(vec![own]).await
        }
    }

    async fn check(&self, instances: Vec<Arc<Instance>>) {
        let health = self.settings.load().health.clone();
        let probes = instances
            .iter()
            .map(|i| probe(i.addr, &health.path, Duration::from_millis(health.timeout_ms)));
        let results = futures_util::future::join_all(probes).await;
        for (instance, ok) in instances.iter().zip(results) {
            self.observe(instance, ok, &health);
        }
    }

    fn observe(&self, instance: &Instance, ok: bool, health: &HealthCheck) {
        let was_healthy = instance.healthy.load(Ordering::Relaxed);
        if ok {
            instance.fail_streak.store(0, Ordering::Relaxed);
            let streak = instance.ok_streak.fetch_add(1, Ordering::Relaxed) + 1;
            let first_pass = instance.awaiting_first_pass.swap(false, Ordering::Relaxed);
            if first_pass && !was_healthy {
                instance.healthy.store(true, Ordering::Relaxed);
                tracing::info!(upstream = %instance.label, "the pod's own app answers its first check");
            } else if !was_healthy && streak >= health.healthy_threshold {
                instance.healthy.store(true, Ordering::Relaxed);
                tracing::info!(upstream = %instance.label, "instance healthy again");
            }
            if instance.healthy.load(Ordering::Relaxed) {
                // A passing check ends a passive ejection early: the instance is back.
                instance.ejected_until_ms.store(0, Ordering::Relaxed);
            }
        } else {
            instance.ok_streak.store(0, Ordering::Relaxed);
            let streak = instance.fail_streak.fetch_add(1, Ordering::Relaxed) + 1;
            if was_healthy && streak >= health.unhealthy_threshold {
                instance.healthy.store(false, Ordering::Relaxed);
                self.metrics
                    .upstream_ejections
                    .with_label_values(&[&instance.label, "health_check"])
                    .inc();
                tracing::warn!(upstream = %instance.label, failures = streak, "instance failed its health checks");
            }
        }
        let available = instance.available(now_ms());
        self.metrics
            .upstream_healthy
            .with_label_values(&[&instance.label])
            .set(available as i64);
    }
}

fn pick<I: BackendIter>(iter: I, members: &Members, usable: &impl Fn(&Instance) -> bool) -> Option<Arc<Instance>> {
    let mut unique = UniqueIterator::new(iter, 1024);
    while let Some(backend) = unique.get_next() {
        let addr = backend.addr.as_inet().copied()?;
        if let Some(instance) = members.by_addr.get(&addr) {
            if usable(instance) {
                return Some(instance.clone());
            }
        }
    }
    None
}

fn settings(config: &UpstreamConfig) -> Settings {
    Settings {
        balance: config.balance,
        health: config.health_check.clone(),
        passive: config.passive.clone(),
        canary: config.canary.clone(),
    }
}

fn static_addrs(config: &UpstreamConfig) -> Vec<(SocketAddr, usize)> {
    if config.dns.is_some() {
        return Vec::new();
    }
    config
        .servers
        .iter()
        .map(|s| (s.address.parse().expect("validated as ip:port"), s.weight))
        .collect()
}

/// `GET path` over a fresh connection; healthy means a 2xx status line within `timeout`.
async fn probe(addr: SocketAddr, path: &str, timeout: Duration) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: mall-sidecar-health\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await?;
        Ok::<bool, std::io::Error>(head.starts_with(b"HTTP/1.") && head[9] == b'2')
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Ok(true)))
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(balance: Balance, servers: &[(&str, usize)]) -> Pool {
        let mut config = UpstreamConfig {
            balance,
            ..Default::default()
        };
        config.servers = servers
            .iter()
            .map(|(a, w)| mall_sidecar_config::UpstreamServer {
                address: a.to_string(),
                weight: *w,
            })
            .collect();
        Pool::new(&config, None, Arc::new(Metrics::new()))
    }

    fn pick_port(pool: &Pool, key: &[u8]) -> u16 {
        pool.select(key, &[]).unwrap().instance.addr.port()
    }

    #[test]
    fn round_robin_spreads_and_weighted_follows_weights() {
        let rr = pool(Balance::RoundRobin, &[("127.0.0.1:1", 5), ("127.0.0.1:2", 1)]);
        let ports: Vec<u16> = (0..100).map(|_| pick_port(&rr, b"")).collect();
        assert_eq!(ports.iter().filter(|p| **p == 1).count(), 50);

        let weighted = pool(Balance::Weighted, &[("127.0.0.1:1", 3), ("127.0.0.1:2", 1)]);
        let ports: Vec<u16> = (0..400).map(|_| pick_port(&weighted, b"")).collect();
        assert_eq!(ports.iter().filter(|p| **p == 1).count(), 300);
    }

    #[test]
    fn consistent_hash_sticks_and_moves_only_when_needed() {
        let hash = pool(
            Balance::ConsistentHash,
            &[("127.0.0.1:1", 1), ("127.0.0.1:2", 1), ("127.0.0.1:3", 1)],
        );
        let first = pick_port(&hash, b"/api/products/7");
        assert!((0..20).all(|_| pick_port(&hash, b"/api/products/7") == first));
        // Its instance is out: the key goes elsewhere, and comes back afterwards.
        let tried = [SocketAddr::from(([127, 0, 0, 1], first))];
        let second = hash.select(b"/api/products/7", &tried).unwrap().instance.addr.port();
        assert_ne!(second, first);
    }

    #[test]
    fn least_connections_prefers_the_idle_instance_and_leases_release() {
        let lc = pool(Balance::LeastConnections, &[("127.0.0.1:1", 1), ("127.0.0.1:2", 1)]);
        let busy = lc.select(b"", &[]).unwrap();
        let busy_port = busy.instance.addr.port();
        for _ in 0..10 {
            assert_ne!(pick_port(&lc, b""), busy_port, "the busy instance must not be chosen");
        }
        drop(busy);
        assert!(lc.instances().iter().all(|i| i.in_flight() == 0));
    }

    #[test]
    fn the_pods_own_app_is_a_member_whatever_dns_finds_and_serves_from_its_first_passing_check() {
        let config = UpstreamConfig {
            servers: Vec::new(),
            dns: Some(mall_sidecar_config::DnsDiscovery {
                name: "mall-app.invalid".into(),
                port: 3000,
                refresh_seconds: 5,
            }),
            ..Default::default()
        };
        let own: SocketAddr = "10.0.0.5:3000".parse().unwrap();
        let peer: SocketAddr = "10.0.0.7:3000".parse().unwrap();
        let p = Pool::new(&config, Some(own), Arc::new(Metrics::new()));
        let members = |p: &Pool| {
            let mut addrs: Vec<SocketAddr> = p.instances().iter().map(|i| i.addr).collect();
            addrs.sort();
            addrs
        };
        assert_eq!(members(&p), [own], "before any DNS answer");
        assert!(p.select(b"", &[]).is_none(), "nothing is sent before its app answers");
        let health = HealthCheck::default();
        let instance = p.own_app().unwrap();
        p.observe(&instance, false, &health);
        assert!(p.select(b"", &[]).is_none() && instance.awaiting_first_pass());
        p.observe(&instance, true, &health);
        assert_eq!(
            p.select(b"", &[]).unwrap().instance.addr,
            own,
            "one passing check, not healthy_threshold"
        );

        assert!(p.set_peers(&[own, peer]));
        assert_eq!(members(&p), [own, peer]);
        assert!(p.set_peers(&[peer]));
        assert_eq!(members(&p), [own, peer], "an answer without this pod keeps its app");
        assert!(!p.set_peers(&[peer]), "the same answer changes nothing");
        assert!(p.own_app().unwrap().is_available(), "its health is kept across answers");
    }

    fn canary_config(percent: u8, own_app_is_canary: bool) -> UpstreamConfig {
        UpstreamConfig {
            servers: Vec::new(),
            dns: Some(mall_sidecar_config::DnsDiscovery {
                name: "mall-app.invalid".into(),
                port: 3000,
                refresh_seconds: 5,
            }),
            canary: Some(CanaryGroup {
                dns_name: "mall-app-canary.invalid".into(),
                percent,
                own_app_is_canary,
            }),
            ..Default::default()
        }
    }

    const STABLE: [&str; 2] = ["10.0.0.1:3000", "10.0.0.2:3000"];
    const CANARY: &str = "10.0.0.9:3000";

    /// Two stable instances and one canary, as DNS finds them.
    fn canary_pool(percent: u8) -> Pool {
        let p = Pool::new(&canary_config(percent, false), None, Arc::new(Metrics::new()));
        let addr = |a: &str| a.parse::<SocketAddr>().unwrap();
        p.set_peers(&[addr(STABLE[0]), addr(STABLE[1]), addr(CANARY)]);
        p.set_canary_peers(&[addr(CANARY)]);
        p
    }

    /// The group and address of `n` calls in a row.
    fn draw(p: &Pool, n: usize) -> Vec<(Group, String)> {
        (0..n)
            .map(|_| {
                let lease = p.select(b"", &[]).unwrap();
                (lease.group, lease.instance.addr.to_string())
            })
            .collect()
    }

    fn canary_calls(calls: &[(Group, String)]) -> usize {
        calls.iter().filter(|(g, _)| *g == Group::Canary).count()
    }

    #[test]
    fn a_canary_at_ten_percent_takes_exactly_every_tenth_call() {
        for balance in [
            Balance::RoundRobin,
            Balance::Weighted,
            Balance::ConsistentHash,
            Balance::LeastConnections,
        ] {
            let p = canary_pool(10);
            let mut config = canary_config(10, false);
            config.balance = balance;
            p.reconfigure(&config, None);
            let calls = draw(&p, 1000);
            assert_eq!(canary_calls(&calls), 100, "{balance:?}");
            for (i, (group, addr)) in calls.iter().enumerate() {
                assert_eq!(
                    *group == Group::Canary,
                    i % 10 == 9,
                    "{balance:?}: call {i} went to {addr}"
                );
                assert_eq!(
                    *group == Group::Canary,
                    addr == CANARY,
                    "{balance:?}: the group is the instance's"
                );
            }
            if balance != Balance::ConsistentHash {
                let first = calls.iter().filter(|(_, a)| a == STABLE[0]).count();
                assert_eq!(first, 450, "{balance:?}: the stable group is balanced within itself");
            }
        }
        assert_eq!(canary_pool(10).metrics.canary_percent.get(), 10);
        assert_eq!(canary_pool(10).metrics.canary_instances.get(), 1);
    }

    #[test]
    fn zero_percent_sends_the_canary_nothing_and_a_hundred_everything() {
        assert_eq!(canary_calls(&draw(&canary_pool(0), 500)), 0);
        assert_eq!(canary_calls(&draw(&canary_pool(100), 500)), 500);
        // Any hundred calls in a row hold exactly `percent` canary ones, whatever the percent.
        for percent in [1, 7, 20, 33, 50, 99] {
            let p = canary_pool(percent);
            p.calls.store(12_345, Ordering::Relaxed);
            assert_eq!(canary_calls(&draw(&p, 100)), usize::from(percent), "{percent} %");
        }
    }

    #[test]
    fn a_group_with_no_instance_available_gives_its_share_to_the_other() {
        let p = canary_pool(50);
        let health = HealthCheck::default();
        let canary = p
            .instances()
            .into_iter()
            .find(|i| i.addr.to_string() == CANARY)
            .unwrap();
        for _ in 0..health.unhealthy_threshold {
            p.observe(&canary, false, &health);
        }
        let calls = draw(&p, 200);
        assert!(
            calls.iter().all(|(g, a)| *g == Group::Stable && a != CANARY),
            "a canary that is not ready costs no request"
        );

        // A canary found by its name before the instances' name lists it is an instance too.
        let p = canary_pool(50);
        let late: SocketAddr = "10.0.0.10:3000".parse().unwrap();
        p.set_canary_peers(&[CANARY.parse().unwrap(), late]);
        assert_eq!(p.instances().len(), 4);
        assert_eq!(p.metrics.canary_instances.get(), 2);

        // No stable instance: the canary serves every call.
        let p = canary_pool(10);
        for stable in STABLE {
            p.report_connect_failure(stable.parse().unwrap());
        }
        assert!(draw(&p, 50).iter().all(|(g, _)| *g == Group::Canary));

        // A retry is drawn like any call, and never goes back to the instance it tried.
        let p = canary_pool(100);
        let lease = p.select(b"", &[CANARY.parse().unwrap()]).unwrap();
        assert_eq!(lease.group, Group::Stable);
    }

    #[test]
    fn the_pods_own_app_is_in_the_group_its_configuration_says_whatever_dns_answers() {
        let own: SocketAddr = "10.0.0.5:3000".parse().unwrap();
        let stable: SocketAddr = STABLE[0].parse().unwrap();
        let health = HealthCheck::default();
        // A canary pod before any answer: its own app is the canary group, alone.
        let p = Pool::new(&canary_config(20, true), Some(own), Arc::new(Metrics::new()));
        p.observe(&p.own_app().unwrap(), true, &health);
        assert_eq!(p.metrics.canary_instances.get(), 1);
        p.set_peers(&[own, stable]);
        let calls = draw(&p, 100);
        assert_eq!(canary_calls(&calls), 20);
        assert!(calls
            .iter()
            .all(|(g, a)| (*g == Group::Canary) == (*a == own.to_string())));

        // A stable pod whose app the canary's name lists (a label changed under it): stable.
        let p = Pool::new(&canary_config(20, false), Some(own), Arc::new(Metrics::new()));
        p.observe(&p.own_app().unwrap(), true, &health);
        p.set_peers(&[own, stable]);
        p.set_canary_peers(&[own]);
        assert_eq!(p.metrics.canary_instances.get(), 0);
        assert_eq!(canary_calls(&draw(&p, 100)), 0);
    }

    #[test]
    fn a_reload_moves_the_split_at_once_and_instances_keep_their_state() {
        let p = canary_pool(10);
        let ejected: SocketAddr = STABLE[1].parse().unwrap();
        p.report_connect_failure(ejected);
        let busy = p.select(b"", &[]).unwrap();
        assert_eq!(canary_calls(&draw(&p, 99)), 10);

        p.reconfigure(&canary_config(50, false), None);
        assert_eq!(p.metrics.canary_percent.get(), 50);
        let calls_at_50 = draw(&p, 100);
        assert_eq!(canary_calls(&calls_at_50), 50);
        assert!(
            calls_at_50.iter().all(|(_, a)| *a != ejected.to_string()),
            "still ejected"
        );
        assert_eq!(busy.instance.in_flight(), 1, "in-flight counts kept");

        // The canary removed: one group again, every instance stable, the gauge 0.
        let mut without = canary_config(0, false);
        without.canary = None;
        p.reconfigure(&without, None);
        assert_eq!(p.metrics.canary_percent.get(), 0);
        assert!(p.canary().is_none());
        let calls = draw(&p, 100);
        assert!(calls.iter().all(|(g, _)| *g == Group::Stable));
        assert!(
            calls.iter().any(|(_, a)| a == CANARY),
            "the canary's instance serves as a stable one"
        );

        // Added back under another name: what the old name found is forgotten until it answers.
        let mut renamed = canary_config(50, false);
        renamed.canary.as_mut().unwrap().dns_name = "other-canary.invalid".into();
        p.reconfigure(&renamed, None);
        assert_eq!(p.metrics.canary_instances.get(), 0);
        assert_eq!(canary_calls(&draw(&p, 100)), 0);
    }

    #[test]
    fn passive_ejection_and_thresholds() {
        let p = pool(Balance::RoundRobin, &[("127.0.0.1:1", 1), ("127.0.0.1:2", 1)]);
        p.report_connect_failure("127.0.0.1:1".parse().unwrap());
        assert!((0..10).all(|_| pick_port(&p, b"") == 2));

        let health = HealthCheck {
            healthy_threshold: 2,
            unhealthy_threshold: 2,
            ..Default::default()
        };
        let two = p.instances().into_iter().find(|i| i.addr.port() == 2).unwrap();
        p.observe(&two, false, &health);
        assert!(p.select(b"", &[]).is_some(), "one failure is below the threshold");
        p.observe(&two, false, &health);
        assert!(p.select(b"", &[]).is_none(), "both out: nothing to choose");
        p.observe(&two, true, &health);
        assert!(p.select(b"", &[]).is_none());
        p.observe(&two, true, &health);
        assert_eq!(pick_port(&p, b""), 2);
    }
}
