//! The newest output of one agent, in memory: the records the agent wrote
//! last, up to a byte budget. It is also the disk writer's queue: a record
//! leaves the ring only once it is on disk, so the ring never loses output and
//! never grows past its budget (a full ring makes the capture wait, and the
//! agent with it, on its pipe).

use std::collections::VecDeque;
use std::sync::Arc;

use agentplane::proto::v1::{LogChunk, LogStream};

/// What one record costs beyond its bytes (its metadata and allocation), so
/// that many tiny writes cannot hold more memory than the budget says.
pub const RECORD_OVERHEAD: usize = 64;

/// One read from the agent: its bytes and where they sit in its output.
#[derive(Debug, Clone)]
pub struct Record {
    /// Offset of the first byte.
    pub offset: u64,
    /// When it was read, ms since the epoch (never decreasing).
    pub time_ms: i64,
    /// Which stream.
    pub stream: LogStream,
    /// The bytes.
    pub data: Arc<[u8]>,
}

impl Record {
    /// The offset after its last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.data.len() as u64
    }
}

/// The ring.
#[derive(Debug)]
pub struct Ring {
    records: VecDeque<Record>,
    /// Bytes accounted (data plus overhead per record).
    used: usize,
    budget: usize,
    /// Offset after the last byte appended.
    end: u64,
    /// Output before this offset is on disk (or given up on).
    flushed: u64,
    last_time_ms: i64,
}

impl Ring {
    /// An empty ring whose next byte has offset `offset` (output before it
    /// is on disk already: a log reopened after a restart).
    pub fn starting_at(budget: usize, offset: u64) -> Self {
        Self {
            end: offset,
            flushed: offset,
            ..Self::new(budget)
        }
    }

    /// An empty ring holding at most `budget` bytes.
    pub fn new(budget: usize) -> Self {
        Self {
            records: VecDeque::new(),
            used: 0,
            budget,
            end: 0,
            flushed: 0,
            last_time_ms: 0,
        }
    }

    /// The offset after the last byte.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Output before this offset is on disk.
    pub fn flushed(&self) -> u64 {
        self.flushed
    }

    /// The oldest offset held here (`end` when empty).
    pub fn start(&self) -> u64 {
        self.records.front().map_or(self.end, |r| r.offset)
    }

    /// Time of the oldest record held.
    pub fn oldest_time_ms(&self) -> Option<i64> {
        self.records.front().map(|r| r.time_ms)
    }

    /// Appends `data` read at `now_ms`, dropping records already on disk to
    /// make room. False (nothing appended) when the rest is not on disk yet.
    pub fn push(&mut self, stream: LogStream, data: &[u8], now_ms: i64) -> bool {
        let cost = data.len() + RECORD_OVERHEAD;
        while self.used + cost > self.budget {
            match self.records.front() {
                Some(r) if r.end() <= self.flushed => {
                    self.used -= r.data.len() + RECORD_OVERHEAD;
                    self.records.pop_front();
                }
                // An empty ring always takes one record, whatever its size.
                None => break,
                Some(_) => return false,
            }
        }
        let time_ms = now_ms.max(self.last_time_ms);
        self.last_time_ms = time_ms;
        self.records.push_back(Record {
            offset: self.end,
            time_ms,
            stream,
            data: data.into(),
        });
        self.used += cost;
        self.end += data.len() as u64;
        true
    }

    /// Records not on disk yet, oldest first, about `max` bytes of them.
    pub fn unflushed(&self, max: usize) -> Vec<Record> {
        let first = self.records.partition_point(|r| r.end() <= self.flushed);
        let mut out = Vec::new();
        let mut bytes = 0;
        for r in self.records.range(first..) {
            if bytes >= max {
                break;
            }
            bytes += r.data.len();
            out.push(r.clone());
        }
        out
    }

    /// Output before `offset` is now on disk.
    pub fn set_flushed(&mut self, offset: u64) {
        self.flushed = self.flushed.max(offset.min(self.end));
    }

