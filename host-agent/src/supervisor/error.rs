//! Supervisor errors and their one mapping to gRPC status codes.

use std::time::Duration;

use agentplane::registry::RegistryError;
use agentplane::validate::ValidationError;

/// Why a supervisor operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// The start request is malformed.
    #[error(transparent)]
    Validate(#[from] ValidationError),
    /// The agent asks to run as a user this host does not allow.
    #[error("host {host} refuses agent {id}: {reason}")]
    IdentityRefused {
        /// The agent.
        id: String,
        /// This host.
        host: String,
        /// Which rule refused it.
        reason: String,
    },
    /// The agent's `spec.resources` ask for a limit this host's cgroups
    /// cannot enforce.
    #[error("host {host} refuses agent {id}: {reason}")]
    ResourcesRefused {
        /// The agent.
        id: String,
        /// This host.
        host: String,
        /// What it cannot enforce, and why.
        reason: String,
    },
    /// A cgroup operation on the agent failed.
    #[error("agent {id}: {source}")]
    Cgroup {
        /// The agent.
        id: String,
        /// What failed.
        #[source]
        source: crate::cgroup::CgroupError,
    },
    /// The host runs `--max-agents` agents already.
    #[error("full: host {host} already runs {max} agents (its --max-agents)")]
    AtCapacity {
        /// This host.
        host: String,
        /// Its limit.
        max: u32,
    },
    /// The host serves `--max-log-streams` output streams already.
    #[error("host {host} already serves {max} output streams (its --max-log-streams); close some followers or attach sessions")]
    TooManyStreams {
        /// This host.
        host: String,
        /// Its limit.
        max: u32,
    },
    /// An agent with this id, but another generation, is here already.
    #[error("agent {id} already runs here with generation {generation}")]
    AlreadyExists {
        /// The agent id.
        id: String,
        /// Its generation here.
        generation: u64,
    },
    /// No such agent on this host.
    #[error("agent {id} is not on this host")]
    NotFound {
        /// The agent id.
        id: String,
    },
    /// The agent's state forbids the operation.
    #[error("agent {id}: {detail}")]
    IllegalTransition {
        /// The agent id.
        id: String,
        /// Why.
        detail: String,
    },
    /// The registry record names another host or generation (or is gone).
    #[error("agent {id} is fenced: {detail}")]
    Fenced {
        /// The agent id.
        id: String,
        /// What the record says.
        detail: String,
    },
    /// Writing the record failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The agent did not end within the escalation's bound.
    #[error("{operation} of agent {id} (pid {pid}) timed out after {timeout:?}")]
    Timeout {
        /// What was waited for.
        operation: &'static str,
        /// The agent id.
        id: String,
        /// Its pid.
        pid: i32,
        /// The bound that passed.
        timeout: Duration,
    },
    /// The kernel refused a signal for another reason than "no such process".
    #[error("signal {signal} to process group {pgid} failed: {errno}")]
    Signal {
        /// The process group.
        pgid: i32,
        /// The signal number.
        signal: i32,
        /// The error.
        errno: nix::errno::Errno,
    },
    /// The agent's output files could not be created or read.
    #[error("output of agent {id}: {source}")]
    Output {
        /// The agent id.
        id: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Writing to the agent's standard input failed or timed out.
    #[error("input of agent {id}: {detail}")]
    Input {
        /// The agent id.
        id: String,
        /// What happened.
        detail: String,
    },
    /// The host agent is shutting down.
    #[error("host agent is shutting down")]
    ShuttingDown,
}
