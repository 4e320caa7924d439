//! The indexes kept beside the records, so that no list or pass walks the
//! keyspace: every agent id (`ap:agents`), the ids per state
//! (`ap:state:{STATE}`) and per label (`ap:label:{k}={v}`), and the hosts
//! declared lost whose agents are still to settle (`ap:hosts-lost`).
//!
//! Agent indexes are sorted sets whose scores are all 0, so they read in id
//! order (`ZRANGE … BYLEX`) and a page token is simply the last id read: a
//! page survives inserts and deletes before it. Every write that creates,
//! deletes or changes the state of a record updates them in the same atomic
//! step (a MULTI or the record's own script); an entry that outlived its
//! record anyway (an index built while records were deleted) is dropped by
//! whoever meets it ([`Registry::drop_stale`]).

use redis::AsyncCommands;

use super::{Registry, Result};
use crate::proto::v1::{Agent, AgentState};
use crate::state;

/// Which ids an agent listing walks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentIndex {
    /// Every agent.
    All,
    /// The agents in one state.
    State(AgentState),
    /// The agents with one label.
    Label(String, String),
}

/// The version of the indexes this build keeps (`ap:index-version`).
const INDEX_VERSION: u32 = 1;

impl Registry {
    /// The key of `index`.
    pub(super) fn index_key(&self, index: &AgentIndex) -> String {
        let k = self.keys();
        match index {
            AgentIndex::All => k.agents_index(),
            AgentIndex::State(s) => k.state_index(state::name(*s)),
            AgentIndex::Label(key, value) => k.label_index(key, value),
        }
    }

    /// The state index of every state, in [`state::ALL`]'s order (the
    /// scripts find the one they need by its suffix).
    pub(super) fn state_index_keys(&self) -> Vec<String> {
        state::ALL
            .iter()
            .map(|s| self.keys().state_index(state::name(*s)))
            .collect()
    }

    /// The label indexes that hold `agent`.
    pub(super) fn label_index_keys(&self, agent: &Agent) -> Vec<String> {
        agent.spec.as_ref().map_or_else(Vec::new, |s| {
            s.labels
                .iter()
                .map(|(k, v)| self.keys().label_index(k, v))
                .collect()
        })
    }

    /// Adds `agent` to every index that should hold it (part of the caller's
    /// MULTI).
    pub(super) fn index_adds(&self, pipe: &mut redis::Pipeline, agent: &Agent) {
        let k = self.keys();
        pipe.zadd(k.agents_index(), &agent.id, 0)
            .ignore()
            .zadd(k.state_index(state::name(agent.state())), &agent.id, 0)
            .ignore();
        for key in self.label_index_keys(agent) {
            pipe.zadd(key, &agent.id, 0).ignore();
        }
    }

    /// Removes `agent` from every index (part of the caller's MULTI); from
    /// every state's, whatever state it was read in.
    pub(super) fn index_removes(&self, pipe: &mut redis::Pipeline, agent: &Agent) {
        pipe.zrem(self.keys().agents_index(), &agent.id).ignore();
        for key in self
            .state_index_keys()
            .into_iter()
            .chain(self.label_index_keys(agent))
        {
            pipe.zrem(key, &agent.id).ignore();
        }
    }

    /// Up to `count` ids of `index` after `after` in id order (`""`: from
    /// the first).
    pub async fn page_agent_ids(
        &self,
        index: &AgentIndex,
        after: &str,
        count: usize,
    ) -> Result<Vec<String>> {
        let from = if after.is_empty() {
            "-".to_owned()
        } else {
            format!("({after}")
        };
        redis::cmd("ZRANGE")
            .arg(self.index_key(index))
            .arg(from)
            .arg("+")
            .arg("BYLEX")
            .arg("LIMIT")
            .arg(0)
            .arg(count)
            .query_async(&mut self.conn())
            .await
            .map_err(self.err("read agent index"))
    }

    /// How many ids each of `indexes` holds (one round trip).
    pub async fn index_sizes(&self, indexes: &[AgentIndex]) -> Result<Vec<u64>> {
        let mut pipe = redis::pipe();
        for i in indexes {
            pipe.zcard(self.index_key(i));
        }
        pipe.query_async(&mut self.conn())
            .await
            .map_err(self.err("count agent index"))
    }

