//! One agent's output on disk: a size-capped pair of files (the current one
//! and one rotated predecessor, each at most half the cap). Only the log
//! writer thread writes them; readers open them by path under the metadata
//! lock, so a rotation cannot swap a file under a reader's snapshot.
//!
//! File format: records (`records.rs`), each a header and its bytes.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::BorrowedFd;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use agentplane::proto::v1::{LogChunk, LogStream};

use super::records::{Records, HEADER};

/// One index entry per this many bytes of file at least...
const INDEX_EVERY: u64 = 64 * 1024;
/// ...and at most this many entries per file, whatever the cap.
const MAX_INDEX: u64 = 4096;
/// Most bytes of filtered-out output one read passes over.
const PASS_LIMIT: u64 = 4 * 1024 * 1024;

/// A place in a file: a record's offset and time, and where it starts.
#[derive(Debug, Clone, Copy)]
struct Mark {
    offset: u64,
    time_ms: i64,
    pos: u64,
}

#[derive(Debug, Clone)]
struct Segment {
    /// Offset of its first byte.
    start: u64,
    /// Bytes written to it (headers included).
    size: u64,
    /// Offset after its last byte.
    end: u64,
    /// Sparse index, ascending.
    index: Vec<Mark>,
    /// When its last record was read, ms since the epoch.
    last_time_ms: Option<i64>,
}

impl Segment {
    /// Where in the file the record that the index places at or before
    /// `offset` starts.
    fn position_of(&self, offset: u64) -> u64 {
        let i = self.index.partition_point(|m| m.offset <= offset);
        if i == 0 {
            0
        } else {
            self.index[i - 1].pos
        }
    }

    fn empty(start: u64) -> Self {
        Self {
            start,
            size: 0,
            end: start,
            index: Vec::new(),
            last_time_ms: None,
        }
    }
}

#[derive(Debug)]
struct Meta {
    current: Segment,
    previous: Option<Segment>,
}

