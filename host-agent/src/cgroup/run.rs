//! One run's cgroup: its members, freezing, killing every member at once,
//! its OOM kills, and removing it. All plain file reads and writes in
//! cgroupfs; the waits poll.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use agentplane::cgroups::Resources;

use super::{CgroupError, Limit};

/// Which hierarchy the run's cgroup is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// v1: a freezer cgroup (membership and freezing), and one per limit.
    V1,
    /// v2: one cgroup for everything.
    V2,
}

/// The cgroup (v1: cgroups) of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunCgroup {
    flavor: Flavor,
    /// Membership and freezing: v1's freezer cgroup, or the v2 cgroup.
    membership: PathBuf,
    /// v1: the memory, pids and cpu cgroups the run has limits in.
    others: Vec<(Limit, PathBuf)>,
    /// The limits it holds.
    limits: Resources,
}

impl RunCgroup {
    pub(super) fn new(
        flavor: Flavor,
        membership: PathBuf,
        others: Vec<(Limit, PathBuf)>,
        limits: Resources,
    ) -> Self {
        Self {
            flavor,
            membership,
            others,
            limits,
        }
    }

    /// The cgroup that holds `limit`: in v1 its own hierarchy's (if the
    /// run has one), in v2 the run's one cgroup.
    fn dir_of(&self, limit: Limit) -> Option<&Path> {
        match self.flavor {
            Flavor::V2 => Some(&self.membership),
            Flavor::V1 => self
                .others
                .iter()
                .find(|(l, _)| *l == limit)
                .map(|(_, d)| d.as_path()),
        }
    }

    /// Every cgroup of the run, membership first.
    fn dirs(&self) -> impl Iterator<Item = &Path> {
        std::iter::once(self.membership.as_path())
            .chain(self.others.iter().map(|(_, d)| d.as_path()))
    }

