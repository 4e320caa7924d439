//! Control operations on one running agent: pause, resume, stop (TERM,
//! grace, KILL) and signals, each checked against the state machine and
//! recorded with a compare-and-set.

use std::time::Duration;

use agentplane::proto::v1::{AgentState, LocalAgent};
use agentplane::state::{self, Op};
use agentplane::time::duration_from_proto;
use agentplane::validate::ValidationError;
use nix::sys::signal::Signal;

use super::agent::{AgentSlot, Requested};
use super::error::SupervisorError;
use super::signal::{self, Delivery};
use super::tree;
use super::{Result, Supervisor, DEFAULT_GRACE, KILL_WAIT, PAUSE_WAIT};

impl Supervisor {
    fn illegal(slot: &AgentSlot, detail: String) -> SupervisorError {
        SupervisorError::IllegalTransition {
            id: slot.id.clone(),
            detail,
        }
    }

    /// Pauses (`pause = true`) or resumes the agent's every process: a
    /// freeze of its cgroup where the host has one (all at once, escaped
    /// processes included), else SIGSTOP/SIGCONT to its group and the
    /// processes that left it. A pause answers once they are all frozen or
    /// stopped (or after [`PAUSE_WAIT`]).
    pub async fn pause_or_resume(&self, id: &str, pause: bool) -> Result<LocalAgent> {
        let slot = self.get(id)?;
        let _ops = slot.ops.lock().await;
        let s = slot.snapshot();
        let (op, to) = if pause {
            (Op::Pause, AgentState::Paused)
        } else {
            (Op::Resume, AgentState::Running)
        };
        state::check(op, s.state).map_err(|d| Self::illegal(&slot, d))?;
        let gone = || Self::illegal(&slot, "its process has already exited".into());
        let frozen = self.freezer(&slot);
        if let Some(cg) = frozen {
            if signal::to_group(s.pid, Signal::SIGCONT)? == Delivery::Gone {
                return Err(gone());
            }
            match cg.freeze(pause, PAUSE_WAIT).await {
                Ok(()) => {}
                // As with SIGSTOP: a member in an uninterruptible wait
                // freezes when it leaves it; the freeze stays asked for.
                Err(e @ crate::cgroup::CgroupError::Freeze { .. }) => {
                    tracing::warn!(agent = %slot.id, error = %e, "paused, with a process not frozen yet");
                }
                Err(source) => {
                    let _ = cg.freeze(!pause, PAUSE_WAIT).await;
                    return Err(SupervisorError::Cgroup {
                        id: slot.id.clone(),
                        source,
                    });
                }
            }
        } else {
            self.stop_or_continue(&slot, s.pid, pause).await?;
        }
        if !slot.transition(s.state, to) {
            // The run loop recorded the end meanwhile; that is the truth.
            return Err(gone());
        }
        if let Err(e) = self.write_state(&slot, to, &[s.state]).await {
            // Unrecorded means undone: the record and the process must agree.
            match frozen {
                Some(cg) => {
                    let _ = cg.freeze(!pause, PAUSE_WAIT).await;
                }
                None => {
                    let undo = if pause {
                        Signal::SIGCONT
                    } else {
                        Signal::SIGSTOP
                    };
                    let _ = signal::to_group(s.pid, undo);
                    tree::signal_each(&self.escaped(&slot, s.pid, s.pid), undo);
                }
            }
            slot.transition(to, s.state);
            return Err(e);
        }
        tracing::info!(agent = %id, state = state::name(to), "agent {}", if pause { "paused" } else { "resumed" });
        Ok(slot.to_proto())
    }

