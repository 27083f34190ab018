//! The Helm chart, with the real `helm` binary: lint, render with the default and every
//! `ci/*-values.yaml`, every rendered object is a valid Kubernetes object of its kind (nothing
//! unknown: a typed round trip keeps every field), RBAC names no wildcard, the values schema
//! rejects typos, the dashboard's queries parse (promtool); and every example passes the CRD's
//! schema and renders into valid objects.

use std::path::{Path, PathBuf};
use std::process::Command;

use mall_operator::controller::contains;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/mall-operator")
}

fn tool(name: &str, how: &str) -> bool {
    if Command::new(name)
        .arg("--help")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{name} not found: {how}");
    }
    eprintln!("SKIPPED: {name} not installed ({how})");
    false
}

fn helm(args: &[&str]) -> std::process::Output {
    Command::new("helm").args(args).output().expect("helm runs")
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &serde_yaml::Value| !v.is_null())
        .map(|v| serde_json::to_value(v).unwrap())
        .collect()
}

/// Deserialises `object` as `K` and checks the round trip lost nothing (no unknown field, no
/// wrong type).
fn typed<K: DeserializeOwned + Serialize>(object: &Value) -> Result<(), String> {
    let parsed: K = serde_json::from_value(object.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&parsed).unwrap();
    if contains(&back, object) {
        Ok(())
    } else {
        Err(format!("fields lost in a typed round trip: {object:#}"))
    }
}

fn validate(object: &Value) -> Result<(), String> {
    use k8s_openapi::api::{
        apps::v1 as apps, autoscaling::v2 as autoscaling, core::v1 as core, policy::v1 as policy, rbac::v1 as rbac,
    };
    let kind = object["kind"].as_str().unwrap_or_default();
    match kind {
        "Deployment" => typed::<apps::Deployment>(object),
        "Service" => typed::<core::Service>(object),
        "ServiceAccount" => typed::<core::ServiceAccount>(object),
        "Secret" => typed::<core::Secret>(object),
        "ConfigMap" => typed::<core::ConfigMap>(object),
        "ClusterRole" => typed::<rbac::ClusterRole>(object),
        "ClusterRoleBinding" => typed::<rbac::ClusterRoleBinding>(object),
        "Role" => typed::<rbac::Role>(object),
        "RoleBinding" => typed::<rbac::RoleBinding>(object),
        "HorizontalPodAutoscaler" => typed::<autoscaling::HorizontalPodAutoscaler>(object),
        "PodDisruptionBudget" => typed::<policy::PodDisruptionBudget>(object),
        // Prometheus Operator kinds have no k8s-openapi type: check their shape.
        "ServiceMonitor" | "PrometheusRule" => {
            let ok = object["apiVersion"] == "monitoring.coreos.com/v1"
                && object["metadata"]["name"].is_string()
                && object["spec"].is_object();
            ok.then_some(()).ok_or_else(|| format!("malformed {kind}"))
        }
        other => Err(format!("unexpected kind {other:?}")),
    }
}

