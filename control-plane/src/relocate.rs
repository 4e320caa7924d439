//! Moving an agent to a host under a new generation: the one mechanism
//! behind restarting a LOST agent and draining a host. The record moves
//! first, in one compare-and-set on generation, host and state that also
//! moves its host-set membership and appends the event (so exactly one
//! replica wins); then the new host is asked to start it, and a failed start
//! moves on to the next candidate. Nothing is put back: when every candidate
//! fails the record stays PENDING, and the sweep retries it. A copy left on
//! the old host is fenced by the generation.

use std::sync::Arc;
use std::time::Duration;

use agentplane::proto::v1::{Agent, AgentState, ExitReason};
use agentplane::registry::{AgentUpdate, Expect, Registry, UpdateOutcome};
use agentplane::time::{ms_from_timestamp, now_ms};

use crate::error::ApiError;
use crate::hosts::HostClients;
use crate::placement;
use crate::start::{start_on_candidates, Placed, StartOutcome};

/// What a relocation did.
#[derive(Debug)]
pub enum Relocated {
    /// The record names the next generation, and `host` confirmed the start
    /// (`None`: the record moved on meanwhile, someone else's step now).
    Started {
        /// The host that started it.
        host: Option<String>,
    },
    /// The record moved (PENDING at the next generation) but no host
    /// confirmed the start yet; the sweep retries it.
    Pending {
        /// Why the last start failed.
        error: ApiError,
    },
    /// Another replica (or the host) changed the record first.
    Raced,
}

/// Places `agent` (currently in `from` state on its host) on a live host
/// with generation + 1 and starts it there.
pub async fn relocate(
    registry: &Registry,
    hosts: &Arc<HostClients>,
    agent: &Agent,
    from: AgentState,
) -> Result<Relocated, ApiError> {
    let spec = agent.spec.clone().unwrap_or_default();
    let live = registry.list_hosts().await?;
    let rr = registry.next_round_robin().await?;
    let candidates = placement::candidates(&spec, &live, rr)?;
    let target = &candidates[0];
    let generation = agent.generation + 1;
    let moved = registry
        .update_agent(
            &agent.id,
            &Expect {
                generation: Some(agent.generation),
                host: Some(agent.host.clone()),
                states: vec![from],
            },
            &AgentUpdate {
                state: Some(AgentState::Pending),
                host: Some(target.id.clone()),
                generation: Some(generation),
                pid: Some(0),
                clear_exit: true,
                next_restart_at_ms: Some(0),
                pending_since_ms: Some(now_ms()),
                incarnation: Some(String::new()),
                ..Default::default()
            },
        )
        .await?;
    if moved != UpdateOutcome::Applied {
        return Ok(Relocated::Raced);
    }
    let placed = Placed {
        id: &agent.id,
        generation,
        spec: &spec,
    };
    match start_on_candidates(registry, hosts, placed, &target.id, &candidates).await? {
        StartOutcome::Done(confirmed) => {
            let host = confirmed.map(|c| c.host);
            tracing::info!(agent = %agent.id, from = %agent.host, to = ?host, generation, "agent relocated");
            Ok(Relocated::Started { host })
        }
        StartOutcome::Unconfirmed { error, .. } => Ok(Relocated::Pending { error }),
    }
}

/// Places a LOST restartable agent again. Failures are logged: the record
/// stays LOST (or PENDING) and the next pass tries again.
pub async fn restart_lost(registry: &Registry, hosts: &Arc<HostClients>, agent: &Agent) -> bool {
    if let Some(at) = not_before(agent) {
        if now_ms() < at {
            // At most one copy: its host may still be stopping it.
            return false;
        }
    }
    let placed = relocate(registry, hosts, agent, AgentState::Lost).await;
    if matches!(
        placed,
        Ok(Relocated::Started { .. } | Relocated::Pending { .. })
    ) {
        hosts.metrics().agents_rescheduled.inc();
    }
    match placed {
        Ok(Relocated::Started { host }) => {
            tracing::info!(agent = %agent.id, to = ?host, "LOST agent placed again");
            true
        }
        Ok(Relocated::Pending { error }) => {
            tracing::warn!(agent = %agent.id, error = %error, "LOST agent placed again; its start is not confirmed yet");
            true
        }
        Ok(Relocated::Raced) => false,
        Err(e) => {
            tracing::warn!(agent = %agent.id, error = %e, "cannot place a LOST agent yet; retrying next pass");
            false
        }
    }
}

/// For an agent with `stop_after_disconnect` whose host went silent (its
/// copy may still run there until the host stops it): the earliest time, ms
/// since the epoch, a replacement may start: when it was declared LOST (never
/// before its lease expired) + stop_after_disconnect + stop_grace.
pub fn not_before(agent: &Agent) -> Option<i64> {
    let spec = agent.spec.as_ref()?;
    let limit = spec.stop_after_disconnect.as_ref()?;
    // No exit yet: this pass declared it LOST just now.
    let lost_at = match agent.exit.as_ref() {
        None => now_ms(),
        Some(e) if matches!(e.reason(), ExitReason::HostLost | ExitReason::LeaseExpired) => e
            .finished_at
            .as_ref()
            .map_or_else(now_ms, ms_from_timestamp),
        // Its host said it does not hold it: nothing can still run there.
        Some(_) => return None,
    };
    let grace = spec
        .stop_grace
        .as_ref()
        .map_or(DEFAULT_GRACE, agentplane::time::duration_from_proto);
    let wait = agentplane::time::duration_from_proto(limit) + grace;
    Some(lost_at.saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX)))
}

/// The host's stop grace when the spec gives none.
const DEFAULT_GRACE: Duration = Duration::from_secs(10);
