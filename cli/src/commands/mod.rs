//! The subcommands, one file per noun: `spawn`, `agents` (get, locate, ls),
//! `control` (pause, resume, stop, kill, rm), `hosts`, `logs`, `attach`,
//! `watch`, `dev` (a local stack in one process).

mod agents;
pub use agents::list_all;
pub use hosts::list as list_hosts;
mod attach;
mod bulk;
mod certs;
mod config;
mod control;
mod dev;
pub mod dev_secrets;
mod health;
mod hosts;
mod logs;
mod spawn;
mod status;
mod top;
mod wait;
mod watch;

use std::process::ExitCode;
use std::time::Duration;

use agentplane::config::{parse_duration, parse_key_value};
use clap::Subcommand;

use crate::access::Access;
use crate::client::{self, Clients};
use crate::{Cli, HostsCommand};

/// Every command.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Place an agent on a host and start it: `agentctl spawn -- CMD ARGS…`.
    Spawn(Box<spawn::SpawnArgs>),
    /// Show one agent's record.
    Get {
        /// Agent id or name.
        #[arg(add = clap_complete::ArgValueCompleter::new(crate::complete::agents))]
        id: String,
    },
    /// Show where an agent runs: host, address, liveness.
    Locate {
        /// Agent id or name.
        #[arg(add = clap_complete::ArgValueCompleter::new(crate::complete::agents))]
        id: String,
    },
    /// List agents.
    Ls(agents::LsArgs),
    /// Stop (SIGSTOP) every process of agents (ids, names, a selector of
    /// running ones, or --all).
    Pause(control::Targets),
    /// Continue (SIGCONT) paused agents.
    Resume(control::Targets),
    /// SIGTERM agents' process groups, SIGKILL after the grace; several are
    /// stopped concurrently (--selector, --all: every one not yet ended).
    Stop {
        #[command(flatten)]
        targets: control::Targets,
        /// Time between SIGTERM and SIGKILL (default: the agent's stop_grace).
        #[arg(long, value_parser = parse_duration)]
        grace: Option<Duration>,
    },
    /// Send a signal to an agent's process group.
    Kill {
        /// Agent id or name.
        #[arg(add = clap_complete::ArgValueCompleter::new(crate::complete::agents))]
        id: String,
        /// Signal name or number (KILL, SIGTERM, 15…).
        #[arg(short = 's', long = "signal", default_value = "KILL")]
        signal: String,
    },
    /// Delete ended agents' records (--selector, --all: every ended one).
    Rm {
        #[command(flatten)]
        targets: control::Targets,
        /// Stop running agents first instead of refusing (with --selector
        /// or --all: take running ones too).
        #[arg(short, long)]
        force: bool,
    },
    /// Hosts.
    Hosts {
        #[command(subcommand)]
        command: HostsCommand,
    },
    /// Print an agent's output (`-f` follows it).
    Logs(logs::LogsArgs),
    /// Write text to an agent's standard input.
    Send(logs::SendArgs),
    /// Attach to an agent: its output, your input; Ctrl-] detaches.
    Attach(attach::AttachArgs),
    /// Spawn an agent and attach to it; exits with its exit code. With --rm
    /// the agent is stopped when the session goes away.
    Run(Box<attach::RunArgs>),
    /// Print agent and host events as they happen; reconnects (to the next
    /// endpoint) with the last token, so no event is missed or repeated.
    Watch(watch::WatchArgs),
    /// Run a whole local stack in this process for trying agentplane out: a
    /// private redis-server, a control plane and one host agent ("dev").
    Dev(dev::DevArgs),
    /// Make the CA, certificates and tokens of a deployment (offline, in one
    /// directory): `ca`, `control-plane`, `host ID`, `token NAME`.
    Certs {
        #[command(subcommand)]
        command: certs::CertsCommand,
    },
    /// Wait until agents reach a state (`--for state=RUNNING`) or end for
    /// good (`--for exited`); exit 1 at the timeout, naming those that did not.
    Wait(wait::WaitArgs),
    /// A live dashboard of hosts and agents (state, restarts, CPU, memory,
    /// output rate) in the terminal; q quits.
    Top(top::TopArgs),
    /// Each endpoint's health and counters (memory, tasks, panicked tasks,
    /// open log and watch streams), as a table; exit 1 unless all are SERVING.
    Status,
    /// Named contexts (endpoints, CA, certificate, token file) in
    /// ~/.config/agentplane/config.toml: `get-contexts`, `use-context NAME`,
    /// `set-context NAME`, `delete-context NAME`, `current-context`.
    Config {
        #[command(subcommand)]
        command: config::ConfigCommand,
    },
    /// Check a server's gRPC health (exit 0 when SERVING): for probes, e.g.
    /// against a server's plaintext `--health-listen` port.
    Health {
        /// The service to ask about (empty: the server as a whole).
        #[arg(long, default_value = "")]
        service: String,
    },
    /// Print a shell completion script: `agentctl completion bash >
    /// /etc/bash_completion.d/agentctl` (or zsh, fish, elvish, powershell).
    Completion {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
}

