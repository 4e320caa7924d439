//! Which users agents may run as on this host: never root unless the host
//! agent was started with `--allow-root-agents` (an agent with no uid runs as
//! the host agent's own user, root under the systemd unit), and only the uids
//! of `--allowed-uids` when it is given.

use std::ops::RangeInclusive;

/// Uid ranges, parsed from `1000-1999,65534`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UidRanges(pub Vec<RangeInclusive<u32>>);

impl UidRanges {
    /// Whether `uid` is in one of the ranges.
    pub fn contains(&self, uid: u32) -> bool {
        self.0.iter().any(|r| r.contains(&uid))
    }
}

impl std::fmt::Display for UidRanges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|r| {
                if r.start() == r.end() {
                    r.start().to_string()
                } else {
                    format!("{}-{}", r.start(), r.end())
                }
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// Parses `A-B,C,…` (inclusive ranges and single uids) for clap.
pub fn parse_uid_ranges(s: &str) -> Result<UidRanges, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let uid = |t: &str| {
            t.trim()
                .parse::<u32>()
                .map_err(|_| format!("`{t}` in `{s}` is not a uid (a number)"))
        };
        let range = match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (uid(a)?, uid(b)?);
                if a > b {
                    return Err(format!("`{part}` in `{s}` is an empty range"));
                }
                a..=b
            }
            None => {
                let u = uid(part)?;
                u..=u
            }
        };
        out.push(range);
    }
    if out.is_empty() {
        return Err(format!(
            "`{s}` names no uid: write ranges like 1000-1999,65534"
        ));
    }
    Ok(UidRanges(out))
}

/// The rule a start is checked against.
#[derive(Debug, Clone)]
pub struct UidPolicy {
    /// `--allow-root-agents`.
    pub allow_root: bool,
    /// `--allowed-uids`, if given.
    pub allowed: Option<UidRanges>,
    /// The host agent's own uid: what an agent with no uid runs as.
    pub own_uid: u32,
}

impl UidPolicy {
    /// Why an agent asking for `uid` may not run here; `None`: it may.
    pub fn refusal(&self, uid: Option<u32>) -> Option<String> {
        let effective = uid.unwrap_or(self.own_uid);
        let how = if uid.is_some() {
            format!("uid {effective}")
        } else {
            format!("no uid, so the host agent's own uid {effective}")
        };
        if effective == 0 && !self.allow_root {
            return Some(format!(
                "agents may not run as root here (it asks for {how}): give it a uid, or start the host agent with --allow-root-agents"
            ));
        }
        if let Some(allowed) = &self.allowed {
            let root_allowed = effective == 0 && self.allow_root;
            if !(allowed.contains(effective) || root_allowed) {
                return Some(format!(
                    "agents may run only as uids {allowed} here (it asks for {how}); see --allowed-uids"
                ));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_bad_ones_say_why() {
        let r = parse_uid_ranges("1000-1999, 65534").unwrap();
        assert!(r.contains(1000) && r.contains(1999) && r.contains(65534));
        assert!(!r.contains(999) && !r.contains(2000));
        assert_eq!(r.to_string(), "1000-1999,65534");
        assert!(parse_uid_ranges("5-1").unwrap_err().contains("empty range"));
        assert!(parse_uid_ranges("x").unwrap_err().contains("not a uid"));
        assert!(parse_uid_ranges(",").unwrap_err().contains("names no uid"));
    }

    #[test]
    fn root_only_when_allowed_and_other_uids_only_in_the_ranges() {
        let as_root = UidPolicy {
            allow_root: false,
            allowed: None,
            own_uid: 0,
        };
        assert!(as_root
            .refusal(Some(0))
            .unwrap()
            .contains("--allow-root-agents"));
        assert!(as_root.refusal(None).unwrap().contains("own uid 0"));
        assert!(as_root.refusal(Some(1000)).is_none());
        let allowing = UidPolicy {
            allow_root: true,
            ..as_root.clone()
        };
        assert!(allowing.refusal(None).is_none());
        let ranged = UidPolicy {
            allowed: Some(parse_uid_ranges("1000-1999").unwrap()),
            ..as_root
        };
        assert!(ranged.refusal(Some(1500)).is_none());
        assert!(ranged.refusal(Some(2000)).unwrap().contains("1000-1999"));
        let as_user = UidPolicy {
            allow_root: false,
            allowed: None,
            own_uid: 1000,
        };
        assert!(as_user.refusal(None).is_none());
    }
}
