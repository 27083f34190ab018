//! What the standard OpenTelemetry environment variables ask for (the SDK specification's
//! "Environment Variable Specification" and the OTLP exporter's), so `scripts/run.sh`, the
//! operator's pods and any platform's injection configure both programs the same way.
//! Tracing is off unless an endpoint is set.

use std::time::Duration;

use crate::sampler::{Root, Sampler};
use crate::span::Value;

#[derive(Clone, Debug)]
pub struct TraceConfig {
    /// Where spans are POSTed (`http://host:4318/v1/traces`).
    pub endpoint: String,
    /// Extra request headers (an API key for a hosted backend).
    pub headers: Vec<(String, String)>,
    pub sampler: Sampler,
    /// `service.name` and the rest of `OTEL_RESOURCE_ATTRIBUTES`.
    pub resource: Vec<(String, Value)>,
    /// Spans waiting for export; more are dropped (and counted).
    pub queue: usize,
    /// Spans per request to the collector.
    pub batch: usize,
    /// The longest a finished span waits for its batch.
    pub flush_every: Duration,
    /// One export request's connect-and-answer budget.
    pub timeout: Duration,
}

impl TraceConfig {
    /// From the process environment. `Ok(None)`: tracing is off.
    pub fn from_env(default_service: &str) -> Result<Option<TraceConfig>, String> {
        TraceConfig::from_vars(default_service, |k| std::env::var(k).ok())
    }

    /// From `var` (the environment in production, a map in tests).
    pub fn from_vars(
        default_service: &str,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<TraceConfig>, String> {
        let var = |k: &str| var(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
            || var("OTEL_TRACES_EXPORTER").is_some_and(|v| v == "none")
        {
            return Ok(None);
        }
        let endpoint = match (
            var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            var("OTEL_EXPORTER_OTLP_ENDPOINT"),
        ) {
            // The signal-specific URL is used as given.
            (Some(url), _) => url,
            // The base URL gets the signal's path.
            (None, Some(base)) => format!("{}/v1/traces", base.trim_end_matches('/')),
            (None, None) => return Ok(None),
        };
        if let Some(p) = var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL")) {
            if p != "http/protobuf" {
                return Err(format!(
                    "OTEL_EXPORTER_OTLP_PROTOCOL: {p:?} is not supported; spans are exported as http/protobuf"
                ));
            }
        }
        crate::export::Target::parse(&endpoint)
            .map_err(|e| format!("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT {endpoint:?}: {e}"))?;
        let mut headers = Vec::new();
        for name in ["OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS"] {
            if let Some(list) = var(name) {
                for (k, v) in pairs(&list).map_err(|e| format!("{name}: {e}"))? {
                    headers.retain(|(old, _): &(String, String)| !old.eq_ignore_ascii_case(&k));
                    headers.push((k, v));
                }
            }
        }
        let arg = var("OTEL_TRACES_SAMPLER_ARG");
        let ratio = || -> Result<f64, String> {
            match &arg {
                None => Ok(1.0),
                Some(a) => a
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| format!("OTEL_TRACES_SAMPLER_ARG: {a:?} is not a ratio between 0 and 1")),
            }
        };
        let sampler = match var("OTEL_TRACES_SAMPLER").as_deref().unwrap_or("parentbased_always_on") {
            "always_on" => Sampler::AlwaysOn,
            "always_off" => Sampler::AlwaysOff,
            "traceidratio" => Sampler::Ratio(ratio()?),
            "parentbased_always_on" => Sampler::ParentBased(Root::AlwaysOn),
            "parentbased_always_off" => Sampler::ParentBased(Root::AlwaysOff),
            "parentbased_traceidratio" => Sampler::ParentBased(Root::Ratio(ratio()?)),
            other => {
                return Err(format!(
                    "OTEL_TRACES_SAMPLER: {other:?} is not one of always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off, parentbased_traceidratio"
                ))
            }
        };
        let mut resource: Vec<(String, Value)> = Vec::new();
        if let Some(list) = var("OTEL_RESOURCE_ATTRIBUTES") {
            for (k, v) in pairs(&list).map_err(|e| format!("OTEL_RESOURCE_ATTRIBUTES: {e}"))? {
                resource.push((k, v.into()));
            }
        }
        // OTEL_SERVICE_NAME wins over a service.name in the attributes.
        let service = var("OTEL_SERVICE_NAME")
            .or_else(|| {
                resource
                    .iter()
                    .find(|(k, _)| k == "service.name")
                    .and_then(|(_, v)| match v {
                        Value::Str(s) => Some(s.to_string()),
                        _ => None,
                    })
            })
            .unwrap_or_else(|| default_service.to_string());
        resource.retain(|(k, _)| k != "service.name");
        resource.insert(0, ("service.name".into(), service.into()));
        Ok(Some(TraceConfig {
            endpoint,
            headers,
            sampler,
            resource,
            queue: 4096,
            batch: 512,
            flush_every: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
        }))
    }
}

/// `key=value,key2=value2` with percent-encoded values (W3C Baggage's format, as the OTel
/// specification asks for headers and resource attributes).
fn pairs(list: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?} is not key=value"))?;
        let k = k.trim();
        if k.is_empty() {
            return Err(format!("{item:?} has no key"));
        }
        out.push((
            k.to_string(),
            percent_decode(v.trim()).ok_or_else(|| format!("{item:?}: bad percent-encoding"))?,
        ));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<Option<TraceConfig>, String> {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        TraceConfig::from_vars("mall-app", |k| vars.get(k).cloned())
    }

    #[test]
    fn off_without_an_endpoint_or_when_disabled() {
        assert!(config(&[]).unwrap().is_none());
        assert!(config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_SDK_DISABLED", "true")
        ])
        .unwrap()
        .is_none());
    }

    #[test]
    fn the_base_endpoint_gets_the_signal_path_and_the_signal_endpoint_is_kept() {
        let c = config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")])
            .unwrap()
            .unwrap();
        assert_eq!(c.endpoint, "http://collector:4318/v1/traces");
        let c = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://other:9999/custom"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(c.endpoint, "http://other:9999/custom");
    }

    #[test]
    fn sampler_headers_and_resource_as_the_specification_spells_them() {
        let c = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=a%20b, x-tenant=shop"),
            ("OTEL_RESOURCE_ATTRIBUTES", "service.name=ignored,k8s.pod.name=shop-1"),
            ("OTEL_SERVICE_NAME", "checkout"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(c.sampler, Sampler::ParentBased(Root::Ratio(0.25)));
        assert_eq!(
            c.headers,
            [("api-key".into(), "a b".into()), ("x-tenant".into(), "shop".into())]
        );
        assert_eq!(c.resource[0], ("service.name".into(), "checkout".to_string().into()));
        assert_eq!(c.resource[1], ("k8s.pod.name".into(), "shop-1".to_string().into()));
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = |vars: &[(&str, &str)]| config(vars).unwrap_err();
        let base = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318");
        assert!(e(&[base, ("OTEL_TRACES_SAMPLER", "sometimes")]).starts_with("OTEL_TRACES_SAMPLER:"));
        assert!(e(&[
            base,
            ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "2")
        ])
        .starts_with("OTEL_TRACES_SAMPLER_ARG:"));
        assert!(e(&[base, ("OTEL_EXPORTER_OTLP_HEADERS", "novalue")]).starts_with("OTEL_EXPORTER_OTLP_HEADERS:"));
        assert!(e(&[base, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]).starts_with("OTEL_EXPORTER_OTLP_PROTOCOL:"));
        assert!(
            e(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")]).starts_with("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        );
    }
}
