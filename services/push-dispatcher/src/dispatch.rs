//! The delivery engine: a consumer of the event log that sends Web Push
//! messages, at least once, shared by any number of replicas.
//!
//! Four tasks per process:
//! - **watch**: the bus names every topic that got an event; the topic is
//!   marked for fan-out. The bus is only a wake-up: the log says what is new.
//! - **fan-out**: for each marked topic (and, every `--push-sweep-interval`,
//!   each topic the store says is behind), the store turns the topic's next
//!   events into delivery rows, one per subscription, and moves the topic's
//!   progress past them in the same transaction. A replica that finds the
//!   topic locked leaves it to the one holding it.
//! - **send**: claims due deliveries (a lease: other replicas skip them until
//!   it ends), at most `--push-concurrency` in flight and
//!   `--push-host-concurrency` per push-service host, and sends each one.
//! - **record**: writes outcomes back in batches. Only the claim that made
//!   an attempt may record it, so a replica that lost its lease (it stalled,
//!   another one retried) changes nothing.
//!
//! A replica that dies leaves its claimed rows to fall due again when their
//! lease ends: another replica sends them. Those sent but not yet recorded
//! are sent twice; nothing is lost.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts};
use rand_core::RngCore;
use rt_core::{
    Context,
    event::{Event, PushOptions, Topic},
    store::{ClaimRequest, ClaimedDelivery, DeliveryOutcome, DeliveryState},
};
use serde::Serialize;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};

use crate::vapid::{ClientKeys, VapidKeys};

/// Largest message that fits one 4096-byte aes128gcm record once encrypted
/// (86-byte header, 1 padding delimiter, 16-byte tag): RFC 8291, section 4.
pub const MAX_PLAINTEXT: usize = 4096 - 86 - 1 - 16;
/// Most delivery rows one fan-out step creates.
const FAN_OUT_ROWS: u32 = 20_000;
/// Most deliveries one claim takes.
const CLAIM_BATCH: usize = 256;
/// Most outcomes written in one statement.
const RECORD_BATCH: usize = 1000;
/// How often an idle sender looks for deliveries that fell due (retries,
/// other replicas' expired leases).
const IDLE_POLL: Duration = Duration::from_millis(500);
/// Longest retry delay.
const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// How long a VAPID token is valid; it is reused for half of that.
const VAPID_VALIDITY: Duration = Duration::from_secs(12 * 3600);

/// Starts the engine on the current runtime; it returns once
/// `ctx.shutdown` has started and what was in flight is recorded.
pub async fn run(ctx: Context) {
    let keys = loop {
        match crate::load_keys(&ctx).await {
            Ok(keys) => break Arc::new(keys),
            Err(e) => {
                tracing::warn!(error = %e, "push dispatcher: cannot load the VAPID key; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = ctx.shutdown.started() => return,
                }
            }
        }
    };
    let engine = match Engine::new(ctx.clone(), keys) {
        Ok(engine) => Arc::new(engine),
        Err(e) => {
            tracing::error!(error = %e, "push dispatcher cannot start; no Web Push is sent");
            return;
        }
    };
    tracing::info!(owner = engine.owner, "push dispatcher started");
    let (tx, rx) = mpsc::unbounded_channel();
    let watch = tokio::spawn(engine.clone().watch());
    let fan_out = tokio::spawn(engine.clone().fan_out());
    let record = tokio::spawn(engine.clone().record(rx));
    engine.clone().send(tx).await;
    // The sender has returned: every send task holds a sender clone, so the
    // recorder ends once the last outcome is written.
    let _ = record.await;
    watch.abort();
    let _ = fan_out.await;
    tracing::info!(owner = engine.owner, "push dispatcher stopped");
}

/// The dispatcher's counters, registered on the process's `/metrics`.
struct PushMetrics {
    outcomes: IntCounterVec,
    fanned_out: IntCounterVec,
    send_seconds: Histogram,
    in_flight: IntGauge,
}

