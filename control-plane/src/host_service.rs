//! The `agentplane.v1.HostService` implementation: live hosts from Redis,
//! cordon, and drain (which moves restartable agents to other hosts).

use std::sync::Arc;
use std::time::Duration;

use agentplane::proto::v1::host_service_server::HostService;
use agentplane::proto::v1::{
    CordonHostRequest, DrainHostRequest, DrainProgress, GetHostRequest, Host, ListHostsRequest,
    ListHostsResponse,
};
use agentplane::registry::Registry;
use agentplane::tasks::Tasks;
use agentplane::time::duration_from_proto;
use agentplane::validate;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::agents::AgentApi;
use crate::drain::Drainer;
use crate::error::ApiError;
use crate::hosts::HostClients;

/// Default bound of a drain.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(600);
/// Pause between drain rounds.
const DRAIN_ROUND: Duration = Duration::from_millis(300);

/// The service.
#[derive(Debug, Clone)]
pub struct HostApi {
    registry: Registry,
    hosts: Arc<HostClients>,
    agents: AgentApi,
    tasks: Tasks,
}

impl HostApi {
    /// Hosts from `registry`; drains stop agents through `agents` and move them
    /// through `hosts`.
    pub fn new(
        registry: Registry,
        hosts: Arc<HostClients>,
        agents: AgentApi,
        tasks: Tasks,
    ) -> Self {
        Self {
            registry,
            hosts,
            agents,
            tasks,
        }
    }

    async fn host(&self, id: &str) -> Result<Host, ApiError> {
        let host = self.registry.get_host(id).await?;
        Ok(host
            .ok_or_else(|| ApiError::HostNotFound { id: id.to_owned() })?
            .to_proto())
    }
}

#[tonic::async_trait]
impl HostService for HostApi {
    async fn list_hosts(
        &self,
        _req: Request<ListHostsRequest>,
    ) -> Result<Response<ListHostsResponse>, Status> {
        let hosts = self.registry.list_hosts().await.map_err(ApiError::from)?;
        Ok(Response::new(ListHostsResponse {
            hosts: hosts.iter().map(|h| h.to_proto()).collect(),
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
        let limit = r
            .timeout
            .as_ref()
            .map_or(DRAIN_TIMEOUT, duration_from_proto);
        let (tx, rx) = mpsc::channel(16);
        let drainer = Drainer::new(
            self.registry.clone(),
            self.hosts.clone(),
            self.agents.clone(),
        );
        self.tasks.spawn("drain", async move {
            let deadline = tokio::time::Instant::now() + limit;
            let mut p = DrainProgress {
                message: format!("cordoned {}; draining", r.id),
                ..Default::default()
            };
            loop {
                if let Err(e) = drainer.round(&r.id, r.force, &mut p).await {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
                if p.remaining == 0 {
                    p.done = true;
                    p.message = format!("{} is empty", r.id);
                    let _ = tx.send(Ok(p)).await;
                    return;
                }
                if tx.send(Ok(p.clone())).await.is_err() {
                    return;
                }
                if tokio::time::Instant::now() >= deadline {
                    let _ = tx
                        .send(Err(Status::deadline_exceeded(format!(
                            "drain of {} gave up after {limit:?} with {} agents left",
                            r.id, p.remaining
                        ))))
                        .await;
                    return;
                }
                tokio::time::sleep(DRAIN_ROUND).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
