//! Connecting to the control plane and turning gRPC failures into messages.

use std::time::Duration;

use agentplane::proto::v1::agent_service_client::AgentServiceClient;
use agentplane::proto::v1::host_service_client::HostServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::access::{Access, Bearer};

/// The services' clients carry the token interceptor.
pub type Svc = InterceptedService<Channel, Bearer>;

/// Clients of both public services over one channel (a clone shares it).
#[derive(Clone)]
pub struct Clients {
    /// AgentService.
    pub agents: AgentServiceClient<Svc>,
    /// HostService.
    pub hosts: HostServiceClient<Svc>,
}

/// A lazy channel to `endpoint`; every call times out after `access.timeout`.
pub fn channel(endpoint: &str, access: &Access) -> anyhow::Result<Channel> {
    Ok(access
        .endpoint(endpoint)?
        .connect_timeout(Duration::from_secs(3))
        .timeout(access.timeout)
        .connect_lazy())
}

fn clients(channel: Channel, access: &Access) -> Clients {
    Clients {
        agents: AgentServiceClient::with_interceptor(channel.clone(), access.bearer()),
        hosts: HostServiceClient::with_interceptor(channel, access.bearer()),
    }
}

/// Connects (lazily) to `endpoint`.
pub fn connect(endpoint: &str, access: &Access) -> anyhow::Result<Clients> {
    Ok(clients(channel(endpoint, access)?, access))
}

/// Like [`connect`] for long-lived streams: no overall deadline, only the
/// connect timeout (a watch may run for days).
pub fn connect_streaming(endpoint: &str, access: &Access) -> anyhow::Result<Clients> {
    let channel = access
        .endpoint(endpoint)?
        .connect_timeout(Duration::from_secs(3))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_lazy();
    Ok(clients(channel, access))
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
/// A transport failure says what broke (the innermost cause) and, for TLS,
/// what to pass.
pub fn describe(endpoint: &str, s: &tonic::Status) -> String {
    let code = format!("{:?}", s.code());
    let name = code_name(&code);
    if s.code() == tonic::Code::Unavailable && s.message().contains("tcp connect") {
        return format!(
            "{name}: cannot reach the control plane at {endpoint}: {}",
            s.message()
        );
    }
    let cause = innermost(s);
    if let Some(hint) = cause.as_deref().and_then(tls_hint) {
        return format!("{name}: {endpoint}: {hint} ({})", cause.unwrap_or_default());
    }
    let plaintext = !endpoint.starts_with("https://");
    // How a plaintext client talking to a TLS server fails depends on when
    // the server hangs up: any of these.
    let m = s.message();
    let transport = m.contains("transport error")
        || m.contains("h2 protocol error")
        || m.contains("connection")
        || matches!(s.code(), tonic::Code::Cancelled);
    let hint = if plaintext && transport {
        " (if the server speaks TLS, use an https:// endpoint with --ca)"
    } else {
        ""
    };
    match cause {
        Some(c) if !s.message().contains(&c) => format!("{name}: {}: {c}{hint}", s.message()),
        _ => format!("{name}: {}{hint}", s.message()),
    }
}

/// One agent's failure in a bulk command: the code's name and the message.
pub fn brief(s: &tonic::Status) -> String {
    format!("{}: {}", code_name(&format!("{:?}", s.code())), s.message())
}

/// The innermost cause of a status, if it has one.
fn innermost(s: &tonic::Status) -> Option<String> {
    let mut cur: &dyn std::error::Error = std::error::Error::source(s)?;
    while let Some(next) = cur.source() {
        cur = next;
    }
    Some(cur.to_string())
}

/// What a person can do about a TLS failure, from its cause.
fn tls_hint(cause: &str) -> Option<&'static str> {
    if cause.contains("CertificateRequired") || cause.contains("certificate required") {
        Some("the server wants a client certificate: pass --cert/--key")
    } else if cause.contains("UnknownIssuer") || cause.contains("unknown issuer") {
        Some("the server's certificate is not signed by --ca: pass the CA that signed it")
    } else if cause.contains("not valid for name") || cause.contains("NotValidForName") {
        Some("the server's certificate does not carry the endpoint's name: pass --tls-server-name NAME")
    } else if cause.contains("InvalidContentType") || cause.contains("corrupt message") {
        Some("the server does not speak TLS: use an http:// endpoint")
    } else {
        None
    }
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
