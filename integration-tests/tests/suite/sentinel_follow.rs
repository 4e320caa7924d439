//! The registry's Sentinel follower, against fake sentinels (a few lines of
//! RESP over TCP that name a fixed address) in front of a real master and
//! its real replica: a sentinel that still names a demoted master (READONLY)
//! is passed over for the next one.

use std::time::Duration;

use agentplane::proto::v1::{Agent, AgentSpec, AgentState};
use agentplane::registry::{RedisOptions, Registry, SentinelTarget};
use agentplane_integration_tests::RedisServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Serves RESP on a port of its own: every `SENTINEL …` gets `port` on
/// 127.0.0.1, anything else `+OK`. Returns `127.0.0.1:PORT`.
async fn fake_sentinel(names: u16) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = sock.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    // Answer each complete command (arrays of bulk strings).
                    while let Some((len, is_sentinel)) = one_command(&buf) {
                        buf.drain(..len);
                        let reply = if is_sentinel {
                            let port = names.to_string();
                            format!("*2\r\n$9\r\n127.0.0.1\r\n${}\r\n{port}\r\n", port.len())
                        } else {
                            "+OK\r\n".to_owned()
                        };
                        if sock.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// The length of the first complete RESP array command in `buf`, and
/// whether it is a SENTINEL command.
fn one_command(buf: &[u8]) -> Option<(usize, bool)> {
    let text = std::str::from_utf8(buf).ok()?;
    let mut lines = text.split("\r\n");
    let n: usize = lines.next()?.strip_prefix('*')?.parse().ok()?;
    let mut used = text.find("\r\n")? + 2;
    let mut first = None;
    for _ in 0..n {
        let head = lines.next()?;
        let len: usize = head.strip_prefix('$')?.parse().ok()?;
        let word = lines.next()?;
        if word.len() != len {
            return None;
        }
        first.get_or_insert_with(|| word.to_ascii_uppercase());
        used += head.len() + 2 + len + 2;
    }
    if used > buf.len() {
        return None;
    }
    Some((used, first.as_deref() == Some("SENTINEL")))
}

#[tokio::test]
async fn a_sentinel_naming_a_demoted_master_is_passed_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let master = RedisServer::start(dir.path(), &[]).await;
    let replica_dir = dir.path().join("replica");
    std::fs::create_dir_all(&replica_dir).expect("dir");
    let replica = RedisServer::start_replica(&replica_dir, &[], "127.0.0.1", master.port()).await;
    // The first sentinel is behind: it names the replica (a demoted master).
    let stale = fake_sentinel(replica.port()).await;
    let right = fake_sentinel(master.port()).await;
    let options = RedisOptions {
        sentinel: Some(SentinelTarget {
            sentinels: vec![stale, right],
            master_name: "m".into(),
        }),
        replica_ack: Duration::ZERO,
        ..Default::default()
    };
    let registry = Registry::connect("redis://127.0.0.1:1", "ap", &options).expect("registry");
    let agent = |id: &str| Agent {
        id: id.to_owned(),
        spec: Some(AgentSpec {
            argv: vec!["true".into()],
            ..Default::default()
        }),
        state: AgentState::Pending as i32,
        host: "h1".into(),
        generation: 1,
        ..Default::default()
    };
    // The first write goes where the stale sentinel says and is refused.
    let first = registry.create_agent(&agent("a1")).await;
    assert!(
        first
            .as_ref()
            .is_err_and(|e| e.to_string().contains("ReadOnly")),
        "{first:?}"
    );
    // The next asks again, passes over the sentinel naming the server that
    // refused, and writes on the master.
    registry
        .create_agent(&agent("a2"))
        .await
        .expect("written on the master");
    let on_master: bool = redis::cmd("EXISTS")
        .arg("ap:agent:a2")
        .query_async(&mut master.conn().await)
        .await
        .expect("EXISTS");
    assert!(on_master);
}
