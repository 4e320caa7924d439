//! What tests read from `agentctl`'s output: stdout that must be JSON or
//! YAML from a successful run, stderr as text.

use serde_json::Value;

/// Stdout of a successful agentctl run; a failure fails the test with stderr.
pub fn ok_stdout(out: &std::process::Output) -> &[u8] {
    assert!(
        out.status.success(),
        "agentctl failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    &out.stdout
}

/// Parses `-o json` output.
pub fn json(out: &std::process::Output) -> Value {
    serde_json::from_slice(ok_stdout(out)).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Parses `-o yaml` output.
pub fn yaml(out: &std::process::Output) -> Value {
    serde_norway::from_slice(ok_stdout(out)).unwrap_or_else(|e| {
        panic!(
            "stdout is not YAML ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Stderr, as text.
pub fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
