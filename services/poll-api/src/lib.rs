//! The poll-api service: events over short and long polling, from a position
//! the client keeps or from a named cursor kept in the store.
//!
//! - `GET /v1/topics/{topic}/events?after=N&limit=L&wait=S` → `{"events":[...],"next":N}`
//! - `GET /v1/events?topic=a&topic=b&after=a:12,b:40&limit=L&wait=S` → `{"events":[...],"next":"a:13,b:40"}`
//! - `PUT /v1/cursors/{name}` with `{"topics":[...],"from"?:"earliest"|"latest"|position}`,
//!   `GET /v1/cursors`, `GET|DELETE /v1/cursors/{name}`,
//!   `GET /v1/cursors/{name}/events?limit=L&wait=S`, `POST /v1/cursors/{name}/commit`
//!   with `{"position":"a:13,b:40"}`.
//!
//! `wait=S` holds the request until an event arrives or S seconds pass. Events
//! come from the process's live hub, so a wake-up of many waiters on one topic
//! reads nothing from the store. A position older than retention is answered
//! with the events that remain and a `reset` entry saying where delivery
//! resumed, never a silent skip.

mod cursors;
mod poll;

use actix_web::{guard, web};

/// What this service serves: its routes, as [`configure`] mounts them, with
/// the two polling routes also answered by the connection front on the
/// socket (see [`rt_core::front`]).
pub fn routes() -> rt_core::server::Routes {
    rt_core::server::Routes::new()
        .service(configure)
        .answer(poll::topic_route())
        .answer(poll::topics_route())
}

/// Adds the poll-api routes. Resources carry method guards so that the
/// publisher's POST routes on the same paths can live in the same process.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource(poll::TOPIC_EVENTS)
            .guard(guard::Get())
            .route(web::get().to(poll::topic_events)),
    )
    .service(
        web::resource(poll::EVENTS)
            .guard(guard::Get())
            .route(web::get().to(poll::events)),
    )
    .service(web::resource("/v1/cursors").route(web::get().to(cursors::list)))
    .service(
        web::resource("/v1/cursors/{name}")
            .route(web::put().to(cursors::create))
            .route(web::get().to(cursors::get))
            .route(web::delete().to(cursors::delete)),
    )
    .service(web::resource("/v1/cursors/{name}/events").route(web::get().to(cursors::read)))
    .service(web::resource("/v1/cursors/{name}/commit").route(web::post().to(cursors::commit)));
}
