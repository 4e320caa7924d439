//! The shape of the spawn path: what it asks Redis does not grow with the
//! fleet (no keyspace walk), the live-host index it reads instead of a
//! SCAN holds only hosts that are there, and the record it answers with
//! (built from the host's write, not read back) is the record in Redis.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use agentplane::proto::v1::{AgentSpec, AgentState, GetAgentRequest, SpawnAgentRequest};
use agentplane_integration_tests::TestCluster;

/// What a spawn costs in Redis calls must not depend on how many keys the
/// keyspace holds: with 5,000 unrelated keys (a day of request ids) and 40
/// spawns in flight, Redis sees no SCAN (nor KEYS) while they run. The
/// reconciler (which still walks the keyspace, [P11]) runs once at start
/// and not again for an hour, so every call counted is the spawn path's
/// or a heartbeat's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawns_walk_no_keyspace_whatever_it_holds() {
    let cluster = TestCluster::builder()
        .hosts(1)
        .reconcile_interval(Duration::from_secs(3600))
        .start()
        .await;
    cluster.wait_for_hosts(1).await;
    let mut conn = cluster.redis_conn().await;
    // One by one: on a Redis Cluster the keys are in many slots.
    for i in 0..5000 {
        redis::cmd("SET")
            .arg(cluster.keys().idem(&format!("filler-{i}")))
            .arg("x")
            .arg("EX")
            .arg(3600)
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
    }

    let before = cluster.command_calls().await;
    let started = Instant::now();
    let client = cluster.client().await;
    let spawns = (0..40).map(|i| {
        let mut c = client.clone();
        async move {
            c.spawn_agent(SpawnAgentRequest {
                spec: Some(AgentSpec {
                    argv: vec!["sleep".into(), "1000".into()],
                    // Named spawns take the name claim's path too.
                    name: if i % 2 == 0 {
                        format!("shape-{i}")
                    } else {
                        String::new()
                    },
                    ..Default::default()
                }),
                request_id: format!("shape-request-{i}"),
            })
            .await
            .unwrap_or_else(|s| panic!("spawn {i}: {s:?}"))
        }
    });
    futures::future::join_all(spawns).await;
    let took = started.elapsed();
    let after = cluster.command_calls().await;

    let grew =
        |cmd: &str| after.get(cmd).copied().unwrap_or(0) - before.get(cmd).copied().unwrap_or(0);
    assert_eq!(
        grew("scan"),
        0,
        "40 spawns walked the keyspace; calls before {before:?}, after {after:?}"
    );
    assert_eq!(grew("keys"), 0, "KEYS reached Redis");
    // Every spawn did reach Redis (the count above is not vacuous): each
    // record is created in one MULTI/EXEC.
    assert!(grew("exec") >= 40, "before {before:?}, after {after:?}");
    // Placement reads the live-host index once per 200 ms however many
    // spawns ask (control-plane/src/live_hosts.rs), not once per spawn.
    let reads = grew("smembers");
    let bound = 2 + took.as_millis() / 200;
    assert!(
        u128::from(reads) <= bound,
        "40 spawns in {took:?} read the live hosts {reads} times (at most {bound})"
    );
    cluster.finish().await;
}

/// A host that dies with no agent leaves `hosts-known` (the index
/// placement reads) once its key expires, with a HOST_LOST event; the
/// live host stays in it and still takes spawns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_gone_with_no_agents_leaves_the_live_host_index() {
    let mut cluster = TestCluster::builder()
        .hosts(2)
        .heartbeat_ttl(Duration::from_millis(1500))
        .start()
        .await;
    cluster.wait_for_hosts(2).await;
    let mut conn = cluster.redis_conn().await;
    let known = cluster.keys().hosts_known();
    let members = |conn: &mut agentplane::registry::Connection| {
        let (mut c, known) = (conn.clone(), known.clone());
        async move {
            redis::cmd("SMEMBERS")
                .arg(known)
                .query_async::<BTreeSet<String>>(&mut c)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        members(&mut conn).await,
        BTreeSet::from(["h1".into(), "h2".into()])
    );

    cluster.kill_machine("h2");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = members(&mut conn).await;
        if now == BTreeSet::from(["h1".to_owned()]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "h2 is still indexed 20 s after it died: {now:?}\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events = cluster.events().await;
    assert!(
        events.iter().any(|e| {
            e.get("type").map(String::as_str) == Some("HOST_LOST")
                && e.get("host").map(String::as_str) == Some("h2")
        }),
        "no HOST_LOST event for h2: {events:?}"
    );
    let a = cluster.spawn(&["sleep", "1000"]).await;
    assert_eq!(a.host, "h1");
    cluster.finish().await;
}

/// A spawn answers with the record as the host's start wrote it, built
/// from what the control plane and the host wrote rather than read back:
/// it must be the record Redis holds, field for field (a field the host
/// writes and the control plane forgets, or one it sets wrongly, fails
/// here), for agents started on either of two hosts and with labels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spawn_answers_with_the_record_in_redis() {
    let cluster = TestCluster::builder().hosts(2).start().await;
    cluster.wait_for_hosts(2).await;
    let mut client = cluster.client().await;
    let mut hosts = BTreeSet::new();
    for i in 0..6 {
        let answer = cluster
            .spawn_spec(AgentSpec {
                argv: vec!["sleep".into(), "1000".into()],
                labels: [("n".to_owned(), i.to_string())].into(),
                ..Default::default()
            })
            .await;
        assert_eq!(answer.state(), AgentState::Running, "{answer:?}");
        assert!(answer.pid > 0 && answer.started_at.is_some() && !answer.incarnation.is_empty());
        let record = client
            .get_agent(GetAgentRequest {
                id: answer.id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer, record, "the spawn's answer is not the record");
        hosts.insert(answer.host.clone());
    }
    assert_eq!(hosts.len(), 2, "placement spread the agents: {hosts:?}");
    cluster.finish().await;
}
