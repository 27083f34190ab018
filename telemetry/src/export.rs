//! The exporter: finished spans go into a bounded queue; a thread of its own batches them
//! (`batch` spans or `flush_every`, whichever comes first) and POSTs each batch to the collector
//! as OTLP/HTTP protobuf over one kept-alive connection (HTTP/1.1, RFC 9112; TLS for `https`).
//!
//! A request never waits on any of it: a full queue drops the span, a failed export drops the
//! batch, and both are counted ([`Stats`]), never retried into a backlog.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::TraceConfig;
use crate::sampler::Sampler;
use crate::span::SpanData;

/// What became of the spans handed to the exporter.
#[derive(Default, Debug)]
pub struct Stats {
    pub exported: AtomicU64,
    /// The queue was full (the collector is slower than the spans come).
    pub dropped_queue_full: AtomicU64,
    /// The collector could not be reached or refused the batch.
    pub dropped_export_failed: AtomicU64,
    pub export_requests_failed: AtomicU64,
}

impl Stats {
    /// `trace_spans_total{outcome}` for a Prometheus registry (the program's prefix added).
    pub fn collector(self: &Arc<Self>) -> Box<dyn prometheus::core::Collector> {
        let counters = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "trace_spans_total",
                "Finished spans of sampled requests: exported, dropped_queue_full (the collector is slower than the spans come), dropped_export_failed (the collector could not be reached or refused)",
            ),
            &["outcome"],
        )
        .expect("metric");
        Box::new(StatsCollector {
            stats: self.clone(),
            counters,
            update: std::sync::Mutex::new(()),
        })
    }
}

/// Copies the exporter's atomics into counters as they are scraped.
struct StatsCollector {
    stats: Arc<Stats>,
    counters: prometheus::IntCounterVec,
    update: std::sync::Mutex<()>,
}

impl prometheus::core::Collector for StatsCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.counters.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let _one_at_a_time = self.update.lock().expect("stats");
        for (outcome, n) in [
            ("exported", &self.stats.exported),
            ("dropped_queue_full", &self.stats.dropped_queue_full),
            ("dropped_export_failed", &self.stats.dropped_export_failed),
        ] {
            let c = self.counters.with_label_values(&[outcome]);
            let now = n.load(Ordering::Relaxed);
            if now > c.get() {
                c.inc_by(now - c.get());
            }
        }
        self.counters.collect()
    }
}

#[derive(Clone)]
pub struct Exporter {
    tx: SyncSender<SpanData>,
    pub sampler: Sampler,
    pub stats: Arc<Stats>,
}

impl Exporter {
    /// Starts the export thread. `scope` names the instrumentation (the program).
    pub fn start(config: TraceConfig, scope: &'static str) -> Exporter {
        let (tx, rx) = sync_channel(config.queue);
        let stats = Arc::new(Stats::default());
        let sampler = config.sampler;
        let thread_stats = stats.clone();
        std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || run(config, scope, rx, thread_stats))
            .expect("spawn the span exporter");
        Exporter { tx, sampler, stats }
    }

    /// Hands a finished span over; never blocks.
    pub fn export(&self, span: SpanData) {
        match self.tx.try_send(span) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.stats.dropped_queue_full.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn run(config: TraceConfig, scope: &'static str, rx: Receiver<SpanData>, stats: Arc<Stats>) {
    let target = match Target::parse(&config.endpoint) {
        Ok(t) => t,
        Err(_) => return, // checked by TraceConfig::from_vars
    };
    let mut conn: Option<Conn> = None;
    let mut batch = Vec::with_capacity(config.batch);
    let mut failing_since: Option<Instant> = None;
    loop {
        let deadline = Instant::now() + config.flush_every;
        while batch.len() < config.batch {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(span) => batch.push(span),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    if !batch.is_empty() {
                        let _ = post(&target, &config, &mut conn, scope, &batch);
                    }
                    return;
                }
            }
        }
        if batch.is_empty() {
            continue;
        }
        match post(&target, &config, &mut conn, scope, &batch) {
            Ok(()) => {
                stats.exported.fetch_add(batch.len() as u64, Ordering::Relaxed);
                failing_since = None;
            }
            Err(e) => {
                conn = None;
                stats
                    .dropped_export_failed
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                stats.export_requests_failed.fetch_add(1, Ordering::Relaxed);
                // One line when exports start failing, not one per batch.
                if failing_since.is_none() {
                    eprintln!(
                        "{{\"level\":\"WARN\",\"message\":\"span export failing: spans are dropped until the collector answers\",\"endpoint\":\"{}\",\"error\":\"{}\"}}",
                        config.endpoint,
                        e.replace('"', "'")
                    );
                    failing_since = Some(Instant::now());
                }
            }
        }
        batch.clear();
    }
}

