//! Group commit of orders: seed 000's batch processor (a size and a flush timeout) applied to the
//! write that matters most. Concurrent order requests queue here; a writer takes what is waiting
//! and places the whole batch in one transaction of a constant number of set-based statements:
//!
//! 1. one multi-row claim of the batch's `Idempotency-Key`s (a key already stored is a replay);
//! 2. the carts being ordered, read at once;
//! 3. the batch's products locked and read in id order, once;
//! 4. each order decided in arrival order against the stock found, in memory: an order that cannot
//!    be filled is refused alone, with the answer it would have had alone;
//! 5. one aggregated deduction per product (a single `UPDATE ... CASE`), multi-row inserts of
//!    orders and items, the ordered carts emptied and the claims of refused orders released.
//!
//! Measured on PostgreSQL, running the per-order statements of several orders in one transaction
//! is slower than one order per transaction (row locks held across their round trips), while the
//! set-based batch cuts the database's CPU per order several-fold. A batch that fails as a whole is
//! retried (deadlock, serialisation, an id clash) or split into orders placed one by one, never
//! half-applied: it is one transaction.
//!
//! Every statement is prepared (`persistent`) per text, so a batch size seen before runs from its
//! cached plan. With `MALL_ORDER_BATCH_ARRAYS` the statements instead take the batch's rows as one
//! parameter each, so their text does not depend on the batch size: on PostgreSQL an array
//! (`unnest($1::bigint[], ...)`, `= ANY($1::bigint[])`; the generic driver binds no arrays, so
//! they travel as array literals, [`pg_ints`] and [`pg_texts`], cast in SQL), on MySQL and MariaDB
//! a JSON array read through `JSON_TABLE` ([`json_rows`]). Measured no faster (BENCHMARKS.md
//! section 2c), so off by default; SQLite always runs the multi-row statements.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use mall_telemetry::{SpanId, TraceId};
use tracing::Instrument;

use crate::db::Tx;
use sqlx::any::AnyArguments;
use sqlx::Any;
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::orders::{self, Idempotency, LineRefused, Order, OrderItem, Placed, Source};
use super::{int, text};
use crate::cache::Key;
use crate::db::{is_unique_violation, Db, Dialect};
use crate::error::{AppError, AppResult};
use crate::ids::{now_ms, Snowflake};
use crate::invalidation;
use crate::metrics::Metrics;

/// How orders are grouped into transactions.
#[derive(Debug, Clone, Copy)]
pub struct BatchSettings {
    /// Most orders in one transaction; 1 places each order in its own transaction (no batching).
    pub max_orders: usize,
    /// When a batch already holds more than one order (the mall is under load), wait at most
    /// this long for more to fill it. A lone order never waits; zero takes only what is queued.
    pub flush_after: Duration,
    /// Order transactions in flight at once (a batch or a lone order each).
    pub writers: usize,
    /// On PostgreSQL, MySQL and MariaDB, statements that take the batch as array parameters
    /// (false: the multi-row statements every database runs, whose text depends on the batch size).
    pub arrays: bool,
}

/// An order to place.
#[derive(Debug, Clone)]
pub struct OrderRequest {
    pub user_id: i64,
    pub source: Source,
    pub key: Option<KeyClaim>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyClaim {
    pub key: String,
    /// Hash of the request, so a key reused for a different request is refused.
    pub request_hash: String,
}

impl OrderRequest {
    fn idempotency(&self) -> Option<Idempotency<'_>> {
        self.key.as_ref().map(|k| Idempotency {
            key: &k.key,
            request_hash: &k.request_hash,
        })
    }
}

/// What the batch decided for one request.
enum Outcome {
    Created(Order),
    /// Placed on its own after the batch was split; replayed or created.
    Alone(Placed),
    /// Its key was stored already: the requester replays that order (or refuses a different
    /// request with the same key).
    KeyTaken,
}

struct Pending {
    request: OrderRequest,
    reply: oneshot::Sender<AppResult<Outcome>>,
    /// The request's span, when its trace is recorded, and where the batch it joins leaves its
    /// own span's ids for the request to link to (telemetry.rs).
    trace: Option<(TraceId, SpanId)>,
    batch_span: Arc<OnceLock<(TraceId, SpanId)>>,
}

struct Shared {
    db: Arc<Db>,
    ids: Arc<Snowflake>,
    metrics: Arc<Metrics>,
    /// One permit per order transaction (a batch, or a lone order) allowed at once.
    writers: Arc<Semaphore>,
    /// Array-parameter statements, on PostgreSQL or MySQL/MariaDB (see the module comment).
    arrays: bool,
}

/// Where orders are placed: the group-commit queue, or (with `max_orders` 1) straight to the
/// database one transaction per order.
#[derive(Clone)]
pub struct OrderDesk {
    shared: Arc<Shared>,
    queue: Option<mpsc::UnboundedSender<Pending>>,
    /// Orders being placed now, queued or not.
    in_flight: Arc<AtomicUsize>,
}

/// Counts an order in flight until it is answered (or its request is dropped).
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

const MAX_ATTEMPTS: u32 = 4;

