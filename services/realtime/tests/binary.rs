//! The README's first command: `realtime` with no flags runs the embedded
//! default (SQLite in the data dir, in-process bus) and serves every route.

use std::time::Duration;

use rt_tests::{ServiceProcess, TempDir, seqs};
use serde_json::{Value, json};

#[tokio::test]
async fn realtime_with_no_flags_publishes_and_long_polls_in_one_process() {
    let dir = TempDir::new();
    let data = dir.0.to_string_lossy().into_owned();
    let realtime = ServiceProcess::start(env!("CARGO_BIN_EXE_realtime"), &[("RT_DATA_DIR", &data)]);
    let http = reqwest::Client::new();
    let ready = http.get(realtime.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);

    let waiter = async {
        let res = http
            .get(realtime.url("/v1/topics/demo/events?wait=20"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        res.json::<Value>().await.unwrap()
    };
    let publish = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let res = http
            .post(realtime.url("/v1/topics/demo/events"))
            .json(&json!({"data": "hi"}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201);
    };
    let (body, ()) = tokio::join!(waiter, publish);
    assert_eq!(seqs(&body), [1]);
    assert_eq!(body["events"][0]["data"], "hi");

    let status = realtime.terminate();
    assert!(
        status.success(),
        "realtime stops cleanly on SIGTERM: {status}"
    );
    assert!(
        dir.0.join("realtime.db").exists(),
        "the event log is an SQLite file in the data dir"
    );
}
