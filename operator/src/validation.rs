//! What the API server would refuse, checked without one: the generated CRD's OpenAPI schema, its
//! CEL rules (evaluated client-side with kube's CEL library, defaults applied first, as admission
//! does), and the sidecar configuration the spec renders into, through the sidecar's own validator.
//! `operator render` and every reconcile run the same checks, so a spec that passes here applies
//! cleanly and a config the sidecar would refuse never reaches a ConfigMap.

use std::sync::OnceLock;

use serde_json::Value;

use crate::crd::{MallDeployment, GROUP};
use crate::{desired, tuning};

/// The CRD's `openAPIV3Schema`.
fn schema() -> &'static Value {
    static SCHEMA: OnceLock<Value> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let crd = serde_json::to_value(crate::crd::definition()).expect("the CRD serialises");
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
    })
}

/// The CEL rules, compiled once: every reconcile validates, and compiling the rules is most of
/// the cost of a validation.
fn cel() -> &'static kube::core::cel::CompiledSchema {
    static COMPILED: OnceLock<kube::core::cel::CompiledSchema> = OnceLock::new();
    COMPILED.get_or_init(|| kube::core::cel::compile_schema(schema()))
}

fn openapi() -> &'static jsonschema::Validator {
    static VALIDATOR: OnceLock<jsonschema::Validator> = OnceLock::new();
    VALIDATOR.get_or_init(|| jsonschema::validator_for(schema()).expect("the CRD schema compiles"))
}

/// `/spec/rateLimits/rules/0/burst` -> `spec.rateLimits.rules[0].burst`.
fn field_path(pointer: &str) -> String {
    let mut out = String::new();
    for segment in pointer.split('/').filter(|s| !s.is_empty()) {
        if segment.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{segment}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(segment);
        }
    }
    out
}

/// Checks the document's kind and apiVersion, as the API server routes by them.
pub fn check_type(doc: &Value) -> Result<(), String> {
    let want = format!("{GROUP}/v1alpha1");
    match (
        doc.get("apiVersion").and_then(Value::as_str),
        doc.get("kind").and_then(Value::as_str),
    ) {
        (Some(v), Some("MallDeployment")) if v == want => Ok(()),
        (v, k) => Err(format!(
            "apiVersion/kind: expected {want} MallDeployment, got {} {}",
            v.unwrap_or("<none>"),
            k.unwrap_or("<none>")
        )),
    }
}

/// Every check the API server and the sidecar would make, first failure first, naming the field.
pub fn validate(md: &MallDeployment) -> Result<(), String> {
    let object = serde_json::to_value(md).map_err(|e| e.to_string())?;
    if let Some(e) = openapi().iter_errors(&object).next() {
        let path = field_path(&e.instance_path().to_string());
        let path = if path.is_empty() { "<root>".to_string() } else { path };
        return Err(format!("{path}: {e}"));
    }
    if let Err(errors) = kube::core::cel::Validator::new().validate_compiled(cel(), &object, None) {
        let first = errors.as_slice().first().map(|e| e.to_string()).unwrap_or_default();
        // kube's CEL validator keeps the rule's `fieldPath` as written (`.spec.x`).
        return Err(first.trim_start_matches('.').to_string());
    }
    // Time zones and wall-clock times are beyond the API server's schema and CEL.
    crate::sale::check(&md.spec)?;
    for (i, range) in md.spec.rate_limits.trusted_proxies.iter().enumerate() {
        range
            .parse::<mall_sidecar_config::Cidr>()
            .map_err(|e| format!("spec.rateLimits.trustedProxies[{i}]: {e}"))?;
    }
    sidecar_config(md)
}

/// The rendered sidecar configuration passes `mall_sidecar_config`'s validator; a failure names the
/// `spec.` field it came from.
fn sidecar_config(md: &MallDeployment) -> Result<(), String> {
    let config = desired::sidecar_config(md, &tuning::tune(&md.spec), &Default::default());
    match config.validate() {
        Ok(()) => Ok(()),
        Err(mall_sidecar_config::ConfigError::Invalid { field, message }) => {
            let spec_field = if let Some(rest) = field.strip_prefix("rate_limit.rules") {
                format!("spec.rateLimits.rules{rest}")
            } else if let Some(rest) = field.strip_prefix("rate_limit.trusted_proxies") {
                format!("spec.rateLimits.trustedProxies{rest}")
            } else if let Some(rest) = field.strip_prefix("cache.rules") {
                format!("spec.cache.rules{rest}")
            } else if let Some(rest) = field.strip_prefix("compression.") {
                format!("spec.compression ({rest})")
            } else {
                format!("the rendered sidecar config's {field}")
            };
            // The sidecar names its own keys; a MallDeployment user sets the CRD's field.
            let message = message.replace(
                "set allow_broad_trusted_proxies = true",
                "set spec.rateLimits.allowBroadTrustedProxies: true",
            );
            Err(format!(
                "{spec_field}: {message} (the sidecar would refuse this configuration)"
            ))
        }
        Err(e) => Err(format!("the rendered sidecar config: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::field_path;

    #[test]
    fn pointers_become_field_paths() {
        assert_eq!(
            field_path("/spec/rateLimits/rules/0/burst"),
            "spec.rateLimits.rules[0].burst"
        );
        assert_eq!(field_path(""), "");
    }
}
