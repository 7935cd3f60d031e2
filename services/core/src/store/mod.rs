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
use sqlx::Row;

use crate::event::{Event, NewEvent, Position, PushOptions, Topic};

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

/// Where a push delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryState {
    /// Not sent yet, or to be retried at `next_attempt_at`.
    Pending,
    /// The push service accepted it (201/202).
    Delivered,
    /// Given up: refused by the push service, or out of attempts.
    Failed,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Result<DeliveryState, StoreError> {
        match s {
            "pending" => Ok(DeliveryState::Pending),
            "delivered" => Ok(DeliveryState::Delivered),
            "failed" => Ok(DeliveryState::Failed),
            other => Err(StoreError::Corrupt(format!(
                "unknown push delivery state {other:?}"
            ))),
        }
    }
}

/// What one fan-out step did for a topic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FanOut {
    /// Events looked at (the topic's progress moved this far).
    pub events: u64,
    /// Deliveries created.
    pub deliveries: u64,
    /// More events wait: call again.
    pub more: bool,
}

/// How a dispatcher claims deliveries.
#[derive(Debug, Clone)]
pub struct ClaimRequest<'a> {
    /// Who claims: outcomes are recorded only by the claim's owner.
    pub owner: &'a str,
    /// Most deliveries to claim.
    pub limit: u32,
    /// Most deliveries to claim for one push-service host.
    pub per_host: u32,
    /// Hosts to skip (the caller has as many in flight there as it allows).
    pub skip_hosts: &'a [String],
    /// How long the claim holds before other dispatchers may take the rows.
    pub lease: Duration,
}

/// A delivery claimed for sending, with what sending needs.
#[derive(Debug, Clone)]
pub struct ClaimedDelivery {
    pub id: i64,
    pub subscription_id: String,
    pub topic: Topic,
    pub seq: u64,
    /// Attempts so far, this one included; fences the outcome.
    pub attempts: u32,
    pub host: String,
    pub endpoint: String,
    pub p256dh: String,
    pub auth: String,
    pub notice_only: bool,
    /// An earlier attempt was refused as too large: send a notice.
    pub notice: bool,
    /// The event; `None` when retention removed it before it was sent.
    pub event: Option<Event>,
    /// The event's own push options.
    pub push: Option<PushOptions>,
}

/// The result of one attempt, to record.
#[derive(Debug, Clone)]
pub struct DeliveryOutcome {
    pub id: i64,
    /// The claim's attempt count: a stale claim records nothing.
    pub attempts: u32,
    pub state: DeliveryState,
    /// The push service's HTTP status; `None` when no answer came.
    pub status: Option<u16>,
    /// Why it failed or is retried; never the payload.
    pub error: Option<String>,
    /// A notice was (or is to be) sent instead of the event.
    pub notice: bool,
    /// For `Pending`: when to try again.
    pub retry_in: Duration,
}