#[test]
fn chart_lints_renders_and_every_object_is_valid() {
    if !tool(
        "helm",
        "scripts/test.sh installs it (ensure_helm in scripts/lib/services.sh)",
    ) {
        return;
    }
    // The check itself catches an unknown field and a wrong type.
    let unknown = serde_json::json!({ "apiVersion": "v1", "kind": "Service", "metadata": { "name": "x" }, "spec": { "portz": [] } });
    assert!(validate(&unknown).is_err());
    let wrong = serde_json::json!({ "apiVersion": "v1", "kind": "Service", "metadata": { "name": "x" }, "spec": { "ports": "80" } });
    assert!(validate(&wrong).is_err());

    let chart = chart();
    let chart = chart.to_str().unwrap();
    let lint = helm(&["lint", "--strict", chart]);
    assert!(
        lint.status.success(),
        "helm lint: {}",
        String::from_utf8_lossy(&lint.stdout)
    );

    let mut values_files = vec![None];
    for entry in std::fs::read_dir(Path::new(chart).join("ci")).unwrap() {
        values_files.push(Some(entry.unwrap().path()));
    }
    for values in values_files {
        let mut args = vec!["template", "mall-operator", chart, "--namespace", "mall-system"];
        let path;
        if let Some(v) = &values {
            path = v.to_str().unwrap().to_string();
            args.extend(["-f", &path]);
        }
        let out = helm(&args);
        assert!(
            out.status.success(),
            "helm template {values:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let objects = docs(&String::from_utf8(out.stdout).unwrap());
        let kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
        assert!(
            kinds.contains(&"Deployment") && kinds.contains(&"ClusterRole"),
            "{values:?}: {kinds:?}"
        );
        for object in &objects {
            validate(object).unwrap_or_else(|e| panic!("{values:?}: {e}"));
            for kind in ["ClusterRole", "Role"] {
                if object["kind"] == kind {
                    let text = object["rules"].to_string();
                    assert!(!text.contains("\"*\""), "{kind} must not use wildcards: {text}");
                }
            }
            for label in [
                "app.kubernetes.io/name",
                "app.kubernetes.io/instance",
                "app.kubernetes.io/version",
                "app.kubernetes.io/managed-by",
            ] {
                assert!(
                    object["metadata"]["labels"][label].is_string(),
                    "{} lacks {label}",
                    object["kind"]
                );
            }
        }
    }

    // The values schema refuses a typo and a wrong type, naming them.
    let typo = helm(&["template", "x", chart, "--set", "replicaCount=2"]);
    assert!(!typo.status.success());
    assert!(String::from_utf8_lossy(&typo.stderr).contains("replicaCount"));
    let wrong = helm(&["template", "x", chart, "--set-string", "replicas=two"]);
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("replicas"));
}

#[test]
fn dashboard_queries_parse_and_cover_the_panels() {
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(chart().join("dashboards/mall.json")).unwrap()).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    let titles: Vec<&str> = panels.iter().map(|p| p["title"].as_str().unwrap()).collect();
    for want in [
        "Requests per second",
        "Latency",
        "Error rate",
        "Cache hit ratio",
        "Bytes saved",
        "Rate-limited",
        "Replicas and firing",
        "Monitoring heartbeat",
        "Sale windows",
        "Waiting room",
        "Top statements by total time",
        "Statement latency p99",
        "Slowest traced request",
        "Spans exported and dropped",
    ] {
        assert!(
            titles.iter().any(|t| t.starts_with(want)),
            "no {want} panel in {titles:?}"
        );
    }
    if !tool("promtool", "apt-get install prometheus (scripts/test.sh does it)") {
        return;
    }
    // promtool parses PromQL in rule files: make each panel query a recording rule.
    let rules: Vec<Value> = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .enumerate()
        .map(|(i, t)| {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$namespace", ".*")
                .replace("$mall", ".*");
            serde_json::json!({ "record": format!("dashboard:query{i}"), "expr": expr })
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-rules.yaml");
    std::fs::write(
        &file,
        serde_yaml::to_string(&serde_json::json!({ "groups": [{ "name": "dashboard", "rules": rules }] })).unwrap(),
    )
    .unwrap();
    let check = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stdout));
}

#[test]
fn examples_pass_the_crd_schema_and_render_into_valid_objects() {
    let crd = serde_json::to_value(mall_operator::crd::definition()).unwrap();
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let validator = jsonschema::validator_for(schema).unwrap();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        seen += 1;
        let text = std::fs::read_to_string(&path).unwrap();
        for object in docs(&text) {
            let errors: Vec<String> = validator
                .iter_errors(&object)
                .map(|e| format!("{} at {}", e, e.instance_path()))
                .collect();
            assert!(errors.is_empty(), "{}: {errors:?}", path.display());
        }
        for object in docs(&mall_operator::render::render(&text).unwrap()) {
            validate(&object).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
    }
    assert!(seen >= 3, "minimal, production and flash-sale examples");

    // The schema is not a formality: a wrong type and an out-of-range value are caught.
    let bad = serde_json::json!({ "apiVersion": "mall.example.com/v1alpha1", "kind": "MallDeployment", "metadata": { "name": "x" },
                                   "spec": { "replicas": "two", "slo": { "errorRatePercent": 150 } } });
    let errors: Vec<String> = validator
        .iter_errors(&bad)
        .map(|e| e.instance_path().to_string())
        .collect();
    assert!(
        errors.iter().any(|p| p.contains("replicas")) && errors.iter().any(|p| p.contains("errorRatePercent")),
        "{errors:?}"
    );
}

