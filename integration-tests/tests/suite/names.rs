//! Names are addresses (P10): every agentctl command that takes an agent
//! takes its name too, a name cannot have an id's shape, and `ls` shows a
//! crash-looping agent's restarts (`-o json` has `restarts`).

use std::time::Duration;

use agentplane_integration_tests::{eventually, TestCluster};

fn ok(out: &std::process::Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_takes_a_name_and_names_cannot_look_like_ids() {
    let cluster = TestCluster::builder().start().await;
    let spawned = ok(&cluster.agentctl(&[
        "-o",
        "json",
        "spawn",
        "--name",
        "demo",
        "--",
        "sh",
        "-c",
        "echo hello-from-demo; exec sleep 1000",
    ]));
    let agent: serde_json::Value = serde_json::from_str(&spawned).expect("json");
    let id = agent["id"].as_str().expect("id").to_owned();

    let got: serde_json::Value =
        serde_json::from_str(&ok(&cluster.agentctl(&["-o", "json", "get", "demo"]))).expect("json");
    assert_eq!(got["id"], id.as_str());
    assert_eq!(got["name"], "demo");
    assert!(ok(&cluster.agentctl(&["locate", "demo"])).contains(&id));
    eventually(Duration::from_secs(10), "logs by name", || async {
        ok(&cluster.agentctl(&["logs", "demo"]))
            .contains("hello-from-demo")
            .then_some(())
    })
    .await;
    assert!(ok(&cluster.agentctl(&["pause", "demo"])).contains("PAUSED"));
    assert!(ok(&cluster.agentctl(&["resume", "demo"])).contains("RUNNING"));
    ok(&cluster.agentctl(&["send", "demo", "x"]));
    // watch --agent takes the name, and its events show it (host events
    // come too: the first is the host's; on a Redis Cluster the host
    // events are another stream, read beside the agent's, so it may not be).
    let events = ok(&cluster.agentctl(&[
        "-o", "json", "watch", "--since", "0", "--agent", "demo", "--count", "3",
    ]));
    let events: Vec<serde_json::Value> = events
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
        .filter(|e| e["agent_id"] != "")
        .collect();
    if cluster.on_redis_cluster() {
        assert!(events.len() >= 2, "{events:?}");
    } else {
        assert_eq!(events.len(), 2, "{events:?}");
    }
    assert!(
        events
            .iter()
            .all(|e| e["agent_id"] == id.as_str() && e["agent_name"] == "demo"),
        "{events:?}"
    );
    let table =
        ok(&cluster.agentctl(&["watch", "--since", "0", "--agent", "demo", "--count", "3"]));
    assert!(table.contains(&format!("demo ({id})")), "{table}");
    ok(&cluster.agentctl(&["stop", "demo"]));
    ok(&cluster.agentctl(&["rm", "demo"]));
    let gone = cluster.agentctl(&["get", "demo"]);
    assert!(!gone.status.success());
    assert!(
        String::from_utf8_lossy(&gone.stderr).contains("NOT_FOUND"),
        "{}",
        String::from_utf8_lossy(&gone.stderr)
    );

    // An id's shape is an id's: such a name is refused, naming the field.
    let idlike = cluster.agentctl(&[
        "spawn",
        "--name",
        "01m96j39kvbv11ajjf93npncmj",
        "--",
        "true",
    ]);
    assert!(!idlike.status.success());
    let err = String::from_utf8_lossy(&idlike.stderr);
    assert!(
        err.contains("INVALID_ARGUMENT") && err.contains("shape of an agent id"),
        "{err}"
    );
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ls_shows_a_crash_loops_restarts_and_json_has_them() {
    let cluster = TestCluster::builder().start().await;
    ok(&cluster.agentctl(&[
        "spawn",
        "--name",
        "crashy",
        "--restart",
        "always",
        "--backoff",
        "100ms",
        "--max-backoff",
        "200ms",
        "--",
        "sh",
        "-c",
        "exit 3",
    ]));
    let restarts = eventually(Duration::from_secs(20), "two restarts", || async {
        let out = ok(&cluster.agentctl(&["-o", "json", "get", "crashy"]));
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        let n = v["restarts"].as_u64()?;
        (n >= 2).then_some(n)
    })
    .await;
    let table = ok(&cluster.agentctl(&["ls"]));
    let header = table.lines().next().expect("header");
    assert!(header.contains("RESTARTS"), "{table}");
    let row = table
        .lines()
        .find(|l| l.contains("crashy"))
        .unwrap_or_else(|| panic!("no crashy row: {table}"));
    // kubectl's form: the count, then how long ago the last run ended.
    let cell_at = header.find("RESTARTS").expect("column");
    let cell = row[cell_at..].split("  ").next().unwrap_or_default().trim();
    let n: u64 = cell
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("RESTARTS cell {cell:?} in {table}"));
    assert!(n >= restarts, "{table}");
    assert!(cell.ends_with("s ago)"), "{cell:?} in {table}");
    cluster.finish().await;
}