/// The files.
#[derive(Debug)]
pub struct Disk {
    dir: PathBuf,
    half_cap: u64,
    /// Bytes of file between index entries.
    index_every: u64,
    /// The current file, held by the writer while it writes.
    pub(super) file: Mutex<File>,
    meta: Mutex<Meta>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Disk {
    /// New, empty files in `dir` (created; every start has a directory of
    /// its own), holding at most about `cap` bytes.
    pub fn create(dir: &Path, cap: u64) -> std::io::Result<Self> {
        // Output often carries secrets: only the host agent's user reads it.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(dir.join("output.log"))?;
        Ok(Self {
            dir: dir.to_owned(),
            half_cap: cap / 2,
            index_every: INDEX_EVERY.max(cap / 2 / MAX_INDEX),
            file: Mutex::new(file),
            meta: Mutex::new(Meta {
                current: Segment::empty(0),
                previous: None,
            }),
        })
    }

    /// Reopens the files an earlier host agent left in `dir` (its agent
    /// outlived it): every record header is read to rebuild the segments
    /// and their index. A record a kill tore during its splice keeps the
    /// bytes that made it to the file (they left the pipe) and gets its
    /// length fixed; a header with none of its bytes, a partial header or an
    /// offset going back is cut off the end of the current file, so new
    /// output follows the last record.
    pub fn reopen(dir: &Path, cap: u64) -> std::io::Result<Self> {
        let index_every = INDEX_EVERY.max(cap / 2 / MAX_INDEX);
        let previous = match File::open(dir.join("output.1")) {
            Ok(f) => Some(scan(&f, 0, index_every)?.0),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join("output.log"))?;
        let (current, torn) = scan(&file, previous.as_ref().map_or(0, |p| p.end), index_every)?;
        if let Some((pos, kept)) = torn {
            let kept = u32::try_from(kept).unwrap_or(u32::MAX);
            file.write_all_at(&kept.to_be_bytes(), pos + 17)?;
        }
        if file.metadata()?.len() > current.size {
            file.set_len(current.size)?;
        }
        file.seek(SeekFrom::Start(current.size))?;
        Ok(Self {
            dir: dir.to_owned(),
            half_cap: cap / 2,
            index_every,
            file: Mutex::new(file),
            meta: Mutex::new(Meta { current, previous }),
        })
    }

    /// Most bytes one record should hold: a file passes half the cap by at
    /// most one record, so that is a small part of it.
    pub fn max_record(&self) -> usize {
        usize::try_from(self.half_cap / 4)
            .unwrap_or(usize::MAX)
            .clamp(4096, 1 << 20)
    }

    /// When the newest record on disk was read (a reopened log: when its
    /// agent last wrote), ms since the epoch.
    pub fn last_time_ms(&self) -> Option<i64> {
        let meta = lock(&self.meta);
        meta.current
            .last_time_ms
            .or_else(|| meta.previous.as_ref().and_then(|p| p.last_time_ms))
    }

    /// The offset after the last byte on disk.
    pub fn end(&self) -> u64 {
        lock(&self.meta).current.end
    }

    /// Moves up to `len` bytes of `stream` from the pipe `src` into one new
    /// record at the end of the current file, read at `time_ms`; returns how
    /// many moved (0: the pipe had none). Only one thread calls this for a
    /// given log at a time (the writer that holds it); readers see the
    /// record once this returns.
    ///
    /// The bytes go from the pipe to the file in the kernel (splice), so
    /// they leave the pipe only as they enter the file: a host agent killed
    /// at any instant has lost nothing and written nothing twice. The header
    /// is written first, claiming `len`; a kill before the splice leaves a
    /// header with no bytes, one during it a header claiming more than
    /// follows, and [`Disk::reopen`] repairs both.
    pub fn splice_record(
        &self,
        src: BorrowedFd<'_>,
        stream: LogStream,
        len: usize,
        time_ms: i64,
    ) -> std::io::Result<u64> {
        let mut file = lock(&self.file);
        let (pos, offset, last_mark) = {
            let meta = lock(&self.meta);
            let c = &meta.current;
            (c.size, c.end, c.index.last().map(|m| m.pos))
        };
        let len32 = u32::try_from(len).unwrap_or(u32::MAX);
        let mut header = [0u8; HEADER];
        header[0..8].copy_from_slice(&offset.to_be_bytes());
        header[8..16].copy_from_slice(&time_ms.to_be_bytes());
        header[16] = stream as u8;
        header[17..21].copy_from_slice(&len32.to_be_bytes());
        if let Err(e) = file.write_all_at(&header, pos) {
            let _ = file.set_len(pos);
            return Err(e);
        }
        // The slow part (the kernel may throttle a writer of dirty pages),
        // done without the metadata lock so readers are never held by it.
        let mut at = pos + HEADER as u64;
        let moved = rustix::pipe::splice(
            src,
            None,
            &*file,
            Some(&mut at),
            len32 as usize,
            rustix::pipe::SpliceFlags::NONBLOCK | rustix::pipe::SpliceFlags::MOVE,
        );
        let moved = match moved {
            Ok(n) => n as u64,
            Err(rustix::io::Errno::AGAIN) => 0,
            Err(e) => {
                let _ = file.set_len(pos);
                return Err(e.into());
            }
        };
        if moved == 0 {
            file.set_len(pos)?;
            return Ok(0);
        }
        if moved < u64::from(len32) {
            let fixed = u32::try_from(moved).unwrap_or(u32::MAX).to_be_bytes();
            if let Err(e) = file.write_all_at(&fixed, pos + 17) {
                // The bytes left the pipe but the record cannot say so:
                // drop it, and readers get a gap where it was.
                let _ = file.set_len(pos);
                lock(&self.meta).current.end += moved;
                return Err(e);
            }
        }
        let mut meta = lock(&self.meta);
        if last_mark.is_none_or(|p| pos - p >= self.index_every) {
            meta.current.index.push(Mark {
                offset,
                time_ms,
                pos,
            });
        }
        meta.current.size += HEADER as u64 + moved;
        meta.current.end = offset + moved;
        meta.current.last_time_ms = Some(time_ms);
        if meta.current.size >= self.half_cap {
            // The record is written; a failed rotation only lets the file
            // grow past its half of the cap until the next one works.
            if let Err(e) = self.rotate(&mut file, &mut meta) {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot rotate an agent's output file");
            }
        }
        Ok(moved)
    }

    /// Output before `offset` that the files do not hold is lost (a write
    /// failed): the next record starts at `offset`, and readers get a gap.
    pub fn skip_to(&self, offset: u64) {
        let mut meta = lock(&self.meta);
        meta.current.end = meta.current.end.max(offset);
    }

    /// The current file becomes the previous one and a new one starts. The
    /// new file is made first, so a failure leaves the current one in use.
    fn rotate(&self, file: &mut File, meta: &mut Meta) -> std::io::Result<()> {
        let (log, old, next) = (
            self.dir.join("output.log"),
            self.dir.join("output.1"),
            self.dir.join("output.next"),
        );
        let fresh = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&next)?;
        // Gone first, so the rename below replaces nothing: ext4 (with its
        // default `auto_da_alloc`) writes a file renamed over another to
        // disk at once, and every rotation of a flooding agent would write
        // a half cap. What it held was to be dropped now anyway.
        match std::fs::remove_file(&old) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                let _ = std::fs::remove_file(&next);
                return Err(e);
            }
        }
        meta.previous = None;
        if let Err(e) = std::fs::rename(&log, &old) {
            let _ = std::fs::remove_file(&next);
            return Err(e);
        }
        if let Err(e) = std::fs::rename(&next, &log) {
            // Put the current file back; the previous one is gone already.
            let _ = std::fs::rename(&old, &log);
            let _ = std::fs::remove_file(&next);
            meta.previous = None;
            return Err(e);
        }
        *file = fresh;
        let fresh = Segment::empty(meta.current.end);
        meta.previous = Some(std::mem::replace(&mut meta.current, fresh));
        Ok(())
    }

    /// The oldest offset retained.
    pub fn retained_from(&self) -> u64 {
        let meta = lock(&self.meta);
        meta.previous
            .as_ref()
            .map_or(meta.current.start, |p| p.start)
    }

    /// The files with the segments they hold, oldest first, from the one
    /// that holds `from` (a follower at the end opens one file, not two).
    fn files(&self, from: u64) -> std::io::Result<Vec<(File, Segment)>> {
        let meta = lock(&self.meta);
        let mut segs = Vec::with_capacity(2);
        if let Some(p) = meta.previous.as_ref().filter(|p| from < p.end) {
            if let Ok(f) = File::open(self.dir.join("output.1")) {
                segs.push((f, p.clone()));
            }
        }
        let f = File::open(self.dir.join("output.log"))?;
        segs.push((f, meta.current.clone()));
        Ok(segs)
    }

    /// Up to about `max` bytes from `from` and before `until` (a record
    /// boundary), only `filter`'s stream; a gap (output no longer retained,
    /// or never written) is a chunk with `skipped` set. Returns the chunks
    /// and where to read next.
    pub fn read(
        &self,
        from: u64,
        until: u64,
        max: usize,
        filter: LogStream,
    ) -> std::io::Result<(Vec<LogChunk>, u64)> {
        let mut next = from;
        let mut chunks = Vec::new();
        let mut budget = max;
        // Bytes of the other stream passed over: bounded too, so that one
        // filtered read never scans the whole retained output.
        let mut passed = 0u64;
        'segments: for (file, seg) in self.files(from)? {
            let seg_end = seg.end.min(until);
            if next >= seg_end || budget == 0 {
                continue;
            }
            let mut records = Records::at(file, seg.position_of(next), seg.size)?;
            while budget > 0 && next < seg_end {
                let header = records.next_header()?;
                let Some((off, time_ms, stream, len)) = header.filter(|h| h.0 < seg_end) else {
                    // Output the segment counts but does not hold (a failed
                    // write) is a gap too: the reader must move past it.
                    chunks.push(gap(next, seg_end - next));
                    next = seg_end;
                    break;
                };
                if off > next {
                    chunks.push(gap(next, off - next));
                    next = off;
                }
                if off + len <= next || (filter != LogStream::Unspecified && stream != filter) {
                    next = next.max(off + len);
                    records.skip(len)?;
                    passed += len;
                    if passed >= PASS_LIMIT {
                        break 'segments;
                    }
                    continue;
                }
                let skip = next - off;
                let take = (len - skip).min(budget as u64);
                let data = records.take(skip, take)?;
                push_merged(&mut chunks, next, stream, time_ms, data);
                next += take;
                budget -= usize::try_from(take).unwrap_or(budget);
                if take < len - skip {
                    break;
                }
            }
        }
        Ok((chunks, next))
    }

    /// The offset of the first record written at or after `time_ms`, if the
    /// disk holds one.
    pub fn first_at_or_after(&self, time_ms: i64) -> std::io::Result<Option<u64>> {
        for (file, seg) in self.files(0)? {
            // Start from the last index entry older than `time_ms`.
            let i = seg.index.partition_point(|m| m.time_ms < time_ms);
            let from = if i == 0 {
                seg.start
            } else {
                seg.index[i - 1].offset
            };
            let mut records = Records::at(file, seg.position_of(from), seg.size)?;
            while let Some((off, t, _, len)) = records.next_header()? {
                if t >= time_ms {
                    return Ok(Some(off));
                }
                records.skip(len)?;
            }
        }
        Ok(None)
    }

    /// Deletes the files.
    pub fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Appends `data` to `chunks`, into the last chunk when it is of the same
