//! The indexes beside the records (`ap:agents`, `ap:state:*`, `ap:label:*`,
//! `ap:hosts-lost`) follow every record write in the same step, are built
//! once from records written without them, and entries that outlived their
//! record are dropped; against a real redis-server.

use std::collections::HashMap;
use std::time::Duration;

use agentplane::proto::v1::{Agent, AgentSpec, AgentState};
use agentplane::registry::{AgentIndex, AgentUpdate, Expect, Registry, UpdateOutcome};
use agentplane_integration_tests::RedisServer;
use prost::Message;

fn record(id: &str, state: AgentState, labels: &[(&str, &str)]) -> Agent {
    Agent {
        id: id.to_owned(),
        spec: Some(AgentSpec {
            argv: vec!["true".into()],
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Default::default()
        }),
        state: state as i32,
        host: "h1".into(),
        generation: 1,
        ..Default::default()
    }
}

/// Every index key that holds `id`, read from Redis itself.
async fn indexes_of(conn: &mut redis::aio::MultiplexedConnection, id: &str) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    for pattern in ["ap:agents", "ap:state:*", "ap:label:*"] {
        let found: Vec<String> = redis::cmd("KEYS")
            .arg(pattern)
            .query_async(conn)
            .await
            .expect("KEYS (test only)");
        for key in found {
            let score: Option<f64> = redis::cmd("ZSCORE")
                .arg(&key)
                .arg(id)
                .query_async(conn)
                .await
                .expect("ZSCORE");
            if score.is_some() {
                keys.push(key);
            }
        }
    }
    keys.sort();
    keys
}

#[tokio::test]
async fn every_record_write_moves_its_index_entries_in_the_same_step() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = RedisServer::start(dir.path(), &[]).await;
    let registry = Registry::new(&redis.url(), "ap").expect("registry");
    let mut conn = redis.conn().await;

    let a = record("a1", AgentState::Pending, &[("team", "a"), ("tier", "web")]);
    registry.create_agent(&a).await.expect("create");
    assert_eq!(
        indexes_of(&mut conn, "a1").await,
        [
            "ap:agents",
            "ap:label:team=a",
            "ap:label:tier=web",
            "ap:state:PENDING"
        ]
    );

    // A state change moves the id between state indexes, with the record.
    let out = registry
        .update_agent(
            "a1",
            &Expect {
                generation: Some(1),
                ..Default::default()
            },
            &AgentUpdate {
                state: Some(AgentState::Running),
                ..Default::default()
            },
        )
        .await
        .expect("update");
    assert_eq!(out, UpdateOutcome::Applied);
    assert_eq!(
        indexes_of(&mut conn, "a1").await,
        [
            "ap:agents",
            "ap:label:team=a",
            "ap:label:tier=web",
            "ap:state:RUNNING"
        ]
    );
    // A write that changes no state (a pid) leaves them alone; a refused one too.
    registry
        .update_agent(
            "a1",
            &Expect::default(),
            &AgentUpdate {
                pid: Some(42),
                ..Default::default()
            },
        )
        .await
        .expect("update pid");
    let refused = registry
        .update_agent(
            "a1",
            &Expect {
                generation: Some(7),
                ..Default::default()
            },
            &AgentUpdate {
                state: Some(AgentState::Exited),
                ..Default::default()
            },
        )
        .await
        .expect("update");
    assert!(matches!(refused, UpdateOutcome::Conflict { .. }));
    assert!(indexes_of(&mut conn, "a1")
        .await
        .contains(&"ap:state:RUNNING".to_owned()));

    // A host agent writing its newer copy back (after a data loss) leaves
    // the id in its new state's index only.
    let mut newer = record("a1", AgentState::Paused, &[("team", "a"), ("tier", "web")]);
    newer.generation = 2;
    assert!(registry
        .rewrite_agent(&newer, Duration::from_secs(5))
        .await
        .expect("rewrite"));
    assert_eq!(
        indexes_of(&mut conn, "a1").await,
        [
            "ap:agents",
            "ap:label:team=a",
            "ap:label:tier=web",
            "ap:state:PAUSED"
        ]
    );

    // Pages read in id order, after the id given.
    for id in ["a0", "a2", "a3"] {
        registry
            .create_agent(&record(id, AgentState::Exited, &[("team", "b")]))
            .await
            .expect("create");
    }
    let page = |after: &'static str, n| {
        let registry = registry.clone();
        async move {
            registry
                .page_agent_ids(&AgentIndex::All, after, n)
                .await
                .expect("page")
        }
    };
    assert_eq!(page("", 2).await, ["a0", "a1"]);
    assert_eq!(page("a1", 2).await, ["a2", "a3"]);
    assert!(page("a3", 2).await.is_empty());
    let sizes = registry
        .index_sizes(&[
            AgentIndex::Label("team".into(), "b".into()),
            AgentIndex::State(AgentState::Paused),
            AgentIndex::Label("team".into(), "zzz".into()),
        ])
        .await
        .expect("sizes");
    assert_eq!(sizes, [3, 1, 0]);

    // Deleting takes the id out of every index.
    registry.delete_agent(&newer).await.expect("delete");
    assert!(indexes_of(&mut conn, "a1").await.is_empty());
    let left: Vec<String> = redis::cmd("KEYS")
        .arg("ap:label:t*")
        .query_async(&mut conn)
        .await
        .expect("KEYS");
    assert_eq!(left, ["ap:label:team=b"], "emptied indexes are gone");
}

