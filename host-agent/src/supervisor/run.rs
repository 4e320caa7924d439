//! The run loop of one agent: wait for its process (bounded by the spec's
//! timeout), sweep what it left behind, then restart it with backoff or record
//! its end. One task per agent; exits arrive as events from the child's wait.

use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentplane::proto::v1::{AgentState, ExitReason, ExitStatus};
use agentplane::time::{duration_from_proto, now_ms, timestamp_from_ms};
use nix::sys::signal::Signal;
use tokio::sync::oneshot;

use crate::keeper::Exit;

use super::agent::{AgentSlot, Requested};
use super::restart::{self, Decision};
use super::{signal, spawn_failure, Supervisor};

impl Supervisor {
    /// Supervises `slot` from its first run (`pid`, whose `exit` the
    /// keeper will send) to its end. Each exit is acknowledged to the keeper
    /// once it is recorded, so a host agent that dies before that finds it
    /// there.
    pub(super) async fn run_loop(
        self: Arc<Self>,
        slot: Arc<AgentSlot>,
        mut exit_rx: oneshot::Receiver<Exit>,
        mut pid: i32,
        mut resume: Option<Backoff>,
    ) {
        // An adopted backoff's restart is decided again below (with its
        // deadline kept): counted from one before it.
        let mut consecutive = resume.map_or(0, |b| b.consecutive.saturating_sub(1));
        loop {
            let started = Instant::now();
            let waited = self.wait_run(&slot, &mut exit_rx).await;
            let status = match waited {
                Waited::Exit(status) => status,
                Waited::KeeperGone => {
                    // Every agent died with the keeper (its guard): this
                    // host agent ends (lib.rs) and the records are settled
                    // as a lost host's (nothing here saw how the run ended).
                    tracing::error!(agent = %slot.id, pid, "the keeper is gone: the run's end is unknown");
                    return;
                }
                // Left running to the keeper; the next host agent adopts it.
                Waited::Detached => return,
            };
            self.sweep(&slot, pid);
            let requested = slot.status().requested;
            let mut exit = exit_status(status, requested);
            if let Some(cg) = &slot.cgroup {
                let now = cg.oom_kills();
                let before = slot
                    .oom_kills_seen
                    .swap(now, std::sync::atomic::Ordering::Relaxed);
                if now > before {
                    oom_killed(&mut exit, cg.limits().memory_bytes);
                }
            }
            tracing::info!(agent = %slot.id, pid, code = ?exit.code, signal = ?exit.signal, reason = %exit.reason, "agent process ended");
            self.metrics.exits.inc(exit.reason());
            let decision = restart::decide(
                slot.spec.restart.as_ref(),
                &exit,
                requested,
                consecutive,
                started.elapsed(),
                restart::jitter(),
            );
            let delay = match decision {
                Decision::Done => return self.end(&slot, AgentState::Exited, exit, pid).await,
                Decision::Exhausted => {
                    let error = format!(
                        "ended again after {consecutive} consecutive restarts (max_restarts); last run: {}",
                        describe(&exit)
                    );
                    let exit = ExitStatus {
                        reason: ExitReason::RestartsExhausted as i32,
                        error,
                        ..exit
                    };
                    return self.end(&slot, AgentState::Failed, exit, pid).await;
                }
                Decision::Restart {
                    delay,
                    consecutive: c,
                } => {
                    consecutive = c;
                    delay
                }
            };
            // An earlier host agent's backoff, adopted: its deadline holds.
            let due = match resume.take() {
                Some(b) => b.due_ms,
                None => now_ms() + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX),
            };
            let backoff = Backoff {
                due_ms: due,
                consecutive,
            };
            if !self.backoff(&slot, &exit, backoff).await {
                if self.detach.is_cancelled() {
                    // Left to the keeper, which keeps this exit: the next
                    // host agent applies the restart policy to it.
                    return;
                }
                let stopped = ExitStatus {
                    reason: ExitReason::Stopped as i32,
                    ..exit
                };
                return self.end(&slot, AgentState::Exited, stopped, pid).await;
            }
            self.ack(pid).await;
            match self.spawn_run(&slot, true).await {
                Ok(Some((p, rx))) => {
                    exit_rx = rx;
                    pid = p;
                    let restarts = slot.status().restarts;
                    tracing::info!(agent = %slot.id, pid, restarts, "agent restarted");
                    if !self.record_restart(&slot, pid).await {
                        // Fenced: this run must not go on, and its end is
                        // not this host's to write.
                        slot.disown();
                        slot.status().requested = Some(Requested::Stop);
                        let _ = signal::to_group(pid, Signal::SIGKILL);
                    }
                }
                Ok(None) => {
                    let stopped = ExitStatus {
                        reason: ExitReason::Stopped as i32,
                        ..exit
                    };
                    return self.finish(&slot, AgentState::Exited, stopped).await;
                }
                Err(e) => {
                    return self
                        .finish(&slot, AgentState::Failed, spawn_failure(&slot.spec, &e))
                        .await
                }
            }
        }
    }

    /// Waits for the run's process. When the spec's timeout (counted from
    /// the run's start, which an adopted run had before this host agent)
    /// passes first, a stop (reason TIMEOUT) starts as its own task — it
    /// waits for this loop to record the end — and the wait goes on.
    async fn wait_run(
        self: &Arc<Self>,
        slot: &AgentSlot,
        exit: &mut oneshot::Receiver<Exit>,
    ) -> Waited {
        let waited =
            |r: Result<Exit, _>| r.map_or(Waited::KeeperGone, |e| Waited::Exit(wait_status(e)));
        let detach = self.detach.clone();
        let Some(limit) = slot.spec.timeout.as_ref().map(duration_from_proto) else {
            return tokio::select! {
                r = &mut *exit => waited(r),
                () = detach.cancelled() => Waited::Detached,
            };
        };
        let ran = now_ms().saturating_sub(slot.snapshot().started_at_ms);
        let left = limit.saturating_sub(Duration::from_millis(u64::try_from(ran).unwrap_or(0)));
        tokio::select! {
            r = &mut *exit => waited(r),
            () = detach.cancelled() => Waited::Detached,
            () = tokio::time::sleep(left) => {
                tracing::info!(agent = %slot.id, ?limit, "agent ran past its timeout; stopping it");
                let sup = self.clone();
                let id = slot.id.clone();
                self.tasks.spawn("agent timeout stop", async move {
                    if let Err(e) = sup.stop_as(&id, None, Requested::Timeout).await {
                        tracing::warn!(agent = %id, error = %e, "timeout stop failed");
                    }
                });
                tokio::select! {
                    r = &mut *exit => waited(r),
                    () = detach.cancelled() => Waited::Detached,
                }
            }
        }
    }

    /// Records the end, then lets the keeper forget run `pid`.
    async fn end(&self, slot: &Arc<AgentSlot>, state: AgentState, exit: ExitStatus, pid: i32) {
        self.finish(slot, state, exit).await;
        self.ack(pid).await;
    }

    /// Lets the keeper forget run `pid`, whose exit is recorded.
    async fn ack(&self, pid: i32) {
        if let Err(e) = self.keeper.ack(pid).await {
            tracing::warn!(pid, error = %e, "cannot acknowledge an exit to the keeper");
        }
    }

    /// After the main process ended: whatever is left of its group, and any
    /// escaped process carrying its marker, dies with it (systemd's
    /// KillMode=control-group).
    fn sweep(&self, slot: &AgentSlot, pid: i32) {
        self.mains().remove(&pid);
        self.kill_all(slot, 0, pid);
    }

    /// Records PENDING with `next_restart_at` (and in the state file, for a
    /// host agent that adopts the run meanwhile), then waits until it is due
    /// unless a stop (or shutdown) comes first; false means: do not restart.
    async fn backoff(&self, slot: &Arc<AgentSlot>, exit: &ExitStatus, b: Backoff) -> bool {
        {
            let mut st = slot.status();
            if st.requested.is_some_and(Requested::ends_agent) {
                return false;
            }
            if !st.move_to(&slot.id, AgentState::Pending) {
                return false;
            }
            st.pid = 0;
            st.last_exit = Some(exit.clone());
            st.next_restart_at_ms = Some(b.due_ms);
        }
        self.persist(slot, Some(b));
        self.record_backoff(slot, exit, b.due_ms).await;
        let delay = Duration::from_millis(u64::try_from(b.due_ms - now_ms()).unwrap_or(0));
        tracing::info!(agent = %slot.id, ?delay, "restarting after backoff");
        let woken = tokio::select! {
            () = tokio::time::sleep(delay) => true,
            () = slot.wake.notified() => true,
            () = self.cancel.cancelled() => false,
        };
        let mut st = slot.status();
        let go = woken && !st.requested.is_some_and(Requested::ends_agent);
        if !go {
            st.next_restart_at_ms = None;
        }
        go
    }
}

