//! WebSockets: subscribe, publish with acks, resume with `after`, error
//! frames, close codes, and the handshake, all through tokio-tungstenite.

use std::{collections::HashMap, time::Duration};

use futures_util::{SinkExt, StreamExt};
use rt_core::{Topic, store::Retention};
use rt_tests::{
    Engines, JWT_SECRET, TestApp, WS_UPGRADE_HEADERS, jwt,
    ws::{Received, Socket, connect, connect_request, recv, recv_json, send},
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::{
    Message,
    client::IntoClientRequest,
    protocol::{
        CloseFrame,
        frame::{
            Frame,
            coding::{CloseCode, Data, OpCode},
        },
    },
};

const WAIT: Duration = Duration::from_secs(20);

async fn subscribe(ws: &mut Socket, topic: &str, after: Option<u64>, r: &str) -> Value {
    let mut frame = json!({"op": "subscribe", "topic": topic, "ref": r});
    if let Some(after) = after {
        frame["after"] = json!(after);
    }
    send(ws, frame).await;
    let ack = recv_json(ws, WAIT).await;
    assert_eq!(
        (ack["op"].as_str(), ack["ref"].as_str()),
        (Some("ack"), Some(r)),
        "{ack}"
    );
    ack
}

#[tokio::test]
async fn a_publish_over_one_socket_is_acked_and_reaches_a_subscriber_on_another() {
    let app = TestApp::spawn(Engines::Distributed, |_| {}).await;
    let mut reader = connect(&app.base).await;
    let ack = subscribe(&mut reader, "chat", None, "s1").await;
    assert_eq!(
        ack,
        json!({"op": "ack", "ref": "s1", "topic": "chat", "after": 0})
    );

    let mut writer = connect(&app.base).await;
    send(
        &mut writer,
        json!({"op": "publish", "topic": "chat", "type": "said", "data": {"text": "hi"}, "ref": "p1"}),
    )
    .await;
    let ack = recv_json(&mut writer, WAIT).await;
    assert_eq!(
        ack,
        json!({"op": "ack", "ref": "p1", "topic": "chat", "seq": 1})
    );

    let event = recv_json(&mut reader, WAIT).await;
    assert_eq!(
        (
            &event["op"],
            &event["topic"],
            &event["seq"],
            &event["type"],
            &event["data"]
        ),
        (
            &json!("event"),
            &json!("chat"),
            &json!(1),
            &json!("said"),
            &json!({"text": "hi"})
        )
    );
    let stored = app
        .ctx
        .store
        .read(&Topic::parse("chat").unwrap(), 0, 10)
        .await
        .unwrap();
    assert_eq!(
        stored.events.len(),
        1,
        "the acknowledged event is in the log"
    );
    assert_eq!(stored.events[0].data.get(), r#"{"text":"hi"}"#);

    send(&mut writer, json!({"op": "ping", "ref": "x"})).await;
    assert_eq!(
        recv_json(&mut writer, WAIT).await,
        json!({"op": "pong", "ref": "x"})
    );
}

/// A client holding `topics`, which at random moments drops a subscription
/// (or the whole socket) and comes back with `after` = the last seq seen.
async fn churning_client(
    app: &TestApp,
    topics: &[&str],
    totals: &HashMap<String, u64>,
    seed: u64,
) -> HashMap<String, Vec<u64>> {
    let mut got: HashMap<String, Vec<u64>> =
        topics.iter().map(|t| (t.to_string(), Vec::new())).collect();
    let mut rng = seed;
    let mut next_rand = move || {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        rng >> 33
    };
    let done = |got: &HashMap<String, Vec<u64>>| {
        got.iter()
            .all(|(t, seqs)| seqs.last().copied().unwrap_or(0) == totals[t])
    };
    // Topics unsubscribed and subscribed again: frames of the old
    // subscription still in flight are ignored until the new one's ack.
    let mut paused: Vec<String> = Vec::new();
    'socket: while !done(&got) {
        let mut ws = connect(&app.base).await;
        paused.clear();
        for t in topics {
            let after = got[*t].last().copied().unwrap_or(0);
            send(
                &mut ws,
                json!({"op": "subscribe", "topic": t, "after": after}),
            )
            .await;
        }
        let mut budget = next_rand() % 300 + 20;
        loop {
            if done(&got) {
                break 'socket;
            }
            let frame = match recv(&mut ws, WAIT).await {
                Received::Json(v) => v,
                // A client that falls behind is closed as too slow and
                // resumes with `after`, like any other reconnect.
                Received::Closed(Some(c)) if c.code == CloseCode::Policy => {
                    assert!(c.reason.contains("too slow"), "{c:?}");
                    continue 'socket;
                }
                Received::Closed(c) => panic!("server closed the socket: {c:?}"),
            };
            match frame["op"].as_str() {
                Some("event") => {
                    let topic = frame["topic"].as_str().unwrap().to_owned();
                    if !paused.contains(&topic) {
                        got.get_mut(&topic)
                            .unwrap()
                            .push(frame["seq"].as_u64().unwrap());
                    }
                }
                Some("ack") => {
                    let topic = frame["topic"].as_str().unwrap().to_owned();
                    paused.retain(|t| *t != topic);
                }
                // The protocol's answer to a feed that stopped (an overloaded
                // store): subscribe again from where it was.
                Some("error") if frame["code"] == "feed_unavailable" => {
                    let named = frame["topic"].as_str().expect("the frame names the topic");
                    let t = *topics.iter().find(|t| **t == named).unwrap();
                    let after = got[t].last().copied().unwrap_or(0);
                    send(
                        &mut ws,
                        json!({"op": "subscribe", "topic": t, "after": after}),
                    )
                    .await;
                }
                _ => panic!("unexpected frame {frame}"),
            }
            budget = budget.saturating_sub(1);
            if budget == 0 {
                if next_rand() % 2 == 0 {
                    // Drop the socket; subscribe again on a new one.
                    let _ = ws.close(None).await;
                    continue 'socket;
                }
                // Unsubscribe one topic and subscribe again from where it was.
                let t = topics[(next_rand() as usize) % topics.len()];
                budget = next_rand() % 300 + 20;
                if paused.iter().any(|p| p == t) {
                    continue;
                }
                send(&mut ws, json!({"op": "unsubscribe", "topic": t})).await;
                paused.push(t.to_string());
                let after = got[t].last().copied().unwrap_or(0);
                send(
                    &mut ws,
                    json!({"op": "subscribe", "topic": t, "after": after, "ref": "again"}),
                )
                .await;
                budget = next_rand() % 300 + 20;
            }
        }
    }
    got
}

#[tokio::test]
async fn a_hundred_churning_clients_each_get_exactly_their_topics_events() {
    let app = TestApp::spawn(Engines::Distributed, |s| {
        s.ws_publish_rate = 10_000;
        // 100 debug-build clients saturate both cores: give the database
        // pool the patience of the default settings.
        s.db_acquire_timeout = Duration::from_secs(10);
    })
    .await;
    let names = ["a", "b", "c"];
    // 5,000 events: 2,500 over WebSocket publishers, 2,500 over HTTP.
    let mut totals: HashMap<String, u64> = HashMap::new();
    let plan: Vec<&str> = (0..5000).map(|i| names[i % 3]).collect();
    for t in &plan {
        *totals.entry(t.to_string()).or_default() += 1;
    }
    let clients = (0..100u64).map(|i| {
        let (app, totals) = (&app, &totals);
        async move {
            let topics: Vec<&str> = match i % 3 {
                0 => vec!["a", "b"],
                1 => vec!["b", "c"],
                _ => vec!["a", "c"],
            };
            let got = churning_client(app, &topics, totals, i + 7).await;
            for (topic, seqs) in got {
                assert!(
                    seqs == (1..=totals[&topic]).collect::<Vec<_>>(),
                    "client {i} topic {topic}: {} events, first {:?}",
                    seqs.len(),
                    &seqs[..seqs.len().min(10)]
                );
            }
        }
    });
    let ws_publishers = (0..5).map(|p| {
        let (app, plan) = (&app, &plan);
        async move {
            let mut ws = connect(&app.base).await;
            let mine: Vec<&str> = plan.iter().skip(p).step_by(10).copied().collect();
            for (i, t) in mine.iter().enumerate() {
                send(
                    &mut ws,
                    json!({"op": "publish", "topic": t, "data": i, "ref": i.to_string()}),
                )
                .await;
            }
            let mut acked = 0;
            while acked < mine.len() {
                let ack = recv_json(&mut ws, WAIT).await;
                assert_eq!(ack["op"], "ack", "{ack}");
                acked += 1;
            }
        }
    });
    let http_publishers = (0..5).map(|p| {
        let (app, plan) = (&app, &plan);
        async move {
            for t in plan.iter().skip(p + 5).step_by(10) {
                app.publish_ok(t, json!("http")).await;
            }
        }
    });
    tokio::join!(
        futures_util::future::join_all(clients),
        futures_util::future::join_all(ws_publishers),
        futures_util::future::join_all(http_publishers),
    );
}

#[tokio::test]
async fn resuming_from_a_pruned_after_gets_a_reset_frame() {
    let app = TestApp::spawn(Engines::Embedded, |_| {}).await;
    for i in 1..=10 {
        app.publish_ok("r", json!(i)).await;
    }
    let retention = Retention {
        max_count: Some(3),
        max_age: None,
    };
    app.ctx.store.prune(retention).await.unwrap();
    let mut ws = connect(&app.base).await;
    subscribe(&mut ws, "r", Some(2), "s").await;
    assert_eq!(
        recv_json(&mut ws, WAIT).await,
        json!({"op": "reset", "topic": "r", "from": 7})
    );
    for seq in 8..=10 {
        assert_eq!(recv_json(&mut ws, WAIT).await["seq"], seq);
    }
}

#[tokio::test]
async fn bad_frames_get_error_frames_and_the_socket_stays_usable() {
    let app = TestApp::spawn(Engines::Embedded, |s| {
        s.jwt_secret = Some(JWT_SECRET.into());
        s.max_topics = 2;
        s.ws_publish_rate = 3;
    })
    .await;
    let token = jwt(
        JWT_SECRET,
        300,
        json!({"sub": "w", "subscribe": ["ok.>"], "publish": ["ok.mine"]}),
    );
    // Without a token the upgrade itself is refused.
    let url = format!("{}/v1/ws", app.base.replacen("http://", "ws://", 1));
    match connect_request(url.clone().into_client_request().unwrap()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => assert_eq!(res.status(), 401),
        other => panic!("expected a 401, got {other:?}"),
    }
    let mut ws = connect_request(
        format!("{url}?access_token={token}")
            .into_client_request()
            .unwrap(),
    )
    .await
    .unwrap();
    let cases: Vec<(String, Option<&str>, &str)> = vec![
        ("not json".into(), None, "invalid_json"),
        (
            r#"{"op":"subscribe","topic":"ok.a","after":-1,"ref":"r1"}"#.into(),
            Some("r1"),
            "invalid_frame",
        ),
        (
            r#"{"op":"subscribe","topic":"ok.a","extra":1,"ref":"r2"}"#.into(),
            Some("r2"),
            "invalid_frame",
        ),
        (
            r#"{"topic":"ok.a","ref":"r3"}"#.into(),
            Some("r3"),
            "missing_op",
        ),
        (
            r#"{"op":"dance","ref":"r4"}"#.into(),
            Some("r4"),
            "unknown_op",
        ),
        (
            r#"{"op":"subscribe","ref":"r5"}"#.into(),
            Some("r5"),
            "missing_field",
        ),
        (
            r#"{"op":"subscribe","topic":"a..b","ref":"r6"}"#.into(),
            Some("r6"),
            "invalid_topic",
        ),
        (
            r#"{"op":"subscribe","topic":"secret","ref":"r7"}"#.into(),
            Some("r7"),
            "forbidden",
        ),
        (
            r#"{"op":"publish","topic":"ok.a","data":1,"ref":"r8"}"#.into(),
            Some("r8"),
            "forbidden",
        ),
        (
            r#"{"op":"publish","topic":"ok.mine","ref":"r9"}"#.into(),
            Some("r9"),
            "missing_field",
        ),
        (
            r#"{"op":"publish","topic":"ok.mine","type":"two words","data":1,"ref":"r10"}"#.into(),
            Some("r10"),
            "invalid_type",
        ),
        (
            r#"{"op":"unsubscribe","topic":"ok.never","ref":"r11"}"#.into(),
            Some("r11"),
            "not_subscribed",
        ),
        (
            format!(r#"{{"op":"ping","ref":"{}"}}"#, "x".repeat(200)),
            None,
            "invalid_ref",
        ),
    ];
    for (text, r, code) in cases {
        ws.send(Message::Text(text.clone().into())).await.unwrap();
        let err = recv_json(&mut ws, WAIT).await;
        assert_eq!(err["op"], "error", "{text} -> {err}");
        assert_eq!(err["code"], code, "{text} -> {err}");
        assert_eq!(err["ref"].as_str(), r, "{text} -> {err}");
        assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // Binary frames are refused with an error, the socket stays up.
    ws.send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    assert_eq!(recv_json(&mut ws, WAIT).await["code"], "binary_unsupported");
    // Subscription limit.
    subscribe(&mut ws, "ok.a", None, "a").await;
    subscribe(&mut ws, "ok.b", None, "b").await;
    send(
        &mut ws,
        json!({"op": "subscribe", "topic": "ok.c", "ref": "c"}),
    )
    .await;
    assert_eq!(
        recv_json(&mut ws, WAIT).await["code"],
        "too_many_subscriptions"
    );
    // Publish rate: 3 per second; the fourth in a burst is refused.
    for i in 0..4 {
        send(
            &mut ws,
            json!({"op": "publish", "topic": "ok.mine", "data": i, "ref": format!("p{i}")}),
        )
        .await;
    }
    let mut codes = Vec::new();
    for _ in 0..4 {
        let f = recv_json(&mut ws, WAIT).await;
        codes.push(
            f["code"]
                .as_str()
                .unwrap_or(f["op"].as_str().unwrap())
                .to_owned(),
        );
    }
    codes.sort();
    assert_eq!(codes, ["ack", "ack", "ack", "rate_limited"]);
    // Still usable.
    send(&mut ws, json!({"op": "ping"})).await;
    assert_eq!(recv_json(&mut ws, WAIT).await, json!({"op": "pong"}));
}

#[tokio::test]
async fn fragmented_messages_close_handshakes_and_subprotocols_follow_the_rfc() {
    let app = TestApp::spawn(Engines::Embedded, |_| {}).await;
    let url = format!("{}/v1/ws", app.base.replacen("http://", "ws://", 1));

    // The subprotocol is echoed when offered; an unknown one is refused.
    let mut req = url.clone().into_client_request().unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "rt.v1.json".parse().unwrap());
    let (mut ws, res) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(res.headers()["sec-websocket-protocol"], "rt.v1.json");
    let mut bad = url.clone().into_client_request().unwrap();
    bad.headers_mut()
        .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
    match tokio_tungstenite::connect_async(bad).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => assert_eq!(res.status(), 400),
        other => panic!("expected 400, got {other:?}"),
    }

    // A text message in three fragments is one frame to the server.
    let text = r#"{"op":"ping","ref":"fragmented"}"#;
    let (a, rest) = text.split_at(10);
    let (b, c) = rest.split_at(10);
    ws.send(Message::Frame(Frame::message(
        a.as_bytes().to_vec(),
        OpCode::Data(Data::Text),
        false,
    )))
    .await
    .unwrap();
    ws.send(Message::Frame(Frame::message(
        b.as_bytes().to_vec(),
        OpCode::Data(Data::Continue),
        false,
    )))
    .await
    .unwrap();
    ws.send(Message::Frame(Frame::message(
        c.as_bytes().to_vec(),
        OpCode::Data(Data::Continue),
        true,
    )))
    .await
    .unwrap();
    assert_eq!(
        recv_json(&mut ws, WAIT).await,
        json!({"op": "pong", "ref": "fragmented"})
    );

    // The client closes: the server answers with a close frame.
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .await
    .unwrap();
    let mut answered = false;
    while let Some(msg) = tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
        match msg {
            Ok(Message::Close(Some(frame))) => {
                assert_eq!(frame.code, CloseCode::Normal);
                answered = true;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    assert!(answered, "the close handshake completed");
}

/// (opcode, payload) of the unmasked frames a server sent.
fn server_frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut frames = Vec::new();
    while bytes.len() >= 2 {
        let op = bytes[0] & 0x0f;
        let (len, header) = match bytes[1] & 0x7f {
            126 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(bytes[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        frames.push((op, bytes[header..header + len].to_vec()));
        bytes = &bytes[header + len..];
    }
    frames
}

async fn expect_close(ws: &mut Socket, code: CloseCode) -> String {
    loop {
        match recv(ws, WAIT).await {
            Received::Closed(Some(frame)) => {
                assert_eq!(frame.code, code, "{frame:?}");
                return frame.reason.to_string();
            }
            Received::Closed(None) => panic!("closed without a close frame"),
            Received::Json(_) => {}
        }
    }
}

#[tokio::test]
async fn oversized_messages_idle_sockets_and_shutdown_close_with_meaningful_codes() {
    let app = TestApp::spawn(Engines::Embedded, |s| {
        s.max_body_bytes = 1024;
        s.ws_ping_interval = Duration::from_millis(100);
        s.ws_idle_timeout = Duration::from_millis(600);
    })
    .await;
    let mut ws = connect(&app.base).await;
    send(&mut ws, json!({"op": "ping", "ref": "x".repeat(2000)})).await;
    let reason = expect_close(&mut ws, CloseCode::Size).await;
    assert!(reason.contains("1024"), "{reason}");

    // A client that never answers pings (a raw socket that reads nothing for
    // a while; a WebSocket library would answer them on its own).
    let mut idle = app.raw_get("/v1/ws", WS_UPGRADE_HEADERS).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, idle.read_to_end(&mut raw))
        .await
        .expect("the server closed the idle socket")
        .unwrap();
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(raw.starts_with(b"HTTP/1.1 101"), "upgraded");
    let frames = server_frames(&raw[head_end..]);
    assert!(frames.iter().any(|(op, _)| *op == 0x9), "the server pinged");
    let (_, close) = frames.last().expect("frames");
    assert_eq!(u16::from_be_bytes([close[0], close[1]]), 1001, "going away");
    assert!(String::from_utf8_lossy(&close[2..]).contains("idle"));

    let mut live = connect(&app.base).await;
    subscribe(&mut live, "t", None, "s").await;
    let stop = app.stop_handle();
    let stopping = tokio::spawn(async move { stop.stop(true).await });
    let reason = expect_close(&mut live, CloseCode::Away).await;
    assert!(reason.contains("shutting down"), "{reason}");
    stopping.await.unwrap();
}

#[tokio::test]
async fn a_python_websockets_client_speaks_the_protocol() {
    let app = TestApp::spawn(Engines::Embedded, |_| {}).await;
    let url = format!("{}/v1/ws", app.base.replacen("http://", "ws://", 1));
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/ws_client.py");
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(&script)
            .arg(&url)
            .output()
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| {
        panic!("cannot run python3 ({e}); `bash scripts/test.sh` installs Python and its websockets package")
    });
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the Python client failed (if websockets is missing: apt-get install python3-websockets, \
         or run bash scripts/test.sh):\n{stderr}"
    );
    let out: Value = serde_json::from_slice(&output.stdout).expect("the client prints JSON");
    assert_eq!(out["subprotocol"], "rt.v1.json");
    assert_eq!(
        out["subscribe_ack"],
        json!({"op": "ack", "ref": "s", "topic": "py", "after": 0})
    );
    assert_eq!(out["acks"], json!([1, 2, 3]));
    assert_eq!(out["events"], json!([[1, 0], [2, 1], [3, 2]]));
    assert_eq!(
        out["fragmented"],
        json!({"op": "pong", "ref": "fragmented"})
    );
    assert_eq!(out["binary"]["code"], "binary_unsupported");
    assert_eq!(out["close_code"], 1000);
}

#[tokio::test]
async fn a_socket_that_stops_reading_is_closed_as_too_slow_and_resumes_with_after() {
    let app = TestApp::spawn(Engines::Distributed, |s| {
        s.ws_queue = 16;
        s.tcp_send_buffer = Some(8 * 1024);
    })
    .await;
    // A raw socket with a small receive buffer: subscribes, then never reads.
    let mut raw = app.raw_get("/v1/ws", WS_UPGRADE_HEADERS).await;
    // A masked client text frame: {"op":"subscribe","topic":"slow"}.
    let payload = br#"{"op":"subscribe","topic":"slow"}"#;
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x81, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    raw.write_all(&frame).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let big = "x".repeat(2000);
    app.publish_padded("slow", 10, big.len()).await;
    let closed = || {
        app.ctx
            .metrics
            .streams_closed
            .with_label_values(&["ws", "too_slow"])
            .get()
    };
    let mut waited = 0;
    while closed() == 0 && waited < 150 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += 1;
    }
    assert_eq!(
        closed(),
        1,
        "the socket that stopped reading was closed as too slow"
    );
    drop(raw);

    // A new socket resumes with after and gets every event, in order.
    let mut ws = connect(&app.base).await;
    subscribe(&mut ws, "slow", Some(0), "again").await;
    for seq in 1..=1000u64 {
        let event = recv_json(&mut ws, WAIT).await;
        assert_eq!(event["seq"], seq);
    }
}

#[tokio::test]
async fn browser_upgrades_are_checked_against_the_allowed_origins() {
    let app = TestApp::spawn(Engines::Embedded, |s| {
        s.cors_origins = vec!["https://app.example".into()];
    })
    .await;
    let url = format!("{}/v1/ws", app.base.replacen("http://", "ws://", 1));
    let with_origin = |origin: String| {
        let mut req = url.clone().into_client_request().unwrap();
        req.headers_mut().insert("Origin", origin.parse().unwrap());
        connect_request(req)
    };
    match with_origin("https://evil.example".into()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => assert_eq!(res.status(), 403),
        other => panic!("expected 403, got {other:?}"),
    }
    assert!(
        with_origin("https://app.example".into()).await.is_ok(),
        "a listed origin"
    );
    let own = app.base.clone();
    assert!(with_origin(own).await.is_ok(), "the server's own origin");

    // `"data": null` is data: published and acked like any other JSON.
    let mut ws = connect(&app.base).await;
    send(
        &mut ws,
        json!({"op": "publish", "topic": "n", "data": null, "ref": "p"}),
    )
    .await;
    assert_eq!(
        recv_json(&mut ws, WAIT).await,
        json!({"op": "ack", "ref": "p", "topic": "n", "seq": 1})
    );
}

#[tokio::test]
async fn a_socket_closes_when_its_token_expires() {
    let app = TestApp::spawn(Engines::Embedded, |s| {
        s.jwt_secret = Some(JWT_SECRET.into())
    })
    .await;
    let token = jwt(JWT_SECRET, 1, json!({"sub": "w", "subscribe": [">"]}));
    let url = format!(
        "{}/v1/ws?access_token={token}",
        app.base.replacen("http://", "ws://", 1)
    );
    let mut ws = connect_request(url.into_client_request().unwrap())
        .await
        .unwrap();
    subscribe(&mut ws, "t", None, "s").await;
    let reason = expect_close(&mut ws, CloseCode::Policy).await;
    assert!(reason.contains("token expired"), "{reason}");
}
