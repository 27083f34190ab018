//! Where the app's traces and statement timings come from: one `tracing` subscriber for the
//! process, with three layers.
//!
//! - the log lines (JSON or text, `MALL_LOG`), carrying the request span's `trace_id`;
//! - [`Statements`]: every database statement, from sqlx's own statement events (target
//!   `sqlx::query`, which sqlx emits as each statement finishes, with its rows and elapsed time),
//!   timed into `db_statement_duration_seconds{statement}` and logged when slower than
//!   `MALL_DB_SLOW_MS`;
//! - [`Spans`] (only with an OTLP endpoint in the environment): each sampled request's spans
//!   (the route, the cache levels, Redis, every statement) exported by `mall_telemetry`.
//!
//! The request span (`api/observe.rs`) carries `trace_id`, `parent_span_id` and `sampled`: the
//! caller's W3C `traceparent` (the sidecar's upstream span), continued here. Statement timings
//! are process-wide: apps started in one test process share them.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use mall_telemetry::span::now_nanos;
use mall_telemetry::{Exporter, SpanData, SpanId, SpanKind, TraceConfig, TraceId, TraceParent, Value};
use prometheus::{HistogramOpts, HistogramVec};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogFormat;

/// More distinct statement names than this are counted as `other` (a bounded label set even if
/// a query were ever built from input).
const MAX_STATEMENT_NAMES: usize = 64;

static STATEMENTS: OnceLock<HistogramVec> = OnceLock::new();
static SLOW_MS: AtomicU64 = AtomicU64::new(DEFAULT_SLOW_MS);
static DB_SYSTEM: OnceLock<&'static str> = OnceLock::new();
static EXPORTER: OnceLock<Exporter> = OnceLock::new();
static NAMES: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();

/// `MALL_DB_SLOW_MS`'s default: a statement this slow is worth a log line (seed 000 logs slow
/// requests at 1 s; one statement of a request is a fraction of that).
pub const DEFAULT_SLOW_MS: u64 = 100;

/// `db_statement_duration_seconds{statement}`, one for the process (registered in each app's
/// registry).
pub fn statement_histogram() -> HistogramVec {
    STATEMENTS
        .get_or_init(|| {
            HistogramVec::new(
                HistogramOpts::new(
                    "db_statement_duration_seconds",
                    "Database statements by name (verb and table, e.g. `SELECT products`), from sqlx's statement events",
                )
                .buckets(vec![
                    0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ]),
                &["statement"],
            )
            .expect("metric")
        })
        .clone()
}

/// Statements at least this slow are logged (`MALL_DB_SLOW_MS`).
pub fn set_slow_statement_ms(ms: u64) {
    SLOW_MS.store(ms, Ordering::Relaxed);
}

/// `db.system.name` of the spans (postgresql, mysql, sqlite).
pub fn set_db_system(system: &'static str) {
    let _ = DB_SYSTEM.set(system);
}

/// Starts the span exporter when the OpenTelemetry variables ask for one.
pub fn exporter_from_env() -> Result<Option<&'static Exporter>, String> {
    if let Some(e) = EXPORTER.get() {
        return Ok(Some(e));
    }
    let Some(config) = TraceConfig::from_env("mall-app")? else {
        return Ok(None);
    };
    Ok(Some(EXPORTER.get_or_init(|| Exporter::start(config, "mall-app"))))
}

/// The exporter, if tracing is on.
pub fn exporter() -> Option<&'static Exporter> {
    EXPORTER.get()
}

/// The process's subscriber: log lines in `format`, statement timings, and spans when an OTLP
/// endpoint is configured.
pub fn install(format: LogFormat) -> Result<(), String> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer as _;
    let filter = tracing_subscriber::EnvFilter::try_from_env("MALL_LOG").unwrap_or_else(|_| "info".into());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_filter(filter)
            .boxed(),
        LogFormat::Text => fmt.with_filter(filter).boxed(),
    };
    let exporter = exporter_from_env()?;
    tracing_subscriber::registry()
        .with(fmt)
        .with(Statements.with_filter(sqlx_statements()))
        .with(exporter.map(|_| Spans.with_filter(InSampledTrace)))
        .try_init()
        .map_err(|e| e.to_string())
}

