//! The token file (`--token-file`): who may call the control plane, with
//! which role. It holds SHA-256 digests, never the tokens, so a leaked file
//! (or a backup of it) lets no one in. Format, TOML:
//!
//! ```toml
//! [[token]]
//! name = "alice"            # who, for logs; unique
//! sha256 = "<64 hex chars>" # SHA-256 of the token, lowercase hex; unique
//! role = "operator"         # viewer | operator | admin
//! selector = "team=a"       # optional; viewer and operator only
//! ```
//!
//! A selector limits a viewer or an operator to the agents whose labels
//! match it. An admin may do everything, so a selector on one would be a
//! promise nothing keeps: it is refused rather than ignored. A file with no
//! entries is valid and lets no one in (except to the public health checks).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use super::{AuthError, Principal, Role};
use crate::labels::Selector;

/// Longest `name`: it goes into every log line about the caller.
const MAX_NAME: usize = 128;

/// A token file's entries, validated. Cheap to share behind an `Arc` and to
/// swap whole on reload.
pub struct TokenTable {
    entries: Vec<Entry>,
}

struct Entry {
    digest: [u8; 32],
    principal: Principal,
}

// By hand, so digests never reach a log (a weak token's digest can be
// brute-forced).
impl std::fmt::Debug for TokenTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|e| &e.principal))
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    token: Vec<RawToken>,
}

// Every field optional here so a missing one is reported by entry and
// field, like every other mistake, rather than by the TOML parser.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    name: Option<String>,
    sha256: Option<String>,
    role: Option<String>,
    selector: Option<String>,
}

/// The lowercase hex SHA-256 of `token`: what the token file's `sha256`
/// holds for it.
pub fn digest_hex(token: &str) -> String {
    format!("{:x}", Sha256::digest(token.as_bytes()))
}

impl TokenTable {
    /// Reads and validates the token file at `path`. Refuses a file that
    /// group or others may read, as ssh does with keys: digests of weak
    /// tokens can be brute-forced.
    pub fn load(path: &Path) -> Result<TokenTable, AuthError> {
        let read_err = |source| AuthError::ReadTokenFile {
            path: path.to_owned(),
            source,
        };
        let mut file = File::open(path).map_err(read_err)?;
        // The mode of the file opened, not of the path, so a swap between
        // the check and the read cannot slip a looser file in.
        check_mode(path, &file.metadata().map_err(read_err)?)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(read_err)?;
        Self::parse_bytes(path, &bytes)
    }

