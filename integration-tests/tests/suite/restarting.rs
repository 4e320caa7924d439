//! A host whose host agent is away but whose keeper is alive is restarting,
//! not lost: its keeper renews `ap:keeper:{host}`, the control plane leaves
//! its agents RUNNING past the heartbeat TTL and `hosts ls` says
//! "restarting". A machine that dies (host agent and keeper gone) is still
//! lost within the TTL, and a keeper whose grace ends ends its agents and
//! lets the host be lost at once.

use std::time::{Duration, Instant};

use agentplane::proto::v1::restart_policy::Mode;
use agentplane::proto::v1::{Agent, AgentState, GetAgentRequest, ListHostsRequest};
use agentplane_integration_tests::output::counter_lines;
use agentplane_integration_tests::{procfs, spec, TestCluster};
use nix::sys::signal::Signal;

const TTL: Duration = Duration::from_millis(1500);

async fn cluster(grace: &str) -> TestCluster {
    TestCluster::builder()
        .hosts(1)
        .heartbeat_ttl(TTL)
        .host_arg(&format!("--orphan-grace={grace}"))
        .start()
        .await
}

/// A restart-always agent and a run-once one, running on h1.
async fn two_agents(cluster: &TestCluster) -> Vec<Agent> {
    let mut agents = vec![
        cluster
            .spawn_spec(spec(&["sleep", "1000"], Some(Mode::Always)))
            .await,
        cluster.spawn_spec(spec(&["sleep", "1000"], None)).await,
    ];
    for a in &mut agents {
        *a = cluster
            .wait_state(&a.id, AgentState::Running, Duration::from_secs(5))
            .await;
    }
    agents
}

async fn record(cluster: &TestCluster, id: &str) -> Agent {
    cluster
        .client()
        .await
        .get_agent(GetAgentRequest { id: id.into() })
        .await
        .expect("get")
        .into_inner()
}

async fn exists(cluster: &TestCluster, key: &str) -> bool {
    let mut conn = cluster.redis_conn().await;
    redis::AsyncCommands::exists(&mut conn, key)
        .await
        .expect("redis")
}

