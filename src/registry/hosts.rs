//! Host records (`ap:host:*`): registration (the heartbeat is in
//! `heartbeat.rs`), discovery through the `hosts-known` index, and the
//! round-robin counter.

use std::collections::HashMap;
use std::time::Duration;

use redis::AsyncCommands;

use super::lease::ttl_ms;
use super::{Registry, RegistryError, Result};
use crate::proto::v1::Host;
use crate::time::timestamp_from_ms;

/// Host records read per pipelined round trip by [`Registry::list_hosts`].
/// Redis serves one connection's pipeline without serving anyone else
/// (1,000 `HGETALL`s of host records hold it ~2 ms, measured); in reads
/// of 100 (~0.2 ms each) other callers' commands get in between.
pub const HOSTS_PER_READ: usize = 100;
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
    /// The host's heartbeat TTL, milliseconds.
    pub ttl_ms: u64,
    /// This start of the host agent (a fresh id each start).
    pub incarnation: String,
    /// A drain in progress (set by DrainHost, cleared when it ends).
    pub draining: Option<Draining>,
    /// What its cgroups give agents.
    pub cgroups: crate::cgroups::HostCgroups,
}

/// A drain in progress, as marked on the host record: what any replica
/// needs to finish it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Draining {
    /// Stop agents that cannot move.
    pub force: bool,
    /// Give up at this time, ms since the epoch.
    pub until_ms: i64,
}

impl Draining {
    fn encode(self) -> String {
        format!(
            "{}:{}",
            if self.force { "force" } else { "wait" },
            self.until_ms
        )
    }

    fn decode(s: &str) -> Option<Self> {
        let (mode, until) = s.split_once(':')?;
        Some(Self {
            force: mode == "force",
            until_ms: until.parse().ok()?,
        })
    }
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
            heartbeat_ttl: Some(crate::time::duration_to_proto(Duration::from_millis(
                self.ttl_ms,
            ))),
            incarnation: self.incarnation.clone(),
            cgroups: Some(self.cgroups.to_proto()),
            ..Default::default()
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
            ttl_ms: u64::try_from(num("ttl_ms")?).unwrap_or(0),
            incarnation: h.get("incarnation").cloned().unwrap_or_default(),
            draining: h.get("draining").and_then(|d| Draining::decode(d)),
            cgroups: crate::cgroups::HostCgroups::decode(
                h.get("cgroups").map_or("", String::as_str),
            ),
        }))
    }
}

impl Registry {
    /// The dataset epoch, created if missing (`SET NX`, so every writer agrees).
    pub async fn ensure_epoch(&self) -> Result<String> {
        let fresh = crate::ids::new_agent_id();
        let _: Option<String> = redis::cmd("SET")
            .arg(self.keys().epoch())
            .arg(&fresh)
            .arg("NX")
            .query_async(&mut self.conn())
            .await
            .map_err(self.err("create epoch"))?;
        let epoch: Option<String> = self
            .conn()
            .get(self.keys().epoch())
            .await
            .map_err(self.err("read epoch"))?;
        Ok(epoch.unwrap_or(fresh))
    }

    /// Cordons or uncordons a live host; false when it is not live.
    pub async fn set_cordoned(&self, id: &str, cordoned: bool) -> Result<bool> {
        self.set_host_field(
            id,
            "cordoned",
            if cordoned { "1" } else { "0" },
            "cordon host",
        )
        .await
    }

    /// Marks a live host as draining (`None` clears the mark); false when
    /// the host is not live.
    pub async fn set_draining(&self, id: &str, draining: Option<Draining>) -> Result<bool> {
        let value = draining.map(Draining::encode).unwrap_or_default();
        self.set_host_field(id, "draining", &value, "mark host draining")
            .await
    }

    async fn set_host_field(
        &self,
        id: &str,
        field: &str,
        value: &str,
        step: &'static str,
    ) -> Result<bool> {
        super::scripts::SET_HOST_FIELD
            .key(self.keys().host(id))
            .arg(field)
            .arg(value)
            .invoke_async::<i64>(&mut self.conn())
            .await
            .map(|n| n == 1)
            .map_err(self.err(step))
    }

    /// Leads host `id`'s drain as `leader` for `ttl` (renewing it when
    /// already the leader); false when another replica leads it.
    pub async fn lead_drain(&self, id: &str, leader: &str, ttl: Duration) -> Result<bool> {
        super::scripts::LEAD_DRAIN
            .key(self.keys().drain_lease(id))
            .arg(leader)
            .arg(ttl_ms(ttl))
            .invoke_async::<i64>(&mut self.conn())
            .await
            .map(|n| n == 1)
            .map_err(self.err("lead drain"))
    }