/// A short description of an exit, for messages.
fn describe(e: &ExitStatus) -> String {
    match (e.code, e.signal) {
        (Some(c), _) => format!("exit code {c}"),
        (_, Some(s)) => format!("signal {s}"),
        _ => agentplane::state::reason_name(e.reason()).to_owned(),
    }
}

/// A restart waiting out its backoff.
#[derive(Debug, Clone, Copy)]
pub(super) struct Backoff {
    /// When it is due, ms since the epoch.
    pub(super) due_ms: i64,
    /// Consecutive restarts, this one included.
    pub(super) consecutive: u32,
}

/// How waiting for a run ended.
enum Waited {
    /// The process ended so.
    Exit(std::process::ExitStatus),
    /// The keeper is gone (and the process with it).
    KeeperGone,
    /// This host agent leaves its agents to the keeper.
    Detached,
}

/// The keeper's exit as a wait status.
fn wait_status(e: Exit) -> std::process::ExitStatus {
    match (e.code, e.signal) {
        (Some(code), _) => std::process::ExitStatus::from_raw((code & 0xff) << 8),
        (None, Some(sig)) => std::process::ExitStatus::from_raw(sig & 0x7f),
        // Neither: the keeper could not tell; a plain failure.
        (None, None) => std::process::ExitStatus::from_raw(1 << 8),
    }
}

