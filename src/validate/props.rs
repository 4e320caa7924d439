//! Properties of the validators over arbitrary input, as a remote caller
//! may send it: they never panic, every error names the field it was given
//! (or a `spec.` field) and quotes at most a bounded part of the value, and
//! what they accept is what the host agent relies on.

use super::*;
use crate::proto::v1::{Placement, ResourceLimits, RestartPolicy};
use proptest::prelude::*;

/// Every field `spec` may name.
const SPEC_FIELDS: [&str; 11] = [
    "spec.name",
    "spec.argv",
    "spec.env",
    "spec.cwd",
    "spec.labels",
    "spec.placement.host",
    "spec.placement.label_selector",
    "spec.stop_grace",
    "spec.stop_after_disconnect",
    "spec.log_buffer_bytes",
    "spec.log_max_bytes",
];

/// Strings as a caller may send them: anything, near-valid, NUL bytes.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-z0-9/=._ -]{0,12}",
        "[a-z\\x00=/]{0,4}",
        Just(String::new()),
    ]
}

fn duration() -> impl Strategy<Value = Option<prost_types::Duration>> {
    let seconds = prop_oneof![any::<i64>(), Just(i64::MIN), Just(i64::MAX), -5i64..100_000];
    let nanos = prop_oneof![
        any::<i32>(),
        Just(i32::MIN),
        Just(i32::MAX),
        0..1_000_000_000
    ];
    prop::option::of(
        (seconds, nanos).prop_map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }),
    )
}

fn size() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        prop::sample::select(vec![
            0,
            MIN_LOG_BUFFER - 1,
            MIN_LOG_BUFFER,
            MAX_LOG_BUFFER,
            MAX_LOG_BUFFER + 1,
            MIN_LOG_BYTES - 1,
            MIN_LOG_BYTES,
            MAX_LOG_BYTES,
            MAX_LOG_BYTES + 1,
            u64::MAX,
        ]),
    ]
}

fn agent_spec() -> impl Strategy<Value = AgentSpec> {
    let map = || prop::collection::hash_map(text(), text(), 0..4);
    let restart = prop::option::of(
        (
            any::<i32>(),
            any::<Option<u32>>(),
            duration(),
            duration(),
            duration(),
        )
            .prop_map(
                |(mode, max_restarts, initial_backoff, max_backoff, stable_after)| RestartPolicy {
                    mode,
                    max_restarts,
                    initial_backoff,
                    max_backoff,
                    stable_after,
                },
            ),
    );
    let limits =
        prop::option::of(
            any::<[Option<u64>; 4]>().prop_map(|[a, b, c, d]| ResourceLimits {
                address_space_bytes: a,
                open_files: b,
                processes: c,
                cpu_seconds: d,
            }),
        );
    let placement =
        prop::option::of(
            (text(), text()).prop_map(|(host, label_selector)| Placement {
                host,
                label_selector,
            }),
        );
    let strings = (
        text(),
        prop::collection::vec(text(), 0..6),
        map(),
        text(),
        map(),
        placement,
    );
    let durations = (
        duration(),
        duration(),
        duration(),
        duration(),
        duration(),
        duration(),
    );
    let rest = (
        restart,
        limits,
        any::<Option<u32>>(),
        any::<Option<u32>>(),
        size(),
        size(),
        any::<bool>(),
    );
    (strings, durations, rest).prop_map(
        |(
            (name, argv, env, cwd, labels, placement),
            (stop_grace, timeout, idle_after, idle_timeout, session_grace, stop_after_disconnect),
            (restart, limits, uid, gid, log_max_bytes, log_buffer_bytes, tty),
        )| AgentSpec {
            name,
            argv,
            env,
            cwd,
            labels,
            placement,
            stop_grace,
            timeout,
            restart,
            limits,
            uid,
            gid,
            log_max_bytes,
            idle_after,
            idle_timeout,
            tty,
            session_grace,
            log_buffer_bytes,
            stop_after_disconnect,
            // Its rules are unit-tested in cgroups.rs.
            resources: None,
        },
    )
}

