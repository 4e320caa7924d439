//! What the OS sees: processes by process group, read from `/proc`.

/// One process: pid, state letter (R, S, T, Z, …), parent pid, process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcInfo {
    /// Process id.
    pub pid: i32,
    /// State letter.
    pub state: char,
    /// Parent pid.
    pub ppid: i32,
    /// Process group id.
    pub pgrp: i32,
}

/// Reads `/proc/PID/stat`; `None` if the process is gone.
pub fn stat(pid: i32) -> Option<ProcInfo> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = text.rsplit_once(')')?.1;
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    let pgrp = f.next()?.parse().ok()?;
    Some(ProcInfo {
        pid,
        state,
        ppid,
        pgrp,
    })
}

impl ProcInfo {
    /// Paused as the host agent pauses: stopped by SIGSTOP (`T`), or in a
    /// frozen cgroup (which shows as `D`).
    pub fn paused(&self) -> bool {
        self.state == 'T' || frozen(self.pid)
    }
}

/// The cgroup directory of `pid` in v1 hierarchy `controller`, or in the
/// unified one (`None`), assuming the usual mounts under /sys/fs/cgroup.
pub fn cgroup_dir(pid: i32, controller: Option<&str>) -> Option<std::path::PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, names, path) = (f.next()?, f.next()?, f.next()?);
        let rel = path.trim_start_matches('/');
        match controller {
            Some(c) if names.split(',').any(|n| n == c) => {
                let mount = std::fs::read_dir("/sys/fs/cgroup")
                    .ok()?
                    .flatten()
                    .find(|e| e.file_name().to_string_lossy().split(',').any(|n| n == c))?;
                Some(mount.path().join(rel))
            }
            None if names.is_empty() => {
                let unified = std::path::Path::new("/sys/fs/cgroup/unified");
                let root = if unified.join("cgroup.procs").exists() {
                    unified
                } else {
                    std::path::Path::new("/sys/fs/cgroup")
                };
                Some(root.join(rel))
            }
            _ => None,
        }
    })
}

/// True when `pid` is in a frozen cgroup (v1 freezer or v2 cgroup.freeze).
pub fn frozen(pid: i32) -> bool {
    let v1 = cgroup_dir(pid, Some("freezer"))
        .and_then(|d| std::fs::read_to_string(d.join("freezer.state")).ok())
        .is_some_and(|s| s.trim() == "FROZEN");
    v1 || cgroup_dir(pid, None)
        .and_then(|d| std::fs::read_to_string(d.join("cgroup.events")).ok())
        .is_some_and(|s| s.lines().any(|l| l.trim() == "frozen 1"))
}

/// Every process on the machine, zombies included.
pub fn all_processes() -> Vec<ProcInfo> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(stat)
        .collect()
}

/// Every process in process group `pgid`, zombies included.
pub fn group(pgid: i32) -> Vec<ProcInfo> {
    all_processes()
        .into_iter()
        .filter(|p| p.pgrp == pgid)
        .collect()
}

/// The processes of the group that are alive: not zombies (a zombie has
/// exited and only waits to be reaped).
pub fn alive_in_group(pgid: i32) -> Vec<ProcInfo> {
    group(pgid)
        .into_iter()
        .filter(|p| p.state != 'Z' && p.state != 'X')
        .collect()
}

/// True when `pid` exists and is not a zombie.
pub fn is_alive(pid: i32) -> bool {
    stat(pid).is_some_and(|p| p.state != 'Z' && p.state != 'X')
}

/// Live processes started for agent `id`: every process whose environment
/// carries the host agent's marker `AGENTPLANE_AGENT_ID=id`, wherever it went
/// (another session, re-parented to PID 1, …).
pub fn agent_processes(id: &str) -> Vec<ProcInfo> {
    let want = format!("{MARKER}{id}");
    marked(|kv| kv == want.as_bytes())
}

/// Live processes of any agent (carrying the marker at all).
pub fn all_agent_processes() -> Vec<ProcInfo> {
    marked(|kv| kv.starts_with(MARKER.as_bytes()))
}

