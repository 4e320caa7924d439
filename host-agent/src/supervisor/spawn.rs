//! What starting an agent means, resolved from its spec once: argv exec'd
//! directly (no shell), a minimal inherited environment plus the spec's,
//! rlimits and an optional uid/gid (the keeper's `fork` module starts it);
//! and the message a user sees when it cannot start.

use std::collections::HashMap;

use agentplane::proto::v1::{AgentSpec, ResourceLimits};

use crate::keeper::proto::{Launch, Limit, LimitKind};

use super::tree::MARKER;

/// Variables passed through from the host agent's own environment.
const INHERITED_ENV: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "TZ", "USER", "LOGNAME"];

/// What starting agent `id` with `spec` means, resolved here once: the
/// whole environment (the inherited variables, the spec's, then the marker,
/// set last so the spec cannot remove it), the terminal's `TERM`, the rlimits.
pub fn launch_of(id: &str, spec: &AgentSpec) -> Launch {
    let mut env: HashMap<String, String> = INHERITED_ENV
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| ((*k).to_owned(), v)))
        .collect();
    env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    if spec.tty && !spec.env.contains_key("TERM") {
        env.insert("TERM".into(), "xterm-256color".into());
    }
    env.insert(MARKER.into(), id.to_owned());
    Launch {
        argv: spec.argv.clone(),
        env,
        cwd: spec.cwd.clone(),
        uid: spec.uid,
        gid: spec.gid,
        tty: spec.tty,
        limits: limits_of(spec.limits.as_ref()),
        agent: id.to_owned(),
        cgroup_procs: Vec::new(),
    }
}

/// A spec's rlimits.
fn limits_of(l: Option<&ResourceLimits>) -> Vec<Limit> {
    let Some(l) = l else { return Vec::new() };
    let mut out = Vec::new();
    let mut push = |kind: LimitKind, soft: u64, hard: u64| {
        out.push(Limit {
            kind: kind as i32,
            soft,
            hard,
        });
    };
    if let Some(v) = l.address_space_bytes {
        push(LimitKind::AddressSpace, v, v);
    }
    if let Some(v) = l.open_files {
        push(LimitKind::OpenFiles, v, v);
    }
    if let Some(v) = l.processes {
        push(LimitKind::Processes, v, v);
    }
    if let Some(v) = l.cpu_seconds {
        // SIGXCPU at the soft limit, SIGKILL a little later at the hard one.
        push(LimitKind::CpuSeconds, v, v.saturating_add(5));
    }
    out
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
