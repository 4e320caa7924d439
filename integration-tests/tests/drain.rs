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
    // The drain stops it on h1 (EXITED, STOPPED), then starts it on h2.
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
    // The wait goes on with the moved agent. (A drain records EXITED for the
    // milliseconds between the stop and the relocation; a poll landing there
    // would end the wait: see the note on issue #5.)
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
