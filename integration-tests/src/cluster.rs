//! [`TestCluster`]: Redis, control planes and host agents as real processes.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use agentplane::proto::v1::{
    Agent, AgentSpec, AgentState, GetAgentRequest, ListHostsRequest, SpawnAgentRequest,
};

mod builder;
mod clients;
mod keepers;
mod redis;

pub use builder::Builder;
pub use redis::redis_cluster_requested;

use crate::pki::ClusterPki;
use crate::process::Proc;
use crate::redis_server::RedisServer;

/// How long a server may take to print its address.
const START_LIMIT: Duration = Duration::from_secs(20);

/// Directory of the workspace's built binaries (`target/debug`), found from the
/// test executable's own path (`target/debug/deps/…`), or `AGENTPLANE_BIN_DIR`.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("AGENTPLANE_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_owned();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of a workspace binary, or a panic saying how to build it.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: build the binaries first with `cargo build --workspace --bins` \
         (scripts/test does), or set AGENTPLANE_BIN_DIR",
        p.display()
    );
    p
}

/// A started server: its process and the address it printed.
#[derive(Debug)]
pub struct Server {
    /// The process.
    pub proc: Proc,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// The host id (host agents only).
    pub host_id: String,
}

/// A running cluster. Dropping it kills every process it started.
#[derive(Debug)]
pub struct TestCluster {
    /// The Redis server.
    pub redis: RedisServer,
    /// Control-plane replicas.
    pub control_planes: Vec<Server>,
    /// Host agents, `hosts[i]` has id `h{i+1}`.
    pub hosts: Vec<Server>,
    config: Builder,
    dir: tempfile::TempDir,
    /// The network lab, when hosts run in namespaces (dropped last, after
    /// every process in it).
    pub lab: Option<crate::netns::NetLab>,
    /// The cluster's CA and control-plane certificate, with [`Builder::tls`].
    pub pki: Option<ClusterPki>,
    /// The host-agent binary started from now on (an upgrade), instead of
    /// the build's.
    host_binary: Option<PathBuf>,
    /// With [`Builder::sentinel`]: the master's replica.
    pub replica: Option<RedisServer>,
    /// With [`Builder::sentinel`]: the sentinels.
    pub sentinels: Option<crate::sentinel::Sentinels>,
    /// The address Redis and its sentinels are reached at.
    redis_ip: String,
    /// With `AGENTPLANE_TEST_REDIS=cluster`: the Redis Cluster the servers
    /// use (`redis` then runs unused).
    pub redis_cluster: Option<crate::redis_cluster::RedisCluster>,
}

impl TestCluster {
    /// A builder with one host and one control plane.
    pub fn builder() -> Builder {
        Builder::default()
    }

