//! Named cursors: a set of topics and a committed position kept in the store,
//! so a consumer keeps no state of its own. Reading does not move the cursor;
//! committing does (at-least-once: a lost answer means the same events again).

use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, SecondsFormat, Utc};
use rt_core::{
    ApiError, Context, Position, Topic,
    auth::Principal,
    http::{parse_json, read_body},
    query::{QueryPairs, check_topic_count, parse_position},
    store::{CursorRecord, StoreError},
};
use serde::{Deserialize, Serialize};

use crate::poll::{PollParams, answer, collect, position_of, start_followers};

/// A cursor as clients see it.
#[derive(Debug, Serialize)]
struct CursorView<'a> {
    name: &'a str,
    topics: &'a [Topic],
    position: String,
    created_at: String,
    updated_at: String,
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

impl<'a> From<&'a CursorRecord> for CursorView<'a> {
    fn from(c: &'a CursorRecord) -> Self {
        // Every topic of the cursor appears, at 0 when nothing was committed.
        let position: Position = c
            .topics
            .iter()
            .map(|t| (t.clone(), c.position.get(t)))
            .collect();
        CursorView {
            name: &c.name,
            topics: &c.topics,
            position: position.to_string(),
            created_at: rfc3339(c.created_at),
            updated_at: rfc3339(c.updated_at),
        }
    }
}

#[derive(Debug, Serialize)]
struct CursorList<'a> {
    cursors: Vec<CursorView<'a>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    topics: Vec<String>,
    /// `earliest` (default), `latest`, or a position in the cursor's topics.
    from: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommitBody {
    position: String,
}

/// Cursor names follow the topic-name rules: 1–128 of `[A-Za-z0-9_.-]`.
fn cursor_name(raw: &str) -> Result<String, ApiError> {
    Topic::parse(raw).map(|t| t.to_string()).map_err(|e| {
        ApiError::bad_request(
            "invalid_cursor_name",
            e.to_string().replace("topic name", "cursor name"),
        )
    })
}

/// Runs a store transaction as a task of its own, so that a request dropped
/// half-way (the client went away) cannot cut it short and leave its
/// connection inside a transaction.
async fn detached<T: Send + 'static>(
    op: impl std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::spawn(op).await {
        Ok(result) => result.map_err(ApiError::from),
        Err(e) => Err(ApiError::internal(anyhow::anyhow!(
            "store task failed: {e}"
        ))),
    }
}

fn not_found(name: &str) -> ApiError {
    ApiError::not_found(
        "cursor_not_found",
        format!("there is no cursor named {name}"),
    )
}

/// The cursor, if it exists and the principal may read all its topics. A
/// cursor over topics the principal may not read is refused, not hidden.
async fn load(ctx: &Context, principal: &Principal, name: &str) -> Result<CursorRecord, ApiError> {
    let cursor = ctx
        .store
        .cursor(name)
        .await?
        .ok_or_else(|| not_found(name))?;
    principal.require_subscribe_all(&cursor.topics)?;
    Ok(cursor)
}

/// `PUT /v1/cursors/{name}`: 201 when created, 200 when an identical cursor
/// exists, 409 when one of that name covers other topics.
pub(crate) async fn create(
    ctx: web::Data<Context>,
    principal: Principal,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let name = cursor_name(&path)?;
    let body = read_body(payload, ctx.settings.max_body_bytes).await?;
    let body: CreateBody = parse_json(&body)?;
    let mut topics = Vec::with_capacity(body.topics.len());
    for raw in &body.topics {
        let topic = Topic::parse(raw)?;
        if !topics.contains(&topic) {
            topics.push(topic);
        }
    }
    check_topic_count(&topics, ctx.settings.max_topics)?;
    principal.require_subscribe_all(&topics)?;
    let start = match body.from.as_deref() {
        None | Some("earliest") => Position::default(),
        Some("latest") => {
            let heads = ctx.store.heads(&topics).await?;
            topics
                .iter()
                .map(|t| (t.clone(), heads.get(t).map_or(0, |h| h.last_seq)))
                .collect()
        }
        Some(position) => parse_position(position, &topics, "invalid_position")?,
    };
    let (cursor, created) = {
        let (store, name, topics) = (ctx.store.clone(), name.clone(), topics.clone());
        detached(async move { store.create_cursor(&name, &topics, &start).await }).await?
    };
    if !created {
        let mut existing = cursor.topics.clone();
        let mut wanted = topics.clone();
        existing.sort();
        wanted.sort();
        if existing != wanted {
            return Err(ApiError::new(
                actix_web::http::StatusCode::CONFLICT,
                "cursor_exists",
                format!(
                    "a cursor named {name} already exists over other topics; delete it first or pick another name"
                ),
            ));
        }
        principal.require_subscribe_all(&cursor.topics)?;
        return Ok(HttpResponse::Ok().json(CursorView::from(&cursor)));
    }
    Ok(HttpResponse::Created().json(CursorView::from(&cursor)))
}

