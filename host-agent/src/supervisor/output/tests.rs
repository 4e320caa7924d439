//! Tests of the output log: offsets, stream filters, caps, gaps, time
//! lookups, and logs that a killed host agent left behind.

use std::io::Write as _;
use std::time::Duration;

use super::*;

fn text(r: &ReadResult) -> String {
    r.chunks
        .iter()
        .map(|c| String::from_utf8_lossy(&c.data).into_owned())
        .collect()
}

fn log(dir: &Path, cap: u64) -> OutputLog {
    OutputLog::create("t", dir, cap, LogWriters::start(1)).unwrap()
}

/// What an agent does: writes `data` to its pipe, which the log drains.
fn put(log: &OutputLog, stream: LogStream, data: &[u8]) {
    let (r, w) = nix::unistd::pipe().unwrap();
    let mut w = std::fs::File::from(w);
    for part in data.chunks(32 * 1024) {
        w.write_all(part).unwrap();
        assert_eq!(log.drain_here(r.as_fd(), stream), part.len() as u64);
    }
}

/// Every retained byte, read from the start in `max`-byte reads; and the
/// bytes skipped.
fn read_all(log: &OutputLog, max: usize) -> (String, u64) {
    let (mut got, mut skipped, mut next) = (String::new(), 0, 0);
    while next < log.end() {
        let r = log.read(next, max, LogStream::Unspecified).unwrap();
        skipped += r.chunks.iter().map(|c| c.skipped).sum::<u64>();
        got.push_str(&text(&r));
        assert!(r.next > next, "reads move forward");
        next = r.next;
    }
    (got, skipped)
}

#[test]
fn reads_from_any_offset_and_filters_streams() {
    let dir = tempfile::tempdir().unwrap();
    let log = log(dir.path(), MIN_CAP);
    put(&log, LogStream::Stdout, b"hello ");
    put(&log, LogStream::Stderr, b"oops\n");
    put(&log, LogStream::Stdout, b"world\n");
    assert_eq!(log.end(), 17);
    let all = log.read(0, 1 << 20, LogStream::Unspecified).unwrap();
    assert_eq!(text(&all), "hello oops\nworld\n");
    assert_eq!(all.next, 17);
    let mid = log.read(3, 1 << 20, LogStream::Unspecified).unwrap();
    assert_eq!(text(&mid), "lo oops\nworld\n");
    assert_eq!(mid.chunks[0].offset, 3);
    let out = log.read(0, 1 << 20, LogStream::Stdout).unwrap();
    assert_eq!(text(&out), "hello world\n");
    assert_eq!(out.next, 17, "past the other stream's bytes too");
    let out = log.read(3, 1 << 20, LogStream::Stdout).unwrap();
    assert_eq!(text(&out), "lo world\n");
    let small = log.read(0, 4, LogStream::Unspecified).unwrap();
    assert_eq!(text(&small), "hell");
    assert_eq!(small.next, 4);
    assert_eq!(log.tail_offset(2, LogStream::Unspecified).unwrap(), 0);
    assert_eq!(log.tail_offset(1, LogStream::Unspecified).unwrap(), 11);
    assert_eq!(log.tail_offset(5, LogStream::Unspecified).unwrap(), 0);
    // The last line of one stream, when the other wrote after it.
    put(&log, LogStream::Stderr, b"late");
    assert_eq!(log.tail_offset(1, LogStream::Stdout).unwrap(), 0);
    assert_eq!(log.tail_offset(1, LogStream::Unspecified).unwrap(), 17);
    assert_eq!(
        log.tail_offset(u64::MAX, LogStream::Unspecified).unwrap(),
        0
    );
    let dir2 = tempfile::tempdir().unwrap();
    let two = super::tests::log(dir2.path(), MIN_CAP);
    put(&two, LogStream::Stdout, b"a\nb\n");
    put(&two, LogStream::Stderr, b"x");
    assert_eq!(two.tail_offset(1, LogStream::Stdout).unwrap(), 2);
    assert_eq!(two.tail_offset(1, LogStream::Unspecified).unwrap(), 4);
}

