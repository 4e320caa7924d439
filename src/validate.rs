//! Input validation shared by the control plane, the host agent and the CLI.
//! Every error names the request field, so a user knows what to fix.

use crate::proto::v1::AgentSpec;

/// Most arguments in one argv.
pub const MAX_ARGV: usize = 4096;
/// Most bytes of argv plus env, whole (Linux's own limit is about 2 MiB).
pub const MAX_ARGV_ENV_BYTES: usize = 1024 * 1024;
/// Most labels on one agent.
pub const MAX_LABELS: usize = 64;
/// Smallest output pipe capacity per agent.
pub const MIN_LOG_BUFFER: u64 = 64 * 1024;
/// Largest output pipe capacity per agent.
pub const MAX_LOG_BUFFER: u64 = 16 * 1024 * 1024;
/// Largest on-disk output cap per agent.
pub const MAX_LOG_BYTES: u64 = 1 << 40;
/// Smallest on-disk output cap per agent (0 means the default).
pub const MIN_LOG_BYTES: u64 = 256 * 1024;

/// Largest `--max-log-streams` a host agent accepts. The control plane sizes
/// its HTTP/2 windows to a host from it: every stream a slow client stalls
/// holds its stream window of the connection's window, and the connection
/// must never fill with stalled streams (see control-plane/src/hosts.rs).
pub const MAX_LOG_STREAMS_PER_HOST: u32 = 4000;

/// Longest stop grace accepted (a day: beyond it a stop would never be seen to end).
pub const MAX_GRACE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// One invalid field: maps to INVALID_ARGUMENT with `field: reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ValidationError {
    /// The request field, dotted (`spec.argv`).
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl ValidationError {
    /// A new error for `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

type Result<T = ()> = std::result::Result<T, ValidationError>;

/// Most bytes of a caller's value quoted back in an error.
const MAX_QUOTED: usize = 64;

/// A caller's value for an error message, shortened to [`MAX_QUOTED`] bytes
/// (and its length) when longer. The message goes back in the
/// `grpc-message` trailer, and an HTTP/2 client refuses a header block over
/// its limit (16 KiB in hyper): quoting a 4 MB value whole would turn
/// INVALID_ARGUMENT into a protocol error that names no field.
pub fn quote(s: &str) -> String {
    if s.len() <= MAX_QUOTED {
        return s.to_owned();
    }
    let mut end = MAX_QUOTED;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &s[..end], s.len())
}

fn charset(field: &str, s: &str, what: &str, max: usize, ok: impl Fn(char) -> bool) -> Result {
    if s.is_empty() {
        return Err(ValidationError::new(
            field,
            format!("{what} must not be empty"),
        ));
    }
    if s.len() > max {
        return Err(ValidationError::new(
            field,
            format!("{what} is {} bytes long, at most {max} allowed", s.len()),
        ));
    }
    if let Some(c) = s.chars().find(|c| !ok(*c)) {
        return Err(ValidationError::new(
            field,
            format!("{what} `{s}` contains {c:?}, which is not allowed"),
        ));
    }
    Ok(())
}

/// An agent id as the server issues them: lowercase letters and digits.
pub fn agent_id(field: &str, id: &str) -> Result {
    charset(field, id, "agent id", 64, |c| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'
    })
}

/// A host id: letters, digits, `.`, `_`, `-`; at most 253 characters (a
/// Kubernetes node name or a DNS name fits).
pub fn host_id(field: &str, id: &str) -> Result {
    charset(field, id, "host id", 253, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
    })?;
    // It names directories (cgroups) and certificate names.
    if id.chars().all(|c| c == '.') {
        return Err(ValidationError::new(
            field,
            format!("host id `{id}` must have a letter, digit, `_` or `-`"),
        ));
    }
    Ok(())
}

/// An agent name: a DNS label (lowercase letters, digits, `-`, not at the ends).
pub fn name(field: &str, n: &str) -> Result {
    charset(field, n, "name", 63, |c| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'
    })?;
    if n.starts_with('-') || n.ends_with('-') {
        return Err(ValidationError::new(
            field,
            format!("name `{n}` must start and end with a letter or digit"),
        ));
    }
    Ok(())
}

