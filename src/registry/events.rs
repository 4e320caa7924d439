//! The event stream (`ap:events`, a Redis stream bounded with `MAXLEN ~`):
//! writing host events, and reading events after a token. Agent state events
//! are written by the record scripts themselves, atomically with the change.
//! [`StreamBounds`] tells whether events after a resume token were trimmed.
//! Reading is in `event_reader.rs`.

use std::collections::HashMap;

use super::{scripts, Registry, Result};
use crate::proto::v1::{Event, EventType};
use crate::state;
use crate::time::{now_ms, timestamp_from_ms};

/// Approximate number of events retained.
pub const EVENTS_MAXLEN: usize = 100_000;

/// The stored short name of an event type (`AGENT_STATE`).
pub fn type_name(t: EventType) -> &'static str {
    t.as_str_name()
        .strip_prefix("EVENT_TYPE_")
        .unwrap_or("UNSPECIFIED")
}

/// What the event stream holds now, from `XINFO STREAM`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamBounds {
    /// The oldest retained event; `None` when the stream is empty or missing.
    pub first: Option<String>,
    /// The newest id ever appended (`0-0` when the stream does not exist).
    pub last_generated: String,
    /// The highest id removed by `XDEL` (Redis 7 and later; trimming leaves
    /// it alone).
    max_deleted: Option<String>,
    /// How many events were ever trimmed or deleted (Redis 7 and later).
    removed: Option<u64>,
}

impl Default for StreamBounds {
    fn default() -> Self {
        Self {
            first: None,
            last_generated: "0-0".to_owned(),
            max_deleted: None,
            removed: Some(0),
        }
    }
}

/// What stream `key` holds now (`XINFO STREAM`, by a script so that a
/// missing stream is an answer).
pub(super) async fn stream_bounds(
    conn: &mut super::Connection,
    key: &str,
) -> std::result::Result<StreamBounds, redis::RedisError> {
    let reply: Option<(String, String, String, String, String)> =
        scripts::STREAM_BOUNDS.key(key).invoke_async(conn).await?;
    let Some((length, last, max_deleted, added, first)) = reply else {
        return Ok(StreamBounds::default());
    };
    let length: u64 = length.parse().unwrap_or(0);
    Ok(StreamBounds {
        first: (!first.is_empty()).then_some(first),
        last_generated: last,
        max_deleted: (!max_deleted.is_empty()).then_some(max_deleted),
        removed: added.parse::<u64>().ok().map(|a| a.saturating_sub(length)),
    })
}

/// A stream id (`ms-seq`, or `ms`, or `0`) as a comparable pair.
pub(super) fn parse_id(id: &str) -> Option<(u64, u64)> {
    match id.split_once('-') {
        Some((ms, seq)) => Some((ms.parse().ok()?, seq.parse().ok()?)),
        None => Some((id.parse().ok()?, 0)),
    }
}

/// The id right after `id`, as text.
fn next_id((ms, seq): (u64, u64)) -> String {
    match seq.checked_add(1) {
        Some(s) => format!("{ms}-{s}"),
        None => format!("{}-0", ms.saturating_add(1)),
    }
}

impl StreamBounds {
    /// Whether events after `token` are gone from the stream: `Some(id)` when
    /// some event after `token` and before `id` was trimmed (or deleted), so a
    /// reader continuing after `token` would miss it; `None` when nothing after
    /// `token` was removed (or `token` is not a stream id).
    ///
    /// Redis does not record the id of the last trimmed entry, only the oldest
    /// retained one, so a token older than that one counts as too old even in
    /// the one case where nothing was missed: when the token is exactly the
    /// last event trimmed.
    pub fn gap_after(&self, token: &str) -> Option<String> {
        let t = parse_id(token)?;
        if let Some(m) = self.max_deleted.as_deref().and_then(parse_id) {
            if t < m {
                return Some(next_id(m));
            }
        }
        if self.removed == Some(0) {
            return None;
        }
        match &self.first {
            Some(first) => (t < parse_id(first)?).then(|| first.clone()),
            // Empty: every event up to the last one appended is gone.
            None => {
                let last = parse_id(&self.last_generated)?;
                (t < last).then(|| next_id(last))
            }
        }
    }
}

pub(super) fn decode(id: String, f: &HashMap<String, String>) -> Event {
    let get = |k: &str| f.get(k).cloned().unwrap_or_default();
    let ty = EventType::from_str_name(&format!("EVENT_TYPE_{}", get("type")))
        .unwrap_or(EventType::Unspecified);
    Event {
        token: id,
        r#type: ty as i32,
        agent_id: get("agent"),
        state: state::parse(&get("state")).map_or(0, |s| s as i32),
        previous: state::parse(&get("previous")).map_or(0, |s| s as i32),
        host: get("host"),
        generation: get("generation").parse().unwrap_or(0),
        at: get("at").parse::<i64>().ok().map(timestamp_from_ms),
    }
}

impl Registry {
    /// The `XADD` of one event: `fields` after the stream bound and the time.
    pub(super) fn event_cmd(&self, stream: String, fields: &[(&str, String)]) -> redis::Cmd {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(stream)
            .arg("MAXLEN")
            .arg("~")
            .arg(EVENTS_MAXLEN)
            .arg("*");
        for (k, v) in fields {
            cmd.arg(*k).arg(v);
        }
        cmd.arg("at").arg(now_ms());
        cmd
    }

