//! A request's trace in the sidecar: the client's W3C `traceparent` continued (or a trace
//! started), the app called with the upstream attempt's span as its parent, and, for a sampled
//! request, the spans handed to the exporter when the request is logged: the server span (cache
//! result, rate-limit and waiting-room decisions) and one client span per upstream attempt
//! (instance, transport, reused connection).

use std::time::Instant;

use mall_telemetry::span::now_nanos;
use mall_telemetry::{Exporter, SpanData, SpanId, SpanKind, TraceId, TraceParent};

/// One try at an instance.
pub struct Attempt {
    pub span_id: SpanId,
    pub start: u64,
    pub end: Option<u64>,
    pub instance: String,
    pub transport: &'static str,
    pub reused: bool,
}

pub struct RequestTrace {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent: Option<SpanId>,
    pub sampled: bool,
    /// Wall clock at the first hook, and the monotonic instant it stands for.
    start: u64,
    started: Instant,
    pub attempts: Vec<Attempt>,
    /// What the waiting room and the rate limiter decided, in their own words.
    pub room: Option<&'static str>,
    pub limit: Option<&'static str>,
}

impl RequestTrace {
    /// `None` when there is nothing to continue or record: tracing off and no `traceparent`.
    pub fn start(tracer: Option<&Exporter>, traceparent: Option<&str>, started: Instant) -> Option<RequestTrace> {
        let parent = traceparent.and_then(TraceParent::parse);
        let (trace_id, sampled) = match (tracer, parent) {
            (None, None) => return None,
            // Tracing off here: the caller's trace goes on to the app untouched and into the log.
            (None, Some(p)) => (p.trace_id, false),
            (Some(t), p) => {
                let trace_id = p.map_or_else(TraceId::random, |p| p.trace_id);
                (trace_id, t.sampler.sample(p.as_ref(), trace_id))
            }
        };
        // An unsampled request (most of them) only carries its ids on: no clock is read and no
        // attempt is kept for it.
        let start = if sampled {
            now_nanos().saturating_sub(started.elapsed().as_nanos() as u64)
        } else {
            0
        };
        Some(RequestTrace {
            trace_id,
            span_id: SpanId::random(),
            parent: parent.map(|p| p.parent_id),
            sampled,
            start,
            started,
            attempts: Vec::new(),
            room: None,
            limit: None,
        })
    }

    /// A new upstream attempt: the previous one (if any) ended now. Kept for sampled requests.
    pub fn attempt(&mut self, instance: &str, transport: &'static str) {
        if !self.sampled {
            return;
        }
        let now = self.now();
        if let Some(last) = self.attempts.last_mut() {
            last.end.get_or_insert(now);
        }
        self.attempts.push(Attempt {
            span_id: SpanId::random(),
            start: now,
            end: None,
            instance: instance.to_string(),
            transport,
            reused: false,
        });
    }

    /// The `traceparent` the app gets: the current attempt as its parent.
    pub fn upstream_header(&self) -> String {
        let parent = self.attempts.last().map_or(self.span_id, |a| a.span_id);
        TraceParent::header(self.trace_id, parent, self.sampled)
    }

    fn now(&self) -> u64 {
        self.start + self.started.elapsed().as_nanos() as u64
    }

