//! A flash sale with buyers who arrive once (`--buyers N --arrival-seconds S`), as a sale's
//! audience does, instead of a closed loop: buyer `i` arrives at `i * S / N`, at target
//! `i % targets` (one URL per pod, so the sale spreads over pods without a balancer), and tries
//! to buy one unit until let through, as a browser would:
//!
//! - 202 from a waiting room: waits for the turn it names (`Waiting-Room-Turn-At-Ms` on this
//!   machine's clock, else `Waiting-Room-Wait-Ms`, else `Retry-After`) and sends the order again
//!   with its ticket;
//! - 429: waits `Retry-After` (RFC 9110 10.2.3) and tries again;
//! - anything else came from the app: the buyer was let through (201 bought, 409 sold out).
//!
//! Attackers (`--attackers N`, accounts after the buyers') each send `--attacker-requests`
//! ticketless orders, four at a time, as fast as they can, ignoring tickets and `Retry-After`;
//! anonymous clients (`--anonymous K`) send orders without credentials in a loop until the
//! honest buyers are done. Their answers and orders are reported beside the honest buyers'.
//! With `--attackers-honest` the same accounts buy as browsers do instead, from the sale's
//! start: the places the room owes them anyway, so the attack's own cost can be told apart.
//!
//! Once the product is sold out, buyers still waiting leave. Reported: fairness (the fraction of
//! buyers let through while someone who arrived earlier was still waiting or never got in), the
//! requests that reached the app per order created, the let-through order's latency, the
//! longest wait, and the ledger the database check compares with.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{StreamExt, TryStreamExt};
use serde_json::{json, Value};

use crate::scenario::{self, LedgerData};

#[derive(Debug, Clone)]
pub struct Arrivals {
    /// One base URL per pod (the sidecar of each).
    pub targets: Vec<String>,
    pub buyers: usize,
    pub over: Duration,
    pub stock: u64,
    pub users: usize,
    pub password: String,
    pub attackers: usize,
    pub attacker_requests: usize,
    pub anonymous: usize,
    /// Run the attackers in the buyers' own runtime and connection pool, as this harness did
    /// before 2026-12-06: for comparison only (their answers then delay the buyers' turns).
    pub attackers_share_runtime: bool,
    /// Buyers sleep `Waiting-Room-Wait-Ms` from the 202's arrival even where the ticket names
    /// its turn as a time, as this harness did before 2026-12-06: for comparison only.
    pub ignore_turn_at: bool,
    /// The attackers' accounts buy as honest buyers do instead (from the sale's start, one
    /// request, back at the turn): what the room owes those accounts anyway (one place each),
    /// the baseline against which the attack's own cost shows.
    pub attackers_honest: bool,
    /// Where to write every honest buyer's requests, one JSON line per buyer (`--trace-buyers`):
    /// what the fairness figure is computed from, to find which buyers made it.
    pub trace: Option<std::path::PathBuf>,
}

#[derive(Debug, serde::Serialize)]
pub struct SaleReport {
    pub buyers: usize,
    pub arrival_seconds: f64,
    pub stock: u64,
    pub product: u64,
    pub orders: usize,
    pub sold_out_answers: usize,
    /// Buyers who left without being let through (the sale sold out first).
    pub left: usize,
    pub unfair_fraction: f64,
    /// The same, counting only inversions larger than 10 ms and 100 ms both ways.
    pub unfair_fraction_10ms: f64,
    pub unfair_fraction_100ms: f64,
    /// Requests answered by the app (not by the sidecar's room or limit) per order created.
    pub app_requests_per_order: f64,
    pub tickets: u64,
    pub rate_limited: u64,
    pub admitted_p50_ms: f64,
    pub admitted_p99_ms: f64,
    pub longest_wait_ms: u64,
    /// The wait of the buyers let through (from arrival to the let-through request), and the
    /// honest orders created per second of the sale.
    pub wait_p50_ms: f64,
    pub wait_p99_ms: f64,
    pub orders_per_second: f64,
    /// From the first arrival to the last buyer's answer.
    pub seconds: f64,
    /// The sale's start on this machine's Unix clock (ms): what the trace's times count from,
    /// to line them up with the sidecars' access logs and a packet capture.
    pub sale_started_unix_ms: f64,
    pub attackers: usize,
    pub attacker_requests: u64,
    /// Orders the most successful attacker got (the room allows one place per account).
    pub attacker_orders_max: u64,
    pub attacker_orders: u64,
    /// Answers to attackers and anonymous clients by status.
    pub attacker_statuses: std::collections::BTreeMap<u16, u64>,
    pub anonymous: usize,
    pub anonymous_requests: u64,
    pub anonymous_statuses: std::collections::BTreeMap<u16, u64>,
    #[serde(skip)]
    pub ledger: LedgerData,
}

