//! The `agentplane.v1.HostAgent` gRPC service: a thin adapter over the supervisor.

use std::sync::Arc;

use agentplane::proto::v1::host_agent_server::HostAgent;
use agentplane::proto::v1::{
    HostAgentRef, HostForgetAgentResponse, HostListAgentsRequest, HostListAgentsResponse,
    HostStopAgentRequest, LocalAgent, SendInputRequest, SendInputResponse, SignalAgentRequest,
    StartAgentRequest, StreamLogsRequest,
};
use agentplane::time::duration_from_proto;
use agentplane::validate::ValidationError;
use tonic::{Request, Response, Status};

use crate::supervisor::{Supervisor, SupervisorError};

/// The service.
#[derive(Debug, Clone)]
pub struct HostAgentService {
    supervisor: Arc<Supervisor>,
}

impl HostAgentService {
    /// Serves `supervisor`.
    pub fn new(supervisor: Arc<Supervisor>) -> Self {
        Self { supervisor }
    }
}

type Answer = Result<Response<LocalAgent>, Status>;

#[tonic::async_trait]
impl HostAgent for HostAgentService {
    async fn start_agent(&self, req: Request<StartAgentRequest>) -> Answer {
        let r = req.into_inner();
        let spec = r
            .spec
            .ok_or_else(|| SupervisorError::from(ValidationError::new("spec", "is required")))?;
        Ok(Response::new(
            self.supervisor
                .start_detached(r.id, r.generation, spec)
                .await?,
        ))
    }

    async fn stop_agent(&self, req: Request<HostStopAgentRequest>) -> Answer {
        let r = req.into_inner();
        let grace = r.grace.as_ref().map(duration_from_proto);
        Ok(Response::new(self.supervisor.stop(&r.id, grace).await?))
    }

    async fn pause_agent(&self, req: Request<HostAgentRef>) -> Answer {
        Ok(Response::new(
            self.supervisor
                .pause_or_resume(&req.into_inner().id, true)
                .await?,
        ))
    }

    async fn resume_agent(&self, req: Request<HostAgentRef>) -> Answer {
        Ok(Response::new(
            self.supervisor
                .pause_or_resume(&req.into_inner().id, false)
                .await?,
        ))
    }

    async fn signal_agent(&self, req: Request<SignalAgentRequest>) -> Answer {
        let r = req.into_inner();
        Ok(Response::new(
            self.supervisor.signal(&r.id, r.signal).await?,
        ))
    }

    async fn inspect_agent(&self, req: Request<HostAgentRef>) -> Answer {
        Ok(Response::new(
            self.supervisor.inspect(&req.into_inner().id)?,
        ))
    }

    async fn list_agents(
        &self,
        req: Request<HostListAgentsRequest>,
    ) -> Result<Response<HostListAgentsResponse>, Status> {
        let usage = req.into_inner().usage;
        let sup = self.supervisor.clone();
        // Sampling reads /proc for every agent: off the runtime's threads.
        let agents = tokio::task::spawn_blocking(move || sup.list(usage))
            .await
            .map_err(|_| Status::unavailable("the host agent is shutting down"))?;
        Ok(Response::new(HostListAgentsResponse { agents }))
    }

    async fn forget_agent(
        &self,
        req: Request<HostAgentRef>,
    ) -> Result<Response<HostForgetAgentResponse>, Status> {
        self.supervisor.forget(&req.into_inner().id)?;
        Ok(Response::new(HostForgetAgentResponse {}))
    }

    async fn get_status(
        &self,
        _req: Request<agentplane::proto::v1::GetStatusRequest>,
    ) -> Result<Response<agentplane::proto::v1::ServerStatus>, Status> {
        Ok(Response::new(self.supervisor.status()))
    }

    type AttachStream = tokio_stream::wrappers::ReceiverStream<crate::supervisor::LogItem>;

    async fn attach(
        &self,
        req: Request<tonic::Streaming<agentplane::proto::v1::AttachInput>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let rx = self.supervisor.attach(req.into_inner()).await?;
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    type ReadLogsStream = tokio_stream::wrappers::ReceiverStream<crate::supervisor::LogItem>;

    async fn read_logs(
        &self,
        req: Request<StreamLogsRequest>,
    ) -> Result<Response<Self::ReadLogsStream>, Status> {
        let rx = self.supervisor.read_logs(req.into_inner())?;
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn write_input(
        &self,
        req: Request<SendInputRequest>,
    ) -> Result<Response<SendInputResponse>, Status> {
        let r = req.into_inner();
        if let (Some(rows), Some(cols)) = (r.rows, r.cols) {
            let (rows, cols) = (
                u16::try_from(rows).unwrap_or(u16::MAX),
                u16::try_from(cols).unwrap_or(u16::MAX),
            );
            self.supervisor.resize(&r.id, rows, cols)?;
        }
        if !r.data.is_empty() {
            self.supervisor.write_input(&r.id, &r.data).await?;
        }
        Ok(Response::new(SendInputResponse {}))
    }
}
