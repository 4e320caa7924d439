//! StreamLogs relayed without decoding. The client's one request message
//! is read and checked (caller, agent, quota) like any call's; then the same
//! bytes go to the agent's host as a ReadLogs call, and the host's response
//! body comes back to the client frame by frame. Both RPCs answer the same
//! `LogChunk` messages, so nothing is decoded or encoded here: a followed
//! byte is not copied in this process (through a decode buffer and a new
//! frame, it was twice), and no task or queue sits between the two streams.
//! A slow client slows its own stream (HTTP/2 flow control reaches back to
//! the host's reader), never the agent or other clients.

use std::convert::Infallible;
use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use agentplane::proto::v1::agent_service_server::AgentServiceServer;
use agentplane::proto::v1::StreamLogsRequest;
use agentplane::server::raw::{self, trailers};
use agentplane::tasks::GaugeGuard;
use bytes::Bytes;
use http_body::Frame;
use prost::Message as _;
use tonic::body::Body;
use tonic::codegen::{http, BoxFuture, Service};
use tonic::server::NamedService;
use tonic::Status;

use super::AgentApi;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::hosts::HostMethod;
use crate::quota::Held;

/// The path this relay answers; every other goes to the generated service.
const STREAM_LOGS: &str = "/agentplane.v1.AgentService/StreamLogs";
/// The host's RPC with the same request and response messages.
const READ_LOGS: &str = "/agentplane.v1.HostAgent/ReadLogs";
/// How long opening the host's stream may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// The agent service with StreamLogs answered by the relay.
#[derive(Clone)]
pub struct AgentRoutes {
    api: AgentApi,
    generated: AgentServiceServer<AgentApi>,
}

impl AgentRoutes {
    /// `api` behind its generated service, StreamLogs relayed.
    pub fn new(api: AgentApi) -> Self {
        Self {
            generated: AgentServiceServer::new(api.clone()),
            api,
        }
    }
}

impl NamedService for AgentRoutes {
    const NAME: &'static str = <AgentServiceServer<AgentApi> as NamedService>::NAME;
}

impl Service<http::Request<Body>> for AgentRoutes {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if req.uri().path() != STREAM_LOGS {
            return self.generated.call(req);
        }
        let api = self.api.clone();
        Box::pin(async move { Ok(api.relay_logs(req).await.unwrap_or_else(|s| s.into_http())) })
    }
}

impl AgentApi {
    /// Answers one StreamLogs call with its host's ReadLogs stream.
    async fn relay_logs(&self, req: http::Request<Body>) -> Result<http::Response<Body>, Status> {
        let (parts, body) = req.into_parts();
        let caller = Caller::of(&tonic::Request::from_http(http::Request::from_parts(
            parts,
            (),
        )));
        let (mut framed, message) = raw::read_request(body).await?;
        let mut msg = StreamLogsRequest::decode(message)
            .map_err(|e| Status::invalid_argument(format!("bad StreamLogsRequest: {e}")))?;
        // A name becomes its id here; the host knows ids only.
        let id = self.resolve(&caller, &msg.id).await?;
        if id != msg.id {
            msg.id = id;
            framed = raw::frame(&msg.encode_to_vec());
        }
        // One read of the record: NOT_FOUND also for a caller outside it.
        let agent = self.agent_for(&caller, &msg.id).await?;
        // Only a follow stays open; a read of what is there ends by itself.
        let held = if msg.follow {
            Some(self.quotas.follow(&caller)?)
        } else {
            None
        };
        let host = self.host_of(&agent).await?;
        let channel = self.hosts.channel(&host)?;
        let unreachable = |detail: String| ApiError::HostUnreachable {
            host: host.id.clone(),
            address: host.address.clone(),
            detail,
        };
        // No grpc-timeout on the call: a follow may last as long as the agent.
        // Opening is a read, so a transport hiccup (a connection the host just
        // closed) is retried once on a fresh call.
        let mut attempt = 0;
        let opening = async {
            let upstream = loop {
                attempt += 1;
                let mut ch = channel.clone();
                let sent = framed.clone();
                let call = async move {
                    std::future::poll_fn(|cx| ch.poll_ready(cx)).await?;
                    ch.call(host_request(sent)).await
                };
                let opened = tokio::time::timeout(OPEN_TIMEOUT, call)
                    .await
                    .map_err(|_| unreachable(format!("no answer within {OPEN_TIMEOUT:?}")))?;
                let refused = match opened {
                    Ok(r) => match Status::from_header_map(r.headers()) {
                        None => break r.into_body(),
                        // Trailers only: nothing to send, or the host refused.
                        Some(s) if s.code() == tonic::Code::Ok => {
                            return Ok(Opened::Done(s.into_http()))
                        }
                        Some(s) => s,
                    },
                    Err(e) => Status::unavailable(e.to_string()),
                };
                let retry = attempt == 1
                    && matches!(
                        refused.code(),
                        tonic::Code::Cancelled | tonic::Code::Unavailable
                    );
                if !retry {
                    return Err(ApiError::HostRefused {
                        host: host.id.clone(),
                        status: refused,
                    });
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            Ok(Opened::Stream(upstream))
        };
        let t = std::time::Instant::now();
        let opened = opening.await;
        self.hosts
            .metrics()
            .host_call(HostMethod::ReadLogs, &opened, t.elapsed());
        let upstream = match opened? {
            Opened::Stream(body) => body,
            Opened::Done(response) => return Ok(response),
        };
        let relay = Relay {
            upstream,
            host: host.id.clone(),
            cancel: Box::pin(self.cancel.clone().cancelled_owned()),
            ended: false,
            _places: (self.log_streams.hold(), held),
        };
        Ok(raw::response(Body::new(relay)))
    }
}

/// How opening the host's stream ended well.
enum Opened {
    /// Its body, to relay.
    Stream(Body),
    /// A complete answer (trailers only: nothing to send).
    Done(http::Response<Body>),
}

/// A ReadLogs call to a host carrying `framed`, in the current trace.
fn host_request(framed: Bytes) -> http::Request<Body> {
    let mut req = http::Request::new(Body::new(http_body_util::Full::new(framed)));
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = http::Uri::from_static(READ_LOGS);
    let h = req.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    h.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    agentplane::telemetry::propagate::inject_headers(h);
    req
}

/// One relayed stream: the host's body, and the places it holds until it
/// ends (dropped with it).
struct Relay {
    upstream: Body,
    host: String,
    cancel: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    ended: bool,
    _places: (GaugeGuard, Option<Held>),
}

impl http_body::Body for Relay {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        if this.cancel.as_mut().poll(cx).is_ready() {
            this.ended = true;
            return Poll::Ready(Some(Ok(trailers(Status::unavailable(
                "control plane shutting down: reconnect with your offset",
            )))));
        }
        match Pin::new(&mut this.upstream).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(f))) => {
                this.ended = f.is_trailers();
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.ended = true;
                Poll::Ready(Some(Ok(trailers(Status::unavailable(format!(
                    "stream from host {} broke: {}; reconnect with your offset",
                    this.host,
                    e.message()
                ))))))
            }
            // Ended without a status: the host went away mid-stream.
            Poll::Ready(None) => {
                this.ended = true;
                Poll::Ready(Some(Ok(trailers(Status::unavailable(format!(
                    "stream from host {} ended without a status; reconnect with your offset",
                    this.host
                ))))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}
