//! Draining a host without a false end. For each restartable agent (restart
//! on-failure or always, not pinned) that runs there, in parallel (bounded):
//! room elsewhere is checked first; then the record is reassigned in one
//! compare-and-set, RUNNING(g, H) → PENDING(g+1, T), appending AGENT_MOVING;
//! then the copy on H is stopped through H directly (its end write no longer
//! matches the record, so it is dropped: watchers and `spawn --wait` never
//! see the agent end); then it is started on T (or the next candidate; if
//! none confirms, the sweep retries). Agents that cannot move are waited for,
//! or stopped with `force`. Already-ended agents count as done, and one
//! agent's failure never aborts the drain: it is retried next round.
//!
//! A drain is marked on the host record (`draining`, with `force` and its
//! deadline) and led under a lease (`ap:drain:{host}`) that its replica
//! renews; it goes on when its client leaves, and when its replica dies the
//! reconciler of another replica finds the mark without a lease and finishes it.

use std::sync::Arc;
use std::time::Duration;

use agentplane::proto::v1::{Agent, AgentState, DrainProgress, EventType, HostStopAgentRequest};
use agentplane::registry::{AgentUpdate, Draining, Expect, HostRecord, Registry, UpdateOutcome};
use agentplane::state;
use agentplane::time::{duration_from_proto, duration_to_proto, now_ms};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::agents::AgentApi;
use crate::error::ApiError;
use crate::hosts::{request, HostClients, HostMethod};
use crate::placement;
use crate::start::{start_on_candidates, Placed, StartOutcome};

/// Agents handled at once in one drain.
const PARALLEL: usize = 8;
/// Grace of a moved copy's stop when its spec gives none.
const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// How long a drain's lease lives unless its replica renews it.
pub const DRAIN_LEASE: Duration = Duration::from_secs(5);
/// Pause between drain rounds.
const DRAIN_ROUND: Duration = Duration::from_millis(300);

/// What a running drain tells whoever listens.
#[derive(Debug)]
pub enum DrainEvent {
    /// After each round (the last one has `done`).
    Progress(DrainProgress),
    /// A registry failure ended the drain.
    Failed(ApiError),
    /// The deadline passed with agents left.
    GaveUp {
        /// Agents still on the host.
        remaining: u32,
    },
}

/// What happened to one agent in a round.
#[derive(Debug)]
enum Outcome {
    Moved(String),
    Stopped,
    /// Cannot move (restart never, or pinned) and no `force`: waited for.
    Waiting,
    /// Nothing to do this round (someone else changed it; it ended).
    Skipped,
    /// No host has room for it: it keeps running here for now.
    NoRoom(String),
    Failed(String),
}

/// A drain's shared handles.
#[derive(Debug, Clone)]
pub struct Drainer {
    registry: Registry,
    hosts: Arc<HostClients>,
    agents: AgentApi,
}

impl Drainer {
    /// A drainer moving agents through `hosts` and stopping unmovable ones
    /// through `agents`.
    pub fn new(registry: Registry, hosts: Arc<HostClients>, agents: AgentApi) -> Self {
        Self {
            registry,
            hosts,
            agents,
        }
    }

