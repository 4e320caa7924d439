//! Starting a placed agent: the one loop behind a spawn, a relocation and the
//! sweep's retry of an unconfirmed start. The record is PENDING on a host at
//! a generation; that host is asked to start it (StartAgent is idempotent by
//! id and generation), and when it is full or unreachable the record is
//! re-pointed at the next candidate in one compare-and-set (which also moves
//! its host-set membership and appends the event), never put back.

use std::time::Duration;

use agentplane::proto::v1::{AgentSpec, AgentState, LocalAgent, StartAgentRequest};
use agentplane::registry::{AgentUpdate, Expect, HostRecord, Registry, UpdateOutcome};
use agentplane::time::now_ms;

use crate::error::ApiError;
use crate::hosts::{request, HostClients, HostMethod};

/// How many hosts one start tries before it leaves the record PENDING.
pub const MAX_ATTEMPTS: usize = 3;

/// A placed agent: what StartAgent needs.
#[derive(Debug, Clone, Copy)]
pub struct Placed<'a> {
    /// The agent id.
    pub id: &'a str,
    /// The generation placed.
    pub generation: u64,
    /// What to run.
    pub spec: &'a AgentSpec,
}

/// A host's confirmation of a start.
#[derive(Debug)]
pub struct Confirmed {
    /// The host that started it.
    pub host: String,
    /// Its answer.
    pub answer: LocalAgent,
}

/// What became of a start.
#[derive(Debug)]
pub enum StartOutcome {
    /// A host confirmed it (`Some`), or the record moved on meanwhile
    /// (`None`: another step owns it now): either way this start has nothing
    /// left to do.
    Done(Option<Confirmed>),
    /// No candidate confirmed it; the record stays PENDING where it points.
    Unconfirmed {
        /// The last failure.
        error: ApiError,
        /// Whether another try (later, or on another host) may succeed.
        retryable: bool,
    },
}

/// Asks `host` to start `agent`: the host's answer.
pub async fn start_on(
    hosts: &HostClients,
    host: &HostRecord,
    agent: Placed<'_>,
) -> Result<LocalAgent, ApiError> {
    hosts
        .call(
            host,
            HostMethod::StartAgent,
            Duration::ZERO,
            true,
            |mut c, d| {
                // Built per attempt (usually one) from the borrowed spec:
                // one copy of it, not a template and a copy of that.
                let msg = StartAgentRequest {
                    id: agent.id.to_owned(),
                    generation: agent.generation,
                    spec: Some(agent.spec.clone()),
                };
                async move { c.start_agent(request(msg, d)).await }
            },
        )
        .await
}

/// Starts `agent`, whose record is PENDING on `current`, on the first of
/// `candidates` that takes it (at most [`MAX_ATTEMPTS`]), moving the record
/// to each next candidate first. Registry failures are errors; host failures
/// are in the outcome.
pub async fn start_on_candidates(
    registry: &Registry,
    hosts: &HostClients,
    agent: Placed<'_>,
    current: &str,
    candidates: &[&HostRecord],
) -> Result<StartOutcome, ApiError> {
    let mut current = current.to_owned();
    let mut last = None;
    for host in candidates.iter().take(MAX_ATTEMPTS) {
        if host.id != current {
            if !move_pending(registry, agent, &current, &host.id).await? {
                // The previous host did start it after all (its answer was
                // lost), or someone else moved it: the record is the truth.
                return Ok(StartOutcome::Done(None));
            }
            current = host.id.clone();
        }
        match start_on(hosts, host, agent).await {
            Ok(answer) => {
                return Ok(StartOutcome::Done(Some(Confirmed {
                    host: host.id.clone(),
                    answer,
                })))
            }
            Err(e) if retryable(&e) => {
                tracing::warn!(agent = %agent.id, host = %host.id, error = %e, "host could not start the agent; trying the next");
                last = Some(e);
            }
            Err(error) => {
                return Ok(StartOutcome::Unconfirmed {
                    error,
                    retryable: false,
                })
            }
        }
    }
    Ok(StartOutcome::Unconfirmed {
        error: last.unwrap_or_else(|| ApiError::NoCapacity {
            detail: "no candidate host to start it on".into(),
        }),
        retryable: true,
    })
}

/// Re-points a PENDING record at another host (same generation: the host is
/// part of the fence, so a late start on the old host is refused there);
/// false if it is no longer PENDING on `from` at this generation.
async fn move_pending(
    registry: &Registry,
    agent: Placed<'_>,
    from: &str,
    to: &str,
) -> Result<bool, ApiError> {
    let outcome = registry
        .update_agent(
            agent.id,
            &Expect {
                generation: Some(agent.generation),
                host: Some(from.to_owned()),
                states: vec![AgentState::Pending],
            },
            &AgentUpdate {
                host: Some(to.to_owned()),
                pending_since_ms: Some(now_ms()),
                ..Default::default()
            },
        )
        .await?;
    Ok(outcome == UpdateOutcome::Applied)
}

/// Whether another host (or a later try) may succeed where this one failed.
pub fn retryable(e: &ApiError) -> bool {
    match e {
        ApiError::HostUnreachable { .. } => true,
        ApiError::HostRefused { status, .. } => {
            matches!(
                status.code(),
                tonic::Code::ResourceExhausted | tonic::Code::Unavailable
            )
        }
        _ => false,
    }
}
