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
        }
    }
}

/// True when `slot`'s spec asks for idle detection and its output has been
/// silent for its `idle_after` already.
pub(super) fn silent_past_idle_after(slot: &AgentSlot) -> bool {
    slot.spec
        .idle_after
        .as_ref()
        .is_some_and(|a| silence(&slot.output) >= duration_from_proto(a))
}

/// How long the agent has been silent.
fn silence(log: &OutputLog) -> Duration {
    Duration::from_millis(u64::try_from(now_ms() - log.last_output_ms()).unwrap_or(0))
}
