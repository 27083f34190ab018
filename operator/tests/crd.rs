//! The committed CRD is what the code generates, and `kubectl explain` has something to say about
//! every field.

use kube::CustomResourceExt;
use mall_operator::crd::MallDeployment;

#[test]
fn committed_crd_is_current() {
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/malldeployment.yaml")).unwrap();
    assert!(
        committed == mall_operator::render::crd_yaml(),
        "crds/malldeployment.yaml is stale: run `cargo run -p mall-operator --bin crdgen > crds/malldeployment.yaml`"
    );
}

fn undocumented(path: &str, schema: &serde_json::Value, out: &mut Vec<String>) {
    if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
        for (name, prop) in props {
            let here = format!("{path}.{name}");
            if prop.get("description").is_none() && !matches!(name.as_str(), "apiVersion" | "kind" | "metadata") {
                out.push(here.clone());
            }
            undocumented(&here, prop, out);
        }
    }
    if let Some(items) = schema.get("items") {
        undocumented(&format!("{path}[]"), items, out);
    }
}

#[test]
fn every_field_has_a_description() {
    let crd = serde_json::to_value(MallDeployment::crd()).unwrap();
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let mut missing = Vec::new();
    undocumented("", schema, &mut missing);
    assert!(missing.is_empty(), "fields without a description: {missing:#?}");
    let crd = MallDeployment::crd();
    let version = &crd.spec.versions[0];
    let scale = version.subresources.as_ref().unwrap().scale.as_ref().unwrap();
    assert_eq!(scale.spec_replicas_path, ".spec.replicas");
    assert!(version.subresources.as_ref().unwrap().status.is_some());
    assert_eq!(crd.spec.names.short_names.as_deref(), Some(&["mall".to_string()][..]));
}

#[path = "support/apiserver_cel.rs"]
mod apiserver_cel;

use apiserver_cel::{Env, PER_CRD_LIMIT, PER_RULE_LIMIT};
use serde_json::{json, Value};

/// docs/kubernetes.md: the oldest Kubernetes the chart supports, and the newest tried.
const OLDEST_SUPPORTED_MINOR: u32 = 29;
const NEWEST_TRIED_MINOR: u32 = 33;

