//! `agentctl status` and `agentctl hosts ls` (P9) against real servers:
//! each endpoint's health and counters, a failing endpoint named with an
//! exit code of 1, and hosts with their load and age.

use agentplane_integration_tests::TestCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_each_endpoint_and_fails_when_one_does_not_answer() {
    let cluster = TestCluster::builder().control_planes(2).start().await;
    cluster.spawn(&["sleep", "1000"]).await;

    let out = cluster
        .agentctl_all(&["status"])
        .output()
        .expect("agentctl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("ENDPOINT") && lines[0].contains("HEALTH"),
        "{text}"
    );
    assert_eq!(lines.len(), 3, "a header and one row per endpoint:\n{text}");
    assert!(lines[1..].iter().all(|l| l.contains("SERVING")), "{text}");

    let json = cluster
        .agentctl_all(&["-o", "json", "status"])
        .output()
        .expect("agentctl");
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON");
    let rows = v.as_array().expect("a list");
    assert_eq!(rows.len(), 2);
    assert!(
        rows.iter()
            .all(|r| r["rss_bytes"].as_u64().is_some_and(|b| b > 0)),
        "{v}"
    );

    // One endpoint that does not answer: named, and the exit code says so.
    let dead = format!(
        "http://127.0.0.1:{}",
        agentplane_integration_tests::free_port()
    );
    let out = std::process::Command::new(agentplane_integration_tests::bin("agentctl"))
        .args([
            "--endpoint",
            &format!("{},{dead}", cluster.endpoint(0)),
            "status",
        ])
        .output()
        .expect("agentctl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with(&dead) && l.contains("unreachable")),
        "{text}"
    );

    // The running count is the host's own, published with its next beat.
    let (text, age) = agentplane_integration_tests::eventually(
        std::time::Duration::from_secs(10),
        "hosts ls shows 1/1000",
        || async {
            let hosts = cluster.agentctl(&["hosts", "ls"]);
            let text = String::from_utf8_lossy(&hosts.stdout).into_owned();
            // Cells may hold spaces (CGROUPS): a column is cut where its
            // header starts, up to the next header.
            let header = text.lines().next()?;
            let row = text.lines().nth(1)?;
            let col = |name: &str| {
                let at = header.find(&format!(" {name} "))? + 1;
                let end = header[at..].find(' ')? + at;
                let next = header[end..].find(|c: char| c != ' ')? + end;
                Some(row.get(at..next)?.trim().to_owned())
            };
            (col("AGENTS")? == "1/1000").then(|| col("AGE").map(|age| (text.clone(), age)))?
        },
    )
    .await;
    assert!(
        age.ends_with('s') && age[..age.len() - 1].parse::<u64>().is_ok(),
        "{text}"
    );
    cluster.finish().await;
}
