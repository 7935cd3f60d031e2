//! The JSON frames of the protocol, both ways.

use bytes::{BufMut, Bytes, BytesMut};
use bytestring::ByteString;
use rt_core::{
    Topic,
    hub::{Delivery, Framing, SharedEvent},
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::wire;

/// Longest `ref` accepted, in bytes.
pub(crate) const MAX_REF_LEN: usize = 128;

/// A client frame, every field optional so that each missing one gets its
/// own error message (and the `ref` comes back even on a bad frame).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClientFrame {
    pub(crate) op: Option<String>,
    pub(crate) topic: Option<String>,
    pub(crate) after: Option<u64>,
    #[serde(rename = "type")]
    pub(crate) event_type: Option<String>,
    /// Any JSON, `null` included; `None` only when the field is missing.
    #[serde(default, deserialize_with = "present")]
    pub(crate) data: Option<Box<RawValue>>,
    #[serde(rename = "ref")]
    pub(crate) reference: Option<String>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

/// Reads the `ref` of a frame that did not parse as a [`ClientFrame`], so
/// the error can still name it.
pub(crate) fn salvage_ref(text: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    value
        .get("ref")?
        .as_str()
        .filter(|r| r.len() <= MAX_REF_LEN)
        .map(str::to_owned)
}

fn text(json: impl Serialize) -> ByteString {
    // unwrap: these frames hold only strings and numbers
    ByteString::from(serde_json::to_string(&json).expect("frame serializes"))
}

#[derive(Serialize)]
struct ErrorFrame<'a> {
    op: &'static str,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    reference: Option<&'a str>,
    code: &'a str,
    message: &'a str,
}

pub(crate) fn error(reference: Option<&str>, code: &str, message: &str) -> ByteString {
    text(ErrorFrame {
        op: "error",
        reference,
        code,
        message,
    })
}

#[derive(Serialize)]
struct FeedErrorFrame<'a> {
    op: &'static str,
    code: &'static str,
    topic: &'a Topic,
    message: &'a str,
}

/// A subscription's live feed stopped: `{"op":"error","code":"feed_unavailable","topic",...}`,
/// so the client knows which topic to subscribe to again.
pub(crate) fn feed_stopped(topic: &Topic, message: &str) -> ByteString {
    text(FeedErrorFrame {
        op: "error",
        code: "feed_unavailable",
        topic,
        message,
    })
}

#[derive(Serialize)]
struct PublishAck<'a> {
    op: &'static str,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    reference: Option<&'a str>,
    topic: &'a Topic,
    seq: u64,
}

pub(crate) fn publish_ack(reference: Option<&str>, topic: &Topic, seq: u64) -> ByteString {
    text(PublishAck {
        op: "ack",
        reference,
        topic,
        seq,
    })
}

#[derive(Serialize)]
struct SubscriptionAck<'a> {
    op: &'static str,
    #[serde(rename = "ref")]
    reference: &'a str,
    topic: &'a Topic,
    after: u64,
}

pub(crate) fn subscription_ack(reference: &str, topic: &Topic, after: u64) -> ByteString {
    text(SubscriptionAck {
        op: "ack",
        reference,
        topic,
        after,
    })
}

#[derive(Serialize)]
struct Pong<'a> {
    op: &'static str,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    reference: Option<&'a str>,
}

pub(crate) fn pong(reference: Option<&str>) -> ByteString {
    text(Pong {
        op: "pong",
        reference,
    })
}

#[derive(Serialize)]
struct ResetFrame<'a> {
    op: &'static str,
    topic: &'a Topic,
    from: u64,
}

/// Appends a delivery as a WebSocket text frame: an event
/// (`{"op":"event",...}`, built once per event and shared by every socket,
/// copied from there without touching its reference count) or a reset.
pub(crate) fn put_delivery(buf: &mut BytesMut, d: &Delivery) {
    match d {
        Delivery::Event(event) => {
            wire::put_text(buf, event.framed(Framing::WebSocket, event_frame));
        }
        Delivery::Reset { topic, from } => {
            let reset = text(ResetFrame {
                op: "reset",
                topic,
                from: *from,
            });
            wire::put_text(buf, reset.as_bytes());
        }
    }
}

/// `{"op":"event",` followed by the event JSON after its opening brace.
fn event_frame(event: &SharedEvent) -> Bytes {
    let mut buf = BytesMut::with_capacity(event.json.len() + 13);
    buf.put_slice(b"{\"op\":\"event\",");
    buf.put_slice(&event.json[1..]);
    buf.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rt_core::Event;

    #[test]
    fn deliveries_are_text_frames_of_the_event_json_with_the_op() {
        let e = SharedEvent::new(Event {
            topic: Topic::parse("t").unwrap(),
            seq: 4,
            event_type: "message".into(),
            data: RawValue::from_string("[1,2]".into()).unwrap(),
            time: chrono::DateTime::from_timestamp(0, 0).unwrap(),
        });
        let mut buf = BytesMut::new();
        put_delivery(&mut buf, &Delivery::Event(e));
        put_delivery(
            &mut buf,
            &Delivery::Reset {
                topic: Topic::parse("t").unwrap(),
                from: 9,
            },
        );
        let frames = crate::wire::tests::decode_all(&mut buf);
        let json = |i: usize| match &frames[i] {
            actix_http::ws::Frame::Text(t) => {
                serde_json::from_slice::<serde_json::Value>(t).unwrap()
            }
            other => panic!("{other:?}"),
        };
        let event = json(0);
        assert_eq!(event["op"], "event");
        assert_eq!(event["seq"], 4);
        assert_eq!(event["data"], serde_json::json!([1, 2]));
        assert_eq!(
            json(1),
            serde_json::json!({"op": "reset", "topic": "t", "from": 9})
        );
    }

    #[test]
    fn errors_keep_the_ref_and_drop_it_when_absent() {
        assert_eq!(
            &*error(Some("r1"), "bad", "no"),
            r#"{"op":"error","ref":"r1","code":"bad","message":"no"}"#
        );
        assert_eq!(
            &*error(None, "bad", "no"),
            r#"{"op":"error","code":"bad","message":"no"}"#
        );
    }

    #[test]
    fn a_stopped_feed_names_its_topic() {
        let t = Topic::parse("chat").unwrap();
        assert_eq!(
            &*feed_stopped(&t, "gone"),
            r#"{"op":"error","code":"feed_unavailable","topic":"chat","message":"gone"}"#
        );
    }

    #[test]
    fn null_data_is_data_and_missing_data_is_not() {
        let f: ClientFrame = serde_json::from_str(r#"{"op":"publish","data":null}"#).unwrap();
        assert_eq!(f.data.map(|d| d.get().to_owned()), Some("null".into()));
        let f: ClientFrame = serde_json::from_str(r#"{"op":"publish"}"#).unwrap();
        assert!(f.data.is_none());
    }

    #[test]
    fn the_ref_of_a_malformed_frame_is_salvaged() {
        assert_eq!(
            salvage_ref(r#"{"op":"subscribe","ref":"r9","after":-1}"#),
            Some("r9".into())
        );
        assert_eq!(salvage_ref("not json"), None);
    }
}
