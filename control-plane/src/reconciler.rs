//! Loss detection and rescheduling. Every replica runs it; the work is done
//! once because every change is a compare-and-set on the record's generation.
//!
//! Each pass: the hosts that own an agent set (`SCAN ap:host-agents:*`) but
//! have no live host key are lost, unless their keeper key says the machine
//! is alive (the host is restarting: see `agentplane::registry::Restarting`);
//! a lost host's running agents become LOST, and
//! those whose restart policy allows it are relocated to a live host with the
//! next generation. A live host whose incarnation changed (its host agent
//! restarted, and settled the records it no longer holds as LOST before its
//! first heartbeat) has its LOST restartable agents placed again at once.
//! Then one slice of the record sweep (see [`crate::sweep`]) checks every
//! record against its lease, a slice per pass. After the reconciler itself saw the registry fail,
//! or answer one of the reads that decide losses a heartbeat period late
//! (a frozen Redis that came back within the response timeout), it declares
//! nothing lost for one heartbeat TTL plus two passes: keys that expired
//! during the outage (a frozen Redis keeps counting TTLs) must not be
//! mistaken for dead hosts before they had a chance to heartbeat again.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use agentplane::proto::v1::{AgentState, ExitReason};
use agentplane::registry::{Draining, HostRecord, Registry, RegistryError};
use agentplane::state;
use agentplane::tasks::Tasks;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::drain::{Drainer, DRAIN_LEASE};
use crate::hosts::HostClients;
use crate::relocate::restart_lost;
use crate::sweep::Sweep;

/// Assumed heartbeat TTL before any host has published its own.
const DEFAULT_TTL: Duration = Duration::from_secs(10);

/// How long a read that decides losses may take before it counts as an
/// outage: a heartbeat period (a third of `ttl`), and at most a second (a
/// Redis answers in milliseconds; before any host published its TTL the
/// default one would be far too long).
fn slow(ttl: Duration) -> Duration {
    (ttl / 3).min(Duration::from_secs(1))
}

/// The reconciler of one replica.
pub struct Reconciler {
    registry: Registry,
    hosts: Arc<HostClients>,
    period: Duration,
    max_ttl: Duration,
    last_error: Option<Instant>,
    /// A read of this pass that decides losses was slow (`read_took`).
    slow_read: bool,
    /// The longest heartbeat TTL the live hosts published at the last
    /// pass that saw any (the default before): a third of it is a beat.
    ttl_now: Duration,
    sweep: Sweep,
    /// The incarnation each live host had at the previous pass.
    incarnations: HashMap<String, String>,
    /// The hosts restarting at the previous pass.
    restarting: HashSet<String>,
    /// True once the agent indexes are known to be built for this dataset.
    indexed: bool,
    /// Finishes drains whose replica died.
    drainer: Drainer,
    tasks: Tasks,
    cancel: CancellationToken,
}

impl Reconciler {
    /// A reconciler that runs a pass every `period`; the sweep retries a
    /// start that no host confirmed within `confirm_within`.
    pub fn new(
        registry: Registry,
        hosts: Arc<HostClients>,
        period: Duration,
        confirm_within: Duration,
        drainer: Drainer,
        tasks: Tasks,
    ) -> Self {
        Self {
            drainer,
            tasks,
            cancel: CancellationToken::new(),
            sweep: Sweep::new(registry.clone(), hosts.clone(), confirm_within),
            registry,
            hosts,
            period,
            max_ttl: DEFAULT_TTL,
            last_error: None,
            slow_read: false,
            ttl_now: DEFAULT_TTL,
            incarnations: HashMap::new(),
            restarting: HashSet::new(),
            indexed: false,
        }
    }

    /// Runs passes until `cancel`.
    pub async fn run(mut self, cancel: CancellationToken) {
        self.cancel = cancel.clone();
        let mut tick = tokio::time::interval(self.period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.slow_read = false;
            let t = Instant::now();
            let result = self.pass().await;
            let m = self.hosts.metrics();
            m.reconcile_passes.observe(t.elapsed().as_secs_f64());
            if result.is_err() {
                m.reconcile_errors.inc();
            }
            if self.slow_read {
                // Answered, but late: see `read_took`.
                self.last_error = Some(Instant::now());
            }
            if let Err(e) = result {
                if self
                    .last_error
                    .is_none_or(|t| t.elapsed() > Duration::from_secs(30))
                {
                    tracing::warn!(error = %e, "reconciler pass failed; declaring no host lost until the registry is steady again");
                }
                self.last_error = Some(Instant::now());
            }
        }
    }

    /// True while losses must not be declared (just after a registry outage).
    fn settling(&self) -> bool {
        self.last_error
            .is_some_and(|t| t.elapsed() < self.max_ttl + 2 * self.period)
    }

    /// True when losses may be declared: not settling, and no read that
    /// decides them was late in this pass.
    fn may_lose(&self) -> bool {
        !self.settling() && !self.slow_read
    }

    /// Notes how long a read that decides losses took since `asked`. One
    /// that took a heartbeat period or more (a stall, or a frozen Redis
    /// that came back before the response timeout, so nothing failed) is
    /// an outage, as if it had failed: hosts could not beat meanwhile and a
    /// frozen Redis keeps counting TTLs, so keys that expired then are not
    /// dead hosts.
    fn read_took(&mut self, asked: Instant) {
        if asked.elapsed() >= slow(self.ttl_now) {
            self.slow_read = true;
        }
    }

