//! What each request of a scenario is, and the ledger of what the mall said it did (for the
//! correctness check).

use std::collections::BTreeMap;
use std::sync::Mutex;

use rand::Rng;
use serde_json::{json, Value};

use crate::Shared;

/// Seed 001's scenarios, plus wrk's product reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    /// `POST /api/products/{1..10}/stock {delta: -1}` as admin (seed 001: 50 concurrent, 1,167 QPS).
    Stock,
    /// `PUT /api/cart/items/{1..5}` with a new quantity (seed 001: 30 concurrent, 1,245 QPS).
    Cart,
    /// `POST /api/orders` of one unit of a product in 1..20, with an Idempotency-Key; every tenth
    /// request replays the previous key (seed 001: 20 concurrent, 2,471 QPS).
    Orders,
    /// 50 % product reads, 20 % list pages, 15 % cart updates, 15 % orders (seed 001: 40
    /// concurrent, 1,862 QPS).
    Mixed,
    /// `GET /api/products/{id}`, as seed 001's wrk script.
    Products,
    /// A flash sale: every buyer (500 concurrent) orders 1 or 2 units of one new product with
    /// limited stock (`--flash-stock`, 1,000 units) with an Idempotency-Key, resending the same
    /// request on a transport error; the run ends when the product is sold out.
    FlashSale,
}

impl Scenario {
    pub fn seed_concurrency(self) -> usize {
        match self {
            Scenario::Stock => 50,
            Scenario::Cart => 30,
            Scenario::Orders => 20,
            Scenario::Mixed => 40,
            Scenario::Products => 50,
            Scenario::FlashSale => 500,
        }
    }

    /// Seed 001's measured QPS, the baseline to beat.
    pub fn seed_qps(self) -> Option<f64> {
        match self {
            Scenario::Stock => Some(1167.0),
            Scenario::Cart => Some(1245.0),
            Scenario::Orders => Some(2471.0),
            Scenario::Mixed => Some(1862.0),
            Scenario::Products | Scenario::FlashSale => None,
        }
    }

    pub fn needs_admin(self) -> bool {
        matches!(self, Scenario::Stock | Scenario::FlashSale)
    }
}

/// What the mall confirmed during the run.
#[derive(Default)]
pub struct Ledger {
    inner: Mutex<LedgerData>,
}

#[derive(Default, Clone, Debug, serde::Serialize)]
pub struct LedgerData {
    /// This run's id: every idempotency key it sends starts with `lg-<run_id>-`.
    pub run_id: String,
    /// Units per product in orders the mall accepted.
    pub ordered: BTreeMap<u64, u64>,
    /// Units per product removed by successful stock deductions.
    pub deducted: BTreeMap<u64, u64>,
    /// Distinct idempotency keys that made an order, and the order ids returned.
    pub orders: BTreeMap<String, String>,
    /// Replays sent: requests repeating the key (and body) of an order already made.
    pub replays_sent: u64,
    /// Replays of a key that returned the same order.
    pub replays_ok: u64,
    /// Replays that returned a different order, or failed: a correctness bug.
    pub replays_mismatched: u64,
    /// Products this run created, with their starting stock (the flash sale's product).
    pub created: BTreeMap<u64, i64>,
    /// Requests resent after a transport error (same key, same body).
    pub resent: u64,
    /// Waiting-room answers (202 with a ticket) and the longest wait a buyer had, from its
    /// first ticket to its admission, in milliseconds.
    pub tickets: u64,
    pub longest_wait_ms: u64,
}

impl Ledger {
    pub fn snapshot(&self, run_id: &str) -> LedgerData {
        let mut data = self.inner.lock().expect("ledger").clone();
        data.run_id = run_id.to_string();
        data
    }

    pub(crate) fn with<T>(&self, f: impl FnOnce(&mut LedgerData) -> T) -> T {
        f(&mut self.inner.lock().expect("ledger"))
    }
}

pub async fn login(http: &reqwest::Client, target: &str, username: &str, password: &str) -> anyhow::Result<String> {
    let response = http
        .post(format!("{target}/api/auth/login"))
        .json(&json!({ "username": username, "password": password }))
        .send()
        .await?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    body["token"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("login as {username} failed ({status}): {body}"))
}

fn token(shared: &Shared, worker: usize) -> &str {
    &shared.tokens[worker % shared.tokens.len()]
}

