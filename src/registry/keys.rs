//! Redis key names (a contract: see DESIGN.md). Nothing else builds keys.
//!
//! Two layouts. On one Redis (or Sentinel) the names are flat
//! (`ap:agent:ID`, `ap:events`). On a Redis Cluster every script and MULTI
//! must touch one hash slot, so agents go to [`SHARDS`] fixed shards (a
//! hash of the id) and each shard's keys share a hash tag: an agent's
//! record, location, claim lease and tombstone, and its shard's indexes,
//! per-host sets and event stream are all `ap:{sN}:…`; host keys, the
//! known and lost hosts, keeper and drain leases and the host events share
//! `ap:{hosts}:…`. Single keys (`ap:rr`, `ap:epoch`, request ids, names)
//! need no tag.

use std::fmt::Write as _;

/// What a host revision key's name has between its shard's start and the
/// host id (one literal for [`Keys::host_revision`] and its prefix).
const HOST_REV: &str = ":host-rev:";

/// Shards of the Cluster layout. Fixed: changing it moves every agent.
pub const SHARDS: u16 = 16;

/// One shard of the agent keys (always 0 in the flat layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Shard(pub u16);

/// Key names under one prefix (`ap` by default).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    /// 0: the flat layout; else the number of shards.
    shards: u16,
}