    /// Drains `host` until it is empty or `mark.until_ms` passes, renewing
    /// the drain lease as `leader` (when `lead`), reporting to `tx` while it
    /// listens; clears the mark at the end. Returns when done, given up,
    /// failed or cancelled.
    pub async fn run(
        &self,
        host: &str,
        mark: Draining,
        leader: &str,
        tx: Option<mpsc::Sender<DrainEvent>>,
        cancel: CancellationToken,
    ) {
        let renewing = cancel.child_token();
        let _stop_renewing = renewing.clone().drop_guard();
        {
            let (registry, host, leader) =
                (self.registry.clone(), host.to_owned(), leader.to_owned());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = renewing.cancelled() => return,
                        () = tokio::time::sleep(DRAIN_LEASE / 3) => {}
                    }
                    if let Err(e) = registry.lead_drain(&host, &leader, DRAIN_LEASE).await {
                        tracing::warn!(%host, error = %e, "cannot renew the drain lease");
                    }
                }
            });
        }
        let mut tx = tx;
        let mut p = DrainProgress {
            message: format!("cordoned {host}; draining"),
            ..Default::default()
        };
        let end = loop {
            if let Err(e) = self.round(host, mark.force, &mut p).await {
                break DrainEvent::Failed(e);
            }
            if p.remaining == 0 {
                p.done = true;
                p.message = format!("{host} is empty");
                break DrainEvent::Progress(p.clone());
            }
            if let Some(t) = &tx {
                if t.send(DrainEvent::Progress(p.clone())).await.is_err() {
                    // The client left; the drain goes on (the mark says so).
                    tx = None;
                }
            }
            if now_ms() >= mark.until_ms {
                break DrainEvent::GaveUp {
                    remaining: p.remaining,
                };
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(DRAIN_ROUND) => {}
            }
        };
        if !matches!(end, DrainEvent::Failed(_)) {
            if let Err(e) = self.registry.set_draining(host, None).await {
                tracing::warn!(%host, error = %e, "cannot clear the draining mark");
            }
        }
        tracing::info!(%host, outcome = ?end, "drain ended");
        if let Some(t) = tx {
            let _ = t.send(end).await;
        }
    }

    /// One round over what is still on `host`; updates `p`.
    async fn round(&self, host: &str, force: bool, p: &mut DrainProgress) -> Result<(), ApiError> {
        let mut remaining = Vec::new();
        let mut cursor = 0;
        loop {
            let (next, ids) = self.registry.scan_host_agent_ids(host, cursor, 200).await?;
            remaining.extend(
                self.registry
                    .get_agents(&ids)
                    .await?
                    .into_iter()
                    .filter(|a| a.host == host && !state::is_terminal(a.state())),
            );
            if next == 0 {
                break;
            }
            cursor = next;
        }
        p.remaining = u32::try_from(remaining.len()).unwrap_or(u32::MAX);
        if remaining.is_empty() {
            return Ok(());
        }
        let live = self.registry.list_hosts().await?;
        let gate = Arc::new(Semaphore::new(PARALLEL));
        let mut set = tokio::task::JoinSet::new();
        for agent in remaining {
            let (d, live, gate) = (self.clone(), live.clone(), gate.clone());
            set.spawn(async move {
                let _permit = gate.acquire_owned().await;
                let id = agent.id.clone();
                (id, d.one(agent, force, live).await)
            });
        }
        let (mut waiting, mut no_room, mut failed) = (0, Vec::new(), Vec::new());
        while let Some(joined) = set.join_next().await {
            let Ok((id, outcome)) = joined else {
                failed.push("a drain task panicked".to_owned());
                continue;
            };
            match outcome {
                Outcome::Moved(to) => {
                    p.moved += 1;
                    p.message = format!("moved {id} to {to}");
                }
                Outcome::Stopped => {
                    p.stopped += 1;
                    p.message = format!("stopped {id} (it cannot move: restart never or pinned)");
                }
                Outcome::Waiting => waiting += 1,
                Outcome::Skipped => {}
                Outcome::NoRoom(why) => no_room.push(format!("{id}: {why}")),
                Outcome::Failed(why) => failed.push(format!("{id}: {why}")),
            }
        }
        if waiting > 0 {
            p.message = format!(
                "waiting for {waiting} agents that cannot move (restart never or pinned) to end; `--force` stops them"
            );
        }
        if let Some(first) = no_room.first() {
            p.message = format!(
                "{} agents keep running here until another host has room ({first})",
                no_room.len()
            );
        }
        if let Some(first) = failed.first() {
            p.message = format!(
                "{} agents failed this round, retrying ({first})",
                failed.len()
            );
        }
        Ok(())
    }

    async fn one(&self, agent: Agent, force: bool, live: Vec<HostRecord>) -> Outcome {
        let running = matches!(agent.state(), AgentState::Running | AgentState::Paused);
        if !running {
            return Outcome::Skipped;
        }
        if state::restartable_elsewhere(&agent) {
            return match self.move_agent(&agent, live).await {
                Ok(o) => o,
                Err(e) => Outcome::Failed(e.to_string()),
            };
        }
        if !force {
            return Outcome::Waiting;
        }
        match self.agents.stop(&agent.id, None).await {
            Ok(_) => Outcome::Stopped,
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }

    /// Reassigns, stops the old copy, starts the new one.
    async fn move_agent(&self, agent: &Agent, live: Vec<HostRecord>) -> Result<Outcome, ApiError> {
        let spec = agent.spec.clone().unwrap_or_default();
        let rr = self.registry.next_round_robin().await?;
        let candidates = match placement::candidates(&spec, &live, rr) {
            Ok(c) => c,
            Err(e) => return Ok(Outcome::NoRoom(e.to_string())),
        };
        let target = &candidates[0];
        let generation = agent.generation + 1;
        let moved = self
            .registry
            .update_agent(
                &agent.id,
                &Expect {
                    generation: Some(agent.generation),
                    host: Some(agent.host.clone()),
                    states: vec![AgentState::Running, AgentState::Paused],
                },
                &AgentUpdate {
                    state: Some(AgentState::Pending),
                    host: Some(target.id.clone()),
                    generation: Some(generation),
                    pid: Some(0),
                    next_restart_at_ms: Some(0),
                    pending_since_ms: Some(now_ms()),
                    incarnation: Some(String::new()),
                    event: Some(EventType::AgentMoving),
                    ..Default::default()
                },
            )
            .await?;
        if moved != UpdateOutcome::Applied {
            return Ok(Outcome::Skipped);
        }
        self.stop_old_copy(agent).await;
        let placed = Placed {
            id: &agent.id,
            generation,
            spec: &spec,
        };
        Ok(
            match start_on_candidates(&self.registry, &self.hosts, placed, &target.id, &candidates)
                .await?
            {
                StartOutcome::Done(confirmed) => {
                    Outcome::Moved(confirmed.map_or_else(|| target.id.clone(), |c| c.host))
                }
                StartOutcome::Unconfirmed { error, .. } => Outcome::Moved(format!(
                    "{} (start not confirmed yet: {error}; the sweep retries it)",
                    target.id
                )),
            },
        )
    }

    /// Stops the copy of `agent` (as it was before the move) on its host, with
    /// its grace. A failure is logged: that host's next heartbeat finds the
    /// record moved and kills the copy (fencing).
    async fn stop_old_copy(&self, agent: &Agent) {
        let grace = agent
            .spec
            .as_ref()
            .and_then(|s| s.stop_grace.as_ref())
            .map_or(DEFAULT_GRACE, duration_from_proto);
        let host = match self.registry.get_host(&agent.host).await {
            Ok(Some(h)) => h,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(agent = %agent.id, error = %e, "cannot find the drained host; fencing stops the old copy");
                return;
            }
        };
        let msg = HostStopAgentRequest {
            id: agent.id.clone(),
            grace: Some(duration_to_proto(grace)),
        };
        let stopped = self
            .hosts
            .call(
                &host,
                HostMethod::StopAgent,
                grace + Duration::from_secs(6),
                false,
                |mut c, d| {
                    let msg = msg.clone();
                    async move { c.stop_agent(request(msg, d)).await }
                },
            )
            .await;
        if let Err(e) = stopped {
            tracing::warn!(agent = %agent.id, host = %agent.host, error = %e, "stop of a moved agent's old copy failed; fencing kills it at that host's next heartbeat");
        }
    }
}
