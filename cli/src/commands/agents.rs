//! `agentctl get`, `locate` and `ls`.

use agentplane::proto::v1::{
    Agent, AgentState, GetAgentRequest, ListAgentsRequest, LocateAgentRequest,
};

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
    /// After the list, print a row (or a JSON line) for each change of a
    /// matching agent as it happens, until interrupted (kubectl's `-w`).
    #[arg(long, short = 'w')]
    pub watch: bool,
}

impl LsArgs {
    fn query(&self) -> ListAgentsRequest {
        ListAgentsRequest {
            host: self.host.clone().unwrap_or_default(),
            state: self.state.map_or(0, |s| s as i32),
            label_selector: self.selector.clone().unwrap_or_default(),
            ..Default::default()
        }
    }

    /// Whether a changed agent is one this listing shows.
    fn matches(&self, a: &Agent) -> bool {
        self.host.as_ref().is_none_or(|h| *h == a.host)
            && self.state.is_none_or(|s| s == a.state())
            && self.selector.as_ref().is_none_or(|sel| {
                agentplane::labels::Selector::parse("selector", sel)
                    .map(|s| s.matches(&a.spec.clone().unwrap_or_default().labels))
                    .unwrap_or(false)
            })
    }
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
    let mut agents = list_all(c, a.query()).await?;
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

/// `ls -w`: the list, then a row (a JSON line with `-o json`) for each
/// change of a matching agent: its record as it is after the event, or its
/// last known row marked DELETED. The watch is opened before the list is
/// read, so no change between the two is missed. Ends when the stream does
/// (an error, or the server going away).
pub async fn ls_watch(
    endpoint: &str,
    fmt: Format,
    a: LsArgs,
    access: &crate::access::Access,
) -> anyhow::Result<()> {
    use agentplane::proto::v1::{EventType, WatchAgentsRequest};
    let mut c = crate::client::connect(endpoint, access)?;
    let mut streams = crate::client::connect_streaming(endpoint, access)?;
    let mut events = streams
        .agents
        .watch_agents(WatchAgentsRequest::default())
        .await?
        .into_inner();
    let mut agents = list_all(&mut c, a.query()).await?;
    agents.sort_by(|x, y| x.id.cmp(&y.id));
    let rows: Vec<Vec<String>> = agents.iter().map(output::agent_row).collect();
    let mut widths = output::widths(output::AGENT_HEADER, &rows);
    match fmt {
        Format::Table => output::table(output::AGENT_HEADER, &rows),
        Format::Json | Format::Yaml => {
            for x in &agents {
                output::stream_item(fmt, &output::AgentView::from(x))?;
            }
        }
    }
    let mut known: std::collections::HashMap<String, Agent> =
        agents.into_iter().map(|x| (x.id.clone(), x)).collect();
    while let Some(ev) = events.message().await? {
        if ev.agent_id.is_empty() {
            continue;
        }
        if ev.r#type() == EventType::AgentDeleted {
            if let Some(mut last) = known.remove(&ev.agent_id) {
                if a.matches(&last) {
                    // Shown with the state a deleted record no longer has.
                    last.state = 0;
                    let mut row = output::agent_row(&last);
                    row[2] = "DELETED".into();
                    match fmt {
                        Format::Table => output::print_row(&widths, &row),
                        Format::Json | Format::Yaml => output::stream_item(
                            fmt,
                            &serde_json::json!({"id": last.id, "deleted": true}),
                        )?,
                    }
                }
            }
            continue;
        }
        let Ok(got) = c
            .agents
            .get_agent(GetAgentRequest {
                id: ev.agent_id.clone(),
            })
            .await
        else {
            continue;
        };
        let x = got.into_inner();
        if a.matches(&x) {
            show(fmt, &mut widths, &x)?;
        }
        known.insert(x.id.clone(), x);
    }
    Ok(())
}

/// One changed agent of `ls -w`: a row (columns only grow: a later row may
/// be wider than the first screen's), or a JSON line.
fn show(fmt: Format, widths: &mut [usize], x: &Agent) -> anyhow::Result<()> {
    match fmt {
        Format::Table => {
            let row = output::agent_row(x);
            for (w, cell) in widths.iter_mut().zip(&row) {
                *w = (*w).max(cell.chars().count());
            }
            output::print_row(widths, &row);
            Ok(())
        }
        Format::Json | Format::Yaml => output::stream_item(fmt, &output::AgentView::from(x)),
    }
}
