//! Shell completion of agent names and ids and host ids from the live
//! cluster (clap_complete's dynamic completion: `source <(COMPLETE=bash
//! agentctl)`). The cluster is the one a plain agentctl would call (the
//! `AGENTPLANE_*` variables, else the current context); a completion that
//! cannot reach it within two seconds offers nothing rather than hang the
//! shell.

use std::ffi::OsStr;
use std::time::Duration;

use agentplane::proto::v1::ListAgentsRequest;
use clap_complete::CompletionCandidate;

use crate::access::{Access, AccessArgs};
use crate::client::{self, Clients};

/// The longest a completion waits for the cluster.
const LIMIT: Duration = Duration::from_secs(2);

/// Agent names (and ids, for agents without one) starting with `current`.
pub fn agents(current: &OsStr) -> Vec<CompletionCandidate> {
    let prefix = current.to_string_lossy().into_owned();
    ask(move |mut c| async move {
        let agents = crate::commands::list_all(&mut c, ListAgentsRequest::default()).await?;
        Ok(agents
            .into_iter()
            .map(|a| {
                let help = format!("{} on {}", agentplane::state::name(a.state()), a.host);
                (crate::output::name_or_id(&a), help)
            })
            .filter(|(n, _)| n.starts_with(&prefix))
            .map(|(n, help)| CompletionCandidate::new(n).help(Some(help.into())))
            .collect())
    })
}

/// Host ids starting with `current`.
pub fn hosts(current: &OsStr) -> Vec<CompletionCandidate> {
    let prefix = current.to_string_lossy().into_owned();
    ask(move |mut c| async move {
        Ok(crate::commands::list_hosts(&mut c)
            .await?
            .into_iter()
            .filter(|h| h.id.starts_with(&prefix))
            .map(|h| {
                let load = format!("{}/{} agents", h.running, h.capacity);
                CompletionCandidate::new(h.id).help(Some(load.into()))
            })
            .collect())
    })
}

/// Runs `f` against the cluster on a runtime of its own; nothing on any
/// failure or past [`LIMIT`].
fn ask<F, Fut>(f: F) -> Vec<CompletionCandidate>
where
    F: FnOnce(Clients) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Vec<CompletionCandidate>>>,
{
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return Vec::new();
    };
    let found = rt.block_on(async {
        let mut args = AccessArgs {
            ca: env("AGENTPLANE_CA").map(Into::into),
            cert: env("AGENTPLANE_CERT").map(Into::into),
            key: env("AGENTPLANE_KEY").map(Into::into),
            tls_server_name: env("AGENTPLANE_TLS_SERVER_NAME"),
            token: env("AGENTPLANE_TOKEN"),
            token_file: env("AGENTPLANE_TOKEN_FILE").map(Into::into),
        };
        let asked = async {
            let endpoints = crate::contexts::resolve(
                env("AGENTPLANE_ENDPOINT"),
                env("AGENTPLANE_CONTEXT").as_deref(),
                &mut args,
                crate::DEFAULT_ENDPOINT,
            )?;
            let first = endpoints.split(',').next().unwrap_or_default().to_owned();
            let access = Access::load(&args, LIMIT)?;
            f(client::connect(&first, &access)?).await
        };
        match tokio::time::timeout(LIMIT, asked).await {
            Ok(Ok(c)) => c,
            _ => Vec::new(),
        }
    });
    // A DNS lookup still blocking must not hold the shell past the limit.
    rt.shutdown_background();
    found
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}