/// For apps started inside a test process: statement timings and spans (from the environment),
/// no log lines. The first call wins; later ones do nothing.
pub fn install_for_tests() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer as _;
    let exporter = exporter_from_env().expect("valid OTEL_* variables");
    let _ = tracing_subscriber::registry()
        .with(Statements.with_filter(sqlx_statements()))
        .with(exporter.map(|_| Spans.with_filter(InSampledTrace)))
        .try_init();
}

/// sqlx's statement events are DEBUG; only this layer asks for them.
fn sqlx_statements() -> tracing_subscriber::filter::Targets {
    tracing_subscriber::filter::Targets::new().with_target("sqlx::query", tracing::Level::DEBUG)
}

/// A statement's name: its verb and first table, e.g. `SELECT products`, `INSERT orders`.
pub fn statement_name(sql: &str) -> String {
    let mut words = sql
        .split(|c: char| c.is_whitespace() || c == '(' || c == ',' || c == ';')
        .filter(|w| !w.is_empty());
    let Some(verb) = words.next() else {
        return "other".into();
    };
    let verb = verb.to_ascii_uppercase();
    if verb == "WITH" {
        return with_statement_name(words);
    }
    let table_after = match verb.as_str() {
        "SELECT" | "DELETE" => Some("FROM"),
        "INSERT" | "REPLACE" => Some("INTO"),
        "UPDATE" => None,
        _ => return verb,
    };
    let table = match table_after {
        None => words.next(),
        Some(keyword) => {
            let mut found = None;
            while let Some(w) = words.next() {
                if w.eq_ignore_ascii_case(keyword) {
                    found = words.next();
                    break;
                }
            }
            found
        }
    };
    with_table(verb, table)
}

/// A statement with common table expressions is named by the first row it writes
/// (`WITH placed AS (INSERT INTO orders ...) INSERT INTO order_items ...` is `INSERT orders`),
/// else by the first table it reads.
fn with_statement_name<'a>(mut words: impl Iterator<Item = &'a str>) -> String {
    let mut read = None;
    while let Some(w) = words.next() {
        let upper = w.to_ascii_uppercase();
        match upper.as_str() {
            "INSERT" => {
                let table = words
                    .by_ref()
                    .find(|w| w.eq_ignore_ascii_case("INTO"))
                    .and_then(|_| words.next());
                return with_table("INSERT".into(), table);
            }
            "UPDATE" => return with_table("UPDATE".into(), words.next()),
            "DELETE" => {
                let table = words
                    .by_ref()
                    .find(|w| w.eq_ignore_ascii_case("FROM"))
                    .and_then(|_| words.next());
                return with_table("DELETE".into(), table);
            }
            "FROM" if read.is_none() => read = words.next(),
            _ => {}
        }
    }
    with_table("SELECT".into(), read)
}

fn with_table(verb: String, table: Option<&str>) -> String {
    match table {
        Some(t) => {
            let t = t.trim_matches(|c| c == '"' || c == '`' || c == ')');
            let t = t.rsplit('.').next().unwrap_or(t);
            if t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && !t.is_empty() {
                format!("{verb} {}", t.to_ascii_lowercase())
            } else {
                verb
            }
        }
        None => verb,
    }
}

/// The name as a label: the first [`MAX_STATEMENT_NAMES`] distinct names, then `other`.
fn label(name: String) -> String {
    let names = NAMES.get_or_init(Default::default);
    let mut names = names.lock().expect("names");
    if names.contains(&name) || names.len() < MAX_STATEMENT_NAMES {
        names.insert(name.clone());
        name
    } else {
        "other".into()
    }
}

/// The fields of one sqlx statement event.
#[derive(Default)]
struct Statement {
    summary: String,
    sql: String,
    rows_returned: u64,
    rows_affected: u64,
    elapsed_secs: f64,
}

