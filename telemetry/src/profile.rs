//! Profiles on demand, for the app's and the sidecar's admin ports: which profile a request asks
//! for (`/debug/pprof/profile?seconds=N`, `/debug/pprof/heap`), the admin token it must carry, and
//! taking it: a CPU profile sampled for N seconds, in pprof's protobuf format (`go tool pprof`
//! reads it). One profile at a time per process: a second request while one runs is refused, not
//! queued, so nobody piles up minutes of sampling on a busy pod.
//!
//! A heap profile is the live allocations [`crate::heap`] sampled: both programs wrap their
//! allocator (mimalloc) in its sampler and turn it on with profiling. A process that does not
//! sample answers 501.

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pprof::protos::Message;

/// The CPU profile's path, as Go's `net/http/pprof` serves it.
pub const CPU_PATH: &str = "/debug/pprof/profile";
/// The heap profile's path (501 where the allocator does not sample, see the module's documentation).
pub const HEAP_PATH: &str = "/debug/pprof/heap";
/// `seconds` when the request names none: enough samples (about 1,000) to see where a busy
/// process spends its time. Go's handler defaults to 30; `go tool pprof <url>` asks for 30 itself.
pub const DEFAULT_SECONDS: u64 = 10;
/// The longest profile: long enough to catch a slow minute, short enough that a forgotten request
/// does not keep the one profile slot (and the sampling's cost) for long.
pub const MAX_SECONDS: u64 = 60;
/// Samples per second: 99 rather than 100 so the samples do not fall in lockstep with work that
/// runs on a 10 ms timer (the usual choice of `perf` and pprof-rs).
const SAMPLE_HZ: i32 = 99;
/// Libraries not unwound through from the signal handler: unwinding inside them (a thread
/// stopped in `malloc` or the unwinder itself) can deadlock.
const DO_NOT_UNWIND: [&str; 4] = ["libc", "libgcc", "pthread", "vdso"];

/// A profile a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// Where the CPU goes, sampled for this long.
    Cpu(Duration),
    /// Live allocations, from the heap sampler (501 where it is off).
    Heap,
}

/// Why a profile request is refused, with the HTTP status that says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProfileError {
    /// No `Authorization: Bearer <token>`, or the wrong token: 401.
    Unauthorized,
    /// `seconds` is not a whole number in 1..=[`MAX_SECONDS`]: 400, naming the parameter.
    BadSeconds(String),
    /// Another profile is being taken in this process: 409, with the time it has left.
    Busy { ends_in: Duration },
    /// A heap profile: 501, with why.
    HeapUnsupported,
    /// The profiler could not start or its report could not be built: 500.
    Failed(String),
}

impl ProfileError {
    pub fn status(&self) -> u16 {
        match self {
            ProfileError::Unauthorized => 401,
            ProfileError::BadSeconds(_) => 400,
            ProfileError::Busy { .. } => 409,
            ProfileError::HeapUnsupported => 501,
            ProfileError::Failed(_) => 500,
        }
    }

    /// Seconds until the running profile ends, for a `Retry-After` header.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ProfileError::Busy { ends_in } => Some(ends_in.as_secs() + 1),
            _ => None,
        }
    }
}

impl fmt::Display for ProfileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProfileError::Unauthorized => {
                f.write_str("missing or wrong bearer token (Authorization: Bearer <admin token>)")
            }
            ProfileError::BadSeconds(value) => write!(
                f,
                "`seconds`: `{value}` is not a whole number of seconds in 1..={MAX_SECONDS} (default {DEFAULT_SECONDS})"
            ),
            ProfileError::Busy { ends_in } => write!(
                f,
                "another profile is being taken in this process (it ends in {} s): one at a time, retry after it",
                ends_in.as_secs() + 1
            ),
            ProfileError::HeapUnsupported => f.write_str(
                "heap profiles are off in this process: its allocator does not sample allocations \
                 (mall-app and the sidecar sample them once profiling is on); CPU profiles are at \
                 /debug/pprof/profile",
            ),
            ProfileError::Failed(why) => write!(f, "the profile could not be taken: {why}"),
        }
    }
}

