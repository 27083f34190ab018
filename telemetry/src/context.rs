//! A request's place in a trace: the `traceparent` header of W3C Trace Context (Level 1,
//! section 3.2), parsed leniently where the spec says a receiver must (a higher version's extra
//! fields are ignored) and refused where it says to restart the trace (all-zero ids, bad hex,
//! version `ff`).

use std::fmt;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct TraceId(pub [u8; 16]);

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct SpanId(pub [u8; 8]);

/// Ids come from a per-thread wyrand generator seeded once from the OS's randomness: ids must be
/// unique and unpredictable enough to sample by (W3C Trace Context, "random"), not secret, and
/// every request makes one; rand's cryptographic generator cost a measurable share of a cached
/// answer (BENCHMARKS.md, section 6).
fn random_u64() -> u64 {
    thread_local! {
        static STATE: std::cell::Cell<u64> = std::cell::Cell::new(rand::random());
    }
    STATE.with(|s| {
        let x = s.get().wrapping_add(0xa076_1d64_78bd_642f);
        s.set(x);
        let t = u128::from(x) * u128::from(x ^ 0xe703_7ed1_a0b4_28db);
        (t >> 64) as u64 ^ t as u64
    })
}

impl TraceId {
    /// A random, non-zero id.
    pub fn random() -> TraceId {
        loop {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&random_u64().to_be_bytes());
            id[8..].copy_from_slice(&random_u64().to_be_bytes());
            if id != [0; 16] {
                return TraceId(id);
            }
        }
    }

    pub fn parse(hex: &str) -> Option<TraceId> {
        let mut id = [0u8; 16];
        parse_hex(hex, &mut id)?;
        (id != [0; 16]).then_some(TraceId(id))
    }
}

impl SpanId {
    /// A random, non-zero id.
    pub fn random() -> SpanId {
        loop {
            let id = random_u64().to_be_bytes();
            if id != [0; 8] {
                return SpanId(id);
            }
        }
    }

    pub fn parse(hex: &str) -> Option<SpanId> {
        let mut id = [0u8; 8];
        parse_hex(hex, &mut id)?;
        (id != [0; 8]).then_some(SpanId(id))
    }
}

/// Lowercase hex only: the spec forbids uppercase in `traceparent`.
fn parse_hex(hex: &str, out: &mut [u8]) -> Option<()> {
    let b = hex.as_bytes();
    if b.len() != out.len() * 2 {
        return None;
    }
    // One table look-up per nibble; 0xff marks a byte that is not lowercase hex.
    let mut bad = 0u8;
    for (o, pair) in out.iter_mut().zip(b.chunks_exact(2)) {
        let (hi, lo) = (NIBBLE[usize::from(pair[0])], NIBBLE[usize::from(pair[1])]);
        bad |= hi | lo;
        *o = hi << 4 | (lo & 0xf);
    }
    (bad & 0xf0 == 0).then_some(())
}

const HEX: &[u8; 16] = b"0123456789abcdef";

const NIBBLE: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 16 {
        t[HEX[i] as usize] = i as u8;
        i += 1;
    }
    t
};

/// Lowercase hex of `bytes` appended to `out`, a table look-up per nibble: every proxied request
/// formats a `traceparent`, and `write!("{:02x}")` per byte showed in the sidecar's profile.
fn push_hex(out: &mut String, bytes: &[u8]) {
    for b in bytes {
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 0xf)] as char);
    }
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    let mut s = String::with_capacity(bytes.len() * 2);
    push_hex(&mut s, bytes);
    f.write_str(&s)
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

/// The caller's span: `00-<trace id>-<parent id>-<flags>`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct TraceParent {
    pub trace_id: TraceId,
    pub parent_id: SpanId,
    /// Flag `01`: the caller records this trace.
    pub sampled: bool,
}

impl TraceParent {
    /// `None` for anything the spec says to ignore (the request then starts a new trace).
    pub fn parse(header: &str) -> Option<TraceParent> {
        // Every hop of ours, and most tracers, send version 00 exactly: 55 bytes, dashes at fixed
        // offsets (section 3.2.2). Read that at the offsets; anything else takes the general path.
        let b = header.as_bytes();
        if b.len() == 55 && b[..3] == *b"00-" && b[35] == b'-' && b[52] == b'-' {
            let mut flag = [0u8; 1];
            parse_hex(&header[53..], &mut flag)?;
            return Some(TraceParent {
                trace_id: TraceId::parse(&header[3..35])?,
                parent_id: SpanId::parse(&header[36..52])?,
                sampled: flag[0] & 1 == 1,
            });
        }
        let header = header.trim_matches([' ', '\t']);
        let mut parts = header.split('-');
        let version = parts.next()?;
        let (trace_id, parent_id, flags) = (parts.next()?, parts.next()?, parts.next()?);
        if version.len() != 2 || version == "ff" || !version.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        // Version 00 has exactly four fields; a later version may append more (section 3.2.4).
        if version == "00" && parts.next().is_some() {
            return None;
        }
        if version != "00" && header.len() > 55 && header.as_bytes()[55] != b'-' {
            return None;
        }
        let mut flag = [0u8; 1];
        parse_hex(flags, &mut flag)?;
        Some(TraceParent {
            trace_id: TraceId::parse(trace_id)?,
            parent_id: SpanId::parse(parent_id)?,
            sampled: flag[0] & 1 == 1,
        })
    }

    /// The header a hop sends on: this trace, `span` as the parent.
    pub fn header(trace_id: TraceId, span: SpanId, sampled: bool) -> String {
        let mut h = String::with_capacity(55);
        h.push_str("00-");
        push_hex(&mut h, &trace_id.0);
        h.push('-');
        push_hex(&mut h, &span.0);
        h.push_str(if sampled { "-01" } else { "-00" });
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_specs_example_and_writes_it_back() {
        let h = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let p = TraceParent::parse(h).unwrap();
        assert!(p.sampled);
        assert_eq!(TraceParent::header(p.trace_id, p.parent_id, p.sampled), h);
        let unsampled = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert!(!unsampled.sampled);
    }

    #[test]
    fn refuses_what_the_spec_says_to_restart() {
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-g1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0\u{e9}",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn surrounding_blanks_are_allowed() {
        let p = TraceParent::parse(" 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\t").unwrap();
        assert!(p.sampled);
    }

    #[test]
    fn a_later_version_keeps_the_fields_it_shares_with_00() {
        let p = TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09-more").unwrap();
        assert!(p.sampled);
    }
}
