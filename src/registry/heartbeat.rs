//! A host's heartbeat: its host key, the leases of the agents it runs and
//! the fencing read-back, in one round trip on one Redis (one per hash
//! slot, concurrently, on a Cluster). Plain pipelined commands, not a
//! script: a script that renewed only the leases its records grant and
//! sent back only the others cost Redis about 40 % more CPU at rest
//! (bench-fleet, 100k agents: 0.28-0.31 cores against 0.21), and Redis is
//! the one shared server; the comparison is done here instead.
//!
//! Fencing reads a record's head only when it may have changed: every
//! write that makes a record stop naming its host at its generation (a
//! relocation, a new generation, LOST, a delete) also sets that host's
//! revision key in the record's shard to a fresh token, in the same atomic
//! step. A beat reads each shard's revision; where it is what the host
//! saw last, the records it verified then still name it and their heads
//! are not read (a second round trip reads the others in the shards that
//! changed). An agent new to the beat and a changed epoch or host key
//! read every head, and each head is read every [`FULL_READ_EVERY`]th beat
//! whatever the revisions say (a sixth of them at each beat): a write that
//! a failover rolled back takes its revision with it, and a revision is a
//! token, never a counter, so a rolled-back one cannot come back equal.

use std::collections::{BTreeMap, HashMap};

use super::conn::{keyed, Spread};
use super::keys::Shard;
use super::lease::{lease_ttl, ttl_ms, LEASE_RENEW_EVERY};
use super::{HostRecord, Registry, RegistryError, Result};
use crate::proto::v1::AgentState;

/// Every how many beats a host reads each head whatever the revisions say
/// (a sixth of them at each beat, by the id; the first beat reads them
/// all): a bound on how long a write path that forgot its revision could
/// go unseen.
pub const FULL_READ_EVERY: u64 = 6;

/// What a host's heartbeats remember between beats to skip the heads that
/// cannot have changed. Owned by the beating task; a failed beat forgets
/// it (the next beat reads every head).
#[derive(Debug, Default)]
pub struct FencingMemory {
    /// The epoch the last beat read.
    epoch: Option<String>,
    /// Per shard, the revision the last beat read (`None`: no key).
    revisions: HashMap<Shard, Option<String>>,
    /// The agents whose record named this host at this generation when
    /// their shard had that revision.
    verified: HashMap<String, u64>,
    /// Beats so far (plus the phase).
    beats: u64,
}

impl FencingMemory {
    /// A memory whose beat count starts at `phase`: hosts started together
    /// (a fleet's boot, a simulator) then read and extend different agents'
    /// at each beat even where their agents' ids fall alike. The first beat
    /// reads every head anyway (nothing is verified yet).
    pub fn with_phase(phase: u64) -> Self {
        Self {
            beats: phase % FULL_READ_EVERY,
            ..Self::default()
        }
    }

    /// How many agents the memory holds as verified (for tests and logs).
    pub fn verified(&self) -> usize {
        self.verified.len()
    }
}

