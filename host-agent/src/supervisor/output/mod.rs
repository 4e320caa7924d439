//! Agent output: stdout and stderr move from the agent's pipes into a
//! size-capped pair of files per agent ([`disk`]) inside the kernel
//! (splice), on a few log writer threads ([`writer`]). A byte leaves its pipe
//! only as it enters a file, so a host agent killed at any instant loses no
//! output and writes none twice: the next one reads on from the same pipes,
//! which the keeper holds. Every byte has an offset in the agent's whole
//! output, across restarts, and the time it was read; readers ask for an
//! offset (or a time, or the last lines) and get it from the files (the page
//! cache holds the newest), with a "skipped N bytes" gap for what is no
//! longer retained.
//!
//! Memory stays bounded whatever the agent writes: output waits in the
//! agent's pipe (whose capacity is the spec's `log_buffer_bytes`) until the
//! disk takes it, passes through no buffer of this process, and the files
//! have a sparse index each. An agent that outruns the disk fills its pipe
//! and waits.

mod disk;
mod records;
mod writer;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use agentplane::proto::v1::{LogChunk, LogStream};
use tokio::sync::{oneshot, watch};

pub use writer::{LogBytes, LogWriters};

/// Default cap of an agent's output on disk.
pub const DEFAULT_CAP: u64 = 64 * 1024 * 1024;
/// Smallest cap accepted (so two files hold a few chunks).
pub const MIN_CAP: u64 = 256 * 1024;
/// Default capacity of an agent's output pipes: how far its output may run
/// ahead of the disk before it waits.
pub const DEFAULT_BUFFER: u64 = 128 * 1024;

/// What the writer threads and the log handle share.
#[derive(Debug)]
pub(crate) struct Shared {
    disk: disk::Disk,
    /// Offset after the last byte on disk; wakes readers.
    end_tx: watch::Sender<u64>,
    /// When the agent last wrote, ms since the epoch.
    last_output_ms: AtomicI64,
    /// Set once the files are deleted: nothing more is written.
    removed: AtomicBool,
    /// A write failed (logged once per log).
    failing: AtomicBool,
    id: String,
    /// This host agent's byte counters.
    bytes: LogBytes,
}

/// What one drain of a pipe did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Bytes that left the pipe (onto the disk, or into a gap).
    pub moved: u64,
    /// The pipe was found empty: wait for it to be readable again.
    pub empty: bool,
}

impl Shared {
    /// Moves what the pipe `src` holds into the files, about `budget` bytes
    /// at most (so that a flooding agent cannot keep a writer to itself).
    /// Blocks on the disk: runs on a writer thread. When the disk refuses
    /// the bytes they are read out of the pipe and dropped, and readers see
    /// a gap: a full disk must not stop the agent.
    pub(crate) fn drain(
        &self,
        src: BorrowedFd<'_>,
        stream: LogStream,
        budget: usize,
        scratch: &mut Vec<u8>,
    ) -> std::io::Result<Drained> {
        let mut moved = 0u64;
        while moved < budget as u64 {
            let waiting = usize::try_from(rustix::io::ioctl_fionread(src)?).unwrap_or(usize::MAX);
            if waiting == 0 {
                return Ok(Drained { moved, empty: true });
            }
            let left = usize::try_from(budget as u64 - moved).unwrap_or(usize::MAX);
            let want = waiting.min(left).min(self.disk.max_record());
            let now = agentplane::time::now_ms();
            let n = if self.removed.load(Ordering::Relaxed) {
                let n = discard(src, want, scratch)?;
                self.bytes.dropped.inc_by(n);
                n
            } else {
                match self.disk.splice_record(src, stream, want, now) {
                    Ok(0) => return Ok(Drained { moved, empty: true }),
                    Ok(n) => {
                        self.bytes.written.inc_by(n);
                        n
                    }
                    Err(e) => {
                        if !self.failing.swap(true, Ordering::Relaxed) {
                            tracing::error!(agent = %self.id, error = %e, "cannot write agent output to disk; readers will see a gap");
                        }
                        let n = discard(src, want, scratch)?;
                        self.bytes.dropped.inc_by(n);
                        self.disk.skip_to(self.disk.end() + n);
                        n
                    }
                }
            };
            moved += n;
            self.last_output_ms.store(now, Ordering::Relaxed);
            // stdout's and stderr's drains may publish out of order: the end
            // readers see only moves forward.
            let end = self.disk.end();
            self.end_tx.send_if_modified(|e| {
                let later = end > *e;
                *e = (*e).max(end);
                later
            });
        }
        Ok(Drained {
            moved,
            empty: false,
        })
    }
}

