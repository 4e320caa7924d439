//! `scripts/dev` (the README's first command) and `agentctl certs` (what it
//! and a real deployment make the PKI with): a secure stack that a plain
//! `agentctl` in another shell reaches with no flags, that refuses
//! plaintext, whose secrets are 0600, and that leaves nothing behind.

use std::io::BufRead;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use agentplane_integration_tests::output::json;
use agentplane_integration_tests::{bin, bin_dir, eventually, procfs};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

/// A plain `agentctl ARGS`, as typed in another shell: no endpoint, CA or
/// token, only the same `$XDG_CONFIG_HOME`.
fn plain_agentctl(config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(bin("agentctl"))
        .args(args)
        .env("XDG_CONFIG_HOME", config)
        .env_remove("AGENTPLANE_ENDPOINT")
        .env_remove("AGENTPLANE_CA")
        .env_remove("AGENTPLANE_TOKEN")
        .env_remove("AGENTPLANE_TOKEN_FILE")
        .output()
        .expect("run agentctl")
}

/// Processes whose command line mentions `needle` (the run's directory).
fn processes_mentioning(needle: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect()
}

/// Kills the script's whole process group if a test fails half-way.
struct Script(std::process::Child);

impl Drop for Script {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_dev_is_secure_and_a_plain_agentctl_reaches_it() {
    let config = tempfile::tempdir().expect("config dir");
    let mut child = Command::new("bash")
        .arg(repo_root().join("scripts/dev"))
        .current_dir(repo_root())
        .env("AGENTPLANE_BIN_DIR", bin_dir())
        .env("XDG_CONFIG_HOME", config.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("start scripts/dev");
    let stdout = child.stdout.take().expect("piped");
    let mut script = Script(child);
    // Read what it prints on a thread, so the wait has a deadline.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let (mut run_dir, mut endpoint) = (None, None);
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("scripts/dev says it is running within 90 s");
        if let Some(rest) = line.split_once("(logs in ").map(|(_, r)| r) {
            run_dir = rest.split_once(')').map(|(d, _)| PathBuf::from(d));
        } else if let Some(rest) = line.trim().strip_prefix("control plane") {
            endpoint = rest.split_whitespace().next().map(str::to_owned);
        } else if line.starts_with("Ctrl-C stops") {
            break;
        }
    }
    let run_dir = run_dir.expect("the run's directory is printed");
    let endpoint = endpoint.expect("the endpoint is printed");
    assert!(endpoint.starts_with("https://"), "{endpoint}");

    // Another shell, no flags: both hosts, and a spawn that runs.
    let hosts = json(&plain_agentctl(
        config.path(),
        &["-o", "json", "hosts", "ls"],
    ));
    let mut ids: Vec<&str> = hosts
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|h| h["id"].as_str())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["h1", "h2"]);
    let spawned = json(&plain_agentctl(
        config.path(),
        &["-o", "json", "spawn", "--", "sleep", "1000"],
    ));
    let id = spawned["id"].as_str().expect("id").to_owned();
    let ls = json(&plain_agentctl(config.path(), &["-o", "json", "ls"]));
    assert!(ls.to_string().contains(&id), "ls shows the agent: {ls}");
    eventually(Duration::from_secs(10), "the agent runs", || {
        let running = !procfs::agent_processes(&id).is_empty();
        async move { running.then_some(()) }
    })
    .await;

    // The Python package as a new user gets it: `pip install
    // ./clients/python` in a fresh venv, then its example spawns, follows
    // and stops an agent on this stack with only the current context to go
    // by. (The wheels come from pip's cache once scripts/test has run.)
    let venv = tempfile::tempdir().expect("venv dir");
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(venv.path())
        .status()
        .expect("python3 -m venv");
    assert!(
        made.success(),
        "python3 -m venv (scripts/test installs python3-venv)"
    );
    let py = venv.path().join("bin/python");
    let installed = Command::new(&py)
        .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
        .arg(repo_root().join("clients/python"))
        .output()
        .expect("pip install");
    assert!(
        installed.status.success(),
        "pip install ./clients/python: {}",
        String::from_utf8_lossy(&installed.stderr)
    );
    let example = Command::new(&py)
        .arg(repo_root().join("clients/python/examples/spawn_follow_stop.py"))
        .env("XDG_CONFIG_HOME", config.path())
        .output()
        .expect("run the example");
    let said = String::from_utf8_lossy(&example.stdout);
    assert!(
        example.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&example.stderr)
    );
    assert!(
        said.contains("ready") && said.trim_end().ends_with("stopped: AGENT_STATE_EXITED"),
        "{said}"
    );

    // Plaintext to the same port is refused (what `grpcurl -plaintext` does).
    let plain = plain_agentctl(
        config.path(),
        &["--endpoint", &endpoint.replace("https://", "http://"), "ls"],
    );
    assert!(!plain.status.success(), "a plaintext call must fail");

    // Secrets: the PKI directory 0700, every file in it 0600, the context too.
    let pki = run_dir.join("pki");
    assert_eq!(mode(&pki), 0o700);
    let files: Vec<PathBuf> = std::fs::read_dir(&pki)
        .expect("pki dir")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(
        files.len() >= 9,
        "CA, 3 certificates and keys, tokens: {files:?}"
    );
    for f in &files {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    let context = config.path().join("agentplane/config.toml");
    assert_eq!(mode(&context), 0o600);
    // The registry: a Unix socket only this user may connect to.
    assert_eq!(mode(&run_dir.join("redis.sock")), 0o700);

    // SIGTERM (what Ctrl-C in its terminal sends to the script): everything
    // it started stops, the agent included, and the context file goes.
    let pid = i32::try_from(script.0.id()).expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("signal scripts/dev");
    let child = &mut script.0;
    eventually(Duration::from_secs(30), "scripts/dev exits", || {
        let done = child.try_wait().expect("wait").is_some();
        async move { done.then_some(()) }
    })
    .await;
    procfs::wait_gone(&id, Duration::from_secs(10)).await;
    let needle = run_dir.display().to_string();
    eventually(
        Duration::from_secs(10),
        "nothing of the run is left",
        || {
            let left = processes_mentioning(&needle);
            async move { left.is_empty().then_some(()) }
        },
    )
    .await;
    assert!(
        !std::fs::read_to_string(&context).is_ok_and(|t| t.contains("[contexts.dev]")),
        "its context is removed at exit"
    );
    assert!(
        !pki.exists(),
        "the CA key and the admin token are removed at exit"
    );
    let _ = std::fs::remove_dir_all(&run_dir);
}

