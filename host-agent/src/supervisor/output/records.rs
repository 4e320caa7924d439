//! Reading an output file's records in order: each a 21-byte header
//! (offset u64 BE, time in ms since the epoch i64 BE, stream u8, length u32
//! BE) and then its bytes. The writer and the segment bookkeeping live in
//! `disk.rs`.

use std::fs::File;
use std::io::{Read as _, Seek, SeekFrom};

use agentplane::proto::v1::LogStream;

/// Bytes of a record's header.
pub(super) const HEADER: usize = 21;
/// What a reader of records reads ahead for their headers: small, because
/// whatever of a record's data it holds is copied once more (a follower of
/// a flooding agent reads records of 128 KiB).
const READ_AHEAD: usize = 8 * 1024;

/// A cursor over one segment's records.
pub(super) struct Records {
    file: std::io::BufReader<File>,
    /// Bytes of the segment left to read (the file may have more, written
    /// after the snapshot).
    left: u64,
}

impl Records {
    /// Positioned at `pos`, a record's start, in a segment of `size`
    /// bytes; for reads from there.
    pub(super) fn at(file: File, pos: u64, size: u64) -> std::io::Result<Self> {
        let mut file = std::io::BufReader::with_capacity(READ_AHEAD, file);
        file.seek(SeekFrom::Start(pos))?;
        Ok(Self {
            file,
            left: size.saturating_sub(pos),
        })
    }

    /// At the start of a file of `len` bytes, reading ahead `read_ahead`:
    /// for a scan of the whole file.
    pub(super) fn scan(file: File, len: u64, read_ahead: usize) -> Self {
        Self {
            file: std::io::BufReader::with_capacity(read_ahead, file),
            left: len,
        }
    }

    /// Bytes of the segment left to read.
    pub(super) fn left(&self) -> u64 {
        self.left
    }

    /// The next record's (offset, time, stream, length), or None at the end.
    pub(super) fn next_header(&mut self) -> std::io::Result<Option<(u64, i64, LogStream, u64)>> {
        if self.left < HEADER as u64 {
            return Ok(None);
        }
        let mut h = [0u8; HEADER];
        self.file.read_exact(&mut h)?;
        self.left -= HEADER as u64;
        let be8 = |b: &[u8]| <[u8; 8]>::try_from(b).unwrap_or_default();
        let off = u64::from_be_bytes(be8(&h[0..8]));
        let time_ms = i64::from_be_bytes(be8(&h[8..16]));
        let stream = LogStream::try_from(i32::from(h[16])).unwrap_or(LogStream::Stdout);
        let len = u64::from(u32::from_be_bytes(
            <[u8; 4]>::try_from(&h[17..21]).unwrap_or_default(),
        ));
        Ok(Some((off, time_ms, stream, len)))
    }

    pub(super) fn skip(&mut self, len: u64) -> std::io::Result<()> {
        self.file
            .seek_relative(i64::try_from(len).unwrap_or(i64::MAX))?;
        self.left = self.left.saturating_sub(len);
        Ok(())
    }

    /// `take` bytes after skipping `skip` of the current record; the cursor
    /// is left at the next record.
    pub(super) fn take(&mut self, skip: u64, take: u64) -> std::io::Result<Vec<u8>> {
        self.skip(skip)?;
        // Read straight into spare capacity: no zeroing first, and past the
        // small read-ahead the bytes go from the file to `data` in one copy.
        let mut data = Vec::with_capacity(usize::try_from(take).unwrap_or(0));
        (&mut self.file).take(take).read_to_end(&mut data)?;
        if (data.len() as u64) < take {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.left = self.left.saturating_sub(take);
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    fn record(off: u64, stream: LogStream, data: &[u8]) -> Vec<u8> {
        let mut r = Vec::with_capacity(HEADER + data.len());
        r.extend_from_slice(&off.to_be_bytes());
        r.extend_from_slice(&1_700_000_000_000i64.to_be_bytes());
        r.push(stream as u8);
        r.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
        r.extend_from_slice(data);
        r
    }

    /// Records larger than the read-ahead come back whole and in order, a
    /// partial take leaves the cursor at the next record, and a file cut
    /// short is an error rather than short data.
    #[test]
    fn reads_records_across_the_read_ahead() {
        let big: Vec<u8> = (0..3 * READ_AHEAD + 7).map(|i| (i % 251) as u8).collect();
        let mut bytes = record(0, LogStream::Stdout, b"hello\n");
        bytes.extend(record(6, LogStream::Stderr, &big));
        bytes.extend(record(6 + big.len() as u64, LogStream::Stdout, b"bye\n"));
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&bytes).unwrap();
        let len = bytes.len() as u64;

        let mut r = Records::at(f.try_clone().unwrap(), 0, len).unwrap();
        let (off, _, stream, n) = r.next_header().unwrap().unwrap();
        assert_eq!((off, stream, n), (0, LogStream::Stdout, 6));
        assert_eq!(r.take(0, n).unwrap(), b"hello\n");
        let (off, _, stream, n) = r.next_header().unwrap().unwrap();
        assert_eq!((off, stream, n), (6, LogStream::Stderr, big.len() as u64));
        // Part of it, from inside: the rest is skipped to the next record.
        assert_eq!(r.take(5, n - 10).unwrap(), &big[5..big.len() - 5]);
        r.skip(5).unwrap();
        let (_, _, _, n) = r.next_header().unwrap().unwrap();
        assert_eq!(r.take(0, n).unwrap(), b"bye\n");
        assert!(r.next_header().unwrap().is_none());
        assert_eq!(r.left(), 0);

        // The big record cut short on disk (the size claims more).
        f.set_len(6 + 2 * HEADER as u64 + 100).unwrap();
        let mut r = Records::at(f, 0, len).unwrap();
        let (_, _, _, n) = r.next_header().unwrap().unwrap();
        r.skip(n).unwrap();
        let (_, _, _, n) = r.next_header().unwrap().unwrap();
        let e = r.take(0, n).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
