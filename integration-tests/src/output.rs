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

/// The numbers a counter agent printed, one per complete line. A read of
/// a log that is still being written can end inside a line (the file grows
/// a page at a time), so the unterminated tail is left out rather than
/// parsed as a smaller number.
pub fn counter_lines(text: &[u8]) -> Vec<u64> {
    let complete = match text.iter().rposition(|b| *b == b'\n') {
        Some(end) => &text[..=end],
        None => &[],
    };
    String::from_utf8_lossy(complete)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::counter_lines;

    #[test]
    fn an_unterminated_last_line_is_left_out() {
        assert_eq!(counter_lines(b"1\r\n2\n60"), vec![1, 2]);
        assert_eq!(counter_lines(b"1\n2\n"), vec![1, 2]);
        assert!(counter_lines(b"12").is_empty());
    }
}
