//! Property test: for every MallDeployment spec the schema admits and `validate` accepts, the
//! operator renders children without panicking and a sidecar configuration the sidecar accepts;
//! specs it refuses are refused with a field named, never with a panic.

use mall_operator::crd::MallDeployment;
use mall_operator::{desired, tuning};
use mall_sidecar_config::SidecarConfig;
use proptest::prelude::*;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};

fn quantity_cpu() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => Just(json!("100m")),
        4 => Just(json!("500m")),
        4 => Just(json!("1")),
        4 => Just(json!(2)),
        4 => Just(json!("2.5")),
        // Invalid values are rarer: four quantities per spec, each must be valid for a render.
        1 => Just(json!("lots")),
        1 => Just(json!("0"))
    ]
}

fn quantity_mem() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => Just(json!("64Mi")),
        4 => Just(json!("512Mi")),
        4 => Just(json!("2Gi")),
        4 => Just(json!("1G")),
        1 => Just(json!("big")),
        1 => Just(json!("0"))
    ]
}

fn spec() -> impl Strategy<Value = Value> {
    (
        // Mostly min <= replicas <= max, sometimes not (those must be refused).
        (1i32..20, 0i32..20, 0i32..20, 0u8..10),
        (1u32..500, quantity_cpu(), quantity_mem(), quantity_cpu(), quantity_mem()),
        (prop::sample::select(vec!["hpa", "alerts", "both"]), 1.1f64..10.0, 0u32..4000),
        (any::<bool>(), 0u32..100_000, prop::sample::select(vec!["round_robin", "weighted", "consistent_hash", "least_connections"])),
        (1.0f64..10_000.0, 1.0f64..20_000.0, 0.0f64..100.0, any::<bool>()),
    )
        .prop_map(|((min, extra, offset, scramble), (budget, app_cpu, app_mem, sc_cpu, sc_mem), (mode, factor, cooldown), (cache, min_bytes, lb), (high, critical, err, paused))| {
            let max = min + extra;
            let replicas = min + offset.min(extra);
            let (min, max) = if scramble == 0 { (max + 1, min) } else { (min, max) };
            json!({
                "replicas": replicas, "minReplicas": min, "maxReplicas": max,
                "app": { "image": "a:1", "cpu": { "request": app_cpu, "limit": app_cpu }, "memory": { "request": app_mem, "limit": app_mem } },
                "sidecar": { "image": "s:1", "cpu": { "request": sc_cpu, "limit": sc_cpu }, "memory": { "request": sc_mem, "limit": sc_mem } },
                "database": { "primary": { "name": "db" }, "connectionBudget": budget },
                "autoscaling": { "mode": mode, "scaleFactor": factor, "cooldownSeconds": cooldown },
                "cache": { "enabled": cache }, "compression": { "enabled": true, "minBytes": min_bytes },
                "loadBalancing": lb,
                "slo": { "highQps": high, "criticalQps": critical, "errorRatePercent": err },
                "paused": paused
            })
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn valid_specs_render_and_the_sidecar_accepts_their_config(spec in spec()) {
        let md: MallDeployment = serde_json::from_value(json!({
            "apiVersion": "mall.example.com/v1alpha1", "kind": "MallDeployment",
            "metadata": { "name": "p", "namespace": "n", "uid": "u" }, "spec": spec
        })).expect("the generated shape always deserialises");
        match mall_operator::validation::validate(&md) {
            Ok(()) => {
                let t = tuning::tune(&md.spec);
                prop_assert!(t.fleet_db_connections <= md.spec.database.connection_budget, "{t:?}");
                prop_assert!(t.app_worker_threads >= 1 && t.db_max_connections >= 1);
                let config = desired::sidecar_config(&md, &t, &Default::default());
                let text = config.to_toml();
                prop_assert!(SidecarConfig::from_toml(&text).is_ok(), "{:?}", SidecarConfig::from_toml(&text));
                // Every pod's sidecar names its own app (POD_IP on the app's port), which serves
                // whatever DNS answers: a DNS outage never leaves a pod without an instance.
                let own_app = config.upstream.own_app(Some("10.1.2.3"));
                prop_assert_eq!(own_app, Some(([10, 1, 2, 3], desired::APP_PORT as u16).into()));
                let children = desired::children(
                    &md,
                    &t,
                    Some(md.spec.max_replicas + 5),
                    &Default::default(),
                    &Default::default(),
                );
                if let Some(hpa) = children.hpa {
                    let hpa = hpa.spec.unwrap();
                    prop_assert!(hpa.min_replicas.unwrap() <= hpa.max_replicas, "the floor never passes max");
                }
            }
            Err(message) => prop_assert!(message.starts_with("spec."), "{message}"),
        }
    }

    #[test]
    fn arbitrary_yaml_specs_never_panic(value in "(?s).{0,200}") {
        let _ = mall_operator::render::render(&format!("apiVersion: mall.example.com/v1alpha1\nkind: MallDeployment\nmetadata: {{name: x}}\nspec: {value}\n"));
    }
}

#[test]
fn both_sides_of_validation_are_exercised() {
    // The generator must produce both valid and refused specs, or the property above proves little.
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 300,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let (rendered, refused) = (AtomicUsize::new(0), AtomicUsize::new(0));
    runner
        .run(&spec(), |spec| {
            let md: MallDeployment = serde_json::from_value(json!({
                "apiVersion": "mall.example.com/v1alpha1", "kind": "MallDeployment",
                "metadata": { "name": "p", "namespace": "n", "uid": "u" }, "spec": spec
            }))
            .unwrap();
            match mall_operator::validation::validate(&md) {
                Ok(()) => rendered.fetch_add(1, Ordering::Relaxed),
                Err(_) => refused.fetch_add(1, Ordering::Relaxed),
            };
            Ok(())
        })
        .unwrap();
    let (rendered, refused) = (rendered.into_inner(), refused.into_inner());
    assert!(rendered >= 30 && refused >= 30, "valid {rendered} refused {refused}");
}