/// Puts products 1..5 in each user's cart so cart updates have lines to update.
pub async fn prepare(shared: &Shared, worker: usize) -> anyhow::Result<()> {
    let uses_cart = matches!(shared.options.scenario, crate::Scenario::Cart | crate::Scenario::Mixed);
    if !uses_cart || worker >= shared.tokens.len() {
        return Ok(());
    }
    for product in 1..=5u64 {
        let response = shared
            .http
            .post(format!("{}/api/cart/items", shared.options.target))
            .bearer_auth(token(shared, worker))
            .json(&json!({ "product_id": product, "quantity": 1 }))
            .send()
            .await?;
        anyhow::ensure!(
            response.status().is_success(),
            "filling the cart failed: {}",
            response.status()
        );
    }
    Ok(())
}

fn product_id(shared: &Shared, rng: &mut impl Rng) -> u64 {
    let n = shared.options.products.max(1);
    if shared.options.zipf {
        zipf(n, rng)
    } else {
        rng.gen_range(1..=n)
    }
}

/// Zipf(s = 1) over 1..=n by inverting the approximate CDF ln(k)/ln(n): cheap, no table, and
/// close enough to give the hot-head/long-tail shape a cache sees.
fn zipf(n: u64, rng: &mut impl Rng) -> u64 {
    let u: f64 = rng.gen();
    ((n as f64 + 1.0).powf(u).floor() as u64).clamp(1, n)
}

/// One request of the scenario; returns the HTTP status (0 for a transport error).
pub async fn step(shared: &Shared, worker: usize, n: u64, rng: &mut impl Rng) -> u16 {
    let scenario = shared.options.scenario;
    let action = match scenario {
        Scenario::Mixed => match rng.gen_range(0..100) {
            0..50 => Scenario::Products,
            50..70 => return list(shared).await,
            70..85 => Scenario::Cart,
            _ => Scenario::Orders,
        },
        other => other,
    };
    match action {
        Scenario::Products => {
            let id = product_id(shared, rng);
            status(
                shared
                    .http
                    .get(format!("{}/api/products/{id}", shared.options.target))
                    .send()
                    .await,
            )
        }
        Scenario::Stock => {
            let id = rng.gen_range(1..=10u64);
            let admin = shared.admin.as_deref().unwrap_or_default();
            let response = shared
                .http
                .post(format!("{}/api/products/{id}/stock", shared.options.target))
                .bearer_auth(admin)
                .json(&json!({ "delta": -1 }))
                .send()
                .await;
            let code = status(response);
            if (200..300).contains(&code) {
                shared.ledger.with(|l| *l.deducted.entry(id).or_default() += 1);
            }
            code
        }
        Scenario::Cart => {
            let id = rng.gen_range(1..=5u64);
            let quantity = rng.gen_range(1..=5u32);
            status(
                shared
                    .http
                    .put(format!("{}/api/cart/items/{id}", shared.options.target))
                    .bearer_auth(token(shared, worker))
                    .json(&json!({ "quantity": quantity }))
                    .send()
                    .await,
            )
        }
        Scenario::Orders | Scenario::Mixed => order(shared, worker, n, rng).await,
        Scenario::FlashSale => flash_order(shared, worker, n, rng).await,
    }
}

/// Creates the flash sale's product as admin; returns its id.
pub async fn create_flash_product(
    http: &reqwest::Client,
    target: &str,
    admin: &str,
    stock: u64,
) -> anyhow::Result<u64> {
    let response = http
        .post(format!("{target}/api/products"))
        .bearer_auth(admin)
        .json(&json!({ "name": "Flash sale", "category": "flash-sale", "price": 999, "stock": stock }))
        .send()
        .await?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    body["id"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("creating the flash-sale product failed ({status}): {body}"))
}