impl OrderDesk {
    /// Starts the batch writer (on the current Tokio runtime) unless batching is off.
    pub fn start(db: Arc<Db>, ids: Arc<Snowflake>, metrics: Arc<Metrics>, settings: BatchSettings) -> OrderDesk {
        let shared = Arc::new(Shared {
            arrays: settings.arrays && db.dialect != Dialect::Sqlite,
            db,
            ids,
            metrics,
            writers: Arc::new(Semaphore::new(settings.writers.max(1))),
        });
        let queue = (settings.max_orders > 1).then(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(run(rx, shared.clone(), settings));
            tx
        });
        OrderDesk {
            shared,
            queue,
            in_flight: Arc::default(),
        }
    }

    pub async fn place(&self, request: OrderRequest) -> AppResult<Placed> {
        let shared = &self.shared;
        let Some(queue) = &self.queue else {
            shared.metrics.order_batch_size.observe(1.0);
            return place_alone(shared, &request).await;
        };
        let alone = self.in_flight.fetch_add(1, Ordering::AcqRel) == 0;
        let _in_flight = InFlight(&self.in_flight);
        if alone {
            // Nothing else in flight: a batch of one, placed right here while it holds a writer
            // permit (so a batch forming behind it still waits its turn, in arrival order).
            // Handing it to the writer task would only add task wake-ups, each waking an idle
            // worker thread: measured +0.3 ms and +25 % CPU per order for a lone client.
            if let Ok(_permit) = shared.writers.clone().try_acquire_owned() {
                shared.metrics.order_batch_size.observe(1.0);
                return place_alone(shared, &request).await;
            }
        }
        let (reply, answer) = oneshot::channel();
        let user_id = request.user_id;
        let key = request.key.clone();
        let batch_span = Arc::new(OnceLock::new());
        queue
            .send(Pending {
                request,
                reply,
                trace: crate::telemetry::current_span_ids(),
                batch_span: batch_span.clone(),
            })
            .map_err(|_| AppError::Unavailable("orders: the order queue has stopped".into()))?;
        let answered = answer.await;
        // The trace shows which batch placed this order (its statements are in the batch's span).
        if let Some(ids) = batch_span.get() {
            crate::telemetry::link_current(*ids);
        }
        let outcome =
            answered.map_err(|_| AppError::Internal("orders: the batch writer dropped an order".into()))??;
        match outcome {
            Outcome::Created(order) => Ok(Placed { order, replayed: false }),
            Outcome::Alone(placed) => Ok(placed),
            Outcome::KeyTaken => {
                let key = key.expect("only keyed requests find their key taken");
                let idempotency = Idempotency {
                    key: &key.key,
                    request_hash: &key.request_hash,
                };
                orders::replay(&shared.db, user_id, &idempotency).await
            }
        }
    }
}

async fn place_alone(shared: &Shared, request: &OrderRequest) -> AppResult<Placed> {
    let metrics = shared.metrics.clone();
    orders::place(
        &shared.db,
        &shared.ids,
        request.user_id,
        &request.source,
        request.idempotency().as_ref(),
        || metrics.transaction_retries.inc(),
    )
    .await
}

