//! Roles and the per-method access table: which role each gRPC method of the
//! control plane needs. The one place that says it, so the tower layer and
//! the docs cannot drift apart; a test parses the `.proto` files and fails
//! when an RPC has no rule here.

use std::fmt;
use std::str::FromStr;

/// What a token may do. Ordered: each role may do all that the roles below
/// it may (`Viewer < Operator < Admin`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Reads: get, list, locate, watch, hosts; env values redacted.
    Viewer,
    /// Adds spawn, control, logs, input and attach, within its selector.
    Operator,
    /// Everything, including cordon and drain.
    Admin,
}

impl Role {
    /// Every role, lowest first.
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    /// The name used in the token file and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is none of `viewer`, `operator`, `admin`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not one of viewer, operator, admin")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;

    /// Exact, lowercase names only: the token file is written by hand once
    /// and read by machines often, so one spelling keeps `grep` honest.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownRole(s.to_owned()))
    }
}

/// What a method needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No token at all (health checks, so load balancers need no secret).
    Public,
    /// A token whose role is this one or above.
    AtLeast(Role),
}

const AGENT: &str = "agentplane.v1.AgentService";
const HOST: &str = "agentplane.v1.HostService";
const HEALTH: &str = "grpc.health.v1.Health";
const REFLECTION_V1: &str = "grpc.reflection.v1.ServerReflection";
const REFLECTION_V1ALPHA: &str = "grpc.reflection.v1alpha.ServerReflection";

use Role::{Admin, Operator, Viewer};

/// One rule per RPC of the public services. `HostAgent` is not here on
/// purpose: the control plane does not serve it, so a call to it is an
/// unknown method (admin-only, then UNIMPLEMENTED).
const METHODS: &[(&str, &str, Role)] = &[
    (AGENT, "SpawnAgent", Operator),
    (AGENT, "GetAgent", Viewer),
    (AGENT, "LocateAgent", Viewer),
    (AGENT, "ListAgents", Viewer),
    (AGENT, "PauseAgent", Operator),
    (AGENT, "ResumeAgent", Operator),
    (AGENT, "StopAgent", Operator),
    (AGENT, "KillAgent", Operator),
    (AGENT, "DeleteAgent", Operator),
    (AGENT, "WatchAgents", Viewer),
    // Output can hold secrets the program printed, so it is not a viewer read.
    (AGENT, "StreamLogs", Operator),
    (AGENT, "SendInput", Operator),
    (AGENT, "Attach", Operator),
    // The replica's own counters: status, not agent data.
    (AGENT, "GetStatus", Viewer),
    // Filtered to what a restricted caller may see.
    (AGENT, "ListAgentUsage", Viewer),
    (HOST, "ListHosts", Viewer),
    (HOST, "GetHost", Viewer),
    (HOST, "CordonHost", Admin),
    (HOST, "DrainHost", Admin),
];

/// Services whose every method has one rule. Health is public so probes need
/// no secret; reflection lists the API, which is no secret either, but it is
/// kept behind a token so an anonymous scan learns nothing.
const SERVICES: &[(&str, Access)] = &[
    (HEALTH, Access::Public),
    (REFLECTION_V1, Access::AtLeast(Viewer)),
    (REFLECTION_V1ALPHA, Access::AtLeast(Viewer)),
];

/// The access a gRPC path (`/package.Service/Method`) needs. Anything not in
/// the table, a malformed path included, is admin-only: a method added
/// without a rule must fail closed.
pub fn required_role(path: &str) -> Access {
    rule(path).unwrap_or(Access::AtLeast(Admin))
}

