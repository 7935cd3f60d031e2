//! The push-dispatcher service, first step: the VAPID key and browsers' push
//! subscriptions. Delivering events to them (a cursor consumer of the event
//! log that sends Web Push messages) comes next.
//!
//! - `GET /v1/push/vapid-public-key` → `{"publicKey": "<base64url>"}`: the
//!   `applicationServerKey` for `pushManager.subscribe()`.
//! - `POST /v1/push/subscriptions` with the browser's `PushSubscription` JSON
//!   plus `"topics": [...]` and optional `"noticeOnly": bool` → `201` (new) or
//!   `200` (the same endpoint again: updated, same id).
//! - `GET /v1/push/subscriptions`: the caller's subscriptions.
//! - `DELETE /v1/push/subscriptions/{id}` → `204`.
//!
//! With `--vapid-private-key` the key pair is that key's. Without it, the
//! first process to need a key generates one and stores it; every replica
//! then reads that one back, so they all agree and it survives restarts.

mod dispatch;
mod guard;
mod subscriptions;
mod vapid;

pub use dispatch::{MAX_PLAINTEXT, run};

use std::sync::Arc;

use actix_web::{HttpResponse, web};
use rt_core::{ApiError, Context, config::Settings, store::StoreError};
use serde::Serialize;
use tokio::sync::OnceCell;

use crate::vapid::VapidKeys;

/// What this service serves (its routes, as [`configure`] mounts them).
pub fn routes() -> rt_core::server::Routes {
    rt_core::server::Routes::new().service(configure)
}

/// Adds the push routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(web::Data::new(KeyCache::default()))
        .service(web::resource("/v1/push/vapid-public-key").route(web::get().to(public_key)))
        .service(
            web::resource("/v1/push/subscriptions")
                .route(web::post().to(subscriptions::register))
                .route(web::get().to(subscriptions::list)),
        )
        .service(
            web::resource("/v1/push/subscriptions/{id}")
                .route(web::delete().to(subscriptions::delete)),
        )
        .service(
            web::resource("/v1/push/subscriptions/{id}/deliveries")
                .route(web::get().to(subscriptions::deliveries)),
        );
}

/// The delivery engine as a [`rt_core::server::Worker`], for
/// [`rt_core::server::run_service_with`].
pub fn worker() -> rt_core::server::Worker {
    Box::new(|ctx| Box::pin(run(ctx)))
}

/// Checks the push settings before a process starts serving, so a bad
/// `--vapid-private-key` or `--vapid-subject` stops it at once.
pub fn check_settings(settings: &Settings) -> anyhow::Result<()> {
    if let Some(key) = &settings.vapid_private_key {
        VapidKeys::from_private(key).map_err(|e| anyhow::anyhow!("--vapid-private-key: {e}"))?;
    }
    rt_core::config::parse_vapid_subject(&settings.vapid_subject)
        .map_err(|e| anyhow::anyhow!("--vapid-subject: {e}"))?;
    let max_ttl = rt_core::event::MAX_PUSH_TTL;
    if settings.push_ttl.as_secs() > u64::from(max_ttl) {
        anyhow::bail!(
            "--push-ttl is {} s; push services keep messages at most {max_ttl} s (28 days)",
            settings.push_ttl.as_secs()
        );
    }
    if settings.push_lease <= settings.push_request_timeout {
        anyhow::bail!(
            "--push-lease ({:?}) must be longer than --push-request-timeout ({:?}): \
             otherwise another replica retries deliveries that are still being sent",
            settings.push_lease,
            settings.push_request_timeout
        );
    }
    Ok(())
}

/// The key pair, loaded once per HTTP worker (`configure` runs per worker);
/// every worker gets the same pair from the settings or the store.
#[derive(Default)]
struct KeyCache(OnceCell<Arc<VapidKeys>>);

impl KeyCache {
    async fn get(&self, ctx: &Context) -> Result<Arc<VapidKeys>, ApiError> {
        self.0
            .get_or_try_init(|| async { load_keys(ctx).await.map(Arc::new) })
            .await
            .cloned()
    }
}

/// The configured key, else the stored one (generated and stored first when
/// there is none).
async fn load_keys(ctx: &Context) -> Result<VapidKeys, ApiError> {
    if let Some(key) = &ctx.settings.vapid_private_key {
        return VapidKeys::from_private(key)
            .map_err(|e| ApiError::internal(anyhow::anyhow!("--vapid-private-key: {e}")));
    }
    let candidate = VapidKeys::generate();
    let stored = {
        let store = ctx.store.clone();
        let candidate = candidate.private_base64().to_owned();
        // Its own task: a request dropped half-way cannot cut the insert short.
        tokio::spawn(async move { store.vapid_private_key(&candidate).await })
            .await
            .map_err(|e| ApiError::internal(anyhow::anyhow!("store task failed: {e}")))??
    };
    if stored == candidate.private_base64() {
        tracing::info!(
            public_key = candidate.public_base64(),
            "generated a VAPID key pair and stored it (no --vapid-private-key configured)"
        );
        return Ok(candidate);
    }
    VapidKeys::from_private(&stored).map_err(|e| {
        StoreError::Corrupt(format!("the stored VAPID private key is unusable: {e}")).into()
    })
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PublicKeyView<'a> {
    public_key: &'a str,
}

/// `GET /v1/push/vapid-public-key`
async fn public_key(
    ctx: web::Data<Context>,
    keys: web::Data<KeyCache>,
) -> Result<HttpResponse, ApiError> {
    let keys = keys.get(&ctx).await?;
    Ok(HttpResponse::Ok().json(PublicKeyView {
        public_key: keys.public_base64(),
    }))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn settings_that_would_misbehave_are_refused() {
        assert!(check_settings(&Settings::default()).is_ok());
        let long_ttl = Settings {
            push_ttl: Duration::from_secs(29 * 86_400),
            ..Settings::default()
        };
        let e = check_settings(&long_ttl).unwrap_err().to_string();
        assert!(e.contains("--push-ttl"), "{e}");
        let short_lease = Settings {
            push_lease: Duration::from_secs(10),
            push_request_timeout: Duration::from_secs(15),
            ..Settings::default()
        };
        let e = check_settings(&short_lease).unwrap_err().to_string();
        assert!(e.contains("--push-lease"), "{e}");
    }
}
