//! `agentctl top`: a live terminal dashboard of the fleet. Agent states
//! change as the watch stream's events arrive; hosts, the agents' records
//! (once an event said they changed) and their usage sampled on the hosts
//! (`ListAgentUsage`) are read again every `--interval`, beside the
//! screen. `q`, Esc, Ctrl-C or SIGTERM quits. It draws on the terminal's alternate screen and leaves
//! the terminal as it found it, also on an error or a panic.

mod model;
mod view;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use agentplane::proto::v1::{ListAgentUsageRequest, ListAgentsRequest, WatchAgentsRequest};
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

/// Restores the terminal however `run` ends (restoring a terminal that was
/// never set up, or twice, is harmless).
struct Screen;

impl Drop for Screen {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

/// How long opening the watch may take before the screen goes on without it.
const OPEN_WATCH_LIMIT: Duration = Duration::from_secs(2);

/// What one refresh read, applied to the model when it is complete.
struct Refreshed {
    hosts: Vec<agentplane::proto::v1::Host>,
    agents: Option<Vec<agentplane::proto::v1::Agent>>,
    usage: agentplane::proto::v1::ListAgentUsageResponse,
}

impl Refreshed {
    fn apply(self, m: &mut Model) {
        m.set_hosts(self.hosts);
        if let Some(a) = self.agents {
            m.set_agents(a);
        }
        m.apply_usage(self.usage.usage, self.usage.unreachable_hosts);
    }
}

/// Runs the dashboard against `endpoint` until the user quits (or SIGTERM).
pub async fn run(endpoint: &str, access: &Access, args: TopArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        std::io::stdout().is_terminal(),
        "top draws on a terminal and stdout is not one; for scripts use `agentctl ls -o json` and `agentctl watch`"
    );
    anyhow::ensure!(!args.interval.is_zero(), "--interval: must be more than 0");
    let calls = client::connect(endpoint, access)?;
    let mut streams = client::connect_streaming(endpoint, access)?;
    let mut m = Model::default();
    // The first screen is complete: a failure here is the command's.
    fetch(calls.clone(), true).await?.apply(&mut m);
    let mut watch = open_watch(&mut streams, &mut m).await;

    // Before the terminal changes: any failure from here restores it.
    let _screen = Screen;
    let mut terminal = ratatui::try_init()?;
    let mut keys = EventStream::new();
    let mut tick = tokio::time::interval(args.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    // A refresh runs beside the screen: keys are read while it waits.
    let mut pending: Option<tokio::task::JoinHandle<anyhow::Result<Refreshed>>> = None;
    let stop = agentplane::shutdown::shutdown_signal();
    tokio::pin!(stop);
    loop {
        terminal.draw(|f| view::draw(f, &m))?;
        tokio::select! {
            () = &mut stop => break,
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
            done = async { pending.as_mut().expect("guarded").await }, if pending.is_some() => {
                pending = None;
                match done {
                    Ok(Ok(r)) => {
                        r.apply(&mut m);
                        if watch.is_some() {
                            m.note = None;
                        }
                    }
                    Ok(Err(e)) => m.note = Some(format!("refresh failed: {e}")),
                    Err(e) => m.note = Some(format!("refresh failed: {e}")),
                }
            },
            _ = tick.tick() => {
                if watch.is_none() {
                    watch = open_watch(&mut streams, &mut m).await;
                }
                if pending.is_none() {
                    pending = Some(tokio::spawn(fetch(calls.clone(), m.dirty)));
                }
            }
        }
    }
    if let Some(p) = pending {
        p.abort();
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads hosts and usage, and with `agents` every agent record.
async fn fetch(mut c: Clients, agents: bool) -> anyhow::Result<Refreshed> {
    let hosts = super::hosts::list(&mut c).await?;
    let agents = if agents {
        Some(super::agents::list_all(&mut c, ListAgentsRequest::default()).await?)
    } else {
        None
    };
    let usage = c
        .agents
        .list_agent_usage(ListAgentUsageRequest::default())
        .await?
        .into_inner();
    Ok(Refreshed {
        hosts,
        agents,
        usage,
    })
}

type Events = tonic::Streaming<agentplane::proto::v1::Event>;

/// The watch stream from now on, or `None` (noted on screen) when it
/// cannot be opened.
async fn open_watch(c: &mut Clients, m: &mut Model) -> Option<Events> {
    let opened = tokio::time::timeout(
        OPEN_WATCH_LIMIT,
        c.agents.watch_agents(WatchAgentsRequest::default()),
    )
    .await;
    match opened {
        Ok(Ok(s)) => Some(s.into_inner()),
        Ok(Err(s)) => {
            m.note = Some(format!("cannot watch: {}", s.message()));
            None
        }
        Err(_) => {
            m.note = Some(format!(
                "cannot watch: no answer within {OPEN_WATCH_LIMIT:?}"
            ));
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
