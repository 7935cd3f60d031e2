//! The durable event log: Postgres in production, SQLite for the embedded default.
//!
//! Both implement [`Store`] with the same guarantees: per topic, `seq` starts
//! at 1, has no gaps and follows commit order; an idempotency key returns the
//! first result; `low_seq` tells readers what retention has removed.

mod postgres;
mod sqlite;

use std::{collections::HashMap, time::Duration};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::event::{Event, NewEvent, Position, Topic};

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// A store failure. Every kind means nothing of the failed call was committed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the database is unreachable or failing: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("stored data is inconsistent: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Unavailable(e)
    }
}

/// What happened to one event of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub seq: u64,
    /// True when the idempotency key was seen before: `seq` is the first result
    /// and nothing new was stored.
    pub duplicate: bool,
}

/// A topic's counters: readable seqs are `low_seq..=last_seq` (none when
/// `low_seq > last_seq`). A reader asking for events after `p` with
/// `p + 1 < low_seq` has lost events to retention and must be told so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicHead {
    pub low_seq: u64,
    pub last_seq: u64,
}

impl Default for TopicHead {
    fn default() -> Self {
        TopicHead {
            low_seq: 1,
            last_seq: 0,
        }
    }
}

/// Events read from the log, with the topic's counters as of the read.
#[derive(Debug, Clone)]
pub struct ReadResult {
    pub events: Vec<Event>,
    pub head: TopicHead,
}

/// A named polling cursor: a set of topics and the position committed in them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CursorRecord {
    pub name: String,
    pub topics: Vec<Topic>,
    pub position: Position,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A browser's Web Push subscription as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushSubscriptionRecord {
    pub id: String,
    /// The `sub` of the token that registered it; `None` for anonymous.
    pub subject: Option<String>,
    pub endpoint: String,
    /// The browser's P-256 public key, base64url without padding.
    pub p256dh: String,
    /// The browser's 16-byte auth secret, base64url without padding.
    pub auth: String,
    /// The browser's `expirationTime`, in milliseconds since the epoch.
    pub expiration_ms: Option<i64>,
    /// Sorted, distinct.
    pub topics: Vec<Topic>,
    /// Send only topic and seq notices, never the event's data.
    pub notice_only: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A push subscription to register, already validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPushSubscription {
    pub subject: Option<String>,
    pub endpoint: String,
    pub p256dh: String,
    pub auth: String,
    pub expiration_ms: Option<i64>,
    pub topics: Vec<Topic>,
    pub notice_only: bool,
}

/// What registering a push subscription did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushUpsert {
    /// A new subscription.
    Created(PushSubscriptionRecord),
    /// The endpoint was registered already: its topics, keys, expiry, flag
    /// and owner were replaced; it kept its id and creation time.
    Updated(PushSubscriptionRecord),
    /// The endpoint is registered by another subject and the request did not
    /// present the same `auth` secret: nothing changed.
    OwnedByOther,
}

/// How long events are kept. Both limits may apply at once.
#[derive(Debug, Clone, Copy, Default)]
pub struct Retention {
    pub max_age: Option<Duration>,
    pub max_count: Option<u64>,
}

impl Retention {
    pub fn is_unlimited(&self) -> bool {
        self.max_age.is_none() && self.max_count.is_none()
    }

    fn age_cutoff(&self) -> Option<DateTime<Utc>> {
        self.max_age
            .and_then(|age| chrono::Duration::from_std(age).ok())
            .map(|age| Utc::now() - age)
    }
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Appends events in one transaction, all at `time`. Results are in input
    /// order. Seqs are assigned per topic, gapless, in commit order.
    async fn append(
        &self,
        events: &[NewEvent],
        time: DateTime<Utc>,
    ) -> Result<Vec<Appended>, StoreError>;

    /// Reads up to `limit` events of `topic` with seq > `after`, in seq order.
    async fn read(&self, topic: &Topic, after: u64, limit: u32) -> Result<ReadResult, StoreError>;

    /// The counters of several topics in one query (unknown topics: the default).
    async fn heads(&self, topics: &[Topic]) -> Result<HashMap<Topic, TopicHead>, StoreError>;

    /// Applies retention; returns how many events were removed.
    async fn prune(&self, retention: Retention) -> Result<u64, StoreError>;

    /// Creates a cursor unless one of that name exists. Returns the cursor
    /// and whether it was created (false: the existing one, unchanged).
    async fn create_cursor(
        &self,
        name: &str,
        topics: &[Topic],
        position: &Position,
    ) -> Result<(CursorRecord, bool), StoreError>;

    /// The cursor of that name, if any.
    async fn cursor(&self, name: &str) -> Result<Option<CursorRecord>, StoreError>;

    /// Every cursor, by name.
    async fn cursors(&self) -> Result<Vec<CursorRecord>, StoreError>;

    /// Moves a cursor forward to `position` (per topic, never back), atomically
    /// with respect to other commits. `None` when there is no such cursor.
    async fn commit_cursor(
        &self,
        name: &str,
        position: &Position,
    ) -> Result<Option<CursorRecord>, StoreError>;

    /// Deletes a cursor; false when there was none.
    async fn delete_cursor(&self, name: &str) -> Result<bool, StoreError>;

    /// The stored VAPID private key. When there is none, stores `candidate`
    /// first; concurrent callers all get the one that was stored first.
    async fn vapid_private_key(&self, candidate: &str) -> Result<String, StoreError>;

