//! A waiting room in front of one route: fair, first-come admission across every pod.
//!
//! Admission is a line with a moving front. Every buyer who reaches the room takes the next
//! number (`issued`); the front (`horizon`) advances at `admit_per_second` and never runs more
//! than `burst` ahead of the last number issued, so an idle room admits a burst and then the
//! rate. A buyer whose number is at or behind the front goes through; the others get a ticket
//! (202, `Retry-After`, their position and the time of their turn) and come back with it. A
//! ticket is admitted once, when its number is behind the front: nobody skips ahead, and a
//! newcomer never passes a ticket whose turn has not come.
//!
//! With Redis the line is one for the whole fleet (a Lua script on Redis's clock: numbers, front
//! and used tickets). Without it, or while it is down, each pod keeps a line of its own at
//! `admit_per_second / replicas`; a ticket of another line (another pod's, or the shared one
//! while Redis is down) cannot be honoured there and its holder is given a new one.
//!
//! Tickets are `n.line.issued_ms.turn_ms.expires_ms.binding.signature`: HMAC-SHA256 (RFC 2104)
//! under the room's secret, bound to the buyer by a hash of the header they authenticate with.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use mall_sidecar_config::WaitingRoom;
use sha2::{Digest, Sha256};

use crate::metrics::Metrics;

/// The header (and cookie) a ticket travels in.
pub const TICKET_HEADER: &str = "waiting-room-ticket";
pub const TICKET_COOKIE: &str = "waiting_room";

/// What the room decided for one request.
#[derive(Debug, PartialEq)]
pub enum Admission {
    /// Let through (with or without a ticket).
    Admit {
        /// Milliseconds the buyer waited, from the ticket's issue (0 without one).
        waited_ms: u64,
    },
    /// Not yet: come back with this ticket.
    Wait(Ticket),
    /// A ticket that is refused, and why (the problem type and its detail).
    Refuse {
        status: u16,
        code: &'static str,
        detail: String,
    },
}

/// A ticket handed out, for the 202 answer.
#[derive(Debug, PartialEq)]
pub struct Ticket {
    pub token: String,
    /// Buyers ahead of this one.
    pub position: u64,
    /// Milliseconds until its turn (from now).
    pub wait_ms: u64,
    pub expires_ms: u64,
}

pub struct Room {
    method: String,
    path: String,
    /// Admissions per millisecond, of the fleet and of this pod alone.
    rate_ms: f64,
    local_rate_ms: f64,
    burst: f64,
    ttl_ms: u64,
    key: Vec<u8>,
    bind_header: String,
    redis: Option<SharedLine>,
    local: parking_lot::Mutex<Line>,
    /// This process's local line: tickets of another pod's line carry another name.
    local_name: String,
    /// Numbers of the local line already admitted (a ticket is admitted once).
    local_used: moka::sync::Cache<u64, ()>,
    shared_up: AtomicBool,
    metrics: Arc<Metrics>,
}

/// One line's state: the last number issued and the front.
#[derive(Debug)]
struct Line {
    issued: u64,
    horizon: f64,
    at_ms: f64,
}

impl Line {
    /// Moves the front to `now_ms`; returns whether `n` (or, for 0, a new number) is admitted.
    fn step(&mut self, now_ms: f64, rate_ms: f64, burst: f64) {
        if now_ms > self.at_ms {
            self.horizon += (now_ms - self.at_ms) * rate_ms;
            self.at_ms = now_ms;
        }
        self.horizon = self.horizon.min(self.issued as f64 + burst);
    }
}

struct SharedLine {
    client: redis::Client,
    conn: std::sync::OnceLock<Result<redis::aio::ConnectionManager, String>>,
    config: redis::aio::ConnectionManagerConfig,
    key: String,
    timeout: Duration,
    script: redis::Script,
}

