//! The `agentplane.v1.AgentService` implementation, split by verb: `spawn`,
//! `control` (pause, resume, stop, kill, delete), `query` (get, locate, list).

mod control;
mod logs;
mod query;
mod relay;
mod spawn;
mod usage;
mod watch;

pub use relay::AgentRoutes;

use std::sync::Arc;
use std::time::Duration;

use agentplane::proto::v1::agent_service_server::AgentService;
use agentplane::proto::v1::{
    Agent, DeleteAgentRequest, DeleteAgentResponse, GetAgentRequest, KillAgentRequest,
    ListAgentsRequest, ListAgentsResponse, LocateAgentRequest, LocateAgentResponse,
    PauseAgentRequest, ResumeAgentRequest, SendInputRequest, SendInputResponse, SpawnAgentRequest,
    SpawnAgentResponse, StopAgentRequest, StreamLogsRequest, WatchAgentsRequest,
};
use agentplane::registry::{HostRecord, Registry};
use agentplane::tasks::Tasks;
use agentplane::validate;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::hosts::HostClients;
use crate::quota::Quotas;

/// Shared state of the API (all of it derived: the control plane is stateless).
#[derive(Debug, Clone)]
pub struct AgentApi {
    registry: Registry,
    hosts: Arc<HostClients>,
    tasks: Tasks,
    cancel: CancellationToken,
    watchers: agentplane::tasks::Gauge,
    log_streams: agentplane::tasks::Gauge,
    quotas: Arc<Quotas>,
    /// What placement reads: the live hosts, cached briefly.
    live_hosts: Arc<crate::live_hosts::LiveHosts>,
}

impl AgentApi {
    /// Registers the live stream counts in `r`.
    pub fn register_metrics(&self, r: &mut agentplane::metrics::MetricRegistry) {
        r.register(
            "log_streams",
            "Log streams (StreamLogs, Attach) open now",
            self.log_streams.metric(),
        );
        r.register(
            "watch_streams",
            "WatchAgents streams open now",
            self.watchers.metric(),
        );
    }

    /// The API over `registry`, calling hosts through `hosts`; watch streams
    /// run as `tasks` and end on `cancel`; each token is held to `quotas`.
    pub fn new(
        registry: Registry,
        bulk: Registry,
        hosts: Arc<HostClients>,
        tasks: Tasks,
        cancel: CancellationToken,
        quotas: Arc<Quotas>,
    ) -> Self {
        Self {
            live_hosts: Arc::new(crate::live_hosts::LiveHosts::new(bulk)),
            registry,
            hosts,
            tasks,
            cancel,
            watchers: agentplane::tasks::Gauge::default(),
            log_streams: agentplane::tasks::Gauge::default(),
            quotas,
        }
    }

    /// Placement's view of the live hosts is out of date: this replica
    /// changed a host record (cordon, drain).
    pub(crate) async fn forget_hosts(&self) {
        self.live_hosts.forget().await;
    }

    /// The record of `id`, or NOT_FOUND.
    async fn agent(&self, id: &str) -> Result<Agent, ApiError> {
        validate::agent_id("id", id)?;
        self.registry
            .get_agent(id)
            .await?
            .ok_or_else(|| ApiError::AgentNotFound { id: id.to_owned() })
    }

    /// The agent id that `id_or_name` names: itself when it has an id's
    /// shape, else the id of the agent holding that name (NOT_FOUND when
    /// none does). Every call that takes an agent resolves it here, once,
    /// at the edge; everything below sees ids only.
    ///
    /// For a caller limited to a selector, a name held by an agent outside
    /// it is NOT_FOUND under the name it asked for, so that neither the
    /// agent's existence nor its id shows.
    pub(super) async fn resolve(
        &self,
        caller: &Caller,
        id_or_name: &str,
    ) -> Result<String, ApiError> {
        if agentplane::ids::is_agent_id(id_or_name) {
            return Ok(id_or_name.to_owned());
        }
        validate::agent_id("id", id_or_name)?;
        let not_found = || ApiError::AgentNotFound {
            id: id_or_name.to_owned(),
        };
        let id = self
            .registry
            .agent_named(id_or_name)
            .await?
            .ok_or_else(not_found)?;
        if caller.restricted() && !self.agent(&id).await.is_ok_and(|a| caller.sees(&a)) {
            return Err(not_found());
        }
        Ok(id)
    }

