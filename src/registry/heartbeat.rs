//! A host's heartbeat: its host key, the leases of the agents it runs and
//! the fencing read-back, in one round trip on one Redis (one per hash
//! slot, concurrently, on a Cluster). Plain pipelined commands, not a
//! script: a script that renewed only the leases its records grant and
//! sent back only the others cost Redis about 40 % more CPU at rest
//! (bench-fleet, 100k agents: 0.28-0.31 cores against 0.21), and Redis is
//! the one shared server; the comparison is done here instead.

use super::agents::ttl_ms;
use super::conn::Spread;
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

impl Registry {
    /// One heartbeat: writes the host hash and (re)sets its TTL, (re)sets
    /// the lease (location key, same TTL) of every agent in `running` (id
    /// and the generation it runs at), and reads back what fencing needs:
    /// the dataset epoch, whether the host key existed, the cordon flag and
    /// the agents whose record does not name this host at that generation
    /// (or is LOST, or is missing). Setting (rather than only extending)
    /// the leases repairs a Redis that lost them; a copy whose record
    /// names another host holds that agent's lease until its fencing,
    /// within this beat. `cordoned` is never written here: it is the
    /// operator's.
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
        // Replies by position: 0 epoch, 1 existed, 5 cordoned, then per
        // agent its lease's (skipped) and its record's head.
        let mut batch = Spread::default();
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
        for (id, _) in running {
            let loc = k.loc(id);
            batch.add(
                loc.clone(),
                redis::cmd("SET")
                    .arg(&loc)
                    .arg(&host.id)
                    .arg("PX")
                    .arg(ms)
                    .clone(),
            );
            let rec = k.agent(id);
            batch.add(
                rec.clone(),
                redis::cmd("HMGET")
                    .arg(&rec)
                    .arg("generation")
                    .arg("host")
                    .arg("state")
                    .clone(),
            );
        }
        let values = batch
            .query(conn, k.is_sharded())
            .await
            .map_err(self.err("heartbeat"))?;
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
        for (id, generation) in running {
            next()?;
            let head: Vec<Option<String>> =
                redis::from_redis_value(next()?).map_err(|e| corrupt(&e.to_string()))?;
            // A record with a field missing still exists (and is fenced
            // on, as one naming no host); only none at all is missing.
            let head = (head.iter().any(Option::is_some)).then(|| {
                let field = |i: usize| head.get(i).cloned().flatten().unwrap_or_default();
                RecordHead {
                    generation: field(0).parse().unwrap_or(0),
                    host: field(1),
                    state: crate::state::parse(&field(2)),
                }
            });
            let mine = head.as_ref().is_some_and(|h| {
                h.generation == *generation
                    && h.host == host.id
                    && h.state != Some(AgentState::Lost)
            });
            if !mine {
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
