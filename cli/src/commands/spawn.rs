//! `agentctl spawn [--wait]`.

use std::process::ExitCode;
use std::time::Duration;

use agentplane::config::parse_duration;
use agentplane::proto::v1::restart_policy::Mode;
use agentplane::proto::v1::{
    Agent, AgentSpec, AgentState, GetAgentRequest, Placement, ResourceLimits, Resources,
    RestartPolicy, SpawnAgentRequest,
};
use agentplane::time::duration_to_proto;

use super::{bulk, key_value};
use crate::client::{self, Clients};
use crate::output::{self, Format};

/// Arguments of `spawn`.
#[derive(Debug, Clone, clap::Args)]
pub struct SpawnArgs {
    /// A name for the agent (lowercase letters, digits, '-').
    #[arg(long)]
    name: Option<String>,
    /// Run on this host.
    #[arg(long)]
    host: Option<String>,
    /// Run on a host whose labels match, `k=v,k2=v2`.
    #[arg(long)]
    selector: Option<String>,
    /// A label of the agent, KEY=VALUE; repeat for more.
    #[arg(long = "label", value_parser = key_value)]
    labels: Vec<(String, String)>,
    /// An environment variable, KEY=VALUE; repeat for more.
    #[arg(long = "env", short = 'e', value_parser = key_value)]
    env: Vec<(String, String)>,
    /// Working directory on the host (absolute).
    #[arg(long)]
    cwd: Option<String>,
    /// Default time between SIGTERM and SIGKILL when stopping it.
    #[arg(long, value_parser = parse_duration)]
    grace: Option<Duration>,
    /// Maximum runtime of one run; then it is stopped with reason TIMEOUT.
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Restart policy.
    #[arg(long, value_enum)]
    restart: Option<Restart>,
    /// Give up after this many consecutive restarts (default: no limit).
    #[arg(long)]
    max_restarts: Option<u32>,
    /// First restart delay; doubles each time (default 1s).
    #[arg(long, value_parser = parse_duration)]
    backoff: Option<Duration>,
    /// Longest restart delay (default 1m).
    #[arg(long, value_parser = parse_duration)]
    max_backoff: Option<Duration>,
    /// RLIMIT_NOFILE: most open files.
    #[arg(long)]
    limit_nofile: Option<u64>,
    /// RLIMIT_AS: most bytes of virtual memory.
    #[arg(long)]
    limit_as: Option<u64>,
    /// RLIMIT_NPROC: most processes of the user.
    #[arg(long)]
    limit_nproc: Option<u64>,
    /// RLIMIT_CPU: most CPU seconds.
    #[arg(long)]
    limit_cpu: Option<u64>,
    /// cgroup memory limit of the whole agent, e.g. 512MiB; past it the
    /// kernel kills it (reason OOM_KILLED). Only hosts with cgroups take it.
    #[arg(long, value_parser = agentplane::config::parse_bytes)]
    memory: Option<u64>,
    /// cgroup limit on the agent's processes and threads at once.
    #[arg(long)]
    pids: Option<u64>,
    /// cgroup CPU limit in CPUs, e.g. 0.5 or 2.
    #[arg(long, value_parser = parse_cpus)]
    cpus: Option<u32>,
    /// Run as this user id.
    #[arg(long)]
    uid: Option<u32>,
    /// Run as this group id.
    #[arg(long)]
    gid: Option<u32>,
    /// Run the agent in a pseudo-terminal.
    #[arg(long, short = 't')]
    tty: bool,
    /// Output kept on the host's disk, e.g. 64MiB (default 64 MiB, at least 256 KiB).
    #[arg(long, value_parser = agentplane::config::parse_bytes)]
    log_max_bytes: Option<u64>,
    /// How far the agent's output may run ahead of the disk (its pipes'
    /// capacity), e.g. 1MiB (default 128 KiB; 64 KiB to 16 MiB).
    #[arg(long, value_parser = agentplane::config::parse_bytes)]
    log_buffer_bytes: Option<u64>,
    /// After this long without output the agent is idle (AGENT_IDLE event).
    #[arg(long, value_parser = parse_duration)]
    idle_after: Option<Duration>,
    /// Stop the agent once idle this long.
    #[arg(long, value_parser = parse_duration)]
    idle_timeout: Option<Duration>,
    /// At most one copy: the host stops the agent once it could not renew its
    /// lease this long (a partition), and no replacement starts before the
    /// lease expired + this + the grace. Default: availability (a partitioned
    /// restartable agent may run twice until the partition heals).
    #[arg(long, value_parser = parse_duration)]
    stop_after_disconnect: Option<Duration>,
    /// Idempotency key: retrying with the same key never makes a second agent.
    #[arg(long)]
    request_id: Option<String>,
    /// Wait until the agent has ended, print its final record and exit with
    /// its exit code (128 + signal when a signal ended it; 1 when it could not
    /// start or was lost).
    #[arg(long)]
    wait: bool,
    /// Spawn this many agents of the same spec in one command (with --name,
    /// named NAME-1 … NAME-N; with --request-id, keyed ID-1 … ID-N).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    count: u32,
    /// With --count: how many spawn calls are in flight at once.
    #[arg(long, default_value_t = bulk::DEFAULT_PARALLEL, value_parser = clap::value_parser!(u16).range(1..=1024))]
    parallel: u16,
    /// Set by `run --rm`: the agent is session-bound.
    #[arg(skip)]
    pub session_grace: Option<Duration>,
    /// The program and its arguments, after `--`.
    #[arg(last = true, required = true, num_args = 1..)]
    argv: Vec<String>,
}

