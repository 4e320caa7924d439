//! The subcommands, one file per noun: `spawn`, `agents` (get, locate, ls),
//! `control` (pause, resume, stop, kill, rm), `hosts`.

mod agents;
mod control;
mod hosts;
mod spawn;

use std::process::ExitCode;
use std::time::Duration;

use agentplane::config::{parse_duration, parse_key_value};
use clap::Subcommand;

use crate::client::{self, Clients};
use crate::{Cli, HostsCommand};

/// Every command.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Place an agent on a host and start it: `agentctl spawn -- CMD ARGS…`.
    Spawn(Box<spawn::SpawnArgs>),
    /// Show one agent's record.
    Get {
        /// Agent id.
        id: String,
    },
    /// Show where an agent runs: host, address, liveness.
    Locate {
        /// Agent id.
        id: String,
    },
    /// List agents.
    Ls(agents::LsArgs),
    /// Stop (SIGSTOP) every process of an agent.
    Pause {
        /// Agent id.
        id: String,
    },
    /// Continue (SIGCONT) a paused agent.
    Resume {
        /// Agent id.
        id: String,
    },
    /// SIGTERM an agent's process group, SIGKILL after the grace.
    Stop {
        /// Agent id.
        id: String,
        /// Time between SIGTERM and SIGKILL (default: the agent's stop_grace).
        #[arg(long, value_parser = parse_duration)]
        grace: Option<Duration>,
    },
    /// Send a signal to an agent's process group.
    Kill {
        /// Agent id.
        id: String,
        /// Signal name or number (KILL, SIGTERM, 15…).
        #[arg(short = 's', long = "signal", default_value = "KILL")]
        signal: String,
    },
    /// Delete an ended agent's record.
    Rm {
        /// Agent id.
        id: String,
        /// Stop a running agent first instead of refusing.
        #[arg(short, long)]
        force: bool,
    },
    /// Hosts.
    Hosts {
        #[command(subcommand)]
        command: HostsCommand,
    },
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut c: Clients = client::connect(&cli.endpoint, cli.call_timeout)?;
    let fmt = cli.output;
    match cli.command {
        Command::Spawn(args) => spawn::run(&mut c, fmt, *args).await,
        Command::Get { id } => agents::get(&mut c, fmt, id).await,
        Command::Locate { id } => agents::locate(&mut c, fmt, id).await,
        Command::Ls(args) => agents::ls(&mut c, fmt, args).await,
        Command::Pause { id } => control::pause(&mut c, fmt, id).await,
        Command::Resume { id } => control::resume(&mut c, fmt, id).await,
        Command::Stop { id, grace } => {
            control::stop(&mut c, fmt, id, grace, cli.call_timeout).await
        }
        Command::Kill { id, signal } => control::kill(&mut c, fmt, id, &signal).await,
        Command::Rm { id, force } => control::rm(&mut c, id, force, cli.call_timeout).await,
        Command::Hosts {
            command: HostsCommand::Ls,
        } => hosts::ls(&mut c, fmt).await,
    }?;
    Ok(ExitCode::SUCCESS)
}

/// Parses `KEY=VALUE` for clap.
pub fn key_value(s: &str) -> Result<(String, String), String> {
    parse_key_value(s)
}
