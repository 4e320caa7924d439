//! `agentctl dev`: a whole secure stack in one process that a plain
//! `agentctl` reaches through its context file, and that leaves nothing
//! behind however it is stopped.

use std::process::Command;
use std::time::Duration;

use agentplane_integration_tests::output::{json, stderr};
use agentplane_integration_tests::{bin, eventually, procfs};

/// A running `agentctl dev` on free ports.
struct Dev {
    child: std::process::Child,
    endpoint: String,
    data_dir: std::path::PathBuf,
    redis_pid: i32,
    /// The private Redis's socket (its only listener).
    redis_socket: std::path::PathBuf,
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
        let (mut endpoint, mut data_dir, mut redis_socket) = (None, None, None);
        for line in out.lines() {
            let line = line.expect("read agentctl dev stdout");
            if let Some(e) = line.strip_prefix("control plane ") {
                endpoint = Some(e.to_owned());
            } else if let Some(d) = line.strip_prefix("data in ") {
                data_dir = Some(std::path::PathBuf::from(d));
            } else if let Some(r) = line.strip_prefix("redis unix://") {
                redis_socket = r.split_whitespace().next().map(std::path::PathBuf::from);
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
        let redis_socket = redis_socket.expect("a private redis on a Unix socket");
        let pid = i32::try_from(child.id()).expect("pid");
        // The private redis-server is a child of agentctl dev.
        let redis_pid = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
            .find(|p| {
                std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| c.starts_with("redis-server"))
            })
            .expect("redis-server is a child of agentctl dev");
        Self {
            child,
            endpoint,
            data_dir: data_dir.expect("data dir"),
            redis_pid,
            redis_socket,
            config,
        }
    }

    /// The config file where `agentctl dev` adds its context `dev` for
    /// plain `agentctl` calls.
    fn context(&self) -> std::path::PathBuf {
        self.config.path().join("agentplane/config.toml")
    }

    /// Whether the config file holds a context `dev`.
    fn has_dev_context(&self) -> bool {
        std::fs::read_to_string(self.context()).is_ok_and(|t| t.contains("[contexts.dev]"))
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
        // The registry is reachable by this user only: a Unix socket 0700,
        // no TCP port (whoever writes records runs programs).
        assert_eq!(mode(&dev.redis_socket), 0o700);
        let tcp = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
        let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", dev.redis_pid))
            .expect("redis fds")
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .filter_map(|l| {
                l.to_string_lossy()
                    .strip_prefix("socket:[")
                    .map(|s| s.trim_end_matches(']').to_owned())
            })
            .collect();
        assert!(
            !tcp.lines()
                .skip(1)
                .any(|l| l.split_whitespace().nth(3) == Some("0A")
                    && inodes
                        .iter()
                        .any(|i| l.split_whitespace().nth(9) == Some(i.as_str()))),
            "the private redis-server listens on no TCP port"
        );
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
    assert!(!dev.has_dev_context(), "its context is removed");

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_quick_start_runs_line_by_line_with_names_only() {
    let readme = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"),
    )
    .expect("README");
    let block = readme
        .split("In a second shell while `scripts/dev` runs:")
        .nth(1)
        .and_then(|rest| rest.split("```sh\n").nth(1))
        .and_then(|b| b.split("```").next())
        .expect("the README's second-shell block");
    let commands: Vec<String> = block
        .lines()
        .filter(|l| l.starts_with("agentctl "))
        // A comment starts at ` # ` (none of the commands holds one).
        .map(|l| l.split(" # ").next().unwrap_or(l).trim().to_owned())
        .collect();
    assert!(commands.len() >= 8, "{commands:?}");
    assert!(
        commands
            .iter()
            .all(|c| !c.split_whitespace().any(|w| w == "ID")),
        "the quick start must use names only: {commands:?}"
    );

    let logs = tempfile::tempdir().unwrap();
    let dev = Dev::start(&logs.path().join("dev.log"));
    let path = format!(
        "{}:{}",
        agentplane_integration_tests::bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for c in &commands {
        let out = Command::new("sh")
            .args(["-c", c])
            .env("PATH", &path)
            .env("XDG_CONFIG_HOME", dev.config.path())
            .env_remove("AGENTPLANE_ENDPOINT")
            .env_remove("AGENTPLANE_CA")
            .env_remove("AGENTPLANE_TOKEN")
            .output()
            .expect("run a README line");
        assert!(
            out.status.success(),
            "README line `{c}` failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if c.starts_with("agentctl -o json get") {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
            assert_eq!(v["name"], "demo", "{v}");
        }
    }
    let gone = dev.agentctl(&["get", "demo"]);
    assert!(!gone.status.success(), "rm demo removed it");
}
