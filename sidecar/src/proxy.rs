//! The proxy: one `ProxyHttp` whose hooks read in request order. Limits and size checks first, then
//! the cache, then the upstream, then response headers (cache status, limits, compression), then
//! metrics and the access log. Each concern's decisions live in its own module.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use pingora_cache::{CacheKey, CacheMeta, CacheOptionOverrides, CachePhase, RespCacheable};
use pingora_core::modules::http::compression::{ResponseCompression, ResponseCompressionBuilder};
use pingora_core::modules::http::HttpModules;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, OrErr, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, PurgeStatus, Session};

use crate::cache::store::Coding;
use crate::limits::Decision;
use crate::state::{Live, Shared};
use crate::trace::RequestTrace;
use crate::upstreams::Lease;
use crate::waiting_room::Admission;

/// Hop-by-hop headers (RFC 9110 7.6.1) never forwarded in either direction. The first
/// `HOP_BY_HOP_IN_RESPONSES` are the ones an upstream response may carry that pingora does not
/// frame with (it frames with `Transfer-Encoding`; `TE` and `Proxy-Authorization` are requests').
const HOP_BY_HOP: [HeaderName; 8] = [
    http::header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::TRAILER,
    http::header::UPGRADE,
    http::header::TE,
    http::header::TRANSFER_ENCODING,
    http::header::PROXY_AUTHORIZATION,
];
const HOP_BY_HOP_IN_RESPONSES: usize = 5;

const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Read-after-write between the sidecar and the mall app: a write's answer carries the app's
/// latest invalidation record (`Mall-Seq`), and reads ask for it (`Mall-Min-Seq`).
const WRITE_SEQ: &str = "mall-seq";
const MIN_SEQ: &str = "mall-min-seq";

/// Whether `headers` holds any of `names`: one pass over the (few) headers present instead of a
/// lookup per name (each `remove_header` by name hashes it even when it is absent).
fn holds_any(headers: &http::HeaderMap, names: &[HeaderName]) -> bool {
    headers.keys().any(|name| names.contains(name))
}

/// How long a refused request's unread body is drained before the connection closes.
const LINGER: Duration = Duration::from_secs(2);

pub struct MallProxy {
    pub shared: Arc<Shared>,
}

/// Per-request state.
pub struct Ctx {
    live: Arc<Live>,
    started: Instant,
    _in_flight: InFlight,
    request_id: String,
    route: Arc<str>,
    client_ip: Option<IpAddr>,
    cacheable: bool,
    purge: bool,
    limit: Option<Decision>,
    lease: Option<Lease>,
    tried: Vec<SocketAddr>,
    upstream_sent: Option<Instant>,
    /// The current attempt is counted in `upstream_requests_total` (answered, or failed).
    attempt_counted: bool,
    request_body_bytes: u64,
    cache_result: &'static str,
    /// The cache key, computed once by the fresh-hit fast path and handed to pingora-cache.
    key: Option<CacheKey>,
    /// A fresh hit served in a kept compressed copy: the coding and the bytes it saved.
    precompressed: Option<(Coding, u64)>,
    /// The coding a fresh hit gets (br among them), chosen with the streamed one.
    hit_coding: Option<Coding>,
    /// The upstream connection's socket while this request uses it.
    upstream_fd: Option<std::os::unix::io::RawFd>,
    /// The request's trace (`trace.rs`): `None` with tracing off and no `traceparent`.
    trace: Option<RequestTrace>,
}

/// Counts a client request from its first hook to its context being dropped.
struct InFlight(Arc<Shared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.in_flight.dec();
    }
}

impl MallProxy {
    fn is_idempotent(session: &Session) -> bool {
        session.req_header().method.is_idempotent()
    }

    /// Whether sending the request again cannot do anything twice: an idempotent method, or an
    /// `Idempotency-Key` (the app answers a repeat with the first result).
    fn is_replayable(session: &Session) -> bool {
        Self::is_idempotent(session) || session.req_header().headers.contains_key("idempotency-key")
    }

    /// Writes a small JSON response of our own (never compressed, so no Vary games).
    async fn reply(
        session: &mut Session,
        status: u16,
        code: &str,
        message: &str,
        extra: &[(&str, String)],
    ) -> Result<()> {
        let body = serde_json::json!({ "error": { "code": code, "message": message } }).to_string();
        Self::reply_body(session, status, "application/json", body, extra).await
    }

    /// An RFC 9457 problem document (`application/problem+json`); the `error` member keeps the
    /// shape of the sidecar's other errors for clients that read that.
    async fn reply_problem(
        session: &mut Session,
        status: u16,
        code: &str,
        title: &str,
        detail: &str,
        extra: &[(&str, String)],
    ) -> Result<()> {
        let body = serde_json::json!({
            "type": format!("https://mall.example.com/problems/{code}"),
            "title": title,
            "status": status,
            "detail": detail,
            "error": { "code": code, "message": detail },
        })
        .to_string();
        Self::reply_body(session, status, "application/problem+json", body, extra).await
    }

    async fn reply_body(
        session: &mut Session,
        status: u16,
        content_type: &str,
        body: String,
        extra: &[(&str, String)],
    ) -> Result<()> {
        set_compression(session, 0);
        let mut resp = ResponseHeader::build(status, Some(4))?;
        resp.insert_header("content-type", content_type)?;
        resp.insert_header("content-length", body.len().to_string())?;
        resp.insert_header("cache-control", "no-store")?;
        for (name, value) in extra {
            resp.insert_header(name.to_string(), value.as_str())?;
        }
        session.write_response_header(Box::new(resp), false).await?;
        session.write_response_body(Some(Bytes::from(body)), true).await
    }

