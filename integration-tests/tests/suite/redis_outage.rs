//! "Redis is down" is an error, never an empty answer, and the servers recover
//! by themselves when it is back.

use std::time::{Duration, Instant};

use agentplane::proto::v1::{
    AgentSpec, AgentState, GetAgentRequest, ListAgentsRequest, ListHostsRequest, SpawnAgentRequest,
};
use agentplane_integration_tests::TestCluster;
use tonic::Code;

fn spawn_req() -> SpawnAgentRequest {
    SpawnAgentRequest {
        spec: Some(AgentSpec {
            argv: vec!["sleep".into(), "1000".into()],
            ..Default::default()
        }),
        request_id: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_is_unavailable_naming_the_registry_and_recovery_needs_no_restart() {
    // One Redis server, stopped and restarted.
    let mut cluster = TestCluster::builder()
        .single_redis()
        .hosts(1)
        .heartbeat_ttl(Duration::from_millis(1500))
        .start()
        .await;
    let mut agents = cluster.client().await;
    let mut hosts = cluster.host_client().await;
    let before = cluster.spawn(&["sleep", "1000"]).await;
    let stats = cluster.redis.commandstats().await;
    assert!(!stats.contains("cmdstat_keys:"), "{stats}");

    cluster.redis.stop();

    let t = Instant::now();
    let e = agents.spawn_agent(spawn_req()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains("registry"),
        "names the registry: {}",
        e.message()
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "answered promptly: {:?}",
        t.elapsed()
    );

    let e = hosts.list_hosts(ListHostsRequest {}).await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::Unavailable,
        "an outage is not an empty list: {e:?}"
    );
    assert!(e.message().contains("registry"), "{}", e.message());
    let e = agents
        .list_agents(ListAgentsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let e = agents
        .get_agent(GetAgentRequest {
            id: before.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::Unavailable,
        "not NOT_FOUND while Redis is down: {e:?}"
    );

    // Both servers are still up and the agent still runs.
    for s in cluster
        .control_planes
        .iter_mut()
        .chain(cluster.hosts.iter_mut())
    {
        assert!(
            s.proc.is_running(),
            "server survived the outage:\n{}",
            s.proc.log_tail(20)
        );
    }
    assert!(
        agentplane_integration_tests::procfs::is_alive(before.pid),
        "agent kept running"
    );

    // Redis comes back empty; the host re-registers on its next heartbeat and
    // the same servers answer again.
    cluster.redis.restart().await;
    cluster.wait_for_hosts(1).await;
    let after = agents
        .spawn_agent(spawn_req())
        .await
        .expect("spawn after recovery")
        .into_inner();
    assert_eq!(after.agent.unwrap().state(), AgentState::Running);
    let listed = hosts
        .list_hosts(ListHostsRequest {})
        .await
        .unwrap()
        .into_inner()
        .hosts;
    assert_eq!(listed.len(), 1);
    for s in cluster
        .control_planes
        .iter_mut()
        .chain(cluster.hosts.iter_mut())
    {
        assert!(s.proc.is_running());
    }
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_hosts_is_not_the_same_as_redis_down() {
    let cluster = TestCluster::builder().hosts(0).start().await;
    let mut agents = cluster.client().await;
    let listed = cluster
        .host_client()
        .await
        .list_hosts(ListHostsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.hosts.is_empty());
    let e = agents.spawn_agent(spawn_req()).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("no host agent is registered"),
        "{}",
        e.message()
    );
    cluster.finish().await;
}