/// One buyer's order in the flash sale. A transport error resends the same request with the same
/// key (at most 5 times), as a careful client does: the key makes the resend safe.
async fn flash_order(shared: &Shared, worker: usize, n: u64, rng: &mut impl Rng) -> u16 {
    let product = shared.flash_product.expect("the flash sale has a product");
    let quantity: u64 = rng.gen_range(1..=2);
    let key = format!("lg-{}-{worker}-{n}", shared.run_id);
    let body = json!({ "items": [{ "product_id": product, "quantity": quantity }] });
    // A waiting-room ticket, once the sidecar hands one out, and when the first one came.
    let mut ticket: Option<(String, std::time::Instant)> = None;
    let mut attempt = 0u64;
    while attempt < 5 {
        if attempt > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(10 * attempt)).await;
        }
        let mut request = shared
            .http
            .post(format!("{}/api/orders", shared.options.target))
            .bearer_auth(token(shared, worker))
            .header("idempotency-key", &key);
        if let Some((t, _)) = &ticket {
            request = request.header("waiting-room-ticket", t);
        }
        let response = request.json(&body).send().await;
        attempt += 1;
        // The waiting room: wait for the turn it names (its millisecond figure, else
        // Retry-After in seconds, RFC 9110 10.2.3) and come back with the ticket, as a browser
        // following the room's page does. Not an attempt: the room answered.
        if let Ok(r) = &response {
            if r.status().as_u16() == 202 {
                let header = |name: &str| r.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
                let wait_ms = header("waiting-room-wait-ms")
                    .and_then(|v| v.parse::<u64>().ok())
                    .or_else(|| {
                        header("retry-after")
                            .and_then(|v| v.parse::<u64>().ok())
                            .map(|s| s * 1000)
                    })
                    .unwrap_or(1000);
                let since = ticket.as_ref().map_or_else(std::time::Instant::now, |(_, at)| *at);
                ticket = header("waiting-room-ticket").map(|t| (t, since));
                shared.ledger.with(|l| l.tickets += 1);
                attempt -= 1;
                if shared.stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return 202;
                }
                tokio::time::sleep(std::time::Duration::from_millis(wait_ms.min(30_000))).await;
                continue;
            }
        }
        if let Some((_, since)) = &ticket {
            let waited = since.elapsed().as_millis() as u64;
            shared
                .ledger
                .with(|l| l.longest_wait_ms = l.longest_wait_ms.max(waited));
        }
        let Ok(response) = response else {
            // Only resends after a transport error are counted: a 409 "key in use" is asked again
            // too, but the mall answered it.
            shared.ledger.with(|l| l.resent += 1);
            continue;
        };
        let code = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        match code {
            201 => {
                let id = body["id"].as_str().unwrap_or_default().to_string();
                shared.ledger.with(|l| match l.orders.get(&key) {
                    Some(known) if known.split(':').next() == Some(id.as_str()) => l.replays_ok += 1,
                    Some(_) => l.replays_mismatched += 1,
                    None => {
                        l.orders.insert(key.clone(), format!("{id}:{product}"));
                        *l.ordered.entry(product).or_default() += quantity;
                    }
                });
            }
            // Sold out: nothing left for anyone, so the sale is over.
            409 if body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(" has 0 in stock")) =>
            {
                shared.stop.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            // The same key still in flight (a resend overtook the first try): ask again shortly.
            409 if body["error"]["code"] == "idempotency_key_in_use" => continue,
            _ => {}
        }
        return code;
    }
    0
}

async fn list(shared: &Shared) -> u16 {
    status(
        shared
            .http
            .get(format!("{}/api/products?limit=20", shared.options.target))
            .send()
            .await,
    )
}

async fn order(shared: &Shared, worker: usize, n: u64, rng: &mut impl Rng) -> u16 {
    // Every tenth order replays the previous one: same key, same body, so it must be the same order.
    let replay = n % 10 == 9;
    let seq = if replay { n - 1 } else { n };
    let key = format!("lg-{}-{worker}-{seq}", shared.run_id);
    let product = if replay {
        shared.ledger.with(|l| {
            let known = l
                .orders
                .get(&key)
                .and_then(|id| id.split(':').nth(1).and_then(|p| p.parse().ok()));
            l.replays_sent += u64::from(known.is_some());
            known
        })
    } else {
        None
    }
    .unwrap_or_else(|| rng.gen_range(1..=20u64));
    let response = shared
        .http
        .post(format!("{}/api/orders", shared.options.target))
        .bearer_auth(token(shared, worker))
        .header("idempotency-key", &key)
        .json(&json!({ "items": [{ "product_id": product, "quantity": 1 }] }))
        .send()
        .await;
    let Ok(response) = response else { return 0 };
    let code = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !(200..300).contains(&code) {
        return code;
    }
    let id = body["id"].as_str().unwrap_or_default().to_string();
    shared.ledger.with(|l| match l.orders.get(&key) {
        // The ledger stores "order-id:product" so a replay can resend the same body.
        Some(known) if replay => {
            if known.split(':').next() == Some(id.as_str()) {
                l.replays_ok += 1;
            } else {
                l.replays_mismatched += 1;
            }
        }
        Some(_) => l.replays_mismatched += 1,
        None => {
            l.orders.insert(key.clone(), format!("{id}:{product}"));
            *l.ordered.entry(product).or_default() += 1;
        }
    });
    code
}

fn status(response: reqwest::Result<reqwest::Response>) -> u16 {
    response.map(|r| r.status().as_u16()).unwrap_or(0)
}