    /// Creates its cgroups (a restart finds them there: kept, and thawed) and writes
    /// its limits, which [`agentplane::cgroups::HostCgroups::refusal`] let
    /// through.
    pub fn create(&self) -> Result<(), CgroupError> {
        for dir in self.dirs() {
            match std::fs::create_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    // Reused by a restart: a child that joined it frozen
                    // would stop before its exec. A new one never is.
                    if dir == self.membership {
                        thaw(dir);
                    }
                }
                // Its parent went away: made again as at the host agent's start.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    std::fs::create_dir_all(dir).map_err(|source| CgroupError::Create {
                        dir: dir.to_owned(),
                        source,
                    })?;
                }
                Err(source) => {
                    return Err(CgroupError::Create {
                        dir: dir.to_owned(),
                        source,
                    })
                }
            }
        }
        let v2 = self.flavor == Flavor::V2;
        let l = &self.limits;
        if let (Some(m), Some(d)) = (l.memory_bytes, self.dir_of(Limit::Memory)) {
            // Swap counts too (as in Kubernetes): past the limit the agent
            // is killed, not swapped out. The files exist only with swap
            // accounting on.
            if v2 {
                write(&d.join("memory.max"), &m.to_string())?;
                if d.join("memory.swap.max").exists() {
                    write(&d.join("memory.swap.max"), "0")?;
                }
            } else {
                // memsw may not go below the memory limit: lowered after it.
                write(&d.join("memory.limit_in_bytes"), &m.to_string())?;
                if d.join("memory.memsw.limit_in_bytes").exists() {
                    write(&d.join("memory.memsw.limit_in_bytes"), &m.to_string())?;
                }
            }
        }
        if let (Some(p), Some(d)) = (l.pids, self.dir_of(Limit::Pids)) {
            write(&d.join("pids.max"), &p.to_string())?;
        }
        if let (Some(c), Some(d)) = (l.cpu_millis, self.dir_of(Limit::Cpu)) {
            // A 100 ms period: the quota is the period times the CPUs.
            let quota = u64::from(c) * 100;
            if v2 {
                write(&d.join("cpu.max"), &format!("{quota} 100000"))?;
            } else {
                write(&d.join("cpu.cfs_period_us"), "100000")?;
                write(&d.join("cpu.cfs_quota_us"), &quota.to_string())?;
            }
        }
        Ok(())
    }

    /// The limits it holds.
    pub fn limits(&self) -> &Resources {
        &self.limits
    }

    /// The membership cgroup's directory.
    pub fn dir(&self) -> &Path {
        &self.membership
    }

    /// The files a new process writes `0` to, to join the run's cgroups,
    /// membership first: `cgroup.procs`; or in v1, when `by_thread`, each
    /// hierarchy's `tasks`. The process is then a child of one thread, so
    /// moving that thread moves it; and the kernel moves the writer's own
    /// thread under `cgroup_mutex` only, where a `cgroup.procs` write also
    /// takes the global threadgroup lock for writing. That write waits for an
    /// RCU grace period (31 ms seen here) while it holds `cgroup_mutex` and
    /// keeps every fork on the machine waiting (`cgroup_can_fork`): during
    /// 1,000 starts it stalled every start in flight, cgroup mkdirs and the
    /// forker's forks with them.
    pub fn join_files(&self, by_thread: bool) -> Vec<String> {
        let file = match self.flavor {
            Flavor::V1 if by_thread => "tasks",
            _ => "cgroup.procs",
        };
        self.dirs()
            .map(|d| d.join(file).to_string_lossy().into_owned())
            .collect()
    }

    /// Every process in it now.
    pub fn members(&self) -> Vec<i32> {
        members_of(&self.membership)
    }

    /// Freezes (`true`) or thaws the whole run at once; a freeze returns
    /// once the kernel says every member is frozen, or at `wait`.
    pub async fn freeze(&self, frozen: bool, wait: Duration) -> Result<(), CgroupError> {
        let f = Freezer::of(&self.membership);
        write(&self.membership.join(f.file), f.value(frozen))?;
        if !frozen {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + wait;
        let mut delay = Duration::from_millis(1);
        while !self.is_frozen() {
            if tokio::time::Instant::now() >= deadline {
                return Err(CgroupError::Freeze {
                    dir: self.membership.clone(),
                    wait,
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(20));
        }
        Ok(())
    }

    /// True when the kernel says the whole run is frozen.
    pub fn is_frozen(&self) -> bool {
        is_frozen(&self.membership)
    }

    /// SIGKILLs every member at once (nothing forks in between).
    pub fn kill(&self) {
        kill_members(&self.membership);
    }

    /// OOM kills in the run's memory cgroup so far.
    pub fn oom_kills(&self) -> u64 {
        let Some(dir) = self.dir_of(Limit::Memory) else {
            return 0;
        };
        let file = match self.flavor {
            Flavor::V1 => "memory.oom_control",
            Flavor::V2 => "memory.events",
        };
        std::fs::read_to_string(dir.join(file))
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    let v = l.strip_prefix("oom_kill ")?;
                    v.trim().parse().ok()
                })
            })
            .unwrap_or(0)
    }

    /// Removes the run's cgroups once their last member is gone (an exited
    /// member leaves at its release), polling up to `wait`. A missing one
    /// is removed already.
    pub async fn remove(&self, wait: Duration) -> Result<(), CgroupError> {
        let deadline = tokio::time::Instant::now() + wait;
        // The membership cgroup last: it is what a later sweep finds the
        // run by.
        let dirs: Vec<&Path> = self.dirs().collect();
        for dir in dirs.into_iter().rev() {
            loop {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == ErrorKind::NotFound => break,
                    Err(e)
                        if tokio::time::Instant::now() < deadline
                            && e.raw_os_error() == Some(libc::EBUSY) =>
                    {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err(e) => {
                        return Err(CgroupError::Remove {
                            dir: dir.to_owned(),
                            source: e,
                        })
                    }
                }
            }
        }
        Ok(())
    }
}

