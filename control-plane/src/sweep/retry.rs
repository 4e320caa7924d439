//! The sweep's retry of a start no host confirmed: on its own host first,
//! then the next candidates; a refusal no retry can mend ends it FAILED.

use std::collections::HashMap;

use agentplane::proto::v1::{Agent, AgentState, ExitReason, ExitStatus};
use agentplane::registry::{AgentUpdate, Expect, HostRecord, RegistryError};
use agentplane::time::{now_ms, timestamp_from_ms};

use super::Sweep;
use crate::error::ApiError;
use crate::placement;
use crate::start::{start_on_candidates, Placed, StartOutcome};

impl Sweep {
    /// Starts an unconfirmed PENDING record again: its own host first (if
    /// live), then the other candidates.
    pub(super) async fn retry_start(
        &self,
        agent: &Agent,
        live: &HashMap<String, HostRecord>,
    ) -> Result<bool, RegistryError> {
        let spec = agent.spec.clone().unwrap_or_default();
        // Claimed by moving pending_since: other replicas (and this one's next
        // slices) wait another bound before trying again.
        let claimed = self
            .registry
            .update_agent(
                &agent.id,
                &pending_at(agent),
                &AgentUpdate {
                    pending_since_ms: Some(now_ms()),
                    ..Default::default()
                },
            )
            .await?;
        if claimed != agentplane::registry::UpdateOutcome::Applied {
            return Ok(false);
        }
        let mut candidates: Vec<&HostRecord> = live.get(&agent.host).into_iter().collect();
        let rr = self.registry.next_round_robin().await?;
        let hosts = sorted(live.values().cloned().collect());
        if let Ok(more) = placement::candidates(&spec, &hosts, rr) {
            candidates.extend(more.into_iter().filter(|h| h.id != agent.host));
        }
        tracing::info!(agent = %agent.id, host = %agent.host, generation = agent.generation, "retrying a start that no host confirmed");
        let placed = Placed {
            id: &agent.id,
            generation: agent.generation,
            spec: &spec,
        };
        let outcome = start_on_candidates(
            &self.registry,
            &self.hosts,
            placed,
            &agent.host,
            &candidates,
        )
        .await;
        match outcome {
            Ok(StartOutcome::Done(_)) => Ok(true),
            Ok(StartOutcome::Unconfirmed {
                error,
                retryable: true,
            }) => {
                tracing::warn!(agent = %agent.id, error = %error, "start still unconfirmed; retrying later");
                Ok(true)
            }
            Ok(StartOutcome::Unconfirmed {
                error,
                retryable: false,
            }) => {
                self.fail(agent, &error).await?;
                Ok(true)
            }
            Err(ApiError::Registry(e)) => Err(e),
            Err(e) => {
                tracing::warn!(agent = %agent.id, error = %e, "start retry failed; retrying later");
                Ok(true)
            }
        }
    }

    /// Ends an unconfirmed start FAILED with the refusal that no retry mends.
    async fn fail(&self, agent: &Agent, error: &ApiError) -> Result<(), RegistryError> {
        let current = self.registry.get_agent(&agent.id).await?;
        let Some(current) = current.filter(|a| a.state() == AgentState::Pending) else {
            return Ok(());
        };
        let update = AgentUpdate {
            state: Some(AgentState::Failed),
            exit: Some(ExitStatus {
                reason: ExitReason::HostError as i32,
                error: format!("no host started it: {error}"),
                finished_at: Some(timestamp_from_ms(now_ms())),
                ..Default::default()
            }),
            pending_since_ms: Some(0),
            ..Default::default()
        };
        self.registry
            .update_agent(&agent.id, &pending_at(&current), &update)
            .await?;
        tracing::warn!(agent = %agent.id, error = %error, "agent FAILED: no host started it");
        Ok(())
    }
}

/// The expectation of a PENDING record as read.
fn pending_at(agent: &Agent) -> Expect {
    Expect {
        generation: Some(agent.generation),
        host: Some(agent.host.clone()),
        states: vec![AgentState::Pending],
    }
}

fn sorted(mut hosts: Vec<HostRecord>) -> Vec<HostRecord> {
    hosts.sort_by(|a, b| a.id.cmp(&b.id));
    hosts
}
