//! The Postgres event log.

use std::{collections::HashMap, time::Duration};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{
    PgPool, Row,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use super::{
    Appended, ClaimRequest, ClaimedDelivery, CursorRecord, DeliveryOutcome, DeliveryRecord,
    DeliveryReport, DeliveryState, FanOut, NewPushSubscription, PushSubscriptionRecord, PushUpsert,
    ReadResult, Retention, Store, StoreError, TopicHead, assign_seqs, claimed_from_row,
    cursor_from_row, endpoint_host, event_from_row, join_topics, push_topics_from,
    sorted_push_topics, sorted_topics,
};
use crate::event::{NewEvent, Position, PushOptions, Topic};

const CURSOR_COLUMNS: &str = "name, topics, position, created_at, updated_at";

fn pg_cursor(row: sqlx::postgres::PgRow) -> Result<CursorRecord, StoreError> {
    cursor_from_row(
        row.get(0),
        row.get::<&str, _>(1),
        row.get::<&str, _>(2),
        row.get(3),
        row.get(4),
    )
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Connects (retrying until `startup_timeout`) and applies the embedded
    /// migrations under sqlx's migration lock, so replicas may start together.
    pub async fn connect(
        url: &str,
        max_connections: u32,
        acquire_timeout: Duration,
        startup_timeout: Duration,
    ) -> anyhow::Result<PgStore> {
        let options: PgConnectOptions = url
            .parse()
            .map_err(|e| anyhow::anyhow!("DATABASE_URL is not a valid Postgres URL: {e}"))?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(acquire_timeout)
            .connect_lazy_with(options);
        let deadline = tokio::time::Instant::now() + startup_timeout;
        loop {
            match MIGRATOR.run(&pool).await {
                Ok(()) => return Ok(PgStore { pool }),
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::warn!(error = %e, "waiting for Postgres");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => anyhow::bail!("cannot prepare the Postgres event log: {e}"),
            }
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

impl PgStore {
    /// The common case, no idempotency keys: one statement, one round trip.
    /// Each topic's row is created or locked (in name order) and advanced by
    /// its event count; the events take the seqs just below the new
    /// `last_seq`, in input order. The statement is its own transaction.
    async fn append_unkeyed(
        &self,
        events: &[NewEvent],
        time: DateTime<Utc>,
    ) -> Result<Vec<Appended>, StoreError> {
        let (mut t, mut ty, mut d, mut p) = (vec![], vec![], vec![], vec![]);
        for e in events {
            t.push(e.topic.as_str());
            ty.push(e.event_type.as_str());
            d.push(e.data.get());
            p.push(e.push.as_ref().map(PushOptions::to_json));
        }
        let rows = sqlx::query(
            "WITH v AS (
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $5::text[]) WITH ORDINALITY AS v(topic, type, data, push, ord)
             ), counts AS (
                 SELECT topic, count(*) AS n FROM v GROUP BY topic
             ), heads AS (
                 INSERT INTO rt_topics (name, last_seq) SELECT topic, n FROM counts ORDER BY topic
                 ON CONFLICT (name) DO UPDATE SET last_seq = rt_topics.last_seq + EXCLUDED.last_seq
                 RETURNING name, last_seq
             ), inserted AS (
                 INSERT INTO rt_events (topic, seq, type, data, time, push)
                 SELECT v.topic, h.last_seq - c.n + row_number() OVER (PARTITION BY v.topic ORDER BY v.ord),
                        v.type, v.data, $4, v.push
                 FROM v JOIN counts c ON c.topic = v.topic JOIN heads h ON h.name = v.topic
             )
             SELECT name, last_seq FROM heads",
        )
        .bind(&t)
        .bind(&ty)
        .bind(&d)
        .bind(time)
        .bind(&p)
        .fetch_all(&self.pool)
        .await?;
        // The first seq of each topic in this batch, counted the same way as above.
        let mut counts: HashMap<&str, u64> = HashMap::new();
        for topic in &t {
            *counts.entry(topic).or_default() += 1;
        }
        let mut next: HashMap<String, u64> = HashMap::with_capacity(rows.len());
        for row in rows {
            let name: String = row.get(0);
            let last = row.get::<i64, _>(1) as u64;
            let n = counts.get(name.as_str()).copied().unwrap_or(0);
            next.insert(name, last - n + 1);
        }
        t.iter()
            .map(|topic| {
                let seq = next.get_mut(*topic).ok_or_else(|| {
                    StoreError::Corrupt(format!("no counter returned for topic {topic}"))
                })?;
                *seq += 1;
                Ok(Appended {
                    seq: *seq - 1,
                    duplicate: false,
                })
            })
            .collect()
    }
}

#[async_trait]
impl Store for PgStore {
    async fn append(
        &self,
        events: &[NewEvent],
        time: DateTime<Utc>,
    ) -> Result<Vec<Appended>, StoreError> {
        if events.iter().all(|e| e.idempotency_key.is_none()) {
            return self.append_unkeyed(events, time).await;
        }
        let topics: Vec<String> = sorted_topics(events)
            .iter()
            .map(|t| t.to_string())
            .collect();
        let mut tx = self.pool.begin().await?;

        sqlx::query(
            "INSERT INTO rt_topics (name) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
        )
        .bind(&topics)
        .execute(&mut *tx)
        .await?;
        // Lock the topics' rows in name order: this orders commits per topic.
        let rows = sqlx::query(
            "SELECT name, last_seq FROM rt_topics WHERE name = ANY($1) ORDER BY name FOR UPDATE",
        )
        .bind(&topics)
        .fetch_all(&mut *tx)
        .await?;
        let mut last = HashMap::with_capacity(rows.len());
        for row in rows {
            let name: String = row.get(0);
            let seq: i64 = row.get(1);
            let topic = Topic::parse(&name).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            last.insert(topic, seq as u64);
        }

        let existing = existing_keys(&mut tx, events).await?;
        let appended = assign_seqs(events, &mut last, &existing);

        let fresh = events.iter().zip(&appended).filter(|(_, a)| !a.duplicate);
        let (mut t, mut s, mut ty, mut d, mut k) = (vec![], vec![], vec![], vec![], vec![]);
        let mut p = vec![];
        for (e, a) in fresh {
            t.push(e.topic.as_str());
            s.push(a.seq as i64);
            ty.push(e.event_type.as_str());
            d.push(e.data.get());
            k.push(e.idempotency_key.as_deref());
            p.push(e.push.as_ref().map(PushOptions::to_json));
        }
        if !t.is_empty() {
            sqlx::query(
                "INSERT INTO rt_events (topic, seq, type, data, time, idempotency_key, push)
                 SELECT t, s, ty, d, $5, k, p
                 FROM unnest($1::text[], $2::int8[], $3::text[], $4::text[], $6::text[], $7::text[])
                      AS v(t, s, ty, d, k, p)",
            )
            .bind(&t)
            .bind(&s)
            .bind(&ty)
            .bind(&d)
            .bind(time)
            .bind(&k)
            .bind(&p)
            .execute(&mut *tx)
            .await?;
            let (names, lasts): (Vec<&str>, Vec<i64>) =
                last.iter().map(|(t, s)| (t.as_str(), *s as i64)).unzip();
            sqlx::query(
                "UPDATE rt_topics SET last_seq = v.last
                 FROM unnest($1::text[], $2::int8[]) AS v(name, last)
                 WHERE rt_topics.name = v.name AND rt_topics.last_seq <> v.last",
            )
            .bind(&names)
            .bind(&lasts)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(appended)
    }

    async fn read(&self, topic: &Topic, after: u64, limit: u32) -> Result<ReadResult, StoreError> {
        // One snapshot for counters and rows, so a concurrent prune cannot
        // make them disagree.
        // One statement: the snapshot's isolation is part of BEGIN, so a
        // connection reused after a cancelled request cannot break it.
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        let head = sqlx::query("SELECT low_seq, last_seq FROM rt_topics WHERE name = $1")
            .bind(topic.as_str())
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| TopicHead {
                low_seq: r.get::<i64, _>(0) as u64,
                last_seq: r.get::<i64, _>(1) as u64,
            })
            .unwrap_or_default();
        let rows = sqlx::query(
            "SELECT seq, type, data, time FROM rt_events
             WHERE topic = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(topic.as_str())
        .bind(after.min(i64::MAX as u64) as i64)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let events = rows
            .into_iter()
            .map(|r| event_from_row(topic, r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect::<Result<_, _>>()?;
        Ok(ReadResult { events, head })
    }

    async fn heads(&self, topics: &[Topic]) -> Result<HashMap<Topic, TopicHead>, StoreError> {
        let names: Vec<&str> = topics.iter().map(Topic::as_str).collect();
        let rows =
            sqlx::query("SELECT name, low_seq, last_seq FROM rt_topics WHERE name = ANY($1)")
                .bind(&names)
                .fetch_all(&self.pool)
                .await?;
        let mut heads: HashMap<Topic, TopicHead> = topics
            .iter()
            .map(|t| (t.clone(), TopicHead::default()))
            .collect();
        for row in rows {
            let name: String = row.get(0);
            if let Ok(topic) = Topic::parse(&name) {
                heads.insert(
                    topic,
                    TopicHead {
                        low_seq: row.get::<i64, _>(1) as u64,
                        last_seq: row.get::<i64, _>(2) as u64,
                    },
                );
            }
        }
        Ok(heads)
    }

    async fn prune(&self, retention: Retention) -> Result<u64, StoreError> {
        if retention.is_unlimited() {
            return Ok(0);
        }
        let count = retention.max_count.map(|c| c.min(i64::MAX as u64) as i64);
        let cutoff = retention.age_cutoff();
        // Which topics have events to drop, and the new lowest readable seq.
        let candidates = sqlx::query(
            "SELECT name, new_low FROM (
                 SELECT t.name, t.low_seq, GREATEST(
                     CASE WHEN $1::int8 IS NULL THEN 0 ELSE t.last_seq - $1 + 1 END,
                     CASE WHEN $2::timestamptz IS NULL THEN 0 ELSE COALESCE(
                         (SELECT max(e.seq) + 1 FROM rt_events e WHERE e.topic = t.name AND e.time < $2), 0) END
                 ) AS new_low
                 FROM rt_topics t
             ) c WHERE new_low > low_seq",
        )
        .bind(count)
        .bind(cutoff)
        .fetch_all(&self.pool)
        .await?;
        let mut removed = 0;
        // One statement per topic: it locks one topic row only, so it cannot
        // deadlock with group commits, which lock several in name order.
        for row in candidates {
            let name: String = row.get(0);
            let new_low: i64 = row.get(1);
            let done = sqlx::query(
                "WITH moved AS (
                     UPDATE rt_topics SET low_seq = GREATEST(low_seq, $2) WHERE name = $1 RETURNING low_seq
                 )
                 DELETE FROM rt_events WHERE topic = $1 AND seq < (SELECT low_seq FROM moved)",
            )
            .bind(&name)
            .bind(new_low)
            .execute(&self.pool)
            .await?;
            removed += done.rows_affected();
        }
        Ok(removed)
    }

    async fn create_cursor(
        &self,
        name: &str,
        topics: &[Topic],
        position: &Position,
    ) -> Result<(CursorRecord, bool), StoreError> {
        let created = sqlx::query(
            "INSERT INTO rt_cursors (name, topics, position) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO NOTHING
             RETURNING name, topics, position, created_at, updated_at",
        )
        .bind(name)
        .bind(join_topics(topics))
        .bind(position.to_string())
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = created {
            return Ok((pg_cursor(row)?, true));
        }
        match self.cursor(name).await? {
            Some(existing) => Ok((existing, false)),
            // Deleted between the two statements: try again.
            None => Box::pin(self.create_cursor(name, topics, position)).await,
        }
    }

    async fn cursor(&self, name: &str) -> Result<Option<CursorRecord>, StoreError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CURSOR_COLUMNS} FROM rt_cursors WHERE name = $1"
        )))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?
        .map(pg_cursor)
        .transpose()
    }

    async fn cursors(&self) -> Result<Vec<CursorRecord>, StoreError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CURSOR_COLUMNS} FROM rt_cursors ORDER BY name"
        )))
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(pg_cursor)
        .collect()
    }

    async fn commit_cursor(
        &self,
        name: &str,
        position: &Position,
    ) -> Result<Option<CursorRecord>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let Some(row) = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CURSOR_COLUMNS} FROM rt_cursors WHERE name = $1 FOR UPDATE"
        )))
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(None);
        };
        let mut cursor = pg_cursor(row)?;
        cursor.position.advance(position);
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE rt_cursors SET position = $2, updated_at = now() WHERE name = $1
             RETURNING {CURSOR_COLUMNS}"
        )))
        .bind(name)
        .bind(cursor.position.to_string())
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(pg_cursor(row)?))
    }

    async fn delete_cursor(&self, name: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM rt_cursors WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn vapid_private_key(&self, candidate: &str) -> Result<String, StoreError> {
        // Two statements, not one: the SELECT takes a fresh snapshot, so it
        // sees the row of a concurrent first start that won the insert.
        sqlx::query(
            "INSERT INTO rt_vapid_keys (id, private_key) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
        )
        .bind(candidate)
        .execute(&self.pool)
        .await?;
        let key: String = sqlx::query_scalar("SELECT private_key FROM rt_vapid_keys WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(key)
    }

    async fn upsert_push_subscription(
        &self,
        sub: &NewPushSubscription,
    ) -> Result<PushUpsert, StoreError> {
        let topics = sorted_push_topics(sub);
        let names: Vec<&str> = topics.iter().map(Topic::as_str).collect();
        let candidate = uuid::Uuid::new_v4().to_string();
        let mut tx = self.pool.begin().await?;
        // The conflicting row is locked until commit, so concurrent
        // registrations of one endpoint apply one after the other.
        let Some(row) = sqlx::query(
            "INSERT INTO rt_push_subscriptions
                 (id, subject, endpoint, p256dh, auth, expiration_ms, notice_only, host)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (endpoint) DO UPDATE SET
                 subject = EXCLUDED.subject, p256dh = EXCLUDED.p256dh, auth = EXCLUDED.auth,
                 expiration_ms = EXCLUDED.expiration_ms, notice_only = EXCLUDED.notice_only,
                 updated_at = now()
             WHERE rt_push_subscriptions.subject IS NOT DISTINCT FROM EXCLUDED.subject
                OR rt_push_subscriptions.auth = EXCLUDED.auth
             RETURNING id, created_at, updated_at",
        )
        .bind(&candidate)
        .bind(sub.subject.as_deref())
        .bind(&sub.endpoint)
        .bind(&sub.p256dh)
        .bind(&sub.auth)
        .bind(sub.expiration_ms)
        .bind(sub.notice_only)
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
        sqlx::query("DELETE FROM rt_push_topics WHERE subscription_id = $1 AND topic <> ALL($2)")
            .bind(&id)
            .bind(&names)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "WITH v AS (
                 SELECT v.topic, COALESCE(h.last_seq, 0) AS last
                 FROM unnest($2::text[]) AS v(topic) LEFT JOIN rt_topics h ON h.name = v.topic
             ), followed AS (
                 INSERT INTO rt_push_topics (subscription_id, topic, after_seq)
                 SELECT $1, topic, last FROM v
                 ON CONFLICT DO NOTHING
             )
             INSERT INTO rt_push_progress (topic, seq) SELECT topic, last FROM v
             ON CONFLICT DO NOTHING",
        )
        .bind(&id)
        .bind(&names)
        .execute(&mut *tx)
        .await?;
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
            created_at: row.get(1),
            updated_at: row.get(2),
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
                    s.created_at, s.updated_at,
                    COALESCE((SELECT string_agg(t.topic, ',') FROM rt_push_topics t
                              WHERE t.subscription_id = s.id), '')
             FROM rt_push_subscriptions s
             WHERE ($1::text IS NULL AND s.subject IS NULL) OR s.subject = $1
             ORDER BY s.created_at, s.id",
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
                    created_at: row.get(7),
                    updated_at: row.get(8),
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
        // Its topics go with it (ON DELETE CASCADE).
        let done = sqlx::query(
            "DELETE FROM rt_push_subscriptions
             WHERE id = $1 AND (($2::text IS NULL AND subject IS NULL) OR subject = $2)",
        )
        .bind(id)
        .bind(subject)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
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
        let mut tx = self.pool.begin().await?;
        let Some(progress) = sqlx::query_scalar::<_, i64>(
            "SELECT seq FROM rt_push_progress WHERE topic = $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(topic.as_str())
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(None);
        };
        let row = sqlx::query(
            "SELECT COALESCE((SELECT last_seq FROM rt_topics WHERE name = $1), 0),
                    (SELECT count(*) FROM rt_push_topics WHERE topic = $1)",
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
            "INSERT INTO rt_push_deliveries (subscription_id, topic, seq, host)
             SELECT t.subscription_id, e.topic, e.seq, s.host
             FROM rt_events e JOIN rt_push_topics t ON t.topic = e.topic AND t.after_seq < e.seq
             JOIN rt_push_subscriptions s ON s.id = t.subscription_id
             WHERE e.topic = $1 AND e.seq > $2 AND e.seq <= $3
             ORDER BY e.seq, t.subscription_id
             ON CONFLICT DO NOTHING",
        )
        .bind(topic.as_str())
        .bind(progress)
        .bind(upto)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query("UPDATE rt_push_progress SET seq = $2 WHERE topic = $1")
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
        // Candidates are locked with SKIP LOCKED, so concurrent claims by
        // other replicas take other rows; at most `per_host` per host are
        // then claimed (the other candidates' locks end with the statement).
        let rows = sqlx::query(
            "WITH candidates AS (
                 SELECT d.id, d.host FROM rt_push_deliveries d
                 WHERE d.state = 'pending' AND d.next_attempt_at <= now()
                   AND d.host <> ALL($1)
                 ORDER BY d.next_attempt_at, d.id
                 LIMIT $2
                 FOR UPDATE SKIP LOCKED
             ), ranked AS (
                 SELECT id, host, row_number() OVER (PARTITION BY host ORDER BY id) AS rank
                 FROM candidates
             ), claimed AS (
                 UPDATE rt_push_deliveries d
                 SET attempts = d.attempts + 1, claimed_by = $3, updated_at = now(),
                     next_attempt_at = now() + $4 * interval '1 millisecond'
                 FROM ranked
                 WHERE d.id = ranked.id AND ranked.rank <= $5
                 RETURNING d.id, d.subscription_id, d.topic, d.seq, d.attempts, d.notice, ranked.host
             )
             SELECT c.id, c.subscription_id, c.topic, c.seq, c.attempts, c.notice, c.host,
                    s.endpoint, s.p256dh, s.auth, s.notice_only,
                    e.type, e.data, e.time, e.push
             FROM claimed c
             JOIN rt_push_subscriptions s ON s.id = c.subscription_id
             LEFT JOIN rt_events e ON e.topic = c.topic AND e.seq = c.seq
             ORDER BY c.id",
        )
        .bind(claim.skip_hosts)
        .bind(i64::from(claim.limit))
        .bind(claim.owner)
        .bind(claim.lease.as_millis().min(i64::MAX as u128) as i64)
        .bind(i64::from(claim.per_host))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| claimed_from_row(&row, row.get::<i32, _>(4) as u32, |row| row.get(13)))
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
        let mut ids = Vec::with_capacity(outcomes.len());
        let (mut attempts, mut states, mut statuses) = (vec![], vec![], vec![]);
        let (mut errors, mut notices, mut delays) = (vec![], vec![], vec![]);
        for o in outcomes {
            ids.push(o.id);
            attempts.push(o.attempts as i32);
            states.push(o.state.as_str());
            statuses.push(o.status.map(i32::from));
            errors.push(o.error.as_deref());
            notices.push(o.notice);
            delays.push(o.retry_in.as_millis().min(i64::MAX as u128) as i64);
        }
        let done = sqlx::query(
            "UPDATE rt_push_deliveries d
             SET state = v.state, last_status = v.status, last_error = v.error,
                 notice = v.notice, claimed_by = NULL, updated_at = now(),
                 next_attempt_at = now() + v.delay * interval '1 millisecond'
             FROM unnest($2::int8[], $3::int4[], $4::text[], $5::int4[], $6::text[], $7::bool[], $8::int8[])
                  AS v(id, attempts, state, status, error, notice, delay)
             WHERE d.id = v.id AND d.claimed_by = $1 AND d.attempts = v.attempts",
        )
        .bind(owner)
        .bind(&ids)
        .bind(&attempts)
        .bind(&states)
        .bind(&statuses)
        .bind(&errors)
        .bind(&notices)
        .bind(&delays)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn remove_push_subscriptions(&self, ids: &[String]) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM rt_push_subscriptions WHERE id = ANY($1)")
            .bind(ids)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn push_deliveries(
        &self,
        id: &str,
        subject: Option<&str>,
        limit: u32,
    ) -> Result<Option<DeliveryReport>, StoreError> {
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        let owned = sqlx::query_scalar::<_, i32>(
            "SELECT 1 FROM rt_push_subscriptions
             WHERE id = $1 AND (($2::text IS NULL AND subject IS NULL) OR subject = $2)",
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
            "SELECT state, count(*) FROM rt_push_deliveries WHERE subscription_id = $1 GROUP BY state",
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
                    next_attempt_at, created_at, updated_at
             FROM rt_push_deliveries WHERE subscription_id = $1
             ORDER BY updated_at DESC, id DESC LIMIT $2",
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
                    attempts: row.get::<i32, _>(3) as u32,
                    notice: row.get(4),
                    last_status: row.get::<Option<i32>, _>(5).map(|s| s as u16),
                    last_error: row.get(6),
                    next_attempt_at: row.get(7),
                    created_at: row.get(8),
                    updated_at: row.get(9),
                })
            })
            .collect::<Result<_, StoreError>>()?;
        Ok(Some(report))
    }

    async fn prune_push_deliveries(&self, age: Duration) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM rt_push_deliveries
             WHERE state <> 'pending' AND updated_at < now() - $1 * interval '1 millisecond'",
        )
        .bind(age.as_millis().min(i64::MAX as u128) as i64)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "postgres"
    }
}

/// Seqs already stored for the batch's idempotency keys.
async fn existing_keys(
    tx: &mut sqlx::PgConnection,
    events: &[NewEvent],
) -> Result<HashMap<(Topic, String), u64>, StoreError> {
    let (topics, keys): (Vec<&str>, Vec<&str>) = events
        .iter()
        .filter_map(|e| Some((e.topic.as_str(), e.idempotency_key.as_deref()?)))
        .unzip();
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = sqlx::query(
        "SELECT e.topic, e.idempotency_key, e.seq FROM rt_events e
         JOIN unnest($1::text[], $2::text[]) AS k(topic, key)
           ON e.topic = k.topic AND e.idempotency_key = k.key",
    )
    .bind(&topics)
    .bind(&keys)
    .fetch_all(tx)
    .await?;
    let mut found = HashMap::with_capacity(rows.len());
    for row in rows {
        let topic: String = row.get(0);
        let topic = Topic::parse(&topic).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        found.insert(
            (topic, row.get::<String, _>(1)),
            row.get::<i64, _>(2) as u64,
        );
    }
    Ok(found)
}
