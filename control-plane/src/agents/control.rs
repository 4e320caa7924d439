//! Pause, resume, stop, kill and delete: check the state machine against the
//! record, then ask the agent's host, which records the change.

use agentplane::proto::v1::{
    Agent, AgentState, ExitReason, ExitStatus, HostAgentRef, HostStopAgentRequest,
    SignalAgentRequest,
};
use agentplane::registry::{AgentUpdate, Expect, UpdateOutcome};
use agentplane::state::{self, Op};
use agentplane::time::{duration_from_proto, duration_to_proto, now_ms, timestamp_from_ms};
use agentplane::validate::ValidationError;
use std::time::Duration;

use super::{stop_deadline, AgentApi};
use crate::error::ApiError;
use crate::hosts::{request, HostMethod};

/// Grace when neither the request nor the spec gives one (the host's default too).
const DEFAULT_GRACE: Duration = Duration::from_secs(10);

impl AgentApi {
    /// The record, if `op` is legal in its state.
    async fn checked(&self, id: &str, op: Op) -> Result<Agent, ApiError> {
        let agent = self.agent(id).await?;
        state::check(op, agent.state()).map_err(|detail| ApiError::IllegalTransition {
            id: id.to_owned(),
            detail,
        })?;
        Ok(agent)
    }

    pub(super) async fn pause_or_resume(&self, id: &str, pause: bool) -> Result<Agent, ApiError> {
        let agent = self
            .checked(id, if pause { Op::Pause } else { Op::Resume })
            .await?;
        let host = self.host_of(&agent).await?;
        let msg = HostAgentRef { id: id.to_owned() };
        let called = self
            .hosts
            .call(
                &host,
                if pause {
                    HostMethod::PauseAgent
                } else {
                    HostMethod::ResumeAgent
                },
                Duration::ZERO,
                false,
                |mut c, d| {
                    let msg = msg.clone();
                    async move {
                        if pause {
                            c.pause_agent(request(msg, d)).await
                        } else {
                            c.resume_agent(request(msg, d)).await
                        }
                    }
                },
            )
            .await;
        self.answered(&agent, called).await?;
        self.agent(id).await
    }

    pub(crate) async fn stop(
        &self,
        id: &str,
        grace: Option<prost_types::Duration>,
    ) -> Result<Agent, ApiError> {
        if let Some(g) = &grace {
            agentplane::validate::grace("grace", g)?;
        }
        let agent = self.checked(id, Op::Stop).await?;
        let host = self.host_of(&agent).await?;
        let grace = grace
            .or_else(|| agent.spec.as_ref().and_then(|s| s.stop_grace))
            .as_ref()
            .map_or(DEFAULT_GRACE, duration_from_proto);
        let msg = HostStopAgentRequest {
            id: id.to_owned(),
            grace: Some(duration_to_proto(grace)),
        };
        let stopped = self
            .hosts
            .call(
                &host,
                HostMethod::StopAgent,
                stop_deadline(grace),
                false,
                |mut c, d| {
                    let msg = msg.clone();
                    async move { c.stop_agent(request(msg, d)).await }
                },
            )
            .await;
        match stopped {
            Err(e) if not_held(&e) => self.stopped_elsewhere(&agent, &e).await,
            other => {
                other?;
                self.agent(id).await
            }
        }
    }

    pub(super) async fn kill(&self, id: &str, signal: i32) -> Result<Agent, ApiError> {
        let signal = if signal == 0 { 9 } else { signal };
        if !(1..=64).contains(&signal) {
            return Err(ValidationError::new(
                "signal",
                format!("{signal} is not a signal number (1-64)"),
            )
            .into());
        }
        let agent = self.checked(id, Op::Kill).await?;
        let host = self.host_of(&agent).await?;
        let msg = SignalAgentRequest {
            id: id.to_owned(),
            signal,
        };
        let called = self
            .hosts
            .call(
                &host,
                HostMethod::SignalAgent,
                stop_deadline(Duration::ZERO),
                false,
                |mut c, d| {
                    let msg = msg.clone();
                    async move { c.signal_agent(request(msg, d)).await }
                },
            )
            .await;
        self.answered(&agent, called).await?;
        self.agent(id).await
    }

