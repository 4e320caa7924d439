//! Per-agent cgroups: one per run, under `PARENT/HOST` beside (v1: in each
//! hierarchy) this host agent's own cgroup. Membership finds every process
//! of an agent whatever it did to its session, ancestry or environment; a
//! freeze pauses all of it at once; the memory, pids and cpu controllers hold
//! `spec.resources`. Without writable cgroups (`--cgroups auto` found none,
//! or `off`) the supervisor falls back to signals, ancestry and its marker.
//!
//! The host agent creates a run's cgroups and writes its limits; the keeper's
//! child joins them before the exec (it writes `0` to each `cgroup.procs`,
//! or in v1 `tasks`: see [`RunCgroup::join_files`]).

mod detect;
mod run;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use agentplane::cgroups::{CgroupMode, HostCgroups, Resources};

use run::Flavor;
pub use run::{kill_members, RunCgroup};

/// `--cgroups`: which hierarchy to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Setting {
    /// v1 where a freezer hierarchy is mounted and writable, else v2 where
    /// the unified one is, else none.
    Auto,
    /// The v1 hierarchies; fail to start without a writable freezer.
    V1,
    /// The unified hierarchy; fail to start without it.
    V2,
    /// No cgroups: signals, ancestry and an environment marker.
    Off,
}

