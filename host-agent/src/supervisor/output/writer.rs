//! The log writers: a few dedicated threads that move agents' output from
//! their pipes to their files. Writing to disk off the async runtime matters
//! under a flood: the kernel throttles writers of dirty pages by putting them
//! to sleep, and a throttled runtime thread would stall every stream, input
//! and heartbeat of the host with it. Here only these threads sleep, the
//! pipes fill, and the flooding agents wait on them.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use agentplane::proto::v1::LogStream;
use tokio::sync::oneshot;

use super::{Drained, Shared};

/// Bytes one turn moves for one pipe before the next pipe gets its turn, so
/// a flooding agent cannot keep a writer to itself.
const TURN: usize = 256 * 1024;

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
}

impl LogWriters {
    /// Starts `threads` writer threads.
    pub fn start(threads: usize) -> Self {
        let (queue, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("log-writer-{i}"))
                .spawn(move || run(&rx));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a log writer thread");
            }
        }
        Self { queue }
    }

    /// Queues a turn. When no thread is running the job is dropped and its
    /// waiter told so.
    pub(super) fn submit(&self, job: Job) {
        if self.queue.send(job).is_err() {
            tracing::error!("no log writer thread is running; agent output is not written to disk");
        }
    }
}

fn run(rx: &Mutex<Receiver<Job>>) {
    // Used only to drop what a failing disk refuses.
    let mut scratch = Vec::new();
    loop {
        let next = rx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .recv();
        let Ok(job) = next else { return };
        let done = job
            .log
            .drain(job.src.as_fd(), job.stream, TURN, &mut scratch);
        // The capture may be gone (its host agent detaching): nothing to tell.
        let _ = job.reply.send(done);
        scratch = Vec::new();
    }
}