fn schema() -> Value {
    let crd = serde_json::to_value(mall_operator::crd::definition()).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

#[test]
fn every_rule_compiles_in_the_api_servers_cel_environment_within_its_cost_limits() {
    let rules = apiserver_cel::rules(&schema());
    assert!(rules.len() >= 10, "found {} rules", rules.len());
    for minor in OLDEST_SUPPORTED_MINOR..=NEWEST_TRIED_MINOR {
        let env = Env::for_server(minor);
        let mut total = 0.0;
        for found in &rules {
            let compiled = env.compile(&found.rule, &found.schema, found.root).unwrap_or_else(|e| {
                panic!(
                    "Kubernetes 1.{minor} refuses the rule at {}: {e}\n  rule: {}",
                    found.path, found.rule
                )
            });
            let cost = compiled.cost * found.cardinality;
            assert!(
                cost <= PER_RULE_LIMIT,
                "the rule at {} costs {cost} (x{} runs), over the per-rule limit {PER_RULE_LIMIT}: {}",
                found.path,
                found.cardinality,
                found.rule
            );
            total += cost;
        }
        assert!(
            total <= PER_CRD_LIMIT,
            "the CRD's rules cost {total}, over {PER_CRD_LIMIT}"
        );
    }
}

/// The checker itself refuses what a real kube-apiserver refused, and accepts its documented forms.
#[test]
fn the_cel_environment_declares_methods_and_globals_as_the_api_server_does() {
    let string = json!({"type": "string", "maxLength": 10});
    let env = Env::for_server(32);
    let refused = env.compile("quantity(self).sign() > 0", &string, false).unwrap_err();
    assert!(
        refused.contains("found no matching overload for 'sign' applied to 'kubernetes.Quantity.()'"),
        "{refused}"
    );
    for ok in [
        "sign(quantity(self)) > 0",
        "quantity(self).compareTo(quantity('1')) < 0",
        "quantity(self).isGreaterThan(quantity('1'))",
        "quantity(self).asApproximateFloat() > 0.5",
        "isQuantity(self) && self.matches('^[0-9]+$')",
        "url(self).getHost() == 'x'",
        "self.split(',').size() == 2",
        "[1, 2, 3].isSorted()",
        "isIP(self)",
    ] {
        env.compile(ok, &string, false).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    for (bad, why) in [
        (
            "self.quantity().sign() > 0",
            "undeclared reference|no matching overload",
        ),
        ("self.isGreaterThan(self)", "no matching overload"),
        ("compareTo(quantity(self), quantity(self)) > 0", "no matching overload"),
        ("self.size() == 1.0", "no matching overload"),
        ("self.nope == 1", "does not support field selection"),
        ("size(self) == '1'", "no matching overload"),
    ] {
        let e = env.compile(bad, &string, false).unwrap_err();
        assert!(why.split('|').any(|w| e.contains(w)), "{bad}: {e}");
    }
    // Compiled in the compatibility version's environment: one minor below the server.
    assert!(Env::for_server(30).compile("isIP(self)", &string, false).is_err());
    assert!(Env::for_server(31).compile("isIP(self)", &string, false).is_ok());
    assert!(Env::for_server(28).compile("isQuantity(self)", &string, false).is_err());
    // Costs grow with what a rule may have to read.
    let unbounded = json!({"type": "string"});
    let short = env.compile("self.matches('^[a-z]+$')", &string, false).unwrap().cost;
    let long = env.compile("self.matches('^[a-z]+$')", &unbounded, false).unwrap().cost;
    assert!(long > 1000.0 * short, "{short} vs {long}");
}

/// What a kube-apiserver refuses, modelled: its OpenAPI validation (where kube-openapi compares a
/// JSON integer with a bound truncated to an integer), then the CEL rules on the defaulted object.
fn api_server_refuses(doc: &Value) -> Option<String> {
    let schema = schema();
    let mut errors = Vec::new();
    numeric_bounds(&schema, doc, "", &mut errors);
    let mut relaxed = schema.clone();
    strip_number_bounds(&mut relaxed);
    let validator = jsonschema::validator_for(&relaxed).unwrap();
    errors.extend(
        validator
            .iter_errors(doc)
            .map(|e| format!("{}: {e}", e.instance_path())),
    );
    if !errors.is_empty() {
        return Some(errors.join("; "));
    }
    // Defaults: what the API server's structural defaulting does, taken from the serde defaults
    // that generate the schema's `default`s.
    let md: mall_operator::crd::MallDeployment = serde_json::from_value(doc.clone()).ok()?;
    let defaulted = serde_json::to_value(md).unwrap();
    let compiled = kube::core::cel::compile_schema(&schema);
    kube::core::cel::Validator::new()
        .validate_compiled(&compiled, &defaulted, None)
        .err()
        .map(|e| format!("{e:?}"))
}

fn numeric_bounds(schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    if let Some(n) = value.as_number() {
        let integral = n.is_i64() || n.is_u64();
        let v = n.as_f64().unwrap();
        if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
            let min = if integral { min.trunc() } else { min };
            if v < min {
                errors.push(format!("{path}: should be greater than or equal to {min}"));
            }
        }
        if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
            let max = if integral { max.trunc() } else { max };
            if v > max {
                errors.push(format!("{path}: should be less than or equal to {max}"));
            }
        }
    }
    match value {
        Value::Object(fields) => {
            for (k, v) in fields {
                if let Some(s) = schema.get("properties").and_then(|p| p.get(k)) {
                    numeric_bounds(s, v, &format!("{path}/{k}"), errors);
                }
            }
        }
        Value::Array(items) => {
            if let Some(s) = schema.get("items") {
                for (i, v) in items.iter().enumerate() {
                    numeric_bounds(s, v, &format!("{path}/{i}"), errors);
                }
            }
        }
        _ => {}
    }
}

fn strip_number_bounds(schema: &mut Value) {
    if let Some(o) = schema.as_object_mut() {
        if o.get("type").and_then(Value::as_str) == Some("number") {
            o.remove("minimum");
            o.remove("maximum");
        }
        for v in o.values_mut() {
            strip_number_bounds(v);
        }
    } else if let Some(a) = schema.as_array_mut() {
        a.iter_mut().for_each(strip_number_bounds);
    }
}

fn mall(name: &str, spec: Value) -> Value {
    let mut base = json!({"replicas": 1, "minReplicas": 1, "maxReplicas": 1});
    base.as_object_mut().unwrap().extend(spec.as_object().unwrap().clone());
    json!({"apiVersion": "mall.example.com/v1alpha1", "kind": "MallDeployment",
           "metadata": {"name": name, "namespace": "default"}, "spec": base})
}

fn window(fields: Value) -> Value {
    let mut w = json!({"name": "sale", "start": "2026-11-27T09:00", "end": "2026-11-27T21:00", "minReplicas": 1});
    w.as_object_mut().unwrap().extend(fields.as_object().unwrap().clone());
    json!({"saleWindows": [w]})
}

fn rollout(fields: Value) -> Value {
    json!({"rollout": fields})
}