/// What one reply of a beat's pipeline is.
enum Reply {
    Revision(Shard),
    /// A lease extended (`PEXPIRE`) of the agent at this index.
    Extended(usize),
    Head(usize),
}

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
    /// One heartbeat: writes the host hash and (re)sets its TTL, keeps the
    /// lease (location key, living [`lease_ttl`] of the TTL, extended every
    /// [`LEASE_RENEW_EVERY`]th beat) of every agent in `running` (id and
    /// the generation it runs at) whose record names this run, and reads
    /// back what fencing needs: the dataset epoch, whether the host key
    /// existed, the cordon flag and the agents whose record does not name
    /// this host at that generation (or is LOST, or is missing). A lease
    /// verified at an earlier beat is extended (and set again, unless
    /// someone set it meanwhile, when it had lapsed: a Redis that lost it);
    /// any other is set only once this beat has read its record naming
    /// this run, so a copy that is not its record's never writes the
    /// lease. `cordoned` is never written here: it is the operator's.
    /// Heads are read only where `memory` (the previous beats') cannot
    /// vouch for them (see the module's comment).
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
        memory: &mut FencingMemory,
    ) -> Result<HeartbeatReport> {
        let result = self.beat(conn, host, running, ttl, memory).await;
        if result.is_err() {
            // Everything is read again, at this host's own phase (so an
            // outage does not line every host's full reads up).
            *memory = FencingMemory {
                beats: memory.beats,
                ..FencingMemory::default()
            };
        }
        result
    }

    async fn beat(
        &self,
        conn: &mut super::Connection,
        host: &HostRecord,
        running: &[(String, u64)],
        ttl: std::time::Duration,
        memory: &mut FencingMemory,
    ) -> Result<HeartbeatReport> {
        let k = self.keys();
        let key = k.host(&host.id);
        let ms = ttl_ms(ttl);
        let lease_ms = ttl_ms(lease_ttl(ttl));
        let beat_no = memory.beats;
        memory.beats = memory.beats.wrapping_add(1);
        // Replies by position: 0 epoch, 1 existed, 5 cordoned, then the
        // plan's.
        let mut batch = host_commands(self, host, running.len(), ms);
        let mut by_shard: BTreeMap<Shard, Vec<usize>> = BTreeMap::new();
        for (i, (id, _)) in running.iter().enumerate() {
            by_shard.entry(k.shard_of(id)).or_default().push(i);
        }
        let mut plan = Vec::with_capacity(running.len() * 2 + by_shard.len());
        for (shard, at) in &by_shard {
            // The revision before the heads: a write between the two is
            // then seen by the heads or by the next beat's revision.
            let rev = k.host_revision(*shard, &host.id);
            let get = keyed("GET", &rev, 0, 0);
            batch.add(rev, get);
            plan.push(Reply::Revision(*shard));
            for &i in at {
                let (id, generation) = &running[i];
                let verified = memory.verified.get(id) == Some(generation);
                if verified && renews_at(id, beat_no) {
                    let loc = k.loc(id);
                    // Extending is cheaper for Redis than rewriting (a SET
                    // drops and re-adds the TTL); a lease found missing is
                    // set below. An agent not verified gets its lease once
                    // its record is read and names this run: a copy that
                    // is not the record's never writes the lease.
                    // A u64 in decimal: at most 20 bytes.
                    let mut extend = keyed("PEXPIRE", &loc, 1, 20);
                    extend.arg(lease_ms);
                    batch.add(loc, extend);
                    plan.push(Reply::Extended(i));
                }
                if !verified || full_read_at(id, beat_no) {
                    let rec = k.agent(id);
                    let read = head_command(&rec);
                    batch.add(rec, read);
                    plan.push(Reply::Head(i));
                }
            }
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
        // Everything may have changed when the dataset did.
        let all_changed = epoch.is_none() || epoch != memory.epoch || !existed;
        let mut revisions = HashMap::with_capacity(by_shard.len());
        let mut heads: Vec<Option<Option<RecordHead>>> = vec![None; running.len()];
        // Verified agents whose lease was not there to extend.
        let mut lapsed = Vec::new();
        for reply in plan {
            let value = next()?;
            match reply {
                Reply::Revision(shard) => {
                    let rev: Option<String> =
                        redis::from_redis_value(value).map_err(|e| corrupt(&e.to_string()))?;
                    revisions.insert(shard, rev);
                }
                Reply::Extended(i) => {
                    let extended: bool =
                        redis::from_redis_value(value).map_err(|e| corrupt(&e.to_string()))?;
                    if !extended {
                        lapsed.push(i);
                    }
                }
                Reply::Head(i) => heads[i] = Some(parse_head(value).map_err(|e| corrupt(&e))?),
            }
        }
        // The heads skipped in shards whose revision moved: read now.
        let changed =
            |shard: &Shard| all_changed || memory.revisions.get(shard) != revisions.get(shard);
        let unread: Vec<usize> = by_shard
            .iter()
            .filter(|(shard, _)| changed(shard))
            .flat_map(|(_, at)| at.iter().copied())
            .filter(|&i| heads[i].is_none())
            .collect();
        if !unread.is_empty() {
            let mut again = Spread::default();
            for &i in &unread {
                let rec = k.agent(&running[i].0);
                again.add(rec.clone(), head_command(&rec));
            }
            let values = again
                .query(conn, k.is_sharded())
                .await
                .map_err(self.err("heartbeat heads"))?;
            if values.len() != unread.len() {
                return Err(corrupt("heads: too short"));
            }
            for (i, value) in unread.into_iter().zip(values) {
                heads[i] = Some(parse_head(value).map_err(|e| corrupt(&e))?);
            }
        }
        let mut differing = Vec::new();
        // The last beat's map gives up its keys to this one's: an agent
        // verified before costs no new id string (a failed beat forgets
        // the memory anyway).
        let mut before = std::mem::take(&mut memory.verified);
        let mut verified = HashMap::with_capacity(running.len());
        // Agents that were not verified before this beat and are now.
        let mut fresh = Vec::new();
        for (i, ((id, generation), head)) in running.iter().zip(heads).enumerate() {
            let (key, was) = match before.remove_entry(id) {
                Some((key, was)) => (key, Some(was)),
                None => (id.clone(), None),
            };
            let Some(head) = head else {
                // Skipped: its shard did not change since it was verified.
                verified.insert(key, *generation);
                continue;
            };
            let mine = head.as_ref().is_some_and(|h| {
                h.generation == *generation
                    && h.host == host.id
                    && h.state != Some(AgentState::Lost)
            });
            if mine {
                if was != Some(*generation) {
                    fresh.push(i);
                }
                verified.insert(key, *generation);
            } else {
                differing.push((key, head));
            }
        }
        // Leases to set: those of agents just verified (whatever was
        // there: the record names this run), and the lapsed ones of agents
        // still verified, only if nobody set them meanwhile (the record's
        // next owner, say).
        let mut relet: Vec<(usize, bool)> = fresh.into_iter().map(|i| (i, false)).collect();
        relet.extend(
            lapsed
                .into_iter()
                .filter(|&i| verified.contains_key(&running[i].0))
                .map(|i| (i, true)),
        );
        if !relet.is_empty() {
            let mut again = Spread::default();
            for &(i, only_missing) in &relet {
                let loc = k.loc(&running[i].0);
                let set = set_lease(&loc, &host.id, lease_ms, only_missing);
                again.add(loc, set);
            }
            again
                .query(conn, k.is_sharded())
                .await
                .map_err(self.err("heartbeat leases"))?;
        }
        memory.epoch.clone_from(&epoch);
        memory.revisions = revisions;
        memory.verified = verified;
        Ok(HeartbeatReport {
            epoch,
            existed,
            cordoned: cordoned.as_deref() == Some("1"),
            differing,
        })
    }
}

