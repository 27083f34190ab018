//! Heap profiles: a sampling wrapper around the program's allocator (mimalloc, which records no
//! allocation stacks of its own). Go's runtime and tcmalloc do the same thing: about one
//! allocation per [`SAMPLE_BYTES`] allocated has its stack recorded while it lives. A heap profile
//! is the live sampled allocations, scaled up to estimate all live memory by stack, in pprof's
//! protobuf format (`inuse_objects`, `inuse_space`).
//!
//! Until [`enable`] is called (the program's profiling is on), the wrapper costs one relaxed
//! atomic load per allocation and per free. Once it is on:
//! - an allocation costs a thread-local countdown, and a sampled one costs a stack walk;
//! - a free costs a look-up in a lock-free table of sampled addresses (a few hundred entries for
//!   a few hundred MiB live), and a lock only when the freed block was sampled.
//!
//! Allocations made while the sampler itself runs (its table of stacks, a profile being built)
//! are never sampled: a thread-local guard stops the recursion.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;

use pprof::protos::Message;

/// The mean number of bytes allocated between two samples (Go's `MemProfileRate` default).
pub const SAMPLE_BYTES: usize = 512 * 1024;
/// Frames kept per sampled stack.
const DEPTH: usize = 48;
/// Sampled allocations tracked at once (beyond this, new ones are not sampled).
const SLOTS: usize = 1 << 14;
/// A freed slot: probing goes on past it.
const TOMBSTONE: usize = 1;

/// `GlobalAlloc` around `A`, sampling once [`enable`]d.
pub struct Sampled<A>(pub A);

static ON: AtomicBool = AtomicBool::new(false);
/// Sampled addresses (0: empty, [`TOMBSTONE`]: freed).
static TABLE: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static LIVE: AtomicUsize = AtomicUsize::new(0);
/// Buckets of the filter in front of the table.
const FILTER_BUCKETS: usize = 1 << 12;
/// A counting filter: how many sampled addresses fall in each bucket (255 sticks). Every free
/// looks here first, a 4 KiB array that stays in cache, and probes the 128 KiB table only when its
/// bucket holds a sample: a CPU profile of a profiled app under load showed `forget` at 6-10 % of
/// its samples when every free read the table (BENCHMARKS.md section 6).
static FILTER: [AtomicU8; FILTER_BUCKETS] = [const { AtomicU8::new(0) }; FILTER_BUCKETS];
/// Each sampled address's size and stack.
static RECORDS: Mutex<Option<HashMap<usize, Record>>> = Mutex::new(None);

thread_local! {
    static UNTIL_SAMPLE: Cell<isize> = const { Cell::new(SAMPLE_BYTES as isize) };
    static RNG: Cell<u64> = const { Cell::new(0) };
    static BUSY: Cell<bool> = const { Cell::new(false) };
}

#[derive(Clone, Copy)]
struct Record {
    size: usize,
    depth: usize,
    ips: [usize; DEPTH],
}

