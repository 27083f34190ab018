//! Content-coding negotiation (RFC 9110 section 12.5.3, `Accept-Encoding`): which coding, if any,
//! a response to this request may carry. pingora's compression module ignores q-values (it takes
//! the client's first known coding), so `gzip;q=0, identity` got gzip; the sidecar decides here and
//! hands pingora a header naming only the chosen coding.
//!
//! Streamed responses (misses, pass-through) are offered zstd and gzip. Brotli is offered to fresh
//! hits only, whose compressed copy the sidecar makes itself, once per entry, as a finished stream:
//! pingora's brotli encoder flushes instead of finishing the stream (pingora issue #1013), so strict
//! decoders reject what it sends.

/// The codings streamed responses get, in the sidecar's order of preference when the client weighs
/// them equally.
pub const STREAMED: [&str; 2] = ["zstd", "gzip"];

/// The codings a fresh hit can get: brotli first, as it is the smallest on JSON and is made once.
pub const FRESH_HITS: [&str; 3] = ["br", "zstd", "gzip"];

/// The coding among `offered` to use for a client that sent `accept_encoding`, or `None` for
/// identity (no header, nothing acceptable, or identity preferred).
pub fn choose(accept_encoding: Option<&str>, offered: &[&'static str]) -> Option<&'static str> {
    // No Accept-Encoding: any coding is acceptable, but the safe answer is identity (what
    // browsers and curl without --compressed expect, and what nginx does).
    Accepted::parse(accept_encoding?).best(offered)
}

/// An `Accept-Encoding` header's weights, parsed once and asked for the best of several offers
/// (a fresh hit's and a streamed response's).
pub struct Accepted<'a> {
    star: Option<f32>,
    identity: Option<f32>,
    listed: Vec<(&'a str, f32)>,
}

impl<'a> Accepted<'a> {
    pub fn parse(header: &'a str) -> Accepted<'a> {
        let mut accepted = Accepted {
            star: None,
            identity: None,
            listed: Vec::new(),
        };
        for element in header.split(',') {
            let mut parts = element.split(';');
            let coding = parts.next().unwrap_or("").trim();
            if coding.is_empty() {
                continue;
            }
            let mut q = 1.0f32;
            for param in parts {
                if let Some((name, value)) = param.split_once('=') {
                    if name.trim().eq_ignore_ascii_case("q") {
                        // A malformed weight makes the element unusable rather than preferred.
                        q = value
                            .trim()
                            .parse::<f32>()
                            .ok()
                            .filter(|q| (0.0..=1.0).contains(q))
                            .unwrap_or(0.0);
                    }
                }
            }
            if coding == "*" {
                accepted.star = Some(q);
            } else if coding.eq_ignore_ascii_case("identity") {
                accepted.identity = Some(q);
            } else {
                accepted.listed.push((coding, q));
            }
        }
        accepted
    }

    /// The coding among `offered` (in the sidecar's order of preference at equal weights), or
    /// `None` for identity.
    pub fn best(&self, offered: &[&'static str]) -> Option<&'static str> {
        let weight = |offered: &str| -> f32 {
            self.listed
                .iter()
                .find(|(c, _)| c.eq_ignore_ascii_case(offered))
                .map(|(_, q)| *q)
                .or(self.star)
                .unwrap_or(0.0)
        };
        let best = offered.iter().map(|c| (*c, weight(c))).filter(|(_, q)| *q > 0.0).fold(
            None::<(&'static str, f32)>,
            |best, (c, q)| match best {
                Some((_, bq)) if bq >= q => best,
                _ => Some((c, q)),
            },
        )?;
        // Identity is acceptable unless excluded (`identity;q=0`, or `*;q=0` without identity
        // listed); a client that weighs identity above the best coding gets identity.
        let identity_q = self.identity.unwrap_or(if self.star == Some(0.0) { 0.0 } else { 1.0 });
        if self.identity.is_some() && identity_q > best.1 {
            return None;
        }
        Some(best.0)
    }
}

#[cfg(test)]
mod tests {
    use super::{choose, FRESH_HITS, STREAMED};

    #[test]
    fn q_values_decide() {
        let table = [
            (None, None),
            (Some("gzip"), Some("gzip")),
            (Some("gzip;q=0, identity"), None),
            (Some("gzip;q=0"), None),
            (Some("br"), None),
            (Some("br, gzip"), Some("gzip")),
            (Some("zstd, gzip"), Some("zstd")),
            (Some("gzip, zstd;q=0.5"), Some("gzip")),
            (Some("zstd;q=0.1, gzip"), Some("gzip")),
            (Some("*"), Some("zstd")),
            (Some("*;q=0.5, zstd;q=0"), Some("gzip")),
            (Some("*;q=0"), None),
            (Some("identity;q=0, gzip"), Some("gzip")),
            (Some("identity, gzip;q=0.5"), None),
            (Some("GZIP;Q=1.0"), Some("gzip")),
            (Some("gzip;q=bogus"), None),
            (Some(""), None),
            (Some("deflate"), None),
        ];
        for (header, want) in table {
            assert_eq!(choose(header, &STREAMED), want, "{header:?}");
        }
        let hits = [
            (Some("br"), Some("br")),
            (Some("gzip, deflate, br, zstd"), Some("br")),
            (Some("gzip, br;q=0.5"), Some("gzip")),
            (Some("br;q=0, *"), Some("zstd")),
            (Some("*"), Some("br")),
            (Some("identity, br;q=0.9"), None),
        ];
        for (header, want) in hits {
            assert_eq!(choose(header, &FRESH_HITS), want, "{header:?}");
        }
    }
}
