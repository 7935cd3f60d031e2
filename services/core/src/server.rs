//! Starting and stopping a service: bind, serve the routes, stop gracefully.

use std::net::TcpListener;

use actix_web::{
    App, Error, HttpServer,
    body::MessageBody,
    dev::{Server, ServerHandle, ServiceRequest, ServiceResponse},
    middleware::{Next, from_fn},
    web,
};
use tracing::Instrument;

use crate::{config::Settings, context::Context, error::ApiError, http, ops, telemetry};

/// A bound, not yet running server. Bind to port 0 and read [`Application::port`]
/// to serve on a free port (tests do).
pub struct Application {
    server: Server,
    port: u16,
}

impl Application {
    /// Binds `ctx.settings.bind` and prepares the server with the ops routes
    /// and the routes `configure` adds.
    pub fn build<F>(ctx: Context, configure: F) -> anyhow::Result<Application>
    where
        F: Fn(&mut web::ServiceConfig) + Send + Clone + 'static,
    {
        let listener = TcpListener::bind(&ctx.settings.bind)
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", ctx.settings.bind))?;
        let port = listener.local_addr()?.port();
        let workers = ctx
            .settings
            .http_workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
        let shutdown = ctx.settings.shutdown_timeout.as_secs().max(1);
        let data = web::Data::new(ctx);
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .app_data(web::QueryConfig::default().error_handler(|e, _| {
                    ApiError::bad_request("invalid_query", e.to_string()).into()
                }))
                .app_data(web::PathConfig::default().error_handler(|e, _| {
                    ApiError::bad_request("invalid_path", e.to_string()).into()
                }))
                .wrap(from_fn(observe))
                .configure(ops::configure)
                .configure(configure.clone())
                .default_service(web::to(http::not_found))
        })
        .workers(workers)
        .shutdown_timeout(shutdown)
        .listen(listener)?
        .run();
        Ok(Application { server, port })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server from elsewhere (`handle().stop(true)` drains first).
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// Serves until SIGTERM/SIGINT or [`ServerHandle::stop`], draining requests
    /// in flight up to the shutdown timeout.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await
    }
}

/// What every service's `main` does: telemetry, connect, bind, serve.
pub async fn run_service<F>(
    name: &'static str,
    settings: Settings,
    configure: F,
) -> anyhow::Result<()>
where
    F: Fn(&mut web::ServiceConfig) + Send + Clone + 'static,
{
    let _telemetry = telemetry::init(name, &settings, "info")?;
    let ctx = Context::connect(settings).await?;
    let (store, bus, bind) = (ctx.store.kind(), ctx.bus.kind(), ctx.settings.bind.clone());
    let app = Application::build(ctx, configure)?;
    let host = bind.rsplit_once(':').map_or(bind.as_str(), |(h, _)| h);
    tracing::info!(
        service = name,
        store,
        bus,
        "listening on http://{host}:{}",
        app.port()
    );
    app.run_until_stopped().await?;
    tracing::info!(service = name, "stopped");
    Ok(())
}

/// Request span (child of the caller's W3C trace context) and request metrics.
async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    let route = req
        .match_pattern()
        .unwrap_or_else(|| "unmatched".to_owned());
    let span = tracing::info_span!(
        "http.request",
        http.method = %req.method(),
        http.route = %route,
        http.status = tracing::field::Empty,
    );
    telemetry::set_parent_from_headers(&span, req.headers());
    let metrics = req
        .app_data::<web::Data<Context>>()
        .map(|ctx| ctx.metrics.clone());
    let res = next.call(req).instrument(span.clone()).await?;
    let status = res.status();
    span.record("http.status", status.as_u16());
    tracing::debug!(parent: &span, status = status.as_u16(), "request done");
    if let Some(metrics) = metrics {
        metrics
            .http_requests
            .with_label_values(&[route.as_str(), status.as_str()])
            .inc();
    }
    Ok(res)
}
