//! 64-bit snowflake ids for orders: 41 bits of milliseconds since 2024-01-01, 10 bits of
//! worker id, 12 bits of sequence. Ids are unique across instances with distinct worker ids,
//! and increase with time, so "newest first" is "largest id first".

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub const MAX_WORKER_ID: u16 = (1 << WORKER_BITS) - 1;
const EPOCH_MS: u64 = 1_704_067_200_000;
const WORKER_BITS: u32 = 10;
const SEQUENCE_BITS: u32 = 12;
const SEQUENCE_MASK: u64 = (1 << SEQUENCE_BITS) - 1;

pub struct Snowflake {
    worker_id: u64,
    /// `(milliseconds << 12) | sequence` of the last id handed out.
    last: AtomicU64,
}

impl Snowflake {
    pub fn new(worker_id: u16) -> Self {
        assert!(worker_id <= MAX_WORKER_ID, "worker id {worker_id} out of range");
        Snowflake {
            worker_id: worker_id as u64,
            last: AtomicU64::new(0),
        }
    }

    pub fn next_id(&self) -> i64 {
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let now = (now_ms().saturating_sub(EPOCH_MS)) << SEQUENCE_BITS;
            // Same millisecond (or the clock went back): take the next sequence number. When the
            // sequence overflows, this rolls into the next millisecond, borrowing from the future
            // rather than waiting; the clock catches up within microseconds.
            let next = if now > last { now } else { last + 1 };
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    let ms = next >> SEQUENCE_BITS;
                    let seq = next & SEQUENCE_MASK;
                    return ((ms << (WORKER_BITS + SEQUENCE_BITS)) | (self.worker_id << SEQUENCE_BITS) | seq) as i64;
                }
                Err(actual) => last = actual,
            }
        }
    }
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
    use std::collections::HashSet;
    use std::sync::Arc;

    #[test]
    fn ids_are_unique_and_increasing_across_threads() {
        let gen = Arc::new(Snowflake::new(7));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let gen = gen.clone();
                std::thread::spawn(move || {
                    let ids: Vec<i64> = (0..20_000).map(|_| gen.next_id()).collect();
                    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids from one thread increase");
                    ids
                })
            })
            .collect();
        let mut all = HashSet::new();
        for h in handles {
            for id in h.join().unwrap() {
                assert!(id > 0);
                assert_eq!((id >> SEQUENCE_BITS) & MAX_WORKER_ID as i64, 7, "worker id is embedded");
                assert!(all.insert(id), "duplicate id {id}");
            }
        }
        assert_eq!(all.len(), 80_000);
    }

    #[test]
    fn different_workers_never_collide() {
        let a = Snowflake::new(1);
        let b = Snowflake::new(2);
        let ids: HashSet<i64> = (0..5000).flat_map(|_| [a.next_id(), b.next_id()]).collect();
        assert_eq!(ids.len(), 10_000);
    }
}
