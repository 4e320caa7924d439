//! Encoding of records as Redis hash fields. Scalars are plain strings so
//! `redis-cli HGETALL` stays readable; the spec and exit status are protobuf
//! bytes, the one encoding every language already has for them.

use std::collections::HashMap;

use prost::Message;

use super::RegistryError;
use crate::proto::v1::{Agent, AgentSpec, AgentState, ExitStatus};
use crate::state;
use crate::time::timestamp_from_ms;

/// Field names of the agent hash.
pub(super) mod field {
    pub const ID: &str = "id";
    pub const NAME: &str = "name";
    pub const SPEC: &str = "spec";
    pub const STATE: &str = "state";
    pub const HOST: &str = "host";
    pub const PID: &str = "pid";
    pub const GENERATION: &str = "generation";
    pub const CREATED_AT: &str = "created_at";
    pub const STARTED_AT: &str = "started_at";
    pub const EXIT: &str = "exit";
    pub const RESTARTS: &str = "restarts";
    pub const LAST_EXIT: &str = "last_exit";
    pub const NEXT_RESTART_AT: &str = "next_restart_at";
    pub const IDLE: &str = "idle";
    pub const INCARNATION: &str = "incarnation";
    pub const PENDING_SINCE: &str = "pending_since";
}

/// Every field of a new agent record.
pub(super) fn encode_agent(a: &Agent) -> Vec<(&'static str, Vec<u8>)> {
    let spec = a.spec.clone().unwrap_or_default();
    let mut out = vec![
        (field::ID, a.id.clone().into_bytes()),
        (field::NAME, spec.name.clone().into_bytes()),
        (field::SPEC, spec.encode_to_vec()),
        (field::STATE, state_bytes(a.state())),
        (field::HOST, a.host.clone().into_bytes()),
        (field::PID, a.pid.to_string().into_bytes()),
        (field::GENERATION, a.generation.to_string().into_bytes()),
    ];
    if let Some(ts) = &a.created_at {
        out.push((
            field::CREATED_AT,
            crate::time::ms_from_timestamp(ts).to_string().into_bytes(),
        ));
    }
    if let Some(ts) = &a.started_at {
        out.push((
            field::STARTED_AT,
            crate::time::ms_from_timestamp(ts).to_string().into_bytes(),
        ));
    }
    if let Some(exit) = &a.exit {
        out.push((field::EXIT, exit.encode_to_vec()));
    }
    if a.restarts > 0 {
        out.push((field::RESTARTS, a.restarts.to_string().into_bytes()));
    }
    if let Some(exit) = &a.last_exit {
        out.push((field::LAST_EXIT, exit.encode_to_vec()));
    }
    if let Some(ts) = &a.next_restart_at {
        out.push((
            field::NEXT_RESTART_AT,
            crate::time::ms_from_timestamp(ts).to_string().into_bytes(),
        ));
    }
    if !a.incarnation.is_empty() {
        out.push((field::INCARNATION, a.incarnation.clone().into_bytes()));
    }
    if let Some(ts) = &a.pending_since {
        out.push((
            field::PENDING_SINCE,
            crate::time::ms_from_timestamp(ts).to_string().into_bytes(),
        ));
    }
    out
}

/// The stored form of a state.
pub(super) fn state_bytes(s: AgentState) -> Vec<u8> {
    state::name(s).as_bytes().to_vec()
}

fn text<'a>(key: &str, h: &'a HashMap<String, Vec<u8>>, f: &str) -> Result<&'a str, RegistryError> {
    match h.get(f) {
        None => Ok(""),
        Some(b) => {
            std::str::from_utf8(b).map_err(|_| corrupt(key, format!("field `{f}` is not UTF-8")))
        }
    }
}

fn number<T: std::str::FromStr + Default>(
    key: &str,
    h: &HashMap<String, Vec<u8>>,
    f: &str,
) -> Result<T, RegistryError> {
    let s = text(key, h, f)?;
    if s.is_empty() {
        return Ok(T::default());
    }
    s.parse()
        .map_err(|_| corrupt(key, format!("field `{f}` = `{s}` is not a number")))
}

fn corrupt(key: &str, detail: String) -> RegistryError {
    RegistryError::Corrupt {
        key: key.to_owned(),
        detail,
    }
}

