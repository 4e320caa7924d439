//! The log writers: a few dedicated threads that move agents' output from
//! their rings to their files. Writing to disk off the async runtime matters
//! under a flood: the kernel throttles writers of dirty pages by putting them
//! to sleep, and a throttled runtime thread would stall every stream, input
//! and heartbeat of the host with it. Here only these threads sleep, the
//! rings fill, and the flooding agents wait on their pipes.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use super::Shared;

/// Bytes one turn writes for one log before the next log gets its turn, so a
/// flooding agent cannot keep a writer to itself.
const TURN: usize = 256 * 1024;

/// Handle to the writer threads; cloned into every log. The threads end when
/// the last handle is dropped.
#[derive(Debug, Clone)]
pub struct LogWriters {
    queue: Sender<Arc<Shared>>,
}

impl LogWriters {
    /// Starts `threads` writer threads.
    pub fn start(threads: usize) -> Self {
        let (queue, rx) = channel::<Arc<Shared>>();
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

    /// Queues `log` for a turn (the caller has set its `queued` flag).
    pub(super) fn schedule(&self, log: Arc<Shared>) {
        // Fails only when every thread is gone; the log then stays in memory
        // and its agent waits, which the error says.
        if self.queue.send(log).is_err() {
            tracing::error!("no log writer thread is running; agent output is not written to disk");
        }
    }
}

fn run(rx: &Mutex<Receiver<Arc<Shared>>>) {
    let mut buf = Vec::with_capacity(TURN + 64 * 1024);
    loop {
        let next = rx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .recv();
        let Ok(log) = next else { return };
        if log.write_turn(TURN, &mut buf) {
            log.requeue();
        }
        // A flood's batches are large; do not keep their peak allocated.
        if buf.capacity() > 2 * (TURN + 64 * 1024) {
            buf = Vec::with_capacity(TURN + 64 * 1024);
        }
    }
}