#[test]
fn dockerfiles_build_workspace_binaries_as_non_root() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for (file, package, dir, binary) in [
        ("mall-app.Dockerfile", "mall-app", "mall-app", "mall-app"),
        ("sidecar.Dockerfile", "mall-sidecar", "sidecar", "sidecar"),
        ("operator.Dockerfile", "mall-operator", "operator", "operator"),
    ] {
        let text = std::fs::read_to_string(root.join("docker").join(file)).unwrap();
        assert_eq!(
            text.lines().filter(|l| l.starts_with("FROM ")).count(),
            2,
            "{file}: multi-stage"
        );
        assert!(
            text.contains(&format!("-p {package} --bin {binary}")),
            "{file} builds {package}/{binary}"
        );
        assert!(
            text.contains("USER 65532:65532") && text.contains(":nonroot"),
            "{file}: non-root"
        );
        assert!(
            text.contains("org.opencontainers.image.version"),
            "{file}: records its version"
        );
        let manifest = std::fs::read_to_string(root.join(dir).join("Cargo.toml")).unwrap();
        assert!(
            manifest.contains(&format!("name = \"{package}\"")),
            "{dir}/Cargo.toml is {package}"
        );
        assert!(
            manifest.contains(&format!("name = \"{binary}\"")) || package == binary,
            "{package} has a binary {binary}"
        );
    }
}

/// What a user reads after `helm install` has no placeholder to fill in, and the values say how
/// fast a standby takes over as it is now (issue 33). (`helm install --dry-run` needs a cluster, so
/// the template is read as it is.)
#[test]
fn notes_and_values_say_what_is_true() {
    let notes = std::fs::read_to_string(chart().join("templates/NOTES.txt")).unwrap();
    assert!(!notes.contains("<your-"), "a placeholder in NOTES.txt: {notes}");
    assert!(notes.contains("helm show crds"), "{notes}");
    let values = std::fs::read_to_string(chart().join("values.yaml")).unwrap();
    assert!(
        !values.contains("~15 s"),
        "values.yaml still says a standby takes ~15 s"
    );
}

/// Upgrades complete and uninstall leaves no Lease (issue 33), as far as the chart decides it:
/// the webhook Service selects the leader's pod label (every replica is Ready, so a rollout's
/// surge pod, a standby, does not hold the rollout), the operator is told its Deployment's name
/// (the Lease's owner) and may read that Deployment alone, and patch pods (its own label).
#[test]
fn the_webhook_reaches_the_leader_alone_and_the_lease_is_owned_by_the_deployment() {
    if !tool(
        "helm",
        "scripts/test.sh installs it (ensure_helm in scripts/lib/services.sh)",
    ) {
        return;
    }
    let chart = chart();
    let out = helm(&[
        "template",
        "shop-ops",
        chart.to_str().unwrap(),
        "--namespace",
        "mall-system",
        "--set",
        "replicas=2",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let objects = docs(&String::from_utf8(out.stdout).unwrap());
    let find = |kind: &str| {
        objects
            .iter()
            .find(|o| o["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind}"))
    };
    let service = find("Service");
    assert_eq!(
        service["spec"]["selector"]["mall.example.com/leader"], "true",
        "{service}"
    );
    let deployment = find("Deployment");
    let name = deployment["metadata"]["name"].as_str().unwrap();
    let env = &deployment["spec"]["template"]["spec"]["containers"][0]["env"];
    let owner = env
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "OPERATOR_DEPLOYMENT")
        .expect("OPERATOR_DEPLOYMENT");
    assert_eq!(owner["value"], name);
    let role = objects
        .iter()
        .find(|o| o["kind"] == "Role")
        .expect("the leader-election Role");
    let rules = role["rules"].as_array().unwrap();
    assert!(
        rules
            .iter()
            .any(|r| r["resources"] == serde_json::json!(["deployments"])
                && r["resourceNames"] == serde_json::json!([name])
                && r["verbs"] == serde_json::json!(["get"])),
        "{rules:#?}"
    );
    assert!(
        rules
            .iter()
            .any(|r| r["resources"] == serde_json::json!(["pods"]) && r["verbs"] == serde_json::json!(["patch"])),
        "{rules:#?}"
    );
    assert!(
        !rules
            .iter()
            .any(|r| r["verbs"].as_array().unwrap().contains(&"delete".into())),
        "the Lease is released, not deleted: {rules:#?}"
    );
}