    /// Up to about `max` bytes from `from` (at least [`Ring::start`]), only
    /// `filter`'s stream (UNSPECIFIED: both); consecutive records of one
    /// stream are merged into one chunk. Returns the chunks and where to read
    /// next.
    pub fn read(&self, from: u64, max: usize, filter: LogStream) -> (Vec<LogChunk>, u64) {
        let mut next = from.max(self.start());
        let mut chunks: Vec<LogChunk> = Vec::new();
        let mut budget = max;
        let first = self.records.partition_point(|r| r.end() <= next);
        for r in self.records.range(first..) {
            if budget == 0 {
                break;
            }
            if filter != LogStream::Unspecified && r.stream != filter {
                next = r.end();
                continue;
            }
            let skip = usize::try_from(next - r.offset).unwrap_or(0);
            let take = (r.data.len() - skip).min(budget);
            push_merged(
                &mut chunks,
                next,
                r.stream,
                r.time_ms,
                &r.data[skip..skip + take],
            );
            next += take as u64;
            budget -= take;
        }
        (chunks, next)
    }

    /// The offset of the first record read at or after `time_ms`, if one is
    /// held.
    pub fn first_at_or_after(&self, time_ms: i64) -> Option<u64> {
        let i = self.records.partition_point(|r| r.time_ms < time_ms);
        self.records.get(i).map(|r| r.offset)
    }

    /// Bytes accounted now.
    pub fn used(&self) -> usize {
        self.used
    }
}

/// Appends `data` to `chunks`, into the last chunk when it is of the same
/// stream and ends where `data` starts.
pub fn push_merged(
    chunks: &mut Vec<LogChunk>,
    offset: u64,
    stream: LogStream,
    time_ms: i64,
    data: &[u8],
) {
    if let Some(last) = chunks.last_mut() {
        if last.skipped == 0
            && last.stream == stream as i32
            && last.offset + last.data.len() as u64 == offset
        {
            last.data.extend_from_slice(data);
            return;
        }
    }
    chunks.push(LogChunk {
        offset,
        stream: stream as i32,
        data: data.to_vec(),
        skipped: 0,
        time: Some(agentplane::time::timestamp_from_ms(time_ms)),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(chunks: &[LogChunk]) -> String {
        chunks
            .iter()
            .map(|c| String::from_utf8_lossy(&c.data).into_owned())
            .collect()
    }

    #[test]
    fn keeps_unflushed_records_and_evicts_flushed_ones() {
        let mut ring = Ring::new(3 * (4 + RECORD_OVERHEAD));
        assert!(ring.push(LogStream::Stdout, b"aaaa", 10));
        assert!(ring.push(LogStream::Stdout, b"bbbb", 11));
        assert!(ring.push(LogStream::Stderr, b"cccc", 12));
        // Full, and nothing is on disk: the capture must wait.
        assert!(!ring.push(LogStream::Stdout, b"dddd", 13));
        assert_eq!(ring.unflushed(1 << 20).len(), 3);
        ring.set_flushed(8);
        assert_eq!(ring.unflushed(1 << 20).len(), 1);
        assert!(ring.push(LogStream::Stdout, b"dddd", 5));
        assert!(ring.used() <= 3 * (4 + RECORD_OVERHEAD));
        assert_eq!(ring.start(), 4);
        assert_eq!(ring.end(), 16);
        // Time never goes back, even when the clock does.
        assert_eq!(ring.records.back().unwrap().time_ms, 12);
        let (chunks, next) = ring.read(0, 1 << 20, LogStream::Unspecified);
        assert_eq!(text(&chunks), "bbbbccccdddd");
        assert_eq!(chunks.len(), 3, "different streams are not merged");
        assert_eq!(next, 16);
        let (chunks, next) = ring.read(6, 1 << 20, LogStream::Stdout);
        assert_eq!(text(&chunks), "bbdddd");
        assert_eq!(chunks[0].offset, 6);
        assert_eq!(chunks[1].offset, 12);
        assert_eq!(next, 16);
        let (chunks, next) = ring.read(5, 4, LogStream::Unspecified);
        assert_eq!(text(&chunks), "bbbc");
        assert_eq!(next, 9);
        assert_eq!(ring.first_at_or_after(12), Some(8));
        assert_eq!(ring.first_at_or_after(13), None);
    }

    #[test]
    fn merges_consecutive_records_of_one_stream() {
        let mut ring = Ring::new(1 << 20);
        for _ in 0..100 {
            ring.push(LogStream::Stdout, b"line\n", 1);
        }
        let (chunks, next) = ring.read(0, 1 << 20, LogStream::Unspecified);
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].data.len(), 500);
        assert_eq!(next, 500);
    }

    #[test]
    fn tiny_records_are_accounted_with_their_overhead() {
        let mut ring = Ring::new(64 * 1024);
        let mut n = 0;
        while ring.push(LogStream::Stdout, b"x", 1) {
            n += 1;
        }
        assert_eq!(n, 64 * 1024 / (1 + RECORD_OVERHEAD));
    }
}
