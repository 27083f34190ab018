//! What may be cached, for how long, and under which key. The proxy asks this module at each cache
//! hook; the bytes live in [`store::MemoryStore`].
//!
//! - Only routes with a rule (rules say where caching happens; a `/` rule with `ttl_seconds = 0`
//!   caches whatever the upstream gives a lifetime), so requests to other routes never queue on
//!   the cache lock.
//! - Only GET and HEAD, only without `Authorization` or `Cookie` unless the route's rule allows it.
//! - Never a response with `Set-Cookie`, `Cache-Control: no-store | private | no-cache`, or `Vary: *`.
//! - Lifetime: the upstream's `s-maxage` / `max-age`, else the route rule's `ttl_seconds`
//!   (or the rule's always, with `override_upstream`); no lifetime, no caching.
//! - Key: host, normalised path, sorted query, and the configured `key_headers`. Other request
//!   headers are not forwarded on cacheable requests, so none can change a cached body.

pub mod store;

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use mall_sidecar_config::{Cache as CacheConfig, CacheRule, Cidr};
use pingora_cache::cache_control::CacheControl;
use pingora_cache::key::HashBinary;
use pingora_cache::{CacheKey, CacheMeta, NoCacheReason, RespCacheable, VarianceBuilder};
use pingora_http::{RequestHeader, ResponseHeader};

/// Request headers passed upstream on cacheable requests besides the key headers: they never change
/// a response body.
const PASS_THROUGH: [&str; 5] = [
    "x-request-id",
    "traceparent",
    "tracestate",
    "x-forwarded-for",
    "x-forwarded-proto",
];

pub struct CachePolicy {
    pub enabled: bool,
    rules: Vec<CacheRule>,
    key_headers: Vec<String>,
    pub stale_while_revalidate: u32,
    pub stale_if_error: u32,
    pub max_object_bytes: usize,
    pub lock_timeout: Duration,
    pub purge_from: Vec<Cidr>,
    purge_tokens: Vec<String>,
}

impl CachePolicy {
    pub fn new(config: &CacheConfig) -> Self {
        CachePolicy {
            enabled: config.enabled,
            rules: config.rules.clone(),
            key_headers: config.key_headers.iter().map(|h| h.to_ascii_lowercase()).collect(),
            stale_while_revalidate: config.stale_while_revalidate_seconds,
            stale_if_error: config.stale_if_error_seconds,
            max_object_bytes: config.max_object_bytes,
            lock_timeout: Duration::from_millis(config.lock_timeout_ms),
            purge_from: config.purge.allow_from.clone(),
            purge_tokens: config.purge.tokens.clone(),
        }
    }

    /// The rule for `path`, if any (first match by prefix of the normalised path, so `//api/./x`
    /// matches like `/api/x`).
    pub fn rule(&self, path: &str) -> Option<&CacheRule> {
        let path = normalise_path(path);
        self.rules.iter().find(|r| path.starts_with(&r.path_prefix))
    }

    /// Whether this request may be answered from (and fill) the cache.
    pub fn request_cacheable(&self, req: &RequestHeader) -> bool {
        if !self.enabled || !(req.method == http::Method::GET || req.method == http::Method::HEAD) {
            return false;
        }
        let Some(rule) = self.rule(req.uri.path()) else {
            return false;
        };
        let credentials =
            req.headers.contains_key(http::header::AUTHORIZATION) || req.headers.contains_key(http::header::COOKIE);
        !credentials || rule.cache_authorized
    }

    /// The cache key: host, normalised path and query, and the key headers, framed unambiguously.
    pub fn key(&self, req: &RequestHeader) -> CacheKey {
        let mut primary = Vec::with_capacity(128);
        push_host(&mut primary, req);
        push_framed(&mut primary, normalise_path(req.uri.path()).as_bytes());
        push_framed(&mut primary, normalise_query(req.uri.query()).as_bytes());
        for name in &self.key_headers {
            let values: Vec<&[u8]> = req
                .headers
                .get_all(name.as_str())
                .iter()
                .map(|v| v.as_bytes())
                .collect();
            push_framed(&mut primary, values.join(&b","[..]).as_slice());
        }
        CacheKey::new(primary, "")
    }

