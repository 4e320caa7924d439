//! `agentctl pause`, `resume`, `stop`, `kill` and `rm`.

use std::str::FromStr;
use std::time::Duration;

use std::process::ExitCode;

use agentplane::proto::v1::{
    Agent, DeleteAgentRequest, KillAgentRequest, ListAgentsRequest, PauseAgentRequest,
    ResumeAgentRequest, StopAgentRequest,
};
use agentplane::time::duration_to_proto;
use anyhow::bail;
use nix::sys::signal::Signal;

use super::bulk;
use crate::client::{self, Clients};
use crate::output::{self, Format};

fn print(fmt: Format, a: &Agent) -> anyhow::Result<()> {
    match fmt {
        Format::Json | Format::Yaml => output::document(fmt, &output::AgentView::from(a)),
        Format::Table => {
            output::table(output::AGENT_HEADER, &[output::agent_row(a)]);
            Ok(())
        }
    }
}

/// A stop may take its grace plus the SIGKILL wait: give the call that long.
fn longer(timeout: Duration, grace: Option<Duration>) -> Duration {
    timeout + grace.unwrap_or(Duration::from_secs(10)) + Duration::from_secs(10)
}

/// The agents a bulk command acts on (`ID…`, `--selector`, `--all`), and
/// how many calls it has in flight at once.
#[derive(Debug, Clone, clap::Args)]
pub struct Targets {
    /// Agents, by id or name; several are handled concurrently.
    #[arg(
        required_unless_present_any = ["selector", "all"],
        add = clap_complete::ArgValueCompleter::new(crate::complete::agents)
    )]
    pub ids: Vec<String>,
    /// Every agent whose labels match, `k=v,k2=v2` (those the command
    /// applies to: not ended for stop, running for pause, …).
    #[arg(long, conflicts_with_all = ["ids", "all"])]
    pub selector: Option<String>,
    /// Every agent the command applies to.
    #[arg(long, conflicts_with = "ids")]
    pub all: bool,
    /// With several agents: how many calls are in flight at once.
    #[arg(long, default_value_t = bulk::DEFAULT_PARALLEL, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub parallel: u16,
}

/// What a bulk command does to each agent.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    /// SIGSTOP the group.
    Pause,
    /// SIGCONT it.
    Resume,
    /// SIGTERM, the grace, SIGKILL.
    Stop {
        /// The grace (default: the agent's own).
        grace: Option<Duration>,
    },
    /// Delete the record (`force`: stop it first).
    Rm {
        /// Stop a running agent first.
        force: bool,
    },
}

impl Op {
    fn verb(self) -> &'static str {
        match self {
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Stop { .. } => "stop",
            Self::Rm { .. } => "rm",
        }
    }

    /// Whether a selector's match is one this applies to.
    fn applies(self, a: &Agent) -> bool {
        use agentplane::proto::v1::AgentState;
        match self {
            Self::Pause => a.state() == AgentState::Running,
            Self::Resume => a.state() == AgentState::Paused,
            Self::Stop { .. } => !agentplane::state::has_ended(a),
            Self::Rm { force } => force || agentplane::state::has_ended(a),
        }
    }

    /// One call; `None` from a delete (nothing to print but its line).
    async fn call(
        self,
        mut c: Clients,
        id: String,
        timeout: Duration,
    ) -> Result<Option<Agent>, tonic::Status> {
        let agent = match self {
            Self::Pause => c.agents.pause_agent(PauseAgentRequest { id }).await?,
            Self::Resume => c.agents.resume_agent(ResumeAgentRequest { id }).await?,
            Self::Stop { grace } => {
                let mut req = tonic::Request::new(StopAgentRequest {
                    id,
                    grace: grace.map(duration_to_proto),
                });
                req.set_timeout(longer(timeout, grace));
                c.agents.stop_agent(req).await?
            }
            Self::Rm { force } => {
                let mut req = tonic::Request::new(DeleteAgentRequest { id, force });
                req.set_timeout(longer(timeout, None));
                c.agents.delete_agent(req).await?;
                return Ok(None);
            }
        };
        Ok(Some(agent.into_inner()))
    }
}

