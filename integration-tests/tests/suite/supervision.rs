//! Host-agent supervision under races, timeouts, escapes, crashes and restarts.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use agentplane::proto::v1::restart_policy::Mode;
use agentplane::proto::v1::{
    Agent, AgentSpec, AgentState, KillAgentRequest, ListAgentsRequest, PauseAgentRequest,
    ResourceLimits, RestartPolicy, ResumeAgentRequest, SpawnAgentRequest, StopAgentRequest,
};
use agentplane::time::{duration_to_proto, ms_from_timestamp};
use agentplane_integration_tests::{eventually, procfs, TestCluster};
use tonic::Code;

fn spec(argv: &[&str]) -> AgentSpec {
    AgentSpec {
        argv: argv.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    }
}

/// Every record's state agrees with /proc. A RUNNING or PAUSED record's pid
/// is alive, carries the agent's marker and leads its own process group, and
/// every live process carrying the marker is in that group or descends from
/// the pid (no copy of an earlier run is left); RUNNING has `tree` of them
/// (the whole tree the command starts), none stopped; PAUSED has every one
/// stopped (T), at most `tree` (a pause can catch it before it started them
/// all). An ended record has no marked process.
fn consistent(a: &Agent, tree: usize) -> Result<(), String> {
    let procs = procfs::agent_processes(&a.id);
    let problem = match a.state() {
        AgentState::Running | AgentState::Paused => tree_problem(a, &procs, tree),
        AgentState::Exited | AgentState::Failed => {
            (!procs.is_empty()).then(|| "ended, but marked processes live".to_owned())
        }
        s => Some(format!("not settled ({s:?})")),
    };
    match problem {
        None => Ok(()),
        Some(p) => Err(format!(
            "{} is {:?} with pid {}: {p}; /proc shows {procs:?}",
            a.id,
            a.state(),
            a.pid
        )),
    }
}

