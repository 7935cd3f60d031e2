//! One WebSocket: reading client frames, a forwarder task per subscription,
//! and a writer draining the bounded outgoing queue.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use actix_ws::{AggregatedMessage, AggregatedMessageStream, CloseCode, CloseReason, Session};
use bytestring::ByteString;
use rt_core::{
    Context, Topic,
    auth::Principal,
    bus::TraceHeaders,
    event::{DEFAULT_EVENT_TYPE, NewEvent, validate_event_type},
    gate::Pass,
    hub::{Follower, HubError},
    publish::{PublishError, Publisher},
    telemetry::current_trace_headers,
};
use tokio::{
    sync::{Notify, mpsc},
    task::JoinHandle,
};

use crate::frames::{self, ClientFrame, MAX_REF_LEN};

/// Events read from the log per query while a subscription catches up.
const PAGE: u32 = 500;
/// How long the outgoing queue may stay full before the client counts as
/// too slow (it is closed and resumes with `after`).
const SEND_STALL: Duration = Duration::from_secs(5);
/// Store failures in a row a subscription rides out (with backoff) before
/// it reports `feed_unavailable`.
const STORE_RETRIES: u32 = 4;
/// How long a close frame may take to reach a client that is not reading.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// What the writer sends.
enum Out {
    Text(ByteString),
    Pong(bytes::Bytes),
    Ping,
}

