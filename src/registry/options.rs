//! How the registry reaches Redis beyond its URL: TLS (`rediss://`) with a
//! CA and an optional client certificate, and a password read from a file.
//! Read and checked once at start, so `--check-config` sees what start does.

use std::path::{Path, PathBuf};

/// The Redis flags both servers take (flattened into each config).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RedisTlsArgs {
    /// PEM CA that signs the Redis server's certificate, for `rediss://`
    /// URLs (default: the system's CA roots).
    #[arg(long, env = "AGENTPLANE_REDIS_CA")]
    pub redis_ca: Option<PathBuf>,

    /// PEM client certificate for Redis (with `--redis-key`), when Redis
    /// requires one (`tls-auth-clients yes`).
    #[arg(long, env = "AGENTPLANE_REDIS_CERT")]
    pub redis_cert: Option<PathBuf>,

    /// PEM private key of `--redis-cert`.
    #[arg(long, env = "AGENTPLANE_REDIS_KEY")]
    pub redis_key: Option<PathBuf>,

    /// File whose first line is the Redis password (AUTH), so that it is in
    /// neither the URL nor the process list.
    #[arg(long, env = "AGENTPLANE_REDIS_PASSWORD_FILE")]
    pub redis_password_file: Option<PathBuf>,

    /// Redis Sentinel addresses (`host:port`, comma-separated): the master
    /// of `--redis-master-name` is asked of them and followed through a
    /// failover. `--redis-url` then gives only the scheme, password and
    /// database; its address is not used.
    #[arg(
        long,
        env = "AGENTPLANE_REDIS_SENTINEL",
        value_delimiter = ',',
        requires = "redis_master_name"
    )]
    pub redis_sentinel: Vec<String>,

    /// The name the sentinels monitor the master under (`sentinel monitor
    /// NAME …` in sentinel.conf).
    #[arg(
        long,
        env = "AGENTPLANE_REDIS_MASTER_NAME",
        requires = "redis_sentinel"
    )]
    pub redis_master_name: Option<String>,

    /// Redis Cluster nodes (`host:port`, comma-separated; any few of the
    /// cluster's nodes: the rest are found from them). Keys then use the
    /// Cluster layout (hash-tagged shards). `--redis-url` gives only the
    /// scheme and password; its address is not used.
    #[arg(
        long,
        env = "AGENTPLANE_REDIS_CLUSTER",
        value_delimiter = ',',
        conflicts_with = "redis_sentinel"
    )]
    pub redis_cluster: Vec<String>,

    /// With Sentinel: how long a write that fencing depends on (a new
    /// generation, a move to another host, a lease) waits for one replica
    /// to acknowledge it (`WAIT 1`); `0s` does not wait.
    #[arg(long, env = "AGENTPLANE_REDIS_REPLICA_ACK", default_value = "100ms",
        value_parser = crate::config::parse_duration)]
    pub redis_replica_ack: std::time::Duration,
}

/// What the flags name, read.
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    /// CA certificate(s), PEM.
    pub ca: Option<Vec<u8>>,
    /// Client certificate and key, PEM.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The password.
    pub password: Option<String>,
    /// Where Sentinel names the master, with `--redis-sentinel`.
    pub sentinel: Option<super::SentinelTarget>,
    /// How long a fencing write waits for a replica (with Sentinel).
    pub replica_ack: std::time::Duration,
    /// Redis Cluster nodes (`host:port`), with `--redis-cluster`.
    pub cluster: Vec<String>,
}

impl std::fmt::Display for RedisOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ca: {}, client certificate: {}, password: {}",
            self.ca.is_some(),
            self.identity.is_some(),
            self.password.is_some()
        )?;
        if let Some(s) = &self.sentinel {
            write!(
                f,
                ", sentinels: {} (master {}), replica ack: {:?}",
                s.sentinels.join(","),
                s.master_name,
                self.replica_ack
            )?;
        }
        if !self.cluster.is_empty() {
            write!(f, ", cluster nodes: {}", self.cluster.join(","))?;
        }
        Ok(())
    }
}

/// Checks `host:port` addresses given to `flag`.
fn host_ports(flag: &str, addrs: &[String]) -> Result<(), String> {
    for addr in addrs {
        let port = addr.rsplit_once(':').map(|(_, p)| p.parse::<u16>());
        if !matches!(port, Some(Ok(p)) if p > 0) {
            return Err(format!("{flag}: `{addr}` is not host:port"));
        }
    }
    Ok(())
}

