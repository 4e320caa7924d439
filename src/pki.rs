//! Certificates and tokens for a deployment (feature `pki`, used by
//! `agentctl certs`, `agentctl dev` and the test harness): a CA, the
//! certificates it signs for the control plane and each host agent, and
//! bearer tokens with their token-file entries. The names on certificates are
//! the ones the servers check ([`crate::server::tls`]), so what this issues is
//! what they accept.

use std::fmt::Write as _;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::auth::{digest_hex, Role};

/// A failed step of making or reading certificates and tokens.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused the parameters or the signing.
    #[error("make the certificate for {what}: {source}")]
    Generate {
        /// Which certificate.
        what: String,
        /// rcgen's reason.
        #[source]
        source: rcgen::Error,
    },
    /// A CA certificate or key file did not parse.
    #[error("read the CA from {path}: {reason}")]
    LoadCa {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A file could not be read, written or created.
    #[error("{step} {path}: {source}")]
    Io {
        /// What was being done ("write", "create", "read").
        step: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS's reason.
        #[source]
        source: std::io::Error,
    },
    /// A file that would be overwritten exists already.
    #[error("{path} exists already; remove it or pick another --dir")]
    Exists {
        /// The file.
        path: PathBuf,
    },
}

/// How long a certificate is good for, from an hour ago (clock skew
/// between machines) to `days` from now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Days from now.
    pub days: u32,
}

impl Validity {
    fn apply(self, params: &mut CertificateParams) {
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(i64::from(self.days));
    }
}

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct Pem {
    /// The certificate.
    pub cert: String,
    /// The private key (PKCS#8). Keep it 0600.
    pub key: String,
}

/// A certificate authority that signs the servers' certificates.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    pem: Pem,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").finish_non_exhaustive()
    }
}

impl Authority {
    /// A new self-signed CA called `common_name`.
    pub fn generate(common_name: &str, validity: Validity) -> Result<Self, PkiError> {
        let generate = |source| PkiError::Generate {
            what: format!("the CA {common_name:?}"),
            source,
        };
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(generate)?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity.apply(&mut params);
        let key = KeyPair::generate().map_err(generate)?;
        let cert = params.self_signed(&key).map_err(generate)?;
        let pem = Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        };
        Ok(Self {
            issuer: Issuer::new(params, key),
            pem,
        })
    }

    /// The CA made earlier by [`Authority::generate`], from its two PEM
    /// files.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, PkiError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| PkiError::Io {
                step: "read",
                path: path.to_owned(),
                source,
            })
        };
        let pem = Pem {
            cert: read(cert)?,
            key: read(key)?,
        };
        let signing = KeyPair::from_pem(&pem.key).map_err(|e| PkiError::LoadCa {
            path: key.to_owned(),
            reason: e.to_string(),
        })?;
        let issuer =
            Issuer::from_ca_cert_pem(&pem.cert, signing).map_err(|e| PkiError::LoadCa {
                path: cert.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(Self { issuer, pem })
    }

    /// The CA's own certificate and key.
    pub fn pem(&self) -> &Pem {
        &self.pem
    }

    /// Signs a certificate for `sans` (DNS names or IP addresses; the first
    /// is also the common name), good for both server and client use since
    /// the control plane is a client of the host agents.
    pub fn issue(&self, sans: &[String], validity: Validity) -> Result<Pem, PkiError> {
        let generate = |source| PkiError::Generate {
            what: sans.first().cloned().unwrap_or_default(),
            source,
        };
        let mut params = CertificateParams::new(sans.to_vec()).map_err(generate)?;
        params.distinguished_name.push(
            DnType::CommonName,
            sans.first().cloned().unwrap_or_default(),
        );
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        validity.apply(&mut params);
        let key = KeyPair::generate().map_err(generate)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(generate)?;
        Ok(Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }
}

/// The names on the control plane's certificate: the one host agents
/// require of their caller, `localhost`, then `extra` (the addresses and
/// DNS names clients dial).
pub fn control_plane_sans(extra: &[String]) -> Vec<String> {
    let mut sans = vec![
        crate::server::tls::CONTROL_PLANE_NAME.to_owned(),
        "localhost".to_owned(),
    ];
    sans.extend(extra.iter().cloned());
    sans
}

/// The names on host `host_id`'s certificate: the one the control plane
/// verifies when it dials it, then `extra`.
pub fn host_sans(host_id: &str, extra: &[String]) -> Vec<String> {
    let mut sans = vec![crate::server::tls::host_name(host_id)];
    sans.extend(extra.iter().cloned());
    sans
}

/// A new bearer token: 32 random bytes as 64 hex characters.
pub fn new_token() -> String {
    use rand::Rng;
    let bytes: [u8; 32] = rand::rng().random();
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The token-file entry that lets `token` in as `name` with `role`,
/// limited to `selector` when one is given. Holds the digest, never the
/// token.
pub fn token_entry(name: &str, role: Role, selector: Option<&str>, token: &str) -> String {
    let mut entry = format!(
        "[[token]]\nname = {}\nsha256 = \"{}\"\nrole = \"{}\"\n",
        toml_string(name),
        digest_hex(token),
        role.as_str()
    );
    if let Some(s) = selector {
        let _ = writeln!(entry, "selector = {}", toml_string(s));
    }
    entry
}

/// `s` as a TOML basic string.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// Creates `dir` (and its parents) with mode 0700.
pub fn create_private_dir(dir: &Path) -> Result<(), PkiError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| PkiError::Io {
            step: "create",
            path: dir.to_owned(),
            source,
        })
}