impl PushMetrics {
    fn new(ctx: &Context) -> anyhow::Result<PushMetrics> {
        let outcomes = IntCounterVec::new(
            Opts::new(
                "push_outcomes_total",
                "Web Push attempts by outcome: delivered, notice (delivered as a notice), \
                 retry, failed, gone (subscription removed)",
            ),
            &["outcome"],
        )?;
        let fanned_out = IntCounterVec::new(
            Opts::new(
                "push_fanned_out_total",
                "Events fanned out to push deliveries, and the deliveries created",
            ),
            &["kind"],
        )?;
        let send_seconds = Histogram::with_opts(
            HistogramOpts::new("push_send_seconds", "Duration of requests to push services")
                .buckets(prometheus::exponential_buckets(0.001, 2.0, 15)?),
        )?;
        let in_flight = IntGauge::new("push_in_flight", "Web Push requests in flight")?;
        ctx.metrics.register(Box::new(outcomes.clone()))?;
        ctx.metrics.register(Box::new(fanned_out.clone()))?;
        ctx.metrics.register(Box::new(send_seconds.clone()))?;
        ctx.metrics.register(Box::new(in_flight.clone()))?;
        Ok(PushMetrics {
            outcomes,
            fanned_out,
            send_seconds,
            in_flight,
        })
    }
}

/// What one attempt came to.
#[derive(Debug)]
enum Verdict {
    Delivered {
        status: u16,
    },
    /// 404 or 410: the browser unsubscribed; the subscription is removed.
    Gone {
        status: u16,
    },
    /// 429, 5xx or no answer: try again, not before `retry_after`.
    Retry {
        status: Option<u16>,
        error: String,
        retry_after: Option<Duration>,
    },
    Failed {
        status: Option<u16>,
        error: String,
    },
}

/// An attempt's result, on its way to the recorder.
struct Recorded {
    outcome: DeliveryOutcome,
    /// A subscription to remove (the push service answered 404 or 410).
    gone: Option<String>,
}

/// Per push-service host: requests in flight, bounded.
struct HostSlot {
    permits: Arc<Semaphore>,
    claimed: u32,
}

struct Engine {
    ctx: Context,
    keys: Arc<VapidKeys>,
    owner: String,
    client: reqwest::Client,
    metrics: PushMetrics,
    global: Arc<Semaphore>,
    hosts: Mutex<HashMap<String, HostSlot>>,
    dirty: Mutex<BTreeSet<Topic>>,
    fan_out_wake: Notify,
    send_wake: Notify,
    /// Cached `Authorization` values by origin, with when to renew them.
    vapid: Mutex<HashMap<String, (String, Instant)>>,
}