#[test]
fn agentctl_certs_refuses_what_the_servers_would_refuse_and_never_overwrites() {
    let dir = tempfile::tempdir().expect("dir");
    let pki = dir.path().join("pki");
    let certs = |args: &[&str]| {
        Command::new(bin("agentctl"))
            .arg("certs")
            .args(args)
            .output()
            .expect("agentctl certs")
    };
    let d = pki.to_str().expect("utf-8");
    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();
    // A host certificate before any CA: says how to make one.
    let early = certs(&["host", "h1", "--dir", d]);
    assert!(!early.status.success());
    assert!(stderr(&early).contains("certs ca"), "{}", stderr(&early));
    assert!(certs(&["ca", "--dir", d]).status.success());
    assert_eq!(mode(&pki), 0o700);
    let again = certs(&["ca", "--dir", d]);
    assert!(
        !again.status.success(),
        "a second CA must not replace the first"
    );
    assert!(
        stderr(&again).contains("exists already"),
        "{}",
        stderr(&again)
    );
    let bad = certs(&["host", "under_score", "--dir", d]);
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("DNS label"), "{}", stderr(&bad));
    assert!(certs(&["host", "h1", "--dir", d, "--san", "127.0.0.1"])
        .status
        .success());
    // An extra name that would let a host pose as the control plane (or
    // as another host) is refused.
    for san in [
        "control-plane.agentplane",
        "h2.host.agentplane",
        "*.example.com",
    ] {
        let out = certs(&["host", "h3", "--dir", d, "--san", san]);
        assert!(!out.status.success(), "--san {san} must be refused");
        assert!(!pki.join("host-h3.crt").exists());
    }
    for f in ["ca.crt", "ca.key", "host-h1.crt", "host-h1.key"] {
        assert_eq!(mode(&pki.join(f)), 0o600, "{f}");
    }

    // Tokens: printed once; the file holds the digest, not the token, and
    // the control plane's own rules refuse a duplicate name or an admin
    // with a selector, leaving the file as it was.
    let tokens = pki.join("tokens.toml");
    let t = tokens.to_str().expect("utf-8");
    let made = certs(&[
        "token",
        "alice",
        "--role",
        "operator",
        "--selector",
        "team=a",
        "--tokens",
        t,
    ]);
    assert!(made.status.success(), "{}", stderr(&made));
    let token = String::from_utf8(made.stdout).expect("utf-8");
    let token = token.trim();
    assert_eq!(token.len(), 64);
    let text = std::fs::read_to_string(&tokens).expect("tokens");
    assert!(!text.contains(token), "the file holds no token");
    assert!(text.contains(&agentplane::auth::digest_hex(token)));
    assert_eq!(mode(&tokens), 0o600);
    for refused in [
        vec!["token", "alice", "--role", "viewer", "--tokens", t],
        vec![
            "token",
            "root",
            "--role",
            "admin",
            "--selector",
            "team=a",
            "--tokens",
            t,
        ],
    ] {
        let out = certs(&refused);
        assert!(!out.status.success(), "{refused:?} must be refused");
        assert_eq!(std::fs::read_to_string(&tokens).expect("tokens"), text);
    }
    // A file the control plane reads through its group (0640) stays so
    // when a token is added.
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let bob = certs(&["token", "bob", "--role", "viewer", "--tokens", t]);
    assert!(bob.status.success(), "{}", stderr(&bob));
    assert_eq!(mode(&tokens), 0o640, "the token file keeps its mode");
    // Runs at once each add their entry (one lock file beside the tokens).
    let runs: Vec<std::process::Child> = (0..8)
        .map(|i| {
            Command::new(bin("agentctl"))
                .args([
                    "certs",
                    "token",
                    &format!("many-{i}"),
                    "--role",
                    "viewer",
                    "--tokens",
                    t,
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("agentctl certs token")
        })
        .collect();
    for mut r in runs {
        assert!(r.wait().expect("wait").success());
    }
    let table = agentplane::auth::TokenTable::load(&tokens).expect("the control plane loads it");
    let names: Vec<&str> = table.principals().map(|p| p.name.as_str()).collect();
    for i in 0..8 {
        assert!(
            names.contains(&format!("many-{i}").as_str()),
            "many-{i} kept: {names:?}"
        );
    }
    let who = table.authenticate(token).expect("the token gets in");
    assert_eq!(who.name, "alice");
    assert_eq!(who.role, agentplane::auth::Role::Operator);
}
