//! The restart policy: whether an ended run starts again, and after how long
//! (exponential backoff with ±20 % jitter, reset after a stable run).

use std::time::Duration;

use agentplane::proto::v1::restart_policy::Mode;
use agentplane::proto::v1::{ExitStatus, RestartPolicy};
use agentplane::time::duration_from_proto;

use super::agent::Requested;

/// Default delay before the first restart.
pub const DEFAULT_INITIAL: Duration = Duration::from_secs(1);
/// Default ceiling of the delay.
pub const DEFAULT_MAX: Duration = Duration::from_secs(60);
/// Default length of a run that resets the backoff.
pub const DEFAULT_STABLE: Duration = Duration::from_secs(600);

/// What to do after a run ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Start again after this delay; `consecutive` is the new count of
    /// restarts since the last stable run.
    Restart {
        /// The delay.
        delay: Duration,
        /// Consecutive restarts including this one.
        consecutive: u32,
    },
    /// The policy does not restart it: it has ended.
    Done,
    /// It would restart, but `max_restarts` consecutive restarts are used up.
    Exhausted,
}

/// Decides after a run that lasted `ran` and ended with `exit`; `consecutive`
/// counts restarts since the last stable run; `jitter` is a factor in
/// [0.8, 1.2] (a parameter so that tests are exact).
pub fn decide(
    policy: Option<&RestartPolicy>,
    exit: &ExitStatus,
    requested: Option<Requested>,
    consecutive: u32,
    ran: Duration,
    jitter: f64,
) -> Decision {
    let Some(p) = policy else {
        return Decision::Done;
    };
    if requested.is_some_and(Requested::ends_agent) {
        return Decision::Done;
    }
    let failed = exit.code != Some(0);
    let wants = match p.mode() {
        Mode::Unspecified | Mode::Never => false,
        Mode::OnFailure => failed,
        Mode::Always => true,
    };
    if !wants {
        return Decision::Done;
    }
    let stable = p
        .stable_after
        .as_ref()
        .map_or(DEFAULT_STABLE, duration_from_proto);
    let consecutive = if ran >= stable { 0 } else { consecutive };
    if p.max_restarts.is_some_and(|max| consecutive >= max) {
        return Decision::Exhausted;
    }
    let initial = p
        .initial_backoff
        .as_ref()
        .map_or(DEFAULT_INITIAL, duration_from_proto);
    let max = p
        .max_backoff
        .as_ref()
        .map_or(DEFAULT_MAX, duration_from_proto)
        .max(initial);
    let doubled = initial.saturating_mul(1u32 << consecutive.min(20));
    let delay = doubled.min(max).mul_f64(jitter.clamp(0.8, 1.2));
    Decision::Restart {
        delay,
        consecutive: consecutive + 1,
    }
}

/// A jitter factor in [0.8, 1.2].
pub fn jitter() -> f64 {
    0.8 + rand::random::<f64>() * 0.4
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentplane::time::duration_to_proto;

    fn policy(mode: Mode, max: Option<u32>) -> RestartPolicy {
        RestartPolicy {
            mode: mode as i32,
            max_restarts: max,
            initial_backoff: Some(duration_to_proto(Duration::from_millis(100))),
            max_backoff: Some(duration_to_proto(Duration::from_millis(500))),
            stable_after: Some(duration_to_proto(Duration::from_secs(10))),
        }
    }

    fn exit(code: i32) -> ExitStatus {
        ExitStatus {
            code: Some(code),
            ..Default::default()
        }
    }

    #[test]
    fn on_failure_backs_off_exponentially_up_to_the_cap_then_gives_up() {
        let p = policy(Mode::OnFailure, Some(4));
        let short = Duration::from_millis(50);
        let delays: Vec<Decision> = (0..5)
            .map(|n| decide(Some(&p), &exit(1), None, n, short, 1.0))
            .collect();
        assert_eq!(
            delays[..4],
            [
                Decision::Restart {
                    delay: Duration::from_millis(100),
                    consecutive: 1
                },
                Decision::Restart {
                    delay: Duration::from_millis(200),
                    consecutive: 2
                },
                Decision::Restart {
                    delay: Duration::from_millis(400),
                    consecutive: 3
                },
                Decision::Restart {
                    delay: Duration::from_millis(500),
                    consecutive: 4
                },
            ]
        );
        assert_eq!(delays[4], Decision::Exhausted);
        assert_eq!(
            decide(Some(&p), &exit(0), None, 0, short, 1.0),
            Decision::Done
        );
    }

    #[test]
    fn always_restarts_after_success_and_stable_runs_reset() {
        let p = policy(Mode::Always, Some(2));
        let d = decide(Some(&p), &exit(0), None, 2, Duration::from_secs(11), 1.0);
        assert_eq!(
            d,
            Decision::Restart {
                delay: Duration::from_millis(100),
                consecutive: 1
            }
        );
    }

    #[test]
    fn stops_and_timeouts_never_restart_kills_do() {
        let p = policy(Mode::Always, None);
        let ran = Duration::ZERO;
        assert_eq!(
            decide(Some(&p), &exit(0), Some(Requested::Stop), 0, ran, 1.0),
            Decision::Done
        );
        assert_eq!(
            decide(Some(&p), &exit(0), Some(Requested::Timeout), 0, ran, 1.0),
            Decision::Done
        );
        assert!(matches!(
            decide(Some(&p), &exit(0), Some(Requested::Kill(9)), 0, ran, 1.0),
            Decision::Restart { .. }
        ));
        assert_eq!(decide(None, &exit(1), None, 0, ran, 1.0), Decision::Done);
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        for _ in 0..1000 {
            let j = jitter();
            assert!((0.8..=1.2).contains(&j));
        }
    }
}
