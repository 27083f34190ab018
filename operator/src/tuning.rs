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

use crate::crd::MallDeploymentSpec;
pub use crate::crd::Tuning;
use crate::quantity;

const MIB: u64 = 1024 * 1024;

pub fn tune(spec: &MallDeploymentSpec) -> Tuning {
    let app_cpu = quantity::cpu_millis(&spec.app.cpu.limit).unwrap_or(1000);
    let app_mem = quantity::bytes(&spec.app.memory.limit).unwrap_or(512 * MIB);
    let sidecar_cpu = quantity::cpu_millis(&spec.sidecar.cpu.limit).unwrap_or(500);
    let sidecar_mem = quantity::bytes(&spec.sidecar.memory.limit).unwrap_or(256 * MIB);
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
}