    /// The fresh-hit fast path: a GET whose entry is fresh is answered here, from the store, in
    /// the identity bytes or a compressed copy kept with the entry, with the headers pingora's
    /// cache path and `response_filter` would give it (RFC 9111 4.2.3 `Age`, `X-Cache`, RFC 9211
    /// `Cache-Status`, the request id, rate-limit fields, `Vary: Accept-Encoding`). Everything
    /// else (misses, the cache lock, stale and revalidated entries, HEAD, conditional and range
    /// requests, entries that vary on request headers) goes on to pingora-cache. pingora's hit
    /// path costs a cache state machine, a metadata rebuild and a streamed compression per hit;
    /// this costs a table lookup and a header clone. Returns whether the request was answered.
    async fn serve_fresh_hit(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let req = session.req_header();
        if req.method != http::Method::GET
            || [
                http::header::RANGE,
                http::header::IF_NONE_MATCH,
                http::header::IF_MODIFIED_SINCE,
                http::header::IF_MATCH,
                http::header::IF_UNMODIFIED_SINCE,
                http::header::IF_RANGE,
            ]
            .iter()
            .any(|name| req.headers.contains_key(name))
        {
            return Ok(false);
        }
        let key = ctx.live.cache.key(req);
        let now = std::time::SystemTime::now();
        let Some(hit) = self.shared.store.fresh_hit(&key, now) else {
            ctx.key = Some(key);
            return Ok(false);
        };
        let z = &ctx.live.config.compression;
        let qualifies = compression_qualifies(z, hit.header());
        let coding = ctx.hit_coding.filter(|_| qualifies);
        // The client-ready header kept with the entry (or its coded copy), plus the per-response
        // fields set on its map directly: pingora's `insert_header` re-parses each name and keeps
        // a case map beside it, a fifth of the hit path's CPU. Without a case map, pingora writes
        // standard names title-cased and the others in lower case (RFC 9110 5.1: names are
        // case-insensitive).
        let (mut parts, body) = match coding {
            None => ((**hit.header()).clone(), hit.body().clone()),
            Some(coding) => {
                let Some((variant, made)) = hit.variant(coding, z.level) else {
                    // Encoding failed: pingora's path compresses as it streams.
                    ctx.key = Some(key);
                    return Ok(false);
                };
                if made {
                    self.shared
                        .metrics
                        .compressed_copies
                        .with_label_values(&[coding.as_str()])
                        .inc();
                }
                let saved = hit.body().len().saturating_sub(variant.body.len());
                ctx.precompressed = Some((coding, saved as u64));
                ((*variant.header).clone(), variant.body.clone())
            }
        };
        ctx.cache_result = "HIT";
        parts.headers.insert(http::header::AGE, HeaderValue::from(hit.age(now)));
        self.annotations(ctx, Some(hit_status(hit.ttl(now) as i64)), |name, value| {
            parts.headers.insert(name, value);
            Ok(())
        })?;
        if qualifies {
            if let Some(vary) = with_accept_encoding(parts.headers.get(http::header::VARY)) {
                parts.headers.insert(http::header::VARY, vary);
            }
        }
        let header = ResponseHeader::from(parts);
        // The bytes are final: pingora's compression module must leave them alone.
        set_compression(session, 0);
        session.write_response_header(Box::new(header), false).await?;
        session.write_response_body(Some(body), true).await?;
        Ok(true)
    }

    /// The fields every proxied answer carries: what the cache did (`X-Cache`, RFC 9211
    /// `Cache-Status`), the request id, this key's rate limit, and `Connection: close` while
    /// draining. Each is handed to `put`, so the fast path can set them on its header map directly.
    fn annotations(
        &self,
        ctx: &Ctx,
        status: Option<HeaderValue>,
        mut put: impl FnMut(HeaderName, HeaderValue) -> Result<()>,
    ) -> Result<()> {
        let value = |text: String| HeaderValue::try_from(text).or_err(ErrorType::InvalidHTTPHeader, "a response field");
        put(X_CACHE, HeaderValue::from_static(ctx.cache_result))?;
        if let Some(status) = status {
            put(CACHE_STATUS, status)?;
        }
        put(
            X_REQUEST_ID,
            HeaderValue::from_str(&ctx.request_id).or_err(ErrorType::InvalidHTTPHeader, "the request id")?,
        )?;
        if let Some(limit) = &ctx.limit {
            // draft-ietf-httpapi-ratelimit-headers: the policy, and this key's remaining quota
            // and seconds until it is whole again.
            put(
                HeaderName::from_static("ratelimit-policy"),
                value(limit.policy.to_string())?,
            )?;
            put(
                HeaderName::from_static("ratelimit"),
                value(format!(
                    "\"{}\";r={};t={}",
                    limit.rule, limit.remaining, limit.reset_secs
                ))?,
            )?;
            if ctx.live.config.rate_limit.legacy_headers {
                put(HeaderName::from_static("ratelimit-limit"), limit.limit.into())?;
                put(HeaderName::from_static("ratelimit-remaining"), limit.remaining.into())?;
                put(HeaderName::from_static("ratelimit-reset"), limit.reset_secs.into())?;
            }
        }
        if self.shared.draining.load(Ordering::Relaxed) {
            put(http::header::CONNECTION, HeaderValue::from_static("close"))?;
        }
        Ok(())
    }

    fn label_route(live: &Live, path: &str) -> Arc<str> {
        live.routes
            .iter()
            .filter(|p| path.starts_with(&***p))
            .max_by_key(|p| p.len())
            .unwrap_or(&live.other_route)
            .clone()
    }
}

