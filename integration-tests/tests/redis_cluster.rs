//! A local 3-master Redis Cluster (the harness for the Cluster work of P11)
//! and the premise of the planned key layout: keys under one hash tag go
//! in one script, today's layout (an agent's record beside the event
//! stream) is refused as CROSSSLOT, and 16 shard tags spread over every
//! master.

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
