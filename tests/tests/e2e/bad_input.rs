//! Bad input: each refused with a clear 4xx and a JSON error body, and
//! nothing stored.

use rt_tests::{Engines, TestApp, error_code};
use serde_json::json;
use sqlx::Row;

async fn nothing_stored(app: &TestApp) {
    let mut conn = app.db.as_ref().unwrap().connect().await;
    let row =
        sqlx::query("SELECT (SELECT count(*) FROM rt_events), (SELECT count(*) FROM rt_topics)")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(
        (row.get::<i64, _>(0), row.get::<i64, _>(1)),
        (0, 0),
        "something was stored"
    );
}

#[tokio::test]
async fn invalid_topic_names_are_refused_and_nothing_is_stored() {
    let app = TestApp::spawn(Engines::Distributed, |_| {}).await;
    let long = "t".repeat(129);
    // (path segment as sent, why it is invalid)
    let cases = [
        ("", "empty"),
        (long.as_str(), "129 characters"),
        ("a..b", "empty token"),
        (".a", "leading dot"),
        ("a.", "trailing dot"),
        ("%2A", "*"),
        ("%3E", ">"),
        ("a%20b", "space"),
        ("caf%C3%A9", "non-ASCII"),
        ("a:b", "colon"),
    ];
    for (segment, why) in cases {
        let res = app
            .http
            .post(app.url(&format!("/v1/topics/{segment}/events")))
            .json(&json!({"data": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_code(res).await,
            (400, "invalid_topic".into()),
            "topic {segment:?} ({why})"
        );
    }
    // The same names inside a batch.
    for name in ["", long.as_str(), "a..b", "*", ">", "a b", "café"] {
        let res = app
            .http
            .post(app.url("/v1/events"))
            .json(&json!([{"topic": "fine", "data": 1}, {"topic": name, "data": 2}]))
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_code(res).await,
            (400, "invalid_topic".into()),
            "batch topic {name:?}"
        );
    }
    nothing_stored(&app).await;
}

#[tokio::test]
async fn malformed_bodies_are_refused_and_nothing_is_stored() {
    let app = TestApp::spawn(Engines::Distributed, |s| s.max_body_bytes = 1024).await;
    let raw = |path: &'static str, body: String| {
        app.http
            .post(app.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let one = "/v1/topics/t/events";
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (one, "{not json".into(), 400, "invalid_json"),
        (one, "".into(), 400, "invalid_json"),
        (one, r#"{"type":"x"}"#.into(), 400, "invalid_body"),
        (one, r#"{"data":1,"extra":2}"#.into(), 400, "invalid_body"),
        (one, r#"[1,2]"#.into(), 400, "invalid_body"),
        (
            one,
            r#"{"data":1,"type":"two words"}"#.into(),
            400,
            "invalid_type",
        ),
        (one, r#"{"data":1,"type":""}"#.into(), 400, "invalid_type"),
        (
            one,
            format!(r#"{{"data":"{}"}}"#, "x".repeat(2000)),
            413,
            "payload_too_large",
        ),
        ("/v1/events", "[]".into(), 400, "invalid_batch"),
        (
            "/v1/events",
            r#"{"topic":"t","data":1}"#.into(),
            400,
            "invalid_body",
        ),
        (
            "/v1/events",
            r#"[{"topic":"t"}]"#.into(),
            400,
            "invalid_body",
        ),
        (
            "/v1/events",
            r#"[{"topic":"t","data":1},"#.into(),
            400,
            "invalid_json",
        ),
    ];
    for (path, body, status, code) in cases {
        let shown: String = body.chars().take(40).collect();
        let res = raw(path, body).await.unwrap();
        assert_eq!(
            error_code(res).await,
            (status, code.into()),
            "{path} with {shown:?}"
        );
    }
    let res = app
        .http
        .post(app.url(one))
        .header("Idempotency-Key", "has space")
        .json(&json!({"data": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(res).await,
        (400, "invalid_idempotency_key".into())
    );
    nothing_stored(&app).await;
}

#[tokio::test]
async fn a_batch_larger_than_the_limit_is_refused_whole() {
    let app = TestApp::spawn(Engines::Distributed, |s| s.max_batch_events = 3).await;
    let batch: Vec<_> = (0..4).map(|i| json!({"topic": "t", "data": i})).collect();
    let res = app
        .http
        .post(app.url("/v1/events"))
        .json(&batch)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(res).await, (400, "invalid_batch".into()));
    nothing_stored(&app).await;
}

#[tokio::test]
async fn unknown_paths_answer_with_a_json_error() {
    let app = TestApp::spawn(Engines::Embedded, |_| {}).await;
    let res = app
        .http
        .get(app.url("/v1/nothing-here"))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(res).await, (404, "not_found".into()));
}
