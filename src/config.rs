//! Parsers for command-line values shared by every binary: human durations
//! (`500ms`, `3s`, `10m`), byte sizes (`256KiB`, `64MiB`), points in time
//! (`10m` ago or RFC 3339) and `key=value` pairs.

use std::time::{Duration, SystemTime};

/// Parses a human duration (`500ms`, `3s`, `10m`, `1h`); a bare number is refused
/// so that `10` never silently means 10 ns or 10 s.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("`{s}` is not a duration like 500ms, 3s, 10m or 1h: {e}"))
}

/// Parses a byte size: a number of bytes, or one with a binary unit
/// (`K`/`KiB`, `M`/`MiB`, `G`/`GiB`; 1024-based).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(digits);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("`{s}` is not a size like 4096, 256KiB or 64MiB"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "`{other}` in `{s}` is not a unit: use K/KiB, M/MiB or G/GiB (1024-based)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// Parses a point in time: a duration ago (`90s`, `10m`, `2h`) or an RFC 3339
/// time (`2026-11-24T10:00:00Z`).
pub fn parse_since(s: &str) -> Result<SystemTime, String> {
    if let Ok(d) = humantime::parse_duration(s.trim()) {
        return SystemTime::now()
            .checked_sub(d)
            .ok_or_else(|| format!("`{s}` reaches before the epoch"));
    }
    humantime::parse_rfc3339_weak(s.trim()).map_err(|_| {
        format!(
            "`{s}` is neither a duration ago (10m, 2h) nor an RFC 3339 time (2026-11-24T10:00:00Z)"
        )
    })
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
    fn sizes() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("256KiB"), Ok(256 * 1024));
        assert_eq!(parse_bytes("64M"), Ok(64 << 20));
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert!(parse_bytes("MiB").is_err());
        assert!(parse_bytes("10MB").is_err());
        assert!(parse_bytes("99999999999G").is_err());
    }

    #[test]
    fn points_in_time() {
        let ten_min_ago = parse_since("10m").unwrap();
        let age = SystemTime::now().duration_since(ten_min_ago).unwrap();
        assert!(age >= Duration::from_secs(600) && age < Duration::from_secs(610));
        let t = parse_since("2026-11-24T10:00:00Z").unwrap();
        assert_eq!(
            t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
            1_795_514_400
        );
        assert!(parse_since("yesterday").is_err());
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

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// Text shaped like these values (digits, units, signs, RFC 3339
        /// punctuation), mixed with anything at all.
        fn valueish() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<String>(),
                "[0-9]{0,25}[ ]?(|B|K|k|KiB|M|MiB|G|GiB|ms|s|m|h|d|y|ns|us)",
                "[-+ 0-9a-zA-Z:.=]{0,30}",
                "[0-9]{1,5}-[0-9]{1,2}-[0-9]{1,2}T[0-9]{1,2}:[0-9]{1,2}:[0-9]{1,2}(\\.[0-9]{0,12})?(Z|[+-][0-9]{2}:[0-9]{2})?",
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn parsers_never_panic_and_errors_quote_the_input(s in valueish()) {
                for r in [
                    parse_duration(&s).map(drop),
                    parse_bytes(&s).map(drop),
                    parse_since(&s).map(drop),
                    parse_key_value(&s).map(drop),
                ] {
                    if let Err(e) = r {
                        prop_assert!(e.contains(&format!("`{s}`")), "{e:?} does not quote {s:?}");
                    }
                }
            }

            #[test]
            fn bytes_with_a_unit_multiply_or_say_too_large(n in any::<u64>(), unit in prop::sample::select(vec![
                ("", 1u64), ("B", 1), ("K", 1 << 10), ("k", 1 << 10), ("KiB", 1 << 10),
                ("M", 1 << 20), ("MiB", 1 << 20), ("G", 1 << 30), ("GiB", 1 << 30),
            ])) {
                let (suffix, mult) = unit;
                let text = format!("{n}{suffix}");
                match n.checked_mul(mult) {
                    Some(want) => prop_assert_eq!(parse_bytes(&text), Ok(want)),
                    None => prop_assert!(parse_bytes(&text).unwrap_err().contains("too large")),
                }
            }

            #[test]
            fn kib_is_1024_bytes(n in 0u64..(1 << 40)) {
                prop_assert_eq!(parse_bytes(&format!("{n}KiB")), Ok(n * 1024));
            }

            #[test]
            fn key_values_split_at_the_first_equals(k in "[^=]{1,20}", v in any::<String>()) {
                prop_assert_eq!(parse_key_value(&format!("{k}={v}")), Ok((k, v)));
            }
        }

        #[test]
        fn digits_beyond_u64_are_an_error() {
            assert!(parse_bytes("99999999999999999999G").is_err());
            assert!(parse_bytes("18446744073709551616").is_err());
            assert!(parse_since("99999999999999999999y").is_err());
        }
    }
}
