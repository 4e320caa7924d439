//! The agentplane host agent: registers its host in Redis with a TTL heartbeat,
//! runs agents as supervised subprocesses, and serves `agentplane.v1.HostAgent`.
//!
//! [`run`] takes an already-bound listener so tests can start it on port 0.

pub mod config;
mod heartbeat;
mod service;
mod status;
pub mod supervisor;

use std::future::Future;

use agentplane::proto::v1::host_agent_server::HostAgentServer;
use agentplane::registry::{HostRecord, Registry, RegistryError};
use agentplane::tasks::Tasks;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

pub use config::Config;
use service::HostAgentService;
use supervisor::Supervisor;

/// Why the host agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum HostAgentError {
    /// The registry configuration is unusable.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The data directory cannot be created.
    #[error("cannot create the data directory {}: {source}", path.display())]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The listener's address could not be read.
    #[error("cannot read the listener's address: {0}")]
    ListenerAddress(#[source] std::io::Error),
    /// Building the reflection service failed.
    #[error("cannot build gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Runs the host agent on `listener` until `shutdown` resolves; then removes the
/// host key at once, stops every agent within its grace (bounded by
/// `--shutdown-timeout`) and drains background tasks.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), HostAgentError> {
    let registry = Registry::new(&config.redis_url, &config.redis_prefix)?;
    // Output of agents from an earlier run died with them: start clean.
    let agents_dir = config.data_dir.join("agents");
    let _ = std::fs::remove_dir_all(&agents_dir);
    std::fs::create_dir_all(&agents_dir).map_err(|source| HostAgentError::DataDir {
        path: agents_dir.clone(),
        source,
    })?;
    let local = listener
        .local_addr()
        .map_err(HostAgentError::ListenerAddress)?;
    let address = config
        .advertise_addr
        .clone()
        .unwrap_or_else(|| local.to_string());
    let cancel = CancellationToken::new();
    let tasks = Tasks::new();
    // A fresh id for this start: records started by an earlier one are
    // told apart (and settled) by it.
    let incarnation = agentplane::ids::new_agent_id();
    let supervisor = Supervisor::new(
        config.host_id.clone(),
        incarnation.clone(),
        registry.clone(),
        config.heartbeat_ttl,
        supervisor::Limits {
            max_agents: config.max_agents,
            max_log_streams: config.max_log_streams,
        },
        tasks.clone(),
        cancel.clone(),
        config.data_dir.clone(),
    );
    let host = HostRecord {
        id: config.host_id.clone(),
        address: address.clone(),
        labels: config.label_map(),
        capacity: config.max_agents,
        version: agentplane::VERSION.to_owned(),
        started_at_ms: agentplane::time::now_ms(),
        incarnation,
        ..Default::default()
    };
    tasks.spawn(
        "heartbeat",
        heartbeat::run(
            registry.clone(),
            supervisor.clone(),
            host,
            config.heartbeat_ttl,
            cancel.clone(),
        ),
    );

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<HostAgentServer<HostAgentService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(agentplane::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let server = tonic::transport::Server::builder()
        // Followers that drop streams before they are accepted (a reconnecting
        // `logs -f`, a proxy whose client left) are normal here: allow many
        // per connection before HTTP/2's rapid-reset guard closes it.
        .http2_max_pending_accept_reset_streams(Some(1024))
        .http2_max_local_error_reset_streams(Some(1024))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(HostAgentServer::new(HostAgentService::new(
            supervisor.clone(),
        )))
        .serve_with_incoming_shutdown(
            TcpListenerStream::new(listener),
            cancel.clone().cancelled_owned(),
        );
    tracing::info!(host = %config.host_id, %local, %address, "host agent serving");

    let mut server = tokio::spawn(server);
    let served = tokio::select! {
        r = &mut server => Some(r),
        () = shutdown => None,
    };
    cancel.cancel();
    health
        .set_not_serving::<HostAgentServer<HostAgentService>>()
        .await;
    if let Err(e) = registry.remove_host(&config.host_id).await {
        tracing::warn!(error = %e, "cannot remove the host key; it expires with its TTL");
    }
    supervisor.stop_all(config.shutdown_timeout).await;
    let result = match served {
        Some(r) => r,
        None => match tokio::time::timeout(config.shutdown_timeout, &mut server).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!("gRPC connections did not drain in time; closing them");
                server.abort();
                Ok(Ok(()))
            }
        },
    };
    tasks.drain(config.shutdown_timeout).await;
    tracing::info!(panicked_tasks = tasks.panicked(), "host agent stopped");
    match result {
        Ok(r) => r.map_err(HostAgentError::from),
        Err(join) => {
            tracing::error!(error = %join, "gRPC server task failed");
            Ok(())
        }
    }
}