impl RedisTlsArgs {
    /// Reads the files; the message names the flag to fix. TLS files need
    /// a `rediss://` URL (they would be silently unused otherwise).
    pub fn load(&self, url: &str) -> Result<RedisOptions, String> {
        let tls_url = url.starts_with("rediss://") || url.starts_with("valkeys://");
        let read = |flag: &str, p: &Path| {
            std::fs::read(p).map_err(|e| format!("{flag}: cannot read {}: {e}", p.display()))
        };
        if !tls_url && (self.redis_ca.is_some() || self.redis_cert.is_some()) {
            return Err(
                "--redis-ca/--redis-cert: need a rediss:// --redis-url (TLS to Redis)".into(),
            );
        }
        let ca = self
            .redis_ca
            .as_deref()
            .map(|p| read("--redis-ca", p))
            .transpose()?;
        let identity = match (&self.redis_cert, &self.redis_key) {
            (Some(c), Some(k)) => Some((read("--redis-cert", c)?, read("--redis-key", k)?)),
            (None, None) => None,
            (Some(_), None) => return Err("--redis-key: required with --redis-cert".into()),
            (None, Some(_)) => return Err("--redis-cert: required with --redis-key".into()),
        };
        let password = match &self.redis_password_file {
            Some(p) => {
                let text = String::from_utf8(read("--redis-password-file", p)?)
                    .map_err(|_| format!("--redis-password-file: {} is not UTF-8", p.display()))?;
                let pw = text.lines().next().unwrap_or_default().trim().to_owned();
                if pw.is_empty() {
                    return Err(format!(
                        "--redis-password-file: {} holds no password",
                        p.display()
                    ));
                }
                Some(pw)
            }
            None => None,
        };
        let sentinel = match &self.redis_master_name {
            None => None,
            Some(name) => {
                if name.trim().is_empty() {
                    return Err("--redis-master-name: is empty".into());
                }
                host_ports("--redis-sentinel", &self.redis_sentinel)?;
                if self.redis_sentinel.is_empty() {
                    return Err("--redis-sentinel: at least one sentinel address".into());
                }
                Some(super::SentinelTarget {
                    sentinels: self.redis_sentinel.clone(),
                    master_name: name.clone(),
                })
            }
        };
        host_ports("--redis-cluster", &self.redis_cluster)?;
        Ok(RedisOptions {
            ca,
            identity,
            password,
            sentinel,
            replica_ack: self.redis_replica_ack,
            cluster: self.redis_cluster.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_files_need_a_rediss_url_and_files_must_exist() {
        let args = RedisTlsArgs {
            redis_ca: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        assert!(args
            .load("redis://127.0.0.1:6379")
            .unwrap_err()
            .contains("rediss://"));
        assert!(args
            .load("rediss://127.0.0.1:6379")
            .unwrap_err()
            .contains("cannot read"));
        let half = RedisTlsArgs {
            redis_cert: Some("/x".into()),
            ..Default::default()
        };
        assert!(half
            .load("rediss://h:1")
            .unwrap_err()
            .contains("--redis-key"));
        assert!(RedisTlsArgs::default().load("redis://h:1").is_ok());
    }

    #[test]
    fn sentinel_addresses_are_host_port_and_name_the_master() {
        let args = |sentinels: &[&str], name: &str| RedisTlsArgs {
            redis_sentinel: sentinels.iter().map(|s| (*s).to_owned()).collect(),
            redis_master_name: Some(name.to_owned()),
            redis_replica_ack: std::time::Duration::from_millis(100),
            ..Default::default()
        };
        let o = args(&["10.0.0.1:26379", "s2:26379"], "main")
            .load("redis://h:1")
            .unwrap();
        let target = o.sentinel.clone().expect("sentinel");
        assert_eq!(target.sentinels, ["10.0.0.1:26379", "s2:26379"]);
        assert_eq!(target.master_name, "main");
        assert!(o
            .to_string()
            .contains("sentinels: 10.0.0.1:26379,s2:26379 (master main)"));
        assert!(args(&["nohost"], "m")
            .load("redis://h:1")
            .unwrap_err()
            .contains("--redis-sentinel: `nohost` is not host:port"));
        assert!(args(&["h:0"], "m").load("redis://h:1").is_err());
        assert!(args(&["h:1"], " ")
            .load("redis://h:1")
            .unwrap_err()
            .contains("--redis-master-name"));
        assert!(RedisTlsArgs::default()
            .load("redis://h:1")
            .unwrap()
            .sentinel
            .is_none());
    }

    #[test]
    fn the_password_is_the_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "s3cret\n# comment\n").unwrap();
        let args = RedisTlsArgs {
            redis_password_file: Some(f.clone()),
            ..Default::default()
        };
        assert_eq!(
            args.load("redis://h:1").unwrap().password.as_deref(),
            Some("s3cret")
        );
        std::fs::write(&f, "\n").unwrap();
        assert!(args
            .load("redis://h:1")
            .unwrap_err()
            .contains("no password"));
    }
}
