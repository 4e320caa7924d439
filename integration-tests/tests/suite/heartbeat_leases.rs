//! A heartbeat's leases and fencing read-back (`Registry::heartbeat`),
//! against a real redis-server and a real 3-master Redis Cluster: it sets
//! the lease of every agent it runs and sends back exactly the records
//! that do not name this host at the generation it runs (another host,
//! another generation, LOST, missing), the fencing's input; heads are read
//! again only after a write that can change them (the host revision) or
//! every `FULL_READ_EVERY` beats (a share of them at each beat); each lease is extended every
//! `LEASE_RENEW_EVERY`th beat and lives as many host TTLs.

use std::collections::BTreeMap;
use std::time::Duration;

use agentplane::proto::v1::{Agent, AgentSpec, AgentState, ExitReason};
use agentplane::registry::{
    AgentUpdate, Expect, FencingMemory, HostRecord, RecordHead, Registry, UpdateOutcome,
    FULL_READ_EVERY, LEASE_RENEW_EVERY,
};
use agentplane_integration_tests::parse_command_calls;
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

/// The Redis a scenario runs on, for its command counts.
enum Backend<'a> {
    One(&'a RedisServer),
    Cluster(&'a RedisCluster),
}

impl Backend<'_> {
    /// `HMGET` calls so far (every node's, on a Cluster): the head reads.
    async fn head_reads(&self) -> u64 {
        self.calls("hmget").await
    }

    /// `PEXPIRE` calls so far: the lease extensions and host key TTLs.
    async fn extends(&self) -> u64 {
        self.calls("pexpire").await
    }

    /// Calls of `command` so far (every node's, on a Cluster).
    async fn calls(&self, command: &str) -> u64 {
        let stats = match self {
            Backend::One(r) => r.commandstats().await,
            Backend::Cluster(c) => c.commandstats().await,
        };
        parse_command_calls(&stats)
            .get(command)
            .copied()
            .unwrap_or(0)
    }

    /// A key's time to live, ms (`PTTL`).
    async fn pttl(&self, key: &str) -> i64 {
        let pttl = redis::cmd("PTTL").arg(key).clone();
        match self {
            Backend::One(r) => pttl.query_async(&mut r.conn().await).await,
            Backend::Cluster(c) => pttl.query_async(&mut c.conn().await).await,
        }
        .expect("PTTL")
    }
}

/// One host's beats, for the scenario.
struct Beat<'a> {
    registry: &'a Registry,
    conn: &'a mut agentplane::registry::Connection,
    host: &'a HostRecord,
    ttl: Duration,
}

impl Beat<'_> {
    /// A beat of `running`: the records it reports as differing.
    async fn run(
        &mut self,
        memory: &mut FencingMemory,
        running: &[(String, u64)],
    ) -> BTreeMap<String, Option<RecordHead>> {
        self.registry
            .heartbeat(self.conn, self.host, running, self.ttl, memory)
            .await
            .expect("beat")
            .differing
            .into_iter()
            .collect()
    }
}

