//! Restarting hosts: while no host agent is attached, the host's keeper
//! renews `ap:keeper:{host}` with the heartbeat TTL. Only the live machine
//! can keep it fresh, so a host whose heartbeat key expired but whose keeper
//! key lives is restarting (its agents run, held by the keeper, until the
//! key says), and one whose keys both expired is lost. The keeper ends its
//! agents before a key it could not renew expires, so no agent runs twice.

use std::collections::HashMap;
use std::time::Duration;

use super::{Registry, Result};

/// What a keeper key says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restarting {
    /// When the last host agent let go, ms since the epoch.
    pub since_ms: i64,
    /// When the keeper ends the agents if no host agent came back.
    pub until_ms: i64,
}

impl Restarting {
    /// The API form of host `id`, restarting.
    pub fn to_proto(self, id: &str) -> crate::proto::v1::Host {
        crate::proto::v1::Host {
            id: id.to_owned(),
            restarting_since: Some(crate::time::timestamp_from_ms(self.since_ms)),
            restarting_until: Some(crate::time::timestamp_from_ms(self.until_ms)),
            ..Default::default()
        }
    }

    fn encode(self) -> String {
        format!("{} {}", self.since_ms, self.until_ms)
    }

    fn decode(s: &str) -> Option<Self> {
        let (a, b) = s.split_once(' ')?;
        Some(Self {
            since_ms: a.parse().ok()?,
            until_ms: b.parse().ok()?,
        })
    }
}

impl Registry {
    /// The keeper's renewal: `host` is restarting as `r` says, for `ttl`
    /// unless renewed.
    pub async fn hold_restarting(&self, host: &str, r: Restarting, ttl: Duration) -> Result<()> {
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        redis::cmd("SET")
            .arg(self.keys().keeper(host))
            .arg(r.encode())
            .arg("PX")
            .arg(ms)
            .query_async::<()>(&mut self.conn())
            .await
            .map_err(self.err("renew the keeper key"))
    }

    /// A host agent is attached again, or the keeper ended its agents.
    pub async fn clear_restarting(&self, host: &str) -> Result<()> {
        redis::cmd("DEL")
            .arg(self.keys().keeper(host))
            .query_async::<()>(&mut self.conn())
            .await
            .map_err(self.err("delete the keeper key"))
    }

    /// Which of `hosts` are restarting (one MGET).
    pub async fn restarting(&self, hosts: &[String]) -> Result<HashMap<String, Restarting>> {
        if hosts.is_empty() {
            return Ok(HashMap::new());
        }
        let keys: Vec<String> = hosts.iter().map(|h| self.keys().keeper(h)).collect();
        let values: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut self.conn())
            .await
            .map_err(self.err("read keeper keys"))?;
        Ok(hosts
            .iter()
            .zip(values)
            .filter_map(|(h, v)| Some((h.clone(), Restarting::decode(&v?)?)))
            .collect())
    }

    /// Hosts that heartbeated and were not declared lost since.
    pub async fn known_hosts(&self) -> Result<Vec<String>> {
        redis::cmd("SMEMBERS")
            .arg(self.keys().hosts_known())
            .query_async(&mut self.conn())
            .await
            .map_err(self.err("read the known hosts"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_reads_back_and_garbage_is_no_value() {
        let r = Restarting {
            since_ms: 1_700_000_000_000,
            until_ms: 1_700_000_600_000,
        };
        assert_eq!(Restarting::decode(&r.encode()), Some(r));
        assert_eq!(Restarting::decode("12"), None);
        assert_eq!(Restarting::decode("a b"), None);
    }
}