fn tracing(fields: Value) -> Value {
    let mut t = json!({"endpoint": "http://otel-collector.monitoring:4318"});
    t.as_object_mut().unwrap().extend(fields.as_object().unwrap().clone());
    json!({"observability": {"tracing": t}})
}

/// Each spec the operator refuses, the API server refuses too (and both name the field), so
/// `kubectl apply` and `operator render` agree.
#[test]
fn the_schema_refuses_what_the_operator_refuses() {
    let rule = |rps: Value| json!({"rateLimits": {"rules": [{"name": "orders", "path_prefix": "/api/orders", "requests_per_second": rps, "burst": 1}]}});
    let cases: Vec<(&str, Value, &str)> = vec![
        ("rps 0", mall("shop", rule(json!(0))), "requests_per_second"),
        ("rps 0.0005", mall("shop", rule(json!(0.0005))), "requests_per_second"),
        ("rps -1", mall("shop", rule(json!(-1))), "requests_per_second"),
        (
            "sale order limit 0",
            mall(
                "shop",
                window(json!({"orderLimit": {"requestsPerSecond": 0, "burst": 1}})),
            ),
            "requestsPerSecond",
        ),
        (
            "scale factor 1",
            mall("shop", json!({"autoscaling": {"scaleFactor": 1}})),
            "scaleFactor",
        ),
        ("name of 60 characters", mall(&"a".repeat(60), json!({})), "metadata"),
        ("name with capitals", mall("Shop", json!({})), "metadata"),
        (
            "sale ends before it starts",
            mall("shop", window(json!({"end": "2026-11-27T08:00"}))),
            "end",
        ),
        (
            "daily sale over a day",
            mall(
                "shop",
                window(json!({"recurrence": "daily", "end": "2026-11-28T10:00"})),
            ),
            "end",
        ),
        (
            "weekly sale over a week",
            mall(
                "shop",
                window(json!({"recurrence": "weekly", "end": "2026-12-05T10:00"})),
            ),
            "end",
        ),
        (
            "month 13",
            mall("shop", window(json!({"start": "2026-13-01T09:00"}))),
            "start",
        ),
        (
            "time zone with a space",
            mall("shop", window(json!({"timeZone": "Europe/ Berlin"}))),
            "timeZone",
        ),
        (
            "sample ratio 1.5",
            mall("shop", tracing(json!({"sampleRatio": 1.5}))),
            "sampleRatio",
        ),
        (
            "sample ratio 2",
            mall("shop", tracing(json!({"sampleRatio": 2}))),
            "sampleRatio",
        ),
        (
            "sample ratio -0.1",
            mall("shop", tracing(json!({"sampleRatio": -0.1}))),
            "sampleRatio",
        ),
        (
            "endpoint without a scheme",
            mall("shop", tracing(json!({"endpoint": "collector:4318"}))),
            "endpoint",
        ),
        (
            "endpoint with a query",
            mall("shop", tracing(json!({"endpoint": "http://collector:4318/?x=1"}))),
            "endpoint",
        ),
        (
            "endpoint with credentials",
            mall("shop", tracing(json!({"endpoint": "https://user:key@collector:4318"}))),
            "endpoint",
        ),
        (
            "endpoint ending in /v1/traces",
            mall("shop", tracing(json!({"endpoint": "http://collector:4318/v1/traces"}))),
            "endpoint",
        ),
        (
            "headers secret without a name",
            mall(
                "shop",
                tracing(json!({"headersSecret": {"name": "", "key": "headers"}})),
            ),
            "name",
        ),
        (
            "profiling token secret without a name",
            mall(
                "shop",
                json!({"observability": {"profiling": {"tokenSecret": {"name": "", "key": "token"}}}}),
            ),
            "name",
        ),
        (
            "profiling without a token secret",
            mall("shop", json!({"observability": {"profiling": {}}})),
            "tokenSecret",
        ),
        (
            "tracing without an endpoint",
            mall("shop", json!({"observability": {"tracing": {"sampleRatio": 0.5}}})),
            "endpoint",
        ),
        (
            "rollout steps out of order",
            mall("shop", rollout(json!({"steps": [{"weight": 50}, {"weight": 10}]}))),
            "steps",
        ),
        (
            "rollout step repeated",
            mall("shop", rollout(json!({"steps": [{"weight": 10}, {"weight": 10}]}))),
            "steps",
        ),
        (
            "rollout share over 100 %",
            mall("shop", rollout(json!({"steps": [{"weight": 50}, {"weight": 150}]}))),
            "weight",
        ),
        (
            "rollout share of 0",
            mall("shop", rollout(json!({"steps": [{"weight": 0}]}))),
            "weight",
        ),
        (
            "rollout without steps",
            mall("shop", rollout(json!({"steps": []}))),
            "steps",
        ),
        (
            "error threshold 0",
            mall("shop", rollout(json!({"thresholds": {"maxErrorRatioIncrease": 0}}))),
            "maxErrorRatioIncrease",
        ),
        (
            "order threshold 0",
            mall(
                "shop",
                rollout(json!({"thresholds": {"maxOrderFailureRatioIncrease": 0.0}})),
            ),
            "maxOrderFailureRatioIncrease",
        ),
        (
            "latency threshold 0",
            mall("shop", rollout(json!({"thresholds": {"maxP99IncreaseMs": 0}}))),
            "maxP99IncreaseMs",
        ),
        (
            "minimum requests 0",
            mall("shop", rollout(json!({"thresholds": {"minRequests": 0}}))),
            "minRequests",
        ),
        (
            "error threshold over 1",
            mall("shop", rollout(json!({"thresholds": {"maxErrorRatioIncrease": 1.5}}))),
            "maxErrorRatioIncrease",
        ),
    ];
    for (what, doc, field) in cases {
        let operator = serde_json::from_value::<mall_operator::crd::MallDeployment>(doc.clone())
            .map_err(|e| e.to_string())
            .and_then(|md| mall_operator::validation::validate(&md));
        let operator = operator.expect_err(&format!("{what}: the operator accepts it"));
        assert!(
            operator.contains(field),
            "{what}: the operator's message does not name {field}: {operator}"
        );
        let server = api_server_refuses(&doc)
            .unwrap_or_else(|| panic!("{what}: the API server would accept it; the operator says {operator}"));
        assert!(
            server.contains(field),
            "{what}: the API server's message does not name {field}: {server}"
        );
    }
    // And a valid spec passes both.
    let good = mall("shop", rule(json!(0.5)));
    assert_eq!(api_server_refuses(&good), None);
    for rollout in [
        rollout(json!({})),
        rollout(
            json!({"strategy": "canary", "steps": [{"weight": 5, "watchSeconds": 300}, {"weight": 25}, {"weight": 100}],
                       "thresholds": {"maxErrorRatioIncrease": 0.005, "maxP99IncreaseMs": 10, "maxOrderFailureRatioIncrease": 1, "minRequests": 1}}),
        ),
    ] {
        let doc = mall("shop", rollout);
        assert_eq!(api_server_refuses(&doc), None, "{doc}");
        let md: mall_operator::crd::MallDeployment = serde_json::from_value(doc.clone()).unwrap();
        assert_eq!(mall_operator::validation::validate(&md), Ok(()), "{doc}");
    }
    for tracing in [
        tracing(json!({})),
        tracing(json!({"sampleRatio": 0, "endpoint": "https://otlp.example.com/otlp/"})),
        tracing(json!({"sampleRatio": 1, "headersSecret": {"name": "otel-auth", "key": "headers"}})),
    ] {
        let doc = mall("shop", tracing);
        assert_eq!(api_server_refuses(&doc), None, "{doc}");
        let md: mall_operator::crd::MallDeployment = serde_json::from_value(doc.clone()).unwrap();
        assert_eq!(mall_operator::validation::validate(&md), Ok(()), "{doc}");
    }
}