/// The shared line, on Redis's clock. `ARGV`: rate per ms, burst, ticket number (0: a newcomer),
/// how long a used mark lives (ms). Returns `{outcome, n, horizon, now_ms}`: outcome 1 admitted,
/// 0 wait, 2 the ticket was used already, 3 the number was never issued (the line was reset).
const LINE_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local s = redis.call('HMGET', KEYS[1], 'issued', 'horizon', 'at')
local issued = tonumber(s[1]) or 0
local horizon = tonumber(s[2]) or 0
local at = tonumber(s[3]) or now
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
if now > at then
  horizon = horizon + (now - at) * rate
  at = now
end
if horizon > issued + burst then horizon = issued + burst end
local n = tonumber(ARGV[3])
local outcome = 0
if n == 0 then
  issued = issued + 1
  n = issued
  if n <= horizon then outcome = 1 end
elseif n > issued then
  outcome = 3
elseif n <= horizon then
  if redis.call('SET', KEYS[1] .. ':used:' .. n, '1', 'NX', 'PX', ARGV[4]) then outcome = 1 else outcome = 2 end
end
redis.call('HSET', KEYS[1], 'issued', issued, 'horizon', tostring(horizon), 'at', tostring(at))
redis.call('PEXPIRE', KEYS[1], 86400000)
return {outcome, n, tostring(horizon), tostring(now)}
"#;

/// What a line answered: outcome (as in [`LINE_LUA`]), the number, the front.
type Step = (i64, u64, f64);

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

