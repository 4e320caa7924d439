//! Calls to host agents: one lazily-connected channel per address (a bounded
//! cache), a deadline on every call, and errors that name the host.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use agentplane::proto::v1::host_agent_client::HostAgentClient;
use agentplane::registry::HostRecord;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

use crate::error::ApiError;

/// Most cached channels; past it the cache is emptied and refilled on demand.
const MAX_CHANNELS: usize = 1024;

/// Clients of host agents.
#[derive(Debug)]
pub struct HostClients {
    channels: Mutex<HashMap<String, Channel>>,
    timeout: Duration,
}

impl HostClients {
    /// Clients whose calls time out after `timeout` (plus any extra per call).
    pub fn new(timeout: Duration) -> Self {
        Self {
            channels: Mutex::new(HashMap::new()),
            timeout,
        }
    }

    fn channel(&self, host: &HostRecord) -> Result<Channel, ApiError> {
        let mut map = self
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = map.get(&host.address) {
            return Ok(c.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{}", host.address)).map_err(|e| {
            ApiError::HostUnreachable {
                host: host.id.clone(),
                address: host.address.clone(),
                detail: format!("bad address: {e}"),
            }
        })?;
        let channel = endpoint
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy();
        if map.len() >= MAX_CHANNELS {
            map.clear();
        }
        map.insert(host.address.clone(), channel.clone());
        Ok(channel)
    }

    /// Calls `f` on `host` with the default deadline plus `extra`.
    pub async fn call<T, F, Fut>(
        &self,
        host: &HostRecord,
        extra: Duration,
        f: F,
    ) -> Result<T, ApiError>
    where
        F: FnOnce(HostAgentClient<Channel>, Duration) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = HostAgentClient::new(self.channel(host)?);
        let deadline = self.timeout + extra;
        let unreachable = |detail: String| ApiError::HostUnreachable {
            host: host.id.clone(),
            address: host.address.clone(),
            detail,
        };
        match tokio::time::timeout(deadline, f(client, deadline)).await {
            Err(_) => Err(unreachable(format!("no answer within {deadline:?}"))),
            Ok(Ok(r)) => Ok(r.into_inner()),
            // Transport failures (refused, reset, shutting down) come back as
            // UNAVAILABLE, UNKNOWN or CANCELLED: the host cannot act now.
            Ok(Err(s))
                if matches!(
                    s.code(),
                    Code::Unavailable | Code::Unknown | Code::Cancelled
                ) =>
            {
                Err(unreachable(s.message().to_owned()))
            }
            Ok(Err(s)) => Err(ApiError::HostRefused {
                host: host.id.clone(),
                status: s,
            }),
        }
    }
}

/// A request with a gRPC deadline header, so the host also knows when to give up.
pub fn request<T>(msg: T, deadline: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(deadline);
    r
}
