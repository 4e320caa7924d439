//! What a host's cgroups can do for its agents (`HostCgroups`, published in
//! the host record and read by placement) and an agent's cgroup limits
//! (`Resources`), validated once at the edge.

use crate::proto::v1 as pb;
use crate::validate::ValidationError;

/// The smallest memory limit taken (below it nothing useful runs).
pub const MIN_MEMORY_BYTES: u64 = 1 << 20;
/// The smallest CPU share taken, in thousandths of a CPU.
pub const MIN_CPU_MILLIS: u32 = 10;

/// Which hierarchy a host agent puts its agents in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CgroupMode {
    /// None: SIGSTOP pauses, ancestry and a marker find escaped processes.
    #[default]
    None,
    /// The v1 hierarchies.
    V1,
    /// The unified hierarchy.
    V2,
}

impl CgroupMode {
    /// The word `hosts ls` and the host record use.
    pub fn name(self) -> &'static str {
        match self {
            CgroupMode::None => "none",
            CgroupMode::V1 => "v1",
            CgroupMode::V2 => "v2",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "v1" => CgroupMode::V1,
            "v2" => CgroupMode::V2,
            _ => CgroupMode::None,
        }
    }
}

/// What one host's cgroups give its agents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostCgroups {
    /// The hierarchy.
    pub mode: CgroupMode,
    /// Pause freezes the cgroup.
    pub freeze: bool,
    /// `Resources::memory_bytes` is enforced.
    pub memory: bool,
    /// `Resources::pids` is enforced.
    pub pids: bool,
    /// `Resources::cpu_millis` is enforced.
    pub cpu: bool,
    /// Why a mode or controller is missing.
    pub detail: String,
}

impl HostCgroups {
    /// The host record's field: `MODE CONTROLLER,… DETAIL`.
    pub fn encode(&self) -> String {
        let mut c: Vec<&str> = Vec::new();
        for (on, name) in [
            (self.freeze, "freeze"),
            (self.memory, "memory"),
            (self.pids, "pids"),
            (self.cpu, "cpu"),
        ] {
            if on {
                c.push(name);
            }
        }
        let controllers = if c.is_empty() {
            "-".to_owned()
        } else {
            c.join(",")
        };
        format!("{} {controllers} {}", self.mode.name(), self.detail)
    }

    /// Reads [`HostCgroups::encode`]'s form; a host agent from before cgroups
    /// (no field) has none.
    pub fn decode(s: &str) -> Self {
        let mut f = s.splitn(3, ' ');
        let mode = CgroupMode::parse(f.next().unwrap_or_default());
        let controllers: Vec<&str> = f.next().unwrap_or_default().split(',').collect();
        let has = |c: &str| controllers.contains(&c);
        Self {
            mode,
            freeze: has("freeze"),
            memory: has("memory"),
            pids: has("pids"),
            cpu: has("cpu"),
            detail: f.next().unwrap_or_default().to_owned(),
        }
    }

    /// The API form.
    pub fn to_proto(&self) -> pb::HostCgroups {
        pb::HostCgroups {
            mode: match self.mode {
                CgroupMode::None => pb::CgroupMode::None,
                CgroupMode::V1 => pb::CgroupMode::V1,
                CgroupMode::V2 => pb::CgroupMode::V2,
            } as i32,
            freeze: self.freeze,
            memory: self.memory,
            pids: self.pids,
            cpu: self.cpu,
            detail: self.detail.clone(),
        }
    }

    /// Why these cgroups cannot enforce `r` (`None`: they can).
    pub fn refusal(&self, r: &Resources) -> Option<String> {
        let mut missing: Vec<&str> = Vec::new();
        if r.memory_bytes.is_some() && !self.memory {
            missing.push("memory");
        }
        if r.pids.is_some() && !self.pids {
            missing.push("pids");
        }
        if r.cpu_millis.is_some() && !self.cpu {
            missing.push("cpu");
        }
        if missing.is_empty() {
            return None;
        }
        let why = if self.detail.is_empty() {
            String::new()
        } else {
            format!(": {}", self.detail)
        };
        Some(format!(
            "cannot enforce a {} limit (cgroups {}{why})",
            missing.join(", "),
            self.mode.name()
        ))
    }
}

/// An agent's cgroup limits, validated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    /// Bytes of memory.
    pub memory_bytes: Option<u64>,
    /// Processes and threads at once.
    pub pids: Option<u64>,
    /// Thousandths of a CPU.
    pub cpu_millis: Option<u32>,
}

impl Resources {
    /// The limits of `spec.resources`, checked.
    pub fn from_proto(r: Option<&pb::Resources>) -> Result<Self, ValidationError> {
        let Some(r) = r else {
            return Ok(Self::default());
        };
        if let Some(m) = r.memory_bytes {
            if m < MIN_MEMORY_BYTES {
                return Err(ValidationError::new(
                    "spec.resources.memory_bytes",
                    format!("{m} bytes; at least 1 MiB"),
                ));
            }
        }
        if r.pids == Some(0) {
            return Err(ValidationError::new(
                "spec.resources.pids",
                "0 processes; at least 1",
            ));
        }
        if let Some(c) = r.cpu_millis {
            if c < MIN_CPU_MILLIS {
                return Err(ValidationError::new(
                    "spec.resources.cpu_millis",
                    format!("{c} thousandths of a CPU; at least {MIN_CPU_MILLIS}"),
                ));
            }
        }
        Ok(Self {
            memory_bytes: r.memory_bytes,
            pids: r.pids,
            cpu_millis: r.cpu_millis,
        })
    }

    /// True when no limit is set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_cgroups_survive_the_host_record() {
        let h = HostCgroups {
            mode: CgroupMode::V2,
            freeze: true,
            memory: false,
            pids: true,
            cpu: false,
            detail: "memory, cpu: not in cgroup.controllers".into(),
        };
        assert_eq!(HostCgroups::decode(&h.encode()), h);
        let none = HostCgroups::default();
        assert_eq!(HostCgroups::decode(&none.encode()), none);
        assert_eq!(HostCgroups::decode(""), none);
    }

    #[test]
    fn a_limit_a_host_cannot_enforce_is_named() {
        let h = HostCgroups {
            mode: CgroupMode::V1,
            freeze: true,
            pids: true,
            detail: "no memory hierarchy mounted".into(),
            ..Default::default()
        };
        let r = Resources {
            memory_bytes: Some(64 << 20),
            pids: Some(10),
            cpu_millis: None,
        };
        assert_eq!(
            h.refusal(&r).as_deref(),
            Some("cannot enforce a memory limit (cgroups v1: no memory hierarchy mounted)")
        );
        assert_eq!(h.refusal(&Resources::default()), None);
    }

    #[test]
    fn resources_below_their_floor_are_refused() {
        let r = |m, p, c| pb::Resources {
            memory_bytes: m,
            pids: p,
            cpu_millis: c,
        };
        assert!(Resources::from_proto(Some(&r(Some(1000), None, None))).is_err());
        assert!(Resources::from_proto(Some(&r(None, Some(0), None))).is_err());
        assert!(Resources::from_proto(Some(&r(None, None, Some(5)))).is_err());
        let ok = Resources::from_proto(Some(&r(Some(1 << 20), Some(1), Some(10)))).unwrap();
        assert_eq!(ok.pids, Some(1));
        assert!(Resources::from_proto(None).unwrap().is_empty());
    }
}
