//! Topic names, events and positions: the vocabulary every transport shares.

use std::{collections::BTreeMap, fmt, sync::Arc};

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;

/// Longest topic name accepted, in characters.
pub const MAX_TOPIC_LEN: usize = 128;
/// Longest event type accepted, in characters.
pub const MAX_TYPE_LEN: usize = 64;
/// The event type used when a publisher gives none: what `EventSource.onmessage` receives.
pub const DEFAULT_EVENT_TYPE: &str = "message";

/// A valid topic name: 1–128 chars of `[A-Za-z0-9_.-]`, not starting or ending
/// with `.`, and with no empty token (`a..b`). Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(Arc<str>);

/// Why a string is not a topic name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic name is empty")]
    Empty,
    #[error("topic name is {0} characters long; the maximum is {MAX_TOPIC_LEN}")]
    TooLong(usize),
    #[error("topic name contains {0:?}; allowed are A-Z, a-z, 0-9, '_', '-' and '.'")]
    InvalidChar(char),
    #[error("topic name must not start or end with '.'")]
    DotAtEdge,
    #[error("topic name must not contain an empty token ('..')")]
    EmptyToken,
}

impl Topic {
    /// Checks `name` against the wire contract's rules.
    pub fn parse(name: &str) -> Result<Topic, TopicError> {
        if name.is_empty() {
            return Err(TopicError::Empty);
        }
        let chars = name.chars().count();
        if chars > MAX_TOPIC_LEN {
            return Err(TopicError::TooLong(chars));
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
        {
            return Err(TopicError::InvalidChar(c));
        }
        if name.starts_with('.') || name.ends_with('.') {
            return Err(TopicError::DotAtEdge);
        }
        if name.contains("..") {
            return Err(TopicError::EmptyToken);
        }
        Ok(Topic(name.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Topic({:?})", &*self.0)
    }
}

impl Serialize for Topic {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// Checks an event type: 1–64 printable ASCII characters with no spaces
/// (it becomes the SSE `event:` field, which must stay on one line).
pub fn validate_event_type(t: &str) -> Result<(), String> {
    if t.is_empty() || t.len() > MAX_TYPE_LEN {
        return Err(format!(
            "event type must be 1 to {MAX_TYPE_LEN} characters, got {}",
            t.chars().count()
        ));
    }
    if let Some(c) = t.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!(
            "event type contains {c:?}; use printable ASCII without spaces"
        ));
    }
    Ok(())
}

/// A committed event, as every transport shows it:
/// `{"topic":"t","seq":13,"type":"message","data":<any JSON>,"time":"RFC 3339"}`.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub topic: Topic,
    pub seq: u64,
    #[serde(rename = "type")]
    pub event_type: String,
    /// The publisher's JSON, kept as text so it is never re-encoded.
    pub data: Box<RawValue>,
    #[serde(serialize_with = "serialize_time")]
    pub time: DateTime<Utc>,
}

fn serialize_time<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
}

impl Event {
    /// The event's JSON text, as sent to clients.
    pub fn to_json(&self) -> String {
        // unwrap: every field serializes infallibly (strings, numbers, raw JSON)
        serde_json::to_string(self).expect("event serializes")
    }
}

/// The commit time given to events: now, at the store's precision (microseconds).
pub fn commit_time() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// An event a producer asks to publish, already validated.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub topic: Topic,
    pub event_type: String,
    pub data: Box<RawValue>,
    /// Makes a retried publish return the first result; unique per topic.
    pub idempotency_key: Option<String>,
    /// How Web Push should carry this event; `None`: the configured defaults.
    pub push: Option<PushOptions>,
}

/// Longest `TTL` a Web Push message may ask for: 28 days, what push services keep at most.
pub const MAX_PUSH_TTL: u32 = 28 * 86_400;
/// Longest Web Push `Topic` header (RFC 8030, section 5.4).
pub const MAX_PUSH_TOPIC_LEN: usize = 32;
/// The `Urgency` values of RFC 8030, section 5.3.
pub const URGENCIES: [&str; 4] = ["very-low", "low", "normal", "high"];