    /// The request's spans, to `tracer` (sampled requests only: the caller checks).
    #[allow(clippy::too_many_arguments)]
    pub fn finish(
        mut self,
        tracer: &Exporter,
        method: &str,
        route: &str,
        path: &str,
        status: u16,
        cache: &'static str,
        error: Option<String>,
        request_id: &str,
    ) {
        debug_assert!(self.sampled);
        let end = self.now();
        let attempts = std::mem::take(&mut self.attempts);
        let last = attempts.len().saturating_sub(1);
        for (i, a) in attempts.into_iter().enumerate() {
            let mut span = SpanData {
                trace_id: self.trace_id,
                span_id: a.span_id,
                parent_span_id: Some(self.span_id),
                name: format!("{method} upstream").into(),
                kind: SpanKind::Client,
                start_unix_nanos: a.start,
                end_unix_nanos: a.end.unwrap_or(end),
                attributes: Vec::with_capacity(4),
                links: Vec::new(),
                error: None,
            };
            span.attr("server.address", a.instance);
            span.attr("network.transport", a.transport);
            span.attr("mall.upstream.connection_reused", a.reused);
            if i < last {
                span.error = Some("failed; retried on another instance".into());
            } else if let Some(e) = &error {
                span.error = Some(e.clone());
            } else if status > 0 {
                span.attr("http.response.status_code", i64::from(status));
            }
            tracer.export(span);
        }
        let mut span = SpanData {
            trace_id: self.trace_id,
            span_id: self.span_id,
            parent_span_id: self.parent,
            name: format!("{method} {route}").into(),
            kind: SpanKind::Server,
            start_unix_nanos: self.start,
            end_unix_nanos: end,
            attributes: Vec::with_capacity(8),
            links: Vec::new(),
            error: None,
        };
        span.attr("http.request.method", method.to_string());
        span.attr("http.route", route.to_string());
        span.attr("url.path", path.to_string());
        span.attr("http.response.status_code", i64::from(status));
        span.attr("mall.cache.result", cache);
        span.attr("mall.request_id", request_id.to_string());
        if let Some(room) = self.room {
            span.attr("mall.waiting_room", room);
        }
        if let Some(limit) = self.limit {
            span.attr("mall.rate_limit", limit);
        }
        // OTel HTTP semantics: a server span is an error for 5xx only.
        if status >= 500 || (status == 0 && error.is_some()) {
            span.error = Some(error.unwrap_or_else(|| format!("status {status}")));
        }
        tracer.export(span);
    }
}

/// The slowest sampled request of the last minute, as a series whose labels name its route and
/// trace id (`sidecar_slowest_traced_request_seconds`): the dashboard links from it to the trace.
/// One series at a time per sidecar; the previous one is removed when a slower request (or the
/// first of a new minute) replaces it.
pub struct SlowestTraced {
    gauge: prometheus::GaugeVec,
    window: std::sync::Mutex<Window>,
}

struct Window {
    started: Instant,
    best: Option<(f64, [String; 2])>,
    shown: Option<[String; 2]>,
}

const WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

impl SlowestTraced {
    pub fn new() -> SlowestTraced {
        SlowestTraced {
            gauge: prometheus::GaugeVec::new(
                prometheus::Opts::new(
                    "slowest_traced_request_seconds",
                    "The slowest sampled request of the last minute, by route and trace id (follow the trace id to the trace)",
                ),
                &["route", "trace_id"],
            )
            .expect("metric"),
            window: std::sync::Mutex::new(Window {
                started: Instant::now(),
                best: None,
                shown: None,
            }),
        }
    }

    pub fn collector(&self) -> Box<dyn prometheus::core::Collector> {
        Box::new(self.gauge.clone())
    }

    pub fn observe(&self, seconds: f64, route: &str, trace_id: TraceId) {
        let mut w = self.window.lock().expect("window");
        if w.started.elapsed() >= WINDOW {
            w.started = Instant::now();
            w.best = None;
        }
        if w.best.as_ref().is_some_and(|(best, _)| *best >= seconds) {
            return;
        }
        let labels = [route.to_string(), trace_id.to_string()];
        if let Some(old) = w.shown.take() {
            let _ = self.gauge.remove_label_values(&[&old[0], &old[1]]);
        }
        self.gauge.with_label_values(&[&labels[0], &labels[1]]).set(seconds);
        w.shown = Some(labels.clone());
        w.best = Some((seconds, labels));
    }
}

impl Default for SlowestTraced {
    fn default() -> Self {
        SlowestTraced::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_series_names_the_slowest_sampled_request() {
        let s = SlowestTraced::new();
        let (a, b) = (TraceId::random(), TraceId::random());
        s.observe(0.2, "/api/products", a);
        s.observe(0.1, "/api/orders", b);
        s.observe(0.5, "/api/orders", b);
        let families = s.collector().collect();
        let metrics = families[0].get_metric();
        assert_eq!(metrics.len(), 1);
        assert_eq!(metrics[0].get_gauge().get_value(), 0.5);
        let labels: Vec<&str> = metrics[0].get_label().iter().map(|l| l.value()).collect();
        assert_eq!(labels, ["/api/orders", b.to_string().as_str()]);
    }
}
