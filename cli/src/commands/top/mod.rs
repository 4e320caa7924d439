//! `agentctl top`: a live terminal dashboard of the fleet. Agent states
//! change as the watch stream's events arrive; hosts, the agents' records
//! (once an event said they changed) and their usage sampled on the hosts
//! (`ListAgentUsage`) are read again every `--interval`. `q`, Esc or
//! Ctrl-C quits. It draws on the terminal's alternate screen and leaves
//! the terminal as it found it, also on an error or a panic.

mod model;
mod view;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use agentplane::proto::v1::{
    ListAgentUsageRequest, ListAgentsRequest, ListHostsRequest, WatchAgentsRequest,
};
use crossterm::event::{Event as Input, EventStream, KeyCode, KeyEventKind, KeyModifiers};
use tokio_stream::StreamExt;

use crate::access::Access;
use crate::client::{self, Clients};
use model::Model;

/// `agentctl top`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct TopArgs {
    /// How often hosts, records and usage are read again.
    #[arg(long, default_value = "2s", value_parser = agentplane::config::parse_duration)]
    pub interval: Duration,
}

/// Restores the terminal however `run` ends.
struct Screen;

impl Drop for Screen {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

/// Runs the dashboard against `endpoint` until the user quits.
pub async fn run(endpoint: &str, access: &Access, args: TopArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        std::io::stdout().is_terminal(),
        "top draws on a terminal and stdout is not one; for scripts use `agentctl ls -o json` and `agentctl watch`"
    );
    anyhow::ensure!(!args.interval.is_zero(), "--interval: must be more than 0");
    let mut calls = client::connect(endpoint, access)?;
    let mut streams = client::connect_streaming(endpoint, access)?;
    let mut m = Model::default();
    // The first screen is complete: a failure here is the command's.
    refresh(&mut calls, &mut m, true).await?;
    let mut watch = open_watch(&mut streams, &mut m).await;

    let mut terminal = ratatui::try_init()?;
    let _screen = Screen;
    let mut keys = EventStream::new();
    let mut tick = tokio::time::interval(args.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        terminal.draw(|f| view::draw(f, &m))?;
        tokio::select! {
            key = keys.next() => match key {
                Some(Ok(Input::Key(k))) if k.kind == KeyEventKind::Press => {
                    let ctrl_c = k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                    if matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c {
                        break;
                    }
                }
                // The terminal went away: nothing left to draw on.
                None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            event = next_event(&mut watch) => match event {
                Ok(Some(e)) => m.apply_event(&e),
                Ok(None) | Err(_) => {
                    m.note = Some("the watch stream ended; reopening it at the next refresh".into());
                    watch = None;
                    m.dirty = true;
                }
            },
            _ = tick.tick() => {
                if watch.is_none() {
                    watch = open_watch(&mut streams, &mut m).await;
                }
                let relist = m.dirty;
                if let Err(e) = refresh(&mut calls, &mut m, relist).await {
                    m.note = Some(format!("refresh failed: {e}"));
                } else if watch.is_some() {
                    m.note = None;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads hosts and usage, and with `agents` every agent record.
async fn refresh(c: &mut Clients, m: &mut Model, agents: bool) -> anyhow::Result<()> {
    let hosts = c
        .hosts
        .list_hosts(ListHostsRequest {})
        .await?
        .into_inner()
        .hosts;
    m.set_hosts(hosts);
    if agents {
        let all = super::agents::list_all(c, ListAgentsRequest::default()).await?;
        m.set_agents(all);
    }
    let usage = c
        .agents
        .list_agent_usage(ListAgentUsageRequest::default())
        .await?
        .into_inner();
    m.apply_usage(usage.usage, usage.unreachable_hosts);
    Ok(())
}

type Events = tonic::Streaming<agentplane::proto::v1::Event>;

/// The watch stream from now on, or `None` (noted on screen) when it
/// cannot be opened.
async fn open_watch(c: &mut Clients, m: &mut Model) -> Option<Events> {
    match c.agents.watch_agents(WatchAgentsRequest::default()).await {
        Ok(s) => Some(s.into_inner()),
        Err(s) => {
            m.note = Some(format!("cannot watch: {}", s.message()));
            None
        }
    }
}

/// The next event of the watch, or never when there is none open.
async fn next_event(
    watch: &mut Option<Events>,
) -> Result<Option<agentplane::proto::v1::Event>, tonic::Status> {
    match watch {
        Some(s) => s.message().await,
        None => std::future::pending().await,
    }
}