    /// Validates token file contents; `path` only names the file in errors.
    pub fn parse(path: &Path, text: &str) -> Result<TokenTable, AuthError> {
        let raw: RawFile = toml::from_str(text).map_err(|source| AuthError::ParseTokenFile {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        let mut entries: Vec<Entry> = Vec::with_capacity(raw.token.len());
        for (index, t) in raw.token.into_iter().enumerate() {
            let entry = validate(index, t, &entries).map_err(|e| e.at(path))?;
            entries.push(entry);
        }
        Ok(TokenTable { entries })
    }

    pub(super) fn parse_bytes(path: &Path, bytes: &[u8]) -> Result<TokenTable, AuthError> {
        let text = std::str::from_utf8(bytes).map_err(|e| AuthError::ReadTokenFile {
            path: path.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
        Self::parse(path, text)
    }

    /// The principal whose digest is the SHA-256 of `bearer`, if any. Every
    /// entry is compared, each in constant time, and the match is selected
    /// without a branch, so the time taken says nothing about which entry
    /// (or which byte of a digest) matched.
    pub fn authenticate(&self, bearer: &str) -> Option<&Principal> {
        let presented: [u8; 32] = Sha256::digest(bearer.as_bytes()).into();
        let mut found = subtle::Choice::from(0);
        let mut at = 0u64;
        for (i, e) in self.entries.iter().enumerate() {
            let eq = e.digest.ct_eq(&presented);
            at = u64::conditional_select(&at, &(i as u64), eq);
            found |= eq;
        }
        if bool::from(found) {
            let at = usize::try_from(at).ok()?;
            self.entries.get(at).map(|e| &e.principal)
        } else {
            None
        }
    }

    /// Every principal, in file order.
    pub fn principals(&self) -> impl Iterator<Item = &Principal> {
        self.entries.iter().map(|e| &e.principal)
    }

    /// How many entries the file has.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the file has no entries (no one gets in).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(unix)]
fn check_mode(path: &Path, meta: &std::fs::Metadata) -> Result<(), AuthError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o777;
    // Writable by group or others: anyone there could add an admin token.
    // Readable by others: digests are not tokens, but nobody else needs
    // them. Group-readable is allowed: a Kubernetes Secret mounted for a
    // non-root user is (fsGroup).
    if mode & 0o027 != 0 {
        return Err(AuthError::InsecurePermissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_mode(_path: &Path, _meta: &std::fs::Metadata) -> Result<(), AuthError> {
    Ok(())
}

/// An entry's mistake before the file's path is known to it.
struct EntryError {
    index: usize,
    name: Option<String>,
    field: &'static str,
    reason: String,
}

impl EntryError {
    fn at(self, path: &Path) -> AuthError {
        AuthError::InvalidEntry {
            path: PathBuf::from(path),
            index: self.index,
            name: self.name,
            field: self.field,
            reason: self.reason,
        }
    }
}

fn validate(index: usize, t: RawToken, before: &[Entry]) -> Result<Entry, EntryError> {
    // The name labels every later error, so it is read first; a bad one is
    // not echoed back as the label.
    let err_name = t.name.clone().filter(|n| name_ok(n).is_ok());
    let err = |field, reason: String| EntryError {
        index,
        name: err_name.clone(),
        field,
        reason,
    };
    let name = t.name.ok_or_else(|| err("name", "missing".into()))?;
    name_ok(&name).map_err(|r| err("name", r))?;
    if let Some(i) = before.iter().position(|e| e.principal.name == name) {
        return Err(err("name", format!("`{name}` is already token[{i}]")));
    }

    let hex = t.sha256.ok_or_else(|| err("sha256", "missing".into()))?;
    let digest = parse_digest(&hex)
        .ok_or_else(|| err("sha256", "must be 64 lowercase hex digits".into()))?;
    if let Some(e) = before.iter().find(|e| e.digest == digest) {
        return Err(err(
            "sha256",
            format!(
                "same digest as `{}`: two names for one token",
                e.principal.name
            ),
        ));
    }

    let role: Role = t
        .role
        .ok_or_else(|| err("role", "missing".into()))?
        .parse()
        .map_err(|e: super::roles::UnknownRole| err("role", e.to_string()))?;

    let selector = match t.selector {
        None => None,
        Some(_) if role == Role::Admin => {
            return Err(err(
                "selector",
                "an admin may act on every agent, so a selector would not limit it; \
                 remove it or use role operator"
                    .into(),
            ));
        }
        Some(s) => {
            let sel = Selector::parse("selector", &s).map_err(|e| err("selector", e.reason))?;
            if sel.is_empty() {
                return Err(err(
                    "selector",
                    "empty; leave it out to allow every agent".into(),
                ));
            }
            Some(sel)
        }
    };

    Ok(Entry {
        digest,
        principal: Principal {
            name,
            role,
            selector,
        },
    })
}

fn name_ok(name: &str) -> Result<(), String> {
    if name.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > MAX_NAME {
        return Err(format!("longer than {MAX_NAME} bytes"));
    }
    // It is written into logs as is; a newline would forge a log line.
    if name.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    Ok(())
}

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    let b = hex.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(b.chunks_exact(2)) {
        *o = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn entry(name: &str, token: &str, role: &str) -> String {
        format!(
            "[[token]]\nname = \"{name}\"\nsha256 = \"{}\"\nrole = \"{role}\"\n",
            digest_hex(token)
        )
    }

    fn parse(text: &str) -> Result<TokenTable, AuthError> {
        TokenTable::parse(Path::new("/x"), text)
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn digest_hex_is_sha256_lowercase() {
        assert_eq!(
            digest_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn parses_and_authenticates_each_entry() {
        let text = format!(
            "{}{}selector = \"team=a\"\n{}",
            entry("alice", "tok-a", "admin"),
            entry("bob", "tok-b", "operator"),
            entry("carol", "tok-c", "viewer"),
        );
        let t = parse(&text).unwrap();
        assert_eq!(t.len(), 3);
        let a = t.authenticate("tok-a").unwrap();
        assert_eq!(
            (a.name.as_str(), a.role, &a.selector),
            ("alice", Role::Admin, &None)
        );
        let b = t.authenticate("tok-b").unwrap();
        assert_eq!(b.role, Role::Operator);
        assert_eq!(b.selector, Some(Selector::parse("s", "team=a").unwrap()));
        assert_eq!(t.authenticate("tok-c").unwrap().name, "carol");
        assert!(t.authenticate("tok-d").is_none());
        assert!(t.authenticate("").is_none());
        // The digest itself is not a token.
        assert!(t.authenticate(&digest_hex("tok-a")).is_none());
    }

    #[test]
    fn empty_file_is_valid_and_admits_no_one() {
        let t = parse("").unwrap();
        assert!(t.is_empty());
        assert!(t.authenticate("anything").is_none());
    }

    #[test]
    fn errors_name_the_file_entry_and_field() {
        let good = entry("alice", "a", "viewer");
        let bad_hex =
            format!("{good}[[token]]\nname = \"bob\"\nsha256 = \"ABC\"\nrole = \"viewer\"\n");
        assert_eq!(
            err(&bad_hex),
            "token file /x: token[1] (bob): sha256: must be 64 lowercase hex digits"
        );
        let upper = digest_hex("b").to_uppercase();
        let t = format!("[[token]]\nname = \"bob\"\nsha256 = \"{upper}\"\nrole = \"viewer\"\n");
        assert!(err(&t).ends_with("sha256: must be 64 lowercase hex digits"));
        assert_eq!(
            err(&format!("{good}{}", entry("alice", "b", "viewer"))),
            "token file /x: token[1] (alice): name: `alice` is already token[0]"
        );
        assert_eq!(
            err(&format!("{good}{}", entry("bob", "a", "viewer"))),
            "token file /x: token[1] (bob): sha256: same digest as `alice`: two names for one token"
        );
        assert_eq!(
            err(&entry("bob", "b", "root")),
            "token file /x: token[0] (bob): role: `root` is not one of viewer, operator, admin"
        );
        assert_eq!(
            err(&format!(
                "{}selector = \"gpu\"\n",
                entry("bob", "b", "operator")
            )),
            "token file /x: token[0] (bob): selector: `gpu` is not key=value"
        );
        assert!(err(&format!(
            "{}selector = \" , \"\n",
            entry("bob", "b", "viewer")
        ))
        .ends_with("selector: empty; leave it out to allow every agent"));
    }

    #[test]
    fn missing_fields_are_named() {
        assert_eq!(
            err("[[token]]\nsha256 = \"\"\n"),
            "token file /x: token[0]: name: missing"
        );
        assert_eq!(
            err("[[token]]\nname = \"bob\"\n"),
            "token file /x: token[0] (bob): sha256: missing"
        );
        let t = format!(
            "[[token]]\nname = \"bob\"\nsha256 = \"{}\"\n",
            digest_hex("b")
        );
        assert_eq!(err(&t), "token file /x: token[0] (bob): role: missing");
    }

    #[test]
    fn bad_names_are_refused_and_not_echoed() {
        let t = format!(
            "[[token]]\nname = \"a\\nb\"\nsha256 = \"{}\"\nrole = \"viewer\"\n",
            digest_hex("b")
        );
        assert_eq!(
            err(&t),
            "token file /x: token[0]: name: must not contain control characters"
        );
        assert!(err(&entry("  ", "b", "viewer")).ends_with("name: must not be empty"));
        let long = "n".repeat(MAX_NAME + 1);
        assert!(err(&entry(&long, "b", "viewer")).ends_with("longer than 128 bytes"));
    }

    #[test]
    fn selector_on_viewer_and_operator_but_not_admin() {
        for role in ["viewer", "operator"] {
            let t = parse(&format!("{}selector = \"team=a\"\n", entry("b", "b", role))).unwrap();
            assert!(t.authenticate("b").unwrap().selector.is_some());
        }
        let e = err(&format!(
            "{}selector = \"team=a\"\n",
            entry("b", "b", "admin")
        ));
        assert!(
            e.starts_with("token file /x: token[0] (b): selector: an admin"),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_and_bad_toml_are_parse_errors() {
        for text in [
            "[[tokens]]\nname = \"a\"\n",
            &format!("{}rol = \"viewer\"\n", entry("a", "a", "viewer")),
            "[[token]]\nname = 3\n",
            "[[token]\n",
            "token = \"x\"\n",
        ] {
            let e = parse(text).unwrap_err();
            assert!(matches!(e, AuthError::ParseTokenFile { .. }), "{text}: {e}");
            assert!(e.to_string().starts_with("token file /x: "), "{e}");
        }
    }

    #[test]
    fn debug_shows_principals_not_digests() {
        let t = parse(&entry("alice", "a", "viewer")).unwrap();
        let d = format!("{t:?}");
        assert!(d.contains("alice"));
        assert!(!d.contains(&digest_hex("a")));
    }

    fn write(dir: &tempfile::TempDir, text: &[u8], mode: u32) -> PathBuf {
        let p = dir.path().join("tokens.toml");
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn load_reads_a_private_file() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o600, 0o400, 0o640, 0o440] {
            let p = write(&dir, entry("a", "a", "viewer").as_bytes(), mode);
            assert_eq!(TokenTable::load(&p).unwrap().len(), 1);
        }
    }

    #[test]
    fn load_refuses_a_file_others_may_read() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o604, 0o660, 0o644, 0o602, 0o620] {
            let p = write(&dir, entry("a", "a", "viewer").as_bytes(), mode);
            let e = TokenTable::load(&p).unwrap_err();
            assert!(
                matches!(e, AuthError::InsecurePermissions { .. }),
                "{mode:o}"
            );
            let msg = e.to_string();
            assert!(msg.contains(&format!("{mode:o}")), "{msg}");
            assert!(msg.contains(&format!("chmod 600 {}", p.display())), "{msg}");
        }
    }

    #[test]
    fn load_errors_name_the_step() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.toml");
        let e = TokenTable::load(&missing).unwrap_err();
        assert!(matches!(e, AuthError::ReadTokenFile { .. }));
        assert!(e
            .to_string()
            .starts_with(&format!("token file {}: ", missing.display())));
        let p = write(&dir, b"\xff\xfe", 0o600);
        assert!(matches!(
            TokenTable::load(&p).unwrap_err(),
            AuthError::ReadTokenFile { .. }
        ));
    }
}
