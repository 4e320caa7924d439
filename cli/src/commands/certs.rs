//! `agentctl certs`: the CA, certificates and tokens of a real deployment,
//! made offline in one directory (0700, keys 0600). The names on the
//! certificates are the ones the servers check, so what this issues is what
//! they accept: the control plane's `control-plane.agentplane`, each host's
//! `<host-id>.host.agentplane`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use agentplane::auth::{Role, TokenTable};
use agentplane::pki::{self, Authority, Validity};
use anyhow::Context;

/// `agentctl certs …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum CertsCommand {
    /// Make a new CA: DIR/ca.crt (give it to every server and client) and
    /// DIR/ca.key (keep it offline; it signs everything else).
    Ca {
        #[command(flatten)]
        dir: DirArgs,
        /// The CA's common name.
        #[arg(long, default_value = "agentplane CA")]
        name: String,
        /// Days the CA is good for.
        #[arg(long, default_value_t = 3650, value_parser = clap::value_parser!(u32).range(1..=36500))]
        days: u32,
    },
    /// Issue the control plane's certificate (DIR/control-plane.crt, .key),
    /// named `control-plane.agentplane`, `localhost` and each --san.
    ControlPlane {
        #[command(flatten)]
        leaf: LeafArgs,
    },
    /// Issue host HOST_ID's certificate (DIR/host-HOST_ID.crt, .key), named
    /// `HOST_ID.host.agentplane` and each --san.
    Host {
        /// The host agent's --host-id (a DNS label: letters, digits, `-`).
        host_id: String,
        #[command(flatten)]
        leaf: LeafArgs,
    },
    /// Make a bearer token: add its digest to the token file (the control
    /// plane's --token-file, made 0600 if new; send the control plane SIGHUP
    /// to load it) and print the token, once, on stdout.
    Token {
        /// Who it is for: unique in the file, shown in the servers' logs.
        name: String,
        /// viewer, operator or admin.
        #[arg(long)]
        role: Role,
        /// Limit a viewer or operator to agents whose labels match
        /// (`team=a,env=prod`).
        #[arg(long)]
        selector: Option<String>,
        /// The token file to add the entry to.
        #[arg(long, env = "AGENTPLANE_TOKEN_FILE_OUT")]
        tokens: PathBuf,
        /// Write the token to this file (0600) instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Where the CA and the certificates live.
#[derive(Debug, Clone, clap::Args)]
pub struct DirArgs {
    /// The PKI directory (made 0700 if missing).
    #[arg(long, env = "AGENTPLANE_PKI_DIR")]
    pub dir: PathBuf,
    /// Replace files that exist already.
    #[arg(long)]
    pub force: bool,
}

/// The flags of a certificate the CA signs.
#[derive(Debug, Clone, clap::Args)]
pub struct LeafArgs {
    #[command(flatten)]
    dir: DirArgs,
    /// Another name or IP address on the certificate: the address clients
    /// dial (repeatable).
    #[arg(long = "san")]
    sans: Vec<String>,
    /// Days the certificate is good for.
    #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=3650))]
    days: u32,
}

/// Runs `agentctl certs …`.
pub fn run(command: CertsCommand) -> anyhow::Result<ExitCode> {
    if let CertsCommand::ControlPlane { leaf } | CertsCommand::Host { leaf, .. } = &command {
        for s in &leaf.sans {
            pki::check_extra_san(s).map_err(anyhow::Error::msg)?;
        }
    }
    match command {
        CertsCommand::Ca { dir, name, days } => {
            pki::create_private_dir(&dir.dir)?;
            let ca = Authority::generate(&name, Validity { days })?;
            let (cert, key) = ca_files(&dir.dir);
            // The key first: a CA certificate without its key is useless.
            pki::write_private(&key, ca.pem().key.as_bytes(), dir.force)?;
            pki::write_private(&cert, ca.pem().cert.as_bytes(), dir.force)?;
            println!("{}", cert.display());
            println!("{}", key.display());
        }
        CertsCommand::ControlPlane { leaf } => {
            let sans = pki::control_plane_sans(&leaf.sans);
            issue(&leaf, "control-plane", &sans)?;
        }
        CertsCommand::Host { host_id, leaf } => {
            anyhow::ensure!(
                agentplane::server::tls::host_id_is_dns(&host_id),
                "host id `{host_id}` cannot be a DNS label (letters, digits and `-`, at most 63); \
                 with TLS on, the host agent refuses it"
            );
            let sans = pki::host_sans(&host_id, &leaf.sans);
            issue(&leaf, &format!("host-{host_id}"), &sans)?;
        }
        CertsCommand::Token {
            name,
            role,
            selector,
            tokens,
            out,
        } => token(&name, role, selector.as_deref(), &tokens, out.as_deref())?,
    }
    Ok(ExitCode::SUCCESS)
}

fn ca_files(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("ca.crt"), dir.join("ca.key"))
}

