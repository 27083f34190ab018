//! Rate limits: GCRA (a token bucket that stores one timestamp per key) per client address or
//! header, per route, with burst. Local by default; with Redis the same arithmetic runs in one Lua
//! script so every pod shares the budget, and a Redis that is down or slow hands the decision back
//! to the local limiter (counted in `sidecar_rate_limit_redis_fallbacks_total`); after failed calls
//! in a row, for a second at a time without asking it again (`redis_breaker`).
//!
//! pingora-limits offers sliding-window estimators, which cannot say exactly how long a client must
//! wait; `Retry-After` and `RateLimit-Remaining` need the exact state GCRA keeps.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mall_sidecar_config::{Cidr, LimitKey, LimitRule, RateLimit};
use moka::sync::Cache;

use crate::metrics::Metrics;

/// The outcome for one request under one rule.
#[derive(Debug, Clone)]
pub struct Decision {
    pub allowed: bool,
    pub rule: Arc<str>,
    /// The burst: requests a fresh key may make at once.
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until the bucket is full again.
    pub reset_secs: u64,
    /// Seconds to wait before retrying (only when refused; at least 1).
    pub retry_after_secs: u64,
    /// `RateLimit-Policy` value (draft-ietf-httpapi-ratelimit-headers): `"orders";q=40;w=2`.
    pub policy: Arc<str>,
}

struct Rule {
    config: LimitRule,
    name: Arc<str>,
    policy: Arc<str>,
    /// Nanoseconds between requests at the sustained rate.
    interval_ns: f64,
}

pub struct Limiter {
    enabled: bool,
    key: LimitKey,
    trusted: Vec<Cidr>,
    rules: Vec<Rule>,
    local: Cache<String, Arc<AtomicU64>>,
    epoch: Instant,
    redis: Option<RedisLimiter>,
    metrics: Arc<Metrics>,
}

struct RedisLimiter {
    client: redis::Client,
    /// Created on first use: the manager needs the proxy's runtime, which does not exist yet when
    /// the configuration is loaded.
    conn: std::sync::OnceLock<Result<redis::aio::ConnectionManager, String>>,
    config: redis::aio::ConnectionManagerConfig,
    prefix: String,
    timeout: Duration,
    script: redis::Script,
    /// After calls that failed in a row, this pod's limits stay local for a while without asking.
    breaker: crate::redis_breaker::Breaker,
}

/// GCRA with Redis's clock, so pods with skewed clocks agree. Returns
/// `{allowed, retry_after_ms, bucket_fill_ms}` as strings (Lua numbers lose precision as integers).
const GCRA_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local fill = new_tat - now
if fill > limit then
  return {0, tostring(fill - limit), tostring(tat - now)}
end
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil(fill) + 1000)
return {1, '0', tostring(fill)}
"#;

