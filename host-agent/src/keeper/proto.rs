//! The keeper protocol's messages (prost-encoded, one per seqpacket
//! datagram; descriptors travel beside them, see [`super::wire`]). Every
//! message is a oneof, so none encodes to zero bytes (a zero-byte datagram
//! is the peer's close). Bump [`VERSION`] on any change a peer could misread.

use std::collections::HashMap;

/// This side's protocol version. 2 added `Launch::cgroup_procs`; 3 lets
/// them be v1 `tasks` files (see [`TASKS_VERSION`]).
pub const VERSION: u32 = 3;
/// The oldest keeper a host agent still works with (a keeper outlives
/// host-agent upgrades): a keeper of protocol 1 ignores `cgroup_procs`, so
/// the host agent gives its agents no cgroups (`cgroup::Cgroups::off`).
pub const MIN_VERSION: u32 = 1;
/// The first version whose keeper puts a run in its cgroups.
pub const CGROUPS_VERSION: u32 = 2;
/// The first version whose keeper finds a run's membership cgroup from a
/// `tasks` file as well as from a `cgroup.procs` one
/// ([`Launch::membership_cgroup`]): an older one is sent `cgroup.procs`.
pub const TASKS_VERSION: u32 = 3;

/// How to start one program: everything resolved by the host agent, so the
/// keeper applies no policy of its own.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Launch {
    /// Program and arguments (argv[0] looked up on PATH).
    #[prost(string, repeated, tag = "1")]
    pub argv: Vec<String>,
    /// The whole environment of the program.
    #[prost(map = "string, string", tag = "2")]
    pub env: HashMap<String, String>,
    /// Working directory; empty: the keeper's.
    #[prost(string, tag = "3")]
    pub cwd: String,
    /// User to run as.
    #[prost(uint32, optional, tag = "4")]
    pub uid: Option<u32>,
    /// Group to run as.
    #[prost(uint32, optional, tag = "5")]
    pub gid: Option<u32>,
    /// A pseudo-terminal instead of pipes.
    #[prost(bool, tag = "6")]
    pub tty: bool,
    /// Resource limits set before the exec.
    #[prost(message, repeated, tag = "7")]
    pub limits: Vec<Limit>,
    /// The agent id (its processes' marker, which the guard looks for).
    #[prost(string, tag = "8")]
    pub agent: String,
    /// The `cgroup.procs` (or, v1, `tasks`) files the child joins before
    /// the exec (it writes `0` to each), its membership cgroup first;
    /// empty: no cgroup.
    #[prost(string, repeated, tag = "9")]
    pub cgroup_procs: Vec<String>,
}

impl Launch {
    /// The run's membership cgroup (the directory of the first
    /// `cgroup_procs`, a `cgroup.procs` or a v1 `tasks` file), if it has
    /// cgroups.
    pub fn membership_cgroup(&self) -> Option<&str> {
        let first = self.cgroup_procs.first()?;
        first
            .strip_suffix("/cgroup.procs")
            .or_else(|| first.strip_suffix("/tasks"))
    }
}

/// One rlimit.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Limit {
    /// Which one.
    #[prost(enumeration = "LimitKind", tag = "1")]
    pub kind: i32,
    /// Soft limit.
    #[prost(uint64, tag = "2")]
    pub soft: u64,
    /// Hard limit.
    #[prost(uint64, tag = "3")]
    pub hard: u64,
}

/// The rlimits a spec can set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum LimitKind {
    /// RLIMIT_AS.
    AddressSpace = 0,
    /// RLIMIT_NOFILE.
    OpenFiles = 1,
    /// RLIMIT_NPROC.
    Processes = 2,
    /// RLIMIT_CPU.
    CpuSeconds = 3,
}

/// How a process ended.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct Exit {
    /// Exit code, when it exited.
    #[prost(int32, optional, tag = "1")]
    pub code: Option<i32>,
    /// Signal, when one ended it.
    #[prost(int32, optional, tag = "2")]
    pub signal: Option<i32>,
}

/// From the host agent to the keeper.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ToKeeper {
    /// The request.
    #[prost(oneof = "to_keeper::Kind", tags = "1, 2, 3, 4")]
    pub kind: Option<to_keeper::Kind>,
}

/// [`ToKeeper`]'s cases.
pub mod to_keeper {
    /// A request.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        /// First message: the keeper answers with Welcome, every process
        /// it keeps (Kept, with descriptors), then Ready.
        #[prost(uint32, tag = "1")]
        Hello(u32),
        /// Start a program; answered with Spawned (with descriptors) or Failed.
        #[prost(message, tag = "2")]
        Spawn(super::Spawn),
        /// The host agent has recorded this pid's exit: forget it.
        #[prost(int32, tag = "3")]
        Ack(i32),
        /// How to say the machine is alive while no host agent is
        /// attached, and the orphan grace; replaces what an earlier host
        /// agent sent. (A keeper from before it ignores it.)
        #[prost(message, tag = "4")]
        Liveness(super::Liveness),
    }
}

