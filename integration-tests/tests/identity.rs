//! Which users agents run as: a host agent refuses root agents (uid 0, or no
//! uid while it runs as root) unless started with `--allow-root-agents`, and
//! uids outside `--allowed-uids`. Nothing runs for a refused start.

use std::time::Duration;

use agentplane::proto::v1::{AgentSpec, AgentState, ListAgentsRequest, SpawnAgentRequest};
use agentplane_integration_tests::{procfs, TestCluster};

fn sleeper(uid: Option<u32>) -> AgentSpec {
    AgentSpec {
        argv: vec!["sleep".into(), "100".into()],
        uid,
        gid: uid,
        ..Default::default()
    }
}

/// The real uid of `pid`, from /proc.
fn uid_of(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_agents_are_refused_unless_allowed_and_uids_stay_in_range() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (to run agents as other users)");
        return;
    }
    let cluster = TestCluster::builder()
        .hosts(1)
        .forbid_root_agents()
        .host_arg("--allowed-uids")
        .host_arg("60000-65534")
        .start()
        .await;
    let mut c = cluster.client().await;
    let cases = [
        ("no uid (the host agent's own: root)", None),
        ("uid 0", Some(0)),
        ("uid 1000, outside --allowed-uids", Some(1000)),
    ];
    for (what, uid) in cases {
        let err = c
            .spawn_agent(SpawnAgentRequest {
                spec: Some(sleeper(uid)),
                request_id: String::new(),
            })
            .await
            .expect_err(what);
        let hint = if uid == Some(1000) {
            "--allowed-uids"
        } else {
            "--allow-root-agents"
        };
        assert!(err.message().contains(hint), "{what}: {err:?}");
    }
    let listed = c
        .list_agents(ListAgentsRequest::default())
        .await
        .expect("ls")
        .into_inner()
        .agents;
    assert!(
        listed.is_empty(),
        "refused spawns leave no record: {listed:?}"
    );
    // Nothing ran: no process descends from this host agent.
    let host_pid = cluster.hosts[0].proc.pid();
    let under: Vec<_> = procfs::all_agent_processes()
        .into_iter()
        .filter(|p| procfs::descends_from(p.pid, host_pid))
        .collect();
    assert!(under.is_empty(), "refused starts ran {under:?}");
    // An allowed uid runs, as that user.
    let agent = cluster.spawn_spec(sleeper(Some(65534))).await;
    let agent = cluster
        .wait_state(&agent.id, AgentState::Running, Duration::from_secs(10))
        .await;
    assert_eq!(uid_of(agent.pid), Some(65534), "it runs as nobody");
    cluster.finish().await;
}
