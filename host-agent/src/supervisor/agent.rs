//! One supervised agent: its identity, its observed status, a lock that
//! serializes control operations, a wake-up for its run loop, and a watch that
//! fires once it has ended for good.

use std::sync::{Mutex, MutexGuard};

use agentplane::proto::v1::{AgentSpec, AgentState, ExitStatus, LocalAgent};
use tokio::net::unix::pipe;
use tokio::sync::{watch, Notify};

use super::output::OutputLog;

/// What a user (or the spec's timeout) asked for; it explains the exit and
/// forbids a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requested {
    /// A stop (SIGTERM → grace → SIGKILL).
    Stop,
    /// The spec's `timeout` passed; stopped like a stop.
    Timeout,
    /// The agent was idle past its `idle_timeout`; stopped like a stop.
    Idle,
    /// A kill with this signal (does not forbid a restart: it is only a signal).
    Kill(i32),
    /// The lease could not be renewed for `spec.stop_after_disconnect`.
    Disconnected,
}

impl Requested {
    /// True for the requests after which the agent must not run again.
    pub fn ends_agent(self) -> bool {
        matches!(
            self,
            Requested::Stop | Requested::Timeout | Requested::Idle | Requested::Disconnected
        )
    }
}

/// The mutable part, behind a short-held lock.
#[derive(Debug, Clone)]
pub struct Status {
    /// Observed state.
    pub state: AgentState,
    /// Main pid (= pgid) of the current run; 0 between runs.
    pub pid: i32,
    /// Set once it ended for good.
    pub exit: Option<ExitStatus>,
    /// What was asked of the current run, if anything.
    pub requested: Option<Requested>,
    /// Restarts so far.
    pub restarts: u32,
    /// How the previous run ended.
    pub last_exit: Option<ExitStatus>,
    /// When the current (or last) run started, ms since the epoch; 0 before.
    pub started_at_ms: i64,
    /// While a restart waits out its backoff: when it is due, ms since the epoch.
    pub next_restart_at_ms: Option<i64>,
}

impl Status {
    /// Moves to `to` if the state machine ([`agentplane::state::may_move`])
    /// allows it from the current state. An illegal move changes nothing and
    /// is logged: it is a bug, and the state the host reports stays one the
    /// record can hold.
    pub fn move_to(&mut self, id: &str, to: AgentState) -> bool {
        if agentplane::state::may_move(self.state, to) {
            self.state = to;
            true
        } else {
            tracing::error!(agent = %id, from = ?self.state, to = ?to, "illegal state move refused");
            false
        }
    }
}

/// One agent on this host.
#[derive(Debug)]
pub struct AgentSlot {
    /// Agent id.
    pub id: String,
    /// Generation it was started with.
    pub generation: u64,
    /// Its spec.
    pub spec: AgentSpec,
    /// Names this slot's runs in the keeper, and its directory under the
    /// data dir's `agents/`.
    pub tag: String,
    /// When this host took it, ms since the epoch.
    pub created_at_ms: i64,
    /// Held for the whole of a control operation: pause/resume/stop/kill on one
    /// agent never interleave.
    pub ops: tokio::sync::Mutex<()>,
    /// Wakes the run loop out of a restart backoff (a stop arrived).
    pub wake: Notify,
    /// Held across each registry write of this agent, so a write retried
    /// after an outage never lands after a newer one.
    pub writes: tokio::sync::Mutex<()>,
    /// Its output on disk.
    pub output: OutputLog,
    /// The current run's standard input (taken out while a write is under way).
    pub stdin: std::sync::Mutex<Option<pipe::Sender>>,
    /// The current run's terminal (tty agents).
    pub pty:
        std::sync::Mutex<Option<std::sync::Arc<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>>>>,
    /// True while the agent counts as idle.
    pub idle: std::sync::atomic::AtomicBool,
    /// Attach sessions holding a session-bound agent; a watch so the session
    /// watcher wakes on every change.
    pub sessions: watch::Sender<usize>,
    status: Mutex<Status>,
    ended: watch::Sender<bool>,
    /// Its runs' cgroup (one for all its restarts); `None` without cgroups.
    pub cgroup: Option<crate::cgroup::RunCgroup>,
    /// The OOM kills its cgroup had counted at the last end handled (or
    /// at adoption): a run that ends by SIGKILL with more was OOM-killed.
    pub oom_kills_seen: std::sync::atomic::AtomicU64,
    /// Set when the record refused this slot's run (fenced): its end is not
    /// written, as the record belongs to another step now.
    disowned: std::sync::atomic::AtomicBool,
}

