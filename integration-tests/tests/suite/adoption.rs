//! Agents outlive their host agent: a host agent that exits (SIGTERM) or is
//! SIGKILLed leaves its agents running in the keeper, and the next one
//! adopts them (same pids, no restart, records RUNNING with its incarnation,
//! output going on); with none for longer than `--orphan-grace`, nothing is
//! left running.

use std::time::{Duration, Instant};

use agentplane::proto::v1::restart_policy::Mode;
use agentplane::proto::v1::{
    Agent, AgentSpec, AgentState, ExitReason, GetAgentRequest, ListAgentsRequest,
};
use agentplane_integration_tests::output::counter_lines;
use agentplane_integration_tests::{eventually, procfs, spec, TestCluster};
use nix::sys::signal::Signal;

/// Prints 0, 1, 2, … one per line, every 5 ms.
const COUNTER: &[&str] = &[
    "sh",
    "-c",
    "i=0; while :; do echo $i; i=$((i+1)); sleep 0.005; done",
];
/// A counter as fast as the shell goes: a killed host agent always had some
/// of its output in flight.
const FAST: &[&str] = &["sh", "-c", "i=0; while :; do echo $i; i=$((i+1)); done"];
/// The agents `start_agents` starts that count.
const COUNTERS: [usize; 4] = [0, 1, 3, 4];

