//! Prometheus alert rules generated from a MallDeployment's SLOs (seed 001's rules by default), and
//! the `promtool test rules` unit tests that show each one firing on a synthetic series and staying
//! silent below its threshold.
//!
//! Series are selected by `namespace` and `service` (the labels a ServiceMonitor gives them); every
//! alert carries `malldeployment` and `namespace` so the webhook knows what to scale, and the ones
//! that should add capacity carry `action: scale_up`. One more, `MallMonitoringHeartbeat`, always
//! fires (Alertmanager's Watchdog pattern, `action: heartbeat`): while its notifications keep
//! arriving the operator knows a resolved alert means the load went down, not that Prometheus or
//! Alertmanager went away.

use serde::Serialize;
use serde_json::{json, Value};

use crate::crd::MallDeployment;
use crate::crd::Tuning;
use crate::quantity::bytes as parse_bytes;

#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct Rule {
    pub alert: String,
    pub expr: String,
    #[serde(rename = "for")]
    pub for_: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub annotations: std::collections::BTreeMap<String, String>,
}

/// One rule group, as a PrometheusRule's `spec.groups[0]` and as a promtool rule file.
pub fn rules(md: &MallDeployment, tuning: &Tuning) -> Vec<Rule> {
    let name = md.metadata.name.clone().unwrap_or_default();
    let ns = md.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let slo = &md.spec.slo;
    let sel = format!("namespace=\"{ns}\",service=\"{name}\"");
    let mem_limit = parse_bytes(&md.spec.app.memory.limit).unwrap_or(512 * 1024 * 1024);

    let rule = |alert: &str, expr: String, for_: &str, severity: &str, scale: bool, summary: String| {
        let mut labels = std::collections::BTreeMap::new();
        labels.insert("severity".to_string(), severity.to_string());
        labels.insert("malldeployment".to_string(), name.clone());
        labels.insert("namespace".to_string(), ns.clone());
        if scale {
            labels.insert("action".to_string(), "scale_up".to_string());
        }
        let mut annotations = std::collections::BTreeMap::new();
        annotations.insert("summary".to_string(), summary);
        Rule {
            alert: alert.into(),
            expr,
            for_: for_.into(),
            labels,
            annotations,
        }
    };
    let qps = format!("sum by (pod) (rate(sidecar_http_requests_total{{{sel}}}[1m]))");
    let mut heartbeat = rule(
        HEARTBEAT,
        "vector(1)".into(),
        "0m",
        "none",
        false,
        "always firing: monitoring is alive (the operator holds alert-driven scale-down while it stops)".into(),
    );
    heartbeat.labels.insert("action".into(), "heartbeat".into());
    // A sidecar whose waiting room cannot reach Redis admits from a line of its own: the
    // operator says so in the `WaitingRoom` condition.
    let mut local_line = rule(
        WAITING_ROOM_LOCAL,
        format!("min by (pod) (sidecar_waiting_room_shared{{{sel}}}) == 0"),
        "1m",
        "warning",
        false,
        "{{ $labels.pod }}'s waiting room cannot reach Redis: it admits from a line of its own".into(),
    );
    local_line.labels.insert("action".into(), "waiting_room".into());
    vec![
        rule("HighQPS", format!("{qps} > {}", slo.high_qps), "2m", "warning", false,
            format!("{{{{ $labels.pod }}}} serves more than {} requests/s", slo.high_qps)),
        rule("CriticalQPS", format!("{qps} > {}", slo.critical_qps), "1m", "critical", true,
            format!("{{{{ $labels.pod }}}} serves more than {} requests/s", slo.critical_qps)),
        rule(
            "HighResponseTime",
            format!(
                "histogram_quantile(0.95, sum by (le) (rate(http_request_duration_seconds_bucket{{{sel}}}[5m]))) > {}",
                slo.p95_latency_ms / 1000.0
            ),
            "3m", "warning", true,
            format!("p95 response time above {} ms", slo.p95_latency_ms),
        ),
        rule(
            "HighErrorRate",
            format!(
                "sum(rate(sidecar_http_requests_total{{{sel},status=~\"5..\"}}[5m])) / sum(rate(sidecar_http_requests_total{{{sel}}}[5m])) > {}",
                slo.error_rate_percent / 100.0
            ),
            "2m", "critical", false,
            format!("more than {} % of responses are 5xx", slo.error_rate_percent),
        ),
        rule(
            "DatabaseConnectionsHigh",
            format!(
                "max by (pod) (db_pool_connections{{{sel},pool=\"primary\",state=\"in_use\"}}) > {}",
                (tuning.db_max_connections as f64 * slo.db_connections_percent / 100.0).floor()
            ),
            "5m", "warning", true,
            format!("more than {} % of the {}-connection pool in use", slo.db_connections_percent, tuning.db_max_connections),
        ),
        rule(
            "HighMemoryUsage",
            format!("max by (pod) (process_resident_memory_bytes{{{sel}}}) > {}", (mem_limit as f64 * slo.memory_percent / 100.0).floor()),
            "5m", "warning", false,
            format!("app memory above {} % of its {} limit", slo.memory_percent, md.spec.app.memory.limit),
        ),
        rule(
            "CacheHitRateLow",
            format!(
                "sum(rate(sidecar_cache_requests_total{{{sel},result=~\"HIT|STALE\"}}[5m])) / sum(rate(sidecar_cache_requests_total{{{sel},result=~\"HIT|STALE|MISS\"}}[5m])) < {}",
                slo.cache_hit_rate_percent / 100.0
            ),
            "10m", "warning", false,
            format!("sidecar cache hit rate below {} %", slo.cache_hit_rate_percent),
        ),
        local_line,
        heartbeat,
    ]
}