/// Runs the parsed command line against the first endpoint that answers:
/// an UNAVAILABLE answer moves on to the next one (`--endpoint a,b`). Spawns
/// carry a request id (generated when not given), so a retry on another
/// replica never makes a second agent.
pub async fn run(mut cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Dev(args) = cli.command {
        return dev::run(args).await;
    }
    if let Command::Certs { command } = cli.command {
        return certs::run(command);
    }
    if let Command::Config { command } = cli.command {
        return config::run(command, cli.output);
    }
    let endpoint = crate::contexts::resolve(
        cli.endpoint.take(),
        cli.context.as_deref(),
        &mut cli.access,
        crate::DEFAULT_ENDPOINT,
    )?;
    let endpoints = crate::contexts::split_endpoints(&endpoint);
    anyhow::ensure!(
        !endpoints.is_empty(),
        "--endpoint: give at least one address"
    );
    let access = Access::load(&cli.access, cli.call_timeout)?;
    if let Command::Top(args) = cli.command {
        return top::run(&endpoints[0], &access, args).await;
    }
    if let Command::Status = cli.command {
        return status::run(&endpoints, cli.output, &access).await;
    }
    if let Command::Health { service } = cli.command {
        return health::run(&endpoints[0], service, &access).await;
    }
    if let Command::Completion { shell } = cli.command {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut cmd, "agentctl", &mut std::io::stdout());
        return Ok(ExitCode::SUCCESS);
    }
    let fmt = cli.output;
    let mut command = cli.command;
    if let Command::Spawn(args) = &mut command {
        args.ensure_request_id();
    }
    if let Command::Watch(args) = command {
        watch::run(&endpoints, fmt, args, &access).await?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::Run(args) = command {
        let mut c = client::connect_streaming(&endpoints[0], &access)?;
        return attach::run(&mut c, *args).await;
    }
    if let Command::Attach(args) = command {
        let mut c = client::connect_streaming(&endpoints[0], &access)?;
        attach::attach(&mut c, args).await?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::Ls(args) = &command {
        if args.watch {
            agents::ls_watch(&endpoints[0], fmt, args.clone(), &access).await?;
            return Ok(ExitCode::SUCCESS);
        }
    }
    if let Command::Wait(args) = command {
        return wait::run(&endpoints[0], args, &access).await;
    }
    if let Command::Logs(args) = command {
        logs::run(&endpoints, args, &access).await?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut last = None;
    for (i, endpoint) in endpoints.iter().enumerate() {
        let mut c = client::connect(endpoint, &access)?;
        match dispatch(&mut c, fmt, command.clone(), cli.call_timeout).await {
            Ok(code) => return Ok(code),
            Err(e) if i + 1 < endpoints.len() && client::is_unavailable(&e) => {
                eprintln!(
                    "agentctl: {endpoint} is unavailable; trying {}",
                    endpoints[i + 1]
                );
                last = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no endpoint answered")))
}

/// The id of the agent `given` names (itself when it is an id): read once
/// by commands that reconnect, so a name reused meanwhile cannot switch
/// agents under them. When the lookup fails the name is used as is (the
/// server resolves it, and says what is wrong).
pub(crate) async fn resolve_once(
    endpoint: &str,
    access: &crate::access::Access,
    given: &str,
) -> String {
    if agentplane::ids::is_agent_id(given) {
        return given.to_owned();
    }
    let Ok(mut c) = client::connect(endpoint, access) else {
        return given.to_owned();
    };
    match c
        .agents
        .get_agent(agentplane::proto::v1::GetAgentRequest {
            id: given.to_owned(),
        })
        .await
    {
        Ok(a) => a.into_inner().id,
        Err(_) => given.to_owned(),
    }
}

async fn dispatch(
    c: &mut Clients,
    fmt: crate::output::Format,
    command: Command,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let done = match command {
        Command::Spawn(args) => return spawn::run(c, fmt, *args).await,
        Command::Get { id } => agents::get(c, fmt, id).await,
        Command::Locate { id } => agents::locate(c, fmt, id).await,
        Command::Ls(args) => agents::ls(c, fmt, args).await,
        Command::Pause(targets) => {
            return control::act(c, fmt, targets, control::Op::Pause, timeout).await
        }
        Command::Resume(targets) => {
            return control::act(c, fmt, targets, control::Op::Resume, timeout).await
        }
        Command::Stop { targets, grace } => {
            return control::act(c, fmt, targets, control::Op::Stop { grace }, timeout).await
        }
        Command::Kill { id, signal } => control::kill(c, fmt, id, &signal).await,
        Command::Rm { targets, force } => {
            return control::act(c, fmt, targets, control::Op::Rm { force }, timeout).await
        }
        Command::Hosts { command } => hosts::run(c, fmt, command).await,
        Command::Send(args) => logs::send(c, args).await,
        Command::Watch(_)
        | Command::Logs(_)
        | Command::Run(_)
        | Command::Attach(_)
        | Command::Completion { .. }
        | Command::Health { .. }
        | Command::Status
        | Command::Top(_)
        | Command::Wait(_)
        | Command::Certs { .. }
        | Command::Config { .. }
        | Command::Dev(_) => {
            anyhow::bail!("internal error: this command is run before dispatch")
        }
    };
    done.map(|()| ExitCode::SUCCESS)
}

/// Parses `KEY=VALUE` for clap.
pub fn key_value(s: &str) -> Result<(String, String), String> {
    parse_key_value(s)
}
