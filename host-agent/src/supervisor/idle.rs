//! Idle detection from the time of an agent's last output: event-driven (a
//! timer per agent re-armed by output, never a poll of every agent); marks
//! the record idle once, clears it when output resumes, and stops the agent
//! after `idle_timeout` of idleness.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use agentplane::proto::v1::EventType;
use agentplane::registry::AgentUpdate;
use agentplane::time::{duration_from_proto, now_ms};

use super::agent::{AgentSlot, Requested};
use super::output::OutputLog;
use super::Supervisor;

impl Supervisor {
    /// Watches `slot` for silence when its spec asks (`idle_after`): marks it
    /// idle (record flag + AGENT_IDLE event) once, clears the flag when output
    /// resumes, and stops it after `idle_timeout` of idleness.
    pub(super) fn watch_idle(self: &Arc<Self>, slot: &Arc<AgentSlot>) {
        let Some(after) = slot.spec.idle_after.as_ref().map(duration_from_proto) else {
            return;
        };
        let stop_after = slot.spec.idle_timeout.as_ref().map(duration_from_proto);
        let sup = self.clone();
        let slot = slot.clone();
        self.tasks.spawn("idle watcher", async move {
            let mut changed = slot.output.subscribe();
            let mut ended = slot.ended_receiver();
            loop {
                let since = silence(&slot.output);
                let idle = slot.idle.load(Ordering::Relaxed);
                let wait = if idle {
                    match stop_after {
                        Some(t) if since >= after + t => {
                            tracing::info!(agent = %slot.id, idle_for = ?since, "agent idle past its idle_timeout; stopping it");
                            let _ = sup.stop_as(&slot.id, None, Requested::Idle).await;
                            return;
                        }
                        Some(t) => (after + t) - since,
                        None => Duration::from_secs(3600),
                    }
                } else if since >= after {
                    sup.set_idle(&slot, true).await;
                    continue;
                } else {
                    after - since
                };
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    r = changed.changed() => {
                        if r.is_err() { return; }
                        if slot.idle.load(Ordering::Relaxed) && silence(&slot.output) < after {
                            sup.set_idle(&slot, false).await;
                        }
                    }
                    _ = ended.changed() => return,
                    // Left to the keeper: the next host agent watches.
                    () = sup.detach.cancelled() => return,
                }
                if !slot.is_active() {
                    return;
                }
            }
        });
    }

    async fn set_idle(&self, slot: &AgentSlot, idle: bool) {
        slot.idle.store(idle, Ordering::Relaxed);
        let update = AgentUpdate {
            idle: Some(idle),
            ..Default::default()
        };
        let expect = self.expect(slot, &agentplane::state::LIVE);
        if let Err(e) = self.registry.update_agent(&slot.id, &expect, &update).await {
            tracing::warn!(agent = %slot.id, error = %e, "cannot record idleness");
        }
        let marker = self.agent_dir(&slot.tag).join(IDLE_FILE);
        if idle {
            tracing::info!(agent = %slot.id, "agent idle");
            if let Err(e) = self
                .registry
                .emit_agent_event(
                    EventType::AgentIdle,
                    &slot.id,
                    &self.host_id,
                    slot.generation,
                )
                .await
            {
                tracing::warn!(agent = %slot.id, error = %e, "cannot append AGENT_IDLE");
            }
            // After the event: a host agent killed in between announces it
            // again rather than never.
            if let Err(e) = std::fs::write(&marker, b"") {
                tracing::warn!(agent = %slot.id, error = %e, "cannot mark the run idle on disk; a restarted host agent announces it again");
            }
        } else {
            let _ = std::fs::remove_file(&marker);
        }
    }
}

/// The file in a run's directory that says its idleness was announced
/// (record flag and AGENT_IDLE): an adopting host agent goes on from idle
/// instead of announcing it again.
const IDLE_FILE: &str = "idle";

/// True when run directory `dir` says its idleness was announced.
pub(super) fn announced(dir: &std::path::Path) -> bool {
    dir.join(IDLE_FILE).exists()
}

/// How long the agent has been silent.
fn silence(log: &OutputLog) -> Duration {
    Duration::from_millis(u64::try_from(now_ms() - log.last_output_ms()).unwrap_or(0))
}
