//! `agentctl get`, `locate` and `ls`.

use agentplane::proto::v1::{AgentState, GetAgentRequest, ListAgentsRequest, LocateAgentRequest};

use crate::client::Clients;
use crate::output::{self, Format};

/// Arguments of `ls`.
#[derive(Debug, Clone, clap::Args)]
pub struct LsArgs {
    /// Only agents on this host.
    #[arg(long)]
    host: Option<String>,
    /// Only agents in this state (running, paused, exited, …).
    #[arg(long, value_parser = parse_state)]
    state: Option<AgentState>,
    /// Only agents whose labels match, `k=v,k2=v2`.
    #[arg(long, short = 'l')]
    selector: Option<String>,
}

fn parse_state(s: &str) -> Result<AgentState, String> {
    agentplane::state::parse(s).ok_or_else(|| {
        format!("`{s}` is not a state (pending, running, paused, stopping, exited, failed, lost)")
    })
}

/// Prints one agent.
pub async fn get(c: &mut Clients, fmt: Format, id: String) -> anyhow::Result<()> {
    let a = c
        .agents
        .get_agent(GetAgentRequest { id })
        .await?
        .into_inner();
    match fmt {
        Format::Json | Format::Yaml => output::document(fmt, &output::AgentView::from(&a)),
        Format::Table => {
            output::table(output::AGENT_HEADER, &[output::agent_row(&a)]);
            if let Some(e) = a.exit.as_ref().filter(|e| !e.error.is_empty()) {
                println!("\nerror: {}", e.error);
            }
            Ok(())
        }
    }
}

/// Prints where an agent runs.
pub async fn locate(c: &mut Clients, fmt: Format, id: String) -> anyhow::Result<()> {
    let l = c
        .agents
        .locate_agent(LocateAgentRequest { id })
        .await?
        .into_inner();
    match fmt {
        Format::Json | Format::Yaml => output::document(fmt, &output::LocationView::from(&l)),
        Format::Table => {
            output::table(
                &["ID", "HOST", "ADDRESS", "LIVE", "STATE", "PID", "GEN"],
                &[vec![
                    l.id.clone(),
                    l.host.clone(),
                    if l.address.is_empty() {
                        "-".into()
                    } else {
                        l.address.clone()
                    },
                    l.live.to_string(),
                    agentplane::state::name(l.state()).to_owned(),
                    l.pid.to_string(),
                    l.generation.to_string(),
                ]],
            );
            Ok(())
        }
    }
}

/// Prints every matching agent (all pages).
pub async fn ls(c: &mut Clients, fmt: Format, a: LsArgs) -> anyhow::Result<()> {
    let mut agents = list_all(
        c,
        ListAgentsRequest {
            host: a.host.unwrap_or_default(),
            state: a.state.map_or(0, |s| s as i32),
            label_selector: a.selector.unwrap_or_default(),
            ..Default::default()
        },
    )
    .await?;
    agents.sort_by(|x, y| x.id.cmp(&y.id));
    match fmt {
        Format::Json | Format::Yaml => {
            let views: Vec<output::AgentView> =
                agents.iter().map(output::AgentView::from).collect();
            output::document(fmt, &views)
        }
        Format::Table => {
            let rows: Vec<Vec<String>> = agents.iter().map(output::agent_row).collect();
            output::table(output::AGENT_HEADER, &rows);
            Ok(())
        }
    }
}

/// Every agent `query` matches, all pages.
pub async fn list_all(
    c: &mut Clients,
    mut query: ListAgentsRequest,
) -> anyhow::Result<Vec<agentplane::proto::v1::Agent>> {
    query.page_size = 1000;
    let mut agents = Vec::new();
    loop {
        let page = c.agents.list_agents(query.clone()).await?.into_inner();
        agents.extend(page.agents);
        if page.next_page_token.is_empty() {
            return Ok(agents);
        }
        query.page_token = page.next_page_token;
    }
}