/// A new agent's name: also never of an id's shape, since commands take an
/// id or a name in one place. Checked where agents are made (the control
/// plane's spawn), not on every spec, so an agent named before this rule
/// still starts again.
pub fn new_name(field: &str, n: &str) -> Result {
    name(field, n)?;
    if crate::ids::is_agent_id(n) {
        return Err(ValidationError::new(
            field,
            format!("name `{n}` has the shape of an agent id (26 base32 characters); pick another"),
        ));
    }
    Ok(())
}

/// An idempotency key.
pub fn request_id(field: &str, r: &str) -> Result {
    charset(field, r, "request id", 128, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')
    })
}

/// A label key: an optional DNS prefix and `/`, then a name of letters, digits, `-_.`.
pub fn label_key(field: &str, k: &str) -> Result {
    charset(field, k, "label key", 253, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')
    })
}

/// A label value: may be empty; letters, digits, `-_.`; at most 63 characters.
pub fn label_value(field: &str, v: &str) -> Result {
    if v.is_empty() {
        return Ok(());
    }
    charset(field, v, "label value", 63, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
    })
}

/// A whole agent spec, as the control plane receives it.
pub fn spec(s: &AgentSpec) -> Result {
    if !s.name.is_empty() {
        name("spec.name", &s.name)?;
    }
    if s.argv.is_empty() {
        return Err(ValidationError::new(
            "spec.argv",
            "must not be empty: give the program to run",
        ));
    }
    if s.argv[0].is_empty() {
        return Err(ValidationError::new(
            "spec.argv",
            "argv[0] must not be empty",
        ));
    }
    if s.argv.len() > MAX_ARGV {
        return Err(ValidationError::new(
            "spec.argv",
            format!("{} arguments, at most {MAX_ARGV} allowed", s.argv.len()),
        ));
    }
    if s.argv.iter().any(|a| a.contains('\0')) {
        return Err(ValidationError::new(
            "spec.argv",
            "arguments must not contain NUL bytes",
        ));
    }
    let mut bytes: usize = s.argv.iter().map(|a| a.len() + 1).sum();
    for (k, v) in &s.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(ValidationError::new(
                "spec.env",
                format!(
                    "`{}` is not a valid variable name (no `=`, not empty)",
                    quote(k)
                ),
            ));
        }
        if v.contains('\0') {
            return Err(ValidationError::new(
                "spec.env",
                format!("the value of `{}` contains a NUL byte", quote(k)),
            ));
        }
        bytes += k.len() + v.len() + 2;
    }
    if bytes > MAX_ARGV_ENV_BYTES {
        return Err(ValidationError::new(
            "spec.env",
            format!("argv and env take {bytes} bytes, at most {MAX_ARGV_ENV_BYTES} allowed"),
        ));
    }
    if !s.cwd.is_empty() && !s.cwd.starts_with('/') {
        return Err(ValidationError::new(
            "spec.cwd",
            format!("`{}` must be an absolute path", quote(&s.cwd)),
        ));
    }
    if s.labels.len() > MAX_LABELS {
        return Err(ValidationError::new(
            "spec.labels",
            format!("{} labels, at most {MAX_LABELS} allowed", s.labels.len()),
        ));
    }
    for (k, v) in &s.labels {
        label_key("spec.labels", k)?;
        label_value("spec.labels", v)?;
    }
    if let Some(p) = &s.placement {
        if !p.host.is_empty() {
            host_id("spec.placement.host", &p.host)?;
        }
        crate::labels::Selector::parse("spec.placement.label_selector", &p.label_selector)?;
    }
    if let Some(g) = &s.stop_grace {
        grace("spec.stop_grace", g)?;
    }
    if let Some(d) = &s.stop_after_disconnect {
        grace("spec.stop_after_disconnect", d)?;
    }
    crate::cgroups::Resources::from_proto(s.resources.as_ref())?;
    bytes_or_default(
        "spec.log_buffer_bytes",
        s.log_buffer_bytes,
        MIN_LOG_BUFFER..=MAX_LOG_BUFFER,
        "128 KiB",
    )?;
    bytes_or_default(
        "spec.log_max_bytes",
        s.log_max_bytes,
        MIN_LOG_BYTES..=MAX_LOG_BYTES,
        "64 MiB",
    )?;
    Ok(())
}

