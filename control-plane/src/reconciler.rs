//! Loss detection and rescheduling. Every replica runs it; the work is done
//! once because every change is a compare-and-set on the record's generation.
//!
//! Each pass: the hosts that own an agent set (`SCAN ap:host-agents:*`) but
//! have no live host key are lost; their running agents become LOST, and
//! those whose restart policy allows it are relocated to a live host with the
//! next generation. After the reconciler itself saw the registry fail, it
//! declares nothing lost for one heartbeat TTL plus two passes: keys that
//! expired during the outage (a frozen Redis keeps counting TTLs) must not be
//! mistaken for dead hosts before they had a chance to heartbeat again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use agentplane::proto::v1::AgentState;
use agentplane::registry::{AgentUpdate, Expect, Registry, RegistryError, UpdateOutcome};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::hosts::HostClients;
use crate::relocate::relocate;
use agentplane::state::restartable_elsewhere;

/// Assumed heartbeat TTL before any host has published its own.
const DEFAULT_TTL: Duration = Duration::from_secs(10);

/// States a lost host's agents are taken out of.
const ALIVE: [AgentState; 4] = [
    AgentState::Pending,
    AgentState::Running,
    AgentState::Paused,
    AgentState::Stopping,
];

/// The reconciler of one replica.
pub struct Reconciler {
    registry: Registry,
    hosts: Arc<HostClients>,
    period: Duration,
    max_ttl: Duration,
    last_error: Option<Instant>,
}

impl Reconciler {
    /// A reconciler that runs a pass every `period`.
    pub fn new(registry: Registry, hosts: Arc<HostClients>, period: Duration) -> Self {
        Self {
            registry,
            hosts,
            period,
            max_ttl: DEFAULT_TTL,
            last_error: None,
        }
    }

    /// Runs passes until `cancel`.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(self.period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.pass().await {
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

    async fn pass(&mut self) -> Result<(), RegistryError> {
        let live: HashMap<String, u64> = self
            .registry
            .list_hosts()
            .await?
            .into_iter()
            .map(|h| (h.id, h.ttl_ms))
            .collect();
        if let Some(ms) = live.values().max() {
            self.max_ttl = self.max_ttl.max(Duration::from_millis(*ms));
        }
        let mut cursor = 0;
        loop {
            let (next, hosts) = self.registry.scan_host_sets(cursor, 200).await?;
            for host in hosts.iter().filter(|h| !live.contains_key(*h)) {
                if self.settling() {
                    continue;
                }
                self.lost_host(host).await?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    async fn lost_host(&self, host: &str) -> Result<(), RegistryError> {
        if self.registry.mark_host_lost(host).await? {
            tracing::warn!(%host, "host lost: its heartbeat key expired");
        }
        let mut cursor = 0;
        loop {
            let (next, ids) = self.registry.scan_host_agent_ids(host, cursor, 200).await?;
            for agent in self.registry.get_agents(&ids).await? {
                if agent.host != host {
                    continue;
                }
                let mut state = agent.state();
                if ALIVE.contains(&state) {
                    let outcome = self
                        .registry
                        .update_agent(
                            &agent.id,
                            &Expect {
                                generation: Some(agent.generation),
                                host: Some(host.to_owned()),
                                states: ALIVE.to_vec(),
                            },
                            &AgentUpdate {
                                state: Some(AgentState::Lost),
                                ..Default::default()
                            },
                        )
                        .await?;
                    if outcome != UpdateOutcome::Applied {
                        continue;
                    }
                    tracing::warn!(agent = %agent.id, %host, "agent LOST with its host");
                    state = AgentState::Lost;
                }
                if state == AgentState::Lost && restartable_elsewhere(&agent) {
                    match relocate(&self.registry, &self.hosts, &agent, AgentState::Lost).await {
                        Ok(Some(to)) => {
                            tracing::info!(agent = %agent.id, %to, "LOST agent rescheduled")
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(agent = %agent.id, error = %e, "cannot reschedule yet; retrying next pass")
                        }
                    }
                }
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }
}
