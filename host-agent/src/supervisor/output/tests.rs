//! Tests of the output log: offsets, stream filters, caps, gaps and time lookups.

use std::time::Duration;

use super::*;

fn text(r: &ReadResult) -> String {
    r.chunks
        .iter()
        .map(|c| String::from_utf8_lossy(&c.data).into_owned())
        .collect()
}

fn log(dir: &Path, cap: u64, ring: u64) -> OutputLog {
    OutputLog::create("t", dir, cap, ring, LogWriters::start(1)).unwrap()
}

async fn wait_flushed(log: &OutputLog) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while log.flushed() < log.end() {
        assert!(tokio::time::Instant::now() < deadline, "never flushed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn reads_from_any_offset_and_filters_streams() {
    let dir = tempfile::tempdir().unwrap();
    let log = log(dir.path(), MIN_CAP, DEFAULT_RING);
    log.append(LogStream::Stdout, b"hello ").await;
    log.append(LogStream::Stderr, b"oops\n").await;
    log.append(LogStream::Stdout, b"world\n").await;
    assert_eq!(log.end(), 17);
    let all = log.read(0, 1 << 20, LogStream::Unspecified).unwrap();
    assert_eq!(text(&all), "hello oops\nworld\n");
    assert_eq!(all.next, 17);
    let mid = log.read(3, 1 << 20, LogStream::Unspecified).unwrap();
    assert_eq!(text(&mid), "lo oops\nworld\n");
    assert_eq!(log.tail_offset(2, LogStream::Unspecified).unwrap(), 0);
    assert_eq!(mid.chunks[0].offset, 3);
    let out = log.read(0, 1 << 20, LogStream::Stdout).unwrap();
    assert_eq!(text(&out), "hello world\n");
    assert_eq!(out.next, 17);
    let small = log.read(0, 4, LogStream::Unspecified).unwrap();
    assert_eq!(text(&small), "hell");
    assert_eq!(small.next, 4);
    assert_eq!(log.tail_offset(1, LogStream::Unspecified).unwrap(), 11);
    assert_eq!(log.tail_offset(5, LogStream::Unspecified).unwrap(), 0);
    // The last line of one stream, when the other wrote after it.
    log.append(LogStream::Stderr, b"late").await;
    assert_eq!(log.tail_offset(1, LogStream::Stdout).unwrap(), 0);
    assert_eq!(log.tail_offset(1, LogStream::Unspecified).unwrap(), 17);
    assert_eq!(
        log.tail_offset(u64::MAX, LogStream::Unspecified).unwrap(),
        0
    );
    let dir2 = tempfile::tempdir().unwrap();
    let two = OutputLog::create(
        "t",
        dir2.path(),
        MIN_CAP,
        DEFAULT_RING,
        LogWriters::start(1),
    )
    .unwrap();
    two.append(LogStream::Stdout, b"a\nb\n").await;
    two.append(LogStream::Stderr, b"x").await;
    assert_eq!(two.tail_offset(1, LogStream::Stdout).unwrap(), 2);
    assert_eq!(two.tail_offset(1, LogStream::Unspecified).unwrap(), 4);
    // The same answers from disk once the ring has given the bytes up.
    wait_flushed(&log).await;
    let disk = log
        .shared
        .disk
        .read(3, log.end(), 1 << 20, LogStream::Stdout)
        .unwrap();
    let r = ReadResult {
        chunks: disk.0,
        next: disk.1,
    };
    assert_eq!(text(&r), "lo world\n");
    assert_eq!(r.next, 21, "past the other stream's bytes too");
}

#[tokio::test]
async fn a_flood_keeps_disk_under_the_cap_memory_under_the_ring_and_reports_gaps() {
    let dir = tempfile::tempdir().unwrap();
    // As large as the cap allows: the writer's batches are that large too.
    let ring = MIN_CAP / 2;
    let log = log(dir.path(), MIN_CAP, ring);
    let block = vec![b'y'; 4096];
    for _ in 0..1000 {
        log.append(LogStream::Stdout, &block).await;
        assert!(log.shared.ring().used() <= ring as usize);
    }
    wait_flushed(&log).await;
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
    // Every retained byte is readable, from disk and then memory, in order.
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
}

#[tokio::test]
async fn a_failed_write_becomes_a_gap_and_never_stalls_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let log = log(dir.path(), MIN_CAP, 64 * 1024);
    log.append(LogStream::Stdout, b"kept\n").await;
    wait_flushed(&log).await;
    // The disk is full from now on.
    *disk::lock(&log.shared.disk.file) = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let block = vec![b'z'; 4096];
    for _ in 0..64 {
        // 256 KiB through a 64 KiB ring: returns only if the writer
        // gives failed output up instead of waiting for the disk.
        tokio::time::timeout(
            Duration::from_secs(10),
            log.append(LogStream::Stdout, &block),
        )
        .await
        .expect("the capture is not stalled by a failing disk");
    }
    wait_flushed(&log).await;
    let r = log.read(0, 1 << 20, LogStream::Unspecified).unwrap();
    assert_eq!(text(&r), "kept\n");
    // The bytes the disk lost are a gap up to what memory still has.
    let ring_start = log.shared.ring().start();
    assert!(ring_start > 5 && ring_start < log.end());
    assert_eq!(r.chunks[1].skipped, ring_start - 5);
    assert_eq!(r.chunks[1].offset, ring_start);
    assert_eq!(r.next, ring_start);
    let rest = log.read(r.next, 1 << 20, LogStream::Unspecified).unwrap();
    assert_eq!(rest.chunks[0].offset, ring_start);
    assert_eq!(rest.next, log.end(), "then the ring, to the end");
}

