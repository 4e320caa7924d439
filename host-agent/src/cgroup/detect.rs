//! Where the cgroup hierarchies are (`/proc/self/mountinfo`) and where this
//! process sits in each (`/proc/self/cgroup`).

use std::path::{Path, PathBuf};

/// One mounted hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Where it is mounted.
    pub point: PathBuf,
    /// The part of the hierarchy the mount shows (`/` unless bind-mounted
    /// or in a cgroup namespace).
    pub root: String,
    /// v1: the controllers bound to it (`memory`, `cpu`…); empty for v2.
    pub controllers: Vec<String>,
    /// The unified (v2) hierarchy.
    pub unified: bool,
}

/// Every cgroup mount in `mountinfo` (the text of `/proc/self/mountinfo`).
pub fn mounts(mountinfo: &str) -> Vec<Mount> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        let (Some(root), Some(point), Some(fstype)) = (l.get(3), l.get(4), r.first()) else {
            continue;
        };
        let unified = match *fstype {
            "cgroup2" => true,
            "cgroup" => false,
            _ => continue,
        };
        let controllers = if unified {
            Vec::new()
        } else {
            r.get(2)
                .map(|o| {
                    o.split(',')
                        .filter(|c| !matches!(*c, "rw" | "ro") && !c.contains('='))
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default()
        };
        out.push(Mount {
            point: PathBuf::from(unescape(point)),
            root: unescape(root),
            controllers,
            unified,
        });
    }
    out
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        if let Some(d) = octal {
            let v = d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            out.push(u8::try_from(v).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// This process's path in the hierarchy of v1 `controller` (`None`: the
/// unified one), from the text of `/proc/self/cgroup`.
pub fn own_path(proc_cgroup: &str, controller: Option<&str>) -> Option<String> {
    proc_cgroup.lines().find_map(|line| {
        let mut f = line.splitn(3, ':');
        let (_, names, path) = (f.next()?, f.next()?, f.next()?);
        let hit = match controller {
            None => names.is_empty(),
            Some(c) => names.split(',').any(|n| n == c),
        };
        hit.then(|| path.to_owned())
    })
}

/// The directory, under `mount`, of hierarchy path `path` (which is
/// relative to the hierarchy's root; the mount may show only part of it).
pub fn dir_of(mount: &Mount, path: &str) -> PathBuf {
    let inside = if mount.root == "/" {
        path
    } else {
        path.strip_prefix(mount.root.as_str()).unwrap_or(path)
    };
    let rel = inside.trim_start_matches('/');
    if rel.is_empty() {
        mount.point.clone()
    } else {
        mount.point.join(rel)
    }
}

/// `base` joined with `parent` (absolute: from the hierarchy's root at
/// `point`; relative: under `own`, this process's cgroup) and `host`.
pub fn host_dir(point: &Path, own: &Path, parent: &str, host: &str) -> PathBuf {
    let base = match parent.strip_prefix('/') {
        Some(abs) => point.join(abs),
        None => own.join(parent),
    };
    base.join(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
30 25 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
35 30 0:31 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,memory
36 30 0:32 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,cpu,cpuacct
37 30 0:33 /docker/abc /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 30 0:34 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
39 30 0:35 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
40 25 0:36 / /mnt/with\\040space rw - ext4 /dev/sda1 rw
";

    #[test]
    fn mountinfo_gives_each_hierarchy_and_its_controllers() {
        let m = mounts(MOUNTINFO);
        assert_eq!(m.len(), 6, "{m:?}");
        assert!(m[0].unified && m[0].point == Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(m[2].controllers, vec!["cpu", "cpuacct"]);
        assert_eq!(m[3].root, "/docker/abc");
        assert_eq!(m[4].controllers, vec!["cpuset"]);
        assert_eq!(m[5].controllers, vec!["xattr"]);
        assert_eq!(unescape("/mnt/with\\040space"), "/mnt/with space");
    }

    #[test]
    fn own_paths_and_dirs_follow_the_mount_root() {
        let pc = "9:name=systemd:/\n4:memory:/process_api/0b10\n2:cpu,cpuacct:/x\n0::/init.scope\n";
        assert_eq!(
            own_path(pc, Some("memory")).as_deref(),
            Some("/process_api/0b10")
        );
        assert_eq!(own_path(pc, Some("cpu")).as_deref(), Some("/x"));
        assert_eq!(own_path(pc, None).as_deref(), Some("/init.scope"));
        assert_eq!(own_path(pc, Some("pids")), None);
        let m = mounts(MOUNTINFO);
        assert_eq!(
            dir_of(&m[3], "/docker/abc/sub"),
            Path::new("/sys/fs/cgroup/freezer/sub")
        );
        assert_eq!(dir_of(&m[1], "/"), Path::new("/sys/fs/cgroup/memory"));
        let own = Path::new("/sys/fs/cgroup/memory/a");
        assert_eq!(
            host_dir(Path::new("/sys/fs/cgroup/memory"), own, "agentplane", "h1"),
            Path::new("/sys/fs/cgroup/memory/a/agentplane/h1")
        );
        assert_eq!(
            host_dir(Path::new("/sys/fs/cgroup/memory"), own, "/ap", "h1"),
            Path::new("/sys/fs/cgroup/memory/ap/h1")
        );
    }
}
