//! Writing a record back from a host agent's memory after Redis lost its
//! data (the epoch changed) or rolled a record back to an older generation:
//! the newest generation wins, whichever host writes first.

use std::time::Duration;

use super::codec;
use super::lease::{lease_ttl, ttl_ms};
use super::scripts::REWRITE_AGENT;
use super::{Registry, Result};
use crate::proto::v1::Agent;

impl Registry {
    /// Writes `agent` (record, host set, indexes, location and name) unless the
    /// record there has its generation or a newer one. True when written.
    /// `host_ttl` is the host's heartbeat TTL (the lease lives
    /// [`super::lease_ttl`] of it).
    pub async fn rewrite_agent(&self, agent: &Agent, host_ttl: Duration) -> Result<bool> {
        let k = self.keys();
        // The host the record names now, so that its set loses the agent in
        // the same step (the script checks it has not changed since).
        let named: Option<String> = redis::cmd("HGET")
            .arg(k.agent(&agent.id))
            .arg("host")
            .query_async(&mut self.conn())
            .await
            .map_err(self.err("read agent host"))?;
        let named = named.unwrap_or_default();
        let shard = k.shard_of(&agent.id);
        let mut inv = REWRITE_AGENT.prepare_invoke();
        inv.key(k.agent(&agent.id))
            .key(k.host_agents(shard, &agent.host))
            .key(k.loc(&agent.id))
            .key(k.host_agents(
                shard,
                if named.is_empty() {
                    &agent.host
                } else {
                    &named
                },
            ))
            .key(k.agents_index(shard));
        for key in self
            .state_index_keys(shard)
            .into_iter()
            .chain(self.label_index_keys(agent))
        {
            inv.key(key);
        }
        inv.arg(agent.generation)
            .arg(&named)
            .arg(&agent.id)
            .arg(&agent.host)
            .arg(ttl_ms(lease_ttl(host_ttl)))
            .arg(k.host_revision_prefix(shard))
            .arg(crate::ids::new_agent_id());
        for (f, v) in codec::encode_agent(agent) {
            inv.arg(f).arg(v);
        }
        let written: i64 = inv
            .invoke_async(&mut self.conn())
            .await
            .map_err(self.err("rewrite agent record"))?;
        if written == 1 {
            let name = agent.spec.as_ref().map_or("", |s| s.name.as_str());
            if !name.is_empty() {
                let _: Option<String> = redis::cmd("SET")
                    .arg(k.name(name))
                    .arg(&agent.id)
                    .arg("NX")
                    .query_async(&mut self.conn())
                    .await
                    .map_err(self.err("rewrite agent name"))?;
            }
        }
        Ok(written == 1)
    }
}
