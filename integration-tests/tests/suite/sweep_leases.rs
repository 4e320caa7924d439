//! The record sweep's lease-first reads (`control-plane/src/sweep.rs`)
//! against a real redis-server: a lease that names a live host vouches for
//! its record, so a round reads the heads of about a quarter of a healthy
//! fleet (each record's once every `VOUCHED_READ_EVERY` rounds); and the lies
//! a live lease hides (an index entry whose record is gone, a record that
//! names a dead host while its lease names a live one) are still found
//! within `VOUCHED_READ_EVERY` rounds.

use std::time::Duration;

use agentplane::proto::v1::{Agent, AgentSpec, AgentState, ExitReason};
use agentplane::registry::Registry;
use agentplane_control_plane::sweep::VOUCHED_READ_EVERY;
use agentplane_integration_tests::sweep_harness::bare_host_sweep;
use agentplane_integration_tests::RedisServer;
use redis::AsyncCommands;

const RECORDS: usize = 400;

fn running(id: &str, host: &str) -> Agent {
    Agent {
        id: id.to_owned(),
        spec: Some(AgentSpec {
            argv: vec!["sleep".into(), "1000".into()],
            ..Default::default()
        }),
        state: AgentState::Running as i32,
        host: host.into(),
        generation: 1,
        ..Default::default()
    }
}

#[tokio::test]
async fn leases_vouch_for_most_records_and_the_lies_they_hide_are_found_within_four_rounds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = RedisServer::start(dir.path(), &[]).await;
    let registry = Registry::new(&redis.url(), "ap").expect("registry");
    let mut conn = redis.conn().await;
    let (live, mut sweep) = bare_host_sweep(&registry, &mut conn, "h1", Duration::from_secs(60))
        .await
        .expect("host and sweep");
    let lease = |id: &str| format!("ap:loc:{id}");
    for i in 0..RECORDS {
        let id = format!("a{i:04}");
        registry
            .create_agent(&running(&id, "h1"))
            .await
            .expect("create");
        let () = conn
            .pset_ex(lease(&id), "h1", 3_600_000)
            .await
            .expect("lease");
    }
    // A record gone (say, with a failover) whose index entry and lease
    // stayed; and a record naming a host that is gone while its lease
    // names a live one.
    let (ghost, liar) = ("ghost", "liar");
    registry
        .create_agent(&running(ghost, "h1"))
        .await
        .expect("create ghost");
    let () = conn.del(format!("ap:agent:{ghost}")).await.expect("del");
    registry
        .create_agent(&running(liar, "gone"))
        .await
        .expect("create liar");
    for id in [ghost, liar] {
        let () = conn
            .pset_ex(lease(id), "h1", 3_600_000)
            .await
            .expect("lease");
    }

    let mut heads_per_round = Vec::new();
    let mut acted = 0;
    for _ in 0..VOUCHED_READ_EVERY {
        let before = redis.command_calls().await;
        loop {
            let stats = sweep
                .pass(&live, &Default::default(), true, Duration::ZERO)
                .await
                .expect("pass");
            acted += stats.acted;
            if stats.wrapped {
                break;
            }
        }
        let after = redis.command_calls().await;
        let n = |c: &str| after.get(c).copied().unwrap_or(0) - before.get(c).copied().unwrap_or(0);
        assert!(
            n("get") >= RECORDS as u64,
            "every live record's lease is read each round: {} GETs",
            n("get")
        );
        heads_per_round.push(n("hmget"));
        // Whether a head's lease lives comes from the GET: only whole
        // reads (the liar, once LOST) ask again.
        assert!(n("exists") <= 2, "{} EXISTS in a round", n("exists"));
    }
    eprintln!("heads read per round: {heads_per_round:?}");
    // Each record's head once in VOUCHED_READ_EVERY rounds (plus the liar's
    // as a LOST record once it is), not each round's.
    let total: u64 = heads_per_round.iter().sum();
    assert!(
        (RECORDS as u64..=RECORDS as u64 + 8).contains(&total),
        "heads read over {VOUCHED_READ_EVERY} rounds: {total} for {RECORDS} records ({heads_per_round:?})"
    );
    for n in &heads_per_round {
        assert!(
            *n <= RECORDS as u64 / 2,
            "a round read {n} heads of {RECORDS} vouched records ({heads_per_round:?})"
        );
    }
    let in_index: Option<f64> = conn
        .zscore("ap:state:RUNNING", ghost)
        .await
        .expect("zscore");
    assert_eq!(in_index, None, "the ghost's index entry is dropped");
    let liar = registry.get_agent(liar).await.expect("get").expect("liar");
    assert_eq!(liar.state(), AgentState::Lost, "{liar:?}");
    assert_eq!(
        liar.exit.as_ref().map(|e| e.reason()),
        Some(ExitReason::HostLost)
    );
    assert_eq!(acted, 1, "only the liar was changed");
    let still: usize = conn.zcard("ap:state:RUNNING").await.expect("zcard");
    assert_eq!(still, RECORDS, "every vouched record is left RUNNING");
}
