//! Parsers for command-line values shared by every binary: human durations
//! (`500ms`, `3s`, `10m`) and `key=value` pairs.

use std::time::Duration;

/// Parses a human duration (`500ms`, `3s`, `10m`, `1h`); a bare number is refused
/// so that `10` never silently means 10 ns or 10 s.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("`{s}` is not a duration like 500ms, 3s, 10m or 1h: {e}"))
}

/// Parses `KEY=VALUE`; the value may contain `=`, the key may not be empty.
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn key_values() {
        assert_eq!(
            parse_key_value("a=b=c"),
            Ok(("a".to_owned(), "b=c".to_owned()))
        );
        assert_eq!(parse_key_value("a="), Ok(("a".to_owned(), String::new())));
        assert!(parse_key_value("ab").is_err());
        assert!(parse_key_value("=b").is_err());
    }
}
