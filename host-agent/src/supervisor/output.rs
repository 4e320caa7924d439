//! Agent output on the host's disk: stdout and stderr, read from the agent's
//! pipes in chunks and appended to a size-capped pair of files (the current one
//! and one rotated predecessor, each at most half the cap). Every byte has an
//! offset in the agent's whole output, across restarts; readers ask for an
//! offset and get what is still retained, or a "skipped N bytes" gap.
//!
//! Memory stays bounded whatever the agent writes: one 64 KiB buffer per pipe
//! and a sparse index; a producer that outruns the disk is slowed by its pipe.
//!
//! File format: records of a 13-byte header (offset u64 BE, stream u8,
//! length u32 BE) followed by the bytes.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use agentplane::proto::v1::{LogChunk, LogStream};
use tokio::sync::watch;

const HEADER: u64 = 13;
/// One index entry per this many bytes of file.
const INDEX_EVERY: u64 = 64 * 1024;
/// Default cap of an agent's output on disk.
pub const DEFAULT_CAP: u64 = 64 * 1024 * 1024;
/// Smallest cap accepted (so two files hold a few chunks).
pub const MIN_CAP: u64 = 256 * 1024;

#[derive(Debug)]
struct Segment {
    /// Offset of its first byte.
    start: u64,
    /// Bytes written to it (headers included).
    size: u64,
    /// (offset of a record, its position in the file), ascending.
    index: Vec<(u64, u64)>,
}

#[derive(Debug)]
struct State {
    file: File,
    current: Segment,
    previous: Option<Segment>,
    end: u64,
}

/// One agent's output.
#[derive(Debug)]
pub struct OutputLog {
    dir: PathBuf,
    half_cap: u64,
    state: Mutex<State>,
    end_tx: watch::Sender<u64>,
    writers: AtomicUsize,
    last_output_ms: AtomicI64,
}

/// What a read found.
#[derive(Debug, Default)]
pub struct ReadResult {
    /// The chunks, in order.
    pub chunks: Vec<LogChunk>,
    /// Bytes before the first retained one that were asked for but are gone.
    pub skipped: u64,
    /// Where to read next.
    pub next: u64,
}

impl OutputLog {
    /// A new, empty log in `dir` (created; old files in it are removed).
    pub fn create(dir: &Path, cap: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let _ = std::fs::remove_file(dir.join("output.1"));
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(dir.join("output.log"))?;
        Ok(Self {
            dir: dir.to_owned(),
            half_cap: cap.max(MIN_CAP) / 2,
            state: Mutex::new(State {
                file,
                current: Segment {
                    start: 0,
                    size: 0,
                    index: Vec::new(),
                },
                previous: None,
                end: 0,
            }),
            end_tx: watch::channel(0).0,
            writers: AtomicUsize::new(0),
            last_output_ms: AtomicI64::new(agentplane::time::now_ms()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends what the agent wrote on `stream`.
    pub fn append(&self, stream: LogStream, data: &[u8]) -> std::io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let end = {
            let mut st = self.lock();
            let offset = st.end;
            let mut rec = Vec::with_capacity(HEADER as usize + data.len());
            rec.extend_from_slice(&offset.to_be_bytes());
            rec.push(stream as u8);
            rec.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
            rec.extend_from_slice(data);
            let pos = st.current.size;
            if st
                .current
                .index
                .last()
                .is_none_or(|(_, p)| pos - p >= INDEX_EVERY)
            {
                st.current.index.push((offset, pos));
            }
            st.file.write_all(&rec)?;
            st.current.size += rec.len() as u64;
            st.end += data.len() as u64;
            if st.current.size >= self.half_cap {
                self.rotate(&mut st)?;
            }
            st.end
        };
        self.last_output_ms
            .store(agentplane::time::now_ms(), Ordering::Relaxed);
        self.end_tx.send_replace(end);
        Ok(())
    }

    fn rotate(&self, st: &mut State) -> std::io::Result<()> {
        std::fs::rename(self.dir.join("output.log"), self.dir.join("output.1"))?;
        st.file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(self.dir.join("output.log"))?;
        let fresh = Segment {
            start: st.end,
            size: 0,
            index: Vec::new(),
        };
        st.previous = Some(std::mem::replace(&mut st.current, fresh));
        Ok(())
    }

    /// The offset after the last byte.
    pub fn end(&self) -> u64 {
        *self.end_tx.borrow()
    }

    /// The oldest offset still retained.
    pub fn retained_from(&self) -> u64 {
        let st = self.lock();
        st.previous.as_ref().map_or(st.current.start, |p| p.start)
    }

    /// Wakes on every append and when the last writer closes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.end_tx.subscribe()
    }

    /// When the agent last wrote, ms since the epoch.
    pub fn last_output_ms(&self) -> i64 {
        self.last_output_ms.load(Ordering::Relaxed)
    }

    /// A pipe reader starts.
    pub fn writer_opened(&self) {
        self.writers.fetch_add(1, Ordering::SeqCst);
    }

    /// A pipe reader reached EOF.
    pub fn writer_closed(&self) {
        self.writers.fetch_sub(1, Ordering::SeqCst);
        self.end_tx.send_modify(|_| {});
    }

    /// True while a pipe reader may still append.
    pub fn has_writers(&self) -> bool {
        self.writers.load(Ordering::SeqCst) > 0
    }

    /// Up to about `max` bytes from offset `from`, only `filter`'s stream
    /// (UNSPECIFIED: both).
    pub fn read(&self, from: u64, max: usize, filter: LogStream) -> std::io::Result<ReadResult> {
        // The files are opened under the lock, together with the snapshot of
        // where they start: a rotation after that renames paths, but these
        // descriptors keep pointing at the data the snapshot describes.
        let (segments, end) = {
            let st = self.lock();
            let mut segs = Vec::with_capacity(2);
            if let Some(p) = &st.previous {
                if let Ok(f) = File::open(self.dir.join("output.1")) {
                    segs.push((f, p.start, p.index.clone(), st.current.start));
                }
            }
            let f = File::open(self.dir.join("output.log"))?;
            segs.push((f, st.current.start, st.current.index.clone(), st.end));
            (segs, st.end)
        };
        let retained = segments[0].1;
        let mut out = ReadResult {
            next: from.max(retained),
            skipped: retained.saturating_sub(from),
            chunks: Vec::new(),
        };
        let mut budget = max;
        for (mut f, _start, index, seg_end) in segments {
            if out.next >= seg_end || budget == 0 {
                continue;
            }
            let pos = index
                .iter()
                .rev()
                .find(|(off, _)| *off <= out.next)
                .map_or(0, |(_, p)| *p);
            f.seek(SeekFrom::Start(pos))?;
            let mut header = [0u8; HEADER as usize];
            loop {
                if out.next >= seg_end || budget == 0 {
                    break;
                }
                if f.read_exact(&mut header).is_err() {
                    break;
                }
                let off = u64::from_be_bytes(header[0..8].try_into().unwrap_or_default());
                let stream = LogStream::try_from(i32::from(header[8])).unwrap_or(LogStream::Stdout);
                let len = u64::from(u32::from_be_bytes(
                    header[9..13].try_into().unwrap_or_default(),
                ));
                if off + len <= out.next || (filter != LogStream::Unspecified && stream != filter) {
                    if off + len > out.next {
                        out.next = off + len;
                    }
                    f.seek(SeekFrom::Current(i64::try_from(len).unwrap_or(i64::MAX)))?;
                    continue;
                }
                let skip = out.next.saturating_sub(off);
                f.seek(SeekFrom::Current(i64::try_from(skip).unwrap_or(0)))?;
                let take = (len - skip).min(budget as u64);
                let mut data = vec![0u8; usize::try_from(take).unwrap_or(0)];
                f.read_exact(&mut data)?;
                out.chunks.push(LogChunk {
                    offset: out.next,
                    stream: stream as i32,
                    data,
                    skipped: 0,
                });
                out.next += take;
                budget -= usize::try_from(take).unwrap_or(budget);
                if take < len - skip {
                    break;
                }
            }
        }
        out.next = out.next.min(end);
        Ok(out)
    }

    /// The offset where the last `lines` lines start (bounded by what is retained).
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
            let r = self.read(
                from,
                usize::try_from(end - from).unwrap_or(usize::MAX),
                filter,
            )?;
            let mut newlines: Vec<u64> = Vec::new();
            for c in &r.chunks {
                for (i, b) in c.data.iter().enumerate() {
                    if *b == b'\n' {
                        newlines.push(c.offset + i as u64 + 1);
                    }
                }
            }
            // A trailing newline ends the last line rather than starting one.
            if newlines.last() == Some(&end) {
                newlines.pop();
            }
            let n = usize::try_from(lines).unwrap_or(usize::MAX);
            if newlines.len() >= n {
                return Ok(newlines[newlines.len() - n]);
            }
            if from == retained {
                return Ok(retained);
            }
            window *= 4;
        }
    }

