//! `operator render -f mall.yaml`: the manifests the operator would apply, without a cluster, and
//! the CRD YAML that `crdgen` writes.
//!
//! Render refuses what the API server would refuse (kind and apiVersion, the CRD's OpenAPI schema
//! and CEL rules, a sidecar config the sidecar would reject), naming the field. Its objects carry
//! no owner reference: there is no MallDeployment uid to point at, and a made-up one makes the
//! garbage collector delete them. They carry the operator's labels instead; once the
//! MallDeployment exists, the operator's server-side apply adds itself as controller (adoption).

use serde::{Deserialize, Serialize};

use crate::crd::MallDeployment;
use crate::desired::{self, Children};
use crate::{sale, tuning, validation};

pub fn crd_yaml() -> String {
    serde_yaml::to_string(&crate::crd::definition()).expect("the CRD serialises")
}

/// Reads MallDeployment documents (YAML, `---`-separated) and returns every child as one YAML
/// stream, with the alert rules included even where no Prometheus Operator is installed.
pub fn render(input: &str) -> Result<String, String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    render_at(input, now)
}

/// As [`render`], as the objects will be at `at` (Unix seconds): with the sale windows in
/// effect then.
pub fn render_at(input: &str, at: i64) -> Result<String, String> {
    let mut out = String::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(input).enumerate() {
        let value = serde_yaml::Value::deserialize(doc).map_err(|e| format!("document {i}: {e}"))?;
        if value.is_null() {
            continue;
        }
        let json = serde_json::to_value(&value).map_err(|e| format!("document {i}: {e}"))?;
        validation::check_type(&json).map_err(|e| format!("document {i}: {e}"))?;
        let mut md: MallDeployment = serde_path_to_error::deserialize(value)
            .map_err(|e| format!("document {i}: {}: {}", e.path(), e.inner()))?;
        md.metadata.namespace.get_or_insert_with(|| "default".into());
        validation::validate(&md).map_err(|e| format!("document {i} ({}): {e}", desired::name(&md)))?;
        // No uid offline, so no owner reference (see the module comment).
        md.metadata.uid = None;
        let tuning = tuning::tune(&md.spec);
        let Children {
            deployment,
            service,
            app_service,
            metrics_service,
            config_map,
            hpa,
            pdb,
            prometheus_rule,
            service_monitor,
        } = desired::children(&md, &tuning, None, &sale::plan(&md.spec, at), &Default::default());
        push(&mut out, &config_map)?;
        if md.spec.database.primary.is_some() {
            // A new mall's share, written now (the operator orders later changes: budget.rs).
            let written = crate::budget::Written::new(tuning.db_max_connections, None, at);
            push(&mut out, &crate::budget::config_map(&md, &written))?;
        }
        push(&mut out, &service)?;
        push(&mut out, &app_service)?;
        push(&mut out, &metrics_service)?;
        push(&mut out, &deployment)?;
        if let Some(hpa) = &hpa {
            push(&mut out, hpa)?;
        }
        push(&mut out, &pdb)?;
        push(&mut out, &prometheus_rule)?;
        push(&mut out, &service_monitor)?;
    }
    Ok(out)
}

fn push<T: Serialize>(out: &mut String, object: &T) -> Result<(), String> {
    out.push_str("---\n");
    out.push_str(&serde_yaml::to_string(object).map_err(|e| e.to_string())?);
    Ok(())
}
