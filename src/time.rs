//! Wall-clock helpers: the registry stores times as milliseconds since the Unix
//! epoch; the API carries `google.protobuf.Timestamp`/`Duration`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A protobuf timestamp from milliseconds since the epoch.
pub fn timestamp_from_ms(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

/// Milliseconds since the epoch from a protobuf timestamp, saturating.
/// Callers send timestamps (`StreamLogsRequest.since`): `seconds * 1000`
/// in i64 overflowed past year 292 million, a panic in debug builds and a
/// wrapped time in release. i128 holds every product exactly.
pub fn ms_from_timestamp(ts: &prost_types::Timestamp) -> i64 {
    let ms = i128::from(ts.seconds) * 1000 + i128::from(ts.nanos) / 1_000_000;
    i64::try_from(ms).unwrap_or(if ms < 0 { i64::MIN } else { i64::MAX })
}

/// A std duration from a protobuf duration; negative durations become zero.
pub fn duration_from_proto(d: &prost_types::Duration) -> Duration {
    if d.seconds < 0 || d.nanos < 0 {
        return Duration::ZERO;
    }
    Duration::new(d.seconds.unsigned_abs(), d.nanos.unsigned_abs())
}

/// A protobuf duration from a std duration (saturating).
pub fn duration_to_proto(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip() {
        for ms in [0, 1, 999, 1000, 1_700_000_000_123] {
            assert_eq!(ms_from_timestamp(&timestamp_from_ms(ms)), ms);
        }
    }

    #[test]
    fn durations_round_trip_and_clamp_negative() {
        let d = Duration::from_millis(1500);
        assert_eq!(duration_from_proto(&duration_to_proto(d)), d);
        let neg = prost_types::Duration {
            seconds: -1,
            nanos: 0,
        };
        assert_eq!(duration_from_proto(&neg), Duration::ZERO);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// Seconds and nanos as a caller may send them: anything, often edges.
        fn seconds() -> impl Strategy<Value = i64> {
            prop_oneof![
                any::<i64>(),
                Just(i64::MIN),
                Just(i64::MAX),
                -10_000_000_000i64..10_000_000_000
            ]
        }

        fn nanos() -> impl Strategy<Value = i32> {
            prop_oneof![
                any::<i32>(),
                Just(i32::MIN),
                Just(i32::MAX),
                0..1_000_000_000
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn ms_from_timestamp_saturates_instead_of_overflowing(seconds in seconds(), nanos in nanos()) {
                let ms = ms_from_timestamp(&prost_types::Timestamp { seconds, nanos });
                let exact = i128::from(seconds) * 1000 + i128::from(nanos) / 1_000_000;
                prop_assert_eq!(i128::from(ms), exact.clamp(i128::from(i64::MIN), i128::from(i64::MAX)));
            }

            #[test]
            fn every_ms_round_trips_through_a_timestamp(ms in any::<i64>()) {
                let ts = timestamp_from_ms(ms);
                prop_assert!((0..1_000_000_000).contains(&ts.nanos));
                prop_assert_eq!(ms_from_timestamp(&ts), ms);
            }

            #[test]
            fn duration_from_proto_never_panics_and_clamps_negatives(seconds in seconds(), nanos in nanos()) {
                let d = duration_from_proto(&prost_types::Duration { seconds, nanos });
                if seconds < 0 || nanos < 0 {
                    prop_assert_eq!(d, Duration::ZERO);
                } else {
                    // Out-of-range nanos carry into seconds, as Duration::new does.
                    prop_assert_eq!(d.as_nanos(), u128::from(seconds.unsigned_abs()) * 1_000_000_000 + u128::from(nanos.unsigned_abs()));
                }
            }

            #[test]
            fn valid_durations_round_trip(secs in 0..=i64::MAX.unsigned_abs(), nanos in 0u32..1_000_000_000) {
                let d = Duration::new(secs, nanos);
                prop_assert_eq!(duration_from_proto(&duration_to_proto(d)), d);
            }
        }

        #[test]
        fn durations_beyond_i64_seconds_saturate() {
            assert_eq!(duration_to_proto(Duration::MAX).seconds, i64::MAX);
        }
    }
}
