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

/// `pause`.
pub async fn pause(c: &mut Clients, fmt: Format, id: String) -> anyhow::Result<()> {
    print(
        fmt,
        &c.agents
            .pause_agent(PauseAgentRequest { id })
            .await?
            .into_inner(),
    )
}

/// `resume`.
pub async fn resume(c: &mut Clients, fmt: Format, id: String) -> anyhow::Result<()> {
    print(
        fmt,
        &c.agents
            .resume_agent(ResumeAgentRequest { id })
            .await?
            .into_inner(),
    )
}

/// The agents a bulk command acts on.
#[derive(Debug)]
pub enum Which {
    /// These ids.
    Ids(Vec<String>),
    /// Every agent not yet ended whose labels match (empty: every one).
    Selector(String),
}

/// `stop`: one agent prints its record (an error is the command's); several
/// are stopped `parallel` at once, printed in order, with one line on stderr
/// for each that failed (exit 1 if any did).
pub async fn stop(
    c: &mut Clients,
    fmt: Format,
    which: Which,
    grace: Option<Duration>,
    timeout: Duration,
    parallel: usize,
) -> anyhow::Result<ExitCode> {
    let request = move |id: String| {
        let mut req = tonic::Request::new(StopAgentRequest {
            id,
            grace: grace.map(duration_to_proto),
        });
        req.set_timeout(longer(timeout, grace));
        req
    };
    let ids = match which {
        Which::Ids(ids) if ids.len() == 1 => {
            let id = ids.into_iter().next().unwrap_or_default();
            print(fmt, &c.agents.stop_agent(request(id)).await?.into_inner())?;
            return Ok(ExitCode::SUCCESS);
        }
        Which::Ids(ids) => ids,
        Which::Selector(selector) => super::agents::list_all(
            c,
            ListAgentsRequest {
                label_selector: selector,
                ..Default::default()
            },
        )
        .await?
        .into_iter()
        .filter(|a| !agentplane::state::has_ended(a))
        .map(|a| a.id)
        .collect(),
    };
    let results = bulk::fan_out(ids.clone(), parallel, |id| {
        let mut c = c.clone();
        let req = request(id);
        async move { c.agents.stop_agent(req).await }
    })
    .await;
    let mut stopped = Vec::with_capacity(results.len());
    for (id, r) in ids.iter().zip(results) {
        match r {
            Ok(a) => stopped.push(a.into_inner()),
            Err(s) => eprintln!("agentctl: stop {id}: {}", client::brief(&s)),
        }
    }
    many(fmt, &stopped)?;
    Ok(if stopped.len() == ids.len() {
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

/// `rm`.
pub async fn rm(c: &mut Clients, id: String, force: bool, timeout: Duration) -> anyhow::Result<()> {
    let mut req = tonic::Request::new(DeleteAgentRequest {
        id: id.clone(),
        force,
    });
    req.set_timeout(longer(timeout, None));
    c.agents.delete_agent(req).await?;
    eprintln!("deleted {id}");
    Ok(())
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
