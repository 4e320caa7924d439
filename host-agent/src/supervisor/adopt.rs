//! A host agent's restart without its agents noticing: adopting the runs an
//! earlier host agent left in the keeper (their state file, output log,
//! descriptors and pending exit), and, at exit, leaving this one's runs to
//! the keeper with their output flushed.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use agentplane::proto::v1::AgentState;
use nix::sys::signal::Signal;

use super::agent::AgentSlot;
use super::{idle, log_sizes, output, persist, signal, tree, Supervisor};
use crate::keeper::KeptRun;

impl Supervisor {
    /// Adopts every run in `kept` whose state file and output log can be
    /// read; the others are killed (their exits acknowledged). Then removes
    /// the run directories nobody runs in any more. Call before the first
    /// heartbeat: adopted agents are this host's, so the earlier host
    /// agent's records of them are not settled as lost, and each record is
    /// rewritten with this incarnation once Redis answers. Returns how many
    /// were adopted.
    pub fn adopt(self: &Arc<Self>, kept: Vec<KeptRun>) -> usize {
        let mut adopted = 0;
        let mut keep: HashSet<String> = HashSet::new();
        for k in kept {
            let tag = k.tag.clone();
            match self.adopt_one(k) {
                Ok(()) => {
                    adopted += 1;
                    keep.insert(tag);
                }
                Err((k, why)) => {
                    tracing::warn!(tag = %k.tag, pid = k.run.pid, reason = %why, "ending a run an earlier host agent left: it cannot be adopted");
                    let _ = signal::to_group(k.run.pid, Signal::SIGKILL);
                    let keeper = self.keeper.clone();
                    self.tasks.spawn("unadopted run end", async move {
                        if k.run.exit.await.is_ok() {
                            let _ = keeper.ack(k.run.pid).await;
                        }
                    });
                }
            }
        }
        self.remove_dirs_except(&keep);
        let killed = self.cgroups.sweep_except(&keep);
        if killed > 0 {
            tracing::warn!(
                processes = killed,
                "killed what was left in the cgroups of runs that ended without a host agent"
            );
        }
        if adopted > 0 {
            tracing::info!(
                agents = adopted,
                "adopted the agents an earlier host agent left running"
            );
        }
        adopted
    }

