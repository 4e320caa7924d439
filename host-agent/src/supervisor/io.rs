//! An agent's I/O: serving readers of its [`OutputLog`](super::output::OutputLog)
//! (tail, offsets, follow) and writing to its stdin. Capturing the output
//! lives in `capture.rs`, idle detection from it in `idle.rs`.

use std::sync::Arc;
use std::time::Duration;

use agentplane::proto::v1::{AttachInput, LogChunk, LogStream, StreamLogsRequest};
use agentplane::time::duration_from_proto;
use std::os::fd::OwnedFd;

use tokio::io::unix::AsyncFd;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::agent::{AgentSlot, Requested};
use super::error::SupervisorError;
use super::Supervisor;

/// Bytes per chunk sent to a reader: four fit in the control plane's window
/// per stream to a host (256 KiB), so some travel while others are read;
/// larger chunks mean fewer messages to frame, relay and wake for (a
/// follower through the control plane moved 30% more than with 32 KiB).
const CHUNK: usize = 64 * 1024;
/// Chunks a reader may have queued: with the chunk size, what one slow reader
/// can hold in this process (the chunks of one read share its buffer, so
/// that is at most two reads' worth).
const READER_QUEUE: usize = 2;
/// Chunks read from disk at once: each read is a hand-off to a blocking
/// thread and an open of the file, so a follower that is behind reads
/// several chunks' worth per read (and sends them as slices of it).
const READ_BATCH: usize = 2;
/// Most bytes one SendInput may carry.
pub const MAX_INPUT: usize = 64 * 1024;
/// How long a write to stdin may wait for the agent to read.
const INPUT_TIMEOUT: Duration = Duration::from_secs(5);

/// What a log reader yields.
pub type LogItem = Result<LogChunk, tonic::Status>;

/// `c` as chunks of at most [`CHUNK`] bytes (a gap stays whole).
fn split(c: LogChunk) -> Vec<LogChunk> {
    if c.data.len() <= CHUNK {
        return vec![c];
    }
    let LogChunk {
        offset,
        stream,
        data,
        skipped,
        time,
    } = c;
    // Slices of one buffer: no copy.
    (0..data.len())
        .step_by(CHUNK)
        .map(|start| LogChunk {
            offset: offset + start as u64,
            stream,
            data: data.slice(start..(start + CHUNK).min(data.len())),
            skipped,
            time,
        })
        .collect()
}

