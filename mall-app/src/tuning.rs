//! Sizing from the container's limits, as automaxprocs does for GOMAXPROCS.
//!
//! Order of precedence (applied in `config`): an explicit environment variable (the operator
//! sets them), else the cgroup CPU and memory limits, else the host. The formulas live in
//! [`derive`], a pure function with a table test, so they can be read and changed in one place.

use std::path::Path;

/// CPU and memory available to this process, and where the numbers came from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Resources {
    /// CPUs we may use (fractional for a quota like `500m`).
    pub cpus: f64,
    /// Bytes of memory we may use, if known.
    pub memory_bytes: Option<u64>,
    /// Whether `memory_bytes` is a hard container limit (true) or the host's total (false).
    pub memory_is_limit: bool,
    /// Whether `cpus` is the cgroup's CPU quota (true) or the host's CPUs (false).
    pub cpus_from_cgroup: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSize {
    pub max: u32,
    pub min: u32,
}

/// What the app derives from [`Resources`] when nothing is set explicitly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    pub worker_threads: usize,
    pub primary_pool: PoolSize,
    pub replica_pool: PoolSize,
    pub cache_bytes: u64,
}

const MIB: u64 = 1024 * 1024;

/// The formulas, documented in docs/app.md's tuning table.
///
/// - worker threads: floor of the CPU limit, at least 1 (a 500m pod gets 1 thread, not the
///   host's 64, which would only add context switches under a CFS quota);
/// - primary pool: 10 connections per (rounded-up) CPU, between 10 and seed 000's 150; kept warm
///   (min): 2 per CPU, at most seed 000's 30 idle. Requests mostly wait on the network while a
///   query runs, so a pool several times the core count keeps the cores busy;
/// - replica pool: 8 per CPU between 8 and seed 000's 100; min 2 per CPU, at most 20;
/// - L1 cache: a quarter of a hard memory limit (the rest is heap, buffers and headroom so the
///   pod is not OOM-killed), or an eighth of the host's memory capped at 256 MiB; at least 8 MiB.
pub fn derive(res: &Resources) -> Tuning {
    let whole_cpus = res.cpus.ceil().max(1.0) as u32;
    let worker_threads = (res.cpus.floor() as usize).max(1);
    let primary_pool = PoolSize {
        max: (whole_cpus * 10).clamp(10, 150),
        min: (whole_cpus * 2).clamp(2, 30),
    };
    let replica_pool = PoolSize {
        max: (whole_cpus * 8).clamp(8, 100),
        min: (whole_cpus * 2).clamp(2, 20),
    };
    let cache_bytes = match (res.memory_bytes, res.memory_is_limit) {
        (Some(limit), true) => limit / 4,
        (Some(host), false) => (host / 8).min(256 * MIB),
        (None, _) => 64 * MIB,
    }
    .max(8 * MIB);
    Tuning {
        worker_threads,
        primary_pool,
        replica_pool,
        cache_bytes,
    }
}

/// Reads the cgroup (v2, then v1) limits, falling back to the host.
pub fn detect() -> Resources {
    detect_in(Path::new("/sys/fs/cgroup"), Path::new("/proc/meminfo"))
}

fn detect_in(cgroup: &Path, meminfo: &Path) -> Resources {
    let read = |p: &str| std::fs::read_to_string(cgroup.join(p)).ok();
    let host_cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;

    let cgroup_cpus = read("cpu.max").and_then(|s| parse_cpu_max(&s)).or_else(|| {
        let quota = read("cpu/cpu.cfs_quota_us")?.trim().parse::<i64>().ok()?;
        let period = read("cpu/cpu.cfs_period_us")?.trim().parse::<i64>().ok()?;
        (quota > 0 && period > 0).then(|| quota as f64 / period as f64)
    });
    let cgroup_memory = read("memory.max")
        .and_then(|s| parse_memory_max(&s))
        .or_else(|| read("memory/memory.limit_in_bytes").and_then(|s| parse_memory_max(&s)))
        // cgroup v1 reports "no limit" as a huge number rather than "max".
        .filter(|&bytes| bytes < (1 << 60));
    let host_memory = std::fs::read_to_string(meminfo)
        .ok()
        .and_then(|s| parse_meminfo_total(&s));

    Resources {
        cpus: cgroup_cpus.map(|c| c.min(host_cpus)).unwrap_or(host_cpus),
        memory_bytes: cgroup_memory.or(host_memory),
        memory_is_limit: cgroup_memory.is_some(),
        cpus_from_cgroup: cgroup_cpus.is_some(),
    }
}