/// The writer: forms batches from the queue and runs up to `writers` of them at once.
async fn run(mut queue: mpsc::UnboundedReceiver<Pending>, shared: Arc<Shared>, settings: BatchSettings) {
    // Requests held back from a batch because an earlier request in it has the same key.
    let mut held: VecDeque<Pending> = VecDeque::new();
    loop {
        let first = match held.pop_front() {
            Some(p) => p,
            None => match queue.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        // The permit after the first order, so an idle writer never holds one (a lone order
        // takes it and runs in its own task); while this waits for a running transaction,
        // more orders queue up for this batch.
        let permit = shared
            .writers
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let mut batch = vec![first];
        while batch.len() < settings.max_orders {
            match held.pop_front() {
                Some(p) => batch.push(p),
                None => break,
            }
        }
        let deadline = tokio::time::Instant::now() + settings.flush_after;
        while batch.len() < settings.max_orders {
            match queue.try_recv() {
                Ok(p) => batch.push(p),
                // Only a batch that already has company waits for more: under load the wait
                // fills it, while a lone order at low load goes at once.
                Err(_) if settings.flush_after.is_zero() || batch.len() == 1 => break,
                Err(_) => match tokio::time::timeout_at(deadline, queue.recv()).await {
                    Ok(Some(p)) => batch.push(p),
                    _ => break,
                },
            }
        }
        // A key repeated inside one batch: the first claims it, the repeat goes in the next batch,
        // where it finds the key stored (a replay) or free again (the first was refused).
        let mut keys = HashSet::new();
        let (batch, repeats): (Vec<_>, Vec<_>) = batch.into_iter().partition(|p| match &p.request.key {
            Some(k) => keys.insert((p.request.user_id, k.key.clone())),
            None => true,
        });
        held.extend(repeats);
        shared.metrics.order_batch_size.observe(batch.len() as f64);
        let shared = shared.clone();
        tokio::spawn(async move {
            execute(&shared, batch).await;
            drop(permit);
        });
    }
}

enum BatchError {
    /// Deadlock, serialisation failure or an order-id clash: the whole batch may run again.
    Retryable(AppError),
    /// Failed before COMMIT was sent, so nothing was applied.
    Failed(AppError),
    /// COMMIT itself failed: whether it was applied is unknown, so nothing may run again.
    Commit(AppError),
}

impl From<sqlx::Error> for BatchError {
    fn from(e: sqlx::Error) -> Self {
        let retryable = match &e {
            sqlx::Error::Database(db) => crate::db::is_retryable(db.as_ref()) || is_unique_violation(&e),
            _ => false,
        };
        if retryable {
            BatchError::Retryable(e.into())
        } else {
            BatchError::Failed(e.into())
        }
    }
}

async fn execute(shared: &Shared, batch: Vec<Pending>) {
    let members: Vec<(TraceId, SpanId)> = batch.iter().filter_map(|p| p.trace).collect();
    let span = crate::telemetry::batch_span(&members, batch.len());
    if let Some(ids) = crate::telemetry::span_ids(&span) {
        for p in &batch {
            let _ = p.batch_span.set(ids);
        }
    }
    execute_batch(shared, batch).instrument(span).await
}

async fn execute_batch(shared: &Shared, mut batch: Vec<Pending>) {
    if batch.len() == 1 {
        // Alone in its batch (low load): the one-order path takes fewer round trips (no separate
        // lock read; RETURNING), so a lone order costs what it cost before group commit.
        let pending = batch.pop().expect("one");
        let placed = place_alone(shared, &pending.request).await.map(Outcome::Alone);
        let _ = pending.reply.send(placed);
        return;
    }
    let requests: Vec<&OrderRequest> = batch.iter().map(|p| &p.request).collect();
    let mut attempt = 1;
    let outcome = loop {
        match place_batch(shared, &requests).await {
            Err(BatchError::Retryable(e)) if attempt < MAX_ATTEMPTS => {
                tracing::debug!(error = %e, attempt, orders = requests.len(), "order batch retried");
                shared.metrics.transaction_retries.inc();
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(5 * attempt as u64)).await;
            }
            other => break other,
        }
    };
    match outcome {
        Ok(outcomes) => {
            for (pending, outcome) in batch.into_iter().zip(outcomes) {
                let _ = pending.reply.send(outcome);
            }
        }
        Err(BatchError::Retryable(e) | BatchError::Failed(e)) if batch.len() > 1 => {
            // Nothing was applied. Place each order alone, so one bad order or a failure that
            // batching provoked costs the others nothing, and each gets its own answer.
            tracing::warn!(error = %e, orders = batch.len(), "order batch failed; placing its orders one by one");
            shared.metrics.order_batch_splits.inc();
            let alone = batch.into_iter().map(|pending| async move {
                let placed = place_alone(shared, &pending.request).await.map(Outcome::Alone);
                let _ = pending.reply.send(placed);
            });
            futures_util::future::join_all(alone).await;
        }
        Err(BatchError::Retryable(e) | BatchError::Failed(e) | BatchError::Commit(e)) => {
            for pending in batch {
                let _ = pending.reply.send(Err(e.clone()));
            }
        }
    }
}

/// A product as the batch found it, under its row lock.
struct Stocked {
    name: String,
    price: i64,
    stock: i64,
    active: bool,
}

