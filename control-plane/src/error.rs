//! Control-plane errors and their one mapping to gRPC status codes.

use agentplane::registry::RegistryError;
use agentplane::validate::ValidationError;
use tonic::{Code, Status};

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A request field is wrong.
    #[error(transparent)]
    Validate(#[from] ValidationError),
    /// No agent with this id.
    #[error("agent {id} not found")]
    AgentNotFound {
        /// The id asked for.
        id: String,
    },
    /// No live host with this id.
    #[error("host {id} not found: it is not heartbeating")]
    HostNotFound {
        /// The id asked for.
        id: String,
    },
    /// The agent's state forbids the operation.
    #[error("agent {id}: {detail}")]
    IllegalTransition {
        /// The agent.
        id: String,
        /// Why.
        detail: String,
    },
    /// No live host can take the agent.
    #[error("no host can take the agent: {detail}")]
    NoCapacity {
        /// Which hosts were considered and why none fit.
        detail: String,
    },
    /// No live host that may take the agent can enforce its resources.
    #[error("no host can enforce the agent's resources: {detail}")]
    Unenforceable {
        /// Which hosts were considered and what each lacks.
        detail: String,
    },
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The caller's token does not allow this (its selector, or uid/gid).
    #[error("{detail}")]
    Forbidden {
        /// What is not allowed, and why.
        detail: String,
    },
    /// The agent's host could not be reached in time.
    #[error("host {host} ({address}) unreachable: {detail}")]
    HostUnreachable {
        /// The host id.
        host: String,
        /// Its address.
        address: String,
        /// The transport error or timeout.
        detail: String,
    },
    /// The agent's host is not heartbeating, so nothing can be done there.
    #[error("host {host} of agent {id} is not heartbeating; the agent cannot be reached")]
    HostGone {
        /// The agent.
        id: String,
        /// Its host.
        host: String,
    },
    /// The host answered with an error; its code is kept.
    #[error("host {host}: {}", status.message())]
    HostRefused {
        /// The host id.
        host: String,
        /// Its answer.
        status: Status,
    },
    /// Another agent holds the name.
    #[error(
        "an agent named `{name}` exists already ({owner}); delete it first or pick another name"
    )]
    NameTaken {
        /// The name.
        name: String,
        /// The agent holding it.
        owner: String,
    },
    /// A watch resume token is older than what the event stream retains: the
    /// events after it were trimmed, so resuming would miss some.
    #[error(
        "resume token {token} is too old: events before {before} were trimmed from the \
         event stream; list again and watch from now"
    )]
    EventsTrimmed {
        /// The token the watch would continue after.
        token: String,
        /// The oldest event that is still retained (or the first to come).
        before: String,
    },
    /// A spawn's request id names an agent the caller may not see.
    #[error("request_id {request_id} is already used by another caller's spawn; pick a new one")]
    RequestIdTaken {
        /// The request id.
        request_id: String,
    },
    /// The caller's token is at one of its per-token limits.
    #[error("{detail}")]
    QuotaExceeded {
        /// Which limit (the flag) and what to do.
        detail: String,
    },
    /// A request id names an agent another call is still creating.
    #[error("an earlier spawn with request_id {request_id} is still creating its agent; retry the request")]
    RequestInProgress {
        /// The request id.
        request_id: String,
    },
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        let msg = e.to_string();
        match e {
            ApiError::Validate(_) => Status::invalid_argument(msg),
            ApiError::AgentNotFound { .. } | ApiError::HostNotFound { .. } => {
                Status::not_found(msg)
            }
            ApiError::IllegalTransition { .. } | ApiError::Unenforceable { .. } => {
                Status::failed_precondition(msg)
            }
            ApiError::NameTaken { .. } | ApiError::RequestIdTaken { .. } => {
                Status::already_exists(msg)
            }
            ApiError::Forbidden { .. } => Status::permission_denied(msg),
            ApiError::NoCapacity { .. } | ApiError::QuotaExceeded { .. } => {
                Status::resource_exhausted(msg)
            }
            ApiError::EventsTrimmed { .. } => Status::out_of_range(msg),
            ApiError::Registry(r) => match r {
                RegistryError::Redis { .. } => Status::unavailable(msg),
                RegistryError::Corrupt { .. } => Status::data_loss(msg),
                RegistryError::IllegalMove { .. } | RegistryError::InvalidUrl { .. } => {
                    Status::internal(msg)
                }
            },
            ApiError::HostUnreachable { .. }
            | ApiError::HostGone { .. }
            | ApiError::RequestInProgress { .. } => Status::unavailable(msg),
            ApiError::HostRefused { status, .. } => {
                // A host's own "not found" means the agent left it: to the caller
                // that is a state problem, not a missing agent.
                let code = match status.code() {
                    Code::NotFound => Code::FailedPrecondition,
                    Code::Unknown | Code::Internal | Code::Unimplemented => Code::Unavailable,
                    c => c,
                };
                Status::new(code, msg)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        let s: Status = ApiError::AgentNotFound { id: "x".into() }.into();
        assert_eq!(s.code(), Code::NotFound);
        let s: Status = ApiError::HostRefused {
            host: "h1".into(),
            status: Status::not_found("agent x is not on this host"),
        }
        .into();
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert_eq!(s.message(), "host h1: agent x is not on this host");
        let s: Status = ApiError::NoCapacity {
            detail: "none".into(),
        }
        .into();
        assert_eq!(s.code(), Code::ResourceExhausted);
        let s: Status = ApiError::EventsTrimmed {
            token: "1-0".into(),
            before: "5-0".into(),
        }
        .into();
        assert_eq!(s.code(), Code::OutOfRange);
        assert!(s.message().contains("events before 5-0 were trimmed"));
    }
}
