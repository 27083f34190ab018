//! The operator's brain: sizes for each pod from its resources and the database budget, as pure
//! functions with a table test. The app and sidecar read these from their environment and config.
//!
//! Formulas (and why):
//! - worker threads = floor(CPU limit), at least 1: what automaxprocs does for GOMAXPROCS; more
//!   threads than the CFS quota allows only adds throttling.
//! - DB pool per pod = min(10 per CPU (at least 2), connection budget / maxReplicas), at least 1:
//!   a pod rarely keeps more than ~10 queries per core in flight, and the whole fleet at its
//!   largest must stay within what the database server allows. Replica pools use the same budget
//!   per replica server. Idle connections kept: a fifth of the pool, at least 1.
//! - L1 cache bytes = 25 % of the app's memory limit (at least 8 MiB): the rest is headroom for
//!   requests, connections and the allocator.
//! - Sidecar threads = floor(sidecar CPU limit), at least 1; sidecar cache = 40 % of its memory
//!   limit (at least 8 MiB): the sidecar holds little besides the cache.
//! - Redis: the app multiplexes one connection (plus one for invalidation pub/sub) and the sidecar
//!   one for shared limits; there is no pool to size, so none is configured.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::crd::MallDeploymentSpec;

const MIB: u64 = 1024 * 1024;

/// What the operator chose for each pod.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Tuning {
    /// App worker threads: floor(CPU limit), at least 1.
    pub app_worker_threads: u32,
    /// Primary pool per pod: min(10 per CPU, budget / maxReplicas).
    pub db_max_connections: u32,
    /// Primary connections kept while idle.
    pub db_min_connections: u32,
    /// Pool per read replica per pod.
    pub db_replica_max_connections: u32,
    /// App in-process cache: 25 % of its memory limit.
    pub app_cache_bytes: u64,
    /// Sidecar worker threads: floor(its CPU limit), at least 1.
    pub sidecar_threads: u32,
    /// Sidecar response cache: 40 % of its memory limit.
    pub sidecar_cache_bytes: u64,
    /// Database connections the fleet may open at `maxReplicas` (primary only).
    pub fleet_db_connections: u32,
}

pub fn tune(spec: &MallDeploymentSpec) -> Tuning {
    let app_cpu = parse_cpu_millis(&spec.app.cpu.limit).unwrap_or(1000);
    let app_mem = parse_bytes(&spec.app.memory.limit).unwrap_or(512 * MIB);
    let sidecar_cpu = parse_cpu_millis(&spec.sidecar.cpu.limit).unwrap_or(500);
    let sidecar_mem = parse_bytes(&spec.sidecar.memory.limit).unwrap_or(256 * MIB);
    let max_replicas = spec.max_replicas.max(1) as u32;

    let by_cpu = ((app_cpu * 10) / 1000).max(2) as u32;
    let by_budget = spec.database.connection_budget / max_replicas;
    let db_max = by_cpu.min(by_budget).max(1);
    Tuning {
        app_worker_threads: (app_cpu / 1000).max(1) as u32,
        db_max_connections: db_max,
        db_min_connections: (db_max / 5).max(1),
        db_replica_max_connections: db_max,
        app_cache_bytes: (app_mem / 4).max(8 * MIB),
        sidecar_threads: (sidecar_cpu / 1000).max(1) as u32,
        sidecar_cache_bytes: (sidecar_mem * 2 / 5).max(8 * MIB),
        fleet_db_connections: db_max * max_replicas,
    }
}

/// `500m` -> 500, `2` -> 2000, `1.5` -> 1500.
pub fn parse_cpu_millis(q: &str) -> Option<u64> {
    let q = q.trim();
    if let Some(m) = q.strip_suffix('m') {
        return m.parse::<u64>().ok().filter(|v| *v > 0);
    }
    let cores: f64 = q.parse().ok()?;
    (cores.is_finite() && cores > 0.0).then(|| (cores * 1000.0).round() as u64)
}

/// `512Mi` -> 536870912, `1G` -> 1e9, `1000` -> 1000.
pub fn parse_bytes(q: &str) -> Option<u64> {
    let q = q.trim();
    let units: [(&str, u64); 10] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("K", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
        ("", 1),
    ];
    for (suffix, factor) in units {
        if let Some(number) = q.strip_suffix(suffix) {
            if let Ok(n) = number.parse::<f64>() {
                return (n.is_finite() && n > 0.0).then_some((n * factor as f64) as u64);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{Container, Quantities};

    fn spec(cpu: &str, mem: &str, budget: u32, max: i32) -> MallDeploymentSpec {
        let mut md: crate::crd::MallDeployment = serde_json::from_value(serde_json::json!({
            "apiVersion": "mall.example.com/v1alpha1", "kind": "MallDeployment",
            "metadata": {"name": "t"}, "spec": {}
        }))
        .unwrap();
        md.spec.app = Container {
            cpu: Quantities {
                request: cpu.into(),
                limit: cpu.into(),
            },
            memory: Quantities {
                request: mem.into(),
                limit: mem.into(),
            },
            ..Container::default()
        };
        md.spec.database.connection_budget = budget;
        md.spec.max_replicas = max;
        md.spec
    }

    #[test]
    fn table() {
        // (cpu, memory, budget, maxReplicas) -> (threads, db max, db min, app cache MiB, fleet)
        let table = [
            ("500m", "512Mi", 100, 10, (1, 5, 1, 128, 50)),
            ("2", "2Gi", 100, 10, (2, 10, 2, 512, 100)),
            ("4", "4Gi", 100, 10, (4, 10, 2, 1024, 100)),
            ("4", "4Gi", 1000, 10, (4, 40, 8, 1024, 400)),
            ("1500m", "64Mi", 40, 40, (1, 1, 1, 16, 40)),
            ("8", "16Gi", 150, 5, (8, 30, 6, 4096, 150)),
        ];
        for (cpu, mem, budget, max, want) in table {
            let t = tune(&spec(cpu, mem, budget, max));
            let got = (
                t.app_worker_threads,
                t.db_max_connections,
                t.db_min_connections,
                t.app_cache_bytes / MIB,
                t.fleet_db_connections,
            );
            assert_eq!(got, want, "{cpu} {mem} budget {budget} max {max}");
            assert!(t.fleet_db_connections <= budget, "the fleet stays within the budget");
        }
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_cpu_millis("250m"), Some(250));
        assert_eq!(parse_cpu_millis("1.5"), Some(1500));
        assert_eq!(parse_cpu_millis("0"), None);
        assert_eq!(parse_cpu_millis("lots"), None);
        assert_eq!(parse_bytes("512Mi"), Some(512 * MIB));
        assert_eq!(parse_bytes("1G"), Some(1_000_000_000));
        assert_eq!(parse_bytes("1.5Gi"), Some(1536 * MIB));
        assert_eq!(parse_bytes("12345"), Some(12345));
        assert_eq!(parse_bytes("-1Mi"), None);
        assert_eq!(parse_bytes("big"), None);
    }
}
