//! Admitting a start: a new slot goes into the supervisor's map unless this
//! generation is here already or the host is full, and ended agents past
//! those retained are evicted.

use std::collections::HashMap;
use std::sync::Arc;

use agentplane::proto::v1::LocalAgent;

use super::agent::AgentSlot;
use super::{Result, Supervisor, SupervisorError};

/// Ended agents kept (for inspect and logs) beyond the running ones.
const RETAINED_ENDED: usize = 1024;
/// Ended agents evicted beyond the cap at once: an eighth of those retained.
const EVICT_SLACK: usize = RETAINED_ENDED / 8;
/// What admitting a start found.
pub(super) enum Admission {
    /// The new slot is in the map: start it.
    New,
    /// This generation runs here already: the start is answered with it.
    Here(LocalAgent),
    /// This generation ran here and ended.
    EndedHere(Arc<AgentSlot>),
}

impl Supervisor {
    /// Puts a new slot in the map ([`Admission::New`]), or says why not: the
    /// agent when this generation is here already, live or ended, or the
    /// error. `replacing`: the ended slot of this generation that the new
    /// one may replace (only if it is still the one in the map).
    pub(super) fn admit(
        &self,
        slot: &Arc<AgentSlot>,
        replacing: Option<&Arc<AgentSlot>>,
    ) -> Result<Admission> {
        let mut map = self.map();
        if self.cancel.is_cancelled() {
            return Err(SupervisorError::ShuttingDown);
        }
        if let Some(existing) = map.get(&slot.id) {
            let replaceable = replacing.is_some_and(|r| Arc::ptr_eq(r, existing));
            if existing.generation == slot.generation && !replaceable {
                return Ok(if existing.is_active() {
                    Admission::Here(existing.to_proto())
                } else {
                    Admission::EndedHere(existing.clone())
                });
            }
            if existing.is_active() {
                return Err(SupervisorError::AlreadyExists {
                    id: slot.id.clone(),
                    generation: existing.generation,
                });
            }
        }
        // Counting the active slots locks each one: only a map with at
        // least `max` entries (ended ones included) can hold `max` active.
        let max = self.limits.max_agents as usize;
        if map.len() >= max && map.values().filter(|s| s.is_active()).count() >= max {
            return Err(SupervisorError::AtCapacity {
                host: self.host_id.clone(),
                max: self.limits.max_agents,
            });
        }
        if let Some(replaced) = map.insert(slot.id.clone(), slot.clone()) {
            // An ended older generation: its output goes with it.
            replaced.output.remove();
        }
        evict_ended(&mut map, self.limits.max_agents as usize + RETAINED_ENDED);
        Ok(Admission::New)
    }
}

/// Drops the ended agents that finished longest ago, keeping at most `cap`
/// entries. Past the cap it drops [`EVICT_SLACK`] more, so that a host with
/// churn sorts its ended agents once per that many starts, not at every
/// start.
fn evict_ended(map: &mut HashMap<String, Arc<AgentSlot>>, cap: usize) {
    if map.len() <= cap {
        return;
    }
    let keep = cap.saturating_sub(EVICT_SLACK);
    let mut ended: Vec<(i64, String)> = map
        .values()
        .filter(|s| !s.is_active())
        .map(|s| {
            let at = s
                .snapshot()
                .exit
                .and_then(|e| e.finished_at)
                .map_or(0, |t| agentplane::time::ms_from_timestamp(&t));
            (at, s.id.clone())
        })
        .collect();
    ended.sort();
    for (_, id) in ended.into_iter().take(map.len() - keep) {
        if let Some(slot) = map.remove(&id) {
            slot.output.remove();
        }
    }
}
