//! Polling: long polls wake on publish, many pollers each see every event
//! once and in order, lost and late bus messages are filled in from the log,
//! positions lost to retention yield an explicit reset.

use std::time::{Duration, Instant};

use rt_core::{
    Topic,
    hub::{Delivery, Follower},
    store::Retention,
};
use rt_tests::{Engines, LossyBus, TestApp, seqs};
use serde_json::json;

async fn long_poll_wakes_on_publish_and_times_out_empty(engines: Engines) {
    let app = TestApp::spawn(engines, |_| {}).await;
    let started = Instant::now();
    let waiter = app.poll("news", 0, 20);
    let publisher = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        app.publish_ok("news", json!("hello")).await
    };
    let ((got, next), seq) = tokio::join!(waiter, publisher);
    assert_eq!(seq, 1);
    assert_eq!(
        got,
        [1],
        "the waiter gets the event published while it waited"
    );
    assert_eq!(next, 1);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(10),
        "the poll answered after {waited:?}: it should have waited for the publish only"
    );

    let started = Instant::now();
    let (got, next) = app.poll("news", 1, 1).await;
    assert!(got.is_empty(), "nothing new: {got:?}");
    assert_eq!(next, 1, "an empty answer keeps the position");
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "an empty long poll waits the whole `wait`"
    );
}

#[tokio::test]
async fn long_poll_wakes_on_publish_and_times_out_empty_distributed() {
    long_poll_wakes_on_publish_and_times_out_empty(Engines::Distributed).await;
}

#[tokio::test]
async fn long_poll_wakes_on_publish_and_times_out_empty_embedded() {
    long_poll_wakes_on_publish_and_times_out_empty(Engines::Embedded).await;
}

/// A long-poll loop: follows `after=next` until it has seen `until`.
async fn poll_until(app: &TestApp, topic: &str, until: u64) -> Vec<u64> {
    let mut got = Vec::new();
    let mut after = 0;
    while after < until {
        let (seqs, next) = app.poll(topic, after, 30).await;
        got.extend(seqs);
        after = next;
    }
    got
}

async fn publish_from(app: &TestApp, topic: &str, publishers: u64, each: u64) {
    let tasks = (0..publishers).map(|p| async move {
        for i in 0..each {
            app.publish_ok(topic, json!({"p": p, "i": i})).await;
        }
    });
    futures_util::future::join_all(tasks).await;
}

#[tokio::test]
async fn two_hundred_long_pollers_each_see_every_event_once_in_order() {
    let app = TestApp::spawn(Engines::Distributed, |_| {}).await;
    const EVENTS: u64 = 2000;
    let pollers = (0..200).map(|_| poll_until(&app, "hot", EVENTS));
    let (results, ()) = tokio::join!(
        futures_util::future::join_all(pollers),
        publish_from(&app, "hot", 4, EVENTS / 4)
    );
    let want: Vec<u64> = (1..=EVENTS).collect();
    for (i, got) in results.iter().enumerate() {
        assert_eq!(got.len(), want.len(), "poller {i} got {} events", got.len());
        assert!(got == &want, "poller {i} did not get 1..={EVENTS} in order");
    }
}

