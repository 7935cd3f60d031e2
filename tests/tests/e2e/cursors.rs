//! Named cursors: reading does not move them, committing does (at-least-once),
//! and they live in the store, so they survive a restart of poll-api.

use std::time::Duration;

use rt_core::Context;
use rt_tests::{Engines, TestApp, distributed_settings, error_code, seqs};
use serde_json::{Value, json};

async fn put(app: &TestApp, path: &str, body: Value) -> (u16, Value) {
    let res = app
        .http
        .put(app.url(path))
        .json(&body)
        .send()
        .await
        .unwrap();
    (res.status().as_u16(), res.json().await.unwrap())
}

async fn post(app: &TestApp, path: &str, body: Value) -> (u16, Value) {
    let res = app
        .http
        .post(app.url(path))
        .json(&body)
        .send()
        .await
        .unwrap();
    (res.status().as_u16(), res.json().await.unwrap())
}

fn topic_seqs(body: &Value) -> Vec<(String, u64)> {
    body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["topic"].as_str().unwrap().to_owned(),
                e["seq"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Create, read twice without committing, commit, read again, long-poll.
async fn cursor_reads_repeat_until_committed(app: &TestApp) {
    let (status, body) = put(app, "/v1/cursors/worker", json!({"topics": ["a", "b"]})).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["position"], "a:0,b:0");
    let (status, _) = put(app, "/v1/cursors/worker", json!({"topics": ["b", "a"]})).await;
    assert_eq!(status, 200, "creating the same cursor again is a no-op");
    let (status, body) = put(app, "/v1/cursors/worker", json!({"topics": ["a"]})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("cursor_exists"))
    );

    for i in 0..3 {
        app.publish_ok("a", json!(i)).await;
    }
    app.publish_ok("b", json!("b1")).await;

    let (status, first) = app.get_json("/v1/cursors/worker/events").await;
    assert_eq!(status, 200, "{first}");
    let mut got = topic_seqs(&first);
    got.sort();
    assert_eq!(
        got,
        [
            ("a".into(), 1),
            ("a".into(), 2),
            ("a".into(), 3),
            ("b".into(), 1)
        ]
    );
    assert_eq!(first["next"], "a:3,b:1");
    let (_, again) = app.get_json("/v1/cursors/worker/events").await;
    assert_eq!(
        topic_seqs(&again).len(),
        4,
        "without a commit the same events come again: {again}"
    );

    // Commit part of it, then the rest.
    let (status, body) = post(app, "/v1/cursors/worker/commit", json!({"position": "a:2"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["position"], "a:2,b:0");
    let (_, partial) = app.get_json("/v1/cursors/worker/events").await;
    let mut got = topic_seqs(&partial);
    got.sort();
    assert_eq!(got, [("a".into(), 3), ("b".into(), 1)]);
    let (status, _) = post(
        app,
        "/v1/cursors/worker/commit",
        json!({"position": "a:3,b:1"}),
    )
    .await;
    assert_eq!(status, 200);
    // Committing an older position never moves the cursor back.
    let (_, body) = post(app, "/v1/cursors/worker/commit", json!({"position": "a:1"})).await;
    assert_eq!(body["position"], "a:3,b:1");

    app.publish_ok("a", json!("new")).await;
    // The topics' feeds are live now: the event reaches this process over the
    // bus a moment after the publish is acknowledged, so wait for it.
    let (_, body) = app.get_json("/v1/cursors/worker/events?wait=10").await;
    assert_eq!(topic_seqs(&body), [("a".into(), 4)]);
    assert_eq!(body["next"], "a:4,b:1");
    post(app, "/v1/cursors/worker/commit", json!({"position": "a:4"})).await;

    // A long poll on the cursor wakes on the next event of any of its topics.
    let waiter = app.get_json("/v1/cursors/worker/events?wait=20");
    let publisher = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        app.publish_ok("b", json!("b2")).await
    };
    let ((status, body), _) = tokio::join!(waiter, publisher);
    assert_eq!(status, 200);
    assert_eq!(topic_seqs(&body), [("b".into(), 2)]);

    // Starting at the latest events.
    let (status, body) = put(
        app,
        "/v1/cursors/tail",
        json!({"topics": ["a", "b"], "from": "latest"}),
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(body["position"], "a:4,b:2");
    let (_, body) = app.get_json("/v1/cursors/tail/events").await;
    assert_eq!(seqs(&body), Vec::<u64>::new());
}

#[tokio::test]
async fn cursor_reads_repeat_until_committed_embedded() {
    let app = TestApp::spawn(Engines::Embedded, |_| {}).await;
    cursor_reads_repeat_until_committed(&app).await;
}

#[tokio::test]
async fn cursors_survive_a_restart_and_refuse_bad_commits() {
    let mut app = TestApp::spawn(Engines::Distributed, |_| {}).await;
    cursor_reads_repeat_until_committed(&app).await;

    // Restart: a new service process over the same database.
    let db = app.db.take().expect("distributed app has a database");
    let prefix = app.prefix.clone();
    app.stop().await;
    drop(app);
    let ctx = Context::connect(distributed_settings(&db.url, &prefix))
        .await
        .unwrap();
    let app = TestApp::serve(ctx, prefix, Some(db), None);

    let (status, body) = app.get_json("/v1/cursors").await;
    assert_eq!(status, 200);
    let names: Vec<&str> = body["cursors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["tail", "worker"]);
    let (_, body) = app.get_json("/v1/cursors/worker").await;
    assert_eq!(
        body["position"], "a:4,b:1",
        "the committed position survived"
    );
    let (_, body) = app.get_json("/v1/cursors/worker/events").await;
    assert_eq!(topic_seqs(&body), [("b".into(), 2)]);

    let commit = |position: &str| {
        app.http
            .post(app.url("/v1/cursors/worker/commit"))
            .json(&json!({"position": position}))
            .send()
    };
    assert_eq!(
        error_code(commit("a:99").await.unwrap()).await,
        (400, "position_ahead".into())
    );
    assert_eq!(
        error_code(commit("c:1").await.unwrap()).await,
        (400, "invalid_position".into())
    );
    assert_eq!(
        error_code(commit("a:x").await.unwrap()).await,
        (400, "invalid_position".into())
    );

    let res = app
        .http
        .delete(app.url("/v1/cursors/worker"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    let (status, body) = app.get_json("/v1/cursors/worker").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("cursor_not_found"))
    );
}
