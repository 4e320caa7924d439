//! `agentctl dev`: a whole local stack in this one process, for trying
//! agentplane out — a private `redis-server` (a child process, discarded at
//! exit), a control plane and one host agent — until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use agentplane::proto::v1::ListHostsRequest;
use anyhow::Context;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::dev_secrets::DevSecrets;
use crate::access::Access;
use crate::contexts::{self, UserConfig};

/// How long the private redis-server may take to accept connections.
const REDIS_START: Duration = Duration::from_secs(10);
/// How long the host agent may take to register with the control plane.
const READY_LIMIT: Duration = Duration::from_secs(20);

/// Flags of `agentctl dev`.
#[derive(Debug, Clone, clap::Args)]
pub struct DevArgs {
    /// Control-plane address (port 0 picks a free one; the address is printed).
    #[arg(long, env = "AGENTPLANE_DEV_LISTEN", default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,
    /// Host-agent address (port 0 picks a free one).
    #[arg(
        long,
        env = "AGENTPLANE_DEV_HOST_LISTEN",
        default_value = "127.0.0.1:7701"
    )]
    pub host_listen: SocketAddr,
    /// Use this Redis instead of starting a private redis-server.
    #[arg(long, env = "AGENTPLANE_DEV_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Directory for agent output and the private Redis's files (default: a
    /// new temporary directory, removed at exit).
    #[arg(long, env = "AGENTPLANE_DEV_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Serve the control plane's Prometheus metrics at this address's
    /// `/metrics` (plaintext).
    #[arg(long, env = "AGENTPLANE_DEV_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Serve the host agent's Prometheus metrics at this address's
    /// `/metrics` (plaintext; each server has its own).
    #[arg(long, env = "AGENTPLANE_DEV_HOST_METRICS_LISTEN")]
    pub host_metrics_listen: Option<SocketAddr>,
}

/// A redis-server child that dies with us (SIGKILL included) and is stopped
/// when dropped.
struct PrivateRedis {
    child: Child,
    url: String,
}

impl PrivateRedis {
    fn start(dir: &Path) -> anyhow::Result<Self> {
        // A Unix socket only this user may connect to (mode 0700), no TCP
        // port: whoever can write to the registry can run programs as the
        // host agent's user, so no other local user may reach it.
        let socket = dir.join("redis.sock");
        anyhow::ensure!(
            socket.as_os_str().len() < 100,
            "{}: too long for a Unix socket; pass a shorter --data-dir",
            socket.display()
        );
        let log = std::fs::File::create(dir.join("redis.log"))
            .with_context(|| format!("create {}", dir.join("redis.log").display()))?;
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", "0", "--unixsocketperm", "700", "--unixsocket"])
            .arg(&socket)
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // Its own process group: a Ctrl-C in the terminal must not stop Redis
        // before the host agent has recorded its agents' ends.
        cmd.process_group(0);
        agentplane::process::die_with_parent(&mut cmd);
        let child = cmd.spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                anyhow::anyhow!(
                    "redis-server is not on PATH: install it (apt-get install redis-server) or pass --redis-url"
                )
            } else {
                anyhow::Error::new(e).context("start redis-server")
            }
        })?;
        let mut redis = Self {
            child,
            url: format!("unix://{}", socket.display()),
        };
        let deadline = Instant::now() + REDIS_START;
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if let Ok(Some(status)) = redis.child.try_wait() {
                anyhow::bail!(
                    "redis-server exited ({status}) before accepting connections; see {}",
                    dir.join("redis.log").display()
                );
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "redis-server did not accept connections within {REDIS_START:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(redis)
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        // Only while it is ours and alive: once it has been reaped (the host
        // agent reaps our dead children too) its pid may be someone else's.
        if matches!(self.child.try_wait(), Ok(None)) {
            if let Ok(pid) = i32::try_from(self.child.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
            let _ = self.child.wait();
        }
    }
}

/// Runs a server on its own task; its end, for whatever reason, stops the
/// whole stack.
fn serve<E: Send + 'static>(
    stop: &CancellationToken,
    server: impl std::future::Future<Output = Result<(), E>> + Send + 'static,
) -> tokio::task::JoinHandle<Result<(), E>> {
    let stop = stop.clone();
    tokio::spawn(async move {
        let r = server.await;
        stop.cancel();
        r
    })
}