impl Engine {
    fn new(ctx: Context, keys: Arc<VapidKeys>) -> anyhow::Result<Engine> {
        let settings = &ctx.settings;
        let mut client = reqwest::Client::builder()
            .timeout(settings.push_request_timeout)
            .connect_timeout(settings.push_request_timeout.min(Duration::from_secs(10)))
            .pool_max_idle_per_host(settings.push_host_concurrency as usize)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("realtime-push/", env!("CARGO_PKG_VERSION")));
        if !settings.push_allow_private_addresses {
            client = client.dns_resolver(Arc::new(crate::guard::PublicResolver));
        }
        let client = client.build()?;
        let owner = format!(
            "{}-{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        Ok(Engine {
            metrics: PushMetrics::new(&ctx)?,
            global: Arc::new(Semaphore::new(settings.push_concurrency as usize)),
            keys,
            owner,
            client,
            hosts: Mutex::default(),
            dirty: Mutex::default(),
            fan_out_wake: Notify::new(),
            send_wake: Notify::new(),
            vapid: Mutex::default(),
            ctx,
        })
    }

    /// Marks every topic the bus names for fan-out.
    async fn watch(self: Arc<Self>) {
        loop {
            match self.ctx.bus.watch().await {
                Ok(mut topics) => {
                    while let Some(topic) = topics.next().await {
                        // unwrap: the lock is never held across a panic point
                        self.dirty.lock().unwrap().insert(topic);
                        self.fan_out_wake.notify_one();
                    }
                }
                Err(e) => tracing::warn!(error = %e, "push dispatcher cannot watch the bus"),
            }
            // The sweep still finds new events meanwhile.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Turns new events into deliveries.
    async fn fan_out(self: Arc<Self>) {
        let settings = self.ctx.settings.clone();
        let mut sweep = tokio::time::interval(settings.push_sweep_interval);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_prune = Instant::now();
        loop {
            tokio::select! {
                _ = self.fan_out_wake.notified() => {}
                _ = sweep.tick() => self.sweep(&mut last_prune).await,
                _ = self.ctx.shutdown.started() => return,
            }
            let topics = std::mem::take(&mut *self.dirty.lock().unwrap());
            for topic in topics {
                self.fan_out_topic(&topic).await;
            }
        }
    }

    /// Finds topics behind (lost wake-ups, a replica that died mid-step) and
    /// prunes old outcomes now and then.
    async fn sweep(&self, last_prune: &mut Instant) {
        match self.ctx.store.push_topics_behind().await {
            Ok(topics) => self.dirty.lock().unwrap().extend(topics),
            Err(e) => tracing::warn!(error = %e, "push dispatcher: cannot list topics behind"),
        }
        // Due retries and expired leases of other replicas.
        self.send_wake.notify_one();
        if last_prune.elapsed() >= Duration::from_secs(60) {
            *last_prune = Instant::now();
            let age = self.ctx.settings.push_outcome_retention;
            match self.ctx.store.prune_push_deliveries(age).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(removed = n, "pruned finished push deliveries"),
                Err(e) => tracing::warn!(error = %e, "push dispatcher: cannot prune outcomes"),
            }
        }
    }

    async fn fan_out_topic(&self, topic: &Topic) {
        loop {
            match self.ctx.store.push_fan_out(topic, FAN_OUT_ROWS).await {
                Ok(Some(step)) => {
                    if step.deliveries > 0 {
                        self.metrics
                            .fanned_out
                            .with_label_values(&["deliveries"])
                            .inc_by(step.deliveries);
                        self.send_wake.notify_one();
                    }
                    self.metrics
                        .fanned_out
                        .with_label_values(&["events"])
                        .inc_by(step.events);
                    if !step.more {
                        return;
                    }
                }
                // No subscription follows it, or another replica holds it.
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(%topic, error = %e, "push fan-out failed; the sweep retries");
                    return;
                }
            }
        }
    }

    /// Hosts with as many deliveries claimed as they may have in flight.
    fn saturated_hosts(&self) -> Vec<String> {
        let limit = self.ctx.settings.push_host_concurrency;
        self.hosts
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, slot)| slot.claimed >= limit)
            .map(|(host, _)| host.clone())
            .collect()
    }

    /// Claims deliveries and sends them, until shutdown.
    async fn send(self: Arc<Self>, outcomes: mpsc::UnboundedSender<Recorded>) {
        let settings = self.ctx.settings.clone();
        loop {
            let first = tokio::select! {
                permit = self.global.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
                _ = self.ctx.shutdown.started() => break,
            };
            let mut permits = vec![first];
            while permits.len() < CLAIM_BATCH {
                match self.global.clone().try_acquire_owned() {
                    Ok(permit) => permits.push(permit),
                    Err(_) => break,
                }
            }
            let skip_hosts = self.saturated_hosts();
            let claim = ClaimRequest {
                owner: &self.owner,
                limit: permits.len() as u32,
                per_host: settings.push_host_concurrency,
                skip_hosts: &skip_hosts,
                lease: settings.push_lease,
            };
            let claimed = match self.ctx.store.claim_push_deliveries(&claim).await {
                Ok(claimed) => claimed,
                Err(e) => {
                    tracing::warn!(error = %e, "push dispatcher cannot claim deliveries");
                    drop(permits);
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = self.ctx.shutdown.started() => break,
                    }
                    continue;
                }
            };
            if claimed.is_empty() {
                drop(permits);
                tokio::select! {
                    _ = self.send_wake.notified() => {}
                    _ = tokio::time::sleep(IDLE_POLL) => {}
                    _ = self.ctx.shutdown.started() => break,
                }
                continue;
            }
            for (delivery, permit) in claimed.into_iter().zip(permits) {
                let host = self.take_host(&delivery.host);
                let (engine, outcomes) = (self.clone(), outcomes.clone());
                tokio::spawn(async move {
                    engine.send_one(delivery, permit, host, outcomes).await;
                });
            }
        }
        // Let what is in flight finish: each task holds a global permit.
        let all = settings.push_concurrency;
        let _ = tokio::time::timeout(
            settings.push_request_timeout + Duration::from_secs(1),
            self.global.acquire_many(all),
        )
        .await;
    }

    /// Counts a claimed delivery against its host; returns the host's permits.
    fn take_host(&self, host: &str) -> Arc<Semaphore> {
        let mut hosts = self.hosts.lock().unwrap();
        let slot = hosts.entry(host.to_owned()).or_insert_with(|| HostSlot {
            permits: Arc::new(Semaphore::new(
                self.ctx.settings.push_host_concurrency as usize,
            )),
            claimed: 0,
        });
        slot.claimed += 1;
        slot.permits.clone()
    }

    /// Uncounts a finished delivery. When a host that was skipped for being
    /// saturated is down to half its limit, the sender is woken to claim more
    /// for it at once, a batch at a time, instead of at its next idle poll.
    fn release_host(&self, host: &str) {
        let half = self.ctx.settings.push_host_concurrency.div_ceil(2);
        let mut hosts = self.hosts.lock().unwrap();
        if let Some(slot) = hosts.get_mut(host) {
            let before = slot.claimed;
            slot.claimed = before.saturating_sub(1);
            if before >= half && slot.claimed < half {
                self.send_wake.notify_one();
            }
            if slot.claimed == 0 {
                hosts.remove(host);
            }
        }
    }

    async fn send_one(
        &self,
        delivery: ClaimedDelivery,
        _permit: OwnedSemaphorePermit,
        host: Arc<Semaphore>,
        outcomes: mpsc::UnboundedSender<Recorded>,
    ) {
        let verdict = {
            // One slow host holds only its own permits.
            let _host_permit = host.acquire().await;
            self.metrics.in_flight.inc();
            let verdict = self.attempt(&delivery).await;
            self.metrics.in_flight.dec();
            verdict
        };
        self.release_host(&delivery.host);
        let recorded = self.judge(&delivery, verdict);
        let _ = outcomes.send(recorded);
    }

    /// Sends the event (or its notice) and, on 413, the notice.
    async fn attempt(&self, d: &ClaimedDelivery) -> (Verdict, bool) {
        let Some(event) = &d.event else {
            return (
                Verdict::Failed {
                    status: None,
                    error: "the event was removed by retention before it could be sent".into(),
                },
                false,
            );
        };
        let keys = match ClientKeys::decode(&d.p256dh, &d.auth) {
            Ok(keys) => keys,
            Err(e) => {
                return (
                    Verdict::Failed {
                        status: None,
                        error: format!("the subscription's keys are unusable: {e}"),
                    },
                    false,
                );
            }
        };
        let (body, notice) = if d.notice_only {
            (notice_json(event, NoticeReason::NoticeOnly), true)
        } else if d.notice {
            (notice_json(event, NoticeReason::TooLarge), true)
        } else {
            let json = event.to_json();
            if json.len() > MAX_PLAINTEXT {
                (notice_json(event, NoticeReason::TooLarge), true)
            } else {
                (json, false)
            }
        };
        let verdict = self.post(d, &keys, body).await;
        if !notice
            && matches!(
                verdict,
                Verdict::Failed {
                    status: Some(413),
                    ..
                }
            )
        {
            let body = notice_json(event, NoticeReason::TooLarge);
            return (self.post(d, &keys, body).await, true);
        }
        (verdict, notice)
    }

    /// One request to the push service.
    async fn post(&self, d: &ClaimedDelivery, keys: &ClientKeys, body: String) -> Verdict {
        let payload = match keys.encrypt(body.into_bytes()) {
            Ok(payload) => payload,
            Err(e) => {
                return Verdict::Failed {
                    status: None,
                    error: e.to_string(),
                };
            }
        };
        if !self.ctx.settings.push_allow_private_addresses
            && let Some(refusal) = url::Url::parse(&d.endpoint)
                .ok()
                .and_then(|u| crate::guard::literal_host_refusal(&u))
        {
            // Registered while private addresses were allowed.
            return Verdict::Failed {
                status: None,
                error: refusal,
            };
        }
        let origin = origin(&d.endpoint);
        let authorization = match self.authorization(&origin) {
            Ok(value) => value,
            Err(e) => {
                return Verdict::Retry {
                    status: None,
                    error: e,
                    retry_after: None,
                };
            }
        };
        let options = event_options(d.push.as_ref(), &self.ctx.settings);
        let mut request = self
            .client
            .post(&d.endpoint)
            .header("TTL", options.ttl)
            .header("Urgency", options.urgency)
            .header("Content-Encoding", "aes128gcm")
            .header("Content-Type", "application/octet-stream")
            .header("Authorization", authorization)
            .body(payload);
        if let Some(topic) = options.topic {
            request = request.header("Topic", topic);
        }
        let started = Instant::now();
        let result = request.send().await;
        self.metrics
            .send_seconds
            .observe(started.elapsed().as_secs_f64());
        let response = match result {
            Ok(response) => response,
            Err(e) => {
                if let Some(refusal) = crate::guard::NotPublic::find(&e) {
                    return Verdict::Failed {
                        status: None,
                        error: refusal.to_string(),
                    };
                }
                return Verdict::Retry {
                    status: None,
                    error: format!("no answer from the push service: {}", error_chain(&e)),
                    retry_after: None,
                };
            }
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        match status {
            200..=299 => Verdict::Delivered { status },
            404 | 410 => Verdict::Gone { status },
            429 | 500..=599 => Verdict::Retry {
                status: Some(status),
                error: format!("the push service answered {status}"),
                retry_after,
            },
            _ => {
                // The push service's explanation, never ours: it cannot hold the payload.
                let text = response.text().await.unwrap_or_default();
                let text: String = text.chars().take(200).collect();
                Verdict::Failed {
                    status: Some(status),
                    error: format!("the push service refused it with {status}: {}", text.trim()),
                }
            }
        }
    }

    /// The VAPID header for an origin, signed once and reused for half its life.
    fn authorization(&self, origin: &str) -> Result<String, String> {
        let mut cache = self.vapid.lock().unwrap();
        if let Some((value, renew_at)) = cache.get(origin)
            && Instant::now() < *renew_at
        {
            return Ok(value.clone());
        }
        let value = self
            .keys
            .authorization(origin, &self.ctx.settings.vapid_subject, VAPID_VALIDITY)
            .map_err(|e| e.to_string())?;
        cache.insert(
            origin.to_owned(),
            (value.clone(), Instant::now() + VAPID_VALIDITY / 2),
        );
        Ok(value)
    }

    /// What to record for an attempt.
    fn judge(&self, d: &ClaimedDelivery, (verdict, notice): (Verdict, bool)) -> Recorded {
        let settings = &self.ctx.settings;
        let mut outcome = DeliveryOutcome {
            id: d.id,
            attempts: d.attempts,
            state: DeliveryState::Failed,
            status: None,
            error: None,
            notice,
            retry_in: Duration::ZERO,
        };
        let mut gone = None;
        let label = match verdict {
            Verdict::Delivered { status } => {
                outcome.state = DeliveryState::Delivered;
                outcome.status = Some(status);
                if notice { "notice" } else { "delivered" }
            }
            Verdict::Gone { status } => {
                outcome.status = Some(status);
                outcome.error = Some(format!(
                    "the push service answered {status}: the subscription is gone"
                ));
                gone = Some(d.subscription_id.clone());
                "gone"
            }
            Verdict::Retry {
                status,
                error,
                retry_after,
            } => {
                outcome.status = status;
                if d.attempts >= settings.push_max_attempts {
                    outcome.error = Some(format!("{error}; gave up after {} attempts", d.attempts));
                    "failed"
                } else {
                    outcome.state = DeliveryState::Pending;
                    outcome.error = Some(error);
                    outcome.retry_in =
                        retry_delay(settings.push_retry_base, d.attempts, retry_after);
                    "retry"
                }
            }
            Verdict::Failed { status, error } => {
                outcome.status = status;
                outcome.error = Some(error);
                "failed"
            }
        };
        self.metrics.outcomes.with_label_values(&[label]).inc();
        if label == "failed" || label == "gone" {
            tracing::info!(
                subscription = d.subscription_id,
                topic = %d.topic,
                seq = d.seq,
                status = outcome.status,
                error = outcome.error.as_deref(),
                "push delivery {label}"
            );
        }
        Recorded { outcome, gone }
    }

    /// Writes outcomes in batches until every sender is gone.
    async fn record(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Recorded>) {
        let mut batch = Vec::new();
        while rx.recv_many(&mut batch, RECORD_BATCH).await > 0 {
            let (outcomes, gone): (Vec<_>, Vec<_>) =
                batch.drain(..).map(|r| (r.outcome, r.gone)).unzip();
            let gone: Vec<String> = gone.into_iter().flatten().collect();
            // Retried until written or the lease is over anyway.
            let deadline = Instant::now() + self.ctx.settings.push_lease;
            loop {
                let written = self
                    .ctx
                    .store
                    .record_push_outcomes(&self.owner, &outcomes)
                    .await;
                let removed = match (&written, gone.is_empty()) {
                    (Ok(_), false) => self.ctx.store.remove_push_subscriptions(&gone).await,
                    _ => Ok(0),
                };
                match (written, removed) {
                    (Ok(_), Ok(_)) => break,
                    (Err(e), _) | (_, Err(e)) => {
                        if Instant::now() >= deadline {
                            tracing::error!(error = %e, lost = outcomes.len(),
                                "push outcomes could not be recorded; their deliveries will be retried");
                            break;
                        }
                        tracing::warn!(error = %e, "push outcomes not recorded yet; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
    }
}

/// Why a notice was sent instead of the event.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
enum NoticeReason {
    /// The event does not fit in a push message.
    TooLarge,
    /// The subscription asked for notices only.
    NoticeOnly,
}

/// A notice: which event to fetch, without its data.
#[derive(Serialize)]
struct Notice<'a> {
    topic: &'a Topic,
    seq: u64,
    #[serde(rename = "type")]
    event_type: &'a str,
    time: String,
    /// The position just before the event: the `after` that fetches it over
    /// polling, SSE or WebSocket.
    after: String,
    notice: NoticeReason,
}

fn notice_json(event: &Event, reason: NoticeReason) -> String {
    let notice = Notice {
        topic: &event.topic,
        seq: event.seq,
        event_type: &event.event_type,
        time: event
            .time
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        after: format!("{}:{}", event.topic, event.seq.saturating_sub(1)),
        notice: reason,
    };
    // unwrap: strings and numbers serialize infallibly
    serde_json::to_string(&notice).expect("notice serializes")
}

/// The headers an event's push messages carry.
struct Effective<'a> {
    ttl: u32,
    urgency: &'a str,
    topic: Option<&'a str>,
}

fn event_options<'a>(
    options: Option<&'a PushOptions>,
    settings: &'a rt_core::config::Settings,
) -> Effective<'a> {
    // `check_settings` keeps --push-ttl within 28 days.
    let default_ttl = settings.push_ttl.as_secs().min(u64::from(u32::MAX)) as u32;
    Effective {
        ttl: options.and_then(|o| o.ttl).unwrap_or(default_ttl),
        urgency: options
            .and_then(|o| o.urgency.as_deref())
            .unwrap_or(&settings.push_urgency),
        topic: options.and_then(|o| o.topic.as_deref()),
    }
}

/// `scheme://host[:port]` of an endpoint: the VAPID `aud`.
fn origin(endpoint: &str) -> String {
    match url::Url::parse(endpoint) {
        Ok(url) => url.origin().ascii_serialization(),
        Err(_) => endpoint.to_owned(),
    }
}

/// `Retry-After` in seconds (the HTTP-date form is taken as "soon").
fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    match value.parse::<u64>() {
        Ok(secs) => Some(Duration::from_secs(secs.min(MAX_BACKOFF.as_secs()))),
        Err(_) => chrono::DateTime::parse_from_rfc2822(value).ok().map(|at| {
            let secs = (at.timestamp() - chrono::Utc::now().timestamp()).max(0) as u64;
            Duration::from_secs(secs.min(MAX_BACKOFF.as_secs()))
        }),
    }
}

