//! Restart policies on a real host agent: on-failure's growing backoff and
//! its limit, always's restart after a clean exit, and a stop that cancels a
//! pending restart.

use std::time::{Duration, Instant};

use agentplane::proto::v1::restart_policy::Mode;
use agentplane::proto::v1::{AgentSpec, AgentState, RestartPolicy, StopAgentRequest};
use agentplane::time::duration_to_proto;
use agentplane_integration_tests::{eventually, TestCluster};

fn spec(argv: &[&str]) -> AgentSpec {
    AgentSpec {
        argv: argv.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    }
}

/// Every record's state agrees with /proc. A RUNNING or PAUSED record's pid
/// is alive, carries the agent's marker and leads its own process group, and
/// every live process carrying the marker is in that group or descends from
/// the pid (no copy of an earlier run is left); RUNNING has `tree` of them
/// (the whole tree the command starts), none stopped; PAUSED has every one
/// stopped (T), at most `tree` (a pause can catch it before it started them
/// all). An ended record has no marked process.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_failure_runs_exactly_four_times_with_growing_gaps_then_fails() {
    let cluster = TestCluster::builder().start().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("runs");
    let mut s = spec(&[
        "sh",
        "-c",
        &format!("date +%s%N >> {}; exit 1", log.display()),
    ]);
    s.restart = Some(RestartPolicy {
        mode: Mode::OnFailure as i32,
        max_restarts: Some(3),
        initial_backoff: Some(duration_to_proto(Duration::from_millis(300))),
        max_backoff: Some(duration_to_proto(Duration::from_secs(10))),
        stable_after: None,
    });
    let a = cluster.spawn_spec(s).await;
    let ended = cluster
        .wait_state(&a.id, AgentState::Failed, Duration::from_secs(15))
        .await;
    let runs: Vec<u128> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(runs.len(), 4, "1 run + 3 restarts: {runs:?}");
    let gaps: Vec<u128> = runs.windows(2).map(|w| (w[1] - w[0]) / 1_000_000).collect();
    eprintln!("gaps between runs (ms): {gaps:?}");
    assert!(gaps.windows(2).all(|g| g[1] > g[0]), "gaps grow: {gaps:?}");
    assert!(gaps[0] >= 240, "first gap ~300ms ±20%: {gaps:?}");
    assert_eq!(ended.restarts, 3);
    let exit = ended.exit.unwrap();
    assert_eq!(
        exit.reason(),
        agentplane::proto::v1::ExitReason::RestartsExhausted
    );
    assert_eq!(exit.code, Some(1));
    assert_eq!(ended.last_exit.unwrap().code, Some(1));
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        std::fs::read_to_string(&log).unwrap().lines().count(),
        4,
        "no fifth run"
    );
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_restarts_after_exit_zero_shows_the_pending_restart_and_stop_cancels_it() {
    let cluster = TestCluster::builder().start().await;
    let mut c = cluster.client().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("runs");
    let mut s = spec(&[
        "sh",
        "-c",
        &format!("echo run >> {}; exit 0", log.display()),
    ]);
    s.restart = Some(RestartPolicy {
        mode: Mode::Always as i32,
        max_restarts: None,
        initial_backoff: Some(duration_to_proto(Duration::from_millis(100))),
        max_backoff: Some(duration_to_proto(Duration::from_secs(30))),
        stable_after: None,
    });
    let a = cluster.spawn_spec(s).await;
    let log2 = log.clone();
    eventually(
        Duration::from_secs(10),
        "at least 4 runs after exit 0",
        || {
            let n = std::fs::read_to_string(&log2)
                .map(|t| t.lines().count())
                .unwrap_or(0);
            async move { (n >= 4).then_some(()) }
        },
    )
    .await;
    // The backoff has grown to seconds now: the record shows the wait. The
    // file can count a run before the record does (the run writes, then
    // exits, then the host updates the record), so wait on the record.
    let pending = cluster
        .wait_agent(
            &a.id,
            "waits to restart after its 4th run",
            Duration::from_secs(10),
            |a| a.state() == AgentState::Pending && a.restarts >= 3,
        )
        .await;
    assert!(pending.next_restart_at.is_some(), "next_restart_at shown");
    assert_eq!(pending.last_exit.as_ref().unwrap().code, Some(0));
    assert_eq!(pending.pid, 0);
    let t = Instant::now();
    let stopped = c
        .stop_agent(StopAgentRequest {
            id: a.id.clone(),
            grace: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "a stop cancels the backoff at once"
    );
    assert_eq!(stopped.state(), AgentState::Exited);
    assert_eq!(
        stopped.exit.unwrap().reason(),
        agentplane::proto::v1::ExitReason::Stopped
    );
    assert!(stopped.next_restart_at.is_none());
    let runs = std::fs::read_to_string(&log).unwrap().lines().count();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        std::fs::read_to_string(&log).unwrap().lines().count(),
        runs,
        "no run after the stop"
    );
    cluster.finish().await;
}
