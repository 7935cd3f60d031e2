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
    wait_for(
        || open() == 0,
        "the stream was not freed after its client left",
    )
    .await;
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

/// The head and sized body of the next response on `tcp` (a `304` may have
/// no length: it has no body).
async fn read_sized(tcp: &mut TcpStream, rest: &mut Vec<u8>) -> (String, String) {
    let head = read_head(tcp, rest).await;
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(|v| v.trim().parse().expect("a length"))
        })
        .or_else(|| head.starts_with("HTTP/1.1 304").then_some(0))
        .unwrap_or_else(|| panic!("a sized answer: {head}"));
    while rest.len() < length {
        let mut chunk = [0; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut chunk))
            .await
            .expect("a body within 10 s")
            .expect("read");
        assert!(n > 0, "closed before the whole body: {head}");
        rest.extend_from_slice(&chunk[..n]);
    }
    let body: Vec<u8> = rest.drain(..length).collect();
    (head, String::from_utf8(body).expect("a UTF-8 body"))
}

fn answered_directly(app: &TestApp, route: &str) -> u64 {
    app.ctx
        .metrics
        .requests_direct
        .with_label_values(&[route])
        .get()
}

/// A poll body without its events' commit times, which differ between
/// two publishes.
fn without_times(body: &str) -> String {
    if body.is_empty() {
        return String::new();
    }
    let mut body: Value = serde_json::from_str(body).expect("a JSON body");
    if let Some(events) = body["events"].as_array_mut() {
        for event in events {
            event
                .as_object_mut()
                .expect("an event object")
                .remove("time");
        }
    }
    body.to_string()
}

const TOPIC_EVENTS: &str = "/v1/topics/{topic:[^/]*}/events";

/// The polls every path must answer alike: a short poll that finds nothing,
/// a long poll woken by a publish, a `304`, an error, several topics.
async fn poll_answers(
    app: &TestApp,
    tcp: &mut TcpStream,
    rest: &mut Vec<u8>,
    topic: &str,
) -> Vec<(String, String)> {
    let host = "Host: x\r\nOrigin: https://app.example\r\n";
    let mut answers = Vec::new();
    let ask = async |tcp: &mut TcpStream, target: String, extra: &str| {
        let request = format!("GET {target} HTTP/1.1\r\n{host}{extra}\r\n");
        tcp.write_all(request.as_bytes()).await.unwrap();
    };
    ask(tcp, format!("/v1/topics/{topic}/events?wait=0"), "").await;
    answers.push(read_sized(tcp, rest).await);
    ask(
        tcp,
        format!("/v1/topics/{topic}/events?after=0&wait=10"),
        "",
    )
    .await;
    // The poll is waiting: the publish wakes it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let seq = app.publish_ok(topic, json!({"n": 1})).await;
    answers.push(read_sized(tcp, rest).await);
    let etag = answers[1]
        .0
        .lines()
        .find_map(|l| l.strip_prefix("etag: "))
        .expect("an etag")
        .to_owned();
    let if_none_match = format!("If-None-Match: {etag}\r\n");
    ask(
        tcp,
        format!("/v1/topics/{topic}/events?after=0"),
        &if_none_match,
    )
    .await;
    answers.push(read_sized(tcp, rest).await);
    ask(tcp, format!("/v1/topics/{topic}/events?after=x"), "").await;
    answers.push(read_sized(tcp, rest).await);
    ask(
        tcp,
        format!("/v1/events?topic={topic}&topic=other&wait=0"),
        "",
    )
    .await;
    answers.push(read_sized(tcp, rest).await);
    assert!(
        answers[1].1.contains(&format!("\"seq\":{seq}")),
        "{answers:?}"
    );
    answers
}

