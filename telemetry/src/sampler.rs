//! Which traces are recorded: the OpenTelemetry SDK samplers (`OTEL_TRACES_SAMPLER`). The
//! ratio sampler decides from the trace id alone, so every hop of a trace that uses the same
//! ratio decides the same way even without a sampled parent.

use crate::context::{TraceId, TraceParent};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sampler {
    AlwaysOn,
    AlwaysOff,
    /// A trace whose id falls under `ratio` of the id space.
    Ratio(f64),
    /// The caller's decision when there is a caller; `root` otherwise.
    ParentBased(Root),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Root {
    AlwaysOn,
    AlwaysOff,
    Ratio(f64),
}

impl Sampler {
    pub fn sample(&self, parent: Option<&TraceParent>, trace_id: TraceId) -> bool {
        match *self {
            Sampler::AlwaysOn => true,
            Sampler::AlwaysOff => false,
            Sampler::Ratio(r) => ratio(r, trace_id),
            Sampler::ParentBased(root) => match parent {
                Some(p) => p.sampled,
                None => match root {
                    Root::AlwaysOn => true,
                    Root::AlwaysOff => false,
                    Root::Ratio(r) => ratio(r, trace_id),
                },
            },
        }
    }
}

/// The SDKs' `TraceIdRatioBased`: the id's last 8 bytes, as a 63-bit number, under
/// `ratio * 2^63`.
fn ratio(r: f64, trace_id: TraceId) -> bool {
    if r >= 1.0 {
        return true;
    }
    if r <= 0.0 {
        return false;
    }
    let bound = (r * (1u64 << 63) as f64) as u64;
    let mut low = [0u8; 8];
    low.copy_from_slice(&trace_id.0[8..]);
    (u64::from_be_bytes(low) >> 1) < bound
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::SpanId;

    #[test]
    fn a_ratio_keeps_about_that_share_and_the_parent_decides_when_there_is_one() {
        let s = Sampler::ParentBased(Root::Ratio(0.1));
        let kept = (0..20_000).filter(|_| s.sample(None, TraceId::random())).count();
        assert!((1_600..2_400).contains(&kept), "{kept}");
        let id = TraceId::random();
        let parent = |sampled| TraceParent {
            trace_id: id,
            parent_id: SpanId::random(),
            sampled,
        };
        assert!(s.sample(Some(&parent(true)), id));
        assert!(!s.sample(Some(&parent(false)), id));
        assert!(!Sampler::AlwaysOff.sample(Some(&parent(true)), id));
        assert!(Sampler::Ratio(1.0).sample(None, id));
        assert!(!Sampler::Ratio(0.0).sample(None, id));
    }
}
