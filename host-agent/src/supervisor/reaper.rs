//! Zombie reaping. The host agent is a child subreaper, so an agent's
//! descendants that its main process abandons are re-parented to us rather
//! than to PID 1; this reaps them. Agent main processes are reaped by their
//! own exit watcher (tokio waits on their specific pid), so those pids are
//! tracked here and never touched.

use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Reaps orphans; knows which pids belong to an exit watcher.
#[derive(Debug, Default)]
pub struct Reaper {
    watched: Mutex<HashSet<i32>>,
}

impl Reaper {
    /// Makes this process a child subreaper. Failure is logged: orphans then go
    /// to PID 1, which is worse but not fatal.
    pub fn become_subreaper() {
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            tracing::warn!(error = %e, "cannot become a child subreaper; orphans go to PID 1");
        }
    }

    /// The set of watched pids. Hold it across a spawn until its pid is
    /// inserted, so the reaper never sees an unregistered child.
    pub fn watched(&self) -> MutexGuard<'_, HashSet<i32>> {
        self.watched
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reaps every zombie child that no exit watcher owns; returns how many.
    pub fn reap_orphans(&self) -> usize {
        let watched = self.watched();
        let mut reaped = 0;
        for pid in zombie_children() {
            if watched.contains(&pid) {
                continue;
            }
            if let Ok(status) = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
                tracing::debug!(pid, ?status, "reaped an orphaned agent descendant");
                reaped += 1;
            }
        }
        reaped
    }

    /// Reaps on every SIGCHLD, and every few seconds in case signals coalesced.
    pub async fn run(&self, cancel: CancellationToken) {
        let mut sigchld = match signal(SignalKind::child()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGCHLD; reaping on a timer only");
                None
            }
        };
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = tick.tick() => {}
                Some(()) = async { match sigchld.as_mut() { Some(s) => s.recv().await, None => None } } => {}
            }
            self.reap_orphans();
        }
    }
}

/// Pids of our children in state Z, from `/proc/self/task/*/children`.
fn zombie_children() -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        let Ok(children) = std::fs::read_to_string(task.path().join("children")) else {
            continue;
        };
        for pid in children
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            if process_state(pid) == Some('Z') {
                out.push(pid);
            }
        }
    }
    out
}

/// The state letter of `pid` from `/proc/PID/stat` (after the `(comm)` field).
pub fn process_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_state() {
        let me = i32::try_from(std::process::id()).unwrap();
        assert!(matches!(process_state(me), Some('R' | 'S')));
        assert_eq!(process_state(i32::MAX), None);
    }
}