/// The counter's lines in the agent's retained output, as numbers.
fn counted(cluster: &TestCluster, id: &str) -> Vec<u64> {
    let out = cluster.agentctl(&["logs", id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    counter_lines(&out.stdout)
}

/// (gaps, duplicates or reorderings) in a counter's output.
fn faults(n: &[u64]) -> (usize, usize) {
    let gaps = n.windows(2).filter(|w| w[1] > w[0] + 1).count();
    let backs = n.windows(2).filter(|w| w[1] <= w[0]).count();
    (gaps, backs)
}

/// Five agents on h1: a pipe counter, a terminal counter, a restartable
/// `sleep` with a timeout far away, and fast pipe and terminal counters.
async fn start_agents(cluster: &TestCluster) -> Vec<Agent> {
    let mut agents = vec![
        cluster.spawn_spec(spec(COUNTER, None)).await,
        cluster
            .spawn_spec(AgentSpec {
                tty: true,
                ..spec(COUNTER, None)
            })
            .await,
        cluster
            .spawn_spec(AgentSpec {
                timeout: Some(prost_types::Duration {
                    seconds: 600,
                    nanos: 0,
                }),
                ..spec(&["sleep", "1000"], Some(Mode::Always))
            })
            .await,
        cluster
            .spawn_spec(AgentSpec {
                log_max_bytes: 1 << 30,
                ..spec(FAST, None)
            })
            .await,
        cluster
            .spawn_spec(AgentSpec {
                tty: true,
                log_max_bytes: 1 << 30,
                ..spec(FAST, None)
            })
            .await,
    ];
    for a in &mut agents {
        *a = cluster
            .wait_state(&a.id, AgentState::Running, Duration::from_secs(5))
            .await;
    }
    agents
}

/// Every agent record, through ListAgents pages (one call per 500).
async fn list(cluster: &TestCluster) -> Vec<Agent> {
    let mut c = cluster.client().await;
    let (mut out, mut token) = (Vec::new(), String::new());
    loop {
        let page = c
            .list_agents(ListAgentsRequest {
                page_size: 500,
                page_token: token,
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner();
        out.extend(page.agents);
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
    }
}

/// Waits until every agent's record is in the same state (RUNNING or
/// PAUSED) at the same pid and generation, with no restart, written by an
/// incarnation other than `old`.
async fn wait_adopted(cluster: &TestCluster, agents: &[Agent], old: &str) -> Duration {
    let started = Instant::now();
    loop {
        let now = list(cluster).await;
        let mut all = true;
        for a in agents {
            let now = now
                .iter()
                .find(|n| n.id == a.id)
                .expect("the record exists");
            assert_eq!(now.state(), a.state(), "{} changed state: {now:?}", a.id);
            assert_eq!(
                (now.pid, now.generation, now.restarts),
                (a.pid, a.generation, 0)
            );
            all &= now.incarnation != old;
        }
        if all {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "records not taken over by the new host agent"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How the host agent goes away and comes back.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Restart {
    /// SIGTERM, then the same binary.
    Graceful,
    /// SIGKILL, then the same binary.
    Killed,
    /// SIGTERM, then a copy of the binary at another path.
    Upgrade,
}

async fn outlive(how: Restart) {
    let graceful = how != Restart::Killed;
    let mut cluster = TestCluster::builder()
        .hosts(1)
        .heartbeat_ttl(Duration::from_secs(3))
        .start()
        .await;
    let mut agents = start_agents(&cluster).await;
    // A paused agent stays paused across the restart.
    let out = cluster.agentctl(&["pause", &agents[2].id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    agents[2] = cluster
        .wait_state(&agents[2].id, AgentState::Paused, Duration::from_secs(5))
        .await;
    let old = agents[0].incarnation.clone();
    let keeper = cluster.keeper_pid("h1").expect("keeper");
    cluster.wait_for_output(&agents[0].id, "\n20\n").await;

    let sig = if graceful {
        Signal::SIGTERM
    } else {
        Signal::SIGKILL
    };
    cluster.end_host_agent("h1", sig).await;
    let gone_at = Instant::now();
    for a in &agents {
        assert!(procfs::is_alive(a.pid), "{} outlived its host agent", a.id);
        assert_eq!(procfs::stat(a.pid).expect("stat").ppid, keeper);
    }
    let upgraded = (how == Restart::Upgrade).then(|| cluster.upgrade_host_binary());
    cluster.restart_host("h1");
    let away = gone_at.elapsed();
    if let Some(path) = &upgraded {
        let exe = std::fs::read_link(format!("/proc/{}/exe", cluster.host("h1").proc.pid()))
            .expect("the new host agent's exe");
        assert_eq!(&exe, path, "the new binary runs");
    }
    let taken = wait_adopted(&cluster, &agents, &old).await;
    eprintln!(
        "{}: host agent away {away:?} (until the new one serves), records taken over {taken:?} after that",
        match how {
            Restart::Graceful => "SIGTERM",
            Restart::Killed => "SIGKILL",
            Restart::Upgrade => "SIGTERM + new binary",
        },
    );
    assert_eq!(cluster.keeper_pid("h1"), Some(keeper), "the same keeper");

    // The counters' output goes on across the restart, in the same log.
    for a in COUNTERS.map(|i| &agents[i]) {
        let before = counted(&cluster, &a.id).last().copied().unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(10);
        let n = loop {
            let n = counted(&cluster, &a.id);
            if n.last().is_some_and(|l| *l > before + 50) {
                break n;
            }
            assert!(Instant::now() < deadline, "{}'s output stopped", a.id);
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let (gaps, backs) = faults(&n);
        eprintln!(
            "{} ({}): {} lines, {gaps} gaps, {backs} duplicates",
            a.id,
            if a.spec.as_ref().is_some_and(|s| s.tty) {
                "tty"
            } else {
                "pipes"
            },
            n.len()
        );
        assert_eq!(n.first(), Some(&0), "the log begins at the first line");
        // Bytes leave a pipe only into the log (splice), so even a
        // SIGKILL loses and repeats nothing.
        assert_eq!((gaps, backs), (0, 0), "{}: every line once", a.id);
    }
    // Control goes on: the adopted paused agent resumes, and stops.
    assert!(procfs::stat(agents[2].pid).expect("stat").paused());
    let out = cluster.agentctl(&["resume", &agents[2].id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!procfs::stat(agents[2].pid).expect("stat").paused());
    let out = cluster.agentctl(&["stop", &agents[2].id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!procfs::is_alive(agents[2].pid));
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_outlive_a_sigtermed_host_agent_and_the_next_one_adopts_them() {
    outlive(Restart::Graceful).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_outlive_an_upgrade_to_a_new_binary() {
    outlive(Restart::Upgrade).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_outlive_a_sigkilled_host_agent_and_the_next_one_adopts_them() {
    outlive(Restart::Killed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_host_agent_past_the_orphan_grace_no_agent_is_left() {
    let mut cluster = TestCluster::builder()
        .hosts(1)
        .heartbeat_ttl(Duration::from_secs(3))
        .host_arg("--orphan-grace=500ms")
        .start()
        .await;
    let agents = start_agents(&cluster).await;
    let killed = Instant::now();
    cluster.host("h1").proc.signal(Signal::SIGKILL);
    let deadline = killed + Duration::from_secs(5);
    while agents
        .iter()
        .any(|a| !procfs::agent_processes(&a.id).is_empty())
    {
        assert!(
            Instant::now() < deadline,
            "agents still run after the grace"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let gone = killed.elapsed();
    eprintln!("orphan grace 500ms: every agent gone {gone:?} after the host agent's SIGKILL");
    assert!(
        gone >= Duration::from_millis(500),
        "not before the grace: {gone:?}"
    );
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_mixed_agents_survive_a_sigkilled_host_agent_and_an_upgrade() {
    let ttl = Duration::from_secs(3);
    let mut cluster = TestCluster::builder()
        .hosts(1)
        .heartbeat_ttl(ttl)
        .start()
        .await;
    // A counter every 500 ms (each line forks a `sleep`: 400 forks a
    // second on two cores): pipes, terminals, restart always, a timeout.
    let slow: &[&str] = &[
        "sh",
        "-c",
        "i=0; while :; do echo $i; i=$((i+1)); sleep 0.5; done",
    ];
    let mut agents = Vec::new();
    for i in 0..200 {
        let base = spec(slow, None);
        let s = match i % 4 {
            0 => base,
            1 => AgentSpec { tty: true, ..base },
            2 => AgentSpec {
                restart: spec(slow, Some(Mode::Always)).restart,
                ..base
            },
            _ => AgentSpec {
                timeout: Some(prost_types::Duration {
                    seconds: 600,
                    nanos: 0,
                }),
                ..base
            },
        };
        agents.push(cluster.spawn_spec(s).await);
    }
    for a in &mut agents {
        *a = cluster
            .wait_state(&a.id, AgentState::Running, Duration::from_secs(10))
            .await;
    }
    // SIGKILL and the same binary, then SIGKILL and a new binary at
    // another path (an upgrade that never stopped the old one cleanly).
    for upgrade in [false, true] {
        let old = list(&cluster)
            .await
            .into_iter()
            .find(|r| r.id == agents[0].id)
            .expect("a record")
            .incarnation;
        cluster.end_host_agent("h1", Signal::SIGKILL).await;
        if upgrade {
            cluster.upgrade_host_binary();
        }
        cluster.restart_host("h1");
        let taken = wait_adopted(&cluster, &agents, &old).await;
        let (mut gaps, mut lines) = (0, 0);
        for a in &agents {
            assert!(procfs::is_alive(a.pid));
            let n = counted(&cluster, &a.id);
            let (g, backs) = faults(&n);
            assert_eq!(backs, 0, "{}: no line twice", a.id);
            assert_eq!(
                n.first(),
                Some(&0),
                "{}: the log begins at the first line",
                a.id
            );
            assert_eq!(g, 0, "{}: no line lost", a.id);
            gaps += g;
            lines += n.len();
        }
        eprintln!(
            "200 agents, host agent SIGKILLed and started again{}: all adopted {taken:?} after it served (one beat is {:?}); {lines} lines, {gaps} gaps",
            if upgrade { " from a new binary" } else { "" },
            ttl / 3
        );
        assert!(taken <= ttl / 3, "within one heartbeat: {taken:?}");
    }
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_idle_before_a_restart_is_not_announced_idle_again_and_its_idle_timeout_holds() {
    let mut cluster = TestCluster::builder()
        .hosts(1)
        .heartbeat_ttl(Duration::from_secs(3))
        .start()
        .await;
    let ms = |ms: i32| prost_types::Duration {
        seconds: 0,
        nanos: ms * 1_000_000,
    };
    let a = cluster
        .spawn_spec(AgentSpec {
            idle_after: Some(ms(300)),
            idle_timeout: Some(prost_types::Duration {
                seconds: 3,
                nanos: 0,
            }),
            ..spec(&["sh", "-c", "echo ready; exec sleep 1000"], None)
        })
        .await;
    let mut c = cluster.client().await;
    eventually(Duration::from_secs(10), "the agent marked idle", || {
        let mut c = c.clone();
        let id = a.id.clone();
        async move {
            let r = c.get_agent(GetAgentRequest { id }).await.ok()?.into_inner();
            r.idle.then_some(())
        }
    })
    .await;
    // The record flag is written first, then AGENT_IDLE, then the run's
    // `idle` marker on disk: a host agent killed before the marker
    // announces again (at least once, never lost). Killed after it, as here,
    // the next one must not.
    let agents = cluster.data_dir("h1").join("agents");
    eventually(Duration::from_secs(10), "the idle marker on disk", || {
        let marked = std::fs::read_dir(&agents)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.path().join("idle").exists());
        async move { marked.then_some(()) }
    })
    .await;
    cluster.end_host_agent("h1", Signal::SIGKILL).await;
    cluster.restart_host("h1");
    // The adopting host agent goes on from idle: its idle timeout (counted
    // from the last output, before the restart) stops the same run.
    let ended = cluster
        .wait_state(&a.id, AgentState::Exited, Duration::from_secs(20))
        .await;
    let exit = ended.exit.expect("an exit");
    assert_eq!(exit.reason(), ExitReason::Idle, "{exit:?}");
    assert_eq!(
        (ended.started_at, ended.restarts, ended.generation),
        (a.started_at, 0, a.generation),
        "the same run"
    );
    let idle = c
        .get_agent(GetAgentRequest { id: a.id.clone() })
        .await
        .expect("get")
        .into_inner();
    assert!(idle.idle, "still marked idle at its end");
    let announced = cluster
        .events()
        .await
        .iter()
        .filter(|e| {
            e.get("type").map(String::as_str) == Some("AGENT_IDLE") && e.get("agent") == Some(&a.id)
        })
        .count();
    assert_eq!(announced, 1, "AGENT_IDLE once, not again after the restart");
    cluster.finish().await;
}
