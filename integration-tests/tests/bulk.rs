//! `agentctl spawn --count` and `stop` of many agents: one command, a
//! bounded fan-out, one result per agent.

use std::time::Duration;

use agentplane_integration_tests::output::{json, stderr};
use agentplane_integration_tests::{eventually, procfs, TestCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_count_makes_named_agents_once_and_stop_selector_ends_them() {
    let cluster = TestCluster::builder().start().await;
    let spawn = [
        "-o",
        "json",
        "spawn",
        "--count",
        "20",
        "--parallel",
        "4",
        "--name",
        "fleet",
        "--label",
        "team=a",
        "--request-id",
        "bulk-test",
        "--",
        "sleep",
        "1000",
    ];
    let made = json(&cluster.agentctl(&spawn));
    let made = made.as_array().expect("a list of agents");
    assert_eq!(made.len(), 20, "{made:?}");
    for (i, a) in made.iter().enumerate() {
        assert_eq!(a["name"], format!("fleet-{}", i + 1), "in order: {a}");
        assert_eq!(a["state"], "RUNNING");
    }
    let ids: Vec<&str> = made.iter().map(|a| a["id"].as_str().unwrap()).collect();
    let pids: Vec<i32> = made
        .iter()
        .map(|a| i32::try_from(a["pid"].as_i64().unwrap()).unwrap())
        .collect();
    assert!(pids.iter().all(|p| procfs::is_alive(*p)), "{pids:?}");

    // The same command again (a retry) answers the same agents, makes none.
    let again = json(&cluster.agentctl(&spawn));
    let again: Vec<&str> = again
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(again, ids, "request ids NAME-i make a retry idempotent");
    // Other tests run beside this one: count only this test's agents.
    let ours = procfs::all_agent_processes_by_id()
        .into_iter()
        .filter(|(id, _)| ids.contains(&id.as_str()))
        .count();
    assert_eq!(ours, 20, "one process per agent, none made twice");

    // Another team's agent is left alone by the selector.
    let other = json(&cluster.agentctl(&[
        "-o", "json", "spawn", "--label", "team=b", "--", "sleep", "1000",
    ]));
    let stopped = cluster.agentctl(&["-o", "json", "stop", "--selector", "team=a"]);
    assert!(stopped.status.success(), "{}", stderr(&stopped));
    let stopped = json(&stopped);
    let stopped = stopped.as_array().unwrap();
    assert_eq!(stopped.len(), 20);
    assert!(
        stopped.iter().all(|a| a["state"] == "EXITED"),
        "{stopped:?}"
    );
    eventually(
        Duration::from_secs(5),
        "team a's processes gone",
        || async {
            pids.iter()
                .all(|p| procfs::alive_in_group(*p).is_empty())
                .then_some(())
        },
    )
    .await;
    let pid_b = i32::try_from(other["pid"].as_i64().unwrap()).unwrap();
    assert!(procfs::is_alive(pid_b), "team b's agent still runs");

    // Several ids: each answered; a missing one is a line on stderr and exit 1.
    let out = cluster.agentctl(&["stop", other["id"].as_str().unwrap(), "nosuchagent"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("stop nosuchagent: NOT_FOUND"),
        "{}",
        stderr(&out)
    );
    eventually(Duration::from_secs(5), "team b's agent gone", || async {
        procfs::alive_in_group(pid_b).is_empty().then_some(())
    })
    .await;

    let usage = cluster.agentctl(&["spawn", "--count", "2", "--wait", "--", "true"]);
    assert!(!usage.status.success(), "--wait takes one agent");
}
