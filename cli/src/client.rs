//! Connecting to the control plane and turning gRPC failures into messages.

use std::time::Duration;

use agentplane::proto::v1::agent_service_client::AgentServiceClient;
use agentplane::proto::v1::host_service_client::HostServiceClient;
use anyhow::Context;
use tonic::transport::{Channel, Endpoint};

/// Clients of both public services over one channel.
pub struct Clients {
    /// AgentService.
    pub agents: AgentServiceClient<Channel>,
    /// HostService.
    pub hosts: HostServiceClient<Channel>,
}

/// A lazy channel to `endpoint`; every call times out after `timeout`.
pub fn channel(endpoint: &str, timeout: Duration) -> anyhow::Result<Channel> {
    let url = if endpoint.contains("://") {
        endpoint.to_owned()
    } else {
        format!("http://{endpoint}")
    };
    Ok(Endpoint::from_shared(url)
        .with_context(|| format!("--endpoint `{endpoint}` is not a URL"))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(timeout)
        .connect_lazy())
}

/// Connects (lazily) to `endpoint`; every call times out after `timeout`.
pub fn connect(endpoint: &str, timeout: Duration) -> anyhow::Result<Clients> {
    let channel = channel(endpoint, timeout)?;
    Ok(Clients {
        agents: AgentServiceClient::new(channel.clone()),
        hosts: HostServiceClient::new(channel),
    })
}

/// Like [`connect`] for long-lived streams: no overall deadline, only the
/// connect timeout (a watch may run for days).
pub fn connect_streaming(endpoint: &str, _timeout: Duration) -> anyhow::Result<Clients> {
    let url = if endpoint.contains("://") {
        endpoint.to_owned()
    } else {
        format!("http://{endpoint}")
    };
    let channel = Endpoint::from_shared(url)
        .with_context(|| format!("--endpoint `{endpoint}` is not a URL"))?
        .connect_timeout(Duration::from_secs(3))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_lazy();
    Ok(Clients {
        agents: AgentServiceClient::new(channel.clone()),
        hosts: HostServiceClient::new(channel),
    })
}

/// True when another endpoint may answer: UNAVAILABLE, or a transport
/// failure (a replica that died mid-call resets the connection: UNKNOWN).
pub fn is_unavailable(e: &anyhow::Error) -> bool {
    e.downcast_ref::<tonic::Status>().is_some_and(failover)
}

/// The status form of [`is_unavailable`].
pub fn failover(s: &tonic::Status) -> bool {
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::Cancelled => true,
        tonic::Code::Unknown => {
            s.message().contains("transport") || s.message().contains("connection")
        }
        _ => false,
    }
}

/// A gRPC failure as one line: the code's name, then the server's message.
pub fn describe(endpoint: &str, s: &tonic::Status) -> String {
    let code = format!("{:?}", s.code());
    let name = code_name(&code);
    if s.code() == tonic::Code::Unavailable && s.message().contains("tcp connect") {
        return format!(
            "{name}: cannot reach the control plane at {endpoint}: {}",
            s.message()
        );
    }
    format!("{name}: {}", s.message())
}

/// `FailedPrecondition` → `FAILED_PRECONDITION`.
fn code_name(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_are_grpc_style() {
        assert_eq!(code_name("FailedPrecondition"), "FAILED_PRECONDITION");
        assert_eq!(code_name("NotFound"), "NOT_FOUND");
        let s = tonic::Status::not_found("agent x not found");
        assert_eq!(describe("e", &s), "NOT_FOUND: agent x not found");
    }
}
