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
