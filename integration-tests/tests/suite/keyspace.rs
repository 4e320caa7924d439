//! No spawn, list or reconciler pass walks the keyspace: the Redis calls of
//! 1,000 spawns (with the passes that run meanwhile and a few listings) are
//! the same on an empty registry and beside 10,000 other records and
//! 20,000 request ids, as `INFO commandstats` counts them.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use agentplane::proto::v1::{AgentSpec, AgentState, ListAgentsRequest, SpawnAgentRequest};
use agentplane_integration_tests::TestCluster;

const SPAWNS: usize = 1000;

/// What Redis was asked during the spawns, by command, beside `fleet`
/// other records.
async fn calls_with_fleet(fleet: usize) -> BTreeMap<String, u64> {
    // One server's command counts, beside records of the flat layout.
    let cluster = TestCluster::builder()
        .single_redis()
        .max_agents(u32::try_from(SPAWNS).expect("fits") + 10)
        .reconcile_interval(Duration::from_millis(200))
        .start()
        .await;
    let mut conn = cluster.redis.conn().await;
    // The one walk left (building the indexes of a dataset that has none)
    // is over before counting starts.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let built: bool = redis::cmd("EXISTS")
            .arg("ap:index-version")
            .query_async(&mut conn)
            .await
            .expect("EXISTS");
        if built {
            break;
        }
        assert!(Instant::now() < deadline, "indexes never built");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agentplane_integration_tests::bench::fill_other_records(&mut conn, "ap", fleet)
        .await
        .expect("fill records");
    for chunk in 0..(2 * fleet).div_ceil(1000) {
        let mut pipe = redis::pipe();
        for i in chunk * 1000..((chunk + 1) * 1000).min(2 * fleet) {
            pipe.pset_ex(format!("ap:idem:req-{i}"), format!("{i:026}"), 86_400_000)
                .ignore();
        }
        pipe.query_async::<()>(&mut conn)
            .await
            .expect("fill request ids");
    }
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .expect("RESETSTAT");

    let client = cluster.client().await;
    let spawned =
        agentplane_integration_tests::bench::spawn_concurrently(&client, SPAWNS, 16, |i| {
            SpawnAgentRequest {
                spec: Some(AgentSpec {
                    argv: vec!["sleep".into(), "1000".into()],
                    labels: [("batch".to_owned(), (i % 10).to_string())].into(),
                    ..Default::default()
                }),
                request_id: format!("spawn-{i}"),
            }
        })
        .await;
    for r in &spawned {
        assert!(r.is_ok(), "spawn failed: {r:?}");
    }
    // Listings of every kind: all, by state, by label, by both.
    let mut client = client.clone();
    for (state, selector) in [
        (AgentState::Unspecified, ""),
        (AgentState::Running, ""),
        (AgentState::Unspecified, "batch=3"),
        (AgentState::Running, "batch=3"),
    ] {
        let page = client
            .list_agents(ListAgentsRequest {
                state: state as i32,
                label_selector: selector.into(),
                page_size: 100,
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner();
        assert_eq!(page.agents.len(), 100, "{state:?} {selector}");
    }
    let calls = cluster.redis.command_calls().await;
    cluster.finish().await;
    calls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_calls_of_a_thousand_spawns_do_not_grow_with_the_fleet() {
    let empty = calls_with_fleet(0).await;
    let fleet = calls_with_fleet(10_000).await;
    let get = |m: &BTreeMap<String, u64>, c: &str| m.get(c).copied().unwrap_or(0);
    for cmd in ["scan", "sscan", "keys"] {
        println!(
            "{cmd}: {} calls on an empty registry, {} beside 10,000 records",
            get(&empty, cmd),
            get(&fleet, cmd)
        );
    }
    let total = |m: &BTreeMap<String, u64>| m.values().sum::<u64>();
    println!(
        "all commands per spawn: {:.2} empty, {:.2} beside 10,000 records",
        total(&empty) as f64 / SPAWNS as f64,
        total(&fleet) as f64 / SPAWNS as f64
    );
    assert_eq!(
        get(&empty, "scan"),
        get(&fleet, "scan"),
        "SCAN calls grew with the fleet: {fleet:?}"
    );
    assert_eq!(get(&fleet, "keys"), 0);
    assert_eq!(get(&fleet, "scan"), 0, "no keyspace walk at all: {fleet:?}");
}

/// What replaced the walk of every host's agent set: a host declared lost
/// joins `ap:hosts-lost` in the same step, and a pass settles its agents
/// (LOST with HOST_LOST) and only then takes it out, so a replica that died
/// half-way leaves the rest to the next pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_left_half_settled_in_the_lost_hosts_is_settled_by_the_next_pass() {
    let cluster = TestCluster::builder()
        .reconcile_interval(Duration::from_millis(200))
        .start()
        .await;
    let mut conn = cluster.redis_conn().await;
    let k = cluster.keys();
    // A record left RUNNING on host `gone`, which a replica declared lost
    // (no longer known, in the lost hosts) before it died.
    let id = agentplane::ids::new_agent_id();
    let spec = prost::Message::encode_to_vec(&AgentSpec {
        argv: vec!["sleep".into(), "1000".into()],
        ..Default::default()
    });
    let fields: [(&str, Vec<u8>); 6] = [
        ("id", id.clone().into_bytes()),
        ("spec", spec),
        ("state", b"RUNNING".to_vec()),
        ("host", b"gone".to_vec()),
        ("pid", b"4242".to_vec()),
        ("generation", b"1".to_vec()),
    ];
    let shard = k.shard_of(&id);
    redis::pipe()
        .atomic()
        .hset_multiple(k.agent(&id), &fields)
        .ignore()
        .sadd(k.host_agents(shard, "gone"), &id)
        .ignore()
        .zadd(k.agents_index(shard), &id, 0)
        .ignore()
        .zadd(k.state_index(shard, "RUNNING"), &id, 0)
        .ignore()
        .query_async::<()>(&mut conn)
        .await
        .expect("plant");
    redis::cmd("SADD")
        .arg(k.hosts_lost())
        .arg("gone")
        .query_async::<()>(&mut conn)
        .await
        .expect("plant");
    let lost = cluster
        .wait_agent(&id, "is LOST", Duration::from_secs(10), |a| {
            a.state() == AgentState::Lost
        })
        .await;
    assert_eq!(
        lost.exit
            .as_ref()
            .map(|e| agentplane::state::reason_name(e.reason())),
        Some("HOST_LOST"),
        "{lost:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: bool = redis::cmd("SISMEMBER")
            .arg(k.hosts_lost())
            .arg("gone")
            .query_async(&mut conn)
            .await
            .expect("SISMEMBER");
        if !left {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the host stayed in ap:hosts-lost"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.finish().await;
}
