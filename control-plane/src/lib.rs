//! The agentplane control plane: stateless; validates requests, places agents
//! on hosts, calls the host agents with deadlines, and answers from Redis. Any
//! number of replicas may serve one address.
//!
//! [`run`] takes an already-bound listener so tests can start it on port 0.

mod agents;
mod auth;
pub mod config;
mod drain;
mod error;
mod host_service;
pub mod hosts;
mod live_hosts;
pub mod metrics;
mod placement;
mod quota;
mod reconciler;
mod relocate;
mod start;
pub mod sweep;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use agentplane::proto::v1::agent_service_server::AgentServiceServer;
use agentplane::proto::v1::host_service_server::HostServiceServer;
use agentplane::registry::RegistryError;
use agentplane::server::{self, ServerError, ServerOptions};
use agentplane::tasks::Tasks;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use agents::AgentApi;
pub use config::Config;
pub use error::ApiError;
use host_service::HostApi;
use hosts::HostClients;

/// How often the health service re-checks the registry.
const HEALTH_PERIOD: Duration = Duration::from_secs(2);

/// Most concurrent streams (calls, watches, log follows) on one client
/// connection.
const MAX_STREAMS_PER_CONNECTION: u32 = 1024;
/// HTTP/2 keepalive: a client that vanished without closing its connection
/// is noticed within two of these.
const KEEPALIVE: Duration = Duration::from_secs(20);

/// Why the control plane could not run.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    /// The registry configuration is unusable.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The listener's address could not be read.
    #[error("cannot read the listener's address: {0}")]
    ListenerAddress(#[source] std::io::Error),
    /// The configuration is unusable (the message names the flag).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The gRPC server could not start or failed.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The metrics endpoint could not start.
    #[error(transparent)]
    Metrics(#[from] agentplane::metrics::MetricsError),
}

/// Serves the control plane on `listener` until `shutdown` resolves, then
/// drains in-flight requests for at most `--shutdown-timeout`.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ControlPlaneError> {
    let mut metric_registry = agentplane::metrics::registry("control-plane");
    let metrics = metrics::Metrics::register(&mut metric_registry);
    let registry = config
        .registry()
        .map_err(ControlPlaneError::Config)?
        .with_metrics(metrics.redis.clone());
    // The reconciler's passes and placement's reads of every live host are
    // pipelines of hundreds of commands: on a connection of their own, a
    // caller's locate or spawn is not queued behind them (Redis serves
    // each connection's commands in order, and the client reads each
    // connection's replies in order).
    let bulk = config
        .registry()
        .map_err(ControlPlaneError::Config)?
        .with_metrics(metrics.redis.clone());
    let metrics_listener = agentplane::metrics::bind(config.serve.metrics_listen).await?;
    let local = listener
        .local_addr()
        .map_err(ControlPlaneError::ListenerAddress)?;
    let cancel = CancellationToken::new();
    let tasks = Tasks::new();
    let transport = config.transport().map_err(ControlPlaneError::Config)?;
    let tokens: Option<agentplane::server::Tokens> = config
        .tokens()
        .map_err(ControlPlaneError::Config)?
        .map(|t| Arc::new(std::sync::RwLock::new(Arc::new(t))));
    if let (Some(tokens), Some(path)) = (&tokens, &config.token_file) {
        tasks.spawn(
            "token reload",
            auth::reload_on_sighup(tokens.clone(), path.clone(), cancel.clone()),
        );
    } else {
        tracing::warn!("no --token-file: every caller may do everything");
    }
    let hosts = Arc::new(HostClients::new(
        config.host_call_timeout,
        transport.clone(),
        metrics.clone(),
    ));

    let (health, health_service) = tonic_health::server::health_reporter();
    tasks.spawn("registry health", {
        let registry = registry.clone();
        let bulk = bulk.clone();
        let cancel = cancel.clone();
        let redis = metrics.redis.clone();
        async move {
            // SERVING only while Redis answers on both connections (the
            // callers' and the passes'): a load balancer then routes around
            // a replica that cannot reach the registry.
            let mut tick = tokio::time::interval(HEALTH_PERIOD);
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let answered = match registry.ping().await {
                    Ok(()) => bulk.ping().await,
                    Err(e) => Err(e),
                };
                redis.set_up(answered.is_ok());
                match answered {
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
        bulk.clone(),
        hosts.clone(),
        tasks.clone(),
        cancel.clone(),
        quota::Quotas::new(config.quotas.clone()),
    );
    tasks.spawn(
        "reconciler",
        reconciler::Reconciler::new(
            bulk.clone(),
            hosts.clone(),
            config.reconcile_interval,
            // A placing replica waits at most two host calls (one retry) for
            // a start's answer; past that, nobody is going to confirm it.
            2 * config.host_call_timeout + Duration::from_secs(1),
            drain::Drainer::new(bulk, hosts.clone(), agent_api.clone()),
            tasks.clone(),
        )
        .run(cancel.clone()),
    );
    agent_api.register_metrics(&mut metric_registry);
    metric_registry.register_collector(Box::new(metrics::Breakers(Arc::downgrade(&hosts))));
    agentplane::metrics::start(metrics_listener, metric_registry, &tasks, &cancel);
    let routes = Routes::new(health_service.clone())
        .add_service(agents::AgentRoutes::new(agent_api.clone()))
        .add_service(HostServiceServer::new(HostApi::new(
            registry.clone(),
            hosts.clone(),
            agent_api,
            tasks.clone(),
            cancel.clone(),
        )));
    let options = ServerOptions {
        transport,
        // Clients authenticate with tokens; a client certificate is
        // verified when one is shown.
        require_client_cert: false,
        allowed_peer: None,
        tokens: tokens.clone(),
        max_concurrent_streams: MAX_STREAMS_PER_CONNECTION,
        keepalive: KEEPALIVE,
        max_connections: config.serve.max_connections,
        max_streams: config.serve.max_streams,
    };
    let probes =
        server::start_health(config.serve.health_listen, health_service.clone(), &cancel).await?;
    let mut served = server::start(listener, &options, routes, &cancel)?;
    tracing::info!(%local, "control plane serving");

    served.until(shutdown).await;
    cancel.cancel();
    Ok(server::finish(served, probes, &tasks, config.shutdown_timeout).await?)
}
