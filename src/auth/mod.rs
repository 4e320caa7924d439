//! Bearer-token authorization of the control plane: the token file
//! ([`TokenTable`]), the roles and which role each method needs
//! ([`required_role`]), and [`decide`], the one pure decision the tower
//! layer makes per request. Nothing here touches the network or a handler,
//! so every rule is unit-tested.
//!
//! Clients send `authorization: Bearer <token>`. A missing and a wrong token
//! get the same UNAUTHENTICATED message, so a caller cannot tell a typo from
//! a revoked token by probing; a known token asking for more than its role
//! allows gets PERMISSION_DENIED naming both roles, since its holder is
//! already trusted to know what it is.

pub mod roles;
pub mod tokens;

#[cfg(test)]
mod props;

use std::path::PathBuf;

use crate::labels::Selector;
use crate::proto::v1::AgentSpec;

pub use roles::{required_role, Access, Role, UnknownRole};
pub use tokens::{digest_hex, TokenTable};

/// What an env value is replaced with for callers who may not read it.
pub const REDACTED: &str = "<redacted>";

/// Who is calling, from the token file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The entry's `name`, for logs and audit.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// For a viewer or an operator: only agents whose labels match are
    /// theirs. `None` means every agent. Never set on an admin.
    pub selector: Option<Selector>,
}

impl Principal {
    /// True when this caller must see env values as [`REDACTED`]: viewers,
    /// since env is where secrets are usually passed.
    pub fn redacts_env(&self) -> bool {
        self.role < Role::Operator
    }
}