#[tokio::test]
async fn indexes_are_built_once_from_records_without_them_and_stale_entries_go() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = RedisServer::start(dir.path(), &[]).await;
    let registry = Registry::new(&redis.url(), "ap").expect("registry");
    let mut conn = redis.conn().await;

    // Records as a version without indexes wrote them.
    for (id, state) in [("b1", "RUNNING"), ("b2", "EXITED")] {
        let spec = AgentSpec {
            argv: vec!["true".into()],
            labels: HashMap::from([("team".to_owned(), "x".to_owned())]),
            ..Default::default()
        };
        let fields: [(&str, Vec<u8>); 5] = [
            ("id", id.as_bytes().to_vec()),
            ("spec", spec.encode_to_vec()),
            ("state", state.as_bytes().to_vec()),
            ("host", b"h1".to_vec()),
            ("generation", b"1".to_vec()),
        ];
        redis::pipe()
            .hset_multiple(format!("ap:agent:{id}"), &fields)
            .query_async::<()>(&mut conn)
            .await
            .expect("plant");
    }
    // Host sets the previous version would have found by its walk: one of
    // a host neither live nor known (to settle), one of a known host.
    redis::pipe()
        .sadd("ap:host-agents:gone", "b9")
        .sadd("ap:host-agents:away", "b8")
        .sadd("ap:hosts-known", "away")
        .query_async::<()>(&mut conn)
        .await
        .expect("plant host sets");
    assert!(registry.build_indexes().await.expect("build"));
    let lost: Vec<String> = redis::cmd("SMEMBERS")
        .arg("ap:hosts-lost")
        .query_async(&mut conn)
        .await
        .expect("SMEMBERS");
    assert_eq!(lost, ["gone"], "only the unknown dead host is to settle");
    // A lost host leaves the set as back only while its key exists.
    assert!(!registry.host_back("gone").await.expect("back"));
    let _: () = redis::cmd("SET")
        .arg("ap:host:gone")
        .arg("x")
        .query_async(&mut conn)
        .await
        .expect("SET");
    assert!(registry.host_back("gone").await.expect("back"));
    assert_eq!(
        indexes_of(&mut conn, "b1").await,
        ["ap:agents", "ap:label:team=x", "ap:state:RUNNING"]
    );
    assert_eq!(
        indexes_of(&mut conn, "b2").await,
        ["ap:agents", "ap:label:team=x", "ap:state:EXITED"]
    );
    assert!(
        !registry.build_indexes().await.expect("build"),
        "built once per dataset"
    );

    // Entries that outlived their record, or a state index the record has
    // left, are dropped; right ones stay.
    redis::pipe()
        .del("ap:agent:b2")
        .zadd("ap:state:PAUSED", "b1", 0)
        .query_async::<()>(&mut conn)
        .await
        .expect("break the indexes");
    let ids = ["b1".to_owned(), "b2".to_owned()];
    assert_eq!(
        registry
            .drop_stale(&AgentIndex::All, &ids)
            .await
            .expect("drop"),
        1
    );
    assert_eq!(
        registry
            .drop_stale(&AgentIndex::State(AgentState::Paused), &ids)
            .await
            .expect("drop"),
        1
    );
    assert_eq!(
        registry
            .drop_stale(&AgentIndex::State(AgentState::Running), &ids)
            .await
            .expect("drop"),
        0
    );
    assert_eq!(
        indexes_of(&mut conn, "b1").await,
        ["ap:agents", "ap:label:team=x", "ap:state:RUNNING"]
    );
    assert_eq!(
        indexes_of(&mut conn, "b2").await,
        ["ap:label:team=x", "ap:state:EXITED"]
    );
}
