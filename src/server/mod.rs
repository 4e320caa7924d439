//! The one gRPC server bootstrap both servers use: transport (TLS or an
//! explicit `--insecure`), per-connection limits, an optional peer-name
//! check, reflection, and a shutdown that drains for a bounded time and
//! reports a panicked server as an error, never as a clean exit.

mod handshake;
mod incoming;
mod peer;
pub mod raw;
mod startup;
mod streams;
pub mod tls;

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

pub use self::peer::{Gate, RequirePeerName, Tokens};
pub use self::startup::{config_or_exit, StartupConfig};
pub use self::tls::{ServeArgs, TlsMaterial, Transport};

/// The multi-threaded runtime a server runs on, with `serve`'s
/// `--worker-threads` (tokio's default, one per core, when unset); the
/// caller adds its own settings and builds it.
pub fn runtime_builder(serve: &ServeArgs) -> tokio::runtime::Builder {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = serve.worker_threads {
        builder.worker_threads(usize::from(n));
    }
    builder
}

/// Connections the plaintext health port (`--health-listen`) serves at once.
const HEALTH_CONNECTIONS: usize = 64;
/// Streams per connection on the health port.
const HEALTH_STREAMS_PER_CONNECTION: u32 = 16;

/// Why a server could not start or did not end cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listener's address could not be read.
    #[error("cannot read the listener's address: {0}")]
    ListenerAddress(#[source] std::io::Error),
    /// `--health-listen` could not be bound.
    #[error("--health-listen {addr}: {source}")]
    HealthListen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TLS material was refused by the TLS stack.
    #[error("cannot set up TLS: {0}")]
    Tls(String),
    /// Building the reflection service failed.
    #[error("cannot build gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The gRPC server failed while serving.
    #[error("gRPC server failed: {0}")]
    Serve(#[source] tonic::transport::Error),
    /// The server task panicked.
    #[error("gRPC server task panicked: {0}")]
    Panicked(String),
    /// Background tasks panicked (each was logged when it did).
    #[error("{0} background task(s) panicked; see the log")]
    TasksPanicked(u64),
}

/// The end of a server's shutdown, after its own steps: drains the server
/// (bounded by `limit`), the health endpoint and the background `tasks`;
/// a failed server or a panicked task is an error, never a clean exit.
pub async fn finish(
    served: Served,
    probes: Option<Served>,
    tasks: &crate::tasks::Tasks,
    limit: Duration,
) -> Result<(), ServerError> {
    let result = served.drain(limit).await;
    if let Some(p) = probes {
        if let Err(e) = p.drain(Duration::from_secs(1)).await {
            tracing::warn!(error = %e, "the health endpoint failed");
        }
    }
    tasks.drain(limit).await;
    tracing::info!(panicked_tasks = tasks.panicked(), "stopped");
    result?;
    match tasks.panicked() {
        0 => Ok(()),
        n => Err(ServerError::TasksPanicked(n)),
    }
}

/// How one server is set up.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// TLS or plaintext.
    pub transport: Transport,
    /// With TLS: a client certificate is required (else verified only when shown).
    pub require_client_cert: bool,
    /// With TLS: only a peer whose certificate names this may call.
    pub allowed_peer: Option<RequirePeerName>,
    /// Bearer tokens and their roles (the control plane's `--token-file`).
    pub tokens: Option<Tokens>,
    /// Most concurrent HTTP/2 streams on one connection.
    pub max_concurrent_streams: u32,
    /// HTTP/2 keepalive ping interval (a dead peer's connection is closed
    /// after one unanswered ping plus the timeout).
    pub keepalive: Duration,
    /// Most connections open at once (`--max-connections`).
    pub max_connections: usize,
    /// Most requests and streams open at once (`--max-streams`).
    pub max_streams: usize,
}

/// The reflection builder over the agentplane and health descriptors.
fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// Reflection `grpc.reflection.v1` (grpcurl and current tools).
fn reflection() -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    ServerError,
> {
    Ok(reflection_builder().build_v1()?)
}

/// Reflection `grpc.reflection.v1alpha`: what Python's grpcio-reflection,
/// Postman and older clients speak.
fn reflection_v1alpha() -> Result<
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
    ServerError,
> {
    Ok(reflection_builder().build_v1alpha()?)
}

/// A server running in a task of its own.
#[derive(Debug)]
pub struct Served {
    task: JoinHandle<Result<(), tonic::transport::Error>>,
    ended: Option<Result<(), ServerError>>,
}