/// The explicit rule for `path`, or `None` when it falls to the default.
fn rule(path: &str) -> Option<Access> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    if method.is_empty() || method.contains('/') {
        return None;
    }
    if let Some((_, access)) = SERVICES.iter().find(|(s, _)| *s == service) {
        return Some(*access);
    }
    METHODS
        .iter()
        .find(|(s, m, _)| *s == service && *m == method)
        .map(|(_, _, role)| Access::AtLeast(*role))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    const PROTOS: &[&str] = &[
        include_str!("../../proto/agentplane/v1/agent_service.proto"),
        include_str!("../../proto/agentplane/v1/host_service.proto"),
        include_str!("../../proto/agentplane/v1/host_agent.proto"),
    ];

    /// `(package.Service, Method)` for every `rpc` in every `service` block,
    /// read the simple way: the files are ours and formatted one rpc a line.
    fn proto_rpcs() -> BTreeSet<(String, String)> {
        let mut out = BTreeSet::new();
        for text in PROTOS {
            let mut package = String::new();
            let mut service: Option<String> = None;
            let mut depth = 0usize;
            for line in text.lines() {
                let line = line.split("//").next().unwrap_or("").trim();
                if let Some(p) = line.strip_prefix("package ") {
                    package = p.trim_end_matches(';').trim().to_owned();
                }
                if service.is_none() {
                    if let Some(rest) = line.strip_prefix("service ") {
                        let name = rest.trim_end_matches('{').trim();
                        service = Some(format!("{package}.{name}"));
                        depth = 0;
                    } else {
                        continue;
                    }
                }
                let svc = service.clone().unwrap();
                if let Some(rest) = line.strip_prefix("rpc ") {
                    let name = rest.split('(').next().unwrap().trim();
                    out.insert((svc, name.to_owned()));
                }
                depth += line.matches('{').count();
                depth -= line.matches('}').count();
                if depth == 0 {
                    service = None;
                }
            }
        }
        out
    }

    #[test]
    fn every_public_rpc_has_an_explicit_rule() {
        let rpcs = proto_rpcs();
        let public: Vec<_> = rpcs
            .iter()
            .filter(|(s, _)| s == AGENT || s == HOST)
            .collect();
        // Guards the parser itself: it must find the services it checks.
        assert!(public.iter().filter(|(s, _)| s == AGENT).count() >= 14);
        assert!(public.iter().filter(|(s, _)| s == HOST).count() >= 4);
        for (s, m) in public {
            assert!(
                rule(&format!("/{s}/{m}")).is_some(),
                "{s}/{m} has no rule in src/auth/roles.rs METHODS"
            );
        }
    }

    #[test]
    fn no_rule_names_an_rpc_that_does_not_exist() {
        let rpcs = proto_rpcs();
        for (s, m, _) in METHODS {
            assert!(
                rpcs.contains(&((*s).to_owned(), (*m).to_owned())),
                "METHODS has {s}/{m}, which no .proto declares"
            );
        }
    }

    #[test]
    fn host_agent_methods_are_admin_only() {
        let rpcs = proto_rpcs();
        let host_agent: Vec<_> = rpcs
            .iter()
            .filter(|(s, _)| s == "agentplane.v1.HostAgent")
            .collect();
        assert!(!host_agent.is_empty());
        for (s, m) in host_agent {
            assert_eq!(rule(&format!("/{s}/{m}")), None);
            assert_eq!(required_role(&format!("/{s}/{m}")), Access::AtLeast(Admin));
        }
    }

    #[test]
    fn service_names_match_the_generated_code() {
        use crate::proto::v1::{agent_service_server, host_service_server};
        assert_eq!(AGENT, agent_service_server::SERVICE_NAME);
        assert_eq!(HOST, host_service_server::SERVICE_NAME);
    }

    #[test]
    fn the_issue_s_rules() {
        let a = |m: &str| required_role(&format!("/{AGENT}/{m}"));
        let h = |m: &str| required_role(&format!("/{HOST}/{m}"));
        for m in [
            "GetAgent",
            "ListAgents",
            "LocateAgent",
            "WatchAgents",
            "GetStatus",
            "ListAgentUsage",
        ] {
            assert_eq!(a(m), Access::AtLeast(Viewer), "{m}");
        }
        for m in [
            "SpawnAgent",
            "PauseAgent",
            "ResumeAgent",
            "StopAgent",
            "KillAgent",
            "DeleteAgent",
            "StreamLogs",
            "SendInput",
            "Attach",
        ] {
            assert_eq!(a(m), Access::AtLeast(Operator), "{m}");
        }
        assert_eq!(h("ListHosts"), Access::AtLeast(Viewer));
        assert_eq!(h("GetHost"), Access::AtLeast(Viewer));
        assert_eq!(h("CordonHost"), Access::AtLeast(Admin));
        assert_eq!(h("DrainHost"), Access::AtLeast(Admin));
    }

    #[test]
    fn health_is_public_and_reflection_needs_a_viewer() {
        assert_eq!(
            required_role("/grpc.health.v1.Health/Check"),
            Access::Public
        );
        assert_eq!(
            required_role("/grpc.health.v1.Health/Watch"),
            Access::Public
        );
        for svc in [REFLECTION_V1, REFLECTION_V1ALPHA] {
            assert_eq!(
                required_role(&format!("/{svc}/ServerReflectionInfo")),
                Access::AtLeast(Viewer)
            );
        }
    }

    #[test]
    fn unknown_and_malformed_paths_are_admin_only() {
        for p in [
            "",
            "/",
            "//",
            "GetAgent",
            "/agentplane.v1.AgentService",
            "/agentplane.v1.AgentService/",
            "/agentplane.v1.AgentService/NewMethod",
            "/agentplane.v1.AgentService/GetAgent/extra",
            "/agentplane.v1.AgentService/getagent",
            "agentplane.v1.AgentService/GetAgent",
            "/agentplane.v2.AgentService/GetAgent",
            "/grpc.health.v1.Health/",
            "/grpc.health.v1.Health/Check/x",
            "/some.Other/Thing",
        ] {
            assert_eq!(required_role(p), Access::AtLeast(Admin), "{p:?}");
        }
    }

    #[test]
    fn roles_order_parse_and_display() {
        assert!(Viewer < Operator && Operator < Admin);
        for r in Role::ALL {
            assert_eq!(r.to_string().parse::<Role>(), Ok(r));
        }
        assert_eq!(
            "Admin".parse::<Role>().unwrap_err().to_string(),
            "`Admin` is not one of viewer, operator, admin"
        );
        assert!("".parse::<Role>().is_err());
    }
}
