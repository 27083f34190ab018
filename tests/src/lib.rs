//! End-to-end tests live in `tests/`; the pod runner they share is here.

pub mod pod_runner;