#[tokio::test]
async fn lost_and_late_bus_messages_are_filled_in_from_the_log() {
    let mut lossy = None;
    let app = TestApp::spawn_wrapped(
        Engines::Distributed,
        |s| s.head_check_interval = Duration::from_millis(200),
        |bus| {
            let bus = LossyBus::new(bus, 10, 7, Duration::from_millis(50));
            lossy = Some(bus.clone());
            bus
        },
    )
    .await;
    let lossy = lossy.unwrap();
    let topic = Topic::parse("gappy").unwrap();
    const EVENTS: u64 = 300;

    // Hub subscribers straight from core, and long pollers over HTTP.
    let mut followers = Vec::new();
    for _ in 0..3 {
        followers.push(Follower::start(&app.ctx.hub, &topic, 0, 100).await.unwrap());
    }
    let followed = followers.into_iter().map(|mut f| async move {
        let mut got = Vec::new();
        while got.len() < EVENTS as usize + 1 {
            match tokio::time::timeout(Duration::from_secs(20), f.next()).await {
                Ok(Ok(Delivery::Event(e))) => got.push(e.seq()),
                Ok(other) => panic!("unexpected delivery: {other:?}"),
                Err(_) => panic!("follower stalled after {got:?}"),
            }
        }
        got
    });
    let pollers = (0..20).map(|_| poll_until(&app, "gappy", EVENTS + 1));
    let publish = async {
        publish_from(&app, "gappy", 3, EVENTS / 3).await;
        // The very last message is lost too: only the head check finds it.
        lossy.lose_all(true);
        app.publish_ok("gappy", json!("last")).await;
    };
    let (followed, polled, ()) = tokio::join!(
        futures_util::future::join_all(followed),
        futures_util::future::join_all(pollers),
        publish
    );
    let want: Vec<u64> = (1..=EVENTS + 1).collect();
    for got in followed.iter().chain(&polled) {
        assert!(
            got == &want,
            "a reader did not get 1..={} in order: {got:?}",
            EVENTS + 1
        );
    }
    assert!(
        lossy.dropped() >= EVENTS / 10,
        "the bus really lost messages"
    );
    let fills = app.ctx.metrics.render();
    assert!(
        fills.contains("rt_hub_fills_total{reason=\"gap\"}")
            && fills.contains("rt_hub_fills_total{reason=\"head_check\"}"),
        "gaps and the lost last message were filled from the log:\n{fills}"
    );
}

#[tokio::test]
async fn followers_that_take_bursts_in_batches_get_every_event_once_in_order_through_a_lag() {
    // The smallest live ring, so that a follower that does not read for a
    // while falls behind it and catches up from the log.
    let app = TestApp::spawn(Engines::Embedded, |s| s.hub_queue = 16).await;
    let topic = Topic::parse("batches").unwrap();
    const EVENTS: u64 = 1 + 3 * 133;
    let mut eager = Follower::start(&app.ctx.hub, &topic, 0, 100).await.unwrap();
    let mut late = Follower::start(&app.ctx.hub, &topic, 0, 100).await.unwrap();
    let lagged = app.ctx.metrics.hub_lagged.get();
    // Taken as the edges take them: one delivery waited for, then whatever
    // is at hand behind it.
    async fn read(f: &mut Follower, got: &mut Vec<u64>, until: u64) {
        while got.last().copied().unwrap_or(0) < until {
            let first = tokio::time::timeout(Duration::from_secs(20), f.next())
                .await
                .unwrap_or_else(|_| panic!("stalled after {:?}", got.last()))
                .expect("a delivery");
            let mut batch = vec![first];
            while let Some(d) = f.try_next() {
                batch.push(d);
            }
            for d in batch {
                match d {
                    Delivery::Event(e) => got.push(e.seq()),
                    other => panic!("unexpected delivery: {other:?}"),
                }
            }
        }
    }
    // Both read the first event, so both then read live from the ring.
    app.publish_ok("batches", json!(0)).await;
    let (mut eager_got, mut late_got) = (Vec::new(), Vec::new());
    read(&mut eager, &mut eager_got, 1).await;
    read(&mut late, &mut late_got, 1).await;
    // A burst that only one of them reads as it comes.
    let reading = read(&mut eager, &mut eager_got, EVENTS);
    let publishing = publish_from(&app, "batches", 3, (EVENTS - 1) / 3);
    tokio::join!(reading, publishing);
    read(&mut late, &mut late_got, EVENTS).await;
    let want: Vec<u64> = (1..=EVENTS).collect();
    assert_eq!(eager_got, want);
    assert_eq!(late_got, want);
    assert!(
        app.ctx.metrics.hub_lagged.get() > lagged,
        "the late follower fell behind the ring"
    );
}