#[tokio::test]
async fn polls_on_a_kept_alive_connection_are_answered_directly_as_the_http_server_answers_them() {
    let app = TestApp::spawn(Engines::Embedded, |s| {
        s.cors_origins = vec!["https://app.example".into()];
    })
    .await;
    let mut tcp = connect(&app).await;
    let mut rest = Vec::new();
    let direct = poll_answers(&app, &mut tcp, &mut rest, "lp1").await;
    assert_eq!(answered_directly(&app, TOPIC_EVENTS), 4);
    assert_eq!(answered_directly(&app, "/v1/events"), 1);
    let answered = |route: &str, status: &str| {
        app.ctx
            .metrics
            .http_requests
            .with_label_values(&[route, status])
            .get()
    };
    assert_eq!(answered(TOPIC_EVENTS, "200"), 2);
    assert_eq!(answered(TOPIC_EVENTS, "304"), 1);
    assert_eq!(answered(TOPIC_EVENTS, "400"), 1);

    // A request of another route hands the connection to the HTTP server,
    // which answers the same polls after it.
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (health, _) = read_sized(&mut tcp, &mut rest).await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let through_http = poll_answers(&app, &mut tcp, &mut rest, "lp2").await;
    assert_eq!(answered_directly(&app, TOPIC_EVENTS), 4, "not the front's");
    assert_eq!(answered(TOPIC_EVENTS, "200"), 4);

    let statuses: Vec<&str> = direct.iter().map(|(h, _)| &h[..12]).collect();
    assert_eq!(
        statuses,
        [
            "HTTP/1.1 200",
            "HTTP/1.1 200",
            "HTTP/1.1 304",
            "HTTP/1.1 400",
            "HTTP/1.1 200"
        ]
    );
    for ((direct_head, direct_body), (http_head, http_body)) in direct.iter().zip(&through_http) {
        assert!(
            direct_head.to_ascii_lowercase().contains("\r\ndate: "),
            "{direct_head}"
        );
        assert!(
            direct_head.contains("access-control-allow-origin: https://app.example"),
            "{direct_head}"
        );
        // The topics differ (lp1, lp2), and so do the bodies and etags.
        let same = |head: &str| -> Vec<String> {
            comparable(head)
                .into_iter()
                .map(|l| match l.split_once(": ") {
                    Some((name @ ("etag" | "content-length"), _)) => name.to_owned(),
                    _ => l,
                })
                .collect()
        };
        assert_eq!(same(direct_head), same(http_head));
        assert_eq!(
            without_times(direct_body).replace("lp1", "T"),
            without_times(http_body).replace("lp2", "T"),
            "{direct_head}"
        );
    }
    let error: Value = serde_json::from_str(&direct[3].1).expect("a JSON error body");
    assert_eq!(error["error"]["code"], "invalid_after");
}

#[tokio::test]
async fn a_poll_asking_to_close_is_answered_and_its_connection_closed() {
    let app = TestApp::spawn(Engines::Embedded, |_| {}).await;
    let mut tcp = connect(&app).await;
    tcp.write_all(b"GET /v1/topics/close/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let all = read_to_close(&mut tcp).await;
    assert!(all.starts_with("HTTP/1.1 200 OK\r\n"), "{all}");
    assert!(all.contains("\r\nconnection: close\r\n"), "{all}");
    assert!(all.ends_with("{\"events\":[],\"next\":0}"), "{all}");
    assert_eq!(answered_directly(&app, TOPIC_EVENTS), 1);
}

/// Opens a connection whose long poll of `topic` (its hub's only topic) is
/// waiting.
async fn waiting_poll(app: &TestApp, topic: &str) -> TcpStream {
    let mut tcp = connect(app).await;
    let request = format!("GET /v1/topics/{topic}/events?wait=60 HTTP/1.1\r\nHost: x\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    wait_for(|| app.ctx.hub.topic_count() == 1, "the poll never waited").await;
    tcp
}

/// Waits up to 10 s for `done`, failing with `what` after that.
async fn wait_for(done: impl Fn() -> bool, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "{what} (10 s)");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Everything the server sends until it closes the connection (within 10 s).
async fn read_to_close(tcp: &mut TcpStream) -> String {
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut all))
        .await
        .expect("the connection closed within 10 s")
        .expect("read");
    String::from_utf8(all).expect("UTF-8")
}

#[tokio::test]
async fn a_client_that_leaves_a_direct_long_poll_frees_it() {
    let app = TestApp::spawn(Engines::Embedded, |s| {
        s.hub_linger = Duration::ZERO;
        s.head_check_interval = Duration::from_millis(50);
    })
    .await;
    let tcp = waiting_poll(&app, "leaving").await;
    drop(tcp);
    wait_for(
        || app.ctx.hub.topic_count() == 0,
        "the waiting poll was not freed after its client left",
    )
    .await;
    assert_eq!(answered_directly(&app, TOPIC_EVENTS), 0, "nobody to answer");
}

#[tokio::test]
async fn a_stopping_server_answers_a_direct_long_poll_at_once_and_closes() {
    let app = TestApp::spawn(Engines::Embedded, |_| {}).await;
    let mut tcp = waiting_poll(&app, "stop").await;
    let stopping = tokio::spawn({
        let stop = app.stop_handle();
        async move { stop.stop(true).await }
    });
    let all = read_to_close(&mut tcp).await;
    assert!(all.starts_with("HTTP/1.1 200 OK\r\n"), "{all}");
    assert!(all.contains("\r\nconnection: close\r\n"), "{all}");
    assert!(all.ends_with("{\"events\":[],\"next\":0}"), "{all}");
    stopping.await.unwrap();
}

#[tokio::test]
async fn a_head_larger_than_the_first_peek_is_still_answered_directly() {
    let app = TestApp::spawn(Engines::Embedded, |_| {}).await;
    let mut tcp = connect(&app).await;
    let padding = "p".repeat(3000);
    let request =
        format!("GET /v1/topics/big/events HTTP/1.1\r\nHost: x\r\nX-Pad: {padding}\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut rest = Vec::new();
    let (head, body) = read_sized(&mut tcp, &mut rest).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "{\"events\":[],\"next\":0}");
    assert_eq!(answered_directly(&app, TOPIC_EVENTS), 1);
}
