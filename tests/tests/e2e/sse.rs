//! Server-Sent Events: framing as an independent parser reads it, exact
//! resume with Last-Event-ID, resets, slow consumers, limits and shutdown.

use std::{collections::HashMap, time::Duration};

use futures_util::StreamExt;
use rt_core::store::Retention;
use rt_tests::{
    Engines, JWT_SECRET, TestApp, error_code, jwt,
    sse::{SseStream, connect, next_event},
};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn events_published_after_connecting_arrive_framed_for_eventsource() {
    let app = TestApp::spawn(Engines::Distributed, |_| {}).await;
    let mut stream = connect(&app.http, &app.url("/v1/sse?topic=a&topic=b"), None)
        .await
        .unwrap();
    // Each event is read before the next is published: a stream's topics
    // are fed separately (over NATS, one subscription each), so no order
    // across topics is implied, and the ids below name the order seen.
    app.publish_ok("a", json!({"n": 1})).await;
    let first = next_event(&mut stream, WAIT).await.unwrap();
    assert_eq!(first.id, "a:1,b:0", "the id is the whole stream's position");
    assert_eq!(first.event, "message");
    let data: Value = serde_json::from_str(&first.data).unwrap();
    assert_eq!(
        (&data["topic"], &data["seq"], &data["type"], &data["data"]),
        (&json!("a"), &json!(1), &json!("message"), &json!({"n": 1}))
    );
    assert!(data["time"].as_str().is_some_and(|t| t.ends_with('Z')));

    let res = app
        .publish(
            "b",
            &json!({"type": "note", "data": {"text": "two\nlines"}}),
        )
        .await;
    assert_eq!(res.status(), 201);
    let second = next_event(&mut stream, WAIT).await.unwrap();
    assert_eq!(
        (second.id.as_str(), second.event.as_str()),
        ("a:1,b:1", "note")
    );
    let data: Value = serde_json::from_str(&second.data).unwrap();
    assert_eq!(data["data"]["text"], "two\nlines");

    // Pretty-printed data keeps its line breaks: several `data:` lines.
    let res = app
        .http
        .post(app.url("/v1/topics/a/events"))
        .header("Content-Type", "application/json")
        .body("{\"data\": {\n  \"pretty\": true\n}}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let third = next_event(&mut stream, WAIT).await.unwrap();
    assert_eq!(third.id, "a:2,b:1");
    let data: Value = serde_json::from_str(&third.data).unwrap();
    assert_eq!(data["data"], json!({"pretty": true}));
}

#[tokio::test]
async fn the_raw_stream_starts_with_retry_and_carries_heartbeats() {
    let app = TestApp::spawn(Engines::Embedded, |s| {
        s.sse_heartbeat = Duration::from_millis(200);
        s.sse_retry = Duration::from_millis(1500);
    })
    .await;
    let res = app
        .http
        .get(app.url("/v1/sse?topic=raw"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["cache-control"], "no-cache");
    assert_eq!(res.headers()["x-accel-buffering"], "no");
    let mut body = res.bytes_stream();
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !text.contains(": heartbeat\n\n") {
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .expect("a heartbeat in time")
            .unwrap()
            .unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(text.starts_with("retry: 1500\n\n"), "{text:?}");
}

/// Reads until `count` events of the stream have arrived; returns (topic,
/// seq) pairs and the last id.
async fn read_events(stream: &mut SseStream, count: usize) -> (Vec<(String, u64)>, String) {
    let mut got = Vec::new();
    let mut last_id = String::new();
    while got.len() < count {
        let event = next_event(stream, WAIT).await.expect("stream ended early");
        assert_ne!(event.event, "reset", "no reset expected: {event:?}");
        let data: Value = serde_json::from_str(&event.data).unwrap();
        got.push((
            data["topic"].as_str().unwrap().to_owned(),
            data["seq"].as_u64().unwrap(),
        ));
        last_id = event.id;
    }
    (got, last_id)
}

/// A client that drops its stream after a random number of events and
/// reconnects with Last-Event-ID, until it has `total` events.
async fn resuming_reader(
    app: &TestApp,
    query: &str,
    total: usize,
    seed: u64,
) -> Vec<(String, u64)> {
    let url = app.url(&format!("/v1/sse?{query}"));
    let mut got = Vec::new();
    let mut last_id: Option<String> = None;
    let mut rng = seed;
    while got.len() < total {
        let mut stream = connect(&app.http, &url, last_id.as_deref()).await.unwrap();
        // A cheap deterministic generator: how many events before dropping.
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let take = ((rng >> 33) % 400 + 1) as usize;
        let (events, id) = read_events(&mut stream, take.min(total - got.len())).await;
        got.extend(events);
        last_id = Some(id);
    }
    got
}

fn check_in_order(got: &[(String, u64)], want: &HashMap<String, u64>) {
    let mut per_topic: HashMap<&str, Vec<u64>> = HashMap::new();
    for (topic, seq) in got {
        per_topic.entry(topic).or_default().push(*seq);
    }
    for (topic, n) in want {
        let seqs = per_topic.remove(topic.as_str()).unwrap_or_default();
        assert!(
            seqs == (1..=*n).collect::<Vec<_>>(),
            "topic {topic}: expected 1..={n} in order, got {} events: {:?}...",
            seqs.len(),
            &seqs[..seqs.len().min(20)]
        );
    }
    assert!(
        per_topic.is_empty(),
        "events of other topics: {per_topic:?}"
    );
}

#[tokio::test]
async fn a_hundred_clients_resuming_at_random_moments_miss_nothing() {
    let app = TestApp::spawn(Engines::Distributed, |_| {}).await;
    const A: u64 = 2500;
    const B: u64 = 2500;
    let readers = (0..100u64).map(|i| {
        let app = &app;
        async move {
            if i % 2 == 0 {
                let got = resuming_reader(app, "topic=a", A as usize, i + 1).await;
                check_in_order(&got, &HashMap::from([("a".to_owned(), A)]));
            } else {
                let got = resuming_reader(app, "topic=a&topic=b", (A + B) as usize, i + 1).await;
                check_in_order(
                    &got,
                    &HashMap::from([("a".to_owned(), A), ("b".to_owned(), B)]),
                );
            }
        }
    });
    let publish = async {
        // 5,000 events from 10 publishers, in batches of 10 alternating topics.
        let tasks = (0..10).map(|p| {
            let app = &app;
            async move {
                for i in 0..50 {
                    let batch: Vec<Value> = (0..10)
                        .map(|k| json!({"topic": if k % 2 == 0 { "a" } else { "b" }, "data": [p, i, k]}))
                        .collect();
                    let res = app
                        .http
                        .post(app.url("/v1/events"))
                        .json(&batch)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(res.status(), 201);
                }
            }
        });
        futures_util::future::join_all(tasks).await;
    };
    tokio::join!(futures_util::future::join_all(readers), publish);
}

#[tokio::test]
async fn a_pruned_position_gets_a_reset_event_then_the_rest() {
    let app = TestApp::spawn(Engines::Embedded, |_| {}).await;
    for i in 1..=10 {
        app.publish_ok("r", json!(i)).await;
    }
    let pruned = app
        .ctx
        .store
        .prune(Retention {
            max_count: Some(3),
            max_age: None,
        })
        .await
        .unwrap();
    assert_eq!(pruned, 7);
    let mut stream = connect(&app.http, &app.url("/v1/sse?topic=r"), Some("r:2"))
        .await
        .unwrap();
    let reset = next_event(&mut stream, WAIT).await.unwrap();
    assert_eq!(reset.event, "reset");
    assert_eq!(reset.id, "r:7");
    assert_eq!(
        serde_json::from_str::<Value>(&reset.data).unwrap(),
        json!({"topic": "r", "from": 7})
    );
    let (got, last) = read_events(&mut stream, 3).await;
    assert_eq!(got, [("r".into(), 8), ("r".into(), 9), ("r".into(), 10)]);
    assert_eq!(last, "r:10");
}

#[tokio::test]
async fn bad_stream_requests_are_refused_before_the_stream_starts() {
    let app = TestApp::spawn(Engines::Embedded, |s| s.max_topics = 3).await;
    let cases: Vec<(&str, Option<&str>, u16, &str)> = vec![
        ("/v1/sse", None, 400, "missing_topic"),
        ("/v1/sse?topic=a..b", None, 400, "invalid_topic"),
        ("/v1/sse?topic=*", None, 400, "invalid_topic"),
        (
            "/v1/sse?topic=a&topic=b&topic=c&topic=d",
            None,
            400,
            "too_many_topics",
        ),
        (
            "/v1/sse?topic=a",
            Some("garbage"),
            400,
            "invalid_last_event_id",
        ),
        (
            "/v1/sse?topic=a",
            Some("a:-1"),
            400,
            "invalid_last_event_id",
        ),
        ("/v1/sse?topic=a", Some("b:3"), 400, "invalid_last_event_id"),
        (
            "/v1/sse?topic=a&lastEventId=a:x",
            None,
            400,
            "invalid_last_event_id",
        ),
        ("/v1/sse?topic=a&after=x", None, 400, "invalid_position"),
        (
            "/v1/sse?topic=a&topic=b&after=3",
            None,
            400,
            "invalid_position",
        ),
    ];
    for (path, id, status, code) in cases {
        let mut req = app.http.get(app.url(path));
        if let Some(id) = id {
            req = req.header("Last-Event-ID", id);
        }
        let res = req.send().await.unwrap();
        assert_eq!(
            error_code(res).await,
            (status, code.into()),
            "{path} {id:?}"
        );
    }
}

#[tokio::test]
async fn streams_need_a_token_with_subscribe_rights_when_auth_is_on() {
    let app = TestApp::spawn(Engines::Embedded, |s| {
        s.jwt_secret = Some(JWT_SECRET.into())
    })
    .await;
    let token = jwt(
        JWT_SECRET,
        300,
        json!({"sub": "r", "subscribe": ["news.>"]}),
    );
    let res = app
        .http
        .get(app.url("/v1/sse?topic=news.eu"))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(res).await, (401, "missing_token".into()));
    let res = app
        .http
        .get(app.url(&format!(
            "/v1/sse?topic=news.eu&topic=sports&access_token={token}"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(res).await, (403, "forbidden".into()));
    // EventSource cannot set headers: the token comes in the query or a cookie.
    let ok = connect(
        &app.http,
        &app.url(&format!("/v1/sse?topic=news.eu&access_token={token}")),
        None,
    )
    .await;
    assert!(ok.is_ok());
    let res = app
        .http
        .get(app.url("/v1/sse?topic=news.eu"))
        .header("Cookie", format!("rt_token={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn connections_beyond_the_maximum_get_503() {
    let app = TestApp::spawn(Engines::Embedded, |s| {
        s.sse_max_connections = 2;
        // A write (the heartbeat) is how the server notices a client left.
        s.sse_heartbeat = Duration::from_millis(200);
    })
    .await;
    let url = app.url("/v1/sse?topic=a");
    let one = connect(&app.http, &url, None).await.unwrap();
    let _two = connect(&app.http, &url, None).await.unwrap();
    let res = app.http.get(&url).send().await.unwrap();
    assert_eq!(res.headers()["retry-after"], "1");
    assert_eq!(error_code(res).await, (503, "too_many_connections".into()));
    drop(one);
    // The place is freed once the server notices the client left.
    let mut admitted = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if app.http.get(&url).send().await.unwrap().status() == 200 {
            admitted = true;
            break;
        }
    }
    assert!(admitted, "a closed stream frees its place");
}

#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_and_resumes_from_the_log() {
    let app = TestApp::spawn(Engines::Distributed, |s| {
        s.hub_queue = 64;
        s.tcp_send_buffer = Some(16 * 1024);
        s.tcp_user_timeout = Duration::from_secs(2);
    })
    .await;
    // A raw client with a small receive buffer that reads the first events,
    // then stops reading.
    let mut tcp = app
        .raw_get("/v1/sse?topic=slow", "Accept: text/event-stream\r\n")
        .await;
    let big = "x".repeat(2000);
    for i in 0..5 {
        app.publish_ok("slow", json!({"i": i, "pad": big})).await;
    }
    let mut seen = String::new();
    let mut buf = vec![0u8; 4096];
    while !seen.contains("id: slow:5\n") {
        let n = tokio::time::timeout(WAIT, tcp.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "stream ended early");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let open = |app: &TestApp| {
        app.ctx
            .metrics
            .streams_open
            .with_label_values(&["sse"])
            .get()
    };
    assert_eq!(open(&app), 1);

    // The client stops reading; 2,000 more events of 2 kB each are published.
    // (The sse-edge binary test measures the server's memory meanwhile.)
    app.publish_padded("slow", 20, big.len()).await;
    // The server drops it: its queue overflowed and the kernel gave up on
    // the unread socket.
    let mut dropped = false;
    for _ in 0..300 {
        if open(&app) == 0 {
            dropped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(dropped, "the stalled stream was closed by the server");
    drop(tcp);

    // On reconnect it gets everything it missed, in order.
    let mut stream = connect(&app.http, &app.url("/v1/sse?topic=slow"), Some("slow:5"))
        .await
        .unwrap();
    let (got, last) = read_events(&mut stream, 2000).await;
    let want: Vec<(String, u64)> = (6..=2005).map(|s| ("slow".to_owned(), s)).collect();
    assert!(got == want, "resumed with every missed event in order");
    assert_eq!(last, "slow:2005");
}

#[tokio::test]
async fn on_shutdown_streams_end_with_a_reason_and_a_short_retry() {
    let app = TestApp::spawn(Engines::Embedded, |_| {}).await;
    let res = app
        .http
        .get(app.url("/v1/sse?topic=bye"))
        .send()
        .await
        .unwrap();
    let mut body = res.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"retry:"));
    let stopping = tokio::spawn({
        let stop = app.stop_handle();
        async move { stop.stop(true).await }
    });
    let mut rest = String::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(chunk) = body.next().await {
            rest.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream ended promptly; got {rest:?}");
    assert!(
        rest.contains(": closing: the server is shutting down"),
        "{rest:?}"
    );
    assert!(rest.contains("retry: 250"), "{rest:?}");
    stopping.await.unwrap();
}

#[tokio::test]
async fn cors_allows_listed_origins_with_credentials() {
    let app = TestApp::spawn(Engines::Embedded, |s| {
        s.cors_origins = vec!["https://app.example".into()];
    })
    .await;
    let res = app
        .http
        .get(app.url("/v1/sse?topic=c"))
        .header("Origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let h = res.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example");
    assert_eq!(h["access-control-allow-credentials"], "true");

    let preflight = app
        .http
        .request(reqwest::Method::OPTIONS, app.url("/v1/topics/c/events"))
        .header("Origin", "https://app.example")
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "content-type, authorization",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), 204);
    let h = preflight.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example");
    assert!(
        h["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("POST")
    );
    assert_eq!(
        h["access-control-allow-headers"],
        "content-type, authorization"
    );

    let other = app
        .http
        .get(app.url("/v1/topics/c/events"))
        .header("Origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 200);
    assert!(other.headers().get("access-control-allow-origin").is_none());
    let preflight = app
        .http
        .request(reqwest::Method::OPTIONS, app.url("/v1/topics/c/events"))
        .header("Origin", "https://evil.example")
        .header("Access-Control-Request-Method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(preflight).await, (403, "forbidden".into()));
}

#[tokio::test]
async fn a_client_that_falls_behind_is_told_it_was_too_slow() {
    let app = TestApp::spawn(Engines::Distributed, |s| {
        s.hub_queue = 16;
        s.tcp_send_buffer = Some(8 * 1024);
    })
    .await;
    let mut tcp = app.raw_get("/v1/sse?topic=lag", "").await;
    let mut buf = vec![0u8; 4096];
    let mut seen = String::new();
    while !seen.contains("retry:") {
        let n = tcp.read(&mut buf).await.unwrap();
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    // The client pauses while far more than the queue is published.
    let big = "x".repeat(1000);
    app.publish_padded("lag", 5, big.len()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Reading again: the stream ends with the reason, well before event 500.
    let read_all = async {
        loop {
            let n = tcp.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            if seen.contains(": closing: too slow") {
                break;
            }
        }
    };
    tokio::time::timeout(WAIT, read_all)
        .await
        .expect("the stream ended");
    assert!(
        seen.contains(": closing: too slow"),
        "{}",
        &seen[seen.len().saturating_sub(300)..]
    );
    assert!(
        !seen.contains("id: lag:500\n"),
        "the lagging stream was cut, not served to the end"
    );
    let closed = app
        .ctx
        .metrics
        .streams_closed
        .with_label_values(&["sse", "too_slow"])
        .get();
    assert_eq!(closed, 1);
}

#[tokio::test]
async fn a_stream_ends_when_its_token_expires() {
    let app = TestApp::spawn(Engines::Embedded, |s| {
        s.jwt_secret = Some(JWT_SECRET.into())
    })
    .await;
    // Valid for one more second, plus the 5 s of clock skew tokens are allowed.
    let token = jwt(JWT_SECRET, 1, json!({"sub": "r", "subscribe": [">"]}));
    let res = app
        .http
        .get(app.url(&format!("/v1/sse?topic=t&access_token={token}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let started = std::time::Instant::now();
    let mut body = res.bytes_stream();
    let mut text = String::new();
    let ended = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(chunk) = body.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream ended; got {text:?}");
    assert!(text.contains(": closing: the token expired"), "{text:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "not before the token's end"
    );
    let closed = app
        .ctx
        .metrics
        .streams_closed
        .with_label_values(&["sse", "token_expired"])
        .get();
    assert_eq!(closed, 1);
}
