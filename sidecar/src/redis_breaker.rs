//! Whether a pod asks the fleet's Redis at all: after [`TRIP_AFTER`] calls in a row that failed
//! (timed out or errored), the pod decides locally for [`RETRY_AFTER`] without asking, then lets
//! one request at a time try again (a probe) until one is answered. The rate limiter and the
//! waiting room each keep one.
//!
//! Without it, every request during a Redis brownout waited the whole `timeout_ms` before
//! deciding locally, and a pod's consecutive requests flipped between the shared state and its
//! own as single calls happened to make it in time: a buyer's ticket of one line then counted as
//! none on the next request. Envoy's outlier ejection and Linkerd's failure accrual do the same
//! for upstream hosts.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a pod decides locally after a failed call before it asks Redis again: a brownout
/// costs each pod one timeout a second rather than one per request, and a pod is back on the
/// fleet's state within a second of Redis answering again.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Failed calls in a row that make a pod stop asking: one answer late on a busy machine is not a
/// Redis that is down (it costs that one request its timeout, as before), while a Redis that is
/// down fails every call in flight at once.
pub const TRIP_AFTER: u32 = 3;

pub struct Breaker {
    /// 0 while Redis answers; else the moment (ms since `epoch`, plus one) from which the next
    /// request may probe it.
    retry_at_ms: AtomicU64,
    /// Calls that failed since the last one answered.
    failures: AtomicU32,
    retry_ms: u64,
    epoch: Instant,
}

impl Breaker {
    pub fn new(retry: Duration) -> Breaker {
        Breaker {
            retry_at_ms: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            retry_ms: retry.as_millis() as u64,
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Whether this request should ask Redis: always until [`TRIP_AFTER`] calls in a row
    /// failed; then no until the retry time, then yes for the one request that claims the probe
    /// (the others go on deciding locally while it is out).
    pub fn should_ask(&self) -> bool {
        let at = self.retry_at_ms.load(Ordering::Acquire);
        if at == 0 {
            return true;
        }
        let now = self.now_ms();
        now >= at
            && self
                .retry_at_ms
                .compare_exchange(at, now + self.retry_ms, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// Redis answered a call: every request asks it again.
    pub fn answered(&self) {
        self.failures.store(0, Ordering::Release);
        self.retry_at_ms.store(0, Ordering::Release);
    }

    /// A call failed: from the [`TRIP_AFTER`]th in a row (a failed probe among them), requests
    /// decide locally until the retry time.
    pub fn failed(&self) {
        if self.failures.fetch_add(1, Ordering::AcqRel) + 1 >= TRIP_AFTER {
            self.retry_at_ms.store(self.now_ms() + self.retry_ms, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_failures_in_a_row_requests_stay_local_until_one_probe_is_let_through() {
        let b = Breaker::new(Duration::from_millis(50));
        assert!(b.should_ask() && b.should_ask(), "asks while Redis answers");
        // One late answer, then an answer: still asking.
        b.failed();
        assert!(b.should_ask());
        b.answered();
        for _ in 1..TRIP_AFTER {
            b.failed();
        }
        assert!(b.should_ask(), "asks until TRIP_AFTER calls in a row failed");
        b.failed();
        assert!(!b.should_ask(), "local right after the last of them");
        std::thread::sleep(Duration::from_millis(60));
        assert!(b.should_ask(), "one probe once the retry time has come");
        assert!(!b.should_ask(), "the others stay local while the probe is out");
        b.answered();
        assert!(b.should_ask() && b.should_ask(), "everyone asks once Redis answered");
        // A probe that fails pushes the next one a retry further at once.
        for _ in 0..TRIP_AFTER {
            b.failed();
        }
        std::thread::sleep(Duration::from_millis(60));
        assert!(b.should_ask(), "the probe");
        b.failed();
        assert!(!b.should_ask(), "local again after the probe failed");
    }
}