#[tokio::test]
async fn since_finds_the_first_byte_at_or_after_a_time_in_memory_and_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    // A ring too small to hold the early output: it is found on disk.
    let log = log(dir.path(), 16 * 1024 * 1024, 64 * 1024);
    let block = vec![b'x'; 8192];
    for _ in 0..32 {
        log.append(LogStream::Stdout, &block).await;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let t1 = agentplane::time::now_ms();
    let mark = log.end();
    for _ in 0..32 {
        log.append(LogStream::Stdout, &block).await;
    }
    wait_flushed(&log).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let t2 = agentplane::time::now_ms();
    let mark2 = log.end();
    log.append(LogStream::Stdout, b"late\n").await;
    assert!(
        log.shared.ring().start() > mark,
        "the early output left the ring"
    );
    assert_eq!(log.since_offset(t1).unwrap(), mark);
    assert_eq!(log.since_offset(t2).unwrap(), mark2);
    assert_eq!(log.since_offset(0).unwrap(), 0);
    assert_eq!(log.since_offset(t2 + 60_000).unwrap(), log.end());
    let r = log.read(mark2, 100, LogStream::Unspecified).unwrap();
    let t = agentplane::time::ms_from_timestamp(r.chunks[0].time.as_ref().unwrap());
    assert!(t >= t2, "chunks carry the time they were read");
}

#[tokio::test]
async fn a_reopened_log_continues_after_its_last_whole_record() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    // A small cap: the first host agent's output spans a rotation.
    let mut want = String::new();
    {
        let log = log(dir.path(), MIN_CAP, 16 * 1024);
        for i in 0..20_000 {
            let line = format!("line {i}\n");
            log.append(LogStream::Stdout, line.as_bytes()).await;
            want.push_str(&line);
        }
        wait_flushed(&log).await;
        assert!(
            dir.path().join("output.1").exists(),
            "rotated once at least"
        );
    }
    let end = want.len() as u64;
    // A crash tore the last record: a header promising 100 bytes, 10 there.
    let mut torn = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.path().join("output.log"))
        .unwrap();
    torn.write_all(&end.to_be_bytes()).unwrap();
    torn.write_all(&0i64.to_be_bytes()).unwrap();
    torn.write_all(&[LogStream::Stdout as u8]).unwrap();
    torn.write_all(&100u32.to_be_bytes()).unwrap();
    torn.write_all(b"torn bytes").unwrap();
    drop(torn);

    let log = OutputLog::open("t", dir.path(), MIN_CAP, 16 * 1024, LogWriters::start(1)).unwrap();
    assert_eq!(log.end(), end, "new output follows the last whole record");
    log.append(LogStream::Stdout, b"after the restart\n").await;
    want.push_str("after the restart\n");
    wait_flushed(&log).await;
    let mut got = String::new();
    let mut next = 0;
    let mut skipped = 0;
    while next < log.end() {
        let r = log.read(next, 64 * 1024, LogStream::Unspecified).unwrap();
        skipped += r.chunks.iter().map(|c| c.skipped).sum::<u64>();
        got.push_str(&text(&r));
        assert!(r.next > next, "reads move forward");
        next = r.next;
    }
    assert!(skipped > 0, "the oldest output is past the cap");
    assert_eq!(got.len() as u64 + skipped, want.len() as u64);
    assert!(
        want.ends_with(&got),
        "what is retained is the output's end, whole"
    );
    assert!(!got.contains("torn"), "the torn record is gone");
    // The index was rebuilt: a read from the middle finds its place.
    let mid = want.len() as u64 - 1000;
    let r = log.read(mid, 100, LogStream::Unspecified).unwrap();
    assert_eq!(text(&r), want[usize::try_from(mid).unwrap()..][..100]);
}