impl std::error::Error for ProfileError {}

/// The admin token check of a profile request: `authorization` is the request's header. The
/// comparison takes as long whichever byte differs, so the token cannot be guessed by timing.
pub fn authorize(authorization: Option<&str>, token: &str) -> Result<(), ProfileError> {
    let presented = authorization.and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
    let (a, b) = (presented.as_bytes(), token.as_bytes());
    let same = a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0;
    if same && !token.is_empty() {
        Ok(())
    } else {
        Err(ProfileError::Unauthorized)
    }
}

/// A profile request from start to end, as both admin ports answer it: the token, then the
/// profile. Blocks for a CPU profile's duration: run it on a thread of its own (tokio's
/// `spawn_blocking`), so the port's probes and scrapes go on meanwhile.
pub fn answer(
    authorization: Option<&str>,
    token: &str,
    asked: Result<Profile, ProfileError>,
) -> Result<Vec<u8>, ProfileError> {
    authorize(authorization, token)?;
    asked?.take()
}

impl Profile {
    /// The profile a request for `path` with `query` asks for; `None` when the path is not a
    /// profile's (the caller's 404).
    pub fn from_request(path: &str, query: Option<&str>) -> Option<Result<Profile, ProfileError>> {
        match path {
            CPU_PATH => Some(cpu_seconds(query).map(|s| Profile::Cpu(Duration::from_secs(s)))),
            HEAP_PATH => Some(Ok(Profile::Heap)),
            _ => None,
        }
    }

    /// Takes the profile: blocks for a CPU profile's whole duration (run it on a thread of its
    /// own, e.g. tokio's `spawn_blocking`), then returns the pprof protobuf (uncompressed; pprof
    /// reads it as it reads the gzipped form Go serves).
    pub fn take(self) -> Result<Vec<u8>, ProfileError> {
        match self {
            Profile::Cpu(duration) => cpu(duration),
            Profile::Heap if crate::heap::enabled() => Ok(crate::heap::profile()),
            Profile::Heap => Err(ProfileError::HeapUnsupported),
        }
    }
}

/// `seconds=N` from a query string (other parameters are ignored, as Go's handler does).
fn cpu_seconds(query: Option<&str>) -> Result<u64, ProfileError> {
    let value = query
        .unwrap_or("")
        .split('&')
        .find_map(|pair| pair.strip_prefix("seconds="));
    match value {
        None => Ok(DEFAULT_SECONDS),
        Some(v) => match v.parse::<u64>() {
            Ok(s) if (1..=MAX_SECONDS).contains(&s) => Ok(s),
            _ => Err(ProfileError::BadSeconds(v.chars().take(32).collect())),
        },
    }
}

/// When the profile being taken ends; `None` when none is.
static RUNNING: Mutex<Option<Instant>> = Mutex::new(None);

/// The one profile slot of the process, released on drop (also when the profile fails).
struct Slot;