/// Runs one attempt at the batch; on success, one outcome per request in order.
async fn place_batch(shared: &Shared, requests: &[&OrderRequest]) -> Result<Vec<AppResult<Outcome>>, BatchError> {
    let db = &*shared.db;
    let arrays = shared.arrays;
    let now = now_ms() as i64;
    let order_ids: Vec<i64> = requests.iter().map(|_| shared.ids.next_id()).collect();
    let mut tx = db.begin().await?;

    // 1. Keys, claimed in (user, key) order so two batches never wait on each other's keys in a cycle.
    let mut keyed: Vec<usize> = (0..requests.len()).filter(|&i| requests[i].key.is_some()).collect();
    keyed.sort_by(|&a, &b| {
        let (ka, kb) = (requests[a].key.as_ref(), requests[b].key.as_ref());
        (requests[a].user_id, ka.map(|k| &k.key)).cmp(&(requests[b].user_id, kb.map(|k| &k.key)))
    });
    let claimed = claim_keys(db, arrays, &mut tx, requests, &keyed, &order_ids, now).await?;
    let taken: HashSet<usize> = keyed
        .iter()
        .copied()
        .filter(|&i| !claimed.contains(&order_ids[i]))
        .collect();

    // 2. Carts being ordered.
    let cart_users: Vec<i64> = unique(
        (0..requests.len())
            .filter(|i| !taken.contains(i) && matches!(requests[*i].source, Source::Cart))
            .map(|i| requests[i].user_id),
    );
    let mut carts = read_carts(db, arrays, &mut tx, &cart_users).await?;

    // 3. Products, locked in id order.
    let mut lines: Vec<Vec<(i64, i64)>> = requests
        .iter()
        .map(|r| match &r.source {
            Source::Items(items) => items.clone(),
            Source::Cart => carts.get(&r.user_id).cloned().unwrap_or_default(),
        })
        .collect();
    for l in &mut lines {
        l.sort_unstable_by_key(|(product_id, _)| *product_id);
    }
    let product_ids = unique(
        (0..requests.len())
            .filter(|i| !taken.contains(i))
            .flat_map(|i| lines[i].iter().map(|(p, _)| *p)),
    );
    let mut products = lock_products(db, arrays, &mut tx, &product_ids).await?;

    // 4. Decide, in arrival order, as if each order ran alone after the ones before it.
    let mut outcomes: Vec<AppResult<Outcome>> = Vec::with_capacity(requests.len());
    let mut placed: Vec<Order> = Vec::new();
    let mut deducted: BTreeMap<i64, i64> = BTreeMap::new();
    let mut emptied_carts: Vec<i64> = Vec::new();
    // The claims of refused orders, by their key (user, key).
    let mut released: Vec<(i64, &str)> = Vec::new();
    for (i, request) in requests.iter().enumerate() {
        if taken.contains(&i) {
            outcomes.push(Ok(Outcome::KeyTaken));
            continue;
        }
        let is_cart = matches!(request.source, Source::Cart);
        let lines = if is_cart {
            // A second cart order of the same user in this batch finds the cart already ordered.
            carts
                .remove(&request.user_id)
                .map(|_| lines[i].clone())
                .unwrap_or_default()
        } else {
            std::mem::take(&mut lines[i])
        };
        match decide(&lines, &mut products) {
            Ok(items) => {
                for item in &items {
                    *deducted.entry(item.product_id).or_default() += item.quantity;
                }
                let order = Order {
                    id: order_ids[i],
                    order_no: format!("MO{}", order_ids[i]),
                    user_id: request.user_id,
                    status: "created".into(),
                    total: orders::total(&items).expect("decide checked the total"),
                    items,
                    created_at: now,
                };
                if is_cart {
                    emptied_carts.push(request.user_id);
                }
                placed.push(order.clone());
                outcomes.push(Ok(Outcome::Created(order)));
            }
            Err(e) => {
                if let Some(key) = &request.key {
                    released.push((request.user_id, key.key.as_str()));
                }
                outcomes.push(Err(e));
            }
        }
    }

    // 5. Apply: one deduction per product, the rows, the carts, the released keys.
    deduct(db, arrays, &mut tx, &deducted, now).await?;
    insert_orders(db, arrays, &mut tx, &placed).await?;
    empty_carts(db, arrays, &mut tx, &emptied_carts).await?;
    release_keys(db, arrays, &mut tx, &released).await?;
    // One invalidation record for every product the batch sold from.
    let changed: Vec<Key> = deducted.keys().map(|&id| Key::product(id)).collect();
    invalidation::record(db, &mut tx, &changed).await?;
    tx.commit().await.map_err(|e| BatchError::Commit(e.into()))?;
    Ok(outcomes)
}

/// Decides one order against the stock left, taking its units when every line can be filled;
/// the first line (in product order) that cannot be filled refuses the whole order, as the
/// one-order path does.
fn decide(lines: &[(i64, i64)], products: &mut HashMap<i64, Stocked>) -> AppResult<Vec<OrderItem>> {
    if lines.is_empty() {
        return Err(orders::empty_cart());
    }
    let mut items = Vec::with_capacity(lines.len());
    for &(product_id, quantity) in lines {
        let refused = match products.get(&product_id) {
            None => Some(LineRefused::Missing),
            Some(p) if !p.active => Some(LineRefused::NotForSale),
            Some(p) if p.stock < quantity => Some(LineRefused::Short { stock: p.stock }),
            Some(p) => {
                items.push(OrderItem {
                    product_id,
                    name: p.name.clone(),
                    unit_price: p.price,
                    quantity,
                });
                None
            }
        };
        if let Some(refused) = refused {
            return Err(refused.error(product_id, quantity));
        }
    }
    if orders::total(&items).is_none() {
        return Err(orders::total_too_large());
    }
    for item in &items {
        products.get_mut(&item.product_id).expect("found above").stock -= item.quantity;
    }
    Ok(items)
}

fn unique(ids: impl Iterator<Item = i64>) -> Vec<i64> {
    let mut v: Vec<i64> = ids.collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// A PostgreSQL array literal of integers, `{1,2,3}`, for a `$n::bigint[]` parameter.
fn pg_ints(values: impl IntoIterator<Item = i64>) -> String {
    let mut out = String::from("{");
    for (i, v) in values.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&v.to_string());
    }
    out.push('}');
    out
}

/// A PostgreSQL array literal of strings for a `$n::text[]` parameter: every element quoted,
/// with `"` and `\` escaped by a backslash (PostgreSQL 8.15.6, array input syntax).
fn pg_texts<'a>(values: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = String::from("{");
    for (i, v) in values.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        for ch in v.chars() {
            if ch == '"' || ch == '\\' {
                out.push('\\');
            }
            out.push(ch);
        }
        out.push('"');
    }
    out.push('}');
    out
}