/// Signs `DIR/FILE.crt` and `.key` for `sans` with the CA in DIR.
fn issue(leaf: &LeafArgs, file: &str, sans: &[String]) -> anyhow::Result<()> {
    let (ca_cert, ca_key) = ca_files(&leaf.dir.dir);
    let ca = Authority::load(&ca_cert, &ca_key).with_context(|| {
        format!(
            "no usable CA in {} (make one with `agentctl certs ca --dir {}`)",
            leaf.dir.dir.display(),
            leaf.dir.dir.display()
        )
    })?;
    let pem = ca.issue(sans, Validity { days: leaf.days })?;
    let (cert, key) = (
        leaf.dir.dir.join(format!("{file}.crt")),
        leaf.dir.dir.join(format!("{file}.key")),
    );
    pki::write_private(&key, pem.key.as_bytes(), leaf.dir.force)?;
    pki::write_private(&cert, pem.cert.as_bytes(), leaf.dir.force)?;
    println!("{}", cert.display());
    println!("{}", key.display());
    Ok(())
}

/// Adds a new token's entry to `tokens` and prints (or writes) the token.
/// The file as it would be after is parsed first, with the control plane's
/// own rules, so a duplicate name or a bad selector changes nothing.
fn token(
    name: &str,
    role: Role,
    selector: Option<&str>,
    tokens: &Path,
    out: Option<&Path>,
) -> anyhow::Result<()> {
    // One writer at a time: two runs at once would each add to what it
    // read, and one entry (a token already printed) would be lost.
    let _lock = lock_beside(tokens)?;
    let before = match std::fs::read_to_string(tokens) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("read {}", tokens.display())),
    };
    if !before.is_empty() {
        // The same check the control plane makes: a looser file is refused.
        TokenTable::load(tokens)?;
    }
    let token = pki::new_token();
    let mut after = before;
    if !after.is_empty() && !after.ends_with("\n\n") {
        after.push_str(if after.ends_with('\n') { "\n" } else { "\n\n" });
    }
    after.push_str(&pki::token_entry(name, role, selector, &token));
    TokenTable::parse(tokens, &after)?;
    if let Some(out) = out {
        pki::write_private(out, format!("{token}\n").as_bytes(), false)?;
    }
    // The new file keeps the old one's group and group-read bit: a control
    // plane that reads it through a group (the systemd unit) still can.
    let before_meta = std::fs::metadata(tokens).ok();
    pki::write_private(tokens, after.as_bytes(), true)?;
    if let Some(m) = before_meta {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        std::os::unix::fs::chown(tokens, Some(m.uid()), Some(m.gid()))
            .and_then(|()| {
                std::fs::set_permissions(tokens, std::fs::Permissions::from_mode(m.mode() & 0o640))
            })
            .with_context(|| {
                format!(
                    "{} was rewritten 0600 and owned by you; give it back its owner and mode",
                    tokens.display()
                )
            })?;
    }
    match out {
        Some(out) => eprintln!(
            "added {name:?} ({role}) to {}; the token is in {}",
            tokens.display(),
            out.display()
        ),
        None => {
            println!("{token}");
            eprintln!(
                "added {name:?} ({role}) to {}; the token above is shown only now",
                tokens.display()
            );
        }
    }
    Ok(())
}

/// An exclusive lock on `FILE.lock` beside `file`, held until dropped.
fn lock_beside(file: &Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut name = file.as_os_str().to_owned();
    name.push(".lock");
    let path = PathBuf::from(name);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("lock {}: {e}", path.display()))
}
