//! The operator's brain: sizes for each pod from its resources and the database budget, as pure
//! functions with a table test. The app and sidecar read these from their environment and config.
//!
//! Formulas (and why):
//! - worker threads = floor(CPU limit), at least 1: what automaxprocs does for GOMAXPROCS; more
//!   threads than the CFS quota allows only adds throttling. Except where that would keep the HPA
//!   from ever scaling: `n` busy threads use at most min(n, limit) CPUs, the HPA measures that
//!   against the CPU *request* and acts only above its target by its 10 % tolerance. When
//!   floor(limit) threads cannot get there, the threads are rounded up to ceil(limit) (Go 1.25's
//!   runtime rounds up for the same reason; automaxprocs #78). `worker_threads` has the rule and a
//!   table test; a target no thread count can reach is refused by the CRD.
//!
//!   | CPU limit (= request) | HPA 50 % | HPA 70 % | HPA 90 % |
//!   |---|---|---|---|
//!   | 0.5 | 1 | 1 | 1 |
//!   | 1 | 1 | 1 | 1 |
//!   | 1.5 | 1 (67 % reachable) | 2 (67 % < 77 %) | 2 |
//!   | 2.5 | 2 (80 %) | 2 (80 % >= 77 %) | 3 (80 % < 99 %) |
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
    let hpa_target =
        (spec.autoscaling.mode != crate::crd::AutoscalingMode::Alerts).then_some(spec.autoscaling.target_cpu_percent);
    let app_request = quantity::cpu_millis(&spec.app.cpu.request).unwrap_or(app_cpu);
    Tuning {
        app_worker_threads: worker_threads(app_cpu, app_request, hpa_target),
        db_max_connections: db_max,
        db_pool_ceiling: by_cpu,
        db_min_connections: (by_cpu / 5).max(1),
        db_replica_max_connections: db_max,
        app_cache_bytes: (app_mem / 4).max(8 * MIB),
        sidecar_threads: (sidecar_cpu / 1000).max(1) as u32,
        sidecar_cache_bytes: (sidecar_mem * 2 / 5).max(8 * MIB),
        fleet_db_connections: db_max * max_replicas,
    }
}

/// The HPA acts only when utilisation exceeds its target by this fraction (kube-controller-manager's
/// `--horizontal-pod-autoscaler-tolerance` default).
pub const HPA_TOLERANCE: f64 = 0.1;

/// App worker threads for a CPU limit and request (millicores) under an HPA CPU target (percent of
/// the request), if any: floor(limit), rounded up to ceil(limit) when floor(limit) busy threads
/// could not push utilisation past the target and its tolerance.
pub fn worker_threads(limit_millis: u64, request_millis: u64, hpa_target_percent: Option<i32>) -> u32 {
    let floor = (limit_millis / 1000).max(1);
    let Some(target) = hpa_target_percent else {
        return floor as u32;
    };
    let reachable = |threads: u64| (threads * 1000).min(limit_millis) as f64 / request_millis.max(1) as f64 * 100.0;
    if reachable(floor) >= target as f64 * (1.0 + HPA_TOLERANCE) {
        floor as u32
    } else {
        limit_millis.div_ceil(1000).max(1) as u32
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
    fn threads_let_the_hpa_reach_its_target() {
        // (CPU limit = request in millicores, HPA target %) -> threads
        let table = [
            (500, 50, 1),
            (500, 70, 1),
            (500, 90, 1),
            (1000, 50, 1),
            (1000, 70, 1),
            (1000, 90, 1),
            (1500, 50, 1),
            (1500, 70, 2),
            (1500, 90, 2),
            (2500, 50, 2),
            (2500, 70, 2),
            (2500, 90, 3),
        ];
        for (cpu, target, want) in table {
            let threads = worker_threads(cpu, cpu, Some(target));
            assert_eq!(threads, want, "{cpu}m at {target} %");
            let reachable = ((threads as u64 * 1000).min(cpu)) as f64 / cpu as f64 * 100.0;
            assert!(
                reachable >= target as f64 * 1.1,
                "{cpu}m at {target} %: {reachable} % reachable"
            );
        }
        // No HPA (alerts mode): automaxprocs' floor.
        assert_eq!(worker_threads(1500, 1500, None), 1);
        // A request below the limit leaves room: 1 thread of a 1.5-CPU limit is 200 % of 500m.
        assert_eq!(worker_threads(1500, 500, Some(90)), 1);
    }

    #[test]
    fn table() {
        // (cpu, memory, budget, maxReplicas) -> (threads, db share, db min, pool ceiling, app
        // cache MiB, fleet). The ceiling and the minimum come from the CPU alone (they are in the
        // pods' environment, and maxReplicas must not roll the pods); the share is the budget's.
        let table = [
            ("500m", "512Mi", 100, 10, (1, 5, 1, 5, 128, 50)),
            ("2", "2Gi", 100, 10, (2, 10, 4, 20, 512, 100)),
            ("4", "4Gi", 100, 10, (4, 10, 8, 40, 1024, 100)),
            ("4", "4Gi", 1000, 10, (4, 40, 8, 40, 1024, 400)),
            // 1.5 CPUs under the default 70 % HPA target: rounded up (see `worker_threads`).
            ("1500m", "64Mi", 40, 40, (2, 1, 3, 15, 16, 40)),
            ("8", "16Gi", 150, 5, (8, 30, 16, 80, 4096, 150)),
        ];
        for (cpu, mem, budget, max, want) in table {
            let t = tune(&spec(cpu, mem, budget, max));
            let got = (
                t.app_worker_threads,
                t.db_max_connections,
                t.db_min_connections,
                t.db_pool_ceiling,
                t.app_cache_bytes / MIB,
                t.fleet_db_connections,
            );
            assert_eq!(got, want, "{cpu} {mem} budget {budget} max {max}");
            assert!(t.fleet_db_connections <= budget, "the fleet stays within the budget");
        }
    }
}
