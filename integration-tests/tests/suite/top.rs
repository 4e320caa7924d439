//! `agentctl top` (P9) on a real 80×24 pseudo-terminal against a real
//! cluster: it draws the host and a named agent with its state, follows a
//! state change from the watch, quits on `q` with exit 0, and leaves the
//! terminal's alternate screen on the way out.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentplane::proto::v1::{AgentSpec, PauseAgentRequest};
use agentplane_integration_tests::{eventually, procfs, TestCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_draws_the_fleet_in_80_by_24_follows_the_watch_and_quits_on_q() {
    let cluster = TestCluster::builder().start().await;
    let agent = cluster
        .spawn_spec(AgentSpec {
            name: "top-demo".into(),
            argv: vec!["sleep".into(), "1000".into()],
            ..Default::default()
        })
        .await;

    // Killed if the test fails before it quits (it would draw forever).
    let mut top = agentplane_integration_tests::pty::spawn(cluster.agentctl_all(&[
        "top",
        "--interval",
        "300ms",
    ]));

    let screen = Arc::new(Mutex::new(String::new()));
    let mut reader = top.master.try_clone().expect("dup master");
    let seen = screen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let has = |needles: &'static [&'static str]| {
        let screen = screen.clone();
        move || {
            let s = screen.lock().unwrap_or_else(|e| e.into_inner()).clone();
            async move { needles.iter().all(|n| s.contains(n)).then_some(()) }
        }
    };
    eventually(
        Duration::from_secs(15),
        "top shows the host and the running agent",
        // Only changed cells are redrawn: a host's load shows whole in the
        // first frame only.
        has(&["agentplane top", "h1", "top-demo", "RUNNING", "/1000"]),
    )
    .await;

    cluster
        .client()
        .await
        .pause_agent(PauseAgentRequest {
            id: agent.id.clone(),
        })
        .await
        .expect("pause");
    // RUNNING and PAUSED differ in every cell: the new word is drawn whole.
    eventually(
        Duration::from_secs(15),
        "top shows the agent PAUSED",
        has(&["PAUSED"]),
    )
    .await;

    top.master.write_all(b"q").expect("press q");
    let status = eventually(Duration::from_secs(10), "top exits on q", || {
        let done = top.child.try_wait().expect("wait");
        async move { done }
    })
    .await;
    assert!(status.success(), "top exited with {status}");
    // Raw mode is off again: the terminal echoes and reads lines.
    let modes = nix::sys::termios::tcgetattr(&top.master).expect("tcgetattr");
    let local = modes.local_flags;
    assert!(
        local.contains(nix::sys::termios::LocalFlags::ICANON)
            && local.contains(nix::sys::termios::LocalFlags::ECHO),
        "the terminal was left raw: {local:?}"
    );
    let s = screen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert!(
        s.contains("\x1b[?1049h") && s.contains("\x1b[?1049l"),
        "the alternate screen was entered and left"
    );
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_agent_usage_reports_what_proc_shows_and_names_a_silent_host() {
    let mut cluster = TestCluster::builder().hosts(2).start().await;
    let spin = cluster.spawn(&["sh", "-c", "while :; do :; done"]).await;
    let talk = cluster
        .spawn(&["sh", "-c", "while :; do echo 0123456789; sleep 0.01; done"])
        .await;
    let usage = |cluster: &TestCluster| {
        let mut c = cluster.client_of(0);
        async move {
            c.list_agent_usage(agentplane::proto::v1::ListAgentUsageRequest::default())
                .await
                .expect("usage")
                .into_inner()
        }
    };
    let of = |r: &agentplane::proto::v1::ListAgentUsageResponse, id: &str| {
        r.usage
            .iter()
            .find(|u| u.id == id)
            .cloned()
            .unwrap_or_else(|| panic!("no usage of {id}: {r:?}"))
    };
    let first = usage(&cluster).await;
    let at = |u: &agentplane::proto::v1::AgentUsage| {
        agentplane::time::ms_from_timestamp(u.sampled_at.as_ref().expect("sampled_at"))
    };
    // Sampled again until a second has passed (a loaded machine gives the
    // spinning shell less of a core, never none of it).
    let a = of(&first, &spin.id);
    let second = eventually(Duration::from_secs(10), "a second of samples", || {
        let next = usage(&cluster);
        let a = a.clone();
        async move {
            let r = next.await;
            (at(&of(&r, &a.id)) - at(&a) >= 1000).then_some(r)
        }
    })
    .await;
    assert!(second.unreachable_hosts.is_empty(), "{second:?}");
    let b = of(&second, &spin.id);
    assert_eq!(b.host, spin.host);
    let secs = (at(&b) - at(&a)) as f64 / 1000.0;
    let busy = (b.cpu_seconds - a.cpu_seconds) / secs;
    assert!(busy > 0.1, "a spinning shell used {busy:.2} of a core");
    // Resident memory as the kernel counts it for that pid.
    let statm = std::fs::read_to_string(format!("/proc/{}/statm", spin.pid)).expect("statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .expect("rss")
        .parse()
        .expect("n");
    let kernel = pages * rustix::param::page_size() as u64;
    assert!(
        b.rss_bytes > 0 && b.rss_bytes <= 2 * kernel && 2 * b.rss_bytes >= kernel,
        "usage {} B against /proc's {kernel} B",
        b.rss_bytes
    );
    let (a, b) = (of(&first, &talk.id), of(&second, &talk.id));
    assert!(
        b.output_bytes >= a.output_bytes + 110,
        "output grew from {} to {}",
        a.output_bytes,
        b.output_bytes
    );

    // A host that stops answering is named; the other host's agents stay.
    let silent = if spin.host == "h1" { "h2" } else { "h1" };
    let pid = nix::unistd::Pid::from_raw(cluster.host(silent).proc.pid());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("stop");
    // A stop takes effect as each thread next runs: asked before every
    // thread of it shows stopped in /proc, the host could still answer
    // (the fresh-clone CI of 6bc1ae8 once saw it do so).
    let tasks = format!("/proc/{pid}/task");
    eventually(Duration::from_secs(5), "every thread of it stopped", || {
        // /proc/TID/stat is each thread's own (`procfs::stat` reads it).
        let stopped = std::fs::read_dir(&tasks).is_ok_and(|d| {
            d.flatten().all(|t| {
                t.file_name()
                    .to_str()
                    .and_then(|tid| tid.parse().ok())
                    .and_then(procfs::stat)
                    .is_some_and(|p| p.state == 'T')
            })
        });
        async move { stopped.then_some(()) }
    })
    .await;
    let r = usage(&cluster).await;
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).expect("continue");
    assert_eq!(r.unreachable_hosts, vec![silent.to_owned()], "{r:?}");
    assert!(r.usage.iter().any(|u| u.id == spin.id), "{r:?}");
    cluster.finish().await;
}
