//! The sse-edge service: events as Server-Sent Events, which a browser's
//! `EventSource` consumes as is.
//!
//! `GET /v1/sse?topic=a&topic=b` answers `text/event-stream`:
//!
//! ```text
//! retry: 2000
//!
//! id: a:13,b:40
//! event: message
//! data: {"topic":"a","seq":13,"type":"message","data":...,"time":"..."}
//!
//! : heartbeat
//! ```
//!
//! Each `id:` is the connection's full position (every topic of the stream),
//! so a reconnect with `Last-Event-ID` (or `lastEventId=` in the query)
//! resumes exactly: the log after it first, then live, with no gap and no
//! duplicate. A first connect may give `after=N` (one topic) or
//! `after=a:12,b:40`. A position older than retention gets an `event: reset`
//! with `{"topic","from"}`, then the stream goes on after `from`.
//!
//! A client that falls more than the hub's queue behind is sent a closing
//! comment and disconnected; it resumes from the log when it reconnects. On
//! shutdown every stream ends with a comment and a short `retry:`, so
//! browsers reconnect (to another replica) at once.

use std::{sync::Arc, time::Duration};

use actix_web::{HttpRequest, HttpResponse, dev::RequestHead, http::header, web};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{StreamExt as _, future::LocalBoxFuture, stream};
use rt_core::{
    ApiError, Context, Position, Topic,
    auth::Principal,
    event::parse_seq,
    front::{self, Accepted, SendBody, StreamRoute},
    gate::Pass,
    hub::{Delivery, Follower, Framing, HubError, SharedEvent},
    metrics::Metrics,
    query,
    server::Routes,
    shutdown::Shutdown,
};
use serde::Serialize;

/// Most events sent in one chunk of the stream.
const CHUNK_EVENTS: usize = 64;
/// Most bytes gathered into one chunk before it is sent.
const CHUNK_BYTES: usize = 16 * 1024;
/// Events read from the log per query while a stream catches up.
const PAGE: u32 = 500;
/// The `retry:` sent with the closing comment on shutdown: reconnect soon.
const SHUTDOWN_RETRY_MS: u64 = 250;

/// What this service serves: `GET /v1/sse`, on the socket itself when a
/// connection opens with it (see [`rt_core::front`]).
pub fn routes() -> Routes {
    Routes::new().service(configure).stream(StreamRoute {
        path: "/v1/sse",
        admit,
    })
}

/// Mounts `GET /v1/sse` in actix-web.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/v1/sse").route(web::get().to(open_stream)));
}

fn admit<'a>(
    ctx: &'a Context,
    head: &'a RequestHead,
) -> LocalBoxFuture<'a, Result<Accepted, ApiError>> {
    Box::pin(async move {
        let (response, body) = open(ctx, head).await?;
        Ok(Accepted::Stream(response, body))
    })
}

async fn open_stream(ctx: web::Data<Context>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let (response, body) = open(&ctx, req.head()).await?;
    Ok(front::actix_response(response, body))
}

/// `GET /v1/sse?topic=a&topic=b[&after=...]`, resuming from `Last-Event-ID`:
/// the response head, and its body.
async fn open(ctx: &Context, head: &RequestHead) -> Result<(HttpResponse<()>, SendBody), ApiError> {
    let principal = ctx.auth.authenticate(head)?;
    let query = query::pairs(head)?;
    let topics = query::topics(&query, ctx.settings.max_topics)?;
    let start = resume_position(head, &query, &topics)?;
    principal.require_subscribe_all(&topics)?;
    let pass = ctx.sse_gate.enter()?;
    let mut followers = Vec::with_capacity(topics.len());
    for topic in &topics {
        let after = start.get(topic);
        followers.push(
            Follower::start(&ctx.hub, topic, after, PAGE)
                .await?
                .fail_on_lag(),
        );
    }
    let conn = Conn::new(ctx, followers, start, pass, principal);
    let response = HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .finish()
        .drop_body();
    Ok((response, conn.into_stream().boxed()))
}

