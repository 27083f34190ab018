//! The pod runner's infra container (`tests/src/pod_runner.rs`), as the kubelet's pause
//! container: it holds the pod's network namespace while the pod's containers come and go.
fn main() {
    loop {
        std::thread::park();
    }
}