/// A writer with nothing else to do keeps draining the same pipe past one
/// turn, so a flooding agent's capture is not a hand-off per 256 KiB.
#[tokio::test]
async fn a_writer_with_no_other_job_drains_past_one_turn() {
    let dir = tempfile::tempdir().unwrap();
    let log = log(dir.path(), 8 << 20);
    let (r, w) = nix::unistd::pipe().unwrap();
    rustix::pipe::fcntl_setpipe_size(&r, 1 << 20).unwrap();
    let sent = 768 * 1024;
    std::fs::File::from(w).write_all(&vec![b'y'; sent]).unwrap();
    let d = log
        .drain(&std::sync::Arc::new(r), LogStream::Stdout)
        .await
        .unwrap();
    assert_eq!(
        d,
        Drained {
            moved: sent as u64,
            empty: true
        },
        "three turns' worth in one job"
    );
    assert_eq!(log.end(), sent as u64);
}

#[test]
fn a_drain_takes_at_most_its_budget_and_leaves_the_rest_in_the_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let log = log(dir.path(), MIN_CAP);
    let (r, w) = nix::unistd::pipe().unwrap();
    std::fs::File::from(w).write_all(&[b'q'; 300]).unwrap();
    let mut scratch = Vec::new();
    let d = log
        .shared
        .drain(r.as_fd(), LogStream::Stdout, 100, &mut scratch)
        .unwrap();
    assert_eq!(
        d,
        Drained {
            moved: 100,
            empty: false
        }
    );
    assert_eq!(
        rustix::io::ioctl_fionread(&r).unwrap(),
        200,
        "the rest waits in the pipe"
    );
    assert_eq!(log.end(), 100);
    let d = log
        .shared
        .drain(r.as_fd(), LogStream::Stdout, 1000, &mut scratch)
        .unwrap();
    assert_eq!(
        d,
        Drained {
            moved: 200,
            empty: true
        }
    );
    // The writer closed: an empty pipe at its end drains nothing.
    assert_eq!(log.drain_here(r.as_fd(), LogStream::Stdout), 0);
    assert_eq!(read_all(&log, 1 << 20), ("q".repeat(300), 0));
}

#[test]
fn a_flood_keeps_disk_under_the_cap_and_reports_gaps() {
    let dir = tempfile::tempdir().unwrap();
    let log = log(dir.path(), MIN_CAP);
    let block = vec![b'y'; 4096];
    for _ in 0..1000 {
        put(&log, LogStream::Stdout, &block);
    }
    let on_disk: u64 = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(
        on_disk <= MIN_CAP + 4096 + 2 * 21,
        "{on_disk} bytes on disk"
    );
    let r = log.read(0, 100, LogStream::Unspecified).unwrap();
    assert!(r.chunks[0].skipped > 0, "old output is reported as skipped");
    assert_eq!(r.chunks[0].offset, log.retained_from());
    assert_eq!(r.chunks[1].offset, log.retained_from());
    // Every retained byte is readable, in order.
    let mut at = log.retained_from();
    let mut bytes = 0u64;
    while at < log.end() {
        let r = log.read(at, 32 * 1024, LogStream::Unspecified).unwrap();
        for c in &r.chunks {
            assert_eq!(c.offset, at, "no gap inside retained output");
            at += c.data.len() as u64;
            bytes += c.data.len() as u64;
        }
        assert_eq!(r.next, at);
    }
    assert_eq!(bytes, log.end() - log.retained_from());
    assert_eq!(log.end(), 1000 * 4096);
}

#[test]
fn a_failed_write_becomes_a_gap_and_never_stalls_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let log = log(dir.path(), MIN_CAP);
    put(&log, LogStream::Stdout, b"kept\n");
    // The disk is full from now on.
    *disk::lock(&log.shared.disk.file) = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    // `put` asserts that each part left the pipe: the agent is not stalled.
    put(&log, LogStream::Stdout, &[b'z'; 256 * 1024]);
    assert_eq!(log.end(), 5 + 256 * 1024);
    let r = log.read(0, 1 << 20, LogStream::Unspecified).unwrap();
    assert_eq!(text(&r), "kept\n");
    assert_eq!(r.chunks.len(), 2);
    assert_eq!(
        r.chunks[1].skipped,
        256 * 1024,
        "what the disk lost is a gap"
    );
    assert_eq!(r.next, log.end());
}

