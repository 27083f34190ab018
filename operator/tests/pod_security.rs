//! Every rendered pod passes the `restricted` Pod Security Standard (the level a platform team
//! enforces with `pod-security.kubernetes.io/enforce: restricted`), checked control by control as
//! the Pod Security admission plugin checks them, and runs with a read-only root filesystem.

use std::path::Path;

use serde_json::Value;

/// The restricted profile's controls (and the baseline ones it includes) that a Deployment's pod
/// template can break; each failure names the control, as the admission plugin does.
fn violations(pod: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let spec = &pod["spec"];
    for host in ["hostNetwork", "hostPID", "hostIPC"] {
        if spec[host] == Value::Bool(true) {
            out.push(format!("host namespaces: {host}"));
        }
    }
    let allowed = [
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    ];
    for v in spec["volumes"].as_array().into_iter().flatten() {
        let kind = v
            .as_object()
            .unwrap()
            .keys()
            .find(|k| *k != "name")
            .cloned()
            .unwrap_or_default();
        if !allowed.contains(&kind.as_str()) {
            out.push(format!("restricted volume types: {} is {kind}", v["name"]));
        }
    }
    let pod_sc = &spec["securityContext"];
    let containers: Vec<&Value> = spec["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(spec["initContainers"].as_array().into_iter().flatten())
        .collect();
    for c in &containers {
        let name = c["name"].as_str().unwrap_or("?");
        let sc = &c["securityContext"];
        if sc["privileged"] == Value::Bool(true) {
            out.push(format!("privileged: {name}"));
        }
        if sc["allowPrivilegeEscalation"] != Value::Bool(false) {
            out.push(format!("allowPrivilegeEscalation != false: {name}"));
        }
        let drops: Vec<&str> = sc["capabilities"]["drop"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if !drops.contains(&"ALL") {
            out.push(format!("unrestricted capabilities (drop ALL): {name}"));
        }
        for add in sc["capabilities"]["add"].as_array().into_iter().flatten() {
            if add != "NET_BIND_SERVICE" {
                out.push(format!("unrestricted capabilities (add {add}): {name}"));
            }
        }
        let non_root = sc["runAsNonRoot"] == Value::Bool(true)
            || (pod_sc["runAsNonRoot"] == Value::Bool(true) && sc["runAsNonRoot"] != Value::Bool(false));
        if !non_root {
            out.push(format!("runAsNonRoot != true: {name}"));
        }
        let user = sc["runAsUser"].as_i64().or(pod_sc["runAsUser"].as_i64());
        if user == Some(0) {
            out.push(format!("runAsUser=0: {name}"));
        }
        let seccomp = sc["seccompProfile"]["type"]
            .as_str()
            .or(pod_sc["seccompProfile"]["type"].as_str());
        if !matches!(seccomp, Some("RuntimeDefault" | "Localhost")) {
            out.push(format!("seccompProfile: {name}"));
        }
        for p in c["ports"].as_array().into_iter().flatten() {
            if p.get("hostPort").is_some_and(|h| h.as_i64() != Some(0)) {
                out.push(format!("hostPort: {name}"));
            }
        }
        // Beyond the standard: nothing in the image is written to.
        if sc["readOnlyRootFilesystem"] != Value::Bool(true) {
            out.push(format!("readOnlyRootFilesystem != true: {name}"));
        }
    }
    out
}

#[test]
fn every_rendered_pod_passes_the_restricted_pod_security_standard() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut pods = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let rendered = mall_operator::render::render(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&rendered) {
            let value: Value = serde_yaml::from_value(serde::Deserialize::deserialize(doc).unwrap()).unwrap();
            if value["kind"] == "Deployment" {
                pods += 1;
                let problems = violations(&value["spec"]["template"]);
                assert!(problems.is_empty(), "{}: {problems:#?}", path.display());
                // Tighter than the standard asks: the mall never calls the API server, so its
                // pods mount no ServiceAccount token (issue 33).
                assert_eq!(
                    value["spec"]["template"]["spec"]["automountServiceAccountToken"],
                    Value::Bool(false),
                    "{}: the pods mount a ServiceAccount token",
                    path.display()
                );
            }
        }
    }
    assert!(pods >= 3, "every example renders a Deployment");
}

#[test]
fn the_check_catches_what_the_standard_forbids() {
    let pod = serde_json::json!({ "spec": {
        "hostNetwork": true,
        "volumes": [{ "name": "h", "hostPath": { "path": "/" } }],
        "containers": [{ "name": "c", "securityContext": { "capabilities": { "add": ["SYS_ADMIN"] } },
                        "ports": [{ "containerPort": 80, "hostPort": 80 }] }] } });
    let found = violations(&pod);
    for control in [
        "host namespaces",
        "restricted volume types",
        "allowPrivilegeEscalation",
        "drop ALL",
        "add \"SYS_ADMIN\"",
        "runAsNonRoot",
        "seccompProfile",
        "hostPort",
        "readOnlyRootFilesystem",
    ] {
        assert!(
            found.iter().any(|f| f.contains(control)),
            "{control} not caught: {found:#?}"
        );
    }
}
