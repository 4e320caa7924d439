//! The hosts' keepers as tests see them, and host-agent upgrades.

use std::path::PathBuf;

use super::{bin, TestCluster};

impl TestCluster {
    /// The pid of host `host_id`'s keeper (its agents' parent).
    pub fn keeper_pid(&self, host_id: &str) -> Option<i32> {
        crate::procfs::keeper_of(&self.data_dir(host_id))
    }

    /// The machine of `host_id` dies: its host agent and its keeper are
    /// SIGSTOPped, then SIGKILLed, so that neither acts on the other's
    /// death (a power cut lets the host agent neither see the keeper go
    /// and remove its host key, nor the keeper see the host agent go and
    /// renew the host as restarting); its agents die with the keeper's
    /// guard.
    pub fn kill_machine(&mut self, host_id: &str) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        let keeper = self.keeper_pid(host_id).map(Pid::from_raw);
        let host = self.host(host_id);
        host.proc.signal(Signal::SIGSTOP);
        if let Some(k) = keeper {
            let _ = kill(k, Signal::SIGSTOP);
            let _ = kill(k, Signal::SIGKILL);
        }
        host.proc.signal(Signal::SIGKILL);
    }

    /// Sends `sig` to host `host_id`'s agent and waits for it to exit
    /// (panics past 15 s).
    pub async fn end_host_agent(&mut self, host_id: &str, sig: nix::sys::signal::Signal) {
        let host = self.host(host_id);
        host.proc.signal(sig);
        assert!(
            host.proc
                .wait_exit(std::time::Duration::from_secs(15))
                .await,
            "{host_id}'s host agent did not exit on {sig}"
        );
    }

    /// Host agents started from now on run a copy of the build's binary at
    /// a new path in the cluster's directory (an upgrade); returns the path.
    pub fn upgrade_host_binary(&mut self) -> PathBuf {
        let n = self.dir.path().read_dir().map_or(0, Iterator::count);
        let to = self.dir.path().join(format!("host-agent-upgrade-{n}"));
        std::fs::copy(bin("host-agent"), &to).expect("copy the host-agent binary");
        self.host_binary = Some(to.clone());
        to
    }
}
