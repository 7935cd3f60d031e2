//! The `publisher` binary as its own process, as deployments run it.

use std::time::Duration;

use futures_util::StreamExt;
use rt_tests::{ServiceProcess, TestDb, nats_client, nats_url, unique_prefix};
use serde_json::{Value, json};
use sqlx::Row;

#[tokio::test]
async fn the_publisher_binary_commits_then_sends_over_nats() {
    let db = TestDb::create().await;
    let prefix = unique_prefix();
    let nats = nats_url();
    let watcher = nats_client().await;
    let mut sub = watcher
        .subscribe(format!("{prefix}.events.orders"))
        .await
        .unwrap();
    watcher.flush().await.unwrap();
    let publisher = ServiceProcess::start(
        env!("CARGO_BIN_EXE_publisher"),
        &[
            ("DATABASE_URL", db.url.as_str()),
            ("RT_NATS_URL", nats.as_str()),
            ("RT_NATS_PREFIX", prefix.as_str()),
        ],
    );
    let res = reqwest::Client::new()
        .post(publisher.url("/v1/topics/orders/events"))
        .json(&json!({"data": {"id": 7}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(
        res.json::<Value>().await.unwrap(),
        json!({"topic": "orders", "seq": 1})
    );

    let mut conn = db.connect().await;
    let stored: i64 = sqlx::query("SELECT count(*) FROM rt_events WHERE topic = 'orders'")
        .fetch_one(&mut conn)
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 1, "the event is in the log");
    let msg = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("an envelope on NATS")
        .unwrap();
    let event = rt_core::proto::decode(&msg.payload).unwrap();
    assert_eq!((event.topic.as_str(), event.seq), ("orders", 1));

    let status = publisher.terminate();
    assert!(
        status.success(),
        "publisher stops cleanly on SIGTERM: {status}"
    );
}

/// A minimal OTLP/HTTP collector: records the body of every POST to
/// `/v1/traces` and answers 200.
async fn collector() -> (String, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    // One request per connection is enough for the exporter's
                    // batches; read the head, then the body by Content-Length.
                    let Ok(n) = conn.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if buf.len() < end + 4 + len {
                        continue;
                    }
                    if head.starts_with("post /v1/traces") {
                        let _ = tx.send(buf[end + 4..end + 4 + len].to_vec());
                    }
                    buf.drain(..end + 4 + len);
                    let _ = conn
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n")
                        .await;
                }
            });
        }
    });
    (url, rx)
}

#[tokio::test]
async fn spans_are_exported_over_otlp_with_the_callers_trace_id() {
    let db = TestDb::create().await;
    let (endpoint, mut exported) = collector().await;
    let publisher = ServiceProcess::start(
        env!("CARGO_BIN_EXE_publisher"),
        &[
            ("DATABASE_URL", db.url.as_str()),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ],
    );
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let res = reqwest::Client::new()
        .post(publisher.url("/v1/topics/traced/events"))
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .json(&json!({"data": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    // Stopping flushes the batch exporter.
    assert!(publisher.terminate().success());
    let id: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&trace_id[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let mut bodies: Vec<Vec<u8>> = Vec::new();
    let found = |bodies: &[Vec<u8>]| {
        let all = bodies.concat();
        all.windows(16).any(|w| w == id.as_slice()) && all.windows(12).any(|w| w == b"http.request")
    };
    while !found(&bodies) {
        match tokio::time::timeout(Duration::from_secs(10), exported.recv()).await {
            Ok(Some(body)) => bodies.push(body),
            _ => break,
        }
    }
    let all: Vec<u8> = bodies.concat();
    assert!(!bodies.is_empty(), "the collector received trace batches");
    assert!(
        all.windows(16).any(|w| w == id.as_slice()),
        "a span carries the caller's trace id"
    );
    assert!(
        all.windows(12).any(|w| w == b"http.request"),
        "the request span was exported"
    );
}