    fn adopt_one(self: &Arc<Self>, k: KeptRun) -> Result<(), (KeptRun, String)> {
        let dir = self.agent_dir(&k.tag);
        let p = match persist::read(&dir) {
            Ok(p) => p,
            Err(e) => return Err((k, format!("its state file: {e}"))),
        };
        let Some(spec) = p.spec else {
            return Err((k, "its state file has no spec".into()));
        };
        let (cap, _) = log_sizes(&spec);
        let log = match output::OutputLog::open(&p.id, &dir, cap, self.log_writers.clone()) {
            Ok(l) => l,
            Err(e) => return Err((k, format!("its output log: {e}"))),
        };
        let resources = match agentplane::cgroups::Resources::from_proto(spec.resources.as_ref()) {
            Ok(r) => r,
            Err(e) => return Err((k, format!("its spec's resources: {e}"))),
        };
        // Only one it was started in (an earlier host agent may have had
        // other --cgroups): an empty membership would hide its processes.
        let cgroup = self
            .cgroups
            .run(&k.tag, &resources)
            .filter(|c| c.dir().is_dir());
        // OOM kills counted before this host agent are not this run's to
        // report (one while no host agent was attached is missed).
        let seen = cgroup.as_ref().map_or(0, |c| c.oom_kills());
        let slot = Arc::new(
            AgentSlot::new(p.id.clone(), p.generation, spec, k.tag.clone(), log)
                .taken_at(p.created_at_ms)
                .in_cgroup(cgroup),
        );
        slot.oom_kills_seen
            .store(seen, std::sync::atomic::Ordering::Relaxed);
        let pid = k.run.pid;
        // Ended, with a restart waiting out its backoff: PENDING until the
        // deadline the earlier host agent set.
        let resume = p
            .next_restart_at_ms
            .filter(|_| k.ended)
            .map(|due_ms| super::run::Backoff {
                due_ms,
                consecutive: p.consecutive,
            });
        {
            let mut st = slot.status();
            st.restarts = p.restarts;
            st.next_restart_at_ms = resume.map(|b| b.due_ms);
            if resume.is_none() {
                st.pid = pid;
                st.started_at_ms = k.run.started_at_ms;
                st.move_to(&slot.id, AgentState::Running);
                // A paused agent is a frozen cgroup, or a stopped group
                // (pause answers only once every process shows `T`): it
                // stays PAUSED.
                let frozen = slot.cgroup.as_ref().is_some_and(|c| c.is_frozen());
                if frozen || tree::is_stopped(pid) {
                    st.move_to(&slot.id, AgentState::Paused);
                }
            }
        }
        {
            let mut map = self.map();
            if map.get(&slot.id).is_some_and(|s| s.is_active()) {
                drop(map);
                return Err((k, "another run of the same agent was adopted".into()));
            }
            map.insert(slot.id.clone(), slot.clone());
        }
        self.mains().insert(pid);
        if let Err(e) = self.capture(&slot, k.run.fds, k.run.tty) {
            // Not captured means not supervisable: it must not run. Its
            // exit comes to the run loop, which records it.
            tracing::warn!(agent = %slot.id, pid, error = %e, "killing an adopted agent whose output cannot be read");
            slot.status().requested = Some(super::agent::Requested::Stop);
            let _ = signal::to_group(pid, Signal::SIGKILL);
        }
        // Its record still carries the earlier incarnation: rewritten with
        // this one as soon as a heartbeat succeeds.
        self.keep_unrecorded_quietly(&slot);
        // Announced idle by the earlier host agent (record flag and
        // AGENT_IDLE): this one goes on from idle and does not announce it
        // again. One that went silent while no host agent was attached is
        // announced by this one's watcher.
        if resume.is_none() && idle::announced(&self.agent_dir(&slot.tag)) {
            slot.idle.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        self.watch_idle(&slot);
        self.watch_sessions(&slot);
        let sup = self.clone();
        let exit = k.run.exit;
        self.tasks.spawn("agent run loop", async move {
            sup.run_loop(slot, exit, pid, resume).await;
        });
        Ok(())
    }

    /// Removes every run directory under `agents/` except `keep`'s: the
    /// output of runs that ended with an earlier host agent.
    fn remove_dirs_except(&self, keep: &HashSet<String>) {
        let Ok(entries) = std::fs::read_dir(self.data_dir.join("agents")) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !keep.contains(&name) {
                if let Err(err) = std::fs::remove_dir_all(e.path()) {
                    tracing::warn!(dir = %e.path().display(), error = %err, "cannot remove an earlier run's directory");
                }
            }
        }
    }

    /// From now on nothing that ends is recorded or restarted here: call
    /// before shutdown cancels anything, so that no agent is stopped or
    /// recorded as stopped by it.
    pub fn detach(&self) {
        self.detach.cancel();
    }

    /// Leaves every agent running to the keeper: run loops and captures let
    /// go (at most `limit`), each after the turn it is in, so that nothing
    /// moves from a pipe once this returns. (A host agent killed mid-turn
    /// loses nothing either: the bytes leave a pipe only into a file.)
    pub async fn detach_all(&self, limit: Duration) {
        self.detach();
        let slots: Vec<Arc<AgentSlot>> = self.map().values().cloned().collect();
        let all = async {
            for s in &slots {
                // Each capture finishes its turn, then lets go.
                let mut changed = s.output.subscribe();
                while s.output.has_writers() {
                    if changed.changed().await.is_err() {
                        break;
                    }
                }
            }
        };
        if tokio::time::timeout(limit, all).await.is_err() {
            tracing::warn!(
                ?limit,
                "agents' output captures still busy at exit; the next host agent reads on from their pipes"
            );
        }
        tracing::info!(
            agents = slots.iter().filter(|s| s.is_active()).count(),
            "leaving the agents running to the keeper"
        );
    }
}