/// The part of `key` Redis Cluster hashes: the text between the first `{`
/// and the next `}` when it is not empty, else the whole key.
pub fn hash_tag(key: &str) -> &str {
    if let Some(open) = key.find('{') {
        if let Some(len) = key[open + 1..].find('}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

impl Keys {
    /// Keys under `prefix`, in the flat layout (one Redis).
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            shards: 0,
        }
    }

    /// Keys under `prefix`, in the Cluster layout ([`SHARDS`] shards).
    pub fn sharded(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            shards: SHARDS,
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether keys are spread over hash-tagged shards (Cluster layout).
    pub fn is_sharded(&self) -> bool {
        self.shards > 0
    }

    /// Every shard, in order (one in the flat layout).
    pub fn shards(&self) -> impl Iterator<Item = Shard> {
        (0..self.shards.max(1)).map(Shard)
    }

    /// The shard of agent `id`: FNV-1a of the id, so every server agrees
    /// without asking.
    pub fn shard_of(&self, id: &str) -> Shard {
        if self.shards == 0 {
            return Shard(0);
        }
        let mut h: u32 = 0x811c_9dc5;
        for b in id.bytes() {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
        Shard(u16::try_from(h % u32::from(self.shards)).unwrap_or(0))
    }

    /// The prefix, then `tag` in the Cluster layout only, then `tail`, in
    /// one allocation: a key is built per command on the hot paths (a
    /// beat's leases and heads, a sweep slice, a spawn's indexes).
    fn key(&self, tag: std::fmt::Arguments<'_>, tail: std::fmt::Arguments<'_>) -> String {
        let mut key = String::with_capacity(self.prefix.len() + 64);
        key.push_str(&self.prefix);
        // Writing to a String cannot fail.
        if self.shards != 0 {
            let _ = key.write_fmt(tag);
        }
        let _ = key.write_fmt(tail);
        key
    }

    /// `ap` or `ap:{sN}` (what a shard's keys start with) followed by
    /// `tail`.
    fn key_at(&self, shard: Shard, tail: std::fmt::Arguments<'_>) -> String {
        self.key(format_args!(":{{s{}}}", shard.0), tail)
    }

    /// Agent `id`'s shard's start followed by `tail` (see [`Keys::key_at`]).
    fn key_of(&self, id: &str, tail: std::fmt::Arguments<'_>) -> String {
        self.key_at(self.shard_of(id), tail)
    }

    /// `ap` or `ap:{hosts}` (what the hosts' keys start with) followed by
    /// `tail`.
    fn hosts_key(&self, tail: std::fmt::Arguments<'_>) -> String {
        self.key(format_args!(":{{hosts}}"), tail)
    }

    /// `ap:host:{id}`: the live host's hash, with the heartbeat TTL.
    pub fn host(&self, id: &str) -> String {
        self.hosts_key(format_args!(":host:{id}"))
    }

    /// `ap:host-agents:{id}`: the set of agent ids of `shard` placed on
    /// the host (one set per shard in the Cluster layout).
    pub fn host_agents(&self, shard: Shard, id: &str) -> String {
        self.key_at(shard, format_args!(":host-agents:{id}"))
    }

    /// `ap:host-rev:{id}`: the fencing revision of the host's agents in
    /// `shard`, a token every write that makes one of them stop naming
    /// the host at its generation (another host, another generation,
    /// LOST, deleted) replaces; heartbeats read record heads only where
    /// it changed.
    pub fn host_revision(&self, shard: Shard, id: &str) -> String {
        self.key_at(shard, format_args!("{HOST_REV}{id}"))
    }

    /// What [`Keys::host_revision`] appends the host id to (scripts
    /// derive the key of the host a record names).
    pub fn host_revision_prefix(&self, shard: Shard) -> String {
        self.key_at(shard, format_args!("{HOST_REV}"))
    }

    /// `ap:agent:{id}`: the agent record hash.
    pub fn agent(&self, id: &str) -> String {
        self.key_of(id, format_args!(":agent:{id}"))
    }

    /// The `SCAN` pattern of every agent record.
    pub fn agent_pattern(&self) -> String {
        format!("{}:agent:*", self.prefix)
    }

    /// The agent id of an agent key, if it is one.
    pub fn agent_id_of<'a>(&self, key: &'a str) -> Option<&'a str> {
        key.strip_prefix(&self.prefix)?.strip_prefix(":agent:")
    }

    /// `ap:loc:{id}`: the host id running the agent, with the heartbeat TTL.
    pub fn loc(&self, id: &str) -> String {
        self.key_of(id, format_args!(":loc:{id}"))
    }

    /// `ap:rr`: the round-robin placement counter.
    pub fn rr(&self) -> String {
        format!("{}:rr", self.prefix)
    }

    /// `ap:idem:{request_id}`: the agent a spawn request created.
    pub fn idem(&self, request_id: &str) -> String {
        format!("{}:idem:{request_id}", self.prefix)
    }

    /// `ap:name:{name}`: the agent id holding a name (names are unique until
    /// the agent is deleted).
    pub fn name(&self, name: &str) -> String {
        format!("{}:name:{name}", self.prefix)
    }

    /// `ap:claim:{agent_id}`: the lease of a spawn call that is creating
    /// agent `agent_id`, renewed while the call runs. A request-id or name
    /// claim whose agent has neither a record nor this lease is abandoned.
    pub fn claim_lease(&self, agent_id: &str) -> String {
        self.key_of(agent_id, format_args!(":claim:{agent_id}"))
    }

    /// `ap:deleted:{agent_id}`: the agent's record was deleted (24 h), so a
    /// host that finds it missing knows a delete from a write a Redis
    /// failover lost.
    pub fn deleted(&self, agent_id: &str) -> String {
        self.key_of(agent_id, format_args!(":deleted:{agent_id}"))
    }

    /// `ap:drain:{host}`: the replica leading the host's drain, with a
    /// short TTL it renews; a draining host without it is taken over.
    pub fn drain_lease(&self, host: &str) -> String {
        self.hosts_key(format_args!(":drain:{host}"))
    }

    /// `ap:keeper:{host}`: written by the host's keeper while no host agent
    /// is attached, with the heartbeat TTL, renewed: the machine is alive
    /// and its agents are held (the host is restarting, not lost).
    pub fn keeper(&self, host: &str) -> String {
        self.hosts_key(format_args!(":keeper:{host}"))
    }

    /// `ap:hosts-known`: hosts that heartbeated and were not declared lost
    /// since (so HOST_LOST is emitted once per disappearance).
    pub fn hosts_known(&self) -> String {
        self.hosts_key(format_args!(":hosts-known"))
    }

    /// The `SCAN` pattern of every per-host agent set (only the one-time
    /// index build walks them).
    pub fn host_agents_pattern(&self) -> String {
        format!("{}:host-agents:*", self.prefix)
    }

    /// The host id of a per-host agent set key.
    pub fn host_agents_id_of<'a>(&self, key: &'a str) -> Option<&'a str> {
        key.strip_prefix(&self.prefix)?
            .strip_prefix(":host-agents:")
    }

    /// `ap:hosts-lost`: hosts declared lost whose agents have not all been
    /// settled yet (a pass that failed half-way is retried from here).
    pub fn hosts_lost(&self) -> String {
        self.hosts_key(format_args!(":hosts-lost"))
    }

    /// `ap:agents`: every agent id (a sorted set, all scores 0, read in id
    /// order with `ZRANGE … BYLEX`).
    pub fn agents_index(&self, shard: Shard) -> String {
        self.key_at(shard, format_args!(":agents"))
    }

    /// `ap:state:{STATE}`: the ids of the agents in that state (short state
    /// name, as the record stores it).
    pub fn state_index(&self, shard: Shard, state: &str) -> String {
        self.key_at(shard, format_args!(":state:{state}"))
    }

    /// `ap:label:{key}={value}`: the ids of the agents with that label
    /// (keys cannot hold `=`, so the split is unambiguous).
    pub fn label_index(&self, shard: Shard, key: &str, value: &str) -> String {
        self.key_at(shard, format_args!(":label:{key}={value}"))
    }

    /// `ap:index-version`: the version of the indexes the dataset holds;
    /// missing or older means they are built from the records once.
    pub fn index_version(&self) -> String {
        format!("{}:index-version", self.prefix)
    }

    /// `ap:epoch`: a random id created once per Redis dataset. When it changes
    /// (or vanishes), Redis lost its data and host agents rewrite their records.
    pub fn epoch(&self) -> String {
        format!("{}:epoch", self.prefix)
    }

    /// `ap:events`: the event stream of `shard`'s agents.
    pub fn events(&self, shard: Shard) -> String {
        self.key_at(shard, format_args!(":events"))
    }

    /// The stream host events go to (`ap:events`; `ap:{hosts}:events` in
    /// the Cluster layout).
    pub fn host_events(&self) -> String {
        self.hosts_key(format_args!(":events"))
    }

    /// Every event stream, in a fixed order (a watch's token has one
    /// position per stream): host events first, then the shards'. One in
    /// the flat layout.
    pub fn event_streams(&self) -> Vec<String> {
        if self.shards == 0 {
            return vec![self.host_events()];
        }
        std::iter::once(self.host_events())
            .chain(self.shards().map(|s| self.events(s)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_key_names() {
        let k = Keys::new("ap");
        let s = Shard(0);
        assert_eq!(k.host("h1"), "ap:host:h1");
        assert_eq!(k.host_agents(s, "h1"), "ap:host-agents:h1");
        assert_eq!(k.host_revision(s, "h1"), "ap:host-rev:h1");
        assert_eq!(k.agent("a1"), "ap:agent:a1");
        assert_eq!(k.loc("a1"), "ap:loc:a1");
        assert_eq!(k.rr(), "ap:rr");
        assert_eq!(k.idem("r"), "ap:idem:r");
        assert_eq!(k.events(s), "ap:events");
        assert_eq!(k.event_streams(), ["ap:events"]);
        assert_eq!(k.name("web"), "ap:name:web");
        assert_eq!(k.claim_lease("a1"), "ap:claim:a1");
        assert_eq!(k.drain_lease("h1"), "ap:drain:h1");
        assert_eq!(k.keeper("h1"), "ap:keeper:h1");
        assert_eq!(k.agent_id_of("ap:agent:a1"), Some("a1"));
        assert_eq!(k.agents_index(s), "ap:agents");
        assert_eq!(k.state_index(s, "RUNNING"), "ap:state:RUNNING");
        assert_eq!(k.label_index(s, "team", "a"), "ap:label:team=a");
        assert_eq!(k.hosts_lost(), "ap:hosts-lost");
        assert_eq!(k.shards().count(), 1);
    }

    #[test]
    fn cluster_layout_puts_an_agent_and_its_shard_under_one_tag() {
        let k = Keys::sharded("ap");
        let s = k.shard_of("a1");
        let tag = hash_tag(&k.agent("a1")).to_owned();
        assert_eq!(tag, format!("s{}", s.0));
        for key in [
            k.loc("a1"),
            k.claim_lease("a1"),
            k.deleted("a1"),
            k.events(s),
            k.agents_index(s),
            k.state_index(s, "RUNNING"),
            k.label_index(s, "team", "a"),
            k.host_agents(s, "h1"),
            k.host_revision(s, "h1"),
        ] {
            assert_eq!(hash_tag(&key), tag, "{key}");
        }
        for key in [
            k.host("h1"),
            k.hosts_known(),
            k.hosts_lost(),
            k.keeper("h1"),
            k.drain_lease("h1"),
            k.host_events(),
        ] {
            assert_eq!(hash_tag(&key), "hosts", "{key}");
        }
        assert_eq!(k.event_streams().len(), usize::from(SHARDS) + 1);
        assert_eq!(k.agent("a1"), format!("ap:{{s{}}}:agent:a1", s.0));
    }

    #[test]
    fn ids_spread_over_every_shard() {
        let k = Keys::sharded("ap");
        let mut seen = std::collections::HashSet::new();
        for i in 0..1000 {
            seen.insert(k.shard_of(&format!("01agent{i}")));
        }
        assert_eq!(seen.len(), usize::from(SHARDS));
        assert_eq!(hash_tag("a{}b"), "a{}b");
        assert_eq!(hash_tag("a{x}b{y}"), "x");
    }
}
