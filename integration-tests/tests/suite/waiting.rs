//! `agentctl wait` and `agentctl ls -w` (P10), like kubectl's: wait for a
//! state or for the end, with a timeout that names who did not get there;
//! a listing that goes on printing each change of a matching agent.

use std::io::BufRead;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentplane_integration_tests::output::stderr;
use agentplane_integration_tests::{eventually, TestCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_returns_when_states_are_reached_and_names_who_timed_out() {
    let cluster = TestCluster::builder().start().await;
    let ok = |args: &[&str]| {
        let out = cluster.agentctl(args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ok(&["spawn", "--name", "steady", "--", "sleep", "1000"]);
    ok(&[
        "spawn",
        "--name",
        "short",
        "--",
        "sh",
        "-c",
        "sleep 0.5; exit 0",
    ]);

    let out = ok(&[
        "wait",
        "--for",
        "state=RUNNING",
        "steady",
        "--timeout",
        "10s",
    ]);
    assert_eq!(out.trim(), "agent/steady condition met");
    // Not yet ended when asked: met once its end is recorded.
    let out = ok(&["wait", "--for", "exited", "short", "--timeout", "20s"]);
    assert_eq!(out.trim(), "agent/short condition met");

    let late = cluster.agentctl(&[
        "wait",
        "--for",
        "exited",
        "steady",
        "short",
        "--timeout",
        "500ms",
    ]);
    assert_eq!(late.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&late.stdout).trim(),
        "agent/short condition met"
    );
    assert!(
        stderr(&late).contains("timed out after 500ms waiting for steady"),
        "{}",
        stderr(&late)
    );
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ls_watch_prints_each_change_of_a_matching_agent() {
    let cluster = TestCluster::builder().start().await;
    cluster
        .agentctl(&["spawn", "--name", "other", "--", "sleep", "1000"])
        .status
        .success()
        .then_some(())
        .expect("spawn other");
    let mut child = cluster
        .agentctl_all(&["-o", "json", "ls", "-w", "--selector", "team=w"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ls -w");
    let lines = Arc::new(Mutex::new(Vec::<serde_json::Value>::new()));
    let seen = lines.clone();
    let out = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line) {
                seen.lock().unwrap_or_else(|e| e.into_inner()).push(v);
            }
        }
    });
    // Whether the spawn lands in the first list or comes as an event, a
    // RUNNING line shows it; the stop and the delete can only be events.
    let spawned = cluster.agentctl(&[
        "spawn", "--name", "watched", "--label", "team=w", "--", "sleep", "1000",
    ]);
    assert!(spawned.status.success(), "{}", stderr(&spawned));
    let has = |name: &'static str, state: &'static str| {
        let lines = lines.clone();
        move || {
            let found = lines
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .any(|v| v["name"] == name && v["state"] == state);
            async move { found.then_some(()) }
        }
    };
    eventually(
        Duration::from_secs(10),
        "a RUNNING line",
        has("watched", "RUNNING"),
    )
    .await;
    assert!(cluster.agentctl(&["stop", "watched"]).status.success());
    eventually(
        Duration::from_secs(10),
        "an EXITED line",
        has("watched", "EXITED"),
    )
    .await;
    assert!(cluster.agentctl(&["rm", "watched"]).status.success());
    eventually(Duration::from_secs(10), "a deleted line", || {
        let found = lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|v| v["deleted"] == true);
        async move { found.then_some(()) }
    })
    .await;
    assert!(
        !lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|v| v["name"] == "other"),
        "an agent outside the selector is not shown"
    );
    let _ = child.kill();
    let _ = child.wait();
    cluster.finish().await;
}

/// Runs `agentctl ARGS` on an 80×24 pseudo-terminal (stdin, stdout and
/// stderr); returns its exit status and everything it drew.
fn on_a_terminal(cmd: std::process::Command) -> (std::process::ExitStatus, String) {
    use std::io::Read;
    let mut run = agentplane_integration_tests::pty::spawn(cmd);
    let mut master = run.master.try_clone().expect("dup master");
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        // EIO once the last writer (the child) is gone.
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&all).into_owned()
    });
    let status = run.child.wait().expect("wait");
    // Our copy of the terminal's side closes too, so the reader sees the end.
    drop(run);
    (status, reader.join().expect("reader"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_wait_spins_on_a_terminal_and_never_in_json() {
    let cluster = TestCluster::builder().start().await;
    let (status, drawn) = on_a_terminal(cluster.agentctl_all(&[
        "spawn", "--wait", "--name", "spinning", "--", "sh", "-c", "sleep 1",
    ]));
    assert!(status.success(), "{drawn}");
    assert!(drawn.contains("waiting for spinning to end"), "{drawn}");
    let (status, drawn) = on_a_terminal(cluster.agentctl_all(&[
        "-o", "json", "spawn", "--wait", "--name", "quiet", "--", "sh", "-c", "sleep 1",
    ]));
    assert!(status.success(), "{drawn}");
    assert!(!drawn.contains("waiting for"), "{drawn}");
    cluster.finish().await;
}
