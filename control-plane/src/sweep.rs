//! The record sweep: every agent record that a pass could act on (live or
//! LOST, walked through the state indexes; an ended record never needs it),
//! a slice per reconciler pass, is checked against the leases that back it,
//! so a record never stays wrong whatever fault made it so.
//!
//! * A running record (RUNNING, PAUSED, STOPPING) whose host is alive but
//!   whose location key (the lease the host renews with each heartbeat) has
//!   been missing for longer than that host's TTL goes LOST (LEASE_EXPIRED).
//!   "Missing for longer than the TTL" is two sightings a TTL apart, so a
//!   record whose lease is being rewritten (a fresh start, a Redis that came
//!   back empty) is left alone.
//! * A live record whose host is not heartbeating goes LOST (HOST_LOST), even
//!   if the host's agent set does not list it, unless the host is
//!   restarting (its keeper holds the agent).
//! * A LOST record whose restart policy allows it is placed again.
//! * A PENDING record that nobody holds (no lease) and whose start was not
//!   confirmed within a bound is started again: on its host (StartAgent is
//!   idempotent by generation), then the next candidates; a refusal that no
//!   retry can mend ends it FAILED with the host's answer.
//!
//! Cost: one index page and two pipelined round trips per slice. The first
//! reads each record's lease (`GET`: the host it names); in a live state's
//! index a lease that names a live host vouches for its record, which is
//! not read further. The second reads the head (state, host, generation,
//! times) of every other record, of every LOST one (they hold no lease)
//! and of a quarter of the vouched ones each round
//! ([`VOUCHED_READ_EVERY`]: the lies a lease cannot show, such as a stale
//! index entry, are still found within four rounds); a LOST or suspect
//! record is then read whole. Plus one read of each suspect whose TTL has
//! passed. Writes happen only for records that are wrong. A pass
//! reads slices until its time budget (a quarter of the reconcile interval)
//! is spent, so a round over 100k records takes a bounded number of passes
//! (`bench-sweep` measures it) and a pass never delays the next one. A round
//! starts at most once per heartbeat TTL (the smallest of the live hosts'):
//! a lie is judged over two sightings a TTL apart anyway, and a fleet at
//! rest then costs Redis about 1.25 commands per live record per TTL (two
//! before leases vouched).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use agentplane::proto::v1::{Agent, AgentState, ExitReason};
use agentplane::registry::{AgentIndex, HostRecord, Registry, RegistryError};
use agentplane::state;
use agentplane::time::now_ms;
use tokio::time::Instant;

use crate::hosts::HostClients;
use crate::relocate::restart_lost;

mod retry;
mod verdict;

pub use verdict::{judge, Verdict};

/// Records read per slice (one page of the agent index).
pub const SLICE: usize = 250;

/// A record first seen without its lease.
#[derive(Debug, Clone)]
struct Suspect {
    generation: u64,
    seen: Instant,
}

/// The states whose records the sweep reads, each from its state index: a
/// record in any other (EXITED, FAILED) is never acted on, so a fleet's
/// history costs the sweep nothing.
const SWEPT: [AgentState; 5] = [
    AgentState::Pending,
    AgentState::Running,
    AgentState::Paused,
    AgentState::Stopping,
    AgentState::Lost,
];

/// The sweep of one replica: where its walk of the state indexes is, and
/// its suspects.
#[derive(Debug)]
pub struct Sweep {
    registry: Registry,
    hosts: Arc<HostClients>,
    confirm_within: Duration,
    /// The state of [`SWEPT`] whose index the walk is in.
    at: usize,
    /// The last id read there (`""`: from its first).
    cursor: String,
    /// When the current round began.
    round_started: Option<Instant>,
    /// The least time from one round's start to the next's (`None`: the
    /// live hosts' smallest heartbeat TTL).
    min_round: Option<Duration>,
    suspects: HashMap<String, Suspect>,
    /// Rounds finished: which quarter of the records a round reads whole
    /// (see [`full_read`]).
    rounds: u64,
}

/// Every how many rounds a record's head is read even when its lease
/// vouches for it.
pub const VOUCHED_READ_EVERY: u64 = 4;

/// Whether round `round` reads `id`'s head whatever its lease says: a
/// quarter of the records each round (by a hash of the id, so the extra
/// reads are spread over the round instead of a whole round of them every
/// fourth), each record once every [`VOUCHED_READ_EVERY`] rounds. That bounds
/// how long a lie that a lease cannot show goes unseen: an index entry
/// whose record left its state or is gone, or a record naming another host
/// than its lease (a write a failover rolled back; the old holder's beats
/// stop renewing it once they read the record).
fn full_read(id: &str, round: u64) -> bool {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    id.hash(&mut h);
    h.finish()
        .wrapping_add(round)
        .is_multiple_of(VOUCHED_READ_EVERY)
}

/// What one pass did (for logs and the benchmark).
#[derive(Debug, Default, Clone, Copy)]
pub struct PassStats {
    /// Records read.
    pub read: usize,
    /// Records changed (LOST, restarted, retried, failed).
    pub acted: usize,
    /// True when this pass finished a whole round over the records.
    pub wrapped: bool,
}

