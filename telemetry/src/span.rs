//! A finished span, as both programs hand it to the exporter.

use std::borrow::Cow;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::context::{SpanId, TraceId};

/// OTLP's `Span.SpanKind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    Internal = 1,
    Server = 2,
    Client = 3,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Str(Cow<'static, str>),
    Int(i64),
    Bool(bool),
    Float(f64),
}

impl From<&'static str> for Value {
    fn from(s: &'static str) -> Value {
        Value::Str(Cow::Borrowed(s))
    }
}

impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::Str(Cow::Owned(s))
    }
}

impl From<i64> for Value {
    fn from(n: i64) -> Value {
        Value::Int(n)
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Value {
        Value::Bool(b)
    }
}

#[derive(Clone, Debug)]
pub struct SpanData {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_span_id: Option<SpanId>,
    pub name: Cow<'static, str>,
    pub kind: SpanKind,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    pub attributes: Vec<(Cow<'static, str>, Value)>,
    /// Spans this one is linked to (an order batch the request joined).
    pub links: Vec<(TraceId, SpanId)>,
    /// `Some(message)`: the span failed (OTLP status code ERROR).
    pub error: Option<String>,
}

impl SpanData {
    pub fn attr(&mut self, key: impl Into<Cow<'static, str>>, value: impl Into<Value>) {
        self.attributes.push((key.into(), value.into()));
    }
}

/// Now, in Unix nanoseconds.
pub fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