/// What the keeper needs to renew `ap:keeper:{host}` (see
/// `agentplane::registry::Restarting`): the host agent's Redis settings,
/// read once by it, and its timings.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Liveness {
    /// Redis URL (may hold a user and password).
    #[prost(string, tag = "1")]
    pub redis_url: String,
    /// Key prefix.
    #[prost(string, tag = "2")]
    pub prefix: String,
    /// The host id.
    #[prost(string, tag = "3")]
    pub host: String,
    /// The host's heartbeat TTL, ms (a beat every third of it).
    #[prost(uint64, tag = "4")]
    pub ttl_ms: u64,
    /// How long the agents are held with no host agent, ms.
    #[prost(uint64, tag = "5")]
    pub orphan_grace_ms: u64,
    /// PEM CA for `rediss://`.
    #[prost(bytes = "vec", optional, tag = "6")]
    pub ca: Option<Vec<u8>>,
    /// PEM client certificate and key.
    #[prost(bytes = "vec", optional, tag = "7")]
    pub cert: Option<Vec<u8>>,
    /// See `cert`.
    #[prost(bytes = "vec", optional, tag = "8")]
    pub key: Option<Vec<u8>>,
    /// The Redis password.
    #[prost(string, optional, tag = "9")]
    pub password: Option<String>,
    /// Sentinel addresses (`--redis-sentinel`); empty: `redis_url` is the
    /// server. A keeper older than this field ignores it.
    #[prost(string, repeated, tag = "10")]
    pub sentinels: Vec<String>,
    /// The master's name the sentinels know (`--redis-master-name`).
    #[prost(string, tag = "11")]
    pub master_name: String,
    /// Redis Cluster nodes (`--redis-cluster`); the keys are then in the
    /// Cluster layout. A keeper older than this field would renew the flat
    /// layout's key, which a Cluster control plane does not read: upgrade
    /// keepers before moving to a Cluster.
    #[prost(string, repeated, tag = "12")]
    pub cluster: Vec<String>,
}

/// A start request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Spawn {
    /// Matches the answer to the request.
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    /// The host agent's name for this run, given back in Kept.
    #[prost(string, tag = "2")]
    pub tag: String,
    /// What to start.
    #[prost(message, optional, tag = "3")]
    pub launch: Option<Launch>,
}

/// From the keeper to the host agent.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FromKeeper {
    /// The message.
    #[prost(oneof = "from_keeper::Kind", tags = "1, 2, 3, 4, 5, 6, 7")]
    pub kind: Option<from_keeper::Kind>,
}

/// [`FromKeeper`]'s cases.
pub mod from_keeper {
    /// A message.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        /// Answer to Hello.
        #[prost(message, tag = "1")]
        Welcome(super::Welcome),
        /// One kept process, with its descriptors.
        #[prost(message, tag = "2")]
        Kept(super::Kept),
        /// Every kept process was sent.
        #[prost(bool, tag = "3")]
        Ready(bool),
        /// A start worked; its descriptors come with it.
        #[prost(message, tag = "4")]
        Spawned(super::Spawned),
        /// A start failed.
        #[prost(message, tag = "5")]
        Failed(super::Failed),
        /// A kept process ended (kept until acknowledged).
        #[prost(message, tag = "6")]
        Exited(super::Exited),
        /// Another host agent is attached (its pid): this one may not be.
        #[prost(int32, tag = "7")]
        Busy(i32),
    }
}

/// Answer to Hello.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Welcome {
    /// The keeper's protocol version.
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// The keeper's pid.
    #[prost(int32, tag = "2")]
    pub pid: i32,
}

/// A process the keeper holds.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Kept {
    /// The tag its Spawn carried.
    #[prost(string, tag = "1")]
    pub tag: String,
    /// Its pid (= its process group).
    #[prost(int32, tag = "2")]
    pub pid: i32,
    /// When it started, ms since the epoch.
    #[prost(int64, tag = "3")]
    pub started_at_ms: i64,
    /// Its descriptor is a terminal's master (else stdin, stdout, stderr).
    #[prost(bool, tag = "4")]
    pub tty: bool,
    /// How it ended, if it did and nobody acknowledged it yet.
    #[prost(message, optional, tag = "5")]
    pub exit: Option<Exit>,
}

/// A started process.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Spawned {
    /// The request's seq.
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    /// Its pid (= its process group).
    #[prost(int32, tag = "2")]
    pub pid: i32,
    /// When it started, ms since the epoch.
    #[prost(int64, tag = "3")]
    pub started_at_ms: i64,
}

/// A start that failed.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Failed {
    /// The request's seq.
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    /// The errno, when the system said one.
    #[prost(int32, optional, tag = "2")]
    pub errno: Option<i32>,
    /// What failed.
    #[prost(string, tag = "3")]
    pub message: String,
}

impl Failed {
    /// The failure of request `seq` with `e`.
    pub fn of(seq: u64, e: &std::io::Error) -> Self {
        Self {
            seq,
            errno: e.raw_os_error(),
            message: e.to_string(),
        }
    }

    /// The error again on the receiving side: the errno's when there is one
    /// (its kind says what failed), else the message.
    pub fn into_io_error(self) -> std::io::Error {
        match self.errno {
            Some(n) => std::io::Error::from_raw_os_error(n),
            None => std::io::Error::other(self.message),
        }
    }
}

/// A kept process's end.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Exited {
    /// Its pid.
    #[prost(int32, tag = "1")]
    pub pid: i32,
    /// How it ended.
    #[prost(message, optional, tag = "2")]
    pub exit: Option<Exit>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_membership_cgroup_is_the_first_join_files_directory() {
        let mut l = Launch::default();
        assert_eq!(l.membership_cgroup(), None);
        for file in ["cgroup.procs", "tasks"] {
            l.cgroup_procs = vec![
                format!("/cg/freezer/r/{file}"),
                format!("/cg/pids/r/{file}"),
            ];
            assert_eq!(l.membership_cgroup(), Some("/cg/freezer/r"));
        }
        l.cgroup_procs = vec!["/cg/freezer/r/other".into()];
        assert_eq!(l.membership_cgroup(), None);
    }
}
