//! Host-agent configuration: flags with `AGENTPLANE_*` environment fallbacks,
//! parsed and validated before anything starts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use agentplane::config::{parse_duration, parse_key_value};
use agentplane::server::{RequirePeerName, Transport};
use agentplane::validate;
use clap::Parser;

/// Runs agents as supervised subprocesses on this machine.
#[derive(Debug, Clone, Parser)]
#[command(name = "host-agent", version = agentplane::VERSION)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(long, env = "AGENTPLANE_LISTEN", default_value = "127.0.0.1:7701")]
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

    /// This host's id, unique in the cluster (letters, digits, `.`, `_`, `-`).
    #[arg(long, env = "AGENTPLANE_HOST_ID")]
    pub host_id: String,

    /// Address the control plane dials to reach this host agent (host:port).
    /// Default: the listen address (which then must not be 0.0.0.0).
    #[arg(long, env = "AGENTPLANE_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,

    /// A label of this host, KEY=VALUE; repeat for more.
    #[arg(long = "label", env = "AGENTPLANE_LABELS", value_delimiter = ',', value_parser = parse_key_value)]
    pub labels: Vec<(String, String)>,

    /// The most agents this host runs at once.
    #[arg(long, env = "AGENTPLANE_MAX_AGENTS", default_value_t = 100)]
    pub max_agents: u32,

    /// The most output streams (log followers and attach sessions) this host
    /// serves at once; more are refused with RESOURCE_EXHAUSTED. At most 4000.
    #[arg(long, env = "AGENTPLANE_MAX_LOG_STREAMS", default_value_t = 1024)]
    pub max_log_streams: u32,

    /// TTL of the host's and its agents' liveness keys; refreshed every TTL/3.
    #[arg(long, env = "AGENTPLANE_HEARTBEAT_TTL", default_value = "10s", value_parser = parse_duration)]
    pub heartbeat_ttl: Duration,

    /// Directory for agents' output files (one subdirectory per agent).
    #[arg(
        long,
        env = "AGENTPLANE_DATA_DIR",
        default_value = "/var/lib/agentplane"
    )]
    pub data_dir: std::path::PathBuf,

    /// How long shutdown waits for agents to stop and tasks to finish.
    #[arg(long, env = "AGENTPLANE_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// TLS: this server's certificate and key, the CA of its callers.
    #[command(flatten)]
    pub serve: agentplane::server::ServeArgs,

    /// With TLS, the only name (certificate SAN) a caller may have: the
    /// control plane's. A host agent's own certificate is refused.
    #[arg(long, env = "AGENTPLANE_ALLOWED_CLIENT_NAME", default_value = agentplane::server::tls::CONTROL_PLANE_NAME)]
    pub allowed_client_name: String,

    /// Let agents run as root: a spec with uid 0, or with no uid while this
    /// host agent runs as root. Off, such a start is refused.
    #[arg(long, env = "AGENTPLANE_ALLOW_ROOT_AGENTS")]
    pub allow_root_agents: bool,

    /// The only uids agents may run as, e.g. `1000-1999,65534` (default: any
    /// but root).
    #[arg(long, env = "AGENTPLANE_ALLOWED_UIDS", value_parser = crate::identity::parse_uid_ranges)]
    pub allowed_uids: Option<crate::identity::UidRanges>,

    /// At exit (SIGTERM), leave the agents running in the keeper for the
    /// next host agent to adopt, an upgrade included (the default).
    #[arg(
        long,
        env = "AGENTPLANE_KEEP_AGENTS_ON_EXIT",
        overrides_with = "stop_agents_on_exit"
    )]
    pub keep_agents_on_exit: bool,

    /// At exit (SIGTERM), stop every agent, each with its grace (bounded by
    /// --shutdown-timeout), as a machine going down wants.
    #[arg(
        long,
        env = "AGENTPLANE_STOP_AGENTS_ON_EXIT",
        overrides_with = "keep_agents_on_exit"
    )]
    pub stop_agents_on_exit: bool,

    /// How long the keeper keeps agents running with no host agent
    /// attached before it ends them (default 10m, at most 24h). Meanwhile
    /// the keeper tells Redis the machine is alive, so the control plane
    /// shows the host as restarting and leaves its agents be; a keeper that
    /// cannot reach Redis ends them sooner, before the host is seen lost.
    #[arg(long, env = "AGENTPLANE_ORPHAN_GRACE", value_parser = parse_duration)]
    pub orphan_grace: Option<Duration>,

    /// Which cgroups agents get, one each: `auto` (v1 where a freezer
    /// hierarchy is writable, else v2, else none), `v1`, `v2` (fail to start
    /// without it), or `off` (pause by SIGSTOP, escaped processes found by
    /// ancestry and an environment marker, no `spec.resources` limits).
    #[arg(long, env = "AGENTPLANE_CGROUPS", value_enum, default_value_t = crate::cgroup::Setting::Auto)]
    pub cgroups: crate::cgroup::Setting,

    /// Where agents' cgroups go, in each hierarchy: relative to the host
    /// agent's own cgroup, or from the hierarchy's root when it starts with
    /// `/`. Each host's runs are under PARENT/HOST-ID.
    #[arg(long, env = "AGENTPLANE_CGROUP_PARENT", default_value = "agentplane")]
    pub cgroup_parent: String,

    /// Log one JSON object per line instead of text.
    #[arg(long, env = "AGENTPLANE_LOG_JSON")]
    pub log_json: bool,

    /// Only check the configuration: exit 0 when it is valid, 64 (saying
    /// why) when not, without binding or connecting to anything.
    #[arg(long, env = "AGENTPLANE_CHECK_CONFIG")]
    pub check_config: bool,
}

