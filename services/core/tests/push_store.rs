//! The Web Push delivery contract of `Store`, run against both stores: a
//! fresh Postgres database and a fresh SQLite file per test.

use std::{collections::HashSet, path::PathBuf, time::Duration};

use chrono::{DateTime, Utc};
use rt_core::{
    event::{NewEvent, PushOptions, Topic, commit_time},
    store::{
        ClaimRequest, ClaimedDelivery, DeliveryOutcome, DeliveryState, FanOut, NewPushSubscription,
        PgStore, PushUpsert, SqliteStore, Store,
    },
};
use rt_tests::{TempDir, TestDb};
use serde_json::value::RawValue;
use sqlx::{Connection, SqliteConnection};

/// Where a store under test keeps its data; removed when dropped.
enum Backend {
    Postgres(TestDb),
    Sqlite(TempDir),
}

impl Backend {
    /// Rows of `table` that belong to subscription `id`, read directly.
    async fn count_for(&self, table: &str, id: &str) -> i64 {
        match self {
            Backend::Postgres(db) => sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT count(*) FROM {table} WHERE subscription_id = $1"
            )))
            .bind(id)
            .fetch_one(&mut db.connect().await)
            .await
            .expect("count rows"),
            Backend::Sqlite(dir) => {
                let url = format!("sqlite://{}", sqlite_file(dir).display());
                let mut conn = SqliteConnection::connect(&url)
                    .await
                    .expect("open test file");
                sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT count(*) FROM {table} WHERE subscription_id = ?1"
                )))
                .bind(id)
                .fetch_one(&mut conn)
                .await
                .expect("count rows")
            }
        }
    }
}

fn sqlite_file(dir: &TempDir) -> PathBuf {
    dir.0.join("store.sqlite3")
}

/// A store under test and where its data lives.
struct Fixture {
    kind: &'static str,
    store: Box<dyn Store>,
    backend: Backend,
}

async fn postgres() -> Fixture {
    let db = TestDb::create().await;
    let store = PgStore::connect(&db.url, 4, Duration::from_secs(5), Duration::from_secs(10))
        .await
        .expect("open the Postgres store");
    Fixture {
        kind: "postgres",
        store: Box::new(store),
        backend: Backend::Postgres(db),
    }
}

async fn sqlite() -> Fixture {
    let dir = TempDir::new();
    let store = SqliteStore::open_file(&sqlite_file(&dir), Duration::from_secs(5))
        .await
        .expect("open the SQLite store");
    Fixture {
        kind: "sqlite",
        store: Box::new(store),
        backend: Backend::Sqlite(dir),
    }
}

/// Both stores, each fresh.
async fn fixtures() -> [Fixture; 2] {
    [postgres().await, sqlite().await]
}

fn topic(name: &str) -> Topic {
    Topic::parse(name).expect("valid topic")
}

fn event(t: &Topic, n: u32) -> NewEvent {
    NewEvent {
        topic: t.clone(),
        event_type: "update".into(),
        data: RawValue::from_string(format!("{{\"n\":{n}}}")).expect("JSON"),
        idempotency_key: None,
        push: None,
    }
}

async fn append(store: &dyn Store, events: &[NewEvent]) -> DateTime<Utc> {
    let time = commit_time();
    store.append(events, time).await.expect("append");
    time
}

/// Registers a subscription and returns its id.
async fn subscribe(
    store: &dyn Store,
    endpoint: &str,
    subject: Option<&str>,
    topics: &[&Topic],
) -> String {
    let sub = NewPushSubscription {
        subject: subject.map(str::to_owned),
        endpoint: endpoint.to_owned(),
        p256dh: format!("p256dh-of-{endpoint}"),
        auth: format!("auth-of-{endpoint}"),
        expiration_ms: None,
        topics: topics.iter().map(|t| (*t).clone()).collect(),
        notice_only: false,
    };
    match store.upsert_push_subscription(&sub).await.expect("upsert") {
        PushUpsert::Created(r) | PushUpsert::Updated(r) => r.id,
        PushUpsert::OwnedByOther => panic!("{endpoint} is owned by another subject"),
    }
}