/// Starts sampling (for the rest of the process's life).
pub fn enable() {
    ON.store(true, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

unsafe impl<A: GlobalAlloc> GlobalAlloc for Sampled<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = self.0.alloc(layout);
        if ON.load(Ordering::Relaxed) && !p.is_null() {
            maybe_sample(p as usize, layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = self.0.alloc_zeroed(layout);
        if ON.load(Ordering::Relaxed) && !p.is_null() {
            maybe_sample(p as usize, layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        if ON.load(Ordering::Relaxed) {
            forget(p as usize);
        }
        self.0.dealloc(p, layout)
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let q = self.0.realloc(p, layout, new_size);
        if ON.load(Ordering::Relaxed) && !q.is_null() {
            forget(p as usize);
            maybe_sample(q as usize, new_size);
        }
        q
    }
}

/// Runs `f` with this thread's sampling off; `None` when it already was (a recursive call).
fn guarded<T>(f: impl FnOnce() -> T) -> Option<T> {
    let entered = BUSY.try_with(|b| !b.replace(true)).unwrap_or(false);
    if !entered {
        return None;
    }
    let out = f();
    let _ = BUSY.try_with(|b| b.set(false));
    Some(out)
}

fn maybe_sample(addr: usize, size: usize) {
    let due = UNTIL_SAMPLE
        .try_with(|left| {
            let now = left.get() - size as isize;
            if now > 0 {
                left.set(now);
                false
            } else {
                left.set(next_interval());
                true
            }
        })
        .unwrap_or(false);
    if due {
        guarded(|| record(addr, size));
    }
}

/// Bytes until the next sample: exponentially distributed with mean [`SAMPLE_BYTES`], so
/// allocations of every size are sampled in proportion to their bytes.
fn next_interval() -> isize {
    let x = RNG
        .try_with(|s| {
            let mut x = s.get();
            if x == 0 {
                x = (s as *const Cell<u64> as u64) | 1;
            }
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            s.set(x);
            x
        })
        .unwrap_or(SAMPLE_BYTES as u64);
    let u = ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    (-(u.ln()) * SAMPLE_BYTES as f64) as isize + 1
}

fn slot_of(addr: usize) -> usize {
    (addr.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) % SLOTS
}

/// The filter's bucket: the hash's top 12 bits (the table uses lower ones).
fn bucket_of(addr: usize) -> &'static AtomicU8 {
    &FILTER[(addr.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (usize::BITS - 12)) % FILTER_BUCKETS]
}

fn record(addr: usize, size: usize) {
    let mut r = Record {
        size,
        depth: 0,
        ips: [0; DEPTH],
    };
    // SAFETY: the unsynchronized walk is safe as long as no other thread changes the unwinder's
    // global state meanwhile; the sampler never calls into it except here, under the guard.
    unsafe {
        backtrace::trace_unsynchronized(|frame| {
            r.ips[r.depth] = frame.ip() as usize;
            r.depth += 1;
            r.depth < DEPTH
        });
    }
    let start = slot_of(addr);
    for i in 0..64 {
        let slot = &TABLE[(start + i) % SLOTS];
        let seen = slot.load(Ordering::Relaxed);
        if (seen == 0 || seen == TOMBSTONE)
            && slot
                .compare_exchange(seen, addr, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            // Before the block is handed out (this runs inside its allocation), so any free of
            // it sees the count.
            let _ = bucket_of(addr).fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| n.checked_add(1));
            LIVE.fetch_add(1, Ordering::Relaxed);
            let mut records = RECORDS.lock().unwrap_or_else(|e| e.into_inner());
            records.get_or_insert_with(HashMap::new).insert(addr, r);
            return;
        }
    }
}

fn forget(addr: usize) {
    let bucket = bucket_of(addr);
    if bucket.load(Ordering::Acquire) == 0 {
        return;
    }
    let start = slot_of(addr);
    for i in 0..64 {
        let slot = &TABLE[(start + i) % SLOTS];
        match slot.load(Ordering::Acquire) {
            0 => return,
            seen if seen == addr => {
                // The end of a probe chain may become empty again; elsewhere a tombstone keeps
                // the chain whole. Without this, tombstones piled up and every free probed
                // through them (5-12 % of a profiled process's samples). A block sampled by
                // another thread into the next slot at this very moment can be left behind the
                // emptied slot: it then stays in the profile as live (rare, and only a sample).
                let next_empty = TABLE[(start + i + 1) % SLOTS].load(Ordering::Acquire) == 0;
                let freed = if next_empty { 0 } else { TOMBSTONE };
                if slot
                    .compare_exchange(addr, freed, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    LIVE.fetch_sub(1, Ordering::Relaxed);
                    // A bucket that reached 255 stays "maybe" (its frees probe the table).
                    let _ = bucket.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                        (n != u8::MAX).then(|| n.saturating_sub(1))
                    });
                    // The record is dropped here unless this thread is inside the sampler (then
                    // the profile skips it: its address is no longer in the table).
                    guarded(|| {
                        if let Some(records) = RECORDS.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                            records.remove(&addr);
                        }
                    });
                }
                return;
            }
            _ => {}
        }
    }
}

fn sampled(addr: usize) -> bool {
    let start = slot_of(addr);
    for i in 0..64 {
        match TABLE[(start + i) % SLOTS].load(Ordering::Acquire) {
            0 => return false,
            seen if seen == addr => return true,
            _ => {}
        }
    }
    false
}

/// The live sampled allocations as a pprof heap profile (protobuf). Empty when sampling is off or
/// nothing sampled is alive.
pub fn profile() -> Vec<u8> {
    guarded(build).unwrap_or_default()
}

