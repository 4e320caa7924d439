//! Cordon and drain through agentctl.

use std::time::Duration;

use agentplane_integration_tests::{procfs, TestCluster};
use serde_json::Value;

fn ok_json(out: &std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "agentctl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cordon_keeps_agents_away_and_drain_moves_restartable_agents_then_ends_empty() {
    let ttl = Duration::from_millis(900);
    let cluster = TestCluster::builder()
        .hosts(2)
        .heartbeat_ttl(ttl)
        .start()
        .await;
    let cordoned = ok_json(&cluster.agentctl(&["-o", "json", "hosts", "cordon", "h2"]));
    assert_eq!(cordoned[0]["cordoned"], true);
    // The cordon survives the host's own heartbeats.
    tokio::time::sleep(ttl).await;
    let hosts = ok_json(&cluster.agentctl(&["-o", "json", "hosts", "ls"]));
    assert_eq!(hosts[1]["id"], "h2");
    assert_eq!(hosts[1]["cordoned"], true);

    let mut movable = Vec::new();
    for _ in 0..4 {
        let a = ok_json(&cluster.agentctl(&[
            "-o",
            "json",
            "spawn",
            "--restart",
            "always",
            "--",
            "sleep",
            "1000",
        ]));
        assert_eq!(a["host"], "h1", "nothing lands on the cordoned h2");
        movable.push(a["id"].as_str().unwrap().to_owned());
    }
    let fixed = ok_json(&cluster.agentctl(&["-o", "json", "spawn", "--", "sleep", "1000"]));
    assert_eq!(fixed["host"], "h1");
    ok_json(&cluster.agentctl(&["-o", "json", "hosts", "uncordon", "h2"]));

    let drain = cluster.agentctl(&["hosts", "drain", "h1", "--force", "--timeout", "60s"]);
    let progress = String::from_utf8_lossy(&drain.stdout).into_owned();
    assert!(
        drain.status.success(),
        "drain failed: {}\n{progress}",
        String::from_utf8_lossy(&drain.stderr)
    );
    assert!(
        progress.lines().count() >= 2,
        "progress is shown:\n{progress}"
    );
    assert!(progress.trim_end().ends_with("h1 is empty"), "{progress}");
    assert!(progress.contains("moved"), "{progress}");

    for id in &movable {
        let a = ok_json(&cluster.agentctl(&["-o", "json", "get", id]));
        assert_eq!(a["host"], "h2", "{id} moved");
        assert_eq!(a["state"], "RUNNING");
        assert_eq!(a["generation"], 2);
        let procs = procfs::agent_processes(id);
        assert_eq!(procs.len(), 1, "one process of {id}: {procs:?}");
    }
    let f = ok_json(&cluster.agentctl(&["-o", "json", "get", fixed["id"].as_str().unwrap()]));
    assert_eq!(
        f["state"], "EXITED",
        "the unmovable agent was stopped (--force)"
    );
    let on_h1 =
        ok_json(&cluster.agentctl(&["-o", "json", "ls", "--host", "h1", "--state", "running"]));
    assert_eq!(on_h1.as_array().unwrap().len(), 0);
    let hosts = ok_json(&cluster.agentctl(&["-o", "json", "hosts", "ls"]));
    assert_eq!(hosts[0]["cordoned"], true, "a drained host stays cordoned");
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_wait_follows_a_drained_agent_to_its_new_host_and_ends_with_it() {
    let cluster = TestCluster::builder().hosts(2).start().await;
    ok_json(&cluster.agentctl(&["-o", "json", "hosts", "cordon", "h2"]));
    let waiting = cluster
        .agentctl_all(&[
            "-o",
            "json",
            "spawn",
            "--wait",
            "--restart",
            "always",
            "--",
            "sleep",
            "1001",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start agentctl spawn --wait");
    let running = agentplane_integration_tests::eventually(
        Duration::from_secs(10),
        "the waited-for agent runs on h1",
        || async {
            let all = ok_json(&cluster.agentctl(&["-o", "json", "ls", "--state", "running"]));
            all.as_array()?
                .iter()
                .find(|a| a["argv"][1] == "1001" && a["host"] == "h1")
                .cloned()
        },
    )
    .await;
    let id = running["id"].as_str().expect("id").to_owned();
    ok_json(&cluster.agentctl(&["-o", "json", "hosts", "uncordon", "h2"]));
    // The drain reassigns it to h2, stops the copy on h1, starts it on h2.
    let drain = cluster.agentctl(&["hosts", "drain", "h1", "--timeout", "60s"]);
    assert!(
        drain.status.success(),
        "{}",
        String::from_utf8_lossy(&drain.stderr)
    );
    let moved = ok_json(&cluster.agentctl(&["-o", "json", "get", &id]));
    assert_eq!(
        (moved["host"].as_str(), moved["generation"].as_u64()),
        (Some("h2"), Some(2))
    );
    // The wait goes on with the moved agent: the record never said it ended.
    let mut waiting = waiting;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        waiting.try_wait().expect("try_wait").is_none(),
        "spawn --wait ended at the drain"
    );
    let stopped = ok_json(&cluster.agentctl(&["-o", "json", "stop", &id]));
    assert_eq!(stopped["state"], "EXITED");
    let out = tokio::task::spawn_blocking(move || waiting.wait_with_output())
        .await
        .expect("join")
        .expect("agentctl spawn --wait output");
    assert_eq!(
        out.status.code(),
        Some(128 + 15),
        "the code of the SIGTERMed sleep: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last: Value = serde_json::from_slice(&out.stdout).expect("the final record");
    assert_eq!(last["id"], id.as_str());
    assert_eq!(
        (last["host"].as_str(), last["generation"].as_u64()),
        (Some("h2"), Some(2))
    );
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_never_reports_an_end_for_a_moved_agent() {
    let cluster = TestCluster::builder().hosts(2).start().await;
    ok_json(&cluster.agentctl(&["-o", "json", "hosts", "cordon", "h2"]));
    let mut moved = Vec::new();
    for _ in 0..4 {
        let a = ok_json(&cluster.agentctl(&[
            "-o",
            "json",
            "spawn",
            "--restart",
            "on-failure",
            "--grace",
            "2s",
            "--",
            "sleep",
            "1000",
        ]));
        moved.push(a["id"].as_str().expect("id").to_owned());
    }
    // One agent ends by itself during the drain: it counts as done.
    let quick = ok_json(&cluster.agentctl(&[
        "-o",
        "json",
        "spawn",
        "--restart",
        "on-failure",
        "--",
        "sh",
        "-c",
        "sleep 0.3",
    ]));
    ok_json(&cluster.agentctl(&["-o", "json", "hosts", "uncordon", "h2"]));
    let (mut watch, events) = cluster.watch_json();
    let drain = cluster.agentctl(&["hosts", "drain", "h1", "--timeout", "60s"]);
    assert!(
        drain.status.success(),
        "{}",
        String::from_utf8_lossy(&drain.stderr)
    );
    for id in &moved {
        let a = ok_json(&cluster.agentctl(&["-o", "json", "get", id]));
        assert_eq!(
            (a["host"].as_str(), a["state"].as_str()),
            (Some("h2"), Some("RUNNING"))
        );
        assert_eq!(procfs::agent_processes(id).len(), 1, "{id} runs once");
    }
    // Every event up to the last move, as watchers saw them.
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while moved.iter().any(|id| {
        !seen.iter().any(|e: &Value| {
            e["agent_id"] == id.as_str() && e["state"] == "RUNNING" && e["generation"] == 2
        })
    }) {
        assert!(
            std::time::Instant::now() < deadline,
            "events of the moves: {seen:#?}"
        );
        if let Ok(e) = events.recv_timeout(Duration::from_millis(200)) {
            seen.push(e);
        }
    }
    let _ = watch.kill();
    for id in &moved {
        let mine: Vec<&Value> = seen
            .iter()
            .filter(|e| e["agent_id"] == id.as_str())
            .collect();
        assert!(
            mine.iter()
                .any(|e| e["type"] == "AGENT_MOVING" && e["host"] == "h2"),
            "{id}: {mine:#?}"
        );
        assert!(
            !mine
                .iter()
                .any(|e| matches!(e["state"].as_str(), Some("EXITED" | "FAILED" | "LOST"))),
            "{id} was reported ended: {mine:#?}"
        );
    }
    let q = ok_json(&cluster.agentctl(&["-o", "json", "get", quick["id"].as_str().expect("id")]));
    assert_eq!(q["state"], "EXITED", "{q}");
    cluster.finish().await;
}

/// Cordons h2 and spawns one `--restart always` agent (so on h1); its record.
fn always_on_h1_with_h2_cordoned(cluster: &TestCluster) -> Value {
    ok_json(&cluster.agentctl(&["-o", "json", "hosts", "cordon", "h2"]));
    let a = ok_json(&cluster.agentctl(&[
        "-o",
        "json",
        "spawn",
        "--restart",
        "always",
        "--",
        "sleep",
        "1000",
    ]));
    assert_eq!(a["host"], "h1");
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_with_no_room_elsewhere_leaves_its_agents_running() {
    let cluster = TestCluster::builder().hosts(2).start().await;
    let a = always_on_h1_with_h2_cordoned(&cluster);
    let id = a["id"].as_str().expect("id").to_owned();
    let drain = cluster.agentctl(&["hosts", "drain", "h1", "--timeout", "2s"]);
    let progress = String::from_utf8_lossy(&drain.stdout).into_owned();
    assert!(
        !drain.status.success(),
        "nowhere to go: the drain cannot finish"
    );
    assert!(
        progress.contains("until another host has room"),
        "{progress}"
    );
    let now = ok_json(&cluster.agentctl(&["-o", "json", "get", &id]));
    assert_eq!(
        (
            now["state"].as_str(),
            now["host"].as_str(),
            now["pid"].as_i64()
        ),
        (Some("RUNNING"), Some("h1"), a["pid"].as_i64()),
        "the agent was left alone"
    );
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_whose_replica_dies_is_finished_by_another() {
    let cluster = TestCluster::builder()
        .hosts(2)
        .control_planes(2)
        .start()
        .await;
    let a = always_on_h1_with_h2_cordoned(&cluster);
    let id = a["id"].as_str().expect("id").to_owned();
    // The drain runs on replica 0 and waits: h2 has no room yet.
    let mut draining = std::process::Command::new(agentplane_integration_tests::bin("agentctl"))
        .args(["hosts", "drain", "h1", "--timeout", "60s"])
        .env("AGENTPLANE_ENDPOINT", cluster.endpoint(0))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start agentctl hosts drain");
    let conn = cluster.redis_conn().await;
    let h1 = cluster.keys().host("h1");
    agentplane_integration_tests::eventually(Duration::from_secs(10), "h1 marked draining", || {
        let (mut conn, h1) = (conn.clone(), h1.clone());
        async move {
            let mark: Option<String> = redis::AsyncCommands::hget(&mut conn, &h1, "draining")
                .await
                .ok()?;
            mark
        }
    })
    .await;
    cluster.control_planes[0]
        .proc
        .signal(nix::sys::signal::Signal::SIGKILL);
    let _ = draining.kill();
    let _ = draining.wait();
    let out = cluster
        .agentctl_all(&["-o", "json", "hosts", "uncordon", "h2"])
        .output()
        .expect("agentctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Replica 1 finds the mark without a lease and finishes the drain.
    let moved = cluster
        .wait_agent_via(1, &id, "runs on h2", Duration::from_secs(15), |a| {
            a.state() == agentplane::proto::v1::AgentState::Running && a.host == "h2"
        })
        .await;
    assert_eq!(moved.generation, 2);
    assert_eq!(procfs::agent_processes(&id).len(), 1);
    agentplane_integration_tests::eventually(
        Duration::from_secs(10),
        "the draining mark cleared",
        || {
            let (mut conn, h1) = (conn.clone(), h1.clone());
            async move {
                let mark: Option<String> = redis::AsyncCommands::hget(&mut conn, &h1, "draining")
                    .await
                    .ok()?;
                mark.is_none().then_some(())
            }
        },
    )
    .await;
    cluster.finish().await;
}