/// Whether beat `beat_no` extends `id`'s lease: every
/// [`LEASE_RENEW_EVERY`]th beat, at the id's own phase, so that each beat
/// extends an even share of a host's leases (the same agents at every
/// such beat, however `running` is ordered).
fn renews_at(id: &str, beat_no: u64) -> bool {
    beat_no
        .wrapping_add(phase(id))
        .is_multiple_of(u64::from(LEASE_RENEW_EVERY))
}

/// Whether beat `beat_no` reads `id`'s head whatever the revisions say:
/// every [`FULL_READ_EVERY`]th beat, at the id's own phase, so each beat
/// reads a sixth of the heads. When every sixth beat read all of them, a
/// host of 100 agents sent ~150 commands in that beat, which Redis runs in
/// one go while every other caller's command waits behind them.
fn full_read_at(id: &str, beat_no: u64) -> bool {
    beat_no
        .wrapping_add(phase(id))
        .is_multiple_of(FULL_READ_EVERY)
}

/// A phase taken from an id's bytes (their sum): ids are random, so the
/// phases spread evenly.
fn phase(id: &str) -> u64 {
    id.bytes()
        .fold(0u64, |sum, b| sum.wrapping_add(u64::from(b)))
}

/// The host's own commands of a beat: epoch, existed, known-hosts index,
/// host hash, its TTL and the cordon flag (replies in that order).
fn host_commands(registry: &Registry, host: &HostRecord, running: usize, ms: u64) -> Spread {
    let k = registry.keys();
    let key = k.host(&host.id);
    let labels = serde_json::to_string(&host.labels).unwrap_or_else(|_| "{}".to_owned());
    let fields: [(&str, String); 12] = [
        ("id", host.id.clone()),
        ("address", host.address.clone()),
        ("labels", labels),
        ("capacity", host.capacity.to_string()),
        ("running", running.to_string()),
        ("version", host.version.clone()),
        ("started_at", host.started_at_ms.to_string()),
        ("heartbeat_micros", host.heartbeat_micros.to_string()),
        ("ttl_ms", ms.to_string()),
        ("incarnation", host.incarnation.clone()),
        ("cgroups", host.cgroups.encode()),
        ("heartbeat_at", crate::time::now_ms().to_string()),
    ];
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
    batch
}

/// The lease of an agent (`only_missing`: unless someone set it).
fn set_lease(loc: &str, host: &str, ms: u64, only_missing: bool) -> redis::Cmd {
    let mut cmd = redis::cmd("SET");
    cmd.arg(loc).arg(host).arg("PX").arg(ms);
    if only_missing {
        cmd.arg("NX");
    }
    cmd
}

/// The read of a record's head.
fn head_command(record: &str) -> redis::Cmd {
    let mut cmd = keyed("HMGET", record, 3, "generationhoststate".len());
    cmd.arg("generation").arg("host").arg("state");
    cmd
}

/// A head from its `HMGET` reply; `None` when the record is missing. A
/// record with a field missing still exists (and is fenced on, as one
/// naming no host); only none at all is missing.
fn parse_head(value: redis::Value) -> std::result::Result<Option<RecordHead>, String> {
    let head: Vec<Option<String>> = redis::from_redis_value(value).map_err(|e| e.to_string())?;
    Ok(head.iter().any(Option::is_some).then(|| {
        let field = |i: usize| head.get(i).cloned().flatten().unwrap_or_default();
        RecordHead {
            generation: field(0).parse().unwrap_or(0),
            host: field(1),
            state: crate::state::parse(&field(2)),
        }
    }))
}
