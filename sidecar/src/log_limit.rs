//! A cap on library log lines per call site, so a failure under load cannot fill the disk.
//!
//! pingora logs a line for every request it fails or serves stale ("Fail to proxy: ..."). With the
//! app down under load that is a line per request, tens of thousands a second: one benchmark run
//! wrote 60 GB of log in minutes. Each library call site (pingora, or anything else not this
//! crate) may log [`LINES_PER_SECOND`] lines a second; the rest are dropped and counted in
//! `sidecar_log_lines_dropped_total`. The access log and the sidecar's own lines are not capped.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use tracing::subscriber::Interest;
use tracing::Metadata;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Context, Filter};

/// Lines each library call site may log per second.
pub const LINES_PER_SECOND: u64 = 20;

const SLOTS: usize = 256;

/// Library lines dropped since the process started.
pub static DROPPED: AtomicU64 = AtomicU64::new(0);

/// pingora's `ERROR failed to acquire reusable stream`: a pooled keep-alive connection to the app
/// that the app had already closed. That is ordinary keep-alive churn (the app's idle timeout ends
/// connections the pool still holds; pingora then opens a new one), not a failure, so it is counted
/// (`sidecar_upstream_stale_pooled_connections_total`) instead of logged at error. (A filter cannot
/// re-level a line; pingora's own `debug` line "No reusable connection found" remains for tracing.)
pub static STALE_POOLED: AtomicU64 = AtomicU64::new(0);

/// Whether `meta` is pingora's stale-pooled-connection line (the only ERROR in
/// `pingora_core::connectors`' module file).
fn is_stale_pooled_connection(meta: &Metadata<'_>) -> bool {
    *meta.level() == tracing::Level::ERROR
        && meta.target() == "pingora_core::connectors"
        && meta.file().is_some_and(|f| f.ends_with("connectors/mod.rs"))
}

/// Per call site: the current second in the high 40 bits, lines logged in it in the low 24.
/// Call sites are hashed into a fixed table; two sharing a slot share its budget.
pub struct PerCallsite {
    slots: Box<[AtomicU64]>,
    start: OnceLock<Instant>,
}

impl PerCallsite {
    pub fn new() -> Self {
        PerCallsite {
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            start: OnceLock::new(),
        }
    }

    fn capped(meta: &Metadata<'_>) -> bool {
        let target = meta.target();
        meta.is_event() && target != "access" && !target.starts_with("mall_sidecar")
    }

    /// True when the line at `meta` may be logged in second `now`.
    fn admit(&self, meta: &Metadata<'_>, now: u64) -> bool {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (meta.target(), meta.file(), meta.line(), meta.level().as_str()).hash(&mut hasher);
        let slot = &self.slots[hasher.finish() as usize % SLOTS];
        let mut current = slot.load(Ordering::Relaxed);
        loop {
            let (second, lines) = (current >> 24, current & 0xFF_FFFF);
            let next = if second == now {
                (now << 24) | (lines + 1).min(0xFF_FFFF)
            } else {
                (now << 24) | 1
            };
            let admitted = second != now || lines < LINES_PER_SECOND;
            if !admitted {
                DROPPED.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            match slot.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(seen) => current = seen,
            }
        }
    }
}

impl Default for PerCallsite {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Filter<S> for PerCallsite {
    fn enabled(&self, meta: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        if is_stale_pooled_connection(meta) {
            STALE_POOLED.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if !Self::capped(meta) {
            return true;
        }
        let start = self.start.get_or_init(Instant::now);
        self.admit(meta, start.elapsed().as_secs())
    }

    /// The cap never lets through more than the filter it is combined with: without this hint
    /// `And` would report no maximum level, and every debug and trace line of pingora's would go
    /// through the dispatcher only to be refused (about 1 % of a request in a profile).
    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::TRACE)
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if Self::capped(meta) {
            // Asked on every event, so the budget can say no.
            Interest::sometimes()
        } else {
            Interest::always()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(target: &'static str, level: tracing::Level, line: Option<u32>) -> Metadata<'static> {
        Metadata::new(
            "event",
            target,
            level,
            line.map(|_| "lib.rs"),
            line,
            None,
            tracing::field::FieldSet::new(&[], tracing::callsite::Identifier(&CALLSITE)),
            tracing::metadata::Kind::EVENT,
        )
    }

    #[test]
    fn a_stale_pooled_connection_is_counted_not_an_error() {
        let line = Metadata::new(
            "event",
            "pingora_core::connectors",
            tracing::Level::ERROR,
            Some("/registry/pingora-core-0.9.1/src/connectors/mod.rs"),
            Some(293),
            None,
            tracing::field::FieldSet::new(&[], tracing::callsite::Identifier(&CALLSITE)),
            tracing::metadata::Kind::EVENT,
        );
        assert!(is_stale_pooled_connection(&line));
        assert!(!is_stale_pooled_connection(&event(
            "pingora_core::connectors",
            tracing::Level::WARN,
            Some(485)
        )));
        assert!(!is_stale_pooled_connection(&event(
            "pingora_proxy",
            tracing::Level::ERROR,
            Some(1)
        )));
    }

    #[test]
    fn a_flooding_call_site_is_capped_per_second_and_the_rest_counted() {
        let limit = PerCallsite::new();
        let flood = event("pingora_proxy::proxy_cache", tracing::Level::WARN, Some(936));
        let other = event("pingora_core::listeners", tracing::Level::ERROR, Some(10));
        let before = DROPPED.load(Ordering::Relaxed);
        let admitted = (0..1_000).filter(|_| limit.admit(&flood, 7)).count();
        assert_eq!(admitted as u64, LINES_PER_SECOND);
        assert!(DROPPED.load(Ordering::Relaxed) - before >= 1_000 - LINES_PER_SECOND);
        // Another call site keeps its own budget; the next second refills.
        assert!(limit.admit(&other, 7));
        assert!(limit.admit(&flood, 8));
        // The access log and the sidecar's own lines are never capped.
        assert!(PerCallsite::capped(&flood));
        assert!(!PerCallsite::capped(&event("access", tracing::Level::INFO, None)));
        assert!(!PerCallsite::capped(&event(
            "mall_sidecar::services",
            tracing::Level::WARN,
            None
        )));
    }

    struct Callsite;
    static CALLSITE: Callsite = Callsite;
    impl tracing::Callsite for Callsite {
        fn set_interest(&self, _: Interest) {}
        fn metadata(&self) -> &Metadata<'_> {
            unreachable!("not registered")
        }
    }
}
