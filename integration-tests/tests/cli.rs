//! `agentctl` end to end, and the binaries' configuration contract.

use std::process::Command;
use std::time::Duration;

use agentplane_integration_tests::{bin, eventually, procfs, TestCluster};
use serde_json::Value;

fn json(out: &std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "agentctl failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agentctl_drives_the_whole_lifecycle_with_stable_json() {
    let cluster = TestCluster::builder().hosts(2).start().await;
    let spawned = json(&cluster.agentctl(&[
        "-o",
        "json",
        "spawn",
        "--name",
        "web",
        "--label",
        "team=a",
        "--env",
        "GREETING=hi",
        "--",
        "sh",
        "-c",
        "sleep 1000 & wait",
    ]));
    for field in [
        "id",
        "state",
        "host",
        "pid",
        "generation",
        "exit_code",
        "labels",
        "created_at",
    ] {
        assert!(spawned.get(field).is_some(), "field {field} in {spawned}");
    }
    assert_eq!(spawned["state"], "RUNNING");
    assert_eq!(spawned["name"], "web");
    assert_eq!(spawned["generation"], 1);
    assert_eq!(spawned["labels"]["team"], "a");
    assert!(spawned["exit_code"].is_null());
    let id = spawned["id"].as_str().unwrap().to_owned();
    let pid = i32::try_from(spawned["pid"].as_i64().unwrap()).unwrap();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(
        environ.split(|b| *b == 0).any(|kv| kv == b"GREETING=hi"),
        "--env reached the process"
    );

    let got = json(&cluster.agentctl(&["-o", "json", "get", &id]));
    assert_eq!(got["id"], id.as_str());
    let loc = json(&cluster.agentctl(&["-o", "json", "locate", &id]));
    assert_eq!(loc["host"], spawned["host"]);
    assert_eq!(loc["live"], true);
    let host = cluster
        .hosts
        .iter()
        .find(|h| h.host_id == loc["host"])
        .unwrap();
    assert_eq!(loc["address"], host.addr.as_str());

    let listed = json(&cluster.agentctl(&["-o", "json", "ls", "--selector", "team=a"]));
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let none = json(&cluster.agentctl(&["-o", "json", "ls", "--selector", "team=b"]));
    assert_eq!(none.as_array().unwrap().len(), 0);

    let paused = json(&cluster.agentctl(&["-o", "json", "pause", &id]));
    assert_eq!(paused["state"], "PAUSED");
    // PAUSED comes back once every process has stopped.
    let g = procfs::alive_in_group(pid);
    assert!(!g.is_empty() && g.iter().all(|p| p.state == 'T'), "{g:?}");
    let again = cluster.agentctl(&["pause", &id]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("FAILED_PRECONDITION"),
        "{}",
        stderr(&again)
    );
    let resumed = json(&cluster.agentctl(&["-o", "json", "resume", &id]));
    assert_eq!(resumed["state"], "RUNNING");

    let rm_running = cluster.agentctl(&["rm", &id]);
    assert!(
        !rm_running.status.success(),
        "rm of a running agent is refused"
    );
    assert!(stderr(&rm_running).contains("FAILED_PRECONDITION"));

    let stopped = json(&cluster.agentctl(&["-o", "json", "stop", "--grace", "1s", &id]));
    assert_eq!(stopped["state"], "EXITED");
    assert_eq!(stopped["exit_reason"], "STOPPED");
    assert_eq!(stopped["exit_signal"], 15);
    assert!(stopped["finished_at"].is_string());
    eventually(Duration::from_secs(5), "group gone", || async {
        procfs::alive_in_group(pid).is_empty().then_some(())
    })
    .await;

    let table = cluster.agentctl(&["ls"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.starts_with("ID"), "table header: {text}");
    assert!(text.contains(&id) && text.contains("EXITED"), "{text}");

    let rm = cluster.agentctl(&["rm", &id]);
    assert!(rm.status.success(), "{}", stderr(&rm));
    let gone = cluster.agentctl(&["get", &id]);
    assert!(!gone.status.success());
    assert!(stderr(&gone).contains("NOT_FOUND"), "{}", stderr(&gone));
    assert!(gone.stdout.is_empty(), "errors go to stderr only");

    let hosts = json(&cluster.agentctl(&["-o", "json", "hosts", "ls"]));
    let ids: Vec<&str> = hosts
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["h1", "h2"]);

    let killed = json(&cluster.agentctl(&["-o", "json", "spawn", "--", "sleep", "1000"]));
    let kid = killed["id"].as_str().unwrap();
    let k = json(&cluster.agentctl(&["-o", "json", "kill", "-s", "TERM", kid]));
    assert_eq!(k["id"], kid);
    let ended = eventually(Duration::from_secs(5), "killed agent recorded", || async {
        let v = json(&cluster.agentctl(&["-o", "json", "get", kid]));
        (v["state"] == "EXITED").then_some(v)
    })
    .await;
    assert_eq!(ended["exit_reason"], "KILLED");
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agentctl_reports_usage_and_server_errors_on_stderr_with_non_zero_exit() {
    let cluster = TestCluster::builder().start().await;
    let bad_label = cluster.agentctl(&["spawn", "--label", "novalue", "--", "true"]);
    assert_eq!(bad_label.status.code(), Some(2), "usage error");
    assert!(
        stderr(&bad_label).contains("KEY=VALUE"),
        "{}",
        stderr(&bad_label)
    );

    let bad_host = cluster.agentctl(&["spawn", "--host", "nowhere", "--", "true"]);
    assert_eq!(bad_host.status.code(), Some(1));
    assert!(
        stderr(&bad_host).contains("INVALID_ARGUMENT: spec.placement.host"),
        "{}",
        stderr(&bad_host)
    );

    let missing =
        json(&cluster.agentctl(&["-o", "json", "spawn", "--", "/no/such/agentplane-bin"]));
    assert_eq!(missing["state"], "FAILED");
    assert!(missing["error"]
        .as_str()
        .unwrap()
        .contains("No such file or directory"));

    let unreachable = Command::new(bin("agentctl"))
        .args(["--endpoint", "http://127.0.0.1:1", "ls"])
        .output()
        .unwrap();
    assert_eq!(unreachable.status.code(), Some(1));
    assert!(
        stderr(&unreachable).contains("UNAVAILABLE"),
        "{}",
        stderr(&unreachable)
    );
    assert!(
        stderr(&unreachable).contains("127.0.0.1:1"),
        "names the endpoint: {}",
        stderr(&unreachable)
    );
    cluster.finish().await;
}

#[test]
fn bad_configuration_exits_64_before_starting_anything() {
    let cases: &[(&str, &[&str])] = &[
        ("host-agent", &["--redis-url", "redis://127.0.0.1:1"]),
        ("host-agent", &["--host-id", "bad id"]),
        ("host-agent", &["--host-id", "h1", "--heartbeat-ttl", "10"]),
        ("host-agent", &["--host-id", "h1", "--label", "nokv"]),
        ("host-agent", &["--host-id", "h1", "--listen", "0.0.0.0:0"]),
        ("control-plane", &["--redis-url", "http://nope"]),
        ("control-plane", &["--listen", "not-an-address"]),
    ];
    for (name, args) in cases {
        let out = Command::new(bin(name))
            .args(*args)
            .env_remove("AGENTPLANE_HOST_ID")
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(64),
            "{name} {args:?}: {}",
            stderr(&out)
        );
        assert!(!stderr(&out).is_empty(), "{name} {args:?} says why");
    }
}