/// A delivery as a subscription's owner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryRecord {
    pub topic: Topic,
    pub seq: u64,
    pub state: DeliveryState,
    pub attempts: u32,
    pub notice: bool,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub next_attempt_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A subscription's deliveries: counts by state and the most recent ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryReport {
    pub pending: u64,
    pub delivered: u64,
    pub failed: u64,
    /// Newest first.
    pub recent: Vec<DeliveryRecord>,
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

    /// Topics followed by push subscriptions whose events are not all fanned
    /// out to deliveries yet.
    async fn push_topics_behind(&self) -> Result<Vec<Topic>, StoreError>;

    /// Creates the deliveries of `topic`'s next events (one per subscription
    /// that followed the topic before the event), at most about `max_rows`,
    /// and moves the topic's progress past them, in one transaction. `None`
    /// when another dispatcher is fanning the topic out right now.
    async fn push_fan_out(
        &self,
        topic: &Topic,
        max_rows: u32,
    ) -> Result<Option<FanOut>, StoreError>;

    /// Claims due pending deliveries for `claim.lease`: no other claim gets
    /// them until the lease ends or an outcome is recorded.
    async fn claim_push_deliveries(
        &self,
        claim: &ClaimRequest<'_>,
    ) -> Result<Vec<ClaimedDelivery>, StoreError>;

    /// Records attempts' outcomes; those whose claim is no longer `owner`'s
    /// (lease ended and another claim took the row) are ignored. Returns how
    /// many were recorded.
    async fn record_push_outcomes(
        &self,
        owner: &str,
        outcomes: &[DeliveryOutcome],
    ) -> Result<u64, StoreError>;

    /// Removes subscriptions the push service says are gone (404/410), with
    /// their deliveries.
    async fn remove_push_subscriptions(&self, ids: &[String]) -> Result<u64, StoreError>;

    /// The deliveries of subscription `id` if `subject` registered it: counts
    /// by state and the `limit` most recent.
    async fn push_deliveries(
        &self,
        id: &str,
        subject: Option<&str>,
        limit: u32,
    ) -> Result<Option<DeliveryReport>, StoreError>;

    /// Removes finished (delivered or failed) deliveries older than `age`.
    async fn prune_push_deliveries(&self, age: Duration) -> Result<u64, StoreError>;

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

/// A claimed push delivery from its row, its columns in the order both
/// stores select them: id, subscription, topic, seq, attempts, notice, host,
/// endpoint, p256dh, auth, notice-only, then the event's type, data and time
/// (all null once retention removed it) and its push options. The two
/// columns whose stored types differ come read: `attempts`, and `time`
/// (read only when the event is there).
fn claimed_from_row<R>(
    row: &R,
    attempts: u32,
    time: impl FnOnce(&R) -> DateTime<Utc>,
) -> Result<ClaimedDelivery, StoreError>
where
    R: Row,
    usize: sqlx::ColumnIndex<R>,
    for<'r> &'r str: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> bool: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let topic = Topic::parse(row.get::<&str, _>(2))
        .map_err(|e| StoreError::Corrupt(format!("push delivery topic: {e}")))?;
    let seq: i64 = row.get(3);
    let event = match row.get::<Option<String>, _>(11) {
        Some(event_type) => Some(event_from_row(
            &topic,
            seq,
            event_type,
            row.get(12),
            time(row),
        )?),
        None => None,
    };
    let push = push_options_from(&topic, seq, row.get::<Option<&str>, _>(14))?;
    Ok(ClaimedDelivery {
        id: row.get(0),
        subscription_id: row.get(1),
        seq: seq as u64,
        attempts,
        notice: row.get(5),
        host: row.get(6),
        endpoint: row.get(7),
        p256dh: row.get(8),
        auth: row.get(9),
        notice_only: row.get(10),
        event,
        push,
        topic,
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

/// The host (and port) of a push endpoint URL, for per-host limits.
fn endpoint_host(endpoint: &str) -> &str {
    let rest = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest);
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    &rest[..end]
}

/// Stored push options, refusing rows that break the contract.
fn push_options_from(
    topic: &Topic,
    seq: i64,
    raw: Option<&str>,
) -> Result<Option<PushOptions>, StoreError> {
    raw.map(|raw| {
        serde_json::from_str(raw)
            .map_err(|e| StoreError::Corrupt(format!("{topic}:{seq} push options: {e}")))
    })
    .transpose()
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
            push: None,
        }
    }

    #[test]
    fn endpoint_hosts_keep_the_port_and_drop_the_path() {
        assert_eq!(
            endpoint_host("https://fcm.googleapis.com/fcm/send/x"),
            "fcm.googleapis.com"
        );
        assert_eq!(
            endpoint_host("http://127.0.0.1:9000/push/1?a#b"),
            "127.0.0.1:9000"
        );
        assert_eq!(endpoint_host("https://h"), "h");
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
