//! Kubernetes resource quantities (`500m`, `1.5`, `512Mi`, `1e3`): parsing, the numbers tuning
//! needs, and the canonical form the API server stores (apimachinery's `Quantity.String()`).
//!
//! The API server never stores what was written: `0.5` becomes `500m`, `1.5Gi` becomes `1536Mi`,
//! `1000` becomes `1k`. The operator renders canonical quantities so that a live object it wrote
//! compares equal to what it would write again, and a steady state makes no writes.

/// A parsed quantity: `mantissa * 10^exp10` (times `1024^binary_power` for binary suffixes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Parsed {
    negative: bool,
    /// Exact value in units of 10^-9 (the API server rounds finer values up to nano).
    nanos: i128,
    format: Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    DecimalSi,
    BinarySi,
    DecimalExponent,
}

const NANO: i128 = 1_000_000_000;

fn parse(q: &str) -> Option<Parsed> {
    let q = q.trim();
    let (negative, rest) = match q.as_bytes().first()? {
        b'-' => (true, &q[1..]),
        b'+' => (false, &q[1..]),
        _ => (false, q),
    };
    let number_end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(number_end);
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if int.is_empty() && frac.is_empty() || frac.contains('.') || number.is_empty() {
        return None;
    }
    // value = digits * 10^(-frac.len())
    let digits: String = format!("{int}{frac}");
    if digits.len() > 30 {
        return None;
    }
    let mantissa: i128 = if digits.is_empty() { 0 } else { digits.parse().ok()? };
    let mut exp10 = -(frac.len() as i32);
    let (format, factor): (Format, i128) = match suffix {
        "Ki" => (Format::BinarySi, 1 << 10),
        "Mi" => (Format::BinarySi, 1 << 20),
        "Gi" => (Format::BinarySi, 1 << 30),
        "Ti" => (Format::BinarySi, 1 << 40),
        "Pi" => (Format::BinarySi, 1 << 50),
        "Ei" => (Format::BinarySi, 1 << 60),
        "n" | "u" | "m" | "" | "k" | "M" | "G" | "T" | "P" | "E" => {
            exp10 += match suffix {
                "n" => -9,
                "u" => -6,
                "m" => -3,
                "" => 0,
                "k" => 3,
                "M" => 6,
                "G" => 9,
                "T" => 12,
                "P" => 15,
                _ => 18,
            };
            (Format::DecimalSi, 1)
        }
        s if s.starts_with(['e', 'E']) => {
            let e: i32 = s[1..].parse().ok()?;
            if e.abs() > 30 {
                return None;
            }
            exp10 += e;
            (Format::DecimalExponent, 1)
        }
        _ => return None,
    };
    // nanos = mantissa * factor * 10^(exp10 + 9), rounded up (away from zero) below a nano.
    let shift = exp10 + 9;
    let scaled = mantissa.checked_mul(factor)?;
    let nanos = if shift >= 0 {
        scaled.checked_mul(10i128.checked_pow(shift as u32)?)?
    } else {
        let div = 10i128.checked_pow((-shift) as u32)?;
        (scaled + div - 1) / div
    };
    Some(Parsed {
        negative: negative && nanos != 0,
        nanos,
        format,
    })
}

/// Whether `q` is a quantity the API server accepts.
pub fn is_quantity(q: &str) -> bool {
    parse(q).is_some()
}

