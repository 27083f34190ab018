//! An OpenTelemetry collector for the end-to-end tests: `tests/otlp/receiver.py` on a free port,
//! receiving OTLP/HTTP traces (protobuf, decoded with PyPI's `opentelemetry-proto`; no Collector
//! is installable here), and the spans it printed, one JSON object each (fields: see the script).
//!
//! Needs `MALL_TEST_OTLP_PYTHON`, an interpreter that has `opentelemetry-proto`: `scripts/test.sh`
//! installs it in a venv and exports it (`ensure_otlp_proto` in scripts/lib/services.sh). Without
//! it a test skips, and under `CI=true` fails.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/otlp/receiver.py");
const HOW_TO_GET_IT: &str = "scripts/test.sh installs it: `. scripts/lib/services.sh && ensure_otlp_proto` \
     makes a venv with opentelemetry-proto and exports MALL_TEST_OTLP_PYTHON";

pub struct OtlpReceiver {
    /// For `OTEL_EXPORTER_OTLP_ENDPOINT`: the exporters append `/v1/traces`.
    pub endpoint: String,
    pub port: u16,
    lines: Arc<Mutex<Vec<Value>>>,
    child: Child,
}

impl OtlpReceiver {
    /// A receiver on 127.0.0.1 that accepts every export; None (skipped) without its Python.
    pub fn start() -> Option<OtlpReceiver> {
        Self::spawn(&[])
    }

    /// A collector that is there but refuses: every request is answered `status`.
    pub fn start_failing(status: u16) -> Option<OtlpReceiver> {
        Self::spawn(&["--fail-status", &status.to_string()])
    }

    fn spawn(extra: &[&str]) -> Option<OtlpReceiver> {
        let Some(python) = std::env::var_os("MALL_TEST_OTLP_PYTHON").filter(|p| !p.is_empty()) else {
            return unavailable("MALL_TEST_OTLP_PYTHON is not set");
        };
        let spawned = Command::new(&python)
            .arg(SCRIPT)
            .args(["--port", "0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => return unavailable(&format!("MALL_TEST_OTLP_PYTHON={python:?} does not run: {e}")),
        };
        let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut stderr = child.stderr.take().expect("piped");
        let mut first = String::new();
        let _ = stdout.read_line(&mut first);
        let Some(port) = first
            .strip_prefix("LISTENING ")
            .and_then(|p| p.trim().parse::<u16>().ok())
        else {
            let _ = child.kill();
            let _ = child.wait();
            let mut why = String::new();
            let _ = stderr.read_to_string(&mut why);
            if why.contains("No module named") {
                return unavailable(&format!("{python:?} lacks opentelemetry-proto: {}", why.trim()));
            }
            panic!("{SCRIPT} did not start (first line {first:?}): {why}");
        };
        forward_stderr(stderr);
        let lines = Arc::new(Mutex::new(Vec::new()));
        let collected = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in stdout.lines() {
                let Ok(line) = line else { break };
                let value = serde_json::from_str(&line).unwrap_or(Value::String(line));
                collected.lock().unwrap().push(value);
            }
        });
        Some(OtlpReceiver {
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
            lines,
            child,
        })
    }

    /// Everything printed so far: spans, `{"error": ...}` and `{"refused": ...}` lines.
    pub fn lines(&self) -> Vec<Value> {
        self.lines.lock().unwrap().clone()
    }

    /// The spans received so far, in arrival order.
    pub fn spans(&self) -> Vec<Value> {
        self.lines()
            .into_iter()
            .filter(|l| l.get("span_id").is_some())
            .collect()
    }

    /// Requests answered with an error: bodies that did not decode, and with `start_failing`,
    /// every request.
    pub fn refusals(&self) -> Vec<Value> {
        self.lines()
            .into_iter()
            .filter(|l| l.get("error").is_some() || l.get("refused").is_some())
            .collect()
    }

    /// The spans once `done` holds for them; panics after `timeout` naming the spans that came.
    pub fn wait_for(&self, done: impl Fn(&[Value]) -> bool, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            if Instant::now() >= deadline {
                let names: Vec<String> = spans
                    .iter()
                    .map(|s| format!("{} ({})", s["name"], s["resource"]["service.name"]))
                    .collect();
                panic!(
                    "the spans awaited did not arrive within {timeout:?}; {} came: {names:?}; refusals: {:?}",
                    spans.len(),
                    self.refusals()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unavailable(why: &str) -> Option<OtlpReceiver> {
    assert!(
        !super::ci(),
        "the OTLP receiver needs Python with opentelemetry-proto: {why}; {HOW_TO_GET_IT}"
    );
    eprintln!("SKIPPED: no OTLP receiver: {why} ({HOW_TO_GET_IT})");
    None
}

/// A traceback from the receiver shows in the test's output instead of filling a pipe.
fn forward_stderr(stderr: ChildStderr) {
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("otlp receiver: {line}");
        }
    });
}