/// Reads up to `want` bytes out of `src` and drops them; how many it read.
fn discard(src: BorrowedFd<'_>, want: usize, scratch: &mut Vec<u8>) -> std::io::Result<u64> {
    scratch.resize(want.min(256 * 1024), 0);
    match rustix::io::read(src, &mut scratch[..]) {
        Ok(n) => Ok(n as u64),
        Err(rustix::io::Errno::AGAIN) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// One agent's output.
#[derive(Debug)]
pub struct OutputLog {
    shared: Arc<Shared>,
    writers: LogWriters,
    /// The pipes being captured (for what waits in them, and to know when
    /// the last has closed).
    pipes: Mutex<Vec<Arc<OwnedFd>>>,
}

/// What a read found.
#[derive(Debug, Default)]
pub struct ReadResult {
    /// The chunks, in order; a chunk with `skipped` set is a gap.
    pub chunks: Vec<LogChunk>,
    /// Where to read next.
    pub next: u64,
}

impl OutputLog {
    /// A new, empty log in `dir` (created), keeping about `cap` bytes on disk.
    pub fn create(id: &str, dir: &Path, cap: u64, writers: LogWriters) -> std::io::Result<Self> {
        let cap = cap.max(MIN_CAP);
        Ok(Self::on(id, disk::Disk::create(dir, cap)?, writers))
    }

    /// Reopens the log an earlier host agent left in `dir` (see
    /// [`disk::Disk::reopen`]): new output continues at the offset after the
    /// last record on disk.
    pub fn open(id: &str, dir: &Path, cap: u64, writers: LogWriters) -> std::io::Result<Self> {
        let cap = cap.max(MIN_CAP);
        Ok(Self::on(id, disk::Disk::reopen(dir, cap)?, writers))
    }

    fn on(id: &str, disk: disk::Disk, writers: LogWriters) -> Self {
        let end = disk.end();
        // A reopened log's agent last wrote when its newest record was read:
        // idleness goes on from there across a host-agent restart.
        let last_output_ms = disk.last_time_ms().unwrap_or_else(agentplane::time::now_ms);
        Self {
            shared: Arc::new(Shared {
                disk,
                end_tx: watch::channel(end).0,
                last_output_ms: AtomicI64::new(last_output_ms),
                removed: AtomicBool::new(false),
                failing: AtomicBool::new(false),
                id: id.to_owned(),
                bytes: writers.bytes().clone(),
            }),
            writers,
            pipes: Mutex::new(Vec::new()),
        }
    }

    fn pipes(&self) -> MutexGuard<'_, Vec<Arc<OwnedFd>>> {
        self.pipes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Moves what the pipe `src` holds (`stream`'s output) to disk, on a
    /// writer thread; at most a turn's worth, so call again until `empty`.
    pub async fn drain(&self, src: &Arc<OwnedFd>, stream: LogStream) -> std::io::Result<Drained> {
        let (reply, rx) = oneshot::channel();
        self.writers.submit(writer::Job {
            log: self.shared.clone(),
            src: src.clone(),
            stream,
            reply,
        });
        rx.await
            .unwrap_or_else(|_| Err(std::io::Error::other("no log writer thread is running")))
    }

    /// [`OutputLog::drain`] on this thread, until the pipe is empty.
    #[cfg(test)]
    pub(crate) fn drain_here(&self, src: BorrowedFd<'_>, stream: LogStream) -> u64 {
        let mut scratch = Vec::new();
        let d = self
            .shared
            .drain(src, stream, usize::MAX, &mut scratch)
            .expect("drain");
        d.moved
    }

    /// The offset after the last byte.
    pub fn end(&self) -> u64 {
        *self.shared.end_tx.borrow()
    }

    /// The oldest offset still retained.
    pub fn retained_from(&self) -> u64 {
        self.shared.disk.retained_from()
    }

    /// Bytes the agent wrote that wait in its pipes for the disk.
    pub fn waiting_bytes(&self) -> u64 {
        self.pipes()
            .iter()
            .map(|p| rustix::io::ioctl_fionread(p.as_fd()).unwrap_or(0))
            .sum()
    }

    /// Wakes on every record and when the last pipe closes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.end_tx.subscribe()
    }

    /// When the agent last wrote, ms since the epoch.
    pub fn last_output_ms(&self) -> i64 {
        self.shared.last_output_ms.load(Ordering::Relaxed)
    }

    /// A capture of `pipe` starts.
    pub fn writer_opened(&self, pipe: &Arc<OwnedFd>) {
        self.pipes().push(pipe.clone());
    }

    /// The capture of `pipe` ended (EOF, or handed to the next host agent).
    pub fn writer_closed(&self, pipe: &Arc<OwnedFd>) {
        self.pipes().retain(|p| !Arc::ptr_eq(p, pipe));
        self.shared.end_tx.send_modify(|_| {});
    }

    /// True while a capture may still add output.
    pub fn has_writers(&self) -> bool {
        !self.pipes().is_empty()
    }

    /// Up to about `max` bytes from offset `from`, only `filter`'s stream
    /// (UNSPECIFIED: both), from the files; a gap is a chunk with `skipped`
    /// set. May block on the disk.
    pub fn read(&self, from: u64, max: usize, filter: LogStream) -> std::io::Result<ReadResult> {
        let (chunks, next) = self.shared.disk.read(from, self.end(), max, filter)?;
        Ok(ReadResult { chunks, next })
    }

    /// The offset where the last `lines` lines of `filter`'s stream start
    /// (bounded by what is retained). Memory stays bounded whatever `lines`
    /// is: newlines are counted, then the one wanted is found. May block on
    /// the disk.
    pub fn tail_offset(&self, lines: u64, filter: LogStream) -> std::io::Result<u64> {
        let retained = self.retained_from();
        let end = self.end();
        if lines == 0 {
            return Ok(end);
        }
        // Walk back in windows; output is bounded by the cap, so this is too.
        let mut window = 64 * 1024u64;
        loop {
            let from = end.saturating_sub(window).max(retained);
            let mut count = 0u64;
            let mut last_newline = None;
            let last_byte = self.scan(from, end, filter, &mut |after| {
                count += 1;
                last_newline = Some(after);
            })?;
            // A newline that is the stream's last byte ends the last line
            // rather than starting one.
            if last_newline.is_some() && last_newline == last_byte {
                count -= 1;
            }
            if count >= lines {
                let wanted = count - lines;
                let mut seen = 0u64;
                let mut found = None;
                self.scan(from, end, filter, &mut |after| {
                    if seen == wanted {
                        found.get_or_insert(after);
                    }
                    seen += 1;
                })?;
                return Ok(found.unwrap_or(end));
            }
            if from == retained {
                return Ok(retained);
            }
            window *= 4;
        }
    }

    /// Calls `on_newline` with the offset after each newline of `filter`'s
    /// stream in `[from, end)`; returns the offset after the last byte of
    /// that stream seen there.
    fn scan(
        &self,
        from: u64,
        end: u64,
        filter: LogStream,
        on_newline: &mut dyn FnMut(u64),
    ) -> std::io::Result<Option<u64>> {
        let mut at = from;
        let mut last = None;
        while at < end {
            let r = self.read(at, 1 << 20, filter)?;
            for c in &r.chunks {
                let within = usize::try_from(end.saturating_sub(c.offset))
                    .unwrap_or(usize::MAX)
                    .min(c.data.len());
                if within == 0 {
                    continue;
                }
                for (i, b) in c.data[..within].iter().enumerate() {
                    if *b == b'\n' {
                        on_newline(c.offset + i as u64 + 1);
                    }
                }
                last = Some(c.offset + within as u64);
            }
            if r.next <= at {
                break;
            }
            at = r.next;
        }
        Ok(last)
    }

    /// The offset of the first byte read at or after `time_ms` (the end when
    /// there is none; the oldest retained byte when all are that recent).
    pub fn since_offset(&self, time_ms: i64) -> std::io::Result<u64> {
        Ok(self
            .shared
            .disk
            .first_at_or_after(time_ms)?
            .unwrap_or_else(|| self.end()))
    }

    /// Deletes the files; what the pipes still hold is not written.
    pub fn remove(&self) {
        self.shared.removed.store(true, Ordering::Relaxed);
        self.shared.disk.remove();
    }
}

#[cfg(test)]
mod tests;
