//! Placement: which live hosts may take an agent, and in which order to try
//! them (round robin over a shared `INCR` counter, so every replica agrees).

use agentplane::labels::Selector;
use agentplane::proto::v1::Placement;
use agentplane::registry::HostRecord;
use agentplane::validate::ValidationError;

use crate::error::ApiError;

/// The hosts to try, best first. `hosts` are the live hosts sorted by id;
/// `rr` is the next round-robin counter value.
pub fn candidates(
    placement: Option<&Placement>,
    hosts: Vec<HostRecord>,
    rr: u64,
) -> Result<Vec<HostRecord>, ApiError> {
    let default = Placement::default();
    let p = placement.unwrap_or(&default);
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
        if !h.has_room() {
            return Err(ApiError::NoCapacity {
                detail: format!("host {} is {}", h.id, why_not(h)),
            });
        }
        return Ok(vec![h.clone()]);
    }
    let selector = Selector::parse("spec.placement.label_selector", &p.label_selector)?;
    let matching: Vec<HostRecord> = hosts
        .into_iter()
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
    let fitting: Vec<HostRecord> = matching.iter().filter(|h| h.has_room()).cloned().collect();
    if fitting.is_empty() {
        let why: Vec<String> = matching
            .iter()
            .map(|h| format!("{} is {}", h.id, why_not(h)))
            .collect();
        return Err(ApiError::NoCapacity {
            detail: why.join("; "),
        });
    }
    let start = usize::try_from(rr % fitting.len() as u64).unwrap_or(0);
    let mut ordered = fitting;
    ordered.rotate_left(start);
    Ok(ordered)
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
        let order: Vec<String> = candidates(None, hosts.clone(), 1)
            .unwrap()
            .into_iter()
            .map(|h| h.id)
            .collect();
        assert_eq!(order, ["c", "a"]);
        let order: Vec<String> = candidates(None, hosts, 2)
            .unwrap()
            .into_iter()
            .map(|h| h.id)
            .collect();
        assert_eq!(order, ["a", "c"]);
    }

    #[test]
    fn pinned_unknown_host_is_invalid_argument_naming_the_field() {
        let p = Placement {
            host: "zz".into(),
            label_selector: String::new(),
        };
        match candidates(Some(&p), vec![host("a", 0)], 0) {
            Err(ApiError::Validate(v)) => assert_eq!(v.field, "spec.placement.host"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn no_hosts_and_full_hosts_are_no_capacity() {
        assert!(matches!(
            candidates(None, vec![], 0),
            Err(ApiError::NoCapacity { .. })
        ));
        assert!(matches!(
            candidates(None, vec![host("a", 2)], 0),
            Err(ApiError::NoCapacity { .. })
        ));
    }
}