async fn resuming_from_a_pruned_position_yields_a_reset(engines: Engines) {
    let app = TestApp::spawn(engines, |_| {}).await;
    for i in 1..=10 {
        app.publish_ok("r", json!(i)).await;
    }
    let retention = Retention {
        max_count: Some(3),
        max_age: None,
    };
    assert_eq!(app.ctx.store.prune(retention).await.unwrap(), 7);

    let (status, body) = app.get_json("/v1/topics/r/events?after=2").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(seqs(&body), [8, 9, 10]);
    assert_eq!(body["next"], 10);
    assert_eq!(body["reset"], json!([{"topic": "r", "from": 7}]), "{body}");

    // A position inside what is kept resumes without a reset.
    let (_, body) = app.get_json("/v1/topics/r/events?after=7").await;
    assert_eq!(seqs(&body), [8, 9, 10]);
    assert!(body.get("reset").is_none(), "{body}");

    // The same through the hub directly: the reset comes first.
    let topic = Topic::parse("r").unwrap();
    let mut f = Follower::start(&app.ctx.hub, &topic, 2, 100).await.unwrap();
    match f.next().await.unwrap() {
        Delivery::Reset { topic: t, from } => assert_eq!((t, from), (topic.clone(), 7)),
        other => panic!("expected a reset, got {other:?}"),
    }
    match f.next().await.unwrap() {
        Delivery::Event(e) => assert_eq!(e.seq(), 8),
        other => panic!("expected event 8, got {other:?}"),
    }

    // Everything pruned: still a reset, to the head.
    assert_eq!(
        app.ctx
            .store
            .prune(Retention {
                max_count: Some(0),
                max_age: None
            })
            .await
            .unwrap(),
        3
    );
    let (_, body) = app.get_json("/v1/topics/r/events?after=5").await;
    assert_eq!(seqs(&body), Vec::<u64>::new());
    assert_eq!(body["reset"], json!([{"topic": "r", "from": 10}]), "{body}");
    assert_eq!(body["next"], 10);
}

#[tokio::test]
async fn resuming_from_a_pruned_position_yields_a_reset_distributed() {
    resuming_from_a_pruned_position_yields_a_reset(Engines::Distributed).await;
}

#[tokio::test]
async fn resuming_from_a_pruned_position_yields_a_reset_embedded() {
    resuming_from_a_pruned_position_yields_a_reset(Engines::Embedded).await;
}

#[tokio::test]
async fn several_topics_are_polled_with_one_position() {
    let app = TestApp::spawn(Engines::Distributed, |_| {}).await;
    for i in 0..3 {
        app.publish_ok("a", json!(i)).await;
    }
    for i in 0..2 {
        app.publish_ok("b", json!(i)).await;
    }
    let (status, body) = app.get_json("/v1/events?topic=a&topic=b&after=a:1").await;
    assert_eq!(status, 200, "{body}");
    let got: Vec<(String, u64)> = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["topic"].as_str().unwrap().to_owned(),
                e["seq"].as_u64().unwrap(),
            )
        })
        .collect();
    let mut sorted = got.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [
            ("a".into(), 2),
            ("a".into(), 3),
            ("b".into(), 1),
            ("b".into(), 2)
        ]
    );
    assert_eq!(body["next"], "a:3,b:2");

    // Waiting on both: an event on either answers.
    let waiter = app.get_json("/v1/events?topic=a&topic=b&after=a:3,b:2&wait=20");
    let publisher = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        app.publish_ok("b", json!("late")).await
    };
    let ((status, body), _) = tokio::join!(waiter, publisher);
    assert_eq!(status, 200);
    assert_eq!(seqs(&body), [3]);
    assert_eq!(body["events"][0]["topic"], "b");
    assert_eq!(body["next"], "a:3,b:3");
}

