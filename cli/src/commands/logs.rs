//! `agentctl logs` and `agentctl send`.

use std::io::Write;
use std::time::Duration;

use agentplane::proto::v1::{LogStream, SendInputRequest, StreamLogsRequest};

use crate::client;

/// Arguments of `logs`.
#[derive(Debug, Clone, clap::Args)]
pub struct LogsArgs {
    /// Agent id or name.
    #[arg(add = clap_complete::ArgValueCompleter::new(crate::complete::agents))]
    id: String,
    /// Keep printing new output until the agent ends (reconnects, to the next
    /// endpoint, from the last byte printed).
    #[arg(short, long)]
    follow: bool,
    /// Start this many lines before the end.
    #[arg(long)]
    tail: Option<u64>,
    /// Start at the output written since this time: a duration ago (10m, 2h)
    /// or an RFC 3339 time. With --tail: the later of the two.
    #[arg(long, value_parser = agentplane::config::parse_since)]
    since: Option<std::time::SystemTime>,
    /// Start at this byte offset of the agent's output.
    #[arg(long, conflicts_with_all = ["tail", "since"])]
    offset: Option<u64>,
    /// Only standard output.
    #[arg(long, conflicts_with = "stderr")]
    stdout: bool,
    /// Only standard error.
    #[arg(long)]
    stderr: bool,
}

/// Prints the agent's output (raw bytes) on stdout; gaps are reported on stderr.
pub async fn run(
    endpoints: &[String],
    a: LogsArgs,
    access: &crate::access::Access,
) -> anyhow::Result<()> {
    let stream = if a.stdout {
        LogStream::Stdout
    } else if a.stderr {
        LogStream::Stderr
    } else {
        LogStream::Unspecified
    };
    let mut next: Option<u64> = a.offset;
    let mut failures = 0u32;
    let mut i = 0usize;
    // A name becomes its id once: a follow that reconnects must go on with
    // the same agent even if the name is taken by a new one meanwhile.
    let id = super::resolve_once(&endpoints[0], access, &a.id).await;
    let mut out = std::io::stdout().lock();
    loop {
        let endpoint = &endpoints[i % endpoints.len()];
        let mut c = client::connect_streaming(endpoint, access)?;
        let req = StreamLogsRequest {
            id: id.clone(),
            offset: next.unwrap_or(0),
            tail_lines: if next.is_none() { a.tail } else { None },
            follow: a.follow,
            stream: stream as i32,
            since: a
                .since
                .filter(|_| next.is_none())
                .map(prost_types::Timestamp::from),
        };
        match c.agents.stream_logs(req).await {
            Ok(s) => {
                let mut s = s.into_inner();
                loop {
                    match s.message().await {
                        Ok(Some(chunk)) => {
                            failures = 0;
                            if chunk.skipped > 0 {
                                eprintln!(
                                    "agentctl: [{} bytes of older output are no longer retained]",
                                    chunk.skipped
                                );
                            }
                            out.write_all(&chunk.data)?;
                            out.flush()?;
                            next = Some(chunk.offset + chunk.data.len() as u64);
                        }
                        Ok(None) => return Ok(()),
                        Err(st) if a.follow && client::failover(&st) => {
                            eprintln!("agentctl: log stream broke ({}); resuming", st.message());
                            break;
                        }
                        Err(st) => return Err(st.into()),
                    }
                }
            }
            Err(st) if client::failover(&st) && failures + 1 < 10 => {
                eprintln!("agentctl: {}", client::describe(endpoint, &st));
            }
            Err(st) => return Err(st.into()),
        }
        failures += 1;
        anyhow::ensure!(
            failures < 10,
            "no endpoint served the log stream 10 times in a row"
        );
        i += 1;
        tokio::time::sleep(Duration::from_millis(200 * u64::from(failures))).await;
        // A fresh connection must not re-read what was printed: `next` is set.
        if next.is_none() {
            next = Some(0);
        }
    }
}

/// Arguments of `send`.
#[derive(Debug, Clone, clap::Args)]
pub struct SendArgs {
    /// Agent id or name.
    #[arg(add = clap_complete::ArgValueCompleter::new(crate::complete::agents))]
    id: String,
    /// The text to write to the agent's standard input (or terminal).
    #[arg(default_value = "")]
    text: String,
    /// Append a newline (Enter).
    #[arg(long)]
    enter: bool,
    /// Resize the agent's terminal first, ROWSxCOLS (tty agents).
    #[arg(long, value_parser = parse_size)]
    resize: Option<(u32, u32)>,
}

fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let (r, c) = s
        .split_once('x')
        .ok_or_else(|| format!("`{s}` is not ROWSxCOLS"))?;
    match (r.parse(), c.parse()) {
        (Ok(r), Ok(c)) if r > 0 && c > 0 => Ok((r, c)),
        _ => Err(format!("`{s}` is not ROWSxCOLS")),
    }
}

/// Writes text to the agent's stdin.
pub async fn send(c: &mut client::Clients, a: SendArgs) -> anyhow::Result<()> {
    let mut data = a.text.into_bytes();
    if a.enter {
        data.push(b'\n');
    }
    anyhow::ensure!(
        !data.is_empty() || a.resize.is_some(),
        "give TEXT, --enter or --resize"
    );
    c.agents
        .send_input(SendInputRequest {
            id: a.id,
            data,
            rows: a.resize.map(|(r, _)| r),
            cols: a.resize.map(|(_, c)| c),
        })
        .await?;
    Ok(())
}
