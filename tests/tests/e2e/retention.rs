//! Retention: pruning by count and by age moves the lowest readable seq, so
//! readers can tell a client its position is too old.

use std::time::Duration;

use rt_core::{
    Topic,
    store::{Retention, TopicHead},
};
use rt_tests::{Engines, TestApp};
use serde_json::json;

async fn retention_prunes_by_count_and_age(engines: Engines) {
    let app = TestApp::spawn(engines, |_| {}).await;
    let (a, b) = (Topic::parse("a").unwrap(), Topic::parse("b").unwrap());
    for i in 0..10 {
        app.publish_ok("a", json!(i)).await;
    }
    app.publish_ok("b", json!("only")).await;

    let by_count = Retention {
        max_count: Some(3),
        max_age: None,
    };
    assert_eq!(app.ctx.store.prune(by_count).await.unwrap(), 7);
    assert_eq!(
        app.ctx.store.prune(by_count).await.unwrap(),
        0,
        "pruning twice removes nothing more"
    );
    let read = app.ctx.store.read(&a, 0, 100).await.unwrap();
    assert_eq!(
        read.head,
        TopicHead {
            low_seq: 8,
            last_seq: 10
        }
    );
    assert_eq!(
        read.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [8, 9, 10]
    );

    // New events keep counting from the head, not from the pruned range.
    assert_eq!(app.publish_ok("a", json!("after")).await, 11);

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let by_age = Retention {
        max_count: None,
        max_age: Some(Duration::from_secs(1)),
    };
    assert_eq!(app.ctx.store.prune(by_age).await.unwrap(), 5);
    let heads = app.ctx.store.heads(&[a.clone(), b.clone()]).await.unwrap();
    assert_eq!(
        heads[&a],
        TopicHead {
            low_seq: 12,
            last_seq: 11
        }
    );
    assert_eq!(
        heads[&b],
        TopicHead {
            low_seq: 2,
            last_seq: 1
        }
    );
    assert!(
        app.ctx
            .store
            .read(&a, 0, 100)
            .await
            .unwrap()
            .events
            .is_empty()
    );
}

#[tokio::test]
async fn retention_prunes_by_count_and_age_on_postgres() {
    retention_prunes_by_count_and_age(Engines::Distributed).await;
}

#[tokio::test]
async fn retention_prunes_by_count_and_age_on_the_embedded_default() {
    retention_prunes_by_count_and_age(Engines::Embedded).await;
}

#[tokio::test]
async fn the_pruning_task_applies_configured_retention() {
    let app = TestApp::spawn(Engines::Distributed, |s| {
        s.retention_count = Some(2);
        s.prune_interval = Duration::from_millis(200);
    })
    .await;
    for i in 0..5 {
        app.publish_ok("t", json!(i)).await;
    }
    let topic = Topic::parse("t").unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let head = app
            .ctx
            .store
            .heads(std::slice::from_ref(&topic))
            .await
            .unwrap()[&topic];
        if head.low_seq == 4 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pruning task did not run: {head:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("rt_events_pruned_total 3"), "{metrics}");
}