impl Visit for Statement {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "summary" => self.summary = value.to_string(),
            "db.statement" => self.sql = value.trim().to_string(),
            _ => {}
        }
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        match field.name() {
            "rows_returned" => self.rows_returned = value,
            "rows_affected" => self.rows_affected = value,
            _ => {}
        }
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        if field.name() == "elapsed_secs" {
            self.elapsed_secs = value;
        }
    }
    fn record_debug(&mut self, _: &Field, _: &dyn std::fmt::Debug) {}
}

impl Statement {
    fn of(event: &Event<'_>) -> Statement {
        let mut s = Statement::default();
        event.record(&mut s);
        s
    }

    fn text(&self) -> &str {
        if self.sql.is_empty() {
            &self.summary
        } else {
            &self.sql
        }
    }
}

/// Times every statement and logs the slow ones.
pub struct Statements;

impl<S: Subscriber> Layer<S> for Statements {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() != "sqlx::query" {
            return;
        }
        let s = Statement::of(event);
        let name = label(statement_name(s.text()));
        statement_histogram()
            .with_label_values(&[name.as_str()])
            .observe(s.elapsed_secs);
        let slow_ms = SLOW_MS.load(Ordering::Relaxed);
        if slow_ms > 0 && s.elapsed_secs * 1000.0 >= slow_ms as f64 {
            tracing::warn!(
                target: "mall_app::slow_statement",
                statement = %name,
                elapsed_ms = (s.elapsed_secs * 1000.0) as u64,
                rows = s.rows_returned.max(s.rows_affected),
                sql = %s.text(),
                "slow statement"
            );
            crate::slow_plans::explain_later(name, s.text());
        }
    }
}

/// What is kept of a sampled span until it closes.
struct Recorded {
    trace_id: TraceId,
    span_id: SpanId,
    parent: Option<SpanId>,
    start: u64,
    data: SpanData,
}

/// The request span's trace fields, and the attributes any span records.
#[derive(Default)]
struct Fields {
    trace_id: Option<TraceId>,
    parent: Option<SpanId>,
    sampled: bool,
    method: Option<String>,
    route: Option<String>,
    attributes: Vec<(Cow<'static, str>, Value)>,
    error: Option<String>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "trace_id" => self.trace_id = TraceId::parse(value),
            "parent_span_id" => self.parent = SpanId::parse(value),
            "method" => self.method = Some(value.to_string()),
            "route" => self.route = Some(value.to_string()),
            "error" => self.error = Some(value.to_string()),
            "request_id" | "message" => {}
            name => self.attributes.push((Cow::Borrowed(name), value.to_string().into())),
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.record_str(field, &format!("{value:?}"));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        match field.name() {
            "sampled" => self.sampled = value,
            name => self.attributes.push((Cow::Borrowed(name), value.into())),
        }
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.attributes.push((Cow::Borrowed(field.name()), value.into()));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.attributes
            .push((Cow::Borrowed(field.name()), (value as i64).into()));
    }
}

/// What [`Spans`] sees: the root span of a sampled request or order batch (the only shape with a
/// `sampled` field), and spans and statement events inside a recorded span. Everything of an
/// unsampled request is filtered out before it is built (with the log lines at INFO, its DEBUG
/// cache and Redis spans are not created at all).
pub struct InSampledTrace;

impl<S> tracing_subscriber::layer::Filter<S> for InSampledTrace
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn enabled(&self, meta: &tracing::Metadata<'_>, cx: &Context<'_, S>) -> bool {
        if meta.is_span() && meta.fields().field("sampled").is_some() {
            return true;
        }
        cx.lookup_current()
            .is_some_and(|s| s.extensions().get::<Recorded>().is_some())
    }
}

/// Turns the spans of sampled requests into OTLP spans.
pub struct Spans;

