//! The log writers: a few dedicated threads that move agents' output from
//! their pipes to their files. Writing to disk off the async runtime matters
//! under a flood: the kernel throttles writers of dirty pages by putting them
//! to sleep, and a throttled runtime thread would stall every stream, input
//! and heartbeat of the host with it. Here only these threads sleep, the
//! pipes fill, and the flooding agents wait on them.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use agentplane::proto::v1::LogStream;
use tokio::sync::oneshot;

use super::{Drained, Shared};

/// Bytes one turn moves for one pipe before the next pipe gets its turn, so
/// a flooding agent cannot keep a writer to itself.
const TURN: usize = 256 * 1024;
/// Turns one job may take in a row while no other job waits: a flooding
/// agent's pipe refills while its capture hands the next turn over (two
/// thread wake-ups), and its writer would sit idle for that time; bounded,
/// so that a capture letting go (a host agent detaching) waits at most
/// this many turns.
const MAX_TURNS: u32 = 8;

/// One turn: move what `src` holds into `log`'s files, then answer.
pub(super) struct Job {
    pub(super) log: Arc<Shared>,
    /// Shared with the capture, so the descriptor outlives a capture that is
    /// dropped while its turn runs.
    pub(super) src: Arc<OwnedFd>,
    pub(super) stream: LogStream,
    pub(super) reply: oneshot::Sender<std::io::Result<Drained>>,
}

/// Handle to the writer threads; cloned into every log. The threads end when
/// the last handle is dropped.
#[derive(Debug, Clone)]
pub struct LogWriters {
    queue: Sender<Job>,
    /// Jobs queued and not yet taken by a thread.
    waiting: Arc<AtomicUsize>,
    /// Every log's bytes, written and dropped.
    bytes: LogBytes,
}

/// Agents' output bytes of every log of this host agent, as metrics.
#[derive(Debug, Clone, Default)]
pub struct LogBytes {
    /// Written into log files.
    pub written: prometheus_client::metrics::counter::Counter,
    /// Read out of an agent's pipe and not written (the disk refused them,
    /// or the log was deleted): readers see a gap.
    pub dropped: prometheus_client::metrics::counter::Counter,
}

impl LogWriters {
    /// Starts `threads` writer threads.
    pub fn start(threads: usize) -> Self {
        let (queue, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let waiting = Arc::new(AtomicUsize::new(0));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let w = waiting.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("log-writer-{i}"))
                .spawn(move || run(&rx, &w));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a log writer thread");
            }
        }
        Self {
            queue,
            waiting,
            bytes: LogBytes::default(),
        }
    }

    /// The byte counters every log of these writers adds to.
    pub fn bytes(&self) -> &LogBytes {
        &self.bytes
    }

    /// Queues a turn. When no thread is running the job is dropped and its
    /// waiter told so.
    pub(super) fn submit(&self, job: Job) {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        if self.queue.send(job).is_err() {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            tracing::error!("no log writer thread is running; agent output is not written to disk");
        }
    }
}

fn run(rx: &Mutex<Receiver<Job>>, waiting: &AtomicUsize) {
    // Used only to drop what a failing disk refuses.
    let mut scratch = Vec::new();
    loop {
        let next = rx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .recv();
        let Ok(job) = next else { return };
        waiting.fetch_sub(1, Ordering::Relaxed);
        let (mut moved, mut turns) = (0, 1);
        let done = loop {
            match job
                .log
                .drain(job.src.as_fd(), job.stream, TURN, &mut scratch)
            {
                Ok(d) if !d.empty && turns < MAX_TURNS && waiting.load(Ordering::Relaxed) == 0 => {
                    moved += d.moved;
                    turns += 1;
                }
                Ok(d) => {
                    break Ok(Drained {
                        moved: moved + d.moved,
                        empty: d.empty,
                    })
                }
                Err(e) => break Err(e),
            }
        };
        // The capture may be gone (its host agent detaching): nothing to tell.
        let _ = job.reply.send(done);
        scratch = Vec::new();
    }
}
