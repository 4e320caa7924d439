//! Flags both servers share (`ServeArgs`), checked before anything starts.

use std::process::Command;

use agentplane_integration_tests::bin;

#[test]
fn zero_worker_threads_exits_64_naming_the_flag_on_both_servers() {
    // The listen port is taken: a check that got past the flags would
    // still not bind it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    for (name, id) in [("control-plane", None), ("host-agent", Some("h1"))] {
        let mut cmd = Command::new(bin(name));
        cmd.args(["--check-config", "--insecure", "--listen", &addr]);
        if let Some(id) = id {
            cmd.args(["--host-id", id]);
        }
        let out = cmd
            .env("AGENTPLANE_WORKER_THREADS", "0")
            .output()
            .expect("run server");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{name}: {stderr}");
        assert!(stderr.contains("--worker-threads"), "{name}: {stderr}");
        // The same configuration with one worker passes the check.
        let mut cmd = Command::new(bin(name));
        cmd.args(["--check-config", "--insecure", "--listen", &addr]);
        if let Some(id) = id {
            cmd.args(["--host-id", id]);
        }
        let out = cmd
            .env("AGENTPLANE_WORKER_THREADS", "1")
            .output()
            .expect("run server");
        assert_eq!(
            out.status.code(),
            Some(0),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
