//! Redis behind Sentinel: both servers find the master through the
//! sentinels and follow a failover; the master's death is an outage of a
//! few seconds that the record rules already survive. Hosts run in network
//! namespaces (root), so /proc is judged for this cluster's agents only.

use std::time::{Duration, Instant};

use agentplane::proto::v1::restart_policy::Mode;
use agentplane::proto::v1::{AgentSpec, RestartPolicy, SpawnAgentRequest};
use agentplane_integration_tests::{soak, TestCluster};

fn spawn_req(req: &str) -> SpawnAgentRequest {
    SpawnAgentRequest {
        spec: Some(AgentSpec {
            argv: vec!["sleep".into(), "1000".into()],
            labels: [("req".to_owned(), req.to_owned())].into(),
            restart: Some(RestartPolicy {
                mode: Mode::Always as i32,
                ..Default::default()
            }),
            ..Default::default()
        }),
        request_id: req.to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_during_spawns_and_relocations_leaves_every_record_true() {
    let mut cluster = TestCluster::builder()
        .hosts(2)
        .network_namespaces()
        .sentinel()
        .start()
        .await;
    let client = cluster.client().await;
    let mut ids = Vec::new();
    for i in 0..10 {
        let a = client
            .clone()
            .spawn_agent(spawn_req(&format!("before-{i}")))
            .await
            .expect("spawn")
            .into_inner()
            .agent
            .unwrap_or_default();
        ids.push(a.id);
    }
    // Spawns go on through the failover, each retried with its request id
    // until it is answered (UNAVAILABLE while there is no master).
    let spawner = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut made = Vec::new();
            let mut failed = 0;
            let give_up = Instant::now() + Duration::from_secs(60);
            for i in 0..30 {
                loop {
                    match client
                        .clone()
                        .spawn_agent(spawn_req(&format!("during-{i}")))
                        .await
                    {
                        Ok(r) => {
                            made.push(r.into_inner().agent.unwrap_or_default().id);
                            break;
                        }
                        Err(e) => {
                            assert!(
                                Instant::now() < give_up,
                                "spawns still fail a minute after the kill: {e:?}"
                            );
                            failed += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
            (made, failed)
        })
    };
    // Relocations: h1's machine dies, its agents go to h2; and the master
    // dies with them.
    cluster.kill_machine("h1");
    let took = cluster.fail_over_redis().await;
    let (made, failed) = spawner.await.expect("spawner");
    ids.extend(made);
    eprintln!(
        "sentinels named the new master {took:?} after the kill; {failed} spawn calls failed meanwhile and were retried"
    );
    cluster.restart_host("h1");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let problems = soak::violations(&cluster, &ids).await;
        if problems.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "records and /proc never agreed after the failover:\n{}",
            problems.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Both servers write to the new master (the old one is its replica).
    let calls = cluster.redis.command_calls().await;
    assert!(
        calls.get("evalsha").copied().unwrap_or(0) > 0,
        "no script ran on the new master: {calls:?}"
    );
    cluster.finish().await;
}
