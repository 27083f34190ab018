//! The waiting room's decisions, read from the mall's own pods for the `WaitingRoom` condition:
//! each sidecar counts what its room issued, handed back and refused
//! (`sidecar_waiting_room_tickets_total{outcome}`). While a sale's room is on, the operator sums
//! those counters over the mall's running pods at most every [`REFRESH_SECS`] and keeps the sums
//! in `status.waitingRoom`, so `kubectl describe` says how many numbers were refused or reused,
//! and why, without a Prometheus.
//!
//! Counters start at zero with each sidecar: the sums are "since the running pods started", and
//! a pod that could not be read is counted in `pods` but not in `podsRead`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::context::{rfc3339, Context};
use crate::crd::{MallDeployment, WaitingRoomStatus};
use crate::desired;

/// How often the pods are read while a room is on. The status write this causes triggers another
/// reconcile, which must not read them again (that would loop as fast as the API answers).
pub const REFRESH_SECS: i64 = 30;

/// The longest one pod's metrics may take to answer.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// The sidecar's counter of room decisions (the sidecar's registry prefixes `sidecar_`).
const METRIC: &str = "sidecar_waiting_room_tickets_total";

/// The room's counts as of `now`: the previous ones while fresh, else read from the pods. `None`
/// when the pods cannot be listed (logged; the condition then says nothing of counts).
pub async fn refresh(
    ctx: &Context,
    md: &MallDeployment,
    previous: Option<&WaitingRoomStatus>,
    now: i64,
) -> Option<WaitingRoomStatus> {
    if let Some(p) = previous.filter(|p| now - p.observed_at_unix < REFRESH_SECS && now >= p.observed_at_unix) {
        return Some(p.clone());
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &desired::namespace(md));
    let list = match pods
        .list(&ListParams::default().labels(&desired::selector_string(md)))
        .await
    {
        Ok(list) => list,
        Err(e) => {
            tracing::warn!(name = %desired::name(md), error = %e, "cannot list the mall's pods to read their waiting rooms");
            return previous.cloned();
        }
    };
    let targets: Vec<SocketAddr> = list.items.iter().filter_map(admin_address).collect();
    let reads = futures_util::future::join_all(targets.iter().map(|a| read_pod(*a))).await;
    let mut status = WaitingRoomStatus {
        observed_at: rfc3339(now),
        observed_at_unix: now,
        pods: targets.len() as u32,
        ..Default::default()
    };
    for (addr, read) in targets.iter().zip(reads) {
        match read {
            Ok(counts) => {
                status.pods_read += 1;
                for (outcome, n) in counts {
                    *status.decisions.entry(outcome).or_default() += n;
                }
            }
            Err(e) => tracing::info!(%addr, error = %e, "a pod's waiting room could not be read"),
        }
    }
    Some(status)
}

/// A running pod's sidecar admin address (its IP and the container port named `admin`).
pub fn admin_address(pod: &Pod) -> Option<SocketAddr> {
    port_address(pod, "admin")
}

/// A running pod's IP with its container port named `port`.
pub fn port_address(pod: &Pod, port: &str) -> Option<SocketAddr> {
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() != Some("Running") || pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let ip = status.pod_ip.as_deref()?.parse().ok()?;
    let number = pod
        .spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(port))?
        .container_port;
    Some(SocketAddr::new(ip, u16::try_from(number).ok()?))
}

/// One sidecar's room decisions by outcome, from its `/metrics`.
pub async fn read_pod(addr: SocketAddr) -> Result<BTreeMap<String, u64>, String> {
    let text = scrape(addr).await?;
    Ok(counter_by_label(&text, METRIC, "outcome"))
}

/// The `/metrics` text at `addr`, within [`SCRAPE_TIMEOUT`].
pub async fn scrape(addr: SocketAddr) -> Result<String, String> {
    tokio::time::timeout(SCRAPE_TIMEOUT, get_metrics(addr))
        .await
        .map_err(|_| format!("no answer within {SCRAPE_TIMEOUT:?}"))?
}

