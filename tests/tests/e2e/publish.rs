//! Publishing: gapless per-topic seqs under concurrency, the bus carrying
//! every event, idempotency keys, trace context.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::Duration,
};

use futures_util::StreamExt;
use rt_core::{Topic, proto};
use rt_tests::{Engines, TestApp, nats_client};
use serde_json::{Value, json};
use sqlx::Row;

const PUBLISHERS: usize = 16;
const PER_PUBLISHER: usize = 500;
const TOPICS: [&str; 4] = ["orders", "chat.room-1", "chat.room-2", "metrics_cpu"];

/// 16 publishers × 500 events over 4 topics, all at once. Returns, per
/// (topic, seq), the data the publisher was told got that seq.
async fn publish_concurrently(app: &TestApp) -> HashMap<(String, u64), Value> {
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let (http, base) = (app.http.clone(), app.base.clone());
        tasks.push(tokio::spawn(async move {
            let mut acks = Vec::with_capacity(PER_PUBLISHER);
            for i in 0..PER_PUBLISHER {
                let topic = TOPICS[(p + i) % TOPICS.len()];
                let data = json!({"publisher": p, "i": i});
                let res = http
                    .post(format!("{base}/v1/topics/{topic}/events"))
                    .json(&json!({"data": data}))
                    .send()
                    .await
                    .expect("publish");
                assert_eq!(res.status(), 201);
                let body: Value = res.json().await.expect("JSON");
                assert_eq!(body["topic"], topic);
                acks.push(((topic.to_owned(), body["seq"].as_u64().expect("seq")), data));
            }
            acks
        }));
    }
    let mut acked = HashMap::new();
    for t in tasks {
        for (key, data) in t.await.expect("publisher task") {
            let again = acked.insert(key.clone(), data);
            assert!(again.is_none(), "seq {key:?} was acknowledged twice");
        }
    }
    acked
}

/// Every topic's seqs are exactly 1..N and N adds up to all events.
fn assert_gapless(log: &BTreeMap<String, Vec<u64>>) {
    let mut total = 0;
    for (topic, seqs) in log {
        let want: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, &want, "topic {topic} seqs are not 1..N");
        total += seqs.len();
    }
    assert_eq!(total, PUBLISHERS * PER_PUBLISHER);
}

#[tokio::test]
async fn concurrent_publishers_get_gapless_seqs_and_nats_carries_every_event() {
    let app = TestApp::spawn(Engines::Distributed, |_| {}).await;
    let nats = nats_client().await;
    let mut sub = nats
        .subscribe(format!("{}.events.>", app.prefix))
        .await
        .expect("subscribe");
    nats.flush().await.expect("flush");

    let acked = publish_concurrently(&app).await;

    // The log: per topic exactly 1..N, each row holding what was acknowledged.
    let mut conn = app.db.as_ref().unwrap().connect().await;
    let rows = sqlx::query("SELECT topic, seq, data FROM rt_events ORDER BY topic, seq")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    let mut log: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for row in &rows {
        let (topic, seq, data): (String, i64, String) = (row.get(0), row.get(1), row.get(2));
        let data: Value = serde_json::from_str(&data).unwrap();
        assert_eq!(
            acked.get(&(topic.clone(), seq as u64)),
            Some(&data),
            "{topic}:{seq}"
        );
        log.entry(topic).or_default().push(seq as u64);
    }
    assert_gapless(&log);
    let heads: Vec<(String, i64)> = sqlx::query_as("SELECT name, last_seq FROM rt_topics")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    for (topic, last) in heads {
        assert_eq!(last as usize, log[&topic].len(), "last_seq of {topic}");
    }

    // NATS: one envelope per event, with the matching seq and data.
    let mut seen = HashSet::new();
    while seen.len() < acked.len() {
        let msg = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "NATS delivered only {} of {} envelopes",
                    seen.len(),
                    acked.len()
                )
            })
            .expect("subscription open");
        let event = proto::decode(&msg.payload).expect("valid envelope");
        assert_eq!(
            msg.subject.as_str(),
            format!("{}.events.{}", app.prefix, event.topic)
        );
        let key = (event.topic.to_string(), event.seq);
        let data: Value = serde_json::from_str(event.data.get()).unwrap();
        assert_eq!(
            acked.get(&key),
            Some(&data),
            "envelope {key:?} does not match the log"
        );
        assert!(seen.insert(key.clone()), "envelope {key:?} arrived twice");
    }
}