/// A JSON array for a MySQL/MariaDB `JSON_TABLE(?, '$[*]' COLUMNS (...))` parameter: integers as
/// they are, rows (tuples) as arrays whose columns are read by position (`PATH '$[0]'`).
fn json_rows<T: serde::Serialize>(rows: &[T]) -> String {
    serde_json::to_string(rows).expect("integers, strings and tuples of them always serialise")
}

/// One list of integers as the array parameter of the dialect: `{1,2}` or `[1,2]`.
fn int_array(db: &Db, values: &[i64]) -> String {
    if db.dialect == Dialect::Postgres {
        pg_ints(values.iter().copied())
    } else {
        json_rows(values)
    }
}

fn marks(n: usize) -> String {
    vec!["?"; n].join(", ")
}

type Query<'q> = sqlx::query::Query<'q, Any, AnyArguments<'q>>;

/// A statement prepared (and its plan cached) per connection, in the dialect's placeholders; its
/// text is kept in `slot`, which the query borrows.
fn prepared<'q>(slot: &'q mut String, db: &Db, sql: &str) -> Query<'q> {
    *slot = db.sql(sql).into_owned();
    sqlx::query(slot).persistent(true)
}

/// The `JSON_TABLE` of the MySQL/MariaDB array statements: `$[*]` of the parameter, with these
/// columns. The statements join it first (`STRAIGHT_JOIN`): the optimizer guesses a table function
/// holds 40 rows and would otherwise scan a small table instead, and the rows it locks are then
/// reached in the parameter's (ascending) order.
macro_rules! json_table {
    ($columns:literal) => {
        concat!("JSON_TABLE(?, '$[*]' COLUMNS (", $columns, "))")
    };
}

/// Claims the keys of `keyed` requests for their new order ids; returns the order ids whose
/// claim was stored (the others found their key already stored: replays).
async fn claim_keys(
    db: &Db,
    arrays: bool,
    tx: &mut Tx<'_>,
    requests: &[&OrderRequest],
    keyed: &[usize],
    order_ids: &[i64],
    now: i64,
) -> Result<HashSet<i64>, BatchError> {
    if keyed.is_empty() {
        return Ok(HashSet::new());
    }
    let key = |i: usize| requests[i].key.as_ref().expect("keyed");
    let (mut sql, mut lookup_sql) = (String::new(), String::new());
    let rows = match (db.dialect, arrays) {
        // PostgreSQL waits for a conflicting claim still in flight, then skips it if it committed.
        (Dialect::Postgres, true) => {
            sqlx::query(
                "INSERT INTO idempotency_keys (user_id, idem_key, request_hash, order_id, created_at) \
                 SELECT u, k, h, o, $5 FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[]) AS t(u, k, h, o) \
                 ON CONFLICT DO NOTHING RETURNING order_id",
            )
            .bind(pg_ints(keyed.iter().map(|&i| requests[i].user_id)))
            .bind(pg_texts(keyed.iter().map(|&i| key(i).key.as_str())))
            .bind(pg_texts(keyed.iter().map(|&i| key(i).request_hash.as_str())))
            .bind(pg_ints(keyed.iter().map(|&i| order_ids[i])))
            .bind(now)
            .fetch_all(&mut **tx)
            .await?
        }
        // No RETURNING: a duplicate is a no-op update (it waits for, and locks, the stored row),
        // then the claims that carry our order ids are ours.
        (Dialect::MySql, true) => {
            let claims = json_rows(
                &keyed
                    .iter()
                    .map(|&i| (requests[i].user_id, key(i).key.as_str(), key(i).request_hash.as_str(), order_ids[i]))
                    .collect::<Vec<_>>(),
            );
            sqlx::query(concat!(
                "INSERT INTO idempotency_keys (user_id, idem_key, request_hash, order_id, created_at) SELECT t.u, t.k, t.h, t.o, ? FROM ",
                json_table!("u BIGINT PATH '$[0]', k VARCHAR(255) PATH '$[1]', h VARCHAR(64) PATH '$[2]', o BIGINT PATH '$[3]'"),
                " AS t ON DUPLICATE KEY UPDATE order_id = idempotency_keys.order_id"
            ))
            .persistent(true)
            .bind(now)
            .bind(claims.clone())
            .execute(&mut **tx)
            .await?;
            sqlx::query(concat!(
                "SELECT ik.order_id FROM ",
                json_table!("u BIGINT PATH '$[0]', k VARCHAR(255) PATH '$[1]'"),
                " AS t STRAIGHT_JOIN idempotency_keys ik ON ik.user_id = t.u AND ik.idem_key = t.k"
            ))
            .persistent(true)
            .bind(claims)
            .fetch_all(&mut **tx)
            .await?
        }
        (dialect, _) => {
            let values = vec!["(?, ?, ?, ?, ?)"; keyed.len()].join(", ");
            let insert = format!(
                "INSERT INTO idempotency_keys (user_id, idem_key, request_hash, order_id, created_at) VALUES {values}"
            );
            let insert = if dialect == Dialect::MySql {
                format!("{insert} ON DUPLICATE KEY UPDATE order_id = order_id")
            } else {
                format!("{insert} ON CONFLICT DO NOTHING RETURNING order_id")
            };
            let mut q = prepared(&mut sql, db, &insert);
            for &i in keyed {
                q = q
                    .bind(requests[i].user_id)
                    .bind(key(i).key.as_str())
                    .bind(key(i).request_hash.as_str())
                    .bind(order_ids[i])
                    .bind(now);
            }
            if dialect == Dialect::MySql {
                q.execute(&mut **tx).await?;
                let lookup = vec!["(user_id = ? AND idem_key = ?)"; keyed.len()].join(" OR ");
                let mut q = prepared(&mut lookup_sql, db, &format!("SELECT order_id FROM idempotency_keys WHERE {lookup}"));
                for &i in keyed {
                    q = q.bind(requests[i].user_id).bind(key(i).key.as_str());
                }
                q.fetch_all(&mut **tx).await?
            } else {
                q.fetch_all(&mut **tx).await?
            }
        }
    };
    rows.iter().map(|r| Ok(int(r, "order_id")?)).collect()
}

