//! Reads that respect causality over replicas that lag.
//!
//! A write that changes cached objects inserts an invalidation record in its own transaction
//! (`invalidation.rs`), and the record replicates with the data: a replica has replayed the write
//! exactly when it holds the record. So this instance keeps a *fence* for every record it knows
//! of (its own writes from their commit, others' from the follower, before it evicts their keys):
//! the record's keys are not read from a replica that does not hold the record yet. Such reads go
//! to a replica that does, or to the primary. A value read from a replica is therefore never older
//! than an invalidation this instance has applied, and the cache never stores an old value re-read
//! after its eviction (the worst case of a lagging replica: an old price cached for the key's TTL).
//! Reads without a key (list pages) use a replica only while it has no fence open at all.
//!
//! One checker asks each replica which fenced records it holds: one indexed query per replica
//! every [`CHECK_EVERY`], only while fences are open. How long the oldest record has waited for a
//! replica is that replica's lag (`db_replica_lag_seconds`, `/ready`); a replica lagging more
//! than the configured bound leaves the read rotation until it catches up. The same measure
//! works on PostgreSQL, MySQL and MariaDB, needs no privilege, and is the lag a reader would see;
//! it is 0 while nothing is written, whatever the replica's own replay position.
//!
//! A fence whose record the primary does not hold either is dropped: its record was pruned
//! (older than `MALL_INVALIDATION_RETAIN_SECS`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::cache::Key;

/// How often open fences are checked against the replicas.
pub const CHECK_EVERY: Duration = Duration::from_millis(20);

/// Records asked about per query at most.
pub const CHECK_BATCH: usize = 500;

#[derive(Debug)]
struct Fence {
    keys: Vec<Key>,
    since: Instant,
    /// Bit `i`: replica `i` holds the record.
    held: u64,
}

#[derive(Default, Debug)]
struct Open {
    records: BTreeMap<i64, Fence>,
    /// The newest fenced record of each key. Rows are locked by their writers, so a key's
    /// records commit (and replay) in sequence order: the newest held means all are.
    keys: HashMap<Key, i64>,
}

/// The fences of one instance over `replicas` replicas (none: every call is a no-op).
#[derive(Debug)]
pub struct Fences {
    replicas: usize,
    all: u64,
    open: Mutex<Open>,
    /// How many fences are open: reads skip the lock while none is (the usual case).
    count: AtomicUsize,
}

impl Fences {
    pub fn new(replicas: usize) -> Fences {
        // More than 64 replicas behind one mall is not a topology this models; extra ones get
        // no reads that a fence guards (they are never marked as holding a record).
        let replicas = replicas.min(64);
        Fences {
            replicas,
            all: if replicas == 64 {
                u64::MAX
            } else {
                (1u64 << replicas) - 1
            },
            open: Mutex::new(Open::default()),
            count: AtomicUsize::new(0),
        }
    }

    pub fn enabled(&self) -> bool {
        self.replicas > 0
    }

    /// Fences `keys` behind record `seq` (a record already fenced keeps its first time).
    pub fn fence(&self, seq: i64, keys: &[Key], now: Instant) {
        if !self.enabled() || keys.is_empty() {
            return;
        }
        let mut open = self.open.lock().expect("fences");
        if open.records.contains_key(&seq) {
            return;
        }
        for key in keys {
            let newest = open.keys.entry(key.clone()).or_insert(seq);
            *newest = (*newest).max(seq);
        }
        open.records.insert(
            seq,
            Fence {
                keys: keys.to_vec(),
                since: now,
                held: 0,
            },
        );
        self.count.store(open.records.len(), Ordering::Release);
    }

    /// May `replica` answer a read of `key` (or, with `None`, a read of anything)?
    pub fn readable(&self, replica: usize, key: Option<&Key>) -> bool {
        if !self.enabled() || self.count.load(Ordering::Acquire) == 0 {
            return true;
        }
        let bit = 1u64 << replica.min(63);
        let open = self.open.lock().expect("fences");
        match key {
            Some(key) => match open.keys.get(key) {
                Some(seq) => open.records.get(seq).is_none_or(|f| f.held & bit != 0),
                None => true,
            },
            None => open.records.values().all(|f| f.held & bit != 0),
        }
    }