/// Live processes of any agent, each with the agent id its marker names.
pub fn all_agent_processes_by_id() -> Vec<(String, ProcInfo)> {
    all_agent_processes()
        .into_iter()
        .filter_map(|p| Some((marker_of(p.pid)?, p)))
        .collect()
}

/// True when `ancestor` is `pid`'s parent, grandparent, …, by the parent pids
/// in `/proc` (false once the chain reaches PID 1 or a process that is gone).
pub fn descends_from(pid: i32, ancestor: i32) -> bool {
    let mut p = pid;
    // Bounded: a pid reused during the walk cannot make it loop.
    for _ in 0..1024 {
        match stat(p) {
            Some(s) if s.ppid == ancestor => return true,
            Some(s) if s.ppid > 1 => p = s.ppid,
            _ => return false,
        }
    }
    false
}

/// The agent id in `pid`'s marker, if it carries one.
fn marker_of(pid: i32) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|b| *b == 0).find_map(|kv| {
        let id = kv.strip_prefix(MARKER.as_bytes())?;
        Some(String::from_utf8_lossy(id).into_owned())
    })
}

/// Waits (at most `limit`) until no process of agent `id` is alive.
pub async fn wait_gone(id: &str, limit: std::time::Duration) {
    crate::eventually(limit, &format!("no process of agent {id} alive"), || {
        let none = agent_processes(id).is_empty();
        async move { none.then_some(()) }
    })
    .await;
}

const MARKER: &str = "AGENTPLANE_AGENT_ID=";

/// Live processes with an environment entry that `matches`.
fn marked(matches: impl Fn(&[u8]) -> bool) -> Vec<ProcInfo> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(&matches))
        })
        .filter_map(stat)
        .filter(|p| p.state != 'Z' && p.state != 'X')
        .collect()
}

/// Resident memory of `pid` in KiB (0 if it is gone).
pub fn rss_kib(pid: i32) -> u64 {
    status_kib(pid, "VmRSS")
}

/// A KiB field of `pid`'s /proc smaps_rollup (`Pss`, `Pss_File`…), 0 if
/// it is gone.
pub fn smaps_kib(pid: i32, field: &str) -> u64 {
    kib_field(&format!("/proc/{pid}/smaps_rollup"), field)
}

/// A KiB field of `pid`'s /proc status (`VmRSS`, `RssAnon`, `RssFile`…),
/// 0 if it is gone.
pub fn status_kib(pid: i32, field: &str) -> u64 {
    kib_field(&format!("/proc/{pid}/status"), field)
}

/// `pid`'s resident memory by mapped file (`[anon]` for the rest), largest
/// first: (file, RSS KiB, of it anonymous KiB), from /proc smaps.
pub fn rss_by_file(pid: i32) -> Vec<(String, u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut by: std::collections::HashMap<String, (u64, u64)> = std::collections::HashMap::new();
    let mut name = String::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let first = f.next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            name = f.nth(4).map_or_else(|| "[anon]".to_owned(), str::to_owned);
            if name.starts_with('[') {
                name = "[anon]".to_owned();
            }
            continue;
        }
        let kib = || {
            f.clone()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        match first {
            "Rss:" => by.entry(name.clone()).or_default().0 += kib(),
            "Anonymous:" => by.entry(name.clone()).or_default().1 += kib(),
            _ => {}
        }
    }
    let mut out: Vec<(String, u64, u64)> = by.into_iter().map(|(n, (r, a))| (n, r, a)).collect();
    out.sort_by_key(|e| std::cmp::Reverse(e.1));
    out
}

/// The number after `field:` in the file at `path` (0 if none).
fn kib_field(path: &str, field: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Every live process carrying an agent marker, with the agent id it carries.
pub fn agent_processes_by_id() -> Vec<(String, ProcInfo)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
            let id = env
                .split(|b| *b == 0)
                .find_map(|kv| kv.strip_prefix(MARKER.as_bytes()))
                .map(|v| String::from_utf8_lossy(v).into_owned())?;
            let info = stat(pid).filter(|p| p.state != 'Z' && p.state != 'X')?;
            Some((id, info))
        })
        .collect()
}