async fn read_carts(
    db: &Db,
    arrays: bool,
    tx: &mut Tx<'_>,
    users: &[i64],
) -> Result<HashMap<i64, Vec<(i64, i64)>>, BatchError> {
    let mut carts: HashMap<i64, Vec<(i64, i64)>> = HashMap::new();
    if users.is_empty() {
        return Ok(carts);
    }
    let mut sql = String::new();
    let query = match (db.dialect, arrays) {
        (Dialect::Postgres, true) => sqlx::query(
            "SELECT user_id, product_id, quantity FROM cart_items WHERE user_id = ANY($1::bigint[]) ORDER BY user_id, product_id",
        )
        .bind(int_array(db, users)),
        (Dialect::MySql, true) => sqlx::query(concat!(
            "SELECT c.user_id, c.product_id, c.quantity FROM ",
            json_table!("u BIGINT PATH '$'"),
            " AS t STRAIGHT_JOIN cart_items c ON c.user_id = t.u ORDER BY c.user_id, c.product_id"
        ))
        .persistent(true)
        .bind(int_array(db, users)),
        _ => {
            let mut q = prepared(
&mut sql,                 db,
                &format!(
                    "SELECT user_id, product_id, quantity FROM cart_items WHERE user_id IN ({}) ORDER BY user_id, product_id",
                    marks(users.len())
                ),
            );
            for u in users {
                q = q.bind(*u);
            }
            q
        }
    };
    for r in query.fetch_all(&mut **tx).await? {
        carts
            .entry(int(&r, "user_id")?)
            .or_default()
            .push((int(&r, "product_id")?, int(&r, "quantity")?));
    }
    Ok(carts)
}

/// Most bind parameters in one statement: under SQLite's 32,766 and the 65,535 of PostgreSQL
/// and MySQL, so a large batch is a few statements instead of an error.
const MAX_BINDS: usize = 30_000;

async fn lock_products(
    db: &Db,
    arrays: bool,
    tx: &mut Tx<'_>,
    ids: &[i64],
) -> Result<HashMap<i64, Stocked>, BatchError> {
    let mut products = HashMap::with_capacity(ids.len());
    // Ascending ids across chunks: one global lock order, so batches and single orders never
    // deadlock. SQLite has no row locks: `BEGIN IMMEDIATE` already holds its one write lock.
    let lock = if db.dialect == Dialect::Sqlite {
        ""
    } else {
        " FOR UPDATE"
    };
    let chunk_size = if arrays { ids.len().max(1) } else { MAX_BINDS };
    for chunk in ids.chunks(chunk_size) {
        let mut sql = String::new();
        let query = match (db.dialect, arrays) {
            (Dialect::Postgres, true) => sqlx::query(
                "SELECT id, name, price, stock, status FROM products WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE",
            )
            .bind(int_array(db, chunk)),
            // The ids come sorted, so the rows are reached (and locked) in id order.
            (Dialect::MySql, true) => sqlx::query(concat!(
                "SELECT p.id, p.name, p.price, p.stock, p.status FROM ",
                json_table!("id BIGINT PATH '$'"),
                " AS t STRAIGHT_JOIN products p ON p.id = t.id ORDER BY p.id FOR UPDATE"
            ))
            .persistent(true)
            .bind(int_array(db, chunk)),
            _ => {
                let mut q = prepared(
&mut sql,                     db,
                    &format!(
                        "SELECT id, name, price, stock, status FROM products WHERE id IN ({}) ORDER BY id{lock}",
                        marks(chunk.len())
                    ),
                );
                for id in chunk {
                    q = q.bind(*id);
                }
                q
            }
        };
        for r in query.fetch_all(&mut **tx).await? {
            products.insert(
                int(&r, "id")?,
                Stocked {
                    name: text(&r, "name")?,
                    price: int(&r, "price")?,
                    stock: int(&r, "stock")?,
                    active: text(&r, "status")? == "active",
                },
            );
        }
    }
    Ok(products)
}

