//! The host agent's one mapping from errors to gRPC statuses, at the
//! service edge: the supervisor and the registry never build a `Status`.

use agentplane::registry::RegistryError;
use tonic::Status;

use crate::supervisor::SupervisorError;

impl From<SupervisorError> for Status {
    fn from(e: SupervisorError) -> Self {
        let msg = e.to_string();
        match e {
            SupervisorError::Validate(_) => Status::invalid_argument(msg),
            SupervisorError::AtCapacity { .. } | SupervisorError::TooManyStreams { .. } => {
                Status::resource_exhausted(msg)
            }
            SupervisorError::AlreadyExists { .. } => Status::already_exists(msg),
            SupervisorError::IdentityRefused { .. } => Status::permission_denied(msg),
            SupervisorError::ResourcesRefused { .. } => Status::failed_precondition(msg),
            SupervisorError::Cgroup { .. } => Status::internal(msg),
            SupervisorError::NotFound { .. } => Status::not_found(msg),
            SupervisorError::IllegalTransition { .. } | SupervisorError::Fenced { .. } => {
                Status::failed_precondition(msg)
            }
            SupervisorError::Registry(r) => registry_status(&r),
            SupervisorError::Timeout { .. } => Status::deadline_exceeded(msg),
            SupervisorError::Signal { .. } => Status::internal(msg),
            SupervisorError::ShuttingDown | SupervisorError::Output { .. } => {
                Status::unavailable(msg)
            }
            SupervisorError::Input { .. } => Status::failed_precondition(msg),
        }
    }
}

/// A registry failure as the caller should see it: Redis down is
/// UNAVAILABLE (retry), a corrupt record DATA_LOSS, anything else INTERNAL.
fn registry_status(e: &RegistryError) -> Status {
    let msg = e.to_string();
    match e {
        RegistryError::Redis { .. } => Status::unavailable(msg),
        RegistryError::Corrupt { .. } => Status::data_loss(msg),
        RegistryError::IllegalMove { .. } | RegistryError::InvalidUrl { .. } => {
            Status::internal(msg)
        }
    }
}