#[tokio::test]
async fn concurrent_publishers_get_gapless_seqs_on_the_embedded_default() {
    let app = TestApp::spawn(Engines::Embedded, |_| {}).await;
    let mut live = Vec::new();
    for t in TOPICS {
        live.push(
            app.ctx
                .bus
                .subscribe(&Topic::parse(t).unwrap())
                .await
                .unwrap(),
        );
    }

    let acked = publish_concurrently(&app).await;

    let mut log = BTreeMap::new();
    for t in TOPICS {
        let topic = Topic::parse(t).unwrap();
        let read = app.ctx.store.read(&topic, 0, 100_000).await.unwrap();
        for e in &read.events {
            let data: Value = serde_json::from_str(e.data.get()).unwrap();
            assert_eq!(acked.get(&(t.to_owned(), e.seq)), Some(&data));
        }
        assert_eq!(read.head.last_seq, read.events.len() as u64);
        log.insert(
            t.to_owned(),
            read.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        );
    }
    assert_gapless(&log);

    // The in-process bus carried every event of each topic, in seq order.
    for (t, mut stream) in TOPICS.into_iter().zip(live) {
        let n = log[t].len() as u64;
        for want in 1..=n {
            let e = tokio::time::timeout(Duration::from_secs(5), stream.next())
                .await
                .expect("bus event in time")
                .expect("bus open");
            assert_eq!((e.topic.as_str(), e.seq), (t, want));
        }
    }
}

async fn idempotency_key_returns_the_first_result(engines: Engines) {
    let app = TestApp::spawn(engines, |_| {}).await;
    let first = app.publish_ok("billing", json!("before")).await;
    assert_eq!(first, 1);

    let send = |key: &'static str, data: Value| {
        app.http
            .post(app.url("/v1/topics/billing/events"))
            .header("Idempotency-Key", key)
            .json(&json!({"data": data}))
            .send()
    };
    let res = send("charge-42", json!({"amount": 5})).await.unwrap();
    assert_eq!(res.status(), 201);
    assert!(res.headers().get("idempotent-replayed").is_none());
    let seq = res.json::<Value>().await.unwrap()["seq"].as_u64().unwrap();
    assert_eq!(seq, 2);

    // Retries, one after another and ten at once: the same seq, nothing new.
    let retry = send("charge-42", json!({"amount": 5})).await.unwrap();
    assert_eq!(retry.status(), 201);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(retry.json::<Value>().await.unwrap()["seq"], 2);
    let together =
        futures_util::future::join_all((0..10).map(|_| send("charge-42", json!({"amount": 5}))))
            .await;
    for res in together {
        assert_eq!(res.unwrap().json::<Value>().await.unwrap()["seq"], 2);
    }
    // Ten different new keys at once: ten new seqs.
    let keys: Vec<String> = (0..10).map(|i| format!("new-{i}")).collect();
    let fresh = futures_util::future::join_all(keys.iter().map(|k| {
        app.http
            .post(app.url("/v1/topics/billing/events"))
            .header("Idempotency-Key", k)
            .json(&json!({"data": k}))
            .send()
    }))
    .await;
    let mut seqs: Vec<u64> = Vec::new();
    for res in fresh {
        seqs.push(
            res.unwrap().json::<Value>().await.unwrap()["seq"]
                .as_u64()
                .unwrap(),
        );
    }
    seqs.sort();
    assert_eq!(seqs, (3..=12).collect::<Vec<_>>());

    // A keyed batch retried maps onto the same seqs.
    let batch = json!([{"topic": "billing", "data": 1}, {"topic": "other", "data": 2}]);
    let post_batch = || {
        app.http
            .post(app.url("/v1/events"))
            .header("Idempotency-Key", "batch-1")
            .json(&batch)
            .send()
    };
    let a: Value = post_batch().await.unwrap().json().await.unwrap();
    let b = post_batch().await.unwrap();
    assert_eq!(b.headers()["idempotent-replayed"], "true");
    let b: Value = b.json().await.unwrap();
    assert_eq!(
        a,
        json!({"events": [{"topic": "billing", "seq": 13}, {"topic": "other", "seq": 1}]})
    );
    assert_eq!(a, b);

    let read = app
        .ctx
        .store
        .read(&Topic::parse("billing").unwrap(), 0, 1000)
        .await
        .unwrap();
    assert_eq!(read.events.len(), 13, "retries stored copies");
    assert_eq!(read.events[1].data.get(), r#"{"amount":5}"#);
}

