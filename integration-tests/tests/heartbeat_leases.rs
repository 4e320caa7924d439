//! A heartbeat's leases and fencing read-back (`Registry::heartbeat`),
//! against a real redis-server and a real 3-master Redis Cluster: it sets
//! the lease of every agent it runs and sends back exactly the records
//! that do not name this host at the generation it runs (another host,
//! another generation, LOST, missing), the fencing's input.

use std::collections::BTreeMap;
use std::time::Duration;

use agentplane::proto::v1::{Agent, AgentSpec, AgentState};
use agentplane::registry::{HostRecord, RecordHead, Registry};
use agentplane_integration_tests::redis_cluster::RedisCluster;
use agentplane_integration_tests::RedisServer;

fn record(id: &str, host: &str, generation: u64, state: AgentState) -> Agent {
    Agent {
        id: id.to_owned(),
        spec: Some(AgentSpec {
            argv: vec!["true".into()],
            ..Default::default()
        }),
        state: state as i32,
        host: host.into(),
        generation,
        ..Default::default()
    }
}

/// The scenario, on `registry`; `conn` is a dedicated connection to it.
async fn leases_follow_the_records(registry: &Registry) {
    let ttl = Duration::from_secs(30);
    // Ids over many shards (on a Cluster): 10 of each kind.
    let mut running = Vec::new();
    let mut want: BTreeMap<String, Option<RecordHead>> = BTreeMap::new();
    let mut mine = Vec::new();
    for i in 0..10 {
        let (ok, other, newer, lost, gone) = (
            format!("ok{i}"),
            format!("other{i}"),
            format!("newer{i}"),
            format!("lost{i}"),
            format!("gone{i}"),
        );
        registry
            .create_agent(&record(&ok, "h1", 1, AgentState::Running))
            .await
            .expect("create");
        registry
            .create_agent(&record(&other, "h2", 1, AgentState::Running))
            .await
            .expect("create");
        registry
            .create_agent(&record(&newer, "h1", 2, AgentState::Running))
            .await
            .expect("create");
        registry
            .create_agent(&record(&lost, "h1", 1, AgentState::Lost))
            .await
            .expect("create");
        for id in [&ok, &other, &newer, &lost, &gone] {
            running.push((id.clone(), 1u64));
        }
        let head = |host: &str, generation, state| {
            Some(RecordHead {
                generation,
                host: host.into(),
                state: Some(state),
            })
        };
        want.insert(other.clone(), head("h2", 1, AgentState::Running));
        want.insert(newer.clone(), head("h1", 2, AgentState::Running));
        want.insert(lost.clone(), head("h1", 1, AgentState::Lost));
        want.insert(gone.clone(), None);
        mine.push((ok, other, newer, lost, gone));
    }
    let host = HostRecord {
        id: "h1".into(),
        address: "127.0.0.1:1".into(),
        capacity: 100,
        ..Default::default()
    };
    let mut conn = registry
        .dedicated_connection(Duration::from_secs(5))
        .await
        .expect("connect");
    let report = registry
        .heartbeat(&mut conn, &host, &running, ttl)
        .await
        .expect("beat");
    assert!(!report.existed, "the first beat finds no host key");
    let got: BTreeMap<String, Option<RecordHead>> = report.differing.into_iter().collect();
    assert_eq!(got, want, "exactly the records that do not name this run");
    for (ok, ..) in &mine {
        assert_eq!(
            registry.location(ok).await.expect("lease").as_deref(),
            Some("h1"),
            "{ok} renewed"
        );
    }
    let again = registry
        .heartbeat(&mut conn, &host, &running, ttl)
        .await
        .expect("beat");
    assert!(again.existed);
    assert_eq!(again.differing.len(), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_beat_reports_exactly_the_records_that_do_not_name_its_run_on_one_redis() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = RedisServer::start(dir.path(), &[]).await;
    let registry = Registry::new(&redis.url(), "ap").expect("registry");
    leases_follow_the_records(&registry).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_beat_reports_exactly_the_records_that_do_not_name_its_run_on_a_redis_cluster() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = RedisCluster::start(dir.path()).await;
    let registry = nodes.registry();
    leases_follow_the_records(&registry).await;
}
