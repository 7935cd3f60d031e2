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
