//! What a later host agent needs to adopt an agent it finds in the keeper:
//! one small file per run directory (`agents/TAG/agent.pb`), replaced
//! atomically (write to a temporary file, then rename), so a reader sees
//! either the old whole file or the new whole file, never a torn one.

use std::path::Path;

use agentplane::proto::v1::AgentSpec;
use prost::Message;

/// The file's name in the run directory.
const FILE: &str = "agent.pb";

/// One agent as its run directory remembers it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Persisted {
    /// Agent id.
    #[prost(string, tag = "1")]
    pub id: String,
    /// The generation this host runs.
    #[prost(uint64, tag = "2")]
    pub generation: u64,
    /// The spec it was started with.
    #[prost(message, optional, tag = "3")]
    pub spec: Option<AgentSpec>,
    /// When this host took it, ms since the epoch.
    #[prost(int64, tag = "4")]
    pub created_at_ms: i64,
    /// Restarts so far.
    #[prost(uint32, tag = "5")]
    pub restarts: u32,
    /// Set while its run has ended and a restart waits out its backoff:
    /// when it is due, ms since the epoch.
    #[prost(int64, optional, tag = "6")]
    pub next_restart_at_ms: Option<i64>,
    /// Consecutive restarts so far (what the next backoff doubles from).
    #[prost(uint32, tag = "7")]
    pub consecutive: u32,
}

/// Replaces `dir`'s file with `p`.
pub fn write(dir: &Path, p: &Persisted) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = dir.join(format!("{FILE}.tmp"));
    // The spec's environment often carries secrets: the host agent's user's
    // alone, like the output beside it.
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?
        .write_all(&p.encode_to_vec())?;
    // No fsync: the file must survive the host agent, not the machine (a
    // machine that reboots has no agents left to adopt).
    std::fs::rename(&tmp, dir.join(FILE))
}

/// `dir`'s file.
pub fn read(dir: &Path) -> std::io::Result<Persisted> {
    let bytes = std::fs::read(dir.join(FILE))?;
    Persisted::decode(bytes.as_slice())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_file_reads_back_and_a_rewrite_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Persisted {
            id: "a".into(),
            generation: 3,
            spec: Some(AgentSpec {
                argv: vec!["sleep".into(), "1".into()],
                ..Default::default()
            }),
            created_at_ms: 7,
            restarts: 0,
            next_restart_at_ms: None,
            consecutive: 0,
        };
        write(dir.path(), &p).unwrap();
        assert_eq!(read(dir.path()).unwrap(), p);
        p.restarts = 2;
        p.next_restart_at_ms = Some(1_700_000_000_000);
        p.consecutive = 2;
        write(dir.path(), &p).unwrap();
        assert_eq!(read(dir.path()).unwrap(), p);
        assert!(!dir.path().join("agent.pb.tmp").exists());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "only the host agent's user reads it");
        std::fs::write(dir.path().join(FILE), b"\xff\xff").unwrap();
        assert!(read(dir.path()).is_err(), "a torn file is an error");
    }
}
