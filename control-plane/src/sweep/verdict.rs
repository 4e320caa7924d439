//! The sweep's judgement of one record: what it needs, from the record,
//! its lease and its host (a pure function, tested here).

use std::time::Duration;

use agentplane::proto::v1::{Agent, AgentState};
use agentplane::registry::HostRecord;
use agentplane::state;
use agentplane::time::ms_from_timestamp;

/// What one record needs, judged from the record, its lease and its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing to do.
    Fine,
    /// Running on a live host, but its lease is missing: a suspect.
    LeaseMissing,
    /// Live, but its host is not heartbeating.
    HostDown,
    /// LOST, and its restart policy says to run it again.
    Restart,
    /// PENDING, unheld, and its start was not confirmed within the bound.
    StalePending,
}

/// Judges one record. `host` is its live host record, if the host is live;
/// `confirm_within` bounds how long a placed start may take.
pub fn judge(
    agent: &Agent,
    leased: bool,
    host: Option<&HostRecord>,
    now_ms: i64,
    confirm_within: Duration,
) -> Verdict {
    let st = agent.state();
    if state::awaits_restart(agent) {
        return Verdict::Restart;
    }
    if !state::LIVE.contains(&st) {
        return Verdict::Fine;
    }
    if host.is_none() {
        return Verdict::HostDown;
    }
    if leased {
        return Verdict::Fine;
    }
    if st != AgentState::Pending {
        return Verdict::LeaseMissing;
    }
    let since = agent
        .pending_since
        .as_ref()
        .or(agent.created_at.as_ref())
        .map_or(0, ms_from_timestamp);
    let bound = i64::try_from(confirm_within.as_millis()).unwrap_or(i64::MAX);
    if now_ms.saturating_sub(since) > bound {
        Verdict::StalePending
    } else {
        Verdict::Fine
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relocate::not_before;
    use agentplane::proto::v1::restart_policy::Mode;
    use agentplane::proto::v1::{AgentSpec, RestartPolicy};
    use agentplane::proto::v1::{ExitReason, ExitStatus};
    use agentplane::time::timestamp_from_ms;

    fn agent(state: AgentState, mode: Mode, pending_since_ms: Option<i64>) -> Agent {
        Agent {
            id: "a".into(),
            host: "h1".into(),
            generation: 1,
            state: state as i32,
            spec: Some(AgentSpec {
                argv: vec!["true".into()],
                restart: Some(RestartPolicy {
                    mode: mode as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            pending_since: pending_since_ms.map(timestamp_from_ms),
            ..Default::default()
        }
    }

    #[test]
    fn a_replacement_waits_for_the_disconnect_limit_and_grace() {
        let mut a = agent(AgentState::Lost, Mode::Always, None);
        assert_eq!(not_before(&a), None, "no limit: availability first");
        let spec = a.spec.as_mut().expect("spec");
        spec.stop_after_disconnect =
            Some(agentplane::time::duration_to_proto(Duration::from_secs(5)));
        spec.stop_grace = Some(agentplane::time::duration_to_proto(Duration::from_secs(2)));
        a.exit = Some(ExitStatus {
            reason: ExitReason::LeaseExpired as i32,
            finished_at: Some(timestamp_from_ms(1_000_000)),
            ..Default::default()
        });
        assert_eq!(not_before(&a), Some(1_007_000));
        a.exit.as_mut().expect("exit").reason = ExitReason::HostRestarted as i32;
        assert_eq!(not_before(&a), None, "its host said nothing runs there");
    }

    #[test]
    fn verdicts() {
        let h = HostRecord {
            id: "h1".into(),
            ttl_ms: 3000,
            ..Default::default()
        };
        let bound = Duration::from_secs(10);
        let now = 1_000_000;
        let run = agent(AgentState::Running, Mode::Never, None);
        assert_eq!(judge(&run, true, Some(&h), now, bound), Verdict::Fine);
        assert_eq!(
            judge(&run, false, Some(&h), now, bound),
            Verdict::LeaseMissing
        );
        assert_eq!(judge(&run, true, None, now, bound), Verdict::HostDown);
        let paused = agent(AgentState::Paused, Mode::Never, None);
        assert_eq!(
            judge(&paused, false, Some(&h), now, bound),
            Verdict::LeaseMissing
        );
        let lost = agent(AgentState::Lost, Mode::Always, None);
        assert_eq!(judge(&lost, false, None, now, bound), Verdict::Restart);
        let lost_never = agent(AgentState::Lost, Mode::Never, None);
        assert_eq!(judge(&lost_never, false, None, now, bound), Verdict::Fine);
        let ended = agent(AgentState::Exited, Mode::Always, None);
        assert_eq!(judge(&ended, false, Some(&h), now, bound), Verdict::Fine);
        let fresh = agent(AgentState::Pending, Mode::Never, Some(now - 5_000));
        assert_eq!(judge(&fresh, false, Some(&h), now, bound), Verdict::Fine);
        let stale = agent(AgentState::Pending, Mode::Never, Some(now - 11_000));
        assert_eq!(
            judge(&stale, false, Some(&h), now, bound),
            Verdict::StalePending
        );
        // A PENDING record its host holds (a restart backoff) is fine however old.
        assert_eq!(judge(&stale, true, Some(&h), now, bound), Verdict::Fine);
        assert_eq!(judge(&stale, false, None, now, bound), Verdict::HostDown);
    }
}