/// Where a stream starts: `Last-Event-ID`, else `lastEventId=`, else
/// `after=` (a seq for one topic, or a position), else the beginning.
fn resume_position(
    req: &RequestHead,
    query: &[(String, String)],
    topics: &[Topic],
) -> Result<Position, ApiError> {
    let header = match req.headers().get("Last-Event-ID") {
        Some(v) => Some(v.to_str().map_err(|_| {
            ApiError::bad_request("invalid_last_event_id", "Last-Event-ID is not ASCII text")
        })?),
        None => None,
    };
    if let Some(id) = header.filter(|id| !id.is_empty()) {
        return query::parse_position(id, topics, "invalid_last_event_id");
    }
    if let Some(id) = query::single(query, "lastEventId")?.filter(|id| !id.is_empty()) {
        return query::parse_position(&id, topics, "invalid_last_event_id");
    }
    match query::single(query, "after")? {
        None => Ok(Position::default()),
        Some(v) => match (topics, parse_seq(&v)) {
            ([topic], Some(seq)) => Ok([(topic.clone(), seq)].into_iter().collect()),
            _ => query::parse_position(&v, topics, "invalid_position"),
        },
    }
}

/// Why the server ends a stream.
#[derive(Debug, Clone, Copy)]
enum Closing {
    Shutdown,
    TooSlow,
    Unavailable,
    TokenExpired,
}

impl Closing {
    fn reason(self) -> &'static str {
        match self {
            Closing::Shutdown => "shutdown",
            Closing::TooSlow => "too_slow",
            Closing::Unavailable => "unavailable",
            Closing::TokenExpired => "token_expired",
        }
    }

    /// The last bytes of the stream: a comment saying why, and for a
    /// shutdown a short retry so browsers reconnect elsewhere at once.
    fn farewell(self) -> Bytes {
        Bytes::from(match self {
            Closing::Shutdown => format!(
                ": closing: the server is shutting down; reconnect with Last-Event-ID\nretry: {SHUTDOWN_RETRY_MS}\n\n"
            ),
            Closing::TooSlow => ": closing: too slow: the client fell too far behind; reconnect with Last-Event-ID to resume from the log\n\n".to_owned(),
            Closing::Unavailable => ": closing: the event log is unavailable; reconnect with Last-Event-ID later\n\n".to_owned(),
            Closing::TokenExpired => ": closing: the token expired; reconnect with a fresh token and Last-Event-ID\n\n".to_owned(),
        })
    }
}

impl From<HubError> for Closing {
    fn from(e: HubError) -> Self {
        match e {
            HubError::Lagged(_) => Closing::TooSlow,
            other => {
                tracing::warn!(error = %other, "closing an SSE stream");
                Closing::Unavailable
            }
        }
    }
}

enum Phase {
    Opening,
    Open,
    Done,
}

/// What woke a waiting stream.
enum Woke {
    Delivery(Result<Delivery, HubError>),
    Heartbeat,
    Shutdown,
    TokenExpired,
}

/// One SSE connection: its followers, position and timers.
struct Conn {
    followers: Vec<Follower>,
    position: Position,
    /// Fires at `quiet_until` at the earliest; moved there lazily, when it
    /// fires early, rather than reset on every chunk (a timer reset per
    /// event per stream is measurable at thousands of streams). Made at the
    /// stream's first wait, on the runtime that serves it: a timer belongs
    /// to the runtime it was made on, and a stream the connection front
    /// serves is admitted on an HTTP worker whose runtime stops first at
    /// shutdown (its timers then panic instead of firing).
    heartbeat: Option<tokio::time::Interval>,
    /// The heartbeat's period.
    every: Duration,
    /// No heartbeat is due before this: the last chunk plus the interval.
    quiet_until: tokio::time::Instant,
    shutdown: Shutdown,
    metrics: Arc<Metrics>,
    retry: Duration,
    phase: Phase,
    principal: Principal,
    _pass: Pass,
}

impl Conn {
    fn new(
        ctx: &Context,
        followers: Vec<Follower>,
        start: Position,
        pass: Pass,
        principal: Principal,
    ) -> Conn {
        // Every topic appears in the id, at 0 when the client had no position.
        let position = followers
            .iter()
            .map(|f| (f.topic().clone(), start.get(f.topic())))
            .collect();
        let every = ctx.settings.sse_heartbeat.max(Duration::from_millis(100));
        let quiet_until = tokio::time::Instant::now() + every;
        ctx.metrics.streams_open.with_label_values(&["sse"]).inc();
        Conn {
            followers,
            position,
            heartbeat: None,
            every,
            quiet_until,
            shutdown: ctx.shutdown.clone(),
            metrics: ctx.metrics.clone(),
            retry: ctx.settings.sse_retry,
            phase: Phase::Opening,
            principal,
            _pass: pass,
        }
    }

