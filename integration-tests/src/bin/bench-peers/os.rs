//! What the OS shows of each system under test: its agents (found by their
//! argv), their start times, a supervisor's memory and CPU, bytes on disk.

use std::path::Path;
use std::time::{Duration, Instant};

/// Clock ticks per second of /proc's times (`_SC_CLK_TCK`; 100 on Linux).
const TICKS: f64 = 100.0;

/// Now on the clock of /proc/PID/stat's `starttime`: since boot, from
/// /proc/uptime (10 ms resolution, like the start times).
pub fn boot_now() -> Duration {
    let up = std::fs::read_to_string("/proc/uptime").expect("read /proc/uptime");
    let secs: f64 = up
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .expect("/proc/uptime starts with seconds");
    Duration::from_secs_f64(secs)
}

/// Fields of /proc/PID/stat after the command name, from `state` (index 0).
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = text.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// When `pid` started, on the boot clock (10 ms resolution).
pub fn started_at(pid: i32) -> Option<Duration> {
    let ticks: f64 = stat_fields(pid)?.get(19)?.parse().ok()?;
    Some(Duration::from_secs_f64(ticks / TICKS))
}

/// CPU time (user + system) `pid` has used.
pub fn cpu_time(pid: i32) -> Duration {
    let Some(f) = stat_fields(pid) else {
        return Duration::ZERO;
    };
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    Duration::from_secs_f64((t(11) + t(12)) / TICKS)
}

/// The live (not zombie) processes whose argv is `argv`, the program
/// matched by its base name (pm2 runs it by its absolute path).
pub fn processes_with_argv(argv: &[String]) -> Vec<i32> {
    let matches = |cmdline: &[u8]| {
        let mut got = cmdline.split(|b| *b == 0);
        let program = got.next().unwrap_or_default();
        let base = program.rsplit(|b| *b == b'/').next().unwrap_or_default();
        base == argv[0].as_bytes()
            && got
                .filter(|a| !a.is_empty())
                .eq(argv[1..].iter().map(String::as_bytes))
    };
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| matches(&c)))
        .filter(|pid| {
            stat_fields(*pid)
                .and_then(|f| f.first().cloned())
                .is_some_and(|s| s != "Z" && s != "X")
        })
        .collect()
}

/// Polls until `n` processes run `argv` (or `deadline` passes); their pids.
pub fn wait_for_count(argv: &[String], n: usize, deadline: Duration) -> Vec<i32> {
    let until = Instant::now() + deadline;
    loop {
        let pids = processes_with_argv(argv);
        if pids.len() >= n || Instant::now() > until {
            return pids;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls until no process runs `argv` (or `deadline` passes); how many are left.
pub fn wait_for_none(argv: &[String], deadline: Duration) -> usize {
    let until = Instant::now() + deadline;
    loop {
        let left = processes_with_argv(argv).len();
        if left == 0 || Instant::now() > until {
            return left;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Resident memory of several processes together, KiB.
pub fn rss_kib(pids: &[i32]) -> u64 {
    pids.iter()
        .map(|p| agentplane_integration_tests::procfs::rss_kib(*p))
        .sum()
}

/// CPU time of several processes together.
pub fn cpu_of(pids: &[i32]) -> Duration {
    pids.iter().map(|p| cpu_time(*p)).sum()
}

/// Bytes the files under `dir` take on disk (allocated blocks, like `du`).
pub fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_bytes(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

/// Lines in a file (0 if it is missing).
pub fn lines_in(path: &Path) -> usize {
    std::fs::read(path).map_or(0, |b| b.iter().filter(|c| **c == b'\n').count())
}

/// The first `n` lines of a command's output, on one line.
pub fn head(output: &[u8], n: usize) -> String {
    String::from_utf8_lossy(output)
        .lines()
        .take(n)
        .collect::<Vec<_>>()
        .join("; ")
}