/// Decodes an agent hash; `None` for an empty hash (no such key).
pub(super) fn decode_agent(
    key: &str,
    h: &HashMap<String, Vec<u8>>,
) -> Result<Option<Agent>, RegistryError> {
    if h.is_empty() {
        return Ok(None);
    }
    let spec = match h.get(field::SPEC) {
        Some(b) => AgentSpec::decode(b.as_slice())
            .map_err(|e| corrupt(key, format!("field `spec`: {e}")))?,
        None => return Err(corrupt(key, "field `spec` is missing".into())),
    };
    let st = text(key, h, field::STATE)?;
    let state = state::parse(st).ok_or_else(|| corrupt(key, format!("unknown state `{st}`")))?;
    let exit_field = |f: &str| -> Result<Option<ExitStatus>, RegistryError> {
        match h.get(f) {
            Some(b) if !b.is_empty() => ExitStatus::decode(b.as_slice())
                .map(Some)
                .map_err(|e| corrupt(key, format!("field `{f}`: {e}"))),
            _ => Ok(None),
        }
    };
    let ms = |f: &str| -> Result<Option<prost_types::Timestamp>, RegistryError> {
        let v: i64 = number(key, h, f)?;
        Ok((v > 0).then(|| timestamp_from_ms(v)))
    };
    Ok(Some(Agent {
        id: text(key, h, field::ID)?.to_owned(),
        spec: Some(spec),
        state: state as i32,
        host: text(key, h, field::HOST)?.to_owned(),
        pid: number(key, h, field::PID)?,
        generation: number(key, h, field::GENERATION)?,
        exit: exit_field(field::EXIT)?,
        created_at: ms(field::CREATED_AT)?,
        started_at: ms(field::STARTED_AT)?,
        restarts: number(key, h, field::RESTARTS)?,
        last_exit: exit_field(field::LAST_EXIT)?,
        next_restart_at: ms(field::NEXT_RESTART_AT)?,
        idle: text(key, h, field::IDLE)? == "1",
        incarnation: text(key, h, field::INCARNATION)?.to_owned(),
        pending_since: ms(field::PENDING_SINCE)?,
    }))
}

/// The fields a [`decode_head`] reads: what the sweep judges a record by.
pub(super) const HEAD_FIELDS: [&str; 6] = [
    field::ID,
    field::STATE,
    field::HOST,
    field::GENERATION,
    field::CREATED_AT,
    field::PENDING_SINCE,
];

