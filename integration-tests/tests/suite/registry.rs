//! The registry enforces the state machine (`agentplane::state::may_move`) on
//! every record write, against a real redis-server: an illegal move is never
//! written, whatever the writer expected.

use agentplane::proto::v1::{Agent, AgentSpec, AgentState};
use agentplane::registry::{AgentUpdate, Expect, Registry, RegistryError, UpdateOutcome};
use agentplane_integration_tests::RedisServer;

fn record(id: &str, state: AgentState) -> Agent {
    Agent {
        id: id.to_owned(),
        spec: Some(AgentSpec {
            argv: vec!["true".into()],
            ..Default::default()
        }),
        state: state as i32,
        host: "h1".into(),
        generation: 1,
        ..Default::default()
    }
}

fn to(state: AgentState) -> AgentUpdate {
    AgentUpdate {
        state: Some(state),
        ..Default::default()
    }
}

fn any() -> Expect {
    Expect {
        generation: Some(1),
        host: Some("h1".into()),
        states: Vec::new(),
    }
}

#[tokio::test]
async fn an_illegal_move_is_never_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = RedisServer::start(dir.path(), &[]).await;
    let registry = Registry::new(&redis.url(), "ap").expect("registry");
    let state_of = |id: &'static str| {
        let registry = registry.clone();
        async move {
            registry
                .get_agent(id)
                .await
                .expect("get")
                .expect("record")
                .state()
        }
    };

    // An ended record cannot run again: "any state" means any state the
    // table allows, so the write finds the record in none of them.
    registry
        .create_agent(&record("ended", AgentState::Exited))
        .await
        .expect("create");
    let outcome = registry
        .update_agent("ended", &any(), &to(AgentState::Running))
        .await
        .expect("update");
    assert!(
        matches!(
            outcome,
            UpdateOutcome::Conflict {
                state: Some(AgentState::Exited),
                ..
            }
        ),
        "EXITED -> RUNNING was not refused: {outcome:?}"
    );
    assert_eq!(state_of("ended").await, AgentState::Exited);

    // Expecting only states the move cannot start from is a caller's bug,
    // reported as such and not written.
    let err = registry
        .update_agent(
            "ended",
            &Expect {
                states: vec![AgentState::Exited, AgentState::Failed],
                ..any()
            },
            &to(AgentState::Pending),
        )
        .await
        .expect_err("an impossible expectation must be an error");
    assert!(
        matches!(err, RegistryError::IllegalMove { to: "PENDING", .. }),
        "{err}"
    );
    assert_eq!(state_of("ended").await, AgentState::Exited);

    // A stop only ends: STOPPING -> RUNNING is refused even when the writer
    // names STOPPING among the states it expects.
    registry
        .create_agent(&record("stopping", AgentState::Stopping))
        .await
        .expect("create");
    let outcome = registry
        .update_agent(
            "stopping",
            &Expect {
                states: vec![AgentState::Paused, AgentState::Stopping],
                ..any()
            },
            &to(AgentState::Running),
        )
        .await
        .expect("update");
    assert!(
        matches!(outcome, UpdateOutcome::Conflict { .. }),
        "{outcome:?}"
    );
    assert_eq!(state_of("stopping").await, AgentState::Stopping);

    // Legal moves and plain field writes still apply.
    let outcome = registry
        .update_agent("stopping", &any(), &to(AgentState::Exited))
        .await
        .expect("update");
    assert_eq!(outcome, UpdateOutcome::Applied);
    assert_eq!(state_of("stopping").await, AgentState::Exited);
    let outcome = registry
        .update_agent(
            "ended",
            &any(),
            &AgentUpdate {
                idle: Some(true),
                ..Default::default()
            },
        )
        .await
        .expect("update");
    assert_eq!(outcome, UpdateOutcome::Applied);
}

#[tokio::test]
async fn a_write_back_never_replaces_a_newer_generation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = RedisServer::start(dir.path(), &[]).await;
    let registry = Registry::new(&redis.url(), "ap").expect("registry");
    let ttl = std::time::Duration::from_secs(10);
    let at = |host: &str, generation: u64| Agent {
        host: host.into(),
        generation,
        ..record("a1", AgentState::Running)
    };
    // Nothing there (Redis lost its data): written.
    assert!(registry
        .rewrite_agent(&at("h1", 5), ttl)
        .await
        .expect("rewrite"));
    // An older copy writing back after it: refused.
    assert!(!registry
        .rewrite_agent(&at("h2", 4), ttl)
        .await
        .expect("rewrite"));
    assert!(!registry
        .rewrite_agent(&at("h2", 5), ttl)
        .await
        .expect("rewrite"));
    let a = registry
        .get_agent("a1")
        .await
        .expect("get")
        .expect("record");
    assert_eq!((a.host.as_str(), a.generation), ("h1", 5));
    // A newer one: written, and the host sets and the lease follow it.
    assert!(registry
        .rewrite_agent(&at("h2", 6), ttl)
        .await
        .expect("rewrite"));
    let a = registry
        .get_agent("a1")
        .await
        .expect("get")
        .expect("record");
    assert_eq!((a.host.as_str(), a.generation), ("h2", 6));
    assert_eq!(
        registry.location("a1").await.expect("loc").as_deref(),
        Some("h2")
    );
    let mut conn = redis.conn().await;
    let on_h1: Vec<String> = redis::cmd("SMEMBERS")
        .arg("ap:host-agents:h1")
        .query_async(&mut conn)
        .await
        .expect("SMEMBERS");
    let on_h2: Vec<String> = redis::cmd("SMEMBERS")
        .arg("ap:host-agents:h2")
        .query_async(&mut conn)
        .await
        .expect("SMEMBERS");
    assert!(on_h1.is_empty(), "{on_h1:?}");
    assert_eq!(on_h2, ["a1"]);
}

/// `list_hosts` reads host records in pipelines of `HOSTS_PER_READ`: every
/// live host comes back once, sorted, across the reads' boundaries, and a
/// host whose key is gone is skipped.
#[tokio::test]
async fn listing_more_hosts_than_one_read_holds_returns_each_live_host_once_in_order() {
    use agentplane::registry::{FencingMemory, HostRecord, HOSTS_PER_READ};
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = RedisServer::start(dir.path(), &[]).await;
    let registry = Registry::new(&redis.url(), "ap").expect("registry");
    let mut conn = registry
        .dedicated_connection(std::time::Duration::from_secs(5))
        .await
        .expect("connection");
    let n = 2 * HOSTS_PER_READ + 50;
    // Registered in reverse order: the listing sorts.
    for i in (0..n).rev() {
        let host = HostRecord {
            id: format!("h{i:04}"),
            address: format!("127.0.0.1:{}", 10_000 + i),
            capacity: 4,
            ..Default::default()
        };
        registry
            .heartbeat(
                &mut conn,
                &host,
                &[],
                std::time::Duration::from_secs(60),
                &mut FencingMemory::default(),
            )
            .await
            .expect("heartbeat");
    }
    let mut redis_conn = redis.conn().await;
    let gone = format!("h{:04}", HOSTS_PER_READ);
    let _: () = redis::cmd("DEL")
        .arg(registry.keys().host(&gone))
        .query_async(&mut redis_conn)
        .await
        .expect("DEL");
    let listed: Vec<String> = registry
        .list_hosts()
        .await
        .expect("list hosts")
        .into_iter()
        .map(|h| h.id)
        .collect();
    let expected: Vec<String> = (0..n)
        .map(|i| format!("h{i:04}"))
        .filter(|id| *id != gone)
        .collect();
    assert_eq!(listed, expected);
}