/// One UPDATE for every product the batch sells from. The `stock >= units` guard cannot fail
/// under the row locks; if it ever did, the batch would roll back rather than oversell.
async fn deduct(
    db: &Db,
    arrays: bool,
    tx: &mut Tx<'_>,
    units: &BTreeMap<i64, i64>,
    now: i64,
) -> Result<(), BatchError> {
    let units: Vec<(i64, i64)> = units.iter().map(|(p, q)| (*p, *q)).collect();
    let chunk_size = if arrays { units.len().max(1) } else { MAX_BINDS / 5 };
    for chunk in units.chunks(chunk_size) {
        let mut sql = String::new();
        let query = match (db.dialect, arrays) {
            // `p.id = ANY(...)` gives the generic plan an index condition: joined on `d.id` alone,
            // it scanned the whole table, walking every dead version of a hot product's row (a
            // flash sale ran at 0.04x of the multi-row statement, 3.5 ms of PostgreSQL CPU per order).
            (Dialect::Postgres, true) => sqlx::query(
                "UPDATE products AS p SET stock = p.stock - d.n, version = p.version + 1, updated_at = $3 \
                 FROM unnest($1::bigint[], $2::bigint[]) AS d(id, n) \
                 WHERE p.id = ANY($1::bigint[]) AND p.id = d.id AND p.stock >= d.n",
            )
            .bind(pg_ints(chunk.iter().map(|(p, _)| *p)))
            .bind(pg_ints(chunk.iter().map(|(_, n)| *n)))
            .bind(now),
            (Dialect::MySql, true) => sqlx::query(concat!(
                "UPDATE ",
                json_table!("id BIGINT PATH '$[0]', n BIGINT PATH '$[1]'"),
                " AS d STRAIGHT_JOIN products p ON p.id = d.id \
                 SET p.stock = p.stock - d.n, p.version = p.version + 1, p.updated_at = ? WHERE p.stock >= d.n"
            ))
            .persistent(true)
            .bind(json_rows(chunk))
            .bind(now),
            _ => {
                let case = "WHEN ? THEN ? ".repeat(chunk.len());
                let mut q = prepared(
&mut sql,                     db,
                    &format!(
                        "UPDATE products SET stock = stock - (CASE id {case}END), version = version + 1, updated_at = ? \
                         WHERE id IN ({}) AND stock >= (CASE id {case}END)",
                        marks(chunk.len())
                    ),
                );
                for (p, n) in chunk {
                    q = q.bind(*p).bind(*n);
                }
                q = q.bind(now);
                for (p, _) in chunk {
                    q = q.bind(*p);
                }
                for (p, n) in chunk {
                    q = q.bind(*p).bind(*n);
                }
                q
            }
        };
        let done = query.execute(&mut **tx).await?.rows_affected();
        if done != chunk.len() as u64 {
            return Err(BatchError::Failed(AppError::Internal(format!(
                "orders: the batch deduction changed {done} of {} products",
                chunk.len()
            ))));
        }
    }
    Ok(())
}

async fn insert_orders(db: &Db, arrays: bool, tx: &mut Tx<'_>, placed: &[Order]) -> Result<(), BatchError> {
    if placed.is_empty() {
        return Ok(());
    }
    let items = || placed.iter().flat_map(|o| o.items.iter().map(move |i| (o.id, i)));
    if arrays {
        // Every order of a batch has the same creation time and status; its number is its id's.
        let created = placed[0].created_at;
        let (orders, lines) = if db.dialect == Dialect::Postgres {
            let orders = sqlx::query(
                "INSERT INTO orders (id, order_no, user_id, status, total, created_at, updated_at) \
                 SELECT o.id, 'MO' || o.id, o.u, 'created', o.t, $4, $4 FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS o(id, u, t)",
            )
            .bind(pg_ints(placed.iter().map(|o| o.id)))
            .bind(pg_ints(placed.iter().map(|o| o.user_id)))
            .bind(pg_ints(placed.iter().map(|o| o.total)))
            .bind(created);
            let lines = sqlx::query(
                "INSERT INTO order_items (order_id, product_id, name, unit_price, quantity) \
                 SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::bigint[], $5::bigint[])",
            )
            .bind(pg_ints(items().map(|(o, _)| o)))
            .bind(pg_ints(items().map(|(_, i)| i.product_id)))
            .bind(pg_texts(items().map(|(_, i)| i.name.as_str())))
            .bind(pg_ints(items().map(|(_, i)| i.unit_price)))
            .bind(pg_ints(items().map(|(_, i)| i.quantity)));
            (orders, lines)
        } else {
            let orders = sqlx::query(concat!(
                "INSERT INTO orders (id, order_no, user_id, status, total, created_at, updated_at) \
                 SELECT o.id, CONCAT('MO', o.id), o.u, 'created', o.t, ?, ? FROM ",
                json_table!("id BIGINT PATH '$[0]', u BIGINT PATH '$[1]', t BIGINT PATH '$[2]'"),
                " AS o"
            ))
            .persistent(true)
            .bind(created)
            .bind(created)
            .bind(json_rows(
                &placed.iter().map(|o| (o.id, o.user_id, o.total)).collect::<Vec<_>>(),
            ));
            let lines = sqlx::query(concat!(
                "INSERT INTO order_items (order_id, product_id, name, unit_price, quantity) \
                 SELECT i.o, i.p, i.name, i.price, i.q FROM ",
                json_table!(
                    "o BIGINT PATH '$[0]', p BIGINT PATH '$[1]', name VARCHAR(200) PATH '$[2]', \
                     price BIGINT PATH '$[3]', q BIGINT PATH '$[4]'"
                ),
                " AS i"
            ))
            .persistent(true)
            .bind(json_rows(
                &items()
                    .map(|(o, i)| (o, i.product_id, i.name.as_str(), i.unit_price, i.quantity))
                    .collect::<Vec<_>>(),
            ));
            (orders, lines)
        };
        orders.execute(&mut **tx).await?;
        lines.execute(&mut **tx).await?;
        return Ok(());
    }
    for chunk in placed.chunks(MAX_BINDS / 7) {
        let mut sql = String::new();
        let mut q = prepared(
            &mut sql,
            db,
            &format!(
                "INSERT INTO orders (id, order_no, user_id, status, total, created_at, updated_at) VALUES {}",
                vec!["(?, ?, ?, ?, ?, ?, ?)"; chunk.len()].join(", ")
            ),
        );
        for o in chunk {
            q = q
                .bind(o.id)
                .bind(o.order_no.as_str())
                .bind(o.user_id)
                .bind(o.status.as_str())
                .bind(o.total)
                .bind(o.created_at)
                .bind(o.created_at);
        }
        q.execute(&mut **tx).await?;
    }
    let items: Vec<(i64, &OrderItem)> = items().collect();
    for chunk in items.chunks(MAX_BINDS / 5) {
        let mut sql = String::new();
        let mut q = prepared(
            &mut sql,
            db,
            &format!(
                "INSERT INTO order_items (order_id, product_id, name, unit_price, quantity) VALUES {}",
                vec!["(?, ?, ?, ?, ?)"; chunk.len()].join(", ")
            ),
        );
        for (order_id, i) in chunk {
            q = q
                .bind(*order_id)
                .bind(i.product_id)
                .bind(i.name.as_str())
                .bind(i.unit_price)
                .bind(i.quantity);
        }
        q.execute(&mut **tx).await?;
    }
    Ok(())
}

