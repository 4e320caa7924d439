//! Capturing an agent's output: its stdout and stderr pipes (or its
//! terminal, through a relay pipe) are drained into its
//! [`OutputLog`](super::output::OutputLog) as they become readable.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use agentplane::proto::v1::LogStream;
use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;

use super::agent::AgentSlot;
use super::Supervisor;

/// Most bytes one move from a terminal to its relay pipe takes: a pipe's
/// smallest capacity, so an empty relay always has room.
const RELAY: usize = 64 * 1024;

impl Supervisor {
    /// Starts moving the new run's stdout and stderr (or its terminal's
    /// output) to its log, and keeps its stdin (or terminal) for input.
    /// `fds`: the run's stdin, stdout and stderr as the keeper passed them,
    /// or (`tty`) its terminal's master and the relay pipe's read and write
    /// ends.
    pub(super) fn capture(
        &self,
        slot: &Arc<AgentSlot>,
        fds: Vec<OwnedFd>,
        tty: bool,
    ) -> std::io::Result<()> {
        let (_, buffer) = super::log_sizes(&slot.spec);
        let mut fds = fds.into_iter();
        let mut next = || {
            fds.next().ok_or_else(|| {
                std::io::Error::other("the keeper passed fewer descriptors than the run has")
            })
        };
        if tty {
            // `AsyncFd::new` is deprecated because a borrowed descriptor could be
            // closed under it; an `OwnedFd` cannot be, so it is sound here and
            // needs no `unsafe` (`register` would). The master is non-blocking
            // (spawn.rs), in the keeper's copy too: they share one open file.
            #[allow(deprecated)]
            let master = Arc::new(AsyncFd::new(next()?)?);
            let relay = match (next(), next()) {
                (Ok(r), Ok(w)) => (r, w),
                // A keeper from before relay pipes: this host agent's own
                // pipe works, but what it holds dies with this process.
                _ => {
                    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
                    (r, w)
                }
            };
            let relay_r = Arc::new(relay.0);
            set_pipe_size(&relay_r, buffer);
            self.spawn_pty_capture(slot, master.clone(), relay_r, relay.1);
            *slot
                .pty
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(master);
            return Ok(());
        }
        // `from_owned_fd` checks that stdin is a pipe and makes it non-blocking.
        let stdin = pipe::Sender::from_owned_fd(next()?)?;
        for stream in [LogStream::Stdout, LogStream::Stderr] {
            let fd = Arc::new(next()?);
            set_pipe_size(&fd, buffer);
            self.spawn_capture(slot, fd, stream)?;
        }
        *slot
            .stdin
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(stdin);
        Ok(())
    }

    fn spawn_capture(
        &self,
        slot: &Arc<AgentSlot>,
        fd: Arc<OwnedFd>,
        stream: LogStream,
    ) -> std::io::Result<()> {
        #[allow(deprecated)]
        let ready = AsyncFd::with_interest(fd.clone(), tokio::io::Interest::READABLE)?;
        slot.output.writer_opened(&fd);
        let slot = slot.clone();
        let detach = self.detach.clone();
        self.tasks.spawn("agent output capture", async move {
            loop {
                let mut guard = tokio::select! {
                    g = ready.readable() => match g {
                        Ok(g) => g,
                        Err(_) => break,
                    },
                    // Left to the keeper: the next host agent reads on from
                    // the pipe. A turn in progress is waited for below, so
                    // nothing moves after this capture lets go.
                    () = detach.cancelled() => break,
                };
                let closed = guard.ready().is_read_closed();
                match slot.output.drain(&fd, stream).await {
                    // Cleared only if nothing arrived since the readiness was
                    // seen (tokio compares ticks): no wake-up is lost.
                    Ok(d) if d.empty && !closed => guard.clear_ready(),
                    Ok(d) if d.empty => break,
                    // A flooding agent's pipe is always ready: let readers
                    // and other agents' captures have their turn.
                    Ok(_) => tokio::task::yield_now().await,
                    Err(e) => {
                        tracing::warn!(agent = %slot.id, error = %e, "agent output capture failed");
                        break;
                    }
                }
            }
            slot.output.writer_closed(&fd);
        });
        Ok(())
    }

    /// A terminal's output goes from its master into the relay pipe, then
    /// from the pipe to disk (splice joins a pipe to something, not a
    /// terminal to a file). The keeper holds the relay pipe too, so what it
    /// holds when this host agent dies is read by the next one, first.
    fn spawn_pty_capture(
        &self,
        slot: &Arc<AgentSlot>,
        master: Arc<AsyncFd<OwnedFd>>,
        relay_r: Arc<OwnedFd>,
        relay_w: OwnedFd,
    ) {
        slot.output.writer_opened(&relay_r);
        let slot = slot.clone();
        let detach = self.detach.clone();
        self.tasks.spawn("agent terminal capture", async move {
            loop {
                // Empty the relay first, so that below the master's output
                // always fits and EAGAIN means the master has none.
                let drained = loop {
                    match slot.output.drain(&relay_r, LogStream::Stdout).await {
                        Ok(d) if d.empty => break Ok(()),
                        Ok(_) => tokio::task::yield_now().await,
                        Err(e) => break Err(e),
                    }
                };
                if let Err(e) = drained {
                    tracing::warn!(agent = %slot.id, error = %e, "agent terminal capture failed");
                    break;
                }
                let mut guard = tokio::select! {
                    g = master.readable() => match g {
                        Ok(g) => g,
                        Err(_) => break,
                    },
                    () = detach.cancelled() => break,
                };
                let moved = rustix::pipe::splice(
                    master.get_ref(),
                    None,
                    &relay_w,
                    None,
                    RELAY,
                    rustix::pipe::SpliceFlags::NONBLOCK | rustix::pipe::SpliceFlags::MOVE,
                );
                match moved {
                    Ok(n) if n > 0 => {}
                    Err(rustix::io::Errno::AGAIN) => guard.clear_ready(),
                    // EIO: every process let go of the terminal. Whatever
                    // the relay holds is drained before the end.
                    _ => {
                        let _ = drain_all(&slot, &relay_r).await;
                        break;
                    }
                }
            }
            slot.output.writer_closed(&relay_r);
        });
    }
}

/// Drains `pipe` until it is empty.
async fn drain_all(slot: &AgentSlot, pipe: &Arc<OwnedFd>) -> std::io::Result<()> {
    while !slot.output.drain(pipe, LogStream::Stdout).await?.empty {}
    Ok(())
}

/// Sets `pipe`'s capacity to about `bytes` (the kernel rounds up to a power
/// of two pages); a pipe that cannot grow that much keeps what it has.
fn set_pipe_size(pipe: &OwnedFd, bytes: u64) {
    let bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
    if let Err(e) = rustix::pipe::fcntl_setpipe_size(pipe, bytes) {
        tracing::debug!(bytes, error = %e, "cannot resize an agent's output pipe");
    }
}
