//! Postgres going away: publishes answer 503 and nothing is acknowledged;
//! when it comes back, publishing resumes without a restart.

use std::time::Duration;

use rt_tests::{TcpProxy, TestApp, TestDb, distributed_settings, error_code, unique_prefix};
use serde_json::json;
use sqlx::Row;

#[tokio::test]
async fn publish_answers_503_while_postgres_is_unreachable_and_resumes_after() {
    rt_tests::init_telemetry();
    let db = TestDb::create().await;
    let target = db
        .url
        .split('@')
        .nth(1)
        .and_then(|s| s.split('/').next())
        .unwrap();
    let proxy = TcpProxy::start(target.parse().expect("host:port of test Postgres")).await;
    let via_proxy = format!("postgres://postgres@{}/{}", proxy.addr, db.name());
    let prefix = unique_prefix();
    let ctx = rt_core::Context::connect(distributed_settings(&via_proxy, &prefix))
        .await
        .unwrap();
    let app = TestApp::serve(ctx, prefix, None, None);
    assert_eq!(app.publish_ok("orders", json!(1)).await, 1);

    proxy.down();
    for i in 0..3 {
        let res = app.publish("orders", &json!({"data": i})).await;
        assert_eq!(
            res.headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap()),
            Some("1")
        );
        assert_eq!(error_code(res).await, (503, "store_unavailable".into()));
    }
    let ready = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);

    // Nothing of the refused publishes reached the log.
    let count = || async {
        let mut conn = db.connect().await;
        sqlx::query("SELECT count(*) FROM rt_events")
            .fetch_one(&mut conn)
            .await
            .unwrap()
            .get::<i64, _>(0)
    };
    assert_eq!(count().await, 1);

    proxy.up();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let seq = loop {
        let res = app.publish("orders", &json!({"data": "back"})).await;
        if res.status() == 201 {
            break res.json::<serde_json::Value>().await.unwrap()["seq"]
                .as_u64()
                .unwrap();
        }
        assert_eq!(res.status(), 503, "only 503 while reconnecting");
        assert!(
            tokio::time::Instant::now() < deadline,
            "publishing did not resume"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(seq, 2, "the seq continues with no gap");
    assert_eq!(count().await, 2);
    assert_eq!(
        app.http
            .get(app.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}
