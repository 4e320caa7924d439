//! `agentctl watch`: events as they happen. On any stream failure it
//! reconnects, to the next endpoint, with the token of the last event it
//! printed (or of the stream's opening bookmark), so nothing is missed or
//! printed twice while the events are retained. When they are not (the token
//! is older than the trimmed stream keeps: OUT_OF_RANGE), it says so and exits
//! 1: reconnecting could only skip the lost events.

use std::time::Duration;

use agentplane::proto::v1::{EventType, WatchAgentsRequest};

use crate::client;
use crate::output::{self, Format};

/// Arguments of `watch`.
#[derive(Debug, Clone, clap::Args)]
pub struct WatchArgs {
    /// Start after this event token ("0": from the oldest retained event).
    #[arg(long)]
    since: Option<String>,
    /// Only this agent's events (host events are still shown).
    #[arg(long)]
    agent: Option<String>,
    /// Exit after this many events (default: never).
    #[arg(long)]
    count: Option<u64>,
}

/// Consecutive failed connection attempts after which watch gives up.
const GIVE_UP_AFTER: u32 = 30;

/// Watches until interrupted (or `--count` events).
pub async fn run(
    endpoints: &[String],
    fmt: Format,
    a: WatchArgs,
    access: &crate::access::Access,
) -> anyhow::Result<()> {
    let mut names = Names::new(&endpoints[0], access)?;
    // As `logs -f`: a name becomes its id once, for every reconnect.
    let agent = match &a.agent {
        Some(given) => super::resolve_once(&endpoints[0], access, given).await,
        None => String::new(),
    };
    let mut token = a.since.clone().unwrap_or_default();
    let mut printed = 0u64;
    let mut failures = 0u32;
    let mut i = 0usize;
    loop {
        let endpoint = &endpoints[i % endpoints.len()];
        let mut c = client::connect_streaming(endpoint, access)?;
        let opened = c
            .agents
            .watch_agents(WatchAgentsRequest {
                resume_token: token.clone(),
                agent_id: agent.clone(),
            })
            .await;
        match opened {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(ev)) => {
                            failures = 0;
                            token.clone_from(&ev.token);
                            if ev.r#type() == EventType::Bookmark {
                                continue;
                            }
                            let name = names.of(&ev.agent_id).await;
                            match fmt {
                                Format::Json | Format::Yaml => {
                                    let mut view = output::EventView::from(&ev);
                                    view.agent_name = name;
                                    output::stream_item(fmt, &view)?;
                                }
                                Format::Table => {
                                    println!("{}", output::event_line(&ev, name.as_deref()));
                                }
                            }
                            printed += 1;
                            if a.count.is_some_and(|n| printed >= n) {
                                return Ok(());
                            }
                        }
                        Ok(None) => {
                            eprintln!("agentctl: watch stream from {endpoint} ended; reconnecting");
                            break;
                        }
                        // Events were lost: the caller must list again.
                        Err(s) if s.code() == tonic::Code::OutOfRange => return Err(s.into()),
                        Err(s) => {
                            eprintln!(
                                "agentctl: watch stream from {endpoint}: {}; reconnecting",
                                client::describe(endpoint, &s)
                            );
                            break;
                        }
                    }
                }
            }
            Err(s) if !client::failover(&s) => return Err(s.into()),
            Err(s) => eprintln!("agentctl: {}", client::describe(endpoint, &s)),
        }
        failures += 1;
        anyhow::ensure!(
            failures < GIVE_UP_AFTER,
            "no endpoint served the watch {GIVE_UP_AFTER} times in a row"
        );
        i += 1;
        // The first retry goes straight to the next endpoint; later ones back off.
        let pause = Duration::from_millis(100 * u64::from(failures.min(20)));
        tokio::time::sleep(pause).await;
    }
}

/// Agent names by id, read once per agent (events carry ids only).
struct Names {
    client: crate::client::Clients,
    known: std::collections::HashMap<String, Option<String>>,
}

impl Names {
    fn new(endpoint: &str, access: &crate::access::Access) -> anyhow::Result<Self> {
        Ok(Self {
            client: client::connect(endpoint, access)?,
            known: std::collections::HashMap::new(),
        })
    }

    /// `id`'s name, if it has one; none for a host event, or an agent that
    /// is gone or cannot be read now (then asked again next time).
    async fn of(&mut self, id: &str) -> Option<String> {
        if id.is_empty() {
            return None;
        }
        if let Some(n) = self.known.get(id) {
            return n.clone();
        }
        let got = self
            .client
            .agents
            .get_agent(agentplane::proto::v1::GetAgentRequest { id: id.to_owned() })
            .await
            .ok()?
            .into_inner();
        let name = got.spec.map(|s| s.name).filter(|n| !n.is_empty());
        self.known.insert(id.to_owned(), name.clone());
        name
    }
}
