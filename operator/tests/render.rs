//! Golden tests of the desired state (`operator render` of every example) and `promtool` checks of
//! the generated alert rules: each alert fires on a synthetic series above its threshold and stays
//! silent below it.

use std::path::{Path, PathBuf};
use std::process::Command;

use mall_operator::crd::MallDeployment;
use mall_sidecar_config::SidecarConfig;
use serde::Deserialize;

fn examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "examples/ holds the MallDeployments");
    files
}

/// Goldens are rendered at fixed times (sale windows depend on the time): before any example's
/// sale, and (as `<example>.during-sale.yaml`) during the flash-sale example's Black Friday.
const BEFORE_SALES: &str = "2026-11-01T00:00:00Z";
const DURING_SALE: &str = "2026-11-27T08:00:00Z";

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples").join(name)
}

/// examples/production.yaml with its commented-out `observability` block switched on, so the
/// block a user would uncomment is what the golden file shows.
fn production_with_tracing() -> String {
    let text = std::fs::read_to_string(example("production.yaml")).unwrap();
    let (mut on, mut found) = (false, false);
    let mut out = String::new();
    for line in text.lines() {
        if line == "  # observability:" {
            (on, found) = (true, true);
        } else if !line.starts_with("  #   ") {
            on = false;
        }
        if on {
            out.push_str("  ");
            out.push_str(&line[4..]);
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    assert!(
        found,
        "examples/production.yaml shows spec.observability, commented out"
    );
    out
}

#[test]
fn rendered_manifests_match_the_golden_files() {
    let mut cases: Vec<(PathBuf, String, &str, String)> = examples()
        .into_iter()
        .map(|e| {
            let name = e.file_name().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(&e).unwrap();
            (e, text, BEFORE_SALES, name)
        })
        .collect();
    let sale = example("flash-sale.yaml");
    let text = std::fs::read_to_string(&sale).unwrap();
    cases.push((sale, text, DURING_SALE, "flash-sale.during-sale.yaml".into()));
    cases.push((
        example("production.yaml"),
        production_with_tracing(),
        BEFORE_SALES,
        "production.tracing.yaml".into(),
    ));
    for (example, text, at, golden_name) in cases {
        let at = mall_operator::sale::parse_instant(at).unwrap();
        let rendered = mall_operator::render::render_at(&text, at).unwrap();
        let golden = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(golden_name);
        if std::env::var("UPDATE_GOLDEN").is_ok() {
            std::fs::create_dir_all(golden.parent().unwrap()).unwrap();
            std::fs::write(&golden, &rendered).unwrap();
        }
        let want = std::fs::read_to_string(&golden).unwrap_or_default();
        assert!(
            rendered == want,
            "{} renders differently from {}; review `operator render -f {}` and rerun with UPDATE_GOLDEN=1",
            example.display(),
            golden.display(),
            example.display()
        );
        // The ConfigMap holds a configuration the sidecar accepts, with the `SIDECAR__*`
        // variables its container gets (values from Secrets stand in as the kubelet would fill
        // them: a 40-byte secret, a Redis URL).
        let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&rendered)
            .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
            .collect();
        let mut env = Vec::new();
        for d in docs.iter().filter(|d| d["kind"] == "Deployment") {
            for c in d["spec"]["template"]["spec"]["containers"].as_sequence().unwrap() {
                if c["name"] != "sidecar" {
                    continue;
                }
                for e in c["env"].as_sequence().into_iter().flatten() {
                    let name = e["name"].as_str().unwrap().to_string();
                    let value = match e["value"].as_str() {
                        Some(v) => v.to_string(),
                        None if e["valueFrom"].get("secretKeyRef").is_some() => {
                            if name.ends_with("__URL") || name.ends_with("_URL") {
                                "redis://redis:6379".into()
                            } else {
                                "a-stand-in-secret-of-forty-bytes-length!".into()
                            }
                        }
                        None => continue,
                    };
                    env.push((name, value));
                }
            }
        }
        for value in docs.iter().filter(|d| d["kind"] == "ConfigMap") {
            if let Some(toml) = value["data"]["sidecar.toml"].as_str() {
                let config = SidecarConfig::from_toml_with_env(toml, "sidecar.toml", env.clone())
                    .unwrap_or_else(|e| panic!("{}: sidecar config rejected: {e}", example.display()));
                if golden.to_string_lossy().contains("during-sale") {
                    assert!(config.waiting_room.enabled, "the sale's waiting room is on");
                    assert!(
                        config.waiting_room.redis.is_some(),
                        "the room's line is shared through Redis"
                    );
                }
            }
        }
    }
}

#[test]
fn bad_manifests_are_refused_with_the_field_named() {
    let bad = "apiVersion: mall.example.com/v1alpha1\nkind: MallDeployment\nmetadata: {name: x}\nspec: {minReplicas: 5, maxReplicas: 2, replicas: 3}\n";
    assert!(mall_operator::render::render(bad)
        .unwrap_err()
        .contains("spec.minReplicas"));
    let unknown =
        "apiVersion: mall.example.com/v1alpha1\nkind: MallDeployment\nmetadata: {name: x}\nspec: {replicas: \"two\"}\n";
    assert!(mall_operator::render::render(unknown).unwrap_err().contains("replicas"));
    let cpu = "apiVersion: mall.example.com/v1alpha1\nkind: MallDeployment\nmetadata: {name: x}\nspec: {replicas: 1, minReplicas: 1, maxReplicas: 1, app: {image: a, cpu: {request: lots, limit: 1}}}\n";
    assert!(mall_operator::render::render(cpu)
        .unwrap_err()
        .contains("spec.app.cpu.request"));
}

/// What the API server refuses, render refuses too (the CRD's OpenAPI schema and CEL rules, the
/// kind, and a sidecar config the sidecar would reject), naming the field.
#[test]
fn render_refuses_what_the_api_server_refuses() {
    let one = "replicas: 1, minReplicas: 1, maxReplicas: 1";
    let cases = [
        (format!("{one}, app: {{cpu: {{request: \"4\", limit: \"2\"}}}}"), "spec.app.cpu.request: request must not exceed limit"),
        (format!("{one}, autoscaling: {{scaleFactor: 0}}"), "spec.autoscaling.scaleFactor"),
        // The HPA acts at 110 % of its target; with request = limit the app never gets past 100 %.
        (format!("{one}, autoscaling: {{targetCpuPercent: 95}}, app: {{cpu: {{request: \"1\", limit: \"1\"}}}}"), "spec.autoscaling.targetCpuPercent"),
        (format!("{one}, autoscaling: {{targetCpuPercent: 5}}"), "spec.autoscaling.targetCpuPercent"),
        (format!("{one}, slo: {{errorRatePercent: 150}}"), "spec.slo.errorRatePercent"),
        (format!("{one}, slo: {{highQps: 10, criticalQps: 5}}"), "spec.slo.highQps"),
        ("replicas: 2, minReplicas: 2, maxReplicas: 10".to_string(), "spec.database.primary"),
        (format!("{one}, rateLimits: {{rules: [{{name: o, path_prefix: /api, requests_per_second: 1, burst: 0}}]}}"), "spec.rateLimits.rules[0].burst"),
        (format!("{one}, rateLimits: {{rules: [{{name: o, path_prefix: /api, requests_per_second: -1, burst: 1}}]}}"), "spec.rateLimits.rules[0].requests_per_second"),
        (format!("{one}, rateLimits: {{rules: [{{name: \"\", path_prefix: /api, requests_per_second: 1, burst: 1}}]}}"), "spec.rateLimits.rules[0].name"),
        (format!("{one}, cache: {{rules: [{{path_prefix: api, ttl_seconds: 5}}]}}"), "spec.cache.rules[0].path_prefix"),
        (
            format!("{one}, rateLimits: {{rules: [{{name: a, path_prefix: /a, requests_per_second: 1, burst: 1}}, {{name: a, path_prefix: /b, requests_per_second: 1, burst: 1}}]}}"),
            "spec.rateLimits.rules[1].name",
        ),
        (format!("{one}, observability: {{tracing: {{endpoint: \"collector:4318\"}}}}"), "spec.observability.tracing.endpoint"),
        (
            format!("{one}, observability: {{tracing: {{endpoint: \"http://collector:4318/v1/traces\"}}}}"),
            "spec.observability.tracing.endpoint: must be the collector's base URL",
        ),
        (format!("{one}, observability: {{tracing: {{endpoint: \"http://c:4318\", sampleRatio: 1.5}}}}"), "spec.observability.tracing.sampleRatio"),
        (format!("{one}, observability: {{tracing: {{endpoint: \"http://c:4318\", sampleRatio: -0.1}}}}"), "spec.observability.tracing.sampleRatio"),
        (
            format!("{one}, observability: {{tracing: {{endpoint: \"http://c:4318\", headersSecret: {{name: \"\", key: headers}}}}}}"),
            "spec.observability.tracing.headersSecret.name",
        ),
        (format!("{one}, observability: {{tracing: {{sampleRatio: 0.5}}}}"), "spec.observability.tracing: missing field `endpoint`"),
        (format!("{one}, observability: {{profiling: {{}}}}"), "spec.observability.profiling: missing field `tokenSecret`"),
        (
            format!("{one}, observability: {{profiling: {{tokenSecret: {{name: \"\", key: token}}}}}}"),
            "spec.observability.profiling.tokenSecret.name",
        ),
    ];
    for (spec, want) in cases {
        let doc = format!(
            "apiVersion: mall.example.com/v1alpha1\nkind: MallDeployment\nmetadata: {{name: x}}\nspec: {{{spec}}}\n"
        );
        let err = mall_operator::render::render(&doc).expect_err(&spec);
        assert!(err.contains(want), "{spec}: {err}");
    }
    // X-Forwarded-For is believed from the named proxies only; a range holding every pod is refused
    // unless the user insists.
    let trusting = |proxies: &str, insist: bool| {
        format!(
            "apiVersion: mall.example.com/v1alpha1\nkind: MallDeployment\nmetadata: {{name: x}}\nspec: {{{one}, rateLimits: {{trustedProxies: [{proxies}], allowBroadTrustedProxies: {insist}}}}}\n"
        )
    };
    for (proxies, field) in [
        ("10.0.0.0/8", "spec.rateLimits.trustedProxies[0]"),
        ("10.4.0.0/16, 172.16.0.0/12", "spec.rateLimits.trustedProxies[1]"),
        ("0.0.0.0/0", "spec.rateLimits.trustedProxies[0]"),
        ("10.4.0.0/33", "spec.rateLimits.trustedProxies[0]"),
        ("ingress", "spec.rateLimits.trustedProxies[0]"),
    ] {
        let err = mall_operator::render::render(&trusting(proxies, false)).expect_err(proxies);
        assert!(err.contains(field), "{proxies}: {err}");
    }
    // The refusal names the CRD's field, not the sidecar's key (issue 33).
    let broad = mall_operator::render::render(&trusting("10.0.0.0/8", false)).unwrap_err();
    assert!(
        broad.contains("spec.rateLimits.allowBroadTrustedProxies") && !broad.contains("allow_broad_trusted_proxies"),
        "{broad}"
    );
    let insisted = mall_operator::render::render(&trusting("10.0.0.0/8", true)).unwrap();
    assert!(insisted.contains("10.0.0.0/8") && insisted.contains("allow_broad_trusted_proxies = true"));
    let named = mall_operator::render::render(&trusting("10.4.0.0/16", false)).unwrap();
    assert!(
        named.contains("\"10.4.0.0/16\"") && named.contains("allow_broad_trusted_proxies = false"),
        "{named}"
    );
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {}\n";
    assert!(mall_operator::render::render(pod).unwrap_err().contains("kind"));
    let long = format!(
        "apiVersion: mall.example.com/v1alpha1\nkind: MallDeployment\nmetadata: {{name: {}}}\nspec: {{{one}}}\n",
        "a".repeat(60)
    );
    assert!(mall_operator::render::render(&long)
        .unwrap_err()
        .contains("metadata.name"));
    let fits = format!(
        "apiVersion: mall.example.com/v1alpha1\nkind: MallDeployment\nmetadata: {{name: {}}}\nspec: {{{one}}}\n",
        "a".repeat(59)
    );
    assert!(mall_operator::render::render(&fits).is_ok());
}

fn promtool() -> Option<PathBuf> {
    let found = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some("promtool".into());
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("promtool not found: `apt-get install prometheus` (scripts/test.sh does it)");
    }
    eprintln!("SKIPPED: promtool not installed (scripts/test.sh installs it)");
    None
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let Some(promtool) = promtool() else { return };
    let dir = tempfile::tempdir().unwrap();
    for example in examples() {
        let md: MallDeployment = serde_yaml::from_str(&std::fs::read_to_string(&example).unwrap()).unwrap();
        let tuning = mall_operator::tuning::tune(&md.spec);
        let stem = example.file_stem().unwrap().to_str().unwrap();
        let rules = dir.path().join(format!("{stem}-rules.yaml"));
        let tests = dir.path().join(format!("{stem}-tests.yaml"));
        std::fs::write(
            &rules,
            serde_yaml::to_string(&mall_operator::alerts::rule_groups(&md, &tuning)).unwrap(),
        )
        .unwrap();
        let unit = mall_operator::alerts::promtool_tests(&md, &tuning, rules.file_name().unwrap().to_str().unwrap());
        std::fs::write(&tests, serde_yaml::to_string(&unit).unwrap()).unwrap();

        let check = Command::new(&promtool)
            .args(["check", "rules"])
            .arg(&rules)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "{stem}: promtool check rules: {}",
            String::from_utf8_lossy(&check.stdout)
        );
        let test = Command::new(&promtool)
            .args(["test", "rules"])
            .arg(&tests)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            test.status.success(),
            "{stem}: promtool test rules:\n{}\n{}",
            String::from_utf8_lossy(&test.stdout),
            String::from_utf8_lossy(&test.stderr)
        );
    }
}