async fn kill_host_agent(cluster: &mut TestCluster) -> Instant {
    let killed = Instant::now();
    cluster.end_host_agent("h1", Signal::SIGKILL).await;
    killed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_host_agents_host_is_restarting_and_its_agents_stay_running_past_the_ttl() {
    let mut cluster = cluster("10m").await;
    let agents = two_agents(&cluster).await;
    let old = agents[0].incarnation.clone();
    let killed = kill_host_agent(&mut cluster).await;
    // Four TTLs without a host agent: the heartbeat key expires, and still
    // nothing is LOST, nothing restarts, and the host shows restarting.
    let mut hosts = cluster.host_client().await;
    let mut seen_restarting = None;
    while killed.elapsed() < 4 * TTL {
        for a in &agents {
            assert!(procfs::is_alive(a.pid), "{} was ended", a.id);
            let r = record(&cluster, &a.id).await;
            assert_eq!(
                (r.state(), r.pid, r.generation),
                (AgentState::Running, a.pid, a.generation),
                "{} changed while its host restarts",
                a.id
            );
        }
        if seen_restarting.is_none() && !exists(&cluster, &cluster.keys().host("h1")).await {
            assert!(
                exists(&cluster, &cluster.keys().keeper("h1")).await,
                "the keeper says the machine is alive"
            );
            let listed = hosts
                .list_hosts(ListHostsRequest {})
                .await
                .expect("list hosts")
                .into_inner()
                .hosts;
            let h1 = listed.iter().find(|h| h.id == "h1").expect("h1 is listed");
            assert!(h1.restarting_until.is_some(), "{h1:?}");
            seen_restarting = Some(killed.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen = seen_restarting.expect("the heartbeat key expired and the host showed restarting");
    let out = cluster.agentctl(&["hosts", "ls"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("restarting"), "{table}");
    eprintln!(
        "host agent SIGKILLed: heartbeat key gone and host restarting after {seen:?}; agents RUNNING and unrestarted for {:?} (TTL {TTL:?})",
        killed.elapsed()
    );
    // The next host agent adopts them: same pids and generations.
    cluster.restart_host("h1");
    let deadline = Instant::now() + Duration::from_secs(10);
    for a in &agents {
        loop {
            let r = record(&cluster, &a.id).await;
            assert_eq!(
                (r.state(), r.pid, r.restarts),
                (AgentState::Running, a.pid, 0)
            );
            if r.incarnation != old {
                break;
            }
            assert!(Instant::now() < deadline, "{} not adopted", a.id);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    cluster.wait_for_hosts(1).await;
    let out = cluster.agentctl(&["hosts", "ls"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("restarting"));
    // Restart policies keep their meaning: killed, the restart-always agent
    // runs again and the run-once one ends, as under its first host agent.
    for a in &agents {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(a.pid), Signal::SIGKILL).expect("kill");
    }
    let again = cluster
        .wait_agent(&agents[0].id, "restarted", Duration::from_secs(10), |r| {
            r.state() == AgentState::Running && r.restarts == 1 && r.pid != agents[0].pid
        })
        .await;
    assert_eq!(again.generation, agents[0].generation);
    let ended = cluster
        .wait_agent(&agents[1].id, "ended", Duration::from_secs(10), |r| {
            !matches!(r.state(), AgentState::Running)
        })
        .await;
    assert_eq!(
        ended.exit.as_ref().and_then(|e| e.signal),
        Some(9),
        "{ended:?}"
    );
    assert_eq!(ended.restarts, 0);
    cluster.finish().await;
}

/// Polls until every agent's record is LOST; how long that took from `from`.
async fn wait_lost(cluster: &TestCluster, agents: &[Agent], from: Instant) -> Duration {
    let deadline = Instant::now() + 5 * TTL;
    for a in agents {
        while record(cluster, &a.id).await.state() != AgentState::Lost {
            assert!(Instant::now() < deadline, "{} never went LOST", a.id);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    from.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_machine_is_lost_within_the_ttl_whatever_its_keeper_said() {
    let mut cluster = cluster("10m").await;
    let agents = two_agents(&cluster).await;
    let keeper = cluster.keeper_pid("h1").expect("a keeper");
    kill_host_agent(&mut cluster).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !exists(&cluster, &cluster.keys().keeper("h1")).await {
        assert!(Instant::now() < deadline, "the keeper never wrote its key");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The rest of the machine dies.
    let died = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(keeper), Signal::SIGKILL).expect("kill");
    let lost = wait_lost(&cluster, &agents, died).await;
    for a in &agents {
        assert!(!procfs::is_alive(a.pid), "{} outlived its keeper", a.id);
    }
    let beat = TTL / 3;
    eprintln!("machine dead (keeper SIGKILLed after writing its key): agents LOST {lost:?} later (TTL {TTL:?}, a beat {beat:?})");
    assert!(lost <= TTL + beat + Duration::from_millis(400), "{lost:?}");
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grace_longer_than_the_ttl_holds_the_agents_then_ends_them_and_the_host_is_lost() {
    let grace = 2 * TTL;
    let mut cluster = cluster("3s").await;
    let agents = two_agents(&cluster).await;
    let killed = kill_host_agent(&mut cluster).await;
    // Past the TTL, before the grace: held.
    while killed.elapsed() < grace - Duration::from_millis(300) {
        for a in &agents {
            assert!(procfs::is_alive(a.pid));
            assert_eq!(record(&cluster, &a.id).await.state(), AgentState::Running);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lost = wait_lost(&cluster, &agents, killed).await;
    for a in &agents {
        assert!(!procfs::is_alive(a.pid), "{} outlived the grace", a.id);
    }
    assert!(
        !exists(&cluster, &cluster.keys().keeper("h1")).await,
        "the keeper deleted its key"
    );
    eprintln!("orphan grace {grace:?} (TTL {TTL:?}): agents held, then ended and LOST {lost:?} after the host agent's SIGKILL");
    assert!(lost >= grace, "{lost:?}");
    assert!(
        lost <= grace + Duration::from_secs(1),
        "lost soon after the grace: {lost:?}"
    );
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_rm_holds_its_agent_across_a_host_agent_restart_and_prints_every_line_once() {
    use std::io::Read as _;
    use std::sync::{Arc, Mutex};
    let mut cluster = TestCluster::builder().hosts(1).start().await;
    let counter = "i=0; while :; do echo $i; i=$((i+1)); sleep 0.01; done";
    let mut run = cluster
        .agentctl_all(&["run", "--rm", "--", "sh", "-c", counter])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start agentctl run");
    let printed = Arc::new(Mutex::new(Vec::<u8>::new()));
    let mut out = run.stdout.take().expect("stdout");
    let sink = printed.clone();
    std::thread::spawn(move || {
        let mut b = [0u8; 4096];
        while let Ok(n) = out.read(&mut b) {
            if n == 0 {
                return;
            }
            sink.lock().unwrap().extend_from_slice(&b[..n]);
        }
    });
    let lines = |p: &Arc<Mutex<Vec<u8>>>| -> Vec<u64> { counter_lines(&p.lock().unwrap()) };
    let wait_lines = |n: usize, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while lines(&printed).len() < n {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_lines(20, "agentctl run printed its agent's output");
    let agent = cluster
        .client()
        .await
        .list_agents(agentplane::proto::v1::ListAgentsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .agents
        .remove(0);
    kill_host_agent(&mut cluster).await;
    let restarted = Instant::now();
    cluster.restart_host("h1");
    let before = lines(&printed).len();
    wait_lines(before + 200, "output goes on after the restart");
    // Past the session grace (2 s) after the adoption: the reconnected
    // session holds the agent.
    while restarted.elapsed() < Duration::from_secs(4) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        procfs::is_alive(agent.pid),
        "the session-bound agent is held"
    );
    assert_eq!(
        record(&cluster, &agent.id).await.state(),
        AgentState::Running
    );
    let got = lines(&printed);
    let faults = got.windows(2).filter(|w| w[1] != w[0] + 1).count();
    eprintln!(
        "run --rm across a host-agent SIGKILL: {} lines printed, {faults} gaps or duplicates",
        got.len()
    );
    assert_eq!(got.first(), Some(&0));
    assert_eq!(faults, 0, "every line once, in order");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(run.id()).expect("pid")),
        Signal::SIGKILL,
    )
    .expect("kill agentctl");
    let _ = run.wait();
    let mut err = String::new();
    run.stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("stderr");
    assert!(err.contains("resuming"), "agentctl said it resumed: {err}");
    // The lost session still ends it, under the new host agent.
    procfs::wait_gone(&agent.id, Duration::from_secs(8)).await;
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_waiting_out_its_backoff_keeps_its_deadline_across_a_host_agent_restart() {
    let mut cluster = cluster("10m").await;
    let mut s = spec(&["sh", "-c", "exit 1"], Some(Mode::Always));
    if let Some(r) = s.restart.as_mut() {
        r.initial_backoff = Some(prost_types::Duration {
            seconds: 4,
            nanos: 0,
        });
    }
    let a = cluster.spawn_spec(s).await;
    let waiting = cluster
        .wait_agent(&a.id, "in its backoff", Duration::from_secs(10), |r| {
            r.state() == AgentState::Pending && r.next_restart_at.is_some()
        })
        .await;
    let due = waiting.next_restart_at.expect("a deadline");
    kill_host_agent(&mut cluster).await;
    cluster.restart_host("h1");
    // Adopted (the record carries the new incarnation), still waiting, for
    // the same deadline: not a fresh backoff from the adoption.
    let adopted = cluster
        .wait_agent(&a.id, "adopted", Duration::from_secs(10), |r| {
            r.incarnation != waiting.incarnation
        })
        .await;
    assert_eq!(adopted.state(), AgentState::Pending, "{adopted:?}");
    assert_eq!(adopted.pid, 0);
    assert_eq!(
        adopted.next_restart_at,
        Some(due),
        "the earlier deadline holds"
    );
    // Then it restarts once, and the next backoff doubles from there.
    let again = cluster
        .wait_agent(&a.id, "restarted", Duration::from_secs(10), |r| {
            r.restarts == 1
        })
        .await;
    assert_eq!(again.generation, a.generation);
    let next = cluster
        .wait_agent(&a.id, "waiting again", Duration::from_secs(10), |r| {
            r.restarts == 1 && r.state() == AgentState::Pending && r.next_restart_at != Some(due)
        })
        .await;
    let gap = agentplane::time::ms_from_timestamp(next.next_restart_at.as_ref().expect("due"))
        - agentplane::time::ms_from_timestamp(&due);
    eprintln!("backoff across a host-agent SIGKILL: deadline kept; the next one {gap} ms later (8 s +-20% doubled from 4 s)");
    assert!(
        (6_400..=10_600).contains(&gap),
        "the second backoff doubled once (8 s +-20%, after a run of about nothing): {gap} ms"
    );
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_follow_goes_on_across_a_host_agent_restart_with_every_byte_once() {
    let mut cluster = TestCluster::builder().hosts(1).start().await;
    let lines = 1500;
    let counter =
        format!("i=0; while [ $i -lt {lines} ]; do echo $i; i=$((i+1)); sleep 0.002; done");
    let a = cluster
        .spawn_spec(spec(&["sh", "-c", &counter], None))
        .await;
    let follow = cluster
        .agentctl_all(&["logs", "-f", &a.id])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start agentctl logs -f");
    cluster.wait_for_output(&a.id, "\n100\n").await;
    kill_host_agent(&mut cluster).await;
    cluster.restart_host("h1");
    // It ends by itself once the agent has ended and everything is printed.
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || follow.wait_with_output()),
    )
    .await
    .expect("logs -f ended with its agent")
    .expect("join")
    .expect("agentctl output");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let want: String = (0..lines).map(|i| format!("{i}\n")).collect();
    assert!(
        out.stdout == want.as_bytes(),
        "every byte once, in order: {} bytes printed of {}; stderr: {err}",
        out.stdout.len(),
        want.len()
    );
    let reconnects = err.matches("log stream broke").count();
    eprintln!("logs -f across a host-agent SIGKILL: {} bytes, exactly the output; {reconnects} reconnect(s); stderr: {err}", out.stdout.len());
    assert!(reconnects <= 1, "at most a reconnect: {err}");
    let ended = record(&cluster, &a.id).await;
    assert_eq!(ended.state(), AgentState::Exited);
    assert_eq!((ended.started_at, ended.restarts), (a.started_at, 0));
    cluster.finish().await;
}