impl Supervisor {
    /// A reader of `id`'s output as `req` asks; the stream ends when the
    /// retained output is sent (or, with `follow`, when the agent has ended and
    /// all its output is sent), or when the receiver is dropped.
    pub fn read_logs(
        &self,
        req: StreamLogsRequest,
    ) -> Result<mpsc::Receiver<LogItem>, SupervisorError> {
        let slot = self.get(&req.id)?;
        let filter = req.stream();
        let open = self
            .log_streams
            .try_hold(u64::from(self.limits.max_log_streams))
            .ok_or_else(|| SupervisorError::TooManyStreams {
                host: self.host_id.clone(),
                max: self.limits.max_log_streams,
            })?;
        let (tx, rx) = mpsc::channel(READER_QUEUE);
        let cancel = self.cancel.clone();
        self.tasks.spawn("log reader", async move {
            let _open = open;
            let mut changed = slot.output.subscribe();
            let mut ended = slot.ended_receiver();
            let unavailable = |e: &dyn std::fmt::Display| {
                Err(tonic::Status::unavailable(format!(
                    "reading the output of agent {}: {e}",
                    slot.id
                )))
            };
            let mut next = match start_offset(&slot, &req, filter).await {
                Ok(o) => o,
                Err(e) => {
                    let _ = tx.send(unavailable(&e)).await;
                    return;
                }
            };
            // Without follow, what was there when asked: a reader of an
            // agent that writes faster than it reads would never catch up.
            let until = (!req.follow).then(|| slot.output.end());
            loop {
                // Decided before looking at the end: once no pipe is open,
                // the end cannot move, so nothing written last is missed.
                let done = !req.follow || (!slot.is_active() && !slot.output.has_writers());
                // Off the runtime: the newest output is in the page cache,
                // but an older read may wait on the disk.
                let s = slot.clone();
                let max = match until {
                    Some(u) => usize::try_from(u.saturating_sub(next))
                        .unwrap_or(usize::MAX)
                        .min(READ_BATCH * CHUNK),
                    None => READ_BATCH * CHUNK,
                };
                if max == 0 {
                    return;
                }
                let read = tokio::task::spawn_blocking(move || s.output.read(next, max, filter))
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
                let r = match read {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send(unavailable(&e)).await;
                        return;
                    }
                };
                for c in r.chunks.into_iter().flat_map(split) {
                    if tx.send(Ok(c)).await.is_err() {
                        return;
                    }
                }
                next = r.next;
                if next < until.unwrap_or_else(|| slot.output.end()) {
                    continue;
                }
                if done {
                    return;
                }
                tokio::select! {
                    _ = changed.changed() => {}
                    _ = ended.changed() => {}
                    () = tx.closed() => return,
                    () = cancel.cancelled() => return,
                    // Belt and braces for a writer that closed between checks.
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
        Ok(rx)
    }

    /// An Attach session: the first message names the agent; later ones carry
    /// input and resizes. Output from the requested offset (default: from now)
    /// comes back until the agent ends or the caller goes away. A session with
    /// `session` set holds a session-bound agent until its stream ends,
    /// whatever the reason (a client killed with SIGKILL included).
    pub async fn attach(
        self: &Arc<Self>,
        mut inbound: tonic::Streaming<AttachInput>,
    ) -> Result<mpsc::Receiver<LogItem>, tonic::Status> {
        let first = inbound.message().await?.ok_or_else(|| {
            tonic::Status::invalid_argument("id: the first message must name the agent")
        })?;
        let slot = self.get(&first.id)?;
        if first.session {
            slot.sessions.send_modify(|n| *n += 1);
        }
        // Releases the session when the input side ends, however it ends.
        struct Held(Option<Arc<AgentSlot>>);
        impl Drop for Held {
            fn drop(&mut self) {
                if let Some(slot) = self.0.take() {
                    slot.sessions.send_modify(|n| *n = n.saturating_sub(1));
                }
            }
        }
        let held = Held(first.session.then(|| slot.clone()));
        self.apply_input(&first).await?;
        let rx = self.read_logs(StreamLogsRequest {
            id: first.id.clone(),
            offset: first.offset.unwrap_or_else(|| slot.output.end()),
            tail_lines: None,
            follow: true,
            stream: LogStream::Unspecified as i32,
            since: None,
        })?;
        let sup = self.clone();
        let cancel = self.cancel.clone();
        self.tasks.spawn("attach input", async move {
            let _held = held;
            // Until the input ends, or shutdown: a caller that keeps its
            // input open must not hold the host agent's drain.
            loop {
                let next = tokio::select! {
                    () = cancel.cancelled() => return,
                    m = inbound.message() => m,
                };
                let Ok(Some(m)) = next else { return };
                if let Err(e) = sup.apply_input(&m).await {
                    tracing::debug!(agent = %m.id, error = %e, "attach input not applied");
                }
            }
        });
        Ok(rx)
    }

    async fn apply_input(&self, m: &AttachInput) -> Result<(), tonic::Status> {
        let id = &m.id;
        if let (Some(rows), Some(cols)) = (m.rows, m.cols) {
            self.resize(
                id,
                u16::try_from(rows).unwrap_or(u16::MAX),
                u16::try_from(cols).unwrap_or(u16::MAX),
            )?;
        }
        if !m.data.is_empty() {
            self.write_input(id, &m.data).await?;
        }
        Ok(())
    }

    /// Stops a session-bound agent once no session has held it for its
    /// `session_grace` (counted from its start too).
    pub(super) fn watch_sessions(self: &Arc<Self>, slot: &Arc<AgentSlot>) {
        let Some(grace) = slot.spec.session_grace.as_ref().map(duration_from_proto) else {
            return;
        };
        let sup = self.clone();
        let slot = slot.clone();
        self.tasks.spawn("session watcher", async move {
            let mut sessions = slot.sessions.subscribe();
            let mut ended = slot.ended_receiver();
            loop {
                if *sessions.borrow_and_update() > 0 {
                    tokio::select! {
                        r = sessions.changed() => if r.is_err() { return },
                        _ = ended.changed() => return,
                        () = sup.detach.cancelled() => return,
                    }
                    continue;
                }
                tokio::select! {
                    () = tokio::time::sleep(grace) => {
                        if *sessions.borrow() == 0 {
                            tracing::info!(agent = %slot.id, ?grace, "no session holds this session-bound agent; stopping it");
                            let _ = sup.stop_as(&slot.id, None, Requested::Stop).await;
                            return;
                        }
                    }
                    r = sessions.changed() => if r.is_err() { return },
                    _ = ended.changed() => return,
                    // Left to the keeper: the next host agent watches.
                    () = sup.detach.cancelled() => return,
                }
            }
        });
    }

    /// Resizes a tty agent's terminal (the agent gets SIGWINCH).
    pub fn resize(&self, id: &str, rows: u16, cols: u16) -> Result<(), SupervisorError> {
        let slot = self.get(id)?;
        let pty = slot
            .pty
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let Some(pty) = pty else {
            return Err(SupervisorError::Input {
                id: id.to_owned(),
                detail: "it has no terminal (spawn it with tty)".into(),
            });
        };
        let size = rustix::termios::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        rustix::termios::tcsetwinsize(pty.get_ref(), size).map_err(|e| SupervisorError::Input {
            id: id.to_owned(),
            detail: format!("resize failed: {e}"),
        })
    }

    /// Writes `data` to the current run's stdin, waiting at most
    /// [`INPUT_TIMEOUT`] for the agent to read it.
    pub async fn write_input(&self, id: &str, data: &[u8]) -> Result<(), SupervisorError> {
        if data.len() > MAX_INPUT {
            return Err(agentplane::validate::ValidationError::new(
                "data",
                format!("{} bytes, at most {MAX_INPUT} per call", data.len()),
            )
            .into());
        }
        let slot = self.get(id)?;
        let _ops = slot.ops.lock().await;
        let input_err = |detail: String| SupervisorError::Input {
            id: id.to_owned(),
            detail,
        };
        let pty = slot
            .pty
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Some(pty) = pty {
            return match tokio::time::timeout(INPUT_TIMEOUT, write_pty(&pty, data)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(input_err(format!("write failed: {e}"))),
                Err(_) => Err(input_err(format!(
                    "the agent did not read its input within {INPUT_TIMEOUT:?}"
                ))),
            };
        }
        let taken = slot
            .stdin
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let Some(mut stdin) = taken else {
            return Err(input_err(
                "it has no open standard input (not running, or it closed it)".into(),
            ));
        };
        let written = tokio::time::timeout(INPUT_TIMEOUT, async {
            stdin.write_all(data).await?;
            stdin.flush().await
        })
        .await;
        match written {
            Ok(Ok(())) => {
                *slot
                    .stdin
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(stdin);
                Ok(())
            }
            Ok(Err(e)) => Err(input_err(format!("write failed: {e}"))),
            Err(_) => {
                *slot
                    .stdin
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(stdin);
                Err(input_err(format!(
                    "the agent did not read its input within {INPUT_TIMEOUT:?}"
                )))
            }
        }
    }
}

/// Where a reader starts: `tail_lines` and `since` (the later of the two)
/// are found on the blocking pool, as they may read the whole retained output.
async fn start_offset(
    slot: &Arc<AgentSlot>,
    req: &StreamLogsRequest,
    filter: LogStream,
) -> std::io::Result<u64> {
    if req.tail_lines.is_none() && req.since.is_none() {
        return Ok(req.offset);
    }
    let (s, tail, since) = (slot.clone(), req.tail_lines, req.since);
    tokio::task::spawn_blocking(move || {
        let tail = tail.map(|n| s.output.tail_offset(n, filter)).transpose()?;
        let since = since
            .map(|t| {
                s.output
                    .since_offset(agentplane::time::ms_from_timestamp(&t))
            })
            .transpose()?;
        Ok(tail.into_iter().chain(since).max().unwrap_or(0))
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

/// Reads a pseudo-terminal's master end; EIO (the slave side closed: every
/// process of the agent let go of the terminal) is the end of the output.
/// Writes all of `data` to a terminal's master end.
async fn write_pty(pty: &AsyncFd<OwnedFd>, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        let mut guard = pty.writable().await?;
        match guard
            .try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(std::io::Error::from))
        {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_cuts_a_chunk_into_contiguous_slices_of_one_buffer() {
        let data: Vec<u8> = (0..(2 * CHUNK + 10)).map(|i| i as u8).collect();
        let whole = LogChunk {
            offset: 7,
            stream: LogStream::Stdout as i32,
            data: data.clone().into(),
            ..Default::default()
        };
        let base = whole.data.as_ptr();
        let pieces = split(whole);
        assert_eq!(
            pieces.iter().map(|c| c.data.len()).collect::<Vec<_>>(),
            [CHUNK, CHUNK, 10]
        );
        let offsets: Vec<u64> = pieces.iter().map(|c| c.offset).collect();
        assert_eq!(offsets, [7, 7 + CHUNK as u64, 7 + 2 * CHUNK as u64]);
        assert_eq!(
            pieces
                .iter()
                .flat_map(|c| c.data.iter().copied())
                .collect::<Vec<_>>(),
            data
        );
        // Slices, not copies: each piece points into the original buffer.
        for (i, c) in pieces.iter().enumerate() {
            assert_eq!(c.data.as_ptr(), base.wrapping_add(i * CHUNK));
        }
    }
}