/// stream and ends where `data` starts.
pub fn push_merged(
    chunks: &mut Vec<LogChunk>,
    offset: u64,
    stream: LogStream,
    time_ms: i64,
    data: Vec<u8>,
) {
    if let Some(last) = chunks.last_mut() {
        if last.skipped == 0
            && last.stream == stream as i32
            && last.offset + last.data.len() as u64 == offset
        {
            // The chunk's only owner: back to its Vec without a copy.
            let mut merged = Vec::from(std::mem::take(&mut last.data));
            merged.extend_from_slice(&data);
            last.data = merged.into();
            return;
        }
    }
    chunks.push(LogChunk {
        offset,
        stream: stream as i32,
        data: data.into(),
        skipped: 0,
        time: Some(agentplane::time::timestamp_from_ms(time_ms)),
    });
}

fn gap(offset_before: u64, skipped: u64) -> LogChunk {
    LogChunk {
        offset: offset_before + skipped,
        skipped,
        ..Default::default()
    }
}

/// The segment a file holds: its records from the start (`start`: where an
/// empty file begins), indexed every `index_every` bytes; and the last
/// record's (position, bytes) when it holds fewer bytes than its header
/// claims (they count; the header needs repair).
fn scan(
    file: &File,
    start: u64,
    index_every: u64,
) -> std::io::Result<(Segment, Option<(u64, u64)>)> {
    let len = file.metadata()?.len();
    // A scan reads the whole file: a large read-ahead means few reads.
    let mut records = Records::scan(file.try_clone()?, len, 64 * 1024);
    let mut seg = Segment::empty(start);
    let mut first = true;
    let mut torn = None;
    while let Some((off, time_ms, _, mut n)) = records.next_header()? {
        if !first && off < seg.end {
            break;
        }
        if records.left() < n {
            // Killed during its splice: the bytes that made it are the
            // ones that left the pipe, so they are kept.
            if records.left() == 0 {
                break;
            }
            n = records.left();
            torn = Some((seg.size, n));
        }
        if first {
            (seg.start, seg.end, first) = (off, off, false);
        }
        if seg
            .index
            .last()
            .is_none_or(|m| seg.size - m.pos >= index_every)
        {
            seg.index.push(Mark {
                offset: off,
                time_ms,
                pos: seg.size,
            });
        }
        records.skip(n)?;
        seg.last_time_ms = Some(time_ms);
        seg.end = off + n;
        seg.size += HEADER as u64 + n;
    }
    Ok((seg, torn))
}
