//! A local 3-master Redis Cluster (the harness for the Cluster work of P11)
//! and the premise of the planned key layout: keys under one hash tag go
//! in one script, today's layout (an agent's record beside the event
//! stream) is refused as CROSSSLOT, and 16 shard tags spread over every
//! master. And the servers on such a cluster, seen through the API.

use std::collections::HashSet;

use agentplane_integration_tests::redis_cluster::RedisCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_master_cluster_takes_one_slot_scripts_and_refuses_cross_slot_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = RedisCluster::start(dir.path()).await;
    assert_eq!(cluster.running(), 3);
    let client = redis::cluster::ClusterClient::new(cluster.urls()).expect("cluster client");
    let mut c = client.get_async_connection().await.expect("connect");

    let script = redis::Script::new(
        r"
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], 0, ARGV[1])
return redis.call('ZCARD', KEYS[2])
",
    );
    let n: i64 = script
        .key("ap:{s3}:agent:a1")
        .key("ap:{s3}:state:RUNNING")
        .arg("a1")
        .invoke_async(&mut c)
        .await
        .expect("a script on one shard's keys");
    assert_eq!(n, 1);
    let refused = script
        .key("ap:agent:a1")
        .key("ap:events")
        .arg("a1")
        .invoke_async::<i64>(&mut c)
        .await
        .expect_err("today's keys are in two slots");
    assert!(
        refused.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::CrossSlot)
            || refused.to_string().contains("CROSSSLOT"),
        "{refused}"
    );

    // Which master serves each of 16 shard tags: all three serve some.
    let slots: Vec<(i64, i64, Vec<redis::Value>)> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut c)
        .await
        .expect("CLUSTER SLOTS");
    let mut masters = HashSet::new();
    for s in 0..16 {
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(format!("ap:{{s{s}}}:agent:x"))
            .query_async(&mut c)
            .await
            .expect("CLUSTER KEYSLOT");
        let owner = slots
            .iter()
            .position(|(from, to, _)| (*from..=*to).contains(&slot))
            .expect("every slot is served");
        masters.insert(owner);
    }
    assert_eq!(masters.len(), 3, "16 shards spread over every master");
}

