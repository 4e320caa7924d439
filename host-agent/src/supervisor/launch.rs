//! Starting one run of an agent through the keeper, and what the
//! supervisor keeps about runs: the set of main processes, each run
//! directory's state file, and where an agent's escaped processes are.

use std::collections::HashSet;
use std::sync::Arc;

use agentplane::proto::v1::AgentState;
use nix::sys::signal::Signal;
use tokio::sync::oneshot;

use super::agent::{AgentSlot, Requested};
use super::tree::{self, Scope};
use super::{output, persist, signal, spawn, Supervisor};
use crate::keeper::KeeperError;

/// Runs a start's file-system work (its run directory, output log, state
/// file and cgroups) on the blocking pool: a busy disk stalls a directory or
/// file creation for tens of milliseconds now and then, and on a runtime
/// worker thread that stall would hold up every request the thread serves,
/// not only this start.
pub(super) async fn off_runtime<T: Send + 'static>(
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|e| {
        if e.is_panic() {
            std::panic::resume_unwind(e.into_panic());
        }
        Err(std::io::Error::other("the host agent is shutting down"))
    })
}

/// What a first start makes on disk and in cgroupfs, in one trip to the
/// blocking pool ([`StartFiles::make`]).
pub(super) struct StartFiles {
    pub(super) id: String,
    /// The run directory.
    pub(super) dir: std::path::PathBuf,
    /// The output log's cap.
    pub(super) cap: u64,
    pub(super) writers: output::LogWriters,
    pub(super) cgroup: Option<crate::cgroup::RunCgroup>,
    /// The state file's content.
    pub(super) persisted: persist::Persisted,
}

/// Writes run directory `dir`'s state file. A failure is logged: the agent
/// runs, but a later host agent will not adopt it.
fn write_state(dir: &std::path::Path, p: &persist::Persisted) {
    if let Err(e) = persist::write(dir, p) {
        tracing::warn!(agent = %p.id, error = %e, "cannot write the agent's state file; a restarted host agent will not adopt it");
    }
}

impl StartFiles {
    /// Creates the output log (an error fails the start), writes the state
    /// file (a failure is logged: the agent runs, but a later host agent
    /// will not adopt it) and makes the cgroups (a failure is the start's
    /// failure, recorded as the agent's once it is admitted).
    pub(super) fn make(self) -> std::io::Result<(output::OutputLog, std::io::Result<()>)> {
        let log = output::OutputLog::create(&self.id, &self.dir, self.cap, self.writers)?;
        write_state(&self.dir, &self.persisted);
        let cgroup = match &self.cgroup {
            Some(cg) => cg.create().map_err(std::io::Error::other),
            None => Ok(()),
        };
        Ok((log, cgroup))
    }
}

impl Supervisor {
    /// Starts a run of the slot's program in the keeper: its pid and its
    /// exit to come. `Ok(None)`: a stop arrived first, nothing was started. A
    /// stop (or fence) that arrives while the keeper forks saw no pid: the
    /// run is killed here as soon as its pid is known, and its exit explains.
    pub(super) async fn spawn_run(
        &self,
        slot: &Arc<AgentSlot>,
        restart: bool,
    ) -> std::io::Result<Option<(i32, oneshot::Receiver<crate::keeper::Exit>)>> {
        if slot.status().requested.is_some_and(Requested::ends_agent) {
            return Ok(None);
        }
        let mut launch = spawn::launch_of(&slot.id, &slot.spec);
        if let Some(cg) = &slot.cgroup {
            if restart {
                // Made again (a first start's were made with its files):
                // kept if there (an empty cgroup is reused).
                let made = slot.clone();
                off_runtime(move || match &made.cgroup {
                    Some(cg) => cg.create().map_err(std::io::Error::other),
                    None => Ok(()),
                })
                .await?;
            }
            let by_thread = self.keeper.version >= crate::keeper::proto::TASKS_VERSION;
            launch.cgroup_procs = cg.join_files(by_thread);
        }
        let t = std::time::Instant::now();
        let span = tracing::info_span!("fork/exec", otel.name = "fork/exec", agent = %slot.id);
        let spawned =
            tracing::Instrument::instrument(self.keeper.spawn(&slot.tag, launch), span).await;
        self.metrics.starts.observe(&spawned, t.elapsed());
        let run = match spawned {
            Ok(run) => run,
            Err(KeeperError::Spawn(e)) => return Err(e),
            Err(e) => return Err(std::io::Error::other(e.to_string())),
        };
        let pid = run.pid;
        self.mains().insert(pid);
        let stopped = {
            let mut st = slot.status();
            st.pid = pid;
            st.started_at_ms = run.started_at_ms;
            st.next_restart_at_ms = None;
            st.move_to(&slot.id, AgentState::Running);
            let stopped = st.requested.is_some_and(Requested::ends_agent);
            if !stopped {
                st.requested = None;
            }
            if restart {
                st.restarts += 1;
                self.metrics.restarts.inc();
            }
            stopped
        };
        if restart {
            self.persist(slot, None);
        }
        if stopped {
            let _ = signal::to_group(pid, Signal::SIGKILL);
        }
        if let Err(e) = self.capture(slot, run.fds, run.tty) {
            // Not captured means not supervisable: it must not run.
            let _ = signal::to_group(pid, Signal::SIGKILL);
            return Err(e);
        }
        Ok(Some((pid, run.exit)))
    }

    /// Writes what a later host agent needs to adopt `slot`. A failure is
    /// logged: the agent runs, but a later host agent will end it.
    pub(super) fn persist(&self, slot: &AgentSlot, backoff: Option<super::run::Backoff>) {
        let p = persist::Persisted {
            id: slot.id.clone(),
            generation: slot.generation,
            spec: Some(slot.spec.clone()),
            created_at_ms: slot.created_at_ms,
            restarts: slot.snapshot().restarts,
            next_restart_at_ms: backoff.map(|b| b.due_ms),
            consecutive: backoff.map_or(0, |b| b.consecutive),
        };
        write_state(&self.agent_dir(&slot.tag), &p);
    }

    /// The directory of run tag `tag`.
    pub(super) fn agent_dir(&self, tag: &str) -> std::path::PathBuf {
        self.data_dir.join("agents").join(tag)
    }

    pub(super) fn mains(&self) -> std::sync::MutexGuard<'_, HashSet<i32>> {
        self.mains
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// SIGKILLs all of a run of the agent: its group `pgid`, then every
    /// member of its cgroup at once (frozen first, or `cgroup.kill`), or
    /// without one the processes that left the group ([`Self::escaped`]).
    pub(super) fn kill_all(&self, slot: &AgentSlot, root: i32, pgid: i32) {
        let _ = signal::to_group(pgid, Signal::SIGKILL);
        match &slot.cgroup {
            Some(cg) => cg.kill(),
            None => tree::signal_each(&self.escaped(slot, root, pgid), Signal::SIGKILL),
        }
    }

    /// The agent's live processes outside its group `pgid` (which a group
    /// signal reaches anyway): its cgroup's members when it has one (they
    /// are all of it, whatever they did); else the subtree of `root`, and
    /// the orphans re-parented to the keeper that carry its marker.
    pub(super) fn escaped(&self, slot: &AgentSlot, root: i32, pgid: i32) -> Vec<i32> {
        if let Some(cg) = &slot.cgroup {
            return tree::outside_group(cg.members(), pgid);
        }
        let mains = self.mains().clone();
        tree::escaped(
            &slot.id,
            root,
            pgid,
            Scope::Orphans {
                reaper: self.keeper.pid,
                mains: &mains,
            },
        )
    }
}
