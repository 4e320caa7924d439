//! A throwaway PKI for tests, made with the same code as `agentctl certs`
//! (`agentplane::pki`): a CA and certificates it signs, each written as PEM
//! files, so the real binaries can run with TLS.

use std::path::{Path, PathBuf};

use agentplane::pki::{Authority, Validity};

/// Test certificates are good for a day.
const DAY: Validity = Validity { days: 1 };

/// A CA whose files live in `dir`.
#[derive(Debug)]
pub struct Pki {
    dir: PathBuf,
    authority: Authority,
    /// The CA certificate (PEM file).
    pub ca: PathBuf,
}

/// A certificate and its key, as files.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8).
    pub key: PathBuf,
}

impl Pki {
    /// Creates a CA named `name`, writing `NAME-ca.crt` into `dir`.
    pub fn create(dir: &Path, name: &str) -> Self {
        let authority = Authority::generate(&format!("{name} test CA"), DAY).expect("CA");
        let ca = dir.join(format!("{name}-ca.crt"));
        std::fs::write(&ca, &authority.pem().cert).expect("write CA");
        Self {
            dir: dir.to_owned(),
            authority,
            ca,
        }
    }

    /// Issues a certificate for `sans` (DNS names or IP addresses), good
    /// for both server and client use; files `FILE.crt` and `FILE.key`.
    pub fn issue(&self, file: &str, sans: &[&str]) -> Issued {
        let sans: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
        let pem = self.authority.issue(&sans, DAY).expect("issue");
        let out = Issued {
            cert: self.dir.join(format!("{file}.crt")),
            key: self.dir.join(format!("{file}.key")),
        };
        std::fs::write(&out.cert, pem.cert).expect("write cert");
        std::fs::write(&out.key, pem.key).expect("write key");
        out
    }
}

/// The PKI of a TLS test cluster: its CA and the control plane's identity.
#[derive(Debug)]
pub struct ClusterPki {
    /// The CA that signs every server.
    pub pki: Pki,
    /// The control plane's certificate (SAN `control-plane.agentplane`),
    /// also what tests present to host agents to pass as the control plane.
    pub control_plane: Issued,
}

impl ClusterPki {
    /// A CA in `dir` and a control-plane certificate valid for `ips`.
    pub fn create(dir: &Path, ips: &[String]) -> Self {
        let pki = Pki::create(dir, "cluster");
        let sans = agentplane::pki::control_plane_sans(ips);
        let sans: Vec<&str> = sans.iter().map(String::as_str).collect();
        let control_plane = pki.issue("control-plane", &sans);
        Self { pki, control_plane }
    }

    /// The TLS flags of a server presenting `who`.
    pub fn server_args(&self, who: &Issued) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            who.cert.display().to_string(),
            "--tls-key".into(),
            who.key.display().to_string(),
            "--tls-client-ca".into(),
            self.pki.ca.display().to_string(),
        ]
    }

    /// A certificate for host `host_id` (SAN `<id>.host.agentplane` and `ip`).
    pub fn host(&self, host_id: &str, ip: &str) -> Issued {
        let name = agentplane::server::tls::host_name(host_id);
        self.pki.issue(&format!("host-{host_id}"), &[&name, ip])
    }

    /// Client TLS that trusts this CA, expects the server to be `name` and
    /// presents `identity`, if any.
    pub fn client_tls(
        &self,
        name: &str,
        identity: Option<&Issued>,
    ) -> tonic::transport::ClientTlsConfig {
        let ca = std::fs::read(&self.pki.ca).expect("read CA");
        let mut c = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .domain_name(name);
        if let Some(id) = identity {
            let cert = std::fs::read(&id.cert).expect("read cert");
            let key = std::fs::read(&id.key).expect("read key");
            c = c.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        c
    }
}

/// The tokens a TLS test cluster's control planes accept: (token, role,
/// selector), written as a token file by [`ClusterPki::write_tokens`].
pub const TOKENS: [(&str, &str, Option<&str>); 4] = [
    ("admin-token", "admin", None),
    ("viewer-token", "viewer", None),
    ("operator-token", "operator", None),
    ("team-a-token", "operator", Some("team=a")),
];

/// Adds `authorization: Bearer …` to every call when a token is set.
#[derive(Debug, Clone, Default)]
pub struct Token(pub Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Token {
    /// The header for `token`.
    pub fn bearer(token: &str) -> Self {
        Self(Some(
            format!("Bearer {token}").parse().expect("ASCII token"),
        ))
    }
}

impl tonic::service::Interceptor for Token {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            r.metadata_mut().insert("authorization", t.clone());
        }
        Ok(r)
    }
}

/// What the cluster's API clients run over.
pub type Authed = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Token>;

impl ClusterPki {
    /// Writes [`TOKENS`] as a token file (0600) in `dir`; returns its path.
    pub fn write_tokens(dir: &Path) -> PathBuf {
        let text: String = TOKENS
            .iter()
            .map(|(token, role, selector)| {
                let name = format!("{role}-{}", selector.unwrap_or("all").replace('=', "-"));
                let role = role.parse().expect("a role");
                agentplane::pki::token_entry(&name, role, *selector, token) + "\n"
            })
            .collect();
        let path = dir.join("tokens.toml");
        agentplane::pki::write_private(&path, text.as_bytes(), true).expect("write tokens");
        path
    }
}
