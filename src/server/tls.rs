//! TLS for both servers and for the control plane's calls to host agents:
//! the flags, the PEM material loaded and checked once at start (so a bad
//! file exits 64 before anything runs), and the names peers must carry.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::config::parse_duration;

/// The name (certificate SAN) a control plane presents to host agents.
pub const CONTROL_PLANE_NAME: &str = "control-plane.agentplane";

/// The suffix of a host agent's name: host `h1` is `h1.host.agentplane`.
pub const HOST_NAME_SUFFIX: &str = ".host.agentplane";

/// The name (certificate SAN) host agent `host_id` must present.
pub fn host_name(host_id: &str) -> String {
    format!("{host_id}{HOST_NAME_SUFFIX}")
}

/// Whether `host_id` can be the first part of a DNS name: labels of 1-63
/// letters, digits and `-` (not at a label's ends), separated by dots.
pub fn host_id_is_dns(host_id: &str) -> bool {
    host_name(host_id).len() <= 253
        && host_id.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// The serving flags both servers take (flattened into each binary's
/// config): TLS, the probe port, the connection cap.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// PEM certificate (chain) this server presents. The control plane also
    /// presents it to host agents as its client certificate, so it needs the
    /// SAN `control-plane.agentplane`; a host agent's needs `<host-id>.host.agentplane`.
    #[arg(long, env = "AGENTPLANE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "AGENTPLANE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificate(s) that sign the peers' certificates: host agents
    /// require a client certificate from it; the control plane verifies
    /// host agents with it, and clients' certificates when they show one.
    #[arg(long, env = "AGENTPLANE_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,

    /// How long a TLS handshake may take before the connection is dropped.
    #[arg(long, env = "AGENTPLANE_TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub tls_handshake_timeout: Duration,

    /// Also serve the gRPC health service alone, in plaintext, on this
    /// address: for probes that cannot do TLS (Kubernetes' gRPC probe).
    #[arg(long, env = "AGENTPLANE_HEALTH_LISTEN")]
    pub health_listen: Option<std::net::SocketAddr>,

    /// Serve Prometheus metrics at `http://ADDR/metrics` (plaintext, no
    /// authentication: bind it where only the scraper reaches). Unset: no
    /// metrics endpoint.
    #[arg(long, env = "AGENTPLANE_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,

    /// Export traces over OTLP/gRPC to this collector (`http://host:4317`).
    /// Also on when the standard OTEL_EXPORTER_OTLP_ENDPOINT or
    /// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set; otherwise there is no
    /// exporter at all. W3C trace context is read from callers' gRPC
    /// metadata and sent on to host agents.
    #[arg(long, env = "AGENTPLANE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// Most client connections served at once; more are closed at once
    /// (a flood of idle or half-open connections cannot exhaust the server).
    #[arg(long, env = "AGENTPLANE_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,

    /// Most requests and streams open at once on this server (past it:
    /// RESOURCE_EXHAUSTED), so long-lived streams cannot grow its memory
    /// without bound (each costs a few KiB).
    #[arg(long, env = "AGENTPLANE_MAX_STREAMS", default_value_t = 16384)]
    pub max_streams: usize,

    /// Threads that run this server's tasks (tokio workers, 1-1024).
    /// Unset: one per core. Fewer cost less CPU per request where the
    /// server shares its cores (fewer wakeups across threads): with one
    /// worker on a 2-core machine that also ran Redis, the control plane
    /// spent about a quarter less CPU per spawn.
    #[arg(long, env = "AGENTPLANE_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,

    /// Serve plaintext with no peer authentication: anyone who reaches the
    /// port can run programs here. For tests and local experiments only.
    #[arg(long, env = "AGENTPLANE_INSECURE", conflicts_with_all = ["tls_cert", "tls_key"])]
    pub insecure: bool,
}

/// How a server talks: TLS with checked material, or plaintext on request.
#[derive(Debug, Clone)]
pub enum Transport {
    /// `--insecure`: plaintext, no peer authentication.
    Insecure,
    /// TLS with this material.
    Tls(Box<TlsMaterial>),
}

/// PEM files read and parsed once at start.
#[derive(Debug, Clone)]
pub struct TlsMaterial {
    /// The certificate chain.
    pub cert_pem: Vec<u8>,
    /// Its private key.
    pub key_pem: Vec<u8>,
    /// The CA that signs peers, if given.
    pub client_ca_pem: Option<Vec<u8>>,
    /// The handshake bound.
    pub handshake_timeout: Duration,
}