    /// The record of `id` if `caller` may see it; NOT_FOUND otherwise, as
    /// if it did not exist.
    async fn agent_for(&self, caller: &Caller, id: &str) -> Result<Agent, ApiError> {
        let agent = self.agent(id).await?;
        if caller.sees(&agent) {
            Ok(agent)
        } else {
            Err(ApiError::AgentNotFound { id: id.to_owned() })
        }
    }

    /// NOT_FOUND unless `caller` may see agent `id` (a read only for
    /// callers limited to a selector).
    async fn visible(&self, caller: &Caller, id: &str) -> Result<(), ApiError> {
        if caller.restricted() {
            self.agent_for(caller, id).await?;
        }
        Ok(())
    }

    /// The live host of `agent`, or UNAVAILABLE when it stopped heartbeating.
    async fn host_of(&self, agent: &Agent) -> Result<HostRecord, ApiError> {
        self.registry
            .get_host(&agent.host)
            .await?
            .ok_or_else(|| ApiError::HostGone {
                id: agent.id.clone(),
                host: agent.host.clone(),
            })
    }
}

/// Extra deadline for calls that wait on a process (a stop waits its grace).
fn stop_deadline(grace: Duration) -> Duration {
    grace + Duration::from_secs(6)
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn spawn_agent(
        &self,
        req: Request<SpawnAgentRequest>,
    ) -> Result<Response<SpawnAgentResponse>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        if !r.request_id.is_empty() {
            tracing::Span::current().record("request_id", r.request_id.as_str());
        }
        if let Some(spec) = &r.spec {
            caller.may_spawn(spec)?;
        }
        self.quotas.spawn(&caller)?;
        let t = std::time::Instant::now();
        let spawned = self.spawn(r, &caller).await;
        self.hosts.metrics().spawns.observe(&spawned, t.elapsed());
        let mut out = match spawned {
            // A name held by an agent outside the caller's selector: said
            // to be taken, but not by whom.
            Err(ApiError::NameTaken { name, owner }) if caller.restricted() => {
                let owner = match self.agent_for(&caller, &owner).await {
                    Ok(_) => owner,
                    Err(_) => "another agent".to_owned(),
                };
                return Err(ApiError::NameTaken { name, owner }.into());
            }
            other => other?,
        };
        out.agent = out.agent.map(|a| caller.shown(a));
        Ok(Response::new(out))
    }

    async fn get_agent(&self, req: Request<GetAgentRequest>) -> Result<Response<Agent>, Status> {
        let caller = Caller::of(&req);
        let id = self.resolve(&caller, &req.into_inner().id).await?;
        let agent = self.agent_for(&caller, &id).await?;
        Ok(Response::new(caller.shown(agent)))
    }

    async fn locate_agent(
        &self,
        req: Request<LocateAgentRequest>,
    ) -> Result<Response<LocateAgentResponse>, Status> {
        let caller = Caller::of(&req);
        let id = self.resolve(&caller, &req.into_inner().id).await?;
        self.visible(&caller, &id).await?;
        Ok(Response::new(self.locate(&id).await?))
    }

    async fn list_agents(
        &self,
        req: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        let caller = Caller::of(&req);
        let mut page = self.list(req.into_inner(), &caller).await?;
        page.agents = page.agents.into_iter().map(|a| caller.shown(a)).collect();
        Ok(Response::new(page))
    }

    async fn pause_agent(
        &self,
        req: Request<PauseAgentRequest>,
    ) -> Result<Response<Agent>, Status> {
        let caller = Caller::of(&req);
        let id = self.resolve(&caller, &req.into_inner().id).await?;
        self.visible(&caller, &id).await?;
        Ok(Response::new(
            caller.shown(self.pause_or_resume(&id, true).await?),
        ))
    }

    async fn resume_agent(
        &self,
        req: Request<ResumeAgentRequest>,
    ) -> Result<Response<Agent>, Status> {
        let caller = Caller::of(&req);
        let id = self.resolve(&caller, &req.into_inner().id).await?;
        self.visible(&caller, &id).await?;
        Ok(Response::new(
            caller.shown(self.pause_or_resume(&id, false).await?),
        ))
    }

    async fn stop_agent(&self, req: Request<StopAgentRequest>) -> Result<Response<Agent>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        let id = self.resolve(&caller, &r.id).await?;
        self.visible(&caller, &id).await?;
        Ok(Response::new(caller.shown(self.stop(&id, r.grace).await?)))
    }

    async fn kill_agent(&self, req: Request<KillAgentRequest>) -> Result<Response<Agent>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        let id = self.resolve(&caller, &r.id).await?;
        self.visible(&caller, &id).await?;
        Ok(Response::new(caller.shown(self.kill(&id, r.signal).await?)))
    }

    async fn delete_agent(
        &self,
        req: Request<DeleteAgentRequest>,
    ) -> Result<Response<DeleteAgentResponse>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        let id = self.resolve(&caller, &r.id).await?;
        self.visible(&caller, &id).await?;
        self.delete(&id, r.force).await?;
        Ok(Response::new(DeleteAgentResponse {}))
    }

    async fn get_status(
        &self,
        _req: Request<agentplane::proto::v1::GetStatusRequest>,
    ) -> Result<Response<agentplane::proto::v1::ServerStatus>, Status> {
        Ok(Response::new(agentplane::proto::v1::ServerStatus {
            log_streams: self.log_streams.get(),
            watch_streams: self.watchers.get(),
            tasks: self.tasks.running() as u64,
            panicked_tasks: self.tasks.panicked(),
            rss_bytes: agentplane::tasks::rss_bytes(),
            agents: 0,
            log_buffered_bytes: 0,
        }))
    }

    async fn list_agent_usage(
        &self,
        req: Request<agentplane::proto::v1::ListAgentUsageRequest>,
    ) -> Result<Response<agentplane::proto::v1::ListAgentUsageResponse>, Status> {
        let caller = Caller::of(&req);
        Ok(Response::new(self.usage(req.into_inner(), &caller).await?))
    }

    type AttachStream = logs::LogStream;

    async fn attach(
        &self,
        req: Request<tonic::Streaming<agentplane::proto::v1::AttachInput>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let caller = Caller::of(&req);
        let held = self.quotas.follow(&caller)?;
        Ok(Response::new(
            self.attach(req.into_inner(), &caller, held).await?,
        ))
    }

    type StreamLogsStream = logs::LogStream;

    /// Never reached: [`AgentRoutes`] answers StreamLogs before a call gets
    /// to the generated service (see `relay.rs`).
    async fn stream_logs(
        &self,
        _req: Request<StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        Err(Status::internal(
            "StreamLogs is served by the relay; this server was built without it",
        ))
    }

    async fn send_input(
        &self,
        req: Request<SendInputRequest>,
    ) -> Result<Response<SendInputResponse>, Status> {
        let caller = Caller::of(&req);
        let mut r = req.into_inner();
        r.id = self.resolve(&caller, &r.id).await?;
        self.visible(&caller, &r.id).await?;
        self.send_input(r).await?;
        Ok(Response::new(SendInputResponse {}))
    }

    type WatchAgentsStream = watch::WatchStream;

    async fn watch_agents(
        &self,
        req: Request<WatchAgentsRequest>,
    ) -> Result<Response<Self::WatchAgentsStream>, Status> {
        let caller = Caller::of(&req);
        let mut r = req.into_inner();
        if !r.agent_id.is_empty() {
            r.agent_id = self.resolve(&caller, &r.agent_id).await?;
            self.visible(&caller, &r.agent_id).await?;
        }
        let held = self.quotas.watch(&caller)?;
        let stream = self.watch(r, held).await?;
        Ok(Response::new(if caller.restricted() {
            self.filter_watch(stream, caller)
        } else {
            stream
        }))
    }
}