    /// Appends a host event.
    pub async fn emit_host_event(&self, ty: EventType, host: &str) -> Result<()> {
        self.event_cmd(
            self.keys().host_events(),
            &[
                ("type", type_name(ty).to_owned()),
                ("host", host.to_owned()),
            ],
        )
        .query_async::<String>(&mut self.conn())
        .await
        .map(drop)
        .map_err(self.err("append host event"))
    }

    /// Appends an agent event that is not a state change (AGENT_IDLE).
    pub async fn emit_agent_event(
        &self,
        ty: EventType,
        agent: &str,
        host: &str,
        generation: u64,
    ) -> Result<()> {
        self.event_cmd(
            self.keys().events(self.keys().shard_of(agent)),
            &[
                ("type", type_name(ty).to_owned()),
                ("agent", agent.to_owned()),
                ("host", host.to_owned()),
                ("generation", generation.to_string()),
            ],
        )
        .query_async::<String>(&mut self.conn())
        .await
        .map(drop)
        .map_err(self.err("append agent event"))
    }

    /// Wraps a stream read error with the registry's address.
    pub fn event_error(&self, e: redis::RedisError) -> super::RegistryError {
        (self.err("read events"))(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(first: Option<&str>, last: &str, removed: Option<u64>) -> StreamBounds {
        StreamBounds {
            first: first.map(str::to_owned),
            last_generated: last.to_owned(),
            max_deleted: Some("0-0".to_owned()),
            removed,
        }
    }

    #[test]
    fn a_token_older_than_the_first_retained_event_has_a_gap_once_events_were_trimmed() {
        let trimmed = bounds(Some("200-0"), "300-0", Some(5));
        assert_eq!(trimmed.gap_after("100-7").as_deref(), Some("200-0"));
        assert_eq!(trimmed.gap_after("200-0"), None);
        assert_eq!(trimmed.gap_after("250-1"), None);
        // Nothing ever removed: an old token misses nothing.
        assert_eq!(
            bounds(Some("200-0"), "300-0", Some(0)).gap_after("1-0"),
            None
        );
        // Redis before 7 (no count of removals): the first retained id decides.
        assert_eq!(
            bounds(Some("200-0"), "300-0", None)
                .gap_after("1-0")
                .as_deref(),
            Some("200-0")
        );
    }

    #[test]
    fn an_emptied_stream_lost_everything_up_to_its_last_id_and_a_missing_one_nothing() {
        let empty = bounds(None, "300-4", Some(9));
        assert_eq!(empty.gap_after("100-0").as_deref(), Some("300-5"));
        assert_eq!(empty.gap_after("300-4"), None);
        assert_eq!(StreamBounds::default().gap_after("100-0"), None);
    }

    #[test]
    fn a_deleted_entry_after_the_token_is_a_gap() {
        let mut b = bounds(Some("100-0"), "300-0", Some(1));
        b.max_deleted = Some("150-2".to_owned());
        assert_eq!(b.gap_after("120-0").as_deref(), Some("150-3"));
        assert_eq!(b.gap_after("150-2"), None);
        assert_eq!(parse_id("0"), Some((0, 0)));
        assert_eq!(next_id((5, u64::MAX)), "6-0");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// A stream id, well-formed or not.
        fn id() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<(u64, u64)>().prop_map(|(ms, seq)| format!("{ms}-{seq}")),
                (0u64..400, 0u64..8).prop_map(|(ms, seq)| format!("{ms}-{seq}")),
                "[0-9+-]{0,25}",
                any::<String>(),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn gap_after_never_panics(
                token in id(),
                first in prop::option::of(id()),
                last_generated in id(),
                max_deleted in prop::option::of(id()),
                removed in any::<Option<u64>>(),
            ) {
                let b = StreamBounds { first, last_generated, max_deleted, removed };
                if let Some(before) = b.gap_after(&token) {
                    // The id given back is one the caller can resume from.
                    prop_assert!(parse_id(&before).is_some(), "{before:?}");
                }
            }

            #[test]
            fn ids_parse_and_their_successor_is_greater(ms in any::<u64>(), seq in any::<u64>()) {
                prop_assert_eq!(parse_id(&format!("{ms}-{seq}")), Some((ms, seq)));
                if (ms, seq) != (u64::MAX, u64::MAX) {
                    prop_assert!(parse_id(&next_id((ms, seq))) > Some((ms, seq)));
                }
            }

            #[test]
            fn decode_never_panics_on_garbage_fields(
                id in id(),
                f in prop::collection::hash_map(
                    prop_oneof![
                        prop::sample::select(vec!["type", "agent", "state", "previous", "host", "generation", "at"]).prop_map(str::to_owned),
                        ".{0,8}",
                    ],
                    prop_oneof![any::<String>(), any::<i64>().prop_map(|n| n.to_string()), Just("AGENT_STATE".to_owned())],
                    0..10,
                ),
            ) {
                let ev = decode(id.clone(), &f);
                prop_assert_eq!(ev.token, id);
                if let Some(at) = ev.at {
                    prop_assert!((0..1_000_000_000).contains(&at.nanos));
                }
            }
        }
    }
}
