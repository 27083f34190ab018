//! Writes the MallDeployment CRD as YAML to stdout: `cargo run -p mall-operator --bin crdgen > crds/malldeployment.yaml`.

fn main() {
    print!("{}", mall_operator::render::crd_yaml());
}
