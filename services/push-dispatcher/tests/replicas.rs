//! Two `push-dispatcher` processes sharing one Postgres and one NATS, as
//! deployments run them: together they deliver every (event, subscription)
//! pair exactly once while both are healthy, and when one is killed mid-run
//! the other takes over its leased work, so every pair is still delivered.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use rt_core::Context;
use rt_tests::{
    ServiceProcess, TestApp, TestDb, distributed_settings, nats_url,
    push_emulator::{Browser, PushEmulator},
    unique_prefix,
};
use serde_json::{Value, json};

const TOPICS: usize = 5;
const SUBSCRIPTIONS: usize = 50;
/// Events per phase (one with both healthy, one with a kill in the middle).
const EVENTS: usize = 1000;
/// Batch size of the publishes.
const BATCH: usize = 50;
/// In every event's data: must never show up in a dispatcher's log.
const SECRET: &str = "payload-9f2c41d7";

fn topic(i: usize) -> String {
    format!("t{}", i % TOPICS)
}

/// Publishes `EVENTS` events round-robin over the topics, in batches, tagged
/// with `phase`; returns every (topic, seq) published.
async fn publish_phase(http: &reqwest::Client, base: &str, phase: u32) -> Vec<(String, u64)> {
    let mut published = Vec::with_capacity(EVENTS);
    for start in (0..EVENTS).step_by(BATCH) {
        let batch: Vec<Value> = (start..start + BATCH)
            .map(|i| json!({"topic": topic(i), "data": {"phase": phase, "i": i, "secret": SECRET}}))
            .collect();
        let res = http
            .post(format!("{base}/v1/events"))
            .json(&batch)
            .send()
            .await
            .expect("publish");
        let status = res.status();
        let body: Value = res.json().await.expect("JSON answer");
        assert_eq!(status, 201, "{body}");
        for e in body["events"].as_array().expect("events") {
            published.push((
                e["topic"].as_str().expect("topic").to_owned(),
                e["seq"].as_u64().expect("seq"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    published
}

/// How many times each (browser, topic, seq) arrived at the emulator.
fn arrivals(emulator: &PushEmulator) -> HashMap<(String, String, u64), usize> {
    let mut count = HashMap::new();
    for d in emulator.deliveries() {
        let event = d.json();
        let key = (
            d.browser_id.clone(),
            event["topic"].as_str().expect("topic").to_owned(),
            event["seq"].as_u64().expect("seq"),
        );
        *count.entry(key).or_insert(0) += 1;
    }
    count
}

/// Every pair the phase must deliver: each published event to each browser
/// following its topic.
fn expected(
    published: &[(String, u64)],
    browsers: &[(Browser, String)],
) -> Vec<(String, String, u64)> {
    let mut want = Vec::new();
    for (topic, seq) in published {
        for (browser, followed) in browsers {
            if followed == topic {
                want.push((browser.id.clone(), topic.clone(), *seq));
            }
        }
    }
    want
}

/// Waits until every pair of `want` has arrived at least once; panics with
/// what is missing after `timeout`.
async fn wait_all(emulator: &PushEmulator, want: &[(String, String, u64)], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let got = arrivals(emulator);
        let missing: Vec<_> = want.iter().filter(|k| !got.contains_key(*k)).collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} pairs never arrived, e.g. {:?}; rejections: {:?}",
            missing.len(),
            want.len(),
            &missing[..missing.len().min(5)],
            emulator.rejections()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The `delivered` outcome counter of one dispatcher process.
async fn delivered_by(http: &reqwest::Client, process: &ServiceProcess) -> u64 {
    let text = http
        .get(process.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .find_map(|l| l.strip_prefix("rt_push_outcomes_total{outcome=\"delivered\"} "))
        .map_or(0, |v| v.trim().parse().expect("a counter"))
}

#[tokio::test(flavor = "multi_thread")]
async fn two_dispatchers_share_the_work_and_a_killed_ones_work_is_taken_over() {
    rt_tests::init_telemetry();
    let db = TestDb::create().await;
    let prefix = unique_prefix();
    let nats = nats_url();
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("RT_NATS_URL", nats.as_str()),
        ("RT_NATS_PREFIX", prefix.as_str()),
        ("RT_PUSH_ALLOW_INSECURE_ENDPOINTS", "true"),
        ("RT_PUSH_ALLOW_PRIVATE_ADDRESSES", "true"),
        // A dead dispatcher's claims come back after this long.
        ("RT_PUSH_LEASE", "3s"),
        ("RT_PUSH_REQUEST_TIMEOUT", "2s"),
        ("RT_PUSH_SWEEP_INTERVAL", "500ms"),
        ("RT_PUSH_RETRY_BASE", "200ms"),
        ("RT_LOG", "rt_push_dispatcher=debug,rt_core=debug,info"),
    ];
    // The publisher (and the subscription routes) in this process; it runs no
    // dispatcher of its own.
    let mut settings = distributed_settings(&db.url, &prefix);
    settings.push_allow_insecure_endpoints = true;
    settings.push_allow_private_addresses = true;
    let ctx = Context::connect(settings).await.expect("connect");
    let app = TestApp::serve(ctx, prefix.clone(), None, None);
    let emulator = PushEmulator::start().await;
    let (status, key) = app.get_json("/v1/push/vapid-public-key").await;
    assert_eq!(status, 200, "{key}");
    emulator.set_vapid_public_key(key["publicKey"].as_str().expect("publicKey"));

    let mut browsers = Vec::new();
    for i in 0..SUBSCRIPTIONS {
        let browser = emulator.new_browser();
        let followed = topic(i);
        let res = app
            .http
            .post(app.url("/v1/push/subscriptions"))
            .json(&browser.subscription_json(&[&followed]))
            .send()
            .await
            .expect("register");
        assert_eq!(
            res.status(),
            201,
            "{}",
            res.text().await.unwrap_or_default()
        );
        browsers.push((browser, followed));
    }

    let one = ServiceProcess::start(env!("CARGO_BIN_EXE_push-dispatcher"), &env);
    let doomed = ServiceProcess::start(env!("CARGO_BIN_EXE_push-dispatcher"), &env);
    let http = reqwest::Client::new();

    // Phase 1: both healthy. Every pair exactly once, and both did a share.
    let published = publish_phase(&http, &app.base, 1).await;
    let want = expected(&published, &browsers);
    assert_eq!(want.len(), EVENTS * SUBSCRIPTIONS / TOPICS);
    wait_all(&emulator, &want, Duration::from_secs(240)).await;
    // Late duplicates, if any, would arrive now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = arrivals(&emulator);
    let twice: Vec<_> = got.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "{} pairs were delivered more than once while both dispatchers were healthy, e.g. {:?}",
        twice.len(),
        &twice[..twice.len().min(5)]
    );
    assert_eq!(got.len(), want.len(), "nothing beyond the expected pairs");
    let (by_one, by_doomed) = (
        delivered_by(&http, &one).await,
        delivered_by(&http, &doomed).await,
    );
    assert_eq!(by_one + by_doomed, want.len() as u64);
    assert!(
        by_one > 0 && by_doomed > 0,
        "both dispatchers delivered a share: {by_one} and {by_doomed}"
    );
    println!(
        "healthy: {} pairs delivered once each ({by_one} by one dispatcher, {by_doomed} by the other)",
        want.len()
    );

    // Phase 2: kill one while the events are being delivered.
    let before = emulator.deliveries().len();
    let publish = publish_phase(&http, &app.base, 2);
    let kill = async {
        let deadline = Instant::now() + Duration::from_secs(120);
        while emulator.deliveries().len() < before + want.len() / 3 {
            assert!(
                Instant::now() < deadline,
                "phase 2 deliveries never started"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(doomed); // SIGKILL, with claims in flight
        emulator.deliveries().len() - before
    };
    let (published2, delivered_at_kill) = tokio::join!(publish, kill);
    let want2 = expected(&published2, &browsers);
    wait_all(&emulator, &want2, Duration::from_secs(240)).await;
    tokio::time::sleep(Duration::from_secs(4)).await; // a lease and then some
    let got = arrivals(&emulator);
    let twice = want2.iter().filter(|k| got[*k] > 1).count();
    let extra: usize = want2.iter().map(|k| got[k] - 1).sum();
    assert_eq!(
        got.len(),
        want.len() + want2.len(),
        "nothing beyond the expected pairs"
    );
    assert!(
        twice < want2.len() / 10,
        "{twice} of {} pairs delivered twice: more than a dead dispatcher's claims",
        want2.len()
    );
    println!(
        "killed one dispatcher after {delivered_at_kill} of {} deliveries: all {} pairs delivered, \
         {twice} of them more than once ({extra} extra messages)",
        want2.len(),
        want2.len()
    );
    assert!(
        emulator.rejections().is_empty(),
        "{:?}",
        emulator.rejections()
    );
    let log = one.take_log();
    assert!(
        log.iter().any(|l| l.contains("push dispatcher started")),
        "the survivor's log was captured: {log:?}"
    );
    let leaks: Vec<&String> = log.iter().filter(|l| l.contains(SECRET)).collect();
    assert!(leaks.is_empty(), "event data in the log: {leaks:?}");
    assert!(one.terminate().success());
}
