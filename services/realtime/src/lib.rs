//! The all-in-one process: every service's routes, as the `realtime` binary
//! serves them (the tests and the bench serve the same).

/// The publisher's, poll-api's, sse-edge's, ws-edge's and push-dispatcher's
/// routes, merged.
pub fn routes() -> rt_core::server::Routes {
    rt_publisher::routes()
        .merge(rt_poll_api::routes())
        .merge(rt_sse_edge::routes())
        .merge(rt_ws_edge::routes())
        .merge(rt_push_dispatcher::routes())
}