/// Why the token file could not be used; each variant is the step that
/// failed. On reload the old table stays in force.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The file could not be opened or read, or is not UTF-8.
    #[error("token file {}: {source}", path.display())]
    ReadTokenFile {
        /// The token file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not TOML of the token file's shape (unknown keys included).
    #[error("token file {}: {source}", path.display())]
    ParseTokenFile {
        /// The token file.
        path: PathBuf,
        /// The parser's error, with line and column.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// One `[[token]]` entry is wrong.
    #[error("token file {}: token[{index}]{}: {field}: {reason}", path.display(), label(name))]
    InvalidEntry {
        /// The token file.
        path: PathBuf,
        /// The entry's position in the file, from 0.
        index: usize,
        /// The entry's name, when it has a valid one.
        name: Option<String>,
        /// The field at fault (`name`, `sha256`, `role`, `selector`).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Group or others may read the file.
    #[error(
        "token file {p}: mode {mode:o} lets others read it or others or the group change it; run chmod 600 {p}",
        p = path.display()
    )]
    InsecurePermissions {
        /// The token file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

fn label(name: &Option<String>) -> String {
    name.as_deref()
        .map(|n| format!(" ({n})"))
        .unwrap_or_default()
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.message())]
pub enum Denied {
    /// No token, a malformed header, or a token not in the file.
    Unauthenticated,
    /// A known token whose role is below what the method needs.
    PermissionDenied {
        /// The caller's role.
        role: Role,
        /// The least role the method needs.
        needed: Role,
    },
}

impl Denied {
    /// The message for the caller.
    pub fn message(&self) -> String {
        match self {
            Denied::Unauthenticated => {
                "a valid token is required: pass --token or --token-file".to_owned()
            }
            Denied::PermissionDenied { role, needed } => {
                format!("this token's role is {role}; this call needs {needed} or above")
            }
        }
    }

    /// The gRPC code to answer with.
    pub fn code(&self) -> tonic::Code {
        match self {
            Denied::Unauthenticated => tonic::Code::Unauthenticated,
            Denied::PermissionDenied { .. } => tonic::Code::PermissionDenied,
        }
    }
}

impl From<Denied> for tonic::Status {
    fn from(d: Denied) -> Self {
        tonic::Status::new(d.code(), d.message())
    }
}

/// Decides one request: `path` is the gRPC path, `authorization` the
/// header's value (`None` when absent or not visible ASCII). `table: None`
/// means auth is off, and everything is allowed. `Ok(None)` is allowed with
/// no principal (auth off, or a public method); `Ok(Some(p))` is allowed as
/// `p`, whose selector and env redaction the handlers still apply.
pub fn decide(
    table: Option<&TokenTable>,
    path: &str,
    authorization: Option<&str>,
) -> Result<Option<Principal>, Denied> {
    let Some(table) = table else {
        return Ok(None);
    };
    let needed = match required_role(path) {
        Access::Public => return Ok(None),
        Access::AtLeast(role) => role,
    };
    let token = authorization
        .and_then(bearer_token)
        .ok_or(Denied::Unauthenticated)?;
    let principal = table.authenticate(token).ok_or(Denied::Unauthenticated)?;
    if principal.role < needed {
        return Err(Denied::PermissionDenied {
            role: principal.role,
            needed,
        });
    }
    Ok(Some(principal.clone()))
}

/// The token of `Bearer <token>`: the scheme in any case, then one or more
/// spaces or tabs; surrounding whitespace is ignored. A token with
/// whitespace inside is malformed (RFC 6750's token68 has none).
fn bearer_token(header: &str) -> Option<&str> {
    let header = header.trim();
    let (scheme, rest) = header.split_once([' ', '\t'])?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim_start_matches([' ', '\t']);
    if token.is_empty() || token.contains(char::is_whitespace) {
        return None;
    }
    Some(token)
}

/// Replaces every env value of `spec` with [`REDACTED`], keeping the keys
/// (which say how an agent is configured without giving its secrets), for a
/// caller whose [`Principal::redacts_env`] is true.
pub fn redact_env(spec: &mut AgentSpec) {
    for v in spec.env.values_mut() {
        REDACTED.clone_into(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const GET: &str = "/agentplane.v1.AgentService/GetAgent";
    const SPAWN: &str = "/agentplane.v1.AgentService/SpawnAgent";
    const DRAIN: &str = "/agentplane.v1.HostService/DrainHost";
    const HEALTH: &str = "/grpc.health.v1.Health/Check";
    const UNKNOWN: &str = "/agentplane.v1.AgentService/Future";

    pub(super) fn table() -> TokenTable {
        let mut text = String::new();
        for (name, role) in [("v", "viewer"), ("o", "operator"), ("a", "admin")] {
            text += &format!(
                "[[token]]\nname = \"{name}\"\nsha256 = \"{}\"\nrole = \"{role}\"\n",
                digest_hex(&format!("tok-{name}"))
            );
        }
        TokenTable::parse(Path::new("/t"), &text).unwrap()
    }

    fn who(r: Result<Option<Principal>, Denied>) -> Result<Option<String>, Denied> {
        r.map(|p| p.map(|p| p.name))
    }

    #[test]
    fn auth_off_allows_everything() {
        for path in [GET, SPAWN, DRAIN, UNKNOWN, ""] {
            assert_eq!(decide(None, path, None), Ok(None));
            assert_eq!(decide(None, path, Some("Bearer junk")), Ok(None));
        }
    }

    #[test]
    fn health_needs_no_token_and_ignores_a_bad_one() {
        let t = table();
        assert_eq!(decide(Some(&t), HEALTH, None), Ok(None));
        assert_eq!(decide(Some(&t), HEALTH, Some("garbage")), Ok(None));
    }

    #[test]
    fn missing_malformed_and_wrong_tokens_are_one_error() {
        let t = table();
        for h in [
            None,
            Some(""),
            Some("Bearer"),
            Some("Bearer "),
            Some("Basic dG9rLXY="),
            Some("tok-v"),
            Some("Bearer tok-x"),
            Some("Bearer tok-v extra"),
            Some("Bearertok-v"),
        ] {
            let e = decide(Some(&t), GET, h).unwrap_err();
            assert_eq!(e, Denied::Unauthenticated, "{h:?}");
            assert_eq!(
                e.message(),
                "a valid token is required: pass --token or --token-file"
            );
            assert_eq!(tonic::Status::from(e).code(), tonic::Code::Unauthenticated);
        }
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_spaces_are_tolerated() {
        let t = table();
        for h in [
            "Bearer tok-v",
            "bearer tok-v",
            "BEARER tok-v",
            "Bearer    tok-v",
            "Bearer\ttok-v",
            "  Bearer tok-v  ",
        ] {
            assert_eq!(
                who(decide(Some(&t), GET, Some(h))),
                Ok(Some("v".into())),
                "{h:?}"
            );
        }
    }

    #[test]
    fn roles_gate_methods() {
        let t = table();
        let as_ =
            |tok: &str, path: &str| who(decide(Some(&t), path, Some(&format!("Bearer {tok}"))));
        assert_eq!(as_("tok-v", GET), Ok(Some("v".into())));
        assert_eq!(
            as_("tok-v", SPAWN),
            Err(Denied::PermissionDenied {
                role: Role::Viewer,
                needed: Role::Operator
            })
        );
        assert_eq!(as_("tok-o", SPAWN), Ok(Some("o".into())));
        assert_eq!(as_("tok-o", GET), Ok(Some("o".into())));
        assert!(as_("tok-o", DRAIN).is_err());
        assert!(as_("tok-o", UNKNOWN).is_err());
        assert_eq!(as_("tok-a", DRAIN), Ok(Some("a".into())));
        assert_eq!(as_("tok-a", UNKNOWN), Ok(Some("a".into())));
    }

    #[test]
    fn permission_denied_names_both_roles() {
        let d = Denied::PermissionDenied {
            role: Role::Operator,
            needed: Role::Admin,
        };
        assert_eq!(
            d.message(),
            "this token's role is operator; this call needs admin or above"
        );
        assert_eq!(d.to_string(), d.message());
        let s = tonic::Status::from(d);
        assert_eq!(s.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn redact_env_keeps_keys_and_hides_values() {
        let mut spec = AgentSpec::default();
        spec.env.insert("API_KEY".into(), "s3cret".into());
        spec.env.insert("EMPTY".into(), String::new());
        redact_env(&mut spec);
        assert_eq!(spec.env.len(), 2);
        assert!(spec.env.values().all(|v| v == REDACTED));
        assert!(spec.env.contains_key("API_KEY"));
    }

    #[test]
    fn only_viewers_get_redacted_env() {
        let t = table();
        let redacts: Vec<_> = t.principals().map(|p| (p.role, p.redacts_env())).collect();
        assert_eq!(
            redacts,
            [
                (Role::Viewer, true),
                (Role::Operator, false),
                (Role::Admin, false)
            ]
        );
    }
}
