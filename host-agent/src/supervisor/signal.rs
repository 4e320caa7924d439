//! Signals to whole process groups. `ESRCH` means the group is already gone:
//! that is an answer ([`Delivery::Gone`]), never an error.

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use super::error::SupervisorError;

/// What happened to a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// At least one process of the group got it.
    Sent,
    /// No process is left in the group.
    Gone,
}

/// Sends `sig` to the process group `pgid`.
pub fn to_group(pgid: i32, sig: Signal) -> Result<Delivery, SupervisorError> {
    if pgid <= 1 {
        // killpg(0) and killpg(1) would hit ourselves or everything: never.
        return Ok(Delivery::Gone);
    }
    match killpg(Pid::from_raw(pgid), sig) {
        Ok(()) => Ok(Delivery::Sent),
        Err(Errno::ESRCH) => Ok(Delivery::Gone),
        Err(errno) => Err(SupervisorError::Signal {
            pgid,
            signal: sig as i32,
            errno,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_group_is_gone_not_an_error() {
        // pid_max is at most 2^22, so this group cannot exist.
        assert_eq!(
            to_group(4_194_304 + 7, Signal::SIGTERM).unwrap(),
            Delivery::Gone
        );
        assert_eq!(to_group(0, Signal::SIGTERM).unwrap(), Delivery::Gone);
    }
}
