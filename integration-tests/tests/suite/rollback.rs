//! Records that Redis rolled back to an older generation (a restart from an
//! older snapshot, a failover that lost writes, or two hosts writing back
//! after a data loss): the newest running copy wins, and a start of a
//! generation that already ran here runs again only when its record asks.
//! Found by the fault soak (seed 20261203): a lower generation written back
//! by a stale host made the newer copy fence itself, and the relocation that
//! followed reused that generation, which the host answered with its ended
//! slot for good (a record PENDING forever).

use std::time::Duration;

use agentplane::proto::v1::restart_policy::Mode;
use agentplane::proto::v1::{
    AgentState, DrainHostRequest, GetAgentRequest, HostListAgentsRequest, StartAgentRequest,
};
use agentplane_integration_tests::{procfs, spec, TestCluster};

/// Sets fields of agent `id`'s record as a rollback would.
async fn roll_back(cluster: &TestCluster, id: &str, fields: &[(&str, String)]) {
    let mut conn = cluster.redis_conn().await;
    let mut cmd = redis::cmd("HSET");
    cmd.arg(cluster.keys().agent(id));
    for (f, v) in fields {
        cmd.arg(*f).arg(v);
    }
    let _: i64 = cmd.query_async(&mut conn).await.expect("HSET");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_rolled_back_to_an_older_generation_is_written_back_by_the_newer_copy() {
    let cluster = TestCluster::builder().hosts(2).start().await;
    let first = cluster
        .spawn_spec(spec(&["sleep", "1000"], Some(Mode::Always)))
        .await;
    let first = cluster
        .wait_state(&first.id, AgentState::Running, Duration::from_secs(10))
        .await;
    // Move it (a drain) so that a newer generation runs on the other host.
    let from = first.host.clone();
    let mut stream = cluster
        .host_client()
        .await
        .drain_host(DrainHostRequest {
            id: from.clone(),
            force: false,
            timeout: Some(prost_types::Duration {
                seconds: 30,
                nanos: 0,
            }),
        })
        .await
        .expect("drain")
        .into_inner();
    while let Some(_progress) = stream.message().await.expect("drain stream") {}
    let moved = cluster
        .wait_agent(
            &first.id,
            "RUNNING on the other host",
            Duration::from_secs(15),
            |a| a.state() == AgentState::Running && a.host != from,
        )
        .await;
    assert_eq!(moved.generation, first.generation + 1);
    // The record goes back to what it said before the move.
    roll_back(
        &cluster,
        &first.id,
        &[
            ("host", from.clone()),
            ("generation", first.generation.to_string()),
            ("pid", first.pid.to_string()),
        ],
    )
    .await;
    // The newer copy's heartbeat writes it back; its process never stops.
    let back = cluster
        .wait_agent(
            &first.id,
            "written back by the newer copy",
            Duration::from_secs(10),
            |a| a.host == moved.host && a.generation == moved.generation,
        )
        .await;
    assert_eq!(back.state(), AgentState::Running);
    assert_eq!(back.pid, moved.pid, "the same process");
    assert!(procfs::is_alive(moved.pid), "the newer copy was not fenced");
    let groups: Vec<i32> = procfs::agent_processes_by_id()
        .into_iter()
        .filter(|(id, _)| id == &first.id)
        .map(|(_, p)| p.pgrp)
        .collect();
    assert!(
        !groups.is_empty() && groups.iter().all(|g| *g == moved.pid),
        "exactly the newer copy's group runs: {groups:?}"
    );
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_that_ended_here_runs_again_only_when_its_record_asks() {
    let cluster = TestCluster::builder().hosts(1).start().await;
    let agent = cluster.spawn(&["sleep", "1000"]).await;
    let agent = cluster
        .wait_state(&agent.id, AgentState::Running, Duration::from_secs(10))
        .await;
    let g = agent.generation;
    // A newer generation is recorded (elsewhere, in a history Redis then
    // lost): the host fences its copy, which ends without a recorded end.
    roll_back(&cluster, &agent.id, &[("generation", (g + 1).to_string())]).await;
    procfs::wait_gone(&agent.id, Duration::from_secs(10)).await;
    // And the host has dealt with its end (its write was refused: the
    // record names generation g+1), before the record rolls back.
    let id = agent.id.clone();
    agentplane_integration_tests::eventually(
        Duration::from_secs(10),
        "the host saw the end",
        || {
            let mut h = cluster.host_agent(0);
            let id = id.clone();
            async move {
                let agents = h
                    .list_agents(HostListAgentsRequest::default())
                    .await
                    .ok()?
                    .into_inner()
                    .agents;
                agents
                    .iter()
                    .any(|a| a.id == id && a.state() == AgentState::Exited)
                    .then_some(())
            }
        },
    )
    .await;
    // The record rolls back to PENDING at the generation that ended here.
    roll_back(
        &cluster,
        &agent.id,
        &[("generation", g.to_string()), ("state", "PENDING".into())],
    )
    .await;
    // The start the control plane retries (the sweep; here called at once)
    // runs it again: the record asks for it here.
    let spec = agent.spec.clone().expect("spec");
    let local = cluster
        .host_agent(0)
        .start_agent(StartAgentRequest {
            id: agent.id.clone(),
            generation: g,
            spec: Some(spec.clone()),
        })
        .await
        .expect("start")
        .into_inner();
    assert!(
        local.pid > 0 && local.pid != agent.pid,
        "a new run: {local:?}"
    );
    let running = cluster
        .wait_state(&agent.id, AgentState::Running, Duration::from_secs(10))
        .await;
    assert_eq!((running.generation, running.pid), (g, local.pid));
    assert!(procfs::is_alive(local.pid));

    // An agent whose run simply ended is never run again by a repeated start.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("runs");
    let once = cluster
        .spawn(&["sh", "-c", &format!("echo ran >> {}", file.display())])
        .await;
    let once = cluster
        .wait_state(&once.id, AgentState::Exited, Duration::from_secs(10))
        .await;
    let again = cluster
        .host_agent(0)
        .start_agent(StartAgentRequest {
            id: once.id.clone(),
            generation: once.generation,
            spec: once.spec.clone(),
        })
        .await
        .expect("a repeated start is answered")
        .into_inner();
    assert_eq!(again.pid, 0, "answered with the ended run: {again:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(std::fs::read_to_string(&file).expect("runs"), "ran\n");
    let record = cluster
        .client()
        .await
        .get_agent(GetAgentRequest {
            id: once.id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(record.state(), AgentState::Exited);
    cluster.finish().await;
}