#[tokio::test]
async fn short_polls_answer_304_when_nothing_is_new() {
    let app = TestApp::spawn(Engines::Embedded, |_| {}).await;
    app.publish_ok("s", json!(1)).await;
    let url = app.url("/v1/topics/s/events?after=1");
    let res = app.http.get(&url).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["retry-after"], "1");
    let etag = res.headers()["etag"].to_str().unwrap().to_owned();

    let res = app
        .http
        .get(&url)
        .header("If-None-Match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 304, "nothing new: not modified");
    assert!(res.bytes().await.unwrap().is_empty());

    app.publish_ok("s", json!(2)).await;
    // The event reaches the topic's live feed a moment after the publish is
    // acknowledged: a short wait covers that.
    let res = app
        .http
        .get(format!("{url}&wait=10"))
        .header("If-None-Match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "a new event changes the answer");
    assert_ne!(res.headers()["etag"].to_str().unwrap(), etag);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(seqs(&body), [2]);
}

#[tokio::test]
async fn a_wake_up_of_many_waiters_reads_nothing_from_the_store() {
    let app = TestApp::spawn(Engines::Distributed, |_| {}).await;
    app.publish_ok("w", json!(0)).await;
    let store_reads = |app: &TestApp| {
        let text = app.ctx.metrics.render();
        text.lines()
            .find(|l| l.starts_with("rt_hub_reads_total{source=\"store\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .map_or(0, |n| n.parse::<u64>().unwrap())
    };
    // Warm the topic up: its feed starts and knows its head.
    app.poll("w", 1, 0).await;
    let before = store_reads(&app);
    let waiters = (0..100).map(|_| app.poll("w", 1, 20));
    let publisher = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        app.publish_ok("w", json!(1)).await
    };
    let (answers, _) = tokio::join!(futures_util::future::join_all(waiters), publisher);
    for (got, next) in answers {
        assert_eq!((got, next), (vec![2], 2));
    }
    assert_eq!(
        store_reads(&app) - before,
        0,
        "100 waiters woke without reading the store"
    );
}

#[tokio::test]
async fn the_hub_caches_of_all_topics_stay_within_their_bound_and_keep_the_newest_events() {
    const BOUND: usize = 64 * 1024;
    let app = TestApp::spawn(Engines::Embedded, |s| s.hub_cache_bytes = BOUND).await;
    let hub = &app.ctx.hub;
    let topics: Vec<Topic> = (0..20)
        .map(|i| Topic::parse(&format!("cached{i}")).unwrap())
        .collect();
    let mut interest = Vec::new();
    for topic in &topics {
        interest.push(hub.subscribe(topic).await.unwrap());
    }
    // 100 events of about 1 KB per topic: unbounded, the caches would hold
    // all 2,000 (about 9 MB as counted).
    for topic in &topics {
        app.publish_padded(topic.as_str(), 1, 1000).await;
    }
    for topic in &topics {
        let (got, _) = app.poll(topic.as_str(), 99, 10).await;
        assert_eq!(got, [100], "the hub has handed on all of {topic}");
    }
    let held = app.ctx.metrics.hub_cache_bytes.get();
    assert!(
        held > 0 && held as usize <= BOUND,
        "the caches hold {held} bytes, bound {BOUND}"
    );
    // Nothing is lost: what the caches gave up comes from the store.
    for topic in &topics {
        let (got, _) = app.poll(topic.as_str(), 0, 0).await;
        assert_eq!(got, (1..=100).collect::<Vec<u64>>(), "all of {topic}");
    }
    // The newest events stay cached.
    let from_cache = || {
        app.ctx
            .metrics
            .hub_reads
            .with_label_values(&["cache"])
            .get()
    };
    let before = from_cache();
    let read = hub.read(&topics[19], 99, 10).await.unwrap();
    assert_eq!(read.events.len(), 1);
    assert_eq!(read.events[0].seq(), 100);
    assert_eq!(
        from_cache(),
        before + 1,
        "the newest event came from the cache"
    );
    drop(interest);
}

#[tokio::test]
async fn a_zero_hub_cache_bound_turns_the_cache_off_and_reads_come_from_the_store() {
    let app = TestApp::spawn(Engines::Embedded, |s| s.hub_cache_bytes = 0).await;
    let topic = Topic::parse("uncached").unwrap();
    let interest = app.ctx.hub.subscribe(&topic).await.unwrap();
    for i in 0..3 {
        app.publish_ok("uncached", json!(i)).await;
    }
    let (got, _) = app.poll("uncached", 2, 10).await;
    assert_eq!(got, [3]);
    assert_eq!(app.ctx.metrics.hub_cache_bytes.get(), 0);
    let reads = |source: &str| app.ctx.metrics.hub_reads.with_label_values(&[source]).get();
    let (cache, store) = (reads("cache"), reads("store"));
    let (got, _) = app.poll("uncached", 0, 0).await;
    assert_eq!(got, [1, 2, 3]);
    assert_eq!((reads("cache"), reads("store")), (cache, store + 1));
    drop(interest);
}
