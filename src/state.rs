//! The agent state machine: which transitions are legal, and the short state
//! names stored in the registry (`RUNNING`, not `AGENT_STATE_RUNNING`).

use crate::proto::v1::restart_policy::Mode;
use crate::proto::v1::{Agent, AgentState, ExitReason};

/// The short name of a state, as stored in Redis and printed by `agentctl`.
pub fn name(state: AgentState) -> &'static str {
    state
        .as_str_name()
        .strip_prefix("AGENT_STATE_")
        .unwrap_or("UNSPECIFIED")
}

/// Parses a short (`running`) or full (`AGENT_STATE_RUNNING`) state name, any case.
pub fn parse(s: &str) -> Option<AgentState> {
    let upper = s.trim().to_ascii_uppercase();
    let full = if upper.starts_with("AGENT_STATE_") {
        upper
    } else {
        format!("AGENT_STATE_{upper}")
    };
    AgentState::from_str_name(&full).filter(|s| *s != AgentState::Unspecified)
}

/// Whether the agent's restart policy lets the system start it again after
/// it was LOST: restart on-failure or always. Where it may run is the
/// placement's business (a pinned agent goes back to its host only).
pub fn restartable(agent: &Agent) -> bool {
    let mode = agent
        .spec
        .as_ref()
        .and_then(|s| s.restart.as_ref())
        .map_or(Mode::Never, |r| r.mode());
    matches!(mode, Mode::OnFailure | Mode::Always)
}

/// Whether the agent may be moved to another host while it runs (a drain):
/// restartable and not pinned to a host.
pub fn restartable_elsewhere(agent: &Agent) -> bool {
    let movable = agent
        .spec
        .as_ref()
        .is_some_and(|s| s.placement.as_ref().is_none_or(|p| p.host.is_empty()));
    movable && restartable(agent)
}

/// States in which an agent's record is held by its host: the host may still
/// write it, and the location key is its lease.
pub const LIVE: [AgentState; 4] = [
    AgentState::Pending,
    AgentState::Running,
    AgentState::Paused,
    AgentState::Stopping,
];

/// States in which a process runs (or is stopped) on the agent's host.
pub const RUNNING: [AgentState; 3] = [
    AgentState::Running,
    AgentState::Paused,
    AgentState::Stopping,
];

/// The short name of an exit reason (`STOPPED`), as `agentctl` prints it.
pub fn reason_name(r: ExitReason) -> &'static str {
    r.as_str_name().strip_prefix("EXIT_REASON_").unwrap_or("")
}

/// True once the agent can never run again under this generation.
pub fn is_terminal(state: AgentState) -> bool {
    matches!(
        state,
        AgentState::Exited | AgentState::Failed | AgentState::Lost
    )
}

/// A control operation a user can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// SIGSTOP the group.
    Pause,
    /// SIGCONT the group.
    Resume,
    /// SIGTERM, grace, SIGKILL.
    Stop,
    /// Send a signal.
    Kill,
}

impl Op {
    /// The verb, for messages.
    pub fn verb(self) -> &'static str {
        match self {
            Op::Pause => "pause",
            Op::Resume => "resume",
            Op::Stop => "stop",
            Op::Kill => "kill",
        }
    }
}

/// Whether `op` is legal in `state`; `Err` holds a message for FAILED_PRECONDITION.
pub fn check(op: Op, state: AgentState) -> Result<(), String> {
    use AgentState as S;
    let ok = match op {
        Op::Pause => matches!(state, S::Running),
        Op::Resume => matches!(state, S::Paused),
        // A PENDING agent may be waiting for its restart: a stop cancels that.
        Op::Stop => matches!(state, S::Running | S::Paused | S::Stopping | S::Pending),
        Op::Kill => matches!(state, S::Running | S::Paused | S::Stopping),
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "cannot {} an agent that is {}",
            op.verb(),
            name(state)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in [
            AgentState::Pending,
            AgentState::Running,
            AgentState::Paused,
            AgentState::Stopping,
            AgentState::Exited,
            AgentState::Failed,
            AgentState::Lost,
        ] {
            assert_eq!(parse(name(s)), Some(s));
        }
        assert_eq!(parse("paused"), Some(AgentState::Paused));
        assert_eq!(parse("nope"), None);
        assert_eq!(parse("unspecified"), None);
    }

    #[test]
    fn transitions() {
        assert!(check(Op::Pause, AgentState::Running).is_ok());
        assert!(check(Op::Pause, AgentState::Paused).is_err());
        assert!(check(Op::Resume, AgentState::Paused).is_ok());
        assert!(check(Op::Resume, AgentState::Running).is_err());
        assert!(check(Op::Stop, AgentState::Paused).is_ok());
        let msg = check(Op::Stop, AgentState::Exited).unwrap_err();
        assert_eq!(msg, "cannot stop an agent that is EXITED");
        assert!(check(Op::Kill, AgentState::Failed).is_err());
    }
}
