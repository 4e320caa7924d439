//! `agentctl spawn`.

use std::time::Duration;

use agentplane::config::parse_duration;
use agentplane::proto::v1::{AgentSpec, Placement, SpawnAgentRequest};
use agentplane::time::duration_to_proto;

use super::key_value;
use crate::client::Clients;
use crate::output::{self, Format};

/// Arguments of `spawn`.
#[derive(Debug, clap::Args)]
pub struct SpawnArgs {
    /// A name for the agent (lowercase letters, digits, '-').
    #[arg(long)]
    name: Option<String>,
    /// Run on this host.
    #[arg(long)]
    host: Option<String>,
    /// Run on a host whose labels match, `k=v,k2=v2`.
    #[arg(long)]
    selector: Option<String>,
    /// A label of the agent, KEY=VALUE; repeat for more.
    #[arg(long = "label", value_parser = key_value)]
    labels: Vec<(String, String)>,
    /// An environment variable, KEY=VALUE; repeat for more.
    #[arg(long = "env", short = 'e', value_parser = key_value)]
    env: Vec<(String, String)>,
    /// Working directory on the host (absolute).
    #[arg(long)]
    cwd: Option<String>,
    /// Default time between SIGTERM and SIGKILL when stopping it.
    #[arg(long, value_parser = parse_duration)]
    grace: Option<Duration>,
    /// Idempotency key: retrying with the same key never makes a second agent.
    #[arg(long)]
    request_id: Option<String>,
    /// The program and its arguments, after `--`.
    #[arg(last = true, required = true, num_args = 1..)]
    argv: Vec<String>,
}

/// Spawns and prints the agent.
pub async fn run(c: &mut Clients, fmt: Format, a: SpawnArgs) -> anyhow::Result<()> {
    let spec = AgentSpec {
        name: a.name.unwrap_or_default(),
        argv: a.argv,
        env: a.env.into_iter().collect(),
        cwd: a.cwd.unwrap_or_default(),
        labels: a.labels.into_iter().collect(),
        placement: Some(Placement {
            host: a.host.unwrap_or_default(),
            label_selector: a.selector.unwrap_or_default(),
        }),
        stop_grace: a.grace.map(duration_to_proto),
    };
    let resp = c
        .agents
        .spawn_agent(SpawnAgentRequest {
            spec: Some(spec),
            request_id: a.request_id.unwrap_or_default(),
        })
        .await?
        .into_inner();
    let agent = resp.agent.unwrap_or_default();
    match fmt {
        Format::Json => output::json(&output::AgentView::from(&agent)),
        Format::Table => {
            output::table(output::AGENT_HEADER, &[output::agent_row(&agent)]);
            Ok(())
        }
    }
}