    fn into_stream(self) -> impl futures_util::Stream<Item = Bytes> + Send {
        stream::unfold(self, |mut conn| async move {
            let chunk = match conn.phase {
                Phase::Done => return None,
                Phase::Opening => {
                    conn.phase = Phase::Open;
                    Bytes::from(format!("retry: {}\n\n", conn.retry.as_millis()))
                }
                Phase::Open => match conn.next_chunk().await {
                    Ok(chunk) => chunk,
                    Err(closing) => {
                        conn.phase = Phase::Done;
                        conn.metrics
                            .streams_closed
                            .with_label_values(&["sse", closing.reason()])
                            .inc();
                        closing.farewell()
                    }
                },
            };
            Some((chunk, conn))
        })
    }

    /// The next bytes to send: the events at hand (log first, then live), or
    /// a heartbeat when nothing came within the interval.
    async fn next_chunk(&mut self) -> Result<Bytes, Closing> {
        let mut buf = BytesMut::new();
        let mut events = 0;
        loop {
            if self.shutdown.is_started() {
                return Err(Closing::Shutdown);
            }
            if self
                .principal
                .expires_at
                .is_some_and(|at| at <= std::time::SystemTime::now())
            {
                return Err(Closing::TokenExpired);
            }
            // Topics take turns, so one busy topic cannot starve the others.
            let mut progressed = true;
            while progressed && events < CHUNK_EVENTS && buf.len() < CHUNK_BYTES {
                progressed = false;
                for i in 0..self.followers.len() {
                    if let Some(d) = self.followers[i].try_next() {
                        self.frame(d, &mut buf);
                        events += 1;
                        progressed = true;
                    }
                }
            }
            if !buf.is_empty() {
                self.quiet_until = tokio::time::Instant::now() + self.every;
                return Ok(buf.freeze());
            }
            let mut read = false;
            for f in self.followers.iter_mut().filter(|f| !f.is_caught_up()) {
                f.catch_up().await?;
                read = true;
            }
            if read {
                continue;
            }
            let woke = {
                // One topic (the usual case) is waited on without the
                // allocations of waiting on several.
                let delivery = async {
                    match &mut self.followers[..] {
                        [one] => one.next().await,
                        many => {
                            let waits = many.iter_mut().map(|f| Box::pin(f.next()));
                            futures_util::future::select_all(waits).await.0
                        }
                    }
                };
                let (every, quiet_until) = (self.every, self.quiet_until);
                let heartbeat = self.heartbeat.get_or_insert_with(|| {
                    let mut timer = tokio::time::interval_at(quiet_until, every);
                    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    timer
                });
                tokio::select! {
                    first = delivery => Woke::Delivery(first),
                    _ = heartbeat.tick() => Woke::Heartbeat,
                    () = self.shutdown.started() => Woke::Shutdown,
                    () = self.principal.expiry() => Woke::TokenExpired,
                }
            };
            match woke {
                Woke::Delivery(d) => {
                    self.frame(d?, &mut buf);
                    events += 1;
                }
                Woke::Heartbeat => {
                    let now = tokio::time::Instant::now();
                    if now < self.quiet_until {
                        if let Some(heartbeat) = &mut self.heartbeat {
                            heartbeat.reset_at(self.quiet_until);
                        }
                        continue;
                    }
                    self.quiet_until = now + self.every;
                    return Ok(Bytes::from_static(b": heartbeat\n\n"));
                }
                Woke::Shutdown => return Err(Closing::Shutdown),
                Woke::TokenExpired => return Err(Closing::TokenExpired),
            }
        }
    }

    /// Appends one delivery as an SSE event whose id is the position after it.
    fn frame(&mut self, delivery: Delivery, buf: &mut BytesMut) {
        match delivery {
            Delivery::Event(event) => {
                self.position.set(&event.event.topic, event.seq());
                let frame = event.framed(Framing::Sse, sse_frame);
                if self.followers.len() == 1 {
                    // The id is the one topic's seq: the frame as built once
                    // for every stream of the topic.
                    buf.put_slice(frame);
                } else {
                    let fields = fields_of(frame);
                    // Room for the id line too: one allocation, not a few growths.
                    buf.reserve(fields.len() + 64);
                    put_id(buf, &self.position);
                    buf.put_slice(fields);
                }
            }
            Delivery::Reset { topic, from } => {
                self.position.set(&topic, from);
                put_id(buf, &self.position);
                #[derive(Serialize)]
                struct Reset<'a> {
                    topic: &'a Topic,
                    from: u64,
                }
                // unwrap: a name and a number always serialize
                let data = serde_json::to_string(&Reset {
                    topic: &topic,
                    from,
                })
                .expect("reset serializes");
                buf.put_slice(b"event: reset\ndata: ");
                buf.put_slice(data.as_bytes());
                buf.put_slice(b"\n\n");
            }
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.metrics.streams_open.with_label_values(&["sse"]).dec();
    }
}

