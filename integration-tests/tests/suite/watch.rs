//! Watch tokens against the bounded event stream: a token whose following
//! events were trimmed is refused with OUT_OF_RANGE (through the API and by
//! `agentctl watch`, which exits 1), a current token and "0" still work, and a
//! watcher that falls behind the trim ends with OUT_OF_RANGE instead of
//! skipping the gap. The test trims the host events' stream (`ap:events`;
//! `ap:{hosts}:events` on a Redis Cluster, where a token holds one position
//! per stream) itself with `XTRIM`.

use std::time::Duration;

use agentplane::proto::v1::{Event, EventType, WatchAgentsRequest};
use agentplane::registry::{Connection, SHARDS};
use agentplane_integration_tests::TestCluster;
use tonic::Code;

/// Appends `n` host events naming `host` to `stream`; returns their ids in
/// order.
async fn add_events(conn: &mut Connection, stream: &str, n: usize, host: &str) -> Vec<String> {
    let mut pipe = redis::pipe();
    for _ in 0..n {
        pipe.cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg("type")
            .arg("HOST_UP")
            .arg("host")
            .arg(host)
            .arg("at")
            .arg(0);
    }
    pipe.query_async(conn).await.expect("XADD")
}

/// `XTRIM stream MAXLEN n` (exact).
async fn trim_to(conn: &mut Connection, stream: &str, n: usize) {
    let _: u64 = redis::cmd("XTRIM")
        .arg(stream)
        .arg("MAXLEN")
        .arg(n)
        .query_async(conn)
        .await
        .expect("XTRIM");
}

/// The token at host event `id` (on a Cluster, at the start of every
/// shard's stream too).
fn token_at(cluster: &TestCluster, id: &str) -> String {
    if cluster.on_redis_cluster() {
        std::iter::once(id)
            .chain(std::iter::repeat_n("0-0", usize::from(SHARDS)))
            .collect::<Vec<_>>()
            .join(",")
    } else {
        id.to_owned()
    }
}

/// The host events' position in `token`.
fn host_position(token: &str) -> String {
    token.split(',').next().unwrap_or_default().to_owned()
}

fn watch(token: &str) -> WatchAgentsRequest {
    WatchAgentsRequest {
        resume_token: token.to_owned(),
        agent_id: String::new(),
    }
}

/// The next message of a watch stream, waiting at most 10 s.
async fn next(s: &mut tonic::Streaming<Event>) -> Result<Option<Event>, tonic::Status> {
    tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("a watch message within 10s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_whose_events_were_trimmed_is_out_of_range_and_a_current_one_still_works() {
    let cluster = TestCluster::builder().start().await;
    let mut conn = cluster.redis_conn().await;
    let stream = cluster.keys().host_events();
    let old = add_events(&mut conn, &stream, 10, "filler").await;
    let kept = add_events(&mut conn, &stream, 5, "kept").await;
    trim_to(&mut conn, &stream, 5).await;
    let mut c = cluster.client().await;
    let old0 = token_at(&cluster, &old[0]);

    // The events after old[0] (old[1..]) are gone.
    let refused = c
        .watch_agents(watch(&old0))
        .await
        .expect_err("a token older than the stream keeps is refused");
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    assert!(
        refused
            .message()
            .contains(&format!("events before {} were trimmed", kept[0]))
            && refused.message().contains("list again and watch from now"),
        "{}",
        refused.message()
    );

    // agentctl says so and exits 1 (without the check it would print the
    // oldest retained event and exit 0: `--count 1` keeps it from hanging).
    let out = cluster.agentctl(&["watch", "--since", &old0, "--count", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains("OUT_OF_RANGE") && stderr.contains("were trimmed"),
        "stderr: {stderr}"
    );
    assert!(out.stdout.is_empty(), "no event printed");

    // A retained token continues right after it.
    let kept2 = token_at(&cluster, &kept[2]);
    let mut s = c.watch_agents(watch(&kept2)).await.unwrap().into_inner();
    let bookmark = next(&mut s).await.unwrap().expect("bookmark");
    assert_eq!(bookmark.r#type(), EventType::Bookmark);
    assert_eq!(bookmark.token, kept2);
    for want in &kept[3..] {
        let ev = next(&mut s).await.unwrap().expect("event");
        assert_eq!(&host_position(&ev.token), want);
    }
    // "0" is the oldest retained event, whatever was trimmed.
    let mut s = c.watch_agents(watch("0")).await.unwrap().into_inner();
    assert_eq!(
        next(&mut s).await.unwrap().expect("bookmark").r#type(),
        EventType::Bookmark
    );
    let first = next(&mut s).await.unwrap().expect("event");
    assert_eq!(host_position(&first.token), kept[0]);
    let out = cluster.agentctl(&[
        "watch",
        "--since",
        &token_at(&cluster, &kept[3]),
        "--count",
        "1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("kept"));
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_falls_behind_the_trim_ends_with_out_of_range_not_a_gap() {
    let cluster = TestCluster::builder().start().await;
    let mut conn = cluster.redis_conn().await;
    let stream = cluster.keys().host_events();
    let mut c = cluster.client().await;
    // Big events (a 1 KB host name), so the buffers between the replica's
    // reader and this client (channel, HTTP/2 windows and send buffers) hold
    // well under the 4000 that the trim removes.
    let host = "x".repeat(1000);
    let mut s = c.watch_agents(watch("")).await.unwrap().into_inner();
    let bookmark = next(&mut s).await.unwrap().expect("bookmark");
    let added = add_events(&mut conn, &stream, 5000, &host).await;
    trim_to(&mut conn, &stream, 1000).await;

    // Only now does the client read: what it gets is a gapless prefix of
    // what was added, then OUT_OF_RANGE.
    let mut got = Vec::new();
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(5), s.message()).await {
            Ok(Ok(Some(ev))) if ev.host == host => got.push(host_position(&ev.token)),
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) => break "the stream ended".to_owned(),
            Ok(Err(status)) => break format!("{:?}: {}", status.code(), status.message()),
            Err(_) => break "no message for 5s".to_owned(),
        }
    };
    let prefix = got.len();
    assert!(
        end.starts_with("OutOfRange") && end.contains("were trimmed"),
        "the watch ends with OUT_OF_RANGE, not a gap; it ended with `{end}` after {prefix} \
         events from {} (first {:?}, last {:?}; the trim kept {}..)",
        bookmark.token,
        got.first(),
        got.last(),
        added[4000],
    );
    assert!(prefix < 4000, "the reader fell behind the trim: {prefix}");
    assert_eq!(got, added[..prefix], "what it got has no gap");
    cluster.finish().await;
}