    /// The upstream is asked for exactly what the key names (normalised path, sorted query), so a
    /// spelling the app would answer differently (`//x` as a 404) cannot be stored under `/x`.
    pub fn normalise_request(&self, upstream: &mut RequestHeader) {
        let path = normalise_path(upstream.uri.path());
        let query = normalise_query(upstream.uri.query());
        let target = if query.is_empty() {
            path.into_owned()
        } else {
            format!("{path}?{query}")
        };
        if let Ok(uri) = target.parse::<http::Uri>() {
            upstream.set_uri(uri);
        }
    }

    /// Drops every request header that is not keyed or known harmless from a cacheable request.
    pub fn strip_unkeyed_headers(&self, upstream: &mut RequestHeader) {
        let drop: Vec<http::HeaderName> = upstream
            .headers
            .keys()
            .filter(|name| {
                let n = name.as_str();
                n != "host" && !PASS_THROUGH.contains(&n) && !self.key_headers.iter().any(|k| k == n)
            })
            .cloned()
            .collect();
        for name in drop {
            upstream.remove_header(&name);
        }
    }

    /// Decides whether (and for how long) to store the upstream's response.
    pub fn response_cacheable(&self, path: &str, resp: &ResponseHeader) -> RespCacheable {
        let uncacheable = |why: &'static str| RespCacheable::Uncacheable(NoCacheReason::Custom(why));
        if !matches!(resp.status.as_u16(), 200 | 203 | 204 | 300 | 301 | 308 | 404 | 410) {
            return uncacheable("status");
        }
        if resp.headers.contains_key(http::header::SET_COOKIE) {
            return uncacheable("set-cookie");
        }
        if resp
            .headers
            .get_all(http::header::VARY)
            .iter()
            .any(|v| v.as_bytes().split(|b| *b == b',').any(|p| p.trim_ascii() == b"*"))
        {
            return uncacheable("vary *");
        }
        if let Some(len) = resp
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        {
            if len > self.max_object_bytes {
                return uncacheable("too large");
            }
        }
        let cc = CacheControl::from_resp_headers(resp);
        if let Some(cc) = &cc {
            if cc.no_store() || cc.private() || cc.no_cache() {
                return uncacheable("cache-control");
            }
        }
        let rule = self.rule(path);
        let upstream_ttl = cc
            .as_ref()
            .and_then(|cc| cc.s_maxage().ok().flatten().or(cc.max_age().ok().flatten()));
        let ttl = match (rule, upstream_ttl) {
            (None, _) => 0,
            (Some(rule), _) if rule.override_upstream => rule.ttl_seconds,
            (_, Some(ttl)) => ttl as u64,
            // A 404 may be a product created a second later: only the upstream may make it last.
            (Some(_), None) if matches!(resp.status.as_u16(), 404 | 410) => 0,
            (Some(rule), None) => rule.ttl_seconds,
        };
        if ttl == 0 {
            return uncacheable("no lifetime");
        }
        let swr = cc
            .as_ref()
            .and_then(|c| c.stale_while_revalidate().ok().flatten())
            .unwrap_or(self.stale_while_revalidate);
        let sie = cc
            .as_ref()
            .and_then(|c| c.stale_if_error().ok().flatten())
            .unwrap_or(self.stale_if_error);
        let now = SystemTime::now();
        RespCacheable::Cacheable(CacheMeta::new(
            now + Duration::from_secs(ttl),
            now,
            swr,
            sie,
            resp.clone(),
        ))
    }

