//! A host's heartbeat: its host key, the leases of the agents it runs and
//! the fencing read-back, in one round trip on one Redis (one per hash
//! slot, concurrently, on a Cluster). The leases go through RENEW_LEASES,
//! which renews the lease of each record that names this host at the
//! generation it runs and sends back only the records that do not, so a
//! beat at rest costs one script call per shard and an empty reply. After
//! Redis lost its scripts (a restart) only the script calls are retried.

use super::agents::ttl_ms;
use super::conn::Spread;
use super::scripts::RENEW_LEASES;
use super::{HostRecord, Registry, RegistryError, Result};
use crate::proto::v1::AgentState;

/// The head of an agent record, read back by a heartbeat for fencing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordHead {
    /// The record's generation.
    pub generation: u64,
    /// The host it names.
    pub host: String,
    /// Its state.
    pub state: Option<AgentState>,
}

/// What a heartbeat read back in the same round trip.
#[derive(Debug, Clone, Default)]
pub struct HeartbeatReport {
    /// The dataset's epoch (`ap:epoch`); `None` when Redis has none.
    pub epoch: Option<String>,
    /// Whether the host key existed before this beat.
    pub existed: bool,
    /// Whether an operator cordoned the host.
    pub cordoned: bool,
    /// The agents whose record does not name this host at the generation
    /// it runs, or is LOST, with the record's head (`None`: no record).
    /// Every other agent's lease was renewed.
    pub differing: Vec<(String, Option<RecordHead>)>,
}

/// The RENEW_LEASES call of one shard's `agents` (EVALSHA: a pipeline
/// cannot load a script; a missing one is loaded and the call retried),
/// with the key it is routed by.
fn renew_leases(
    k: &super::Keys,
    host: &str,
    ttl_ms: u64,
    agents: &[&(String, u64)],
) -> (String, redis::Cmd) {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(RENEW_LEASES.get_hash()).arg(agents.len() * 2);
    for (id, _) in agents {
        cmd.arg(k.loc(id)).arg(k.agent(id));
    }
    cmd.arg(host).arg(ttl_ms);
    for (_, generation) in agents {
        cmd.arg(*generation);
    }
    (k.loc(&agents[0].0), cmd)
}