/// The `alertname` of the always-firing heartbeat.
pub const HEARTBEAT: &str = "MallMonitoringHeartbeat";

/// The alert a pod's waiting room raises while it keeps a line of its own.
pub const WAITING_ROOM_LOCAL: &str = "WaitingRoomLocalLine";

/// The rule file promtool reads (and the PrometheusRule's `spec`).
pub fn rule_groups(md: &MallDeployment, tuning: &Tuning) -> Value {
    json!({ "groups": [{ "name": format!("mall-{}", md.metadata.name.clone().unwrap_or_default()), "rules": rules(md, tuning) }] })
}

/// A promtool unit-test file for `rules_file`: for each alert, a series above its threshold that
/// fires after the `for` duration and one below it that stays silent.
pub fn promtool_tests(md: &MallDeployment, tuning: &Tuning, rules_file: &str) -> Value {
    let name = md.metadata.name.clone().unwrap_or_default();
    let ns = md.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let slo = &md.spec.slo;
    let labels = |extra: &str| format!("{{namespace=\"{ns}\",service=\"{name}\",pod=\"p1\"{extra}}}");
    // Counters growing by `per_second` every 1m sample.
    let rate_series = |metric: &str, extra: &str, per_second: f64| json!({ "series": format!("{metric}{}", labels(extra)), "values": format!("0+{}x30", per_second * 60.0) });
    let gauge = |metric: &str, extra: &str, value: f64| json!({ "series": format!("{metric}{}", labels(extra)), "values": format!("{value}x30") });
    let alert_labels = |alert: &str, severity: &str, pod: bool, scale: bool| {
        let mut l = json!({ "alertname": alert, "severity": severity, "malldeployment": name, "namespace": ns });
        if pod {
            l["pod"] = json!("p1");
        }
        if scale {
            l["action"] = json!("scale_up");
        }
        l
    };
    let generated = rules(md, tuning);
    let case = |series: Vec<Value>, alert: &str, fires: Option<Value>| {
        // The summary as Prometheus expands it for pod `p1`.
        let summary = generated
            .iter()
            .find(|r| r.alert == alert)
            .map(|r| r.annotations["summary"].replace("{{ $labels.pod }}", "p1"));
        let expected = fires
            .map(|l| vec![json!({ "exp_labels": l, "exp_annotations": { "summary": summary } })])
            .unwrap_or_default();
        json!({
            "interval": "1m",
            "input_series": series,
            "alert_rule_test": [{ "eval_time": "15m", "alertname": alert, "exp_alerts": expected }]
        })
    };
    let lat = |le: &str, count_per_s: f64| {
        rate_series(
            "http_request_duration_seconds_bucket",
            &format!(",le=\"{le}\""),
            count_per_s,
        )
    };
    let slow = slo.p95_latency_ms / 1000.0;
    let pool_high = (tuning.db_max_connections as f64 * slo.db_connections_percent / 100.0).floor();
    let mem_limit = parse_bytes(&md.spec.app.memory.limit).unwrap_or(512 * 1024 * 1024) as f64;
    let hits = |hit: f64, miss: f64| {
        vec![
            rate_series("sidecar_cache_requests_total", ",result=\"HIT\"", hit),
            rate_series("sidecar_cache_requests_total", ",result=\"MISS\"", miss),
        ]
    };
    let requests = |ok: f64, err: f64| {
        vec![
            rate_series("sidecar_http_requests_total", ",status=\"200\"", ok),
            rate_series("sidecar_http_requests_total", ",status=\"503\"", err),
        ]
    };
    let tests = vec![
        case(
            vec![rate_series(
                "sidecar_http_requests_total",
                ",status=\"200\"",
                slo.high_qps * 1.5,
            )],
            "HighQPS",
            Some(alert_labels("HighQPS", "warning", true, false)),
        ),
        case(
            vec![rate_series(
                "sidecar_http_requests_total",
                ",status=\"200\"",
                slo.high_qps * 0.5,
            )],
            "HighQPS",
            None,
        ),
        case(
            vec![rate_series(
                "sidecar_http_requests_total",
                ",status=\"200\"",
                slo.critical_qps * 1.5,
            )],
            "CriticalQPS",
            Some(alert_labels("CriticalQPS", "critical", true, true)),
        ),
        case(
            vec![rate_series(
                "sidecar_http_requests_total",
                ",status=\"200\"",
                slo.critical_qps * 0.5,
            )],
            "CriticalQPS",
            None,
        ),
        // Every request slower than the threshold vs every request faster.
        case(
            vec![
                lat(&format!("{}", slow / 2.0), 0.0),
                lat(&format!("{}", slow * 4.0), 10.0),
                lat("+Inf", 10.0),
            ],
            "HighResponseTime",
            Some(alert_labels("HighResponseTime", "warning", false, true)),
        ),
        case(
            vec![
                lat(&format!("{}", slow / 2.0), 10.0),
                lat(&format!("{}", slow * 4.0), 10.0),
                lat("+Inf", 10.0),
            ],
            "HighResponseTime",
            None,
        ),
        case(
            requests(90.0, 10.0),
            "HighErrorRate",
            Some(alert_labels("HighErrorRate", "critical", false, false)),
        ),
        case(requests(100.0, 0.0), "HighErrorRate", None),
        case(
            vec![gauge(
                "db_pool_connections",
                ",pool=\"primary\",state=\"in_use\"",
                pool_high + 1.0,
            )],
            "DatabaseConnectionsHigh",
            Some(alert_labels("DatabaseConnectionsHigh", "warning", true, true)),
        ),
        case(
            vec![gauge(
                "db_pool_connections",
                ",pool=\"primary\",state=\"in_use\"",
                (pool_high - 1.0).max(0.0),
            )],
            "DatabaseConnectionsHigh",
            None,
        ),
        case(
            vec![gauge("process_resident_memory_bytes", "", mem_limit * 0.95)],
            "HighMemoryUsage",
            Some(alert_labels("HighMemoryUsage", "warning", true, false)),
        ),
        case(
            vec![gauge("process_resident_memory_bytes", "", mem_limit * 0.5)],
            "HighMemoryUsage",
            None,
        ),
        case(
            hits(50.0, 50.0),
            "CacheHitRateLow",
            Some(alert_labels("CacheHitRateLow", "warning", false, false)),
        ),
        case(hits(99.0, 1.0), "CacheHitRateLow", None),
        case(
            vec![gauge("sidecar_waiting_room_shared", "", 0.0)],
            WAITING_ROOM_LOCAL,
            Some({
                let mut l = alert_labels(WAITING_ROOM_LOCAL, "warning", true, false);
                l["action"] = json!("waiting_room");
                l
            }),
        ),
        case(
            vec![gauge("sidecar_waiting_room_shared", "", 1.0)],
            WAITING_ROOM_LOCAL,
            None,
        ),
        case(vec![], HEARTBEAT, {
            let mut l = alert_labels(HEARTBEAT, "none", false, false);
            l["action"] = json!("heartbeat");
            Some(l)
        }),
    ];
    json!({ "rule_files": [rules_file], "evaluation_interval": "1m", "tests": tests })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_alert_is_labelled_and_scale_ups_are_marked() {
        let md: MallDeployment = serde_json::from_value(json!({
            "apiVersion": "mall.example.com/v1alpha1", "kind": "MallDeployment",
            "metadata": {"name": "shop", "namespace": "prod"}, "spec": {}
        }))
        .unwrap();
        let tuning = crate::tuning::tune(&md.spec);
        let rules = rules(&md, &tuning);
        let names: Vec<&str> = rules.iter().map(|r| r.alert.as_str()).collect();
        assert_eq!(
            names,
            [
                "HighQPS",
                "CriticalQPS",
                "HighResponseTime",
                "HighErrorRate",
                "DatabaseConnectionsHigh",
                "HighMemoryUsage",
                "CacheHitRateLow",
                "WaitingRoomLocalLine",
                "MallMonitoringHeartbeat"
            ]
        );
        for r in &rules {
            assert_eq!(r.labels["malldeployment"], "shop");
            assert_eq!(r.labels["namespace"], "prod");
            if r.alert != HEARTBEAT {
                assert!(r.expr.contains("namespace=\"prod\",service=\"shop\""), "{}", r.expr);
            }
        }
        let scaling: Vec<&str> = rules
            .iter()
            .filter(|r| r.labels.get("action").map(String::as_str) == Some("scale_up"))
            .map(|r| r.alert.as_str())
            .collect();
        assert_eq!(scaling, ["CriticalQPS", "HighResponseTime", "DatabaseConnectionsHigh"]);
        assert!(rules[0].expr.ends_with("> 1000"));
        assert!(rules[2].expr.ends_with("> 0.1"));
    }
}