/// What went wrong with cgroups.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// `--cgroups v1|v2` asked for what this machine does not have.
    #[error("--cgroups {asked}: {detail}")]
    Unavailable {
        /// The setting.
        asked: &'static str,
        /// Why not.
        detail: String,
    },
    /// A cgroup directory could not be made.
    #[error("cannot create cgroup {dir}: {source}")]
    Create {
        /// The directory.
        dir: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A control file refused a value.
    #[error("cannot write `{value}` to {file}: {source}")]
    Write {
        /// The file.
        file: PathBuf,
        /// The value.
        value: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A freeze did not finish in time (a member in an uninterruptible wait).
    #[error("cgroup {dir} was not frozen after {wait:?}")]
    Freeze {
        /// The cgroup.
        dir: PathBuf,
        /// How long it was given.
        wait: std::time::Duration,
    },
    /// A cgroup could not be removed.
    #[error("cannot remove cgroup {dir}: {source}")]
    Remove {
        /// The directory.
        dir: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A limit a cgroup controller holds (`spec.resources`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `memory_bytes`.
    Memory,
    /// `pids`.
    Pids,
    /// `cpu_millis`.
    Cpu,
}

impl Limit {
    const ALL: [Limit; 3] = [Limit::Memory, Limit::Pids, Limit::Cpu];

    /// The controller's name.
    fn controller(self) -> &'static str {
        match self {
            Limit::Memory => "memory",
            Limit::Pids => "pids",
            Limit::Cpu => "cpu",
        }
    }

    /// Says in `caps` that this host enforces it.
    fn enforced_in(self, caps: &mut HostCgroups) {
        match self {
            Limit::Memory => caps.memory = true,
            Limit::Pids => caps.pids = true,
            Limit::Cpu => caps.cpu = true,
        }
    }

    /// True when `r` sets it.
    fn asked_by(self, r: &Resources) -> bool {
        match self {
            Limit::Memory => r.memory_bytes.is_some(),
            Limit::Pids => r.pids.is_some(),
            Limit::Cpu => r.cpu_millis.is_some(),
        }
    }
}

/// This host's cgroups.
#[derive(Debug, Clone)]
pub struct Cgroups {
    caps: HostCgroups,
    /// Where runs' membership cgroups go (v1: the freezer hierarchy's
    /// `PARENT/HOST`, v2: the unified one's); `None` without cgroups.
    host_dir: Option<PathBuf>,
    /// v1: each usable limit hierarchy's `PARENT/HOST`.
    limit_dirs: Vec<(Limit, PathBuf)>,
}

impl Cgroups {
    /// No cgroups.
    pub fn off(detail: impl Into<String>) -> Self {
        Self {
            caps: HostCgroups {
                mode: CgroupMode::None,
                detail: detail.into(),
                ..HostCgroups::default()
            },
            host_dir: None,
            limit_dirs: Vec::new(),
        }
    }

    /// Finds and prepares (creates `PARENT/HOST`) the hierarchy `setting`
    /// asks for. `auto` falls back to none, saying why; `v1`/`v2` fail.
    pub fn detect(setting: Setting, parent: &str, host: &str) -> Result<Self, CgroupError> {
        if setting == Setting::Off {
            return Ok(Self::off("--cgroups off"));
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let mounts = detect::mounts(&mountinfo);
        let v1 = || Self::v1(&mounts, &own, parent, host);
        let v2 = || Self::v2(&mounts, &own, parent, host);
        match setting {
            Setting::V1 => v1().map_err(|detail| CgroupError::Unavailable {
                asked: "v1",
                detail,
            }),
            Setting::V2 => v2().map_err(|detail| CgroupError::Unavailable {
                asked: "v2",
                detail,
            }),
            Setting::Auto | Setting::Off => Ok(v1()
                .or_else(|a| v2().map_err(|b| format!("v1: {a}; v2: {b}")))
                .unwrap_or_else(Self::off)),
        }
    }

    fn v1(mounts: &[detect::Mount], own: &str, parent: &str, host: &str) -> Result<Self, String> {
        let dir_for = |controller: &str| -> Result<PathBuf, String> {
            let m = mounts
                .iter()
                .find(|m| !m.unified && m.controllers.iter().any(|c| c == controller))
                .ok_or_else(|| format!("no {controller} hierarchy is mounted"))?;
            let own_path = detect::own_path(own, Some(controller)).unwrap_or_else(|| "/".into());
            let own_dir = detect::dir_of(m, &own_path);
            let dir = detect::host_dir(&m.point, &own_dir, parent, host);
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            Ok(dir)
        };
        let freezer = dir_for("freezer")?;
        let mut limit_dirs = Vec::new();
        let mut missing = Vec::new();
        let mut caps = HostCgroups {
            mode: CgroupMode::V1,
            freeze: true,
            ..HostCgroups::default()
        };
        for limit in Limit::ALL {
            match dir_for(limit.controller()) {
                Ok(dir) => {
                    limit.enforced_in(&mut caps);
                    limit_dirs.push((limit, dir));
                }
                Err(e) => missing.push(e),
            }
        }
        caps.detail = missing.join("; ");
        Ok(Self {
            caps,
            host_dir: Some(freezer),
            limit_dirs,
        })
    }

    fn v2(mounts: &[detect::Mount], own: &str, parent: &str, host: &str) -> Result<Self, String> {
        let m = mounts
            .iter()
            .find(|m| m.unified)
            .ok_or("no cgroup2 hierarchy is mounted")?;
        let own_path = detect::own_path(own, None).unwrap_or_else(|| "/".into());
        let own_dir = detect::dir_of(m, &own_path);
        let dir = detect::host_dir(&m.point, &own_dir, parent, host);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut caps = HostCgroups {
            mode: CgroupMode::V2,
            freeze: dir.join("cgroup.freeze").exists(),
            ..HostCgroups::default()
        };
        // Each level from the first new one down must hand the controllers
        // to its children; a cgroup that holds processes (this host agent's
        // own, unless it is the root) cannot (the no-internal-process rule).
        let mut notes = Vec::new();
        if !caps.freeze {
            notes.push("no cgroup.freeze (kernel before 5.2)".to_owned());
        }
        let base = match parent.strip_prefix('/') {
            Some(_) => m.point.clone(),
            None => own_dir,
        };
        for limit in Limit::ALL {
            match enable_down(&base, &dir, limit.controller()) {
                Ok(()) => limit.enforced_in(&mut caps),
                Err(e) => notes.push(format!("{}: {e}", limit.controller())),
            }
        }
        caps.detail = notes.join("; ");
        Ok(Self {
            caps,
            host_dir: Some(dir),
            limit_dirs: Vec::new(),
        })
    }

    /// What these cgroups give agents (the host record's `cgroups`).
    pub fn caps(&self) -> &HostCgroups {
        &self.caps
    }

    /// The cgroup of run `tag`, whether or not it exists yet: `None`
    /// without cgroups. `limits` says which v1 limit hierarchies it has.
    pub fn run(&self, tag: &str, limits: &Resources) -> Option<RunCgroup> {
        let membership = self.host_dir.as_ref()?.join(tag);
        let flavor = match self.caps.mode {
            CgroupMode::V2 => Flavor::V2,
            _ => Flavor::V1,
        };
        let others = self
            .limit_dirs
            .iter()
            .filter(|(l, _)| l.asked_by(limits))
            .map(|(l, d)| (*l, d.join(tag)))
            .collect();
        Some(RunCgroup::new(flavor, membership, others, *limits))
    }

    /// Kills what is left in, and removes, every run cgroup of this host
    /// not in `keep`: runs that ended with an earlier host agent or keeper.
    /// Returns how many processes it killed.
    pub fn sweep_except(&self, keep: &HashSet<String>) -> usize {
        let mut killed = 0;
        let dirs = self
            .host_dir
            .iter()
            .chain(self.limit_dirs.iter().map(|(_, d)| d));
        for host_dir in dirs {
            let Ok(entries) = std::fs::read_dir(host_dir) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if keep.contains(&name) || !e.path().is_dir() {
                    continue;
                }
                let left = run::members_of(&e.path()).len();
                if left > 0 {
                    killed += left;
                    kill_members(&e.path());
                }
                if let Err(err) = remove_when_empty(&e.path()) {
                    tracing::warn!(dir = %e.path().display(), error = %err, "cannot remove an earlier run's cgroup");
                }
            }
        }
        killed
    }
}

/// rmdir, retried while the last members are being released.
fn remove_when_empty(dir: &Path) -> std::io::Result<()> {
    for _ in 0..50 {
        match std::fs::remove_dir(dir) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            other => return other,
        }
    }
    std::fs::remove_dir(dir)
}

/// v2: enables `controller` in `cgroup.subtree_control` of `base`, of
/// each directory between, and of `dir` (whose children are the runs).
fn enable_down(base: &Path, dir: &Path, controller: &str) -> Result<(), String> {
    let available = std::fs::read_to_string(base.join("cgroup.controllers")).unwrap_or_default();
    if !available.split_whitespace().any(|c| c == controller) {
        return Err(format!(
            "not in {}/cgroup.controllers (bound to a v1 hierarchy, or not delegated)",
            base.display()
        ));
    }
    let mut level = base.to_path_buf();
    let rest = dir.strip_prefix(base).unwrap_or(Path::new(""));
    let mut parts = rest.components();
    loop {
        let file = level.join("cgroup.subtree_control");
        std::fs::write(&file, format!("+{controller}")).map_err(|e| {
            format!(
                "cannot enable it in {}: {e} (a cgroup holding processes cannot pass controllers on: run the host agent in a cgroup of its own, e.g. systemd's Delegate=yes)",
                file.display()
            )
        })?;
        match parts.next() {
            Some(p) => level.push(p),
            None => return Ok(()),
        }
    }
}
