//! Contexts (P10): `agentctl config set-context/use-context/get-contexts/
//! delete-context` and `--context`, as kubectl's, against a real cluster;
//! a temporary current context gives the one before it back when deleted.

use std::process::{Command, Output};

use agentplane_integration_tests::{bin, free_port, TestCluster};

/// A plain `agentctl ARGS` whose config lives in `home`.
fn agentctl(home: &std::path::Path, args: &[&str]) -> Output {
    Command::new(bin("agentctl"))
        .args(args)
        .env("XDG_CONFIG_HOME", home)
        .env_remove("AGENTPLANE_ENDPOINT")
        .env_remove("AGENTPLANE_CONTEXT")
        .env_remove("AGENTPLANE_CA")
        .env_remove("AGENTPLANE_TOKEN")
        .env_remove("AGENTPLANE_TOKEN_FILE")
        .output()
        .expect("run agentctl")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contexts_choose_the_cluster_and_a_temporary_one_gives_the_old_one_back() {
    let cluster = TestCluster::builder().start().await;
    let home = tempfile::tempdir().expect("config home");
    let h = home.path();
    let live = cluster.endpoint(0);
    let dead = format!("http://127.0.0.1:{}", free_port());

    let set = agentctl(
        h,
        &[
            "config",
            "set-context",
            "prod",
            "--endpoint",
            &live,
            "--use",
        ],
    );
    assert!(set.status.success(), "{}", text(&set));
    let ls = agentctl(h, &["hosts", "ls"]);
    assert!(
        ls.status.success() && text(&ls).contains("h1"),
        "{}",
        text(&ls)
    );

    // Another context, made current for a while (as scripts/dev does).
    let set = agentctl(
        h,
        &["config", "set-context", "dev", "--endpoint", &dead, "--use"],
    );
    assert!(set.status.success(), "{}", text(&set));
    let current = agentctl(h, &["config", "current-context"]);
    assert_eq!(String::from_utf8_lossy(&current.stdout).trim(), "dev");
    let failing = agentctl(h, &["hosts", "ls"]);
    assert!(!failing.status.success(), "the dead endpoint is used");
    let chosen = agentctl(h, &["--context", "prod", "hosts", "ls"]);
    assert!(chosen.status.success(), "{}", text(&chosen));
    let unknown = agentctl(h, &["--context", "nope", "hosts", "ls"]);
    assert!(!unknown.status.success());
    assert!(
        text(&unknown).contains("no such context"),
        "{}",
        text(&unknown)
    );
    let listed = agentctl(h, &["config", "get-contexts"]);
    let listed = text(&listed);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with('*') && l.contains("dev")),
        "{listed}"
    );

    // Removing what it added (not what replaced it) gives prod back.
    let kept = agentctl(
        h,
        &["config", "delete-context", "dev", "--if-endpoint", &live],
    );
    assert!(kept.status.success());
    assert_eq!(
        String::from_utf8_lossy(&agentctl(h, &["config", "current-context"]).stdout).trim(),
        "dev",
        "another endpoint's context stays"
    );
    let gone = agentctl(
        h,
        &["config", "delete-context", "dev", "--if-endpoint", &dead],
    );
    assert!(gone.status.success(), "{}", text(&gone));
    assert_eq!(
        String::from_utf8_lossy(&agentctl(h, &["config", "current-context"]).stdout).trim(),
        "prod"
    );
    assert!(agentctl(h, &["hosts", "ls"]).status.success());
    // An explicit --endpoint wins over the current context.
    let explicit = agentctl(h, &["--endpoint", &dead, "hosts", "ls"]);
    assert!(!explicit.status.success());
    cluster.finish().await;
}
