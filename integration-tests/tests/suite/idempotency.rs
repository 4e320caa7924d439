//! Spawn with a request_id: retries (even concurrent ones) make one agent.

use agentplane::proto::v1::{AgentSpec, ListAgentsRequest, SpawnAgentRequest};
use agentplane_integration_tests::{procfs, TestCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_request_id_ten_times_concurrently_makes_one_agent_and_one_process() {
    let cluster = TestCluster::builder().hosts(2).start().await;
    let client = cluster.client().await;
    let req = SpawnAgentRequest {
        spec: Some(AgentSpec {
            argv: vec!["sleep".into(), "1000".into()],
            ..Default::default()
        }),
        request_id: "retry-me-1".into(),
    };
    let calls = (0..10).map(|_| {
        let mut c = client.clone();
        let r = req.clone();
        async move { c.spawn_agent(r).await.map(|r| r.into_inner()) }
    });
    let answers = futures::future::join_all(calls).await;
    let mut ids = Vec::new();
    let mut fresh = 0;
    for a in answers {
        let a = a.expect("every retry succeeds");
        fresh += usize::from(!a.existing);
        ids.push(a.agent.unwrap().id);
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "one agent id for all ten: {ids:?}");
    assert_eq!(fresh, 1, "exactly one answer created it");

    let listed = client
        .clone()
        .list_agents(ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.agents.len(), 1);
    let sleeps: Vec<i32> = cluster
        .hosts
        .iter()
        .flat_map(|h| children_named(cluster.keeper_pid(&h.host_id).expect("keeper"), "sleep"))
        .collect();
    assert_eq!(sleeps.len(), 1, "one process across all hosts: {sleeps:?}");
    assert!(procfs::is_alive(listed.agents[0].pid));

    // Another request id makes another agent.
    let mut other = req.clone();
    other.request_id = "retry-me-2".into();
    let second = client
        .clone()
        .spawn_agent(other)
        .await
        .unwrap()
        .into_inner();
    assert!(!second.existing);
    assert_ne!(second.agent.unwrap().id, ids[0]);
    cluster.finish().await;
}

/// Pids of the live children of `parent` whose command name is `name`.
fn children_named(parent: i32, name: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| procfs::stat(*pid).is_some_and(|p| p.ppid == parent && p.state != 'Z'))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name)
        })
        .collect()
}