    /// How long the oldest record not yet held by `replica` has waited for it.
    pub fn lag(&self, replica: usize, now: Instant) -> Duration {
        let bit = 1u64 << replica.min(63);
        let open = self.open.lock().expect("fences");
        open.records
            .values()
            .filter(|f| f.held & bit == 0)
            .map(|f| now.saturating_duration_since(f.since))
            .max()
            .unwrap_or_default()
    }

    /// The records `replica` has not been seen holding yet, oldest first, at most [`CHECK_BATCH`].
    pub fn waiting_on(&self, replica: usize) -> Vec<i64> {
        let bit = 1u64 << replica.min(63);
        let open = self.open.lock().expect("fences");
        open.records
            .iter()
            .filter(|(_, f)| f.held & bit == 0)
            .map(|(seq, _)| *seq)
            .take(CHECK_BATCH)
            .collect()
    }

    /// Records that `replica` holds: fences every replica holds are lifted.
    pub fn held(&self, replica: usize, seqs: &[i64]) {
        let bit = 1u64 << replica.min(63);
        let mut open = self.open.lock().expect("fences");
        let mut lifted = Vec::new();
        for seq in seqs {
            if let Some(f) = open.records.get_mut(seq) {
                f.held |= bit;
                if f.held & self.all == self.all {
                    lifted.push(*seq);
                }
            }
        }
        for seq in lifted {
            Self::lift(&mut open, seq);
        }
        self.count.store(open.records.len(), Ordering::Release);
    }

    /// Fences older than `age` (candidates for the primary check).
    pub fn older_than(&self, age: Duration, now: Instant) -> Vec<i64> {
        let open = self.open.lock().expect("fences");
        open.records
            .iter()
            .filter(|(_, f)| now.saturating_duration_since(f.since) > age)
            .map(|(seq, _)| *seq)
            .take(CHECK_BATCH)
            .collect()
    }

    /// Drops the fences of records that no longer exist on the primary.
    pub fn forget(&self, seqs: &[i64]) {
        let mut open = self.open.lock().expect("fences");
        for seq in seqs {
            Self::lift(&mut open, *seq);
        }
        self.count.store(open.records.len(), Ordering::Release);
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.count.load(Ordering::Acquire) == 0
    }

    fn lift(open: &mut Open, seq: i64) {
        let Some(fence) = open.records.remove(&seq) else { return };
        for key in fence.keys {
            if open.keys.get(&key) == Some(&seq) {
                open.keys.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_read_from_a_replica_only_once_it_holds_the_newest_record() {
        let t0 = Instant::now();
        let f = Fences::new(2);
        assert!(f.readable(0, Some(&Key::product(1))));
        f.fence(10, &[Key::product(1)], t0);
        f.fence(11, &[Key::product(1), Key::product(2)], t0);
        assert!(!f.readable(0, Some(&Key::product(1))));
        assert!(f.readable(0, Some(&Key::product(3))), "other keys are not fenced");
        assert!(!f.readable(0, None), "a list may hold any product");
        f.held(0, &[10]);
        assert!(!f.readable(0, Some(&Key::product(1))), "11 is newer and not replayed");
        f.held(0, &[11]);
        assert!(f.readable(0, Some(&Key::product(1))));
        assert!(f.readable(0, None));
        assert!(!f.readable(1, Some(&Key::product(2))), "replica 1 has replayed nothing");
        assert_eq!(f.waiting_on(1), vec![10, 11]);
        assert!(f.waiting_on(0).is_empty());
        assert_eq!(f.lag(1, t0 + Duration::from_secs(2)), Duration::from_secs(2));
        assert_eq!(f.lag(0, t0 + Duration::from_secs(2)), Duration::ZERO);
        f.held(1, &[10, 11]);
        assert!(f.is_empty(), "held everywhere: lifted");
    }

    #[test]
    fn pruned_records_are_forgotten_and_a_record_is_fenced_once() {
        let t0 = Instant::now();
        let f = Fences::new(1);
        f.fence(5, &[Key::product(1)], t0);
        f.fence(5, &[Key::product(1)], t0 + Duration::from_secs(9));
        assert_eq!(
            f.older_than(Duration::from_secs(1), t0 + Duration::from_secs(2)),
            vec![5]
        );
        f.forget(&[5]);
        assert!(f.readable(0, Some(&Key::product(1))));
        assert!(f.is_empty());
    }

    #[test]
    fn without_replicas_nothing_is_fenced() {
        let f = Fences::new(0);
        f.fence(1, &[Key::product(1)], Instant::now());
        assert!(f.is_empty());
        assert!(f.readable(0, None));
    }
}