#[async_trait]
impl ProxyHttp for MallProxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        self.shared.in_flight.fetch_add(1, Ordering::AcqRel);
        self.shared.metrics.in_flight.inc();
        let live = self.shared.live.load_full();
        Ctx {
            route: live.other_route.clone(),
            live,
            started: Instant::now(),
            _in_flight: InFlight(self.shared.clone()),
            request_id: String::new(),
            client_ip: None,
            cacheable: false,
            purge: false,
            limit: None,
            lease: None,
            tried: Vec::new(),
            attempt_counted: false,
            upstream_sent: None,
            request_body_bytes: 0,
            cache_result: "BYPASS",
            key: None,
            precompressed: None,
            hit_coding: None,
            upstream_fd: None,
            trace: None,
        }
    }

    async fn early_request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
        // RFC 9112 9.3.2: a client may pipeline; answer each request in order on the connection
        // (pingora's default drops the pipelined ones after answering the first with keep-alive).
        // A client may also half-close once it has sent its requests (`printf ... | nc -N`):
        // its FIN means it sends nothing more, not that it stopped reading (RFC 9112 9.6), so
        // the request in hand is answered (with `Connection: close`, which tells it to send any
        // later pipelined ones again) instead of aborted and retried on another instance.
        if let pingora_core::protocols::http::ServerSession::H1(h1) = &mut *session.downstream_session {
            h1.set_pipelining_enabled(true);
            h1.set_abort_on_close(false);
        }
        // Before pingora's compression module reads Accept-Encoding: leave it only the coding
        // the q-values choose among the streamed ones (RFC 9110 12.5.3), or `identity`; a fresh
        // hit may get br as well, remembered here.
        use crate::negotiate::{Accepted, FRESH_HITS, STREAMED};
        let Some(value) = session.req_header().headers.get(http::header::ACCEPT_ENCODING) else {
            return Ok(());
        };
        // The commonest header needs no parsing: it already names only the coding chosen.
        if value.as_bytes() == b"gzip" {
            ctx.hit_coding = Some(Coding::Gzip);
            return Ok(());
        }
        let accepted = value.to_str().ok().map(Accepted::parse);
        let for_hits = accepted.as_ref().and_then(|a| a.best(&FRESH_HITS));
        let streamed = match (&accepted, for_hits) {
            (Some(accepted), Some("br")) => accepted.best(&STREAMED),
            _ => for_hits,
        };
        ctx.hit_coding = for_hits.and_then(|c| Coding::from_token(c.as_bytes()));
        if value.as_bytes() != streamed.unwrap_or("identity").as_bytes() {
            session
                .req_header_mut()
                .insert_header(http::header::ACCEPT_ENCODING, streamed.unwrap_or("identity"))?;
        }
        Ok(())
    }

    fn init_downstream_modules(&self, modules: &mut HttpModules) {
        // Enabled with the configured level; each response then decides (min size, type).
        let level = self.shared.live.load().config.compression.level;
        modules.add_module(ResponseCompressionBuilder::enable(level));
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let live = ctx.live.clone();
        let server = &live.config.server;
        if self.shared.draining.load(Ordering::Relaxed) {
            session.set_keepalive(None);
        } else {
            session.set_keepalive(Some(server.keepalive_timeout_seconds));
        }
        let req = session.req_header();
        // Both framings at once is how requests are smuggled past a proxy: RFC 9112 6.1 lets a
        // server refuse it, and says the connection MUST be closed after responding.
        // (pingora drops the Content-Length of such a request while parsing, so the raw header
        // block is what still shows it.)
        if req.headers.contains_key(http::header::TRANSFER_ENCODING) && declared_both_framings(session) {
            session.set_keepalive(None);
            Self::reply(
                session,
                400,
                "bad_request",
                "a request must not carry both Content-Length and Transfer-Encoding (RFC 9112 section 6.1)",
                &[("connection", "close".to_string())],
            )
            .await?;
            return Ok(true);
        }
        // Route labels and limits match the normalised path: `//api/./orders` must not dodge the
        // `/api/orders` rule.
        let path = crate::cache::normalise_path(req.uri.path());
        ctx.route = Self::label_route(&live, &path);
        ctx.request_id = req
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128)
            .map(str::to_string)
            .unwrap_or_else(crate::state::new_request_id);
        ctx.trace = RequestTrace::start(
            self.shared.tracer.as_ref(),
            req.headers.get("traceparent").and_then(|v| v.to_str().ok()),
            ctx.started,
        );
        let peer = session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip());
        let forwarded_for = req.headers.get("x-forwarded-for").and_then(|v| v.to_str().ok());
        ctx.client_ip = live.limiter.client_ip(peer, forwarded_for);

        // Sizes: the header block, then the declared body (a chunked body is counted as it comes).
        let header_bytes: usize = req.uri.path_and_query().map_or(0, |p| p.as_str().len())
            + req
                .headers
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len() + 4)
                .sum::<usize>();
        if header_bytes > server.max_request_header_bytes {
            session.set_keepalive(None);
            Self::reply(
                session,
                431,
                "headers_too_large",
                "request headers exceed server.max_request_header_bytes",
                &[],
            )
            .await?;
            return Ok(true);
        }
        let declared = req
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|len| len > server.max_request_body_bytes) {
            session.set_keepalive(None);
            Self::reply(
                session,
                413,
                "body_too_large",
                "request body exceeds server.max_request_body_bytes",
                &[],
            )
            .await?;
            // RFC 9112 9.6: closing with the body unread makes the kernel reset the connection,
            // and the client can lose the 413 before it reads it (seen as a broken pipe while
            // it still sends). Read and discard what arrives for a moment first, as nginx's
            // lingering close does; the timeout bounds what a slow client can cost.
            let _ = tokio::time::timeout(LINGER, session.drain_request_body()).await;
            return Ok(true);
        }

        if req.method.as_str() == "PURGE" {
            let authorization = req
                .headers
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            if !live.cache.purge_allowed(peer, authorization) {
                self.shared.metrics.cache_purges.with_label_values(&["refused"]).inc();
                Self::reply(
                    session,
                    403,
                    "purge_forbidden",
                    "PURGE needs an allowed source address or a purge token",
                    &[],
                )
                .await?;
                return Ok(true);
            }
            // `PURGE` with `Surrogate-Key: <tags>` purges every entry carrying one of the tags,
            // whatever its URL; without the header it purges the request's URL.
            let tags: Vec<String> = req
                .headers
                .get_all(crate::cache::store::TAG_HEADER)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(str::split_whitespace)
                .map(str::to_string)
                .collect();
            if !tags.is_empty() {
                let purged = self.shared.invalidate("purge_tag", tags.iter().map(String::as_str));
                let body = serde_json::json!({ "purged": purged, "tags": tags }).to_string();
                Self::reply_body(session, 200, "application/json", body, &[]).await?;
                return Ok(true);
            }
            ctx.purge = true;
            return Ok(false);
        }

        // The waiting room stands in front of its route: it admits, hands out a ticket, or
        // refuses a bad one. What it admits is budgeted already, so the rate limit skips it.
        let mut room_admitted = false;
        if let Some(room) = live
            .waiting_room
            .as_ref()
            .filter(|r| r.applies(req.method.as_str(), &path))
        {
            let header = |name: &str| req.headers.get(name).and_then(|v| v.to_str().ok());
            let cookies = req
                .headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok().map(str::to_string));
            let ticket = crate::waiting_room::presented_ticket(header(crate::waiting_room::TICKET_HEADER), cookies);
            let binding = header(room.bind_header()).unwrap_or("").to_string();
            let admission = room
                .admit_queued(ticket.as_deref(), &binding, ctx.client_ip, received_ago(session))
                .await;
            let hold = room.hold(&admission);
            if !hold.is_zero() {
                tokio::time::sleep(hold).await;
            }
            match admission {
                Admission::Admit { .. } => {
                    room_admitted = true;
                    ctx.note_room("admitted");
                }
                Admission::Wait(t) => {
                    ctx.note_room("waiting");
                    let retry_after = t.wait_ms.div_ceil(1000).max(1);
                    let body = serde_json::json!({
                        "status": "waiting",
                        "ticket": t.token,
                        "position": t.position,
                        "wait_ms": t.wait_ms,
                        "turn_at_ms": t.turn_at_ms,
                        "retry_after": retry_after,
                        "expires_at_ms": t.expires_ms,
                    })
                    .to_string();
                    let max_age = t.expires_ms.saturating_sub(now_unix_ms()).div_ceil(1000);
                    let headers = [
                        ("retry-after", retry_after.to_string()),
                        (crate::waiting_room::TICKET_HEADER, t.token.clone()),
                        ("waiting-room-position", t.position.to_string()),
                        ("waiting-room-wait-ms", t.wait_ms.to_string()),
                        ("waiting-room-turn-at-ms", t.turn_at_ms.to_string()),
                        (
                            "set-cookie",
                            format!(
                                "{}={}; Path={path}; Max-Age={max_age}; HttpOnly; SameSite=Strict",
                                crate::waiting_room::TICKET_COOKIE,
                                t.token
                            ),
                        ),
                        ("x-request-id", ctx.request_id.clone()),
                    ];
                    Self::reply_body(session, 202, "application/json", body, &headers).await?;
                    return Ok(true);
                }
                Admission::Refuse {
                    status,
                    code,
                    detail,
                    retry_after_secs,
                } => {
                    ctx.note_room(code);
                    let mut headers = vec![("x-request-id", ctx.request_id.clone())];
                    if retry_after_secs > 0 {
                        // RFC 9110 10.2.3: when a new place may be asked for again.
                        headers.push(("retry-after", retry_after_secs.to_string()));
                    }
                    if status == 401 {
                        // RFC 9110 11.6.1 and RFC 6750 section 3: the scheme the route expects.
                        headers.push(("www-authenticate", "Bearer".to_string()));
                    }
                    Self::reply_problem(session, status, code, "Waiting-room ticket refused", &detail, &headers)
                        .await?;
                    return Ok(true);
                }
            }
        }

        // The limit key (a header or the client address) is only built when limits are on.
        let decision = if live.limiter.enabled() && !room_admitted {
            let key = match live.limiter.key_header() {
                Some(header) => req
                    .headers
                    .get(header)
                    .and_then(|v| v.to_str().ok())
                    .map(|v| format!("h:{v}")),
                None => None,
            }
            .or_else(|| ctx.client_ip.map(|ip| format!("ip:{ip}")))
            .unwrap_or_else(|| "unknown".into());
            let method = req.method.as_str().to_string();
            live.limiter.check(&method, &path, &key).await
        } else {
            None
        };
        if let Some(decision) = decision {
            if !decision.allowed {
                let retry = decision.retry_after_secs.to_string();
                let mut headers = vec![
                    ("retry-after", retry.clone()),
                    ("ratelimit-policy", decision.policy.to_string()),
                    ("ratelimit", format!("\"{}\";r=0;t={retry}", decision.rule)),
                    ("x-request-id", ctx.request_id.clone()),
                ];
                if live.config.rate_limit.legacy_headers {
                    headers.push(("ratelimit-limit", decision.limit.to_string()));
                    headers.push(("ratelimit-remaining", "0".to_string()));
                    headers.push(("ratelimit-reset", retry));
                }
                let message = format!(
                    "rate limit `{}` exceeded; retry after {} s",
                    decision.rule, decision.retry_after_secs
                );
                if let Some(t) = ctx.trace.as_mut() {
                    t.limit = Some("refused");
                }
                Self::reply_problem(session, 429, "rate_limited", "Too Many Requests", &message, &headers).await?;
                return Ok(true);
            }
            if let Some(t) = ctx.trace.as_mut() {
                t.limit = Some("allowed");
            }
            ctx.limit = Some(decision);
        }
        ctx.cacheable = ctx.live.cache.request_cacheable(session.req_header());
        if ctx.cacheable {
            return self.serve_fresh_hit(session, ctx).await;
        }
        Ok(false)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // The request's header is written by now (for a request without a body this is the first
        // call): from here on, what the upstream sends is acknowledged as it is read.
        if end {
            ack_now(ctx.upstream_fd);
        }
        if let Some(chunk) = body {
            ctx.request_body_bytes += chunk.len() as u64;
            if ctx.request_body_bytes > ctx.live.config.server.max_request_body_bytes {
                return Error::e_explain(
                    ErrorType::HTTPStatus(413),
                    "request body exceeds server.max_request_body_bytes",
                );
            }
        }
        Ok(())
    }

    fn request_cache_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
        let policy = &ctx.live.cache;
        if ctx.cacheable || ctx.purge {
            let mut overrides = CacheOptionOverrides::default();
            overrides.wait_timeout = Some(policy.lock_timeout);
            session.cache.enable(
                self.shared.store,
                None,
                Some(self.shared.predictor),
                Some(self.shared.cache_lock),
                Some(overrides),
            );
            session.cache.set_max_file_size_bytes(policy.max_object_bytes);
        }
        Ok(())
    }

    fn cache_key_callback(&self, session: &Session, ctx: &mut Ctx) -> Result<CacheKey> {
        Ok(ctx
            .key
            .take()
            .unwrap_or_else(|| ctx.live.cache.key(session.req_header())))
    }

    fn is_purge(&self, _session: &Session, ctx: &Ctx) -> bool {
        ctx.purge
    }

    fn purge_response_filter(
        &self,
        _session: &Session,
        ctx: &mut Ctx,
        status: PurgeStatus,
        _response: &mut std::borrow::Cow<'static, ResponseHeader>,
    ) -> Result<()> {
        let outcome = match status {
            PurgeStatus::Found => "purged",
            PurgeStatus::NotFound => "not_found",
            _ => "error",
        };
        self.shared.metrics.cache_purges.with_label_values(&[outcome]).inc();
        ctx.cache_result = "PURGE";
        Ok(())
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let upstream = &ctx.live.config.upstream;
        // Consistent hashing uses the cache key so a product always lands on the instance whose
        // in-process cache already holds it.
        let key = match upstream.balance {
            mall_sidecar_config::Balance::ConsistentHash => Some(ctx.live.cache.key(session.req_header())),
            _ => None,
        };
        let lease = self
            .shared
            .pool
            .select(key.as_ref().map_or(&[][..], |k| k.primary_key()), &ctx.tried);
        let Some(lease) = lease else {
            self.shared.metrics.no_healthy_upstream.inc();
            return Error::e_explain(ErrorType::HTTPStatus(503), "no healthy upstream instance");
        };
        let addr = lease.instance.addr;
        if !ctx.tried.is_empty() {
            self.shared.metrics.upstream_retries.inc();
        }
        ctx.tried.push(addr);
        ctx.lease = Some(lease);
        ctx.attempt_counted = false;
        // The app in this pod is reached through its Unix socket when one is configured: no TCP
        // stack, no loopback handshake or ACKs (docs/sidecar.md, BENCHMARKS.md).
        let mut peer = match &ctx.live.local {
            Some((local, socket)) if local.matches(addr) => HttpPeer::new_uds(socket, false, String::new())?,
            _ => HttpPeer::new(addr, false, String::new()),
        };
        if let (Some(t), Some(lease)) = (ctx.trace.as_mut(), &ctx.lease) {
            let transport = if peer._address.as_inet().is_some() {
                "tcp"
            } else {
                "unix"
            };
            t.attempt(lease.instance.label(), transport);
        }
        peer.options.connection_timeout = Some(Duration::from_millis(upstream.connect_timeout_ms));
        peer.options.read_timeout = Some(Duration::from_millis(upstream.read_timeout_ms));
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        Ok(Box::new(peer))
    }

    fn fail_to_connect(&self, session: &mut Session, _peer: &HttpPeer, ctx: &mut Ctx, mut e: Box<Error>) -> Box<Error> {
        if let Some(lease) = &ctx.lease {
            self.shared.pool.report_connect_failure(lease.instance.addr);
            self.shared.metrics.upstream_failed(lease.group);
            ctx.attempt_counted = true;
        }
        // Nothing reached the app, so any method could be retried; we keep to replayable ones so
        // a half-open connection never duplicates an order.
        let retries_left = ctx.tried.len() <= ctx.live.config.upstream.retries;
        if Self::is_replayable(session) && retries_left {
            e.set_retry(true);
        }
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        // The instance gave this attempt no answer (a timeout, a connection closed before the
        // response header): an error of its group. Not a pooled connection found closed: that
        // is keep-alive churn (a replayable request is sent again), nothing about the instance.
        let stale_pooled = client_reused
            && matches!(
                e.etype(),
                ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
            );
        if e.esource() == &ErrorSource::Upstream && !stale_pooled && !ctx.attempt_counted {
            if let Some(lease) = &ctx.lease {
                self.shared.metrics.upstream_failed(lease.group);
                ctx.attempt_counted = true;
            }
        }
        // The client went away: neither the instance's fault nor a reason to ask another one.
        if e.esource() == &ErrorSource::Downstream {
            e.set_retry(false);
            return e;
        }
        if !Self::is_replayable(session) || session.as_ref().retry_buffer_truncated() {
            e.set_retry(false);
            return e;
        }
        // The app closed the connection before any response reached the client (an instance
        // restarting, a pooled connection it had already closed): send the request again, on
        // another instance, instead of answering 502.
        let closed_early = session.response_written().is_none()
            && matches!(
                e.etype(),
                ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectError
            );
        let retries_left = ctx.tried.len() <= ctx.live.config.upstream.retries;
        if closed_early && retries_left {
            // A fresh connection closed at once means the instance is going away; a pooled one
            // is ordinary keep-alive churn and says nothing about the instance.
            if !client_reused {
                if let Some(lease) = &ctx.lease {
                    self.shared.pool.report_connect_failure(lease.instance.addr);
                }
            }
            e.set_retry(true);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        e
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        peer: &HttpPeer,
        #[cfg(unix)] fd: std::os::unix::io::RawFd,
        #[cfg(windows)] _sock: std::os::windows::io::RawSocket,
        _digest: Option<&pingora_core::protocols::Digest>,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(lease) = &ctx.lease {
            self.shared.pool.report_connected(lease.instance.addr);
        }
        ctx.upstream_sent = Some(Instant::now());
        if let Some(a) = ctx.trace.as_mut().and_then(|t| t.attempts.last_mut()) {
            a.reused = reused;
        }
        // Delayed ACKs are TCP's: a Unix socket has none to avoid.
        let tcp = peer._address.as_inet().is_some();
        ctx.upstream_fd = tcp.then_some(fd);
        if !reused {
            self.shared
                .metrics
                .upstream_connections
                .with_label_values(&[if tcp { "tcp" } else { "unix" }])
                .inc();
        }
        Ok(())
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if holds_any(&upstream.headers, &HOP_BY_HOP) {
            for name in &HOP_BY_HOP {
                upstream.remove_header(name);
            }
        }
        // The sidecar owns compression: the app sends identity bytes, one cached object serves all.
        upstream.remove_header("accept-encoding");
        if ctx.cacheable {
            ctx.live.cache.normalise_request(upstream);
            ctx.live.cache.strip_unkeyed_headers(upstream);
        }
        let peer = session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip());
        let peer_trusted = peer.is_some_and(|ip| {
            ctx.live
                .config
                .rate_limit
                .trusted_proxies
                .iter()
                .any(|c| c.contains(ip))
        });
        let prior = upstream
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let forwarded = match (peer, prior) {
            (Some(ip), Some(prior)) if peer_trusted => format!("{prior}, {ip}"),
            (Some(ip), _) => ip.to_string(),
            (None, prior) => prior.unwrap_or_default(),
        };
        if !forwarded.is_empty() {
            upstream.insert_header("x-forwarded-for", forwarded)?;
        }
        let proto = upstream
            .headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let proto = match proto {
            Some(p) if peer_trusted && (p == "https" || p == "http") => p,
            _ => "http".to_string(),
        };
        upstream.insert_header("x-forwarded-proto", proto)?;
        upstream.insert_header("x-request-id", ctx.request_id.as_str())?;
        // W3C Trace Context: the app continues the trace under this attempt's span. With tracing
        // off, the caller's `traceparent` goes on untouched.
        if let (Some(t), Some(_)) = (&ctx.trace, &self.shared.tracer) {
            upstream.insert_header("traceparent", t.upstream_header())?;
        }
        // Read-after-write (the app's `api/causal.rs`): the instance answering a read first
        // applies the last write this sidecar proxied. A client's own value is never passed on:
        // it could make the app wait for a write that does not exist.
        upstream.remove_header(MIN_SEQ);
        if session.req_header().method.is_safe() {
            let seq = self.shared.write_seq.load(std::sync::atomic::Ordering::Acquire);
            if seq > 0 {
                upstream.insert_header(MIN_SEQ, seq.to_string())?;
            }
        }
        Ok(())
    }

    fn response_cache_filter(&self, session: &Session, resp: &ResponseHeader, ctx: &mut Ctx) -> Result<RespCacheable> {
        Ok(ctx.live.cache.response_cacheable(session.req_header().uri.path(), resp))
    }

    fn cache_vary_filter(
        &self,
        meta: &CacheMeta,
        ctx: &mut Ctx,
        req: &RequestHeader,
    ) -> Option<pingora_cache::key::HashBinary> {
        ctx.live.cache.variance(meta, req)
    }

    fn should_serve_stale(&self, _session: &mut Session, _ctx: &mut Ctx, error: Option<&Error>) -> bool {
        match error {
            // stale-while-revalidate: pingora has already checked the entry's window.
            None => true,
            // stale-if-error: the upstream failed or answered 5xx.
            Some(e) => {
                matches!(e.etype(), ErrorType::HTTPStatus(code) if *code >= 500)
                    || e.esource() == &ErrorSource::Upstream
            }
        }
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // Before the response is stored: tag it with its path too, so a write to that URI
        // (RFC 9111 4.4) finds it, whatever the query or variant it was cached under.
        if ctx.cacheable {
            let path_tag = path_tag(session.req_header().uri.path());
            let tags = match resp
                .headers
                .get(crate::cache::store::TAG_HEADER)
                .and_then(|v| v.to_str().ok())
            {
                Some(app_tags) => format!("{app_tags} {path_tag}"),
                None => path_tag,
            };
            resp.insert_header(crate::cache::store::TAG_HEADER, tags)?;
        }
        // Once per attempt, at its final header (a 1xx comes before it).
        if !resp.status.is_informational() && !ctx.attempt_counted {
            if let Some(lease) = &ctx.lease {
                if let Some(sent) = ctx.upstream_sent {
                    lease
                        .instance
                        .latency(&self.shared.metrics.upstream_latency, lease.group)
                        .observe(sent.elapsed().as_secs_f64());
                }
                self.shared.metrics.upstream_answered(lease.group, resp.status.as_u16());
                ctx.attempt_counted = true;
            }
        }
        let hop_by_hop = &HOP_BY_HOP[..HOP_BY_HOP_IN_RESPONSES];
        if holds_any(&resp.headers, hop_by_hop) {
            for name in hop_by_hop {
                resp.remove_header(name);
            }
        }
        // RFC 9110 6.2: an intermediary sends its own HTTP version. An HTTP/1.0 status line
        // forwarded as it came, beside `Connection: keep-alive`, tells an HTTP/1.1 client the
        // connection may close after it (RFC 9112 9.3), so a pipelining client waits or resends.
        resp.set_version(http::Version::HTTP_11);
        // A body written after `request_body_filter`'s last call may have put the connection back
        // in interactive mode; a request without one needs no second syscall.
        if ctx.request_body_bytes > 0 {
            ack_now(ctx.upstream_fd);
        }
        Ok(())
    }

    async fn response_filter(&self, session: &mut Session, resp: &mut ResponseHeader, ctx: &mut Ctx) -> Result<()> {
        if ctx.cache_result != "PURGE" {
            ctx.cache_result = match session.cache.phase() {
                CachePhase::Hit | CachePhase::Revalidated => "HIT",
                CachePhase::Stale | CachePhase::StaleUpdating => "STALE",
                CachePhase::Miss | CachePhase::Expired | CachePhase::RevalidatedNoCache(_) => "MISS",
                _ => "BYPASS",
            };
        }
        // Tags are between the app and the cache; clients never see them.
        let app_tags = resp.remove_header(crate::cache::store::TAG_HEADER);
        // RFC 9111 4.4: a successful unsafe request invalidates its target URI, and the URIs in
        // Location and Content-Location. Done before the response leaves, so the client's next
        // read cannot see the old entry.
        let method = &session.req_header().method;
        if !method.is_safe() && method.as_str() != "PURGE" && resp.status.as_u16() < 400 {
            let mut tags = vec![path_tag(session.req_header().uri.path())];
            // The objects the write changed, as the app names them (list pages included):
            // purged here before the answer leaves, not when the fleet's purge arrives.
            if let Some(named) = app_tags.as_ref().and_then(|v| v.to_str().ok()) {
                tags.extend(named.split_whitespace().map(str::to_string));
            }
            if let Some(seq) = resp
                .headers
                .get(WRITE_SEQ)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<i64>().ok())
            {
                self.shared
                    .write_seq
                    .fetch_max(seq, std::sync::atomic::Ordering::AcqRel);
            }
            for name in [http::header::LOCATION, http::header::CONTENT_LOCATION] {
                if let Some(path) = resp
                    .headers
                    .get(&name)
                    .and_then(|v| v.to_str().ok())
                    .and_then(same_origin_path)
                {
                    tags.push(path_tag(&path));
                }
            }
            self.shared.invalidate("local_write", tags.iter().map(String::as_str));
        }
        self.annotations(ctx, cache_status(session, ctx.cache_result), |name, value| {
            resp.insert_header(name, value)
        })?;

        // Compression: pingora's module does the work; we decide whether this response qualifies.
        let z = &ctx.live.config.compression;
        let qualifies = compression_qualifies(z, resp);
        set_compression(session, if qualifies { z.level } else { 0 });
        if qualifies {
            vary_on_accept_encoding(resp)?;
        }
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let (code, kind, message) = match e.etype() {
            ErrorType::HTTPStatus(503) => (
                503,
                "no_healthy_upstream",
                "no app instance is available; retry shortly",
            ),
            ErrorType::HTTPStatus(413) => (
                413,
                "body_too_large",
                "request body exceeds server.max_request_body_bytes",
            ),
            ErrorType::HTTPStatus(code) if *code >= 400 => (*code, "proxy_error", "the request could not be proxied"),
            _ => match e.esource() {
                ErrorSource::Upstream => (502, "bad_gateway", "the app instance failed to answer"),
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => (0, "", ""),
                    _ => (400, "bad_request", "the request could not be read"),
                },
                _ => (500, "internal", "the proxy failed"),
            },
        };
        if code > 0 && session.response_written().is_none() {
            // The connection is not reused after a failure: without keep-alive pingora says
            // `Connection: close`, so a pooling client does not send its next request into it.
            session.set_keepalive(None);
            let headers = [
                ("retry-after", "1".to_string()),
                ("x-request-id", ctx.request_id.clone()),
            ];
            let extra: &[(&str, String)] = if code == 503 { &headers } else { &headers[1..] };
            if let Err(err) = Self::reply(session, code, kind, message, extra).await {
                tracing::debug!(error = %err, "could not send the error response");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        let m = &self.shared.metrics;
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let method = &session.req_header().method;
        m.request_counter(&ctx.route, method, status).inc();
        m.cache_result(ctx.cache_result).inc();
        m.bytes_in.inc_by(ctx.request_body_bytes);
        // What went on the wire, after compression.
        m.bytes_out.inc_by(session.body_bytes_sent() as u64);
        let mut encoding = None;
        if let Some((coding, saved)) = ctx.precompressed {
            m.compression_saved.with_label_values(&[coding.as_str()]).inc_by(saved);
            encoding = Some(coding.as_str());
        } else if let Some(c) = session.downstream_modules_ctx.get::<ResponseCompression>() {
            if let Some((algorithm, bytes_in, bytes_out, _)) = c.get_info() {
                m.compression_saved
                    .with_label_values(&[algorithm])
                    .inc_by(bytes_in.saturating_sub(bytes_out) as u64);
                encoding = Some(algorithm);
            }
        }
        if ctx.live.config.access_log.enabled {
            let req = session.req_header();
            tracing::info!(
                target: "access",
                request_id = %ctx.request_id,
                trace_id = ctx.trace.as_ref().map(|t| t.trace_id.to_string()).unwrap_or_default(),
                client = ctx.client_ip.map(|ip| ip.to_string()).unwrap_or_default(),
                method = %method,
                path = req.uri.path(),
                query = req.uri.query().unwrap_or(""),
                status,
                cache = ctx.cache_result,
                upstream = ctx.lease.as_ref().map(|l| l.instance.label()).unwrap_or(""),
                attempts = ctx.tried.len(),
                encoding = encoding.unwrap_or("identity"),
                bytes_out = session.body_bytes_sent(),
                duration_ms = ctx.started.elapsed().as_secs_f64() * 1000.0,
                error = e.map(|e| e.to_string()).unwrap_or_default(),
            );
        }
        if let (Some(tracer), Some(trace)) = (&self.shared.tracer, ctx.trace.take().filter(|t| t.sampled)) {
            let seconds = ctx.started.elapsed().as_secs_f64();
            self.shared.slowest_traced.observe(seconds, &ctx.route, trace.trace_id);
            let req = session.req_header();
            trace.finish(
                tracer,
                method.as_str(),
                &ctx.route,
                req.uri.path(),
                status,
                ctx.cache_result,
                e.map(|e| e.to_string()),
                &ctx.request_id,
            );
        }
        ctx.lease = None;
    }
}