    fn start_server(
        &self,
        name: &str,
        log_name: &str,
        args: &[String],
        netns: Option<String>,
    ) -> (Proc, String) {
        let program = match &self.host_binary {
            Some(p) if name == "host-agent" => p.clone(),
            _ => bin(name),
        };
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns]).arg(&program);
                c
            }
            None => Command::new(&program),
        };
        cmd.args(args)
            .env(
                "AGENTPLANE_LOG",
                std::env::var("AGENTPLANE_TEST_LOG")
                    .unwrap_or_else(|_| "info,agentplane=debug".into()),
            )
            .envs(self.config.envs.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stdin(Stdio::null());
        let log = self.dir.path().join(log_name);
        let mut proc = Proc::spawn(cmd, &log).unwrap_or_else(|e| panic!("start {name}: {e}"));
        let stdout = proc.child.stdout.take().expect("stdout piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(START_LIMIT).unwrap_or_default();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| {
                panic!(
                    "{name} did not print its address; log:\n{}",
                    proc.log_tail(30)
                )
            })
            .to_owned();
        (proc, addr)
    }

    fn spawn_control_plane(&self, i: usize) -> Server {
        self.spawn_control_plane_logged(&format!("control-plane-{i}.log"))
    }

    /// Starts control plane `i` again on a new port (after the test killed
    /// it); its log goes to a new file.
    pub fn restart_control_plane(&mut self, i: usize) {
        let n = self.dir.path().read_dir().map_or(0, Iterator::count);
        let s = self.spawn_control_plane_logged(&format!("control-plane-{i}.{n}.log"));
        self.control_planes[i] = s;
    }

    fn spawn_control_plane_logged(&self, log_name: &str) -> Server {
        let listen = match &self.lab {
            Some(lab) => format!("{}:0", lab.gateway()),
            None => "127.0.0.1:0".to_owned(),
        };
        let mut args = match &self.pki {
            Some(p) => {
                let mut a = p.server_args(&p.control_plane);
                a.push("--token-file".into());
                a.push(
                    ClusterPki::write_tokens(self.dir.path())
                        .display()
                        .to_string(),
                );
                a
            }
            None => vec!["--insecure".into()],
        };
        args.extend([
            "--listen".into(),
            listen,
            "--host-call-timeout".into(),
            "5s".into(),
            "--shutdown-timeout".into(),
            "5s".into(),
            "--reconcile-interval".into(),
            format!("{}ms", self.config.reconcile_interval.as_millis()),
        ]);
        args.extend(self.redis_args(None));
        args.extend(self.config.control_plane_args.iter().cloned());
        let (proc, addr) = self.start_server("control-plane", log_name, &args, None);
        Server {
            proc,
            addr,
            host_id: String::new(),
        }
    }

    fn spawn_host(&self, i: usize, log_name: &str) -> Server {
        let host_id = format!("h{}", i + 1);
        let (listen, gateway, ns) = match &self.lab {
            Some(lab) => (
                format!("{}:0", lab.host_ip(i)),
                Some(lab.gateway()),
                Some(lab.namespace(i)),
            ),
            None => ("127.0.0.1:0".to_owned(), None, None),
        };
        let mut args = match &self.pki {
            Some(p) => {
                let ip = self
                    .lab
                    .as_ref()
                    .map_or_else(|| "127.0.0.1".to_owned(), |lab| lab.host_ip(i));
                p.server_args(&p.host(&host_id, &ip))
            }
            None => vec!["--insecure".into()],
        };
        args.extend([
            "--listen".into(),
            listen,
            "--host-id".into(),
            host_id.clone(),
            "--max-agents".into(),
            self.config.max_agents.to_string(),
            "--heartbeat-ttl".into(),
            format!("{}ms", self.config.heartbeat_ttl.as_millis()),
            "--shutdown-timeout".into(),
            "10s".into(),
            "--data-dir".into(),
            self.dir
                .path()
                .join(format!("data-{host_id}"))
                .display()
                .to_string(),
        ]);
        // Clusters run side by side with the same host ids: each its own
        // cgroups (a host agent sweeps its host's leftover ones at start).
        args.extend(["--cgroup-parent".into(), self.cgroup_parent()]);
        for (idx, label) in &self.config.host_labels {
            if *idx == i {
                args.push("--label".into());
                args.push(label.clone());
            }
        }
        if self.config.root_agents && nix::unistd::geteuid().is_root() {
            args.push("--allow-root-agents".into());
        }
        args.extend(self.redis_args(gateway.as_deref()));
        args.extend(self.config.host_args.iter().cloned());
        for (idx, arg) in &self.config.host_args_at {
            if *idx == i {
                args.push(arg.clone());
            }
        }
        let (proc, addr) = self.start_server("host-agent", log_name, &args, ns);
        Server {
            proc,
            addr,
            host_id,
        }
    }

    /// This cluster's `--cgroup-parent` (under the test's own cgroup).
    pub fn cgroup_parent(&self) -> String {
        let name = self
            .dir
            .path()
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        format!("agentplane-test/{name}")
    }

    /// Starts one more control-plane replica; returns its index.
    pub fn add_control_plane(&mut self) -> usize {
        let i = self.control_planes.len();
        let s = self.spawn_control_plane(i);
        self.control_planes.push(s);
        i
    }

    /// Starts host agent `id` again with the same flags (after the test
    /// killed it); its log goes to a new file. Returns once it printed its
    /// address.
    pub fn restart_host(&mut self, id: &str) {
        let i = self
            .hosts
            .iter()
            .position(|h| h.host_id == id)
            .unwrap_or_else(|| panic!("no host {id}"));
        let n = self.dir.path().read_dir().map_or(0, Iterator::count);
        let s = self.spawn_host(i, &format!("host-{id}.{n}.log"));
        self.hosts[i] = s;
    }

    /// The host agent with id `id`.
    pub fn host(&mut self, id: &str) -> &mut Server {
        self.hosts
            .iter_mut()
            .find(|h| h.host_id == id)
            .unwrap_or_else(|| panic!("no host {id}"))
    }

    /// Waits until `n` hosts are listed by the control plane.
    pub async fn wait_for_hosts(&self, n: usize) {
        let mut hosts = self.host_client().await;
        crate::eventually(
            Duration::from_secs(15),
            &format!("{n} hosts registered"),
            || {
                let mut h = hosts.clone();
                async move {
                    let list = h
                        .list_hosts(ListHostsRequest {})
                        .await
                        .ok()?
                        .into_inner()
                        .hosts;
                    (list.len() == n).then_some(())
                }
            },
        )
        .await;
        drop(hosts.list_hosts(ListHostsRequest {}).await);
    }

    /// The `--data-dir` of host `host_id` (agents' output under `agents/`).
    pub fn data_dir(&self, host_id: &str) -> PathBuf {
        self.dir.path().join(format!("data-{host_id}"))
    }

    /// Waits (at most 10 s) until agent `id`'s retained output contains `needle`,
    /// read through `agentctl logs`.
    pub async fn wait_for_output(&self, id: &str, needle: &str) {
        crate::eventually(
            Duration::from_secs(10),
            &format!("`{needle}` in the output of {id}"),
            || {
                let out = self.agentctl(&["logs", id]);
                let found = String::from_utf8_lossy(&out.stdout).contains(needle);
                async move { found.then_some(()) }
            },
        )
        .await;
    }

    /// The heartbeat TTL the hosts run with.
    pub fn heartbeat_ttl(&self) -> Duration {
        self.config.heartbeat_ttl
    }

    /// Spawns `argv` through the control plane and returns the agent.
    pub async fn spawn(&self, argv: &[&str]) -> Agent {
        self.spawn_spec(AgentSpec {
            argv: argv.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        })
        .await
    }

    /// Spawns `spec` and returns the agent; panics on an error status.
    pub async fn spawn_spec(&self, spec: AgentSpec) -> Agent {
        self.client()
            .await
            .spawn_agent(SpawnAgentRequest {
                spec: Some(spec),
                request_id: String::new(),
            })
            .await
            .unwrap_or_else(|s| panic!("spawn failed: {s:?}"))
            .into_inner()
            .agent
            .expect("agent in response")
    }

    /// Polls agent `id`'s record through the control plane until `pred`
    /// holds for it; panics naming `what` after `limit`. Wait on the record
    /// itself, not on a side effect of the process (a file, a pid leaving
    /// /proc): those can be seen before the host has written the record.
    pub async fn wait_agent(
        &self,
        id: &str,
        what: &str,
        limit: Duration,
        pred: impl Fn(&Agent) -> bool,
    ) -> Agent {
        self.wait_agent_via(0, id, what, limit, pred).await
    }

    /// [`TestCluster::wait_agent`] through control plane `i`.
    pub async fn wait_agent_via(
        &self,
        i: usize,
        id: &str,
        what: &str,
        limit: Duration,
        pred: impl Fn(&Agent) -> bool,
    ) -> Agent {
        let c = self.client_of(i);
        let pred = &pred;
        crate::eventually(limit, &format!("agent {id} {what}"), || {
            let mut c = c.clone();
            let id = id.to_owned();
            async move {
                let a = c.get_agent(GetAgentRequest { id }).await.ok()?.into_inner();
                pred(&a).then_some(a)
            }
        })
        .await
    }

    /// Polls agent `id`'s record until it is in state `want`.
    pub async fn wait_state(&self, id: &str, want: AgentState, limit: Duration) -> Agent {
        self.wait_agent(id, &format!("reaches {want:?}"), limit, |a| {
            a.state() == want
        })
        .await
    }

    /// Asserts what every test must leave true (no `KEYS` ever reached Redis),
    /// then tears the cluster down. Call it at the end of every test.
    pub async fn finish(self) {
        let stats = self.all_commandstats().await;
        assert!(
            !stats.contains("cmdstat_keys:"),
            "Redis saw KEYS calls (use SCAN):\n{stats}"
        );
        drop(self);
    }

    /// Copies every server's whole log into `to` (created), to read after a
    /// failure once the cluster's own directory is gone.
    pub fn keep_logs(&self, to: &std::path::Path) -> std::io::Result<()> {
        std::fs::create_dir_all(to)?;
        for e in std::fs::read_dir(self.dir.path())?.flatten() {
            let name = e.file_name();
            if name.to_string_lossy().ends_with(".log") {
                std::fs::copy(e.path(), to.join(&name))?;
            }
        }
        Ok(())
    }

    /// The log tail of every server, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for s in self.control_planes.iter().chain(&self.hosts) {
            out.push_str(&format!(
                "--- {} ---\n{}\n",
                s.proc.log.display(),
                s.proc.log_tail(40)
            ));
        }
        out
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test failed; server logs:\n{}", self.logs());
        }
        // Host agents first and gracefully; each process is then SIGKILLed
        // by its own drop if it is still there. They leave their agents to
        // their keepers, which the SIGKILL here ends (their guards kill
        // every agent): a test leaves nothing running behind it.
        for h in &self.hosts {
            h.proc.signal(nix::sys::signal::Signal::SIGTERM);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        for h in &mut self.hosts {
            while h.proc.is_running() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        for h in &self.hosts {
            if let Some(k) = self.keeper_pid(&h.host_id) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(k),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        crate::procfs::remove_cgroups(&self.cgroup_parent());
    }
}