/// Where spans go: scheme, host, port, path.
pub struct Target {
    tls: bool,
    host: String,
    port: u16,
    path: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else {
            return Err("not an http:// or https:// URL".into());
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
                (h, p.parse::<u16>().map_err(|_| format!("bad port {p:?}"))?)
            }
            _ => (authority, if tls { 443 } else { 80 }),
        };
        if host.is_empty() {
            return Err("no host".into());
        }
        Ok(Target {
            tls,
            host: host.trim_start_matches('[').trim_end_matches(']').to_string(),
            port,
            path: path.to_string(),
        })
    }
}

enum Conn {
    Plain(BufReader<TcpStream>),
    Tls(Box<BufReader<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>>),
}

impl Conn {
    fn open(t: &Target, timeout: Duration) -> Result<Conn, String> {
        let addr = (t.host.as_str(), t.port)
            .to_socket_addrs()
            .map_err(|e| format!("resolve {}: {e}", t.host))?
            .next()
            .ok_or_else(|| format!("{} has no address", t.host))?;
        let tcp = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
        tcp.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
        tcp.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        if !t.tls {
            return Ok(Conn::Plain(BufReader::new(tcp)));
        }
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(t.host.clone()).map_err(|e| format!("server name: {e}"))?;
        let tls = rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
        Ok(Conn::Tls(Box::new(BufReader::new(rustls::StreamOwned::new(tls, tcp)))))
    }

    fn reader(&mut self) -> &mut dyn BufRead {
        match self {
            Conn::Plain(r) => r,
            Conn::Tls(r) => r.as_mut(),
        }
    }

    fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            Conn::Plain(r) => r.get_mut().write_all(b),
            Conn::Tls(r) => {
                let s = r.get_mut();
                s.write_all(b)?;
                s.flush()
            }
        }
    }
}