impl Sweep {
    /// A sweep whose unconfirmed starts are retried after `confirm_within`.
    pub fn new(registry: Registry, hosts: Arc<HostClients>, confirm_within: Duration) -> Self {
        Self {
            registry,
            hosts,
            confirm_within,
            at: 0,
            cursor: String::new(),
            round_started: None,
            min_round: None,
            suspects: HashMap::new(),
            rounds: 0,
        }
    }

    /// This sweep, starting rounds at most every `every` (`Duration::ZERO`:
    /// back to back, as `bench-sweep` measures one).
    pub fn with_min_round(mut self, every: Duration) -> Self {
        self.min_round = Some(every);
        self
    }

    /// Slices of the records (at least one, more while `budget` lasts and
    /// the round is not done; none while the next round is not due), each
    /// with the suspects that are due. `live`
    /// maps live host ids to their records, `restarting` names the hosts a
    /// keeper holds; with `may_lose` false (just after
    /// a registry outage) nothing is declared LOST.
    pub async fn pass(
        &mut self,
        live: &HashMap<String, HostRecord>,
        restarting: &HashSet<String>,
        may_lose: bool,
        budget: Duration,
    ) -> Result<PassStats, RegistryError> {
        let started = Instant::now();
        let mut total = PassStats::default();
        loop {
            // A round starts at most once per heartbeat TTL: a record's
            // lie is judged over two sightings a TTL apart anyway (suspects
            // are read on their own clock), so sweeping more often would
            // only load Redis. Between rounds, only due suspects are read.
            let walk = !(self.at == 0 && self.cursor.is_empty())
                || self.round_started.is_none_or(|t| {
                    t.elapsed() >= self.min_round.unwrap_or_else(|| self.ttl_floor(live))
                });
            if walk && self.at == 0 && self.cursor.is_empty() {
                self.round_started = Some(Instant::now());
            }
            let s = self.slice(walk, live, restarting, may_lose).await?;
            if !walk {
                total.read += s.read;
                total.acted += s.acted;
                return Ok(total);
            }
            total.read += s.read;
            total.acted += s.acted;
            if s.wrapped {
                total.wrapped = true;
                return Ok(total);
            }
            if started.elapsed() >= budget {
                return Ok(total);
            }
        }
    }

