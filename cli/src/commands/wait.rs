//! `agentctl wait --for state=RUNNING|exited ID…`: like `kubectl wait`,
//! returns once every agent meets the condition, printing a line for each
//! as it does; exits 1 at `--timeout` naming those that did not. The watch
//! stream is opened before the records are read, so a change between the
//! two is never missed.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use agentplane::proto::v1::{Agent, AgentState, GetAgentRequest, WatchAgentsRequest};

use crate::access::Access;
use crate::client::{self, Clients};

/// `wait`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct WaitArgs {
    /// Agents, by id or name.
    #[arg(required = true, add = clap_complete::ArgValueCompleter::new(crate::complete::agents))]
    pub ids: Vec<String>,
    /// `state=STATE` (running, paused, exited, …): the agent is in that
    /// state; `exited`: it ended for good (ended, and no restart to come).
    #[arg(long = "for", value_parser = parse_condition)]
    pub condition: Condition,
    /// Give up after this long (exit 1).
    #[arg(long, default_value = "30s", value_parser = agentplane::config::parse_duration)]
    pub timeout: Duration,
}

/// What `wait` waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// The record is in this state.
    State(AgentState),
    /// It ended and nothing will start it again.
    Exited,
}

impl Condition {
    fn met(self, a: &Agent) -> bool {
        match self {
            Self::State(s) => a.state() == s,
            Self::Exited => agentplane::state::has_ended(a),
        }
    }
}

fn parse_condition(s: &str) -> Result<Condition, String> {
    let lower = s.trim().to_ascii_lowercase();
    if lower == "exited" || lower == "ended" {
        return Ok(Condition::Exited);
    }
    let state = lower
        .strip_prefix("state=")
        .ok_or_else(|| format!("`{s}`: use state=STATE (running, paused, exited, …) or exited"))?;
    agentplane::state::parse(state)
        .map(Condition::State)
        .ok_or_else(|| format!("`{state}` is not a state (pending, running, paused, stopping, exited, failed, lost)"))
}

/// Waits; exit 0 when every agent met the condition.
pub async fn run(endpoint: &str, args: WaitArgs, access: &Access) -> anyhow::Result<ExitCode> {
    let mut c = client::connect(endpoint, access)?;
    let mut streams = client::connect_streaming(endpoint, access)?;
    let mut events = streams
        .agents
        .watch_agents(WatchAgentsRequest::default())
        .await?
        .into_inner();
    let deadline = tokio::time::Instant::now() + args.timeout;
    // Names become ids once; events name agents by id. Shown as given.
    let mut waiting: BTreeMap<String, String> = BTreeMap::new();
    for given in &args.ids {
        let a = get(&mut c, given).await?;
        if args.condition.met(&a) {
            println!("agent/{given} condition met");
        } else {
            waiting.insert(a.id, given.clone());
        }
    }
    while !waiting.is_empty() {
        let next = tokio::time::timeout_at(deadline, events.message()).await;
        let ev = match next {
            Err(_) => {
                let left: Vec<&str> = waiting.values().map(String::as_str).collect();
                eprintln!(
                    "agentctl: timed out after {:?} waiting for {}",
                    args.timeout,
                    left.join(", ")
                );
                return Ok(ExitCode::FAILURE);
            }
            Ok(r) => r?.ok_or_else(|| anyhow::anyhow!("the watch stream ended"))?,
        };
        let Some(given) = waiting.get(&ev.agent_id).cloned() else {
            continue;
        };
        // A state is the event's (one passed through quickly counts);
        // whether an end is final (no restart to come), the record says.
        let met = match args.condition {
            Condition::State(s) => ev.state() == s,
            Condition::Exited => args.condition.met(&get(&mut c, &ev.agent_id).await?),
        };
        if met {
            println!("agent/{given} condition met");
            waiting.remove(&ev.agent_id);
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn get(c: &mut Clients, id: &str) -> anyhow::Result<Agent> {
    Ok(c.agents
        .get_agent(GetAgentRequest { id: id.to_owned() })
        .await
        .map_err(|s| anyhow::anyhow!("{id}: {}", client::brief(&s)))?
        .into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_read_as_kubectl_writes_them() {
        assert_eq!(
            parse_condition("state=RUNNING"),
            Ok(Condition::State(AgentState::Running))
        );
        assert_eq!(parse_condition("exited"), Ok(Condition::Exited));
        assert!(parse_condition("running").is_err());
        assert!(parse_condition("state=dancing").is_err());
    }
}
