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

use super::conn::{keyed, Spread};
use super::keys::Shard;
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
    /// The key of `index` in `shard`.
    pub(super) fn index_key(&self, shard: Shard, index: &AgentIndex) -> String {
        let k = self.keys();
        match index {
            AgentIndex::All => k.agents_index(shard),
            AgentIndex::State(s) => k.state_index(shard, state::name(*s)),
            AgentIndex::Label(key, value) => k.label_index(shard, key, value),
        }
    }

    /// The state index of every state in `shard`, in [`state::ALL`]'s
    /// order (the scripts find the one they need by its suffix).
    pub(super) fn state_index_keys(&self, shard: Shard) -> Vec<String> {
        state::ALL
            .iter()
            .map(|s| self.keys().state_index(shard, state::name(*s)))
            .collect()
    }

    /// The label indexes that hold `agent`.
    pub(super) fn label_index_keys(&self, agent: &Agent) -> Vec<String> {
        let shard = self.keys().shard_of(&agent.id);
        agent.spec.as_ref().map_or_else(Vec::new, |s| {
            s.labels
                .iter()
                .map(|(k, v)| self.keys().label_index(shard, k, v))
                .collect()
        })
    }

    /// Adds `agent` to every index that should hold it (part of the caller's
    /// MULTI).
    pub(super) fn index_adds(&self, pipe: &mut redis::Pipeline, agent: &Agent) {
        let k = self.keys();
        let shard = k.shard_of(&agent.id);
        // `ZADD key 0 id`, each built with its buffers sized once.
        let zadd = |key: String| {
            let mut cmd = keyed("ZADD", &key, 2, 1 + agent.id.len());
            cmd.arg(0).arg(&agent.id);
            cmd
        };
        pipe.add_command(zadd(k.agents_index(shard)))
            .ignore()
            .add_command(zadd(k.state_index(shard, state::name(agent.state()))))
            .ignore();
        for key in self.label_index_keys(agent) {
            pipe.add_command(zadd(key)).ignore();
        }
    }

    /// Removes `agent` from every index (part of the caller's MULTI); from
    /// every state's, whatever state it was read in.
    pub(super) fn index_removes(&self, pipe: &mut redis::Pipeline, agent: &Agent) {
        let shard = self.keys().shard_of(&agent.id);
        pipe.zrem(self.keys().agents_index(shard), &agent.id)
            .ignore();
        for key in self
            .state_index_keys(shard)
            .into_iter()
            .chain(self.label_index_keys(agent))
        {
            pipe.zrem(key, &agent.id).ignore();
        }
    }

    /// Up to `count` ids of `index` after `after` in id order (`""`: from
    /// the first). In the Cluster layout: the first `count` of every
    /// shard's, merged (one round trip per shard, concurrently).
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
        let mut batch = Spread::default();
        for shard in self.keys().shards() {
            let key = self.index_key(shard, index);
            let mut cmd = redis::cmd("ZRANGE");
            cmd.arg(&key)
                .arg(&from)
                .arg("+")
                .arg("BYLEX")
                .arg("LIMIT")
                .arg(0)
                .arg(count);
            batch.add(key, cmd);
        }
        let mut ids = Vec::new();
        for v in self.spread("read agent index", batch).await? {
            let part: Vec<String> = Self::reply("read agent index", v)?;
            ids.extend(part);
        }
        if self.keys().is_sharded() {
            ids.sort_unstable();
            ids.truncate(count);
        }
        Ok(ids)
    }

    /// How many ids each of `indexes` holds (one round trip; summed over
    /// the shards).
    pub async fn index_sizes(&self, indexes: &[AgentIndex]) -> Result<Vec<u64>> {
        let mut batch = Spread::default();
        for i in indexes {
            for shard in self.keys().shards() {
                let key = self.index_key(shard, i);
                batch.add(key.clone(), redis::cmd("ZCARD").arg(key).clone());
            }
        }
        let values = self.spread("count agent index", batch).await?;
        let per = self.keys().shards().count();
        let mut sizes = Vec::with_capacity(indexes.len());
        for chunk in values.chunks(per) {
            let mut n = 0u64;
            for v in chunk {
                n += Self::reply::<u64>("count agent index", v.clone())?;
            }
            sizes.push(n);
        }
        Ok(sizes)
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
        let mut by_shard: std::collections::BTreeMap<Shard, Vec<&String>> = Default::default();
        for id in ids {
            by_shard
                .entry(self.keys().shard_of(id))
                .or_default()
                .push(id);
        }
        let mut n = 0;
        for (shard, ids) in by_shard {
            let mut inv = super::scripts::DROP_STALE.prepare_invoke();
            inv.key(self.index_key(shard, index));
            for id in ids {
                inv.key(self.keys().agent(id)).arg(id).arg(want);
            }
            n += inv
                .invoke_async::<u64>(&mut self.conn())
                .await
                .map_err(self.err("drop stale index entries"))?;
        }
        if n > 0 {
            tracing::info!(
                ?index,
                dropped = n,
                "dropped index entries that outlived their record"
            );
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
        if self.keys().is_sharded() {
            // The Cluster layout has no dataset from before the indexes,
            // and records written back after a data loss carry theirs
            // (REWRITE_AGENT), so there is nothing to walk (a SCAN would
            // have to visit every node).
            return self.mark_indexed(0).await;
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
        self.mark_indexed(indexed).await
    }

    /// Records that the dataset's indexes are built (`indexed` records).
    async fn mark_indexed(&self, indexed: usize) -> Result<bool> {
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
