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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_output_is_readable_by_the_host_agents_user_only() {
    use std::os::unix::fs::PermissionsExt;
    let cluster = TestCluster::builder().hosts(1).start().await;
    let agent = cluster.spawn(&["sh", "-c", "echo secret; sleep 100"]).await;
    cluster.wait_for_output(&agent.id, "secret").await;
    let mode = |p: &std::path::Path| {
        std::fs::metadata(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .permissions()
            .mode()
            & 0o777
    };
    let data = cluster.data_dir("h1");
    assert_eq!(mode(&data), 0o700, "{}", data.display());
    let agents = data.join("agents");
    assert_eq!(mode(&agents), 0o700);
    let mut seen = 0;
    for start in std::fs::read_dir(&agents).expect("agents dir").flatten() {
        assert_eq!(mode(&start.path()), 0o700, "{}", start.path().display());
        for f in std::fs::read_dir(start.path())
            .expect("start dir")
            .flatten()
        {
            assert_eq!(mode(&f.path()), 0o600, "{}", f.path().display());
            seen += 1;
        }
    }
    assert!(seen > 0, "the output file exists");
    cluster.finish().await;
}
