//! `agentctl` end to end, and the binaries' configuration contract.

use std::process::Command;
use std::time::Duration;

use agentplane_integration_tests::output::{json, stderr, yaml};
use agentplane_integration_tests::{bin, eventually, procfs, TestCluster};
use serde_json::Value;

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
    assert!(!g.is_empty() && g.iter().all(|p| p.paused()), "{g:?}");
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
        (
            "host-agent",
            &["--insecure", "--redis-url", "redis://127.0.0.1:1"],
        ),
        ("host-agent", &["--insecure", "--host-id", "bad id"]),
        (
            "host-agent",
            &["--insecure", "--host-id", "h1", "--heartbeat-ttl", "10"],
        ),
        (
            "host-agent",
            &["--insecure", "--host-id", "h1", "--label", "nokv"],
        ),
        (
            "host-agent",
            &["--insecure", "--host-id", "h1", "--listen", "0.0.0.0:0"],
        ),
        // Neither TLS nor --insecure.
        ("host-agent", &["--host-id", "h1"]),
        ("control-plane", &[]),
        (
            "host-agent",
            &["--host-id", "h1", "--tls-cert", "/nonexistent.pem"],
        ),
        (
            "control-plane",
            &["--insecure", "--redis-url", "http://nope"],
        ),
        (
            "control-plane",
            &["--insecure", "--listen", "not-an-address"],
        ),
        // TLS files for a plaintext Redis URL; a missing CA file.
        (
            "control-plane",
            &["--insecure", "--redis-ca", "/nonexistent.pem"],
        ),
        (
            "control-plane",
            &[
                "--insecure",
                "--redis-url",
                "rediss://127.0.0.1:1",
                "--redis-ca",
                "/nonexistent.pem",
            ],
        ),
        ("agentctl", &["dev", "--redis-url", "http://nope"]),
        ("agentctl", &["dev", "--listen", "256.0.0.1:1"]),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yaml_output_has_the_json_fields_and_spawn_wait_exits_with_the_agents_code() {
    let cluster = TestCluster::builder().start().await;
    // --wait: the final record, and the agent's exit code as agentctl's.
    let out = cluster.agentctl(&["-o", "yaml", "spawn", "--wait", "--", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    let spawned: Value = serde_norway::from_slice(&out.stdout).expect("YAML");
    assert_eq!(spawned["state"], "EXITED");
    assert_eq!(spawned["exit_code"], 7);
    let id = spawned["id"].as_str().unwrap().to_owned();
    let signaled = cluster.agentctl(&["spawn", "--wait", "--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(
        signaled.status.code(),
        Some(128 + 15),
        "{}",
        stderr(&signaled)
    );
    let failed = cluster.agentctl(&["spawn", "--wait", "--", "/nonexistent/program"]);
    assert_eq!(failed.status.code(), Some(1), "{}", stderr(&failed));
    assert!(String::from_utf8_lossy(&failed.stdout).contains("FAILED"));
    let ok = cluster.agentctl(&["spawn", "--wait", "--", "sh", "-c", "sleep 0.5"]);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "waited for the end: {}",
        stderr(&ok)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("EXITED"));

    // The same document in both formats (the agent has ended: it is stable).
    let as_yaml = yaml(&cluster.agentctl(&["-o", "yaml", "get", &id]));
    let as_json = json(&cluster.agentctl(&["-o", "json", "get", &id]));
    assert_eq!(as_yaml, as_json);
    let hosts = yaml(&cluster.agentctl(&["-o", "yaml", "hosts", "ls"]));
    assert_eq!(hosts[0]["id"], "h1", "{hosts:?}");

    // Streams: one YAML document per event.
    let watched = cluster.agentctl(&["-o", "yaml", "watch", "--since", "0", "--count", "2"]);
    let text = String::from_utf8_lossy(&watched.stdout).into_owned();
    assert!(watched.status.success(), "{}", stderr(&watched));
    let docs: Vec<Value> = text
        .split("---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_norway::from_str(d).expect("each event is a YAML document"))
        .collect();
    assert_eq!(docs.len(), 2, "{text}");
    assert!(docs.iter().all(|d| d["type"].is_string()), "{text}");
    cluster.finish().await;
}

#[test]
fn completion_scripts_complete_subcommands() {
    let script = Command::new(bin("agentctl"))
        .args(["completion", "bash"])
        .output()
        .unwrap();
    assert!(script.status.success(), "{}", stderr(&script));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agentctl.bash");
    std::fs::write(&path, &script.stdout).unwrap();
    // What bash does on TAB after `agentctl sp` and `agentctl hosts d`.
    let probe = format!(
        "source {}; \
         COMP_WORDS=(agentctl sp); COMP_CWORD=1; _agentctl agentctl sp agentctl; echo \"${{COMPREPLY[@]}}\"; \
         COMP_WORDS=(agentctl hosts d); COMP_CWORD=2; _agentctl agentctl d hosts; echo \"${{COMPREPLY[@]}}\"",
        path.display()
    );
    let out = Command::new("bash").args(["-c", &probe]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text, "spawn\ndrain\n", "{}", stderr(&out));
    for (shell, needle) in [
        ("zsh", "#compdef agentctl"),
        ("fish", "complete -c agentctl"),
    ] {
        let out = Command::new(bin("agentctl"))
            .args(["completion", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(needle), "{shell}: {text}");
    }
    let bad = Command::new(bin("agentctl"))
        .args(["completion", "ksh"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("bash"),
        "names the shells: {}",
        stderr(&bad)
    );
}
