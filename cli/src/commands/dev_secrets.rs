//! The secrets of `agentctl dev`'s stack, made at its start in a 0700
//! directory: a CA, the control plane's and the host agent's certificates,
//! and one admin token; plus the context file through which a plain
//! `agentctl` (no flags) reaches the stack, removed when it stops.

use std::fmt::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use rand::Rng;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The files the servers and clients of the dev stack use.
#[derive(Debug, Clone)]
pub struct DevSecrets {
    /// The CA certificate.
    pub ca: PathBuf,
    /// The control plane's certificate and key.
    pub control_plane: (PathBuf, PathBuf),
    /// The host agent's certificate and key.
    pub host: (PathBuf, PathBuf),
    /// The control plane's token file (one admin token).
    pub tokens: PathBuf,
    /// The admin token itself, in a file of its own.
    pub token_file: PathBuf,
}

/// Writes `data` to `path`, readable by this user only.
fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    f.write_all(data)
        .with_context(|| format!("write {}", path.display()))
}

impl DevSecrets {
    /// Makes them in `dir/pki` for host `host_id`, the control plane
    /// answering on `ips`.
    pub fn create(dir: &Path, host_id: &str, ips: &[String]) -> anyhow::Result<Self> {
        let pki = dir.join("pki");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&pki)
            .with_context(|| format!("create {}", pki.display()))?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "agentplane dev CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let ca = pki.join("ca.crt");
        write_private(&ca, ca_cert.pem().as_bytes())?;
        let issuer = Issuer::new(ca_params, ca_key);
        let issue = |file: &str, sans: Vec<String>| -> anyhow::Result<(PathBuf, PathBuf)> {
            let mut p = CertificateParams::new(sans.clone())?;
            p.distinguished_name.push(
                DnType::CommonName,
                sans.first().cloned().unwrap_or_default(),
            );
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            p.use_authority_key_identifier_extension = true;
            let key = KeyPair::generate()?;
            let cert = p.signed_by(&key, &issuer)?;
            let (c, k) = (
                pki.join(format!("{file}.crt")),
                pki.join(format!("{file}.key")),
            );
            write_private(&c, cert.pem().as_bytes())?;
            write_private(&k, key.serialize_pem().as_bytes())?;
            Ok((c, k))
        };
        let mut cp_sans = vec![
            agentplane::server::tls::CONTROL_PLANE_NAME.to_owned(),
            "localhost".to_owned(),
        ];
        cp_sans.extend(ips.iter().cloned());
        let control_plane = issue("control-plane", cp_sans)?;
        let mut host_sans = vec![agentplane::server::tls::host_name(host_id)];
        host_sans.extend(ips.iter().cloned());
        let host = issue("host", host_sans)?;
        let token: String = {
            let bytes: [u8; 32] = rand::rng().random();
            bytes.iter().fold(String::new(), |mut s, b| {
                let _ = write!(s, "{b:02x}");
                s
            })
        };
        let token_file = pki.join("admin.token");
        write_private(&token_file, format!("{token}\n").as_bytes())?;
        let tokens = pki.join("tokens.toml");
        write_private(
            &tokens,
            format!(
                "[[token]]\nname = \"dev-admin\"\nsha256 = \"{}\"\nrole = \"admin\"\n",
                agentplane::auth::digest_hex(&token)
            )
            .as_bytes(),
        )?;
        Ok(Self {
            ca,
            control_plane,
            host,
            tokens,
            token_file,
        })
    }
}

/// The context file a plain `agentctl` reads: under `$XDG_CONFIG_HOME`
/// (default `~/.config`), `agentplane/dev-context.toml`.
pub fn context_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("agentplane").join("dev-context.toml"))
}

/// Where a plain `agentctl` goes while `agentctl dev` runs.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DevContext {
    /// The control plane (`https://…`).
    pub endpoint: String,
    /// The CA to trust.
    pub ca: PathBuf,
    /// The admin token's file.
    pub token_file: PathBuf,
}

impl DevContext {
    /// Writes it (0600) at [`context_path`]; returns the path.
    pub fn write(&self) -> anyhow::Result<PathBuf> {
        let path = context_path().context("no $HOME or $XDG_CONFIG_HOME for the context file")?;
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("create {}", dir.display()))?;
        }
        let text = toml::to_string(self).context("encode the context")?;
        write_private(&path, text.as_bytes())?;
        Ok(path)
    }

    /// The context written by a running `agentctl dev`, if any.
    pub fn read() -> Option<Self> {
        let text = std::fs::read_to_string(context_path()?).ok()?;
        toml::from_str(&text).ok()
    }
}
