//! The control plane's side of bearer tokens: reloading `--token-file` on
//! SIGHUP (a bad file keeps the old tokens in force, and says why), and the
//! per-agent rules the method table cannot express: an operator's selector
//! (agents outside it do not exist for it), who may set uid/gid, and env
//! redaction for viewers.

use std::path::PathBuf;
use std::sync::Arc;

use agentplane::auth::{redact_env, Principal, Role, TokenTable};
use agentplane::proto::v1::{Agent, AgentSpec};
use agentplane::server::Tokens;
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;

/// Reloads the token file on every SIGHUP until `cancel`.
pub async fn reload_on_sighup(tokens: Tokens, path: PathBuf, cancel: CancellationToken) {
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP; the token file will not be reloaded");
            return;
        }
    };
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            got = hup.recv() => if got.is_none() { return },
        }
        match TokenTable::load(&path) {
            Ok(table) => {
                let n = table.len();
                *tokens
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(table);
                tracing::info!(path = %path.display(), tokens = n, "token file reloaded");
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "token file not reloaded; the previous tokens stay in force");
            }
        }
    }
}

/// The caller of one request: `None` is unrestricted (tokens off, or a
/// method that needs none).
#[derive(Debug, Clone, Default)]
pub struct Caller(pub Option<Principal>);

impl Caller {
    /// The caller recorded by the gate in `req`'s extensions.
    pub fn of<T>(req: &tonic::Request<T>) -> Self {
        Self(req.extensions().get::<Principal>().cloned())
    }

    /// Whether `agent` exists for this caller (inside its selector).
    pub fn sees(&self, agent: &Agent) -> bool {
        match self.0.as_ref().and_then(|p| p.selector.as_ref()) {
            None => true,
            Some(sel) => agent.spec.as_ref().is_some_and(|s| sel.matches(&s.labels)),
        }
    }

    /// Whether this caller is limited to a selector (lookups must check).
    pub fn restricted(&self) -> bool {
        self.0.as_ref().is_some_and(|p| p.selector.is_some())
    }

    /// Refuses a spawn this caller may not make: labels outside its
    /// selector, or a uid/gid from anyone but an admin.
    pub fn may_spawn(&self, spec: &AgentSpec) -> Result<(), ApiError> {
        let Some(p) = &self.0 else { return Ok(()) };
        if let Some(sel) = &p.selector {
            if !sel.matches(&spec.labels) {
                return Err(ApiError::Forbidden {
                    detail: format!(
                        "token {} may only spawn agents whose labels match its selector {sel}",
                        p.name
                    ),
                });
            }
        }
        if (spec.uid.is_some() || spec.gid.is_some()) && p.role < Role::Admin {
            return Err(ApiError::Forbidden {
                detail: format!(
                    "only an admin may choose an agent's uid or gid (token {} is {})",
                    p.name, p.role
                ),
            });
        }
        Ok(())
    }

    /// `agent` as this caller may see it (env values hidden from viewers).
    pub fn shown(&self, mut agent: Agent) -> Agent {
        if self.0.as_ref().is_some_and(Principal::redacts_env) {
            if let Some(spec) = agent.spec.as_mut() {
                redact_env(spec);
            }
        }
        agent
    }
}