impl Slot {
    fn claim(duration: Duration) -> Result<Slot, ProfileError> {
        let mut running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ends) = *running {
            return Err(ProfileError::Busy {
                ends_in: ends.saturating_duration_since(Instant::now()),
            });
        }
        *running = Some(Instant::now() + duration);
        Ok(Slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        *RUNNING.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

fn cpu(duration: Duration) -> Result<Vec<u8>, ProfileError> {
    let _slot = Slot::claim(duration)?;
    let failed = |e: pprof::Error| ProfileError::Failed(e.to_string());
    let guard = pprof::ProfilerGuardBuilder::default()
        .frequency(SAMPLE_HZ)
        .blocklist(&DO_NOT_UNWIND)
        .build()
        .map_err(failed)?;
    std::thread::sleep(duration);
    let report = guard
        .report()
        .frames_post_processor(without_the_unwinder)
        .build()
        .map_err(failed)?;
    drop(guard);
    Ok(report.pprof().map_err(failed)?.encode_to_vec())
}

/// Drops the unwinder's own frames from the top of a sample's stack: pprof-rs unwinds from its
/// signal handler, so without this every sample's innermost function would be
/// `backtrace::...::trace`, and the flat profile and the flame graph's tips would say nothing.
fn without_the_unwinder(frames: &mut pprof::Frames) {
    let unwinder = |frame: &Vec<pprof::Symbol>| {
        frame.iter().any(|symbol| {
            let name = symbol.name();
            name.starts_with("backtrace::") || name.starts_with("<pprof::") || name.starts_with("pprof::")
        })
    };
    let ours = frames.frames.iter().take_while(|frame| unwinder(frame)).count();
    frames.frames.drain(..ours);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_are_bounded_and_named() {
        let cpu = |q| Profile::from_request(CPU_PATH, q).unwrap();
        assert_eq!(cpu(None), Ok(Profile::Cpu(Duration::from_secs(DEFAULT_SECONDS))));
        assert_eq!(cpu(Some("debug=1&seconds=3")), Ok(Profile::Cpu(Duration::from_secs(3))));
        assert_eq!(cpu(Some("seconds=60")), Ok(Profile::Cpu(Duration::from_secs(60))));
        for bad in ["seconds=0", "seconds=61", "seconds=ten", "seconds=-1", "seconds="] {
            let err = cpu(Some(bad)).unwrap_err();
            assert_eq!(err.status(), 400, "{bad}");
            assert!(err.to_string().starts_with("`seconds`"), "{err}");
        }
        assert_eq!(Profile::from_request("/debug/pprof/other", None), None);
        assert_eq!(Profile::from_request(HEAP_PATH, None), Some(Ok(Profile::Heap)));
        assert_eq!(ProfileError::HeapUnsupported.status(), 501);
    }

    #[test]
    fn the_token_must_match() {
        assert_eq!(authorize(Some("Bearer s3cret"), "s3cret"), Ok(()));
        for wrong in [
            None,
            Some("Bearer s3cre"),
            Some("Bearer s3cret2"),
            Some("s3cret"),
            Some("Basic s3cret"),
        ] {
            assert_eq!(authorize(wrong, "s3cret").unwrap_err().status(), 401, "{wrong:?}");
        }
        assert!(authorize(Some("Bearer "), "").is_err(), "an empty token opens nothing");
    }

    #[inline(never)]
    fn spin_for_the_profiler(until: Instant) -> u64 {
        let mut x = 1u64;
        while Instant::now() < until {
            for _ in 0..10_000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            }
        }
        std::hint::black_box(x)
    }

    /// One test, as the slot is the process's: a profile taken while a thread spins names the
    /// spinning function, and a second request meanwhile is refused at once.
    #[test]
    fn a_cpu_profile_names_the_busy_function_and_is_taken_one_at_a_time() {
        let spinner = std::thread::spawn(|| spin_for_the_profiler(Instant::now() + Duration::from_millis(1500)));
        let first = std::thread::spawn(|| Profile::Cpu(Duration::from_secs(1)).take());
        let deadline = Instant::now() + Duration::from_secs(1);
        while RUNNING.lock().unwrap().is_none() {
            assert!(Instant::now() < deadline, "the first profile never started");
            std::thread::yield_now();
        }
        let refused = Profile::Cpu(Duration::from_secs(1)).take().unwrap_err();
        assert_eq!(refused.status(), 409);
        assert!(refused.retry_after().is_some());
        let bytes = first.join().unwrap().expect("the first profile");
        spinner.join().unwrap();
        let profile = pprof::protos::Profile::decode(bytes.as_slice()).expect("pprof protobuf");
        assert!(!profile.sample.is_empty(), "no samples");
        let name = |location: u64| {
            let location = profile.location.iter().find(|l| l.id == location).expect("location");
            let function = profile.function.iter().find(|f| f.id == location.line[0].function_id);
            &profile.string_table[function.expect("function").name as usize]
        };
        assert!(
            profile
                .function
                .iter()
                .any(|f| profile.string_table[f.name as usize].contains("spin_for_the_profiler")),
            "the busy function is named"
        );
        for sample in &profile.sample {
            let leaf = name(sample.location_id[0]);
            assert!(
                !leaf.contains("backtrace::"),
                "the unwinder's frames are dropped: {leaf}"
            );
        }
    }
}
