//! Agent output: stdout and stderr, read from the agent's pipes in chunks into
//! a fixed-size in-memory ring ([`ring`]), from which the log writer threads
//! ([`writer`]) append them to a size-capped pair of files ([`disk`]). Every
//! byte has an offset in the agent's whole output, across restarts, and the
//! time it was read; readers ask for an offset (or a time, or the last lines)
//! and get the newest output from memory, older output from disk, and a
//! "skipped N bytes" gap for what is no longer retained.
//!
//! Memory stays bounded whatever the agent writes: the ring's budget, one
//! 32 KiB buffer per pipe, and a sparse index per file. A producer that
//! outruns the disk fills its ring and then waits on its pipe.

mod disk;
mod ring;
mod writer;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use agentplane::proto::v1::{LogChunk, LogStream};
use tokio::sync::watch;

pub use writer::LogWriters;

/// Default cap of an agent's output on disk.
pub const DEFAULT_CAP: u64 = 64 * 1024 * 1024;
/// Smallest cap accepted (so two files hold a few chunks).
pub const MIN_CAP: u64 = 256 * 1024;
/// Default in-memory ring per agent.
pub const DEFAULT_RING: u64 = 128 * 1024;

/// What the writer threads and the log handle share.
#[derive(Debug)]
pub(crate) struct Shared {
    ring: Mutex<ring::Ring>,
    disk: disk::Disk,
    /// Offset after the last byte in the ring; wakes readers.
    end_tx: watch::Sender<u64>,
    /// Offset before which output is on disk; wakes a capture waiting for room.
    flushed_tx: watch::Sender<u64>,
    /// True while the log is in the writers' queue or being written.
    queued: AtomicBool,
    /// Set once the files are deleted: nothing more is written.
    removed: AtomicBool,
    /// A write failed (logged once per log).
    failing: AtomicBool,
    writers: LogWriters,
    id: String,
}

impl Shared {
    fn ring(&self) -> MutexGuard<'_, ring::Ring> {
        self.ring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes up to about `max` bytes of unflushed output; true when more is
    /// waiting (the log keeps its `queued` flag and goes to the back of the
    /// queue).
    pub(crate) fn write_turn(&self, max: usize, buf: &mut Vec<u8>) -> bool {
        let batch = self.ring().unflushed(max);
        let Some(last) = batch.last() else {
            self.queued.store(false, Ordering::SeqCst);
            // An append between the read above and the flag going down saw
            // the flag up and did not queue: look again.
            let ring = self.ring();
            return ring.end() > ring.flushed() && !self.queued.swap(true, Ordering::SeqCst);
        };
        let upto = last.end();
        if !self.removed.load(Ordering::Relaxed) {
            if let Err(e) = self.disk.write(&batch, buf) {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::error!(agent = %self.id, error = %e, "cannot write agent output to disk; readers will see a gap");
                }
            }
        }
        self.ring().set_flushed(upto);
        self.flushed_tx.send_replace(upto);
        true
    }

    fn requeue(self: Arc<Self>) {
        let writers = self.writers.clone();
        writers.schedule(self);
    }
}

/// One agent's output.
#[derive(Debug)]
pub struct OutputLog {
    shared: Arc<Shared>,
    pipes: AtomicUsize,
    last_output_ms: AtomicI64,
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
    /// A new, empty log in `dir` (created),
    /// keeping about `cap` bytes on disk and `ring` bytes in memory. The ring
    /// is at most half the cap, so the disk always holds what the ring has
    /// let go of.
    pub fn create(
        id: &str,
        dir: &Path,
        cap: u64,
        ring: u64,
        writers: LogWriters,
    ) -> std::io::Result<Self> {
        let cap = cap.max(MIN_CAP);
        Ok(Self::on(
            id,
            disk::Disk::create(dir, cap)?,
            cap,
            ring,
            writers,
        ))
    }

    /// Reopens the log an earlier host agent left in `dir` (see
    /// [`disk::Disk::reopen`]): new output continues at the offset after the
    /// last whole record on disk.
    pub fn open(
        id: &str,
        dir: &Path,
        cap: u64,
        ring: u64,
        writers: LogWriters,
    ) -> std::io::Result<Self> {
        let cap = cap.max(MIN_CAP);
        Ok(Self::on(
            id,
            disk::Disk::reopen(dir, cap)?,
            cap,
            ring,
            writers,
        ))
    }

    /// A log on `disk`, its ring starting where the disk ends.
    fn on(id: &str, disk: disk::Disk, cap: u64, ring: u64, writers: LogWriters) -> Self {
        let ring = usize::try_from(ring.min(cap / 2)).unwrap_or(usize::MAX);
        let end = disk.end();
        Self {
            shared: Arc::new(Shared {
                ring: Mutex::new(ring::Ring::starting_at(ring, end)),
                disk,
                end_tx: watch::channel(end).0,
                flushed_tx: watch::channel(end).0,
                queued: AtomicBool::new(false),
                removed: AtomicBool::new(false),
                failing: AtomicBool::new(false),
                writers,
                id: id.to_owned(),
            }),
            pipes: AtomicUsize::new(0),
            last_output_ms: AtomicI64::new(agentplane::time::now_ms()),
        }
    }