impl Room {
    pub fn new(config: &WaitingRoom, metrics: Arc<Metrics>) -> Option<Room> {
        if !config.enabled {
            return None;
        }
        let redis = config
            .redis
            .as_ref()
            .and_then(|r| match redis::Client::open(r.url.as_str()) {
                Ok(client) => Some(SharedLine {
                    client,
                    conn: std::sync::OnceLock::new(),
                    config: redis::aio::ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(Duration::from_millis(r.timeout_ms.max(200))))
                        .set_response_timeout(Some(Duration::from_millis(r.timeout_ms)))
                        .set_number_of_retries(0),
                    key: format!("{}:{}:{}", r.key_prefix, config.method, config.path),
                    timeout: Duration::from_millis(r.timeout_ms),
                    script: redis::Script::new(LINE_LUA),
                }),
                Err(e) => {
                    tracing::error!(error = %e, "waiting_room.redis unusable; each pod keeps its own line");
                    None
                }
            });
        let rate_ms = config.admit_per_second / 1000.0;
        let ttl_ms = config.ticket_ttl_seconds * 1000;
        let now = now_ms();
        Some(Room {
            method: config.method.clone(),
            path: config.path.clone(),
            rate_ms,
            local_rate_ms: rate_ms / config.replicas.max(1) as f64,
            burst: config.burst as f64,
            ttl_ms,
            // A key of the room's own, derived from the configured secret (which the operator
            // shares with the app's token signing): HMAC(secret, label), so a ticket's MAC can
            // never stand for anything signed with the secret itself.
            key: {
                let mut mac = Hmac::<Sha256>::new_from_slice(config.secret.as_bytes()).expect("any key length");
                mac.update(b"mall waiting-room tickets v1");
                mac.finalize().into_bytes().to_vec()
            },
            bind_header: config.bind_header.to_ascii_lowercase(),
            shared_up: AtomicBool::new(redis.is_some()),
            redis,
            local: parking_lot::Mutex::new(Line {
                issued: 0,
                horizon: config.burst as f64,
                at_ms: now,
            }),
            local_name: format!("l{:08x}", rand_u32()),
            local_used: moka::sync::Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(Duration::from_millis(ttl_ms * 2 + 60_000))
                .build(),
            metrics,
        })
    }

    pub fn applies(&self, method: &str, path: &str) -> bool {
        method == self.method && path == self.path
    }

    pub fn bind_header(&self) -> &str {
        &self.bind_header
    }

    /// Decides for a request to the room's route: `ticket` as presented, `binding` the value of
    /// the bind header (empty when absent).
    pub async fn admit(&self, ticket: Option<&str>, binding: &str) -> Admission {
        let bind = bind_tag(binding);
        let presented = match ticket.map(|t| self.verify(t, &bind)) {
            None => None,
            Some(Ok(t)) => Some(t),
            Some(Err((code, detail))) => {
                self.count("rejected");
                return Admission::Refuse {
                    status: 403,
                    code,
                    detail: detail.into(),
                };
            }
        };
        let now = now_ms();
        if let Some(t) = &presented {
            if now as u64 > t.expires_ms {
                self.count("expired");
                return Admission::Refuse {
                    status: 403,
                    code: "ticket_expired",
                    detail: "the ticket's turn passed more than waiting_room.ticket_ttl_seconds ago; \
                             send the request without it for a new one"
                        .into(),
                };
            }
        }
        // The shared line when Redis answers; else this pod's own. A ticket of a line that
        // cannot be consulted here (another pod's, or the shared one while Redis is down)
        // counts as none: its holder takes a new number.
        let on_line = |name: &str| presented.as_ref().filter(|t| t.line == name).map(|t| t.n);
        let (line, (outcome, n, horizon)) = match self.shared_step(on_line("g")).await {
            Some(step) => ("g", step),
            None => (
                self.local_name.as_str(),
                self.local_step(on_line(&self.local_name), now),
            ),
        };
        let foreign = presented.as_ref().is_some_and(|t| t.line != line);
        self.metrics.waiting_room_queue.set((n as f64 - horizon).max(0.0));
        match outcome {
            1 => {
                let waited_ms = presented
                    .as_ref()
                    .filter(|_| !foreign)
                    .map_or(0, |t| (now as u64).saturating_sub(t.issued_ms));
                self.count(if presented.is_some() && !foreign {
                    "admitted"
                } else {
                    "direct"
                });
                if waited_ms > 0 {
                    self.metrics.waiting_room_wait.observe(waited_ms as f64 / 1000.0);
                }
                Admission::Admit { waited_ms }
            }
            2 => {
                self.count("rejected");
                Admission::Refuse {
                    status: 409,
                    code: "ticket_used",
                    detail: "this ticket was already admitted once; send the request without it for a new one".into(),
                }
            }
            3 => {
                self.count("rejected");
                Admission::Refuse {
                    status: 403,
                    code: "ticket_unknown",
                    detail: "the waiting room does not know this ticket (it was reset); send the request without it"
                        .into(),
                }
            }
            _ => {
                let ahead = (n as f64 - horizon).max(0.0);
                let wait_ms = (ahead / if line == "g" { self.rate_ms } else { self.local_rate_ms }).ceil() as u64;
                let (issued_ms, line_name) = match presented.as_ref().filter(|_| !foreign) {
                    Some(t) => (t.issued_ms, t.line.clone()),
                    None => {
                        self.count("issued");
                        (now as u64, line.to_string())
                    }
                };
                let turn_ms = now as u64 + wait_ms;
                let expires_ms = turn_ms + self.ttl_ms;
                let token = self.sign(n, &line_name, issued_ms, expires_ms, &bind);
                Admission::Wait(Ticket {
                    token,
                    position: ahead.ceil() as u64,
                    wait_ms,
                    expires_ms,
                })
            }
        }
    }

    /// One step of the shared line; None when there is none or Redis does not answer.
    async fn shared_step(&self, n: Option<u64>) -> Option<Step> {
        let shared = self.redis.as_ref()?;
        let conn = shared.conn.get_or_init(|| {
            redis::aio::ConnectionManager::new_lazy_with_config(shared.client.clone(), shared.config.clone())
                .map_err(|e| e.to_string())
        });
        let mut conn = conn.as_ref().ok()?.clone();
        let mut call = shared.script.key(&shared.key);
        call.arg(self.rate_ms)
            .arg(self.burst)
            .arg(n.unwrap_or(0))
            .arg(self.ttl_ms * 2 + 60_000);
        let answer = tokio::time::timeout(
            shared.timeout,
            call.invoke_async::<(i64, u64, String, String)>(&mut conn),
        )
        .await;
        let up = matches!(answer, Ok(Ok(_)));
        if self.shared_up.swap(up, Ordering::Relaxed) != up {
            if up {
                tracing::info!("waiting room: Redis is back; one line for the fleet again");
            } else {
                tracing::warn!("waiting room: Redis does not answer; this pod keeps its own line");
            }
        }
        self.metrics.waiting_room_shared.set(if up { 1.0 } else { 0.0 });
        let (outcome, n, horizon, _clock) = answer.ok()?.ok()?;
        Some((outcome, n, horizon.parse().unwrap_or(0.0)))
    }

    fn local_step(&self, n: Option<u64>, now: f64) -> Step {
        let mut line = self.local.lock();
        line.step(now, self.local_rate_ms, self.burst);
        match n {
            None => {
                line.issued += 1;
                let n = line.issued;
                (i64::from(n as f64 <= line.horizon), n, line.horizon)
            }
            Some(n) if n > line.issued => (3, n, line.horizon),
            Some(n) if n as f64 <= line.horizon => {
                let fresh = !self.local_used.contains_key(&n);
                if fresh {
                    self.local_used.insert(n, ());
                }
                (if fresh { 1 } else { 2 }, n, line.horizon)
            }
            Some(n) => (0, n, line.horizon),
        }
    }

    fn count(&self, outcome: &str) {
        self.metrics.waiting_room_tickets.with_label_values(&[outcome]).inc();
    }

    fn mac(&self, text: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(text.as_bytes());
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }

    fn sign(&self, n: u64, line: &str, issued_ms: u64, expires_ms: u64, bind: &str) -> String {
        let text = format!("{n}.{line}.{issued_ms}.{expires_ms}.{bind}");
        let sig = self.mac(&text);
        format!("{text}.{sig}")
    }

    /// Checks a presented ticket's form, signature and binding.
    fn verify(&self, token: &str, bind: &str) -> Result<Presented, (&'static str, &'static str)> {
        const FORGED: (&str, &str) = (
            "ticket_invalid",
            "the ticket is malformed or not signed by this waiting room",
        );
        let (text, sig) = token.rsplit_once('.').ok_or(FORGED)?;
        let parts: Vec<&str> = text.split('.').collect();
        let [n, line, issued, expires, owner] = parts[..] else {
            return Err(FORGED);
        };
        // Constant-time comparison of the signature.
        let expected = Hmac::<Sha256>::new_from_slice(&self.key)
            .expect("HMAC takes any key length")
            .chain_update(text.as_bytes());
        let sig = URL_SAFE_NO_PAD.decode(sig).map_err(|_| FORGED)?;
        expected.verify_slice(&sig).map_err(|_| FORGED)?;
        if owner != bind {
            return Err((
                "ticket_not_yours",
                "the ticket was issued to another buyer (it is bound to the credentials it was issued for)",
            ));
        }
        Ok(Presented {
            n: n.parse().map_err(|_| FORGED)?,
            line: line.to_string(),
            issued_ms: issued.parse().map_err(|_| FORGED)?,
            expires_ms: expires.parse().map_err(|_| FORGED)?,
        })
    }
}