    /// Deletes the files.
    pub fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(r: &ReadResult) -> String {
        r.chunks
            .iter()
            .map(|c| String::from_utf8_lossy(&c.data).into_owned())
            .collect()
    }

    #[test]
    fn reads_from_any_offset_and_filters_streams() {
        let dir = tempfile::tempdir().unwrap();
        let log = OutputLog::create(dir.path(), MIN_CAP).unwrap();
        log.append(LogStream::Stdout, b"hello ").unwrap();
        log.append(LogStream::Stderr, b"oops\n").unwrap();
        log.append(LogStream::Stdout, b"world\n").unwrap();
        assert_eq!(log.end(), 17);
        let all = log.read(0, 1 << 20, LogStream::Unspecified).unwrap();
        assert_eq!(text(&all), "hello oops\nworld\n");
        assert_eq!(all.next, 17);
        let mid = log.read(3, 1 << 20, LogStream::Unspecified).unwrap();
        assert_eq!(text(&mid), "lo oops\nworld\n");
        assert_eq!(mid.chunks[0].offset, 3);
        let out = log.read(0, 1 << 20, LogStream::Stdout).unwrap();
        assert_eq!(text(&out), "hello world\n");
        assert_eq!(out.next, 17);
        let small = log.read(0, 4, LogStream::Unspecified).unwrap();
        assert_eq!(text(&small), "hell");
        assert_eq!(small.next, 4);
        assert_eq!(log.tail_offset(1, LogStream::Unspecified).unwrap(), 11);
        assert_eq!(log.tail_offset(5, LogStream::Unspecified).unwrap(), 0);
    }

    #[test]
    fn rotation_keeps_the_disk_under_the_cap_and_reports_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let log = OutputLog::create(dir.path(), MIN_CAP).unwrap();
        let block = vec![b'y'; 4096];
        for _ in 0..1000 {
            log.append(LogStream::Stdout, &block).unwrap();
        }
        let on_disk: u64 = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(
            on_disk <= MIN_CAP + 4096 + 2 * HEADER,
            "{on_disk} bytes on disk"
        );
        let r = log.read(0, 100, LogStream::Unspecified).unwrap();
        assert!(r.skipped > 0, "old output is reported as skipped");
        assert_eq!(r.chunks[0].offset, log.retained_from());
        let tail = log
            .read(log.end() - 10, 100, LogStream::Unspecified)
            .unwrap();
        assert_eq!(tail.chunks.iter().map(|c| c.data.len()).sum::<usize>(), 10);
    }
}
