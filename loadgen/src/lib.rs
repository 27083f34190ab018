//! Load for the mall, as seed 001 measured it: stock deduction (50 concurrent), cart updates (30),
//! order creation (20), a mix (40), and wrk's product reads (`GET /api/products/{1..1000}`), for a
//! duration or a request count, closed-loop or at a fixed rate. Latencies go into an HDR histogram
//! (at a fixed rate, timed from when each request was due, so coordinated omission cannot hide
//! stalls); after the run, `check` compares the
//! database with what the run was told: stock consumed equals the items of successful orders, and
//! no idempotency key made two orders.

pub mod arrivals;
pub mod check;
mod report;
mod scenario;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

pub use report::{Report, StatusCount};
pub use scenario::{login, Scenario};

/// How long or how much.
#[derive(Debug, Clone, Copy)]
pub enum Amount {
    Duration(Duration),
    Requests(u64),
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Base URL of the mall (the sidecar or an app instance), e.g. `http://127.0.0.1:8080`.
    pub target: String,
    pub scenario: Scenario,
    /// Concurrent connections; `None` takes seed 001's number for the scenario.
    pub concurrency: Option<usize>,
    pub amount: Amount,
    /// Requests per second for the whole run; `None` is closed-loop (as fast as answered).
    pub rate: Option<f64>,
    /// Users `user1..userN` to log in as, and their password.
    pub users: usize,
    pub password: String,
    /// Product ids are drawn from `1..=products`.
    pub products: u64,
    /// Draw product ids Zipf-distributed (exponent 1.0) instead of uniformly.
    pub zipf: bool,
    /// Draw the progress line on stderr.
    pub progress: bool,
    /// Units of the flash sale's product.
    pub flash_stock: u64,
}

impl Options {
    pub fn concurrency(&self) -> usize {
        self.concurrency
            .unwrap_or_else(|| self.scenario.seed_concurrency())
            .max(1)
    }
}

/// Shared between workers while the run lasts.
struct Shared {
    options: Options,
    http: reqwest::Client,
    tokens: Vec<String>,
    admin: Option<String>,
    sent: AtomicU64,
    stop: AtomicBool,
    ledger: scenario::Ledger,
    run_id: String,
    /// The product the flash sale sells.
    flash_product: Option<u64>,
}

/// Logs in, runs, and returns the report (without the database check; see `check`).
pub async fn run(options: Options) -> anyhow::Result<Report> {
    let concurrency = options.concurrency();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .timeout(Duration::from_secs(30))
        .build()?;
    let mut tokens = Vec::new();
    for i in 1..=options.users.max(1) {
        tokens.push(scenario::login(&http, &options.target, &format!("user{i}"), &options.password).await?);
    }
    let admin = if options.scenario.needs_admin() {
        Some(scenario::login(&http, &options.target, "admin", &options.password).await?)
    } else {
        None
    };
    let flash_product = match (&admin, options.scenario) {
        (Some(admin), Scenario::FlashSale) => {
            Some(scenario::create_flash_product(&http, &options.target, admin, options.flash_stock).await?)
        }
        _ => None,
    };
    let run_id = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    );
    let shared = Arc::new(Shared {
        options: options.clone(),
        http,
        tokens,
        admin,
        sent: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        ledger: scenario::Ledger::default(),
        run_id,
        flash_product,
    });
    if let Some(product) = flash_product {
        shared
            .ledger
            .with(|l| l.created.insert(product, options.flash_stock as i64));
    }
    for worker in 0..concurrency {
        scenario::prepare(&shared, worker).await?;
    }

    let started = Instant::now();
    let progress = options
        .progress
        .then(|| tokio::spawn(report::progress(shared.clone(), started)));
    let workers: Vec<_> = (0..concurrency)
        .map(|w| tokio::spawn(worker(shared.clone(), w, concurrency)))
        .collect();
    let mut histogram = Histogram::<u64>::new(3)?;
    let mut statuses = report::Statuses::default();
    for w in workers {
        let (h, s) = w.await?;
        histogram.add(h)?;
        statuses.merge(s);
    }
    let elapsed = started.elapsed();
    shared.stop.store(true, Ordering::Relaxed);
    if let Some(p) = progress {
        let _ = p.await;
    }
    Ok(Report::new(
        &options,
        concurrency,
        elapsed,
        &histogram,
        statuses,
        shared.ledger.snapshot(&shared.run_id),
    ))
}

async fn worker(shared: Arc<Shared>, id: usize, workers: usize) -> (Histogram<u64>, report::Statuses) {
    let mut histogram = Histogram::<u64>::new(3).expect("histogram");
    let mut statuses = report::Statuses::default();
    let mut rng = worker_rng(id);
    let options = &shared.options;
    // At a fixed rate each worker owns an equal share of the schedule.
    let interval = options.rate.map(|r| Duration::from_secs_f64(workers as f64 / r));
    let deadline = match options.amount {
        Amount::Duration(d) => Some(Instant::now() + d),
        Amount::Requests(_) => None,
    };
    let mut next = Instant::now();
    let mut n: u64 = 0;
    loop {
        if shared.stop.load(Ordering::Relaxed) || deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        if let Amount::Requests(total) = options.amount {
            if shared.sent.fetch_add(1, Ordering::Relaxed) >= total {
                break;
            }
        } else {
            shared.sent.fetch_add(1, Ordering::Relaxed);
        }
        // At a fixed rate latency counts from when the request was due, not when it was sent:
        // a slow response delays the requests behind it, and they must not look fast (coordinated
        // omission, measured the way wrk2 does).
        let started = match interval {
            Some(_) => {
                let now = Instant::now();
                if next > now {
                    tokio::time::sleep(next - now).await;
                }
                next
            }
            None => Instant::now(),
        };
        let status = scenario::step(&shared, id, n, &mut rng).await;
        let micros = started.elapsed().as_micros().max(1) as u64;
        histogram.record(micros).expect("record");
        statuses.count(status);
        n += 1;
        if let Some(interval) = interval {
            next += interval;
        }
    }
    (histogram, statuses)
}

/// Each worker's own RNG, seeded from the clock and its id so workers do not draw alike.
fn worker_rng(worker: usize) -> rand::rngs::StdRng {
    use rand::SeedableRng;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    rand::rngs::StdRng::seed_from_u64(nanos ^ (worker as u64).wrapping_mul(0x9E3779B97F4A7C15))
}