/// `GET /v1/cursors`: the cursors whose topics the principal may all read.
pub(crate) async fn list(
    ctx: web::Data<Context>,
    principal: Principal,
) -> Result<HttpResponse, ApiError> {
    let cursors = ctx.store.cursors().await?;
    let visible = cursors
        .iter()
        .filter(|c| c.topics.iter().all(|t| principal.can_subscribe(t)))
        .map(CursorView::from)
        .collect();
    Ok(HttpResponse::Ok().json(CursorList { cursors: visible }))
}

/// `GET /v1/cursors/{name}`
pub(crate) async fn get(
    ctx: web::Data<Context>,
    principal: Principal,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let name = cursor_name(&path)?;
    let cursor = load(&ctx, &principal, &name).await?;
    Ok(HttpResponse::Ok().json(CursorView::from(&cursor)))
}

/// `DELETE /v1/cursors/{name}` → 204.
pub(crate) async fn delete(
    ctx: web::Data<Context>,
    principal: Principal,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let name = cursor_name(&path)?;
    load(&ctx, &principal, &name).await?;
    if !ctx.store.delete_cursor(&name).await? {
        return Err(not_found(&name));
    }
    Ok(HttpResponse::NoContent().finish())
}

/// `GET /v1/cursors/{name}/events?limit=L&wait=S`: events after the committed
/// position; `next` is the position to commit once they are processed.
pub(crate) async fn read(
    ctx: web::Data<Context>,
    principal: Principal,
    path: web::Path<String>,
    query: QueryPairs,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let name = cursor_name(&path)?;
    let params = PollParams::parse(&query, &ctx.settings)?;
    let cursor = load(&ctx, &principal, &name).await?;
    let mut followers =
        start_followers(&ctx, &cursor.topics, &cursor.position, params.limit).await?;
    let collected = collect(&mut followers, params.limit, params.wait, &ctx.shutdown).await?;
    let next = serde_json::to_string(&position_of(&followers).to_string())
        .map_err(|e| ApiError::internal(e.into()))?;
    Ok(answer(req.head(), &ctx.settings, &params, collected, &next))
}

/// `POST /v1/cursors/{name}/commit` with `{"position":"a:13,b:40"}`: moves the
/// cursor forward (never back) and answers with the cursor.
pub(crate) async fn commit(
    ctx: web::Data<Context>,
    principal: Principal,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let name = cursor_name(&path)?;
    let body = read_body(payload, ctx.settings.max_body_bytes).await?;
    let body: CommitBody = parse_json(&body)?;
    let cursor = load(&ctx, &principal, &name).await?;
    let position = parse_position(&body.position, &cursor.topics, "invalid_position")?;
    let topics: Vec<Topic> = position.iter().map(|(t, _)| t.clone()).collect();
    let heads = ctx.store.heads(&topics).await?;
    for (topic, seq) in position.iter() {
        let last = heads.get(topic).map_or(0, |h| h.last_seq);
        if seq > last {
            return Err(ApiError::bad_request(
                "position_ahead",
                format!(
                    "cannot commit {topic}:{seq}: the topic's last event is {last}; commit the next of a read"
                ),
            ));
        }
    }
    let committed = {
        let (store, name) = (ctx.store.clone(), name.clone());
        detached(async move { store.commit_cursor(&name, &position).await }).await?
    };
    let cursor = committed.ok_or_else(|| not_found(&name))?;
    Ok(HttpResponse::Ok().json(CursorView::from(&cursor)))
}
