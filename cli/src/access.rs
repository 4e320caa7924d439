//! How agentctl reaches a control plane: TLS material and the bearer token,
//! read and checked once from the flags, then applied to every channel. A
//! token never goes over plaintext except to a loopback address.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// The connection flags, global to every command.
#[derive(Debug, Clone, clap::Args)]
pub struct AccessArgs {
    /// CA certificate (PEM) that signs the control plane's certificate;
    /// needed for `https://` endpoints.
    #[arg(long, global = true, env = "AGENTPLANE_CA")]
    pub ca: Option<PathBuf>,

    /// Client certificate (PEM) to present, with `--key`.
    #[arg(long, global = true, env = "AGENTPLANE_CERT")]
    pub cert: Option<PathBuf>,

    /// Private key (PEM) of `--cert`.
    #[arg(long, global = true, env = "AGENTPLANE_KEY")]
    pub key: Option<PathBuf>,

    /// The name the control plane's certificate must carry (default: the
    /// endpoint's host).
    #[arg(long, global = true, env = "AGENTPLANE_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,

    /// Bearer token sent with every call (prefer `--token-file`: a flag
    /// shows in `ps`).
    #[arg(long, global = true, env = "AGENTPLANE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// File whose first line is the bearer token.
    #[arg(
        long,
        global = true,
        env = "AGENTPLANE_TOKEN_FILE",
        conflicts_with = "token"
    )]
    pub token_file: Option<PathBuf>,
}

/// What every channel gets: TLS (for `https://`) and the token.
#[derive(Debug, Clone)]
pub struct Access {
    tls: Option<ClientTlsConfig>,
    server_name: Option<String>,
    token: Option<MetadataValue<Ascii>>,
    /// Deadline of each unary call.
    pub timeout: Duration,
}

impl Access {
    /// Reads the files the flags name; errors say which flag to fix.
    pub fn load(a: &AccessArgs, timeout: Duration) -> anyhow::Result<Self> {
        let mut tls = None;
        if let Some(ca) = &a.ca {
            let pem =
                std::fs::read(ca).with_context(|| format!("--ca: cannot read {}", ca.display()))?;
            tls = Some(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)));
        }
        match (&a.cert, &a.key) {
            (Some(cert), Some(key)) => {
                let c = std::fs::read(cert)
                    .with_context(|| format!("--cert: cannot read {}", cert.display()))?;
                let k = std::fs::read(key)
                    .with_context(|| format!("--key: cannot read {}", key.display()))?;
                tls = Some(tls.unwrap_or_default().identity(Identity::from_pem(c, k)));
            }
            (None, None) => {}
            (Some(_), None) => anyhow::bail!("--key: required with --cert"),
            (None, Some(_)) => anyhow::bail!("--cert: required with --key"),
        }
        let token = match (&a.token, &a.token_file) {
            (Some(t), _) => Some(t.trim().to_owned()),
            (None, Some(f)) => {
                let text = std::fs::read_to_string(f)
                    .with_context(|| format!("--token-file: cannot read {}", f.display()))?;
                Some(text.lines().next().unwrap_or_default().trim().to_owned())
            }
            (None, None) => None,
        };
        let token = match token {
            Some(t) if t.is_empty() => anyhow::bail!("--token: the token is empty"),
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse::<MetadataValue<Ascii>>()
                    .context("--token: a token is printable ASCII")?,
            ),
            None => None,
        };
        Ok(Self {
            tls,
            server_name: a.tls_server_name.clone(),
            token,
            timeout,
        })
    }

    /// TLS trusting `ca_pem`, and `token` (agentctl dev's own probe).
    pub fn trusting(ca_pem: Vec<u8>, token: &str, timeout: Duration) -> anyhow::Result<Self> {
        Ok(Self {
            tls: Some(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem))),
            server_name: None,
            token: Some(
                format!("Bearer {token}")
                    .parse()
                    .context("a token is ASCII")?,
            ),
            timeout,
        })
    }

    /// The endpoint as a URL, with TLS applied for `https://`; refuses to
    /// send a token over plaintext to anything but loopback.
    pub fn endpoint(&self, endpoint: &str) -> anyhow::Result<tonic::transport::Endpoint> {
        let url = if endpoint.contains("://") {
            endpoint.to_owned()
        } else {
            format!("http://{endpoint}")
        };
        let mut e = tonic::transport::Endpoint::from_shared(url.clone())
            .with_context(|| format!("--endpoint `{endpoint}` is not a URL"))?
            .max_frame_size(agentplane::CLIENT_MAX_FRAME_SIZE);
        let uri = e.uri().clone();
        let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
        match uri.scheme_str() {
            Some("https") => {
                let Some(tls) = self.tls.clone() else {
                    anyhow::bail!(
                        "--endpoint {endpoint} is https: pass --ca (the CA that signs the control plane's certificate)"
                    );
                };
                let name = self.server_name.clone().unwrap_or_else(|| host.to_owned());
                e = e
                    .tls_config(tls.domain_name(name))
                    .context("cannot set up TLS")?;
            }
            _ => {
                if self.token.is_some() && !is_loopback(host) {
                    anyhow::bail!(
                        "refusing to send the token in plaintext to {host}: use an https:// endpoint (with --ca)"
                    );
                }
            }
        }
        Ok(e)
    }

    /// The interceptor that adds the token to every call.
    pub fn bearer(&self) -> Bearer {
        Bearer(self.token.clone())
    }
}

/// Whether `host` is a loopback name or address.
fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Adds `authorization: Bearer …` when a token is set.
#[derive(Debug, Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            r.metadata_mut().insert("authorization", t.clone());
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> AccessArgs {
        AccessArgs {
            ca: None,
            cert: None,
            key: None,
            tls_server_name: None,
            token: None,
            token_file: None,
        }
    }

    #[test]
    fn a_token_never_goes_in_plaintext_beyond_loopback() {
        let a = Access::load(
            &AccessArgs {
                token: Some("s3cret".into()),
                ..args()
            },
            Duration::from_secs(1),
        )
        .unwrap();
        assert!(a.endpoint("http://127.0.0.1:7700").is_ok());
        assert!(a.endpoint("http://[::1]:7700").is_ok());
        assert!(a.endpoint("localhost:7700").is_ok());
        let e = a.endpoint("http://10.0.0.5:7700").unwrap_err().to_string();
        assert!(e.contains("plaintext") && e.contains("10.0.0.5"), "{e}");
        let e = a.endpoint("https://10.0.0.5:7700").unwrap_err().to_string();
        assert!(e.contains("--ca"), "{e}");
    }

    #[test]
    fn half_an_identity_names_the_missing_flag() {
        let e = Access::load(
            &AccessArgs {
                cert: Some("/x".into()),
                ..args()
            },
            Duration::from_secs(1),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--key"), "{e}");
    }
}
