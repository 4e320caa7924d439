//! Agent records (`ap:agent:*`) and the per-host sets
//! (`ap:host-agents:*`); their leases (`ap:loc:*`) are in `lease.rs`, claims
//! in `claims.rs`.

use std::collections::HashMap;

use redis::AsyncCommands;

use super::codec::{self, field};
use super::conn::{keyed, Spread};
use super::keys::Shard;
use super::lease::{lease_ttl, ttl_ms, Location};
use super::scripts::UPDATE_AGENT;
use super::{Registry, Result};
use crate::proto::v1::{Agent, AgentState, ExitStatus};
use crate::state;

/// What an update expects of the record before it writes.
#[derive(Debug, Clone, Default)]
pub struct Expect {
    /// The record's generation must be this.
    pub generation: Option<u64>,
    /// The record must name this host.
    pub host: Option<String>,
    /// The record's state must be one of these (empty: any).
    pub states: Vec<AgentState>,
}

/// Fields an update writes; `None` leaves a field alone.
#[derive(Debug, Clone, Default)]
pub struct AgentUpdate {
    /// New state.
    pub state: Option<AgentState>,
    /// New pid.
    pub pid: Option<i32>,
    /// Process start time, ms since the epoch.
    pub started_at_ms: Option<i64>,
    /// How it ended.
    pub exit: Option<ExitStatus>,
    /// New host (moving a PENDING agent whose first host refused it, or
    /// rescheduling a LOST one). Needs [`Expect::host`]: the agent's
    /// membership moves from that host's set to the new one's in the same
    /// atomic step.
    pub host: Option<String>,
    /// New generation (rescheduling).
    pub generation: Option<u64>,
    /// Total restarts.
    pub restarts: Option<u32>,
    /// How the previous run ended.
    pub last_exit: Option<ExitStatus>,
    /// When the next restart is due, ms since the epoch; `Some(0)` clears it.
    pub next_restart_at_ms: Option<i64>,
    /// Removes `exit` (a restarted agent has not ended).
    pub clear_exit: bool,
    /// Sets or clears the idle flag.
    pub idle: Option<bool>,
    /// The host-agent incarnation that started the current run (`Some("")`
    /// clears it: a new placement has not started yet).
    pub incarnation: Option<String>,
    /// When the agent was placed, ms since the epoch; `Some(0)` clears it.
    pub pending_since_ms: Option<i64>,
    /// The event a state change appends (default AGENT_STATE).
    pub event: Option<crate::proto::v1::EventType>,
    /// Also sets the agent's location (`ap:loc:ID`, with a TTL the host's
    /// heartbeat renews) when the update applies, in the same atomic step: a start's RUNNING
    /// and its location cost one round trip, and a fenced start writes neither.
    pub location: Option<Location>,
}

/// What an update found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateOutcome {
    /// Written.
    Applied,
    /// No such agent.
    Missing,
    /// An expectation failed; nothing written. The record as it is.
    Conflict {
        /// Its state.
        state: Option<AgentState>,
        /// Its generation.
        generation: u64,
        /// Its host.
        host: String,
    },
}

impl Registry {
    /// Writes a new agent record, adds it to its host's set and the indexes
    /// and appends the AGENT_CREATED event, atomically.
    pub async fn create_agent(&self, agent: &Agent) -> Result<()> {
        let k = self.keys();
        let fields = codec::encode_agent(agent);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hset_multiple(k.agent(&agent.id), &fields)
            .ignore()
            .sadd(k.host_agents(k.shard_of(&agent.id), &agent.host), &agent.id)
            .ignore();
        self.index_adds(&mut pipe, agent);
        self.push_agent_event(&mut pipe, "AGENT_CREATED", agent);
        let mut conn = self.fencing_conn().await?;
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(self.err("create agent record"))?;
        self.replica_acked(&mut conn).await;
        Ok(())
    }

    fn push_agent_event(&self, pipe: &mut redis::Pipeline, ty: &str, agent: &Agent) {
        let stream = self.keys().events(self.keys().shard_of(&agent.id));
        pipe.add_command(self.event_cmd(
            stream,
            &[
                ("type", ty.to_owned()),
                ("agent", agent.id.clone()),
                ("state", state::name(agent.state()).to_owned()),
                ("host", agent.host.clone()),
                ("generation", agent.generation.to_string()),
            ],
        ))
        .ignore();
    }

