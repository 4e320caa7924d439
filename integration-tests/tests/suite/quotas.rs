//! Limits on a TLS cluster, set small: a server at `--max-streams`, or a
//! token at its cap on watch streams, follow streams or spawns, answers
//! RESOURCE_EXHAUSTED with the flag named; other tokens go on, and a closed
//! stream frees its place.

use std::time::Duration;

use agentplane::proto::v1::{AgentSpec, SpawnAgentRequest, StreamLogsRequest, WatchAgentsRequest};
use agentplane_integration_tests::{eventually, TestCluster};
use tonic::Code;

fn sleeper() -> SpawnAgentRequest {
    SpawnAgentRequest {
        spec: Some(AgentSpec {
            argv: vec!["sleep".into(), "100".into()],
            ..Default::default()
        }),
        request_id: String::new(),
    }
}

fn assert_exhausted(e: &tonic::Status, flag: &str) {
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains(flag), "names {flag}: {}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_at_its_limits_is_refused_and_others_are_not() {
    let cluster = TestCluster::builder()
        .hosts(1)
        .tls()
        .control_plane_arg("--max-watches-per-token")
        .control_plane_arg("2")
        .control_plane_arg("--max-follows-per-token")
        .control_plane_arg("1")
        // A rate so slow that no refill happens during the test.
        .control_plane_arg("--spawn-rate-per-token")
        .control_plane_arg("0.001")
        .control_plane_arg("--spawn-burst-per-token")
        .control_plane_arg("3")
        .start()
        .await;

    // Spawns: the operator's burst of 3, then refused; the admin goes on.
    let mut operator = cluster.client_with_token(Some("operator-token"));
    let mut ids = Vec::new();
    for _ in 0..3 {
        let a = operator
            .spawn_agent(sleeper())
            .await
            .expect("within the burst")
            .into_inner()
            .agent
            .expect("agent");
        ids.push(a.id);
    }
    let e = operator.spawn_agent(sleeper()).await.expect_err("past it");
    assert_exhausted(&e, "--spawn-rate-per-token");
    let mut admin = cluster.client_with_token(Some("admin-token"));
    admin
        .spawn_agent(sleeper())
        .await
        .expect("another token has its own bucket");

    // Watches: two open, the third refused; the viewer's are its own.
    let watch = WatchAgentsRequest::default();
    let w1 = operator.watch_agents(watch.clone()).await.expect("first");
    let _w2 = operator.watch_agents(watch.clone()).await.expect("second");
    let e = operator
        .watch_agents(watch.clone())
        .await
        .expect_err("third");
    assert_exhausted(&e, "--max-watches-per-token");
    let mut viewer = cluster.client_with_token(Some("viewer-token"));
    let _v = viewer
        .watch_agents(watch.clone())
        .await
        .expect("the viewer's first");
    // Closing one frees its place (the server sees the stream end).
    drop(w1);
    eventually(Duration::from_secs(10), "a freed watch place", || {
        let mut c = operator.clone();
        let w = watch.clone();
        async move { c.watch_agents(w).await.ok().map(drop) }
    })
    .await;

    // Follows: one open, a second refused; a plain read still works.
    let id = ids[0].clone();
    cluster
        .wait_state(
            &id,
            agentplane::proto::v1::AgentState::Running,
            Duration::from_secs(10),
        )
        .await;
    let follow = StreamLogsRequest {
        id: id.clone(),
        follow: true,
        ..Default::default()
    };
    let _f = operator
        .stream_logs(follow.clone())
        .await
        .expect("first follow");
    let e = operator
        .stream_logs(follow.clone())
        .await
        .expect_err("second follow");
    assert_exhausted(&e, "--max-follows-per-token");
    operator
        .stream_logs(StreamLogsRequest {
            id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("a read that ends by itself is not a follow");
    admin
        .stream_logs(follow)
        .await
        .expect("the admin's follow is its own");
}

/// `--max-streams`: a server holds at most that many requests and streams
/// open at once; past it, RESOURCE_EXHAUSTED naming the flag, and a closed
/// stream frees its place. Calls that need no token (health) have places
/// of their own, so a flood of them (a health Watch anyone may hold) takes
/// none from callers with a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_holds_at_most_max_streams_open_and_health_floods_take_none() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let cluster = TestCluster::builder()
        .hosts(1)
        .tls()
        .control_plane_arg("--max-streams")
        .control_plane_arg("4")
        .start()
        .await;
    let mut admin = cluster.client().await;
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = admin
            .watch_agents(WatchAgentsRequest::default())
            .await
            .expect("a place")
            .into_inner();
        s.message().await.expect("the first event (a bookmark)");
        held.push(s);
    }
    let e = admin
        .list_agents(agentplane::proto::v1::ListAgentsRequest::default())
        .await
        .expect_err("past the cap");
    assert_exhausted(&e, "--max-streams");

    // Health has its own places: it answers while the others are full, and
    // a flood of health watches is capped apart.
    let mut health = HealthClient::new(cluster.connect(0).await.expect("connect"));
    let mut flood = Vec::new();
    let refused = loop {
        match health.watch(HealthCheckRequest::default()).await {
            Ok(s) => flood.push(s.into_inner()),
            Err(e) => break e,
        }
        assert!(flood.len() <= 10_000, "health watches are never capped");
    };
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        flood.len() >= 100,
        "the health cap is not the main one: {}",
        flood.len()
    );
    // With the health flood still held, a freed place goes to a caller
    // with a token.
    held.pop();
    eventually(Duration::from_secs(10), "a freed place", || {
        let mut c = admin.clone();
        async move {
            c.list_agents(agentplane::proto::v1::ListAgentsRequest::default())
                .await
                .ok()
                .map(drop)
        }
    })
    .await;
    drop(flood);
}
