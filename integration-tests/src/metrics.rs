//! Reading a server's `/metrics` as Prometheus would: where it listens (from
//! its log, as it was started on port 0), one scrape over plain HTTP, a
//! sample's value, and a check by a parser the project did not write
//! (the Python `prometheus_client`, in the venv `scripts/test` makes).

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cluster::Server;

/// The line a server logs once its metrics endpoint listens.
const LISTENING: &str = "metrics (plaintext HTTP) serving";

/// Where `server` (started with `--metrics-listen 127.0.0.1:0`) serves
/// `/metrics`; panics after 10 s without the log line.
pub async fn addr(server: &Server) -> String {
    crate::eventually(
        Duration::from_secs(10),
        &format!("`{LISTENING}` in {}", server.proc.log.display()),
        || async {
            let log = std::fs::read_to_string(&server.proc.log).unwrap_or_default();
            log.lines().filter(|l| l.contains(LISTENING)).find_map(|l| {
                let at = l.find("addr=")? + "addr=".len();
                l[at..].split_whitespace().next().map(str::to_owned)
            })
        },
    )
    .await
}

/// One `GET /metrics` of `addr`: the body, after checking the status and
/// content type.
pub async fn scrape(addr: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("send the request");
    let mut raw = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut raw))
        .await
        .expect("a scrape within 10 s")
        .expect("read the answer");
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    body.to_owned()
}

/// The value of the sample written exactly `series` (name and labels as
/// the text shows them), if there is one.
pub fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, v) = l.rsplit_once(' ')?;
        (name == series).then(|| v.parse().ok())?
    })
}

/// The sum of every sample of metric `name` (any labels).
pub fn sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            (metric == name).then(|| v.parse::<f64>().ok())?
        })
        .sum()
}

/// How many samples (lines that are not comments) the text has.
pub fn series(text: &str) -> usize {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count()
}

/// The venv `scripts/test` makes, with `prometheus_client` in it.
fn python() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/py-venv/bin/python")
}

/// Parses `text` with Python's `prometheus_client` (strict: any line it
/// cannot read fails); returns how many samples it read. Panics with what
/// the parser said.
pub fn parse_with_python(text: &str) -> usize {
    let py = python();
    assert!(
        py.exists(),
        "{} is missing: run scripts/test (it makes the venv with prometheus_client)",
        py.display()
    );
    let script = "import sys\n\
        from prometheus_client.parser import text_string_to_metric_families\n\
        n = sum(len(f.samples) for f in text_string_to_metric_families(sys.stdin.read()))\n\
        print(n)\n";
    let mut child = std::process::Command::new(&py)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run python");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(text.as_bytes()).expect("write the metrics");
    }
    let out = child.wait_with_output().expect("python ran");
    assert!(
        out.status.success(),
        "prometheus_client could not parse the metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a count")
}