    /// The agent record, if it exists.
    pub async fn get_agent(&self, id: &str) -> Result<Option<Agent>> {
        let key = self.keys().agent(id);
        let h: HashMap<String, Vec<u8>> = self
            .conn()
            .hgetall(&key)
            .await
            .map_err(self.err("read agent record"))?;
        codec::decode_agent(&key, &h)
    }

    /// The records of `ids` in one round trip; ids without a record are skipped.
    pub async fn get_agents(&self, ids: &[String]) -> Result<Vec<Agent>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut batch = Spread::default();
        for id in ids {
            let key = self.keys().agent(id);
            let read = keyed("HGETALL", &key, 0, 0);
            batch.add(key, read);
        }
        let values = self.spread("read agent records", batch).await?;
        let mut out = Vec::with_capacity(ids.len());
        for (id, h) in ids.iter().zip(values) {
            let key = self.keys().agent(id);
            let h: HashMap<String, Vec<u8>> =
                redis::from_redis_value(h).map_err(|e| super::RegistryError::Corrupt {
                    key: key.clone(),
                    detail: e.to_string(),
                })?;
            if let Some(a) = codec::decode_agent(&key, &h)? {
                out.push(a);
            }
        }
        Ok(out)
    }

    /// The records of `ids` and whether each one's location key (its lease)
    /// exists, in one round trip: one record read per agent. Ids without a
    /// record are skipped.
    pub async fn get_agents_with_leases(&self, ids: &[String]) -> Result<Vec<(Agent, bool)>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut batch = Spread::default();
        for id in ids {
            let (key, loc) = (self.keys().agent(id), self.keys().loc(id));
            let (read, exists) = (keyed("HGETALL", &key, 0, 0), keyed("EXISTS", &loc, 0, 0));
            batch.add(key, read);
            batch.add(loc, exists);
        }
        let values = self.spread("read agent records and leases", batch).await?;
        let mut out = Vec::with_capacity(ids.len());
        let mut it = values.into_iter();
        for id in ids {
            let key = self.keys().agent(id);
            let (Some(h), Some(leased)) = (it.next(), it.next()) else {
                return Err(super::RegistryError::Corrupt {
                    key,
                    detail: "short reply to the record and lease read".into(),
                });
            };
            let bad = |detail: String| super::RegistryError::Corrupt {
                key: key.clone(),
                detail,
            };
            let h: HashMap<String, Vec<u8>> =
                redis::from_redis_value(h).map_err(|e| bad(e.to_string()))?;
            let leased: bool = redis::from_redis_value(leased).map_err(|e| bad(e.to_string()))?;
            if let Some(a) = codec::decode_agent(&key, &h)? {
                out.push((a, leased));
            }
        }
        Ok(out)
    }

    /// One `SSCAN` batch of the ids placed on `host`, from `cursor` (`0`:
    /// the start; returns `0` when done). In the Cluster layout the host's
    /// ids are in one set per shard, walked in turn: the shard is the
    /// cursor's top 16 bits (a set's own cursor stays below 2^48: it is
    /// under the set's table size).
    pub async fn scan_host_agent_ids(
        &self,
        host: &str,
        cursor: u64,
        count: usize,
    ) -> Result<(u64, Vec<String>)> {
        let shards = self.keys().shards().count() as u64;
        let (mut shard, mut inner) = (cursor >> 48, cursor & ((1 << 48) - 1));
        loop {
            let (next, ids): (u64, Vec<String>) = redis::cmd("SSCAN")
                .arg(self.keys().host_agents(Shard(shard as u16), host))
                .arg(inner)
                .arg("COUNT")
                .arg(count)
                .query_async(&mut self.conn())
                .await
                .map_err(self.err("scan host agents"))?;
            if next != 0 {
                return Ok(((shard << 48) | next, ids));
            }
            shard += 1;
            inner = 0;
            if shard >= shards {
                return Ok((0, ids));
            }
            if !ids.is_empty() {
                return Ok((shard << 48, ids));
            }
        }
    }

    /// Atomically checks `expect` and writes `update` (a Lua compare-and-set).
    /// A state change is checked against [`state::may_move`]: the record
    /// must be in a state the table allows the move from, whatever the
    /// caller expected, so no writer can make an illegal move.
    pub async fn update_agent(
        &self,
        id: &str,
        expect: &Expect,
        update: &AgentUpdate,
    ) -> Result<UpdateOutcome> {
        let states = legal_sources(id, expect, update.state)?;
        let k = self.keys();
        let shard = k.shard_of(id);
        let mut inv = UPDATE_AGENT.prepare_invoke();
        inv.key(k.agent(id)).key(k.events(shard)).key(k.loc(id));
        // Both sets are named either way; the script moves the id only
        // when they differ (a new host).
        let from = expect.host.as_deref().unwrap_or_default();
        inv.key(k.host_agents(shard, from))
            .key(k.host_agents(shard, update.host.as_deref().unwrap_or(from)));
        for key in self.state_index_keys(shard) {
            inv.key(key);
        }
        let (loc_host, loc_ttl) = match &update.location {
            Some(l) => (l.host.as_str(), ttl_ms(lease_ttl(l.host_ttl))),
            None => ("", 0),
        };
        inv.arg(expect.generation.map(|g| g.to_string()).unwrap_or_default())
            .arg(expect.host.clone().unwrap_or_default())
            .arg(names(&states))
            .arg(crate::time::now_ms())
            .arg(super::EVENTS_MAXLEN)
            .arg(update.event.map_or("", super::type_name))
            .arg(loc_host)
            .arg(loc_ttl)
            .arg(k.host_revision_prefix(shard))
            .arg(crate::ids::new_agent_id());
        let mut deletes: Vec<&str> = Vec::new();
        if update.clear_exit {
            deletes.push(field::EXIT);
        }
        if update.next_restart_at_ms == Some(0) {
            deletes.push(field::NEXT_RESTART_AT);
        }
        if update.pending_since_ms == Some(0) {
            deletes.push(field::PENDING_SINCE);
        }
        inv.arg(deletes.len());
        for f in &deletes {
            inv.arg(*f);
        }
        if let Some(s) = update.state {
            inv.arg(field::STATE).arg(codec::state_bytes(s));
        }
        if let Some(pid) = update.pid {
            inv.arg(field::PID).arg(pid);
        }
        if let Some(ms) = update.started_at_ms {
            inv.arg(field::STARTED_AT).arg(ms);
        }
        if let Some(exit) = &update.exit {
            inv.arg(field::EXIT)
                .arg(prost::Message::encode_to_vec(exit));
        }
        if let Some(host) = &update.host {
            inv.arg(field::HOST).arg(host);
        }
        if let Some(g) = update.generation {
            inv.arg(field::GENERATION).arg(g);
        }
        if let Some(n) = update.restarts {
            inv.arg(field::RESTARTS).arg(n);
        }
        if let Some(exit) = &update.last_exit {
            inv.arg(field::LAST_EXIT)
                .arg(prost::Message::encode_to_vec(exit));
        }
        if let Some(idle) = update.idle {
            inv.arg(field::IDLE).arg(if idle { "1" } else { "0" });
        }
        if let Some(ms) = update.next_restart_at_ms.filter(|ms| *ms > 0) {
            inv.arg(field::NEXT_RESTART_AT).arg(ms);
        }
        if let Some(ms) = update.pending_since_ms.filter(|ms| *ms > 0) {
            inv.arg(field::PENDING_SINCE).arg(ms);
        }
        if let Some(inc) = &update.incarnation {
            inv.arg(field::INCARNATION).arg(inc);
        }
        let fencing =
            update.generation.is_some() || update.host.is_some() || update.location.is_some();
        let mut conn = if fencing {
            self.fencing_conn().await?
        } else {
            self.conn()
        };
        let (code, st, generation, host): (i64, String, String, String) = inv
            .invoke_async(&mut conn)
            .await
            .map_err(self.err("update agent record"))?;
        if code == 1 && fencing {
            self.replica_acked(&mut conn).await;
        }
        Ok(match code {
            1 => UpdateOutcome::Applied,
            0 => UpdateOutcome::Missing,
            _ => UpdateOutcome::Conflict {
                state: state::parse(&st),
                generation: generation.parse().unwrap_or(0),
                host,
            },
        })
    }

    /// Ends `id`'s current placement as LOST (reason and detail in `exit`),
    /// if its record is still at `generation` on `host` in one of `states`,
    /// and drops its lease. True when this call made the change.
    pub async fn mark_lost(
        &self,
        id: &str,
        generation: u64,
        host: &str,
        states: &[AgentState],
        reason: crate::proto::v1::ExitReason,
        error: String,
    ) -> Result<bool> {
        let outcome = self
            .update_agent(
                id,
                &Expect {
                    generation: Some(generation),
                    host: Some(host.to_owned()),
                    states: states.to_vec(),
                },
                &AgentUpdate {
                    state: Some(AgentState::Lost),
                    pid: Some(0),
                    exit: Some(ExitStatus {
                        reason: reason as i32,
                        error,
                        finished_at: Some(crate::time::timestamp_from_ms(crate::time::now_ms())),
                        ..Default::default()
                    }),
                    next_restart_at_ms: Some(0),
                    pending_since_ms: Some(0),
                    ..Default::default()
                },
            )
            .await?;
        if outcome != UpdateOutcome::Applied {
            return Ok(false);
        }
        self.clear_location(id, host).await?;
        Ok(true)
    }

    /// Removes the record, its location, its membership of its host's set
    /// and of the indexes, leaves its tombstone (`ap:deleted:{id}`) and
    /// appends AGENT_DELETED, atomically.
    pub async fn delete_agent(&self, agent: &Agent) -> Result<()> {
        let k = self.keys();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .del(k.agent(&agent.id))
            .ignore()
            .del(k.loc(&agent.id))
            .ignore()
            .srem(k.host_agents(k.shard_of(&agent.id), &agent.host), &agent.id)
            .ignore()
            .pset_ex(k.deleted(&agent.id), 1, ttl_ms(super::IDEMPOTENCY_TTL))
            .ignore();
        if !agent.host.is_empty() {
            // The copy on that host (if any) is no longer the record's.
            pipe.pset_ex(
                k.host_revision(k.shard_of(&agent.id), &agent.host),
                crate::ids::new_agent_id(),
                ttl_ms(super::scripts::REVISION_TTL),
            )
            .ignore();
        }
        self.index_removes(&mut pipe, agent);
        self.push_agent_event(&mut pipe, "AGENT_DELETED", agent);
        pipe.query_async::<()>(&mut self.conn())
            .await
            .map_err(self.err("delete agent record"))
    }

    /// Whether each agent's record was deleted (its tombstone lives), in
    /// one round trip: a missing record without one was lost with a
    /// write, not deleted.
    pub async fn were_deleted(&self, ids: &[&String]) -> Result<Vec<bool>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut batch = Spread::default();
        for id in ids {
            let key = self.keys().deleted(id);
            batch.add(key.clone(), redis::cmd("EXISTS").arg(key).clone());
        }
        self.spread("read agent tombstones", batch)
            .await?
            .into_iter()
            .map(|v| Self::reply("read agent tombstones", v))
            .collect()
    }
}

/// The states `update` may be written over: those the caller expects (any,
/// when empty) from which the state machine allows the move to its new
/// state. None left means the write can never be legal.
fn legal_sources(id: &str, expect: &Expect, to: Option<AgentState>) -> Result<Vec<AgentState>> {
    let Some(to) = to else {
        return Ok(expect.states.clone());
    };
    let states: Vec<AgentState> = if expect.states.is_empty() {
        state::sources(to)
    } else {
        expect
            .states
            .iter()
            .copied()
            .filter(|from| state::may_move(*from, to))
            .collect()
    };
    if states.is_empty() {
        return Err(super::RegistryError::IllegalMove {
            id: id.to_owned(),
            from: names(&expect.states),
            to: state::name(to),
        });
    }
    Ok(states)
}

/// Short state names, comma-separated (the scripts' format).
fn names(states: &[AgentState]) -> String {
    states
        .iter()
        .map(|s| state::name(*s))
        .collect::<Vec<_>>()
        .join(",")
}
