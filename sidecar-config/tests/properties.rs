//! Property tests of the configuration parser: no input panics it, and a broken value is reported
//! with its key.

use mall_sidecar_config::SidecarConfig;
use proptest::prelude::*;

const EXAMPLE: &str = include_str!("../../sidecar/sidecar.example.toml");

/// `key = value` lines of the example (not comments, not tables).
fn assignments() -> Vec<(usize, String)> {
    EXAMPLE
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim_start().starts_with('#') && !l.trim_start().starts_with('[') && l.contains(" = "))
        // A value spanning lines (`servers = [`) cannot be swapped one line at a time.
        .filter(|(_, l)| !l.split('#').next().unwrap_or("").trim_end().ends_with('['))
        .map(|(i, l)| (i, l.split(" = ").next().unwrap().trim().to_string()))
        .filter(|(_, k)| !k.is_empty() && !k.starts_with('{'))
        .collect()
}

fn bad_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("\"text\"".to_string()),
        Just("-1".to_string()),
        Just("0".to_string()),
        Just("99999999999".to_string()),
        Just("true".to_string()),
        Just("[1, \"a\"]".to_string()),
        Just("{ x = 1 }".to_string()),
        Just("1.5".to_string()),
        "[a-z]{1,6}".prop_map(|s| format!("\"{s}\"")),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_is_rejected_or_accepted_without_panicking(text in "(?s).{0,300}") {
        let _ = SidecarConfig::from_toml(&text);
    }

    #[test]
    fn a_broken_value_is_reported_with_its_key(pick in any::<prop::sample::Index>(), value in bad_value()) {
        let lines = assignments();
        let (line, key) = &lines[pick.index(lines.len())];
        let text: Vec<String> = EXAMPLE
            .lines()
            .enumerate()
            .map(|(i, l)| if i == *line { format!("{key} = {value}") } else { l.to_string() })
            .collect();
        match SidecarConfig::from_toml(&text.join("\n")) {
            // Some replacements are valid (0 retries, "text" as a path prefix...): then it validated.
            Ok(config) => prop_assert!(config.validate().is_ok()),
            Err(e) => {
                let message = e.to_string();
                prop_assert!(message.contains(key.as_str()), "`{key} = {value}` -> {message}");
            }
        }
    }
}
