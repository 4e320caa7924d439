//! Where an agent is, in one round trip: its record, its lease and its
//! host's address read by one script (LocateAgent's whole read), so a
//! locate waits behind other Redis work once, not twice.

use std::collections::HashMap;

use super::codec;
use super::scripts::LOCATE_AGENT;
use super::{Registry, Result};
use crate::proto::v1::Agent;

/// An agent's record with what says where it runs.
#[derive(Debug, Clone)]
pub struct Located {
    /// The record.
    pub agent: Agent,
    /// The host its lease names (`ap:loc:{id}`), if the lease lives.
    pub lease: Option<String>,
    /// The address of the host the record names, if that host is live.
    pub address: Option<String>,
}

impl Located {
    /// Whether the agent is live where its record says: its lease names the
    /// record's host and that host's key exists (the address was read). A
    /// lease outlives its host's key by up to two TTLs (it lives three and
    /// is extended every third beat: [`super::lease_ttl`]), so the lease alone
    /// would say live a TTL too long after the host stopped beating.
    pub fn live(&self) -> bool {
        self.address.is_some() && self.lease.as_deref() == Some(self.agent.host.as_str())
    }
}

impl Registry {
    /// The record of `id`, its lease and its host's address, read in one
    /// step; `None` without a record.
    pub async fn locate(&self, id: &str) -> Result<Option<Located>> {
        let key = self.keys().agent(id);
        let (fields, lease, address) = if self.keys().is_sharded() {
            self.locate_in_two(id).await?
        } else {
            LOCATE_AGENT
                .key(&key)
                .key(self.keys().loc(id))
                .arg(self.keys().host(""))
                .invoke_async(&mut self.conn())
                .await
                .map_err(self.err("locate agent"))?
        };
        let Some(agent) = codec::decode_agent(&key, &fields)? else {
            return Ok(None);
        };
        Ok(Some(Located {
            agent,
            lease,
            address,
        }))
    }

    /// The Cluster layout's locate: the record and lease (one slot) in one
    /// round trip, then the host's address (the hosts' slot) in a second.
    async fn locate_in_two(&self, id: &str) -> Result<Found> {
        let (fields, lease): (HashMap<String, Vec<u8>>, Option<String>) = redis::pipe()
            .hgetall(self.keys().agent(id))
            .get(self.keys().loc(id))
            .query_async(&mut self.conn())
            .await
            .map_err(self.err("locate agent"))?;
        let host = fields
            .get(codec::field::HOST)
            .and_then(|h| std::str::from_utf8(h).ok())
            .filter(|h| !h.is_empty());
        let address = match host {
            Some(h) => redis::cmd("HGET")
                .arg(self.keys().host(h))
                .arg("address")
                .query_async(&mut self.conn())
                .await
                .map_err(self.err("locate agent's host"))?,
            None => None,
        };
        Ok((fields, lease, address))
    }
}

/// A record's fields, its lease's host and its host's address.
type Found = (HashMap<String, Vec<u8>>, Option<String>, Option<String>);
