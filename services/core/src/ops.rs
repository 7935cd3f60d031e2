//! The routes every service has: `/healthz`, `/readyz`, `/metrics`.

use std::time::Duration;

use actix_web::{HttpResponse, web};
use serde_json::json;

use crate::context::Context;

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics));
}

/// The process is up.
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// The process can serve: its store and its bus both answer.
async fn readyz(ctx: web::Data<Context>) -> HttpResponse {
    let store = check(ctx.store.ping()).await;
    let bus = check(ctx.bus.ping()).await;
    let describe = |kind: &str, r: &Result<(), String>| match r {
        Ok(()) => json!({"kind": kind, "ok": true}),
        Err(e) => json!({"kind": kind, "ok": false, "error": e}),
    };
    let body = json!({
        "status": if store.is_ok() && bus.is_ok() { "ready" } else { "unavailable" },
        "store": describe(ctx.store.kind(), &store),
        "bus": describe(ctx.bus.kind(), &bus),
    });
    if store.is_ok() && bus.is_ok() {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

async fn check<E: std::fmt::Display>(
    probe: impl Future<Output = Result<(), E>>,
) -> Result<(), String> {
    match tokio::time::timeout(CHECK_TIMEOUT, probe).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
    }
}

async fn metrics(ctx: web::Data<Context>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(ctx.metrics.render())
}
