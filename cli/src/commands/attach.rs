//! `agentctl attach` and `agentctl run`: an interactive session. With a
//! terminal on stdin it goes raw (keys go to the agent as typed), window
//! resizes are forwarded, and Ctrl-] detaches without stopping the agent.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use agentplane::proto::v1::{AttachInput, GetAgentRequest, SpawnAgentRequest};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::spawn::SpawnArgs;
use crate::client::Clients;

/// The detach key: Ctrl-] (as telnet).
const DETACH: u8 = 0x1d;

/// Arguments of `attach`.
#[derive(Debug, Clone, clap::Args)]
pub struct AttachArgs {
    /// Agent id.
    id: String,
    /// Replay output from this offset first (default: only new output).
    #[arg(long)]
    offset: Option<u64>,
}

/// Arguments of `run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Stop the agent when this session goes away (after --session-grace),
    /// whatever the reason: Ctrl-C, a closed terminal, a killed agentctl.
    #[arg(long)]
    rm: bool,
    /// How long the agent outlives a lost session with --rm.
    #[arg(long, default_value = "2s", value_parser = agentplane::config::parse_duration)]
    session_grace: Duration,
    /// What to run, as for `spawn`.
    #[command(flatten)]
    spawn: SpawnArgs,
}

/// Puts the terminal on stdin in raw mode and restores it when dropped.
struct RawMode(Option<rustix::termios::Termios>);

impl RawMode {
    fn enter() -> Self {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Self(None);
        }
        let Ok(saved) = rustix::termios::tcgetattr(&stdin) else {
            return Self(None);
        };
        let mut raw = saved.clone();
        raw.make_raw();
        let _ = rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw);
        Self(Some(saved))
    }

    fn active(&self) -> bool {
        self.0.is_some()
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = rustix::termios::tcsetattr(
                std::io::stdin(),
                rustix::termios::OptionalActions::Now,
                saved,
            );
        }
    }
}

fn terminal_size() -> Option<(u32, u32)> {
    let size = rustix::termios::tcgetwinsize(std::io::stdout()).ok()?;
    Some((u32::from(size.ws_row), u32::from(size.ws_col)))
}

/// `attach`.
pub async fn attach(c: &mut Clients, a: AttachArgs) -> anyhow::Result<()> {
    session(c, &a.id, a.offset, false).await.map(drop)
}

/// `run`: spawn, then attach from the first byte; exits with the agent's code.
pub async fn run(c: &mut Clients, mut a: RunArgs) -> anyhow::Result<ExitCode> {
    a.spawn.ensure_request_id();
    if a.rm {
        a.spawn.session_grace = Some(a.session_grace);
    }
    if std::io::stdin().is_terminal() {
        a.spawn.force_tty();
    }
    let (spec, request_id) = a.spawn.into_spec();
    let agent = c
        .agents
        .spawn_agent(SpawnAgentRequest {
            spec: Some(spec),
            request_id,
        })
        .await?
        .into_inner()
        .agent
        .unwrap_or_default();
    let detached = session(c, &agent.id, Some(0), a.rm).await?;
    if detached {
        eprintln!("agentctl: detached from {}", agent.id);
        return Ok(ExitCode::SUCCESS);
    }
    let ended = c
        .agents
        .get_agent(GetAgentRequest { id: agent.id })
        .await?
        .into_inner();
    Ok(super::spawn::exit_code(&ended))
}

/// Runs a session until the agent ends (false) or the user detaches (true).
async fn session(
    c: &mut Clients,
    id: &str,
    offset: Option<u64>,
    hold: bool,
) -> anyhow::Result<bool> {
    let raw = RawMode::enter();
    let (tx, rx) = mpsc::channel::<AttachInput>(16);
    let size = if raw.active() { terminal_size() } else { None };
    tx.send(AttachInput {
        id: id.to_owned(),
        offset,
        session: hold,
        rows: size.map(|s| s.0),
        cols: size.map(|s| s.1),
        ..Default::default()
    })
    .await?;
    let (detach_tx, mut detach_rx) = mpsc::channel::<()>(1);
    let interactive = raw.active();
    let input = tx.clone();
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 4096];
        loop {
            match stdin.read(&mut buf).await {
                // At EOF the session stays open: only the agent's end or a
                // detach ends it.
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let data = &buf[..n];
                    if interactive && data.contains(&DETACH) {
                        let _ = detach_tx.send(()).await;
                        return;
                    }
                    let msg = AttachInput {
                        data: data.to_vec(),
                        ..Default::default()
                    };
                    if input.send(msg).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    if interactive {
        let resize = tx.clone();
        tokio::spawn(async move {
            let Ok(mut winch) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
            else {
                return;
            };
            while winch.recv().await.is_some() {
                if let Some((rows, cols)) = terminal_size() {
                    let msg = AttachInput {
                        rows: Some(rows),
                        cols: Some(cols),
                        ..Default::default()
                    };
                    if resize.send(msg).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
    drop(tx);
    let mut output = c.agents.attach(ReceiverStream::new(rx)).await?.into_inner();
    let mut stdout = std::io::stdout().lock();
    loop {
        tokio::select! {
            _ = detach_rx.recv() => return Ok(true),
            m = output.message() => match m? {
                Some(chunk) => {
                    stdout.write_all(&chunk.data)?;
                    stdout.flush()?;
                }
                None => return Ok(false),
            },
        }
    }
}
