//! A child process of the test that dies with the test: killed on drop, and
//! by the kernel if the test process itself dies (parent-death signal).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A spawned server process.
#[derive(Debug)]
pub struct Proc {
    /// The child.
    pub child: Child,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stderr to `log` and a parent-death SIGKILL.
    pub fn spawn(mut cmd: Command, log: &Path) -> std::io::Result<Self> {
        let file = std::fs::File::create(log)?;
        cmd.stderr(file);
        agentplane::process::die_with_parent(&mut cmd);
        Ok(Self {
            child: cmd.spawn()?,
            log: log.to_owned(),
        })
    }

    /// The pid.
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap_or(0)
    }

    /// True while it has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits (polling, at most `limit`) until the process has exited;
    /// false if it still runs then.
    pub async fn wait_exit(&mut self, limit: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        while self.is_running() {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        true
    }

    /// Sends `sig`; a process already gone is fine.
    pub fn signal(&self, sig: Signal) {
        let _ = kill(Pid::from_raw(self.pid()), sig);
    }

    /// The last lines of its log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
