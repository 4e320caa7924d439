//! The `agentplane.v1.HostService` implementation: live hosts from Redis,
//! cordon, and drain (which moves restartable agents to other hosts).

use std::sync::Arc;
use std::time::Duration;

use agentplane::proto::v1::host_service_server::HostService;
use agentplane::proto::v1::{
    CordonHostRequest, DrainHostRequest, DrainProgress, GetHostRequest, Host, ListHostsRequest,
    ListHostsResponse,
};
use agentplane::registry::{Draining, Registry};
use agentplane::tasks::Tasks;
use agentplane::time::duration_from_proto;
use agentplane::time::now_ms;
use agentplane::validate;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::agents::AgentApi;
use crate::drain::{DrainEvent, Drainer, DRAIN_LEASE};
use crate::error::ApiError;
use crate::hosts::HostClients;

/// Default bound of a drain.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(600);

/// The service.
#[derive(Debug, Clone)]
pub struct HostApi {
    registry: Registry,
    hosts: Arc<HostClients>,
    agents: AgentApi,
    tasks: Tasks,
    cancel: CancellationToken,
}

impl HostApi {
    /// Hosts from `registry`; drains stop agents through `agents` and move them
    /// through `hosts`.
    pub fn new(
        registry: Registry,
        hosts: Arc<HostClients>,
        agents: AgentApi,
        tasks: Tasks,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            registry,
            hosts,
            agents,
            tasks,
            cancel,
        }
    }

    async fn host(&self, id: &str) -> Result<Host, ApiError> {
        if let Some(h) = self.registry.get_host(id).await? {
            return Ok(h.to_proto());
        }
        let restarting = self.registry.restarting(&[id.to_owned()]).await?;
        Ok(restarting
            .get(id)
            .ok_or_else(|| ApiError::HostNotFound { id: id.to_owned() })?
            .to_proto(id))
    }

    /// Live hosts, then the restarting ones (known, not live, held by a keeper).
    async fn all_hosts(&self) -> Result<Vec<Host>, ApiError> {
        let live = self.registry.list_hosts().await?;
        let mut away: Vec<String> = self.registry.known_hosts().await?;
        away.retain(|id| !live.iter().any(|h| &h.id == id));
        away.sort();
        let restarting = self.registry.restarting(&away).await?;
        let mut hosts: Vec<Host> = live.iter().map(|h| h.to_proto()).collect();
        hosts.extend(
            away.iter()
                .filter_map(|id| restarting.get(id).map(|r| r.to_proto(id))),
        );
        Ok(hosts)
    }
}

#[tonic::async_trait]
impl HostService for HostApi {
    async fn list_hosts(
        &self,
        _req: Request<ListHostsRequest>,
    ) -> Result<Response<ListHostsResponse>, Status> {
        Ok(Response::new(ListHostsResponse {
            hosts: self.all_hosts().await?,
        }))
    }

    async fn get_host(&self, req: Request<GetHostRequest>) -> Result<Response<Host>, Status> {
        let id = req.into_inner().id;
        validate::host_id("id", &id).map_err(ApiError::from)?;
        Ok(Response::new(self.host(&id).await?))
    }

    async fn cordon_host(&self, req: Request<CordonHostRequest>) -> Result<Response<Host>, Status> {
        let r = req.into_inner();
        validate::host_id("id", &r.id).map_err(ApiError::from)?;
        if !self
            .registry
            .set_cordoned(&r.id, r.cordoned)
            .await
            .map_err(ApiError::from)?
        {
            return Err(ApiError::HostNotFound { id: r.id }.into());
        }
        self.agents.forget_hosts().await;
        tracing::info!(host = %r.id, cordoned = r.cordoned, "host cordon changed");
        Ok(Response::new(self.host(&r.id).await?))
    }

    type DrainHostStream = ReceiverStream<Result<DrainProgress, Status>>;

    async fn drain_host(
        &self,
        req: Request<DrainHostRequest>,
    ) -> Result<Response<Self::DrainHostStream>, Status> {
        let r = req.into_inner();
        validate::host_id("id", &r.id).map_err(ApiError::from)?;
        if !self
            .registry
            .set_cordoned(&r.id, true)
            .await
            .map_err(ApiError::from)?
        {
            return Err(ApiError::HostNotFound { id: r.id }.into());
        }
        self.agents.forget_hosts().await;
        let limit = r
            .timeout
            .as_ref()
            .map_or(DRAIN_TIMEOUT, duration_from_proto);
        let mark = Draining {
            force: r.force,
            until_ms: now_ms().saturating_add(i64::try_from(limit.as_millis()).unwrap_or(i64::MAX)),
        };
        self.registry
            .set_draining(&r.id, Some(mark))
            .await
            .map_err(ApiError::from)?;
        let leader = agentplane::ids::new_agent_id();
        // Led here unless another replica leads it already (then both run
        // rounds: every step is a compare-and-set).
        let _ = self
            .registry
            .lead_drain(&r.id, &leader, DRAIN_LEASE)
            .await
            .map_err(ApiError::from)?;
        let (events, mut from_drain) = mpsc::channel(16);
        let (tx, rx) = mpsc::channel(16);
        let drainer = Drainer::new(
            self.registry.clone(),
            self.hosts.clone(),
            self.agents.clone(),
        );
        let (host, cancel) = (r.id.clone(), self.cancel.clone());
        self.tasks.spawn("drain", async move {
            drainer
                .run(&host, mark, &leader, Some(events), cancel)
                .await;
        });
        // The service edge: drain events become stream items.
        self.tasks.spawn("drain stream", async move {
            while let Some(ev) = from_drain.recv().await {
                let item = match ev {
                    DrainEvent::Progress(p) => Ok(p),
                    DrainEvent::Failed(e) => Err(e.into()),
                    DrainEvent::GaveUp { remaining } => Err(Status::deadline_exceeded(format!(
                        "drain of {} gave up after {limit:?} with {remaining} agents left",
                        r.id
                    ))),
                };
                if tx.send(item).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
