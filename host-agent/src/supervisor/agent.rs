//! One supervised agent: its identity, its observed status, a lock that
//! serializes control operations, and a watch that fires when it ends.

use std::sync::{Mutex, MutexGuard};

use agentplane::proto::v1::{AgentSpec, AgentState, ExitStatus, LocalAgent};
use tokio::sync::watch;

/// What a user asked for that will explain the exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requested {
    /// A stop (SIGTERM → grace → SIGKILL).
    Stop,
    /// A kill with this signal.
    Kill(i32),
}

/// The mutable part, behind a short-held lock.
#[derive(Debug, Clone)]
pub struct Status {
    /// Observed state.
    pub state: AgentState,
    /// Main pid (= pgid); 0 if it never started.
    pub pid: i32,
    /// Set once it ended.
    pub exit: Option<ExitStatus>,
    /// What a user asked for, if anything.
    pub requested: Option<Requested>,
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
    /// Held for the whole of a control operation: pause/resume/stop/kill on one
    /// agent never interleave.
    pub ops: tokio::sync::Mutex<()>,
    status: Mutex<Status>,
    ended: watch::Sender<bool>,
}

impl AgentSlot {
    /// A slot in `state` with `pid`.
    pub fn new(id: String, generation: u64, spec: AgentSpec, state: AgentState, pid: i32) -> Self {
        Self {
            id,
            generation,
            spec,
            ops: tokio::sync::Mutex::new(()),
            status: Mutex::new(Status {
                state,
                pid,
                exit: None,
                requested: None,
            }),
            ended: watch::channel(false).0,
        }
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

    /// True while its process may be alive.
    pub fn is_active(&self) -> bool {
        !agentplane::state::is_terminal(self.status().state)
    }

    /// Records the end and wakes every waiter.
    pub fn mark_ended(&self, state: AgentState, exit: ExitStatus) {
        {
            let mut s = self.status();
            s.state = state;
            s.exit = Some(exit);
        }
        self.ended.send_replace(true);
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
        }
    }
}
