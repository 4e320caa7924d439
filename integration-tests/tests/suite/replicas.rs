//! Several control-plane replicas: spawns retried on another replica make one
//! agent each; a watch client follows a SIGKILLed replica to the other one
//! and sees every event once, in order.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use agentplane::proto::v1::{
    Agent, AgentSpec, AgentState, GetAgentRequest, ListAgentsRequest, SpawnAgentRequest,
};
use agentplane_integration_tests::{eventually, procfs, TestCluster};
use nix::sys::signal::Signal;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_spawns_survive_a_replica_sigkill_with_exactly_one_agent_each() {
    let cluster = TestCluster::builder()
        .hosts(2)
        .control_planes(2)
        .max_agents(500)
        .start()
        .await;
    let clients = [cluster.client_of(0), cluster.client_of(1)];
    let t0 = Instant::now();
    // 200 spawns, 8 in flight at a time, each retried with its request id on
    // the other replica when the first fails at the transport level (like
    // `agentctl --endpoint a,b`); replica 0 is SIGKILLed in the middle.
    let failed_over = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let clients = clients.clone();
        let next = next.clone();
        let failed_over = failed_over.clone();
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= 200 {
                    return;
                }
                let req = SpawnAgentRequest {
                    spec: Some(AgentSpec {
                        argv: vec!["sleep".into(), "1000".into()],
                        ..Default::default()
                    }),
                    request_id: format!("bulk-{i}"),
                };
                let mut done = false;
                for (n, c) in clients.iter().enumerate() {
                    match c.clone().spawn_agent(req.clone()).await {
                        Ok(_) => {
                            done = true;
                            break;
                        }
                        Err(s) if n == 0 && transport(&s) => {
                            failed_over.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        Err(s) => panic!("spawn {i} failed: {s:?}"),
                    }
                }
                assert!(done, "spawn {i} answered");
            }
        });
    }
    while next.load(std::sync::atomic::Ordering::SeqCst) < 80 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cluster.control_planes[0].proc.signal(Signal::SIGKILL);
    while let Some(r) = workers.join_next().await {
        r.expect("worker did not panic");
    }
    let failed_over = failed_over.load(std::sync::atomic::Ordering::SeqCst);
    eprintln!(
        "{failed_over} spawns failed over to replica 1 ({:?})",
        t0.elapsed()
    );
    assert!(failed_over > 0, "the kill made some spawns fail over");
    let mut c = clients[1].clone();
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_agents(ListAgentsRequest {
                page_token: token,
                page_size: 500,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        all.extend(page.agents);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(all.len(), 200, "exactly 200 agents");
    eprintln!("listed ({:?})", t0.elapsed());
    // What runs: every marked process of these hosts (the host agent is a
    // subreaper, so its agents' processes stay its descendants) or of these
    // records (wherever it went). Exactly one per record, and none without a
    // record (a spawn whose record was lost).
    let hosts: Vec<i32> = cluster.hosts.iter().map(|h| h.proc.pid()).collect();
    let records: HashMap<&str, &Agent> = all.iter().map(|a| (a.id.as_str(), a)).collect();
    let ours: Vec<(String, procfs::ProcInfo)> = procfs::all_agent_processes_by_id()
        .into_iter()
        .filter(|(id, p)| {
            records.contains_key(id.as_str())
                || hosts.iter().any(|h| procfs::descends_from(p.pid, *h))
        })
        .collect();
    let mut per_agent: HashMap<&str, Vec<procfs::ProcInfo>> = HashMap::new();
    for (id, p) in &ours {
        per_agent.entry(id.as_str()).or_default().push(*p);
    }
    let unrecorded: Vec<_> = per_agent
        .iter()
        .filter(|(id, _)| !records.contains_key(*id))
        .collect();
    assert!(
        unrecorded.is_empty(),
        "agent processes without a record: {unrecorded:?}"
    );
    let not_one: Vec<_> = all
        .iter()
        .map(|a| (&a.id, per_agent.get(a.id.as_str()).map_or(0, Vec::len)))
        .filter(|(_, n)| *n != 1)
        .collect();
    assert!(
        not_one.is_empty(),
        "records without exactly one process: {not_one:?}"
    );
    assert_eq!(ours.len(), 200, "one agent process per record, no extras");
    // And each record knows its process: RUNNING, with the pid of the one
    // process, which leads its own group.
    let disagree: Vec<_> = ours
        .iter()
        .filter_map(|(id, p)| {
            let a = records[id.as_str()];
            (a.state() != AgentState::Running || a.pid != p.pid || p.pgrp != p.pid)
                .then(|| format!("{id}: record {:?} pid {}, process {p:?}", a.state(), a.pid))
        })
        .collect();
    assert!(
        disagree.is_empty(),
        "records that disagree with their running process:\n{}",
        disagree.join("\n")
    );
    cluster.finish().await;
}

/// For each watch token, the stream whose position it moved and the id
/// of the event it follows (one stream: the token itself; with a Redis
/// Cluster, one position per stream, all `0` before the first event).
fn moved_positions(tokens: &[String]) -> Vec<(usize, String)> {
    let mut prev: Vec<String> = Vec::new();
    let mut out = Vec::new();
    for t in tokens {
        let parts: Vec<String> = t.split(',').map(str::to_owned).collect();
        if prev.len() != parts.len() {
            prev = vec!["0".to_owned(); parts.len()];
        }
        let i = (0..parts.len())
            .find(|i| prev[*i] != parts[*i])
            .unwrap_or(0);
        out.push((i, parts[i].clone()));
        prev = parts;
    }
    out
}

/// A stream id as a comparable pair.
fn stream_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

/// Whether a call failed at the transport level (the replica died).
fn transport(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_follows_a_killed_replica_to_the_other_and_sees_every_event_once_in_order() {
    let cluster = TestCluster::builder()
        .hosts(1)
        .control_planes(2)
        .start()
        .await;
    // The watch starts from the oldest event, so it sees every one.
    let (mut watch, rx) = cluster.watch_json();
    let first = cluster.spawn(&["true"]).await;
    let mut seen = Vec::new();
    loop {
        let v = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("watch receives events");
        let is_first = v["agent_id"] == first.id.as_str();
        seen.push(v);
        if is_first {
            break;
        }
    }
    for _ in 0..5 {
        cluster.spawn(&["sleep", "1000"]).await;
    }
    cluster.control_planes[0].proc.signal(Signal::SIGKILL);
    // Events while the watcher moves over, and after.
    let mut c = cluster.client_of(1);
    let mut short = Vec::new();
    for _ in 0..5 {
        let a = c
            .spawn_agent(SpawnAgentRequest {
                spec: Some(AgentSpec {
                    argv: vec!["true".into()],
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .agent
            .expect("agent");
        short.push(a.id);
    }
    // Their exits are events too (written with the record): wait for them.
    for id in short {
        eventually(Duration::from_secs(10), "`true` exited", || {
            let mut c = c.clone();
            let id = id.clone();
            async move {
                let a = c.get_agent(GetAgentRequest { id }).await.ok()?.into_inner();
                (a.state() == AgentState::Exited).then_some(())
            }
        })
        .await;
    }
    // Every event in Redis: the watch has them all once it has as many as
    // the stream held before its last drain and the stream has not grown.
    let deadline = Instant::now() + Duration::from_secs(15);
    let expected: Vec<String> = loop {
        let ids: Vec<String> = cluster
            .events()
            .await
            .iter()
            .map(|e| e["id"].clone())
            .collect();
        while let Ok(v) = rx.recv_timeout(Duration::from_millis(50)) {
            seen.push(v);
        }
        let now = cluster.events().await.len();
        if (seen.len() >= ids.len() && now == ids.len()) || Instant::now() > deadline {
            break ids;
        }
    };
    let tokens: Vec<String> = seen
        .iter()
        .map(|v| v["token"].as_str().unwrap().to_owned())
        .collect();
    let moved = moved_positions(&tokens);
    let got: Vec<String> = moved.iter().map(|(_, id)| id.clone()).collect();
    if cluster.on_redis_cluster() {
        // One order per stream: the same events, each stream's in order.
        let (mut a, mut b) = (got.clone(), expected.clone());
        a.sort();
        b.sort();
        assert_eq!(a, b, "every event exactly once");
        for stream in 0..=usize::from(agentplane::registry::SHARDS) {
            let ours: Vec<(u64, u64)> = moved
                .iter()
                .filter(|(s, _)| *s == stream)
                .map(|(_, id)| stream_id(id))
                .collect();
            assert!(
                ours.windows(2).all(|w| w[0] < w[1]),
                "stream {stream} in order: {ours:?}"
            );
        }
    } else {
        assert_eq!(got, expected, "every event exactly once, in order");
    }
    assert!(
        expected.len() >= 20,
        "the test produced events: {}",
        expected.len()
    );
    let _ = watch.kill();
    let _ = watch.wait();
    cluster.finish().await;
}