/// `--orphan-grace` unless given.
pub const DEFAULT_ORPHAN_GRACE: Duration = Duration::from_secs(600);
/// The longest `--orphan-grace`.
pub const MAX_ORPHAN_GRACE: Duration = Duration::from_secs(24 * 3600);

impl agentplane::server::StartupConfig for Config {
    fn check(&self) -> Result<(), String> {
        self.validate()
    }

    fn check_only(&self) -> bool {
        self.check_config
    }
}

impl Config {
    /// `--orphan-grace`, its default resolved.
    pub fn orphan_grace(&self) -> Duration {
        self.orphan_grace.unwrap_or(DEFAULT_ORPHAN_GRACE)
    }

    /// Checks what clap's types cannot; the message names the flag.
    pub fn validate(&self) -> Result<(), String> {
        validate::host_id("--host-id", &self.host_id).map_err(|e| e.to_string())?;
        for (k, v) in &self.labels {
            validate::label_key("--label", k).map_err(|e| e.to_string())?;
            validate::label_value("--label", v).map_err(|e| e.to_string())?;
        }
        if self.max_agents == 0 {
            return Err("--max-agents: must be at least 1".into());
        }
        if !(1..=validate::MAX_LOG_STREAMS_PER_HOST).contains(&self.max_log_streams) {
            return Err(format!(
                "--max-log-streams: {} is not from 1 to {}",
                self.max_log_streams,
                validate::MAX_LOG_STREAMS_PER_HOST
            ));
        }
        if self.heartbeat_ttl < Duration::from_millis(300) {
            return Err("--heartbeat-ttl: must be at least 300ms".into());
        }
        if self.orphan_grace() > MAX_ORPHAN_GRACE {
            return Err(format!(
                "--orphan-grace: at most {MAX_ORPHAN_GRACE:?}: agents without a host agent for longer are ended"
            ));
        }
        // One leading `/` at most: `//x` would be an empty part.
        let parent = self
            .cgroup_parent
            .strip_prefix('/')
            .unwrap_or(&self.cgroup_parent);
        if parent.is_empty()
            || parent
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == ".." || p.contains(char::is_whitespace))
        {
            return Err(format!(
                "--cgroup-parent: `{}` must be a path of names (no `.`, `..`, spaces or empty parts)",
                self.cgroup_parent
            ));
        }
        if self.redis_prefix.is_empty() || self.redis_prefix.contains(char::is_whitespace) {
            return Err("--redis-prefix: must be non-empty without spaces".into());
        }
        redis_url_ok(&self.redis_url)?;
        let options = self.redis_tls.load(&self.redis_url)?;
        agentplane::registry::Registry::check(&self.redis_url, &options)
            .map_err(|e| format!("--redis-url: {e}"))?;
        if !self.data_dir.is_absolute() {
            return Err(format!(
                "--data-dir: `{}` must be an absolute path",
                self.data_dir.display()
            ));
        }
        let transport = self.transport()?;
        self.allowed_peer()?;
        if matches!(transport, Transport::Tls(_))
            && !agentplane::server::tls::host_id_is_dns(&self.host_id)
        {
            return Err(format!(
                "--host-id: `{}` cannot be a DNS name (`{}`), which TLS needs: use letters, digits, \
                 `-` and `.`, at most 63 between dots",
                self.host_id,
                agentplane::server::tls::host_name(&self.host_id)
            ));
        }
        if let Some(a) = &self.advertise_addr {
            if !a.contains(':') {
                return Err(format!("--advertise-addr: `{a}` is not host:port"));
            }
        } else if self.listen.ip().is_unspecified() {
            return Err("--advertise-addr: required when --listen is a wildcard address".into());
        }
        Ok(())
    }

    /// What the keeper needs to renew its key: the Redis settings (files
    /// read) and the timings.
    pub fn keeper_liveness(&self) -> Result<crate::keeper::proto::Liveness, String> {
        let options = self.redis_tls.load(&self.redis_url)?;
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let (cert, key) = options.identity.unzip();
        Ok(crate::keeper::proto::Liveness {
            redis_url: self.redis_url.clone(),
            prefix: self.redis_prefix.clone(),
            host: self.host_id.clone(),
            ttl_ms: ms(self.heartbeat_ttl),
            orphan_grace_ms: ms(self.orphan_grace()),
            ca: options.ca,
            cert,
            key,
            password: options.password,
            sentinels: options
                .sentinel
                .as_ref()
                .map(|s| s.sentinels.clone())
                .unwrap_or_default(),
            master_name: options.sentinel.map(|s| s.master_name).unwrap_or_default(),
            cluster: options.cluster,
        })
    }

    /// The registry the flags describe (files read; no connection yet).
    pub fn registry(&self) -> Result<agentplane::registry::Registry, String> {
        let options = self.redis_tls.load(&self.redis_url)?;
        agentplane::registry::Registry::connect(&self.redis_url, &self.redis_prefix, &options)
            .map_err(|e| format!("--redis-url: {e}"))
    }

    /// The transport the flags ask for, its files read and checked.
    pub fn transport(&self) -> Result<Transport, String> {
        self.serve.load(true)
    }

    /// With TLS, the layer that admits only `--allowed-client-name`.
    pub fn allowed_peer(&self) -> Result<RequirePeerName, String> {
        RequirePeerName::new(&self.allowed_client_name)
            .map_err(|e| format!("--allowed-client-name: {e}"))
    }

    /// The labels as a map.
    pub fn label_map(&self) -> HashMap<String, String> {
        self.labels.iter().cloned().collect()
    }
}

