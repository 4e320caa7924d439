//! Where a benchmark's CPU time went: the run time of named processes and
//! the busy time of the whole machine between two snapshots, from `/proc`;
//! how fast this machine runs now; and SCHED_IDLE for a bench's own threads.

use crate::procfs;

/// CPU time of `pid` in nanoseconds: the sum of its live threads' run
/// times (`/proc/PID/task/*/schedstat`, exact, where the tick-sampled
/// `utime` and `stime` miss short bursts: a start's whole life often falls
/// between two ticks); 0 if it is gone.
pub fn ns(pid: i32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// How fast this machine runs a fixed piece of work now: millions of
/// rounds of an integer loop per second of this thread's own CPU time
/// (`CLOCK_THREAD_CPUTIME_ID`), the median of five samples of about 20 ms.
/// Other processes' load does not count (the loop's own time is
/// measured), so what moves it is the core's own speed: a VM's slower
/// stretches (time the hypervisor takes is charged to the running thread
/// when, as here, no steal time is reported) or a frequency change.
pub fn speed() -> f64 {
    const ROUNDS: u64 = 10_000_000;
    let ns = median_of_five_ns(|| {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for i in 0..ROUNDS {
            x = std::hint::black_box(x.rotate_left(7) ^ i).wrapping_mul(0x2545_F491_4F6C_DD1D);
        }
        std::hint::black_box(x);
    });
    ROUNDS as f64 / ns.max(1.0) * 1e3
}

/// How long a dependent read from memory takes now, in nanoseconds of this
/// thread's CPU time: a walk of a random cycle over 64 MiB (far past the
/// caches), the median of five walks of 200,000 steps. Where [`speed`]
/// sees the core, this sees the caches and memory the machine shares (a
/// VM's neighbours included).
pub fn memory_latency_ns() -> f64 {
    use std::sync::OnceLock;
    const SLOTS: usize = 16 << 20;
    const STEPS: usize = 200_000;
    static CYCLE: OnceLock<Vec<u32>> = OnceLock::new();
    let next = CYCLE.get_or_init(|| {
        use rand::seq::SliceRandom;
        let mut order: Vec<u32> = (0..u32::try_from(SLOTS).unwrap_or(u32::MAX)).collect();
        order.shuffle(&mut rand::rng());
        let mut next = vec![0u32; SLOTS];
        for w in order.windows(2) {
            next[w[0] as usize] = w[1];
        }
        next[order[SLOTS - 1] as usize] = order[0];
        next
    });
    let ns = median_of_five_ns(|| {
        let mut at = 0u32;
        for _ in 0..STEPS {
            at = next[at as usize];
        }
        std::hint::black_box(at);
    });
    ns / STEPS as f64
}

/// The median of five runs of `work`, in nanoseconds of this thread's CPU
/// time.
fn median_of_five_ns(mut work: impl FnMut()) -> f64 {
    let mut samples: Vec<f64> = (0..5)
        .map(|_| {
            let before = thread_cpu_ns();
            work();
            thread_cpu_ns().saturating_sub(before) as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// This thread's CPU time so far, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec).unwrap_or(0)
}

/// Busy time of the whole machine (every CPU) in nanoseconds: all but idle
/// and iowait, from the tick counts of `/proc/stat` (sampled, but over
/// every CPU and a whole span, close).
pub fn machine_busy_ns() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/stat") else {
        return 0;
    };
    let Some(line) = text.lines().next() else {
        return 0;
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal guest guest_nice; guest
    // time is counted in user already.
    let ticks = v.iter().take(8).sum::<u64>()
        - v.get(3).copied().unwrap_or(0)
        - v.get(4).copied().unwrap_or(0);
    (ticks as f64 * 1e9 / ticks_per_second()) as u64
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64)
}

/// CPU of named processes and of the machine, taken before and after a
/// span of work.
pub struct Split {
    names: Vec<&'static str>,
    pids: Vec<i32>,
    before: Vec<u64>,
    machine_before: u64,
}

impl Split {
    /// Starts measuring `parts` (name, pid).
    pub fn start(parts: &[(&'static str, i32)]) -> Self {
        let pids: Vec<i32> = parts.iter().map(|(_, p)| *p).collect();
        Self {
            names: parts.iter().map(|(n, _)| *n).collect(),
            before: pids.iter().map(|p| ns(*p)).collect(),
            pids,
            machine_before: machine_busy_ns(),
        }
    }

    /// Ends the span: the named processes' and the machine's time since
    /// [`Split::start`], taken before anything else reads `/proc`.
    pub fn end(self) -> Spent {
        let used = self
            .pids
            .iter()
            .zip(&self.before)
            .map(|(pid, before)| ns(*pid).saturating_sub(*before))
            .collect();
        Spent {
            names: self.names,
            used,
            machine: machine_busy_ns().saturating_sub(self.machine_before),
        }
    }
}

/// The CPU time a [`Split`] measured.
pub struct Spent {
    names: Vec<&'static str>,
    used: Vec<u64>,
    machine: u64,
}

impl Spent {
    /// Milliseconds of CPU per unit of work (`units` of it done in the
    /// span): each named process, then each group of `started` processes
    /// (their whole lives: processes started during the span, such as the
    /// agents), then the rest of the machine, then the machine's total.
    pub fn per_unit_ms(&self, units: usize, started: &[(&str, &[i32])]) -> Vec<(String, f64)> {
        let ms = |t: u64| t as f64 / 1e6 / units.max(1) as f64;
        let mut out: Vec<(String, f64)> = self
            .names
            .iter()
            .zip(&self.used)
            .map(|(name, used)| ((*name).to_owned(), ms(*used)))
            .collect();
        let mut named = self.used.iter().sum::<u64>();
        for (name, pids) in started {
            let t: u64 = pids.iter().map(|p| ns(*p)).sum();
            named += t;
            out.push(((*name).to_owned(), ms(t)));
        }
        out.push(("rest".to_owned(), ms(self.machine.saturating_sub(named))));
        out.push(("machine".to_owned(), ms(self.machine)));
        out
    }
}

/// Live descendants of `ancestor` (not itself).
pub fn descendants(ancestor: i32) -> Vec<i32> {
    procfs::all_processes()
        .into_iter()
        .filter(|p| p.pid != ancestor && procfs::descends_from(p.pid, ancestor))
        .map(|p| p.pid)
        .collect()
}

/// Puts the calling thread under SCHED_IDLE with `chrt` (no safe
/// binding of sched_setscheduler is at hand).
pub fn sched_idle() -> anyhow::Result<()> {
    // "PID/task/TID": this thread's id.
    let link = std::fs::read_link("/proc/thread-self")?;
    let tid = link
        .file_name()
        .ok_or_else(|| anyhow::anyhow!("no thread id in {}", link.display()))?;
    let status = std::process::Command::new("chrt")
        .args(["--idle", "-p", "0"])
        .arg(tid)
        .status()?;
    anyhow::ensure!(status.success(), "chrt --idle -p 0 {tid:?}: {status}");
    Ok(())
}