/// Zombie children of `parent` (exited, not reaped).
pub fn zombie_children(parent: i32) -> Vec<ProcInfo> {
    all_processes()
        .into_iter()
        .filter(|p| p.ppid == parent && p.state == 'Z')
        .collect()
}

/// The open descriptors of `pid` (from `/proc/PID/fd`, so the reader opens
/// none in it), each with what it points at (`/dev/pts/3`, `pipe:[…]`),
/// sorted by number.
pub fn fds(pid: i32) -> Vec<(i32, String)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let mut out: Vec<(i32, String)> = dir
        .flatten()
        .filter_map(|e| {
            let fd = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            Some((fd, target.display().to_string()))
        })
        .collect();
    out.sort();
    out
}

/// The open flags of descriptor `fd` of `pid` (`flags:` of
/// `/proc/PID/fdinfo/FD`, octal), e.g. to test for `O_CLOEXEC`.
pub fn fd_flags(pid: i32, fd: i32) -> Option<i32> {
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    let flags = info.lines().find_map(|l| l.strip_prefix("flags:"))?;
    i32::from_str_radix(flags.trim(), 8).ok()
}

/// The network namespace of `pid` (`net:[4026532…]`), if it is readable.
pub fn net_namespace(pid: i32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|p| p.display().to_string())
}

/// The keeper process of the host agent whose `--data-dir` is `data_dir`
/// (the parent of that host's agents), found by its command line.
pub fn keeper_of(data_dir: &std::path::Path) -> Option<i32> {
    let want = data_dir.as_os_str().as_encoded_bytes();
    all_processes().into_iter().map(|p| p.pid).find(|pid| {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            return false;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        args.get(1) == Some(&b"__agentplane_keeper".as_slice()) && args.get(2) == Some(&want)
    })
}

/// A live forker of the keeper `keeper` (`… __agentplane_forker KEEPER`,
/// the keeper's child), if one runs.
pub fn forker_of(keeper: i32) -> Option<i32> {
    forkers_of(keeper).into_iter().next()
}

/// The live forkers of the keeper `keeper`.
pub fn forkers_of(keeper: i32) -> Vec<i32> {
    all_processes()
        .into_iter()
        .filter(|p| p.ppid == keeper && p.state != 'Z' && p.state != 'X')
        .map(|p| p.pid)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).nth(1) == Some(b"__agentplane_forker"))
        })
        .collect()
}

/// Removes `parent` (relative to this process's cgroup) and everything
/// under it in every hierarchy, deepest first, waiting (bounded) for the
/// last members to be released: what a test cluster leaves in cgroupfs.
pub fn remove_cgroups(parent: &str) {
    let me = i32::try_from(std::process::id()).unwrap_or(0);
    let Ok(mounts) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    let mut roots: Vec<std::path::PathBuf> = Vec::new();
    for m in mounts.flatten() {
        let name = m.file_name().to_string_lossy().into_owned();
        let own = if name == "unified" {
            cgroup_dir(me, None)
        } else {
            name.split(',').find_map(|c| cgroup_dir(me, Some(c)))
        };
        if let Some(own) = own {
            roots.push(own.join(parent));
        }
    }
    if let Some(own) = cgroup_dir(me, None) {
        roots.push(own.join(parent));
    }
    fn walk(d: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        if let Ok(entries) = std::fs::read_dir(d) {
            for e in entries.flatten() {
                if e.path().is_dir() {
                    walk(&e.path(), out);
                }
            }
        }
        out.push(d.to_owned());
    }
    let mut dirs = Vec::new();
    for r in roots {
        walk(&r, &mut dirs);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    for d in dirs {
        while std::fs::remove_dir(&d).is_err() && d.exists() && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