/// A published event's Web Push options (`"push": {...}` of a publish):
/// the `TTL` (seconds), `Urgency` and `Topic` headers its push messages carry.
/// Unset fields take the dispatcher's defaults. Stored with the event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urgency: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
}

impl PushOptions {
    /// Checks the options against what push services accept.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(ttl) = self.ttl
            && ttl > MAX_PUSH_TTL
        {
            return Err(format!(
                "push.ttl is {ttl} s; the maximum is {MAX_PUSH_TTL} (28 days)"
            ));
        }
        if let Some(urgency) = &self.urgency {
            parse_urgency(urgency).map_err(|e| format!("push.urgency: {e}"))?;
        }
        if let Some(topic) = &self.topic {
            if topic.is_empty() || topic.len() > MAX_PUSH_TOPIC_LEN {
                return Err(format!(
                    "push.topic must be 1 to {MAX_PUSH_TOPIC_LEN} characters, got {}",
                    topic.chars().count()
                ));
            }
            if let Some(c) = topic
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_')))
            {
                return Err(format!(
                    "push.topic contains {c:?}; allowed are A-Z, a-z, 0-9, '-' and '_' (RFC 8030)"
                ));
            }
        }
        Ok(())
    }

    /// The stored form: compact JSON.
    pub fn to_json(&self) -> String {
        // unwrap: options of strings and numbers serialize infallibly
        serde_json::to_string(self).expect("push options serialize")
    }
}

/// Checks a Web Push `Urgency`: very-low, low, normal or high.
pub fn parse_urgency(s: &str) -> Result<String, String> {
    if URGENCIES.contains(&s) {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not an urgency; use very-low, low, normal or high"
        ))
    }
}

/// A position in several topics at once: `topic:seq` pairs joined by commas
/// (`a:12,b:40`). The same string is the `after` of polling, the SSE `id:`,
/// the WebSocket resume point and what a push notice carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Position(BTreeMap<Topic, u64>);

/// Why a string is not a position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PositionError {
    #[error("position entry {0:?} is not of the form topic:seq")]
    Malformed(String),
    #[error("position entry {entry:?}: {source}")]
    Topic { entry: String, source: TopicError },
    #[error("position entry {0:?}: seq must be a whole number from 0")]
    Seq(String),
    #[error("position names topic {0:?} twice")]
    Duplicate(String),
}

impl Position {
    /// Parses `a:12,b:40`; the empty string is the empty position.
    pub fn parse(s: &str) -> Result<Position, PositionError> {
        let mut map = BTreeMap::new();
        if s.is_empty() {
            return Ok(Position(map));
        }
        for entry in s.split(',') {
            let (name, seq) = entry
                .rsplit_once(':')
                .ok_or_else(|| PositionError::Malformed(entry.to_owned()))?;
            let topic = Topic::parse(name).map_err(|source| PositionError::Topic {
                entry: entry.to_owned(),
                source,
            })?;
            let seq = parse_seq(seq).ok_or_else(|| PositionError::Seq(entry.to_owned()))?;
            if map.insert(topic, seq).is_some() {
                return Err(PositionError::Duplicate(name.to_owned()));
            }
        }
        Ok(Position(map))
    }

    /// The position in `topic`, 0 (before the first event) when absent.
    pub fn get(&self, topic: &Topic) -> u64 {
        self.0.get(topic).copied().unwrap_or(0)
    }

