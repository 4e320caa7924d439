//! The keeper process, run as the real binary (`host-agent
//! __agentplane_keeper`): runs outlive a host agent's connection with
//! their output intact, exits wait for an acknowledgement, and nothing is
//! left once the keeper ends (its grace without a host agent, or SIGKILL).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agentplane::proto::v1::AgentSpec;
use agentplane::tasks::Tasks;
use agentplane_host_agent::keeper::{Keeper, KeeperError, KeptRun};
use agentplane_host_agent::supervisor::spawn::launch_of;

/// The binary: `AGENTPLANE_BIN_DIR/host-agent` when set (a release build,
/// for its memory figures), else this build's.
fn exe() -> PathBuf {
    std::env::var_os("AGENTPLANE_BIN_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_host-agent")),
        |d| PathBuf::from(d).join("host-agent"),
    )
}

/// SIGKILLs the keeper and waits until it is gone (its guard then kills
/// what it kept), so no test leaves processes behind.
fn end_keeper(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    wait_until("the keeper is gone", Duration::from_secs(5), || !alive(pid));
}

fn spec(argv: &[&str]) -> AgentSpec {
    AgentSpec {
        argv: argv.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    }
}

/// What connecting gives.
type Attached = Result<(std::sync::Arc<Keeper>, Vec<KeptRun>), KeeperError>;

/// A new runtime (so a connection can be dropped with it, as a host agent's
/// death drops it) and a connection to `dir`'s keeper on it.
fn attach(dir: &Path, grace: Duration) -> (tokio::runtime::Runtime, Attached) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let tasks = Tasks::new();
    let got = rt.block_on(Keeper::connect(&exe(), dir, grace, &tasks));
    (rt, got)
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().chars().next())
        })
        .flatten()
        .is_some_and(|state| state != 'Z')
}

/// Live processes whose process group is `pgid`.
fn group(pgid: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let mut f = s.rsplit_once(')')?.1.split_whitespace();
                    let state = f.next()?.to_owned();
                    let pgrp: i32 = f.nth(1)?.parse().ok()?;
                    Some(state != "Z" && pgrp == pgid)
                })
                .unwrap_or(false)
        })
        .collect()
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Reads from `fd` until `text` ends with `until`.
fn read_until(file: &mut std::fs::File, text: &mut String, until: &str) {
    let mut buf = [0u8; 4096];
    while !text.ends_with(until) {
        let n = file.read(&mut buf).expect("read the agent's stdout");
        assert!(n > 0, "stdout closed early; got {text:?}");
        text.push_str(std::str::from_utf8(&buf[..n]).expect("utf-8"));
    }
}

const COUNTER: &str = "i=0; while [ $i -lt 400 ]; do echo $i; i=$((i+1)); sleep 0.005; done";

#[test]
fn a_run_outlives_its_host_agents_connection_with_its_output_whole() {
    let dir = tempfile::tempdir().expect("dir");
    let (rt, got) = attach(dir.path(), Duration::from_secs(30));
    let (keeper, kept) = got.expect("connect");
    assert!(kept.is_empty());
    let run = rt
        .block_on(keeper.spawn(
            "counter.1",
            launch_of("01counter", &spec(&["sh", "-c", COUNTER])),
        ))
        .expect("spawn");
    let (pid, keeper_pid) = (run.pid, keeper.pid);
    assert_eq!(run.fds.len(), 3, "stdin, stdout, stderr");
    let mut out = std::fs::File::from(run.fds.into_iter().nth(1).expect("stdout"));
    let mut text = String::new();
    read_until(&mut out, &mut text, "\n");
    // The host agent dies: its connection and descriptors go with it.
    drop(out);
    drop(keeper);
    drop(rt);
    std::thread::sleep(Duration::from_millis(200));
    assert!(alive(pid), "the run goes on without a host agent");

    let (rt, got) = attach(dir.path(), Duration::from_secs(30));
    let (keeper, kept) = got.expect("reconnect");
    assert_eq!(keeper.pid, keeper_pid, "the same keeper");
    assert_eq!(kept.len(), 1, "{kept:?}");
    let KeptRun { tag, run, .. } = kept.into_iter().next().expect("one");
    assert_eq!((tag.as_str(), run.pid), ("counter.1", pid));
    let mut out = std::fs::File::from(run.fds.into_iter().nth(1).expect("stdout"));
    out.read_to_string(&mut text).expect("read to the end");
    let want: String = (0..400).map(|i| format!("{i}\n")).collect();
    assert_eq!(text, want, "no byte lost or doubled across the reconnect");
    let exit = rt.block_on(run.exit).expect("exit");
    assert_eq!((exit.code, exit.signal), (Some(0), None));
    rt.block_on(keeper.ack(pid)).expect("ack");
    drop(keeper);
    drop(rt);
    wait_until(
        "the keeper exits with nothing left to keep",
        Duration::from_secs(5),
        || !alive(keeper_pid),
    );
}

