//! Web Push delivery against a push-service emulator that checks VAPID and
//! decrypts with its own RFC 8291 implementation.

use std::time::{Duration, Instant};

use rt_tests::{
    Engines, TestApp,
    push_emulator::{Browser, PushEmulator, Scripted},
};
use serde_json::{Value, json};

/// An app on `engines` whose dispatcher runs, with retries quick enough for
/// tests, and an emulator that knows its VAPID key.
async fn setup(
    engines: Engines,
    tweak: impl FnOnce(&mut rt_core::config::Settings),
) -> (TestApp, PushEmulator) {
    let app = TestApp::spawn(engines, |s| {
        s.push_allow_insecure_endpoints = true;
        s.push_allow_private_addresses = true;
        s.push_retry_base = Duration::from_millis(200);
        s.push_sweep_interval = Duration::from_millis(500);
        tweak(s);
    })
    .await;
    let emulator = PushEmulator::start().await;
    let (status, key) = app.get_json("/v1/push/vapid-public-key").await;
    assert_eq!(status, 200, "{key}");
    emulator.set_vapid_public_key(key["publicKey"].as_str().expect("publicKey"));
    app.start_dispatcher();
    (app, emulator)
}

/// Registers `browser` for `topics`; returns the subscription id.
async fn subscribe(app: &TestApp, browser: &Browser, topics: &[&str], extra: Value) -> String {
    let mut body = browser.subscription_json(topics);
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    let res = app
        .http
        .post(app.url("/v1/push/subscriptions"))
        .json(&body)
        .send()
        .await
        .expect("register");
    let status = res.status();
    let answer: Value = res.json().await.expect("JSON answer");
    assert_eq!(status, 201, "{answer}");
    answer["id"].as_str().expect("id").to_owned()
}

