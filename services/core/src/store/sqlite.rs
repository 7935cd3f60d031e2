//! The SQLite event log of the embedded default: one file, one writer at a
//! time (`BEGIN IMMEDIATE`), readers alongside it in WAL mode.

use std::{collections::HashMap, path::Path, str::FromStr, time::Duration};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{
    Row, SqlitePool,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};

use super::{
    Appended, ClaimRequest, ClaimedDelivery, CursorRecord, DeliveryOutcome, DeliveryRecord,
    DeliveryReport, DeliveryState, FanOut, NewPushSubscription, PushSubscriptionRecord, PushUpsert,
    ReadResult, Retention, Store, StoreError, TopicHead, assign_seqs, claimed_from_row,
    cursor_from_row, endpoint_host, event_from_row, join_topics, push_topics_from,
    sorted_push_topics, sorted_topics,
};
use crate::event::{NewEvent, Position, PushOptions, Topic};

const CURSOR_COLUMNS: &str = "name, topics, position, created_us, updated_us";

fn sqlite_cursor(row: sqlx::sqlite::SqliteRow) -> Result<CursorRecord, StoreError> {
    cursor_from_row(
        row.get(0),
        row.get::<&str, _>(1),
        row.get::<&str, _>(2),
        from_micros(row.get(3)),
        from_micros(row.get(4)),
    )
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) the SQLite file at `path`.
    pub async fn open_file(path: &Path, acquire_timeout: Duration) -> anyhow::Result<SqliteStore> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| anyhow::anyhow!("cannot create data dir {}: {e}", dir.display()))?;
        }
        Self::open(SqliteConnectOptions::new().filename(path), acquire_timeout).await
    }

    /// Opens an `sqlite://...` URL.
    pub async fn open_url(url: &str, acquire_timeout: Duration) -> anyhow::Result<SqliteStore> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| anyhow::anyhow!("not a valid SQLite URL {url:?}: {e}"))?;
        Self::open(options, acquire_timeout).await
    }

    async fn open(
        options: SqliteConnectOptions,
        acquire_timeout: Duration,
    ) -> anyhow::Result<SqliteStore> {
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(acquire_timeout)
            .connect_with(options)
            .await
            .map_err(|e| anyhow::anyhow!("cannot open the SQLite event log: {e}"))?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| anyhow::anyhow!("cannot prepare the SQLite event log: {e}"))?;
        Ok(SqliteStore { pool })
    }
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn from_micros(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
}

/// A duration in microseconds, the unit of the `*_us` columns.
fn duration_micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// A list as a JSON array, for `json_each(?)`: SQLite binds no arrays.
fn json_list<T: serde::Serialize>(items: &[T]) -> Result<String, StoreError> {
    serde_json::to_string(items).map_err(|e| StoreError::Corrupt(format!("bind list: {e}")))
}