/// The servers on a Redis Cluster (`--redis-cluster`, whatever the suite's
/// mode): agents spread over every master, and listing (paged across the
/// shards), selecting by label, locating, watching (a token per stream,
/// resumable) and deleting see each of them exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_on_a_redis_cluster_spread_over_every_master_and_the_api_sees_each_once() {
    use agentplane::proto::v1::{
        AgentState, DeleteAgentRequest, EventType, ListAgentsRequest, LocateAgentRequest,
        StopAgentRequest, WatchAgentsRequest,
    };
    use agentplane_integration_tests::{spec, TestCluster};
    use std::time::Duration;

    let cluster = TestCluster::builder()
        .redis_cluster()
        .hosts(2)
        .start()
        .await;
    assert!(cluster.on_redis_cluster());
    let mut c = cluster.client().await;
    let mut watch = c
        .watch_agents(WatchAgentsRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let from_now = watch.message().await.expect("bookmark").expect("bookmark");
    assert_eq!(from_now.r#type(), EventType::Bookmark);
    assert_eq!(from_now.token.split(',').count(), 17, "{}", from_now.token);

    let mut ids = Vec::new();
    for i in 0..40 {
        let mut s = spec(&["sleep", "1000"], None);
        if i % 2 == 0 {
            s.labels.insert("team".into(), "a".into());
        }
        ids.push(cluster.spawn_spec(s).await.id);
    }
    ids.sort();

    // Every master holds some of them.
    let mut conn = cluster.redis_conn().await;
    let slots: Vec<(i64, i64, Vec<redis::Value>)> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut conn)
        .await
        .expect("CLUSTER SLOTS");
    let mut masters = HashSet::new();
    for id in &ids {
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(cluster.keys().agent(id))
            .query_async(&mut conn)
            .await
            .expect("CLUSTER KEYSLOT");
        masters.insert(
            slots
                .iter()
                .position(|(from, to, _)| (*from..=*to).contains(&slot))
                .expect("served"),
        );
    }
    assert_eq!(masters.len(), 3, "40 agents over all three masters");

    // Pages of 7 across 16 shards: each id once, in id order.
    let (mut listed, mut token) = (Vec::new(), String::new());
    loop {
        let page = c
            .list_agents(ListAgentsRequest {
                page_size: 7,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner();
        listed.extend(page.agents.into_iter().map(|a| a.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(listed, ids, "every agent once, in id order");
    let team = c
        .list_agents(ListAgentsRequest {
            label_selector: "team=a".into(),
            page_size: 100,
            ..Default::default()
        })
        .await
        .expect("list by label")
        .into_inner();
    assert_eq!(team.agents.len(), 20);

    for id in &ids {
        let loc = c
            .locate_agent(LocateAgentRequest { id: id.clone() })
            .await
            .expect("locate")
            .into_inner();
        assert!(loc.live && !loc.address.is_empty(), "{loc:?}");
    }

    // The watch saw each creation once; a watch resumed from its first
    // event's token sees the other 39.
    let mut created = Vec::new();
    let mut first_token = None;
    while created.len() < 40 {
        let ev = tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await
            .expect("events within 10s")
            .expect("watch")
            .expect("open");
        if ev.r#type() == EventType::AgentCreated {
            first_token.get_or_insert(ev.token.clone());
            created.push(ev.agent_id);
        }
    }
    let created_first = created[0].clone();
    created.sort();
    assert_eq!(created, ids);
    let mut resumed = c
        .watch_agents(WatchAgentsRequest {
            resume_token: first_token.expect("a token"),
            agent_id: String::new(),
        })
        .await
        .expect("resume")
        .into_inner();
    let mut again = HashSet::new();
    while again.len() < 39 {
        let ev = tokio::time::timeout(Duration::from_secs(10), resumed.message())
            .await
            .expect("events within 10s")
            .expect("watch")
            .expect("open");
        if ev.r#type() == EventType::AgentCreated {
            assert_ne!(ev.agent_id, created_first, "the resumed event again");
            assert!(again.insert(ev.agent_id.clone()), "{} twice", ev.agent_id);
        }
    }

    let gone = ids[0].clone();
    c.stop_agent(StopAgentRequest {
        id: gone.clone(),
        ..Default::default()
    })
    .await
    .expect("stop");
    cluster
        .wait_state(&gone, AgentState::Exited, Duration::from_secs(10))
        .await;
    c.delete_agent(DeleteAgentRequest {
        id: gone.clone(),
        ..Default::default()
    })
    .await
    .expect("delete");
    let left = c
        .list_agents(ListAgentsRequest {
            page_size: 100,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(left.agents.len(), 39);
    assert!(left.agents.iter().all(|a| a.id != gone));
    cluster.finish().await;
}

/// `ls --host` on a Redis Cluster walks the host's set in every shard in
/// turn, the shard in the cursor's top bits: 3000 ids (sets big enough
/// that SSCAN pages within a shard) come back once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hosts_agents_are_walked_shard_by_shard_each_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = RedisCluster::start(dir.path()).await;
    let registry = nodes.registry();
    let keys = registry.keys().clone();
    let mut conn = nodes.conn().await;
    let mut ids: Vec<String> = (0..3000).map(|i| format!("agent-{i:05}")).collect();
    for id in &ids {
        redis::cmd("SADD")
            .arg(keys.host_agents(keys.shard_of(id), "h1"))
            .arg(id)
            .query_async::<()>(&mut conn)
            .await
            .expect("SADD");
    }
    let (mut seen, mut cursor, mut paged_within_a_shard) = (Vec::new(), 0u64, false);
    loop {
        let (next, batch) = registry
            .scan_host_agent_ids("h1", cursor, 100)
            .await
            .expect("scan");
        seen.extend(batch);
        if next == 0 {
            break;
        }
        paged_within_a_shard |= next >> 48 > 0 && next & ((1 << 48) - 1) != 0;
        cursor = next;
    }
    seen.sort();
    ids.sort();
    assert_eq!(seen, ids, "every id once");
    assert!(paged_within_a_shard, "a cursor inside a later shard's set");
}