    async fn pass(&mut self) -> Result<(), RegistryError> {
        if !self.indexed {
            self.registry.build_indexes().await?;
            self.indexed = true;
        }
        let asked = Instant::now();
        let (hosts, known) = self.registry.list_hosts_and_known().await?;
        let live: HashMap<String, HostRecord> =
            hosts.into_iter().map(|h| (h.id.clone(), h)).collect();
        // Judged by the TTLs of the last pass that saw hosts (a read that
        // took long may come back with every host key expired).
        self.read_took(asked);
        let ttl = live.values().map(|h| h.ttl_ms).max().filter(|ms| *ms > 0);
        if let Some(ttl) = ttl.map(Duration::from_millis) {
            self.max_ttl = self.max_ttl.max(ttl);
            self.ttl_now = ttl;
        }
        let mut restarting = HashSet::new();
        // Known hosts that went away: restarting (a keeper holds their
        // agents) or lost. `hosts-known` holds live and restarting hosts
        // only, so this reads as much as the fleet, not the keyspace; it
        // was read just before the live records (a host that registered
        // since is in neither).
        let asked = Instant::now();
        let down: Vec<String> = known
            .into_iter()
            .filter(|h| !live.contains_key(h))
            .collect();
        self.judge_down(&down, asked, &mut restarting).await?;
        // Hosts declared lost whose agents were not all settled (a pass
        // that failed half-way, a replica that died): settled again.
        for host in self.registry.lost_hosts().await? {
            if live.contains_key(&host) {
                // Back (if its key still exists: `live` may be older than
                // its loss): its host agent fences what moved on.
                self.registry.host_back(&host).await?;
            } else if self.may_lose() && !down.contains(&host) {
                self.settle_host(&host, true).await?;
                self.registry.host_settled(&host).await?;
            }
        }
        for host in restarting.difference(&self.restarting) {
            tracing::info!(%host, "host restarting: its host agent is away and its keeper holds its agents");
        }
        let restarted: Vec<String> = live
            .values()
            .filter(|h| {
                self.incarnations
                    .get(&h.id)
                    .is_some_and(|seen| *seen != h.incarnation)
            })
            .map(|h| h.id.clone())
            .collect();
        self.incarnations = live
            .values()
            .map(|h| (h.id.clone(), h.incarnation.clone()))
            .collect();
        for host in restarted {
            tracing::info!(%host, "host agent restarted: placing its LOST agents again");
            self.settle_host(&host, false).await?;
        }
        for h in live.values() {
            if let Some(mark) = h.draining {
                self.take_over_drain(&h.id, mark).await?;
            }
        }
        let stats = self
            .sweep
            .pass(&live, &restarting, self.may_lose(), self.period / 4)
            .await?;
        self.restarting = restarting;
        if stats.acted > 0 {
            tracing::debug!(
                read = stats.read,
                acted = stats.acted,
                round_done = stats.wrapped,
                "sweep slice"
            );
        }
        Ok(())
    }

    /// Hosts not live (read since `asked`): a host whose keeper says the
    /// machine is alive is restarting (its agents run on, held by the
    /// keeper); any other is lost, unless losses may not be declared now.
    async fn judge_down(
        &mut self,
        down: &[String],
        asked: Instant,
        restarting: &mut HashSet<String>,
    ) -> Result<(), RegistryError> {
        let held = self.registry.restarting(down).await?;
        self.read_took(asked);
        for host in down {
            if held.contains_key(host) {
                restarting.insert(host.clone());
            } else if self.may_lose() {
                self.lost_host(host).await?;
            }
        }
        Ok(())
    }

    /// A host marked draining whose drain nobody leads (its replica died):
    /// this replica leads and finishes it in a task of its own.
    async fn take_over_drain(&self, host: &str, mark: Draining) -> Result<(), RegistryError> {
        // Every drain leads under a name of its own (ours included), so
        // only a drain nobody leads is taken.
        let leader = agentplane::ids::new_agent_id();
        if !self.registry.lead_drain(host, &leader, DRAIN_LEASE).await? {
            return Ok(());
        }
        tracing::info!(%host, "finishing a drain whose replica is gone");
        let (drainer, host, cancel) = (self.drainer.clone(), host.to_owned(), self.cancel.clone());
        self.tasks.spawn("drain takeover", async move {
            drainer.run(&host, mark, &leader, None, cancel).await;
        });
        Ok(())
    }

    /// The agents of a host whose key expired.
    async fn lost_host(&self, host: &str) -> Result<(), RegistryError> {
        if self.registry.mark_host_lost(host).await? {
            self.hosts.metrics().hosts_lost.inc();
            tracing::warn!(%host, "host lost: its heartbeat key expired");
        }
        self.settle_host(host, true).await?;
        self.registry.host_settled(host).await
    }

    /// Visits the agents of `host`'s set: with `lose`, each live one goes
    /// LOST (HOST_LOST); every LOST one whose policy allows it is placed again.
    async fn settle_host(&self, host: &str, lose: bool) -> Result<(), RegistryError> {
        let mut cursor = 0;
        loop {
            let (next, ids) = self.registry.scan_host_agent_ids(host, cursor, 200).await?;
            for mut agent in self.registry.get_agents(&ids).await? {
                if agent.host != host {
                    continue;
                }
                if lose && state::LIVE.contains(&agent.state()) {
                    let lost = self
                        .registry
                        .mark_lost(
                            &agent.id,
                            agent.generation,
                            host,
                            &state::LIVE,
                            ExitReason::HostLost,
                            format!("host {host} stopped heartbeating"),
                        )
                        .await?;
                    if !lost {
                        continue;
                    }
                    self.hosts.metrics().agents_lost.inc(ExitReason::HostLost);
                    tracing::warn!(agent = %agent.id, %host, "agent LOST with its host");
                    agent.state = AgentState::Lost as i32;
                }
                if state::awaits_restart(&agent) {
                    restart_lost(&self.registry, &self.hosts, &agent).await;
                }
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }
}