    /// Sets the position in `topic`. A topic already held is updated in
    /// place: streams call this for every event, and cloning the name (a
    /// reference count shared by every stream of the topic) would make the
    /// threads serving them contend for it.
    pub fn set(&mut self, topic: &Topic, seq: u64) {
        match self.0.get_mut(topic) {
            Some(held) => *held = seq,
            None => {
                self.0.insert(topic.clone(), seq);
            }
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Topic, u64)> {
        self.0.iter().map(|(t, s)| (t, *s))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Moves forward to `other` where it is ahead, per topic; never back.
    pub fn advance(&mut self, other: &Position) {
        for (topic, seq) in other.iter() {
            let entry = self.0.entry(topic.clone()).or_insert(0);
            *entry = (*entry).max(seq);
        }
    }
}

impl FromIterator<(Topic, u64)> for Position {
    fn from_iter<I: IntoIterator<Item = (Topic, u64)>>(iter: I) -> Self {
        Position(iter.into_iter().collect())
    }
}

/// Parses a seq: decimal digits only (no sign), fitting in an `i64` as stored.
pub fn parse_seq(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u64>().ok().filter(|n| *n <= i64::MAX as u64)
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (topic, seq)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{topic}:{seq}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_topic_names_are_accepted() {
        for name in ["a", "chat.room-1", "A_b-9", "x.y.z", &"t".repeat(128)] {
            assert!(Topic::parse(name).is_ok(), "{name:?} should be valid");
        }
    }

    #[test]
    fn invalid_topic_names_are_refused_with_the_reason() {
        let long = "t".repeat(129);
        let cases: &[(&str, TopicError)] = &[
            ("", TopicError::Empty),
            (&long, TopicError::TooLong(129)),
            ("a..b", TopicError::EmptyToken),
            (".a", TopicError::DotAtEdge),
            ("a.", TopicError::DotAtEdge),
            ("*", TopicError::InvalidChar('*')),
            (">", TopicError::InvalidChar('>')),
            ("a b", TopicError::InvalidChar(' ')),
            ("café", TopicError::InvalidChar('é')),
            ("a:b", TopicError::InvalidChar(':')),
        ];
        for (name, want) in cases {
            assert_eq!(Topic::parse(name).as_ref(), Err(want), "for {name:?}");
        }
    }

    #[test]
    fn positions_round_trip_in_topic_order() {
        let p = Position::parse("b:40,a:12").unwrap();
        assert_eq!(p.to_string(), "a:12,b:40");
        assert_eq!(p.get(&Topic::parse("a").unwrap()), 12);
        assert_eq!(p.get(&Topic::parse("zzz").unwrap()), 0);
        assert!(Position::parse("").unwrap().is_empty());
    }

    #[test]
    fn positions_only_move_forward() {
        let mut p = Position::parse("a:5,b:9").unwrap();
        p.advance(&Position::parse("a:7,b:2,c:1").unwrap());
        assert_eq!(p.to_string(), "a:7,b:9,c:1");
    }

    #[test]
    fn malformed_positions_are_refused() {
        for bad in [
            "a",
            "a:",
            "a:-1",
            "a:x",
            ":3",
            "a:1,",
            "a:1,a:2",
            "a..b:1",
            "a:99999999999999999999",
        ] {
            assert!(Position::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn event_json_has_the_wire_shape() {
        let e = Event {
            topic: Topic::parse("t").unwrap(),
            seq: 13,
            event_type: "message".into(),
            data: RawValue::from_string(r#"{"a": 1}"#.into()).unwrap(),
            time: DateTime::from_timestamp(0, 5_000).unwrap(),
        };
        assert_eq!(
            e.to_json(),
            r#"{"topic":"t","seq":13,"type":"message","data":{"a": 1},"time":"1970-01-01T00:00:00.000005Z"}"#
        );
    }

    #[test]
    fn event_types_are_one_printable_word() {
        assert!(validate_event_type("message").is_ok());
        assert!(validate_event_type("user.joined:v2").is_ok());
        assert!(validate_event_type("").is_err());
        assert!(validate_event_type("two words").is_err());
        assert!(validate_event_type("line\nbreak").is_err());
        assert!(validate_event_type(&"x".repeat(65)).is_err());
    }
}