/// What is wrong with the live processes `procs` of RUNNING or PAUSED `a`.
fn tree_problem(a: &Agent, procs: &[procfs::ProcInfo], tree: usize) -> Option<String> {
    let Some(leader) = procs.iter().find(|p| p.pid == a.pid) else {
        return Some("the record's pid is not a live process of the agent".to_owned());
    };
    if leader.pgrp != a.pid {
        return Some(format!("its pid is in group {}, not its own", leader.pgrp));
    }
    let strays: Vec<_> = procs
        .iter()
        .filter(|p| p.pgrp != a.pid && !procfs::descends_from(p.pid, a.pid))
        .collect();
    if !strays.is_empty() {
        return Some(format!("processes outside its group and tree: {strays:?}"));
    }
    let paused = a.state() == AgentState::Paused;
    let wrong: Vec<_> = procs.iter().filter(|p| p.paused() != paused).collect();
    if !wrong.is_empty() {
        return Some(format!("processes in the wrong run state: {wrong:?}"));
    }
    let count_ok = if paused {
        procs.len() <= tree
    } else {
        procs.len() == tree
    };
    (!count_ok).then(|| format!("{} processes, the command starts {tree}", procs.len()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_random_concurrent_operations_leave_records_matching_proc() {
    let cluster = TestCluster::builder().hosts(2).start().await;
    // sh and its two sleeps.
    const TREE: usize = 3;
    let mut ids = Vec::new();
    for _ in 0..20 {
        // Ignores TERM and USR1 (and so do its children): most kills are
        // survivable signals, stops escalate to SIGKILL after their grace.
        // A SIGKILL ends a run, and on-failure starts the next one: the
        // operations race restarts too, and the agents outlive the storm.
        let mut s = spec(&[
            "sh",
            "-c",
            "trap '' TERM USR1; sleep 1000 & sleep 1000; wait",
        ]);
        s.stop_grace = Some(duration_to_proto(Duration::from_millis(300)));
        s.restart = Some(RestartPolicy {
            mode: Mode::OnFailure as i32,
            max_restarts: None,
            initial_backoff: Some(duration_to_proto(Duration::from_millis(20))),
            max_backoff: Some(duration_to_proto(Duration::from_millis(100))),
            stable_after: None,
        });
        ids.push(cluster.spawn_spec(s).await.id);
    }
    let client = cluster.client().await;
    let storm = Instant::now();
    let mut workers = Vec::new();
    for w in 0..10u64 {
        let mut c = client.clone();
        let ids = ids.clone();
        workers.push(tokio::spawn(async move {
            // A small deterministic generator per worker: reproducible runs.
            let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (w + 1);
            // What the servers answered, per call: the agent asked about
            // (its id checked) or the status.
            let mut answers: Vec<Result<(), tonic::Status>> = Vec::new();
            for _ in 0..100 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let id = ids[(x % 20) as usize].clone();
                let asked = id.clone();
                let grace = Some(duration_to_proto(Duration::from_millis(300)));
                let r = match (x >> 8) % 80 {
                    0..=35 => c.pause_agent(PauseAgentRequest { id }).await,
                    36..=71 => c.resume_agent(ResumeAgentRequest { id }).await,
                    72 => c.stop_agent(StopAgentRequest { id, grace }).await,
                    73..=75 => c.kill_agent(KillAgentRequest { id, signal: 9 }).await,
                    76..=77 => c.kill_agent(KillAgentRequest { id, signal: 10 }).await,
                    _ => c.kill_agent(KillAgentRequest { id, signal: 15 }).await,
                };
                answers.push(r.and_then(|a| {
                    let a = a.into_inner();
                    if a.id == asked {
                        Ok(())
                    } else {
                        Err(tonic::Status::internal(format!(
                            "asked about {asked}, answered with {}",
                            a.id
                        )))
                    }
                }));
            }
            answers
        }));
    }
    let mut totals: HashMap<Code, usize> = HashMap::new();
    let mut unexpected = Vec::new();
    for w in workers {
        for answer in w.await.expect("worker did not panic") {
            let code = answer.as_ref().err().map_or(Code::Ok, tonic::Status::code);
            *totals.entry(code).or_default() += 1;
            if !matches!(code, Code::Ok | Code::FailedPrecondition) {
                unexpected.push(answer);
            }
        }
    }
    let ok = totals.get(&Code::Ok).copied().unwrap_or(0);
    let refused = totals.get(&Code::FailedPrecondition).copied().unwrap_or(0);
    assert_eq!(
        ok + refused,
        1000,
        "every call answered with its agent or FAILED_PRECONDITION: {totals:?}, \
         the others: {unexpected:?}"
    );
    assert!(ok > 100, "many calls succeeded: {totals:?}");
    assert!(refused > 0, "some calls raced into a refusal: {totals:?}");
    eprintln!("answers: {totals:?} in {:?}", storm.elapsed());

    let mut c = client.clone();
    let settle = Instant::now() + Duration::from_secs(20);
    loop {
        let agents = c
            .list_agents(ListAgentsRequest::default())
            .await
            .map(|r| r.into_inner().agents)
            .unwrap_or_default();
        let errors: Vec<String> = agents
            .iter()
            .filter_map(|a| consistent(a, TREE).err())
            .collect();
        if agents.len() == 20 && errors.is_empty() {
            break;
        }
        assert!(
            Instant::now() < settle,
            "after 20 s, {} records and these disagree with /proc:\n{}",
            agents.len(),
            errors.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let agents = c
        .list_agents(ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(agents.len(), 20);
    for a in &agents {
        consistent(a, TREE).unwrap();
    }
    for s in cluster.control_planes.iter().chain(&cluster.hosts) {
        let log = std::fs::read_to_string(&s.proc.log).unwrap();
        assert!(
            !log.contains("panicked"),
            "no panic in {}:\n{log}",
            s.proc.log.display()
        );
    }
    cluster.finish().await;
}

/// Runs `argv` with a timeout of `secs` and a stop grace of 1 s until it
/// ends: its exit, how long that took from the spawn (the test's clock), how
/// long it ran by the record (start to finish, the host's clock), its id.
async fn run_to_timeout(
    cluster: &TestCluster,
    argv: &[&str],
    secs: u64,
) -> (
    agentplane::proto::v1::ExitStatus,
    Duration,
    Duration,
    String,
) {
    let mut s = spec(argv);
    s.timeout = Some(duration_to_proto(Duration::from_secs(secs)));
    s.stop_grace = Some(duration_to_proto(Duration::from_secs(1)));
    let t = Instant::now();
    let a = cluster.spawn_spec(s).await;
    let ended = cluster
        .wait_state(&a.id, AgentState::Exited, Duration::from_secs(10))
        .await;
    let took = t.elapsed();
    let exit = ended.exit.expect("an exit");
    let started = ms_from_timestamp(ended.started_at.as_ref().expect("started_at"));
    let finished = ms_from_timestamp(exit.finished_at.as_ref().expect("finished_at"));
    let ran = Duration::from_millis(u64::try_from(finished - started).expect("finish after start"));
    (exit, took, ran, a.id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_stops_the_agent_with_reason_timeout_and_sigkills_one_that_ignores_sigterm() {
    let cluster = TestCluster::builder().start().await;
    let (exit, took, ran, _) = run_to_timeout(&cluster, &["sleep", "100"], 2).await;
    assert_eq!(exit.reason(), agentplane::proto::v1::ExitReason::Timeout);
    assert_eq!(exit.signal, Some(15), "sleep died of the SIGTERM");
    assert!(
        took >= Duration::from_secs(2) && ran >= Duration::from_secs(2),
        "not before the timeout: {took:?} {ran:?}"
    );
    // The host's own times: the test's clock also counts the spawn and the
    // polling, which a loaded CI machine can stretch.
    assert!(
        ran < Duration::from_millis(2500),
        "ended by the SIGTERM, not after the grace: {ran:?}"
    );

    let (exit, took, ran, id) = run_to_timeout(
        &cluster,
        &["sh", "-c", "trap '' TERM; sleep 100 & wait; wait"],
        1,
    )
    .await;
    assert_eq!(exit.reason(), agentplane::proto::v1::ExitReason::Timeout);
    assert_eq!(exit.signal, Some(9), "SIGKILLed after the grace");
    assert!(
        took >= Duration::from_secs(2) && ran >= Duration::from_secs(2),
        "waited timeout + grace: {took:?} {ran:?}"
    );
    assert!(
        ran < Duration::from_millis(2800),
        "SIGKILLed right after the grace: {ran:?}"
    );
    assert!(procfs::agent_processes(&id).is_empty());
    cluster.finish().await;
}

/// Spawns `sh` with a `sleep` and a `setsid sleep` (which leaves the agent's
/// process group); returns the agent and its 3 processes once all run.
async fn spawn_with_an_escapee(cluster: &TestCluster) -> (Agent, Vec<procfs::ProcInfo>) {
    let a = cluster
        .spawn(&["sh", "-c", "setsid sleep 1000 & sleep 1000"])
        .await;
    let procs = eventually(
        Duration::from_secs(5),
        "the setsid sleep runs in its own group",
        || async {
            let procs = procfs::agent_processes(&a.id);
            (procs.len() == 3 && procs.iter().any(|p| p.pgrp != a.pid)).then_some(procs)
        },
    )
    .await;
    (a, procs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume_reach_setsid_grandchildren_that_left_the_group() {
    let cluster = TestCluster::builder().start().await;
    let mut c = cluster.client().await;
    let (a, procs) = spawn_with_an_escapee(&cluster).await;
    let paused = c
        .pause_agent(PauseAgentRequest { id: a.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(paused.state(), AgentState::Paused);
    let states = || -> Vec<_> {
        procs
            .iter()
            .map(|p| {
                (
                    p.pid,
                    p.pgrp,
                    procfs::stat(p.pid).map(|s| (s.state, s.paused())),
                )
            })
            .collect()
    };
    // At once: the answer waits for every process to stop.
    let states_now = states();
    assert!(
        states_now
            .iter()
            .all(|(_, _, s)| s.is_some_and(|(_, paused)| paused)),
        "every process stopped, the escaped one too: {states_now:?}"
    );
    c.resume_agent(ResumeAgentRequest { id: a.id.clone() })
        .await
        .unwrap();
    let states_now = states();
    assert!(
        states_now
            .iter()
            .all(|(_, _, s)| s.is_some_and(|(s, paused)| !paused && s != 'Z')),
        "every process continued, the escaped one too: {states_now:?}"
    );
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_kills_setsid_grandchildren_that_left_the_group() {
    let cluster = TestCluster::builder().start().await;
    let mut c = cluster.client().await;
    let (a, escaped) = spawn_with_an_escapee(&cluster).await;
    assert!(
        escaped.iter().any(|p| p.pgrp == p.pid && p.pid != a.pid),
        "{escaped:?}"
    );
    c.stop_agent(StopAgentRequest {
        id: a.id.clone(),
        grace: None,
    })
    .await
    .unwrap();
    procfs::wait_gone(&a.id, Duration::from_secs(5)).await;

    // Also when the main process exits by itself and leaves a daemon behind.
    let d = cluster
        .spawn(&["sh", "-c", "setsid sh -c 'sleep 1000' & sleep 0.3; exit 0"])
        .await;
    cluster
        .wait_state(&d.id, AgentState::Exited, Duration::from_secs(5))
        .await;
    procfs::wait_gone(&d.id, Duration::from_secs(5)).await;
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_host_agent_and_its_keeper_leaves_no_agent_process_alive() {
    let mut cluster = TestCluster::builder().start().await;
    let mut ids = Vec::new();
    for cmd in [
        "sleep 1000 & sleep 1000; wait",
        "setsid sleep 1000 & wait",
        "trap '' TERM HUP; sleep 1000",
    ] {
        ids.push(cluster.spawn(&["sh", "-c", cmd]).await.id);
    }
    eventually(Duration::from_secs(5), "agents running", || async {
        ids.iter()
            .all(|id| !procfs::agent_processes(id).is_empty())
            .then_some(())
    })
    .await;
    // The machine's death: a host agent alone leaves them to its keeper.
    cluster.kill_machine("h1");
    eventually(
        Duration::from_secs(5),
        "every agent process gone",
        || async {
            let left: Vec<_> = ids
                .iter()
                .flat_map(|id| procfs::agent_processes(id))
                .collect();
            left.is_empty().then_some(())
        },
    )
    .await;
    // SIGKILLed too (its exit may be reaped after the agents are gone).
    assert!(
        cluster.hosts[0]
            .proc
            .wait_exit(Duration::from_secs(5))
            .await,
        "the host agent is gone"
    );
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_are_unique_and_limits_and_identity_reach_the_process() {
    let cluster = TestCluster::builder().start().await;
    let mut c = cluster.client().await;
    let mut named = spec(&["sleep", "1000"]);
    named.name = "web".into();
    let first = cluster.spawn_spec(named.clone()).await;
    let e = c
        .spawn_agent(SpawnAgentRequest {
            spec: Some(named.clone()),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains(&first.id), "{}", e.message());
    // Deleting frees the name.
    c.stop_agent(StopAgentRequest {
        id: first.id.clone(),
        grace: None,
    })
    .await
    .unwrap();
    c.delete_agent(agentplane::proto::v1::DeleteAgentRequest {
        id: first.id.clone(),
        force: false,
    })
    .await
    .unwrap();
    cluster.spawn_spec(named).await;

    let mut limited = spec(&["sh", "-c", "exit $(ulimit -n)"]);
    limited.limits = Some(ResourceLimits {
        open_files: Some(37),
        ..Default::default()
    });
    let a = cluster.spawn_spec(limited).await;
    let ended = cluster
        .wait_state(&a.id, AgentState::Exited, Duration::from_secs(5))
        .await;
    assert_eq!(ended.exit.unwrap().code, Some(37), "RLIMIT_NOFILE applied");

    let mut cpu = spec(&["sh", "-c", "exit $(ulimit -t)"]);
    cpu.limits = Some(ResourceLimits {
        cpu_seconds: Some(17),
        ..Default::default()
    });
    let a = cluster.spawn_spec(cpu).await;
    let ended = cluster
        .wait_state(&a.id, AgentState::Exited, Duration::from_secs(5))
        .await;
    assert_eq!(ended.exit.unwrap().code, Some(17), "RLIMIT_CPU applied");

    let mut nobody = spec(&[
        "sh",
        "-c",
        "[ \"$(id -u)\" = 65534 ] && [ \"$(id -g)\" = 65534 ]",
    ]);
    nobody.uid = Some(65534);
    nobody.gid = Some(65534);
    let a = cluster.spawn_spec(nobody).await;
    if nix::unistd::Uid::effective().is_root() {
        let ended = cluster
            .wait_state(&a.id, AgentState::Exited, Duration::from_secs(5))
            .await;
        assert_eq!(ended.exit.unwrap().code, Some(0), "ran as uid/gid 65534");
    } else {
        let failed = cluster
            .wait_state(&a.id, AgentState::Failed, Duration::from_secs(5))
            .await;
        assert!(failed.exit.unwrap().error.contains("ermission"));
    }
    cluster.finish().await;
}
