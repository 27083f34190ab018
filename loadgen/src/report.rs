//! Counting, the progress line, and the report.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::scenario::LedgerData;
use crate::{Amount, Options, Shared};

/// Responses by HTTP status (0: no response).
#[derive(Default, Debug, Clone)]
pub struct Statuses(BTreeMap<u16, u64>);

impl Statuses {
    pub fn count(&mut self, status: u16) {
        *self.0.entry(status).or_default() += 1;
    }

    pub fn merge(&mut self, other: Statuses) {
        for (k, v) in other.0 {
            *self.0.entry(k).or_default() += v;
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StatusCount {
    pub status: u16,
    pub count: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: crate::Scenario,
    pub target: String,
    pub concurrency: usize,
    pub rate: Option<f64>,
    pub seconds: f64,
    pub requests: u64,
    pub successes: u64,
    pub qps: f64,
    pub success_rate: f64,
    /// Latency percentiles in milliseconds.
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub statuses: Vec<StatusCount>,
    /// Seed 001's QPS for this scenario, and ours as a multiple of it.
    pub seed_qps: Option<f64>,
    pub vs_seed: Option<f64>,
    /// The flash sale: what was for sale and what sold.
    pub flash_sale: Option<FlashSale>,
    pub ledger: LedgerData,
}

#[derive(Debug, Clone, Serialize)]
pub struct FlashSale {
    pub product: u64,
    pub stock: i64,
    pub sold_units: u64,
    pub orders: u64,
    /// Orders created per second over the sale (until sold out, or the run's end).
    pub orders_per_sec: f64,
    pub resent_after_transport_error: u64,
    /// Waiting-room tickets received (202 answers), and the longest a buyer waited in the room.
    pub waiting_room_tickets: u64,
    pub longest_wait_ms: u64,
}

impl Report {
    pub(crate) fn new(
        options: &Options,
        concurrency: usize,
        elapsed: Duration,
        h: &Histogram<u64>,
        statuses: Statuses,
        ledger: LedgerData,
    ) -> Report {
        let requests: u64 = statuses.0.values().sum();
        let successes: u64 = statuses
            .0
            .iter()
            .filter(|(s, _)| (200..300).contains(*s))
            .map(|(_, c)| c)
            .sum();
        let seconds = elapsed.as_secs_f64().max(1e-9);
        let qps = requests as f64 / seconds;
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        let seed_qps = options.scenario.seed_qps();
        Report {
            scenario: options.scenario,
            target: options.target.clone(),
            concurrency,
            rate: options.rate,
            seconds,
            requests,
            successes,
            qps,
            success_rate: if requests == 0 {
                0.0
            } else {
                successes as f64 / requests as f64
            },
            p50_ms: ms(0.50),
            p95_ms: ms(0.95),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: h.max() as f64 / 1000.0,
            statuses: statuses
                .0
                .into_iter()
                .map(|(status, count)| StatusCount { status, count })
                .collect(),
            seed_qps,
            vs_seed: seed_qps.map(|s| successes as f64 / seconds / s),
            flash_sale: ledger.created.iter().next().map(|(&product, &stock)| {
                let orders = ledger
                    .orders
                    .values()
                    .filter(|v| v.ends_with(&format!(":{product}")))
                    .count() as u64;
                FlashSale {
                    product,
                    stock,
                    sold_units: ledger.ordered.get(&product).copied().unwrap_or(0),
                    orders,
                    orders_per_sec: orders as f64 / seconds,
                    resent_after_transport_error: ledger.resent,
                    waiting_room_tickets: ledger.tickets,
                    longest_wait_ms: ledger.longest_wait_ms,
                }
            }),
            ledger,
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "scenario      {:?} against {}", self.scenario, self.target)?;
        writeln!(
            f,
            "concurrency   {}{}",
            self.concurrency,
            self.rate.map(|r| format!(" at {r} req/s")).unwrap_or_default()
        )?;
        writeln!(
            f,
            "requests      {} in {:.1} s: {:.0} req/s",
            self.requests, self.seconds, self.qps
        )?;
        writeln!(
            f,
            "success       {:.2} % ({} of {})",
            self.success_rate * 100.0,
            self.successes,
            self.requests
        )?;
        let statuses: Vec<String> = self
            .statuses
            .iter()
            .map(|s| format!("{}: {}", s.status, s.count))
            .collect();
        writeln!(f, "statuses      {}", statuses.join(", "))?;
        writeln!(
            f,
            "latency ms    p50 {:.2}  p95 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            self.p50_ms, self.p95_ms, self.p99_ms, self.p999_ms, self.max_ms
        )?;
        if let (Some(seed), Some(ratio)) = (self.seed_qps, self.vs_seed) {
            writeln!(
                f,
                "vs seed 001   {ratio:.2}x its {seed:.0} QPS (successful requests per second)"
            )?;
        }
        if let Some(sale) = &self.flash_sale {
            writeln!(
                f,
                "flash sale    product {}: sold {} of {} units in {} orders ({:.0} orders/s); {} resent after transport errors",
                sale.product, sale.sold_units, sale.stock, sale.orders, sale.orders_per_sec, sale.resent_after_transport_error
            )?;
            if sale.waiting_room_tickets > 0 {
                writeln!(
                    f,
                    "waiting room  {} tickets handed out; the longest wait {} ms",
                    sale.waiting_room_tickets, sale.longest_wait_ms
                )?;
            }
        }
        if !self.ledger.orders.is_empty() {
            writeln!(
                f,
                "orders        {} made, {} replays answered with the same order, {} mismatched",
                self.ledger.orders.len(),
                self.ledger.replays_ok,
                self.ledger.replays_mismatched
            )?;
        }
        Ok(())
    }
}

/// Redraws one line on stderr every 250 ms until the run stops.
pub(crate) async fn progress(shared: Arc<Shared>, started: Instant) {
    let total = match shared.options.amount {
        Amount::Duration(d) => Progress::Time(d),
        Amount::Requests(n) => Progress::Count(n),
    };
    loop {
        let sent = shared.sent.load(Ordering::Relaxed);
        let elapsed = started.elapsed();
        let fraction = match total {
            Progress::Time(d) => elapsed.as_secs_f64() / d.as_secs_f64(),
            Progress::Count(n) => sent as f64 / n.max(1) as f64,
        }
        .clamp(0.0, 1.0);
        let width = 30;
        let filled = (fraction * width as f64) as usize;
        let bar: String = "=".repeat(filled) + &" ".repeat(width - filled);
        let rate = sent as f64 / elapsed.as_secs_f64().max(1e-3);
        eprint!(
            "\r[{bar}] {:>3.0} %  {sent} requests  {rate:.0} req/s ",
            fraction * 100.0
        );
        let _ = std::io::stderr().flush();
        if shared.stop.load(Ordering::Relaxed) {
            eprintln!();
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[derive(Clone, Copy)]
enum Progress {
    Time(Duration),
    Count(u64),
}
