//! One WebSocket: reading client frames, a forwarder task per subscription
//! handing batches of event frames to the bounded outgoing queue, which the
//! response body drains (see [`crate::outbox`]).

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use actix_http::ws::{CloseCode, CloseReason, ProtocolError};
use actix_web::error::PayloadError;
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use futures_util::Stream;
use rt_core::{
    Context, Topic,
    auth::Principal,
    bus::TraceHeaders,
    event::{DEFAULT_EVENT_TYPE, NewEvent, validate_event_type},
    front::Inbound,
    gate::Pass,
    hub::{Delivery, Follower, HubError},
    publish::{PublishError, Publisher},
    telemetry::current_trace_headers,
};
use tokio::{sync::mpsc, task::JoinHandle};

use crate::{
    frames::{self, ClientFrame, MAX_REF_LEN},
    outbox::{Body, Out, Outbox, outbox},
    reader::{Incoming, Reader},
};

/// Events read from the log per query while a subscription catches up.
const PAGE: u32 = 500;
/// How long the outgoing queue may stay full before the client counts as
/// too slow (it is closed and resumes with `after`).
const SEND_STALL: Duration = Duration::from_secs(5);
/// Store failures in a row a subscription rides out (with backoff) before
/// it reports `feed_unavailable`.
const STORE_RETRIES: u32 = 4;
/// How long a close frame may wait for room in the outgoing queue.
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// Most deliveries a forwarder sends as one batch (as sse-edge's chunks).
const BATCH_EVENTS: u32 = 64;
/// A batch takes no more deliveries once it holds this many bytes.
const BATCH_BYTES: usize = 16 * 1024;

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