/// Removes what belongs to a deleted push subscription, in case foreign keys
/// (and so ON DELETE CASCADE) are off on this connection.
async fn delete_push_dependents(
    conn: &mut sqlx::SqliteConnection,
    id: &str,
) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM rt_push_deliveries WHERE subscription_id = ?1")
        .bind(id)
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM rt_push_topics WHERE subscription_id = ?1")
        .bind(id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

fn head_from(low: i64, last: i64) -> TopicHead {
    TopicHead {
        low_seq: low as u64,
        last_seq: last as u64,
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn append(
        &self,
        events: &[NewEvent],
        time: DateTime<Utc>,
    ) -> Result<Vec<Appended>, StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut last = HashMap::new();
        for topic in sorted_topics(events) {
            sqlx::query("INSERT INTO rt_topics (name) VALUES (?1) ON CONFLICT DO NOTHING")
                .bind(topic.as_str())
                .execute(&mut *tx)
                .await?;
            let seq: i64 = sqlx::query_scalar("SELECT last_seq FROM rt_topics WHERE name = ?1")
                .bind(topic.as_str())
                .fetch_one(&mut *tx)
                .await?;
            last.insert(topic, seq as u64);
        }
        let mut existing = HashMap::new();
        for e in events {
            let Some(key) = &e.idempotency_key else {
                continue;
            };
            let seq: Option<i64> = sqlx::query_scalar(
                "SELECT seq FROM rt_events WHERE topic = ?1 AND idempotency_key = ?2",
            )
            .bind(e.topic.as_str())
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(seq) = seq {
                existing.insert((e.topic.clone(), key.clone()), seq as u64);
            }
        }
        let appended = assign_seqs(events, &mut last, &existing);
        for (e, a) in events.iter().zip(&appended).filter(|(_, a)| !a.duplicate) {
            sqlx::query(
                "INSERT INTO rt_events (topic, seq, type, data, time_us, idempotency_key, push)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .bind(e.topic.as_str())
            .bind(a.seq as i64)
            .bind(&e.event_type)
            .bind(e.data.get())
            .bind(micros(time))
            .bind(e.idempotency_key.as_deref())
            .bind(e.push.as_ref().map(PushOptions::to_json))
            .execute(&mut *tx)
            .await?;
        }
        for (topic, seq) in &last {
            sqlx::query("UPDATE rt_topics SET last_seq = ?2 WHERE name = ?1 AND last_seq <> ?2")
                .bind(topic.as_str())
                .bind(*seq as i64)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(appended)
    }

    async fn read(&self, topic: &Topic, after: u64, limit: u32) -> Result<ReadResult, StoreError> {
        // A read transaction gives both queries one snapshot in WAL mode.
        let mut tx = self.pool.begin().await?;
        let head = sqlx::query("SELECT low_seq, last_seq FROM rt_topics WHERE name = ?1")
            .bind(topic.as_str())
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| head_from(r.get(0), r.get(1)))
            .unwrap_or_default();
        let rows = sqlx::query(
            "SELECT seq, type, data, time_us FROM rt_events
             WHERE topic = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )
        .bind(topic.as_str())
        .bind(after.min(i64::MAX as u64) as i64)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let events = rows
            .into_iter()
            .map(|r| event_from_row(topic, r.get(0), r.get(1), r.get(2), from_micros(r.get(3))))
            .collect::<Result<_, _>>()?;
        Ok(ReadResult { events, head })
    }

    async fn heads(&self, topics: &[Topic]) -> Result<HashMap<Topic, TopicHead>, StoreError> {
        let mut heads = HashMap::with_capacity(topics.len());
        let mut conn = self.pool.acquire().await?;
        for topic in topics {
            let head = sqlx::query("SELECT low_seq, last_seq FROM rt_topics WHERE name = ?1")
                .bind(topic.as_str())
                .fetch_optional(&mut *conn)
                .await?
                .map(|r| head_from(r.get(0), r.get(1)))
                .unwrap_or_default();
            heads.insert(topic.clone(), head);
        }
        Ok(heads)
    }

    async fn prune(&self, retention: Retention) -> Result<u64, StoreError> {
        if retention.is_unlimited() {
            return Ok(0);
        }
        let count = retention.max_count.map(|c| c.min(i64::MAX as u64) as i64);
        let cutoff = retention.age_cutoff().map(micros);
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let rows = sqlx::query(
            "SELECT name, low_seq, max(
                 CASE WHEN ?1 IS NULL THEN 0 ELSE last_seq - ?1 + 1 END,
                 CASE WHEN ?2 IS NULL THEN 0 ELSE COALESCE(
                     (SELECT max(e.seq) + 1 FROM rt_events e WHERE e.topic = t.name AND e.time_us < ?2), 0) END
             ) FROM rt_topics t",
        )
        .bind(count)
        .bind(cutoff)
        .fetch_all(&mut *tx)
        .await?;
        let mut removed = 0;
        for row in rows {
            let (name, low, new_low): (String, i64, i64) = (row.get(0), row.get(1), row.get(2));
            if new_low <= low {
                continue;
            }
            sqlx::query("UPDATE rt_topics SET low_seq = ?2 WHERE name = ?1")
                .bind(&name)
                .bind(new_low)
                .execute(&mut *tx)
                .await?;
            let done = sqlx::query("DELETE FROM rt_events WHERE topic = ?1 AND seq < ?2")
                .bind(&name)
                .bind(new_low)
                .execute(&mut *tx)
                .await?;
            removed += done.rows_affected();
        }
        tx.commit().await?;
        Ok(removed)
    }

    async fn create_cursor(
        &self,
        name: &str,
        topics: &[Topic],
        position: &Position,
    ) -> Result<(CursorRecord, bool), StoreError> {
        let now = micros(Utc::now());
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let created = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO rt_cursors ({CURSOR_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?4)
             ON CONFLICT (name) DO NOTHING RETURNING {CURSOR_COLUMNS}"
        )))
        .bind(name)
        .bind(join_topics(topics))
        .bind(position.to_string())
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let result = match created {
            Some(row) => (sqlite_cursor(row)?, true),
            None => {
                let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {CURSOR_COLUMNS} FROM rt_cursors WHERE name = ?1"
                )))
                .bind(name)
                .fetch_one(&mut *tx)
                .await?;
                (sqlite_cursor(row)?, false)
            }
        };
        tx.commit().await?;
        Ok(result)
    }

    async fn cursor(&self, name: &str) -> Result<Option<CursorRecord>, StoreError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CURSOR_COLUMNS} FROM rt_cursors WHERE name = ?1"
        )))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?
        .map(sqlite_cursor)
        .transpose()
    }

    async fn cursors(&self) -> Result<Vec<CursorRecord>, StoreError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CURSOR_COLUMNS} FROM rt_cursors ORDER BY name"
        )))
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(sqlite_cursor)
        .collect()
    }

    async fn commit_cursor(
        &self,
        name: &str,
        position: &Position,
    ) -> Result<Option<CursorRecord>, StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let Some(row) = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CURSOR_COLUMNS} FROM rt_cursors WHERE name = ?1"
        )))
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(None);
        };
        let mut cursor = sqlite_cursor(row)?;
        cursor.position.advance(position);
        cursor.updated_at = from_micros(micros(Utc::now()));
        sqlx::query("UPDATE rt_cursors SET position = ?2, updated_us = ?3 WHERE name = ?1")
            .bind(name)
            .bind(cursor.position.to_string())
            .bind(micros(cursor.updated_at))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(cursor))
    }

    async fn delete_cursor(&self, name: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM rt_cursors WHERE name = ?1")
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn vapid_private_key(&self, candidate: &str) -> Result<String, StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query(
            "INSERT INTO rt_vapid_keys (id, private_key, created_us) VALUES (1, ?1, ?2)
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(candidate)
        .bind(micros(Utc::now()))
        .execute(&mut *tx)
        .await?;
        let key: String = sqlx::query_scalar("SELECT private_key FROM rt_vapid_keys WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(key)
    }

    async fn upsert_push_subscription(
        &self,
        sub: &NewPushSubscription,
    ) -> Result<PushUpsert, StoreError> {
        let topics = sorted_push_topics(sub);
        let candidate = uuid::Uuid::new_v4().to_string();
        let now = micros(Utc::now());
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        // An update whose WHERE fails returns no row: another subject's.
        let Some(row) = sqlx::query(
            "INSERT INTO rt_push_subscriptions
                 (id, subject, endpoint, p256dh, auth, expiration_ms, notice_only, created_us,
                  updated_us, host)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?9)
             ON CONFLICT (endpoint) DO UPDATE SET
                 subject = excluded.subject, p256dh = excluded.p256dh, auth = excluded.auth,
                 expiration_ms = excluded.expiration_ms, notice_only = excluded.notice_only,
                 updated_us = excluded.updated_us
             WHERE rt_push_subscriptions.subject IS excluded.subject
                OR rt_push_subscriptions.auth = excluded.auth
             RETURNING id, created_us, updated_us",
        )
        .bind(&candidate)
        .bind(sub.subject.as_deref())
        .bind(&sub.endpoint)
        .bind(&sub.p256dh)
        .bind(&sub.auth)
        .bind(sub.expiration_ms)
        .bind(sub.notice_only)
        .bind(now)
        .bind(endpoint_host(&sub.endpoint))
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(PushUpsert::OwnedByOther);
        };
        let id: String = row.get(0);
        // Topics it keeps keep their `after_seq`: nothing already due to it is
        // skipped. New ones start after the topic's current last event, and
        // the topic's fan-out progress starts there when it has none yet.
        let followed: Vec<String> =
            sqlx::query_scalar("SELECT topic FROM rt_push_topics WHERE subscription_id = ?1")
                .bind(&id)
                .fetch_all(&mut *tx)
                .await?;
        for old in followed
            .iter()
            .filter(|old| !topics.iter().any(|t| t.as_str() == old.as_str()))
        {
            sqlx::query("DELETE FROM rt_push_topics WHERE subscription_id = ?1 AND topic = ?2")
                .bind(&id)
                .bind(old)
                .execute(&mut *tx)
                .await?;
        }
        for topic in &topics {
            let last: i64 = sqlx::query_scalar(
                "SELECT COALESCE((SELECT last_seq FROM rt_topics WHERE name = ?1), 0)",
            )
            .bind(topic.as_str())
            .fetch_one(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO rt_push_topics (subscription_id, topic, after_seq) VALUES (?1, ?2, ?3)
                 ON CONFLICT DO NOTHING",
            )
            .bind(&id)
            .bind(topic.as_str())
            .bind(last)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO rt_push_progress (topic, seq) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
            )
            .bind(topic.as_str())
            .bind(last)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        let created = id == candidate;
        let record = PushSubscriptionRecord {
            id,
            subject: sub.subject.clone(),
            endpoint: sub.endpoint.clone(),
            p256dh: sub.p256dh.clone(),
            auth: sub.auth.clone(),
            expiration_ms: sub.expiration_ms,
            topics,
            notice_only: sub.notice_only,
            created_at: from_micros(row.get(1)),
            updated_at: from_micros(row.get(2)),
        };
        Ok(if created {
            PushUpsert::Created(record)
        } else {
            PushUpsert::Updated(record)
        })
    }

    async fn push_subscriptions(
        &self,
        subject: Option<&str>,
    ) -> Result<Vec<PushSubscriptionRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT s.id, s.subject, s.endpoint, s.p256dh, s.auth, s.expiration_ms, s.notice_only,
                    s.created_us, s.updated_us,
                    COALESCE((SELECT group_concat(t.topic, ',') FROM rt_push_topics t
                              WHERE t.subscription_id = s.id), '')
             FROM rt_push_subscriptions s
             WHERE s.subject IS ?1
             ORDER BY s.created_us, s.id",
        )
        .bind(subject)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                let id: String = row.get(0);
                let topics = push_topics_from(&id, row.get::<&str, _>(9))?;
                Ok(PushSubscriptionRecord {
                    subject: row.get(1),
                    endpoint: row.get(2),
                    p256dh: row.get(3),
                    auth: row.get(4),
                    expiration_ms: row.get(5),
                    topics,
                    notice_only: row.get(6),
                    created_at: from_micros(row.get(7)),
                    updated_at: from_micros(row.get(8)),
                    id,
                })
            })
            .collect()
    }

    async fn delete_push_subscription(
        &self,
        id: &str,
        subject: Option<&str>,
    ) -> Result<bool, StoreError> {
        // Topics and deliveries explicitly too: foreign keys may be off on
        // this connection (an `sqlite://` URL may turn them off).
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let done = sqlx::query("DELETE FROM rt_push_subscriptions WHERE id = ?1 AND subject IS ?2")
            .bind(id)
            .bind(subject)
            .execute(&mut *tx)
            .await?;
        let deleted = done.rows_affected() > 0;
        if deleted {
            delete_push_dependents(&mut tx, id).await?;
        }
        tx.commit().await?;
        Ok(deleted)
    }

    async fn push_topics_behind(&self) -> Result<Vec<Topic>, StoreError> {
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT p.topic FROM rt_push_progress p JOIN rt_topics h ON h.name = p.topic
             WHERE h.last_seq > p.seq ORDER BY p.topic",
        )
        .fetch_all(&self.pool)
        .await?;
        names
            .iter()
            .map(|n| {
                Topic::parse(n).map_err(|e| StoreError::Corrupt(format!("push progress: {e}")))
            })
            .collect()
    }

    async fn push_fan_out(
        &self,
        topic: &Topic,
        max_rows: u32,
    ) -> Result<Option<FanOut>, StoreError> {
        // One writer at a time: no other fan-out of this topic runs meanwhile.
        let now = micros(Utc::now());
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let Some(progress) =
            sqlx::query_scalar::<_, i64>("SELECT seq FROM rt_push_progress WHERE topic = ?1")
                .bind(topic.as_str())
                .fetch_optional(&mut *tx)
                .await?
        else {
            return Ok(None);
        };
        let row = sqlx::query(
            "SELECT COALESCE((SELECT last_seq FROM rt_topics WHERE name = ?1), 0),
                    (SELECT count(*) FROM rt_push_topics WHERE topic = ?1)",
        )
        .bind(topic.as_str())
        .fetch_one(&mut *tx)
        .await?;
        let (last, followers): (i64, i64) = (row.get(0), row.get(1));
        if last <= progress {
            tx.commit().await?;
            return Ok(Some(FanOut::default()));
        }
        let step = (i64::from(max_rows) / followers.max(1)).clamp(1, 1000);
        let upto = last.min(progress + step);
        let created = sqlx::query(
            "INSERT INTO rt_push_deliveries
                 (subscription_id, topic, seq, host, next_attempt_us, created_us, updated_us)
             SELECT t.subscription_id, e.topic, e.seq, s.host, ?4, ?4, ?4
             FROM rt_events e JOIN rt_push_topics t ON t.topic = e.topic AND t.after_seq < e.seq
             JOIN rt_push_subscriptions s ON s.id = t.subscription_id
             WHERE e.topic = ?1 AND e.seq > ?2 AND e.seq <= ?3
             ORDER BY e.seq, t.subscription_id
             ON CONFLICT DO NOTHING",
        )
        .bind(topic.as_str())
        .bind(progress)
        .bind(upto)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query("UPDATE rt_push_progress SET seq = ?2 WHERE topic = ?1")
            .bind(topic.as_str())
            .bind(upto)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(FanOut {
            events: (upto - progress) as u64,
            deliveries: created,
            more: upto < last,
        }))
    }

    async fn claim_push_deliveries(
        &self,
        claim: &ClaimRequest<'_>,
    ) -> Result<Vec<ClaimedDelivery>, StoreError> {
        let now = micros(Utc::now());
        let until = now.saturating_add(duration_micros(claim.lease));
        let skip = json_list(claim.skip_hosts)?;
        // Statements of one IMMEDIATE transaction: no other claim runs between
        // choosing the rows and taking them.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let ids: Vec<i64> = sqlx::query_scalar(
            "UPDATE rt_push_deliveries
             SET attempts = attempts + 1, claimed_by = ?3, updated_us = ?1, next_attempt_us = ?4
             WHERE id IN (
                 SELECT id FROM (
                     SELECT c.id, row_number() OVER (PARTITION BY c.host ORDER BY c.id) AS rank
                     FROM (
                         SELECT d.id, d.host FROM rt_push_deliveries d
                         WHERE d.state = 'pending' AND d.next_attempt_us <= ?1
                           AND d.host NOT IN (SELECT value FROM json_each(?2))
                         ORDER BY d.next_attempt_us, d.id
                         LIMIT ?5
                     ) c
                 ) WHERE rank <= ?6
             )
             RETURNING id",
        )
        .bind(now)
        .bind(&skip)
        .bind(claim.owner)
        .bind(until)
        .bind(i64::from(claim.limit))
        .bind(i64::from(claim.per_host))
        .fetch_all(&mut *tx)
        .await?;
        if ids.is_empty() {
            tx.commit().await?;
            return Ok(Vec::new());
        }
        let rows = sqlx::query(
            "SELECT d.id, d.subscription_id, d.topic, d.seq, d.attempts, d.notice, s.host,
                    s.endpoint, s.p256dh, s.auth, s.notice_only,
                    e.type, e.data, e.time_us, e.push
             FROM rt_push_deliveries d
             JOIN rt_push_subscriptions s ON s.id = d.subscription_id
             LEFT JOIN rt_events e ON e.topic = d.topic AND e.seq = d.seq
             WHERE d.id IN (SELECT value FROM json_each(?1))
             ORDER BY d.id",
        )
        .bind(json_list(&ids)?)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        rows.into_iter()
            .map(|row| {
                claimed_from_row(&row, row.get::<i64, _>(4) as u32, |row| {
                    from_micros(row.get(13))
                })
            })
            .collect()
    }

    async fn record_push_outcomes(
        &self,
        owner: &str,
        outcomes: &[DeliveryOutcome],
    ) -> Result<u64, StoreError> {
        if outcomes.is_empty() {
            return Ok(0);
        }
        let now = micros(Utc::now());
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut recorded = 0;
        for o in outcomes {
            let done = sqlx::query(
                "UPDATE rt_push_deliveries
                 SET state = ?4, last_status = ?5, last_error = ?6, notice = ?7,
                     claimed_by = NULL, updated_us = ?8, next_attempt_us = ?9
                 WHERE id = ?1 AND claimed_by = ?2 AND attempts = ?3",
            )
            .bind(o.id)
            .bind(owner)
            .bind(i64::from(o.attempts))
            .bind(o.state.as_str())
            .bind(o.status.map(i64::from))
            .bind(o.error.as_deref())
            .bind(o.notice)
            .bind(now)
            .bind(now.saturating_add(duration_micros(o.retry_in)))
            .execute(&mut *tx)
            .await?;
            recorded += done.rows_affected();
        }
        tx.commit().await?;
        Ok(recorded)
    }

    async fn remove_push_subscriptions(&self, ids: &[String]) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut removed = 0;
        for id in ids {
            let done = sqlx::query("DELETE FROM rt_push_subscriptions WHERE id = ?1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() > 0 {
                removed += done.rows_affected();
                delete_push_dependents(&mut tx, id).await?;
            }
        }
        tx.commit().await?;
        Ok(removed)
    }

    async fn push_deliveries(
        &self,
        id: &str,
        subject: Option<&str>,
        limit: u32,
    ) -> Result<Option<DeliveryReport>, StoreError> {
        // A read transaction gives the queries one snapshot in WAL mode.
        let mut tx = self.pool.begin().await?;
        let owned = sqlx::query_scalar::<_, i64>(
            "SELECT 1 FROM rt_push_subscriptions WHERE id = ?1 AND subject IS ?2",
        )
        .bind(id)
        .bind(subject)
        .fetch_optional(&mut *tx)
        .await?;
        if owned.is_none() {
            return Ok(None);
        }
        let mut report = DeliveryReport::default();
        let counts = sqlx::query(
            "SELECT state, count(*) FROM rt_push_deliveries WHERE subscription_id = ?1 GROUP BY state",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        for row in counts {
            let n = row.get::<i64, _>(1) as u64;
            match DeliveryState::parse(row.get(0))? {
                DeliveryState::Pending => report.pending = n,
                DeliveryState::Delivered => report.delivered = n,
                DeliveryState::Failed => report.failed = n,
            }
        }
        let rows = sqlx::query(
            "SELECT topic, seq, state, attempts, notice, last_status, last_error,
                    next_attempt_us, created_us, updated_us
             FROM rt_push_deliveries WHERE subscription_id = ?1
             ORDER BY updated_us DESC, id DESC LIMIT ?2",
        )
        .bind(id)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        report.recent = rows
            .into_iter()
            .map(|row| {
                Ok(DeliveryRecord {
                    topic: Topic::parse(row.get::<&str, _>(0))
                        .map_err(|e| StoreError::Corrupt(format!("push delivery topic: {e}")))?,
                    seq: row.get::<i64, _>(1) as u64,
                    state: DeliveryState::parse(row.get(2))?,
                    attempts: row.get::<i64, _>(3) as u32,
                    notice: row.get(4),
                    last_status: row.get::<Option<i64>, _>(5).map(|s| s as u16),
                    last_error: row.get(6),
                    next_attempt_at: from_micros(row.get(7)),
                    created_at: from_micros(row.get(8)),
                    updated_at: from_micros(row.get(9)),
                })
            })
            .collect::<Result<_, StoreError>>()?;
        Ok(Some(report))
    }

    async fn prune_push_deliveries(&self, age: Duration) -> Result<u64, StoreError> {
        let cutoff = micros(Utc::now()).saturating_sub(duration_micros(age));
        let done = sqlx::query(
            "DELETE FROM rt_push_deliveries WHERE state <> 'pending' AND updated_us < ?1",
        )
        .bind(cutoff)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "sqlite"
    }
}