impl AgentSlot {
    /// A slot with no process yet, writing its output to `output`.
    pub fn new(
        id: String,
        generation: u64,
        spec: AgentSpec,
        tag: String,
        output: OutputLog,
    ) -> Self {
        Self {
            tag,
            output,
            stdin: std::sync::Mutex::new(None),
            pty: std::sync::Mutex::new(None),
            idle: std::sync::atomic::AtomicBool::new(false),
            sessions: watch::channel(0).0,
            id,
            generation,
            spec,
            created_at_ms: agentplane::time::now_ms(),
            ops: tokio::sync::Mutex::new(()),
            wake: Notify::new(),
            writes: tokio::sync::Mutex::new(()),
            status: Mutex::new(Status {
                state: AgentState::Pending,
                pid: 0,
                exit: None,
                requested: None,
                restarts: 0,
                last_exit: None,
                started_at_ms: 0,
                next_restart_at_ms: None,
            }),
            ended: watch::channel(false).0,
            cgroup: None,
            oom_kills_seen: std::sync::atomic::AtomicU64::new(0),
            disowned: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The same slot, its runs in `cgroup`.
    pub fn in_cgroup(mut self, cgroup: Option<crate::cgroup::RunCgroup>) -> Self {
        self.cgroup = cgroup;
        self
    }

    /// The same slot, taken by this host at `ms` (an adopted agent keeps
    /// the time the earlier host agent took it).
    pub fn taken_at(mut self, ms: i64) -> Self {
        self.created_at_ms = ms;
        self
    }

    /// The status lock; poisoning is ignored because every write is a plain
    /// field store that cannot leave it half-done.
    pub fn status(&self) -> MutexGuard<'_, Status> {
        self.status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A copy of the status.
    pub fn snapshot(&self) -> Status {
        self.status().clone()
    }

    /// True until it has ended for good.
    pub fn is_active(&self) -> bool {
        !agentplane::state::is_terminal(self.status().state)
    }

    /// Moves from `from` to `to` only if the state is still `from`: a control
    /// operation never overwrites an end the run loop recorded meanwhile.
    pub fn transition(&self, from: AgentState, to: AgentState) -> bool {
        let mut s = self.status();
        s.state == from && s.move_to(&self.id, to)
    }

    /// The record refused this slot's run: nothing it observes is written.
    pub fn disown(&self) {
        self.disowned
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// See [`AgentSlot::disown`].
    pub fn is_disowned(&self) -> bool {
        self.disowned.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records the end and wakes every waiter.
    pub fn mark_ended(&self, state: AgentState, exit: ExitStatus) {
        {
            let mut s = self.status();
            // A second end (a stop racing the run loop) keeps the first.
            if s.move_to(&self.id, state) {
                s.pid = 0;
                s.exit = Some(exit);
            }
        }
        self.ended.send_replace(true);
    }

    /// A receiver that changes to true when the agent has ended for good.
    pub fn ended_receiver(&self) -> watch::Receiver<bool> {
        self.ended.subscribe()
    }

    /// Waits until the agent ended, at most `limit`; true if it did.
    pub async fn wait_ended(&self, limit: std::time::Duration) -> bool {
        let mut rx = self.ended.subscribe();
        let ended = tokio::time::timeout(limit, rx.wait_for(|ended| *ended))
            .await
            .is_ok_and(|r| r.is_ok());
        ended
    }

    /// The API form.
    pub fn to_proto(&self) -> LocalAgent {
        let s = self.snapshot();
        LocalAgent {
            id: self.id.clone(),
            generation: self.generation,
            state: s.state as i32,
            pid: s.pid,
            exit: s.exit,
            restarts: s.restarts,
            recorded: None,
            usage: None,
        }
    }
}
