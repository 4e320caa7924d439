//! `agentctl` end to end, and the binaries' configuration contract.

use std::process::Command;
use std::time::Duration;

use agentplane_integration_tests::{bin, eventually, procfs, TestCluster};
use serde_json::Value;

/// Stdout of a successful agentctl run; a failure fails the test with stderr.
fn ok_stdout(out: &std::process::Output) -> &[u8] {
    assert!(
        out.status.success(),
        "agentctl failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    &out.stdout
}

/// Parses `-o json` output.
fn json(out: &std::process::Output) -> Value {
    serde_json::from_slice(ok_stdout(out)).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Parses `-o yaml` output.
fn yaml(out: &std::process::Output) -> Value {
    serde_norway::from_slice(ok_stdout(out)).unwrap_or_else(|e| {
        panic!(
            "stdout is not YAML ({e}): {}",
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

/// A running `agentctl dev` on free ports.
struct Dev {
    child: std::process::Child,
    endpoint: String,
    data_dir: std::path::PathBuf,
    redis_pid: i32,
    /// `$XDG_CONFIG_HOME` of the stack and of its clients: the context file.
    config: tempfile::TempDir,
}

impl Dev {
    /// Starts it and reads what it prints until it says how to stop it.
    fn start(log: &std::path::Path) -> Self {
        use std::io::BufRead;
        let config = tempfile::tempdir().expect("config dir");
        let mut child = Command::new(bin("agentctl"))
            .args([
                "dev",
                "--listen",
                "127.0.0.1:0",
                "--host-listen",
                "127.0.0.1:0",
            ])
            .env("AGENTPLANE_LOG", "info")
            .env("XDG_CONFIG_HOME", config.path())
            // Settings meant for someone else's servers must not leak into
            // the stack `dev` makes (it would register as "leaked", at an
            // address nobody can reach).
            .env("AGENTPLANE_HOST_ID", "leaked")
            .env("AGENTPLANE_ADVERTISE_ADDR", "192.0.2.1:9")
            .env("AGENTPLANE_REDIS_PREFIX", "leaked")
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(log).expect("dev log"))
            .spawn()
            .expect("start agentctl dev");
        let out = std::io::BufReader::new(child.stdout.take().expect("piped stdout"));
        let (mut endpoint, mut data_dir, mut redis_port) = (None, None, None);
        for line in out.lines() {
            let line = line.expect("read agentctl dev stdout");
            if let Some(e) = line.strip_prefix("control plane ") {
                endpoint = Some(e.to_owned());
            } else if let Some(d) = line.strip_prefix("data in ") {
                data_dir = Some(std::path::PathBuf::from(d));
            } else if let Some(r) = line.strip_prefix("redis redis://127.0.0.1:") {
                redis_port = r.split_whitespace().next().map(str::to_owned);
            } else if line.starts_with("Ctrl-C") {
                break;
            }
        }
        let endpoint = endpoint.unwrap_or_else(|| {
            panic!(
                "agentctl dev printed no endpoint: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
        });
        let port = redis_port.expect("a private redis");
        let pid = i32::try_from(child.id()).expect("pid");
        // The private redis-server is a child of agentctl dev.
        let redis_pid = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
            .find(|p| {
                std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| c.contains(&format!("127.0.0.1:{port}")))
            })
            .expect("redis-server is a child of agentctl dev");
        Self {
            child,
            endpoint,
            data_dir: data_dir.expect("data dir"),
            redis_pid,
            config,
        }
    }

    /// The context file `agentctl dev` writes for plain `agentctl` calls.
    fn context(&self) -> std::path::PathBuf {
        self.config.path().join("agentplane/dev-context.toml")
    }

    /// Runs a plain `agentctl ARGS` (no endpoint, CA or token given): it
    /// finds the stack through the context file.
    fn agentctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin("agentctl"))
            .args(args)
            .env("XDG_CONFIG_HOME", self.config.path())
            .env_remove("AGENTPLANE_ENDPOINT")
            .env_remove("AGENTPLANE_CA")
            .env_remove("AGENTPLANE_TOKEN")
            .output()
            .expect("run agentctl")
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid")),
            sig,
        )
        .expect("signal agentctl dev");
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agentctl_dev_runs_a_whole_stack_in_one_process_and_leaves_nothing_behind() {
    use nix::sys::signal::Signal;
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("dev.log");
    let mut dev = Dev::start(&log);
    // Secure by default: https, its own CA and token, key files 0600, and
    // a plaintext call to it fails.
    assert!(dev.endpoint.starts_with("https://"), "{}", dev.endpoint);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode =
            |p: &std::path::Path| std::fs::metadata(p).expect("file").permissions().mode() & 0o777;
        assert_eq!(mode(&dev.context()), 0o600);
        let pki = dev.data_dir.join("pki");
        assert_eq!(mode(&pki), 0o700);
        for f in std::fs::read_dir(&pki).expect("pki dir").flatten() {
            assert_eq!(mode(&f.path()), 0o600, "{}", f.path().display());
        }
    }
    let plain = Command::new(bin("agentctl"))
        .args([
            "--endpoint",
            &dev.endpoint.replace("https://", "http://"),
            "ls",
        ])
        .env("XDG_CONFIG_HOME", dev.config.path())
        .output()
        .expect("agentctl");
    assert!(!plain.status.success(), "plaintext must fail");
    let waited = dev.agentctl(&["spawn", "--wait", "--", "sh", "-c", "echo hi; exit 3"]);
    assert_eq!(waited.status.code(), Some(3), "{}", stderr(&waited));
    let hosts = json(&dev.agentctl(&["-o", "json", "hosts", "ls"]));
    assert_eq!(hosts[0]["id"], "dev");
    let a = json(&dev.agentctl(&["-o", "json", "spawn", "--", "sleep", "1000"]));
    let id = a["id"].as_str().unwrap().to_owned();
    assert!(!procfs::agent_processes(&id).is_empty(), "the agent runs");
    assert!(dev.data_dir.is_dir());

    // SIGTERM: agents stopped, redis-server stopped, the temporary dir gone.
    dev.signal(Signal::SIGTERM);
    let child = &mut dev.child;
    let status = eventually(Duration::from_secs(20), "agentctl dev exits", || {
        let s = child.try_wait().unwrap();
        async move { s }
    })
    .await;
    assert!(
        status.success(),
        "{status}: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(procfs::agent_processes(&id).is_empty(), "agent stopped");
    assert!(!procfs::is_alive(dev.redis_pid), "redis-server stopped");
    assert!(!dev.data_dir.exists(), "temporary data removed");
    assert!(!dev.context().exists(), "the context file is removed");

    // SIGKILL: the kernel and the guard still take everything down.
    let dev = Dev::start(&log);
    let a = json(&dev.agentctl(&["-o", "json", "spawn", "--", "sleep", "1000"]));
    let id = a["id"].as_str().unwrap().to_owned();
    dev.signal(Signal::SIGKILL);
    procfs::wait_gone(&id, Duration::from_secs(5)).await;
    let redis = dev.redis_pid;
    eventually(Duration::from_secs(5), "redis-server gone", || async move {
        (!procfs::is_alive(redis)).then_some(())
    })
    .await;
    let _ = std::fs::remove_dir_all(&dev.data_dir);
}