/// One POST; a kept-alive connection that turns out closed is opened again once.
fn post(t: &Target, c: &TraceConfig, conn: &mut Option<Conn>, scope: &str, batch: &[SpanData]) -> Result<(), String> {
    let body = crate::otlp::export_request(&c.resource, scope, batch);
    let mut head = format!(
        "POST {} HTTP/1.1\r\nHost: {}:{}\r\nContent-Type: application/x-protobuf\r\nContent-Length: {}\r\nUser-Agent: {scope}\r\n",
        t.path,
        t.host,
        t.port,
        body.len()
    );
    for (k, v) in &c.headers {
        if v.contains(['\r', '\n']) || k.contains(['\r', '\n', ':']) {
            continue;
        }
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    for attempt in 0..2 {
        let reused = conn.is_some();
        if conn.is_none() {
            *conn = Some(Conn::open(t, c.timeout)?);
        }
        let Some(open) = conn.as_mut() else { continue };
        let sent = open.write_all(head.as_bytes()).and_then(|_| open.write_all(&body));
        let answer = sent
            .map_err(|e| e.to_string())
            .and_then(|_| read_response(open.reader()));
        match answer {
            Ok((status, keep_alive)) => {
                if !keep_alive {
                    *conn = None;
                }
                // OTLP/HTTP: 2xx is success; the body (a partial-success message) is not read
                // further.
                return if (200..300).contains(&status) {
                    Ok(())
                } else {
                    Err(format!("the collector answered {status}"))
                };
            }
            Err(e) => {
                *conn = None;
                if !(reused && attempt == 0) {
                    return Err(e);
                }
            }
        }
    }
    Err("no answer".into())
}

/// The status and whether the connection stays open; the body (by Content-Length) is consumed.
fn read_response(r: &mut dyn BufRead) -> Result<(u16, bool), String> {
    let mut line = String::new();
    if r.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
        return Err("connection closed".into());
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {line:?}"))?;
    let mut length: Option<u64> = None;
    let mut keep_alive = line.starts_with("HTTP/1.1");
    loop {
        line.clear();
        if r.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            return Err("connection closed in the headers".into());
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let v = v.trim();
            if k.eq_ignore_ascii_case("content-length") {
                length = v.parse().ok();
            } else if k.eq_ignore_ascii_case("connection") {
                keep_alive = !v.eq_ignore_ascii_case("close");
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                // A chunked answer is not worth decoding: close after it.
                keep_alive = false;
            }
        }
    }
    match length {
        Some(n) => {
            std::io::copy(&mut r.take(n), &mut std::io::sink()).map_err(|e| e.to_string())?;
        }
        None => keep_alive = false,
    }
    Ok((status, keep_alive))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::{SpanId, TraceId};
    use crate::span::SpanKind;
    use std::net::TcpListener;

    fn span() -> SpanData {
        SpanData {
            trace_id: TraceId::random(),
            span_id: SpanId::random(),
            parent_span_id: None,
            name: "GET /".into(),
            kind: SpanKind::Server,
            start_unix_nanos: 1,
            end_unix_nanos: 2,
            attributes: vec![],
            links: vec![],
            error: None,
        }
    }

    fn config(endpoint: String, queue: usize) -> TraceConfig {
        let mut c = TraceConfig::from_vars("t", |k| {
            (k == "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").then(|| endpoint.clone())
        })
        .unwrap()
        .unwrap();
        c.queue = queue;
        c.flush_every = Duration::from_millis(20);
        c.timeout = Duration::from_millis(300);
        c
    }

    #[test]
    fn urls_split_into_scheme_host_port_and_path() {
        let t = Target::parse("http://collector.monitoring:4318/v1/traces").unwrap();
        assert_eq!(
            (t.tls, t.host.as_str(), t.port, t.path.as_str()),
            (false, "collector.monitoring", 4318, "/v1/traces")
        );
        let t = Target::parse("https://api.example.com/v1/traces").unwrap();
        assert_eq!((t.tls, t.port), (true, 443));
        let t = Target::parse("http://[::1]:4318/v1/traces").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 4318));
        assert!(Target::parse("collector:4318").is_err());
        assert!(Target::parse("http://:4318/").is_err());
    }

    #[test]
    fn batches_go_out_on_one_kept_alive_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
        let exporter = Exporter::start(config(url, 100), "test");
        for _ in 0..3 {
            exporter.export(span());
        }
        let (stream, _) = listener.accept().unwrap();
        let mut r = BufReader::new(stream.try_clone().unwrap());
        let mut w = stream;
        let mut bodies = 0;
        while bodies < 2 {
            let mut length = 0usize;
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert_eq!(line, "POST /v1/traces HTTP/1.1\r\n");
            loop {
                line.clear();
                r.read_line(&mut line).unwrap();
                if line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; length];
            r.read_exact(&mut body).unwrap();
            w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").unwrap();
            bodies += 1;
            if bodies == 1 {
                exporter.export(span());
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while exporter.stats.exported.load(Ordering::Relaxed) < 4 {
            assert!(Instant::now() < deadline, "{:?}", exporter.stats);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_dead_collector_and_a_full_queue_drop_and_count_without_blocking() {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let exporter = Exporter::start(config(format!("http://127.0.0.1:{port}/v1/traces"), 8), "test");
        let started = Instant::now();
        for _ in 0..10_000 {
            exporter.export(span());
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "export blocked: {:?}",
            started.elapsed()
        );
        // Every span is accounted for: dropped at the queue, or dropped with its failed batch.
        let dropped = || {
            exporter.stats.dropped_queue_full.load(Ordering::Relaxed)
                + exporter.stats.dropped_export_failed.load(Ordering::Relaxed)
        };
        assert!(exporter.stats.dropped_queue_full.load(Ordering::Relaxed) > 0);
        let deadline = Instant::now() + Duration::from_secs(5);
        while dropped() < 10_000 {
            assert!(Instant::now() < deadline, "{:?}", exporter.stats);
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(exporter.stats.exported.load(Ordering::Relaxed), 0);
    }
}
