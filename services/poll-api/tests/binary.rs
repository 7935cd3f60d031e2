//! The `poll-api` binary as its own process, as deployments run it: it serves
//! events that another process commits to Postgres and sends over NATS.

use std::time::Duration;

use rt_core::Context;
use rt_tests::{
    ServiceProcess, TestApp, TestDb, distributed_settings, nats_url, seqs, unique_prefix,
};
use serde_json::{Value, json};

#[tokio::test]
async fn the_poll_api_binary_serves_what_another_process_publishes() {
    rt_tests::init_telemetry();
    let db = TestDb::create().await;
    let prefix = unique_prefix();
    let nats = nats_url();
    let poll_api = ServiceProcess::start(
        env!("CARGO_BIN_EXE_poll-api"),
        &[
            ("DATABASE_URL", db.url.as_str()),
            ("RT_NATS_URL", nats.as_str()),
            ("RT_NATS_PREFIX", prefix.as_str()),
        ],
    );
    let http = reqwest::Client::new();
    let ready = http.get(poll_api.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "poll-api is ready");

    // The publisher runs in this test's process: only NATS and Postgres
    // connect the two.
    let ctx = Context::connect(distributed_settings(&db.url, &prefix))
        .await
        .unwrap();
    let publisher = TestApp::serve(ctx, prefix, None, None);

    let waiter = async {
        let res = http
            .get(poll_api.url("/v1/topics/orders/events?after=0&wait=20"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        res.json::<Value>().await.unwrap()
    };
    let publish = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        publisher.publish_ok("orders", json!({"id": 7})).await
    };
    let (body, seq) = tokio::join!(waiter, publish);
    assert_eq!(seq, 1);
    assert_eq!(seqs(&body), [1]);
    assert_eq!(body["events"][0]["data"], json!({"id": 7}));
    assert_eq!(body["next"], 1);

    let status = poll_api.terminate();
    assert!(
        status.success(),
        "poll-api stops cleanly on SIGTERM: {status}"
    );
    drop(db);
}