/// `cpu.max` holds "QUOTA PERIOD" or "max PERIOD".
fn parse_cpu_max(s: &str) -> Option<f64> {
    let mut parts = s.split_whitespace();
    let quota = parts.next()?;
    let period: f64 = parts.next().unwrap_or("100000").parse().ok()?;
    if quota == "max" || period <= 0.0 {
        return None;
    }
    let quota: f64 = quota.parse().ok()?;
    (quota > 0.0).then_some(quota / period)
}

fn parse_memory_max(s: &str) -> Option<u64> {
    let s = s.trim();
    if s == "max" {
        return None;
    }
    s.parse().ok()
}

fn parse_meminfo_total(s: &str) -> Option<u64> {
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(cpus: f64, memory_mib: u64) -> Resources {
        Resources {
            cpus,
            memory_bytes: Some(memory_mib * MIB),
            memory_is_limit: true,
            cpus_from_cgroup: true,
        }
    }

    #[test]
    fn derive_table() {
        // (resources, threads, primary max/min, replica max/min, cache MiB)
        let cases = [
            // seed 003's pod: limits 500m / 512Mi
            (limits(0.5, 512), 1, (10, 2), (8, 2), 128),
            (limits(1.0, 1024), 1, (10, 2), (8, 2), 256),
            (limits(2.5, 2048), 2, (30, 6), (24, 6), 512),
            (limits(4.0, 4096), 4, (40, 8), (32, 8), 1024),
            // a huge node: the seed's caps (150 open / 30 idle, 100 / 20) hold
            (limits(64.0, 65536), 64, (150, 30), (100, 20), 16384),
            // a tiny memory limit still gets a usable cache
            (limits(1.0, 16), 1, (10, 2), (8, 2), 8),
            // host, no limit: an eighth of memory capped at 256 MiB
            (
                Resources {
                    cpus: 2.0,
                    memory_bytes: Some(24 * 1024 * MIB),
                    memory_is_limit: false,
                    cpus_from_cgroup: true,
                },
                2,
                (20, 4),
                (16, 4),
                256,
            ),
            (
                Resources {
                    cpus: 2.0,
                    memory_bytes: None,
                    memory_is_limit: false,
                    cpus_from_cgroup: true,
                },
                2,
                (20, 4),
                (16, 4),
                64,
            ),
        ];
        for (res, threads, primary, replica, cache_mib) in cases {
            let t = derive(&res);
            assert_eq!(t.worker_threads, threads, "threads for {res:?}");
            assert_eq!((t.primary_pool.max, t.primary_pool.min), primary, "primary for {res:?}");
            assert_eq!((t.replica_pool.max, t.replica_pool.min), replica, "replica for {res:?}");
            assert_eq!(t.cache_bytes, cache_mib * MIB, "cache for {res:?}");
        }
    }

    #[test]
    fn parses_cgroup_files() {
        assert_eq!(parse_cpu_max("50000 100000\n"), Some(0.5));
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("garbage"), None);
        assert_eq!(parse_memory_max("536870912\n"), Some(512 * MIB));
        assert_eq!(parse_memory_max("max\n"), None);
        assert_eq!(
            parse_meminfo_total("MemTotal:       2048 kB\nMemFree: 1 kB\n"),
            Some(2 * MIB)
        );
    }

    #[test]
    fn detects_cgroup_v2_limits_from_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cpu.max"), "150000 100000\n").unwrap();
        std::fs::write(dir.path().join("memory.max"), "268435456\n").unwrap();
        let res = detect_in(dir.path(), &dir.path().join("missing"));
        let host = std::thread::available_parallelism().unwrap().get() as f64;
        assert_eq!(res.cpus, 1.5f64.min(host));
        assert_eq!(res.memory_bytes, Some(256 * MIB));
        assert!(res.memory_is_limit);
    }

    #[test]
    fn falls_back_to_host_without_cgroup() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("meminfo"), "MemTotal: 1048576 kB\n").unwrap();
        let res = detect_in(&dir.path().join("no-cgroup"), &dir.path().join("meminfo"));
        assert_eq!(res.memory_bytes, Some(1024 * MIB));
        assert!(!res.memory_is_limit);
        assert!(res.cpus >= 1.0);
    }
}
