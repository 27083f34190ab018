//! Whether a pod asks the fleet's Redis at all: after a call that failed (timed out or errored),
//! the pod decides locally for [`RETRY_AFTER`] without asking, then lets one request at a time
//! try again (a probe) until one is answered. The rate limiter and the waiting room each keep one.
//!
//! Without it, every request during a Redis brownout waited the whole `timeout_ms` before
//! deciding locally, and a pod's consecutive requests flipped between the shared state and its
//! own as single calls happened to make it in time: a buyer's ticket of one line then counted as
//! none on the next request. Envoy's outlier ejection and Linkerd's failure accrual do the same
//! for upstream hosts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a pod decides locally after a failed call before it asks Redis again: a brownout
/// costs each pod one timeout a second rather than one per request, and a pod is back on the
/// fleet's state within a second of Redis answering again.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

pub struct Breaker {
    /// 0 while Redis answers; else the moment (ms since `epoch`, plus one) from which the next
    /// request may probe it.
    retry_at_ms: AtomicU64,
    retry_ms: u64,
    epoch: Instant,
}

impl Breaker {
    pub fn new(retry: Duration) -> Breaker {
        Breaker {
            retry_at_ms: AtomicU64::new(0),
            retry_ms: retry.as_millis() as u64,
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Whether this request should ask Redis: always while it answers; after a failure, no
    /// until the retry time, then yes for the one request that claims the probe (the others
    /// go on deciding locally while it is out).
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
        self.retry_at_ms.store(0, Ordering::Release);
    }

    /// A call failed: requests decide locally until the retry time.
    pub fn failed(&self) {
        self.retry_at_ms.store(self.now_ms() + self.retry_ms, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_a_failure_requests_stay_local_until_one_probe_is_let_through() {
        let b = Breaker::new(Duration::from_millis(50));
        assert!(b.should_ask() && b.should_ask(), "asks while Redis answers");
        b.failed();
        assert!(!b.should_ask(), "local right after a failure");
        std::thread::sleep(Duration::from_millis(60));
        assert!(b.should_ask(), "one probe once the retry time has come");
        assert!(!b.should_ask(), "the others stay local while the probe is out");
        b.answered();
        assert!(b.should_ask() && b.should_ask(), "everyone asks once Redis answered");
        // A probe that fails pushes the next one a retry further.
        b.failed();
        std::thread::sleep(Duration::from_millis(60));
        assert!(b.should_ask());
        b.failed();
        assert!(!b.should_ask());
    }
}