impl SpawnArgs {
    /// Runs the agent in a terminal (`run` from an interactive terminal).
    pub fn force_tty(&mut self) {
        self.tty = true;
    }

    /// The spec and request id these arguments describe.
    pub fn into_spec(self) -> (AgentSpec, String) {
        let a = self;
        let spec = AgentSpec {
            name: a.name.unwrap_or_default(),
            argv: a.argv,
            env: a.env.into_iter().collect(),
            cwd: a.cwd.unwrap_or_default(),
            labels: a.labels.into_iter().collect(),
            placement: Some(Placement {
                host: a.host.unwrap_or_default(),
                label_selector: a.selector.unwrap_or_default(),
            }),
            stop_grace: a.grace.map(duration_to_proto),
            timeout: a.timeout.map(duration_to_proto),
            restart: a.restart.map(|r| RestartPolicy {
                mode: match r {
                    Restart::Never => Mode::Never,
                    Restart::OnFailure => Mode::OnFailure,
                    Restart::Always => Mode::Always,
                } as i32,
                max_restarts: a.max_restarts,
                initial_backoff: a.backoff.map(duration_to_proto),
                max_backoff: a.max_backoff.map(duration_to_proto),
                stable_after: None,
            }),
            limits: Some(ResourceLimits {
                address_space_bytes: a.limit_as,
                open_files: a.limit_nofile,
                processes: a.limit_nproc,
                cpu_seconds: a.limit_cpu,
            }),
            resources: (a.memory.is_some() || a.pids.is_some() || a.cpus.is_some()).then_some(
                Resources {
                    memory_bytes: a.memory,
                    pids: a.pids,
                    cpu_millis: a.cpus,
                },
            ),
            uid: a.uid,
            gid: a.gid,
            log_max_bytes: a.log_max_bytes.unwrap_or(0),
            log_buffer_bytes: a.log_buffer_bytes.unwrap_or(0),
            idle_after: a.idle_after.map(duration_to_proto),
            idle_timeout: a.idle_timeout.map(duration_to_proto),
            tty: a.tty,
            session_grace: a.session_grace.map(duration_to_proto),
            stop_after_disconnect: a.stop_after_disconnect.map(duration_to_proto),
        };
        (spec, a.request_id.unwrap_or_default())
    }

    /// Makes sure the spawn carries a request id, so retries are idempotent.
    pub fn ensure_request_id(&mut self) {
        if self.request_id.is_none() {
            self.request_id = Some(format!("agentctl-{}", agentplane::ids::new_agent_id()));
        }
    }
}

/// `--cpus`: a number of CPUs, as thousandths.
fn parse_cpus(s: &str) -> Result<u32, String> {
    let cpus: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of CPUs (0.5, 2)"))?;
    if !(cpus.is_finite() && cpus > 0.0 && cpus <= 4096.0) {
        return Err(format!("`{s}`: give more than 0 and at most 4096 CPUs"));
    }
    // In range: the product fits a u32.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok((cpus * 1000.0).round() as u32)
}