/// What the connection task woke up for.
enum Woke {
    Closing(CloseReason, &'static str),
    Message(Result<Incoming, ProtocolError>),
    Tick,
}

struct Conn {
    ctx: Context,
    principal: Principal,
    out: Outbox,
    /// Most deliveries in one batch: never more than the queue holds.
    batch: u32,
    subs: HashMap<Topic, JoinHandle<()>>,
    bucket: Bucket,
    /// The publish loop's queue and task, started by the first publish:
    /// most sockets only subscribe.
    publishes: Option<(mpsc::Sender<Pending>, JoinHandle<()>)>,
}

/// Starts serving a socket whose handshake is answered: the returned body is
/// everything the server sends on it.
pub(crate) fn open(ctx: Context, principal: Principal, payload: Inbound, pass: Pass) -> Body {
    // Messages over --max-body-bytes are refused with close code 1009 once
    // read whole, so the close frame reaches the client; the decoder's own
    // cap is higher and only stops absurd frames (those connections are cut).
    let max = ctx.settings.max_body_bytes;
    let hard_cap = max.saturating_mul(4).max(max + 64 * 1024);
    let queue = u32::try_from(ctx.settings.ws_queue.max(16)).unwrap_or(u32::MAX);
    let (out, body) = outbox(queue);
    ctx.metrics.streams_open.with_label_values(&["ws"]).inc();
    let conn = Conn {
        batch: BATCH_EVENTS.min(queue),
        bucket: Bucket::new(ctx.settings.ws_publish_rate),
        ctx,
        principal,
        out,
        subs: HashMap::new(),
        publishes: None,
    };
    match payload {
        Inbound::Socket(read) => {
            tokio::spawn(conn.run(Reader::new(read, hard_cap, hard_cap), pass));
        }
        // actix-web's request payload is `!Send`: the socket lives on its
        // worker.
        Inbound::Payload(read) => {
            actix_web::rt::spawn(conn.run(Reader::new(read, hard_cap, hard_cap), pass));
        }
    }
    body
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
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn would hold the follower twice (see Conn::run)"
)]
fn forward(mut follower: Follower, out: Outbox, most: u32) -> impl Future<Output = ()> {
    async move {
        let mut failures = 0;
        loop {
            match follower.next().await {
                // A store that is briefly busy or away: the follower kept its
                // place, so try again a few times before giving up.
                Err(HubError::Store(e)) if failures < STORE_RETRIES => {
                    failures += 1;
                    tracing::debug!(topic = %follower.topic(), error = %e, "subscription read failed; retrying");
                    // Boxed: a rare wait, kept out of every forwarder's state.
                    let backoff = Box::pin(tokio::time::sleep(
                        Duration::from_millis(200) * 2u32.pow(failures),
                    ));
                    backoff.await;
                }
                Ok(delivery) => {
                    failures = 0;
                    let (frames, count) = batch(&mut follower, &delivery, most);
                    drop(delivery);
                    // A failed send raised the too-slow signal.
                    if out
                        .send(Out::Frames(frames, count), SEND_STALL)
                        .await
                        .is_err()
                    {
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
}

/// `first` and the deliveries already at hand behind it, up to `most` or
/// [`BATCH_BYTES`] (the one crossing it included), as consecutive text
/// frames: one queue item and one wake-up of the body for the lot, instead
/// of one per delivery.
fn batch(follower: &mut Follower, first: &Delivery, most: u32) -> (Bytes, u32) {
    let mut buf = BytesMut::new();
    frames::put_delivery(&mut buf, first);
    let mut count = 1;
    while count < most && buf.len() < BATCH_BYTES {
        let Some(next) = follower.try_next() else {
            break;
        };
        frames::put_delivery(&mut buf, &next);
        count += 1;
    }
    (buf.freeze(), count)
}

impl Conn {
    /// Serves the socket until the client leaves or the server closes it.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn holds its arguments twice (as given, and moved \
                  into its body) for the socket's whole life; an async block \
                  holds them once"
    )]
    fn run<S>(mut self, mut reader: Reader<S>, pass: Pass) -> impl Future<Output = ()>
    where
        S: Stream<Item = Result<Bytes, PayloadError>> + Unpin,
    {
        async move {
            // Boxed, like `finish`: this task's own state stays what the
            // socket needs between frames.
            let serve = Box::pin(self.serve(&mut reader));
            let close = serve.await;
            let finish = Box::pin(self.finish(close));
            finish.await;
            drop(pass);
        }
    }

    async fn finish(mut self, close: Option<(CloseReason, Option<&'static str>)>) {
        for (_, forwarder) in self.subs.drain() {
            forwarder.abort();
        }
        let publisher = self.publishes.take().map(|(_, task)| task);
        let Conn { ctx, out, .. } = self;
        // Publishes already sent are committed even if the socket is gone
        // (the client learns their seqs from the log if it missed the acks).
        if let Some(publisher) = publisher {
            let _ = tokio::time::timeout(CLOSE_WAIT, publisher).await;
        }
        let metrics = &ctx.metrics;
        if let Some((reason, label)) = close {
            if let Some(label) = label {
                metrics
                    .streams_closed
                    .with_label_values(&["ws", label])
                    .inc();
            }
            // After whatever is already queued; the body ends once it is
            // written.
            let _ = out.send(Out::Close(reason), CLOSE_WAIT).await;
        }
        metrics.streams_open.with_label_values(&["ws"]).dec();
    }

    /// The close to send (with the metric label of a server-side close), or
    /// `None` when the client went away without one.
    async fn serve<S>(
        &mut self,
        reader: &mut Reader<S>,
    ) -> Option<(CloseReason, Option<&'static str>)>
    where
        S: Stream<Item = Result<Bytes, PayloadError>> + Unpin,
    {
        let settings = self.ctx.settings.clone();
        let every = settings.ws_ping_interval.max(Duration::from_millis(100));
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_seen = Instant::now();
        let shutdown = self.ctx.shutdown.clone();
        loop {
            // The waits are polled here, the work each one wakes for is boxed
            // (subscribing, publishing and queueing take far more state than
            // waiting, and a task is as large as its largest state, idle
            // sockets included).
            let woke = tokio::select! {
                biased;
                () = shutdown.started() => Woke::Closing(
                    reason(CloseCode::Away, "server shutting down: reconnect and subscribe with after"),
                    "shutdown",
                ),
                () = self.principal.expiry() => Woke::Closing(
                    reason(CloseCode::Policy, "token expired: reconnect with a fresh token and subscribe with after"),
                    "token_expired",
                ),
                () = self.out.too_slow() => Woke::Closing(
                    reason(CloseCode::Policy, "too slow: frames piled up; reconnect and subscribe with after"),
                    "too_slow",
                ),
                msg = reader.recv() => Woke::Message(msg?),
                _ = ping.tick() => Woke::Tick,
            };
            match woke {
                Woke::Closing(reason, label) => return Some((reason, Some(label))),
                Woke::Message(msg) => {
                    last_seen = Instant::now();
                    let handled = Box::pin(self.on_message(msg));
                    if let Some(close) = handled.await {
                        return Some(close);
                    }
                }
                Woke::Tick => {
                    if last_seen.elapsed() >= settings.ws_idle_timeout {
                        return Some((
                            reason(
                                CloseCode::Away,
                                "idle timeout: nothing received, not even a pong",
                            ),
                            Some("idle"),
                        ));
                    }
                    let queued = Box::pin(self.queue(Out::Ping));
                    queued.await;
                }
            }
        }
    }

    /// Answers one client message; the close to send when it ends the socket.
    async fn on_message(
        &mut self,
        msg: Result<Incoming, ProtocolError>,
    ) -> Option<(CloseReason, Option<&'static str>)> {
        let max = self.ctx.settings.max_body_bytes;
        let size = match &msg {
            Ok(Incoming::Text(t)) => t.len(),
            Ok(Incoming::Binary(len)) => *len,
            _ => 0,
        };
        if size > max {
            return Some((too_big(max), Some("too_big")));
        }
        match msg {
            Ok(Incoming::Text(text)) => self.on_text(&text).await,
            Ok(Incoming::Binary(_)) => {
                self.send(frames::error(
                    None,
                    "binary_unsupported",
                    "this protocol uses JSON text frames; binary frames are not accepted",
                ))
                .await;
            }
            Ok(Incoming::Ping(payload)) => self.queue(Out::Pong(payload)).await,
            Ok(Incoming::Pong) => {}
            Ok(Incoming::Close(theirs)) => {
                return Some((theirs.unwrap_or_else(|| CloseCode::Normal.into()), None));
            }
            Err(ProtocolError::Overflow) => return Some((too_big(max), Some("too_big"))),
            Err(e) => {
                return Some((reason(CloseCode::Protocol, e.to_string()), Some("protocol")));
            }
        }
        None
    }

    /// Queues a frame, waiting while the queue is full; a client that lets
    /// it stay full for [`SEND_STALL`] is too slow.
    async fn queue(&self, out: Out) {
        // A failed send raised the too-slow signal, which `serve` watches.
        let _ = self.out.send(out, SEND_STALL).await;
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
        let forwarder = tokio::spawn(forward(follower, self.out.clone(), self.batch));
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
        let publishes = match &self.publishes {
            Some((publishes, _)) => publishes,
            None => {
                let (publishes, rx) = mpsc::channel(PUBLISH_BATCH * 10);
                let task = tokio::spawn(publish_loop(
                    self.ctx.publisher.clone(),
                    rx,
                    self.out.clone(),
                ));
                &self.publishes.insert((publishes, task)).0
            }
        };
        if let Err(mpsc::error::TrySendError::Full(p)) = publishes.try_send(pending) {
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
async fn publish_loop(publisher: Publisher, mut rx: mpsc::Receiver<Pending>, out: Outbox) {
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
            if out.send(Out::Text(frame), SEND_STALL).await.is_err() {
                return;
            }
        }
    }
}
