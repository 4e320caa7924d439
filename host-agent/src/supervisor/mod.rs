//! The supervisor: starts agents, serializes control operations per agent,
//! observes every exit (an event from the child's wait, never polling), and
//! writes what it sees into the registry with compare-and-set on the record's
//! generation and host.

mod agent;
pub mod error;
mod reaper;
pub mod signal;
mod spawn;

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentplane::proto::v1::{AgentSpec, AgentState, ExitStatus, LocalAgent};
use agentplane::registry::{AgentUpdate, Expect, Registry, UpdateOutcome};
use agentplane::state::{self, Op};
use agentplane::tasks::Tasks;
use agentplane::time::{now_ms, timestamp_from_ms};
use agentplane::validate::{self, ValidationError};
use nix::sys::signal::Signal;
use tokio::process::Child;
use tokio_util::sync::CancellationToken;

use self::agent::{AgentSlot, Requested};
use self::error::SupervisorError;
pub use self::reaper::Reaper;
use self::signal::Delivery;

type Result<T> = std::result::Result<T, SupervisorError>;

/// How long to wait for the group to die after SIGKILL before giving up.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// Default grace when neither the request nor the spec gives one.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);
/// Ended agents kept (for inspect and logs) beyond the running ones.
const RETAINED_ENDED: usize = 1024;
/// How long an exit record write is retried while Redis is failing.
const EXIT_WRITE_RETRY: Duration = Duration::from_secs(5);

/// States in which the record may still be overwritten by this host.
const LIVE_STATES: [AgentState; 4] = [
    AgentState::Pending,
    AgentState::Running,
    AgentState::Paused,
    AgentState::Stopping,
];

/// Runs and controls the agents of one host.
#[derive(Debug)]
pub struct Supervisor {
    host_id: String,
    registry: Registry,
    ttl: Duration,
    max_agents: u32,
    agents: Mutex<HashMap<String, Arc<AgentSlot>>>,
    tasks: Tasks,
    cancel: CancellationToken,
    reaper: Arc<Reaper>,
}