#[test]
fn an_exit_is_kept_until_acknowledged_and_a_second_host_agent_is_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let (rt, got) = attach(dir.path(), Duration::from_secs(30));
    let (keeper, _) = got.expect("connect");
    let (_rt2, second) = attach(dir.path(), Duration::from_secs(30));
    assert!(matches!(second, Err(KeeperError::Busy(_))), "{second:?}");
    let failed = rt.block_on(keeper.spawn("x", launch_of("01x", &spec(&["/no/such/program"]))));
    match failed {
        Err(KeeperError::Spawn(e)) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound),
        other => panic!("a missing program: {other:?}"),
    }
    let run = rt
        .block_on(keeper.spawn(
            "three.1",
            launch_of("01three", &spec(&["sh", "-c", "exit 3"])),
        ))
        .expect("spawn");
    let pid = run.pid;
    let exit = rt.block_on(run.exit).expect("exit");
    assert_eq!(exit.code, Some(3));
    drop(keeper);
    drop(rt);
    // Not acknowledged: a new host agent is told of the exit.
    let (rt, got) = attach(dir.path(), Duration::from_secs(30));
    let (keeper, kept) = got.expect("reconnect");
    assert_eq!(kept.len(), 1);
    let k = kept.into_iter().next().expect("one");
    assert_eq!(k.run.pid, pid);
    assert_eq!(rt.block_on(k.run.exit).expect("exit").code, Some(3));
    rt.block_on(keeper.ack(pid)).expect("ack");
    // A spawn after the ack is answered, so the ack was read before it.
    let run = rt
        .block_on(keeper.spawn("sleep.1", launch_of("01sleep", &spec(&["sleep", "100"]))))
        .expect("spawn");
    drop((keeper, run));
    drop(rt);
    let (_rt, got) = attach(dir.path(), Duration::from_secs(30));
    let (_keeper, kept) = got.expect("reconnect");
    let tags: Vec<&str> = kept.iter().map(|k| k.tag.as_str()).collect();
    assert_eq!(tags, ["sleep.1"], "the acknowledged exit is forgotten");
    let sleeper = kept[0].run.pid;
    end_keeper(_keeper.pid);
    wait_until("the kept sleep is gone", Duration::from_secs(5), || {
        group(sleeper).is_empty()
    });
}

#[test]
fn nothing_is_left_after_the_grace_or_a_sigkill_of_the_keeper() {
    let tree = "sleep 1000 & sleep 1000 & wait";
    for kill_keeper in [false, true] {
        let dir = tempfile::tempdir().expect("dir");
        let grace = if kill_keeper {
            Duration::from_secs(60)
        } else {
            Duration::from_millis(300)
        };
        let (rt, got) = attach(dir.path(), grace);
        let (keeper, _) = got.expect("connect");
        let run = rt
            .block_on(keeper.spawn("tree.1", launch_of("01tree", &spec(&["sh", "-c", tree]))))
            .expect("spawn");
        let (pid, keeper_pid) = (run.pid, keeper.pid);
        wait_until("the tree is up", Duration::from_secs(5), || {
            group(pid).len() == 3
        });
        if kill_keeper {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(keeper_pid),
                nix::sys::signal::Signal::SIGKILL,
            )
            .expect("kill the keeper");
        } else {
            drop((keeper, run));
            drop(rt);
        }
        let started = Instant::now();
        wait_until(
            "every process of the agent is gone",
            Duration::from_secs(10),
            || group(pid).is_empty() && !alive(keeper_pid),
        );
        eprintln!(
            "kill_keeper={kill_keeper}: agent group gone {:?} after the {}",
            started.elapsed(),
            if kill_keeper { "SIGKILL" } else { "disconnect" }
        );
        if !kill_keeper {
            assert!(started.elapsed() >= grace, "not before the grace");
        }
    }
}

