//! The secrets of `agentctl dev`'s stack, made at its start in a 0700
//! directory: a CA, the control plane's and the host agent's certificates,
//! and one admin token; plus the context file through which a plain
//! `agentctl` (no flags) reaches the stack, removed when it stops.

use std::path::{Path, PathBuf};

use agentplane::auth::Role;
use agentplane::pki::{self, Authority, Validity};

/// The dev stack's certificates outlive no dev session; a week is plenty.
const WEEK: Validity = Validity { days: 7 };

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
    Ok(pki::write_private(path, data, true)?)
}

impl DevSecrets {
    /// Makes them in `dir/pki` for host `host_id`, the control plane
    /// answering on `ips`.
    pub fn create(dir: &Path, host_id: &str, ips: &[String]) -> anyhow::Result<Self> {
        let dir = dir.join("pki");
        pki::create_private_dir(&dir)?;
        let ca = Authority::generate("agentplane dev CA", WEEK)?;
        let ca_file = dir.join("ca.crt");
        write_private(&ca_file, ca.pem().cert.as_bytes())?;
        let issue = |file: &str, sans: Vec<String>| -> anyhow::Result<(PathBuf, PathBuf)> {
            let pem = ca.issue(&sans, WEEK)?;
            let (c, k) = (
                dir.join(format!("{file}.crt")),
                dir.join(format!("{file}.key")),
            );
            write_private(&c, pem.cert.as_bytes())?;
            write_private(&k, pem.key.as_bytes())?;
            Ok((c, k))
        };
        let control_plane = issue("control-plane", pki::control_plane_sans(ips))?;
        let host = issue("host", pki::host_sans(host_id, ips))?;
        let token = pki::new_token();
        let token_file = dir.join("admin.token");
        write_private(&token_file, format!("{token}\n").as_bytes())?;
        let tokens = dir.join("tokens.toml");
        write_private(
            &tokens,
            pki::token_entry("dev-admin", Role::Admin, None, &token).as_bytes(),
        )?;
        Ok(Self {
            ca: ca_file,
            control_plane,
            host,
            tokens,
            token_file,
        })
    }
}