/// The scenario, on `registry`, served by `backend`.
async fn leases_follow_the_records(registry: &Registry, backend: Backend<'_>) {
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
    // As a host agent does on a Redis without one (a beat that reads no
    // epoch reads every head).
    registry.ensure_epoch().await.expect("epoch");
    let mut memory = FencingMemory::default();
    let report = registry
        .heartbeat(&mut conn, &host, &running, ttl, &mut memory)
        .await
        .expect("beat");
    assert!(!report.existed, "the first beat finds no host key");
    let got: BTreeMap<String, Option<RecordHead>> = report.differing.into_iter().collect();
    assert_eq!(got, want, "exactly the records that do not name this run");
    for (ok, other, ..) in &mine {
        assert_eq!(
            registry.location(ok).await.expect("lease").as_deref(),
            Some("h1"),
            "{ok} renewed"
        );
        assert_eq!(
            registry.location(other).await.expect("lease"),
            None,
            "a copy that is not its record's never writes {other}'s lease"
        );
    }
    let again = registry
        .heartbeat(&mut conn, &host, &running, ttl, &mut memory)
        .await
        .expect("beat");
    assert!(again.existed);
    assert_eq!(
        again.differing.len(),
        40,
        "differing records are read every beat"
    );
    assert_eq!(memory.verified(), 10);

    // From here the host runs only the agents whose records name it (the
    // others were fenced): while no record changes, no head is read.
    let ok: Vec<(String, u64)> = mine.iter().map(|(ok, ..)| (ok.clone(), 1)).collect();
    let mut beat = Beat {
        registry,
        conn: &mut conn,
        host: &host,
        ttl,
    };
    // Only the heads due for their periodic read at this (the third)
    // beat: each id's every FULL_READ_EVERYth beat, at a phase that is the
    // sum of its bytes.
    let due = ok
        .iter()
        .filter(|(id, _)| {
            (2 + id.bytes().map(u64::from).sum::<u64>()).is_multiple_of(FULL_READ_EVERY)
        })
        .count();
    assert!(due < ok.len() / 2, "a few due: {due}");
    let before = backend.head_reads().await;
    assert!(beat.run(&mut memory, &ok).await.is_empty());
    assert_eq!(
        backend.head_reads().await - before,
        due as u64,
        "a beat after an unchanged one reads only the heads due"
    );

    // A relocation, a LOST mark and a delete, each seen at the next beat
    // (beats 4, 5 and 6), not at its record's periodic read.
    let head = |host: &str, generation, state| {
        Some(RecordHead {
            generation,
            host: host.into(),
            state: Some(state),
        })
    };
    let (moved, lost, deleted) = (&ok[0].0, &ok[1].0, &ok[2].0);
    let outcome = registry
        .update_agent(
            moved,
            &Expect {
                generation: Some(1),
                host: Some("h1".into()),
                states: Vec::new(),
            },
            &AgentUpdate {
                host: Some("h2".into()),
                generation: Some(2),
                ..Default::default()
            },
        )
        .await
        .expect("relocate");
    assert_eq!(outcome, UpdateOutcome::Applied);
    let got = beat.run(&mut memory, &ok).await;
    let want = BTreeMap::from([(moved.clone(), head("h2", 2, AgentState::Running))]);
    assert_eq!(got, want, "a relocation is seen at the next beat");
    let ok = &ok[1..];
    assert!(registry
        .mark_lost(
            lost,
            1,
            "h1",
            &[AgentState::Running],
            ExitReason::LeaseExpired,
            "test".into()
        )
        .await
        .expect("mark lost"));
    let got = beat.run(&mut memory, ok).await;
    let want = BTreeMap::from([(lost.clone(), head("h1", 1, AgentState::Lost))]);
    assert_eq!(got, want, "a LOST mark is seen at the next beat");
    let ok = &ok[1..];
    registry
        .delete_agent(&record(deleted, "h1", 1, AgentState::Running))
        .await
        .expect("delete");
    let got = beat.run(&mut memory, ok).await;
    let want = BTreeMap::from([(deleted.clone(), None)]);
    assert_eq!(got, want, "a delete is seen at the next beat");

    // A lease that lapsed under a verified agent is set again, at the
    // next beat that extends it.
    let relet = &ok[1].0;
    registry
        .clear_location(relet, "h1")
        .await
        .expect("drop lease");
    for _ in 0..LEASE_RENEW_EVERY {
        assert!(beat.run(&mut memory, &ok[1..]).await.is_empty());
    }
    assert_eq!(
        registry.location(relet).await.expect("lease").as_deref(),
        Some("h1"),
        "a lapsed lease is set again"
    );

    // The rest stay verified; in every FULL_READ_EVERY beats each head is
    // read once whatever the revisions say.
    // Each beat extends the leases of about a LEASE_RENEW_EVERYth of the
    // agents, each agent's every LEASE_RENEW_EVERYth beat (the host key's
    // TTL is set at every beat), and a lease lives as many host TTLs.
    let rest: Vec<(String, u64)> = ok[1..].to_vec();
    let (before, extends_before) = (backend.head_reads().await, backend.extends().await);
    let beats = FULL_READ_EVERY.max(u64::from(LEASE_RENEW_EVERY));
    let mut per_beat = Vec::new();
    for _ in 0..beats {
        let at = backend.extends().await;
        assert!(beat.run(&mut memory, &rest).await.is_empty());
        per_beat.push(backend.extends().await - at - 1);
    }
    eprintln!(
        "leases extended per beat of {} agents: {per_beat:?}",
        rest.len()
    );
    assert_eq!(
        backend.head_reads().await - before,
        rest.len() as u64,
        "one full read in {FULL_READ_EVERY} beats"
    );
    assert_eq!(
        backend.extends().await - extends_before,
        beats + rest.len() as u64 * beats / u64::from(LEASE_RENEW_EVERY),
        "each lease extended once every {LEASE_RENEW_EVERY} beats: {per_beat:?}"
    );
    for (id, _) in &rest {
        let pttl = backend.pttl(&registry.keys().loc(id)).await;
        let host_ttl = i64::try_from(ttl.as_millis()).expect("ms");
        let n = i64::from(LEASE_RENEW_EVERY);
        assert!(
            pttl > (n - 1) * host_ttl && pttl <= n * host_ttl,
            "{id}'s lease lives {n} host TTLs: PTTL {pttl} ms"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_beat_reports_exactly_the_records_that_do_not_name_its_run_on_one_redis() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = RedisServer::start(dir.path(), &[]).await;
    let registry = Registry::new(&redis.url(), "ap").expect("registry");
    leases_follow_the_records(&registry, Backend::One(&redis)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_beat_reports_exactly_the_records_that_do_not_name_its_run_on_a_redis_cluster() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = RedisCluster::start(dir.path()).await;
    let registry = nodes.registry();
    leases_follow_the_records(&registry, Backend::Cluster(&nodes)).await;
}