fn build() -> Vec<u8> {
    use pprof::protos::{Function, Line, Location, Profile, Sample, ValueType};
    let live: Vec<Record> = {
        let mut records = RECORDS.lock().unwrap_or_else(|e| e.into_inner());
        let records = records.get_or_insert_with(HashMap::new);
        // Records of blocks freed while their thread was inside the sampler: dropped now.
        records.retain(|addr, _| sampled(*addr));
        records.values().copied().collect()
    };
    let mut strings: Vec<String> = vec![String::new()];
    let mut string_ids: HashMap<String, i64> = HashMap::new();
    let mut intern = |s: &str, strings: &mut Vec<String>| -> i64 {
        if let Some(id) = string_ids.get(s) {
            return *id;
        }
        strings.push(s.to_string());
        let id = strings.len() as i64 - 1;
        string_ids.insert(s.to_string(), id);
        id
    };
    let mut p = Profile::default();
    let inuse_objects = intern("inuse_objects", &mut strings);
    let count = intern("count", &mut strings);
    let inuse_space = intern("inuse_space", &mut strings);
    let bytes = intern("bytes", &mut strings);
    let space = intern("space", &mut strings);
    p.sample_type = vec![
        ValueType {
            ty: inuse_objects,
            unit: count,
        },
        ValueType {
            ty: inuse_space,
            unit: bytes,
        },
    ];
    p.period_type = Some(ValueType { ty: space, unit: bytes });
    p.period = SAMPLE_BYTES as i64;
    p.default_sample_type = inuse_space;
    let mut locations: HashMap<usize, u64> = HashMap::new();
    let mut functions: HashMap<String, u64> = HashMap::new();
    for r in &live {
        let mut ids = Vec::with_capacity(r.depth);
        for &ip in r.ips[..r.depth].iter() {
            let id = match locations.get(&ip) {
                Some(id) => *id,
                None => {
                    let id = locations.len() as u64 + 1;
                    let mut lines = Vec::new();
                    // SAFETY: resolving an address read from a stack walk of this process.
                    backtrace::resolve(ip as *mut std::ffi::c_void, |symbol| {
                        let name = symbol
                            .name()
                            .map(|n| format!("{n:#}"))
                            .unwrap_or_else(|| format!("{ip:#x}"));
                        let file = symbol.filename().map(|f| f.display().to_string()).unwrap_or_default();
                        let function_id = match functions.get(&name) {
                            Some(f) => *f,
                            None => {
                                let f = functions.len() as u64 + 1;
                                let name_id = intern(&name, &mut strings);
                                let file_id = intern(&file, &mut strings);
                                p.function.push(Function {
                                    id: f,
                                    name: name_id,
                                    system_name: name_id,
                                    filename: file_id,
                                    start_line: 0,
                                });
                                functions.insert(name, f);
                                f
                            }
                        };
                        lines.push(Line {
                            function_id,
                            line: symbol.lineno().map_or(0, i64::from),
                        });
                    });
                    p.location.push(Location {
                        id,
                        mapping_id: 0,
                        address: ip as u64,
                        line: lines,
                        is_folded: false,
                    });
                    locations.insert(ip, id);
                    id
                }
            };
            ids.push(id);
        }
        // The sampler's own frames (this module, the unwinder) say nothing: the stack starts at
        // the allocator's caller.
        let ours = ids
            .iter()
            .take_while(|id| {
                let loc = &p.location[(**id - 1) as usize];
                loc.line.is_empty()
                    || loc.line.iter().any(|l| {
                        let name = &strings[p.function[(l.function_id - 1) as usize].name as usize];
                        name.starts_with("backtrace::")
                            || name.contains("mall_telemetry::heap")
                            || name.starts_with("__rust")
                            || name.starts_with("alloc::alloc::")
                    })
            })
            .count();
        // Unsampling as Go does: a block of `size` bytes is sampled with probability
        // 1 - exp(-size / SAMPLE_BYTES), so it stands for 1 / that many blocks.
        let probability = 1.0 - (-(r.size as f64) / SAMPLE_BYTES as f64).exp();
        let scale = 1.0 / probability.max(1e-12);
        p.sample.push(Sample {
            location_id: ids[ours.min(ids.len().saturating_sub(1))..].to_vec(),
            value: vec![scale.round() as i64, (scale * r.size as f64).round() as i64],
            label: Vec::new(),
        });
    }
    p.string_table = strings;
    p.encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[global_allocator]
    static ALLOCATOR: Sampled<std::alloc::System> = Sampled(std::alloc::System);

    #[inline(never)]
    fn allocate_for_the_heap_profile(blocks: usize) -> Vec<Vec<u8>> {
        (0..blocks).map(|i| vec![i as u8; 64 * 1024]).collect()
    }

    fn inuse_space_under(profile: &pprof::protos::Profile, function: &str) -> i64 {
        let name_of = |id: u64| {
            let f = &profile.function[(id - 1) as usize];
            profile.string_table[f.name as usize].clone()
        };
        profile
            .sample
            .iter()
            .filter(|s| {
                s.location_id.iter().any(|l| {
                    profile.location[(*l - 1) as usize]
                        .line
                        .iter()
                        .any(|line| name_of(line.function_id).contains(function))
                })
            })
            .map(|s| s.value[1])
            .sum()
    }

    #[test]
    fn live_blocks_are_found_under_the_function_that_allocated_them_and_leave_when_freed() {
        enable();
        // 64 MiB in 64 KiB blocks: about 128 samples.
        let kept = allocate_for_the_heap_profile(1024);
        let bytes = profile();
        let p = pprof::protos::Profile::decode(bytes.as_slice()).expect("pprof protobuf");
        assert_eq!(p.string_table[p.sample_type[1].ty as usize], "inuse_space");
        let ours = inuse_space_under(&p, "allocate_for_the_heap_profile");
        assert!(
            (32 << 20..128 << 20).contains(&ours),
            "estimated {ours} bytes live under the allocating function, 64 MiB are"
        );
        drop(kept);
        let p = pprof::protos::Profile::decode(profile().as_slice()).unwrap();
        let after = inuse_space_under(&p, "allocate_for_the_heap_profile");
        assert!(
            after < 8 << 20,
            "{after} bytes still attributed after the blocks were freed"
        );
        // What the admin ports serve.
        let served = crate::profile::Profile::Heap
            .take()
            .expect("a heap profile once sampling is on");
        pprof::protos::Profile::decode(served.as_slice()).expect("pprof protobuf");
    }
}
