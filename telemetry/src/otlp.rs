//! `ExportTraceServiceRequest` in protobuf, written by hand from the field numbers of the
//! official definitions (opentelemetry-proto, `collector/trace/v1/trace_service.proto`,
//! `trace/v1/trace.proto`, `common/v1/common.proto`, `resource/v1/resource.proto`): the few
//! messages a span needs do not justify a protobuf compiler in the build. The tests' receiver
//! decodes these bytes with the official generated classes.

use crate::span::{SpanData, Value};

/// Protobuf wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;

#[derive(Default)]
struct Buf(Vec<u8>);

impl Buf {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn tag(&mut self, field: u32, wire: u8) {
        self.varint(u64::from(field) << 3 | u64::from(wire));
    }

    fn bytes(&mut self, field: u32, b: &[u8]) {
        self.tag(field, LEN);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
    }

    fn string(&mut self, field: u32, s: &str) {
        self.bytes(field, s.as_bytes());
    }

    fn uint(&mut self, field: u32, v: u64) {
        self.tag(field, VARINT);
        self.varint(v);
    }

    fn fixed64(&mut self, field: u32, v: u64) {
        self.tag(field, FIXED64);
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn message(&mut self, field: u32, write: impl FnOnce(&mut Buf)) {
        let mut inner = Buf::default();
        write(&mut inner);
        self.bytes(field, &inner.0);
    }
}

/// `KeyValue { string key = 1; AnyValue value = 2 }`, `AnyValue { oneof: string_value = 1,
/// bool_value = 2, int_value = 3, double_value = 4 }`.
fn key_value(b: &mut Buf, field: u32, key: &str, value: &Value) {
    b.message(field, |kv| {
        kv.string(1, key);
        kv.message(2, |any| match value {
            Value::Str(s) => any.string(1, s),
            Value::Bool(v) => any.uint(2, u64::from(*v)),
            Value::Int(v) => any.uint(3, *v as u64),
            Value::Float(v) => any.fixed64(4, v.to_bits()),
        });
    });
}

/// One request holding `spans` of one resource (the process) and one instrumentation scope.
pub fn export_request(resource: &[(String, Value)], scope: &str, spans: &[SpanData]) -> Vec<u8> {
    let mut req = Buf::default();
    // ExportTraceServiceRequest.resource_spans = 1
    req.message(1, |rs| {
        // ResourceSpans.resource = 1 { Resource.attributes = 1 }
        rs.message(1, |r| {
            for (k, v) in resource {
                key_value(r, 1, k, v);
            }
        });
        // ResourceSpans.scope_spans = 2
        rs.message(2, |ss| {
            // ScopeSpans.scope = 1 { InstrumentationScope.name = 1, version = 2 }
            ss.message(1, |scope_msg| {
                scope_msg.string(1, scope);
                scope_msg.string(2, env!("CARGO_PKG_VERSION"));
            });
            for s in spans {
                // ScopeSpans.spans = 2
                ss.message(2, |m| span(m, s));
            }
        });
    });
    req.0
}

fn span(m: &mut Buf, s: &SpanData) {
    m.bytes(1, &s.trace_id.0); // trace_id
    m.bytes(2, &s.span_id.0); // span_id
    if let Some(parent) = s.parent_span_id {
        m.bytes(4, &parent.0); // parent_span_id
    }
    m.string(5, &s.name); // name
    m.uint(6, s.kind as u64); // kind
    m.fixed64(7, s.start_unix_nanos); // start_time_unix_nano
    m.fixed64(8, s.end_unix_nanos.max(s.start_unix_nanos)); // end_time_unix_nano
    for (k, v) in &s.attributes {
        key_value(m, 9, k, v); // attributes
    }
    for (trace_id, span_id) in &s.links {
        // links = 13 { Link.trace_id = 1, span_id = 2 }
        m.message(13, |l| {
            l.bytes(1, &trace_id.0);
            l.bytes(2, &span_id.0);
        });
    }
    if let Some(message) = &s.error {
        // status = 15 { Status.message = 2, code = 3 (ERROR = 2) }
        m.message(15, |st| {
            st.string(2, message);
            st.uint(3, 2);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_are_little_endian_base_128() {
        let mut b = Buf::default();
        b.varint(1);
        b.varint(300);
        b.varint(u64::MAX);
        assert_eq!(b.0[..3], [0x01, 0xac, 0x02]);
        assert_eq!(b.0.len(), 3 + 10);
    }
}
