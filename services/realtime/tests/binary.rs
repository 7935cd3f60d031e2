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

/// A stream on a fresh connection is served on the main runtime, apart from
/// the HTTP server: on SIGTERM the process still waits for it to say why it
/// ends before exiting.
#[tokio::test]
async fn on_sigterm_a_direct_stream_gets_its_closing_words_before_the_exit() {
    let dir = TempDir::new();
    let data = dir.0.to_string_lossy().into_owned();
    let realtime = ServiceProcess::start(env!("CARGO_BIN_EXE_realtime"), &[("RT_DATA_DIR", &data)]);
    // A client of its own: its first request opens a fresh connection,
    // which the connection front serves.
    let mut res = reqwest::Client::new()
        .get(realtime.url("/v1/sse?topic=bye"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let first = res.chunk().await.unwrap().unwrap();
    assert!(first.starts_with(b"retry:"), "{first:?}");
    let metrics = reqwest::get(realtime.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("rt_streams_direct_total{route=\"/v1/sse\"} 1"),
        "the stream was served by the connection front:\n{metrics}"
    );

    let status = realtime.terminate();
    assert!(
        status.success(),
        "realtime stops cleanly on SIGTERM: {status}"
    );
    let mut rest = String::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match res.chunk().await {
                Ok(Some(chunk)) => rest.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(None) => break,
                Err(e) => {
                    rest.push_str(&format!("[the stream failed: {e:?}]"));
                    break;
                }
            }
        }
    });
    assert!(read.await.is_ok(), "the stream ended; got {rest:?}");
    assert!(
        rest.contains(": closing: the server is shutting down"),
        "the stream's closing words were written before the exit: {rest:?}"
    );
    assert!(rest.contains("retry: 250"), "{rest:?}");
}
