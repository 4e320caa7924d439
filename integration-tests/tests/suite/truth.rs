//! Records that never lie (P5): a fast host-agent restart, a record without
//! its lease, a ghost, an unconfirmed start, a failed relocation and a Redis
//! outage all converge to what /proc shows.

use std::time::{Duration, Instant};

use agentplane::proto::v1::restart_policy::Mode;
use agentplane::proto::v1::{Agent, AgentSpec, AgentState, GetAgentRequest};
use agentplane_integration_tests::{eventually, procfs, spec, TestCluster};
use prost::Message;
use redis::AsyncCommands;
use tonic::Code;

/// Writes an agent record straight into Redis, as a crashed writer could
/// have left it: `state` on `host` at generation 1, in the host's set, with
/// no location key. Returns its id.
async fn plant(
    cluster: &TestCluster,
    state: &str,
    host: &str,
    spec: &AgentSpec,
    pending_since_ms: Option<i64>,
) -> String {
    let id = agentplane::ids::new_agent_id();
    let now = agentplane::time::now_ms();
    let mut fields: Vec<(&str, Vec<u8>)> = vec![
        ("id", id.clone().into_bytes()),
        ("name", Vec::new()),
        ("spec", spec.encode_to_vec()),
        ("state", state.as_bytes().to_vec()),
        ("host", host.as_bytes().to_vec()),
        ("pid", b"0".to_vec()),
        ("generation", b"1".to_vec()),
        ("created_at", now.to_string().into_bytes()),
    ];
    if let Some(ms) = pending_since_ms {
        fields.push(("pending_since", ms.to_string().into_bytes()));
    }
    let mut conn = cluster.redis_conn().await;
    let k = cluster.keys();
    let shard = k.shard_of(&id);
    redis::pipe()
        .atomic()
        .hset_multiple(k.agent(&id), &fields)
        .ignore()
        .sadd(k.host_agents(shard, host), &id)
        .ignore()
        .zadd(k.agents_index(shard), &id, 0)
        .ignore()
        .zadd(k.state_index(shard, state), &id, 0)
        .ignore()
        .query_async::<()>(&mut conn)
        .await
        .expect("plant a record");
    id
}

async fn get(cluster: &TestCluster, id: &str) -> Result<Agent, tonic::Status> {
    cluster
        .client()
        .await
        .get_agent(GetAgentRequest { id: id.to_owned() })
        .await
        .map(tonic::Response::into_inner)
}

fn reason(a: &Agent) -> &str {
    a.exit
        .as_ref()
        .map_or("", |e| agentplane::state::reason_name(e.reason()))
}