/// Checks the scheme of a Redis URL.
fn redis_url_ok(url: &str) -> Result<(), String> {
    if url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("unix://") {
        Ok(())
    } else {
        Err(format!(
            "--redis-url: `{}` must start with redis://",
            agentplane::registry::redact_url(url)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        Config::try_parse_from(
            ["host-agent", "--insecure"]
                .into_iter()
                .chain(args.iter().copied()),
        )
        .unwrap()
    }

    #[test]
    fn defaults_validate() {
        let c = parse(&["--host-id", "h1"]);
        assert_eq!(c.heartbeat_ttl, Duration::from_secs(10));
        assert!(c.validate().is_ok());
    }

    #[test]
    fn the_orphan_grace_defaults_to_ten_minutes_and_stays_under_a_day() {
        let c = parse(&["--host-id", "h1"]);
        assert_eq!(c.orphan_grace(), Duration::from_secs(600));
        assert!(!c.stop_agents_on_exit, "agents are kept by default");
        let c = parse(&["--host-id", "h1", "--orphan-grace", "24h"]);
        assert!(c.validate().is_ok());
        let c = parse(&["--host-id", "h1", "--orphan-grace", "25h"]);
        let e = c.validate().unwrap_err();
        assert!(e.starts_with("--orphan-grace"), "{e}");
        let c = parse(&[
            "--host-id",
            "h1",
            "--stop-agents-on-exit",
            "--keep-agents-on-exit",
        ]);
        assert!(!c.stop_agents_on_exit, "the last one wins");
    }

    #[test]
    fn tls_or_insecure_is_required_and_tls_needs_a_dns_host_id() {
        let c = Config::try_parse_from(["host-agent", "--host-id", "h1"]).unwrap();
        let e = c.validate().unwrap_err();
        assert!(e.contains("--tls-cert") && e.contains("--insecure"), "{e}");
        let c = parse(&["--host-id", "h1", "--allowed-client-name", "not a name"]);
        assert!(c.validate().unwrap_err().contains("--allowed-client-name"));
    }

    #[test]
    fn a_cgroup_parent_stays_inside_its_hierarchy() {
        for ok in ["agentplane", "/agentplane", "a/b"] {
            assert!(
                parse(&["--host-id", "h1", "--cgroup-parent", ok])
                    .validate()
                    .is_ok(),
                "{ok}"
            );
        }
        for bad in ["//x", "", "/", "a/../b", "a//b", "./a"] {
            let e = parse(&["--host-id", "h1", "--cgroup-parent", bad])
                .validate()
                .unwrap_err();
            assert!(e.starts_with("--cgroup-parent"), "{bad}: {e}");
        }
        assert!(parse(&["--host-id", ".."])
            .validate()
            .unwrap_err()
            .contains("--host-id"));
    }

    #[test]
    fn bad_values_name_the_flag() {
        assert!(parse(&["--host-id", "h 1"])
            .validate()
            .unwrap_err()
            .contains("--host-id"));
        assert!(parse(&["--host-id", "h", "--max-agents", "0"])
            .validate()
            .unwrap_err()
            .contains("--max-agents"));
        for n in ["0", "4001"] {
            assert!(parse(&["--host-id", "h", "--max-log-streams", n])
                .validate()
                .unwrap_err()
                .contains("--max-log-streams"));
        }
        assert!(parse(&["--host-id", "h", "--listen", "0.0.0.0:1"])
            .validate()
            .unwrap_err()
            .contains("--advertise-addr"));
        assert!(Config::try_parse_from([
            "host-agent",
            "--insecure",
            "--host-id",
            "h",
            "--label",
            "novalue"
        ])
        .is_err());
        assert!(
            Config::try_parse_from(["host-agent", "--host-id", "h", "--heartbeat-ttl", "10"])
                .is_err()
        );
    }
}