/// Publishes a socket may make: `rate` per second, bursts up to `rate`.
struct Bucket {
    tokens: f64,
    rate: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u32) -> Bucket {
        let rate = f64::from(rate.max(1));
        Bucket {
            tokens: rate,
            rate,
            last: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

struct Conn {
    ctx: Context,
    principal: Principal,
    out: mpsc::Sender<Out>,
    /// Set when the outgoing queue overflowed or a subscription lagged.
    too_slow: Arc<Notify>,
    subs: HashMap<Topic, JoinHandle<()>>,
    bucket: Bucket,
    publishes: mpsc::Sender<Pending>,
}

/// Serves one socket until the client leaves or the server closes it.
pub(crate) async fn run(
    ctx: Context,
    principal: Principal,
    session: Session,
    mut stream: AggregatedMessageStream,
    pass: Pass,
) {
    let metrics = ctx.metrics.clone();
    metrics.streams_open.with_label_values(&["ws"]).inc();
    let (out, rx) = mpsc::channel(ctx.settings.ws_queue.max(16));
    let writer = actix_web::rt::spawn(write_loop(session.clone(), rx));
    let rate = ctx.settings.ws_publish_rate;
    let too_slow = Arc::new(Notify::new());
    let (publishes, publish_rx) = mpsc::channel(PUBLISH_BATCH * 10);
    let publisher = tokio::spawn(publish_loop(
        ctx.publisher.clone(),
        publish_rx,
        out.clone(),
        too_slow.clone(),
    ));
    let mut conn = Conn {
        ctx,
        principal,
        out,
        too_slow,
        subs: HashMap::new(),
        bucket: Bucket::new(rate),
        publishes,
    };
    let close = conn.serve(&mut stream).await;
    for (_, forwarder) in conn.subs.drain() {
        forwarder.abort();
    }
    // Publishes already sent are committed even if the socket is gone (the
    // client learns their seqs from the log if it missed the acks).
    drop(conn);
    let _ = tokio::time::timeout(CLOSE_WAIT, publisher).await;
    writer.abort();
    if let Some((reason, label)) = close {
        if let Some(label) = label {
            metrics
                .streams_closed
                .with_label_values(&["ws", label])
                .inc();
        }
        let _ = tokio::time::timeout(CLOSE_WAIT, session.close(Some(reason))).await;
    }
    metrics.streams_open.with_label_values(&["ws"]).dec();
    drop(pass);
}

/// Writes queued frames until the queue closes or the socket does.
async fn write_loop(mut session: Session, mut rx: mpsc::Receiver<Out>) {
    while let Some(out) = rx.recv().await {
        let sent = match out {
            Out::Text(text) => session.text(text).await,
            Out::Pong(payload) => session.pong(&payload).await,
            Out::Ping => session.ping(b"").await,
        };
        if sent.is_err() {
            return;
        }
    }
}

fn reason(code: CloseCode, description: impl Into<String>) -> CloseReason {
    CloseReason {
        code,
        description: Some(description.into()),
    }
}

fn too_big(limit: usize) -> CloseReason {
    reason(
        CloseCode::Size,
        format!("message larger than {limit} bytes"),
    )
}

/// Hands a subscription's deliveries to the outgoing queue, waiting while it
/// is full (a catch-up from the log comes in bursts); a queue that stays full
/// for [`SEND_STALL`] means the client is too slow.
async fn forward(mut follower: Follower, out: mpsc::Sender<Out>, too_slow: Arc<Notify>) {
    let mut failures = 0;
    loop {
        match follower.next().await {
            // A store that is briefly busy or away: the follower kept its
            // place, so try again a few times before giving up.
            Err(HubError::Store(e)) if failures < STORE_RETRIES => {
                failures += 1;
                tracing::debug!(topic = %follower.topic(), error = %e, "subscription read failed; retrying");
                tokio::time::sleep(Duration::from_millis(200) * 2u32.pow(failures)).await;
            }
            Ok(delivery) => {
                failures = 0;
                if out
                    .send_timeout(Out::Text(frames::delivery(&delivery)), SEND_STALL)
                    .await
                    .is_err()
                {
                    too_slow.notify_one();
                    return;
                }
            }
            Err(e) => {
                let message = format!(
                    "the live feed of {} stopped ({e}); subscribe again with after",
                    follower.topic()
                );
                let frame = frames::feed_stopped(follower.topic(), &message);
                let _ = out.try_send(Out::Text(frame));
                return;
            }
        }
    }
}

impl Conn {
    /// The close to send (with the metric label of a server-side close), or
    /// `None` when the client went away without one.
    async fn serve(
        &mut self,
        stream: &mut AggregatedMessageStream,
    ) -> Option<(CloseReason, Option<&'static str>)> {
        let settings = self.ctx.settings.clone();
        let every = settings.ws_ping_interval.max(Duration::from_millis(100));
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_seen = Instant::now();
        let shutdown = self.ctx.shutdown.clone();
        let too_slow = self.too_slow.clone();
        loop {
            tokio::select! {
                biased;
                () = shutdown.started() => {
                    return Some((
                        reason(CloseCode::Away, "server shutting down: reconnect and subscribe with after"),
                        Some("shutdown"),
                    ));
                }
                () = self.principal.expiry() => {
                    return Some((
                        reason(CloseCode::Policy, "token expired: reconnect with a fresh token and subscribe with after"),
                        Some("token_expired"),
                    ));
                }
                () = too_slow.notified() => {
                    return Some((
                        reason(CloseCode::Policy, "too slow: frames piled up; reconnect and subscribe with after"),
                        Some("too_slow"),
                    ));
                }
                msg = stream.recv() => {
                    let msg = msg?;
                    last_seen = Instant::now();
                    let size = match &msg {
                        Ok(AggregatedMessage::Text(t)) => t.len(),
                        Ok(AggregatedMessage::Binary(b)) => b.len(),
                        _ => 0,
                    };
                    if size > settings.max_body_bytes {
                        return Some((too_big(settings.max_body_bytes), Some("too_big")));
                    }
                    match msg {
                        Ok(AggregatedMessage::Text(text)) => self.on_text(&text).await,
                        Ok(AggregatedMessage::Binary(_)) => self.send(frames::error(
                            None,
                            "binary_unsupported",
                            "this protocol uses JSON text frames; binary frames are not accepted",
                        )).await,
                        Ok(AggregatedMessage::Ping(payload)) => self.queue(Out::Pong(payload)).await,
                        Ok(AggregatedMessage::Pong(_)) => {}
                        Ok(AggregatedMessage::Close(theirs)) => {
                            return Some((theirs.unwrap_or_else(|| CloseCode::Normal.into()), None));
                        }
                        Err(actix_ws::ProtocolError::Overflow) => {
                            return Some((too_big(settings.max_body_bytes), Some("too_big")));
                        }
                        Err(e) => {
                            return Some((reason(CloseCode::Protocol, e.to_string()), Some("protocol")));
                        }
                    }
                }
                _ = ping.tick() => {
                    if last_seen.elapsed() >= settings.ws_idle_timeout {
                        return Some((
                            reason(CloseCode::Away, "idle timeout: nothing received, not even a pong"),
                            Some("idle"),
                        ));
                    }
                    self.queue(Out::Ping).await;
                }
            }
        }
    }

    /// Queues a frame, waiting while the queue is full; a client that lets
    /// it stay full for [`SEND_STALL`] is too slow.
    async fn queue(&self, out: Out) {
        if self.out.send_timeout(out, SEND_STALL).await.is_err() {
            self.too_slow.notify_one();
        }
    }

    async fn send(&self, text: ByteString) {
        self.queue(Out::Text(text)).await;
    }

    async fn error(&self, reference: Option<&str>, code: &str, message: &str) {
        self.send(frames::error(reference, code, message)).await;
    }

    async fn on_text(&mut self, text: &str) {
        let frame: ClientFrame = match serde_json::from_str(text) {
            Ok(frame) => frame,
            Err(e) => {
                let code = if serde_json::from_str::<serde::de::IgnoredAny>(text).is_err() {
                    "invalid_json"
                } else {
                    "invalid_frame"
                };
                return self
                    .error(frames::salvage_ref(text).as_deref(), code, &e.to_string())
                    .await;
            }
        };
        let reference = frame.reference.clone();
        let r = reference.as_deref();
        if r.is_some_and(|r| r.len() > MAX_REF_LEN) {
            return self
                .error(
                    None,
                    "invalid_ref",
                    &format!("ref must be at most {MAX_REF_LEN} bytes"),
                )
                .await;
        }
        match frame.op.as_deref() {
            None => {
                self.error(
                    r,
                    "missing_op",
                    "every frame needs an op: subscribe, unsubscribe, publish or ping",
                )
                .await
            }
            Some("subscribe") => self.subscribe(frame, r).await,
            Some("unsubscribe") => self.unsubscribe(frame, r).await,
            Some("publish") => self.publish(frame, r).await,
            Some("ping") => self.send(frames::pong(r)).await,
            Some(other) => {
                self.error(
                    r,
                    "unknown_op",
                    &format!("unknown op {other:?}; use subscribe, unsubscribe, publish or ping"),
                )
                .await
            }
        }
    }

    async fn topic(&self, frame: &ClientFrame, r: Option<&str>, op: &str) -> Option<Topic> {
        let Some(name) = frame.topic.as_deref() else {
            self.error(r, "missing_field", &format!("{op} needs a topic"))
                .await;
            return None;
        };
        match Topic::parse(name) {
            Ok(topic) => Some(topic),
            Err(e) => {
                self.error(r, "invalid_topic", &e.to_string()).await;
                None
            }
        }
    }

    async fn subscribe(&mut self, frame: ClientFrame, r: Option<&str>) {
        let Some(topic) = self.topic(&frame, r, "subscribe").await else {
            return;
        };
        if !self.principal.can_subscribe(&topic) {
            return self
                .error(
                    r,
                    "forbidden",
                    &format!("this token may not subscribe to {topic}"),
                )
                .await;
        }
        let max = self.ctx.settings.max_topics;
        if !self.subs.contains_key(&topic) && self.subs.len() >= max {
            return self
                .error(
                    r,
                    "too_many_subscriptions",
                    &format!("a socket may hold at most {max} subscriptions"),
                )
                .await;
        }
        // Subscribing again replaces the subscription (a resume from a new `after`).
        if let Some(old) = self.subs.remove(&topic) {
            old.abort();
        }
        let started = match frame.after {
            Some(after) => Follower::start(&self.ctx.hub, &topic, after, PAGE).await,
            None => Follower::start_live(&self.ctx.hub, &topic, PAGE).await,
        };
        let follower = match started {
            // A subscription that falls behind the hub's ring catches up
            // from the log (cache, else store) instead of being cut: bursts
            // longer than the ring are normal. A client that cannot keep up
            // at all is found by the outgoing queue's stall rule.
            Ok(f) => f,
            Err(e) => {
                return self
                    .error(
                        r,
                        "feed_unavailable",
                        &format!("cannot subscribe to {topic} now ({e}); retry later"),
                    )
                    .await;
            }
        };
        if let Some(r) = r {
            self.send(frames::subscription_ack(r, &topic, follower.position()))
                .await;
        }
        let forwarder = tokio::spawn(forward(follower, self.out.clone(), self.too_slow.clone()));
        self.subs.insert(topic, forwarder);
    }

    async fn unsubscribe(&mut self, frame: ClientFrame, r: Option<&str>) {
        let Some(topic) = self.topic(&frame, r, "unsubscribe").await else {
            return;
        };
        match self.subs.remove(&topic) {
            Some(forwarder) => {
                forwarder.abort();
                if let Some(r) = r {
                    self.send(frames::subscription_ack(r, &topic, 0)).await;
                }
            }
            None => {
                self.error(
                    r,
                    "not_subscribed",
                    &format!("this socket has no subscription to {topic}"),
                )
                .await
            }
        }
    }

    async fn publish(&mut self, frame: ClientFrame, r: Option<&str>) {
        let Some(topic) = self.topic(&frame, r, "publish").await else {
            return;
        };
        let Some(data) = frame.data else {
            return self
                .error(r, "missing_field", "publish needs data (any JSON)")
                .await;
        };
        let event_type = frame
            .event_type
            .unwrap_or_else(|| DEFAULT_EVENT_TYPE.to_owned());
        if let Err(message) = validate_event_type(&event_type) {
            return self.error(r, "invalid_type", &message).await;
        }
        if !self.principal.can_publish(&topic) {
            return self
                .error(
                    r,
                    "forbidden",
                    &format!("this token may not publish to {topic}"),
                )
                .await;
        }
        if !self.bucket.take() {
            return self
                .error(
                    r,
                    "rate_limited",
                    &format!(
                        "at most {} publishes per second on one socket; slow down",
                        self.ctx.settings.ws_publish_rate
                    ),
                )
                .await;
        }
        let event = NewEvent {
            topic,
            event_type,
            data,
            idempotency_key: None,
            push: None,
        };
        let trace = {
            let span = tracing::info_span!("ws.publish", topic = %event.topic);
            let _entered = span.enter();
            current_trace_headers()
        };
        let pending = Pending {
            event,
            trace,
            reference: r.map(str::to_owned),
        };
        if let Err(mpsc::error::TrySendError::Full(p)) = self.publishes.try_send(pending) {
            self.error(
                p.reference.as_deref(),
                "busy",
                "too many publishes waiting for their commit on this socket; retry",
            )
            .await;
        }
    }
}

/// A publish waiting for its commit.
struct Pending {
    event: NewEvent,
    trace: TraceHeaders,
    reference: Option<String>,
}

/// Most publishes of one socket committed together.
const PUBLISH_BATCH: usize = 100;

/// Commits a socket's publishes in the order they were sent (everything
/// waiting goes in one batch, whose seqs follow input order), then acks them.
async fn publish_loop(
    publisher: Publisher,
    mut rx: mpsc::Receiver<Pending>,
    out: mpsc::Sender<Out>,
    too_slow: Arc<Notify>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < PUBLISH_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let trace = batch[0].trace.clone();
        let events = batch.iter().map(|p| p.event.clone()).collect();
        let result = publisher.publish(events, trace).await;
        for (i, p) in batch.iter().enumerate() {
            let r = p.reference.as_deref();
            let frame = match &result {
                Ok(published) => frames::publish_ack(r, &p.event.topic, published[i].seq),
                Err(PublishError::Store(_)) => frames::error(
                    r,
                    "store_unavailable",
                    "the event log is unavailable, so the publish was not acknowledged; retry later",
                ),
                Err(PublishError::Closed) => frames::error(
                    r,
                    "shutting_down",
                    "the service is shutting down; publish again on another connection",
                ),
            };
            if out
                .send_timeout(Out::Text(frame), SEND_STALL)
                .await
                .is_err()
            {
                too_slow.notify_one();
                return;
            }
        }
    }
}
