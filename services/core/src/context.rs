//! What a running service holds: settings, store, bus, auth, publisher, live
//! hub, metrics.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;

use crate::{
    auth::Auth,
    bus::{Bus, MemoryBus, NatsBus},
    config::Settings,
    gate::Gate,
    hub::{Hub, HubConfig},
    metrics::Metrics,
    publish::Publisher,
    shutdown::Shutdown,
    store::{PgStore, Retention, SqliteStore, Store},
};

/// Shared by every route of a process; cheap to clone.
#[derive(Clone)]
pub struct Context {
    pub settings: Arc<Settings>,
    pub store: Arc<dyn Store>,
    pub bus: Arc<dyn Bus>,
    pub auth: Arc<Auth>,
    pub publisher: Publisher,
    pub hub: Hub,
    pub metrics: Arc<Metrics>,
    /// Set when the process starts stopping.
    pub shutdown: Shutdown,
    /// Open SSE streams, against `--sse-max-connections`.
    pub sse_gate: Arc<Gate>,
    /// Open WebSockets, against `--ws-max-connections`.
    pub ws_gate: Arc<Gate>,
    /// Streams served on the main runtime (see [`crate::front`]); the
    /// process waits for them to say goodbye before it exits.
    pub detached: tokio_util::task::TaskTracker,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("store", &self.store.kind())
            .field("bus", &self.bus.kind())
            .field("auth", &self.auth)
            .finish()
    }
}

impl Context {
    /// Opens the store and bus the settings name, then builds the context.
    /// Call on the main multi-threaded runtime: background tasks live there.
    pub async fn connect(settings: Settings) -> anyhow::Result<Context> {
        let store = open_store(&settings).await?;
        let bus = open_bus(&settings).await?;
        Context::new(settings, store, bus)
    }

    /// Builds a context over a given store and bus (tests pass wrappers here).
    pub fn new(
        settings: Settings,
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
    ) -> anyhow::Result<Context> {
        let auth = Auth::from_settings(&settings)?;
        if auth.is_anonymous() {
            if !settings.binds_loopback() && !settings.allow_anonymous {
                anyhow::bail!(
                    "no JWT key is configured and {} is not a loopback address: set --jwt-secret or \
                     --jwt-public-key, or pass --allow-anonymous to serve without authentication",
                    settings.bind
                );
            }
            tracing::warn!(
                bind = %settings.bind,
                "AUTHENTICATION IS OFF: no JWT key is configured, so anyone who can reach this \
                 address may publish and subscribe to every topic"
            );
        }
        let metrics = Arc::new(Metrics::new());
        // SQLite has one writer: more commit workers would only wait on its lock.
        let workers = if store.kind() == "sqlite" {
            1
        } else {
            settings.commit_workers
        };
        let publisher = Publisher::start(
            store.clone(),
            bus.clone(),
            metrics.clone(),
            workers,
            settings.commit_max_events,
        )
        .context("cannot start the commit workers' thread")?;
        let retention = Retention {
            max_age: settings.retention_age,
            max_count: settings.retention_count,
        };
        if !retention.is_unlimited() {
            tokio::spawn(prune_forever(
                store.clone(),
                metrics.clone(),
                retention,
                settings.prune_interval,
            ));
        }
        let hub = Hub::new(
            store.clone(),
            bus.clone(),
            metrics.clone(),
            HubConfig::from_settings(&settings),
        );
        let sse_gate = Gate::new(settings.sse_max_connections, "streams");
        let ws_gate = Gate::new(settings.ws_max_connections, "WebSockets");
        Ok(Context {
            settings: Arc::new(settings),
            store,
            bus,
            auth: Arc::new(auth),
            publisher,
            hub,
            metrics,
            shutdown: Shutdown::new(),
            sse_gate,
            ws_gate,
            detached: tokio_util::task::TaskTracker::new(),
        })
    }
}

/// Postgres for a `postgres://` URL, SQLite for `sqlite:` or no URL at all.
pub async fn open_store(settings: &Settings) -> anyhow::Result<Arc<dyn Store>> {
    match settings.database_url.as_deref() {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            let store = PgStore::connect(
                url,
                settings.db_max_connections,
                settings.db_acquire_timeout,
                settings.startup_timeout,
            )
            .await?;
            Ok(Arc::new(store))
        }
        Some(url) if url.starts_with("sqlite:") => Ok(Arc::new(
            SqliteStore::open_url(url, settings.db_acquire_timeout).await?,
        )),
        Some(other) => anyhow::bail!(
            "DATABASE_URL {:?} is neither postgres:// nor sqlite:",
            other.split(':').next().unwrap_or_default()
        ),
        None => {
            let path = settings.data_dir.join("realtime.db");
            tracing::info!(path = %path.display(), "using the embedded SQLite event log");
            Ok(Arc::new(
                SqliteStore::open_file(&path, settings.db_acquire_timeout).await?,
            ))
        }
    }
}

/// NATS when a URL is given, else the in-process bus.
pub async fn open_bus(settings: &Settings) -> anyhow::Result<Arc<dyn Bus>> {
    match &settings.nats_url {
        Some(url) => Ok(Arc::new(
            NatsBus::connect(url, &settings.nats_prefix, settings.startup_timeout).await?,
        )),
        None => {
            tracing::info!(
                "using the in-process bus: events reach subscribers of this process only"
            );
            Ok(Arc::new(MemoryBus::new()))
        }
    }
}

async fn prune_forever(
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    retention: Retention,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
    loop {
        tick.tick().await;
        match store.prune(retention).await {
            Ok(0) => {}
            Ok(n) => {
                metrics.events_pruned.inc_by(n);
                tracing::info!(events = n, "retention pruned events");
            }
            Err(e) => {
                metrics.store_errors.inc();
                tracing::warn!(error = %e, "retention pruning failed; will retry");
            }
        }
    }
}
