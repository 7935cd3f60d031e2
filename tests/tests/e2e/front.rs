//! The connection front: streams opened on a fresh connection are served on
//! the socket directly, everything else by the HTTP server, and a client
//! cannot tell the two apart.

use std::time::Duration;

use rt_tests::{Engines, TestApp, WS_UPGRADE_HEADERS};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Reads a response head (through its blank line) and returns it; what
/// follows it stays in `rest`.
async fn read_head(tcp: &mut TcpStream, rest: &mut Vec<u8>) -> String {
    let mut buf = std::mem::take(rest);
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            *rest = buf.split_off(end + 4);
            return String::from_utf8(buf).expect("an ASCII head");
        }
        let mut chunk = [0; 1024];
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut chunk))
            .await
            .expect("a response head within 10 s")
            .expect("read");
        assert!(n > 0, "closed before a whole head: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads until `needle` has arrived; returns everything read.
async fn read_until(tcp: &mut TcpStream, rest: &mut Vec<u8>, needle: &str) -> String {
    let mut buf = std::mem::take(rest);
    while !String::from_utf8_lossy(&buf).contains(needle) {
        let mut chunk = [0; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("{needle:?} within 10 s; got {buf:?}"))
            .expect("read");
        assert!(n > 0, "closed before {needle:?}: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// The head's lines without the status line's reason and the `date` header,
/// sorted: what both paths must agree on.
fn comparable(head: &str) -> Vec<String> {
    let mut lines: Vec<String> = head
        .lines()
        .filter(|l| !l.is_empty() && !l.to_ascii_lowercase().starts_with("date:"))
        .map(str::to_ascii_lowercase)
        .collect();
    lines.sort();
    lines
}

async fn connect(app: &TestApp) -> TcpStream {
    TcpStream::connect(app.base.trim_start_matches("http://"))
        .await
        .expect("connect")
}

fn direct(app: &TestApp, route: &str) -> u64 {
    app.ctx
        .metrics
        .streams_direct
        .with_label_values(&[route])
        .get()
}

#[tokio::test]
async fn a_stream_on_a_fresh_connection_is_direct_and_answers_as_the_http_server_does() {
    let app = TestApp::spawn(Engines::Embedded, |s| {
        s.cors_origins = vec!["https://app.example".into()];
    })
    .await;
    let host = app.base.trim_start_matches("http://").to_owned();
    let request = format!(
        "GET /v1/sse?topic=f HTTP/1.1\r\nHost: {host}\r\nOrigin: https://app.example\r\n\r\n"
    );

    let mut fresh = connect(&app).await;
    fresh.write_all(request.as_bytes()).await.unwrap();
    let mut fresh_rest = Vec::new();
    let fresh_head = read_head(&mut fresh, &mut fresh_rest).await;
    assert_eq!(direct(&app, "/v1/sse"), 1, "{fresh_head}");

    // The same request after another on a kept-alive connection.
    let mut reused = connect(&app).await;
    reused
        .write_all(format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut reused_rest = Vec::new();
    let health = read_head(&mut reused, &mut reused_rest).await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let length: usize = health
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(|v| v.trim().parse().unwrap())
        })
        .expect("a sized health answer");
    while reused_rest.len() < length {
        let mut chunk = [0; 256];
        let n = reused.read(&mut chunk).await.unwrap();
        reused_rest.extend_from_slice(&chunk[..n]);
    }
    reused_rest.drain(..length);
    reused.write_all(request.as_bytes()).await.unwrap();
    let reused_head = read_head(&mut reused, &mut reused_rest).await;
    assert_eq!(
        direct(&app, "/v1/sse"),
        1,
        "the second stream went through the HTTP server"
    );

    assert!(
        fresh_head.starts_with("HTTP/1.1 200 OK\r\n"),
        "{fresh_head}"
    );
    assert_eq!(comparable(&fresh_head), comparable(&reused_head));
    assert!(
        fresh_head.contains("access-control-allow-origin: https://app.example"),
        "{fresh_head}"
    );
    assert!(
        fresh_head.contains("transfer-encoding: chunked"),
        "{fresh_head}"
    );
    assert!(
        fresh_head.to_ascii_lowercase().contains("\r\ndate: "),
        "{fresh_head}"
    );

    // Both carry the same events, chunk-framed.
    let seq = app.publish_ok("f", json!({"n": 1})).await;
    for (tcp, rest) in [
        (&mut fresh, &mut fresh_rest),
        (&mut reused, &mut reused_rest),
    ] {
        let body = read_until(tcp, rest, "\"n\":1").await;
        assert!(body.contains(&format!("id: f:{seq}\n")), "{body:?}");
        assert!(body.starts_with("D\r\nretry: 2000\n\n\r\n"), "{body:?}");
    }
}

#[tokio::test]
async fn a_refused_stream_request_gets_the_http_servers_json_error() {
    let app = TestApp::spawn(Engines::Embedded, |_| {}).await;
    let mut tcp = connect(&app).await;
    tcp.write_all(b"GET /v1/sse?topic=no%20spaces HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let head = read_head(&mut tcp, &mut rest).await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert!(head.contains("content-type: application/json"), "{head}");
    let body = read_until(&mut tcp, &mut rest, "}}").await;
    let error: Value = serde_json::from_str(&body).expect("a JSON error body");
    assert_eq!(error["error"]["code"], "invalid_topic");
    assert_eq!(direct(&app, "/v1/sse"), 0);
    let answered = app
        .ctx
        .metrics
        .http_requests
        .with_label_values(&["/v1/sse", "400"])
        .get();
    assert_eq!(answered, 1);

    // The connection is the HTTP server's now: kept alive for the next request.
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let next = read_head(&mut tcp, &mut rest).await;
    assert!(next.starts_with("HTTP/1.1 200"), "{next}");
}

#[tokio::test]
async fn a_head_that_arrives_in_pieces_is_still_served_directly() {
    let app = TestApp::spawn(Engines::Embedded, |_| {}).await;
    let mut tcp = connect(&app).await;
    tcp.set_nodelay(true).unwrap();
    tcp.write_all(b"GET /v1/sse?top").await.unwrap();
    tokio::time::sleep(Duration::from_millis(60)).await;
    tcp.write_all(b"ic=pieces HTTP/1.1\r\nHo").await.unwrap();
    tokio::time::sleep(Duration::from_millis(60)).await;
    tcp.write_all(b"st: x\r\n\r\n").await.unwrap();
    let mut rest = Vec::new();
    let head = read_head(&mut tcp, &mut rest).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(direct(&app, "/v1/sse"), 1);
    app.publish_ok("pieces", json!(1)).await;
    read_until(&mut tcp, &mut rest, "id: pieces:1\n").await;
}

#[tokio::test]
async fn a_client_that_leaves_a_direct_stream_frees_it() {
    let app = TestApp::spawn(Engines::Embedded, |_| {}).await;
    let open = || {
        app.ctx
            .metrics
            .streams_open
            .with_label_values(&["sse"])
            .get()
    };
    let mut tcp = connect(&app).await;
    tcp.write_all(b"GET /v1/sse?topic=leave HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    read_head(&mut tcp, &mut rest).await;
    assert_eq!(open(), 1);
    assert_eq!(direct(&app, "/v1/sse"), 1);
    drop(tcp);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while open() != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stream was not freed within 10 s of its client leaving"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A masked client text frame.
fn client_text(payload: &[u8]) -> Vec<u8> {
    let mask = [7u8, 1, 9, 3];
    let mut frame = vec![
        0x81,
        0x80 | u8::try_from(payload.len()).expect("a short frame"),
    ];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

#[tokio::test]
async fn a_websocket_frame_sent_with_the_upgrade_is_read() {
    let app = TestApp::spawn(Engines::Embedded, |_| {}).await;
    let mut tcp = connect(&app).await;
    // The upgrade request and a first frame in one write.
    let mut bytes =
        format!("GET /v1/ws HTTP/1.1\r\nHost: x\r\n{WS_UPGRADE_HEADERS}\r\n").into_bytes();
    bytes.extend(client_text(br#"{"op":"ping","ref":"early"}"#));
    tcp.write_all(&bytes).await.unwrap();
    let mut rest = Vec::new();
    let head = read_head(&mut tcp, &mut rest).await;
    assert!(
        head.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
        "{head}"
    );
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("\r\nconnection: upgrade\r\n"), "{head}");
    assert!(lower.contains("\r\nupgrade: websocket\r\n"), "{head}");
    assert!(
        lower.contains("\r\nsec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=\r\n"),
        "{head}"
    );
    assert_eq!(direct(&app, "/v1/ws"), 1);
    let frames = read_until(&mut tcp, &mut rest, "early").await;
    assert!(
        frames.contains(r#"{"op":"pong","ref":"early"}"#),
        "{frames:?}"
    );
}

#[tokio::test]
async fn with_direct_streams_off_every_stream_goes_through_the_http_server() {
    let app = TestApp::spawn(Engines::Embedded, |s| s.direct_streams = false).await;
    let mut tcp = connect(&app).await;
    tcp.write_all(b"GET /v1/sse?topic=off HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let head = read_head(&mut tcp, &mut rest).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    app.publish_ok("off", json!(1)).await;
    read_until(&mut tcp, &mut rest, "id: off:1\n").await;
    assert_eq!(direct(&app, "/v1/sse"), 0);
}