/// The event as every transport shows it, read back over polling.
async fn event_json(app: &TestApp, topic: &str, seq: u64) -> Value {
    let (status, body) = app
        .get_json(&format!(
            "/v1/topics/{topic}/events?after={}&limit=1",
            seq - 1
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    body["events"][0].clone()
}

/// The subscription's delivery report.
async fn report(app: &TestApp, id: &str) -> Value {
    let (status, body) = app
        .get_json(&format!("/v1/push/subscriptions/{id}/deliveries"))
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Waits until the report of `id` satisfies `done`.
async fn wait_report(app: &TestApp, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let body = report(app, id).await;
        if done(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "report never got there: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn events_arrive_encrypted_signed_and_with_their_headers(engines: Engines) {
    let (app, emulator) = setup(engines, |_| {}).await;
    let browser = emulator.new_browser();
    let id = subscribe(&app, &browser, &["news"], json!({})).await;
    // Published before nobody followed the topic's other events: not sent.
    app.publish_ok("other", json!("not followed")).await;
    let plain = app.publish_ok("news", json!({"headline": "plain"})).await;
    let res = app
        .publish(
            "news",
            &json!({"type": "alert", "data": {"headline": "urgent"},
                    "push": {"ttl": 60, "urgency": "high", "topic": "breaking"}}),
        )
        .await;
    assert_eq!(res.status(), 201);
    let urgent: Value = res.json().await.unwrap();
    let urgent = urgent["seq"].as_u64().unwrap();

    let got = emulator
        .wait_for_deliveries(2, Duration::from_secs(20))
        .await;
    assert_eq!(emulator.rejections(), Vec::<String>::new());
    let by_seq = |seq: u64| {
        got.iter()
            .find(|d| d.json()["seq"] == seq)
            .unwrap_or_else(|| panic!("seq {seq} not delivered"))
    };
    let first = by_seq(plain);
    assert_eq!(first.json(), event_json(&app, "news", plain).await);
    assert_eq!(first.ttl, 86_400, "the default TTL");
    assert_eq!(first.urgency.as_deref(), Some("normal"));
    assert_eq!(first.topic, None);
    let second = by_seq(urgent);
    assert_eq!(second.json(), event_json(&app, "news", urgent).await);
    assert_eq!(second.json()["data"], json!({"headline": "urgent"}));
    assert_eq!(second.ttl, 60);
    assert_eq!(second.urgency.as_deref(), Some("high"));
    assert_eq!(second.topic.as_deref(), Some("breaking"));
    assert!(got.iter().all(|d| d.browser_id == browser.id));

    let body = wait_report(&app, &id, |b| b["delivered"] == 2).await;
    assert_eq!(
        (body["pending"].as_u64(), body["failed"].as_u64()),
        (Some(0), Some(0))
    );
    let delivery = &body["deliveries"][0];
    assert_eq!(delivery["state"], "delivered");
    assert_eq!(delivery["status"], 201);
    assert_eq!(delivery["attempts"], 1);
    let (_, metrics) = (0, app.ctx.metrics.render());
    assert!(
        metrics.contains("rt_push_outcomes_total{outcome=\"delivered\"} 2"),
        "{metrics}"
    );
    // Nothing more arrives (the other topic, duplicates).
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(emulator.deliveries().len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn events_arrive_encrypted_signed_and_with_their_headers_distributed() {
    events_arrive_encrypted_signed_and_with_their_headers(Engines::Distributed).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn events_arrive_encrypted_signed_and_with_their_headers_embedded() {
    events_arrive_encrypted_signed_and_with_their_headers(Engines::Embedded).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn gone_subscriptions_are_removed() {
    let (app, emulator) = setup(Engines::Distributed, |_| {}).await;
    let browser = emulator.new_browser();
    let stays = emulator.new_browser();
    let id = subscribe(&app, &browser, &["t"], json!({})).await;
    subscribe(&app, &stays, &["t"], json!({})).await;
    emulator.script(&browser, vec![Scripted::Status(410)]);
    app.publish_ok("t", json!(1)).await;
    emulator
        .wait_for_deliveries(1, Duration::from_secs(20))
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = app
            .get_json(&format!("/v1/push/subscriptions/{id}/deliveries"))
            .await;
        if status == 404 {
            assert_eq!(body["error"]["code"], "subscription_not_found", "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the 410 subscription stayed: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, list) = app.get_json("/v1/push/subscriptions").await;
    assert_eq!(
        list["subscriptions"].as_array().map(Vec::len),
        Some(1),
        "{list}"
    );
    // Later events go to the remaining subscription only.
    app.publish_ok("t", json!(2)).await;
    emulator
        .wait_for_deliveries(2, Duration::from_secs(20))
        .await;
    assert_eq!(emulator.attempts_to(&browser).len(), 1);
    assert_eq!(emulator.deliveries_to(&stays).len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_after_is_honoured() {
    let (app, emulator) = setup(Engines::Distributed, |_| {}).await;
    let browser = emulator.new_browser();
    let id = subscribe(&app, &browser, &["t"], json!({})).await;
    emulator.script(&browser, vec![Scripted::StatusRetryAfter(429, 2)]);
    app.publish_ok("t", json!("later")).await;
    let got = emulator
        .wait_for_deliveries(1, Duration::from_secs(20))
        .await;
    let attempts = emulator.attempts_to(&browser);
    assert_eq!(attempts.len(), 2, "one 429, then the delivery");
    let gap = attempts[1].at - attempts[0].at;
    assert!(gap >= Duration::from_secs(2), "retried after {gap:?}");
    assert_eq!(got[0].json()["data"], "later");
    let body = wait_report(&app, &id, |b| b["delivered"] == 1).await;
    assert_eq!(body["deliveries"][0]["attempts"], 2, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn server_errors_are_retried_with_backoff_until_delivered() {
    let (app, emulator) = setup(Engines::Distributed, |_| {}).await;
    let browser = emulator.new_browser();
    let id = subscribe(&app, &browser, &["t"], json!({})).await;
    emulator.script(
        &browser,
        vec![
            Scripted::Status(500),
            Scripted::Status(503),
            Scripted::Status(502),
        ],
    );
    app.publish_ok("t", json!("eventually")).await;
    emulator
        .wait_for_deliveries(1, Duration::from_secs(30))
        .await;
    let attempts = emulator.attempts_to(&browser);
    let statuses: Vec<u16> = attempts.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [500, 503, 502, 201]);
    // Backoff from 200 ms, doubling, with jitter down to half: at least
    // 100, 200 and 400 ms between attempts.
    for (i, min_ms) in [100, 200, 400].into_iter().enumerate() {
        let gap = attempts[i + 1].at - attempts[i].at;
        assert!(
            gap >= Duration::from_millis(min_ms),
            "attempt {} came {gap:?} after the one before",
            i + 2
        );
    }
    let body = wait_report(&app, &id, |b| b["delivered"] == 1).await;
    assert_eq!(body["deliveries"][0]["attempts"], 4, "{body}");
    let metrics = app.ctx.metrics.render();
    assert!(
        metrics.contains("rt_push_outcomes_total{outcome=\"retry\"} 3"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn too_large_answers_and_big_events_become_notices() {
    let (app, emulator) = setup(Engines::Distributed, |_| {}).await;
    let refuses = emulator.new_browser();
    let private = emulator.new_browser();
    let big = emulator.new_browser();
    subscribe(&app, &refuses, &["small"], json!({})).await;
    subscribe(&app, &private, &["small"], json!({"noticeOnly": true})).await;
    subscribe(&app, &big, &["big"], json!({})).await;
    emulator.script(&refuses, vec![Scripted::Status(413)]);
    let small = app.publish_ok("small", json!({"secret": "s3cr3t"})).await;
    let large = app
        .publish_ok(
            "big",
            json!({"blob": "x".repeat(rt_push_dispatcher::MAX_PLAINTEXT)}),
        )
        .await;
    emulator
        .wait_for_deliveries(3, Duration::from_secs(20))
        .await;
    assert_eq!(emulator.rejections(), Vec::<String>::new());
    let notice = |browser: &Browser| {
        let got = emulator.deliveries_to(browser);
        assert_eq!(got.len(), 1, "one delivery to {}", browser.id);
        got[0].json()
    };
    let after_413 = notice(&refuses);
    assert_eq!(after_413["notice"], "too_large");
    assert_eq!(
        (&after_413["topic"], &after_413["seq"], &after_413["after"]),
        (
            &json!("small"),
            &json!(small),
            &json!(format!("small:{}", small - 1))
        )
    );
    assert!(after_413.get("data").is_none(), "{after_413}");
    assert_eq!(
        emulator.attempts_to(&refuses).len(),
        2,
        "event, then notice"
    );

    let only = notice(&private);
    assert_eq!(only["notice"], "notice_only");
    assert!(!only.to_string().contains("s3cr3t"), "{only}");

    let too_big = notice(&big);
    assert_eq!(
        (&too_big["notice"], &too_big["seq"]),
        (&json!("too_large"), &json!(large))
    );
    assert_eq!(
        emulator.attempts_to(&big).len(),
        1,
        "sent as a notice at once"
    );
}

/// A name that resolves only to internal addresses is not sent to (unless
/// private addresses are allowed): the delivery fails at once, nothing leaves.
#[tokio::test(flavor = "multi_thread")]
async fn endpoints_resolving_to_internal_addresses_are_not_sent_to() {
    let (app, emulator) = setup(Engines::Embedded, |s| {
        s.push_allow_private_addresses = false;
    })
    .await;
    let browser = emulator.new_browser();
    let mut body = browser.subscription_json(&["t"]);
    let by_name = browser.endpoint.replace("127.0.0.1", "localhost");
    assert_ne!(by_name, browser.endpoint);
    body["endpoint"] = json!(by_name);
    let res = app
        .http
        .post(app.url("/v1/push/subscriptions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201, "a name is judged when it is resolved");
    let id = res.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.publish_ok("t", json!(1)).await;
    let report = wait_report(&app, &id, |b| b["failed"] == 1).await;
    let failed = &report["deliveries"][0];
    assert_eq!(failed["attempts"], 1, "not retried: {report}");
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("localhost resolves to no public address"),
        "{report}"
    );
    assert!(emulator.attempts_to(&browser).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn other_client_errors_fail_without_retry() {
    let (app, emulator) = setup(Engines::Distributed, |_| {}).await;
    let browser = emulator.new_browser();
    let id = subscribe(&app, &browser, &["t"], json!({})).await;
    emulator.script(&browser, vec![Scripted::Status(400)]);
    app.publish_ok("t", json!(1)).await;
    let body = wait_report(&app, &id, |b| b["failed"] == 1).await;
    let failed = &body["deliveries"][0];
    assert_eq!(
        (&failed["state"], &failed["status"]),
        (&json!("failed"), &json!(400))
    );
    assert!(failed["error"].as_str().unwrap().contains("400"), "{body}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(emulator.attempts_to(&browser).len(), 1, "not retried");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_push_service_does_not_hold_up_the_others() {
    let (app, slow_service) = setup(Engines::Distributed, |s| {
        s.push_host_concurrency = 2;
        s.push_request_timeout = Duration::from_secs(30);
    })
    .await;
    let fast_service = PushEmulator::start().await;
    let (_, key) = app.get_json("/v1/push/vapid-public-key").await;
    fast_service.set_vapid_public_key(key["publicKey"].as_str().unwrap());
    let mut slow = Vec::new();
    for _ in 0..6 {
        let browser = slow_service.new_browser();
        slow_service.set_delay(&browser, Duration::from_secs(3));
        subscribe(&app, &browser, &["t"], json!({})).await;
        slow.push(browser);
    }
    let fast = fast_service.new_browser();
    subscribe(&app, &fast, &["t"], json!({})).await;
    let started = Instant::now();
    for i in 0..5 {
        app.publish_ok("t", json!(i)).await;
    }
    fast_service
        .wait_for_deliveries(5, Duration::from_secs(20))
        .await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "the fast push service waited behind the slow one: {took:?}"
    );
    // The slow one never has more than 2 requests at once, and all 30 arrive.
    slow_service
        .wait_for_deliveries(30, Duration::from_secs(60))
        .await;
    assert!(
        slow_service.max_concurrent() <= 2,
        "{}",
        slow_service.max_concurrent()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_push_options_are_refused_and_nothing_is_stored() {
    let app = TestApp::spawn(Engines::Distributed, |_| {}).await;
    let cases = [
        json!({"data": 1, "push": {"ttl": -1}}),
        json!({"data": 1, "push": {"ttl": 2_419_201}}),
        json!({"data": 1, "push": {"urgency": "asap"}}),
        json!({"data": 1, "push": {"topic": "has space"}}),
        json!({"data": 1, "push": {"topic": "x".repeat(33)}}),
        json!({"data": 1, "push": {"colour": "red"}}),
        json!({"data": 1, "push": "high"}),
    ];
    for body in cases {
        let res = app.publish("t", &body).await;
        let status = res.status().as_u16();
        let answer: Value = res.json().await.unwrap();
        assert_eq!(status, 400, "{body} → {answer}");
        let code = answer["error"]["code"].as_str().unwrap();
        assert!(
            ["invalid_push_options", "invalid_json", "invalid_body"].contains(&code),
            "{body} → {answer}"
        );
    }
    let res = app
        .http
        .post(app.url("/v1/events"))
        .json(&json!([{"topic": "t", "data": 1}, {"topic": "t", "data": 2, "push": {"urgency": "now"}}]))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let answer: Value = res.json().await.unwrap();
    assert_eq!(answer["error"]["code"], "invalid_push_options", "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("events[1]."),
        "{answer}"
    );
    let (seqs, _) = app.poll("t", 0, 0).await;
    assert!(seqs.is_empty(), "nothing was stored: {seqs:?}");
}