fn in_grace(d: Option<&prost_types::Duration>) -> bool {
    d.is_none_or(|g| {
        g.seconds >= 0 && g.nanos >= 0 && crate::time::duration_from_proto(g) <= MAX_GRACE
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn spec_never_panics_and_errors_name_a_spec_field(s in agent_spec()) {
        match spec(&s) {
            Err(e) => {
                prop_assert!(SPEC_FIELDS.contains(&e.field.as_str()), "unknown field {:?}", e.field);
                prop_assert!(!e.reason.is_empty());
                prop_assert!(e.reason.len() <= 512, "{} bytes of reason", e.reason.len());
            }
            // What the host relies on once a spec is accepted.
            Ok(()) => {
                prop_assert!(!s.argv.is_empty() && !s.argv[0].is_empty() && s.argv.len() <= MAX_ARGV);
                prop_assert!(s.argv.iter().chain(s.env.keys()).chain(s.env.values()).all(|a| !a.contains('\0')));
                prop_assert!(s.env.keys().all(|k| !k.is_empty() && !k.contains('=')));
                prop_assert!(s.cwd.is_empty() || s.cwd.starts_with('/'));
                prop_assert!(s.labels.len() <= MAX_LABELS);
                prop_assert!(in_grace(s.stop_grace.as_ref()) && in_grace(s.stop_after_disconnect.as_ref()));
                prop_assert!(s.log_buffer_bytes == 0 || (MIN_LOG_BUFFER..=MAX_LOG_BUFFER).contains(&s.log_buffer_bytes));
                prop_assert!(s.log_max_bytes == 0 || (MIN_LOG_BYTES..=MAX_LOG_BYTES).contains(&s.log_max_bytes));
            }
        }
    }

    #[test]
    fn argv_and_label_counts_are_refused_just_past_their_limits(
        args in MAX_ARGV - 2..=MAX_ARGV + 2,
        labels in MAX_LABELS - 2..=MAX_LABELS + 2,
    ) {
        let mut s = plain();
        s.argv = vec!["x".to_owned(); args];
        s.labels = (0..labels).map(|i| (format!("k{i}"), "v".to_owned())).collect();
        let r = spec(&s);
        if args > MAX_ARGV {
            prop_assert_eq!(r.unwrap_err().field, "spec.argv");
        } else if labels > MAX_LABELS {
            prop_assert_eq!(r.unwrap_err().field, "spec.labels");
        } else {
            prop_assert_eq!(r, Ok(()));
        }
    }

    #[test]
    fn argv_and_env_bytes_are_refused_just_past_the_limit(
        arg in MAX_ARGV_ENV_BYTES / 2 - 8..=MAX_ARGV_ENV_BYTES / 2 + 8,
        value in MAX_ARGV_ENV_BYTES / 2 - 8..=MAX_ARGV_ENV_BYTES / 2 + 8,
    ) {
        let mut s = plain();
        s.argv = vec!["sh".to_owned(), "a".repeat(arg)];
        s.env.insert("K".to_owned(), "v".repeat(value));
        // Each argument and `K=value` with its NUL.
        let bytes = 3 + (arg + 1) + (1 + value + 2);
        let r = spec(&s);
        if bytes > MAX_ARGV_ENV_BYTES {
            prop_assert_eq!(r.unwrap_err().field, "spec.env");
        } else {
            prop_assert_eq!(r, Ok(()));
        }
    }

    #[test]
    fn grace_accepts_exactly_zero_to_a_day(d in duration()) {
        let d = d.unwrap_or_default();
        let r = grace("grace", &d);
        prop_assert_eq!(r.is_ok(), in_grace(Some(&d)));
        if let Err(e) = r {
            prop_assert_eq!(e.field, "grace");
        }
    }

    #[test]
    fn id_checks_never_panic_and_name_the_given_field(field in "[a-z_.]{1,20}", s in prop_oneof![text(), "[a-z0-9-]{60,70}", "[a-z0-9]{250,260}"]) {
        type Check = fn(&str, &str) -> Result;
        let checks: [(Check, usize); 6] = [
            (agent_id, 64),
            (host_id, 253),
            (name, 63),
            (request_id, 128),
            (label_key, 253),
            (label_value, 63),
        ];
        for (check, max) in checks {
            match check(&field, &s) {
                Err(e) => {
                    prop_assert_eq!(&e.field, &field);
                    prop_assert!(!e.reason.is_empty());
                    prop_assert!(e.reason.len() <= 512, "{} bytes of reason", e.reason.len());
                }
                Ok(()) => prop_assert!(s.len() <= max && s.is_ascii() && !s.contains(['\0', ' ', '='])),
            }
        }
    }

    #[test]
    fn quote_keeps_short_values_and_cuts_long_ones_on_a_char_boundary(s in any::<String>(), pad in 0usize..200) {
        let s = format!("{}{s}", "é".repeat(pad));
        let q = quote(&s);
        if s.len() <= MAX_QUOTED {
            prop_assert_eq!(q, s);
        } else {
            prop_assert!(q.len() <= MAX_QUOTED + 32);
            let tail = format!("… ({} bytes)", s.len());
            prop_assert!(q.ends_with(&tail));
        }
    }
}

#[test]
fn long_values_are_not_echoed_whole() {
    let mut s = plain();
    s.cwd = "x".repeat(1 << 20);
    assert!(spec(&s).unwrap_err().reason.len() < 200);
    let mut s = plain();
    s.env
        .insert(format!("{}=", "K".repeat(1 << 20)), String::new());
    assert!(spec(&s).unwrap_err().reason.len() < 200);
}

fn plain() -> AgentSpec {
    AgentSpec {
        argv: vec!["sleep".into(), "1".into()],
        ..Default::default()
    }
}