/// `field` (kB) of `/proc/PID/status`: VmRSS, RssAnon, RssFile.
fn status_kib(pid: i32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn the_keeper_grows_little_per_agent() {
    let dir = tempfile::tempdir().expect("dir");
    let (rt, got) = attach(dir.path(), Duration::from_secs(60));
    let (keeper, _) = got.expect("connect");
    let anon = |pid| status_kib(pid, "RssAnon");
    let idle = anon(keeper.pid);
    let mut runs = Vec::new();
    for i in 0..1000 {
        let id = format!("01sleep{i:04}");
        let run = rt
            .block_on(keeper.spawn(&id, launch_of(&id, &spec(&["sleep", "1000"]))))
            .expect("spawn");
        runs.push(run);
    }
    let full = anon(keeper.pid);
    let pss = std::fs::read_to_string(format!("/proc/{}/smaps_rollup", keeper.pid))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    let per_agent = full.saturating_sub(idle) * 1024 / 1000;
    eprintln!(
        "keeper with 1000 agents: RSS {} KiB (anonymous {full} KiB, file-backed {} KiB, shared with the host agent's binary), PSS {pss} KiB; anonymous {idle} KiB with none: {per_agent} bytes per agent",
        status_kib(keeper.pid, "VmRSS"),
        status_kib(keeper.pid, "RssFile"),
    );
    let started = Instant::now();
    end_keeper(keeper.pid);
    wait_until("every agent is gone", Duration::from_secs(10), || {
        runs.iter().all(|r| !alive(r.pid))
    });
    eprintln!(
        "1000 agents gone {:?} after the keeper's SIGKILL",
        started.elapsed()
    );
    // The goal for keeper and host agent together is 24 KiB per agent.
    assert!(
        per_agent < 8 * 1024,
        "the keeper holds {per_agent} bytes per agent"
    );
}

#[test]
fn agents_start_with_no_signal_blocked_whatever_the_keeper_blocks() {
    let dir = tempfile::tempdir().expect("dir");
    let (rt, got) = attach(dir.path(), Duration::from_secs(30));
    let (keeper, _) = got.expect("connect");
    let keeper_mask = std::fs::read_to_string(format!("/proc/{}/status", keeper.pid))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("SigBlk:").map(|v| v.trim().to_owned()))
        .expect("SigBlk");
    // SIGHUP (1), SIGINT (2) and SIGTERM (15): bits 0, 1 and 14.
    assert_eq!(keeper_mask, "0000000000004003", "the keeper blocks them");
    let run = rt
        .block_on(keeper.spawn(
            "mask.1",
            launch_of(
                "01mask",
                &spec(&["grep", "^Sig[BI][lg][kn]:", "/proc/self/status"]),
            ),
        ))
        .expect("spawn");
    let mut out = std::fs::File::from(run.fds.into_iter().nth(1).expect("stdout"));
    let mut text = String::new();
    out.read_to_string(&mut text).expect("read");
    assert_eq!(
        text.split_whitespace().nth(1),
        Some("0000000000000000"),
        "{text}"
    );
    end_keeper(keeper.pid);
}

/// Processes of the keeper (its forkers' children before their exec)
/// blocked writing to a pipe.
fn held_in_pipe_write() -> usize {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("wchan")).is_ok_and(|w| w.ends_with("pipe_write"))
                && std::fs::read(e.path().join("cmdline"))
                    .is_ok_and(|c| c.windows(12).any(|w| w == b"__agentplane"))
        })
        .count()
}

#[test]
fn starts_held_before_their_exec_do_not_hold_up_the_next() {
    use agentplane_host_agent::keeper::forker::FORKERS;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // The held children's "cgroup" is a full FIFO: their write of `0` holds
    // each before its exec, and its forker with it, until the test reads.
    let dir = tempfile::tempdir().expect("dir");
    let fifo = dir.path().join("held.procs");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
    let mut reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .expect("reader");
    let mut filler = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .expect("filler");
    while filler.write(b"x").is_ok() {}
    let (rt, got) = attach(dir.path(), Duration::from_secs(30));
    let (keeper, _) = got.expect("connect");
    // Ended even when an assertion fails: its held children would wait forever.
    struct EndKeeper(i32);
    impl Drop for EndKeeper {
        fn drop(&mut self) {
            end_keeper(self.0);
        }
    }
    let _end = EndKeeper(keeper.pid);
    let one_held = |held: &mut Vec<_>, n: usize| {
        let mut l = launch_of("01held", &spec(&["true"]));
        l.cgroup_procs = vec![fifo.to_string_lossy().into_owned()];
        let keeper = keeper.clone();
        held.push(rt.spawn(async move { keeper.spawn(&format!("held.{n}"), l).await }));
        wait_until(
            "the held child blocks before its exec",
            Duration::from_secs(5),
            || held_in_pipe_write() == n,
        );
    };
    let mut held = Vec::new();
    // One held: the next start takes another forker. Every forker held:
    // the next one waits a moment for one more.
    for n in 1..=FORKERS {
        one_held(&mut held, n);
        let next = rt
            .block_on(async {
                tokio::time::timeout(
                    Duration::from_secs(5),
                    keeper.spawn(
                        &format!("next.{n}"),
                        launch_of("01next", &spec(&["sleep", "30"])),
                    ),
                )
                .await
            })
            .expect("the next start is answered while others are held")
            .expect("spawn");
        assert!(alive(next.pid));
    }
    assert!(
        held.iter().all(|h| !h.is_finished()),
        "held starts wait for their exec"
    );

    let mut drained = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    for h in held {
        let run = rt.block_on(async {
            let mut h = h;
            loop {
                assert!(Instant::now() < deadline, "a held start never ran");
                let _ = reader.read_to_end(&mut drained);
                if let Ok(run) = tokio::time::timeout(Duration::from_millis(20), &mut h).await {
                    return run.expect("task").expect("the held start runs");
                }
            }
        });
        let exit = rt.block_on(run.exit).expect("exit");
        assert_eq!((exit.code, exit.signal), (Some(0), None), "it ran `true`");
    }
}