    /// Declares `id` lost if its key is gone, once: true for the one caller
    /// that appended HOST_LOST. The host joins the lost hosts to settle in
    /// the same step ([`Registry::host_settled`] takes it out).
    pub async fn mark_host_lost(&self, id: &str) -> Result<bool> {
        let k = self.keys();
        super::scripts::MARK_HOST_LOST
            .key(k.host(id))
            .key(k.hosts_known())
            .key(k.host_events())
            .key(k.hosts_lost())
            .arg(id)
            .arg(crate::time::now_ms())
            .arg(super::EVENTS_MAXLEN)
            .invoke_async::<i64>(&mut self.conn())
            .await
            .map(|n| n == 1)
            .map_err(self.err("mark host lost"))
    }

    /// Deletes the host key at once (graceful host-agent shutdown), so the
    /// control plane stops placing there without waiting for the TTL, and
    /// appends HOST_DOWN (not HOST_LOST: it left on purpose).
    pub async fn remove_host(&self, id: &str) -> Result<()> {
        let k = self.keys();
        redis::pipe()
            .atomic()
            .del(k.host(id))
            .ignore()
            .srem(k.hosts_known(), id)
            .ignore()
            .add_command(self.event_cmd(
                k.host_events(),
                &[("type", "HOST_DOWN".to_owned()), ("host", id.to_owned())],
            ))
            .ignore()
            .query_async::<()>(&mut self.conn())
            .await
            .map_err(self.err("remove host"))
    }

    /// Every live host, sorted by id: the members of the `hosts-known`
    /// index, then their keys in pipelined reads of [`HOSTS_PER_READ`]
    /// (1 + hosts/100 round trips whatever the keyspace holds; a member
    /// whose key expired is skipped, and the reconciler removes it). No
    /// SCAN: this runs on every reconcile pass and spawn burst.
    pub async fn list_hosts(&self) -> Result<Vec<HostRecord>> {
        Ok(self.list_hosts_and_known().await?.0)
    }

    /// [`Registry::list_hosts`], and the `hosts-known` members it read them
    /// by (sorted): the reconciler's known hosts without a second read. A
    /// member without a live record is a host that went away (or is
    /// restarting); a host that registers meanwhile is in neither.
    pub async fn list_hosts_and_known(&self) -> Result<(Vec<HostRecord>, Vec<String>)> {
        let mut ids = self.known_hosts().await?;
        ids.sort();
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(HOSTS_PER_READ) {
            let keys: Vec<String> = chunk.iter().map(|id| self.keys().host(id)).collect();
            let mut pipe = redis::pipe();
            for key in &keys {
                pipe.hgetall(key);
            }
            let hashes: Vec<HashMap<String, String>> = pipe
                .query_async(&mut self.conn())
                .await
                .map_err(self.err("list hosts"))?;
            for ((key, id), h) in keys.iter().zip(chunk).zip(hashes) {
                if let Some(rec) = HostRecord::decode(key, id, &h)? {
                    out.push(rec);
                }
            }
        }
        Ok((out, ids))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_their_stored_fields() {
        let d = Draining {
            force: true,
            until_ms: -5,
        };
        assert_eq!(Draining::decode(&d.encode()), Some(d));
        let h = HashMap::from([
            ("capacity".to_owned(), "-1".to_owned()),
            ("labels".to_owned(), r#"{"gpu":"1"}"#.to_owned()),
        ]);
        let r = HostRecord::decode("k", "h1", &h).unwrap().unwrap();
        assert_eq!((r.capacity, r.labels["gpu"].as_str()), (0, "1"));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn decode_never_panics_on_garbage_fields(
                h in prop::collection::hash_map(
                    prop_oneof![
                        prop::sample::select(vec![
                            "address", "labels", "capacity", "running", "version", "started_at",
                            "heartbeat_at", "cordoned", "heartbeat_micros", "ttl_ms", "incarnation", "draining",
                        ]).prop_map(str::to_owned),
                        ".{0,8}",
                    ],
                    prop_oneof![
                        any::<String>(),
                        any::<i128>().prop_map(|n| n.to_string()),
                        "(force|wait)?:?-?[0-9]{0,20}",
                        r#"\{("[a-z]{0,3}":("[a-z]{0,3}"|[0-9]{1,3}|\[|\{),?){0,3}\}?"#,
                        Just("[".repeat(200)),
                    ],
                    0..10,
                ),
            ) {
                match HostRecord::decode("ap:host:h", "h", &h) {
                    Ok(None) => prop_assert!(h.is_empty()),
                    Ok(Some(r)) => prop_assert_eq!(r.id, "h"),
                    Err(RegistryError::Corrupt { key, detail }) => {
                        prop_assert_eq!(key, "ap:host:h");
                        prop_assert!(!detail.is_empty());
                    }
                    Err(e) => prop_assert!(false, "not a corrupt-record error: {e}"),
                }
            }

            #[test]
            fn draining_decodes_what_it_encodes(force in any::<bool>(), until_ms in any::<i64>(), garbage in ".{0,30}") {
                let d = Draining { force, until_ms };
                prop_assert_eq!(Draining::decode(&d.encode()), Some(d));
                let _ = Draining::decode(&garbage);
            }
        }
    }
}