    /// Drops the entries of `ids` from `index` whose record is gone or, for
    /// a state index, no longer in that state (checked and removed in one
    /// step, so an entry a concurrent write just made right stays).
    pub async fn drop_stale(&self, index: &AgentIndex, ids: &[String]) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let want = match index {
            AgentIndex::State(s) => state::name(*s),
            _ => "",
        };
        let mut inv = super::scripts::DROP_STALE.prepare_invoke();
        inv.key(self.index_key(index));
        for id in ids {
            inv.key(self.keys().agent(id)).arg(id).arg(want);
        }
        let n: u64 = inv
            .invoke_async(&mut self.conn())
            .await
            .map_err(self.err("drop stale index entries"))?;
        if n > 0 {
            tracing::info!(index = %self.index_key(index), dropped = n, "dropped index entries that outlived their record");
        }
        Ok(n)
    }

    /// Builds the indexes from the records once per dataset (an upgrade from
    /// a version without them, or a Redis that lost its data): a walk of
    /// the keyspace, the only one left, done when `ap:index-version` is
    /// missing or older. True when it ran.
    pub async fn build_indexes(&self) -> Result<bool> {
        let version: Option<u32> = self
            .conn()
            .get(self.keys().index_version())
            .await
            .map_err(self.err("read index version"))?;
        if version.is_some_and(|v| v >= INDEX_VERSION) {
            return Ok(false);
        }
        let (mut cursor, mut indexed) = (0, 0usize);
        loop {
            let (next, keys) = self
                .scan("scan agents", cursor, &self.keys().agent_pattern(), 1000)
                .await?;
            let ids: Vec<String> = keys
                .iter()
                .filter_map(|k| self.keys().agent_id_of(k).map(str::to_owned))
                .collect();
            let agents = self.get_agents(&ids).await?;
            if !agents.is_empty() {
                let mut pipe = redis::pipe();
                for a in &agents {
                    self.index_adds(&mut pipe, a);
                }
                pipe.query_async::<()>(&mut self.conn())
                    .await
                    .map_err(self.err("build agent indexes"))?;
            }
            indexed += agents.len();
            if next == 0 {
                break;
            }
            cursor = next;
        }
        self.seed_lost_hosts().await?;
        let _: () = self
            .conn()
            .set(self.keys().index_version(), INDEX_VERSION)
            .await
            .map_err(self.err("write index version"))?;
        tracing::info!(agents = indexed, "built the agent indexes from the records");
        Ok(true)
    }

    /// Hosts that have an agent set but are neither live nor known (a
    /// version before `ap:hosts-lost` found them by a walk of every set at
    /// each pass) join the lost hosts, so that a pass settles them.
    async fn seed_lost_hosts(&self) -> Result<()> {
        let known: std::collections::HashSet<String> =
            self.known_hosts().await?.into_iter().collect();
        let mut cursor = 0;
        loop {
            let (next, keys) = self
                .scan(
                    "scan host agent sets",
                    cursor,
                    &self.keys().host_agents_pattern(),
                    1000,
                )
                .await?;
            for host in keys
                .iter()
                .filter_map(|k| self.keys().host_agents_id_of(k))
                .filter(|h| !known.contains(*h))
            {
                if self.get_host(host).await?.is_none() {
                    let _: i64 = self
                        .conn()
                        .sadd(self.keys().hosts_lost(), host)
                        .await
                        .map_err(self.err("seed lost hosts"))?;
                }
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// Hosts declared lost whose agents are not all settled yet.
    pub async fn lost_hosts(&self) -> Result<Vec<String>> {
        self.conn()
            .smembers(self.keys().hosts_lost())
            .await
            .map_err(self.err("read the lost hosts"))
    }

    /// `host`, declared lost, heartbeats again: it leaves the lost hosts if
    /// its key exists now (checked in the same step).
    pub async fn host_back(&self, host: &str) -> Result<bool> {
        super::scripts::SETTLED_IF_BACK
            .key(self.keys().host(host))
            .key(self.keys().hosts_lost())
            .arg(host)
            .invoke_async::<i64>(&mut self.conn())
            .await
            .map(|n| n == 1)
            .map_err(self.err("settle lost host"))
    }

    /// `host`'s agents are settled: it leaves the lost hosts.
    pub async fn host_settled(&self, host: &str) -> Result<()> {
        self.conn()
            .srem(self.keys().hosts_lost(), host)
            .await
            .map_err(self.err("settle lost host"))
    }
}
