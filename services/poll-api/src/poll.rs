//! Polling: query parsing, collecting events from followers, and the answer.

use std::{
    hash::{Hash, Hasher},
    sync::Arc,
    time::{Duration, Instant},
};

use actix_web::{
    HttpRequest, HttpResponse,
    dev::RequestHead,
    http::header::{self, HeaderValue},
    web,
};
use bytes::{BufMut, BytesMut};
use rt_core::{
    ApiError, Context, Position, Topic,
    config::Settings,
    event::parse_seq,
    front::AnswerRoute,
    hub::{Delivery, Follower, HubError, SharedEvent},
    query,
    shutdown::Shutdown,
};
use serde::Serialize;

/// The parameters every poll shares.
#[derive(Debug)]
pub(crate) struct PollParams {
    pub(crate) limit: u32,
    pub(crate) wait: Duration,
}

impl PollParams {
    /// Reads `limit` and `wait` from the query, checked against the settings.
    pub(crate) fn parse(query: &[(String, String)], settings: &Settings) -> Result<Self, ApiError> {
        let mut params = PollParams {
            limit: settings.poll_default_limit.min(settings.poll_max_limit),
            wait: Duration::ZERO,
        };
        for (key, value) in query {
            match key.as_str() {
                "limit" => params.limit = parse_limit(value, settings.poll_max_limit)?,
                "wait" => params.wait = parse_wait(value, settings.poll_max_wait)?,
                _ => {}
            }
        }
        Ok(params)
    }
}

fn parse_limit(value: &str, max: u32) -> Result<u32, ApiError> {
    match parse_seq(value) {
        Some(n) if (1..=u64::from(max)).contains(&n) => Ok(n as u32),
        _ => Err(ApiError::bad_request(
            "invalid_limit",
            format!("limit must be a whole number from 1 to {max}, got {value:?}"),
        )),
    }
}

fn parse_wait(value: &str, max: Duration) -> Result<Duration, ApiError> {
    let secs = value
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0 && !value.starts_with(['+', '-']));
    match secs {
        Some(s) if s <= max.as_secs_f64() => Ok(Duration::from_secs_f64(s)),
        _ => Err(ApiError::bad_request(
            "invalid_wait",
            format!(
                "wait must be a number of seconds from 0 to {}, got {value:?}",
                max.as_secs()
            ),
        )),
    }
}

/// The route of one topic's events, as actix-web and the metrics name it.
pub(crate) const TOPIC_EVENTS: &str = "/v1/topics/{topic:[^/]*}/events";
/// The route of several topics' events.
pub(crate) const EVENTS: &str = "/v1/events";

/// The `{topic}` of a [`TOPIC_EVENTS`] path, when the path is one the
/// connection front takes as it is: one segment, nothing percent-encoded
/// (those go to actix-web, which decodes them).
fn topic_segment(path: &str) -> Option<&str> {
    let topic = path.strip_prefix("/v1/topics/")?.strip_suffix("/events")?;
    (!topic.contains(['/', '%'])).then_some(topic)
}

/// The connection front's [`TOPIC_EVENTS`] route.
pub(crate) fn topic_route() -> AnswerRoute {
    AnswerRoute {
        pattern: TOPIC_EVENTS,
        matches: |path| topic_segment(path).is_some(),
        answer: |ctx, head| {
            Box::pin(async move {
                // The front only hands over paths that match.
                let topic = topic_segment(head.uri.path()).unwrap_or_default();
                poll_topic(ctx, head, topic).await
            })
        },
    }
}

/// The connection front's [`EVENTS`] route.
pub(crate) fn topics_route() -> AnswerRoute {
    AnswerRoute {
        pattern: EVENTS,
        matches: |path| path == EVENTS,
        answer: |ctx, head| Box::pin(poll_topics(ctx, head)),
    }
}

