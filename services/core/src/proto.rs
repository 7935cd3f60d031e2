//! The protobuf envelope carried on NATS (`proto/realtime.proto`).

use chrono::{DateTime, Utc};
use prost::Message;
use serde_json::value::RawValue;

use crate::event::{Event, Topic};

#[allow(unreachable_pub, missing_docs, clippy::all)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/realtime.v1.rs"));
}

pub use generated::Event as EventEnvelope;

/// Why an envelope could not be turned back into an event.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a protobuf Event envelope: {0}")]
    Protobuf(#[from] prost::DecodeError),
    #[error("envelope topic is invalid: {0}")]
    Topic(#[from] crate::event::TopicError),
    #[error("envelope data is not JSON: {0}")]
    Data(#[from] serde_json::Error),
    #[error("envelope has no time")]
    MissingTime,
}

/// Encodes an event as the protobuf envelope.
pub fn encode(event: &Event) -> Vec<u8> {
    let envelope = EventEnvelope {
        topic: event.topic.as_str().to_owned(),
        seq: event.seq,
        r#type: event.event_type.clone(),
        data: event.data.get().as_bytes().to_vec(),
        time: Some(prost_types::Timestamp {
            seconds: event.time.timestamp(),
            nanos: event.time.timestamp_subsec_nanos() as i32,
        }),
    };
    envelope.encode_to_vec()
}

/// Decodes a protobuf envelope into an event, checking what it carries.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    let envelope = EventEnvelope::decode(bytes)?;
    let time = envelope.time.ok_or(DecodeError::MissingTime)?;
    let time: DateTime<Utc> = DateTime::from_timestamp(time.seconds, time.nanos.max(0) as u32)
        .ok_or(DecodeError::MissingTime)?;
    let data = String::from_utf8(envelope.data)
        .map_err(|e| DecodeError::Data(serde::de::Error::custom(format!("not UTF-8: {e}"))))?;
    Ok(Event {
        topic: Topic::parse(&envelope.topic)?,
        seq: envelope.seq,
        event_type: envelope.r#type,
        data: RawValue::from_string(data)?,
        time,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_survives_the_envelope_round_trip() {
        let event = Event {
            topic: Topic::parse("chat.room-1").unwrap(),
            seq: 42,
            event_type: "message".into(),
            data: RawValue::from_string(r#"{"text":"hi","n":[1,2]}"#.into()).unwrap(),
            time: DateTime::from_timestamp(1_700_000_000, 123_456_000).unwrap(),
        };
        let back = decode(&encode(&event)).unwrap();
        assert_eq!(back.topic, event.topic);
        assert_eq!(back.seq, 42);
        assert_eq!(back.event_type, "message");
        assert_eq!(back.data.get(), event.data.get());
        assert_eq!(back.time, event.time);
    }

    #[test]
    fn garbage_is_refused_not_panicked_on() {
        assert!(decode(b"\xff\xff\xff").is_err());
    }
}