struct Buyer {
    /// The target (pod) it sent to.
    target: usize,
    arrived: Option<Instant>,
    /// When the let-through request was sent, how long it took, its status.
    admitted: Option<(Instant, Duration, u16)>,
    app_requests: u64,
    tickets: u64,
    rate_limited: u64,
    waited: Duration,
    order: Option<String>,
    /// Each request, for `--trace-buyers`.
    requests: Vec<Sent>,
}

/// One request of a buyer, times in milliseconds from the sale's start.
#[derive(Debug, serde::Serialize)]
struct Sent {
    at_ms: f64,
    took_ms: f64,
    status: u16,
    /// From a 202: the position, the turn (from the sale's start, on this machine's clock) and
    /// the line (`g`: the fleet's; else the pod's own).
    #[serde(skip_serializing_if = "Option::is_none")]
    position: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    turn_at_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    line: Option<String>,
}

/// The sale's start on both clocks: the monotonic one buyers measure with, and the Unix time a
/// ticket's turn is named in.
#[derive(Clone, Copy)]
struct Origin {
    at: Instant,
    unix_ms: f64,
}

impl Origin {
    fn since(&self, t: Instant) -> f64 {
        t.saturating_duration_since(self.at).as_secs_f64() * 1000.0
    }
}

pub async fn run(a: Arrivals) -> anyhow::Result<SaleReport> {
    anyhow::ensure!(
        !a.targets.is_empty() && a.buyers > 0,
        "--buyers needs at least one buyer and one target"
    );
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(a.buyers.min(1024))
        .timeout(Duration::from_secs(60))
        .build()?;
    let base = &a.targets[0];
    let admin = scenario::login(&http, base, "admin", &a.password).await?;
    let product = scenario::create_flash_product(&http, base, &admin, a.stock).await?;
    // Buyers are users user1..userN (a waiting room gives one place per user); logged in a few
    // at a time before the sale opens.
    let tokens: Vec<String> = futures_util::stream::iter(1..=a.users.max(1))
        .map(|i| {
            let http = http.clone();
            let password = a.password.clone();
            async move { scenario::login(&http, base, &format!("user{i}"), &password).await }
        })
        .buffered(8)
        .try_collect()
        .await?;
    let run_id = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    );
    // The attackers' accounts (after the buyers'), logged in before the sale opens as the
    // buyers' are: a login is password hashing in the app, and logins during the sale took the
    // cores the sale runs on (before 2026-12-06 these 20 ran one after another in its first
    // half second, and the attackers started late).
    let attacker_tokens: Vec<String> = futures_util::stream::iter(0..a.attackers)
        .map(|j| {
            let http = http.clone();
            let (user, password) = (format!("user{}", a.users.max(1) + 1 + j), a.password.clone());
            async move { scenario::login(&http, base, &user, &password).await }
        })
        .buffered(8)
        .try_collect()
        .await?;
    let sold_out = Arc::new(SoldOut::default());
    let start = Instant::now() + Duration::from_millis(200);
    let origin = Origin {
        at: start,
        unix_ms: unix_ms() as f64 + 200.0,
    };
    let gap = a.over.as_secs_f64() / a.buyers as f64;
    let sale = Sale {
        product,
        turn_at: !a.ignore_turn_at,
        origin,
    };
    let mut tasks = Vec::with_capacity(a.buyers);
    for i in 0..a.buyers {
        let http = http.clone();
        let sold_out = sold_out.clone();
        let url = format!("{}/api/orders", a.targets[i % a.targets.len()]);
        let token = tokens[i % tokens.len()].clone();
        let key = format!("lg-{run_id}-b{i}");
        let at = start + Duration::from_secs_f64(gap * i as f64);
        let targets = a.targets.len();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let mut b = buy(&http, &url, &token, &key, &sold_out, sale).await;
            b.target = i % targets;
            b
        }));
    }
    // The attackers: accounts after the buyers', from the sale's start. They are other people's
    // machines: their tasks run on a runtime (threads) and connection pool of their own, so
    // their flood of answers does not queue inside the honest buyers' event loop, where it
    // would delay each buyer's return at its turn (and its timestamps) as no real attacker
    // can; they share the machine's cores with everything else as before.
    let (attack_runtime, attack_http) = if a.attackers_share_runtime || a.attackers + a.anonymous == 0 {
        (AttackRuntime(None), http.clone())
    } else {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("attackers")
            .enable_all()
            .build()?;
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(1024)
            .timeout(Duration::from_secs(60))
            .build()?;
        (AttackRuntime(Some(runtime)), client)
    };
    let honest_done = Arc::new(AtomicBool::new(false));
    let mut attack = Vec::new();
    for (j, token) in attacker_tokens.into_iter().enumerate() {
        let (http, url, run_id, sold_out) = (
            attack_http.clone(),
            format!("{}/api/orders", a.targets[j % a.targets.len()]),
            run_id.clone(),
            sold_out.clone(),
        );
        let requests = a.attacker_requests;
        if a.attackers_honest {
            // The same accounts at the same moment, buying as a browser does: the baseline
            // that tells the attack's own cost from the places its accounts are owed anyway.
            attack.push(attack_runtime.spawn(async move {
                tokio::time::sleep_until(start.into()).await;
                let key = format!("lg-{run_id}-a{j}-0");
                let b = buy(&http, &url, &token, &key, &sold_out, Sale { turn_at: true, ..sale }).await;
                let status = b.admitted.map_or(0, |(_, _, s)| s);
                vec![(status, b.order.map(|id| (key, id)))]
            }));
            continue;
        }
        attack.push(attack_runtime.spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            let body = json!({ "items": [{ "product_id": product, "quantity": 1 }] });
            // No new request once the sale is sold out, but the ones in flight are answered and
            // counted: one dropped after the app took its order would be an order missing from
            // the ledger the database check compares with.
            let results: Vec<(u16, Option<(String, String)>)> = futures_util::stream::iter(0..requests)
                .take_while(|_| std::future::ready(!sold_out.is()))
                .map(|k| {
                    let (http, url, token, body, key) = (&http, &url, &token, &body, format!("lg-{run_id}-a{j}-{k}"));
                    async move {
                        let Ok(r) = http
                            .post(url)
                            .bearer_auth(token)
                            .header("idempotency-key", &key)
                            .json(body)
                            .send()
                            .await
                        else {
                            return (0, None);
                        };
                        let status = r.status().as_u16();
                        let order = if status == 201 {
                            let v: Value = r.json().await.unwrap_or(Value::Null);
                            v["id"].as_str().map(|id| (key, id.to_string()))
                        } else {
                            None
                        };
                        (status, order)
                    }
                })
                .buffer_unordered(4)
                .collect()
                .await;
            results
        }));
    }
    let mut lurkers = Vec::new();
    for j in 0..a.anonymous {
        let (http, url, honest_done) = (
            attack_http.clone(),
            format!("{}/api/orders", a.targets[j % a.targets.len()]),
            honest_done.clone(),
        );
        lurkers.push(attack_runtime.spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            let body = json!({ "items": [{ "product_id": product, "quantity": 1 }] });
            let mut statuses = std::collections::BTreeMap::<u16, u64>::new();
            while !honest_done.load(Ordering::Relaxed) {
                let status = match http.post(&url).json(&body).send().await {
                    Ok(r) => r.status().as_u16(),
                    Err(_) => 0,
                };
                *statuses.entry(status).or_default() += 1;
            }
            statuses
        }));
    }
    let mut buyers = Vec::with_capacity(a.buyers);
    for t in tasks {
        buyers.push(t.await?);
    }
    let seconds = start.elapsed().as_secs_f64();
    honest_done.store(true, Ordering::Relaxed);
    if let Some(path) = &a.trace {
        write_trace(path, &buyers, origin)?;
    }
    let mut attacker_statuses = std::collections::BTreeMap::<u16, u64>::new();
    let mut attacker_orders_max = 0;
    let mut attacker_orders = Vec::new();
    for t in attack {
        let results = t.await?;
        let mut got = 0;
        for (status, order) in results {
            *attacker_statuses.entry(status).or_default() += 1;
            if let Some(order) = order {
                got += 1;
                attacker_orders.push(order);
            }
        }
        attacker_orders_max = attacker_orders_max.max(got);
    }
    let mut anonymous_statuses = std::collections::BTreeMap::<u16, u64>::new();
    for t in lurkers {
        for (status, n) in t.await? {
            *anonymous_statuses.entry(status).or_default() += n;
        }
    }
    drop(attack_runtime);

    let mut ledger = LedgerData {
        run_id,
        ..LedgerData::default()
    };
    ledger.created.insert(product, a.stock as i64);
    for (i, b) in buyers.iter().enumerate() {
        if let Some(order) = &b.order {
            ledger
                .orders
                .insert(format!("lg-{}-b{i}", ledger.run_id), format!("{order}:{product}"));
            *ledger.ordered.entry(product).or_default() += 1;
        }
    }
    let orders = ledger.orders.len();
    for (key, order) in &attacker_orders {
        ledger.orders.insert(key.clone(), format!("{order}:{product}"));
        *ledger.ordered.entry(product).or_default() += 1;
    }
    let mut latencies: Vec<Duration> = buyers.iter().filter_map(|b| b.admitted.map(|x| x.1)).collect();
    latencies.sort();
    let quantile = |q: f64| {
        latencies
            .get(((latencies.len().max(1) - 1) as f64 * q).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let mut waits: Vec<f64> = buyers
        .iter()
        .filter(|b| b.admitted.is_some())
        .map(|b| b.waited.as_secs_f64() * 1000.0)
        .collect();
    waits.sort_by(f64::total_cmp);
    let wait_at = |q: f64| {
        waits
            .get(((waits.len().max(1) - 1) as f64 * q).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    let (wait_p50_ms, wait_p99_ms) = (wait_at(0.5), wait_at(0.99));
    Ok(SaleReport {
        wait_p50_ms,
        wait_p99_ms,
        orders_per_second: orders as f64 / seconds.max(1e-9),
        buyers: a.buyers,
        arrival_seconds: a.over.as_secs_f64(),
        stock: a.stock,
        product,
        orders,
        sold_out_answers: buyers
            .iter()
            .filter(|b| matches!(b.admitted, Some((_, _, 409))))
            .count(),
        left: buyers
            .iter()
            .filter(|b| b.arrived.is_some() && b.admitted.is_none())
            .count(),
        unfair_fraction: unfair_fraction(&buyers, Duration::ZERO),
        unfair_fraction_10ms: unfair_fraction(&buyers, Duration::from_millis(10)),
        unfair_fraction_100ms: unfair_fraction(&buyers, Duration::from_millis(100)),
        app_requests_per_order: buyers.iter().map(|b| b.app_requests).sum::<u64>() as f64 / orders.max(1) as f64,
        tickets: buyers.iter().map(|b| b.tickets).sum(),
        rate_limited: buyers.iter().map(|b| b.rate_limited).sum(),
        admitted_p50_ms: quantile(0.5),
        admitted_p99_ms: quantile(0.99),
        longest_wait_ms: buyers.iter().map(|b| b.waited.as_millis() as u64).max().unwrap_or(0),
        seconds,
        sale_started_unix_ms: origin.unix_ms,
        attackers: a.attackers,
        attacker_requests: attacker_statuses.values().sum(),
        attacker_orders_max,
        attacker_orders: attacker_orders.len() as u64,
        attacker_statuses,
        anonymous: a.anonymous,
        anonymous_requests: anonymous_statuses.values().sum(),
        anonymous_statuses,
        ledger,
    })
}

/// The attackers' runtime (`None`: the buyers'), shut down without waiting when the sale ends,
/// however it ends (a runtime dropped inside another's task would panic): its idle connections'
/// tasks go with it.
struct AttackRuntime(Option<tokio::runtime::Runtime>);

impl AttackRuntime {
    fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match &self.0 {
            Some(runtime) => runtime.spawn(task),
            None => tokio::spawn(task),
        }
    }
}

impl Drop for AttackRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// What every buyer of one sale shares: the product, whether to return at the turn named as a
/// time (else sleep the wait), and the sale's start.
#[derive(Clone, Copy)]
struct Sale {
    product: u64,
    turn_at: bool,
    origin: Origin,
}

async fn buy(http: &reqwest::Client, url: &str, token: &str, key: &str, sold_out: &SoldOut, sale: Sale) -> Buyer {
    let Sale {
        product,
        turn_at,
        origin,
    } = sale;
    let mut b = Buyer {
        target: 0,
        arrived: None,
        admitted: None,
        app_requests: 0,
        tickets: 0,
        rate_limited: 0,
        waited: Duration::ZERO,
        order: None,
        requests: Vec::new(),
    };
    let mut ticket: Option<String> = None;
    let mut errors = 0;
    let body = json!({ "items": [{ "product_id": product, "quantity": 1 }] });
    while !sold_out.is() {
        let sent = Instant::now();
        let first = *b.arrived.get_or_insert(sent);
        let mut request = http
            .post(url)
            .bearer_auth(token)
            .header("idempotency-key", key)
            .json(&body);
        if let Some(t) = &ticket {
            request = request.header("waiting-room-ticket", t);
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(_) if errors < 5 => {
                // The same key again: safe to resend (the mall replays an order already made).
                errors += 1;
                tokio::time::sleep(Duration::from_millis(20 * errors)).await;
                continue;
            }
            Err(_) => break,
        };
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let retry_after_ms = header("retry-after")
            .and_then(|v| v.parse::<u64>().ok())
            .map(|s| s * 1000);
        b.requests.push(Sent {
            at_ms: origin.since(sent),
            took_ms: sent.elapsed().as_secs_f64() * 1000.0,
            status,
            position: header("waiting-room-position").and_then(|v| v.parse().ok()),
            turn_at_ms: header("waiting-room-turn-at-ms")
                .and_then(|v| v.parse::<f64>().ok())
                .map(|at| at - origin.unix_ms),
            line: header("waiting-room-ticket").and_then(|t| t.split('.').nth(1).map(str::to_string)),
        });
        match status {
            202 => {
                b.tickets += 1;
                ticket = header("waiting-room-ticket");
                // The turn as a time (on a clock synced with the room's), so however long this
                // answer took to arrive, the buyer is back at its turn; else the wait it names.
                let wait = header("waiting-room-turn-at-ms")
                    .filter(|_| turn_at)
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(|at| at.saturating_sub(unix_ms()))
                    .or_else(|| header("waiting-room-wait-ms").and_then(|v| v.parse::<u64>().ok()))
                    .or(retry_after_ms)
                    .unwrap_or(1000);
                b.waited = sent.duration_since(first) + Duration::from_millis(wait);
                sold_out.sleep(Duration::from_millis(wait.min(60_000))).await;
            }
            429 => {
                b.rate_limited += 1;
                sold_out
                    .sleep(Duration::from_millis(retry_after_ms.unwrap_or(1000)))
                    .await;
            }
            _ => {
                b.app_requests += 1;
                let took = sent.elapsed();
                let body: Value = response.json().await.unwrap_or(Value::Null);
                if status == 409 && body["error"]["code"] == "insufficient_stock" {
                    sold_out.set();
                }
                if status == 201 {
                    b.order = body["id"].as_str().map(str::to_string);
                }
                if status >= 500 {
                    // The app failed this order: a buyer tries again.
                    continue;
                }
                b.waited = sent.duration_since(first);
                b.admitted = Some((sent, took, status));
                break;
            }
        }
    }
    b
}

/// One JSON line per honest buyer: its number in the arrival order, the target it sent to, when
/// it arrived and was let through (ms from the sale's start) and each of its requests.
fn write_trace(path: &std::path::Path, buyers: &[Buyer], origin: Origin) -> anyhow::Result<()> {
    use std::io::Write;
    let file = std::fs::File::create(path).map_err(|e| anyhow::anyhow!("--trace-buyers {}: {e}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    for (i, b) in buyers.iter().enumerate() {
        let line = json!({
            "buyer": i,
            "target": b.target,
            "arrived_ms": b.arrived.map(|t| origin.since(t)),
            "admitted_ms": b.admitted.map(|(t, _, _)| origin.since(t)),
            "status": b.admitted.map(|(_, _, s)| s),
            "requests": b.requests,
        });
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    Ok(())
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The sale's end, as buyers learn it (a 409 `insufficient_stock`): waiting buyers leave at
/// once. Sleepers wait on it rather than polling a flag (before 2026-12-07 every waiting buyer
/// woke every 50 ms to look: some 25,000 wake-ups a second with a long line, on the cores the
/// sale runs on).
#[derive(Default)]
struct SoldOut {
    flag: AtomicBool,
    news: tokio::sync::Notify,
}

impl SoldOut {
    fn is(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }

    fn set(&self) {
        self.flag.store(true, Ordering::Relaxed);
        self.news.notify_waiters();
    }

    /// Sleeps `d`, or less if the sale sells out meanwhile.
    async fn sleep(&self, d: Duration) {
        let news = self.news.notified();
        tokio::pin!(news);
        // Registered before the flag is read, so a `set` between the two is not missed.
        news.as_mut().enable();
        if self.is() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = news => {}
        }
    }
}

/// The fraction of let-through buyers let through while someone who arrived more than `slack`
/// earlier was let through more than `slack` later, or never. With no slack, any inversion
/// counts, including ones inside the network's and the scheduler's jitter; the slack shows how
/// much of the figure is that jitter.
fn unfair_fraction(buyers: &[Buyer], slack: Duration) -> f64 {
    let arrived: Vec<(Instant, Option<Instant>)> = buyers
        .iter()
        .filter_map(|b| Some((b.arrived?, b.admitted.map(|a| a.0))))
        .collect();
    let admitted = arrived.iter().filter(|(_, t)| t.is_some()).count();
    let unfair = arrived
        .iter()
        .filter(|(arrived_b, admitted_b)| {
            let Some(admitted_b) = admitted_b else { return false };
            arrived.iter().any(|(arrived_a, admitted_a)| {
                *arrived_a + slack < *arrived_b && admitted_a.is_none_or(|at| at > *admitted_b + slack)
            })
        })
        .count();
    unfair as f64 / admitted.max(1) as f64
}

impl std::fmt::Display for SaleReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "flash sale    {} buyers over {:.1} s for {} units: {} orders, {} sold-out answers, {} left waiting",
            self.buyers, self.arrival_seconds, self.stock, self.orders, self.sold_out_answers, self.left
        )?;
        writeln!(
            f,
            "fairness      {:.2} % let through before someone who arrived earlier ({:.2} % beyond 10 ms, {:.2} % beyond 100 ms)",
            self.unfair_fraction * 100.0,
            self.unfair_fraction_10ms * 100.0,
            self.unfair_fraction_100ms * 100.0
        )?;
        writeln!(
            f,
            "load          {:.2} app requests per order; {} tickets, {} answers 429",
            self.app_requests_per_order, self.tickets, self.rate_limited
        )?;
        writeln!(
            f,
            "latency       let-through order p50 {:.1} ms, p99 {:.1} ms; longest wait {} ms; {:.1} s in all",
            self.admitted_p50_ms, self.admitted_p99_ms, self.longest_wait_ms, self.seconds
        )?;
        if self.attackers > 0 {
            writeln!(
                f,
                "attackers     {} accounts, {} requests, {} orders (at most {} each); answers {:?}",
                self.attackers,
                self.attacker_requests,
                self.attacker_orders,
                self.attacker_orders_max,
                self.attacker_statuses
            )?;
        }
        if self.anonymous > 0 {
            writeln!(
                f,
                "anonymous     {} clients, {} requests; answers {:?}",
                self.anonymous, self.anonymous_requests, self.anonymous_statuses
            )?;
        }
        Ok(())
    }
}

/// For tests of the fairness measure.
#[cfg(test)]
mod tests {
    use super::*;

    fn buyer(arrived_ms: u64, admitted_ms: Option<u64>, t0: Instant) -> Buyer {
        Buyer {
            arrived: Some(t0 + Duration::from_millis(arrived_ms)),
            admitted: admitted_ms.map(|a| (t0 + Duration::from_millis(a), Duration::ZERO, 201)),
            app_requests: 1,
            tickets: 0,
            rate_limited: 0,
            waited: Duration::ZERO,
            order: None,
            requests: Vec::new(),
            target: 0,
        }
    }

    #[test]
    fn fairness_counts_buyers_let_through_ahead_of_an_earlier_one() {
        let t0 = Instant::now();
        let none = Duration::ZERO;
        let in_order = [buyer(0, Some(10), t0), buyer(1, Some(20), t0), buyer(2, Some(30), t0)];
        assert_eq!(unfair_fraction(&in_order, none), 0.0);
        // The third passes the second; the fourth gets in while the first never does.
        let mixed = [
            buyer(0, None, t0),
            buyer(1, Some(20), t0),
            buyer(2, Some(15), t0),
            buyer(3, Some(40), t0),
        ];
        assert_eq!(unfair_fraction(&mixed, none), 1.0);
        let one_pass = [buyer(0, Some(10), t0), buyer(1, Some(30), t0), buyer(2, Some(20), t0)];
        assert!((unfair_fraction(&one_pass, none) - 1.0 / 3.0).abs() < 1e-9);
        // A pass of 10 ms is within a slack of 10 ms; a buyer who never got in is not.
        assert_eq!(unfair_fraction(&one_pass, Duration::from_millis(10)), 0.0);
        assert_eq!(
            unfair_fraction(&mixed, Duration::from_millis(10)),
            0.0,
            "arrivals 1 ms apart"
        );
        let late = [buyer(0, None, t0), buyer(50, Some(60), t0)];
        assert_eq!(unfair_fraction(&late, Duration::from_millis(10)), 1.0);
    }
}