/// The canonical form the API server stores and returns; `None` when `q` is not a quantity.
pub fn canonical(q: &str) -> Option<String> {
    let p = parse(q)?;
    if p.nanos == 0 {
        return Some("0".into());
    }
    let sign = if p.negative { "-" } else { "" };
    let mut format = p.format;
    if format == Format::BinarySi && (p.nanos < 1024 * NANO || p.nanos % NANO != 0) {
        // Small or fractional byte counts are shown in decimal, as apimachinery does.
        format = Format::DecimalSi;
    }
    if format == Format::BinarySi {
        let mut value = p.nanos / NANO;
        let mut power = 0;
        while power < 6 && value % 1024 == 0 {
            value /= 1024;
            power += 1;
        }
        let suffix = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"][power];
        return Some(format!("{sign}{value}{suffix}"));
    }
    // Decimal: the largest exponent, a multiple of three, that leaves an integer mantissa.
    let mut mantissa = p.nanos;
    let mut exp10: i32 = -9;
    while mantissa % 10 == 0 {
        mantissa /= 10;
        exp10 += 1;
    }
    let mut exp3 = exp10.div_euclid(3) * 3;
    if format == Format::DecimalSi {
        exp3 = exp3.min(18);
    }
    mantissa *= 10i128.pow((exp10 - exp3) as u32);
    let suffix = match (format, exp3) {
        (Format::DecimalExponent, 0) => String::new(),
        (Format::DecimalExponent, e) => format!("e{e}"),
        (_, -9) => "n".into(),
        (_, -6) => "u".into(),
        (_, -3) => "m".into(),
        (_, 0) => String::new(),
        (_, 3) => "k".into(),
        (_, 6) => "M".into(),
        (_, 9) => "G".into(),
        (_, 12) => "T".into(),
        (_, 15) => "P".into(),
        (_, _) => "E".into(),
    };
    Some(format!("{sign}{mantissa}{suffix}"))
}

/// `q` in canonical form, or as written when it is not a quantity (validation refuses it first).
pub fn canonical_or_same(q: &str) -> String {
    canonical(q).unwrap_or_else(|| q.to_string())
}

/// CPU in millicores: `500m` -> 500, `2` -> 2000, `1.5` -> 1500; `None` unless positive.
pub fn cpu_millis(q: &str) -> Option<u64> {
    let p = parse(q)?;
    (!p.negative && p.nanos > 0).then(|| ((p.nanos + 999_999) / 1_000_000) as u64)
}

/// Bytes: `512Mi` -> 536870912, `1G` -> 1e9, `1000` -> 1000; `None` unless positive.
pub fn bytes(q: &str) -> Option<u64> {
    let p = parse(q)?;
    (!p.negative && p.nanos > 0).then_some((p.nanos / NANO) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_forms_match_the_api_server() {
        // (written, what kube-apiserver 1.32 stores)
        let table = [
            ("0.5", "500m"),
            ("1.5", "1500m"),
            ("0.5Gi", "512Mi"),
            ("1.5Gi", "1536Mi"),
            ("1024Mi", "1Gi"),
            ("500m", "500m"),
            ("2", "2"),
            ("2000m", "2"),
            ("1000", "1k"),
            ("1500", "1500"),
            ("1e3", "1e3"),
            ("1.5e3", "1500"),
            ("100Ki", "100Ki"),
            ("0.3Gi", "322122547200m"),
            ("512", "512"),
            ("0.5Ki", "512"),
            ("1.5k", "1500"),
            ("0.1m", "100u"),
            ("0", "0"),
            ("0Mi", "0"),
            ("-1.5", "-1500m"),
            ("128974848", "128974848"),
            ("129e6", "129e6"),
            ("123Mi", "123Mi"),
            ("1G", "1G"),
        ];
        for (written, stored) in table {
            assert_eq!(canonical(written).as_deref(), Some(stored), "{written}");
            assert_eq!(canonical(stored).as_deref(), Some(stored), "{stored} is a fixed point");
        }
        for bad in ["", "lots", "1.2.3", "Mi", "1Q", "1 Mi", "."] {
            assert_eq!(canonical(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn numbers_for_tuning() {
        assert_eq!(cpu_millis("250m"), Some(250));
        assert_eq!(cpu_millis("1.5"), Some(1500));
        assert_eq!(cpu_millis("0"), None);
        assert_eq!(cpu_millis("lots"), None);
        assert_eq!(bytes("512Mi"), Some(512 << 20));
        assert_eq!(bytes("1G"), Some(1_000_000_000));
        assert_eq!(bytes("1.5Gi"), Some(1536 << 20));
        assert_eq!(bytes("12345"), Some(12345));
        assert_eq!(bytes("-1Mi"), None);
        assert_eq!(bytes("big"), None);
    }
}