impl Limiter {
    pub fn new(config: &RateLimit, metrics: Arc<Metrics>) -> Self {
        let rules: Vec<Rule> = config
            .rules
            .iter()
            .map(|r| {
                let window = (r.burst as f64 / r.requests_per_second).ceil().max(1.0);
                Rule {
                    name: r.name.as_str().into(),
                    policy: format!("\"{}\";q={};w={}", r.name, r.burst, window).into(),
                    interval_ns: 1e9 / r.requests_per_second,
                    config: r.clone(),
                }
            })
            .collect();
        // Idle keys go after the longest time a bucket takes to refill (at least a minute), and
        // the table is bounded so a flood of addresses cannot grow it without end.
        let refill = rules
            .iter()
            .map(|r| r.interval_ns * r.config.burst as f64)
            .fold(60e9, f64::max);
        let redis = config.redis.as_ref().and_then(|r| {
            let cfg = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_millis(r.timeout_ms.max(200))))
                .set_response_timeout(Some(Duration::from_millis(r.timeout_ms)))
                .set_number_of_retries(0);
            match redis::Client::open(r.url.as_str()) {
                Ok(client) => Some(RedisLimiter {
                    client,
                    conn: std::sync::OnceLock::new(),
                    config: cfg,
                    prefix: r.key_prefix.clone(),
                    timeout: Duration::from_millis(r.timeout_ms),
                    script: redis::Script::new(GCRA_LUA),
                    breaker: crate::redis_breaker::Breaker::new(Duration::from_millis(r.timeout_ms)),
                }),
                Err(e) => {
                    tracing::error!(error = %e, "rate_limit.redis unusable; limits stay local");
                    None
                }
            }
        });
        Limiter {
            enabled: config.enabled && !rules.is_empty(),
            key: config.key.clone(),
            trusted: config.trusted_proxies.clone(),
            rules,
            local: Cache::builder()
                .max_capacity(200_000)
                .time_to_idle(Duration::from_nanos(refill as u64))
                .build(),
            epoch: Instant::now(),
            redis,
            metrics,
        }
    }

    /// The client's address: the peer, or the first untrusted hop of `X-Forwarded-For` when the
    /// peer is a trusted proxy (read right to left, so a client cannot forge its way in).
    pub fn client_ip(&self, peer: Option<IpAddr>, forwarded_for: Option<&str>) -> Option<IpAddr> {
        let peer = peer?;
        if !self.trusted.iter().any(|c| c.contains(peer)) {
            return Some(peer);
        }
        let Some(xff) = forwarded_for else { return Some(peer) };
        let mut client = peer;
        for hop in xff.rsplit(',') {
            match hop.trim().parse::<IpAddr>() {
                Ok(ip) => {
                    client = ip;
                    if !self.trusted.iter().any(|c| c.contains(ip)) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        Some(client)
    }

    /// Whether any limit applies at all.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The header the limit counts per, when it is not the client address.
    pub fn key_header(&self) -> Option<&str> {
        match &self.key {
            LimitKey::Header(h) => Some(h),
            LimitKey::ClientIp => None,
        }
    }

    /// Charges one request to `key` under the first matching rule; `None` when no rule applies.
    pub async fn check(&self, method: &str, path: &str, key: &str) -> Option<Decision> {
        if !self.enabled {
            return None;
        }
        let rule = self.rules.iter().find(|r| {
            path.starts_with(&r.config.path_prefix)
                && (r.config.methods.is_empty() || r.config.methods.iter().any(|m| m == method))
        })?;
        let limit_ns = rule.interval_ns * rule.config.burst as f64;
        let (allowed, retry_ns, fill_ns) = match &self.redis {
            Some(redis) if redis.breaker.should_ask() => match redis
                .check(&rule.name, key, rule.interval_ns / 1e6, limit_ns / 1e6)
                .await
            {
                Ok((allowed, retry_ms, fill_ms)) => {
                    redis.breaker.answered();
                    (allowed, retry_ms * 1e6, fill_ms * 1e6)
                }
                Err(e) => {
                    if redis.breaker.failed() {
                        tracing::warn!(
                            "rate_limit.redis failed {} calls in a row; limits stay local, asking it again every second",
                            crate::redis_breaker::TRIP_AFTER
                        );
                    }
                    self.metrics.rate_limit_redis_fallbacks.inc();
                    tracing::debug!(error = %e, "redis rate limit unavailable; deciding locally");
                    self.check_local(rule, key, limit_ns)
                }
            },
            // Redis failed calls in a row a moment ago: local without waiting for it to fail again.
            Some(_) => {
                self.metrics.rate_limit_redis_fallbacks.inc();
                self.check_local(rule, key, limit_ns)
            }
            None => self.check_local(rule, key, limit_ns),
        };
        let remaining = ((limit_ns - fill_ns) / rule.interval_ns).floor().max(0.0) as u32;
        let decision = Decision {
            allowed,
            rule: rule.name.clone(),
            limit: rule.config.burst,
            remaining: if allowed { remaining } else { 0 },
            reset_secs: (fill_ns / 1e9).ceil() as u64,
            retry_after_secs: (retry_ns / 1e9).ceil().max(1.0) as u64,
            policy: rule.policy.clone(),
        };
        if !allowed {
            self.metrics.rate_limited.with_label_values(&[&rule.name]).inc();
        }
        Some(decision)
    }

    fn check_local(&self, rule: &Rule, key: &str, limit_ns: f64) -> (bool, f64, f64) {
        let state = self
            .local
            .get_with(format!("{}\u{0}{key}", rule.name), || Arc::new(AtomicU64::new(0)));
        let now = self.epoch.elapsed().as_nanos() as f64;
        let mut current = state.load(Ordering::Acquire);
        loop {
            let tat = (current as f64).max(now);
            let new_tat = tat + rule.interval_ns;
            let fill = new_tat - now;
            if fill > limit_ns {
                return (false, fill - limit_ns, tat - now);
            }
            match state.compare_exchange_weak(current, new_tat as u64, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return (true, 0.0, fill),
                Err(actual) => current = actual,
            }
        }
    }
}

impl RedisLimiter {
    async fn check(
        &self,
        rule: &str,
        key: &str,
        interval_ms: f64,
        limit_ms: f64,
    ) -> redis::RedisResult<(bool, f64, f64)> {
        let conn = self.conn.get_or_init(|| {
            redis::aio::ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone())
                .map_err(|e| e.to_string())
        });
        let mut conn = match conn {
            Ok(conn) => conn.clone(),
            Err(e) => {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "redis client",
                    e.clone(),
                )))
            }
        };
        let mut invocation = self.script.key(format!("{}:{rule}:{key}", self.prefix));
        invocation.arg(interval_ms).arg(limit_ms);
        let call = invocation.invoke_async::<(i64, String, String)>(&mut conn);
        let (allowed, retry, fill) = tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "rate limit call timed out")))??;
        let num = |s: &str| s.parse::<f64>().unwrap_or(0.0);
        Ok((allowed == 1, num(&retry), num(&fill)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rps: f64, burst: u32, trusted: &[&str]) -> Limiter {
        let config = RateLimit {
            trusted_proxies: trusted.iter().map(|c| c.parse().unwrap()).collect(),
            rules: vec![LimitRule {
                name: "api".into(),
                path_prefix: "/api/".into(),
                methods: vec![],
                requests_per_second: rps,
                burst,
            }],
            ..Default::default()
        };
        Limiter::new(&config, Arc::new(Metrics::new()))
    }

    #[tokio::test]
    async fn burst_then_refused_with_retry_after() {
        let l = limiter(1.0, 3, &[]);
        for want_remaining in [2, 1, 0] {
            let d = l.check("GET", "/api/products", "a").await.unwrap();
            assert!(d.allowed);
            assert_eq!(d.remaining, want_remaining);
        }
        let refused = l.check("GET", "/api/products", "a").await.unwrap();
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after_secs, 1);
        assert_eq!(&*refused.policy, "\"api\";q=3;w=3");
        // Another key has its own bucket; paths without a rule are not limited.
        assert!(l.check("GET", "/api/products", "b").await.unwrap().allowed);
        assert!(l.check("GET", "/health", "a").await.is_none());
    }

    /// A Redis that stops answering costs the calls made until `TRIP_AFTER` have failed in a
    /// row over a timeout, not a timeout on every request: after that, limits are decided locally
    /// at once (and counted as fallbacks) until the retry time, then Redis is asked again.
    /// Before, every request waited `timeout_ms` first.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_redis_fails_calls_in_a_row_limits_are_local_at_once_until_it_answers_again() {
        use crate::test_redis::{slow_proxy, test_redis};
        let Some(redis) = test_redis().await else { return };
        let (slow, delay_ms) = slow_proxy(redis).await;
        let config = RateLimit {
            rules: vec![LimitRule {
                name: "api".into(),
                path_prefix: "/api/".into(),
                methods: vec![],
                requests_per_second: 1000.0,
                burst: 1000,
            }],
            redis: Some(mall_sidecar_config::RedisLimits {
                url: format!("redis://{slow}"),
                key_prefix: format!("breaker-test-{}", std::process::id()),
                timeout_ms: 300,
            }),
            ..Default::default()
        };
        let metrics = Arc::new(Metrics::new());
        let l = Limiter::new(&config, metrics.clone());
        let fallbacks = || metrics.rate_limit_redis_fallbacks.get();
        // Whether one of `tries` calls, `pause` apart, was decided by Redis (no fallback counted).
        let answered_within = |tries: usize, pause: Duration| {
            let (l, fallbacks) = (&l, &fallbacks);
            async move {
                for _ in 0..tries {
                    let before = fallbacks();
                    assert!(l.check("GET", "/api/products", "a").await.unwrap().allowed);
                    if fallbacks() == before {
                        return true;
                    }
                    tokio::time::sleep(pause).await;
                }
                false
            }
        };
        // Redis answers (the first call also connects and loads the script).
        assert!(answered_within(5, Duration::ZERO).await, "Redis never answered");
        delay_ms.store(3000, Ordering::Relaxed);
        let breaker = &l.redis.as_ref().unwrap().breaker;
        for _ in 0..10 {
            if breaker.is_open() {
                break;
            }
            assert!(l.check("GET", "/api/products", "a").await.unwrap().allowed);
        }
        assert!(
            breaker.is_open(),
            "the limiter never stopped asking a Redis that does not answer"
        );
        let (before, started) = (fallbacks(), Instant::now());
        for _ in 0..5 {
            assert!(l.check("GET", "/api/products", "a").await.unwrap().allowed);
        }
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(750),
            "five decisions took {took:?}: each waited for a Redis that had failed"
        );
        assert_eq!(fallbacks(), before + 5, "each decided locally counts as a fallback");
        // Redis answers again: asked once the retry time has passed (and the calls still in the
        // delay line have gone through; a probe may still find the client reconnecting, then
        // the next one a retry time later).
        delay_ms.store(0, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(3000)).await;
        let retry = crate::redis_breaker::RETRY_AFTER + Duration::from_millis(100);
        assert!(answered_within(4, retry).await, "Redis was never asked again");
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let l = limiter(1.0, 1, &["10.0.0.0/8"]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // Untrusted peer: its own address, whatever it claims.
        assert_eq!(l.client_ip(Some(ip("1.2.3.4")), Some("9.9.9.9")), Some(ip("1.2.3.4")));
        // Trusted proxy: the last untrusted hop, so a spoofed leftmost entry is ignored.
        assert_eq!(
            l.client_ip(Some(ip("10.0.0.1")), Some("6.6.6.6, 5.5.5.5, 10.0.0.2")),
            Some(ip("5.5.5.5"))
        );
        assert_eq!(l.client_ip(Some(ip("10.0.0.1")), None), Some(ip("10.0.0.1")));
    }
}