impl<S> Layer<S> for Spans
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut f = Fields::default();
        attrs.record(&mut f);
        // A request span starts or continues a trace; any other span belongs to the trace of the
        // nearest recorded span above it, if any.
        let (trace_id, parent, kind) = match f.trace_id {
            // A request is served; an order batch is the app's own work.
            Some(trace_id) if f.sampled && attrs.metadata().name() == "request" => {
                (trace_id, f.parent, SpanKind::Server)
            }
            Some(trace_id) if f.sampled => (trace_id, f.parent, SpanKind::Internal),
            Some(_) => return,
            None => {
                let Some(above) = span
                    .scope()
                    .skip(1)
                    .find_map(|s| s.extensions().get::<Recorded>().map(|r| (r.trace_id, r.span_id)))
                else {
                    return;
                };
                let kind = if attrs.metadata().name().starts_with("redis") {
                    SpanKind::Client
                } else {
                    SpanKind::Internal
                };
                (above.0, Some(above.1), kind)
            }
        };
        let name: Cow<'static, str> = match (&f.method, &f.route) {
            (Some(m), Some(r)) if kind == SpanKind::Server => format!("{m} {r}").into(),
            _ => attrs.metadata().name().into(),
        };
        let span_id = SpanId::random();
        let start = now_nanos();
        let mut data = SpanData {
            trace_id,
            span_id,
            parent_span_id: parent,
            name,
            kind,
            start_unix_nanos: start,
            end_unix_nanos: 0,
            attributes: std::mem::take(&mut f.attributes),
            links: Vec::new(),
            error: f.error.take(),
        };
        if let (Some(m), Some(r)) = (f.method, f.route) {
            data.attr("http.request.method", m);
            data.attr("http.route", r);
        }
        span.extensions_mut().insert(Recorded {
            trace_id,
            span_id,
            parent,
            start,
            data,
        });
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut ext = span.extensions_mut();
        let Some(r) = ext.get_mut::<Recorded>() else { return };
        let mut f = Fields::default();
        values.record(&mut f);
        r.data.attributes.append(&mut f.attributes);
        if f.error.is_some() {
            r.data.error = f.error;
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        if event.metadata().target() != "sqlx::query" {
            return;
        }
        let Some(span) = ctx.event_span(event) else { return };
        let Some((trace_id, parent)) = span
            .scope()
            .find_map(|s| s.extensions().get::<Recorded>().map(|r| (r.trace_id, r.span_id)))
        else {
            return;
        };
        let Some(exporter) = EXPORTER.get() else { return };
        let s = Statement::of(event);
        let end = now_nanos();
        let name = statement_name(s.text());
        let mut data = SpanData {
            trace_id,
            span_id: SpanId::random(),
            parent_span_id: Some(parent),
            name: name.clone().into(),
            kind: SpanKind::Client,
            start_unix_nanos: end.saturating_sub(Duration::from_secs_f64(s.elapsed_secs).as_nanos() as u64),
            end_unix_nanos: end,
            attributes: Vec::with_capacity(5),
            links: Vec::new(),
            error: None,
        };
        if let Some(system) = DB_SYSTEM.get() {
            data.attr("db.system.name", *system);
        }
        let (verb, table) = name.split_once(' ').unwrap_or((name.as_str(), ""));
        data.attr("db.operation.name", verb.to_string());
        if !table.is_empty() {
            data.attr("db.collection.name", table.to_string());
        }
        data.attr("db.response.returned_rows", s.rows_returned as i64);
        data.attr("db.rows_affected", s.rows_affected as i64);
        exporter.export(data);
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let Some(r) = span.extensions_mut().remove::<Recorded>() else {
            return;
        };
        let Some(exporter) = EXPORTER.get() else { return };
        let mut data = r.data;
        debug_assert_eq!(
            (data.trace_id, data.span_id, data.parent_span_id),
            (r.trace_id, r.span_id, r.parent)
        );
        data.start_unix_nanos = r.start;
        data.end_unix_nanos = now_nanos();
        exporter.export(data);
    }
}

