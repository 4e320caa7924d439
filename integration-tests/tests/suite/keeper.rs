//! The keeper as users and /proc see it: it, not the host agent (nor its
//! forker), is the parent of every agent, and its death ends its agents,
//! its forker and their records the way a host's death does.

use std::time::{Duration, Instant};

use agentplane::proto::v1::restart_policy::Mode;
use agentplane::proto::v1::{AgentSpec, AgentState, GetAgentRequest};
use agentplane_integration_tests::{eventually, procfs, spec, TestCluster};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_keeper_leaves_no_agent_and_its_host_is_lost_within_the_ttl() {
    let ttl = Duration::from_millis(1500);
    let mut cluster = TestCluster::builder()
        .hosts(2)
        .heartbeat_ttl(ttl)
        .start()
        .await;
    // Round robin: h1 and h2 each get a pipe agent, a terminal agent and a
    // restartable one.
    let mut agents = Vec::new();
    for i in 0..6 {
        let s = match i / 2 {
            0 => spec(&["sleep", "1000"], None),
            1 => AgentSpec {
                tty: true,
                ..spec(&["sleep", "1000"], None)
            },
            _ => spec(&["sleep", "1000"], Some(Mode::Always)),
        };
        agents.push(cluster.spawn_spec(s).await);
    }
    let (on_h1, on_h2): (Vec<_>, Vec<_>) = agents.into_iter().partition(|a| a.host == "h1");
    assert_eq!((on_h1.len(), on_h2.len()), (3, 3), "round robin");
    let keeper = cluster.keeper_pid("h1").expect("h1's keeper runs");
    for a in &on_h1 {
        let info = procfs::stat(a.pid).expect("the agent runs");
        assert_eq!(info.ppid, keeper, "{} is the keeper's child", a.id);
    }
    assert_eq!(
        procfs::stat(keeper).expect("keeper").ppid,
        cluster.host("h1").proc.pid(),
        "the host agent started its keeper"
    );

    let killed_at = Instant::now();
    kill(Pid::from_raw(keeper), Signal::SIGKILL).expect("SIGKILL the keeper");
    eventually(
        Duration::from_secs(5),
        "no process of h1's agents",
        || async {
            on_h1
                .iter()
                .all(|a| procfs::agent_processes(&a.id).is_empty())
                .then_some(())
        },
    )
    .await;
    let gone_after = killed_at.elapsed();
    // The host agent cannot run agents without its keeper: it ends, and
    // its supervisor (systemd) starts it again with a new one.
    assert!(
        cluster
            .host("h1")
            .proc
            .wait_exit(Duration::from_secs(10))
            .await,
        "h1's host agent still runs"
    );
    assert!(
        cluster
            .host("h1")
            .proc
            .log_tail(400)
            .contains("the keeper process died"),
        "its log says why: {}",
        cluster
            .host("h1")
            .proc
            .log_tail(400)
            .lines()
            .filter(|l| !l.starts_with("  "))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Records: each of h1's agents LOST (or, restartable, started again
    // elsewhere) within TTL + 2 beats.
    let mut c = cluster.client().await;
    let limit = ttl + 2 * (ttl / 3);
    let mut settled = Vec::new();
    while settled.len() < on_h1.len() {
        assert!(
            killed_at.elapsed() < limit,
            "h1's records not settled within TTL + 2 beats: {settled:?}"
        );
        settled.clear();
        for a in &on_h1 {
            let now = c
                .get_agent(GetAgentRequest { id: a.id.clone() })
                .await
                .expect("get")
                .into_inner();
            if now.state() == AgentState::Lost || now.generation > a.generation {
                settled.push(a.id.clone());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "keeper SIGKILL: agents gone after {gone_after:?}, records settled after {:?} (ttl {ttl:?})",
        killed_at.elapsed()
    );
    // The other host's agents never noticed.
    for a in &on_h2 {
        let now = c
            .get_agent(GetAgentRequest { id: a.id.clone() })
            .await
            .expect("get")
            .into_inner();
        assert_eq!((now.state(), now.pid), (AgentState::Running, a.pid));
        assert!(procfs::is_alive(a.pid));
    }
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_forker_is_replaced_and_every_agent_stays_the_keepers_child() {
    let cluster = TestCluster::builder().hosts(1).start().await;
    let first = cluster.spawn_spec(spec(&["sleep", "1000"], None)).await;
    let keeper = cluster.keeper_pid("h1").expect("the keeper runs");
    let forker = procfs::forker_of(keeper).expect("the keeper started its forker");
    assert_eq!(procfs::stat(first.pid).expect("runs").ppid, keeper);

    kill(Pid::from_raw(forker), Signal::SIGKILL).expect("SIGKILL the forker");
    eventually(Duration::from_secs(5), "the forker reaped", || async {
        (!procfs::is_alive(forker)).then_some(())
    })
    .await;
    // The next start finds it gone, starts another and goes on.
    let second = cluster
        .spawn_spec(AgentSpec {
            tty: true,
            ..spec(&["sleep", "1000"], None)
        })
        .await;
    assert_eq!(procfs::stat(second.pid).expect("runs").ppid, keeper);
    let again = procfs::forker_of(keeper).expect("a new forker");
    assert_ne!(again, forker);
    assert!(procfs::is_alive(first.pid), "the first agent ran on");

    // The forker goes with its keeper.
    kill(Pid::from_raw(keeper), Signal::SIGKILL).expect("SIGKILL the keeper");
    eventually(Duration::from_secs(5), "the forker gone", || async {
        (!procfs::is_alive(again)).then_some(())
    })
    .await;
    cluster.finish().await;
}
