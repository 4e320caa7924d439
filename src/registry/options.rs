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
}

impl std::fmt::Display for RedisOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ca: {}, client certificate: {}, password: {}",
            self.ca.is_some(),
            self.identity.is_some(),
            self.password.is_some()
        )
    }
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
        Ok(RedisOptions {
            ca,
            identity,
            password,
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
