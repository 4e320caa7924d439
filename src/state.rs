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

/// Whether a record may move from `from` to `to`: the one table of legal
/// moves, enforced by the registry on every write (host agent and control
/// plane alike) and by the host agent on its in-memory status. A move to the
/// same state is a write of other fields and is always legal.
pub fn may_move(from: AgentState, to: AgentState) -> bool {
    use AgentState as S;
    if from == to {
        return true;
    }
    match from {
        // Started (RUNNING); its start failed (FAILED); stopped or fenced
        // before it started (EXITED); its host restarted before it (LOST).
        S::Pending => matches!(to, S::Running | S::Exited | S::Failed | S::Lost),
        // PENDING: a restart backoff on its host, or a move to another host
        // (a drain) at the next generation.
        S::Running | S::Paused => matches!(
            to,
            S::Running | S::Paused | S::Stopping | S::Pending | S::Exited | S::Failed | S::Lost
        ),
        // A stop only ends.
        S::Stopping => matches!(to, S::Exited | S::Failed | S::Lost),
        // Started again (PENDING, the next generation), or its host still
        // runs it at this generation and says so again (any state it can be
        // in there).
        S::Lost => matches!(
            to,
            S::Pending | S::Running | S::Paused | S::Stopping | S::Exited | S::Failed
        ),
        // An ended run is over; only deleting the record follows.
        S::Exited | S::Failed | S::Unspecified => false,
    }
}

/// Every state from which a record may move to `to`, in table order.
pub fn sources(to: AgentState) -> Vec<AgentState> {
    ALL.into_iter().filter(|from| may_move(*from, to)).collect()
}

/// Every state a record can be in.
pub const ALL: [AgentState; 7] = [
    AgentState::Pending,
    AgentState::Running,
    AgentState::Paused,
    AgentState::Stopping,
    AgentState::Exited,
    AgentState::Failed,
    AgentState::Lost,
];

/// Whether the system will start this agent again: it is LOST and its
/// restart policy allows a restart (the reconciler's and the sweep's rule).
pub fn awaits_restart(agent: &Agent) -> bool {
    agent.state() == AgentState::Lost && restartable(agent)
}

/// Whether the agent is over for good: EXITED or FAILED, or LOST with
/// nothing to start it again. What `spawn --wait` and `attach` wait for.
pub fn has_ended(agent: &Agent) -> bool {
    is_terminal(agent.state()) && !awaits_restart(agent)
}

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
        for s in ALL {
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

    #[test]
    fn the_move_table() {
        use AgentState as S;
        // Ends are final; a stop only ends; nothing goes back to a stop.
        for to in ALL {
            assert_eq!(may_move(S::Exited, to), to == S::Exited, "EXITED -> {to:?}");
            assert_eq!(may_move(S::Failed, to), to == S::Failed, "FAILED -> {to:?}");
        }
        assert!(!may_move(S::Stopping, S::Running));
        assert!(!may_move(S::Stopping, S::Pending));
        assert!(!may_move(S::Pending, S::Paused));
        assert!(!may_move(S::Pending, S::Stopping));
        // The moves the system makes.
        assert!(
            may_move(S::Running, S::Pending),
            "restart backoff and drain"
        );
        assert!(may_move(S::Lost, S::Pending), "a LOST agent started again");
        assert!(may_move(S::Lost, S::Running), "its host still runs it");
        assert!(may_move(S::Pending, S::Lost), "its host restarted");
        assert_eq!(
            sources(S::Stopping),
            vec![S::Running, S::Paused, S::Stopping, S::Lost]
        );
        assert_eq!(
            sources(S::Pending),
            vec![S::Pending, S::Running, S::Paused, S::Lost]
        );
        // Every live state can be lost and can end.
        for from in LIVE {
            assert!(
                may_move(from, S::Lost) && may_move(from, S::Exited),
                "{from:?}"
            );
        }
    }

    #[test]
    fn ended_means_nothing_will_start_it_again() {
        use crate::proto::v1::{AgentSpec, RestartPolicy};
        let agent = |state: AgentState, mode: Mode| Agent {
            state: state as i32,
            spec: Some(AgentSpec {
                restart: Some(RestartPolicy {
                    mode: mode as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(has_ended(&agent(AgentState::Exited, Mode::Always)));
        assert!(has_ended(&agent(AgentState::Failed, Mode::OnFailure)));
        assert!(has_ended(&agent(AgentState::Lost, Mode::Never)));
        assert!(!has_ended(&agent(AgentState::Lost, Mode::OnFailure)));
        assert!(awaits_restart(&agent(AgentState::Lost, Mode::Always)));
        assert!(!has_ended(&agent(AgentState::Running, Mode::Never)));
        assert!(!has_ended(&agent(AgentState::Pending, Mode::Never)));
    }
}
