//! Browsers' push subscriptions: register (or update by endpoint), list and
//! delete, each scoped to the caller's `sub`. Input is checked in full before
//! anything is stored.

use actix_web::{HttpResponse, http::header, web};
use chrono::{DateTime, SecondsFormat, Utc};
use rt_core::{
    ApiError, Context, Topic,
    auth::Principal,
    http::{parse_json, read_body},
    query::check_topic_count,
    store::{DeliveryRecord, NewPushSubscription, PushSubscriptionRecord, PushUpsert},
};
use serde::{Deserialize, Serialize};

use crate::vapid;

/// Longest endpoint URL accepted, in characters.
const MAX_ENDPOINT_CHARS: usize = 2048;

/// The browser's `PushSubscription.toJSON()` plus what to deliver. Fields
/// are optional here so that a missing one gets its own error code.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RegisterBody {
    endpoint: Option<String>,
    #[serde(default)]
    expiration_time: Option<f64>,
    keys: Option<KeysBody>,
    topics: Option<Vec<String>>,
    notice_only: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct KeysBody {
    p256dh: Option<String>,
    auth: Option<String>,
}

/// A subscription as clients see it: never its keys.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct SubscriptionView<'a> {
    id: &'a str,
    endpoint: &'a str,
    topics: &'a [Topic],
    notice_only: bool,
    created_at: String,
    updated_at: String,
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

impl<'a> From<&'a PushSubscriptionRecord> for SubscriptionView<'a> {
    fn from(s: &'a PushSubscriptionRecord) -> Self {
        SubscriptionView {
            id: &s.id,
            endpoint: &s.endpoint,
            topics: &s.topics,
            notice_only: s.notice_only,
            created_at: rfc3339(s.created_at),
            updated_at: rfc3339(s.updated_at),
        }
    }
}

#[derive(Debug, Serialize)]
struct SubscriptionList<'a> {
    subscriptions: Vec<SubscriptionView<'a>>,
}

fn invalid_endpoint(message: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_endpoint", message)
}

fn invalid_keys(message: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_keys", message)
}

