//! Building and starting an agent's process: argv exec'd directly (no shell),
//! a minimal inherited environment plus the spec's, its own session and process
//! group so that signals reach every process it starts.

use std::process::Stdio;

use agentplane::proto::v1::AgentSpec;
use tokio::process::{Child, Command};

/// Variables passed through from the host agent's own environment.
const INHERITED_ENV: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "TZ", "USER", "LOGNAME"];

/// Starts the spec's program. The child is the leader of a new session and
/// process group (`setsid`), so its pid is also its process group id.
pub fn spawn(id: &str, spec: &AgentSpec) -> std::io::Result<Child> {
    let mut cmd = Command::new(&spec.argv[0]);
    cmd.args(&spec.argv[1..])
        .env_clear()
        .envs(
            INHERITED_ENV
                .iter()
                .filter_map(|k| std::env::var_os(k).map(|v| (k, v))),
        )
        .env("AGENTPLANE_AGENT_ID", id)
        .envs(&spec.env)
        // Output capture arrives with logs (P4); until then nothing blocks on a
        // full pipe because nothing is piped.
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // The supervisor decides when the agent dies, not a dropped handle.
        .kill_on_drop(false);
    if !spec.cwd.is_empty() {
        cmd.current_dir(&spec.cwd);
    }
    new_session(&mut cmd);
    cmd.spawn()
}

#[allow(unsafe_code)]
fn new_session(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec; it only calls
    // setsid(2), which is async-signal-safe, allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(drop)
                .map_err(std::io::Error::from)
        });
    }
}

/// The error message a user sees for a failed start: names the program.
pub fn describe_spawn_error(spec: &AgentSpec, e: &std::io::Error) -> String {
    let program = &spec.argv[0];
    match e.kind() {
        std::io::ErrorKind::NotFound
            if !spec.cwd.is_empty() && !std::path::Path::new(&spec.cwd).is_dir() =>
        {
            format!(
                "cannot start `{program}`: working directory `{}` does not exist ({e})",
                spec.cwd
            )
        }
        std::io::ErrorKind::NotFound => {
            format!("cannot start `{program}`: no such executable on the host's PATH ({e})")
        }
        std::io::ErrorKind::PermissionDenied => {
            format!("cannot start `{program}`: permission denied ({e})")
        }
        _ => format!("cannot start `{program}`: {e}"),
    }
}
