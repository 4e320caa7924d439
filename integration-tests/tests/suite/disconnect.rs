//! `stop_after_disconnect`: a user's choice of at most one copy over
//! availability. A host cut off from Redis stops such an agent itself, and the
//! control plane starts the replacement only after the lease expired + the
//! limit + the grace, so the agent never runs twice. Needs root (network
//! namespaces, see integration-tests/src/netns.rs).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use agentplane::proto::v1::restart_policy::Mode;
use agentplane::proto::v1::{AgentSpec, AgentState, GetAgentRequest, RestartPolicy};
use agentplane_integration_tests::{procfs, TestCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_host_stops_an_at_most_once_agent_before_it_runs_elsewhere() {
    let ttl = Duration::from_millis(1500);
    let cluster = TestCluster::builder()
        .hosts(2)
        .heartbeat_ttl(ttl)
        .network_namespaces()
        .start()
        .await;
    let second = |s: u64| prost_types::Duration {
        seconds: i64::try_from(s).expect("seconds"),
        nanos: 0,
    };
    let mut on_h1 = None;
    for _ in 0..2 {
        let a = cluster
            .spawn_spec(AgentSpec {
                argv: vec!["sleep".into(), "1000".into()],
                restart: Some(RestartPolicy {
                    mode: Mode::Always as i32,
                    ..Default::default()
                }),
                stop_grace: Some(second(1)),
                stop_after_disconnect: Some(second(1)),
                ..Default::default()
            })
            .await;
        if a.host == "h1" {
            on_h1 = Some(a);
        }
    }
    let a = on_h1.expect("round robin put one on h1");
    let lab = cluster.lab.as_ref().expect("lab");
    let cut = Instant::now();
    lab.cut(0);
    let mut c = cluster.client().await;
    let (mut old_gone, mut new_running) = (None, None);
    let deadline = cut + Duration::from_secs(20);
    while new_running.is_none() {
        assert!(
            Instant::now() < deadline,
            "no replacement after {:?}",
            cut.elapsed()
        );
        let groups: HashSet<i32> = procfs::agent_processes(&a.id)
            .iter()
            .map(|p| p.pgrp)
            .collect();
        assert!(
            groups.len() <= 1,
            "two copies at {:?}: groups {groups:?}",
            cut.elapsed()
        );
        if old_gone.is_none() && !procfs::is_alive(a.pid) {
            old_gone = Some(cut.elapsed());
        }
        if let Ok(r) = c.get_agent(GetAgentRequest { id: a.id.clone() }).await {
            let r = r.into_inner();
            if r.state() == AgentState::Running && r.host == "h2" && procfs::is_alive(r.pid) {
                new_running = Some(cut.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (old_gone, new_running) = (
        old_gone.expect("the old copy ended"),
        new_running.expect("ran"),
    );
    eprintln!(
        "cut with TTL {ttl:?}, stop_after_disconnect 1s, grace 1s: old copy gone after {old_gone:?}, replacement running after {new_running:?}"
    );
    assert!(old_gone < new_running);
    // The wait is the lease (TTL) + the limit + the grace, from the last renewal.
    assert!(new_running >= Duration::from_secs(2), "{new_running:?}");
    lab.restore(0);
    cluster.finish().await;
}
