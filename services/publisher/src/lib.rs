//! The publisher service: producers POST events, and each publish is answered
//! only once its events are committed to the log.
//!
//! - `POST /v1/topics/{topic}/events` with `{"type"?: str, "data": any}` → `201 {"topic","seq"}`
//! - `POST /v1/events` with `[{"topic","type"?,"data"}, ...]` → `201 {"events":[{"topic","seq"},...]}`
//!
//! An `Idempotency-Key` header makes a retry return the first result (and the
//! `Idempotent-Replayed: true` header) instead of storing a copy.

use actix_web::{HttpRequest, HttpResponse, guard, web};
use rt_core::{
    ApiError, Context, Topic,
    auth::Principal,
    event::{DEFAULT_EVENT_TYPE, NewEvent, PushOptions, validate_event_type},
    http::{parse_json, read_body},
    publish::{PublishError, Published},
    telemetry::current_trace_headers,
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Longest idempotency key accepted.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// What this service serves (its routes, as [`configure`] mounts them).
pub fn routes() -> rt_core::server::Routes {
    rt_core::server::Routes::new().service(configure)
}

/// Adds the publisher's routes. Resources carry a POST guard so that other
/// services can serve GET on the same paths in the all-in-one process.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/v1/topics/{topic:[^/]*}/events")
            .guard(guard::Post())
            .route(web::post().to(publish_one)),
    )
    .service(
        web::resource("/v1/events")
            .guard(guard::Post())
            .route(web::post().to(publish_batch)),
    );
}

/// The answer for one published event: `{"topic","seq"}`.
#[derive(Debug, Serialize)]
struct Ack<'a> {
    topic: &'a Topic,
    seq: u64,
}

impl<'a> From<&'a Published> for Ack<'a> {
    fn from(p: &'a Published) -> Self {
        Ack {
            topic: &p.topic,
            seq: p.seq,
        }
    }
}

/// The answer for a batch: `{"events": [{"topic","seq"}, ...]}` in request order.
#[derive(Debug, Serialize)]
struct BatchAck<'a> {
    events: Vec<Ack<'a>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    #[serde(rename = "type")]
    event_type: Option<String>,
    data: Box<RawValue>,
    push: Option<PushOptions>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchItem {
    topic: String,
    #[serde(rename = "type")]
    event_type: Option<String>,
    data: Box<RawValue>,
    push: Option<PushOptions>,
}

async fn publish_one(
    ctx: web::Data<Context>,
    principal: Principal,
    topic: web::Path<String>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let topic = Topic::parse(&topic)?;
    principal.require_publish(&topic)?;
    let key = idempotency_key(&req)?;
    let body = read_body(payload, ctx.settings.max_body_bytes).await?;
    let body: PublishBody = parse_json(&body)?;
    let event = new_event(topic, body.event_type, body.data, key, body.push)?;
    let published = publish(&ctx, vec![event]).await?;
    // index: one event in, one result out
    let p = &published[0];
    Ok(created(p.duplicate).json(Ack::from(p)))
}

async fn publish_batch(
    ctx: web::Data<Context>,
    principal: Principal,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let key = idempotency_key(&req)?;
    let body = read_body(payload, ctx.settings.max_body_bytes).await?;
    let items: Vec<BatchItem> = parse_json(&body)?;
    let max = ctx.settings.max_batch_events;
    if items.is_empty() || items.len() > max {
        return Err(ApiError::bad_request(
            "invalid_batch",
            format!("a batch holds 1 to {max} events, got {}", items.len()),
        ));
    }
    let mut events = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let topic = Topic::parse(&item.topic).map_err(|e| {
            ApiError::bad_request("invalid_topic", format!("events[{i}].topic: {e}"))
        })?;
        principal.require_publish(&topic)?;
        // Each event of a keyed batch gets its own key, so a retried batch
        // maps back onto the same seqs one by one.
        let key = key.as_ref().map(|k| format!("{k}#{i}"));
        let event = new_event(topic, item.event_type, item.data, key, item.push)
            .map_err(|e| ApiError::bad_request(e.code, format!("events[{i}].{}", e.message)))?;
        events.push(event);
    }
    let published = publish(&ctx, events).await?;
    let replayed = published.iter().all(|p| p.duplicate);
    let events = published.iter().map(Ack::from).collect();
    Ok(created(replayed).json(BatchAck { events }))
}

/// Why an event of a publish was refused: an error code and a message
/// naming the field.
struct InvalidEvent {
    code: &'static str,
    message: String,
}

impl From<InvalidEvent> for ApiError {
    fn from(e: InvalidEvent) -> Self {
        ApiError::bad_request(e.code, e.message)
    }
}

fn new_event(
    topic: Topic,
    event_type: Option<String>,
    data: Box<RawValue>,
    idempotency_key: Option<String>,
    push: Option<PushOptions>,
) -> Result<NewEvent, InvalidEvent> {
    let event_type = event_type.unwrap_or_else(|| DEFAULT_EVENT_TYPE.to_owned());
    validate_event_type(&event_type).map_err(|m| InvalidEvent {
        code: "invalid_type",
        message: format!("type: {m}"),
    })?;
    if let Some(push) = &push {
        push.validate().map_err(|message| InvalidEvent {
            code: "invalid_push_options",
            message,
        })?;
    }
    Ok(NewEvent {
        topic,
        event_type,
        data,
        idempotency_key,
        push: push.filter(|p| *p != PushOptions::default()),
    })
}

async fn publish(ctx: &Context, events: Vec<NewEvent>) -> Result<Vec<Published>, ApiError> {
    ctx.publisher
        .publish(events, current_trace_headers())
        .await
        .map_err(|e| match e {
            PublishError::Store(_) => ApiError::unavailable(
                "store_unavailable",
                "the event log is unavailable, so the publish was not acknowledged; retry later \
                 (with the same Idempotency-Key to be safe)",
                anyhow::Error::new(e),
            ),
            PublishError::Closed => ApiError::unavailable(
                "shutting_down",
                "the service is shutting down; retry against another replica",
                anyhow::Error::new(e),
            ),
        })
}

fn created(replayed: bool) -> actix_web::HttpResponseBuilder {
    let mut response = HttpResponse::Created();
    if replayed {
        response.insert_header(("Idempotent-Replayed", "true"));
    }
    response
}

/// The optional `Idempotency-Key` header: 1 to 255 visible ASCII characters.
fn idempotency_key(req: &HttpRequest) -> Result<Option<String>, ApiError> {
    let Some(value) = req.headers().get("idempotency-key") else {
        return Ok(None);
    };
    let key = value.to_str().ok().filter(|k| {
        !k.is_empty()
            && k.len() <= MAX_IDEMPOTENCY_KEY_LEN
            && k.bytes().all(|b| b.is_ascii_graphic())
    });
    match key {
        Some(k) => Ok(Some(k.to_owned())),
        None => Err(ApiError::bad_request(
            "invalid_idempotency_key",
            format!(
                "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} visible ASCII characters"
            ),
        )),
    }
}
