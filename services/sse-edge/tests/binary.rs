//! Two `sse-edge` processes behind one NATS, as deployments run them: both
//! deliver every event, and when one is killed mid-stream its clients
//! reconnect to the other with their Last-Event-ID and lose nothing.

use std::time::Duration;

use futures_util::StreamExt;
use rt_core::Context;
use rt_tests::{
    ServiceProcess, TestApp, TestDb, distributed_settings, nats_url, sse, unique_prefix,
};
use serde_json::{Value, json};

const EVENTS: u64 = 300;

/// Reads events from `urls[0]`, moving on to the next URL whenever the
/// stream breaks, until it has seq `EVENTS`. Returns the seqs and how many
/// times it reconnected.
async fn read_all(
    http: &reqwest::Client,
    urls: &[String],
    kill_after: Option<(u64, tokio::sync::oneshot::Sender<()>)>,
) -> (Vec<u64>, usize) {
    let mut got = Vec::new();
    let mut last_id: Option<String> = None;
    let mut kill_after = kill_after;
    let mut reconnects = 0;
    let mut url = urls.iter().cycle();
    'connect: while got.last() != Some(&EVENTS) {
        let target = url.next().unwrap();
        let mut stream = match sse::connect(
            http,
            &format!("{target}/v1/sse?topic=t"),
            last_id.as_deref(),
        )
        .await
        {
            Ok(s) => s,
            Err((status, body)) => panic!("{target} refused the stream: {status} {body}"),
        };
        loop {
            match tokio::time::timeout(Duration::from_secs(20), stream.next()).await {
                Ok(Some(Ok(event))) => {
                    let data: Value = serde_json::from_str(&event.data).unwrap();
                    got.push(data["seq"].as_u64().unwrap());
                    last_id = Some(event.id);
                    if let Some((at, _)) = &kill_after
                        && got.len() as u64 == *at
                    {
                        let (_, kill) = kill_after.take().unwrap();
                        let _ = kill.send(());
                    }
                    if got.last() == Some(&EVENTS) {
                        break 'connect;
                    }
                }
                // The edge went away: resume on the next one.
                Ok(Some(Err(_)) | None) => {
                    reconnects += 1;
                    continue 'connect;
                }
                Err(_) => panic!("no event within 20 s after {got:?}"),
            }
        }
    }
    (got, reconnects)
}

#[tokio::test]
async fn two_edges_deliver_everything_and_clients_of_a_killed_one_resume_on_the_other() {
    rt_tests::init_telemetry();
    let db = TestDb::create().await;
    let prefix = unique_prefix();
    let nats = nats_url();
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("RT_NATS_URL", nats.as_str()),
        ("RT_NATS_PREFIX", prefix.as_str()),
    ];
    let doomed = ServiceProcess::start(env!("CARGO_BIN_EXE_sse-edge"), &env);
    let survivor = ServiceProcess::start(env!("CARGO_BIN_EXE_sse-edge"), &env);
    let ctx = Context::connect(distributed_settings(&db.url, &prefix))
        .await
        .unwrap();
    let publisher = TestApp::serve(ctx, prefix, None, None);
    let http = reqwest::Client::new();

    let (kill_tx, kill_rx) = tokio::sync::oneshot::channel();
    let urls_a = [doomed.base.clone(), survivor.base.clone()];
    let urls_b = [survivor.base.clone()];
    let reader_a = read_all(&http, &urls_a, Some((50, kill_tx)));
    let reader_b = read_all(&http, &urls_b, None);
    let killer = async move {
        let _ = kill_rx.await;
        drop(doomed); // SIGKILL, mid-stream
    };
    let publish = async {
        for i in 1..=EVENTS {
            publisher.publish_ok("t", json!(i)).await;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    let ((got_a, reconnects_a), (got_b, _), (), ()) =
        tokio::join!(reader_a, reader_b, killer, publish);
    let want: Vec<u64> = (1..=EVENTS).collect();
    assert_eq!(got_b, want, "the surviving edge delivered every event");
    assert_eq!(
        got_a, want,
        "the moved client lost nothing and saw no duplicate"
    );
    assert!(
        reconnects_a >= 1,
        "the client really moved to the other edge"
    );
    let status = survivor.terminate();
    assert!(status.success());
}

/// A client that stops reading costs the server a bounded amount of memory:
/// the stream pulls only what the socket takes and the hub's ring is shared.
#[tokio::test]
async fn a_stalled_client_does_not_grow_the_servers_memory() {
    use tokio::io::AsyncReadExt;
    rt_tests::init_telemetry();
    let db = TestDb::create().await;
    let prefix = unique_prefix();
    let nats = nats_url();
    let edge = ServiceProcess::start(
        env!("CARGO_BIN_EXE_sse-edge"),
        &[
            ("DATABASE_URL", db.url.as_str()),
            ("RT_NATS_URL", nats.as_str()),
            ("RT_NATS_PREFIX", prefix.as_str()),
            ("RT_HUB_QUEUE", "64"),
            ("RT_TCP_SEND_BUFFER", "16384"),
        ],
    );
    let ctx = Context::connect(distributed_settings(&db.url, &prefix))
        .await
        .unwrap();
    let publisher = TestApp::serve(ctx, prefix, None, None);

    // A raw client with a small receive buffer: it reads the stream's start,
    // then nothing more.
    let addr = edge.base.trim_start_matches("http://").to_owned();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut tcp = socket.connect(addr.parse().unwrap()).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut tcp,
        format!("GET /v1/sse?topic=big HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tcp.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("200 OK"));
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Warm up, then send 20 MB of events the client never reads.
    publisher.publish_padded("big", 5, 2000).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = edge.rss_bytes();
    publisher.publish_padded("big", 100, 2000).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let grew = edge.rss_bytes().saturating_sub(before);
    assert!(
        grew < 8 << 20,
        "the server grew by {} KiB while 20 MB went to a stalled client",
        grew >> 10
    );
    drop(tcp);
    assert!(edge.terminate().success());
}