/// The pids in cgroup `dir` (none if it is gone).
pub fn members_of(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

fn is_frozen(dir: &Path) -> bool {
    if let Ok(s) = std::fs::read_to_string(dir.join("freezer.state")) {
        return s.trim() == "FROZEN";
    }
    std::fs::read_to_string(dir.join("cgroup.events"))
        .is_ok_and(|s| s.lines().any(|l| l.trim() == "frozen 1"))
}

/// The file that freezes a cgroup and its two values: v1's freezer, or
/// v2's `cgroup.freeze`.
struct Freezer {
    file: &'static str,
    frozen: &'static str,
    thawed: &'static str,
}

impl Freezer {
    fn of(dir: &Path) -> Self {
        if dir.join("freezer.state").exists() {
            Self {
                file: "freezer.state",
                frozen: "FROZEN",
                thawed: "THAWED",
            }
        } else {
            Self {
                file: "cgroup.freeze",
                frozen: "1",
                thawed: "0",
            }
        }
    }

    fn value(&self, frozen: bool) -> &'static str {
        if frozen {
            self.frozen
        } else {
            self.thawed
        }
    }

    /// Writes the value; false when the cgroup cannot be frozen (gone, or
    /// v2 before Linux 5.2).
    fn set(&self, dir: &Path, frozen: bool) -> bool {
        std::fs::write(dir.join(self.file), self.value(frozen)).is_ok()
    }
}

fn write(file: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(file, value).map_err(|source| CgroupError::Write {
        file: file.to_owned(),
        value: value.to_owned(),
        source,
    })
}

/// Thaws cgroup `dir`, if it can be frozen at all.
fn thaw(dir: &Path) {
    Freezer::of(dir).set(dir, false);
}

/// How long one round of [`kill_members`] waits for the freeze to hold.
const KILL_FREEZE_WAIT: Duration = Duration::from_millis(20);

/// SIGKILLs every process in cgroup `dir`, whichever hierarchy: v2's
/// `cgroup.kill` where the kernel has it; else each round freezes the
/// cgroup, waits (bounded) until the kernel says it is frozen, so that no
/// member forks between the read of the members and the signals, sends
/// them all SIGKILL and thaws (a frozen process acts on SIGKILL only once
/// thawed). It always ends thawed: a frozen empty cgroup would freeze the
/// next run that joins it. What the guard does for each run after the
/// keeper died.
pub fn kill_members(dir: &Path) {
    let f = Freezer::of(dir);
    if std::fs::write(dir.join("cgroup.kill"), "1").is_err() {
        // Exited members may linger in the list until the keeper reaps
        // them, hence the bound on rounds.
        for _ in 0..4 {
            if members_of(dir).is_empty() {
                break;
            }
            if f.set(dir, true) {
                let deadline = std::time::Instant::now() + KILL_FREEZE_WAIT;
                while !is_frozen(dir) && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            for p in members_of(dir) {
                if p > 1 {
                    let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                }
            }
            f.set(dir, false);
        }
    }
    f.set(dir, false);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(flavor: Flavor) -> RunCgroup {
        let others = match flavor {
            Flavor::V1 => vec![(Limit::Memory, PathBuf::from("/cg/memory/ap/h/r"))],
            Flavor::V2 => Vec::new(),
        };
        RunCgroup::new(
            flavor,
            PathBuf::from("/cg/freezer/ap/h/r"),
            others,
            Resources::default(),
        )
    }

    #[test]
    fn v1_runs_join_by_thread_through_tasks_and_v2_runs_through_cgroup_procs() {
        assert_eq!(
            run(Flavor::V1).join_files(true),
            ["/cg/freezer/ap/h/r/tasks", "/cg/memory/ap/h/r/tasks"]
        );
        // An older keeper finds the membership from `cgroup.procs` only.
        assert_eq!(
            run(Flavor::V1).join_files(false),
            [
                "/cg/freezer/ap/h/r/cgroup.procs",
                "/cg/memory/ap/h/r/cgroup.procs"
            ]
        );
        // v2 has no `tasks`; `cgroup.threads` is for threaded cgroups only.
        assert_eq!(
            run(Flavor::V2).join_files(true),
            ["/cg/freezer/ap/h/r/cgroup.procs"]
        );
    }
}