/// Starts serving `routes` (plus reflection) on `listener` until `cancel`.
pub fn start(
    listener: TcpListener,
    opts: &ServerOptions,
    routes: Routes,
    cancel: &CancellationToken,
) -> Result<Served, ServerError> {
    let builder = tonic::transport::Server::builder()
        // Followers that drop streams before they are accepted (a reconnecting
        // `logs -f`, a proxy whose client left) are normal here: allow many
        // per connection before HTTP/2's rapid-reset guard closes it.
        .http2_max_pending_accept_reset_streams(Some(1024))
        .http2_max_local_error_reset_streams(Some(1024))
        .max_concurrent_streams(opts.max_concurrent_streams)
        .http2_keepalive_interval(Some(opts.keepalive))
        .http2_keepalive_timeout(Some(opts.keepalive));
    let mut gate = Gate {
        peer: None,
        tokens: opts.tokens.clone(),
        streams: Some(streams::StreamCap::new(opts.max_streams)),
        public_streams: opts.tokens.is_some().then(streams::StreamCap::public),
    };
    let stop = cancel.clone().cancelled_owned();
    let routes = routes
        .add_service(reflection()?)
        .add_service(reflection_v1alpha()?);
    let task = match &opts.transport {
        Transport::Tls(m) => {
            gate.peer.clone_from(&opts.allowed_peer);
            let config = m
                .rustls_server(opts.require_client_cert)
                .map_err(ServerError::Tls)?;
            let incoming = handshake::tls_incoming(
                listener,
                handshake::Admission {
                    max: opts.max_connections,
                    acceptor: tokio_rustls::TlsAcceptor::from(config),
                    timeout: m.handshake_timeout,
                    proven_by_certificate: opts.require_client_cert,
                },
                cancel.clone(),
            );
            tokio::spawn(
                builder
                    .layer(crate::telemetry::propagate::RpcTrace)
                    .layer(gate)
                    .serve_with_incoming_shutdown(routes.prepare(), incoming, stop),
            )
        }
        Transport::Insecure => {
            tracing::warn!(
                "serving plaintext (--insecure): anyone who can reach this port can call it"
            );
            let incoming = incoming::capped(listener, opts.max_connections);
            tokio::spawn(
                builder
                    .layer(crate::telemetry::propagate::RpcTrace)
                    .layer(gate)
                    .serve_with_incoming_shutdown(routes.prepare(), incoming, stop),
            )
        }
    };
    Ok(Served { task, ended: None })
}

/// Serves only `health` (plaintext) on `addr`, if given, until `cancel`:
/// the probe endpoint of `--health-listen`, which carries nothing but
/// SERVING or not. `None` when no address is given.
pub async fn start_health<S>(
    addr: Option<std::net::SocketAddr>,
    health: S,
    cancel: &CancellationToken,
) -> Result<Option<Served>, ServerError>
where
    S: tonic::codegen::Service<
            tonic::codegen::http::Request<tonic::body::Body>,
            Response = tonic::codegen::http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + tonic::server::NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| ServerError::HealthListen { addr, source: e })?;
    let task = tokio::spawn(
        // Probes need little: a few connections, a few streams each, and
        // streams capped like every public call, so a flood on this port
        // cannot take the process's descriptors or memory.
        tonic::transport::Server::builder()
            .max_concurrent_streams(HEALTH_STREAMS_PER_CONNECTION)
            .layer(Gate {
                streams: Some(streams::StreamCap::public()),
                ..Gate::default()
            })
            .add_service(health)
            .serve_with_incoming_shutdown(
                incoming::capped(listener, HEALTH_CONNECTIONS),
                cancel.clone().cancelled_owned(),
            ),
    );
    tracing::info!(%addr, "health (plaintext) serving");
    Ok(Some(Served { task, ended: None }))
}

impl Served {
    /// Waits for `shutdown`, or for the server to end by itself (an error:
    /// it only ends when told to); then returns, the server still draining.
    pub async fn until(&mut self, shutdown: impl Future<Output = ()>) {
        tokio::select! {
            r = &mut self.task => {
                let r = flatten(r);
                if let Err(e) = &r {
                    tracing::error!(error = %e, "gRPC server ended by itself");
                }
                self.ended = Some(r);
            }
            () = shutdown => {}
        }
    }

    /// After the root token was cancelled: waits at most `limit` for
    /// in-flight requests, then closes what is left. A server that failed
    /// or panicked is an error here.
    pub async fn drain(mut self, limit: Duration) -> Result<(), ServerError> {
        if let Some(r) = self.ended.take() {
            return r;
        }
        match tokio::time::timeout(limit, &mut self.task).await {
            Ok(r) => flatten(r),
            Err(_) => {
                tracing::warn!(
                    ?limit,
                    "in-flight requests did not finish in time; closing them"
                );
                self.task.abort();
                Ok(())
            }
        }
    }
}

fn flatten(
    r: Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>,
) -> Result<(), ServerError> {
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(ServerError::Serve(e)),
        Err(join) => Err(ServerError::Panicked(join.to_string())),
    }
}
