//! Named contexts, as kubectl's kubeconfig has them: where a control plane
//! is and how to reach it (endpoints, CA, client certificate, token file),
//! kept in `$XDG_CONFIG_HOME/agentplane/config.toml` (default
//! `~/.config/…`, 0600 in a 0700 directory). A plain `agentctl` uses the
//! current context; `--context NAME` another; flags and `AGENTPLANE_*`
//! variables override single fields. `agentctl dev` and `scripts/dev`
//! add a context `dev`, make it current while they run, and at exit remove
//! it and make the one before current again.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::access::AccessArgs;

/// The file, as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct UserConfig {
    /// The context a plain `agentctl` uses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_context: Option<String>,
    /// Every context by name.
    #[serde(default)]
    pub contexts: BTreeMap<String, Context>,
}

/// One control plane and the way in.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Context {
    /// Its replicas, tried in order.
    pub endpoints: Vec<String>,
    /// The CA that signs its certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// A client certificate to present, with `key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// The key of `cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// The file whose first line is the bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Set by `set-context --use`: the context that was current before,
    /// made current again when this one is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_context: Option<String>,
}

/// The addresses of a comma-separated `--endpoint` (blanks dropped).
pub fn split_endpoints(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `$XDG_CONFIG_HOME/agentplane/config.toml` (default `~/.config/…`).
pub fn path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("agentplane").join("config.toml"))
}

impl UserConfig {
    /// The file, or an empty configuration when there is none.
    pub fn load() -> anyhow::Result<Self> {
        let Some(p) = path() else {
            return Ok(Self::default());
        };
        match std::fs::read_to_string(&p) {
            Ok(text) => toml::from_str(&text).with_context(|| format!("{}", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("read {}", p.display())),
        }
    }

    /// Writes it whole (0600); returns the path.
    pub fn save(&self) -> anyhow::Result<PathBuf> {
        let p = path().context("no $HOME or $XDG_CONFIG_HOME for the config file")?;
        if let Some(dir) = p.parent() {
            agentplane::pki::create_private_dir(dir)?;
        }
        // Replaced whole (write_private writes a temporary file and renames
        // it): a reader never sees half of it. Two writers at once: the last
        // one wins (no lock).
        agentplane::pki::write_private(&p, toml::to_string(self)?.as_bytes(), true)?;
        Ok(p)
    }

    /// Adds or replaces `name`; with `make_current`, makes it current and
    /// remembers which was.
    pub fn set(&mut self, name: &str, mut ctx: Context, make_current: bool) {
        if make_current {
            ctx.previous_context =
                self.current_context
                    .clone()
                    .filter(|c| c != name)
                    .or_else(|| {
                        self.contexts
                            .get(name)
                            .and_then(|c| c.previous_context.clone())
                    });
            self.current_context = Some(name.to_owned());
        }
        self.contexts.insert(name.to_owned(), ctx);
    }

    /// Removes `name` (when `only_if_endpoint` is given, only if its first
    /// endpoint is that one: a newer stack may have replaced it); if it was
    /// current, the one before it is current again. False: nothing removed.
    pub fn delete(&mut self, name: &str, only_if_endpoint: Option<&str>) -> bool {
        let Some(ctx) = self.contexts.get(name) else {
            return false;
        };
        if only_if_endpoint.is_some_and(|e| ctx.endpoints.first().map(String::as_str) != Some(e)) {
            return false;
        }
        let previous = ctx.previous_context.clone();
        self.contexts.remove(name);
        if self.current_context.as_deref() == Some(name) {
            self.current_context = previous.filter(|p| self.contexts.contains_key(p));
        }
        true
    }
}

/// The endpoints to call, with the context's CA, certificate and token
/// filling what flags and variables left unset: `--context NAME` (an
/// unknown name is an error), else the current context, else
/// `default`. An explicit `--endpoint` wins over the context's, and then
/// only a context named by `--context` fills the rest.
pub fn resolve(
    endpoint: Option<String>,
    context: Option<&str>,
    access: &mut AccessArgs,
    default: &str,
) -> anyhow::Result<String> {
    if context.is_none() {
        if let Some(e) = endpoint {
            return Ok(e);
        }
    }
    let cfg = match (UserConfig::load(), context) {
        (Ok(c), _) => c,
        (Err(e), Some(_)) => return Err(e),
        // A broken file must not stop commands that do not need it.
        (Err(e), None) => {
            eprintln!("agentctl: ignoring the config file: {e:#}");
            UserConfig::default()
        }
    };
    let chosen = match context {
        Some(name) => Some(cfg.contexts.get(name).cloned().with_context(|| {
            let known: Vec<&str> = cfg.contexts.keys().map(String::as_str).collect();
            format!(
                "--context {name}: no such context (known: {})",
                known.join(", ")
            )
        })?),
        None if endpoint.is_some() => None,
        None => cfg
            .current_context
            .as_ref()
            .and_then(|c| cfg.contexts.get(c))
            .cloned(),
    };
    let Some(ctx) = chosen else {
        return Ok(endpoint.unwrap_or_else(|| default.to_owned()));
    };
    if access.ca.is_none() {
        access.ca = ctx.ca;
    }
    if access.cert.is_none() && access.key.is_none() {
        access.cert = ctx.cert;
        access.key = ctx.key;
    }
    if access.token.is_none() && access.token_file.is_none() {
        access.token_file = ctx.token_file;
    }
    Ok(endpoint.unwrap_or_else(|| ctx.endpoints.join(",")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(e: &str) -> Context {
        Context {
            endpoints: vec![e.into()],
            ..Default::default()
        }
    }

    #[test]
    fn a_temporary_current_context_gives_the_old_one_back() {
        let mut c = UserConfig::default();
        c.set("prod", ctx("https://prod:7700"), true);
        c.set("dev", ctx("https://127.0.0.1:7700"), true);
        assert_eq!(c.current_context.as_deref(), Some("dev"));
        // Another stack's context is not removed by this one's exit.
        assert!(!c.delete("dev", Some("https://127.0.0.1:9999")));
        assert!(c.delete("dev", Some("https://127.0.0.1:7700")));
        assert_eq!(c.current_context.as_deref(), Some("prod"));
        assert!(!c.contexts.contains_key("dev"));
    }

    #[test]
    fn the_file_round_trips_with_kebab_case_keys() {
        let mut c = UserConfig::default();
        c.set(
            "a",
            Context {
                endpoints: vec!["https://a:7700".into(), "https://b:7700".into()],
                ca: Some("/x/ca.crt".into()),
                token_file: Some("/x/token".into()),
                ..Default::default()
            },
            true,
        );
        let text = toml::to_string(&c).expect("encode");
        assert!(text.contains("current-context = \"a\""), "{text}");
        assert!(text.contains("token-file = \"/x/token\""), "{text}");
        assert_eq!(toml::from_str::<UserConfig>(&text).expect("decode"), c);
    }
}