impl Registry {
    /// One heartbeat: writes the host hash and (re)sets its TTL, renews the
    /// lease (location key, same TTL) of every agent in `running` (id and
    /// the generation it runs at) whose record names this host at that
    /// generation, and reads back what fencing needs: the dataset epoch,
    /// whether the host key existed, the cordon flag and the agents whose
    /// record says otherwise. Setting (rather than only extending) the
    /// leases repairs a Redis that lost them; `cordoned` is never written
    /// here: it is the operator's.
    ///
    /// It runs on `conn`, a connection the caller owns (see
    /// [`Registry::dedicated_connection`]): after a failure the caller drops it
    /// and the next beat dials afresh, so a healed partition is seen at the next
    /// beat instead of after TCP's retransmission backoff on a stalled socket.
    pub async fn heartbeat(
        &self,
        conn: &mut super::Connection,
        host: &HostRecord,
        running: &[(String, u64)],
        ttl: std::time::Duration,
    ) -> Result<HeartbeatReport> {
        let k = self.keys();
        let key = k.host(&host.id);
        let labels = serde_json::to_string(&host.labels).unwrap_or_else(|_| "{}".to_owned());
        let ms = ttl_ms(ttl);
        let fields: [(&str, String); 12] = [
            ("id", host.id.clone()),
            ("address", host.address.clone()),
            ("labels", labels),
            ("capacity", host.capacity.to_string()),
            ("running", running.len().to_string()),
            ("version", host.version.clone()),
            ("started_at", host.started_at_ms.to_string()),
            ("heartbeat_micros", host.heartbeat_micros.to_string()),
            ("ttl_ms", ms.to_string()),
            ("incarnation", host.incarnation.clone()),
            ("cgroups", host.cgroups.encode()),
            ("heartbeat_at", crate::time::now_ms().to_string()),
        ];
        // Replies by position: 0 epoch, 1 existed, 5 cordoned, then one
        // per shard that has agents here.
        let mut batch = Spread::keeping_errors();
        batch.add(k.epoch(), redis::cmd("GET").arg(k.epoch()).clone());
        batch.add(key.clone(), redis::cmd("EXISTS").arg(&key).clone());
        // The index first: whenever the host key exists its id is in
        // `hosts-known` (MARK_HOST_LOST removes it only once the key is
        // gone), which is what `list_hosts` reads instead of a SCAN.
        batch.add(
            key.clone(),
            redis::cmd("SADD")
                .arg(k.hosts_known())
                .arg(&host.id)
                .clone(),
        );
        let mut hset = redis::cmd("HSET");
        hset.arg(&key);
        for (f, v) in &fields {
            hset.arg(*f).arg(v);
        }
        batch.add(key.clone(), hset);
        batch.add(key.clone(), redis::cmd("PEXPIRE").arg(&key).arg(ms).clone());
        batch.add(
            key.clone(),
            redis::cmd("HGET").arg(&key).arg("cordoned").clone(),
        );
        let mut by_shard: std::collections::BTreeMap<super::Shard, Vec<&(String, u64)>> =
            std::collections::BTreeMap::new();
        for agent in running {
            by_shard
                .entry(k.shard_of(&agent.0))
                .or_default()
                .push(agent);
        }
        let groups: Vec<Vec<&(String, u64)>> = by_shard.into_values().collect();
        let renewals: Vec<(String, redis::Cmd)> = groups
            .iter()
            .map(|agents| renew_leases(k, &host.id, ms, agents))
            .collect();
        for (key, cmd) in &renewals {
            batch.add(key.clone(), cmd.clone());
        }
        let mut values = batch
            .query(conn, k.is_sharded())
            .await
            .map_err(self.err("heartbeat"))?;
        for v in &values {
            if let redis::Value::ServerError(e) = v {
                let e = redis::RedisError::from(e.clone());
                if e.kind() != redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) {
                    return Err(self.err("heartbeat")(e));
                }
            }
        }
        // Redis restarted or flushed its scripts: load it, and renew the
        // shards that missed it (the rest of the beat went through).
        let first = values.len() - renewals.len();
        let missed: Vec<usize> = (0..renewals.len())
            .filter(|i| matches!(values[first + i], redis::Value::ServerError(_)))
            .collect();
        if !missed.is_empty() {
            RENEW_LEASES
                .prepare_invoke()
                .load_async(conn)
                .await
                .map_err(self.err("heartbeat"))?;
            let mut again = Spread::default();
            for i in &missed {
                again.add(renewals[*i].0.clone(), renewals[*i].1.clone());
            }
            let renewed = again
                .query(conn, k.is_sharded())
                .await
                .map_err(self.err("heartbeat"))?;
            for (i, v) in missed.into_iter().zip(renewed) {
                values[first + i] = v;
            }
        }
        let corrupt = |detail: &str| RegistryError::Corrupt {
            key: key.clone(),
            detail: format!("heartbeat reply: {detail}"),
        };
        let mut it = values.into_iter();
        let mut next = || it.next().ok_or_else(|| corrupt("too short"));
        let epoch: Option<String> =
            redis::from_redis_value(next()?).map_err(|e| corrupt(&e.to_string()))?;
        let existed: bool =
            redis::from_redis_value(next()?).map_err(|e| corrupt(&e.to_string()))?;
        for _ in 0..3 {
            next()?;
        }
        let cordoned: Option<String> =
            redis::from_redis_value(next()?).map_err(|e| corrupt(&e.to_string()))?;
        let mut differing = Vec::new();
        for agents in &groups {
            let found: Vec<(usize, u8, String, String, String)> =
                redis::from_redis_value(next()?).map_err(|e| corrupt(&e.to_string()))?;
            for (i, exists, generation, record_host, state) in found {
                let Some((id, _)) = i.checked_sub(1).and_then(|i| agents.get(i)) else {
                    return Err(corrupt("an agent index out of range"));
                };
                // A record with a field missing still exists (and is
                // fenced on, as one naming no host); only none is missing.
                let head = (exists == 1).then(|| RecordHead {
                    generation: generation.parse().unwrap_or(0),
                    host: record_host,
                    state: crate::state::parse(&state),
                });
                differing.push((id.clone(), head));
            }
        }
        Ok(HeartbeatReport {
            epoch,
            existed,
            cordoned: cordoned.as_deref() == Some("1"),
            differing,
        })
    }
}