/// Asks the control plane until it lists the host agent `dev` (false after
/// [`READY_LIMIT`], or when the stack is stopping).
async fn host_registered(endpoint: &str, access: &Access, stop: &CancellationToken) -> bool {
    let Ok(mut c) = crate::client::connect(endpoint, access) else {
        return false;
    };
    let deadline = Instant::now() + READY_LIMIT;
    while Instant::now() < deadline && !stop.is_cancelled() {
        if let Ok(r) = c.hosts.list_hosts(ListHostsRequest {}).await {
            if r.into_inner().hosts.iter().any(|h| h.id == "dev") {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Parses a server's configuration from `args` alone: AGENTPLANE_* variables
/// in the caller's environment are meant for their own servers, not for the
/// stack `dev` makes.
fn parse_isolated<C: clap::Parser>(args: &[&str]) -> Result<C, clap::Error> {
    let cmd = C::command().mut_args(|a| a.env(None::<&'static str>));
    C::from_arg_matches(&cmd.try_get_matches_from(args)?)
}

/// Says why the configuration is refused; the exit code of bad config.
fn refuse(msg: &str) -> ExitCode {
    eprintln!("agentctl dev: invalid configuration: {msg}");
    ExitCode::from(u8::try_from(agentplane::EXIT_USAGE).unwrap_or(64))
}

/// Runs the stack until SIGINT/SIGTERM; agents are stopped on the way out.
/// Bad configuration (an address in use included) exits 64 before anything
/// starts.
pub async fn run(args: DevArgs) -> anyhow::Result<ExitCode> {
    if let Some(url) = &args.redis_url {
        if let Err(m) = parse_isolated::<agentplane_control_plane::Config>(&[
            "control-plane",
            "--insecure",
            "--redis-url",
            url,
        ])
        .map_err(|e| e.to_string())
        .and_then(|c| c.validate())
        {
            return Ok(refuse(&m));
        }
    }
    let cp_listener = match TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => return Ok(refuse(&format!("--listen {}: {e}", args.listen))),
    };
    let host_listener = match TcpListener::bind(args.host_listen).await {
        Ok(l) => l,
        Err(e) => return Ok(refuse(&format!("--host-listen {}: {e}", args.host_listen))),
    };
    let cp_addr = cp_listener.local_addr()?;
    let host_addr = host_listener.local_addr()?;
    let temp;
    let dir = match &args.data_dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
            d.clone()
        }
        None => {
            temp = tempfile::Builder::new()
                .prefix("agentplane-dev.")
                .tempdir()
                .context("create a temporary directory")?;
            temp.path().to_owned()
        }
    };
    let redis = match &args.redis_url {
        Some(_) => None,
        None => Some(PrivateRedis::start(&dir)?),
    };
    let redis_url = redis.as_ref().map_or_else(
        || args.redis_url.clone().unwrap_or_default(),
        |r| r.url.clone(),
    );
    let data_dir = dir.join("host");
    // TLS and a token even here: a CA, certificates and an admin token of
    // its own, in a 0700 directory that goes with the stack.
    let ips: Vec<String> = [cp_addr.ip().to_string(), host_addr.ip().to_string()]
        .into_iter()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let secrets = DevSecrets::create(&dir, "dev", &ips)?;
    let path = |p: &Path| p.display().to_string();
    let (ca, tokens) = (path(&secrets.ca), path(&secrets.tokens));
    let (cp_cert, cp_key) = (
        path(&secrets.control_plane.0),
        path(&secrets.control_plane.1),
    );
    let (host_cert, host_key) = (path(&secrets.host.0), path(&secrets.host.1));
    let cp_metrics = args.metrics_listen.map(|a| a.to_string());
    let cp_addr_s = cp_addr.to_string();
    let mut cp_args = vec![
        "control-plane",
        "--tls-cert",
        &cp_cert,
        "--tls-key",
        &cp_key,
        "--tls-client-ca",
        &ca,
        "--token-file",
        &tokens,
        "--listen",
        &cp_addr_s,
        "--redis-url",
        &redis_url,
    ];
    if let Some(m) = &cp_metrics {
        cp_args.extend(["--metrics-listen", m]);
    }
    let cp_config = parse_isolated::<agentplane_control_plane::Config>(&cp_args)?;
    cp_config
        .validate()
        .map_err(|m| anyhow::anyhow!("control plane: {m}"))?;
    // Agents run as whoever runs `dev`; as root that needs saying.
    let root = nix::unistd::geteuid().is_root();
    if root {
        eprintln!("agentctl dev: running as root, so agents run as root too (--allow-root-agents)");
    }
    let host_addr_s = host_addr.to_string();
    let data_dir_s = data_dir.to_string_lossy();
    let mut host_args = vec![
        "host-agent",
        "--tls-cert",
        &host_cert,
        "--tls-key",
        &host_key,
        "--tls-client-ca",
        &ca,
        "--listen",
        &host_addr_s,
        "--redis-url",
        &redis_url,
        "--host-id",
        "dev",
        "--data-dir",
        &data_dir_s,
        // A developer's Ctrl-C ends everything it started, and a SIGKILLed
        // agentctl dev leaves no agent behind either (no orphan grace).
        "--stop-agents-on-exit",
        "--orphan-grace",
        "0s",
    ];
    if root {
        host_args.push("--allow-root-agents");
    }
    let host_metrics = args.host_metrics_listen.map(|a| a.to_string());
    if let Some(m) = &host_metrics {
        host_args.extend(["--metrics-listen", m.as_str()]);
    }
    let host_config = parse_isolated::<agentplane_host_agent::Config>(&host_args)?;
    host_config
        .validate()
        .map_err(|m| anyhow::anyhow!("host agent: {m}"))?;

    // `dev` exports no traces: its two servers share one process and logger.
    agentplane::telemetry::init_logs(false);
    // One token stops both servers: Ctrl-C, or either of them ending.
    let stop = CancellationToken::new();
    let host = serve(
        &stop,
        agentplane_host_agent::run(host_listener, host_config, stop.clone().cancelled_owned()),
    );
    let cp = serve(
        &stop,
        agentplane_control_plane::run(cp_listener, cp_config, stop.clone().cancelled_owned()),
    );
    // Ready means a spawn can be placed: the host agent is registered.
    let endpoint = format!("https://{cp_addr}");
    let token = std::fs::read_to_string(&secrets.token_file)?;
    let access = Access::trusting(
        std::fs::read(&secrets.ca)?,
        token.trim(),
        Duration::from_secs(2),
    )?;
    let ready = host_registered(&endpoint, &access, &stop).await;
    // A plain `agentctl` (no flags) finds the stack through the current
    // context: `dev`, until this exits.
    let context = write_context(&endpoint, &secrets);
    if let Err(e) = &context {
        eprintln!("agentctl dev: cannot write the context ({e:#}); pass --endpoint, --ca and --token-file");
    }
    if !ready {
        eprintln!("agentctl dev: the host agent did not register within {READY_LIMIT:?}");
        stop.cancel();
    }
    let private = if redis.is_some() { " (private)" } else { "" };
    println!("control plane {endpoint}");
    println!("host agent dev at {host_addr}");
    println!("redis {redis_url}{private}");
    println!("data in {}", dir.display());
    if let Ok(p) = &context {
        println!(
            "context {DEV_CONTEXT} in {} (current while this runs: a plain agentctl uses it)",
            p.display()
        );
    }
    println!("ca {}", secrets.ca.display());
    println!("token file {}", secrets.token_file.display());
    println!("try: agentctl spawn -- sh -c 'while :; do date; sleep 1; done'");
    println!("     agentctl ls; agentctl logs -f ID; agentctl stop ID");
    println!("Ctrl-C stops everything, agents included.");

    tokio::select! {
        () = agentplane::shutdown::shutdown_signal() => {}
        () = stop.cancelled() => {}
    }
    eprintln!("agentctl dev: stopping (agents first)");
    stop.cancel();
    // A second SIGINT/SIGTERM forces the exit; the host agent's guard then
    // SIGKILLs the agents and the kernel the private redis-server.
    let scratch = args.data_dir.is_none().then(|| dir.clone());
    let written = context.ok().map(|_| endpoint.clone());
    let forced = written.clone();
    tokio::spawn(async move {
        agentplane::shutdown::shutdown_signal().await;
        eprintln!("agentctl dev: second signal, exiting now");
        if let Some(d) = scratch {
            let _ = std::fs::remove_dir_all(d);
        }
        if let Some(e) = forced {
            remove_context(&e);
        }
        std::process::exit(130);
    });
    let (h, c) = tokio::join!(host, cp);
    drop(redis);
    if let Some(e) = written {
        remove_context(&e);
    }
    let mut failed = false;
    if let Ok(Err(e)) = h {
        eprintln!("agentctl dev: host agent: {e}");
        failed = true;
    }
    if let Ok(Err(e)) = c {
        eprintln!("agentctl dev: control plane: {e}");
        failed = true;
    }
    Ok(if failed || !ready {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The context `agentctl dev` adds while it runs.
const DEV_CONTEXT: &str = "dev";

/// Adds context `dev` for this stack and makes it current (the one before
/// is remembered); returns the config file's path.
fn write_context(endpoint: &str, secrets: &DevSecrets) -> anyhow::Result<std::path::PathBuf> {
    let mut cfg = UserConfig::load()?;
    cfg.set(
        DEV_CONTEXT,
        contexts::Context {
            endpoints: vec![endpoint.to_owned()],
            ca: Some(secrets.ca.clone()),
            token_file: Some(secrets.token_file.clone()),
            ..Default::default()
        },
        true,
    );
    cfg.save()
}

/// Removes context `dev` if it is still this stack's (a newer `dev` may
/// have replaced it); the context before it is current again.
fn remove_context(endpoint: &str) {
    let removed = UserConfig::load().map(|mut cfg| {
        if cfg.delete(DEV_CONTEXT, Some(endpoint)) {
            cfg.save().map(|_| ())
        } else {
            Ok(())
        }
    });
    if let Err(e) | Ok(Err(e)) = removed {
        eprintln!("agentctl dev: cannot remove its context: {e:#}");
    }
}
