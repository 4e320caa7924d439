//! What the supervisor writes into an agent's record, always with a
//! compare-and-set on this host and the agent's generation. A write that
//! Redis could not take is never dropped: the slot is kept in `unrecorded`
//! (one entry per agent) and its whole current truth is written again after
//! the next successful heartbeat. Every write of one slot happens under its
//! `writes` lock, so a retried write can never land after a newer one.

use std::sync::Arc;

use agentplane::proto::v1::{Agent, AgentState, ExitReason, ExitStatus, RecordedStart};
use agentplane::registry::{AgentUpdate, Expect, Location, RegistryError, UpdateOutcome};
use agentplane::state;
use agentplane::time::{now_ms, timestamp_from_ms};

use super::agent::AgentSlot;
use super::error::SupervisorError;
use super::{Result, Supervisor};

/// States a record may be in when this host writes its own truth over it:
/// live ones, and LOST at the same generation (declared while this host
/// still ran it, or while Redis could not hear of its end).
const OWN_STATES: [AgentState; 5] = [
    AgentState::Pending,
    AgentState::Running,
    AgentState::Paused,
    AgentState::Stopping,
    AgentState::Lost,
];

/// How long an ended agent's cgroup may take to empty before its removal
/// gives up.
const CGROUP_REMOVE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl Supervisor {
    pub(super) fn expect(&self, slot: &AgentSlot, states: &[AgentState]) -> Expect {
        Expect {
            generation: Some(slot.generation),
            host: Some(self.host_id.clone()),
            states: states.to_vec(),
        }
    }

    /// The slot's whole truth as a record update.
    fn truth(&self, slot: &AgentSlot) -> AgentUpdate {
        let s = slot.snapshot();
        AgentUpdate {
            state: Some(s.state),
            pid: Some(s.pid),
            started_at_ms: (s.started_at_ms > 0).then_some(s.started_at_ms),
            clear_exit: s.exit.is_none(),
            exit: s.exit,
            restarts: Some(s.restarts),
            last_exit: s.last_exit,
            // A rewrite during a backoff keeps its deadline.
            next_restart_at_ms: Some(s.next_restart_at_ms.unwrap_or(0)),
            incarnation: Some(self.incarnation.clone()),
            pending_since_ms: Some(0),
            ..Default::default()
        }
    }

    /// Keeps `slot` to be written again once Redis answers.
    fn keep_unrecorded(&self, slot: &Arc<AgentSlot>, e: &RegistryError) {
        tracing::warn!(agent = %slot.id, error = %e, "cannot record the agent yet; writing it after the next heartbeat");
        self.unrecorded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(slot.id.clone(), slot.clone());
    }

    /// Keeps `slot` to be written after the next heartbeat (an adopted
    /// agent, whose record names the earlier incarnation).
    pub(super) fn keep_unrecorded_quietly(&self, slot: &Arc<AgentSlot>) {
        self.unrecorded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(slot.id.clone(), slot.clone());
    }

    /// Writes the truth of every slot whose last write failed (after a
    /// successful heartbeat: Redis answers again). A slot whose record
    /// moved on (another host or generation, deleted) is dropped from the list.
    pub async fn flush_unrecorded(&self) {
        let slots: Vec<Arc<AgentSlot>> = {
            let mut map = self
                .unrecorded
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            map.drain().map(|(_, s)| s).collect()
        };
        for slot in slots {
            let _w = slot.writes.lock().await;
            let update = self.truth(&slot);
            match self
                .registry
                .update_agent(&slot.id, &self.expect(&slot, &OWN_STATES), &update)
                .await
            {
                Ok(UpdateOutcome::Applied) => {
                    tracing::info!(agent = %slot.id, state = ?update.state, "recorded what happened while the registry was unreachable");
                    if !slot.is_active() {
                        self.clear_location_of(&slot).await;
                    }
                }
                Ok(other) => {
                    tracing::debug!(agent = %slot.id, ?other, "unrecorded truth not written: the record moved on");
                }
                Err(e) => self.keep_unrecorded(&slot, &e),
            }
        }
    }

    /// Writes RUNNING with the new pid (expects PENDING at this generation and
    /// host) and the location, in one atomic step. `restarts`: the new total
    /// after a restart. What it wrote, for a caller that answers with it.
    pub(super) async fn record_running(
        &self,
        slot: &AgentSlot,
        pid: i32,
        restarts: Option<u32>,
    ) -> Result<RecordedStart> {
        let started_at_ms = slot.snapshot().started_at_ms;
        let update = AgentUpdate {
            state: Some(AgentState::Running),
            pid: Some(pid),
            started_at_ms: Some(started_at_ms),
            restarts,
            next_restart_at_ms: restarts.map(|_| 0),
            incarnation: Some(self.incarnation.clone()),
            pending_since_ms: Some(0),
            location: Some(Location {
                host: self.host_id.clone(),
                host_ttl: self.ttl,
            }),
            ..Default::default()
        };
        let outcome = {
            let _w = slot.writes.lock().await;
            self.registry
                .update_agent(
                    &slot.id,
                    &self.expect(slot, &[AgentState::Pending]),
                    &update,
                )
                .await
        };
        let refused = match outcome {
            Ok(UpdateOutcome::Applied) => None,
            Ok(UpdateOutcome::Missing) => Some("its record was deleted".to_owned()),
            Ok(UpdateOutcome::Conflict {
                state,
                generation,
                host,
            }) => Some(format!(
                "its record says host {host}, generation {generation}, state {}",
                state.map_or("?", state::name)
            )),
            Err(e) => return Err(e.into()),
        };
        match refused {
            Some(detail) => Err(SupervisorError::Fenced {
                id: slot.id.clone(),
                detail,
            }),
            None => Ok(RecordedStart {
                pid,
                started_at: Some(timestamp_from_ms(started_at_ms)),
                incarnation: self.incarnation.clone(),
            }),
        }
    }

    /// Records a restart. Fenced: the run must not go on (false). Redis
    /// unreachable: the run goes on and is recorded once Redis answers.
    pub(super) async fn record_restart(&self, slot: &Arc<AgentSlot>, pid: i32) -> bool {
        let restarts = slot.snapshot().restarts;
        match self.record_running(slot, pid, Some(restarts)).await {
            Ok(_) => true,
            Err(SupervisorError::Registry(e)) => {
                self.keep_unrecorded(slot, &e);
                true
            }
            Err(e) => {
                tracing::warn!(agent = %slot.id, error = %e, "killing a restart that could not be recorded");
                false
            }
        }
    }

    /// Records PENDING with `next_restart_at` (a restart backoff); kept for
    /// later when Redis does not answer.
    pub(super) async fn record_backoff(
        &self,
        slot: &Arc<AgentSlot>,
        exit: &ExitStatus,
        due_ms: i64,
    ) {
        let update = AgentUpdate {
            state: Some(AgentState::Pending),
            pid: Some(0),
            last_exit: Some(exit.clone()),
            next_restart_at_ms: Some(due_ms),
            ..Default::default()
        };
        let _w = slot.writes.lock().await;
        if let Err(e) = self
            .registry
            .update_agent(&slot.id, &self.expect(slot, &OWN_STATES), &update)
            .await
        {
            self.keep_unrecorded(slot, &e);
        }
    }

    /// Records the end for good, then wakes every waiter. An end Redis could
    /// not take is written after the next successful heartbeat.
    pub(super) async fn finish(&self, slot: &Arc<AgentSlot>, state: AgentState, exit: ExitStatus) {
        if let Some(cg) = slot.cgroup.clone() {
            // Its last members leave as the keeper reaps them: removed
            // once empty, off this path.
            let id = slot.id.clone();
            self.tasks.spawn("cgroup removal", async move {
                if let Err(e) = cg.remove(CGROUP_REMOVE_WAIT).await {
                    tracing::warn!(agent = %id, error = %e, "cannot remove the agent's cgroup; the next host agent start sweeps it");
                }
            });
        }
        if slot.is_disowned() {
            tracing::debug!(agent = %slot.id, "end not recorded: the record refused this run");
            slot.mark_ended(state, exit);
            return;
        }
        let update = AgentUpdate {
            state: Some(state),
            pid: Some(0),
            exit: Some(exit.clone()),
            next_restart_at_ms: Some(0),
            pending_since_ms: Some(0),
            ..Default::default()
        };
        let written = {
            let _w = slot.writes.lock().await;
            let written = self
                .registry
                .update_agent(&slot.id, &self.expect(slot, &OWN_STATES), &update)
                .await;
            // Woken only once the record says so (or cannot yet): a stop's
            // caller reads the record right after.
            slot.mark_ended(state, exit);
            written
        };
        match written {
            Ok(UpdateOutcome::Applied) => {}
            Ok(other) => {
                tracing::debug!(agent = %slot.id, ?other, "end not recorded: the record moved on")
            }
            Err(e) => return self.keep_unrecorded(slot, &e),
        }
        self.clear_location_of(slot).await;
    }

    async fn clear_location_of(&self, slot: &AgentSlot) {
        if let Err(e) = self.registry.clear_location(&slot.id, &self.host_id).await {
            tracing::warn!(agent = %slot.id, error = %e, "cannot clear location; it expires with the TTL");
        }
    }

    /// Writes a state change made by a control operation.
    pub(super) async fn write_state(
        &self,
        slot: &AgentSlot,
        to: AgentState,
        from: &[AgentState],
    ) -> Result<()> {
        let update = AgentUpdate {
            state: Some(to),
            ..Default::default()
        };
        let outcome = {
            let _w = slot.writes.lock().await;
            self.registry
                .update_agent(&slot.id, &self.expect(slot, from), &update)
                .await?
        };
        match outcome {
            UpdateOutcome::Applied => Ok(()),
            UpdateOutcome::Missing => Err(SupervisorError::Fenced {
                id: slot.id.clone(),
                detail: "its record was deleted".into(),
            }),
            UpdateOutcome::Conflict {
                generation, host, ..
            } if generation != slot.generation || host != self.host_id => {
                Err(SupervisorError::Fenced {
                    id: slot.id.clone(),
                    detail: format!("its record names host {host}, generation {generation}"),
                })
            }
            // Only the state differs: the run loop recorded an end first.
            UpdateOutcome::Conflict { .. } => Ok(()),
        }
    }

    /// The agent was declared LOST while it kept running here (a partition
    /// that healed before anyone rescheduled it): say the truth again.
    pub async fn restore_lost(&self, id: &str) {
        let Ok(slot) = self.get(id) else { return };
        let _w = slot.writes.lock().await;
        let update = self.truth(&slot);
        match self
            .registry
            .update_agent(id, &self.expect(&slot, &[AgentState::Lost]), &update)
            .await
        {
            Ok(UpdateOutcome::Applied) => {
                tracing::info!(agent = %id, state = ?update.state, "agent was marked LOST but runs here; restored");
            }
            Ok(other) => tracing::debug!(agent = %id, ?other, "LOST record moved on"),
            Err(e) => tracing::warn!(agent = %id, error = %e, "cannot restore a LOST record"),
        }
    }

    /// The record of a local agent as this host knows it, to write back after
    /// Redis lost its data.
    pub fn record_of(&self, id: &str) -> Option<Agent> {
        let slot = self.get(id).ok()?;
        let s = slot.snapshot();
        Some(Agent {
            id: slot.id.clone(),
            spec: Some(slot.spec.clone()),
            state: s.state as i32,
            host: self.host_id.clone(),
            pid: s.pid,
            generation: slot.generation,
            exit: s.exit,
            created_at: Some(timestamp_from_ms(slot.created_at_ms)),
            started_at: (s.started_at_ms > 0).then(|| timestamp_from_ms(s.started_at_ms)),
            restarts: s.restarts,
            last_exit: s.last_exit,
            next_restart_at: None,
            idle: slot.idle.load(std::sync::atomic::Ordering::Relaxed),
            incarnation: self.incarnation.clone(),
            pending_since: None,
        })
    }

    /// Before the first heartbeat: every live record that names this host
    /// but that this start of the host agent does not hold was left by an
    /// earlier start, whose processes are gone. Each goes LOST
    /// (HOST_RESTARTED), so its restart policy applies and nobody reads it as
    /// running. A PENDING record nobody started yet is left alone: its start
    /// may be on its way here. Returns how many were settled.
    pub async fn settle_earlier_records(&self) -> std::result::Result<usize, RegistryError> {
        let mut settled = 0;
        let mut cursor = 0;
        loop {
            let (next, ids) = self
                .registry
                .scan_host_agent_ids(&self.host_id, cursor, 200)
                .await?;
            for a in self.registry.get_agents(&ids).await? {
                let st = a.state();
                let earlier = state::RUNNING.contains(&st)
                    || (st == AgentState::Pending
                        && !a.incarnation.is_empty()
                        && a.incarnation != self.incarnation);
                if a.host != self.host_id
                    || !earlier
                    || self.generation_of(&a.id) == Some(a.generation)
                {
                    continue;
                }
                let detail = format!(
                    "host agent {} restarted (incarnation {}); the run started by incarnation {} is gone",
                    self.host_id,
                    self.incarnation,
                    if a.incarnation.is_empty() { "?" } else { &a.incarnation }
                );
                if self
                    .registry
                    .mark_lost(
                        &a.id,
                        a.generation,
                        &self.host_id,
                        &[st],
                        ExitReason::HostRestarted,
                        detail,
                    )
                    .await?
                {
                    tracing::warn!(agent = %a.id, state = state::name(st), "agent LOST: started by an earlier run of this host agent");
                    settled += 1;
                }
            }
            if next == 0 {
                return Ok(settled);
            }
            cursor = next;
        }
    }

    /// Records a first start that failed (missing executable, bad cwd, …) as FAILED.
    pub(super) async fn fail_to_start(
        &self,
        slot: &Arc<AgentSlot>,
        e: &std::io::Error,
    ) -> agentplane::proto::v1::LocalAgent {
        let exit = super::spawn_failure(&slot.spec, e);
        tracing::info!(agent = %slot.id, error = %exit.error, "agent failed to start");
        self.finish(slot, AgentState::Failed, exit).await;
        slot.to_proto()
    }
}

/// The exit of a start that a heartbeat fenced between admission and fork.
pub(super) fn fenced_before_start() -> ExitStatus {
    ExitStatus {
        reason: ExitReason::Stopped as i32,
        error: "fenced before its start: its record names another host or generation".into(),
        finished_at: Some(timestamp_from_ms(now_ms())),
        ..Default::default()
    }
}