/// A byte size: 0 (the default) or within `range`.
fn bytes_or_default(
    field: &str,
    n: u64,
    range: std::ops::RangeInclusive<u64>,
    default: &str,
) -> Result {
    if n == 0 || range.contains(&n) {
        return Ok(());
    }
    Err(ValidationError::new(
        field,
        format!(
            "{n} bytes; give 0 (the default, {default}) or from {} KiB to {} MiB",
            range.start() >> 10,
            range.end() >> 20
        ),
    ))
}

/// A stop grace: not negative, at most [`MAX_GRACE`].
pub fn grace(field: &str, g: &prost_types::Duration) -> Result {
    if g.seconds < 0 || g.nanos < 0 {
        return Err(ValidationError::new(field, "must not be negative"));
    }
    if crate::time::duration_from_proto(g) > MAX_GRACE {
        return Err(ValidationError::new(field, "must be at most 24h"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok_spec() -> AgentSpec {
        AgentSpec {
            argv: vec!["sleep".into(), "1".into()],
            ..Default::default()
        }
    }

    #[test]
    fn accepts_a_plain_spec() {
        assert_eq!(spec(&ok_spec()), Ok(()));
    }

    #[test]
    fn names_the_field() {
        let mut s = ok_spec();
        s.argv.clear();
        assert_eq!(spec(&s).unwrap_err().field, "spec.argv");
        let mut s = ok_spec();
        s.name = "Bad_Name".into();
        assert_eq!(spec(&s).unwrap_err().field, "spec.name");
        let mut s = ok_spec();
        s.name = "-x".into();
        assert_eq!(spec(&s).unwrap_err().field, "spec.name");
        let mut s = ok_spec();
        s.env.insert("A=B".into(), "1".into());
        assert_eq!(spec(&s).unwrap_err().field, "spec.env");
        let mut s = ok_spec();
        s.cwd = "relative".into();
        assert_eq!(spec(&s).unwrap_err().field, "spec.cwd");
        let mut s = ok_spec();
        s.labels.insert("k".into(), "bad value".into());
        assert_eq!(spec(&s).unwrap_err().field, "spec.labels");
        let mut s = ok_spec();
        s.placement = Some(crate::proto::v1::Placement {
            host: "h 1".into(),
            label_selector: String::new(),
        });
        assert_eq!(spec(&s).unwrap_err().field, "spec.placement.host");
        let mut s = ok_spec();
        s.stop_grace = Some(prost_types::Duration {
            seconds: 90_000,
            nanos: 0,
        });
        assert_eq!(spec(&s).unwrap_err().field, "spec.stop_grace");
        let mut s = ok_spec();
        s.log_buffer_bytes = 1024;
        assert_eq!(spec(&s).unwrap_err().field, "spec.log_buffer_bytes");
        s.log_buffer_bytes = MIN_LOG_BUFFER;
        assert_eq!(spec(&s), Ok(()));
        s.log_max_bytes = 1000;
        assert_eq!(spec(&s).unwrap_err().field, "spec.log_max_bytes");
    }

    #[test]
    fn ids() {
        assert!(agent_id("id", "01jabc").is_ok());
        assert!(agent_id("id", "").is_err());
        assert!(agent_id("id", "../x").is_err());
        assert!(host_id("h", "node-1.dc_2").is_ok());
        assert!(host_id("h", "a:b").is_err());
        assert!(host_id("h", "..").is_err() && host_id("h", ".").is_err());
        assert!(request_id("r", "req-1:abc").is_ok());
        assert!(request_id("r", "a b").is_err());
    }
}

#[cfg(test)]
mod props;
