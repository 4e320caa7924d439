//! Flags both servers share (`ServeArgs`), checked before anything starts.

use std::process::{Command, Output};

use agentplane_integration_tests::bin;

/// `name --check-config --insecure` on `addr` with `workers` as
/// `AGENTPLANE_WORKER_THREADS` (and `--host-id h1` for the host agent).
fn check(name: &str, addr: &str, workers: &str) -> Output {
    let mut cmd = Command::new(bin(name));
    cmd.args(["--check-config", "--insecure", "--listen", addr]);
    if name == "host-agent" {
        cmd.args(["--host-id", "h1"]);
    }
    cmd.env("AGENTPLANE_WORKER_THREADS", workers)
        .output()
        .expect("run server")
}

#[test]
fn zero_worker_threads_exits_64_naming_the_flag_on_both_servers() {
    // The listen port is taken: a check that got past the flags would
    // still not bind it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    for name in ["control-plane", "host-agent"] {
        let out = check(name, &addr, "0");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{name}: {stderr}");
        assert!(stderr.contains("--worker-threads"), "{name}: {stderr}");
        // The same configuration with one worker passes the check.
        let out = check(name, &addr, "1");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{name}: {stderr}");
    }
}