/// `pause`, `resume`, `stop`, `rm`: one named agent prints its record (an
/// error is the command's); several (ids, a selector, `--all`) are handled
/// `--parallel` at once, printed in order, with one line on stderr for each
/// that failed (exit 1 if any did). `rm` says `deleted ID` for each.
pub async fn act(
    c: &mut Clients,
    fmt: Format,
    targets: Targets,
    op: Op,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let single = targets.ids.len() == 1 && targets.selector.is_none() && !targets.all;
    let ids: Vec<String> = if targets.selector.is_some() || targets.all {
        super::agents::list_all(
            c,
            ListAgentsRequest {
                label_selector: targets.selector.unwrap_or_default(),
                ..Default::default()
            },
        )
        .await?
        .into_iter()
        .filter(|a| op.applies(a))
        .map(|a| a.id)
        .collect()
    } else {
        targets.ids
    };
    if single {
        let id = ids.into_iter().next().unwrap_or_default();
        match op.call(c.clone(), id.clone(), timeout).await? {
            Some(a) => print(fmt, &a)?,
            None => eprintln!("deleted {id}"),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let p = crate::progress::bar(fmt, ids.len() as u64, op.verb());
    let results = bulk::fan_out(ids.clone(), targets.parallel.into(), |id| {
        let (call, p) = (op.call(c.clone(), id, timeout), p.clone());
        async move {
            let r = call.await;
            p.inc(1);
            r
        }
    })
    .await;
    p.finish_and_clear();
    let (mut done, mut failed) = (Vec::with_capacity(results.len()), 0);
    for (id, r) in ids.iter().zip(results) {
        match r {
            Ok(Some(a)) => done.push(a),
            Ok(None) => eprintln!("deleted {id}"),
            Err(s) => {
                failed += 1;
                eprintln!("agentctl: {} {id}: {}", op.verb(), client::brief(&s));
            }
        }
    }
    if !matches!(op, Op::Rm { .. }) {
        many(fmt, &done)?;
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Prints several agents: a list document, or one table.
pub fn many(fmt: Format, agents: &[Agent]) -> anyhow::Result<()> {
    match fmt {
        Format::Json | Format::Yaml => {
            let views: Vec<_> = agents.iter().map(output::AgentView::from).collect();
            output::document(fmt, &views)
        }
        Format::Table => {
            let rows: Vec<_> = agents.iter().map(output::agent_row).collect();
            output::table(output::AGENT_HEADER, &rows);
            Ok(())
        }
    }
}

/// Parses `KILL`, `SIGKILL`, `kill` or `9`.
pub fn parse_signal(s: &str) -> anyhow::Result<i32> {
    if let Ok(n) = s.parse::<i32>() {
        if !(1..=64).contains(&n) {
            bail!("signal {n} is out of range 1-64");
        }
        return Ok(n);
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    match Signal::from_str(&name) {
        Ok(sig) => Ok(sig as i32),
        Err(_) => bail!("`{s}` is not a signal name or number"),
    }
}

/// `kill`.
pub async fn kill(c: &mut Clients, fmt: Format, id: String, signal: &str) -> anyhow::Result<()> {
    let signal = parse_signal(signal)?;
    print(
        fmt,
        &c.agents
            .kill_agent(KillAgentRequest { id, signal })
            .await?
            .into_inner(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals() {
        assert_eq!(parse_signal("KILL").unwrap(), 9);
        assert_eq!(parse_signal("sigterm").unwrap(), 15);
        assert_eq!(parse_signal("15").unwrap(), 15);
        assert!(parse_signal("0").is_err());
        assert!(parse_signal("NOPE").is_err());
    }
}
