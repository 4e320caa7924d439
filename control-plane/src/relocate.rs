//! Moving an agent to another host under a new generation: the one mechanism
//! behind rescheduling a LOST agent and draining a host. The record moves
//! first (compare-and-set on generation, host and state, so exactly one replica
//! wins), then the new host is asked to start it; a copy left on the old host
//! is fenced by the generation when that host comes back.

use std::sync::Arc;
use std::time::Duration;

use agentplane::proto::v1::{Agent, AgentState, StartAgentRequest};
use agentplane::registry::{AgentUpdate, Expect, Registry, UpdateOutcome};

use crate::error::ApiError;
use crate::hosts::{request, HostClients};
use crate::placement;

/// Places `agent` (currently in `from` state on its host) on another live host
/// with generation + 1 and starts it there. Returns the new host id, or
/// `Ok(None)` when another replica moved it first.
pub async fn relocate(
    registry: &Registry,
    hosts: &Arc<HostClients>,
    agent: &Agent,
    from: AgentState,
) -> Result<Option<String>, ApiError> {
    let spec = agent.spec.clone().unwrap_or_default();
    let live: Vec<_> = registry
        .list_hosts()
        .await?
        .into_iter()
        .filter(|h| h.id != agent.host)
        .collect();
    let rr = registry.next_round_robin().await?;
    let candidates = placement::candidates(spec.placement.as_ref(), live, rr)?;
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
                ..Default::default()
            },
        )
        .await?;
    if moved != UpdateOutcome::Applied {
        return Ok(None);
    }
    registry
        .move_host_membership(&agent.id, &agent.host, &target.id)
        .await?;
    let msg = StartAgentRequest {
        id: agent.id.clone(),
        generation,
        spec: Some(spec),
    };
    let started = hosts
        .call(target, Duration::ZERO, true, |mut c, d| {
            let msg = msg.clone();
            async move { c.start_agent(request(msg, d)).await }
        })
        .await;
    if let Err(e) = started {
        // Back to where it came from, so the next pass (or drain round) tries again.
        let _ = registry
            .update_agent(
                &agent.id,
                &Expect {
                    generation: Some(generation),
                    host: Some(target.id.clone()),
                    states: vec![AgentState::Pending],
                },
                &AgentUpdate {
                    state: Some(from),
                    ..Default::default()
                },
            )
            .await;
        return Err(e);
    }
    tracing::info!(agent = %agent.id, from = %agent.host, to = %target.id, generation, "agent relocated");
    Ok(Some(target.id.clone()))
}
