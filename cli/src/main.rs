//! `agentctl`: the command-line client of agentplane. Data goes to stdout,
//! diagnostics to stderr; a failed call exits non-zero with the gRPC code in
//! the message.

mod access;
mod client;
mod commands;
mod complete;
mod contexts;
mod output;
mod progress;

use std::process::ExitCode;
use std::time::Duration;

use agentplane::config::parse_duration;
use clap::{Parser, Subcommand};

use crate::output::Format;

/// Where agentctl looks for a control plane unless told otherwise.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:7700";

/// Control agents running across many machines.
#[derive(Debug, Parser)]
#[command(name = "agentctl", version = agentplane::VERSION)]
struct Cli {
    /// Control-plane address(es), comma-separated [default: the current
    /// context's (`agentctl config`), else http://127.0.0.1:7700].
    #[arg(long, global = true, env = "AGENTPLANE_ENDPOINT")]
    endpoint: Option<String>,

    /// Use this context of ~/.config/agentplane/config.toml instead of the
    /// current one (flags still override its fields).
    #[arg(long, global = true, env = "AGENTPLANE_CONTEXT")]
    context: Option<String>,

    /// Output format.
    #[arg(short = 'o', long = "output", global = true, env = "AGENTPLANE_OUTPUT", value_enum, default_value_t = Format::Table)]
    output: Format,

    /// Deadline of each call to the control plane (a stop adds its grace).
    #[arg(long, global = true, env = "AGENTPLANE_CALL_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    call_timeout: Duration,

    /// TLS and the token.
    #[command(flatten)]
    access: access::AccessArgs,

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
        #[arg(add = clap_complete::ArgValueCompleter::new(crate::complete::hosts))]
        id: String,
    },
    /// Place agents on a host again.
    Uncordon {
        /// Host id.
        #[arg(add = clap_complete::ArgValueCompleter::new(crate::complete::hosts))]
        id: String,
    },
    /// Cordon a host and move its agents away; prints progress until it is empty.
    Drain {
        /// Host id.
        #[arg(add = clap_complete::ArgValueCompleter::new(crate::complete::hosts))]
        id: String,
        /// Also stop agents that cannot move (restart never, or pinned).
        #[arg(long)]
        force: bool,
        /// Give up after this long.
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        timeout: Duration,
    },
}

fn main() -> ExitCode {
    // `agentctl dev` runs a host agent, whose guard is this binary
    // re-executed; it must not start a runtime.
    if std::env::args().nth(1).as_deref() == Some(agentplane_host_agent::supervisor::GUARD_ARG) {
        agentplane_host_agent::supervisor::run_guard();
    }
    if std::env::args().nth(1).as_deref() == Some(agentplane_host_agent::keeper::FORKER_ARG) {
        let args: Vec<String> = std::env::args().skip(2).collect();
        agentplane_host_agent::keeper::run_forker(&args);
    }
    if std::env::args().nth(1).as_deref() == Some(agentplane_host_agent::keeper::KEEPER_ARG) {
        let args: Vec<String> = std::env::args().skip(2).collect();
        agentplane_host_agent::keeper::run_keeper(&args);
    }
    // `COMPLETE=bash agentctl` prints the shell's hook; the hook calls back
    // here to complete names and host ids from the live cluster.
    clap_complete::CompleteEnv::with_factory(<Cli as clap::CommandFactory>::command).complete();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        // `dev` runs the servers, so it keeps their contract: bad
        // configuration exits 64. Other commands keep clap's usage code (2).
        Err(e) if e.use_stderr() && runs_dev(std::env::args().skip(1)) => {
            let _ = e.print();
            return ExitCode::from(u8::try_from(agentplane::EXIT_USAGE).unwrap_or(64));
        }
        Err(e) => e.exit(),
    };
    // The servers of `dev` want worker threads; a client call does not.
    let runtime = if matches!(cli.command, commands::Command::Dev(_)) {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("agentctl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let endpoint = cli
        .endpoint
        .clone()
        .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned());
    match runtime.block_on(commands::run(cli)) {
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

/// Whether the command line's subcommand is `dev` (the first word that is
/// neither a flag nor the value of a global flag).
fn runs_dev(mut args: impl Iterator<Item = String>) -> bool {
    while let Some(a) = args.next() {
        match a.as_str() {
            "--endpoint" | "-o" | "--output" | "--call-timeout" | "--ca" | "--cert" | "--key"
            | "--tls-server-name" | "--token" | "--token-file" => {
                args.next();
            }
            s if s.starts_with('-') => {}
            s => return s == "dev",
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::runs_dev;

    fn words(s: &str) -> impl Iterator<Item = String> + '_ {
        s.split_whitespace().map(str::to_owned)
    }

    #[test]
    fn finds_the_dev_subcommand_past_global_flags() {
        assert!(runs_dev(words("dev --listen x")));
        assert!(runs_dev(words("-o json --endpoint http://a dev")));
        assert!(runs_dev(words("--endpoint=http://a dev")));
        assert!(!runs_dev(words("--endpoint dev get x")));
        assert!(!runs_dev(words("get dev")));
        assert!(!runs_dev(words("")));
    }
}