    /// Registers a push subscription, or updates the one with the same
    /// endpoint when it has the same subject or the same `auth` secret (the
    /// browser that holds the subscription moved to another subject).
    async fn upsert_push_subscription(
        &self,
        sub: &NewPushSubscription,
    ) -> Result<PushUpsert, StoreError>;

    /// The push subscriptions registered by `subject` (`None`: anonymous
    /// ones), oldest first.
    async fn push_subscriptions(
        &self,
        subject: Option<&str>,
    ) -> Result<Vec<PushSubscriptionRecord>, StoreError>;

    /// Deletes the push subscription `id` if `subject` registered it; false
    /// when there is no such subscription of that subject.
    async fn delete_push_subscription(
        &self,
        id: &str,
        subject: Option<&str>,
    ) -> Result<bool, StoreError>;

    /// Checks that the store answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// `postgres` or `sqlite`, for logs and readiness.
    fn kind(&self) -> &'static str;
}

/// Seqs for a batch: for each event, its new seq or the earlier result of its
/// idempotency key. `last` holds each topic's last seq and is advanced.
/// `existing` maps (topic, key) to seqs already stored. Shared by both stores.
fn assign_seqs(
    events: &[NewEvent],
    last: &mut HashMap<Topic, u64>,
    existing: &HashMap<(Topic, String), u64>,
) -> Vec<Appended> {
    let mut seen_in_batch: HashMap<(&Topic, &str), u64> = HashMap::new();
    events
        .iter()
        .map(|e| {
            if let Some(key) = &e.idempotency_key {
                let earlier = existing
                    .get(&(e.topic.clone(), key.clone()))
                    .or_else(|| seen_in_batch.get(&(&e.topic, key.as_str())));
                if let Some(seq) = earlier {
                    return Appended {
                        seq: *seq,
                        duplicate: true,
                    };
                }
            }
            let counter = last.entry(e.topic.clone()).or_insert(0);
            *counter += 1;
            if let Some(key) = &e.idempotency_key {
                seen_in_batch.insert((&e.topic, key.as_str()), *counter);
            }
            Appended {
                seq: *counter,
                duplicate: false,
            }
        })
        .collect()
}

/// Sorted, distinct topic names of a batch: locking rows in one order keeps
/// concurrent group commits from deadlocking.
fn sorted_topics(events: &[NewEvent]) -> Vec<Topic> {
    let mut topics: Vec<Topic> = events.iter().map(|e| e.topic.clone()).collect();
    topics.sort();
    topics.dedup();
    topics
}

/// Turns a stored row into an event, refusing rows that break the contract.
fn event_from_row(
    topic: &Topic,
    seq: i64,
    event_type: String,
    data: String,
    time: DateTime<Utc>,
) -> Result<Event, StoreError> {
    let data = serde_json::value::RawValue::from_string(data)
        .map_err(|e| StoreError::Corrupt(format!("{topic}:{seq} data is not JSON: {e}")))?;
    Ok(Event {
        topic: topic.clone(),
        seq: seq as u64,
        event_type,
        data,
        time,
    })
}

/// A cursor from its stored text columns, refusing rows that break the contract.
fn cursor_from_row(
    name: String,
    topics: &str,
    position: &str,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
) -> Result<CursorRecord, StoreError> {
    let topics = topics
        .split(',')
        .map(Topic::parse)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StoreError::Corrupt(format!("cursor {name}: bad topic list: {e}")))?;
    let position = Position::parse(position)
        .map_err(|e| StoreError::Corrupt(format!("cursor {name}: bad position: {e}")))?;
    Ok(CursorRecord {
        name,
        topics,
        position,
        created_at,
        updated_at,
    })
}

/// A push subscription's stored topics: comma-joined (any order), returned
/// sorted, refusing rows that break the contract.
fn push_topics_from(id: &str, topics: &str) -> Result<Vec<Topic>, StoreError> {
    let mut topics = topics
        .split(',')
        .filter(|t| !t.is_empty())
        .map(Topic::parse)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StoreError::Corrupt(format!("push subscription {id}: bad topic: {e}")))?;
    topics.sort();
    topics.dedup();
    Ok(topics)
}

/// A new subscription's topics, sorted and distinct, as the store keeps them.
fn sorted_push_topics(sub: &NewPushSubscription) -> Vec<Topic> {
    let mut topics = sub.topics.clone();
    topics.sort();
    topics.dedup();
    topics
}

/// The stored form of a cursor's topic list.
fn join_topics(topics: &[Topic]) -> String {
    topics
        .iter()
        .map(Topic::as_str)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    fn ev(topic: &str, key: Option<&str>) -> NewEvent {
        NewEvent {
            topic: Topic::parse(topic).unwrap(),
            event_type: "message".into(),
            data: RawValue::from_string("1".into()).unwrap(),
            idempotency_key: key.map(str::to_owned),
        }
    }

    #[test]
    fn seqs_continue_each_topic_and_repeat_keys_get_the_first_seq() {
        let a = Topic::parse("a").unwrap();
        let mut last = HashMap::from([(a.clone(), 7)]);
        let existing = HashMap::from([((a.clone(), "old".to_owned()), 3)]);
        let batch = [
            ev("a", None),
            ev("b", Some("k")),
            ev("a", Some("old")),
            ev("b", Some("k")),
            ev("a", None),
        ];
        let got: Vec<(u64, bool)> = assign_seqs(&batch, &mut last, &existing)
            .into_iter()
            .map(|a| (a.seq, a.duplicate))
            .collect();
        assert_eq!(
            got,
            [(8, false), (1, false), (3, true), (1, true), (9, false)]
        );
        assert_eq!(last[&a], 9);
    }
}
