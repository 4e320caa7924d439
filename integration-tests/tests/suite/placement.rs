//! Round-robin placement across hosts and LocateAgent.

use std::collections::HashMap;

use agentplane::proto::v1::{ListHostsRequest, LocateAgentRequest};
use agentplane_integration_tests::TestCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_one_agents_land_seven_per_host_and_locate_finds_each() {
    let cluster = TestCluster::builder().hosts(3).start().await;
    let mut client = cluster.client().await;
    let hosts = cluster
        .host_client()
        .await
        .list_hosts(ListHostsRequest {})
        .await
        .unwrap()
        .into_inner()
        .hosts;
    let address: HashMap<String, String> = hosts
        .iter()
        .map(|h| (h.id.clone(), h.address.clone()))
        .collect();
    assert_eq!(address.len(), 3);
    for s in &cluster.hosts {
        assert_eq!(
            address[&s.host_id], s.addr,
            "registered address of {}",
            s.host_id
        );
    }

    let mut spawns = Vec::new();
    for _ in 0..21 {
        let c = &cluster;
        spawns.push(async move { c.spawn(&["sleep", "1000"]).await });
    }
    let agents = futures::future::join_all(spawns).await;

    let mut per_host: HashMap<String, usize> = HashMap::new();
    for a in &agents {
        *per_host.entry(a.host.clone()).or_default() += 1;
        let loc = client
            .locate_agent(LocateAgentRequest { id: a.id.clone() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(loc.host, a.host);
        assert_eq!(loc.address, address[&a.host], "address of {}", a.id);
        assert!(loc.live, "{} has a live location key", a.id);
        assert!(loc.pid > 0);
        // The process really is where the record says: the pid is a child of
        // that host's keeper (itself the host agent's child here).
        let host_pid = cluster.keeper_pid(&a.host).expect("the host's keeper runs");
        let info =
            agentplane_integration_tests::procfs::stat(loc.pid).expect("agent process exists");
        assert_eq!(
            info.ppid, host_pid,
            "agent {} runs under host {}",
            a.id, a.host
        );
    }
    let mut counts: Vec<usize> = per_host.values().copied().collect();
    counts.sort();
    assert_eq!(counts, [7, 7, 7], "per-host counts: {per_host:?}");
    cluster.finish().await;
}
