//! Control-plane configuration: flags with `AGENTPLANE_*` environment
//! fallbacks, parsed and validated before anything starts.

use std::net::SocketAddr;
use std::time::Duration;

use agentplane::config::parse_duration;
use clap::Parser;

/// The stateless agentplane control plane.
#[derive(Debug, Clone, Parser)]
#[command(name = "control-plane", version = agentplane::VERSION)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(long, env = "AGENTPLANE_LISTEN", default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,

    /// Redis URL of the registry.
    #[arg(
        long,
        env = "AGENTPLANE_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,

    /// TLS and the password for Redis.
    #[command(flatten)]
    pub redis_tls: agentplane::registry::RedisTlsArgs,

    /// Prefix of every Redis key.
    #[arg(long, env = "AGENTPLANE_REDIS_PREFIX", default_value = agentplane::registry::DEFAULT_PREFIX)]
    pub redis_prefix: String,

    /// Deadline of a call to a host agent (stops add the agent's grace to it).
    #[arg(long, env = "AGENTPLANE_HOST_CALL_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub host_call_timeout: Duration,

    /// How often the reconciler looks for lost hosts and reschedules their agents.
    #[arg(long, env = "AGENTPLANE_RECONCILE_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub reconcile_interval: Duration,

    /// How long shutdown waits for in-flight requests.
    #[arg(long, env = "AGENTPLANE_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// TLS: this server's certificate and key (also shown to host agents
    /// as the client certificate, SAN `control-plane.agentplane`) and the CA
    /// that signs host agents' (and clients') certificates.
    #[command(flatten)]
    pub serve: agentplane::server::ServeArgs,

    /// Bearer tokens and their roles (TOML: `[[token]]` with name, sha256,
    /// role, optional selector; mode 0600), reloaded on SIGHUP. Required
    /// with TLS; under --insecure, without it anyone may call.
    #[arg(long, env = "AGENTPLANE_TOKEN_FILE")]
    pub token_file: Option<std::path::PathBuf>,

    /// Per-token limits on streams and the spawn rate.
    #[command(flatten)]
    pub quotas: crate::quota::QuotaArgs,

    /// Log one JSON object per line instead of text.
    #[arg(long, env = "AGENTPLANE_LOG_JSON")]
    pub log_json: bool,

    /// Only check the configuration: exit 0 when it is valid, 64 (saying
    /// why) when not, without binding or connecting to anything.
    #[arg(long, env = "AGENTPLANE_CHECK_CONFIG")]
    pub check_config: bool,
}

impl agentplane::server::StartupConfig for Config {
    fn check(&self) -> Result<(), String> {
        self.validate()
    }

    fn check_only(&self) -> bool {
        self.check_config
    }
}

impl Config {
    /// Checks what clap's types cannot; the message names the flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.redis_prefix.is_empty() || self.redis_prefix.contains(char::is_whitespace) {
            return Err("--redis-prefix: must be non-empty without spaces".into());
        }
        if !(self.redis_url.starts_with("redis://")
            || self.redis_url.starts_with("rediss://")
            || self.redis_url.starts_with("unix://"))
        {
            return Err(format!(
                "--redis-url: `{}` must start with redis://",
                agentplane::registry::redact_url(&self.redis_url)
            ));
        }
        let transport = self.transport()?;
        match (&self.token_file, transport) {
            (Some(_), _) => {
                self.tokens()?;
            }
            (None, agentplane::server::Transport::Tls(_)) => {
                return Err(
                    "--token-file: required with TLS (who may call, with which role); \
                            only --insecure runs without tokens"
                        .into(),
                )
            }
            (None, agentplane::server::Transport::Insecure) => {}
        }
        let options = self.redis_tls.load(&self.redis_url)?;
        agentplane::registry::Registry::check(&self.redis_url, &options)
            .map_err(|e| format!("--redis-url: {e}"))?;
        if self.reconcile_interval < Duration::from_millis(50) {
            return Err("--reconcile-interval: must be at least 50ms".into());
        }
        if self.host_call_timeout < Duration::from_millis(100) {
            return Err("--host-call-timeout: must be at least 100ms".into());
        }
        self.quotas.validate()
    }
}

impl Config {
    /// The registry the flags describe (files read; no connection yet).
    pub fn registry(&self) -> Result<agentplane::registry::Registry, String> {
        let options = self.redis_tls.load(&self.redis_url)?;
        agentplane::registry::Registry::connect(&self.redis_url, &self.redis_prefix, &options)
            .map_err(|e| format!("--redis-url: {e}"))
    }

    /// The token table of `--token-file`, if given, read and checked.
    pub fn tokens(&self) -> Result<Option<agentplane::auth::TokenTable>, String> {
        self.token_file
            .as_deref()
            .map(agentplane::auth::TokenTable::load)
            .transpose()
            .map_err(|e| format!("--token-file: {e}"))
    }

    /// The transport the flags ask for, its files read and checked.
    pub fn transport(&self) -> Result<agentplane::server::Transport, String> {
        self.serve.load(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_bad_values_name_the_flag() {
        let c = Config::try_parse_from(["control-plane", "--insecure"]).unwrap();
        assert!(c.validate().is_ok());
        let e = Config::try_parse_from(["control-plane"])
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.contains("--tls-cert") && e.contains("--insecure"), "{e}");
        let c = Config::try_parse_from(["control-plane", "--insecure", "--redis-url", "http://x"])
            .unwrap();
        assert!(c.validate().unwrap_err().contains("--redis-url"));
        assert!(Config::try_parse_from(["control-plane", "--host-call-timeout", "5"]).is_err());
    }
}
