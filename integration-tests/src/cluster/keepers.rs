//! The hosts' keepers as tests see them, and host-agent upgrades.

use std::path::PathBuf;

use super::{bin, TestCluster};

impl TestCluster {
    /// The pid of host `host_id`'s keeper (its agents' parent).
    pub fn keeper_pid(&self, host_id: &str) -> Option<i32> {
        crate::procfs::keeper_of(&self.data_dir(host_id))
    }

    /// The machine of `host_id` dies: its keeper and its host agent are
    /// SIGKILLed (the keeper first, as a power cut would not let a host
    /// agent see it go), so its agents die with the keeper's guard.
    pub fn kill_machine(&mut self, host_id: &str) {
        if let Some(k) = self.keeper_pid(host_id) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(k),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        self.host(host_id)
            .proc
            .signal(nix::sys::signal::Signal::SIGKILL);
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