/// The ServiceMonitor selects the metrics Service (`<name>-metrics`), whose name the Prometheus
/// Operator would put in the `service` label; the alert rules select `service="<name>"`, so every
/// endpoint relabels `service` to the mall's name, and the client Service exposes port 80 only.
#[test]
fn the_service_monitor_feeds_the_series_the_rules_select() {
    let yaml =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/production.yaml")).unwrap();
    let rendered = mall_operator::render::render(&yaml).unwrap();
    let docs: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&rendered)
        .map(|d| serde_json::to_value(serde_yaml::Value::deserialize(d).unwrap()).unwrap())
        .collect();
    let of = |kind: &str, name: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{kind}/{name}"))
            .clone()
    };
    let name = "shop";
    let monitor = of("ServiceMonitor", name);
    let metrics = of("Service", &format!("{name}-metrics"));
    for (k, v) in monitor["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(
            &metrics["metadata"]["labels"][k], v,
            "the ServiceMonitor selects the metrics Service"
        );
    }
    for endpoint in monitor["spec"]["endpoints"].as_array().unwrap() {
        let relabel = &endpoint["relabelings"][0];
        assert_eq!(
            (relabel["targetLabel"].as_str(), relabel["replacement"].as_str()),
            (Some("service"), Some(name))
        );
        // A canary pod's series carry `track="canary"` (Prometheus' name for the pod label
        // `mall.example.com/track`), which a release's judgement through Prometheus reads.
        let track = &endpoint["relabelings"][1];
        assert_eq!(
            (track["sourceLabels"][0].as_str(), track["targetLabel"].as_str()),
            (
                Some("__meta_kubernetes_pod_label_mall_example_com_track"),
                Some("track")
            )
        );
        let port = endpoint["port"].as_str().unwrap();
        assert!(metrics["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == port));
    }
    let rule = of("PrometheusRule", name);
    let expr = rule["spec"]["groups"][0]["rules"][0]["expr"].as_str().unwrap();
    assert!(expr.contains(&format!("service=\"{name}\"")), "{expr}");
    let client = of("Service", name);
    let ports: Vec<i64> = client["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["port"].as_i64().unwrap())
        .collect();
    assert_eq!(ports, [80], "clients reach the sidecar only");
}

fn json_docs(rendered: &str) -> Vec<serde_json::Value> {
    serde_yaml::Deserializer::from_str(rendered)
        .map(|d| serde_json::to_value(serde_yaml::Value::deserialize(d).unwrap()).unwrap())
        .collect()
}

fn render_before_sales(text: &str) -> Vec<serde_json::Value> {
    let at = mall_operator::sale::parse_instant(BEFORE_SALES).unwrap();
    json_docs(&mall_operator::render::render_at(text, at).unwrap())
}

fn containers(docs: &mut [serde_json::Value]) -> &mut Vec<serde_json::Value> {
    let deployment = docs.iter_mut().find(|d| d["kind"] == "Deployment").unwrap();
    deployment["spec"]["template"]["spec"]["containers"]
        .as_array_mut()
        .unwrap()
}

/// `spec.observability.tracing` gives the app and the sidecar the standard OpenTelemetry
/// variables (each its own service name, the pod's name through the downward API), and changes
/// nothing else but the pods' config hash; without it nothing of it is rendered.
#[test]
fn tracing_renders_the_opentelemetry_variables_into_both_containers_and_nothing_else() {
    let mut traced = render_before_sales(&production_with_tracing());
    for container in containers(&mut traced).iter() {
        let env = container["env"].as_array().unwrap();
        let named = |name: &str| {
            let at = env.iter().position(|e| e["name"] == name);
            let at = at.unwrap_or_else(|| panic!("{}: no {name}", container["name"]));
            (at, env[at].clone())
        };
        let value = |name: &str| named(name).1["value"].as_str().unwrap().to_string();
        let service = match container["name"].as_str().unwrap() {
            "app" => "mall-app",
            "sidecar" => "mall-sidecar",
            other => panic!("a container {other}"),
        };
        assert_eq!(value("OTEL_SERVICE_NAME"), service);
        assert_eq!(
            value("OTEL_EXPORTER_OTLP_ENDPOINT"),
            "http://otel-collector.monitoring:4318"
        );
        assert_eq!(value("OTEL_TRACES_SAMPLER"), "parentbased_traceidratio");
        assert_eq!(value("OTEL_TRACES_SAMPLER_ARG"), "0.05");
        let (pod_name_at, pod_name) = named("POD_NAME");
        assert_eq!(pod_name["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name");
        let (attributes_at, _) = named("OTEL_RESOURCE_ATTRIBUTES");
        assert!(
            pod_name_at < attributes_at,
            "the kubelet expands $(POD_NAME) only once defined"
        );
        assert_eq!(
            value("OTEL_RESOURCE_ATTRIBUTES"),
            "service.namespace=shop/shop,k8s.namespace.name=shop,k8s.deployment.name=shop,k8s.pod.name=$(POD_NAME)"
        );
        assert_eq!(
            named("OTEL_EXPORTER_OTLP_HEADERS").1["valueFrom"]["secretKeyRef"],
            serde_json::json!({ "name": "otel-auth", "key": "headers", "optional": false })
        );
        let mut names: Vec<&str> = env.iter().map(|e| e["name"].as_str().unwrap()).collect();
        names.sort();
        let before = names.len();
        names.dedup();
        assert_eq!(names.len(), before, "{}: a variable twice", container["name"]);
    }

    // The same render without the tracing variables and the hash is the render without tracing.
    let mut plain = render_before_sales(&std::fs::read_to_string(example("production.yaml")).unwrap());
    let hash = |docs: &mut [serde_json::Value]| {
        let deployment = docs.iter_mut().find(|d| d["kind"] == "Deployment").unwrap();
        let annotations = deployment["spec"]["template"]["metadata"]["annotations"]
            .as_object_mut()
            .unwrap();
        annotations.remove(mall_operator::desired::CONFIG_HASH).unwrap()
    };
    assert_ne!(hash(&mut traced), hash(&mut plain), "turning tracing on rolls the pods");
    for container in containers(&mut plain).iter() {
        for e in container["env"].as_array().unwrap() {
            let name = e["name"].as_str().unwrap();
            assert!(
                !name.starts_with("OTEL_") && name != "POD_NAME",
                "{name} without tracing"
            );
        }
    }
    for container in containers(&mut traced).iter_mut() {
        container["env"]
            .as_array_mut()
            .unwrap()
            .retain(|e| e["name"] != "POD_NAME" && !e["name"].as_str().unwrap().starts_with("OTEL_"));
    }
    assert_eq!(traced, plain);

    // Only an endpoint: the default ratio, no headers, and no trailing slash for `/v1/traces`.
    let minimal = "apiVersion: mall.example.com/v1alpha1\nkind: MallDeployment\nmetadata: {name: demo, namespace: web}\nspec: {replicas: 1, minReplicas: 1, maxReplicas: 1, observability: {tracing: {endpoint: \"https://otlp.example.com/\"}}}\n";
    let mut docs = render_before_sales(minimal);
    for container in containers(&mut docs).iter() {
        let env = container["env"].as_array().unwrap();
        let value = |name: &str| env.iter().find(|e| e["name"] == name).map(|e| e["value"].clone());
        assert_eq!(
            value("OTEL_EXPORTER_OTLP_ENDPOINT"),
            Some("https://otlp.example.com".into())
        );
        assert_eq!(value("OTEL_TRACES_SAMPLER_ARG"), Some("0.01".into()));
        assert_eq!(value("OTEL_EXPORTER_OTLP_HEADERS"), None);
        let attributes = value("OTEL_RESOURCE_ATTRIBUTES").unwrap();
        assert!(
            attributes.as_str().unwrap().starts_with("service.namespace=web/demo,"),
            "{attributes}"
        );
    }
}

/// `spec.observability.profiling`: the app gets a loopback admin port and the token from the
/// Secret, the sidecar profiling and the same token as `SIDECAR__*` overrides, and the sidecar
/// accepts its rendered file with those overrides (the token filled in as the kubelet would).
/// Without it nothing of it is rendered.
#[test]
fn profiling_renders_the_admin_token_into_both_containers_and_the_sidecar_accepts_it() {
    let spec = "apiVersion: mall.example.com/v1alpha1\nkind: MallDeployment\nmetadata: {name: demo, namespace: web}\nspec: {replicas: 1, minReplicas: 1, maxReplicas: 1, observability: {profiling: {tokenSecret: {name: demo-admin, key: token}}}}\n";
    let mut docs = render_before_sales(spec);
    let config_map = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["data"][mall_operator::desired::SIDECAR_CONFIG_KEY].is_string())
        .unwrap()["data"][mall_operator::desired::SIDECAR_CONFIG_KEY]
        .as_str()
        .unwrap()
        .to_string();
    let token_ref = serde_json::json!({ "name": "demo-admin", "key": "token", "optional": false });
    for container in containers(&mut docs).iter() {
        let env = container["env"].as_array().unwrap();
        let get = |name: &str| env.iter().find(|e| e["name"] == name).cloned();
        match container["name"].as_str().unwrap() {
            "app" => {
                assert_eq!(get("MALL_ADMIN_LISTEN").unwrap()["value"], "127.0.0.1:9902");
                assert_eq!(get("MALL_ADMIN_TOKEN").unwrap()["valueFrom"]["secretKeyRef"], token_ref);
            }
            "sidecar" => {
                assert_eq!(get("SIDECAR__SERVER__PROFILING").unwrap()["value"], "true");
                assert_eq!(
                    get("SIDECAR__SERVER__ADMIN_TOKEN").unwrap()["valueFrom"]["secretKeyRef"],
                    token_ref
                );
                // What the sidecar reads at start: the file, then its SIDECAR__* variables.
                let overrides = env.iter().filter_map(|e| {
                    let name = e["name"].as_str()?.to_string();
                    let value = match e["value"].as_str() {
                        Some(v) => v.to_string(),
                        None if e["valueFrom"]["secretKeyRef"].is_object() => {
                            "a-long-random-token-from-the-secret".into()
                        }
                        None => return None,
                    };
                    Some((name, value))
                });
                let config =
                    mall_sidecar_config::SidecarConfig::from_toml_with_env(&config_map, "sidecar.toml", overrides)
                        .expect("the sidecar accepts its rendered config with the overrides");
                assert!(config.server.profiling);
                assert_eq!(
                    config.server.admin_token.as_deref(),
                    Some("a-long-random-token-from-the-secret")
                );
            }
            other => panic!("a container {other}"),
        }
    }
    // Without it: no admin port, no token, no profiling.
    let plain = "apiVersion: mall.example.com/v1alpha1\nkind: MallDeployment\nmetadata: {name: demo, namespace: web}\nspec: {replicas: 1, minReplicas: 1, maxReplicas: 1}\n";
    let mut docs = render_before_sales(plain);
    for container in containers(&mut docs).iter() {
        for e in container["env"].as_array().unwrap() {
            let name = e["name"].as_str().unwrap();
            assert!(
                !matches!(
                    name,
                    "MALL_ADMIN_LISTEN"
                        | "MALL_ADMIN_TOKEN"
                        | "SIDECAR__SERVER__PROFILING"
                        | "SIDECAR__SERVER__ADMIN_TOKEN"
                ),
                "{name} without profiling"
            );
        }
    }
}