/// Asserts that agent `a` runs as exactly one process group on this machine:
/// its pid is alive and leads the group every marked process belongs to.
fn runs_once(a: &Agent) {
    let procs = procfs::agent_processes(&a.id);
    assert!(
        a.pid > 0 && procfs::is_alive(a.pid),
        "{} has no live pid: {a:?}",
        a.id
    );
    assert!(!procs.is_empty(), "{} has no marked process", a.id);
    assert!(
        procs.iter().all(|p| p.pgrp == a.pid),
        "{} has processes outside its group {}: {procs:?}",
        a.id,
        a.pid
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_host_agent_restart_cannot_hide_a_loss() {
    let ttl = Duration::from_secs(3);
    let mut cluster = TestCluster::builder().heartbeat_ttl(ttl).start().await;
    let mut never = Vec::new();
    for _ in 0..3 {
        never.push(cluster.spawn(&["sleep", "1000"]).await);
    }
    let always = cluster
        .spawn_spec(spec(&["sleep", "1000"], Some(Mode::Always)))
        .await;
    // A crash of the host agent and of its keeper: the agents die.
    cluster.kill_machine("h1");
    for a in never.iter().chain([&always]) {
        procfs::wait_gone(&a.id, Duration::from_secs(5)).await;
    }
    // Well inside the TTL: the host key never expires, as with systemd's
    // restart of a crashed host agent.
    let restarted = Instant::now();
    cluster.restart_host("h1");
    let beat = ttl / 3;
    let limit = ttl + 2 * beat;
    let back = cluster
        .wait_agent(&always.id, "runs again", limit, |a| {
            a.state() == AgentState::Running && a.generation == 2 && a.pid > 0
        })
        .await;
    runs_once(&back);
    for a in &never {
        let lost = cluster
            .wait_agent(&a.id, "is LOST (HOST_RESTARTED)", limit, |a| {
                a.state() == AgentState::Lost
            })
            .await;
        assert_eq!(reason(&lost), "HOST_RESTARTED", "{lost:?}");
        assert!(procfs::agent_processes(&a.id).is_empty());
    }
    eprintln!(
        "host agent restarted with TTL {ttl:?}: records true after {:?}",
        restarted.elapsed()
    );
    assert!(restarted.elapsed() <= limit);
    // The old incarnation's lease is gone with it: locate says so.
    let out = cluster.agentctl(&["-o", "json", "locate", &never[0].id]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("locate json");
    assert_eq!(v["live"], false, "{v}");
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ghost_can_be_stopped_and_removed_and_is_lost_when_paused() {
    // A long TTL: the sweep would settle the ghosts by itself after one.
    let cluster = TestCluster::builder()
        .heartbeat_ttl(Duration::from_secs(20))
        .start()
        .await;
    let s = spec(&["sleep", "1000"], None);
    let stopped = plant(&cluster, "RUNNING", "h1", &s, None).await;
    let out = cluster.agentctl(&["stop", &stopped]);
    assert!(
        out.status.success(),
        "stop of a ghost: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a = get(&cluster, &stopped).await.expect("record");
    assert_eq!(a.state(), AgentState::Exited, "{a:?}");
    assert_eq!(reason(&a), "STOPPED");

    let removed = plant(&cluster, "RUNNING", "h1", &s, None).await;
    let out = cluster.agentctl(&["rm", "--force", &removed]);
    assert!(
        out.status.success(),
        "rm --force of a ghost: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        get(&cluster, &removed).await.unwrap_err().code(),
        Code::NotFound
    );

    let paused = plant(&cluster, "RUNNING", "h1", &s, None).await;
    let out = cluster.agentctl(&["pause", &paused]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("FAILED_PRECONDITION") && stderr.contains("LOST"),
        "{stderr}"
    );
    let a = get(&cluster, &paused).await.expect("record");
    assert_eq!(a.state(), AgentState::Lost);
    assert_eq!(reason(&a), "NOT_ON_HOST");
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_whose_lease_lapsed_on_a_live_host_goes_lost_and_restarts() {
    let ttl = Duration::from_secs(1);
    let cluster = TestCluster::builder().heartbeat_ttl(ttl).start().await;
    let healthy = cluster.spawn(&["sleep", "1000"]).await;
    let never = plant(
        &cluster,
        "RUNNING",
        "h1",
        &spec(&["sleep", "1000"], None),
        None,
    )
    .await;
    let always = plant(
        &cluster,
        "RUNNING",
        "h1",
        &spec(&["sleep", "1000"], Some(Mode::Always)),
        None,
    )
    .await;
    let planted = Instant::now();
    // Two sightings a TTL apart, plus a pass or two.
    let limit = 2 * ttl + Duration::from_secs(2);
    let lost = cluster.wait_state(&never, AgentState::Lost, limit).await;
    assert_eq!(reason(&lost), "LEASE_EXPIRED", "{lost:?}");
    let back = cluster
        .wait_agent(&always, "runs again", limit, |a| {
            a.state() == AgentState::Running && a.generation == 2 && a.pid > 0
        })
        .await;
    runs_once(&back);
    eprintln!(
        "lease lapsed (TTL {ttl:?}): LOST and restarted after {:?}",
        planted.elapsed()
    );
    // A healthy agent's lease is renewed: it is never suspected.
    let h = get(&cluster, &healthy.id).await.expect("record");
    assert_eq!(
        (h.state(), h.generation, h.pid),
        (AgentState::Running, 1, healthy.pid)
    );
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconfirmed_start_is_retried_and_a_refused_one_ends_failed() {
    let cluster = TestCluster::builder().start().await;
    let long_ago = agentplane::time::now_ms() - 60_000;
    let stranded = plant(
        &cluster,
        "PENDING",
        "h1",
        &spec(&["sleep", "1000"], None),
        Some(long_ago),
    )
    .await;
    let fresh = plant(
        &cluster,
        "PENDING",
        "h1",
        &spec(&["sleep", "1000"], None),
        Some(agentplane::time::now_ms()),
    )
    .await;
    let refused = plant(&cluster, "PENDING", "h1", &spec(&[], None), Some(long_ago)).await;
    let started = cluster
        .wait_agent(
            &stranded,
            "started by the sweep",
            Duration::from_secs(5),
            |a| a.state() == AgentState::Running && a.pid > 0,
        )
        .await;
    assert_eq!((started.host.as_str(), started.generation), ("h1", 1));
    runs_once(&started);
    let failed = cluster
        .wait_state(&refused, AgentState::Failed, Duration::from_secs(5))
        .await;
    let exit = failed.exit.expect("exit");
    assert_eq!(exit.reason(), agentplane::proto::v1::ExitReason::HostError);
    assert!(exit.error.contains("argv"), "{}", exit.error);
    // Within its bound a placement is somebody's start in flight: untouched.
    let f = get(&cluster, &fresh).await.expect("record");
    assert_eq!(f.state(), AgentState::Pending, "{f:?}");
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relocation_whose_target_fails_moves_on_to_the_next_host() {
    let ttl = Duration::from_millis(1500);
    // h2 heartbeats but advertises an address nobody listens on: every call
    // to it fails, as with a host whose gRPC port is firewalled.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut cluster = TestCluster::builder()
        .hosts(3)
        .heartbeat_ttl(ttl)
        .host_arg_at(1, "--advertise-addr")
        .host_arg_at(1, &format!("127.0.0.1:{dead}"))
        .start()
        .await;
    let mut on_h1 = Vec::new();
    for _ in 0..9 {
        let a = cluster
            .spawn_spec(spec(&["sleep", "1000"], Some(Mode::Always)))
            .await;
        assert_ne!(a.host, "h2", "a spawn never ends on the unreachable host");
        if a.host == "h1" {
            on_h1.push(a.id);
        }
    }
    assert!(on_h1.len() >= 2, "{on_h1:?}");
    cluster.kill_machine("h1");
    let mut conn = cluster.redis_conn().await;
    let k = cluster.keys();
    for id in &on_h1 {
        let a = cluster
            .wait_agent(id, "runs on h3", ttl * 4 + Duration::from_secs(10), |a| {
                a.state() == AgentState::Running && a.host == "h3" && a.pid > 0
            })
            .await;
        runs_once(&a);
        for (host, member) in [("h1", false), ("h2", false), ("h3", true)] {
            let is: bool = conn
                .sismember(k.host_agents(k.shard_of(id), host), id)
                .await
                .expect("SISMEMBER");
            assert_eq!(is, member, "{id} in {host}'s set");
        }
    }
    let log = std::fs::read_to_string(&cluster.control_planes[0].proc.log).unwrap_or_default();
    assert!(
        log.contains("host could not start the agent; trying the next"),
        "no relocation tried h2 first"
    );
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ends_and_restarts_during_a_redis_outage_are_recorded_when_it_returns() {
    // One Redis server, shut down and brought back with its data.
    let mut cluster = TestCluster::builder().single_redis().start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let go = dir.path().join("go");
    let ran = dir.path().join("ran");
    let (go_s, ran_s) = (go.display().to_string(), ran.display().to_string());
    let ends = cluster
        .spawn(&[
            "sh",
            "-c",
            &format!("while [ ! -e {go_s} ]; do sleep 0.05; done; exit 7"),
        ])
        .await;
    let restarts = cluster
        .spawn_spec(spec(
            &[
                "sh",
                "-c",
                &format!(
                    "if [ -e {ran_s} ]; then exec sleep 1000; fi; \
                     while [ ! -e {go_s} ]; do sleep 0.05; done; touch {ran_s}; exit 0"
                ),
            ],
            Some(Mode::Always),
        ))
        .await;
    cluster.redis.shutdown_saving().await;
    std::fs::write(&go, b"").expect("write go");
    eventually(Duration::from_secs(5), "the first agent's exit", || {
        let gone = !procfs::is_alive(ends.pid);
        async move { gone.then_some(()) }
    })
    .await;
    // The restarted run (after a 1 s backoff) is `sleep 1000`.
    let second = eventually(
        Duration::from_secs(10),
        "the restart during the outage",
        || {
            let found = procfs::agent_processes(&restarts.id)
                .into_iter()
                .find(|p| p.pid != restarts.pid && p.pgrp == p.pid);
            async move { found }
        },
    )
    .await;
    cluster.redis.restart_with_data().await;
    let ended = cluster
        .wait_state(&ends.id, AgentState::Exited, Duration::from_secs(10))
        .await;
    assert_eq!(
        ended.exit.as_ref().and_then(|e| e.code),
        Some(7),
        "{ended:?}"
    );
    let r = cluster
        .wait_agent(
            &restarts.id,
            "records its restart",
            Duration::from_secs(10),
            |a| a.state() == AgentState::Running && a.pid == second.pid,
        )
        .await;
    assert_eq!(r.restarts, 1);
    runs_once(&r);
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_of_dead_callers_are_free_and_claims_of_slow_ones_are_not_taken() {
    let cluster = TestCluster::builder().start().await;
    let mut conn = cluster.redis_conn().await;
    let k = cluster.keys();
    let dead = agentplane::ids::new_agent_id();
    let slow = agentplane::ids::new_agent_id();
    // A name claimed by a replica that died before writing the record.
    let _: () = conn.set(k.name("solo"), &dead).await.expect("SET");
    // A name and a request id claimed by a call that is alive but slow.
    let _: () = conn.set(k.name("busy"), &slow).await.expect("SET");
    let _: () = conn.set(k.idem("req-slow"), &slow).await.expect("SET");
    let _: () = conn
        .pset_ex(k.claim_lease(&slow), 1, 2000)
        .await
        .expect("PSETEX");

    let mut named = spec(&["sleep", "1000"], None);
    named.name = "solo".into();
    let a = cluster.spawn_spec(named).await;
    let owner: String = conn.get(k.name("solo")).await.expect("GET");
    assert_eq!(owner, a.id, "the abandoned name was taken over");

    named = spec(&["sleep", "1000"], None);
    named.name = "busy".into();
    let taken = cluster
        .client()
        .await
        .spawn_agent(agentplane::proto::v1::SpawnAgentRequest {
            spec: Some(named),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(taken.code(), Code::AlreadyExists, "{taken:?}");

    // A spawn with the slow call's request id waits while that call's lease
    // is renewed (here for 5 s, longer than any fixed "abandoned" guess) ...
    let mut client = cluster.client().await;
    let retry = tokio::spawn(async move {
        client
            .spawn_agent(agentplane::proto::v1::SpawnAgentRequest {
                spec: Some(spec(&["sleep", "1000"], None)),
                request_id: "req-slow".into(),
            })
            .await
    });
    let renewing = Instant::now();
    while renewing.elapsed() < Duration::from_secs(5) {
        let _: () = conn
            .pset_ex(k.claim_lease(&slow), 1, 1000)
            .await
            .expect("PSETEX");
        let holder: String = conn.get(k.idem("req-slow")).await.expect("GET");
        assert_eq!(
            holder,
            slow,
            "a live claim was taken over after {:?}",
            renewing.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // ... and takes it over once the slow call is gone (its lease lapses).
    let created = retry
        .await
        .expect("join")
        .expect("spawn after the lease lapsed")
        .into_inner();
    let agent = created.agent.expect("agent");
    assert!(!created.existing);
    let holder: String = conn.get(k.idem("req-slow")).await.expect("GET");
    assert_eq!(holder, agent.id);
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_fenced_between_admission_and_fork_is_refused_without_a_panic() {
    // Every start on this host pauses 800 ms between admission and fork (a
    // debug-build failpoint), far longer than a heartbeat (200 ms).
    std::env::set_var("AGENTPLANE_FAILPOINT_PAUSE_BEFORE_SPAWN", "800");
    let mut cluster = TestCluster::builder()
        .heartbeat_ttl(Duration::from_millis(600))
        .start()
        .await;
    let s = spec(&["sleep", "1000"], None);
    let id = plant(&cluster, "RUNNING", "h1", &s, None).await;
    // The record is at generation 2: a start of generation 1 is stale, and
    // the heartbeat fences it while it waits at the failpoint.
    let mut conn = cluster.redis_conn().await;
    let _: () = conn
        .hset(cluster.keys().agent(&id), "generation", 2)
        .await
        .expect("HSET");
    let answer = cluster
        .host_agent(0)
        .start_agent(agentplane::proto::v1::StartAgentRequest {
            id: id.clone(),
            generation: 1,
            spec: Some(s),
        })
        .await
        .expect_err("a fenced start is refused");
    assert_eq!(answer.code(), Code::FailedPrecondition, "{answer:?}");
    assert!(answer.message().contains("fenced"), "{answer:?}");
    assert!(procfs::agent_processes(&id).is_empty());
    assert!(
        cluster.host("h1").proc.is_running(),
        "the host agent survived"
    );
    let status = cluster
        .host_agent(0)
        .get_status(agentplane::proto::v1::GetStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.panicked_tasks, 0);
    let log = std::fs::read_to_string(&cluster.hosts[0].proc.log).unwrap_or_default();
    assert!(
        log.contains("fencing: killing a stale copy"),
        "the heartbeat fenced it"
    );
    assert!(!log.contains("panicked"), "{log}");
    cluster.finish().await;
}

/// A running agent's record that vanished without a delete (a write a Redis
/// failover lost) is written back by its host, and the agent runs on; a
/// delete leaves a tombstone, so a deleted record's copy is still fenced
/// (tests of `rm`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_lost_without_a_delete_is_written_back_and_its_agent_runs_on() {
    let cluster = TestCluster::builder()
        .heartbeat_ttl(Duration::from_millis(1500))
        .start()
        .await;
    let a = cluster.spawn(&["sleep", "1000"]).await;
    let mut conn = cluster.redis_conn().await;
    let _: () = conn.del(cluster.keys().agent(&a.id)).await.expect("DEL");
    let back = cluster
        .wait_agent(&a.id, "is written back", Duration::from_secs(10), |b| {
            b.state() == AgentState::Running && b.pid == a.pid
        })
        .await;
    runs_once(&back);
    cluster.finish().await;
}