/// `--restart` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Restart {
    /// Never restart.
    Never,
    /// Restart after a non-zero exit or a signal.
    OnFailure,
    /// Restart after every exit.
    Always,
}

/// How often `spawn --wait` reads the agent's record.
const WAIT_POLL: Duration = Duration::from_millis(250);

/// Spawns and prints the agent; with `--wait`, waits for its end first.
pub async fn run(c: &mut Clients, fmt: Format, a: SpawnArgs) -> anyhow::Result<ExitCode> {
    if a.count > 1 {
        return run_many(c, fmt, a).await;
    }
    let wait = a.wait;
    let (spec, request_id) = a.into_spec();
    let resp = c
        .agents
        .spawn_agent(SpawnAgentRequest {
            spec: Some(spec),
            request_id,
        })
        .await?
        .into_inner();
    let mut agent = resp.agent.unwrap_or_default();
    if wait {
        let who = output::name_or_id(&agent);
        let p = crate::progress::spinner(fmt, format!("waiting for {who} to end"));
        agent = wait_ended(c, &agent.id, &p).await?;
        p.finish_and_clear();
    }
    match fmt {
        Format::Json | Format::Yaml => output::document(fmt, &output::AgentView::from(&agent))?,
        Format::Table => output::table(output::AGENT_HEADER, &[output::agent_row(&agent)]),
    }
    Ok(if wait {
        exit_code(&agent)
    } else {
        ExitCode::SUCCESS
    })
}

/// `spawn --count N`: N spawns of one spec, `--parallel` at once; prints
/// the agents made (in order) and one line on stderr for each that failed.
async fn run_many(c: &mut Clients, fmt: Format, a: SpawnArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        !a.wait,
        "--wait takes one agent; wait for many with `agentctl watch`"
    );
    let (count, parallel) = (a.count, usize::from(a.parallel));
    let (spec, request_id) = a.into_spec();
    let requests = (1..=count)
        .map(|i| {
            let mut spec = spec.clone();
            if !spec.name.is_empty() {
                spec.name = format!("{}-{i}", spec.name);
            }
            SpawnAgentRequest {
                spec: Some(spec),
                request_id: format!("{request_id}-{i}"),
            }
        })
        .collect();
    let p = crate::progress::bar(fmt, count.into(), "spawning");
    let results = bulk::fan_out(requests, parallel, |req| {
        let (mut c, p) = (c.clone(), p.clone());
        async move {
            let r = c.agents.spawn_agent(req).await;
            p.inc(1);
            r
        }
    })
    .await;
    p.finish_and_clear();
    let mut made = Vec::with_capacity(results.len());
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok(resp) => made.push(resp.into_inner().agent.unwrap_or_default()),
            Err(s) => eprintln!(
                "agentctl: spawn {} of {count}: {}",
                i + 1,
                client::brief(&s)
            ),
        }
    }
    super::control::many(fmt, &made)?;
    Ok(if made.len() == count as usize {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Reads the agent's record until it has ended. An unavailable or slow
/// control plane is waited out (said once on stderr); other errors end the
/// wait.
pub async fn wait_ended(
    c: &mut Clients,
    id: &str,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<Agent> {
    let mut said = false;
    loop {
        match c
            .agents
            .get_agent(GetAgentRequest { id: id.to_owned() })
            .await
        {
            Ok(a) if agentplane::state::has_ended(a.get_ref()) => return Ok(a.into_inner()),
            Ok(a) => progress.set_prefix(agentplane::state::name(a.get_ref().state())),
            Err(s) if client::failover(&s) || s.code() == tonic::Code::DeadlineExceeded => {
                if !said {
                    progress.suspend(|| {
                        eprintln!(
                            "agentctl: waiting for {id}: the control plane did not answer ({}); retrying",
                            s.message()
                        );
                    });
                    said = true;
                }
            }
            Err(s) => return Err(s.into()),
        }
        tokio::time::sleep(WAIT_POLL).await;
    }
}

/// The exit code that stands for an ended agent: its own code, 128 + the
/// signal that ended it, or 1 when it never ran or was lost.
pub fn exit_code(a: &Agent) -> ExitCode {
    let code = match (a.state(), a.exit.as_ref()) {
        (AgentState::Exited, Some(e)) => e.code.unwrap_or_else(|| 128 + e.signal.unwrap_or(0)),
        (AgentState::Exited, None) => 0,
        _ => 1,
    };
    ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1))
}
