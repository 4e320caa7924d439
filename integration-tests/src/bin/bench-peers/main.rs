//! bench-peers: the same workloads on agentplane, supervisord, pm2 and the
//! raw fork/exec floor, in one run (`scripts/bench` installs the peers,
//! builds release and draws the chart).
//!
//! Every figure comes from what the OS shows: agents are found in /proc by
//! an argv marker of their own system, "time to running" is each agent's
//! start time (/proc/PID/stat, 10 ms ticks) counted from the start command,
//! memory is the supervisor's RSS above the same supervisor idle, CPU is its
//! user + system time over the workload.

mod agentplane;
mod os;
mod pm2;
mod raw;
mod report;
mod supervisord;

use std::path::{Path, PathBuf};
use std::time::Duration;

use agentplane_integration_tests::bench::percentile;
use clap::Parser;

/// Run the peer benchmark.
#[derive(Debug, Parser)]
struct Args {
    /// Sleepers to start and stop.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// `yes` agents.
    #[arg(long, default_value_t = 10)]
    yes_agents: usize,
    /// How long the `yes` agents run.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20s")]
    yes_for: Duration,
    /// Each `yes` agent's log cap in bytes (where the system has one).
    #[arg(long, default_value_t = 10 << 20)]
    log_cap: u64,
    /// Agents in the crash loop.
    #[arg(long, default_value_t = 100)]
    crash_agents: usize,
    /// How long the crash loop runs.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20s")]
    crash_for: Duration,
    /// Pause/resume calls (alternating, one at a time).
    #[arg(long, default_value_t = 1000)]
    calls: usize,
    /// The directory holding `supervisord` and `supervisorctl` (a venv's
    /// bin); without it supervisord is skipped.
    #[arg(long)]
    supervisor_bin: Option<PathBuf>,
    /// The `pm2` executable (its package's node_modules/.bin/pm2); without it
    /// pm2 is skipped.
    #[arg(long)]
    pm2: Option<PathBuf>,
    /// Where the CSV and the table go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

/// What every system runs.
pub struct Plan {
    /// Sleepers to start.
    pub agents: usize,
    /// `yes` agents and how long they run.
    pub yes_agents: usize,
    /// How long the `yes` agents run.
    pub yes_for: Duration,
    /// Each `yes` agent's log cap.
    pub log_cap_bytes: u64,
    /// Crash-looping agents.
    pub crash_agents: usize,
    /// How long they loop.
    pub crash_for: Duration,
    /// Pause/resume calls.
    pub calls: usize,
    /// Agents the calls go round.
    pub pause_agents: usize,
    /// Scratch space (configs, logs, marker files).
    pub work: PathBuf,
}

impl Plan {
    /// What all `yes` agents' logs may take with their caps held: the caps
    /// plus a file system block per file and 5 % slack for a rotation in
    /// flight.
    pub fn cap_total(&self) -> u64 {
        let caps = self.log_cap_bytes * self.yes_agents as u64;
        caps + caps / 20 + 64 * 1024 * self.yes_agents as u64
    }
}

/// p50 and p99 of latencies, in ms.
pub fn p50_p99(took: &mut [Duration]) -> (Option<f64>, Option<f64>) {
    if took.is_empty() {
        return (None, None);
    }
    took.sort_unstable();
    let ms = |d: Duration| Some(d.as_secs_f64() * 1e3);
    (ms(percentile(took, 0.5)), ms(percentile(took, 0.99)))
}

/// p50 and p99 of each agent's start (from /proc) after `t0` (boot clock).
pub fn to_running(pids: &[i32], t0: Duration) -> (Option<f64>, Option<f64>) {
    let mut after: Vec<Duration> = pids
        .iter()
        .filter_map(|p| os::started_at(*p))
        .map(|s| s.saturating_sub(t0))
        .collect();
    p50_p99(&mut after)
}

/// The start, memory and stop figures: `start` starts `plan.agents` agents
/// running `argv`, `supervisor` names the processes whose RSS above
/// `idle_kib` counts as memory, `stop` stops them all.
pub fn start_stop(
    r: &mut report::Results,
    plan: &Plan,
    argv: &[String],
    idle_kib: u64,
    supervisor: &dyn Fn() -> Vec<i32>,
    start: &mut dyn FnMut(),
    stop: &mut dyn FnMut(),
) {
    let t0_boot = os::boot_now();
    let t0 = std::time::Instant::now();
    start();
    let pids = os::wait_for_count(argv, plan.agents, Duration::from_secs(180));
    r.start_wall_s = Some(t0.elapsed().as_secs_f64());
    r.started = Some(pids.len());
    (r.start_p50_ms, r.start_p99_ms) = to_running(&pids, t0_boot);
    // Two heartbeats (agentplane), so that what is kept per agent is there.
    std::thread::sleep(Duration::from_secs(2));
    let busy = os::rss_kib(&supervisor());
    r.mem_kib_per_agent = Some(busy.saturating_sub(idle_kib) as f64 / pids.len().max(1) as f64);
    let t0 = std::time::Instant::now();
    stop();
    r.stop_left = Some(os::processes_with_argv(argv).len());
    os::wait_for_none(argv, Duration::from_secs(120));
    r.stop_wall_s = Some(t0.elapsed().as_secs_f64());
}

/// The `yes` figures, once the agents run: the CPU the supervisor `pids`
/// use over `plan.yes_for` from now, their RSS then, and the bytes the logs
/// under `logs` hold beyond `disk_before`.
pub fn yes_figures(
    r: &mut report::Results,
    plan: &Plan,
    pids: &[i32],
    logs: &Path,
    disk_before: u64,
) {
    r.yes_cpu_pct = Some(cpu_pct_over(pids, plan.yes_for));
    r.yes_rss_mib = Some(os::rss_kib(pids) as f64 / 1024.0);
    let disk = os::disk_bytes(logs).saturating_sub(disk_before);
    r.yes_disk_mib = Some(disk as f64 / f64::from(1 << 20));
    r.yes_cap_held = Some(disk <= plan.cap_total());
}

/// The crash-loop figures, once the agents loop: the CPU the supervisor
/// `pids` use over `plan.crash_for` from now, and the starts (lines each
/// start adds to `file`) per second meanwhile.
pub fn crash_figures(r: &mut report::Results, plan: &Plan, pids: &[i32], file: &Path) {
    let lines0 = os::lines_in(file);
    r.crash_cpu_pct = Some(cpu_pct_over(pids, plan.crash_for));
    let starts = os::lines_in(file).saturating_sub(lines0);
    r.crash_starts_per_s = Some(starts as f64 / plan.crash_for.as_secs_f64());
}

/// The CPU `pids` use over `d` from now, in % of one core.
fn cpu_pct_over(pids: &[i32], d: Duration) -> f64 {
    let cpu0 = os::cpu_of(pids);
    std::thread::sleep(d);
    100.0 * os::cpu_of(pids).saturating_sub(cpu0).as_secs_f64() / d.as_secs_f64()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} cores ({cpu}), Linux {}", kernel.trim())
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".to_owned(),
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.out)?;
    let work = tempfile::tempdir()?;
    let plan = Plan {
        agents: args.agents,
        yes_agents: args.yes_agents,
        yes_for: args.yes_for,
        log_cap_bytes: args.log_cap,
        crash_agents: args.crash_agents,
        crash_for: args.crash_for,
        calls: args.calls,
        pause_agents: 10,
        work: work.path().to_owned(),
    };
    let mut systems = Vec::new();
    eprintln!("bench-peers: raw fork/exec");
    systems.push(("raw", raw::run(&plan)));
    eprintln!("bench-peers: agentplane");
    systems.push(("agentplane", agentplane::run(&plan).await));
    if let Some(bin) = &args.supervisor_bin {
        eprintln!("bench-peers: supervisord");
        systems.push(("supervisord", supervisord::run(&plan, bin)?));
    }
    if let Some(pm2) = &args.pm2 {
        eprintln!("bench-peers: pm2");
        systems.push(("pm2", pm2::run(&plan, pm2)?));
    }

    let mut text = format!(
        "bench-peers, {}; {}\n{} sleepers, {} yes agents for {:?} (log cap {} MiB each), \
         {} crash-looping agents for {:?}, {} pause/resume calls\n\n",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
        machine(),
        plan.agents,
        plan.yes_agents,
        plan.yes_for,
        plan.log_cap_bytes >> 20,
        plan.crash_agents,
        plan.crash_for,
        plan.calls,
    );
    text.push_str(&report::table(&systems));
    let get = |name: &str| {
        systems
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, r)| r.clone())
    };
    if let Some(ap) = get("agentplane") {
        text.push('\n');
        for peer in ["supervisord", "pm2"] {
            if let Some(p) = get(peer) {
                text.push_str(&format!(
                    "agentplane vs {peer}: start {} faster, memory per agent {} of theirs\n",
                    ratio(p.start_wall_s, ap.start_wall_s),
                    ratio(ap.mem_kib_per_agent, p.mem_kib_per_agent),
                ));
            }
        }
    }
    print!("{text}");
    std::fs::write(args.out.join("bench.txt"), &text)?;
    report::write_csv(&args.out.join("bench.csv"), &systems)?;
    eprintln!(
        "bench-peers: wrote {}",
        args.out.join("bench.csv").display()
    );
    Ok(())
}