/// The ids of the current span if it is recorded (a sampled request's).
pub fn current_span_ids() -> Option<(TraceId, SpanId)> {
    span_ids(&tracing::Span::current())
}

/// The ids of `span` if it is recorded.
pub fn span_ids(span: &tracing::Span) -> Option<(TraceId, SpanId)> {
    with_recorded(span, |r| (r.trace_id, r.span_id))
}

/// Links the current span to `to` (the order batch a request joined).
pub fn link_current(to: (TraceId, SpanId)) {
    with_recorded(&tracing::Span::current(), |r| r.data.links.push(to));
}

fn with_recorded<T>(span: &tracing::Span, f: impl FnOnce(&mut Recorded) -> T) -> Option<T> {
    span.with_subscriber(|(id, dispatch)| {
        let registry = dispatch.downcast_ref::<tracing_subscriber::Registry>()?;
        let data = registry.span(id)?;
        let mut ext = data.extensions_mut();
        ext.get_mut::<Recorded>().map(f)
    })
    .flatten()
}

/// The span of an order batch placed for `members` (the spans of the requests in it): a trace
/// of its own, recorded when any member is, linked to each member (and each member to it, see
/// `order_batch.rs`). Disabled when no member is recorded.
pub fn batch_span(members: &[(TraceId, SpanId)], orders: usize) -> tracing::Span {
    if members.is_empty() || EXPORTER.get().is_none() {
        return tracing::Span::none();
    }
    let span =
        tracing::info_span!("order batch", trace_id = %TraceId::random(), sampled = true, orders = orders as u64);
    with_recorded(&span, |r| r.data.links.extend_from_slice(members));
    span
}

/// The request's place in a trace, from its `traceparent` (W3C Trace Context): `None` when
/// tracing is off and the caller sent none (nothing to log or continue).
pub struct Incoming {
    pub trace_id: TraceId,
    pub parent: Option<SpanId>,
    pub sampled: bool,
}

/// `root`: whether a request without a caller's trace may start one.
pub fn incoming(traceparent: Option<&str>, root: bool) -> Option<Incoming> {
    let parent = traceparent.and_then(TraceParent::parse);
    match (EXPORTER.get(), parent) {
        (None, None) => None,
        (Some(_), None) if !root => None,
        // Tracing off here: the caller's trace id still goes into the log lines.
        (None, Some(p)) => Some(Incoming {
            trace_id: p.trace_id,
            parent: Some(p.parent_id),
            sampled: false,
        }),
        (Some(e), p) => {
            let trace_id = p.map_or_else(TraceId::random, |p| p.trace_id);
            Some(Incoming {
                trace_id,
                parent: p.map(|p| p.parent_id),
                sampled: e.sampler.sample(p.as_ref(), trace_id),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::statement_name;

    #[test]
    fn statements_are_named_by_verb_and_table() {
        for (sql, name) in [
            ("SELECT id, name FROM products WHERE id = ?", "SELECT products"),
            (
                "select stock, status from \"products\" where id = $1",
                "SELECT products",
            ),
            ("INSERT INTO orders (id, user_id) VALUES ($1, $2)", "INSERT orders"),
            ("UPDATE products SET stock = stock - ? WHERE id = ?", "UPDATE products"),
            (
                "DELETE FROM cart_items WHERE user_id = ANY($1::bigint[])",
                "DELETE cart_items",
            ),
            ("WITH x AS (SELECT 1) SELECT * FROM mall.users", "SELECT users"),
            (
                "WITH placed AS (INSERT INTO orders (id) VALUES ($1)) INSERT INTO order_items (order_id) VALUES ($1)",
                "INSERT orders",
            ),
            (
                "WITH r AS (SELECT seq FROM cache_invalidations) DELETE FROM x",
                "DELETE x",
            ),
            ("SELECT 1", "SELECT"),
            ("BEGIN", "BEGIN"),
            ("PRAGMA journal_mode = WAL", "PRAGMA"),
            ("", "other"),
        ] {
            assert_eq!(statement_name(sql), name, "{sql}");
        }
    }
}
