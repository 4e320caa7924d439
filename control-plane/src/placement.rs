//! Placement: which live hosts may take an agent, and in which order to try
//! them (round robin over a shared `INCR` counter, so every replica agrees).

use agentplane::cgroups::Resources;
use agentplane::labels::Selector;
use agentplane::proto::v1::{AgentSpec, Placement};
use agentplane::registry::HostRecord;
use agentplane::validate::ValidationError;

use crate::error::ApiError;

/// The hosts to try for `spec`, best first (at most
/// [`MAX_ATTEMPTS`](crate::start::MAX_ATTEMPTS), the only ones a start
/// tries): those its placement allows, whose cgroups can enforce its
/// `resources`, with room, in the order of the live hosts (sorted by id)
/// from the round-robin position `rr` on (the next counter value; a host
/// after full ones is met a little more often). Only the hosts returned are
/// checked when enough of them take it; they are borrowed, not copied.
pub fn candidates<'h>(
    spec: &AgentSpec,
    hosts: &'h [HostRecord],
    rr: u64,
) -> Result<Vec<&'h HostRecord>, ApiError> {
    let resources = Resources::from_proto(spec.resources.as_ref())?;
    let default = Placement::default();
    let p = spec.placement.as_ref().unwrap_or(&default);
    let total = hosts.len();
    if total == 0 {
        return Err(ApiError::NoCapacity {
            detail: "no host agent is registered (none is heartbeating)".into(),
        });
    }
    if !p.host.is_empty() {
        let Some(h) = hosts.iter().find(|h| h.id == p.host) else {
            let live: Vec<&str> = hosts.iter().map(|h| h.id.as_str()).collect();
            return Err(ValidationError::new(
                "spec.placement.host",
                format!(
                    "no live host named `{}` (live hosts: {})",
                    p.host,
                    live.join(", ")
                ),
            )
            .into());
        };
        if let Some(why) = h.cgroups.refusal(&resources) {
            return Err(ApiError::Unenforceable {
                detail: format!("host {} {why}", h.id),
            });
        }
        if !h.has_room() {
            return Err(ApiError::NoCapacity {
                detail: format!("host {} is {}", h.id, why_not(h)),
            });
        }
        return Ok(vec![h]);
    }
    let selector = Selector::parse("spec.placement.label_selector", &p.label_selector)?;
    // The usual case: walk on from the round-robin position and stop at the
    // first hosts that take it, so a spawn checks a few hosts, not every
    // host of the fleet. Only a spawn that no host takes walks them all,
    // to say why.
    let start = usize::try_from(rr % total as u64).unwrap_or(0);
    let picked: Vec<&HostRecord> = hosts[start..]
        .iter()
        .chain(&hosts[..start])
        .filter(|h| {
            h.has_room() && selector.matches(&h.labels) && h.cgroups.refusal(&resources).is_none()
        })
        .take(crate::start::MAX_ATTEMPTS)
        .collect();
    if !picked.is_empty() {
        return Ok(picked);
    }
    let matching: Vec<&HostRecord> = hosts
        .iter()
        .filter(|h| selector.matches(&h.labels))
        .collect();
    if matching.is_empty() {
        return Err(ApiError::NoCapacity {
            detail: format!(
                "none of the {total} live hosts matches `{}`",
                p.label_selector
            ),
        });
    }
    let (able, unable): (Vec<&HostRecord>, Vec<&HostRecord>) = matching
        .into_iter()
        .partition(|h| h.cgroups.refusal(&resources).is_none());
    if able.is_empty() {
        let why: Vec<String> = unable
            .iter()
            .filter_map(|h| Some(format!("{} {}", h.id, h.cgroups.refusal(&resources)?)))
            .collect();
        return Err(ApiError::Unenforceable {
            detail: why.join("; "),
        });
    }
    let why: Vec<String> = able
        .iter()
        .map(|h| format!("{} is {}", h.id, why_not(h)))
        .collect();
    Err(ApiError::NoCapacity {
        detail: why.join("; "),
    })
}

fn why_not(h: &HostRecord) -> String {
    if h.cordoned {
        "cordoned".into()
    } else {
        format!("full ({}/{} agents)", h.running, h.capacity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(id: &str, running: u32) -> HostRecord {
        HostRecord {
            id: id.into(),
            address: format!("{id}:1"),
            capacity: 2,
            running,
            ..Default::default()
        }
    }

    #[test]
    fn round_robin_rotates_over_fitting_hosts() {
        let hosts = vec![host("a", 0), host("b", 2), host("c", 0)];
        let order: Vec<String> = candidates(&AgentSpec::default(), &hosts, 1)
            .unwrap()
            .into_iter()
            .map(|h| h.id.clone())
            .collect();
        assert_eq!(order, ["c", "a"]);
        let order: Vec<String> = candidates(&AgentSpec::default(), &hosts, 2)
            .unwrap()
            .into_iter()
            .map(|h| h.id.clone())
            .collect();
        assert_eq!(order, ["c", "a"]);
        let order: Vec<String> = candidates(&AgentSpec::default(), &hosts, 3)
            .unwrap()
            .into_iter()
            .map(|h| h.id.clone())
            .collect();
        assert_eq!(order, ["a", "c"]);
        // Of many, only as many as a start tries, from the rotation's place.
        let many: Vec<HostRecord> = (0..10).map(|i| host(&format!("h{i}"), 0)).collect();
        let order: Vec<String> = candidates(&AgentSpec::default(), &many, 8)
            .unwrap()
            .into_iter()
            .map(|h| h.id.clone())
            .collect();
        assert_eq!(order, ["h8", "h9", "h0"]);
    }

    #[test]
    fn pinned_unknown_host_is_invalid_argument_naming_the_field() {
        let p = Placement {
            host: "zz".into(),
            label_selector: String::new(),
        };
        let spec = AgentSpec {
            placement: Some(p),
            ..Default::default()
        };
        match candidates(&spec, &[host("a", 0)], 0) {
            Err(ApiError::Validate(v)) => assert_eq!(v.field, "spec.placement.host"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn limits_go_only_to_hosts_that_enforce_them_and_say_why_not() {
        use agentplane::cgroups::{CgroupMode, HostCgroups};
        let mut v1 = host("b", 0);
        v1.cgroups = HostCgroups {
            mode: CgroupMode::V1,
            freeze: true,
            memory: true,
            pids: true,
            cpu: true,
            detail: String::new(),
        };
        let mut off = host("a", 0);
        off.cgroups.detail = "--cgroups off".into();
        let spec = AgentSpec {
            resources: Some(agentplane::proto::v1::Resources {
                memory_bytes: Some(64 << 20),
                ..Default::default()
            }),
            ..Default::default()
        };
        let order: Vec<String> = candidates(&spec, &[off.clone(), v1], 0)
            .unwrap()
            .into_iter()
            .map(|h| h.id.clone())
            .collect();
        assert_eq!(order, ["b"]);
        match candidates(&spec, &[off], 0) {
            Err(ApiError::Unenforceable { detail }) => assert_eq!(
                detail,
                "a cannot enforce a memory limit (cgroups none: --cgroups off)"
            ),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn no_hosts_and_full_hosts_are_no_capacity() {
        assert!(matches!(
            candidates(&AgentSpec::default(), &[], 0),
            Err(ApiError::NoCapacity { .. })
        ));
        assert!(matches!(
            candidates(&AgentSpec::default(), &[host("a", 2)], 0),
            Err(ApiError::NoCapacity { .. })
        ));
    }
}