    /// Honours the stored response's `Vary` over the request's headers. `Accept-Encoding` is left
    /// out: the upstream is always asked for identity bytes and compression happens per client on
    /// the way out, so one stored object serves every encoding.
    pub fn variance(&self, meta: &CacheMeta, req: &RequestHeader) -> Option<HashBinary> {
        let mut names: Vec<String> = Vec::new();
        for value in meta.headers().get_all(http::header::VARY) {
            for name in value.to_str().unwrap_or("").split(',') {
                let name = name.trim().to_ascii_lowercase();
                if !name.is_empty() && name != "accept-encoding" && !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        if names.is_empty() {
            return None;
        }
        names.sort();
        let mut builder = VarianceBuilder::new();
        for name in names {
            let value = req
                .headers
                .get(name.as_str())
                .map(|v| v.as_bytes().to_vec())
                .unwrap_or_default();
            builder.add_owned_name_value(name, value);
        }
        builder.finalize()
    }

    /// Whether a PURGE from `peer` with `authorization` may proceed.
    pub fn purge_allowed(&self, peer: Option<std::net::IpAddr>, authorization: Option<&str>) -> bool {
        let from_allowed = peer.is_some_and(|ip| self.purge_from.iter().any(|c| c.contains(ip)));
        let token = authorization.and_then(|a| a.strip_prefix("Bearer ")).map(str::trim);
        let token_ok = token.is_some_and(|t| {
            self.purge_tokens
                .iter()
                .any(|known| constant_time_eq(known.as_bytes(), t.as_bytes()))
        });
        from_allowed || token_ok
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn push_framed(out: &mut Vec<u8>, part: &[u8]) {
    out.extend_from_slice(&(part.len() as u32).to_be_bytes());
    out.extend_from_slice(part);
}

/// The request's host, lower-cased, without a default port, framed onto `out` (in place: the key
/// is built on every cacheable request).
fn push_host(out: &mut Vec<u8>, req: &RequestHeader) {
    let host = req
        .uri
        .host()
        .map(str::as_bytes)
        .or_else(|| req.headers.get(http::header::HOST).map(|h| h.as_bytes()))
        .unwrap_or_default();
    let host = host.strip_suffix(b":80").unwrap_or(host);
    let start = out.len() + 4;
    push_framed(out, host);
    out[start..].make_ascii_lowercase();
}

/// `//a/./b/../c` -> `/a/c`: paths that reach the same resource share one entry. A path that is
/// already normal (the common case) is returned as it is, without a copy.
pub fn normalise_path(path: &str) -> Cow<'_, str> {
    let mut segments = path.strip_prefix('/').map(|rest| rest.split('/').peekable());
    let normal = segments.as_mut().is_some_and(|segments| {
        while let Some(segment) = segments.next() {
            let last = segments.peek().is_none();
            if segment == "." || segment == ".." || (segment.is_empty() && !last) {
                return false;
            }
        }
        true
    });
    if normal {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(normalised_copy(path))
    }
}

fn normalised_copy(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || (path.ends_with('/') && !segments.is_empty()) {
        out.push('/');
    }
    out
}

/// `b=2&a=1&` -> `a=1&b=2`: parameter order does not make a different response.
pub fn normalise_query(query: Option<&str>) -> Cow<'_, str> {
    let query = query.unwrap_or("");
    // One parameter or none (most requests): already normal.
    if !query.contains('&') {
        return Cow::Borrowed(query);
    }
    let mut params: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
    params.sort_unstable();
    Cow::Owned(params.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora_cache::key::CacheHashKey;

    fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build(method, uri.as_bytes(), None).unwrap();
        r.insert_header("host", "Mall.Example:80").unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    fn resp(status: u16, headers: &[(&str, &str)]) -> ResponseHeader {
        let mut r = ResponseHeader::build(status, None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    fn ttl(policy: &CachePolicy, path: &str, r: &ResponseHeader) -> Option<u64> {
        match policy.response_cacheable(path, r) {
            RespCacheable::Cacheable(meta) => Some(meta.fresh_sec()),
            RespCacheable::Uncacheable(_) => None,
        }
    }

    #[test]
    fn keys_normalise_path_query_and_host() {
        let p = CachePolicy::new(&CacheConfig::default());
        let a = p.key(&req("GET", "/api//products/./1?b=2&a=1", &[])).primary_bin();
        let b = p.key(&req("GET", "/api/products/1?a=1&b=2", &[])).primary_bin();
        let c = p.key(&req("GET", "/api/products/1?a=1&b=3", &[])).primary_bin();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(normalise_path("/a/../../b/"), "/b/");
        assert_eq!(normalise_path(""), "/");
        for (path, normal) in [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/b/", "/a/b/"),
            ("//a", "/a"),
            ("/a//b", "/a/b"),
            ("/a/./b", "/a/b"),
            ("/a/b/..", "/a"),
            ("/a/.", "/a"),
            ("a/b", "/a/b"),
            ("/..", "/"),
        ] {
            let got = normalise_path(path);
            assert_eq!(got, normal, "{path}");
            assert_eq!(got, normalised_copy(path), "{path}: the shortcut agrees with the copy");
            assert_eq!(matches!(got, Cow::Borrowed(_)), path == normal, "{path}");
        }
        // An unkeyed header does not change the key (and is stripped upstream).
        let d = p
            .key(&req("GET", "/api/products/1?a=1&b=2", &[("x-forwarded-host", "evil")]))
            .primary_bin();
        assert_eq!(a, d);
        let mut up = req(
            "GET",
            "/",
            &[
                ("x-forwarded-host", "evil"),
                ("x-request-id", "1"),
                ("accept-encoding", "gzip"),
            ],
        );
        p.strip_unkeyed_headers(&mut up);
        let left: Vec<&str> = up.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["host", "x-request-id"]);
    }

    #[test]
    fn credentials_bypass_unless_a_rule_allows() {
        let mut config = CacheConfig::default();
        let p = CachePolicy::new(&config);
        assert!(p.request_cacheable(&req("GET", "/api/products", &[])));
        assert!(!p.request_cacheable(&req("GET", "/api/products", &[("authorization", "Bearer x")])));
        assert!(!p.request_cacheable(&req("GET", "/api/products", &[("cookie", "a=b")])));
        assert!(!p.request_cacheable(&req("POST", "/api/products", &[])));
        assert!(!p.request_cacheable(&req("GET", "/health", &[])), "no rule, no cache");
        config.rules[0].cache_authorized = true;
        assert!(CachePolicy::new(&config).request_cacheable(&req(
            "GET",
            "/api/products",
            &[("authorization", "Bearer x")]
        )));
    }

    #[test]
    fn lifetimes_from_upstream_and_rules() {
        let p = CachePolicy::new(&CacheConfig::default());
        type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Option<u64>);
        let table: [Case; 9] = [
            ("/api/products", vec![("cache-control", "public, max-age=5")], Some(5)),
            (
                "/api/products",
                vec![("cache-control", "max-age=5, s-maxage=30")],
                Some(30),
            ),
            ("/api/products", vec![], Some(600)),
            ("/other", vec![], None),
            ("/other", vec![("cache-control", "max-age=7")], None),
            ("/api/products", vec![("cache-control", "private, max-age=60")], None),
            ("/api/products", vec![("cache-control", "no-store")], None),
            ("/api/products", vec![("set-cookie", "s=1")], None),
            ("/api/products", vec![("vary", "Accept, *")], None),
        ];
        for (path, headers, want) in table {
            assert_eq!(ttl(&p, path, &resp(200, &headers)), want, "{path} {headers:?}");
        }
        assert_eq!(ttl(&p, "/api/products", &resp(500, &[])), None);
        assert_eq!(
            ttl(&p, "/api/products/999", &resp(404, &[])),
            None,
            "a 404 lives only as long as the upstream says"
        );
        assert_eq!(
            ttl(&p, "/api/products/999", &resp(404, &[("cache-control", "max-age=3")])),
            Some(3)
        );

        let mut up = req("GET", "/api//products/./1?b=2&a=1", &[]);
        p.normalise_request(&mut up);
        assert_eq!(up.uri.to_string(), "/api/products/1?a=1&b=2");
    }

    #[test]
    fn purge_needs_an_allowed_source_or_token() {
        let mut config = CacheConfig::default();
        config.purge.tokens = vec!["0123456789abcdef-token".into()];
        let p = CachePolicy::new(&config);
        let local = Some("127.0.0.1".parse().unwrap());
        let remote = Some("192.0.2.1".parse().unwrap());
        assert!(p.purge_allowed(local, None));
        assert!(!p.purge_allowed(remote, None));
        assert!(!p.purge_allowed(remote, Some("Bearer wrong")));
        assert!(p.purge_allowed(remote, Some("Bearer 0123456789abcdef-token")));
    }
}