fn put_id(buf: &mut BytesMut, position: &Position) {
    use std::fmt::Write as _;
    buf.put_slice(b"id: ");
    // unwrap: writing into a BytesMut cannot fail
    write!(buf, "{position}").expect("BytesMut grows");
    buf.put_u8(b'\n');
}

/// An event as a stream of its topic alone sends it, built once per event
/// and shared by every stream: the `id:` line (`topic:seq`), then the
/// `event:` and `data:` lines. The event JSON is one line unless the
/// publisher's data held line breaks; each line then gets its own `data:`
/// field, which EventSource joins back with `\n`.
fn sse_frame(event: &SharedEvent) -> Bytes {
    use std::fmt::Write as _;
    let topic = event.event.topic.as_str();
    let mut buf =
        BytesMut::with_capacity(event.json.len() + event.event.event_type.len() + topic.len() + 48);
    // unwrap: writing into a BytesMut cannot fail
    writeln!(buf, "id: {topic}:{}", event.seq()).expect("BytesMut grows");
    buf.put_slice(b"event: ");
    buf.put_slice(event.event.event_type.as_bytes());
    buf.put_u8(b'\n');
    // SSE ends a line at CRLF, LF or a lone CR.
    let json = &event.json[..];
    let mut start = 0;
    let mut i = 0;
    while i <= json.len() {
        let end_here = i == json.len() || json[i] == b'\n' || json[i] == b'\r';
        if end_here {
            buf.put_slice(b"data: ");
            buf.put_slice(&json[start..i]);
            buf.put_u8(b'\n');
            if i + 1 < json.len() && json[i] == b'\r' && json[i + 1] == b'\n' {
                i += 1;
            }
            start = i + 1;
        }
        i += 1;
    }
    buf.put_u8(b'\n');
    buf.freeze()
}

/// The `event:` and `data:` lines of a frame built by [`sse_frame`]: what
/// follows its `id:` line (a topic name holds no line break).
fn fields_of(frame: &[u8]) -> &[u8] {
    let id_line = frame.iter().position(|&b| b == b'\n').map_or(0, |i| i + 1);
    &frame[id_line..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use rt_core::Event;
    use serde_json::value::RawValue;

    fn shared(data: &str) -> Arc<SharedEvent> {
        SharedEvent::new(Event {
            topic: Topic::parse("t").unwrap(),
            seq: 3,
            event_type: "note".into(),
            data: RawValue::from_string(data.into()).unwrap(),
            time: chrono::DateTime::from_timestamp(0, 0).unwrap(),
        })
    }

    #[test]
    fn an_event_is_its_id_and_one_data_line() {
        let e = shared(r#"{"a":1}"#);
        let json = String::from_utf8_lossy(&e.json);
        assert_eq!(
            sse_frame(&e),
            Bytes::from(format!("id: t:3\nevent: note\ndata: {json}\n\n"))
        );
        assert_eq!(
            fields_of(&sse_frame(&e)),
            format!("event: note\ndata: {json}\n\n").as_bytes()
        );
    }

    #[test]
    fn the_shared_id_line_is_the_position_of_its_topic_alone() {
        let e = shared("1");
        let mut position = Position::default();
        position.set(&e.event.topic, 2);
        position.set(&e.event.topic, e.seq());
        let mut id = BytesMut::new();
        put_id(&mut id, &position);
        let frame = sse_frame(&e);
        assert_eq!(&frame[..frame.len() - fields_of(&frame).len()], &id[..]);
    }

    #[test]
    fn line_breaks_in_data_become_several_data_lines() {
        let e = shared("{\r\n\"a\":\r1\n}");
        let text = String::from_utf8(fields_of(&sse_frame(&e)).to_vec()).unwrap();
        assert!(!text.contains('\r'), "{text:?}");
        let data: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect();
        assert_eq!(data.len(), 4, "{text:?}");
        let joined = data.join("\n");
        let parsed: serde_json::Value = serde_json::from_str(&joined).unwrap();
        assert_eq!(parsed["data"]["a"], 1);
    }
}
