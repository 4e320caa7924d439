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

    /// SIGSTOP (`pause = true`) or SIGCONT the agent's whole process group
    /// and the processes that left it. A pause answers once they have all
    /// stopped (or after [`PAUSE_WAIT`]).
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
        // Found afresh each time: pids taken earlier may have been reused.
        let escaped = || self.escaped(&slot.id, s.pid, s.pid);
        tree::signal_each(&escaped(), sig);
        if pause {
            // PAUSED means stopped: wait (bounded: a process in an
            // uninterruptible wait stops only when it leaves it) until every
            // process has acted on the SIGSTOP. With 200 busy processes on 2
            // cores, dozens were still running when the signal had been sent.
            // Each round also stops processes that escaped meanwhile.
            let deadline = tokio::time::Instant::now() + PAUSE_WAIT;
            let mut delay = Duration::from_millis(2);
            loop {
                let now = escaped();
                tree::signal_each(&now, Signal::SIGSTOP);
                if tree::not_stopped(s.pid, &now) == 0 || tokio::time::Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(20));
            }
        }
        if !slot.transition(s.state, to) {
            // The run loop recorded the end meanwhile; that is the truth.
            return Err(Self::illegal(
                &slot,
                "its process has already exited".into(),
            ));
        }
        if let Err(e) = self.write_state(&slot, to, &[s.state]).await {
            // Unrecorded means undone: the record and the process must agree.
            let _ = signal::to_group(s.pid, undo);
            tree::signal_each(&escaped(), undo);
            slot.transition(to, s.state);
            return Err(e);
        }
        tracing::info!(agent = %id, state = state::name(to), "agent {}", if pause { "paused" } else { "resumed" });
        Ok(slot.to_proto())
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
                signal::to_group(pid, sig)?;
                let escaped = self.escaped(&slot.id, pid, pid);
                tree::signal_each(&escaped, sig);
                if sig == Signal::SIGTERM && s.state == AgentState::Paused {
                    signal::to_group(pid, Signal::SIGCONT)?;
                    tree::signal_each(&escaped, Signal::SIGCONT);
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
        tracing::info!(agent = %id, signal = %sig, "signal sent");
        // With a restart policy the agent does not end, so there is nothing to wait for.
        if sig == Signal::SIGKILL && slot.spec.restart.is_none() {
            let _ = slot.wait_ended(KILL_WAIT).await;
        }
        Ok(slot.to_proto())
    }
}
