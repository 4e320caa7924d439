//! The monitoring files under `deploy/` (P9) against the real servers:
//! `promtool` (Prometheus' own checker, unpacked by `scripts/test`) accepts
//! the alert rules, the scrape configuration and what both servers serve
//! at `/metrics`, and every metric the rules and the Grafana dashboard
//! query is one the servers serve.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use agentplane_integration_tests::metrics::{self, scrape};
use agentplane_integration_tests::TestCluster;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// `promtool` on PATH, or the one `scripts/test` unpacked into target/tools.
fn promtool() -> PathBuf {
    let local = root().join("target/tools/promtool");
    if local.exists() {
        return local;
    }
    let on_path = std::env::var_os("PATH").map(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("promtool"))
            .find(|p| p.exists())
    });
    on_path.flatten().unwrap_or_else(|| {
        panic!("promtool is missing: run scripts/test (it unpacks one into target/tools)")
    })
}

/// Runs `promtool ARGS` with `stdin`; panics with its output unless it succeeds.
fn promtool_ok(args: &[&str], stdin: Option<&str>) -> String {
    let mut child = Command::new(promtool())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    {
        use std::io::Write;
        let mut i = child.stdin.take().expect("stdin");
        if let Some(s) = stdin {
            i.write_all(s.as_bytes()).expect("write to promtool");
        }
    }
    let out = child.wait_with_output().expect("promtool ran");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// The metric names an expression or file mentions (`agentplane_…`), with a
/// histogram's `_bucket`/`_count`/`_sum` taken off.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("agentplane_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let mut name = &text[start..end];
        for suffix in ["_bucket", "_count", "_sum"] {
            name = name.strip_suffix(suffix).unwrap_or(name);
        }
        names.insert(name.to_owned());
        i = end;
    }
    names
}

#[test]
fn promtool_accepts_the_alert_rules_and_the_scrape_config() {
    let rules = root().join("deploy/prometheus/alerts.yml");
    let out = promtool_ok(&["check", "rules", &rules.to_string_lossy()], None);
    assert!(out.contains("SUCCESS: 6 rules found"), "{out}");
    let config = root().join("deploy/prometheus/prometheus.yml");
    promtool_ok(&["check", "config", &config.to_string_lossy()], None);

    // Every target is a compose service that serves metrics on that port.
    let compose: serde_json::Value = serde_norway::from_str(
        &std::fs::read_to_string(root().join("deploy/compose.yaml")).expect("compose"),
    )
    .expect("YAML");
    let scrape: serde_json::Value =
        serde_norway::from_str(&std::fs::read_to_string(&config).expect("config")).expect("YAML");
    let mut targets = 0;
    for job in scrape["scrape_configs"].as_array().expect("jobs") {
        for t in job["static_configs"][0]["targets"]
            .as_array()
            .expect("targets")
        {
            let (service, port) = t.as_str().expect("host:port").split_once(':').expect(":");
            let argv: Vec<&str> = compose["services"][service]["command"]
                .as_array()
                .unwrap_or_else(|| panic!("{service} is not a compose service"))
                .iter()
                .filter_map(serde_json::Value::as_str)
                .collect();
            let at = argv.iter().position(|a| *a == "--metrics-listen");
            assert_eq!(
                at.and_then(|i| argv.get(i + 1)),
                Some(&format!("0.0.0.0:{port}").as_str()),
                "{service} does not serve metrics on {port}: {argv:?}"
            );
            targets += 1;
        }
    }
    assert_eq!(targets, 3, "a control plane and two host agents");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_servers_serve_passes_promtool_and_covers_every_queried_metric() {
    // One Redis server: the test stops it.
    let mut cluster = TestCluster::builder()
        .single_redis()
        .control_plane_arg("--metrics-listen")
        .control_plane_arg("127.0.0.1:0")
        .host_arg("--metrics-listen")
        .host_arg("127.0.0.1:0")
        .start()
        .await;
    cluster.spawn(&["sleep", "1000"]).await;
    let cp = scrape(&metrics::addr(&cluster.control_planes[0]).await).await;
    let host = scrape(&metrics::addr(&cluster.hosts[0]).await).await;
    for text in [&cp, &host] {
        promtool_ok(&["check", "metrics"], Some(text));
    }

    // A family shows only once it has a series. Redis errors get theirs
    // from a short outage; an open breaker's series (labelled by the
    // host's address) exists only while one is open: named here instead.
    cluster.redis.stop();
    let cp_addr = metrics::addr(&cluster.control_planes[0]).await;
    agentplane_integration_tests::eventually(
        std::time::Duration::from_secs(10),
        "a Redis error counted",
        || async {
            let text = scrape(&cp_addr).await;
            text.contains("agentplane_redis_errors_total{")
                .then_some(())
        },
    )
    .await;
    let cp = scrape(&cp_addr).await;
    cluster.redis.restart().await;
    let mut served: BTreeSet<String> = names_in(&cp).union(&names_in(&host)).cloned().collect();
    served.insert("agentplane_host_breaker_open".to_owned());
    for file in [
        "deploy/prometheus/alerts.yml",
        "deploy/grafana/agentplane.json",
    ] {
        let text = std::fs::read_to_string(root().join(file)).expect("read");
        let queried = names_in(&text);
        assert!(!queried.is_empty(), "{file} queries no agentplane metric");
        let unknown: Vec<_> = queried.difference(&served).collect();
        assert!(
            unknown.is_empty(),
            "{file} queries metrics the servers do not serve: {unknown:?}\nserved: {served:?}"
        );
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/grafana/agentplane.json")).expect("read"),
    )
    .expect("the dashboard is JSON");
    assert!(
        dashboard["panels"]
            .as_array()
            .is_some_and(|p| p.len() >= 10),
        "the dashboard has panels"
    );
    cluster.finish().await;
}