/// Empties the carts that were ordered.
async fn empty_carts(db: &Db, arrays: bool, tx: &mut Tx<'_>, users: &[i64]) -> Result<(), BatchError> {
    if users.is_empty() {
        return Ok(());
    }
    let mut sql = String::new();
    let query = match (db.dialect, arrays) {
        (Dialect::Postgres, true) => {
            sqlx::query("DELETE FROM cart_items WHERE user_id = ANY($1::bigint[])").bind(int_array(db, users))
        }
        (Dialect::MySql, true) => sqlx::query(concat!(
            "DELETE c FROM ",
            json_table!("u BIGINT PATH '$'"),
            " AS t STRAIGHT_JOIN cart_items c ON c.user_id = t.u"
        ))
        .persistent(true)
        .bind(int_array(db, users)),
        _ => {
            let mut q = prepared(
                &mut sql,
                db,
                &format!("DELETE FROM cart_items WHERE user_id IN ({})", marks(users.len())),
            );
            for u in users {
                q = q.bind(*u);
            }
            q
        }
    };
    query.execute(&mut **tx).await?;
    Ok(())
}

/// Releases the claims of refused orders, by their primary key (user, key): `order_id` has no
/// index, and after a day of orders a scan of the keys per batch is what a sold-out flash sale
/// would pay for every batch of refusals.
async fn release_keys(db: &Db, arrays: bool, tx: &mut Tx<'_>, keys: &[(i64, &str)]) -> Result<(), BatchError> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut sql = String::new();
    let query = match (db.dialect, arrays) {
        // A join, so each key is one primary-key lookup. Written as `user_id = ANY(...) AND
        // (user_id, idem_key) IN (SELECT ...)`, the generic plan took `user_id = ANY` as its index
        // condition, which with a few buyers holding many keys reads them all (75 ms a batch).
        (Dialect::Postgres, true) => sqlx::query(
            "DELETE FROM idempotency_keys AS ik USING unnest($1::bigint[], $2::text[]) AS r(u, k) \
             WHERE ik.user_id = r.u AND ik.idem_key = r.k",
        )
        .bind(pg_ints(keys.iter().map(|(u, _)| *u)))
        .bind(pg_texts(keys.iter().map(|(_, k)| *k))),
        (Dialect::MySql, true) => sqlx::query(concat!(
            "DELETE ik FROM ",
            json_table!("u BIGINT PATH '$[0]', k VARCHAR(255) PATH '$[1]'"),
            " AS t STRAIGHT_JOIN idempotency_keys ik ON ik.user_id = t.u AND ik.idem_key = t.k"
        ))
        .persistent(true)
        .bind(json_rows(keys)),
        _ => {
            let lookup = vec!["(user_id = ? AND idem_key = ?)"; keys.len()].join(" OR ");
            let mut q = prepared(&mut sql, db, &format!("DELETE FROM idempotency_keys WHERE {lookup}"));
            for (u, k) in keys {
                q = q.bind(*u).bind(*k);
            }
            q
        }
    };
    query.execute(&mut **tx).await?;
    Ok(())
}