    /// The agent's cgroup when pausing it is a freeze (v2 before Linux 5.2
    /// has none).
    fn freezer<'a>(&self, slot: &'a AgentSlot) -> Option<&'a crate::cgroup::RunCgroup> {
        slot.cgroup.as_ref().filter(|_| self.cgroups.caps().freeze)
    }

    /// Without a cgroup: SIGSTOP (`pause`) or SIGCONT the group `pid` and
    /// the processes that left it; a pause waits (bounded: a process in an
    /// uninterruptible wait stops only when it leaves it) until every one
    /// has acted on it. With 200 busy processes on 2 cores, dozens were
    /// still running when the signal had been sent. Each round also stops
    /// processes that escaped meanwhile.
    async fn stop_or_continue(&self, slot: &AgentSlot, pid: i32, pause: bool) -> Result<()> {
        let sig = if pause {
            Signal::SIGSTOP
        } else {
            Signal::SIGCONT
        };
        if signal::to_group(pid, sig)? == Delivery::Gone {
            return Err(Self::illegal(slot, "its process has already exited".into()));
        }
        // Found afresh each time: pids taken earlier may have been reused.
        tree::signal_each(&self.escaped(slot, pid, pid), sig);
        if !pause {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + PAUSE_WAIT;
        let mut delay = Duration::from_millis(2);
        loop {
            let now = self.escaped(slot, pid, pid);
            tree::signal_each(&now, Signal::SIGSTOP);
            if tree::not_stopped(pid, &now) == 0 || tokio::time::Instant::now() >= deadline {
                return Ok(());
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(20));
        }
    }

    /// Stops the agent (see [`Supervisor::stop_as`]).
    pub async fn stop(&self, id: &str, grace: Option<Duration>) -> Result<LocalAgent> {
        self.stop_as(id, grace, Requested::Stop).await
    }

    /// SIGTERM the group and the agent's escaped processes (SIGCONT too if it
    /// was paused, so it can act on the SIGTERM), wait `grace`, then SIGKILL
    /// and wait [`KILL_WAIT`]. A loop over the escalation steps, never
    /// recursion; returns once the agent has ended. Also cancels a pending
    /// restart.
    pub(super) async fn stop_as(
        &self,
        id: &str,
        grace: Option<Duration>,
        why: Requested,
    ) -> Result<LocalAgent> {
        let slot = self.get(id)?;
        let _ops = slot.ops.lock().await;
        let s = slot.snapshot();
        state::check(Op::Stop, s.state).map_err(|d| Self::illegal(&slot, d))?;
        let grace = grace
            .or_else(|| slot.spec.stop_grace.as_ref().map(duration_from_proto))
            .unwrap_or(DEFAULT_GRACE);
        let pid = {
            let mut st = slot.status();
            st.requested = Some(why);
            if matches!(st.state, AgentState::Running | AgentState::Paused) {
                st.move_to(&slot.id, AgentState::Stopping);
            }
            st.pid
        };
        slot.wake.notify_one();
        // A disconnect stop runs because Redis is unreachable: writing
        // STOPPING first would only delay the signals by a write timeout.
        if matches!(s.state, AgentState::Running | AgentState::Paused)
            && why != Requested::Disconnected
        {
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
        }
        if pid == 0 {
            // Between runs (restart backoff): the run loop ends it.
            if slot.wait_ended(KILL_WAIT).await {
                return Ok(slot.to_proto());
            }
        } else {
            let steps = [(Signal::SIGTERM, grace), (Signal::SIGKILL, KILL_WAIT)];
            for (sig, wait) in steps {
                if sig == Signal::SIGKILL {
                    self.kill_all(&slot, pid, pid);
                } else {
                    signal::to_group(pid, sig)?;
                    let escaped = self.escaped(&slot, pid, pid);
                    tree::signal_each(&escaped, sig);
                    if s.state == AgentState::Paused {
                        // Thawed or continued, so that it can act on the SIGTERM.
                        if let Some(cg) = self.freezer(&slot) {
                            let _ = cg.freeze(false, PAUSE_WAIT).await;
                        }
                        signal::to_group(pid, Signal::SIGCONT)?;
                        tree::signal_each(&escaped, Signal::SIGCONT);
                    }
                }
                if slot.wait_ended(wait).await {
                    tracing::info!(agent = %id, signal = %sig, reason = ?why, "agent stopped");
                    return Ok(slot.to_proto());
                }
                tracing::info!(agent = %id, pid, signal = %sig, ?wait, "agent still alive after signal; escalating");
            }
        }
        Err(SupervisorError::Timeout {
            operation: "stop",
            id: id.to_owned(),
            pid,
            timeout: grace + KILL_WAIT,
        })
    }

    /// Sends `signal` to the agent's process group. SIGKILL waits (bounded) for
    /// the end so the answer shows it. A kill is only a signal: the restart
    /// policy still applies to the exit it causes.
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
        if sig == Signal::SIGKILL && s.state == AgentState::Paused {
            // A frozen process acts on SIGKILL only once thawed.
            if let Some(cg) = self.freezer(&slot) {
                let _ = cg.freeze(false, PAUSE_WAIT).await;
            }
        }
        tracing::info!(agent = %id, signal = %sig, "signal sent");
        // With a restart policy the agent does not end, so there is nothing to wait for.
        if sig == Signal::SIGKILL && slot.spec.restart.is_none() {
            let _ = slot.wait_ended(KILL_WAIT).await;
        }
        Ok(slot.to_proto())
    }
}