impl ServeArgs {
    /// Reads and checks the files; the message names the flag to fix.
    /// `need_client_ca`: this server cannot run TLS without `--tls-client-ca`.
    pub fn load(&self, need_client_ca: bool) -> Result<Transport, String> {
        if self.max_connections == 0 {
            return Err("--max-connections: must be at least 1".into());
        }
        if self.max_streams == 0 {
            return Err("--max-streams: must be at least 1".into());
        }
        if self.insecure {
            return Ok(Transport::Insecure);
        }
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Err(match (&self.tls_cert, &self.tls_key) {
                (None, None) => "neither --tls-cert/--tls-key (TLS) nor --insecure (plaintext, \
                                 anyone may call) is given: choose one"
                    .to_owned(),
                (Some(_), None) => "--tls-key: required with --tls-cert".to_owned(),
                _ => "--tls-cert: required with --tls-key".to_owned(),
            });
        };
        if self.tls_handshake_timeout.is_zero() {
            return Err("--tls-handshake-timeout: must be more than 0".into());
        }
        let cert_pem = read("--tls-cert", cert)?;
        certificates("--tls-cert", cert, &cert_pem)?;
        let key_pem = read("--tls-key", key)?;
        PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| format!("--tls-key: {} holds no PEM private key: {e}", key.display()))?;
        let client_ca_pem = match &self.tls_client_ca {
            Some(ca) => {
                let pem = read("--tls-client-ca", ca)?;
                certificates("--tls-client-ca", ca, &pem)?;
                Some(pem)
            }
            None if need_client_ca => {
                return Err("--tls-client-ca: required with TLS (the CA whose \
                            certificates this server trusts)"
                    .into())
            }
            None => None,
        };
        Ok(Transport::Tls(Box::new(TlsMaterial {
            cert_pem,
            key_pem,
            client_ca_pem,
            handshake_timeout: self.tls_handshake_timeout,
        })))
    }
}

impl TlsMaterial {
    /// This server's identity (certificate and key).
    pub fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert_pem, &self.key_pem)
    }

    /// The server side (rustls with ring, HTTP/2 only): `require_client`
    /// makes a client certificate signed by the client CA mandatory (else
    /// it is verified only when shown).
    pub fn rustls_server(&self, require_client: bool) -> Result<Arc<rustls::ServerConfig>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = match &self.client_ca_pem {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_slice_iter(ca) {
                    let c = c.map_err(|e| format!("--tls-client-ca: {e}"))?;
                    roots.add(c).map_err(|e| format!("--tls-client-ca: {e}"))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                );
                let verifier = if require_client {
                    verifier
                } else {
                    verifier.allow_unauthenticated()
                };
                builder.with_client_cert_verifier(
                    verifier
                        .build()
                        .map_err(|e| format!("--tls-client-ca: {e}"))?,
                )
            }
        };
        let certs = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("--tls-cert: {e}"))?;
        let key =
            PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(|e| format!("--tls-key: {e}"))?;
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| format!("--tls-cert/--tls-key: {e}"))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// The client side of a call to the peer named `peer_name`: verified
    /// against the client CA, presenting this server's own certificate.
    pub fn client_config(&self, peer_name: &str) -> ClientTlsConfig {
        let mut c = ClientTlsConfig::new()
            .domain_name(peer_name)
            .identity(self.identity())
            .timeout(self.handshake_timeout);
        if let Some(ca) = &self.client_ca_pem {
            c = c.ca_certificate(Certificate::from_pem(ca));
        }
        c
    }
}

fn read(flag: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{flag}: cannot read {}: {e}", path.display()))
}

/// Checks that `pem` holds at least one certificate and nothing unreadable.
fn certificates(flag: &str, path: &Path, pem: &[u8]) -> Result<(), String> {
    let mut n = 0;
    for c in CertificateDer::pem_slice_iter(pem) {
        c.map_err(|e| format!("{flag}: {} is not PEM: {e}", path.display()))?;
        n += 1;
    }
    if n == 0 {
        return Err(format!(
            "{flag}: {} holds no PEM certificate",
            path.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ids_that_can_be_names() {
        for ok in ["h1", "web-3", "rack1.h-2", "A1"] {
            assert!(host_id_is_dns(ok), "{ok}");
        }
        for bad in ["h_1", "-h", "h-", "a..b", "", &"x".repeat(64)] {
            assert!(!host_id_is_dns(bad), "{bad}");
        }
        assert_eq!(host_name("h1"), "h1.host.agentplane");
    }

    #[test]
    fn neither_tls_nor_insecure_names_both() {
        let args = ServeArgs {
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            tls_handshake_timeout: Duration::from_secs(10),
            health_listen: None,
            metrics_listen: None,
            otlp_endpoint: None,
            max_connections: 4096,
            max_streams: 16384,
            worker_threads: None,
            insecure: false,
        };
        let e = args.load(false).unwrap_err();
        assert!(e.contains("--tls-cert") && e.contains("--insecure"), "{e}");
        let insecure = ServeArgs {
            insecure: true,
            ..args.clone()
        };
        assert!(matches!(insecure.load(true), Ok(Transport::Insecure)));
        let half = ServeArgs {
            tls_cert: Some("/nonexistent".into()),
            ..args
        };
        assert!(half.load(false).unwrap_err().contains("--tls-key"));
    }

    #[test]
    fn unreadable_or_garbage_files_name_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not pem").unwrap();
        let args = ServeArgs {
            tls_cert: Some(junk.clone()),
            tls_key: Some(junk),
            tls_client_ca: None,
            tls_handshake_timeout: Duration::from_secs(10),
            health_listen: None,
            metrics_listen: None,
            otlp_endpoint: None,
            max_connections: 4096,
            max_streams: 16384,
            worker_threads: None,
            insecure: false,
        };
        assert!(args.load(false).unwrap_err().starts_with("--tls-cert"));
        let missing = ServeArgs {
            tls_cert: Some(dir.path().join("missing.pem")),
            ..args
        };
        assert!(missing.load(false).unwrap_err().contains("cannot read"));
    }
}
