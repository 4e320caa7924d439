//! The agentplane host agent: registers its host in Redis with a TTL heartbeat,
//! runs agents as supervised subprocesses, and serves `agentplane.v1.HostAgent`.
//!
//! [`run`] takes an already-bound listener so tests can start it on port 0.

pub mod cgroup;
pub mod config;
mod heartbeat;
pub mod identity;
pub mod keeper;
pub mod metrics;
mod service;
mod status;
pub mod supervisor;

use std::future::Future;
use std::time::Duration;

use agentplane::proto::v1::host_agent_server::HostAgentServer;
use agentplane::registry::{HostRecord, RegistryError};
use agentplane::server::{self, ServerError, ServerOptions};
use agentplane::tasks::Tasks;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

pub use config::Config;
use service::HostAgentService;
use supervisor::Supervisor;

/// HTTP/2 keepalive of the gRPC server: a control plane that vanished
/// without closing its connection is noticed within two of these.
const KEEPALIVE: Duration = Duration::from_secs(20);

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
    /// The configuration is unusable (the message names the flag).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The gRPC server could not start or failed.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The keeper could not be reached or started.
    #[error(transparent)]
    Keeper(#[from] keeper::KeeperError),
    /// The metrics endpoint could not start.
    #[error(transparent)]
    Metrics(#[from] agentplane::metrics::MetricsError),
    /// The keeper died while this host agent ran; its agents died with it.
    #[error("the keeper process died, and every agent with it: the host agent ends so that its supervisor starts it again (with a new keeper)")]
    KeeperGone,
    /// The cgroups `--cgroups` asks for are not there.
    #[error(transparent)]
    Cgroups(#[from] cgroup::CgroupError),
    /// This process's own executable (which runs the keeper) is unknown.
    #[error("cannot find this program's executable to start the keeper: {0}")]
    Executable(#[source] std::io::Error),
}

/// Runs the host agent on `listener` until `shutdown` resolves, adopting
/// first the agents an earlier host agent left in the keeper. Then, by
/// default, leaves every agent running in the keeper with its output on disk
/// (the host key stays, for the next host agent to renew); with
/// `--stop-agents-on-exit`, removes the host key at once and stops every
/// agent within its grace (bounded by `--shutdown-timeout`). Either way it
/// drains background tasks. Ends with an error when the keeper dies.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), HostAgentError> {
    let mut metric_registry = agentplane::metrics::registry("host-agent");
    let metrics = metrics::Metrics::register(&mut metric_registry);
    let registry = config
        .registry()
        .map_err(HostAgentError::Config)?
        .with_metrics(metrics.redis.clone());
    let metrics_listener = agentplane::metrics::bind(config.serve.metrics_listen).await?;
    // Run directories of agents the keeper still runs are adopted; the
    // others are removed once the keeper has said which (Supervisor::adopt).
    let agents_dir = config.data_dir.join("agents");
    std::fs::create_dir_all(&agents_dir).map_err(|source| HostAgentError::DataDir {
        path: agents_dir.clone(),
        source,
    })?;
    // Agents' output often carries secrets: the data dir is the host
    // agent's user's alone (whatever mode it was created with).
    for dir in [&config.data_dir, &agents_dir] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(
            |source| HostAgentError::DataDir {
                path: dir.clone(),
                source,
            },
        )?;
    }
    let local = listener
        .local_addr()
        .map_err(HostAgentError::ListenerAddress)?;
    let address = config
        .advertise_addr
        .clone()
        .unwrap_or_else(|| local.to_string());
    let cancel = CancellationToken::new();
    let tasks = Tasks::new();
    let exe = keeper::program().map_err(HostAgentError::Executable)?;
    let (keeper, kept) =
        keeper::Keeper::connect(&exe, &config.data_dir, config.orphan_grace(), &tasks).await?;
    // Files read before: `--check-config` and start use the same ones.
    let liveness = config.keeper_liveness().map_err(HostAgentError::Config)?;
    keeper.liveness(liveness).await?;
    let cgroups = if keeper.version < keeper::proto::CGROUPS_VERSION {
        let why = format!(
            "the running keeper (protocol {}) cannot put agents in cgroups; they get them once it is restarted",
            keeper.version
        );
        tracing::warn!("{why}");
        cgroup::Cgroups::off(why)
    } else {
        cgroup::Cgroups::detect(config.cgroups, &config.cgroup_parent, &config.host_id)?
    };
    let caps = cgroups.caps().clone();
    tracing::info!(mode = caps.mode.name(), freeze = caps.freeze, memory = caps.memory, pids = caps.pids, cpu = caps.cpu, detail = %caps.detail, "agents' cgroups");
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
            uids: identity::UidPolicy {
                allow_root: config.allow_root_agents,
                allowed: config.allowed_uids.clone(),
                own_uid: nix::unistd::geteuid().as_raw(),
            },
        },
        tasks.clone(),
        cancel.clone(),
        config.data_dir.clone(),
        keeper.clone(),
        cgroups,
        metrics,
    );
    metrics::Metrics::register_supervisor(&mut metric_registry, &supervisor);
    agentplane::metrics::start(metrics_listener, metric_registry, &tasks, &cancel);
    // Before the first heartbeat, which settles the records of every agent
    // of this host that this start does not hold.
    supervisor.adopt(kept);
    let host = HostRecord {
        id: config.host_id.clone(),
        address: address.clone(),
        labels: config.label_map(),
        capacity: config.max_agents,
        version: agentplane::VERSION.to_owned(),
        started_at_ms: agentplane::time::now_ms(),
        incarnation,
        cgroups: caps,
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

    let transport = config.transport().map_err(HostAgentError::Config)?;
    let allowed_peer = config.allowed_peer().map_err(HostAgentError::Config)?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<HostAgentServer<HostAgentService>>()
        .await;
    let routes = Routes::new(health_service.clone()).add_service(HostAgentServer::new(
        HostAgentService::new(supervisor.clone()),
    ));
    let options = ServerOptions {
        transport,
        // Only the control plane may call: a certificate from the CA that
        // names it (a host agent's own certificate is refused).
        require_client_cert: true,
        allowed_peer: Some(allowed_peer),
        tokens: None,
        // Every log stream the control plane relays shares its one
        // connection to this host, plus its control calls.
        max_concurrent_streams: config.max_log_streams + 256,
        keepalive: KEEPALIVE,
        max_connections: config.serve.max_connections,
        max_streams: config.serve.max_streams,
    };
    let probes =
        server::start_health(config.serve.health_listen, health_service.clone(), &cancel).await?;
    let mut served = server::start(listener, &options, routes, &cancel)?;
    tracing::info!(host = %config.host_id, %local, %address, "host agent serving");

    let gone = keeper.gone.clone();
    served
        .until(async move {
            tokio::select! {
                () = shutdown => {}
                () = gone.cancelled() => {}
            }
        })
        .await;
    let keeper_died = keeper.gone.is_cancelled();
    let keep = !keeper_died && !config.stop_agents_on_exit;
    if keep {
        supervisor.detach();
    }
    cancel.cancel();
    health
        .set_not_serving::<HostAgentServer<HostAgentService>>()
        .await;
    if keep {
        // The host key stays: the next host agent renews it before it
        // expires, or the keeper ends the agents first (--orphan-grace).
        supervisor.detach_all(config.shutdown_timeout).await;
    } else {
        if let Err(e) = registry.remove_host(&config.host_id).await {
            tracing::warn!(error = %e, "cannot remove the host key; it expires with its TTL");
        }
        if keeper_died {
            tracing::error!("the keeper process died; every agent died with it");
        } else {
            supervisor.stop_all(config.shutdown_timeout).await;
        }
    }
    keeper.close();
    server::finish(served, probes, &tasks, config.shutdown_timeout).await?;
    if keeper_died {
        return Err(HostAgentError::KeeperGone);
    }
    Ok(())
}
