//! Shell completion of agent names and host ids from the live cluster
//! (P10): what the shell hook that `COMPLETE=fish agentctl` prints asks
//! agentctl at each TAB, answered from the running cluster.

use std::process::Command;

use agentplane_integration_tests::{bin, TestCluster};

/// The candidates agentctl offers for the last word of `line`, as fish's
/// hook asks for them (one per line, a tab before the description).
fn complete(cluster: &TestCluster, line: &[&str]) -> Vec<String> {
    let out = Command::new(bin("agentctl"))
        .env("COMPLETE", "fish")
        .env("AGENTPLANE_ENDPOINT", cluster.endpoint(0))
        .env_remove("AGENTPLANE_CONTEXT")
        .arg("--")
        .args(line)
        .output()
        .expect("run agentctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split('\t').next().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_and_host_ids_complete_from_the_live_cluster() {
    let cluster = TestCluster::builder().hosts(2).start().await;
    for name in ["web-1", "web-2", "db"] {
        let out = cluster.agentctl(&["spawn", "--name", name, "--", "sleep", "1000"]);
        assert!(out.status.success());
    }
    assert_eq!(
        complete(&cluster, &["agentctl", "logs", "we"]),
        ["web-1", "web-2"]
    );
    let mut all = complete(&cluster, &["agentctl", "stop", "web-1", ""]);
    all.sort();
    assert!(
        all.contains(&"db".to_owned()) && all.contains(&"web-2".to_owned()),
        "{all:?}"
    );
    assert_eq!(
        complete(&cluster, &["agentctl", "hosts", "drain", "h"]),
        ["h1", "h2"]
    );
    // Nothing to complete from a cluster that does not answer: no hang, no error.
    let out = Command::new(bin("agentctl"))
        .env("COMPLETE", "fish")
        .env("AGENTPLANE_ENDPOINT", "http://127.0.0.1:1")
        .args(["--", "agentctl", "get", "we"])
        .output()
        .expect("run agentctl");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty());
    cluster.finish().await;
}