/// The push service URL: absolute `https://` (`http://` only with
/// `--push-allow-insecure-endpoints`), with a host, no credentials, no
/// spaces, at most [`MAX_ENDPOINT_CHARS`]. Kept exactly as given, since the
/// same browser registers the same string again.
fn check_endpoint(
    raw: Option<String>,
    allow_insecure: bool,
    allow_private: bool,
) -> Result<String, ApiError> {
    let raw = raw.ok_or_else(|| {
        invalid_endpoint(
            "endpoint is required: the push service URL of the browser's PushSubscription",
        )
    })?;
    let chars = raw.chars().count();
    if chars > MAX_ENDPOINT_CHARS {
        return Err(invalid_endpoint(format!(
            "endpoint is {chars} characters long; the maximum is {MAX_ENDPOINT_CHARS}"
        )));
    }
    if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid_endpoint(
            "endpoint must not contain spaces or control characters",
        ));
    }
    let url = url::Url::parse(&raw)
        .map_err(|e| invalid_endpoint(format!("endpoint is not an absolute URL: {e}")))?;
    match url.scheme() {
        "https" => {}
        "http" if allow_insecure => {}
        "http" => {
            return Err(invalid_endpoint(
                "endpoint must be an https:// URL (push services use TLS; \
                 --push-allow-insecure-endpoints allows http:// for a local emulator)",
            ));
        }
        other => {
            return Err(invalid_endpoint(format!(
                "endpoint must be an https:// URL, not {other}:"
            )));
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid_endpoint("endpoint has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid_endpoint("endpoint must not carry credentials"));
    }
    if !allow_private && let Some(refusal) = crate::guard::literal_host_refusal(&url) {
        return Err(invalid_endpoint(refusal));
    }
    Ok(raw)
}

/// The browser's keys, checked, in canonical base64url.
fn check_keys(keys: Option<KeysBody>) -> Result<(String, String), ApiError> {
    let keys = keys.ok_or_else(|| {
        invalid_keys(
            "keys is required: {\"p256dh\": ..., \"auth\": ...} as PushSubscription.toJSON() gives it",
        )
    })?;
    let (Some(p256dh), Some(auth)) = (keys.p256dh, keys.auth) else {
        return Err(invalid_keys("keys.p256dh and keys.auth are both required"));
    };
    vapid::client_keys(&p256dh, &auth).map_err(|e| invalid_keys(e.to_string()))
}

/// `expirationTime` in whole milliseconds since the epoch.
fn check_expiration(value: Option<f64>) -> Result<Option<i64>, ApiError> {
    match value {
        None => Ok(None),
        Some(ms) if ms.is_finite() && (0.0..9.0e15).contains(&ms) => Ok(Some(ms as i64)),
        Some(_) => Err(ApiError::bad_request(
            "invalid_body",
            "expirationTime must be null or a time in milliseconds since the epoch",
        )),
    }
}

/// `POST /v1/push/subscriptions`: 201 with the new subscription, 200 when the
/// endpoint was registered already (updated in place, same id).
pub(crate) async fn register(
    ctx: web::Data<Context>,
    principal: Principal,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(payload, ctx.settings.max_body_bytes).await?;
    let body: RegisterBody = parse_json(&body)?;
    let endpoint = check_endpoint(
        body.endpoint,
        ctx.settings.push_allow_insecure_endpoints,
        ctx.settings.push_allow_private_addresses,
    )?;
    let (p256dh, auth) = check_keys(body.keys)?;
    let expiration_ms = check_expiration(body.expiration_time)?;
    let mut topics = Vec::new();
    for raw in body.topics.unwrap_or_default() {
        let topic = Topic::parse(&raw)?;
        if !topics.contains(&topic) {
            topics.push(topic);
        }
    }
    check_topic_count(&topics, ctx.settings.max_topics)?;
    principal.require_subscribe_all(&topics)?;
    let new = NewPushSubscription {
        subject: principal.subject.clone(),
        endpoint,
        p256dh,
        auth,
        expiration_ms,
        topics,
        notice_only: body.notice_only.unwrap_or(false),
    };
    let store = ctx.store.clone();
    // Its own task: a request dropped half-way cannot cut the transaction short.
    let upsert = tokio::spawn(async move { store.upsert_push_subscription(&new).await })
        .await
        .map_err(|e| ApiError::internal(anyhow::anyhow!("store task failed: {e}")))?
        .map_err(ApiError::from)?;
    match upsert {
        PushUpsert::Created(sub) => Ok(HttpResponse::Created()
            .insert_header((
                header::LOCATION,
                format!("/v1/push/subscriptions/{}", sub.id),
            ))
            .json(SubscriptionView::from(&sub))),
        PushUpsert::Updated(sub) => Ok(HttpResponse::Ok().json(SubscriptionView::from(&sub))),
        PushUpsert::OwnedByOther => Err(ApiError::forbidden(
            "this endpoint is registered by another user; only the browser that holds the \
             subscription (same keys) may take it over",
        )),
    }
}

/// `GET /v1/push/subscriptions`: the caller's subscriptions, oldest first.
pub(crate) async fn list(
    ctx: web::Data<Context>,
    principal: Principal,
) -> Result<HttpResponse, ApiError> {
    let subs = ctx
        .store
        .push_subscriptions(principal.subject.as_deref())
        .await?;
    Ok(HttpResponse::Ok().json(SubscriptionList {
        subscriptions: subs.iter().map(SubscriptionView::from).collect(),
    }))
}

/// `DELETE /v1/push/subscriptions/{id}` → 204; 404 when there is no such
/// subscription of the caller's.
pub(crate) async fn delete(
    ctx: web::Data<Context>,
    principal: Principal,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    let deleted = ctx
        .store
        .delete_push_subscription(&id, principal.subject.as_deref())
        .await?;
    if !deleted {
        return Err(ApiError::not_found(
            "subscription_not_found",
            format!("there is no push subscription {id} of yours"),
        ));
    }
    Ok(HttpResponse::NoContent().finish())
}

/// Most deliveries one report lists.
const MAX_REPORT_LIMIT: u32 = 1000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReportQuery {
    limit: Option<u32>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct DeliveryView<'a> {
    topic: &'a Topic,
    seq: u64,
    state: &'static str,
    attempts: u32,
    notice: bool,
    status: Option<u16>,
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_attempt_at: Option<String>,
    created_at: String,
    updated_at: String,
}

impl<'a> From<&'a DeliveryRecord> for DeliveryView<'a> {
    fn from(d: &'a DeliveryRecord) -> Self {
        let pending = d.state == rt_core::store::DeliveryState::Pending;
        DeliveryView {
            topic: &d.topic,
            seq: d.seq,
            state: d.state.as_str(),
            attempts: d.attempts,
            notice: d.notice,
            status: d.last_status,
            error: d.last_error.as_deref(),
            next_attempt_at: pending.then(|| rfc3339(d.next_attempt_at)),
            created_at: rfc3339(d.created_at),
            updated_at: rfc3339(d.updated_at),
        }
    }
}

#[derive(Debug, Serialize)]
struct ReportView<'a> {
    pending: u64,
    delivered: u64,
    failed: u64,
    deliveries: Vec<DeliveryView<'a>>,
}

/// `GET /v1/push/subscriptions/{id}/deliveries?limit=N`: how delivery to
/// one of the caller's subscriptions goes: counts by state and the `N`
/// (default 100) most recently changed deliveries.
pub(crate) async fn deliveries(
    ctx: web::Data<Context>,
    principal: Principal,
    path: web::Path<String>,
    query: web::Query<ReportQuery>,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    let limit = query.limit.unwrap_or(100);
    if !(1..=MAX_REPORT_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_limit",
            format!("limit must be 1 to {MAX_REPORT_LIMIT}, got {limit}"),
        ));
    }
    let report = ctx
        .store
        .push_deliveries(&id, principal.subject.as_deref(), limit)
        .await?
        .ok_or_else(|| {
            ApiError::not_found(
                "subscription_not_found",
                format!("there is no push subscription {id} of yours"),
            )
        })?;
    Ok(HttpResponse::Ok().json(ReportView {
        pending: report.pending,
        delivered: report.delivered,
        failed: report.failed,
        deliveries: report.recent.iter().map(DeliveryView::from).collect(),
    }))
}
