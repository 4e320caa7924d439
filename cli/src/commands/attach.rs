//! `agentctl attach` and `agentctl run`: an interactive session. With a
//! terminal on stdin it goes raw (keys go to the agent as typed), window
//! resizes are forwarded, and Ctrl-] detaches without stopping the agent.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
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
    /// Agent id or name.
    #[arg(add = clap_complete::ArgValueCompleter::new(crate::complete::agents))]
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
/// A session that breaks (its host agent restarted, a control plane went
/// away) is opened again from the byte after the last one printed, holding
/// the agent again with `hold`; what was typed while it was broken may be
/// lost.
async fn session(
    c: &mut Clients,
    id: &str,
    offset: Option<u64>,
    hold: bool,
) -> anyhow::Result<bool> {
    let raw = RawMode::enter();
    let interactive = raw.active();
    let (tx, inputs) = mpsc::channel::<AttachInput>(16);
    let (detach_tx, mut detach_rx) = mpsc::channel::<()>(1);
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
    let inputs = Arc::new(tokio::sync::Mutex::new(inputs));
    let mut next = offset;
    let mut failures = 0u32;
    loop {
        let (tx, rx) = mpsc::channel::<AttachInput>(16);
        let size = if interactive { terminal_size() } else { None };
        tx.send(AttachInput {
            id: id.to_owned(),
            offset: next,
            session: hold,
            rows: size.map(|s| s.0),
            cols: size.map(|s| s.1),
            ..Default::default()
        })
        .await?;
        let pump = tokio::spawn(forward(inputs.clone(), tx));
        let ended = stream(c, rx, &mut next, &mut detach_rx, &mut failures).await;
        pump.abort();
        match ended {
            Ok(detached) => return Ok(detached),
            Err(st) if crate::client::failover(&st) && failures < 10 => {
                failures += 1;
                eprint!("agentctl: session broke ({}); resuming\r\n", st.message());
                tokio::time::sleep(Duration::from_millis(200 * u64::from(failures))).await;
            }
            Err(st) => return Err(st.into()),
        }
    }
}

/// Moves input from the session's keyboard and resize tasks into one
/// attempt's request stream, until that stream goes.
async fn forward(
    inputs: Arc<tokio::sync::Mutex<mpsc::Receiver<AttachInput>>>,
    tx: mpsc::Sender<AttachInput>,
) {
    let mut inputs = inputs.lock().await;
    while let Some(m) = inputs.recv().await {
        if tx.send(m).await.is_err() {
            return;
        }
    }
}

/// One attempt: prints output until the agent ends (false), the user
/// detaches (true) or the stream fails; `next` follows what was printed.
async fn stream(
    c: &mut Clients,
    rx: mpsc::Receiver<AttachInput>,
    next: &mut Option<u64>,
    detach_rx: &mut mpsc::Receiver<()>,
    failures: &mut u32,
) -> Result<bool, tonic::Status> {
    let mut output = c.agents.attach(ReceiverStream::new(rx)).await?.into_inner();
    let mut stdout = std::io::stdout().lock();
    loop {
        tokio::select! {
            _ = detach_rx.recv() => return Ok(true),
            m = output.message() => match m? {
                Some(chunk) => {
                    *failures = 0;
                    stdout
                        .write_all(&chunk.data)
                        .and_then(|()| stdout.flush())
                        .map_err(|e| tonic::Status::internal(format!("writing the output: {e}")))?;
                    *next = Some(chunk.offset + chunk.data.len() as u64);
                }
                None => return Ok(false),
            },
        }
    }
}
