//! The agent lifecycle as users and the OS see it: pause/resume/stop on whole
//! process groups, exits and failed starts recorded, the error codes, and the
//! descriptors an agent starts with (exactly 0, 1 and 2).

use std::time::Duration;

use agentplane::proto::v1::{
    AgentSpec, AgentState, GetAgentRequest, HostAgentRef, KillAgentRequest, ListAgentsRequest,
    PauseAgentRequest, Placement, ResumeAgentRequest, SpawnAgentRequest, StopAgentRequest,
};
use agentplane_integration_tests::{eventually, procfs, TestCluster};
use tonic::Code;

const GROUP_CMD: &str = "sleep 1000 & sleep 1000; wait";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_stop_act_on_the_whole_process_group() {
    let cluster = TestCluster::builder().start().await;
    let mut c = cluster.client().await;
    let agent = cluster.spawn(&["sh", "-c", GROUP_CMD]).await;
    assert_eq!(agent.state(), AgentState::Running);
    let pgid = agent.pid;
    // sh and its two sleeps.
    eventually(
        Duration::from_secs(5),
        "3 processes in the group",
        || async { (procfs::alive_in_group(pgid).len() == 3).then_some(()) },
    )
    .await;
    assert_eq!(
        procfs::stat(pgid).unwrap().pgrp,
        pgid,
        "the agent leads its own group"
    );

    let paused = c
        .pause_agent(PauseAgentRequest {
            id: agent.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(paused.state(), AgentState::Paused);
    // PAUSED comes back once every process has stopped.
    let g = procfs::alive_in_group(pgid);
    assert!(g.len() == 3 && g.iter().all(|p| p.paused()), "{g:?}");

    let resumed = c
        .resume_agent(ResumeAgentRequest {
            id: agent.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resumed.state(), AgentState::Running);
    eventually(
        Duration::from_secs(5),
        "every process running again",
        || async {
            let g = procfs::alive_in_group(pgid);
            (g.len() == 3 && g.iter().all(|p| !p.paused())).then_some(())
        },
    )
    .await;

    let stopped = c
        .stop_agent(StopAgentRequest {
            id: agent.id.clone(),
            grace: Some(prost_duration(Duration::from_secs(2))),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stopped.state(), AgentState::Exited);
    let exit = stopped.exit.expect("exit recorded");
    assert_eq!(exit.reason(), agentplane::proto::v1::ExitReason::Stopped);
    assert_eq!(exit.signal, Some(15), "sh died of the SIGTERM");
    assert!(exit.finished_at.is_some());
    assert_eq!(stopped.pid, 0);
    eventually(
        Duration::from_secs(5),
        "no process of the group alive",
        || async { procfs::alive_in_group(pgid).is_empty().then_some(()) },
    )
    .await;
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_paused_agent_that_ignores_sigterm_escalates_to_sigkill() {
    let cluster = TestCluster::builder().start().await;
    let mut c = cluster.client().await;
    let agent = cluster
        .spawn(&["sh", "-c", "trap '' TERM; sleep 1000 & wait; wait"])
        .await;
    c.pause_agent(PauseAgentRequest {
        id: agent.id.clone(),
    })
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let stopped = c
        .stop_agent(StopAgentRequest {
            id: agent.id.clone(),
            grace: Some(prost_duration(Duration::from_millis(500))),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "waited the grace"
    );
    assert_eq!(stopped.state(), AgentState::Exited);
    assert_eq!(
        stopped.exit.unwrap().signal,
        Some(9),
        "SIGKILL after the grace"
    );
    eventually(Duration::from_secs(5), "group gone", || async {
        procfs::alive_in_group(agent.pid).is_empty().then_some(())
    })
    .await;
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_answers_only_once_every_process_has_stopped() {
    let cluster = TestCluster::builder().start().await;
    // 200 busy processes on 2 cores: most are waiting for a CPU when the
    // SIGSTOP is sent, and each stops only when it next runs (without the
    // wait for them, 3 to 73 of them were still running when PAUSED came
    // back). .config/nextest.toml runs this test alone: it starves others.
    let agent = cluster
        .spawn(&[
            "sh",
            "-c",
            "for i in $(seq 200); do (while :; do :; done) & done; wait",
        ])
        .await;
    eventually(Duration::from_secs(5), "201 processes run", || async {
        (procfs::alive_in_group(agent.pid).len() == 201).then_some(())
    })
    .await;
    // The host agent directly, and /proc read at once: no time for stragglers.
    let mut host = cluster.host_agent(0);
    let mut slowest = Duration::ZERO;
    for round in 0..5 {
        let t = std::time::Instant::now();
        let paused = host
            .pause_agent(HostAgentRef {
                id: agent.id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        slowest = slowest.max(t.elapsed());
        let procs = procfs::alive_in_group(agent.pid);
        let running: Vec<_> = procs.iter().filter(|p| !p.paused()).collect();
        assert!(
            running.is_empty(),
            "round {round}: PAUSED ({}) answered with {} of {} processes not stopped: {running:?}",
            paused.state,
            running.len(),
            procs.len()
        );
        host.resume_agent(HostAgentRef {
            id: agent.id.clone(),
        })
        .await
        .unwrap();
    }
    eprintln!("pause of 201 busy processes: slowest answer {slowest:?}");
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_and_failed_starts_are_recorded() {
    let cluster = TestCluster::builder().start().await;
    let mut c = cluster.client().await;

    let a = cluster.spawn(&["sh", "-c", "exit 3"]).await;
    let ended = cluster
        .wait_state(&a.id, AgentState::Exited, Duration::from_secs(5))
        .await;
    let exit = ended.exit.unwrap();
    assert_eq!(exit.code, Some(3));
    assert_eq!(exit.signal, None);
    assert_eq!(exit.reason(), agentplane::proto::v1::ExitReason::Completed);

    let missing = cluster
        .spawn(&["/nonexistent/agentplane-no-such-binary", "x"])
        .await;
    assert_eq!(missing.state(), AgentState::Failed);
    let exit = missing.exit.unwrap();
    assert_eq!(
        exit.reason(),
        agentplane::proto::v1::ExitReason::SpawnFailed
    );
    assert!(
        exit.error.contains("No such file or directory"),
        "OS error in record: {}",
        exit.error
    );
    assert!(
        exit.error.contains("agentplane-no-such-binary"),
        "names the program: {}",
        exit.error
    );

    let bad_cwd = cluster
        .spawn_spec(AgentSpec {
            argv: vec!["true".into()],
            cwd: "/nonexistent-dir-agentplane".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(bad_cwd.state(), AgentState::Failed);
    assert!(bad_cwd.exit.unwrap().error.contains("working directory"));

    // Nothing crashed: the same host still runs agents.
    let ok = cluster.spawn(&["sleep", "1000"]).await;
    assert_eq!(ok.state(), AgentState::Running);
    let killed = c
        .kill_agent(KillAgentRequest {
            id: ok.id.clone(),
            signal: 9,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(killed.state(), AgentState::Exited);
    assert_eq!(
        killed.exit.unwrap().reason(),
        agentplane::proto::v1::ExitReason::Killed
    );
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_inherits_only_its_stdio_not_other_agents_terminals_or_pipes() {
    let cluster = TestCluster::builder().start().await;
    let sleeper = |tty: bool| AgentSpec {
        argv: vec!["sleep".into(), "1000".into()],
        tty,
        ..Default::default()
    };
    // Terminals and pipes of earlier agents are open in the host agent while
    // the later ones start: none of them may reach a later agent.
    let mut agents = Vec::new();
    for tty in [true, false, false, true, false, true, false] {
        agents.push((tty, cluster.spawn_spec(sleeper(tty)).await));
    }
    for (tty, a) in &agents {
        assert_eq!(a.state(), AgentState::Running, "{a:?}");
        // `sleep` is exec'd directly: the record's pid is the program itself,
        // and spawn returned after its exec.
        let fds = procfs::fds(a.pid);
        let numbers: Vec<i32> = fds.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            numbers,
            [0, 1, 2],
            "agent {} (tty: {tty}) has exactly fds 0, 1, 2: {fds:?}",
            a.id
        );
        for (_, target) in &fds {
            if *tty {
                assert!(target.starts_with("/dev/pts/"), "{fds:?}");
            } else {
                assert!(target.starts_with("pipe:"), "{fds:?}");
            }
        }
    }
    // The host agent's own descriptors close at every exec (its guard's and
    // agents'), but for what it inherited itself from this test process.
    let host = i32::try_from(cluster.hosts[0].proc.child.id()).expect("pid");
    let ours: Vec<String> = procfs::fds(std::process::id().try_into().expect("pid"))
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    let inheritable: Vec<(i32, String)> = procfs::fds(host)
        .into_iter()
        .filter(|(n, t)| {
            *n > 2
                && !ours.contains(t)
                && procfs::fd_flags(host, *n)
                    .is_some_and(|f| f & nix::fcntl::OFlag::O_CLOEXEC.bits() == 0)
        })
        .collect();
    assert!(
        inheritable.is_empty(),
        "the host agent opened these without O_CLOEXEC: {inheritable:?}"
    );
    // Two terminal agents never share a terminal.
    let terminals: std::collections::HashSet<String> = agents
        .iter()
        .filter(|(tty, _)| *tty)
        .map(|(_, a)| procfs::fds(a.pid)[0].1.clone())
        .collect();
    assert_eq!(terminals.len(), 3, "{terminals:?}");
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_codes_name_the_problem() {
    let cluster = TestCluster::builder().hosts(1).start().await;
    let mut c = cluster.client().await;

    // Illegal transitions on an ended agent.
    let a = cluster.spawn(&["true"]).await;
    cluster
        .wait_state(&a.id, AgentState::Exited, Duration::from_secs(5))
        .await;
    let e = c
        .pause_agent(PauseAgentRequest { id: a.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("EXITED"), "{}", e.message());
    let e = c
        .stop_agent(StopAgentRequest {
            id: a.id.clone(),
            grace: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = c
        .resume_agent(ResumeAgentRequest { id: a.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // Resume of a running agent, pause twice.
    let r = cluster.spawn(&["sleep", "1000"]).await;
    let e = c
        .resume_agent(ResumeAgentRequest { id: r.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);

    // Unknown ids.
    let e = c
        .get_agent(GetAgentRequest {
            id: "01aaaaaaaaaaaaaaaaaaaaaaaa".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = c
        .pause_agent(PauseAgentRequest {
            id: "01aaaaaaaaaaaaaaaaaaaaaaaa".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // Bad input names the field.
    let cases: Vec<(AgentSpec, &str)> = vec![
        (AgentSpec::default(), "spec.argv"),
        (
            AgentSpec {
                name: "Not_A_Name".into(),
                argv: vec!["true".into()],
                ..Default::default()
            },
            "spec.name",
        ),
        (
            AgentSpec {
                argv: vec!["true".into()],
                placement: Some(Placement {
                    host: "no-such-host".into(),
                    label_selector: String::new(),
                }),
                ..Default::default()
            },
            "spec.placement.host",
        ),
        (
            AgentSpec {
                argv: vec!["true".into()],
                placement: Some(Placement {
                    host: String::new(),
                    label_selector: "gpu".into(),
                }),
                ..Default::default()
            },
            "spec.placement.label_selector",
        ),
        (
            AgentSpec {
                argv: vec!["true".into()],
                labels: [("k".to_owned(), "v w".to_owned())].into(),
                ..Default::default()
            },
            "spec.labels",
        ),
    ];
    for (spec, field) in cases {
        let e = c
            .spawn_agent(SpawnAgentRequest {
                spec: Some(spec),
                request_id: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(
            e.message().starts_with(&format!("{field}:")),
            "message names {field}: {}",
            e.message()
        );
    }
    let e = c
        .list_agents(ListAgentsRequest {
            label_selector: "team".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().starts_with("label_selector:"),
        "{}",
        e.message()
    );
    let e = c
        .list_agents(ListAgentsRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .kill_agent(KillAgentRequest {
            id: r.id.clone(),
            signal: 19,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "SIGSTOP is refused: {e:?}");
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_room_is_resource_exhausted_and_list_filters() {
    let cluster = TestCluster::builder()
        .hosts(2)
        .max_agents(2)
        .host_label(1, "zone=b")
        .start()
        .await;
    let mut c = cluster.client().await;
    let in_b = cluster
        .spawn_spec(AgentSpec {
            argv: vec!["sleep".into(), "1000".into()],
            labels: [("team".to_owned(), "x".to_owned())].into(),
            placement: Some(Placement {
                host: String::new(),
                label_selector: "zone=b".into(),
            }),
            ..Default::default()
        })
        .await;
    assert_eq!(in_b.host, "h2");
    for _ in 0..3 {
        cluster.spawn(&["sleep", "1000"]).await;
    }
    // 4 of 4 slots taken (the hosts enforce their own --max-agents).
    let e = c
        .spawn_agent(SpawnAgentRequest {
            spec: Some(AgentSpec {
                argv: vec!["sleep".into(), "1".into()],
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");

    // The failed spawn left no record behind.
    let all = c
        .list_agents(ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.agents.len(), 4, "{:?}", all.agents);
    let on_h2 = c
        .list_agents(ListAgentsRequest {
            host: "h2".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // Every slot is taken, so h2 runs exactly its --max-agents: the agent
    // placed there by label and one of the three others.
    let mut want: Vec<&str> = all
        .agents
        .iter()
        .filter(|a| a.host == "h2")
        .map(|a| a.id.as_str())
        .collect();
    let mut got: Vec<&str> = on_h2.agents.iter().map(|a| a.id.as_str()).collect();
    want.sort_unstable();
    got.sort_unstable();
    assert_eq!(want.len(), 2, "h2 is full: {:?}", all.agents);
    assert_eq!(got, want, "--host h2 lists exactly h2's agents");
    let team = c
        .list_agents(ListAgentsRequest {
            label_selector: "team=x".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(team.agents.len(), 1);
    assert_eq!(team.agents[0].id, in_b.id);
    let running = c
        .list_agents(ListAgentsRequest {
            state: AgentState::Running as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(running.agents.len(), 4);
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_pages_with_scan_tokens_sees_every_agent_once() {
    let cluster = TestCluster::builder().hosts(2).start().await;
    let mut c = cluster.client().await;
    let mut ids = Vec::new();
    for _ in 0..25 {
        ids.push(cluster.spawn(&["sleep", "1000"]).await.id);
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = c
            .list_agents(ListAgentsRequest {
                page_size: 4,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        seen.extend(page.agents.into_iter().map(|a| a.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        assert!(pages < 100, "paging terminates");
    }
    assert!(pages > 1, "25 agents at page_size 4 take several pages");
    seen.sort();
    ids.sort();
    assert_eq!(seen, ids);
    cluster.finish().await;
}

fn prost_duration(d: Duration) -> prost_types::Duration {
    agentplane::time::duration_to_proto(d)
}
