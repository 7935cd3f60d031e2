//! Two `ws-edge` processes behind one NATS, as deployments run them: an event
//! published over a socket on one reaches subscribers on the other.

use std::time::Duration;

use rt_tests::{ServiceProcess, TestDb, nats_url, unique_prefix, ws};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_publish_on_one_edge_reaches_a_subscriber_on_the_other() {
    let db = TestDb::create().await;
    let prefix = unique_prefix();
    let nats = nats_url();
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("RT_NATS_URL", nats.as_str()),
        ("RT_NATS_PREFIX", prefix.as_str()),
    ];
    let one = ServiceProcess::start(env!("CARGO_BIN_EXE_ws-edge"), &env);
    let two = ServiceProcess::start(env!("CARGO_BIN_EXE_ws-edge"), &env);

    let mut reader = ws::connect(&two.base).await;
    ws::send(
        &mut reader,
        json!({"op": "subscribe", "topic": "room", "ref": "s"}),
    )
    .await;
    assert_eq!(ws::recv_json(&mut reader, WAIT).await["op"], "ack");

    let mut writer = ws::connect(&one.base).await;
    for i in 1..=20 {
        ws::send(
            &mut writer,
            json!({"op": "publish", "topic": "room", "data": i, "ref": i.to_string()}),
        )
        .await;
    }
    for _ in 1..=20 {
        assert_eq!(ws::recv_json(&mut writer, WAIT).await["op"], "ack");
    }
    for seq in 1..=20 {
        let event = ws::recv_json(&mut reader, WAIT).await;
        assert_eq!(
            (event["op"].as_str(), event["seq"].as_u64()),
            (Some("event"), Some(seq))
        );
        assert_eq!(event["data"], seq);
    }
    assert!(one.terminate().success());
    assert!(two.terminate().success());
}