    /// One slice of the records (none unless `walk`), plus the suspects
    /// that are due.
    async fn slice(
        &mut self,
        walk: bool,
        live: &HashMap<String, HostRecord>,
        restarting: &HashSet<String>,
        may_lose: bool,
    ) -> Result<PassStats, RegistryError> {
        let swept = SWEPT[self.at % SWEPT.len()];
        let index = AgentIndex::State(swept);
        let mut ids = if walk {
            self.registry
                .page_agent_ids(&index, &self.cursor, SLICE)
                .await?
        } else {
            Vec::new()
        };
        // A short slice ends this state's index; the last state's ends the
        // round, and the next slice starts it again.
        let short = walk && ids.len() < SLICE;
        let next = if short {
            String::new()
        } else {
            ids.last().cloned().unwrap_or_default()
        };
        let page_len = ids.len();
        let in_slice: HashSet<String> = ids.iter().cloned().collect();
        let ttl = self.ttl_floor(live);
        ids.extend(
            self.suspects
                .iter()
                .filter(|(id, s)| s.seen.elapsed() >= ttl && !in_slice.contains(*id))
                .map(|(id, _)| id.clone()),
        );
        // Leases first, of the page and the due suspects. In a live state's
        // page a lease naming a live host vouches for its record, whose head
        // is then not read (most of a fleet at rest); of the others, whether
        // the lease lives is what their heads are judged with.
        let holders = self.registry.lease_holders(&ids).await?;
        let vouching = walk && swept != AgentState::Lost;
        let round = self.rounds;
        let (mut vouched, mut slice_len) = (0, 0);
        let mut kept = Vec::with_capacity(ids.len());
        let mut leased = Vec::with_capacity(ids.len());
        for (i, (id, holder)) in ids.into_iter().zip(holders).enumerate() {
            let in_page = i < page_len;
            if in_page
                && vouching
                && holder.as_ref().is_some_and(|h| live.contains_key(h))
                && !full_read(&id, round)
            {
                self.suspects.remove(&id);
                vouched += 1;
                continue;
            }
            // Page entries come first, so the kept ones do too.
            slice_len += usize::from(in_page);
            leased.push(holder.is_some());
            kept.push(id);
        }
        let ids = kept;
        // Heads (state, host, generation, times): a record that is fine by
        // them and its lease (nearly all) costs no full read.
        let heads: Vec<(Agent, bool)> = self
            .registry
            .get_heads(&ids)
            .await?
            .into_iter()
            .zip(leased)
            .filter_map(|(head, leased)| Some((head?, leased)))
            .collect();
        let mut stats = PassStats {
            read: vouched + heads.len(),
            wrapped: short && self.at % SWEPT.len() == SWEPT.len() - 1,
            ..Default::default()
        };
        // Suspects whose record is gone need no more watching, and index
        // entries without a record (or whose record left the state) are
        // dropped (the script checks again before it drops one).
        let found: HashMap<&str, AgentState> = heads
            .iter()
            .map(|(a, _)| (a.id.as_str(), a.state()))
            .collect();
        let mut stale = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let state = found.get(id.as_str());
            if state.is_none() {
                self.suspects.remove(id);
            }
            if i < slice_len && state != Some(&swept) {
                stale.push(id.clone());
            }
        }
        self.registry.drop_stale(&index, &stale).await?;
        // LOST heads are read whole (whether to restart is in the spec);
        // so is every head that is not fine.
        let mut whole = Vec::new();
        for (head, leased) in &heads {
            let fine = head.state() != AgentState::Lost
                && judge(
                    head,
                    *leased,
                    live.get(&head.host),
                    now_ms(),
                    self.confirm_within,
                ) == Verdict::Fine;
            if fine {
                self.suspects.remove(&head.id);
            } else {
                whole.push(head.id.clone());
            }
        }
        let records = self.registry.get_agents_with_leases(&whole).await?;
        for (agent, leased) in &records {
            let host = live.get(&agent.host);
            let verdict = judge(agent, *leased, host, now_ms(), self.confirm_within);
            if verdict != Verdict::LeaseMissing {
                self.suspects.remove(&agent.id);
            }
            let acted = match verdict {
                Verdict::Fine => false,
                Verdict::LeaseMissing => match host {
                    Some(h) if may_lose => self.lease_missing(agent, h).await?,
                    _ => false,
                },
                // `live` was read at the pass's start: a host that came
                // back since (and was given this agent) is asked again.
                // Held by the keeper of a restarting host: still running.
                Verdict::HostDown if restarting.contains(&agent.host) => false,
                Verdict::HostDown if may_lose => {
                    self.registry.get_host(&agent.host).await?.is_none()
                        && self
                            .lose(
                                agent,
                                &state::LIVE,
                                ExitReason::HostLost,
                                "its host stopped heartbeating",
                            )
                            .await?
                }
                Verdict::HostDown => false,
                Verdict::Restart => self.restart(agent).await,
                Verdict::StalePending => self.retry_start(agent, live).await?,
            };
            stats.acted += usize::from(acted);
        }
        if walk {
            self.cursor = next;
        }
        if short {
            self.at = (self.at + 1) % SWEPT.len();
        }
        if stats.wrapped {
            self.rounds = self.rounds.wrapping_add(1);
        }
        Ok(stats)
    }

    /// The smallest TTL of the live hosts: how old a suspect must be before
    /// it is read again outside its slice.
    fn ttl_floor(&self, live: &HashMap<String, HostRecord>) -> Duration {
        live.values()
            .map(|h| Duration::from_millis(h.ttl_ms))
            .min()
            .unwrap_or(Duration::from_secs(1))
    }

    /// A running record without its lease: LOST once the lease has been
    /// missing for the host's whole TTL (two sightings that far apart).
    async fn lease_missing(
        &mut self,
        agent: &Agent,
        host: &HostRecord,
    ) -> Result<bool, RegistryError> {
        let ttl = Duration::from_millis(host.ttl_ms.max(1));
        match self.suspects.get(&agent.id) {
            Some(s) if s.generation == agent.generation => {
                if s.seen.elapsed() < ttl {
                    return Ok(false);
                }
            }
            _ => {
                self.suspects.insert(
                    agent.id.clone(),
                    Suspect {
                        generation: agent.generation,
                        seen: Instant::now(),
                    },
                );
                return Ok(false);
            }
        }
        self.suspects.remove(&agent.id);
        let detail = format!(
            "host {} heartbeats but did not renew the agent's lease for {ttl:?}",
            host.id
        );
        let lost = self
            .lose(agent, &state::RUNNING, ExitReason::LeaseExpired, &detail)
            .await?;
        if lost {
            // Placed again right away, not at the next slice that reaches it.
            let mut lost_agent = agent.clone();
            lost_agent.state = AgentState::Lost as i32;
            if state::awaits_restart(&lost_agent) {
                self.restart(&lost_agent).await;
            }
        }
        Ok(lost)
    }

    async fn lose(
        &self,
        agent: &Agent,
        states: &[AgentState],
        why: ExitReason,
        detail: &str,
    ) -> Result<bool, RegistryError> {
        let lost = self
            .registry
            .mark_lost(
                &agent.id,
                agent.generation,
                &agent.host,
                states,
                why,
                detail.to_owned(),
            )
            .await?;
        if lost {
            self.hosts.metrics().agents_lost.inc(why);
            tracing::warn!(agent = %agent.id, host = %agent.host, reason = ?why, "agent LOST: {detail}");
        }
        Ok(lost)
    }

    /// Places a LOST agent again; failures are logged and retried next time.
    async fn restart(&self, agent: &Agent) -> bool {
        restart_lost(&self.registry, &self.hosts, agent).await
    }
}
