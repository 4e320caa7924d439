//! Host records (`ap:host:*`): registration, the one-round-trip heartbeat,
//! discovery by `SCAN`, and the round-robin counter.

use std::collections::HashMap;
use std::time::Duration;

use redis::AsyncCommands;

use super::agents::ttl_ms;
use super::{Registry, RegistryError, Result};
use crate::proto::v1::Host;
use crate::time::timestamp_from_ms;

/// What a host agent publishes about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostRecord {
    /// `--host-id`.
    pub id: String,
    /// The address the control plane dials.
    pub address: String,
    /// `--label`s.
    pub labels: HashMap<String, String>,
    /// `--max-agents`.
    pub capacity: u32,
    /// Agents running at the last heartbeat.
    pub running: u32,
    /// Host-agent version.
    pub version: String,
    /// Start time, ms since the epoch.
    pub started_at_ms: i64,
    /// Last heartbeat, ms since the epoch.
    pub heartbeat_at_ms: i64,
    /// No new agents go here.
    pub cordoned: bool,
    /// Duration of the previous heartbeat round trip, microseconds.
    pub heartbeat_micros: u64,
}

impl HostRecord {
    /// The API form.
    pub fn to_proto(&self) -> Host {
        Host {
            id: self.id.clone(),
            address: self.address.clone(),
            labels: self.labels.clone(),
            capacity: self.capacity,
            running: self.running,
            version: self.version.clone(),
            cordoned: self.cordoned,
            started_at: Some(timestamp_from_ms(self.started_at_ms)),
            heartbeat_at: Some(timestamp_from_ms(self.heartbeat_at_ms)),
            heartbeat_micros: self.heartbeat_micros,
        }
    }

    /// True when it can take one more agent.
    pub fn has_room(&self) -> bool {
        !self.cordoned && self.running < self.capacity
    }

    fn decode(key: &str, id: &str, h: &HashMap<String, String>) -> Result<Option<Self>> {
        if h.is_empty() {
            return Ok(None);
        }
        let corrupt = |detail: String| RegistryError::Corrupt {
            key: key.to_owned(),
            detail,
        };
        let num = |f: &str| -> Result<i64> {
            h.get(f)
                .map(|s| {
                    s.parse()
                        .map_err(|_| corrupt(format!("field `{f}` = `{s}` is not a number")))
                })
                .transpose()
                .map(Option::unwrap_or_default)
        };
        let labels = match h.get("labels") {
            Some(s) if !s.is_empty() => {
                serde_json::from_str(s).map_err(|e| corrupt(format!("field `labels`: {e}")))?
            }
            _ => HashMap::new(),
        };
        Ok(Some(Self {
            id: id.to_owned(),
            address: h.get("address").cloned().unwrap_or_default(),
            labels,
            capacity: u32::try_from(num("capacity")?).unwrap_or(0),
            running: u32::try_from(num("running")?).unwrap_or(0),
            version: h.get("version").cloned().unwrap_or_default(),
            started_at_ms: num("started_at")?,
            heartbeat_at_ms: num("heartbeat_at")?,
            cordoned: h.get("cordoned").is_some_and(|v| v == "1"),
            heartbeat_micros: u64::try_from(num("heartbeat_micros")?).unwrap_or(0),
        }))
    }
}

impl Registry {
    /// One heartbeat, in ONE pipelined round trip whatever the number of agents:
    /// writes the host hash, (re)sets its TTL, and (re)writes the location key of
    /// every agent in `running` with the same TTL. Rewriting (rather than only
    /// extending) the locations means a Redis that lost its data is repaired by
    /// the next heartbeat. `cordoned` is not written: it belongs to the operator.
    pub async fn heartbeat(
        &self,
        host: &HostRecord,
        running: &[String],
        ttl: Duration,
    ) -> Result<()> {
        let k = self.keys();
        let key = k.host(&host.id);
        let labels = serde_json::to_string(&host.labels).unwrap_or_else(|_| "{}".to_owned());
        let fields: [(&str, String); 8] = [
            ("id", host.id.clone()),
            ("address", host.address.clone()),
            ("labels", labels),
            ("capacity", host.capacity.to_string()),
            ("running", running.len().to_string()),
            ("version", host.version.clone()),
            ("started_at", host.started_at_ms.to_string()),
            ("heartbeat_micros", host.heartbeat_micros.to_string()),
        ];
        let ms = ttl_ms(ttl);
        let mut pipe = redis::pipe();
        pipe.hset_multiple(&key, &fields)
            .ignore()
            .hset(&key, "heartbeat_at", crate::time::now_ms())
            .ignore()
            .pexpire(&key, i64::try_from(ms).unwrap_or(i64::MAX))
            .ignore();
        for id in running {
            pipe.pset_ex(k.loc(id), &host.id, ms).ignore();
        }
        pipe.query_async::<()>(&mut self.conn())
            .await
            .map_err(self.err("heartbeat"))
    }

    /// Deletes the host key at once (graceful host-agent shutdown), so the
    /// control plane stops placing there without waiting for the TTL.
    pub async fn remove_host(&self, id: &str) -> Result<()> {
        self.conn()
            .del::<_, ()>(self.keys().host(id))
            .await
            .map_err(self.err("remove host"))
    }

    /// Every live host, sorted by id (a full `SCAN`, then one pipelined read).
    pub async fn list_hosts(&self) -> Result<Vec<HostRecord>> {
        let pattern = self.keys().host_pattern();
        let mut keys = Vec::new();
        let mut cursor = 0;
        loop {
            let (next, batch) = self.scan("list hosts", cursor, &pattern, 500).await?;
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        keys.sort();
        keys.dedup();
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.hgetall(key);
        }
        let hashes: Vec<HashMap<String, String>> = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(self.err("list hosts"))?;
        let mut out = Vec::with_capacity(keys.len());
        for (key, h) in keys.iter().zip(hashes) {
            let Some(id) = self.keys().host_id_of(key) else {
                continue;
            };
            // A key that expired between SCAN and HGETALL reads as empty: skip it.
            if let Some(rec) = HostRecord::decode(key, id, &h)? {
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// One live host.
    pub async fn get_host(&self, id: &str) -> Result<Option<HostRecord>> {
        let key = self.keys().host(id);
        let h: HashMap<String, String> = self
            .conn()
            .hgetall(&key)
            .await
            .map_err(self.err("read host"))?;
        HostRecord::decode(&key, id, &h)
    }

    /// The next value of the round-robin counter (`INCR ap:rr`).
    pub async fn next_round_robin(&self) -> Result<u64> {
        self.conn()
            .incr(self.keys().rr(), 1)
            .await
            .map_err(self.err("advance round robin"))
    }
}
