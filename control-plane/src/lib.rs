//! The agentplane control plane: stateless; validates requests, places agents
//! on hosts, calls the host agents with deadlines, and answers from Redis. Any
//! number of replicas may serve one address.
//!
//! [`run`] takes an already-bound listener so tests can start it on port 0.

mod agents;
pub mod config;
mod drain;
mod error;
mod host_service;
pub mod hosts;
mod placement;
mod reconciler;
mod relocate;
mod start;
pub mod sweep;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use agentplane::proto::v1::agent_service_server::AgentServiceServer;
use agentplane::proto::v1::host_service_server::HostServiceServer;
use agentplane::registry::{Registry, RegistryError};
use agentplane::tasks::Tasks;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

use agents::AgentApi;
pub use config::Config;
pub use error::ApiError;
use host_service::HostApi;
use hosts::HostClients;

/// How often the health service re-checks the registry.
const HEALTH_PERIOD: Duration = Duration::from_secs(2);

/// Why the control plane could not run.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    /// The registry configuration is unusable.
    #[error(transparent)]
    Registry(#[from] RegistryError),
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

/// Serves the control plane on `listener` until `shutdown` resolves, then
/// drains in-flight requests for at most `--shutdown-timeout`.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ControlPlaneError> {
    let registry = Registry::new(&config.redis_url, &config.redis_prefix)?;
    let local = listener
        .local_addr()
        .map_err(ControlPlaneError::ListenerAddress)?;
    let cancel = CancellationToken::new();
    let tasks = Tasks::new();
    let hosts = Arc::new(HostClients::new(config.host_call_timeout));

    let (health, health_service) = tonic_health::server::health_reporter();
    tasks.spawn("registry health", {
        let registry = registry.clone();
        let cancel = cancel.clone();
        async move {
            // SERVING only while Redis answers: a load balancer then routes
            // around a replica that cannot reach the registry.
            let mut tick = tokio::time::interval(HEALTH_PERIOD);
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                match registry.ping().await {
                    Ok(()) => {
                        health.set_serving::<AgentServiceServer<AgentApi>>().await;
                        health.set_serving::<HostServiceServer<HostApi>>().await;
                        health
                            .set_service_status("", tonic_health::ServingStatus::Serving)
                            .await;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "registry unreachable; health is NOT_SERVING");
                        health
                            .set_not_serving::<AgentServiceServer<AgentApi>>()
                            .await;
                        health.set_not_serving::<HostServiceServer<HostApi>>().await;
                        health
                            .set_service_status("", tonic_health::ServingStatus::NotServing)
                            .await;
                    }
                }
            }
        }
    });
    let agent_api = AgentApi::new(
        registry.clone(),
        hosts.clone(),
        tasks.clone(),
        cancel.clone(),
    );
    tasks.spawn(
        "reconciler",
        reconciler::Reconciler::new(
            registry.clone(),
            hosts.clone(),
            config.reconcile_interval,
            // A placing replica waits at most two host calls (one retry) for
            // a start's answer; past that, nobody is going to confirm it.
            2 * config.host_call_timeout + Duration::from_secs(1),
            drain::Drainer::new(registry.clone(), hosts.clone(), agent_api.clone()),
            tasks.clone(),
        )
        .run(cancel.clone()),
    );
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
        .add_service(AgentServiceServer::new(agent_api.clone()))
        .add_service(HostServiceServer::new(HostApi::new(
            registry.clone(),
            hosts.clone(),
            agent_api,
            tasks.clone(),
            cancel.clone(),
        )))
        .serve_with_incoming_shutdown(
            TcpListenerStream::new(listener),
            cancel.clone().cancelled_owned(),
        );
    tracing::info!(%local, "control plane serving");

    let mut server = tokio::spawn(server);
    let served = tokio::select! {
        r = &mut server => Some(r),
        () = shutdown => None,
    };
    cancel.cancel();
    let result = match served {
        Some(r) => r,
        None => match tokio::time::timeout(config.shutdown_timeout, &mut server).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!("in-flight requests did not finish in time; closing them");
                server.abort();
                Ok(Ok(()))
            }
        },
    };
    tasks.drain(config.shutdown_timeout).await;
    tracing::info!("control plane stopped");
    match result {
        Ok(r) => r.map_err(ControlPlaneError::from),
        Err(join) => {
            tracing::error!(error = %join, "gRPC server task failed");
            Ok(())
        }
    }
}
