//! Bad polling input and tokens without subscribe rights: each a clear 4xx
//! with a JSON error body.

use rt_tests::{Engines, TestApp, error_code};
use serde_json::json;

#[tokio::test]
async fn bad_poll_input_is_refused_with_a_clear_error() {
    let app = TestApp::spawn(Engines::Embedded, |_| {}).await;
    app.publish_ok("a", json!(1)).await;
    let long = "t".repeat(129);
    let cases: Vec<(String, u16, &str)> = vec![
        ("/v1/topics/a/events?after=-1".into(), 400, "invalid_after"),
        ("/v1/topics/a/events?after=abc".into(), 400, "invalid_after"),
        (
            "/v1/topics/a/events?after=1&after=2".into(),
            400,
            "invalid_query",
        ),
        ("/v1/topics/a/events?limit=0".into(), 400, "invalid_limit"),
        (
            "/v1/topics/a/events?limit=100000".into(),
            400,
            "invalid_limit",
        ),
        ("/v1/topics/a/events?limit=ten".into(), 400, "invalid_limit"),
        ("/v1/topics/a/events?wait=9999".into(), 400, "invalid_wait"),
        ("/v1/topics/a/events?wait=-1".into(), 400, "invalid_wait"),
        ("/v1/topics/a/events?wait=soon".into(), 400, "invalid_wait"),
        ("/v1/topics/a..b/events".into(), 400, "invalid_topic"),
        (format!("/v1/topics/{long}/events"), 400, "invalid_topic"),
        ("/v1/events".into(), 400, "missing_topic"),
        ("/v1/events?topic=a&topic=*".into(), 400, "invalid_topic"),
        (
            "/v1/events?topic=a&after=a:1,b".into(),
            400,
            "invalid_position",
        ),
        (
            "/v1/events?topic=a&after=a:x".into(),
            400,
            "invalid_position",
        ),
        (
            "/v1/events?topic=a&after=a:1,a:2".into(),
            400,
            "invalid_position",
        ),
        (
            "/v1/events?topic=a&after=b:1".into(),
            400,
            "invalid_position",
        ),
        (
            "/v1/events?topic=a&after=a:-3".into(),
            400,
            "invalid_position",
        ),
        ("/v1/cursors/nope".into(), 404, "cursor_not_found"),
        ("/v1/cursors/nope/events".into(), 404, "cursor_not_found"),
        ("/v1/cursors/a..b".into(), 400, "invalid_cursor_name"),
    ];
    for (path, status, code) in cases {
        let res = app.http.get(app.url(&path)).send().await.unwrap();
        assert_eq!(error_code(res).await, (status, code.into()), "GET {path}");
    }
    let too_many: String = (0..101).map(|i| format!("topic=t{i}&")).collect();
    let res = app
        .http
        .get(app.url(&format!("/v1/events?{too_many}")))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(res).await, (400, "too_many_topics".into()));

    let put = |name: &str, body: serde_json::Value| {
        app.http
            .put(app.url(&format!("/v1/cursors/{name}")))
            .json(&body)
            .send()
    };
    for (body, code) in [
        (json!({"topics": []}), "missing_topic"),
        (json!({"topics": ["a b"]}), "invalid_topic"),
        (json!({"topics": ["a"], "from": "a:x"}), "invalid_position"),
        (json!({"topics": ["a"], "from": "b:1"}), "invalid_position"),
        (json!({"topics": "a"}), "invalid_body"),
        (json!({"topics": ["a"], "extra": 1}), "invalid_body"),
    ] {
        let res = put("c", body.clone()).await.unwrap();
        assert_eq!(error_code(res).await, (400, code.into()), "PUT {body}");
    }
    let res = app
        .http
        .put(app.url("/v1/cursors/c"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(res).await, (400, "invalid_json".into()));
    let res = app
        .http
        .post(app.url("/v1/cursors/nope/commit"))
        .json(&json!({"position": "a:1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(res).await, (404, "cursor_not_found".into()));
    let (_, list) = app.get_json("/v1/cursors").await;
    assert_eq!(
        list,
        json!({"cursors": []}),
        "no bad request created a cursor"
    );
}

const SECRET: &str = rt_tests::JWT_SECRET;

fn token(subscribe: &[&str]) -> String {
    rt_tests::jwt(
        SECRET,
        300,
        json!({"sub": "reader", "publish": ["*"], "subscribe": subscribe}),
    )
}

#[tokio::test]
async fn polls_need_subscribe_rights_on_every_topic() {
    let app = TestApp::spawn(Engines::Embedded, |s| s.jwt_secret = Some(SECRET.into())).await;
    let reader = token(&["news.>"]);
    let admin = token(&[">"]);
    let get = |path: &str, token: Option<&str>| {
        let mut req = app.http.get(app.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    let res = get("/v1/topics/news.eu/events", None).await.unwrap();
    assert_eq!(error_code(res).await, (401, "missing_token".into()));
    for path in [
        "/v1/topics/sports/events",
        "/v1/events?topic=news.eu&topic=sports",
    ] {
        let res = get(path, Some(&reader)).await.unwrap();
        assert_eq!(error_code(res).await, (403, "forbidden".into()), "{path}");
    }
    let res = get("/v1/events?topic=news.eu&topic=news.us", Some(&reader))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // The token can also come as the access_token query parameter.
    let res = get(
        &format!("/v1/topics/news.eu/events?access_token={reader}"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);

    // Cursors: creating or reading one over a forbidden topic is refused,
    // and the list shows only cursors the token may read.
    let create = |token: &str, topics: serde_json::Value| {
        app.http
            .put(app.url("/v1/cursors/mixed"))
            .bearer_auth(token)
            .json(&json!({"topics": topics}))
            .send()
    };
    let res = create(&reader, json!(["news.eu", "sports"])).await.unwrap();
    assert_eq!(error_code(res).await, (403, "forbidden".into()));
    assert_eq!(
        create(&admin, json!(["news.eu", "sports"]))
            .await
            .unwrap()
            .status(),
        201
    );
    let res = get("/v1/cursors/mixed/events", Some(&reader))
        .await
        .unwrap();
    assert_eq!(error_code(res).await, (403, "forbidden".into()));
    let res = get("/v1/cursors", Some(&reader)).await.unwrap();
    assert_eq!(
        res.json::<serde_json::Value>().await.unwrap(),
        json!({"cursors": []})
    );
    let res = get("/v1/cursors", Some(&admin)).await.unwrap();
    let list: serde_json::Value = res.json().await.unwrap();
    assert_eq!(list["cursors"][0]["name"], "mixed");
}
