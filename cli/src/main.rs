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
#[derive(Debug, Subcommand)]
pub enum HostsCommand {
    /// List live hosts.
    Ls,
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
