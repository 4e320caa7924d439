//! Attach and SendInput: proxied to the agent's host (StreamLogs is relayed
//! without decoding, in `relay.rs`). The proxy holds at most a few chunks: a
//! slow client slows its own stream (gRPC flow control reaches back to the
//! host's reader), never the agent or other clients.

use std::time::Duration;

use agentplane::proto::v1::host_agent_client::HostAgentClient;
use agentplane::proto::v1::{AttachInput, LogChunk, SendInputRequest};
use agentplane::validate::{self, ValidationError};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::AgentApi;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::hosts::{request, HostMethod};
use crate::quota::Held;

/// The stream type of StreamLogs.
pub type LogStream = ReceiverStream<Result<LogChunk, Status>>;

/// How long opening the host's stream may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

impl AgentApi {
    /// Proxies an Attach session to the agent's host. The first message
    /// names the agent, so that is where a caller limited to a selector
    /// learns it does not exist (NOT_FOUND). When the client's stream ends
    /// (or breaks), the host-bound stream is closed too, so the host sees
    /// the session end.
    pub(super) async fn attach(
        &self,
        mut inbound: tonic::Streaming<AttachInput>,
        caller: &Caller,
        held: Held,
    ) -> Result<LogStream, ApiError> {
        let first = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => {
                return Err(
                    ValidationError::new("id", "the first message must name the agent").into(),
                )
            }
            Err(s) => {
                return Err(ApiError::Validate(ValidationError::new(
                    "stream",
                    format!("broke before the first message: {}", s.message()),
                )))
            }
        };
        let mut first = first;
        first.id = self.resolve(caller, &first.id).await?;
        let agent = self.agent_for(caller, &first.id).await?;
        let host = self.host_of(&agent).await?;
        let mut client = HostAgentClient::new(self.hosts.channel(&host)?);
        let (up_tx, up_rx) = mpsc::channel(16);
        let id = first.id.clone();
        // Cannot fail: new channel with room.
        let _ = up_tx.try_send(first);
        let cancel = self.cancel.clone();
        self.tasks.spawn("attach input proxy", async move {
            // Until the client's input ends, the host's session ends (its
            // stream is gone), or shutdown: a client that keeps its input
            // open must not hold the control plane's drain.
            loop {
                let next = tokio::select! {
                    () = cancel.cancelled() => return,
                    () = up_tx.closed() => return,
                    m = inbound.message() => m,
                };
                let Ok(Some(mut m)) = next else { return };
                m.id.clone_from(&id);
                if up_tx.send(m).await.is_err() {
                    return;
                }
            }
            // Dropping up_tx ends the host's input stream: the session ends.
        });
        let opened = tokio::time::timeout(OPEN_TIMEOUT, client.attach(ReceiverStream::new(up_rx)))
            .await
            .map_err(|_| ApiError::HostUnreachable {
                host: host.id.clone(),
                address: host.address.clone(),
                detail: format!("no answer within {OPEN_TIMEOUT:?}"),
            })?;
        let upstream = opened
            .map_err(|s| ApiError::HostRefused {
                host: host.id.clone(),
                status: s,
            })?
            .into_inner();
        Ok(self.forward(upstream, host.id.clone(), Some(held)))
    }

    /// Forwards a host's output stream to a client through a small buffer.
    fn forward(
        &self,
        mut upstream: tonic::Streaming<LogChunk>,
        host: String,
        held: Option<Held>,
    ) -> LogStream {
        let (tx, rx) = mpsc::channel(2);
        let cancel = self.cancel.clone();
        let open = self.log_streams.hold();
        self.tasks.spawn("output proxy", async move {
            let _places = (open, held);
            loop {
                let next = tokio::select! {
                    () = tx.closed() => return,
                    () = cancel.cancelled() => {
                        let _ = tx.send(Err(Status::unavailable("control plane shutting down: reconnect with your offset"))).await;
                        return;
                    }
                    m = upstream.message() => m,
                };
                match next {
                    Ok(Some(chunk)) => {
                        if tx.send(Ok(chunk)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(s) => {
                        let _ = tx
                            .send(Err(Status::unavailable(format!(
                                "stream from host {host} broke: {}; reconnect with your offset",
                                s.message()
                            ))))
                            .await;
                        return;
                    }
                }
            }
        });
        ReceiverStream::new(rx)
    }

    pub(super) async fn send_input(&self, req: SendInputRequest) -> Result<(), ApiError> {
        validate::agent_id("id", &req.id)?;
        if req.data.is_empty() && (req.rows.is_none() || req.cols.is_none()) {
            return Err(ValidationError::new(
                "data",
                "must not be empty (unless rows and cols resize the terminal)",
            )
            .into());
        }
        let agent = self.agent(&req.id).await?;
        let host = self.host_of(&agent).await?;
        self.hosts
            .call(
                &host,
                HostMethod::WriteInput,
                Duration::from_secs(6),
                false,
                |mut c, d| {
                    let msg = req.clone();
                    async move { c.write_input(request(msg, d)).await }
                },
            )
            .await?;
        Ok(())
    }
}
