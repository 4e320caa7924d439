//! The event stream (`ap:events`, a Redis stream bounded with `MAXLEN ~`):
//! writing host events, and reading events after a token. Agent state events
//! are written by the record scripts themselves, atomically with the change.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;

use super::{Registry, Result};
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

/// A dedicated connection for blocking stream reads (a blocking `XREAD` must
/// not hold up the shared multiplexed connection).
pub struct EventReader {
    conn: MultiplexedConnection,
    key: String,
}

impl EventReader {
    /// Events after `after` (a stream id; `$` means "from now"), waiting up to
    /// `block` for the first; at most `count`.
    pub async fn read(
        &mut self,
        after: &str,
        count: usize,
        block: Duration,
    ) -> std::result::Result<Vec<Event>, redis::RedisError> {
        let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(u64::try_from(block.as_millis()).unwrap_or(1000))
            .arg("STREAMS")
            .arg(&self.key)
            .arg(after)
            .query_async(&mut self.conn)
            .await?;
        let mut out = Vec::new();
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for entry in key.ids {
                let fields: HashMap<String, String> = entry
                    .map
                    .iter()
                    .filter_map(|(k, v)| {
                        Some((
                            k.clone(),
                            redis::from_redis_value::<String>(v.clone()).ok()?,
                        ))
                    })
                    .collect();
                out.push(decode(entry.id, &fields));
            }
        }
        Ok(out)
    }

    /// The id of the newest event, or `0-0` when there is none: a starting
    /// point for "from now on" that survives a reconnect.
    pub async fn last_id(&mut self) -> std::result::Result<String, redis::RedisError> {
        let info: redis::streams::StreamRangeReply =
            self.conn.xrevrange_count(&self.key, "+", "-", 1).await?;
        Ok(info
            .ids
            .first()
            .map_or_else(|| "0-0".to_owned(), |e| e.id.clone()))
    }
}

fn decode(id: String, f: &HashMap<String, String>) -> Event {
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
    /// Opens a dedicated connection for reading events. Its response timeout
    /// is longer than any `BLOCK` the caller uses.
    pub async fn event_reader(&self) -> Result<EventReader> {
        let conn = self.dedicated_connection(Duration::from_secs(5)).await?;
        Ok(EventReader {
            conn,
            key: self.keys().events(),
        })
    }

    /// The `XADD` of one event: `fields` after the stream bound and the time.
    pub(super) fn event_cmd(&self, fields: &[(&str, String)]) -> redis::Cmd {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(self.keys().events())
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
        self.event_cmd(&[
            ("type", type_name(ty).to_owned()),
            ("host", host.to_owned()),
        ])
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
        self.event_cmd(&[
            ("type", type_name(ty).to_owned()),
            ("agent", agent.to_owned()),
            ("host", host.to_owned()),
            ("generation", generation.to_string()),
        ])
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
