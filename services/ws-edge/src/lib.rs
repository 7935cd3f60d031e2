//! The ws-edge service: events over WebSockets, full duplex.
//!
//! `GET /v1/ws` upgrades (subprotocol `rt.v1.json`, optional) to a socket
//! carrying JSON text frames.
//!
//! Client → server:
//! - `{"op":"subscribe","topic":"t","after"?:N,"ref"?:"r"}`: events after `N`
//!   (from the log, then live), or from now on without `after`;
//! - `{"op":"unsubscribe","topic":"t","ref"?:"r"}`;
//! - `{"op":"publish","topic":"t","type"?:"x","data":...,"ref"?:"r"}`: the
//!   same durable path as the publisher service;
//! - `{"op":"ping","ref"?:"r"}`.
//!
//! Server → client:
//! - `{"op":"event","topic","seq","type","data","time"}`;
//! - `{"op":"ack","ref","topic","seq"}` once a publish is committed, and
//!   `{"op":"ack","ref","topic","after"}` once a subscription is live (or
//!   removed), when the client gave a `ref`;
//! - `{"op":"reset","topic","from"}` when `after` is older than retention;
//! - `{"op":"error","ref"?,"code","message"}`; `{"op":"pong","ref"?}`.
//!
//! Every frame is checked on its own: a bad one gets an error frame and the
//! socket stays usable. Close codes: 1001 going away (shutdown, idle), 1008
//! policy (too slow), 1009 too big, 1002/1003 protocol or data errors.

mod connection;
mod frames;
mod outbox;
mod reader;
mod wire;

use actix_web::{HttpRequest, HttpResponse, dev::RequestHead, http::header, web};
use futures_util::{StreamExt as _, future::LocalBoxFuture};
use rt_core::{
    ApiError, Context,
    front::{self, Accepted, Inbound, Opener, StreamRoute},
    server::Routes,
};

/// The subprotocol this edge speaks; offered protocols must include it.
pub const SUBPROTOCOL: &str = "rt.v1.json";

/// What this service serves: `GET /v1/ws`, upgraded on the socket itself
/// when a connection opens with it (see [`rt_core::front`]).
pub fn routes() -> Routes {
    Routes::new().service(configure).stream(StreamRoute {
        path: "/v1/ws",
        admit,
    })
}

/// Mounts `GET /v1/ws` in actix-web.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/v1/ws").route(web::get().to(upgrade)));
}

/// The host the client asked for, read as actix-web's connection info reads
/// it: `Forwarded: host=`, `X-Forwarded-Host`, `Host`, the request target.
fn request_host(req: &RequestHead) -> Option<String> {
    let forwarded = req
        .headers
        .get_all(header::FORWARDED)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split([';', ',']))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("host"))
        .map(|(_, value)| value.trim().trim_matches('"'));
    let first = |name: &str| {
        let value = req.headers.get(name)?.to_str().ok()?;
        value.split(',').next().map(str::trim)
    };
    forwarded
        .or_else(|| first("x-forwarded-host"))
        .or_else(|| req.headers.get(header::HOST)?.to_str().ok())
        .or_else(|| req.uri.authority().map(|a| a.as_str()))
        .map(str::to_owned)
}

/// Browsers send `Origin` with every WebSocket upgrade but apply no CORS to
/// it, so a page on any site could open a socket with the user's cookie.
/// Upgrades from a browser are accepted from this server's own origin and
/// from `--cors-origins` only; clients that send no `Origin` are not browsers.
fn check_origin(req: &RequestHead, allowed: &[String]) -> Result<(), ApiError> {
    let Some(origin) = req.headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or_default();
    let same_origin = request_host(req).is_some_and(|host| {
        origin
            .split_once("://")
            .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(&host))
    });
    if same_origin || allowed.iter().any(|a| a == "*" || a == origin) {
        return Ok(());
    }
    Err(ApiError::forbidden(format!(
        "WebSocket upgrades from origin {origin} are not allowed (see --cors-origins)"
    )))
}

fn admit<'a>(
    ctx: &'a Context,
    head: &'a RequestHead,
) -> LocalBoxFuture<'a, Result<Accepted, ApiError>> {
    Box::pin(async move {
        let (response, open) = accept(ctx, head)?;
        Ok(Accepted::Upgrade(response, open))
    })
}

async fn upgrade(
    ctx: web::Data<Context>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (response, open) = accept(&ctx, req.head())?;
    let body = open(Inbound::Payload(Box::pin(body)));
    Ok(front::actix_response(response, body))
}

/// Checks an upgrade request: the `101` answer, and what serves the socket
/// once it is sent.
fn accept(ctx: &Context, req: &RequestHead) -> Result<(HttpResponse<()>, Opener), ApiError> {
    let principal = ctx.auth.authenticate(req)?;
    if let Some(offered) = req.headers.get(header::SEC_WEBSOCKET_PROTOCOL) {
        let offered = offered.to_str().unwrap_or_default();
        if !offered.split(',').any(|p| p.trim() == SUBPROTOCOL) {
            return Err(ApiError::bad_request(
                "unsupported_subprotocol",
                format!("this server speaks the subprotocol {SUBPROTOCOL}; offered: {offered}"),
            ));
        }
    }
    check_origin(req, &ctx.settings.cors_origins)?;
    let pass = ctx.ws_gate.enter()?;
    let mut response = actix_http::ws::handshake(req).map_err(|e| {
        ApiError::bad_request(
            "not_a_websocket",
            format!("GET /v1/ws upgrades to a WebSocket: {e}"),
        )
    })?;
    let offered = req
        .headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == SUBPROTOCOL);
    if offered {
        response.insert_header((header::SEC_WEBSOCKET_PROTOCOL, SUBPROTOCOL));
    }
    let ctx = ctx.clone();
    let open = move |inbound: Inbound| connection::open(ctx, principal, inbound, pass).boxed();
    Ok((
        HttpResponse::from(response.finish()).drop_body(),
        Box::new(open),
    ))
}