impl Supervisor {
    /// A supervisor for `host_id`.
    pub fn new(
        host_id: String,
        registry: Registry,
        ttl: Duration,
        max_agents: u32,
        tasks: Tasks,
        cancel: CancellationToken,
    ) -> Arc<Self> {
        Reaper::become_subreaper();
        let reaper = Arc::new(Reaper::default());
        let r = reaper.clone();
        let c = cancel.clone();
        tasks.spawn("orphan reaper", async move { r.run(c).await });
        Arc::new(Self {
            host_id,
            registry,
            ttl,
            max_agents,
            agents: Mutex::new(HashMap::new()),
            tasks,
            cancel,
            reaper,
        })
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<AgentSlot>>> {
        self.agents
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(&self, id: &str) -> Result<Arc<AgentSlot>> {
        self.map()
            .get(id)
            .cloned()
            .ok_or_else(|| SupervisorError::NotFound { id: id.to_owned() })
    }

    /// Ids of the agents whose process may be alive (their locations are
    /// refreshed by the heartbeat).
    pub fn active_ids(&self) -> Vec<String> {
        self.map()
            .values()
            .filter(|s| s.is_active())
            .map(|s| s.id.clone())
            .collect()
    }

    /// Starts agent `id` at `generation`. A repeated call for the same
    /// generation answers with the agent as it is (idempotent).
    pub async fn start(
        self: &Arc<Self>,
        id: String,
        generation: u64,
        spec: AgentSpec,
    ) -> Result<LocalAgent> {
        validate::agent_id("id", &id)?;
        validate::spec(&spec)?;
        if generation == 0 {
            return Err(ValidationError::new("generation", "must be at least 1").into());
        }
        let slot = Arc::new(AgentSlot::new(
            id.clone(),
            generation,
            spec,
            AgentState::Pending,
            0,
        ));
        // Owned before anyone else can see the slot: operations on it wait for the start.
        let _ops = slot
            .ops
            .try_lock()
            .map_err(|_| SupervisorError::ShuttingDown)?;
        {
            let mut map = self.map();
            if self.cancel.is_cancelled() {
                return Err(SupervisorError::ShuttingDown);
            }
            if let Some(existing) = map.get(&id) {
                if existing.generation == generation {
                    return Ok(existing.to_proto());
                }
                if existing.is_active() {
                    return Err(SupervisorError::AlreadyExists {
                        id,
                        generation: existing.generation,
                    });
                }
            }
            let active = map.values().filter(|s| s.is_active()).count();
            if active >= self.max_agents as usize {
                return Err(SupervisorError::AtCapacity {
                    host: self.host_id.clone(),
                    max: self.max_agents,
                });
            }
            map.insert(id.clone(), slot.clone());
            evict_ended(&mut map, self.max_agents as usize + RETAINED_ENDED);
        }

        let spawned = {
            // Registered before the reaper can look: it must never reap a main process.
            let mut watched = self.reaper.watched();
            spawn::spawn(&id, &slot.spec).map(|child| {
                let pid = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
                watched.insert(pid);
                (child, pid)
            })
        };
        let (child, pid) = match spawned {
            Ok(c) => c,
            Err(e) => return Ok(self.fail_to_start(&slot, &e).await),
        };
        {
            let mut s = slot.status();
            s.pid = pid;
            s.state = AgentState::Running;
        }
        tracing::info!(agent = %id, pid, generation, argv = ?slot.spec.argv, "agent started");
        let outcome = self
            .registry
            .update_agent(
                &id,
                &self.expect(&slot, &[AgentState::Pending]),
                &AgentUpdate {
                    state: Some(AgentState::Running),
                    pid: Some(pid),
                    started_at_ms: Some(now_ms()),
                    ..Default::default()
                },
            )
            .await;
        // The exit watcher starts only after the RUNNING write, so an agent that
        // exits at once can never have its exit overwritten by RUNNING.
        let sup = self.clone();
        let watched = slot.clone();
        self.tasks.spawn("agent exit watcher", async move {
            sup.watch_exit(watched, child).await;
        });
        let refused = match outcome {
            Ok(UpdateOutcome::Applied) => None,
            Ok(UpdateOutcome::Missing) => Some(SupervisorError::Fenced {
                id: id.clone(),
                detail: "its record was deleted before it started".into(),
            }),
            Ok(UpdateOutcome::Conflict {
                state,
                generation: g,
                host,
            }) => Some(SupervisorError::Fenced {
                id: id.clone(),
                detail: format!(
                    "its record says host {host}, generation {g}, state {}",
                    state.map_or("?", state::name)
                ),
            }),
            Err(e) => Some(SupervisorError::Registry(e)),
        };
        if let Some(err) = refused {
            // Nobody could find or control it: it must not run.
            tracing::warn!(agent = %id, error = %err, "killing an agent that could not be recorded");
            slot.status().requested = Some(Requested::Kill(Signal::SIGKILL as i32));
            let _ = signal::to_group(pid, Signal::SIGKILL);
            return Err(err);
        }
        if let Err(e) = self
            .registry
            .set_location(&id, &self.host_id, self.ttl)
            .await
        {
            // The next heartbeat writes it again.
            tracing::warn!(agent = %id, error = %e, "cannot write location yet");
        }
        Ok(slot.to_proto())
    }

    /// Records a start that failed (missing executable, bad cwd, …) as FAILED.
    async fn fail_to_start(&self, slot: &AgentSlot, e: &std::io::Error) -> LocalAgent {
        let error = spawn::describe_spawn_error(&slot.spec, e);
        tracing::info!(agent = %slot.id, %error, "agent failed to start");
        let exit = ExitStatus {
            reason: "SPAWN_FAILED".into(),
            error,
            finished_at: Some(timestamp_from_ms(now_ms())),
            ..Default::default()
        };
        self.write_end(slot, AgentState::Failed, &exit).await;
        slot.mark_ended(AgentState::Failed, exit);
        slot.to_proto()
    }

    /// Waits for the agent's main process, sweeps what is left of its process
    /// group, records the end, and wakes everyone waiting for it.
    async fn watch_exit(&self, slot: Arc<AgentSlot>, mut child: Child) {
        let waited = child.wait().await;
        let (pid, requested) = {
            let s = slot.status();
            (s.pid, s.requested)
        };
        self.reaper.watched().remove(&pid);
        // Whatever the leader left in its group dies with it: a supervised agent
        // is its whole process group (systemd's KillMode=control-group).
        let _ = signal::to_group(pid, Signal::SIGKILL);
        let (state, exit) = match waited {
            Ok(status) => (AgentState::Exited, exit_status(status, requested)),
            Err(e) => (
                AgentState::Failed,
                ExitStatus {
                    reason: "HOST_ERROR".into(),
                    error: format!("waiting for pid {pid} failed: {e}"),
                    finished_at: Some(timestamp_from_ms(now_ms())),
                    ..Default::default()
                },
            ),
        };
        tracing::info!(agent = %slot.id, pid, code = ?exit.code, signal = ?exit.signal, reason = %exit.reason, "agent ended");
        self.write_end(&slot, state, &exit).await;
        if let Err(e) = self.registry.clear_location(&slot.id).await {
            tracing::warn!(agent = %slot.id, error = %e, "cannot clear location; it expires with the TTL");
        }
        slot.mark_ended(state, exit);
    }

    /// Writes the end of an agent into its record, retrying for a bounded time
    /// while Redis fails.
    async fn write_end(&self, slot: &AgentSlot, state: AgentState, exit: &ExitStatus) {
        let update = AgentUpdate {
            state: Some(state),
            pid: Some(0),
            exit: Some(exit.clone()),
            ..Default::default()
        };
        let expect = self.expect(slot, &LIVE_STATES);
        let deadline = tokio::time::Instant::now() + EXIT_WRITE_RETRY;
        let mut delay = Duration::from_millis(100);
        loop {
            match self.registry.update_agent(&slot.id, &expect, &update).await {
                Ok(UpdateOutcome::Applied) => return,
                Ok(other) => {
                    tracing::debug!(agent = %slot.id, ?other, "end not recorded: the record moved on");
                    return;
                }
                Err(e) if tokio::time::Instant::now() + delay < deadline => {
                    tracing::warn!(agent = %slot.id, error = %e, "cannot record the end yet; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(e) => {
                    tracing::error!(agent = %slot.id, error = %e, "giving up recording the end of the agent");
                    return;
                }
            }
        }
    }

    fn expect(&self, slot: &AgentSlot, states: &[AgentState]) -> Expect {
        Expect {
            generation: Some(slot.generation),
            host: Some(self.host_id.clone()),
            states: states.to_vec(),
        }
    }

    /// Writes a state change made by a control operation.
    async fn write_state(
        &self,
        slot: &AgentSlot,
        to: AgentState,
        from: &[AgentState],
    ) -> Result<()> {
        let update = AgentUpdate {
            state: Some(to),
            ..Default::default()
        };
        match self
            .registry
            .update_agent(&slot.id, &self.expect(slot, from), &update)
            .await?
        {
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
            // Only the state differs: the exit watcher recorded the end first.
            UpdateOutcome::Conflict { .. } => Ok(()),
        }
    }

    fn illegal(slot: &AgentSlot, detail: String) -> SupervisorError {
        SupervisorError::IllegalTransition {
            id: slot.id.clone(),
            detail,
        }
    }

    /// SIGSTOP (`pause = true`) or SIGCONT the agent's whole process group.
    pub async fn pause_or_resume(&self, id: &str, pause: bool) -> Result<LocalAgent> {
        let slot = self.get(id)?;
        let _ops = slot.ops.lock().await;
        let s = slot.snapshot();
        let (op, sig, to, undo) = if pause {
            (
                Op::Pause,
                Signal::SIGSTOP,
                AgentState::Paused,
                Signal::SIGCONT,
            )
        } else {
            (
                Op::Resume,
                Signal::SIGCONT,
                AgentState::Running,
                Signal::SIGSTOP,
            )
        };
        state::check(op, s.state).map_err(|d| Self::illegal(&slot, d))?;
        if signal::to_group(s.pid, sig)? == Delivery::Gone {
            return Err(Self::illegal(
                &slot,
                "its process has already exited".into(),
            ));
        }
        slot.status().state = to;
        if let Err(e) = self.write_state(&slot, to, &[s.state]).await {
            // Unrecorded means undone: the record and the process must agree.
            let _ = signal::to_group(s.pid, undo);
            slot.status().state = s.state;
            return Err(e);
        }
        tracing::info!(agent = %id, state = state::name(to), "agent {}", if pause { "paused" } else { "resumed" });
        Ok(slot.to_proto())
    }

    /// SIGTERM the group (and SIGCONT it if paused, so it can act on the
    /// SIGTERM), wait `grace`, then SIGKILL and wait [`KILL_WAIT`]. A loop over
    /// the escalation steps, never recursion; returns once the agent ended.
    pub async fn stop(&self, id: &str, grace: Option<Duration>) -> Result<LocalAgent> {
        let slot = self.get(id)?;
        let _ops = slot.ops.lock().await;
        let s = slot.snapshot();
        state::check(Op::Stop, s.state).map_err(|d| Self::illegal(&slot, d))?;
        let grace = grace
            .or_else(|| {
                slot.spec
                    .stop_grace
                    .as_ref()
                    .map(agentplane::time::duration_from_proto)
            })
            .unwrap_or(DEFAULT_GRACE);
        {
            let mut st = slot.status();
            st.requested = Some(Requested::Stop);
            st.state = AgentState::Stopping;
        }
        if let Err(e) = self
            .write_state(
                &slot,
                AgentState::Stopping,
                &[AgentState::Running, AgentState::Paused],
            )
            .await
        {
            // The stop goes on: a process that was asked to stop must stop.
            tracing::warn!(agent = %id, error = %e, "cannot record STOPPING");
        }
        let steps = [(Signal::SIGTERM, grace), (Signal::SIGKILL, KILL_WAIT)];
        for (sig, wait) in steps {
            signal::to_group(s.pid, sig)?;
            if sig == Signal::SIGTERM && s.state == AgentState::Paused {
                signal::to_group(s.pid, Signal::SIGCONT)?;
            }
            if slot.wait_ended(wait).await {
                tracing::info!(agent = %id, signal = %sig, "agent stopped");
                return Ok(slot.to_proto());
            }
            tracing::info!(agent = %id, pid = s.pid, signal = %sig, ?wait, "agent still alive after signal; escalating");
        }
        Err(SupervisorError::Timeout {
            operation: "stop",
            id: id.to_owned(),
            pid: s.pid,
            timeout: grace + KILL_WAIT,
        })
    }

    /// Sends `signal` to the agent's process group. SIGKILL waits (bounded) for
    /// the end so the answer shows it.
    pub async fn signal(&self, id: &str, signal: i32) -> Result<LocalAgent> {
        let sig = Signal::try_from(signal).map_err(|_| {
            ValidationError::new("signal", format!("{signal} is not a signal number"))
        })?;
        if matches!(sig, Signal::SIGSTOP | Signal::SIGCONT | Signal::SIGTSTP) {
            return Err(ValidationError::new(
                "signal",
                format!("{sig} would change the agent's state behind its record: use pause/resume"),
            )
            .into());
        }
        let slot = self.get(id)?;
        let _ops = slot.ops.lock().await;
        let s = slot.snapshot();
        state::check(Op::Kill, s.state).map_err(|d| Self::illegal(&slot, d))?;
        slot.status().requested = Some(Requested::Kill(signal));
        if signal::to_group(s.pid, sig)? == Delivery::Gone {
            return Err(Self::illegal(
                &slot,
                "its process has already exited".into(),
            ));
        }
        tracing::info!(agent = %id, signal = %sig, "signal sent");
        if sig == Signal::SIGKILL && !slot.wait_ended(KILL_WAIT).await {
            return Err(SupervisorError::Timeout {
                operation: "kill",
                id: id.to_owned(),
                pid: s.pid,
                timeout: KILL_WAIT,
            });
        }
        Ok(slot.to_proto())
    }

    /// One agent as this host sees it.
    pub fn inspect(&self, id: &str) -> Result<LocalAgent> {
        Ok(self.get(id)?.to_proto())
    }

    /// Every agent this host knows.
    pub fn list(&self) -> Vec<LocalAgent> {
        self.map().values().map(|s| s.to_proto()).collect()
    }

    /// Forgets an ended agent.
    pub fn forget(&self, id: &str) -> Result<()> {
        let mut map = self.map();
        match map.get(id) {
            None => Ok(()),
            Some(s) if s.is_active() => Err(SupervisorError::IllegalTransition {
                id: id.to_owned(),
                detail: "it is still running".into(),
            }),
            Some(_) => {
                map.remove(id);
                Ok(())
            }
        }
    }

    /// Stops every agent (each with its own grace, capped at `limit`), in
    /// parallel; used at shutdown.
    pub async fn stop_all(self: &Arc<Self>, limit: Duration) {
        let ids = self.active_ids();
        if ids.is_empty() {
            return;
        }
        tracing::info!(agents = ids.len(), "stopping every agent");
        let mut set = tokio::task::JoinSet::new();
        for id in ids {
            let sup = self.clone();
            set.spawn(async move {
                let grace = sup.get(&id).ok().and_then(|s| {
                    s.spec
                        .stop_grace
                        .as_ref()
                        .map(agentplane::time::duration_from_proto)
                });
                let grace = grace.unwrap_or(DEFAULT_GRACE).min(limit);
                if let Err(e) = sup.stop(&id, Some(grace)).await {
                    tracing::debug!(agent = %id, error = %e, "stop at shutdown");
                }
            });
        }
        let _ = tokio::time::timeout(limit + KILL_WAIT, async {
            while set.join_next().await.is_some() {}
        })
        .await;
    }
}

/// Drops the ended agents that finished longest ago, keeping at most `cap` entries.
fn evict_ended(map: &mut HashMap<String, Arc<AgentSlot>>, cap: usize) {
    if map.len() <= cap {
        return;
    }
    let mut ended: Vec<(i64, String)> = map
        .values()
        .filter(|s| !s.is_active())
        .map(|s| {
            let at = s
                .snapshot()
                .exit
                .and_then(|e| e.finished_at)
                .map_or(0, |t| agentplane::time::ms_from_timestamp(&t));
            (at, s.id.clone())
        })
        .collect();
    ended.sort();
    for (_, id) in ended.into_iter().take(map.len() - cap) {
        map.remove(&id);
    }
}

/// The exit status of an ended process, with the reason a user reads.
fn exit_status(status: std::process::ExitStatus, requested: Option<Requested>) -> ExitStatus {
    let signal = status.signal();
    let reason = match (requested, signal) {
        (Some(Requested::Stop), _) => "STOPPED",
        (Some(Requested::Kill(k)), Some(s)) if k == s => "KILLED",
        (_, Some(_)) => "SIGNALED",
        (_, None) => "COMPLETED",
    };
    ExitStatus {
        code: status.code(),
        signal,
        reason: reason.into(),
        error: String::new(),
        finished_at: Some(timestamp_from_ms(now_ms())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_reasons() {
        let code3 = std::process::ExitStatus::from_raw(3 << 8);
        let e = exit_status(code3, None);
        assert_eq!(
            (e.code, e.signal, e.reason.as_str()),
            (Some(3), None, "COMPLETED")
        );
        let killed = std::process::ExitStatus::from_raw(9);
        assert_eq!(
            exit_status(killed, Some(Requested::Kill(9))).reason,
            "KILLED"
        );
        assert_eq!(exit_status(killed, None).reason, "SIGNALED");
        assert_eq!(exit_status(killed, Some(Requested::Stop)).reason, "STOPPED");
    }
}
