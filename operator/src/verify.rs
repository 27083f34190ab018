//! Rules proven loaded: with a Prometheus URL configured (`--prometheus-url`), the operator asks
//! that Prometheus whether it has loaded the mall's alert rules (`/api/v1/rules`) and scrapes its
//! pods (`/api/v1/targets`), because a PrometheusRule or ServiceMonitor whose labels the
//! Prometheus does not select is silently ignored (prometheus-operator #2851, kube-prometheus
//! #1392). The answer goes to `status.monitoring` and the `MonitoringVerified` condition.
//!
//! Answers are kept for a minute per mall, so reconciles do not hammer Prometheus.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

/// What Prometheus said about one mall.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Checked {
        /// Alert rules of this mall that Prometheus has loaded, and how many were generated.
        rules_found: u32,
        rules_expected: u32,
        /// Active scrape targets of this mall, and how many of them are up.
        targets: u32,
        targets_up: u32,
    },
    Unreachable(String),
}

pub struct PrometheusCheck {
    base: String,
    client: reqwest::Client,
    cache: Mutex<HashMap<(String, String), (Instant, Verdict)>>,
    pub ttl: Duration,
}

impl PrometheusCheck {
    pub fn new(base: &str) -> Result<Self, String> {
        if !base.starts_with("http://") {
            return Err(format!(
                "--prometheus-url {base}: use the Prometheus Service's in-cluster http:// URL"
            ));
        }
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .user_agent(crate::user_agent())
            .build()
            .map_err(|e| e.to_string())?;
        Ok(PrometheusCheck {
            base: base.trim_end_matches('/').to_string(),
            client,
            cache: Mutex::new(HashMap::new()),
            ttl: Duration::from_secs(60),
        })
    }

    /// The verdict for the mall `ns/name` whose generated alerts are `alerts`.
    pub async fn verdict(&self, ns: &str, name: &str, alerts: &[String]) -> Verdict {
        let key = (ns.to_string(), name.to_string());
        if let Some((at, verdict)) = self.cache.lock().expect("cache").get(&key) {
            if at.elapsed() < self.ttl {
                return verdict.clone();
            }
        }
        let verdict = match self.ask(ns, name, alerts).await {
            Ok(v) => v,
            Err(e) => Verdict::Unreachable(e),
        };
        self.cache
            .lock()
            .expect("cache")
            .insert(key, (Instant::now(), verdict.clone()));
        verdict
    }

    /// The base URL, as configured.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// An instant query (`/api/v1/query`) evaluated at `time` (Unix seconds): each series of the
    /// vector it answers, with its labels.
    pub async fn query(&self, promql: &str, time: i64) -> Result<Vec<Series>, String> {
        let request = self
            .client
            .get(format!("{}/api/v1/query", self.base))
            .query(&[("query", promql), ("time", &time.to_string())]);
        let data = answer(request).await.map_err(|e| format!("{promql}: {e}"))?;
        if data["resultType"] != "vector" {
            return Err(format!(
                "{promql}: a {} where a vector was expected",
                data["resultType"]
            ));
        }
        Ok(data["result"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| {
                let labels = r["metric"]
                    .as_object()?
                    .iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect();
                // The value is `[time, "text"]`; NaN (0 / 0) and infinities say nothing.
                let value = r["value"][1].as_str()?.parse::<f64>().ok().filter(|v| v.is_finite())?;
                Some((labels, value))
            })
            .collect())
    }

    async fn get(&self, path: &str) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        answer(self.client.get(&url)).await.map_err(|e| format!("{url}: {e}"))
    }

    async fn ask(&self, ns: &str, name: &str, alerts: &[String]) -> Result<Verdict, String> {
        let rules = self.get("/api/v1/rules?type=alert").await?;
        let targets = self.get("/api/v1/targets?state=active").await?;
        Ok(judge(&rules, &targets, ns, name, alerts))
    }
}

/// One series of a query's answer: its labels and value.
pub type Series = (BTreeMap<String, String>, f64);

/// The `data` of a Prometheus API answer, or what went wrong.
async fn answer(request: reqwest::RequestBuilder) -> Result<Value, String> {
    let body: Value = request
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    if body["status"] != "success" {
        return Err(body["error"].to_string());
    }
    Ok(body["data"].clone())
}

/// Counts, in Prometheus' answers, the mall's loaded alert rules and its targets.
pub fn judge(rules: &Value, targets: &Value, ns: &str, name: &str, alerts: &[String]) -> Verdict {
    let ours =
        |labels: &Value| labels["namespace"] == ns && (labels["malldeployment"] == name || labels["service"] == name);
    let loaded: Vec<&str> = rules["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .filter(|r| ours(&r["labels"]))
        .filter_map(|r| r["name"].as_str())
        .collect();
    let rules_found = alerts.iter().filter(|a| loaded.contains(&a.as_str())).count() as u32;
    let mine: Vec<&Value> = targets["activeTargets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| ours(&t["labels"]))
        .collect();
    Verdict::Checked {
        rules_found,
        rules_expected: alerts.len() as u32,
        targets: mine.len() as u32,
        targets_up: mine.iter().filter(|t| t["health"] == "up").count() as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn counts_the_malls_rules_and_targets_only() {
        let rules = json!({ "groups": [{ "rules": [
            { "name": "HighQPS", "labels": { "namespace": "shop", "malldeployment": "demo" } },
            { "name": "CriticalQPS", "labels": { "namespace": "shop", "malldeployment": "demo" } },
            { "name": "HighQPS", "labels": { "namespace": "other", "malldeployment": "demo" } }
        ] }] });
        let targets = json!({ "activeTargets": [
            { "labels": { "namespace": "shop", "service": "demo" }, "health": "up" },
            { "labels": { "namespace": "shop", "service": "demo" }, "health": "down" },
            { "labels": { "namespace": "shop", "service": "elsewhere" }, "health": "up" }
        ] });
        let alerts = vec![
            "HighQPS".to_string(),
            "CriticalQPS".to_string(),
            "HighErrorRate".to_string(),
        ];
        assert_eq!(
            judge(&rules, &targets, "shop", "demo", &alerts),
            Verdict::Checked {
                rules_found: 2,
                rules_expected: 3,
                targets: 2,
                targets_up: 1
            }
        );
    }
}