/// Exponential backoff with jitter (half to all of `base · 2^(attempts-1)`,
/// at most [`MAX_BACKOFF`]), never sooner than the push service's `Retry-After`.
fn retry_delay(base: Duration, attempts: u32, retry_after: Option<Duration>) -> Duration {
    let exp = base
        .saturating_mul(1u32 << attempts.saturating_sub(1).min(20))
        .min(MAX_BACKOFF);
    let jitter = f64::from(rand_core::OsRng.next_u32()) / f64::from(u32::MAX);
    let backoff = exp.mul_f64(0.5 + jitter / 2.0);
    backoff.max(retry_after.unwrap_or_default())
}

/// An error with its causes, for logs.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_exponentially_and_honour_retry_after() {
        let base = Duration::from_secs(1);
        for attempts in 1..=5 {
            let d = retry_delay(base, attempts, None);
            let full = Duration::from_secs(1 << (attempts - 1));
            assert!(d >= full / 2 && d <= full, "attempt {attempts}: {d:?}");
        }
        assert!(retry_delay(base, 40, None) <= MAX_BACKOFF);
        let d = retry_delay(base, 1, Some(Duration::from_secs(2)));
        assert!(d >= Duration::from_secs(2), "{d:?}");
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 120 "), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after("999999"), Some(MAX_BACKOFF));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn origins_keep_non_default_ports() {
        assert_eq!(
            origin("http://127.0.0.1:9000/push/1"),
            "http://127.0.0.1:9000"
        );
        assert_eq!(
            origin("https://fcm.googleapis.com:443/fcm/send/x"),
            "https://fcm.googleapis.com"
        );
    }

    #[test]
    fn notices_name_the_event_and_where_to_fetch_it() {
        let event = Event {
            topic: Topic::parse("news").unwrap(),
            seq: 12,
            event_type: "story".into(),
            data: serde_json::value::RawValue::from_string("\"secret\"".into()).unwrap(),
            time: chrono::DateTime::from_timestamp(0, 0).unwrap(),
        };
        let notice: serde_json::Value =
            serde_json::from_str(&notice_json(&event, NoticeReason::NoticeOnly)).unwrap();
        assert_eq!(
            notice,
            serde_json::json!({
                "topic": "news", "seq": 12, "type": "story",
                "time": "1970-01-01T00:00:00.000000Z", "after": "news:11",
                "notice": "notice_only"
            })
        );
    }
}