    /// A host's answer to a control call. When the host says it does not
    /// hold the agent, it is believed: a running record goes LOST
    /// (NOT_ON_HOST, so its restart policy applies) and the caller is told.
    async fn answered<T>(
        &self,
        agent: &Agent,
        called: Result<T, ApiError>,
    ) -> Result<(), ApiError> {
        match called {
            Ok(_) => Ok(()),
            Err(e) if not_held(&e) => {
                let detail = format!("its host {} does not hold it: {e}", agent.host);
                if self
                    .registry
                    .mark_lost(
                        &agent.id,
                        agent.generation,
                        &agent.host,
                        &state::RUNNING,
                        ExitReason::NotOnHost,
                        detail.clone(),
                    )
                    .await?
                {
                    self.hosts.metrics().agents_lost.inc(ExitReason::NotOnHost);
                    tracing::warn!(agent = %agent.id, host = %agent.host, "agent LOST: its host does not hold it");
                }
                Err(ApiError::IllegalTransition {
                    id: agent.id.clone(),
                    detail: format!("it is LOST: {detail}"),
                })
            }
            Err(e) => Err(e),
        }
    }

    /// A stop of an agent its host does not hold: nothing runs, so the stop
    /// is done; the record ends EXITED (STOPPED) saying so, and a late start
    /// of this generation is fenced by the changed state.
    async fn stopped_elsewhere(&self, agent: &Agent, e: &ApiError) -> Result<Agent, ApiError> {
        let update = AgentUpdate {
            state: Some(AgentState::Exited),
            pid: Some(0),
            exit: Some(ExitStatus {
                reason: ExitReason::Stopped as i32,
                error: format!(
                    "stopped while its host {} did not hold it (nothing was running there): {e}",
                    agent.host
                ),
                finished_at: Some(timestamp_from_ms(now_ms())),
                ..Default::default()
            }),
            next_restart_at_ms: Some(0),
            pending_since_ms: Some(0),
            ..Default::default()
        };
        let expect = Expect {
            generation: Some(agent.generation),
            host: Some(agent.host.clone()),
            states: state::LIVE.to_vec(),
        };
        if self
            .registry
            .update_agent(&agent.id, &expect, &update)
            .await?
            == UpdateOutcome::Applied
        {
            self.registry.clear_location(&agent.id, &agent.host).await?;
            tracing::warn!(agent = %agent.id, host = %agent.host, "stopped an agent its host does not hold");
        }
        self.agent(&agent.id).await
    }

    pub(super) async fn delete(&self, id: &str, force: bool) -> Result<(), ApiError> {
        let mut agent = self.agent(id).await?;
        if !state::is_terminal(agent.state()) {
            if !force {
                return Err(ApiError::IllegalTransition {
                    id: id.to_owned(),
                    detail: format!(
                        "it is {}: stop it first, or delete with force",
                        state::name(agent.state())
                    ),
                });
            }
            agent = match self.stop(id, None).await {
                Ok(a) => a,
                // Its host is gone: nothing can stop it now. The record goes;
                // fencing of a host that comes back (issue #4) kills the copy.
                Err(ApiError::HostGone { .. }) => {
                    tracing::warn!(agent = %id, host = %agent.host, "deleting an agent whose host is not heartbeating");
                    agent
                }
                Err(e) => return Err(e),
            };
        }
        self.registry.delete_agent(&agent).await?;
        if let Some(name) = agent
            .spec
            .as_ref()
            .map(|s| s.name.as_str())
            .filter(|n| !n.is_empty())
        {
            self.registry.release_name(name, id).await?;
        }
        tracing::info!(agent = %id, "agent deleted");
        // Best effort: the host keeps a bounded number of ended agents anyway.
        if let Ok(Some(host)) = self.registry.get_host(&agent.host).await {
            let msg = HostAgentRef { id: id.to_owned() };
            if let Err(e) = self
                .hosts
                .call(
                    &host,
                    HostMethod::ForgetAgent,
                    Duration::ZERO,
                    true,
                    |mut c, d| {
                        let msg = msg.clone();
                        async move { c.forget_agent(request(msg, d)).await }
                    },
                )
                .await
            {
                tracing::debug!(agent = %id, error = %e, "host did not forget the agent");
            }
        }
        Ok(())
    }
}

/// Whether a host answered that it does not hold the agent.
fn not_held(e: &ApiError) -> bool {
    matches!(e, ApiError::HostRefused { status, .. } if status.code() == tonic::Code::NotFound)
}
