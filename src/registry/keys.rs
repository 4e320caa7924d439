//! Redis key names (a contract: see DESIGN.md). Nothing else builds keys.

/// Key names under one prefix (`ap` by default).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix`.
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `ap:host:{id}`: the live host's hash, with the heartbeat TTL.
    pub fn host(&self, id: &str) -> String {
        format!("{}:host:{id}", self.prefix)
    }

    /// `ap:host-agents:{id}`: the set of agent ids placed on the host.
    pub fn host_agents(&self, id: &str) -> String {
        format!("{}:host-agents:{id}", self.prefix)
    }

    /// `ap:agent:{id}`: the agent record hash.
    pub fn agent(&self, id: &str) -> String {
        format!("{}:agent:{id}", self.prefix)
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
        format!("{}:loc:{id}", self.prefix)
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
        format!("{}:claim:{agent_id}", self.prefix)
    }

    /// `ap:deleted:{agent_id}`: the agent's record was deleted (24 h), so a
    /// host that finds it missing knows a delete from a write a Redis
    /// failover lost.
    pub fn deleted(&self, agent_id: &str) -> String {
        format!("{}:deleted:{agent_id}", self.prefix)
    }

    /// `ap:drain:{host}`: the replica leading the host's drain, with a
    /// short TTL it renews; a draining host without it is taken over.
    pub fn drain_lease(&self, host: &str) -> String {
        format!("{}:drain:{host}", self.prefix)
    }

    /// `ap:keeper:{host}`: written by the host's keeper while no host agent
    /// is attached, with the heartbeat TTL, renewed: the machine is alive
    /// and its agents are held (the host is restarting, not lost).
    pub fn keeper(&self, host: &str) -> String {
        format!("{}:keeper:{host}", self.prefix)
    }

    /// `ap:hosts-known`: hosts that heartbeated and were not declared lost
    /// since (so HOST_LOST is emitted once per disappearance).
    pub fn hosts_known(&self) -> String {
        format!("{}:hosts-known", self.prefix)
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
        format!("{}:hosts-lost", self.prefix)
    }

    /// `ap:agents`: every agent id (a sorted set, all scores 0, read in id
    /// order with `ZRANGE … BYLEX`).
    pub fn agents_index(&self) -> String {
        format!("{}:agents", self.prefix)
    }

    /// `ap:state:{STATE}`: the ids of the agents in that state (short state
    /// name, as the record stores it).
    pub fn state_index(&self, state: &str) -> String {
        format!("{}:state:{state}", self.prefix)
    }

    /// `ap:label:{key}={value}`: the ids of the agents with that label
    /// (keys cannot hold `=`, so the split is unambiguous).
    pub fn label_index(&self, key: &str, value: &str) -> String {
        format!("{}:label:{key}={value}", self.prefix)
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

    /// `ap:events`: the event stream.
    pub fn events(&self) -> String {
        format!("{}:events", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_key_names() {
        let k = Keys::new("ap");
        assert_eq!(k.host("h1"), "ap:host:h1");
        assert_eq!(k.host_agents("h1"), "ap:host-agents:h1");
        assert_eq!(k.agent("a1"), "ap:agent:a1");
        assert_eq!(k.loc("a1"), "ap:loc:a1");
        assert_eq!(k.rr(), "ap:rr");
        assert_eq!(k.idem("r"), "ap:idem:r");
        assert_eq!(k.events(), "ap:events");
        assert_eq!(k.name("web"), "ap:name:web");
        assert_eq!(k.claim_lease("a1"), "ap:claim:a1");
        assert_eq!(k.drain_lease("h1"), "ap:drain:h1");
        assert_eq!(k.keeper("h1"), "ap:keeper:h1");
        assert_eq!(k.agent_id_of("ap:agent:a1"), Some("a1"));
        assert_eq!(k.agents_index(), "ap:agents");
        assert_eq!(k.state_index("RUNNING"), "ap:state:RUNNING");
        assert_eq!(k.label_index("team", "a"), "ap:label:team=a");
        assert_eq!(k.hosts_lost(), "ap:hosts-lost");
    }
}