/// A record's head: id, state, host, generation, created_at and
/// pending_since from `h` (the [`HEAD_FIELDS`]), no spec; `None` when the
/// record does not exist.
pub(super) fn decode_head(
    key: &str,
    h: &HashMap<String, Vec<u8>>,
) -> Result<Option<Agent>, RegistryError> {
    if h.get(field::STATE).is_none() {
        return Ok(None);
    }
    let st = text(key, h, field::STATE)?;
    let state = state::parse(st).ok_or_else(|| corrupt(key, format!("unknown state `{st}`")))?;
    let ms = |f: &str| -> Result<Option<prost_types::Timestamp>, RegistryError> {
        let v: i64 = number(key, h, f)?;
        Ok((v > 0).then(|| timestamp_from_ms(v)))
    };
    Ok(Some(Agent {
        id: text(key, h, field::ID)?.to_owned(),
        state: state as i32,
        host: text(key, h, field::HOST)?.to_owned(),
        generation: number(key, h, field::GENERATION)?,
        created_at: ms(field::CREATED_AT)?,
        pending_since: ms(field::PENDING_SINCE)?,
        ..Default::default()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_is_the_records_judged_fields() {
        let a = Agent {
            id: "01abc".into(),
            spec: Some(AgentSpec::default()),
            state: AgentState::Pending as i32,
            host: "h1".into(),
            generation: 4,
            created_at: Some(timestamp_from_ms(1_700_000_000_000)),
            pending_since: Some(timestamp_from_ms(1_700_000_000_500)),
            pid: 9,
            ..Default::default()
        };
        let h: HashMap<String, Vec<u8>> = encode_agent(&a)
            .into_iter()
            .filter(|(f, _)| HEAD_FIELDS.contains(f))
            .map(|(f, v)| (f.to_owned(), v))
            .collect();
        let head = decode_head("k", &h).unwrap().unwrap();
        assert_eq!(
            head,
            Agent {
                spec: None,
                pid: 0,
                ..a
            }
        );
        assert_eq!(decode_head("k", &HashMap::new()).unwrap(), None);
    }

    #[test]
    fn agent_round_trips() {
        let a = Agent {
            id: "01abc".into(),
            spec: Some(AgentSpec {
                name: "n".into(),
                argv: vec!["sleep".into(), "1".into()],
                ..Default::default()
            }),
            state: AgentState::Exited as i32,
            host: "h1".into(),
            pid: 42,
            generation: 3,
            exit: Some(ExitStatus {
                code: Some(3),
                reason: crate::proto::v1::ExitReason::Completed as i32,
                ..Default::default()
            }),
            created_at: Some(timestamp_from_ms(1_700_000_000_000)),
            started_at: Some(timestamp_from_ms(1_700_000_000_500)),
            restarts: 2,
            last_exit: Some(ExitStatus {
                code: Some(1),
                ..Default::default()
            }),
            next_restart_at: Some(timestamp_from_ms(1_700_000_001_000)),
            idle: false,
            incarnation: "01inc".into(),
            pending_since: Some(timestamp_from_ms(1_700_000_000_100)),
        };
        let h: HashMap<String, Vec<u8>> = encode_agent(&a)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        assert_eq!(decode_agent("k", &h).unwrap(), Some(a));
        assert_eq!(decode_agent("k", &HashMap::new()).unwrap(), None);
    }

    #[test]
    fn corrupt_records_are_errors() {
        let mut h = HashMap::new();
        h.insert("spec".to_owned(), vec![0xff, 0xff]);
        assert!(matches!(
            decode_agent("k", &h),
            Err(RegistryError::Corrupt { .. })
        ));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        const FIELDS: [&str; 16] = [
            field::ID,
            field::NAME,
            field::SPEC,
            field::STATE,
            field::HOST,
            field::PID,
            field::GENERATION,
            field::CREATED_AT,
            field::STARTED_AT,
            field::EXIT,
            field::RESTARTS,
            field::LAST_EXIT,
            field::NEXT_RESTART_AT,
            field::IDLE,
            field::INCARNATION,
            field::PENDING_SINCE,
        ];

        /// A stored value: garbage bytes, numbers in and out of range, state
        /// names, or well-formed protobuf (whole or cut short).
        fn value() -> impl Strategy<Value = Vec<u8>> {
            let proto = (prop::collection::vec(".{0,8}", 0..4), any::<Option<i32>>()).prop_map(
                |(argv, code)| {
                    let mut b = AgentSpec {
                        argv,
                        ..Default::default()
                    }
                    .encode_to_vec();
                    b.extend(
                        ExitStatus {
                            code,
                            ..Default::default()
                        }
                        .encode_to_vec(),
                    );
                    b
                },
            );
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..32),
                any::<i64>().prop_map(|n| n.to_string().into_bytes()),
                any::<u64>().prop_map(|n| n.to_string().into_bytes()),
                any::<i128>().prop_map(|n| n.to_string().into_bytes()),
                prop::sample::select(vec![
                    "RUNNING",
                    "running",
                    "UNSPECIFIED",
                    "AGENT_STATE_EXITED",
                    "",
                    "1",
                    "-0",
                    "+5"
                ])
                .prop_map(|s| s.as_bytes().to_vec()),
                (proto.clone(), any::<prop::sample::Index>()).prop_map(|(b, i)| {
                    let cut = if b.is_empty() { 0 } else { i.index(b.len()) };
                    b[..cut].to_vec()
                }),
                proto,
            ]
        }

        /// A hash: a well-formed spec (most of the time, to reach the other
        /// fields), then known fields and random ones with any value.
        fn hash() -> impl Strategy<Value = HashMap<String, Vec<u8>>> {
            let key = prop_oneof![
                prop::sample::select(FIELDS.to_vec()).prop_map(str::to_owned),
                ".{0,10}"
            ];
            let spec = prop::option::weighted(
                0.8,
                Just(
                    AgentSpec {
                        argv: vec!["x".into()],
                        ..Default::default()
                    }
                    .encode_to_vec(),
                ),
            );
            let state = prop::option::weighted(
                0.8,
                prop::sample::select(vec!["RUNNING", "EXITED", "PENDING"]),
            );
            (spec, state, prop::collection::hash_map(key, value(), 0..12)).prop_map(
                |(spec, state, mut h)| {
                    if let Some(b) = spec {
                        h.entry(field::SPEC.to_owned()).or_insert(b);
                    }
                    if let Some(st) = state {
                        h.entry(field::STATE.to_owned())
                            .or_insert(st.as_bytes().to_vec());
                    }
                    h
                },
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn decode_agent_never_panics_on_garbage(h in hash()) {
                match decode_agent("ap:agent:x", &h) {
                    Ok(None) => prop_assert!(h.is_empty()),
                    Ok(Some(a)) => prop_assert!(a.spec.is_some()),
                    Err(RegistryError::Corrupt { key, detail }) => {
                        prop_assert_eq!(key, "ap:agent:x");
                        prop_assert!(!detail.is_empty());
                    }
                    Err(e) => prop_assert!(false, "not a corrupt-record error: {e}"),
                }
            }

            #[test]
            fn agents_round_trip(
                id in "[a-z0-9]{1,26}",
                host in "[a-z0-9.-]{0,20}",
                state in prop::sample::select(vec![AgentState::Pending, AgentState::Running, AgentState::Exited, AgentState::Lost]),
                (pid, generation, restarts) in any::<(i32, u64, u32)>(),
                times in any::<[Option<i64>; 4]>(),
                incarnation in "[a-z0-9]{0,26}",
            ) {
                // Only positive times are stored (0 means unset).
                let [created, started, next, pending] = times.map(|t| t.filter(|ms| *ms > 0).map(timestamp_from_ms));
                let a = Agent {
                    id,
                    spec: Some(AgentSpec { argv: vec!["x".into()], ..Default::default() }),
                    state: state as i32,
                    host,
                    pid,
                    generation,
                    created_at: created,
                    started_at: started,
                    restarts,
                    next_restart_at: next,
                    incarnation,
                    pending_since: pending,
                    ..Default::default()
                };
                let h: HashMap<String, Vec<u8>> =
                    encode_agent(&a).into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
                prop_assert_eq!(decode_agent("k", &h).unwrap(), Some(a));
            }
        }
    }
}