#[tokio::test]
async fn idempotency_key_returns_the_first_result_on_postgres() {
    idempotency_key_returns_the_first_result(Engines::Distributed).await;
}

#[tokio::test]
async fn idempotency_key_returns_the_first_result_on_the_embedded_default() {
    idempotency_key_returns_the_first_result(Engines::Embedded).await;
}

#[tokio::test]
async fn trace_context_travels_from_the_publish_request_to_nats_headers() {
    let app = TestApp::spawn(Engines::Distributed, |_| {}).await;
    let nats = nats_client().await;
    let mut sub = nats
        .subscribe(format!("{}.events.traced", app.prefix))
        .await
        .unwrap();
    nats.flush().await.unwrap();
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let res = app
        .http
        .post(app.url("/v1/topics/traced/events"))
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .json(&json!({"data": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let msg = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap()
        .unwrap();
    let headers = msg.headers.expect("NATS headers");
    let parent = headers
        .get("traceparent")
        .expect("traceparent header")
        .as_str();
    assert!(
        parent.starts_with(&format!("00-{trace_id}-")),
        "traceparent {parent} lost the trace id"
    );
}

#[tokio::test]
async fn ops_routes_report_health_readiness_and_metrics() {
    let app = TestApp::spawn(Engines::Distributed, |_| {}).await;
    app.publish_ok("m", json!(1)).await;
    let health = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let ready: Value = app
        .http
        .get(app.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["store"]["kind"], "postgres");
    assert_eq!(ready["bus"]["kind"], "nats");
    let metrics = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("rt_events_committed_total 1"), "{metrics}");
    assert!(
        metrics.contains(
            r#"rt_http_requests_total{route="/v1/topics/{topic:[^/]*}/events",status="201"} 1"#
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn keyed_and_unkeyed_publishes_interleave_without_gaps_on_one_topic() {
    // Keyed publishes take the store's general path, unkeyed ones its
    // one-statement path: both must order on the same topic row.
    let app = TestApp::spawn(Engines::Distributed, |_| {}).await;
    let tasks: Vec<_> = (0..8)
        .map(|p| {
            let (http, url) = (app.http.clone(), app.url("/v1/topics/mixed/events"));
            tokio::spawn(async move {
                let mut seqs = Vec::new();
                for i in 0..100 {
                    let mut req = http.post(&url).json(&json!({"data": [p, i]}));
                    if p % 2 == 0 {
                        req = req.header("Idempotency-Key", format!("k-{p}-{i}"));
                    }
                    let body: Value = req.send().await.unwrap().json().await.unwrap();
                    seqs.push(body["seq"].as_u64().expect("seq"));
                }
                seqs
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        let seqs = t.await.unwrap();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "one publisher's seqs go up"
        );
        all.extend(seqs);
    }
    all.sort();
    assert_eq!(all, (1..=800).collect::<Vec<u64>>());
    let read = app
        .ctx
        .store
        .read(&Topic::parse("mixed").unwrap(), 0, 1000)
        .await
        .unwrap();
    assert_eq!(read.events.iter().map(|e| e.seq).collect::<Vec<_>>(), all);
}