struct Presented {
    n: u64,
    line: String,
    issued_ms: u64,
    expires_ms: u64,
}

/// A short, non-reversible tag of the buyer's credentials.
fn bind_tag(binding: &str) -> String {
    let digest = Sha256::digest(binding.as_bytes());
    URL_SAFE_NO_PAD.encode(&digest[..9])
}

fn rand_u32() -> u32 {
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut h = Sha256::new();
    h.update(t.as_nanos().to_le_bytes());
    h.update(std::process::id().to_le_bytes());
    let d = h.finalize();
    u32::from_le_bytes([d[0], d[1], d[2], d[3]])
}

/// The ticket a request presents: the `Waiting-Room-Ticket` header, else the `waiting_room`
/// cookie (RFC 6265 5.4: `name=value` pairs separated by `; `).
pub fn presented_ticket(header: Option<&str>, cookies: impl Iterator<Item = String>) -> Option<String> {
    if let Some(h) = header.map(str::trim).filter(|h| !h.is_empty()) {
        return Some(h.to_string());
    }
    for cookie in cookies {
        for pair in cookie.split(';') {
            if let Some((name, value)) = pair.trim().split_once('=') {
                if name == TICKET_COOKIE && !value.is_empty() {
                    return Some(value.to_string());
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(rate: f64, burst: u32) -> Room {
        let config = WaitingRoom {
            enabled: true,
            admit_per_second: rate,
            burst,
            secret: "a-secret-of-at-least-thirty-two-bytes!".into(),
            ..WaitingRoom::default()
        };
        Room::new(&config, Arc::new(Metrics::new())).unwrap()
    }

    fn ticket(a: Admission) -> Ticket {
        match a {
            Admission::Wait(t) => t,
            other => panic!("expected a ticket, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_burst_goes_through_then_buyers_wait_in_line_and_are_admitted_in_order() {
        let room = room(10.0, 2);
        assert!(matches!(room.admit(None, "alice").await, Admission::Admit { .. }));
        assert!(matches!(room.admit(None, "bob").await, Admission::Admit { .. }));
        let t3 = ticket(room.admit(None, "carol").await);
        let t4 = ticket(room.admit(None, "dave").await);
        assert!(t3.position >= 1 && t4.position == t3.position + 1, "{t3:?} {t4:?}");
        assert!(t4.wait_ms > t3.wait_ms && t4.wait_ms <= 250, "{t3:?} {t4:?}");
        // Dave comes back before his turn: still waiting, same place.
        let again = ticket(room.admit(Some(&t4.token), "dave").await);
        assert!(again.position <= t4.position);
        tokio::time::sleep(Duration::from_millis(t4.wait_ms + 20)).await;
        assert!(matches!(room.admit(Some(&t4.token), "dave").await, Admission::Admit { waited_ms } if waited_ms > 0));
        // Once admitted, the ticket is spent.
        assert!(matches!(
            room.admit(Some(&t4.token), "dave").await,
            Admission::Refuse {
                status: 409,
                code: "ticket_used",
                ..
            }
        ));
        // Carol's turn came before Dave's: she is admitted too.
        assert!(matches!(
            room.admit(Some(&t3.token), "carol").await,
            Admission::Admit { .. }
        ));
    }

    #[tokio::test]
    async fn forged_foreign_and_expired_tickets_are_refused() {
        let room = room(0.5, 1);
        assert!(matches!(room.admit(None, "alice").await, Admission::Admit { .. }));
        let t = ticket(room.admit(None, "bob").await);
        let refused = |a: Admission| match a {
            Admission::Refuse { code, .. } => code,
            other => panic!("expected a refusal, got {other:?}"),
        };
        assert_eq!(refused(room.admit(Some(&t.token), "mallory").await), "ticket_not_yours");
        // Moving the number ahead breaks the signature.
        let mut parts: Vec<String> = t.token.split('.').map(String::from).collect();
        parts[0] = "1".into();
        assert_eq!(
            refused(room.admit(Some(&parts.join(".")), "bob").await),
            "ticket_invalid"
        );
        assert_eq!(refused(room.admit(Some("garbage"), "bob").await), "ticket_invalid");
        // Signed by another room (another secret).
        let other = {
            let config = WaitingRoom {
                enabled: true,
                secret: "another-secret-of-thirty-two-bytes-or-more".into(),
                ..WaitingRoom::default()
            };
            Room::new(&config, Arc::new(Metrics::new())).unwrap()
        };
        assert_eq!(refused(other.admit(Some(&t.token), "bob").await), "ticket_invalid");
        // Expired: signed with an expiry in the past.
        let mut p: Vec<&str> = t.token.split('.').collect();
        p.truncate(5);
        let old = room.sign(p[0].parse().unwrap(), p[1], 1, 2, p[4]);
        assert_eq!(refused(room.admit(Some(&old), "bob").await), "ticket_expired");
    }

    #[test]
    fn the_ticket_comes_from_the_header_or_the_cookie() {
        let cookies = || vec!["a=b; waiting_room=T1".to_string()].into_iter();
        assert_eq!(presented_ticket(Some("T0"), cookies()).as_deref(), Some("T0"));
        assert_eq!(presented_ticket(None, cookies()).as_deref(), Some("T1"));
        assert_eq!(presented_ticket(None, std::iter::empty()), None);
    }
}