/// `GET /metrics` as HTTP/1.0 with `Connection: close`, so no chunked coding comes back. The body
/// ends at its `Content-Length`, else at the connection's close (RFC 9112 section 6.3): a server
/// that keeps the connection open anyway (the sidecar's admin port does) still ends the read.
async fn get_metrics(addr: SocketAddr) -> Result<String, String> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    const MAX: usize = 8 << 20;
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = stream.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if raw.len() > MAX {
            return Err(format!("more than {MAX} bytes"));
        }
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let length = content_length(&String::from_utf8_lossy(&raw[..end]));
            if length.is_some_and(|len| raw.len() >= end + 4 + len) {
                break;
            }
        }
    }
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw.split_once("\r\n\r\n").ok_or("no end of headers")?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        return Err(format!("status {status}"));
    }
    Ok(match content_length(head) {
        Some(len) if body.len() >= len => body[..len].to_string(),
        _ => body.to_string(),
    })
}

/// The `Content-Length` of a response's header block.
fn content_length(head: &str) -> Option<usize> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())?
    })
}

/// Sums `metric`'s samples by the value of `label`, from the Prometheus text format.
pub fn counter_by_label(text: &str, metric: &str, label: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (name, labels, value) in crate::rollout::samples(text) {
        if name != metric {
            continue;
        }
        if let Some(key) = crate::rollout::label(&labels, label) {
            *out.entry(key.to_string()).or_default() += value.max(0.0) as u64;
        }
    }
    out
}

/// The counts in the words of the `WaitingRoom` condition.
pub fn summary(s: &WaitingRoomStatus) -> String {
    let n = |k: &str| s.decisions.get(k).copied().unwrap_or(0);
    let mut refused = Vec::new();
    for (key, words) in [
        ("unbound", "without credentials"),
        ("address_limited", "over the per-address limit on new numbers"),
        ("readmit_refused", "admitted already"),
        ("rejected", "with a forged, edited or used ticket"),
    ] {
        if n(key) > 0 {
            refused.push(format!("{} {words}", n(key)));
        }
    }
    let refused = if refused.is_empty() {
        "none refused".to_string()
    } else {
        format!("refused {}", refused.join(", "))
    };
    format!(
        "since the running pods started ({} of {} read at {}): {} numbers issued, {} admitted; {} asks answered with the buyer's own place; {} no-shows passed over; {refused}",
        s.pods_read,
        s.pods,
        s.observed_at,
        n("issued"),
        n("admitted") + n("direct"),
        n("reused"),
        n("no_show"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_one_counter_by_outcome_and_ignores_the_rest() {
        let text = "# HELP sidecar_waiting_room_tickets_total Waiting-room decisions\n\
            # TYPE sidecar_waiting_room_tickets_total counter\n\
            sidecar_waiting_room_tickets_total{outcome=\"issued\"} 40\n\
            sidecar_waiting_room_tickets_total{outcome=\"reused\"} 29\n\
            sidecar_waiting_room_tickets_total{instance=\"x\",outcome=\"reused\"} 1\n\
            sidecar_waiting_room_tickets_total_other{outcome=\"issued\"} 7\n\
            sidecar_waiting_room_queue_length 3\n\
            sidecar_waiting_room_tickets_total{outcome=\"unbound\"} 2e2\n";
        let counts = counter_by_label(text, METRIC, "outcome");
        assert_eq!(
            counts,
            BTreeMap::from([("issued".into(), 40), ("reused".into(), 30), ("unbound".into(), 200)])
        );
    }

    #[test]
    fn the_summary_names_each_refusal_with_its_reason() {
        let s = WaitingRoomStatus {
            observed_at: "2026-12-06T10:00:00Z".into(),
            observed_at_unix: 0,
            pods: 2,
            pods_read: 2,
            decisions: BTreeMap::from([
                ("issued".into(), 5000),
                ("admitted".into(), 4000),
                ("reused".into(), 9980),
                ("unbound".into(), 200),
                ("address_limited".into(), 12),
            ]),
        };
        assert_eq!(
            summary(&s),
            "since the running pods started (2 of 2 read at 2026-12-06T10:00:00Z): 5000 numbers issued, 4000 admitted; 9980 asks answered with the buyer's own place; 0 no-shows passed over; refused 200 without credentials, 12 over the per-address limit on new numbers"
        );
    }
}
