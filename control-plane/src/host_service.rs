//! The `agentplane.v1.HostService` implementation: live hosts from Redis.

use agentplane::proto::v1::host_service_server::HostService;
use agentplane::proto::v1::{GetHostRequest, Host, ListHostsRequest, ListHostsResponse};
use agentplane::registry::Registry;
use agentplane::validate;
use tonic::{Request, Response, Status};

use crate::error::ApiError;

/// The service.
#[derive(Debug, Clone)]
pub struct HostApi {
    registry: Registry,
}

impl HostApi {
    /// Hosts from `registry`.
    pub fn new(registry: Registry) -> Self {
        Self { registry }
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
        let host = self.registry.get_host(&id).await.map_err(ApiError::from)?;
        Ok(Response::new(
            host.ok_or(ApiError::HostNotFound { id })?.to_proto(),
        ))
    }
}