#[test]
fn since_finds_the_first_byte_at_or_after_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let log = log(dir.path(), 16 * 1024 * 1024);
    let block = vec![b'x'; 8192];
    for _ in 0..32 {
        put(&log, LogStream::Stdout, &block);
    }
    // Not a wait for anything: the output after it must carry later times.
    std::thread::sleep(Duration::from_millis(20));
    let t1 = agentplane::time::now_ms();
    let mark = log.end();
    for _ in 0..32 {
        put(&log, LogStream::Stdout, &block);
    }
    std::thread::sleep(Duration::from_millis(20));
    let t2 = agentplane::time::now_ms();
    let mark2 = log.end();
    put(&log, LogStream::Stdout, b"late\n");
    assert_eq!(log.since_offset(t1).unwrap(), mark);
    assert_eq!(log.since_offset(t2).unwrap(), mark2);
    assert_eq!(log.since_offset(0).unwrap(), 0);
    assert_eq!(log.since_offset(t2 + 60_000).unwrap(), log.end());
    let r = log.read(mark2, 100, LogStream::Unspecified).unwrap();
    let t = agentplane::time::ms_from_timestamp(r.chunks[0].time.as_ref().unwrap());
    assert!(t >= t2, "chunks carry the time they were read");
}

/// Appends a record header claiming `len` bytes at `offset`, then `body`.
fn tear(dir: &Path, offset: u64, len: u32, body: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join("output.log"))
        .unwrap();
    f.write_all(&offset.to_be_bytes()).unwrap();
    f.write_all(&0i64.to_be_bytes()).unwrap();
    f.write_all(&[LogStream::Stdout as u8]).unwrap();
    f.write_all(&len.to_be_bytes()).unwrap();
    f.write_all(body).unwrap();
}

#[test]
fn a_reopened_log_keeps_what_a_kill_tore_and_cuts_what_never_moved() {
    let dir = tempfile::tempdir().unwrap();
    // A small cap: the first host agent's output spans a rotation.
    let mut want = String::new();
    {
        let log = log(dir.path(), MIN_CAP);
        for i in 0..20_000 {
            let line = format!("line {i}\n");
            put(&log, LogStream::Stdout, line.as_bytes());
            want.push_str(&line);
        }
        assert!(
            dir.path().join("output.1").exists(),
            "rotated once at least"
        );
    }
    // Killed during a splice: a header promising 100 bytes, 10 there. Those
    // 10 left the agent's pipe, so they are output.
    tear(dir.path(), want.len() as u64, 100, b"torn bytes");
    want.push_str("torn bytes");
    let reopen = || OutputLog::open("t", dir.path(), MIN_CAP, LogWriters::start(1)).unwrap();
    let log = reopen();
    // The torn record's time (0 here) is when the agent last wrote.
    assert_eq!(log.last_output_ms(), 0, "idleness goes on from the disk");
    assert_eq!(
        log.end(),
        want.len() as u64,
        "the torn record's bytes count"
    );
    put(&log, LogStream::Stdout, b"after the restart\n");
    want.push_str("after the restart\n");
    let check = |log: &OutputLog, want: &str| {
        let (got, skipped) = read_all(log, 64 * 1024);
        assert!(skipped > 0, "the oldest output is past the cap");
        assert_eq!(got.len() as u64 + skipped, want.len() as u64);
        assert!(
            want.ends_with(&got),
            "what is retained is the output's end, whole"
        );
        // The index was rebuilt: a read from the middle finds its place.
        let mid = want.len() as u64 - 1000;
        let r = log.read(mid, 100, LogStream::Unspecified).unwrap();
        assert_eq!(text(&r), want[usize::try_from(mid).unwrap()..][..100]);
    };
    check(&log, &want);
    drop(log);
    // Killed before a splice: a header with none of its bytes (they are
    // still in the pipe); then one cut short itself.
    tear(dir.path(), want.len() as u64, 50, b"");
    let log = reopen();
    assert_eq!(log.end(), want.len() as u64, "a header alone is cut");
    check(&log, &want);
    drop(log);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.path().join("output.log"))
        .unwrap();
    f.write_all(&[0u8; 7]).unwrap();
    drop(f);
    let log = reopen();
    assert_eq!(log.end(), want.len() as u64, "a partial header is cut");
    put(&log, LogStream::Stdout, b"on\n");
    want.push_str("on\n");
    check(&log, &want);
}