/// [`TOPIC_EVENTS`] behind actix-web.
pub(crate) async fn topic_events(
    ctx: web::Data<Context>,
    path: web::Path<String>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    poll_topic(&ctx, req.head(), &path).await
}

/// [`EVENTS`] behind actix-web.
pub(crate) async fn events(
    ctx: web::Data<Context>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    poll_topics(&ctx, req.head()).await
}

/// `GET /v1/topics/{topic}/events?after=N&limit=L&wait=S`
async fn poll_topic(
    ctx: &Context,
    head: &RequestHead,
    topic: &str,
) -> Result<HttpResponse, ApiError> {
    let principal = ctx.auth.authenticate(head)?;
    let query = query::pairs(head)?;
    let topic = Topic::parse(topic)?;
    let params = PollParams::parse(&query, &ctx.settings)?;
    let after = match query::single(&query, "after")? {
        None => 0,
        Some(v) => parse_seq(&v).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_after",
                format!("after must be a seq: a whole number from 0, got {v:?}"),
            )
        })?,
    };
    principal.require_subscribe(&topic)?;
    let mut followers = vec![Follower::start(&ctx.hub, &topic, after, params.limit).await?];
    let collected = collect(&mut followers, params.limit, params.wait, &ctx.shutdown).await?;
    let next = followers[0].position().to_string();
    Ok(answer(head, &ctx.settings, &params, collected, &next))
}

/// `GET /v1/events?topic=a&topic=b&after=a:12,b:40&limit=L&wait=S`
async fn poll_topics(ctx: &Context, head: &RequestHead) -> Result<HttpResponse, ApiError> {
    let principal = ctx.auth.authenticate(head)?;
    let query = query::pairs(head)?;
    let topics = query::topics(&query, ctx.settings.max_topics)?;
    let params = PollParams::parse(&query, &ctx.settings)?;
    let after = match query::single(&query, "after")? {
        None => Position::default(),
        Some(v) => query::parse_position(&v, &topics, "invalid_position")?,
    };
    principal.require_subscribe_all(&topics)?;
    let mut followers = start_followers(ctx, &topics, &after, params.limit).await?;
    let collected = collect(&mut followers, params.limit, params.wait, &ctx.shutdown).await?;
    let next = position_of(&followers).to_string();
    Ok(answer(
        head,
        &ctx.settings,
        &params,
        collected,
        &json_string(&next),
    ))
}

pub(crate) async fn start_followers(
    ctx: &Context,
    topics: &[Topic],
    after: &Position,
    limit: u32,
) -> Result<Vec<Follower>, ApiError> {
    let mut followers = Vec::with_capacity(topics.len());
    for topic in topics {
        followers.push(Follower::start(&ctx.hub, topic, after.get(topic), limit).await?);
    }
    Ok(followers)
}

pub(crate) fn position_of(followers: &[Follower]) -> Position {
    followers
        .iter()
        .map(|f| (f.topic().clone(), f.position()))
        .collect()
}

/// A reset reported to the client: events of `topic` after its position up
/// to `from` were removed by retention; delivery resumed after `from`.
#[derive(Debug, Serialize)]
pub(crate) struct Reset {
    pub(crate) topic: Topic,
    pub(crate) from: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Collected {
    pub(crate) events: Vec<Arc<SharedEvent>>,
    pub(crate) resets: Vec<Reset>,
}

impl Collected {
    fn push(&mut self, d: Delivery) {
        match d {
            Delivery::Event(e) => self.events.push(e),
            Delivery::Reset { topic, from } => self.resets.push(Reset { topic, from }),
        }
    }