    /// Appends what the agent wrote on `stream`; waits while the ring is full
    /// of output the disk does not have yet.
    pub async fn append(&self, stream: LogStream, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let now = agentplane::time::now_ms();
        // Subscribed only once a push failed (and then tried again), so the
        // common path costs one lock; a flush between the failed push and
        // the subscription is seen by the retry.
        let mut flushed: Option<watch::Receiver<u64>> = None;
        let end = loop {
            let pushed = {
                let mut ring = self.shared.ring();
                ring.push(stream, data, now).then(|| ring.end())
            };
            if let Some(end) = pushed {
                break end;
            }
            match &mut flushed {
                None => flushed = Some(self.shared.flushed_tx.subscribe()),
                Some(rx) => {
                    self.schedule();
                    // Woken by the writer's progress; the sender lives in
                    // `shared`, so this cannot fail while `self` exists.
                    let _ = rx.changed().await;
                }
            }
        };
        self.last_output_ms.store(now, Ordering::Relaxed);
        // stdout's and stderr's captures may publish out of order: the end
        // readers see only moves forward.
        self.shared.end_tx.send_if_modified(|e| {
            let later = end > *e;
            *e = (*e).max(end);
            later
        });
        self.schedule();
    }

    fn schedule(&self) {
        if !self.shared.queued.swap(true, Ordering::SeqCst) {
            self.shared.writers.schedule(self.shared.clone());
        }
    }

    /// The offset after the last byte.
    pub fn end(&self) -> u64 {
        *self.shared.end_tx.borrow()
    }

    /// The oldest offset still retained.
    pub fn retained_from(&self) -> u64 {
        let ring_start = self.shared.ring().start();
        self.shared.disk.retained_from().min(ring_start)
    }

    /// Bytes the ring holds now (overhead included).
    pub fn buffered_bytes(&self) -> usize {
        self.shared.ring().used()
    }

    /// Output before this offset is on disk.
    pub fn flushed(&self) -> u64 {
        *self.shared.flushed_tx.borrow()
    }

    /// Waits until everything appended so far is on disk (a host agent
    /// that leaves its agents running hands their output over whole).
    pub async fn wait_flushed(&self) {
        let end = self.end();
        let mut rx = self.shared.flushed_tx.subscribe();
        // The sender lives in `shared`, so this cannot fail while `self` exists.
        let _ = rx.wait_for(|f| *f >= end).await;
    }

    /// Wakes on every append and when the last pipe closes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.end_tx.subscribe()
    }

    /// When the agent last wrote, ms since the epoch.
    pub fn last_output_ms(&self) -> i64 {
        self.last_output_ms.load(Ordering::Relaxed)
    }

    /// A pipe reader starts.
    pub fn writer_opened(&self) {
        self.pipes.fetch_add(1, Ordering::SeqCst);
    }

    /// A pipe reader reached EOF.
    pub fn writer_closed(&self) {
        self.pipes.fetch_sub(1, Ordering::SeqCst);
        self.shared.end_tx.send_modify(|_| {});
    }

    /// True while a pipe reader may still append.
    pub fn has_writers(&self) -> bool {
        self.pipes.load(Ordering::SeqCst) > 0
    }

    /// What the ring has from `from`, or where the ring starts when it no
    /// longer holds `from`.
    fn read_ring(&self, from: u64, max: usize, filter: LogStream) -> Result<ReadResult, u64> {
        let ring = self.shared.ring();
        if from < ring.start() {
            return Err(ring.start());
        }
        let (chunks, next) = ring.read(from, max, filter);
        Ok(ReadResult { chunks, next })
    }

    /// Like [`OutputLog::read`], but only when the ring still holds `from`:
    /// never touches the disk, so it may run on the async runtime.
    pub fn read_memory(&self, from: u64, max: usize, filter: LogStream) -> Option<ReadResult> {
        self.read_ring(from, max, filter).ok()
    }

    /// Up to about `max` bytes from offset `from`, only `filter`'s stream
    /// (UNSPECIFIED: both): from memory when the ring still holds `from`,
    /// else from disk (which holds everything older than the ring). May
    /// block on the disk.
    pub fn read(&self, from: u64, max: usize, filter: LogStream) -> std::io::Result<ReadResult> {
        match self.read_ring(from, max, filter) {
            Ok(r) => Ok(r),
            // Only up to where the ring starts: past it, memory has what the
            // disk may lack (output whose write failed).
            Err(ring_start) => {
                let (chunks, next) = self.shared.disk.read(from, ring_start, max, filter)?;
                Ok(ReadResult { chunks, next })
            }
        }
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
        let in_memory = {
            let ring = self.shared.ring();
            match ring.oldest_time_ms() {
                Some(t) if t < time_ms => {
                    return Ok(ring.first_at_or_after(time_ms).unwrap_or(ring.end()));
                }
                _ => ring.start(),
            }
        };
        // The ring's records are all recent enough: the answer is on disk, or
        // the ring's first record.
        Ok(self
            .shared
            .disk
            .first_at_or_after(time_ms)?
            .map_or(in_memory, |o| o.min(in_memory)))
    }

    /// Deletes the files; output still in memory is not written.
    pub fn remove(&self) {
        self.shared.removed.store(true, Ordering::Relaxed);
        self.shared.disk.remove();
    }
}

#[cfg(test)]
mod tests;
