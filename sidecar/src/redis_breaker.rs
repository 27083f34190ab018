//! Whether a pod asks the fleet's Redis at all: once calls have failed (timed out or errored)
//! [`TRIP_AFTER`] times in a row over at least one `timeout_ms`, the pod decides locally for
//! [`RETRY_AFTER`] without asking, then lets one request at a time try again (a probe) until one
//! is answered. The rate limiter and the waiting room each keep one.
//!
//! Without it, every request during a Redis outage waited the whole `timeout_ms` before deciding
//! locally, and a pod's consecutive requests flipped between the shared state and its own as
//! single calls happened to make it in time: a buyer's ticket of one line then counted as none on
//! the next request. Envoy's outlier ejection and Linkerd's failure accrual do the same for
//! upstream hosts.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a pod decides locally once it stopped asking, before one request asks Redis again
/// (or the call timeout, if longer, so that one probe is out at a time): an outage costs each
/// pod one timeout a second rather than one per request, and a pod is back on the fleet's state
/// within a second of Redis answering again.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Failed calls in a row that make a pod stop asking, provided they span at least one call
/// timeout. A stall of the pod's own event loop (a busy machine) fails every call in flight in
/// the same instant, as a Redis that is down would, but the calls after it are answered; a Redis
/// that is down goes on failing calls for longer than a timeout.
pub const TRIP_AFTER: u32 = 3;

pub struct Breaker {
    /// 0 while the pod asks Redis; else the moment (ms since `epoch`, plus one) from which the
    /// next request may probe it.
    retry_at_ms: AtomicU64,
    /// Calls that failed since the last one answered, and when the first of them failed.
    failures: AtomicU32,
    first_failure_ms: AtomicU64,
    retry_ms: u64,
    span_ms: u64,
    epoch: Instant,
}

impl Breaker {
    /// For calls that time out after `timeout`.
    pub fn new(timeout: Duration) -> Breaker {
        Breaker {
            retry_at_ms: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            first_failure_ms: AtomicU64::new(0),
            retry_ms: RETRY_AFTER.max(timeout).as_millis() as u64,
            span_ms: timeout.as_millis() as u64,
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Whether this request should ask Redis: yes until the pod stopped asking (see
    /// [`Breaker::failed`]); then no until the retry time, then yes for the one request that
    /// claims the probe (the others go on deciding locally while it is out).
    pub fn should_ask(&self) -> bool {
        self.should_ask_at(self.now_ms())
    }

    fn should_ask_at(&self, now: u64) -> bool {
        let at = self.retry_at_ms.load(Ordering::Acquire);
        at == 0
            || (now >= at
                && self
                    .retry_at_ms
                    .compare_exchange(at, now + self.retry_ms, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok())
    }

    /// Redis answered a call: every request asks it again.
    pub fn answered(&self) {
        // Written only when there is something to clear: this runs on every answered call.
        if self.failures.load(Ordering::Acquire) != 0 {
            self.failures.store(0, Ordering::Release);
            self.first_failure_ms.store(0, Ordering::Release);
        }
        if self.retry_at_ms.load(Ordering::Acquire) != 0 {
            self.retry_at_ms.store(0, Ordering::Release);
        }
    }

    /// A call failed. True when this failure makes the pod stop asking (for a log line): the
    /// [`TRIP_AFTER`]th in a row or later, at least one timeout after the first of them. A probe
    /// that fails moves the next one a retry time further.
    pub fn failed(&self) -> bool {
        self.failed_at(self.now_ms())
    }

    fn failed_at(&self, now: u64) -> bool {
        let before = self.failures.fetch_add(1, Ordering::AcqRel);
        if before == 0 {
            self.first_failure_ms.store(now, Ordering::Release);
        }
        // 0: the first failure's own store has not landed yet; count from now.
        let first = match self.first_failure_ms.load(Ordering::Acquire) {
            0 => now,
            first => first,
        };
        if before < TRIP_AFTER - 1 || now < first + self.span_ms {
            return false;
        }
        self.retry_at_ms.swap(now + self.retry_ms, Ordering::AcqRel) == 0
    }

    /// Whether the pod has stopped asking Redis.
    pub fn is_open(&self) -> bool {
        self.retry_at_ms.load(Ordering::Acquire) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Times are passed in (ms): the test does not depend on how fast the machine runs it.
    #[test]
    fn failures_in_a_row_over_a_timeout_stop_the_asking_until_one_probe_is_answered() {
        let b = Breaker::new(Duration::from_millis(100));
        assert!(b.should_ask_at(10) && b.should_ask_at(11), "asks while Redis answers");
        // A stall of the pod: every call in flight fails in the same instant; the pod goes on
        // asking, and the next answer clears the count.
        for _ in 0..5 {
            assert!(!b.failed_at(20));
        }
        assert!(b.should_ask_at(21));
        b.answered();
        // Failures in a row over less than a timeout: still asking.
        for now in [30, 60, 90] {
            assert!(!b.failed_at(now));
        }
        assert!(b.should_ask_at(91));
        // The one a timeout after the first stops it, and says so once.
        assert!(b.failed_at(130), "stops asking");
        assert!(!b.should_ask_at(131), "local right after");
        assert!(!b.should_ask_at(1129), "local until the retry time");
        assert!(b.should_ask_at(1130), "one probe once the retry time has come");
        assert!(!b.should_ask_at(1131), "the others stay local while the probe is out");
        // The probe fails: local again, a retry time from its failure, and no second "stops".
        assert!(!b.failed_at(1300));
        assert!(!b.should_ask_at(2299));
        assert!(b.should_ask_at(2300), "the next probe");
        b.answered();
        assert!(
            b.should_ask_at(2301) && b.should_ask_at(2302),
            "everyone asks once Redis answered"
        );
        assert!(!b.is_open());
    }

    #[test]
    fn a_timeout_longer_than_the_retry_time_keeps_one_probe_out_at_a_time() {
        let b = Breaker::new(Duration::from_millis(3000));
        for now in [1, 1500, 3001] {
            b.failed_at(now);
        }
        assert!(b.is_open());
        assert!(!b.should_ask_at(6000));
        assert!(b.should_ask_at(6001), "the probe, a timeout after the trip");
        assert!(
            !b.should_ask_at(9000),
            "no second probe while the first may still be out"
        );
    }
}