    fn is_empty(&self) -> bool {
        self.events.is_empty() && self.resets.is_empty()
    }
}

/// Up to `limit` events from the followers: whatever is at hand (the log
/// first, then live), or, when there is nothing, the first live event within
/// `wait`. Topics take turns, so one busy topic cannot starve the others.
/// A shutdown ends the wait early.
pub(crate) async fn collect(
    followers: &mut [Follower],
    limit: u32,
    wait: Duration,
    shutdown: &Shutdown,
) -> Result<Collected, HubError> {
    let limit = limit as usize;
    let deadline = Instant::now() + wait;
    let mut out = Collected::default();
    loop {
        let mut progressed = true;
        while progressed && out.events.len() < limit {
            progressed = false;
            for f in followers.iter_mut() {
                if out.events.len() >= limit {
                    break;
                }
                if let Some(d) = f.try_next() {
                    out.push(d);
                    progressed = true;
                }
            }
        }
        if out.events.len() >= limit {
            break;
        }
        let mut read = false;
        for f in followers.iter_mut().filter(|f| !f.is_caught_up()) {
            f.catch_up().await?;
            read = true;
        }
        if read {
            continue;
        }
        if !out.is_empty() {
            break;
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            break;
        }
        let waits: Vec<_> = followers.iter_mut().map(|f| Box::pin(f.next())).collect();
        let first = tokio::time::timeout(remaining, futures_util::future::select_all(waits));
        tokio::select! {
            first = first => match first {
                Ok((Ok(d), _, _)) => out.push(d),
                Ok((Err(e), _, _)) => return Err(e),
                Err(_) => break,
            },
            // Stopping: answer now, so the client polls another replica.
            () = shutdown.started() => break,
        }
    }
    Ok(out)
}

fn json_string(s: &str) -> String {
    // unwrap: a string always serializes
    serde_json::to_string(s).expect("string serializes")
}

/// `{"events":[...],"next":<next>,"reset"?:[...]}`, with the events' JSON
/// bytes copied as encoded once by the hub. `next` is JSON already.
pub(crate) fn body(collected: &Collected, next: &str) -> BytesMut {
    let size: usize = collected.events.iter().map(|e| e.json.len() + 1).sum();
    let mut buf = BytesMut::with_capacity(size + next.len() + 32);
    buf.put_slice(b"{\"events\":[");
    for (i, e) in collected.events.iter().enumerate() {
        if i > 0 {
            buf.put_u8(b',');
        }
        buf.put_slice(&e.json);
    }
    buf.put_slice(b"],\"next\":");
    buf.put_slice(next.as_bytes());
    if !collected.resets.is_empty() {
        buf.put_slice(b",\"reset\":");
        // unwrap: resets are names and numbers
        buf.put_slice(&serde_json::to_vec(&collected.resets).expect("resets serialize"));
    }
    buf.put_u8(b'}');
    buf
}

/// The poll answer: 200 with the body, or 304 when the client already holds
/// it (`If-None-Match`). A short poll that found nothing carries `Retry-After`.
pub(crate) fn answer(
    req: &RequestHead,
    settings: &Settings,
    params: &PollParams,
    collected: Collected,
    next: &str,
) -> HttpResponse {
    let body = body(&collected, next);
    let mut hasher = std::hash::DefaultHasher::new();
    body.hash(&mut hasher);
    let etag = format!("\"{:016x}\"", hasher.finish());
    let not_modified = if_none_match(req, &etag);
    let mut res = if not_modified {
        HttpResponse::NotModified()
    } else {
        HttpResponse::Ok()
    };
    res.insert_header((header::ETAG, etag))
        .insert_header((header::CACHE_CONTROL, "no-cache"));
    if params.wait.is_zero() && collected.is_empty() {
        res.insert_header((header::RETRY_AFTER, settings.poll_retry_after.to_string()));
    }
    if not_modified {
        return res.finish();
    }
    res.content_type("application/json").body(body.freeze())
}

fn if_none_match(req: &RequestHead, etag: &str) -> bool {
    req.headers()
        .get_all(header::IF_NONE_MATCH)
        .filter_map(|v: &HeaderValue| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().trim_start_matches("W/"))
        .any(|v| v == etag || v == "*")
}
