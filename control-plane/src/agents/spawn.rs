//! SpawnAgent: validate, honour the idempotency key, place, record, start.

use std::time::Duration;

use agentplane::ids::new_agent_id;
use agentplane::proto::v1::{
    Agent, AgentSpec, AgentState, ExitStatus, LocalAgent, RecordedStart, SpawnAgentRequest,
    SpawnAgentResponse,
};
use agentplane::registry::{AgentUpdate, Expect, HostRecord, UpdateOutcome};
use agentplane::time::{now_ms, timestamp_from_ms};
use agentplane::validate::{self, ValidationError};
use tokio_util::sync::DropGuard;

use super::AgentApi;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::placement;
use crate::start::{start_on, start_on_candidates, Confirmed, Placed, StartOutcome};

/// How long a repeated request waits for the first one's agent to leave PENDING.
const EXISTING_WAIT: Duration = Duration::from_secs(10);
/// After this long in PENDING, a repeated request starts the agent itself.
const DRIVE_AFTER: Duration = Duration::from_secs(1);
/// How long a spawn call's claim lease lives unless renewed: a request id or
/// name claimed by a call that died is free again this long after.
const CLAIM_LEASE: Duration = Duration::from_secs(5);

impl AgentApi {
    pub(super) async fn spawn(
        &self,
        req: SpawnAgentRequest,
        caller: &Caller,
    ) -> Result<SpawnAgentResponse, ApiError> {
        let spec = req
            .spec
            .ok_or_else(|| ValidationError::new("spec", "is required"))?;
        validate::spec(&spec)?;
        if !spec.name.is_empty() {
            validate::new_name("spec.name", &spec.name)?;
        }
        let id = new_agent_id();
        // Held while this call may still create the agent: a claim of ours
        // (request id, name) is never taken over while it lives, however slow
        // we are; once we die it lapses and the claim is free.
        let claims = !req.request_id.is_empty() || !spec.name.is_empty();
        let _lease = match claims {
            true => Some(self.hold_claims(&id).await?),
            false => None,
        };
        if req.request_id.is_empty() {
            return Ok(SpawnAgentResponse {
                agent: Some(self.place_and_start(id, spec).await?),
                existing: false,
            });
        }
        validate::request_id("request_id", &req.request_id)?;
        let deadline = tokio::time::Instant::now() + EXISTING_WAIT;
        while let Some(existing) = self.registry.claim_request(&req.request_id, &id).await? {
            // Another team's request id: neither its agent nor a start of
            // it is this caller's to have.
            if caller.restricted() {
                if let Some(a) = self.registry.get_agent(&existing).await? {
                    if !caller.sees(&a) {
                        return Err(ApiError::RequestIdTaken {
                            request_id: req.request_id,
                        });
                    }
                }
            }
            if let Some(agent) = self.existing(&existing, deadline).await? {
                return Ok(SpawnAgentResponse {
                    agent: Some(agent),
                    existing: true,
                });
            }
            // Its creator is alive and has not written the record yet.
            if tokio::time::Instant::now() >= deadline {
                return Err(ApiError::RequestInProgress {
                    request_id: req.request_id,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        match self.place_and_start(id.clone(), spec).await {
            Ok(agent) => Ok(SpawnAgentResponse {
                agent: Some(agent),
                existing: false,
            }),
            Err(e) => {
                // If no record was written the key must not keep pointing at
                // nothing; if one was, it holds the failure and stays.
                if matches!(self.registry.get_agent(&id).await, Ok(None)) {
                    let _ = self.registry.release_request(&req.request_id, &id).await;
                }
                Err(e)
            }
        }
    }

    /// Writes this call's claim lease, and renews it from a task until the
    /// returned guard is dropped (the call ended, or its client went away).
    async fn hold_claims(&self, id: &str) -> Result<DropGuard, ApiError> {
        self.registry.hold_claims(id, CLAIM_LEASE).await?;
        let token = self.cancel.child_token();
        let (registry, id, stop) = (self.registry.clone(), id.to_owned(), token.clone());
        self.tasks.spawn("claim lease", async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(CLAIM_LEASE / 3) => {}
                }
                if let Err(e) = registry.hold_claims(&id, CLAIM_LEASE).await {
                    tracing::warn!(agent = %id, error = %e, "cannot renew a spawn's claim lease");
                }
            }
        });
        Ok(token.drop_guard())
    }

    /// The agent an earlier request with the same id created, once it left
    /// PENDING (or at `deadline`); `None` while its record does not exist
    /// yet (its creator is still at work: a dead one's claim is taken over).
    /// If it stays PENDING (the replica that created it may have died before
    /// asking its host), this replica asks the host itself: StartAgent is
    /// idempotent by id and generation.
    async fn existing(
        &self,
        id: &str,
        deadline: tokio::time::Instant,
    ) -> Result<Option<Agent>, ApiError> {
        let started = tokio::time::Instant::now();
        let mut driven = false;
        loop {
            let Some(a) = self.registry.get_agent(id).await? else {
                return Ok(None);
            };
            let now = tokio::time::Instant::now();
            if a.state() != AgentState::Pending || now >= deadline {
                return Ok(Some(a));
            }
            if !driven && now - started >= DRIVE_AFTER {
                driven = true;
                if let Some(host) = self.registry.get_host(&a.host).await? {
                    tracing::info!(agent = %id, host = %a.host, "driving a PENDING agent left by an earlier request");
                    if let Err(e) = self.start_on(&host, &a).await {
                        tracing::warn!(agent = %id, error = %e, "could not start the pending agent");
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Claims the spec's name (if any), then places and starts; the name is
    /// released again if no agent came of it.
    async fn place_and_start(&self, id: String, spec: AgentSpec) -> Result<Agent, ApiError> {
        let name = spec.name.clone();
        if !name.is_empty() {
            if let Some(owner) = self.registry.claim_name(&name, &id).await? {
                return Err(ApiError::NameTaken { name, owner });
            }
        }
        let result = self.place_and_start_named(id.clone(), spec).await;
        if result.is_err()
            && !name.is_empty()
            && matches!(self.registry.get_agent(&id).await, Ok(None))
        {
            if let Err(e) = self.registry.release_name(&name, &id).await {
                tracing::warn!(agent = %id, %name, error = %e, "cannot release the name of a failed spawn");
            }
        }
        result
    }

    /// Picks hosts, writes the PENDING record, asks the host to start it; on a
    /// full or unreachable host, moves the record to the next candidate.
    async fn place_and_start_named(&self, id: String, spec: AgentSpec) -> Result<Agent, ApiError> {
        let rr = self.live_hosts.next_round_robin();
        let hosts = self.live_hosts.get(false).await?;
        let fresh;
        let candidates = match placement::candidates(&spec, &hosts, rr) {
            Ok(c) => c,
            // The view may be older than a host that registered or made
            // room since: one fresh read before refusing.
            Err(_) => {
                fresh = self.live_hosts.get(true).await?;
                placement::candidates(&spec, &fresh, rr)?
            }
        };
        let first = candidates[0];
        let now = now_ms();
        let agent = Agent {
            id: id.clone(),
            spec: Some(spec),
            state: AgentState::Pending as i32,
            host: first.id.clone(),
            generation: 1,
            created_at: Some(timestamp_from_ms(now)),
            pending_since: Some(timestamp_from_ms(now)),
            ..Default::default()
        };
        self.registry.create_agent(&agent).await?;
        tracing::Span::current().record("agent", id.as_str());
        tracing::info!(agent = %id, host = %first.id, generation = 1, "agent placed");
        // The spec moved into the record (no copy); it is always there.
        let no_spec = AgentSpec::default();
        let placed = Placed {
            id: &id,
            generation: 1,
            spec: agent.spec.as_ref().unwrap_or(&no_spec),
        };
        match start_on_candidates(&self.registry, &self.hosts, placed, &first.id, &candidates)
            .await?
        {
            StartOutcome::Done(Some(Confirmed {
                host,
                answer: LocalAgent {
                    recorded: Some(r), ..
                },
            })) => Ok(recorded_start(agent, host, r)),
            StartOutcome::Done(_) => self.agent(&id).await,
            StartOutcome::Unconfirmed { error, .. } => {
                // No candidate took it: the view may name hosts gone since.
                self.live_hosts.forget().await;
                self.fail_pending(&id, &error).await;
                Err(error)
            }
        }
    }

    async fn start_on(&self, host: &HostRecord, agent: &Agent) -> Result<LocalAgent, ApiError> {
        let spec = agent.spec.clone().unwrap_or_default();
        start_on(
            &self.hosts,
            host,
            Placed {
                id: &agent.id,
                generation: agent.generation,
                spec: &spec,
            },
        )
        .await
    }

    /// Undoes a placement that failed everywhere: the caller gets the error and
    /// no record is left behind. The record is first moved from PENDING to
    /// FAILED (compare-and-set), so a host that answered late and started it
    /// anyway finds it fenced and kills its copy; then it is deleted.
    async fn fail_pending(&self, id: &str, err: &ApiError) {
        let update = AgentUpdate {
            state: Some(AgentState::Failed),
            exit: Some(ExitStatus {
                reason: agentplane::proto::v1::ExitReason::HostError as i32,
                error: err.to_string(),
                finished_at: Some(timestamp_from_ms(now_ms())),
                ..Default::default()
            }),
            ..Default::default()
        };
        let expect = Expect {
            states: vec![AgentState::Pending],
            ..Default::default()
        };
        let record = match self.registry.get_agent(id).await {
            Ok(Some(a)) => a,
            _ => return,
        };
        match self.registry.update_agent(id, &expect, &update).await {
            Ok(UpdateOutcome::Applied) => {
                if let Err(e) = self.registry.delete_agent(&record).await {
                    tracing::warn!(agent = %id, error = %e, "cannot delete the failed placement; it stays FAILED");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(agent = %id, error = %e, "cannot record the failed placement"),
        }
    }
}

/// The record as the host's start left it: the PENDING record this call
/// wrote, on the host that confirmed it, with what that host's
/// compare-and-set wrote over it (no read back: one round trip less per
/// spawn). A later change (an exit within the same instant) shows in the
/// next read, as it would after a read here.
fn recorded_start(mut agent: Agent, host: String, r: RecordedStart) -> Agent {
    agent.state = AgentState::Running as i32;
    agent.host = host;
    agent.pid = r.pid;
    agent.started_at = r.started_at;
    agent.incarnation = r.incarnation;
    agent.pending_since = None;
    agent
}