impl Ctx {
    fn note_room(&mut self, decision: &'static str) {
        if let Some(t) = self.trace.as_mut() {
            t.room = Some(decision);
        }
    }
}

/// Acknowledges what the upstream sends as soon as it is read (`TCP_QUICKACK`), instead of after
/// the delayed-ACK timer. A request written right after a response puts the connection in Linux's
/// interactive ("pingpong") mode, where ACKs wait 40 ms or more for data to ride on; an app that
/// writes a response in several sends with Nagle on (Python's `http.server` sends the header block
/// and the body apart) cannot send the next piece until the last is acknowledged, so a response on
/// a reused connection (a pipelined one, any keep-alive one) arrived 40 ms late. Set once the
/// request is written (a later write puts the connection back in that mode), and again when the
/// response header arrives for a request with a body (written after the first call).
fn ack_now(fd: Option<std::os::unix::io::RawFd>) {
    let Some(fd) = fd else { return };
    let on: libc::c_int = 1;
    // SAFETY: `fd` is the upstream socket this request holds; a failure (not TCP) is harmless.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// How long ago the request's last bytes reached the pod: `TCP_INFO`'s `tcpi_last_data_recv`
/// (Linux, in the kernel's clock ticks: 4 ms at `HZ=250`). A request read at once reads 0-4 ms;
/// one that waited in the socket while the pod's one thread served others reads that wait, which
/// the waiting room counts its place from. Zero where there is no TCP socket (a test's in-memory
/// session, a Unix socket).
fn received_ago(session: &Session) -> Duration {
    session
        .digest()
        .and_then(|d| d.socket_digest.as_deref())
        .map_or(Duration::ZERO, socket_received_ago)
}

fn socket_received_ago(socket: &pingora_core::protocols::SocketDigest) -> Duration {
    socket.tcp_info().map_or(Duration::ZERO, |info| {
        Duration::from_millis(info.tcpi_last_data_recv.into())
    })
}

/// The `Cache-Status` field (RFC 9211) for this response: `hit` with the remaining freshness as
/// `ttl` (negative when a stale copy is served), or `fwd=` with why the origin was asked. Only
/// hits carry a number, so the other answers are constants (no allocation on the hot path).
fn cache_status(session: &Session, result: &str) -> Option<http::HeaderValue> {
    use http::HeaderValue;
    let ttl = || {
        session.cache.maybe_cache_meta().map(|meta| {
            match meta.fresh_until().duration_since(std::time::SystemTime::now()) {
                Ok(left) => left.as_secs() as i64,
                Err(past) => -(past.duration().as_secs() as i64),
            }
        })
    };
    match result {
        "HIT" => Some(ttl().map_or(HeaderValue::from_static("mall-sidecar; hit"), hit_status)),
        "STALE" => Some(match ttl() {
            Some(t) => HeaderValue::from_str(&format!("mall-sidecar; hit; fwd=stale; ttl={t}"))
                .unwrap_or(HeaderValue::from_static("mall-sidecar; hit; fwd=stale")),
            None => HeaderValue::from_static("mall-sidecar; hit; fwd=stale"),
        }),
        "MISS" if session.cache.phase() == CachePhase::Expired => {
            Some(HeaderValue::from_static("mall-sidecar; fwd=stale"))
        }
        "MISS" => Some(HeaderValue::from_static("mall-sidecar; fwd=uri-miss")),
        "BYPASS" => Some(HeaderValue::from_static("mall-sidecar; fwd=bypass")),
        _ => None,
    }
}

/// Sets the level pingora's compression module uses for this response (0: leave the bytes as they
/// are) and keeps it from decompressing, while the response header is still to be written.
fn set_compression(session: &mut Session, level: u32) {
    if let Some(c) = session.downstream_modules_ctx.get_mut::<ResponseCompression>() {
        if c.is_header_phase() {
            c.adjust_level(level);
            c.adjust_decompression(false);
        }
    }
}

/// `Cache-Status` (RFC 9211) of a fresh hit with `ttl` seconds of freshness left.
fn hit_status(ttl: i64) -> http::HeaderValue {
    let value = format!("mall-sidecar; hit; ttl={ttl}");
    http::HeaderValue::from_str(&value).unwrap_or(http::HeaderValue::from_static("mall-sidecar; hit"))
}

/// Whether a response is worth compressing under `z`: compression on, big enough (or of
/// unknown length), and of a listed media type (prefix match, parameters ignored).
fn compression_qualifies(z: &mall_sidecar_config::Compression, resp: &ResponseHeader) -> bool {
    let length = resp
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    let content_type = resp
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media = content_type.split(';').next().unwrap_or("").trim().as_bytes();
    z.enabled
        && length.is_none_or(|len| len >= z.min_bytes)
        && z.content_types
            .iter()
            .any(|t| media.len() >= t.len() && media[..t.len()].eq_ignore_ascii_case(t.as_bytes()))
}

/// RFC 9110 12.5.5: a response whose coding depends on `Accept-Encoding` says so in `Vary`, even
/// to a client that took identity.
fn vary_on_accept_encoding(resp: &mut ResponseHeader) -> Result<()> {
    match with_accept_encoding(resp.headers.get(http::header::VARY)) {
        Some(vary) => resp.insert_header(http::header::VARY, vary),
        None => Ok(()),
    }
}

/// The `Vary` value naming `Accept-Encoding` too, or `None` when `vary` already does.
fn with_accept_encoding(vary: Option<&HeaderValue>) -> Option<HeaderValue> {
    let Some(vary) = vary.and_then(|v| v.to_str().ok()).filter(|v| !v.is_empty()) else {
        return Some(HeaderValue::from_static("Accept-Encoding"));
    };
    if vary
        .split(',')
        .any(|v| v.trim().eq_ignore_ascii_case("accept-encoding"))
    {
        return None;
    }
    HeaderValue::try_from(format!("{vary}, Accept-Encoding")).ok()
}

/// Whether the request's raw header block carries a `Content-Length` (pingora removes it from the
/// parsed header when `Transfer-Encoding` is present too).
fn declared_both_framings(session: &Session) -> bool {
    use pingora_core::protocols::http::ServerSession;
    let ServerSession::H1(h1) = &*session.downstream_session else {
        return false;
    };
    h1.get_headers_raw_bytes()
        .split(|b| *b == b'\n')
        .any(|line| line.len() >= 15 && line[..15].eq_ignore_ascii_case(b"content-length:"))
}

/// The tag every cached entry carries for its normalised path.
fn path_tag(path: &str) -> String {
    format!("path:{}", crate::cache::normalise_path(path))
}

/// The path of a `Location` / `Content-Location` value on this origin (relative, or absolute with
/// any host: the sidecar serves one origin).
fn same_origin_path(value: &str) -> Option<String> {
    let uri: http::Uri = value.parse().ok()?;
    let path = uri.path();
    path.starts_with('/').then(|| path.to_string())
}

/// Milliseconds since the Unix epoch (a ticket's cookie lifetime).
fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The waiting room counts a request from `tcpi_last_data_recv`: the time since the socket's
    /// last bytes arrived, read when the room decides; not since the connection opened, and not
    /// since the pod read them.
    #[test]
    fn a_request_waiting_in_the_socket_reads_as_received_when_its_bytes_arrived() {
        use std::io::{Read, Write};
        use std::os::unix::io::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        std::thread::sleep(Duration::from_millis(500));
        client
            .write_all(b"POST /api/orders HTTP/1.1\r\nhost: x\r\n\r\n")
            .unwrap();
        std::thread::sleep(Duration::from_millis(120));
        let socket = pingora_core::protocols::SocketDigest::from_raw_fd(server.as_raw_fd());
        let ago = socket_received_ago(&socket).as_millis();
        assert!((110..500).contains(&ago), "{ago} ms");
        let mut request = [0u8; 64];
        assert!(server.read(&mut request).unwrap() > 0);
        let read_then = socket_received_ago(&socket).as_millis();
        assert!(read_then >= ago, "{read_then} ms after reading, {ago} before");
    }
}