fn claim<'a>(owner: &'a str, per_host: u32, skip_hosts: &'a [String]) -> ClaimRequest<'a> {
    ClaimRequest {
        owner,
        limit: 100,
        per_host,
        skip_hosts,
        lease: Duration::from_secs(60),
    }
}

fn outcome(d: &ClaimedDelivery, state: DeliveryState) -> DeliveryOutcome {
    DeliveryOutcome {
        id: d.id,
        attempts: d.attempts,
        state,
        status: Some(201),
        error: None,
        notice: false,
        retry_in: Duration::ZERO,
    }
}

/// (subscription, seq) of claimed rows, sorted.
fn claimed_keys(rows: &[ClaimedDelivery]) -> Vec<(String, u64)> {
    sorted(
        rows.iter()
            .map(|d| (d.subscription_id.clone(), d.seq))
            .collect(),
    )
}

fn sorted(mut keys: Vec<(String, u64)>) -> Vec<(String, u64)> {
    keys.sort();
    keys
}

#[tokio::test(flavor = "multi_thread")]
async fn events_before_a_subscription_are_not_fanned_out_to_it() {
    for f in fixtures().await {
        let (kind, store) = (f.kind, &*f.store);
        let t = topic("orders.1");
        let a = subscribe(store, "https://a.example/push/a", Some("u"), &[&t]).await;
        append(store, &[event(&t, 1), event(&t, 2), event(&t, 3)]).await;
        let b = subscribe(store, "https://b.example/push/b", Some("u"), &[&t]).await;
        append(store, &[event(&t, 4)]).await;
        append(store, &[event(&t, 5)]).await;
        // Registering A again keeps the `after_seq` of the topic it keeps.
        let again = subscribe(store, "https://a.example/push/a", Some("u"), &[&t]).await;
        assert_eq!(again, a, "{kind}");
        // A topic nobody follows is never behind.
        let other = topic("orders.2");
        append(store, &[event(&other, 1)]).await;

        assert_eq!(
            store.push_topics_behind().await.unwrap(),
            std::slice::from_ref(&t),
            "{kind}"
        );
        let step = store.push_fan_out(&t, 10_000).await.unwrap();
        assert_eq!(
            step,
            Some(FanOut {
                events: 5,
                deliveries: 7,
                more: false
            }),
            "{kind}"
        );
        let again = store.push_fan_out(&t, 10_000).await.unwrap();
        assert_eq!(again, Some(FanOut::default()), "{kind}");
        assert!(
            store.push_topics_behind().await.unwrap().is_empty(),
            "{kind}"
        );

        let report_a = store
            .push_deliveries(&a, Some("u"), 100)
            .await
            .unwrap()
            .unwrap();
        let report_b = store
            .push_deliveries(&b, Some("u"), 100)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((report_a.pending, report_b.pending), (5, 2), "{kind}");
        let mut seqs_b: Vec<u64> = report_b.recent.iter().map(|r| r.seq).collect();
        seqs_b.sort_unstable();
        assert_eq!(seqs_b, [4, 5], "{kind}");
        assert!(report_a.recent.iter().all(|r| r.topic == t), "{kind}");

        // A subscription added now gets only what comes next.
        let c = subscribe(store, "https://c.example/push/c", None, &[&t]).await;
        append(store, &[event(&t, 6)]).await;
        assert_eq!(
            store.push_topics_behind().await.unwrap(),
            std::slice::from_ref(&t),
            "{kind}"
        );
        let step = store.push_fan_out(&t, 10_000).await.unwrap().unwrap();
        assert_eq!((step.events, step.deliveries), (1, 3), "{kind}");
        let report_c = store.push_deliveries(&c, None, 100).await.unwrap().unwrap();
        assert_eq!(report_c.pending, 1, "{kind}");
        assert_eq!(report_c.recent[0].seq, 6, "{kind}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn fan_out_respects_max_rows() {
    for f in fixtures().await {
        let (kind, store) = (f.kind, &*f.store);
        let t = topic("feed");
        subscribe(store, "https://a.example/1", None, &[&t]).await;
        subscribe(store, "https://b.example/2", None, &[&t]).await;
        append(store, &[event(&t, 1), event(&t, 2), event(&t, 3)]).await;
        for more in [true, true, false] {
            let step = store.push_fan_out(&t, 2).await.unwrap();
            assert_eq!(
                step,
                Some(FanOut {
                    events: 1,
                    deliveries: 2,
                    more
                }),
                "{kind}"
            );
        }
        assert_eq!(
            store.push_fan_out(&t, 2).await.unwrap(),
            Some(FanOut::default()),
            "{kind}"
        );
        assert!(
            store.push_topics_behind().await.unwrap().is_empty(),
            "{kind}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn claims_carry_the_event_and_respect_lease_and_hosts() {
    for f in fixtures().await {
        let (kind, store) = (f.kind, &*f.store);
        let t = topic("news");
        let a = subscribe(store, "https://a.example/push/1", None, &[&t]).await;
        let b = subscribe(store, "https://b.example:8443/push/2?x=1", None, &[&t]).await;
        let options = PushOptions {
            ttl: Some(60),
            urgency: Some("high".into()),
            topic: Some("t1".into()),
        };
        let first = NewEvent {
            push: Some(options.clone()),
            ..event(&t, 1)
        };
        let time = append(store, &[first]).await;
        append(store, &[event(&t, 2), event(&t, 3)]).await;
        let step = store.push_fan_out(&t, 10_000).await.unwrap().unwrap();
        assert_eq!(step.deliveries, 6, "{kind}");

        // Host a is skipped: only b's rows, at most two.
        let skip = vec!["a.example".to_owned()];
        let got = store
            .claim_push_deliveries(&claim("w1", 2, &skip))
            .await
            .unwrap();
        assert_eq!(
            claimed_keys(&got),
            [(b.clone(), 1), (b.clone(), 2)],
            "{kind}"
        );
        let d = got.iter().find(|d| d.seq == 1).unwrap();
        assert_eq!(d.host, "b.example:8443", "{kind}");
        assert_eq!(d.endpoint, "https://b.example:8443/push/2?x=1", "{kind}");
        assert_eq!(
            d.p256dh, "p256dh-of-https://b.example:8443/push/2?x=1",
            "{kind}"
        );
        assert_eq!(
            d.auth, "auth-of-https://b.example:8443/push/2?x=1",
            "{kind}"
        );
        assert_eq!(d.topic, t, "{kind}");
        assert_eq!(d.attempts, 1, "{kind}");
        assert!(!d.notice && !d.notice_only, "{kind}");
        assert_eq!(d.push.as_ref(), Some(&options), "{kind}");
        let e = d.event.as_ref().expect("the event");
        assert_eq!(
            (e.seq, e.event_type.as_str(), e.data.get(), e.time),
            (1, "update", "{\"n\":1}", time),
            "{kind}"
        );
        let d2 = got.iter().find(|d| d.seq == 2).unwrap();
        assert_eq!(d2.push, None, "{kind}");
        assert_eq!(d2.event.as_ref().unwrap().data.get(), "{\"n\":2}", "{kind}");

        // One per host; the leased rows are not claimed again.
        let got2 = store
            .claim_push_deliveries(&claim("w2", 1, &[]))
            .await
            .unwrap();
        assert_eq!(
            claimed_keys(&got2),
            sorted(vec![(a.clone(), 1), (b.clone(), 3)]),
            "{kind}"
        );
        let a1 = got2.iter().find(|d| d.subscription_id == a).unwrap();
        assert_eq!(a1.host, "a.example", "{kind}");
        assert_eq!(a1.push.as_ref(), Some(&options), "{kind}");
        let got3 = store
            .claim_push_deliveries(&claim("w3", 10, &[]))
            .await
            .unwrap();
        assert_eq!(
            claimed_keys(&got3),
            [(a.clone(), 2), (a.clone(), 3)],
            "{kind}"
        );
        let ids: HashSet<i64> = got.iter().chain(&got2).chain(&got3).map(|d| d.id).collect();
        assert_eq!(ids.len(), 6, "{kind}: every row claimed once");
        let none = store
            .claim_push_deliveries(&claim("w4", 10, &[]))
            .await
            .unwrap();
        assert!(none.is_empty(), "{kind}: {none:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn outcomes_are_recorded_only_by_the_current_claim() {
    for f in fixtures().await {
        let (kind, store) = (f.kind, &*f.store);
        let t = topic("jobs");
        let a = subscribe(store, "https://a.example/push/1", Some("u"), &[&t]).await;
        append(store, &[event(&t, 1), event(&t, 2), event(&t, 3)]).await;
        store.push_fan_out(&t, 10_000).await.unwrap();
        let got = store
            .claim_push_deliveries(&claim("w1", 10, &[]))
            .await
            .unwrap();
        assert_eq!(got.len(), 3, "{kind}");
        let (d1, d2, d3) = (&got[0], &got[1], &got[2]);
        assert_eq!((d1.seq, d2.seq, d3.seq), (1, 2, 3), "{kind}");

        // Wrong owner, stale attempts: nothing changes.
        let delivered = outcome(d1, DeliveryState::Delivered);
        assert_eq!(
            store
                .record_push_outcomes("w2", std::slice::from_ref(&delivered))
                .await
                .unwrap(),
            0,
            "{kind}"
        );
        let stale = DeliveryOutcome {
            attempts: d1.attempts + 1,
            ..delivered.clone()
        };
        assert_eq!(
            store.record_push_outcomes("w1", &[stale]).await.unwrap(),
            0,
            "{kind}"
        );
        let report = store
            .push_deliveries(&a, Some("u"), 10)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((report.pending, report.delivered), (3, 0), "{kind}");

        // The owner records it, once.
        assert_eq!(
            store
                .record_push_outcomes("w1", std::slice::from_ref(&delivered))
                .await
                .unwrap(),
            1,
            "{kind}"
        );
        assert_eq!(
            store
                .record_push_outcomes("w1", &[delivered])
                .await
                .unwrap(),
            0,
            "{kind}: a recorded claim is over"
        );

        // Retry now, as a notice: claimable again with one more attempt.
        let retry = DeliveryOutcome {
            status: Some(413),
            error: Some("too large".into()),
            notice: true,
            ..outcome(d2, DeliveryState::Pending)
        };
        assert_eq!(
            store.record_push_outcomes("w1", &[retry]).await.unwrap(),
            1,
            "{kind}"
        );
        let short = ClaimRequest {
            lease: Duration::from_millis(300),
            ..claim("w1", 10, &[])
        };
        let again = store.claim_push_deliveries(&short).await.unwrap();
        assert_eq!(again.len(), 1, "{kind}: {again:?}");
        let r2 = &again[0];
        assert_eq!((r2.id, r2.seq, r2.attempts), (d2.id, 2, 2), "{kind}");
        assert!(r2.notice, "{kind}: the notice flag is kept");

        // A retry later is not due yet.
        let later = DeliveryOutcome {
            retry_in: Duration::from_secs(3600),
            ..outcome(d3, DeliveryState::Pending)
        };
        assert_eq!(
            store.record_push_outcomes("w1", &[later]).await.unwrap(),
            1,
            "{kind}"
        );

        // The short lease ends unrecorded: another dispatcher takes the row.
        assert!(
            store
                .claim_push_deliveries(&claim("w2", 10, &[]))
                .await
                .unwrap()
                .is_empty(),
            "{kind}: leased"
        );
        tokio::time::sleep(Duration::from_millis(600)).await;
        let taken = store
            .claim_push_deliveries(&claim("w2", 10, &[]))
            .await
            .unwrap();
        assert_eq!(taken.len(), 1, "{kind}: {taken:?}");
        assert_eq!((taken[0].id, taken[0].attempts), (d2.id, 3), "{kind}");
        // The first claim's late outcome is ignored; the current one counts.
        assert_eq!(
            store
                .record_push_outcomes("w1", &[outcome(r2, DeliveryState::Delivered)])
                .await
                .unwrap(),
            0,
            "{kind}"
        );
        let failed = DeliveryOutcome {
            status: Some(400),
            error: Some("refused".into()),
            ..outcome(&taken[0], DeliveryState::Failed)
        };
        assert_eq!(
            store.record_push_outcomes("w2", &[failed]).await.unwrap(),
            1,
            "{kind}"
        );

        let report = store
            .push_deliveries(&a, Some("u"), 10)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (report.pending, report.delivered, report.failed),
            (1, 1, 1),
            "{kind}"
        );
        let r = report.recent.iter().find(|r| r.seq == 2).unwrap();
        assert_eq!(r.state, DeliveryState::Failed, "{kind}");
        assert_eq!(r.attempts, 3, "{kind}");
        assert_eq!(r.last_status, Some(400), "{kind}");
        assert_eq!(r.last_error.as_deref(), Some("refused"), "{kind}");
        let r = report.recent.iter().find(|r| r.seq == 3).unwrap();
        assert_eq!(r.state, DeliveryState::Pending, "{kind}");
        assert!(
            r.next_attempt_at > Utc::now() + chrono::Duration::minutes(30),
            "{kind}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reports_removal_and_pruning() {
    for f in fixtures().await {
        let (kind, store) = (f.kind, &*f.store);
        let t = topic("alerts");
        let a = subscribe(store, "https://a.example/push/1", Some("alice"), &[&t]).await;
        let b = subscribe(store, "https://b.example/push/2", None, &[&t]).await;
        append(store, &[event(&t, 1), event(&t, 2), event(&t, 3)]).await;
        store.push_fan_out(&t, 10_000).await.unwrap();
        let got = store
            .claim_push_deliveries(&claim("w1", 10, &[]))
            .await
            .unwrap();
        assert_eq!(got.len(), 6, "{kind}");
        let of_a = |seq| {
            got.iter()
                .find(|d| d.subscription_id == a && d.seq == seq)
                .unwrap()
        };
        let failed = DeliveryOutcome {
            status: Some(400),
            error: Some("bad request".into()),
            ..outcome(of_a(2), DeliveryState::Failed)
        };
        let recorded = store
            .record_push_outcomes("w1", &[outcome(of_a(1), DeliveryState::Delivered), failed])
            .await
            .unwrap();
        assert_eq!(recorded, 2, "{kind}");

        let report = store
            .push_deliveries(&a, Some("alice"), 10)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (report.pending, report.delivered, report.failed),
            (1, 1, 1),
            "{kind}"
        );
        // Newest first: the two outcomes (same time, higher id first), then the claim.
        let order: Vec<u64> = report.recent.iter().map(|r| r.seq).collect();
        assert_eq!(order, [2, 1, 3], "{kind}");
        let r = &report.recent[0];
        assert_eq!(
            (r.state, r.attempts, r.last_status, r.last_error.as_deref()),
            (DeliveryState::Failed, 1, Some(400), Some("bad request")),
            "{kind}"
        );
        assert!(r.created_at <= r.updated_at, "{kind}");
        let limited = store
            .push_deliveries(&a, Some("alice"), 1)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(limited.recent.len(), 1, "{kind}");
        assert_eq!(
            limited.pending + limited.delivered + limited.failed,
            3,
            "{kind}"
        );

        // Only the subject that registered it sees it.
        assert_eq!(
            store.push_deliveries(&a, None, 10).await.unwrap(),
            None,
            "{kind}"
        );
        assert_eq!(
            store.push_deliveries(&a, Some("bob"), 10).await.unwrap(),
            None,
            "{kind}"
        );
        assert_eq!(
            store.push_deliveries("nope", None, 10).await.unwrap(),
            None,
            "{kind}"
        );
        let report_b = store.push_deliveries(&b, None, 10).await.unwrap().unwrap();
        assert_eq!((report_b.pending, report_b.recent.len()), (3, 3), "{kind}");

        // Pruning removes finished rows only, and only old enough ones.
        assert_eq!(
            store
                .prune_push_deliveries(Duration::from_secs(3600))
                .await
                .unwrap(),
            0,
            "{kind}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            store.prune_push_deliveries(Duration::ZERO).await.unwrap(),
            2,
            "{kind}"
        );
        let report = store
            .push_deliveries(&a, Some("alice"), 10)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (report.pending, report.delivered, report.failed),
            (1, 0, 0),
            "{kind}"
        );
        assert_eq!(
            f.backend.count_for("rt_push_deliveries", &a).await,
            1,
            "{kind}"
        );

        // Removing a subscription removes its deliveries and topics.
        let removed = store
            .remove_push_subscriptions(&[a.clone(), "missing".to_owned()])
            .await
            .unwrap();
        assert_eq!(removed, 1, "{kind}");
        assert_eq!(
            store.push_deliveries(&a, Some("alice"), 10).await.unwrap(),
            None,
            "{kind}"
        );
        assert!(
            store
                .push_subscriptions(Some("alice"))
                .await
                .unwrap()
                .is_empty(),
            "{kind}"
        );
        assert_eq!(
            f.backend.count_for("rt_push_deliveries", &a).await,
            0,
            "{kind}"
        );
        assert_eq!(f.backend.count_for("rt_push_topics", &a).await, 0, "{kind}");
        assert_eq!(
            f.backend.count_for("rt_push_deliveries", &b).await,
            3,
            "{kind}"
        );

        // So does deleting it as its owner.
        assert!(
            store.delete_push_subscription(&b, None).await.unwrap(),
            "{kind}"
        );
        assert_eq!(
            f.backend.count_for("rt_push_deliveries", &b).await,
            0,
            "{kind}"
        );
        assert_eq!(f.backend.count_for("rt_push_topics", &b).await, 0, "{kind}");

        // Events keep flowing to nobody: the topic's progress still moves.
        append(store, &[event(&t, 4)]).await;
        assert_eq!(
            store.push_topics_behind().await.unwrap(),
            std::slice::from_ref(&t),
            "{kind}"
        );
        let step = store.push_fan_out(&t, 10_000).await.unwrap().unwrap();
        assert_eq!((step.events, step.deliveries), (1, 0), "{kind}");
        assert!(
            store.push_topics_behind().await.unwrap().is_empty(),
            "{kind}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_fan_outs_and_claims_never_share_rows() {
    for f in fixtures().await {
        let (kind, store) = (f.kind, &*f.store);
        let t = topic("busy");
        for i in 0..4 {
            let endpoint = format!("https://h{}.example/push/{i}", i % 2);
            subscribe(store, &endpoint, None, &[&t]).await;
        }
        let events: Vec<NewEvent> = (0..10).map(|n| event(&t, n)).collect();
        append(store, &events).await;

        // Concurrent fan-outs of one topic: each event fanned out once.
        let fan_out = || async {
            let mut total = FanOut::default();
            loop {
                match store.push_fan_out(&t, 8).await.unwrap() {
                    Some(step) => {
                        total.events += step.events;
                        total.deliveries += step.deliveries;
                        if !step.more {
                            return total;
                        }
                    }
                    None => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        };
        let (x, y, z) = tokio::join!(fan_out(), fan_out(), fan_out());
        assert_eq!(x.events + y.events + z.events, 10, "{kind}");
        assert_eq!(x.deliveries + y.deliveries + z.deliveries, 40, "{kind}");

        // Concurrent claims: every row to exactly one of them. (A claim may
        // get fewer rows than it could while others commit: sweep after.)
        let take = |owner: &'static str| async move {
            let req = ClaimRequest {
                limit: 12,
                ..claim(owner, 100, &[])
            };
            store.claim_push_deliveries(&req).await.unwrap()
        };
        let (a, b, c, d) = tokio::join!(take("w1"), take("w2"), take("w3"), take("w4"));
        let mut all: Vec<ClaimedDelivery> = [a, b, c, d].concat();
        loop {
            let rest = take("w5").await;
            if rest.is_empty() {
                break;
            }
            all.extend(rest);
        }
        let ids: HashSet<i64> = all.iter().map(|d| d.id).collect();
        assert_eq!(all.len(), 40, "{kind}");
        assert_eq!(ids.len(), 40, "{kind}: no row claimed twice");
        assert!(all.iter().all(|d| d.attempts == 1), "{kind}");
    }
}