/// The API server knows a few formats (int32, int64, float, double, byte, date-time, ...); any other
/// (`uint32`, `uint64`, which schemars derives from Rust's unsigned integers) makes every apply of
/// the CRD print `unrecognized format` warnings (issue 33).
#[test]
fn the_schema_uses_only_formats_the_api_server_knows() {
    fn formats(v: &serde_json::Value, path: &str, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(o) => {
                for (k, child) in o {
                    if k == "format" {
                        if let Some(f) = child.as_str() {
                            out.push(format!("{path}: {f}"));
                        }
                    } else {
                        formats(child, &format!("{path}.{k}"), out);
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|c| formats(c, path, out)),
            _ => {}
        }
    }
    let crd = serde_json::to_value(mall_operator::crd::definition()).unwrap();
    let mut found = Vec::new();
    formats(&crd["spec"]["versions"][0]["schema"], "", &mut found);
    let known = [
        "int32",
        "int64",
        "float",
        "double",
        "byte",
        "date",
        "date-time",
        "duration",
    ];
    let unknown: Vec<&String> = found
        .iter()
        .filter(|f| !known.contains(&f.rsplit(": ").next().unwrap()))
        .collect();
    assert!(unknown.is_empty(), "formats the API server does not know: {unknown:#?}");
}
