//! Traces for the app and the sidecar, shared by both: a request's place in a trace
//! ([`context`], W3C Trace Context), whether it is recorded ([`sampler`]), what the standard
//! OpenTelemetry environment variables ask for ([`config`]), the spans ([`span`]) and their
//! export as OTLP over HTTP/protobuf ([`otlp`] encodes, [`export`] batches and sends).
//!
//! Export runs on a thread of its own behind a bounded queue: a request only ever pushes a
//! finished span (dropped and counted when the queue is full), so a slow or dead collector costs
//! users nothing.
//!
//! CPU profiles on demand ([`profile`]: pprof's protobuf, one at a time, behind a token) are here
//! too, so the app's and the sidecar's admin ports serve them the same way.

pub mod config;
pub mod context;
pub mod export;
pub mod heap;
pub mod otlp;
pub mod profile;
pub mod sampler;
pub mod span;

pub use config::TraceConfig;
pub use context::{SpanId, TraceId, TraceParent};
pub use export::Exporter;
pub use sampler::Sampler;
pub use span::{SpanData, SpanKind, Value};
