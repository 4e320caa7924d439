//! Agent output: bounded capture, offsets that survive a killed follower,
//! tails and stream filters, input, and idle detection.

use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

use agentplane::proto::v1::{AgentSpec, AgentState, GetAgentRequest, StreamLogsRequest};
use agentplane::time::duration_to_proto;
use agentplane_integration_tests::{eventually, TestCluster};
use nix::sys::signal::Signal;

fn spec(argv: &[&str]) -> AgentSpec {
    AgentSpec {
        argv: argv.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    }
}

const SEQ: &str = "import sys, time
for i in range(1, 200001):
    print(i)
    if i % 10000 == 0:
        sys.stdout.flush()
        time.sleep(0.1)
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_follower_resumes_from_its_offset_and_reassembles_seq_exactly() {
    let cluster = TestCluster::builder().start().await;
    let a = cluster.spawn(&["python3", "-c", SEQ]).await;
    let dir = tempfile::tempdir().unwrap();
    let part = dir.path().join("out");
    let file = std::fs::File::create(&part).unwrap();
    let mut follower = cluster
        .agentctl_all(&["logs", "-f", &a.id])
        .stdout(file)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let p = part.clone();
    eventually(
        Duration::from_secs(20),
        "the follower received part of the output",
        || {
            let n = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            async move { (n > 200_000).then_some(()) }
        },
    )
    .await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(follower.id()).unwrap()),
        Signal::SIGKILL,
    )
    .unwrap();
    let _ = follower.wait();
    let mut got = std::fs::read(&part).unwrap();
    let offset = got.len().to_string();
    let rest = cluster.agentctl(&["logs", "-f", "--offset", &offset, &a.id]);
    assert!(
        rest.status.success(),
        "{}",
        String::from_utf8_lossy(&rest.stderr)
    );
    got.extend_from_slice(&rest.stdout);
    let expected: String = (1..=200_000).map(|i| format!("{i}\n")).collect();
    assert_eq!(got.len(), expected.len(), "no gap, no duplicate");
    assert!(got == expected.as_bytes(), "the exact byte sequence");
    cluster
        .wait_state(&a.id, AgentState::Exited, Duration::from_secs(20))
        .await;
    // Logs of an exited agent stay readable until it is deleted.
    let tail = cluster.agentctl(&["logs", "--tail", "2", &a.id]);
    assert_eq!(String::from_utf8_lossy(&tail.stdout), "199999\n200000\n");
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_start_of_a_running_generation_keeps_its_output() {
    let cluster = TestCluster::builder().start().await;
    // More output than the in-memory ring holds, so the older part is read
    // back from the files.
    let mut s = spec(&["sh", "-c", "seq 1 30000; sleep 100"]);
    s.log_buffer_bytes = 64 * 1024;
    let a = cluster.spawn_spec(s).await;
    cluster.wait_for_output(&a.id, "\n30000\n").await;
    // What a control plane retrying a start sends: same id, same generation.
    let again = cluster
        .host_agent(0)
        .start_agent(agentplane::proto::v1::StartAgentRequest {
            id: a.id.clone(),
            generation: a.generation,
            spec: a.spec.clone(),
        })
        .await
        .expect("a repeated start is answered")
        .into_inner();
    assert_eq!(again.pid, a.pid, "the same process");
    let expected: String = (1..=30000).map(|i| format!("{i}\n")).collect();
    let out = cluster.agentctl(&["logs", &a.id]);
    assert!(
        String::from_utf8_lossy(&out.stdout) == expected,
        "the output is intact: {} bytes, stderr {}",
        out.stdout.len(),
        String::from_utf8_lossy(&out.stderr)
    );
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_starts_at_the_output_written_after_a_time() {
    let cluster = TestCluster::builder().start().await;
    let a = cluster
        .spawn(&["sh", "-c", "echo early; sleep 2; echo late; sleep 100"])
        .await;
    cluster.wait_for_output(&a.id, "early").await;
    // Between the two lines: "early" is out, "late" is 2 s away.
    let between = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    cluster.wait_for_output(&a.id, "late").await;
    let logs = |args: &[&str]| {
        let out = cluster.agentctl(&[&["logs", a.id.as_str()], args].concat());
        assert!(out.status.success(), "agentctl logs {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(logs(&["--since", &between]), "late\n");
    assert_eq!(logs(&["--since", "1h"]), "early\nlate\n");
    assert_eq!(logs(&["--since", "1h", "--tail", "1"]), "late\n");
    assert_eq!(logs(&["--since", "2099-01-01T00:00:00Z"]), "");
    let bad = cluster.agentctl(&["logs", &a.id, "--since", "yesterday"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("neither a duration ago"),
        "{bad:?}"
    );
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_kept_apart_and_input_reaches_the_agent() {
    let cluster = TestCluster::builder().start().await;
    let a = cluster
        .spawn(&["sh", "-c", "echo out; echo err >&2; echo out2"])
        .await;
    cluster
        .wait_state(&a.id, AgentState::Exited, Duration::from_secs(20))
        .await;
    let out = cluster.agentctl(&["logs", "--stdout", &a.id]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\nout2\n");
    let err = cluster.agentctl(&["logs", "--stderr", &a.id]);
    assert_eq!(String::from_utf8_lossy(&err.stdout), "err\n");

    let echo = cluster
        .spawn(&["python3", "-u", "-c", "while True: print('got', input())"])
        .await;
    let sent = cluster.agentctl(&["send", &echo.id, "hello", "--enter"]);
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    cluster.wait_for_output(&echo.id, "got hello").await;
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_agent_stays_within_its_cap_and_memory_while_followers_keep_up() {
    let cluster = TestCluster::builder().start().await;
    let host_pid = cluster.hosts[0].proc.pid();
    let cap = 2 * 1024 * 1024u64;
    let mut s = spec(&["yes"]);
    s.log_max_bytes = cap;
    let a = cluster.spawn_spec(s).await;
    // A fast follower through the control plane.
    let mut c = cluster.client().await;
    let mut stream = c
        .stream_logs(StreamLogsRequest {
            id: a.id.clone(),
            offset: 0,
            tail_lines: None,
            follow: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let t = Instant::now();
    let mut received = 0u64;
    let mut next = 0u64;
    let mut gaps = 0u64;
    while t.elapsed() < Duration::from_secs(4) {
        let chunk = stream.message().await.unwrap().expect("stream open");
        if chunk.skipped > 0 {
            gaps += chunk.skipped;
        } else {
            assert_eq!(chunk.offset, next, "contiguous, or an explicit gap");
        }
        next = chunk.offset + chunk.data.len() as u64;
        received += chunk.data.len() as u64;
    }
    drop(stream);
    let mbps = received as f64 / t.elapsed().as_secs_f64() / 1e6;
    // Baseline in the same run: `yes` into a plain pipe.
    let mut yes = std::process::Command::new("yes")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = yes.stdout.take().unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let (mut plain, t2) = (0u64, Instant::now());
    while t2.elapsed() < Duration::from_secs(2) {
        plain += pipe.read(&mut buf).unwrap() as u64;
    }
    let _ = yes.kill();
    let _ = yes.wait();
    let plain_mbps = plain as f64 / t2.elapsed().as_secs_f64() / 1e6;
    eprintln!("yes through the control plane: {mbps:.1} MB/s to one follower ({gaps} bytes skipped); plain pipe: {plain_mbps:.1} MB/s");
    assert!(
        received > 1_000_000,
        "the follower received data: {received}"
    );

    let data = cluster.data_dir("h1").join("agents");
    let on_disk: u64 = agentplane_integration_tests::dir_bytes(&data);
    assert!(
        on_disk <= cap + 128 * 1024,
        "log files within the cap: {on_disk} bytes"
    );
    let rss_kib = agentplane_integration_tests::procfs::rss_kib(host_pid);
    eprintln!(
        "host-agent RSS with a flooding agent: {rss_kib} KiB, output on disk {on_disk} bytes"
    );
    assert!(rss_kib < 64 * 1024, "host-agent RSS {rss_kib} KiB");

    // Without follow a read ends at the end there was when asked, though
    // the agent writes faster than a reader reads (before, it chased the
    // moving end: 23 s and far more than the cap in a release build).
    let t = Instant::now();
    let mut stream = c
        .stream_logs(StreamLogsRequest {
            id: a.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut read = 0u64;
    while let Some(chunk) = stream.message().await.unwrap() {
        read += chunk.data.len() as u64;
    }
    assert!(
        read <= cap + 128 * 1024,
        "a read without follow sent {read} bytes in {:?}: more than was retained when asked",
        t.elapsed()
    );
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_agent_becomes_idle_once_and_shows_it() {
    let cluster = TestCluster::builder().start().await;
    // The watch starts from the oldest event; the probe's marks where this
    // test's own begin.
    let (mut watch, rx) = cluster.watch_json();
    let probe = cluster.spawn(&["true"]).await;
    loop {
        let v = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("watch connected");
        if v["agent_id"] == probe.id.as_str() {
            break;
        }
    }
    let idle_after = Duration::from_secs(2);
    let mut s = spec(&["sh", "-c", "echo hi; sleep 100"]);
    s.idle_after = Some(duration_to_proto(idle_after));
    let started = Instant::now();
    let a = cluster.spawn_spec(s).await;
    let is_idle =
        |v: &serde_json::Value| v["type"] == "AGENT_IDLE" && v["agent_id"] == a.id.as_str();
    let idle_at = loop {
        let v = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("AGENT_IDLE arrives");
        if is_idle(&v) {
            break started.elapsed();
        }
    };
    let first_idle = Instant::now();
    eprintln!("AGENT_IDLE after {idle_at:?} (idle_after {idle_after:?})");
    assert!(
        idle_at >= Duration::from_millis(1900) && idle_at < Duration::from_secs(4),
        "{idle_at:?}"
    );
    let got = cluster.agentctl(&["-o", "json", "get", &a.id]);
    let v: serde_json::Value = serde_json::from_slice(&got.stdout).unwrap();
    assert_eq!(v["idle"], true);
    let table = String::from_utf8_lossy(&cluster.agentctl(&["ls"]).stdout).into_owned();
    assert!(table.contains("IDLE"), "{table}");
    // Only once: a detector that re-armed after the event would fire again
    // idle_after later; listen for more than two such periods.
    let until = first_idle + 2 * idle_after + Duration::from_secs(1);
    let mut idle_events = 1;
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(v) => idle_events += usize::from(is_idle(&v)),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                panic!("the watch ended while listening for a repeated AGENT_IDLE")
            }
        }
    }
    assert_eq!(
        idle_events,
        1,
        "one AGENT_IDLE event in the {:?} after the first",
        first_idle.elapsed()
    );
    let _ = watch.kill();
    let _ = watch.wait();
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tty_agent_sees_a_terminal_answers_input_and_gets_resized() {
    let cluster = TestCluster::builder().start().await;
    let mut s = spec(&["python3", "-c", "import sys\nprint('tty', sys.stdin.isatty(), sys.stdout.isatty(), flush=True)\nwhile True: print('got', input(), flush=True)"]);
    s.tty = true;
    let a = cluster.spawn_spec(s).await;
    cluster.wait_for_output(&a.id, "tty True True").await;
    let sent = cluster.agentctl(&["send", &a.id, "hello", "--enter"]);
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    cluster.wait_for_output(&a.id, "got hello").await;

    let mut s = spec(&["sh", "-c", "stty size; read x; stty size; sleep 100"]);
    s.tty = true;
    let b = cluster.spawn_spec(s).await;
    cluster.wait_for_output(&b.id, "24 80").await;
    let resized = cluster.agentctl(&["send", &b.id, "--resize", "40x120", "--enter"]);
    assert!(
        resized.status.success(),
        "{}",
        String::from_utf8_lossy(&resized.stderr)
    );
    cluster.wait_for_output(&b.id, "40 120").await;
    cluster.finish().await;
}

/// Starts `agentctl run --rm -- argv`, waits for its agent to run and for
/// the client to print the agent's first output, SIGKILLs the client;
/// returns the agent id and when the kill happened.
async fn run_rm_then_kill(cluster: &TestCluster, argv: &[&str]) -> (String, Instant) {
    let mut args = vec!["run", "--rm", "--"];
    args.extend_from_slice(argv);
    let mut run = cluster
        .agentctl_all(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start agentctl run");
    let mut out = run.stdout.take().expect("piped stdout");
    let c = cluster.client().await;
    let want: Vec<String> = argv.iter().map(|s| (*s).to_owned()).collect();
    let agent = eventually(Duration::from_secs(10), "the agent runs", || {
        let mut c = c.clone();
        let want = want.clone();
        async move {
            let agents = c
                .list_agents(agentplane::proto::v1::ListAgentsRequest::default())
                .await
                .ok()?
                .into_inner()
                .agents;
            agents.into_iter().find(|a| {
                a.state() == AgentState::Running && a.spec.as_ref().is_some_and(|s| s.argv == want)
            })
        }
    })
    .await;
    // The record says RUNNING before the client's Attach reaches the host;
    // output on its stdout means the host counts its session (it does so
    // before it streams anything), so the grace starts at the kill below.
    let first = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::task::spawn_blocking(move || {
            let mut b = [0u8; 1];
            std::io::Read::read(&mut out, &mut b).map(|n| (n, out))
        }),
    )
    .await
    .expect("agentctl run printed the agent's output within 10 s")
    .expect("reader task");
    let (n, _out) = first.expect("read agentctl's stdout");
    assert_eq!(n, 1, "agentctl run printed the agent's output");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(run.id()).expect("pid")),
        Signal::SIGKILL,
    )
    .expect("kill agentctl");
    let _ = run.wait();
    (agent.id, Instant::now())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_rm_stops_the_agent_when_its_client_is_killed() {
    let cluster = TestCluster::builder().start().await;
    let mut c = cluster.client().await;

    // The command (here it may also finish by itself quickly: the host
    // writes its output to disk instead of waiting for the client).
    let (id, killed) = run_rm_then_kill(&cluster, &["sh", "-c", "yes | head -n 100000000"]).await;
    agentplane_integration_tests::procfs::wait_gone(&id, Duration::from_secs(8)).await;
    assert!(
        killed.elapsed() <= Duration::from_secs(4),
        "within grace + 2s: {:?}",
        killed.elapsed()
    );

    // An agent that would never end by itself: only the lost session ends it.
    let (id, killed) = run_rm_then_kill(
        &cluster,
        &["sh", "-c", "while :; do echo tick; sleep 0.1; done"],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let still = c
        .get_agent(GetAgentRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        still.state(),
        AgentState::Running,
        "alive during the session grace"
    );
    agentplane_integration_tests::procfs::wait_gone(&id, Duration::from_secs(8)).await;
    let gone = killed.elapsed();
    eprintln!(
        "run --rm: agent processes gone {gone:?} after the client's SIGKILL (session grace 2s)"
    );
    assert!(
        gone >= Duration::from_secs(2) && gone <= Duration::from_secs(4),
        "after the grace, within grace + 2s: {gone:?}"
    );
    // The processes leave /proc before the host writes the record.
    let ended = cluster
        .wait_state(&id, AgentState::Exited, Duration::from_secs(5))
        .await;
    assert_eq!(
        ended.exit.unwrap().reason(),
        agentplane::proto::v1::ExitReason::Stopped,
        "stopped because the session went away"
    );
    cluster.finish().await;
}
