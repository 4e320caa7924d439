//! `agentctl`: the command-line client of agentplane. Data goes to stdout,
//! diagnostics to stderr; a failed call exits non-zero with the gRPC code in
//! the message.

mod client;
mod commands;
mod output;

use std::process::ExitCode;
use std::time::Duration;

use agentplane::config::parse_duration;
use clap::{Parser, Subcommand};

use crate::output::Format;

/// Control agents running across many machines.
#[derive(Debug, Parser)]
#[command(name = "agentctl", version = agentplane::VERSION)]
struct Cli {
    /// Control-plane address.
    #[arg(
        long,
        global = true,
        env = "AGENTPLANE_ENDPOINT",
        default_value = "http://127.0.0.1:7700"
    )]
    endpoint: String,

    /// Output format.
    #[arg(short = 'o', long = "output", global = true, env = "AGENTPLANE_OUTPUT", value_enum, default_value_t = Format::Table)]
    output: Format,

    /// Deadline of each call to the control plane (a stop adds its grace).
    #[arg(long, global = true, env = "AGENTPLANE_CALL_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    call_timeout: Duration,

    #[command(subcommand)]
    command: commands::Command,
}

/// Host subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum HostsCommand {
    /// List live hosts.
    Ls,
    /// Place no new agents on a host.
    Cordon {
        /// Host id.
        id: String,
    },
    /// Place agents on a host again.
    Uncordon {
        /// Host id.
        id: String,
    },
    /// Cordon a host and move its agents away; prints progress until it is empty.
    Drain {
        /// Host id.
        id: String,
        /// Also stop agents that cannot move (restart never, or pinned).
        #[arg(long)]
        force: bool,
        /// Give up after this long.
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        timeout: Duration,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let endpoint = cli.endpoint.clone();
    match commands::run(cli).await {
        Ok(code) => code,
        Err(e) => {
            match e.downcast_ref::<tonic::Status>() {
                Some(status) => eprintln!("agentctl: {}", client::describe(&endpoint, status)),
                None => eprintln!("agentctl: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}