/// A SIGKILL nobody here sent, in a run whose memory cgroup counted an
/// OOM kill meanwhile: OOM_KILLED.
fn oom_killed(exit: &mut ExitStatus, memory_limit: Option<u64>) {
    if exit.reason() == ExitReason::Signaled && exit.signal == Some(Signal::SIGKILL as i32) {
        exit.reason = ExitReason::OomKilled as i32;
        exit.error = format!(
            "killed by the kernel's OOM killer: past its memory limit of {} bytes",
            memory_limit.unwrap_or(0)
        );
    }
}

/// The exit status of an ended process, with the reason a user reads.
pub(super) fn exit_status(
    status: std::process::ExitStatus,
    requested: Option<Requested>,
) -> ExitStatus {
    let signal = status.signal();
    let reason = match (requested, signal) {
        (Some(Requested::Stop), _) => ExitReason::Stopped,
        (Some(Requested::Timeout), _) => ExitReason::Timeout,
        (Some(Requested::Idle), _) => ExitReason::Idle,
        (Some(Requested::Disconnected), _) => ExitReason::Disconnected,
        (Some(Requested::Kill(k)), Some(s)) if k == s => ExitReason::Killed,
        (_, Some(_)) => ExitReason::Signaled,
        (_, None) => ExitReason::Completed,
    };
    ExitStatus {
        code: status.code(),
        signal,
        reason: reason as i32,
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
            (e.code, e.signal, e.reason()),
            (Some(3), None, ExitReason::Completed)
        );
        let killed = std::process::ExitStatus::from_raw(9);
        assert_eq!(
            exit_status(killed, Some(Requested::Kill(9))).reason(),
            ExitReason::Killed
        );
        assert_eq!(exit_status(killed, None).reason(), ExitReason::Signaled);
        assert_eq!(
            exit_status(killed, Some(Requested::Stop)).reason(),
            ExitReason::Stopped
        );
        assert_eq!(
            exit_status(killed, Some(Requested::Timeout)).reason(),
            ExitReason::Timeout
        );
    }
}
