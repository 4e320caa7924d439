//! "Any language": the TypeScript example in `clients/typescript` (its
//! services loaded from the same proto/ files; built by `scripts/test`
//! with `npm ci && npm run build`) spawns a named agent, reads its output,
//! stops and deletes it on a real cluster.

use std::path::Path;
use std::process::Command;

use agentplane_integration_tests::TestCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_typescript_example_spawns_reads_stops_and_deletes_an_agent() {
    let example =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/typescript/dist/example.js");
    assert!(
        example.exists(),
        "{} is missing: run scripts/test (it runs npm ci && npm run build in clients/typescript)",
        example.display()
    );
    let cluster = TestCluster::builder().start().await;
    let out = Command::new("node")
        .arg(&example)
        .env("AGENTPLANE_ENDPOINT", cluster.endpoint(0))
        .output()
        .expect("run node");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("spawned ts-example (") && lines[0].ends_with(": AGENT_STATE_RUNNING"),
        "{text}"
    );
    assert!(lines.contains(&"hello from typescript"), "{text}");
    assert_eq!(
        lines.last().copied(),
        Some("stopped: AGENT_STATE_EXITED"),
        "{text}"
    );
    let gone = cluster.agentctl(&["get", "ts-example"]);
    assert!(!gone.status.success(), "the example deleted its agent");
    cluster.finish().await;
}