/// Writes `data` to `path` with mode 0600, through a new temporary file in
/// the same directory (a random name, created exclusively, so nobody else's
/// file can be written through) and a rename, so a reader (a server
/// reloading on SIGHUP) never sees half of it. With `replace` false an
/// existing file is an error, not overwritten, even one that appears
/// meanwhile.
pub fn write_private(path: &Path, data: &[u8], replace: bool) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let io = |step, source| PkiError::Io {
        step,
        path: path.to_owned(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".agentplane-")
        .permissions(std::fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)
        .map_err(|e| io("create a temporary file beside", e))?;
    tmp.write_all(data)
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(|e| io("write", e))?;
    let persisted = if replace {
        tmp.persist(path)
    } else {
        tmp.persist_noclobber(path)
    };
    persisted.map(drop).map_err(|e| {
        if e.error.kind() == std::io::ErrorKind::AlreadyExists {
            PkiError::Exists {
                path: path.to_owned(),
            }
        } else {
            io("write", e.error)
        }
    })
}

/// Refuses an extra certificate name that would let its holder pose as
/// another component: a name under `agentplane` (the control plane's and
/// the hosts' names are added by this module, never by hand) or a
/// wildcard.
pub fn check_extra_san(name: &str) -> Result<(), String> {
    let lower = name.to_ascii_lowercase();
    if lower.contains('*') {
        return Err(format!("--san {name}: no wildcards"));
    }
    let trimmed = lower.trim_end_matches('.');
    if trimmed == "agentplane" || trimmed.ends_with(".agentplane") {
        return Err(format!(
            "--san {name}: names under agentplane identify the control plane and hosts, and are set by the certificate's kind"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::TokenTable;
    use rustls_pki_types::pem::PemObject;

    const YEAR: Validity = Validity { days: 365 };

    #[test]
    fn a_loaded_ca_issues_certificates_naming_what_the_servers_check() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Authority::generate("test CA", YEAR).expect("CA");
        let (c, k) = (dir.path().join("ca.crt"), dir.path().join("ca.key"));
        write_private(&c, ca.pem().cert.as_bytes(), false).expect("write");
        write_private(&k, ca.pem().key.as_bytes(), false).expect("write");
        let loaded = Authority::load(&c, &k).expect("load");
        let leaf = loaded
            .issue(&host_sans("h1", &["127.0.0.1".into()]), YEAR)
            .expect("issue");
        // The loaded CA signs leaves under the same issuer name, for the
        // name the control plane checks.
        let der = rustls_pki_types::CertificateDer::from_pem_slice(leaf.cert.as_bytes())
            .expect("leaf PEM");
        let name = crate::server::RequirePeerName::new("h1.host.agentplane").expect("name");
        assert_eq!(name.refusal(Some(std::slice::from_ref(&der))), None);
        let other = crate::server::RequirePeerName::new("h2.host.agentplane").expect("name");
        assert!(other.refusal(Some(&[der])).is_some());
        assert!(leaf.cert.contains("BEGIN CERTIFICATE") && ca.pem().key.contains("PRIVATE KEY"));
    }

    #[test]
    fn write_private_is_0600_and_refuses_to_overwrite_unless_asked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("x.key");
        write_private(&p, b"one", false).expect("first write");
        let mode = std::fs::metadata(&p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            write_private(&p, b"two", false),
            Err(PkiError::Exists { .. })
        ));
        write_private(&p, b"two", true).expect("replace");
        assert_eq!(std::fs::read(&p).expect("read"), b"two");
    }

    #[test]
    fn extra_names_cannot_claim_another_identity() {
        for bad in [
            "control-plane.agentplane",
            "h2.host.agentplane",
            "H2.HOST.AGENTPLANE.",
            "*.example.com",
        ] {
            assert!(check_extra_san(bad).is_err(), "{bad}");
        }
        for ok in ["10.0.0.5", "cp.example.com", "localhost"] {
            check_extra_san(ok).expect(ok);
        }
    }

    #[test]
    fn a_token_entry_lets_that_token_in_with_its_role_and_selector() {
        let token = new_token();
        assert_eq!(token.len(), 64);
        let text = token_entry("team \"a\"", Role::Operator, Some("team=a"), &token);
        let table = TokenTable::parse(Path::new("t.toml"), &text).expect("parses");
        let p = table.authenticate(&token).expect("authenticates");
        assert_eq!(p.name, "team \"a\"");
        assert_eq!(p.role, Role::Operator);
        assert!(p.selector.is_some());
        assert!(table.authenticate(&new_token()).is_none());
    }
}
