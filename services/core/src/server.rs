//! Starting and stopping a service: bind, serve the routes, stop gracefully.

use std::net::TcpListener;

use actix_web::{
    App, Error, HttpResponse, HttpServer,
    body::{BoxBody, MessageBody},
    dev::{Server, ServerHandle, ServiceRequest, ServiceResponse},
    http::{Method, header},
    middleware::{Next, from_fn},
    web,
};
use futures_util::future::BoxFuture;
use tracing::Instrument;

use crate::{
    config::Settings, context::Context, error::ApiError, http, ops, shutdown::Shutdown, telemetry,
};

/// A bound, not yet running server. Bind to port 0 and read [`Application::port`]
/// to serve on a free port (tests do).
pub struct Application {
    server: Server,
    port: u16,
    shutdown: Shutdown,
}

/// Stops a running [`Application`]: first tells long-lived responses to
/// finish (clients reconnect elsewhere), then stops the server.
#[derive(Clone)]
pub struct StopHandle {
    server: ServerHandle,
    shutdown: Shutdown,
}

impl StopHandle {
    /// With `graceful`, stops accepting and waits for requests in flight (up
    /// to the shutdown timeout); otherwise drops them at once.
    pub async fn stop(&self, graceful: bool) {
        self.shutdown.begin();
        self.server.stop(graceful).await;
    }
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
        let shutdown_secs = ctx.settings.shutdown_timeout.as_secs().max(1);
        let shutdown = ctx.shutdown.clone();
        let (user_timeout, send_buffer) =
            (ctx.settings.tcp_user_timeout, ctx.settings.tcp_send_buffer);
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
                .wrap(from_fn(cors))
                .wrap(from_fn(observe))
                .configure(ops::configure)
                .configure(configure.clone())
                .default_service(web::to(http::not_found))
        })
        .on_connect(move |conn, _| tune_socket(conn, user_timeout, send_buffer))
        .workers(workers)
        .shutdown_timeout(shutdown_secs)
        // run_service handles SIGTERM/SIGINT itself, to signal long-lived
        // responses before the server stops.
        .disable_signals()
        .listen(listener)?
        .run();
        Ok(Application {
            server,
            port,
            shutdown,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server from elsewhere.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            server: self.server.handle(),
            shutdown: self.shutdown.clone(),
        }
    }

    /// Serves until stopped through a [`StopHandle`].
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await
    }
}

/// Work a process runs beside its HTTP server (the push dispatcher's
/// delivery engine). It starts with the process's context and must return
/// soon after `ctx.shutdown` has started; the process waits for it up to
/// `--shutdown-timeout` before exiting.
pub type Worker = Box<dyn FnOnce(Context) -> BoxFuture<'static, ()> + Send>;

/// What every service's `main` does: telemetry, connect, bind, serve.
pub async fn run_service<F>(
    name: &'static str,
    settings: Settings,
    configure: F,
) -> anyhow::Result<()>
where
    F: Fn(&mut web::ServiceConfig) + Send + Clone + 'static,
{
    run_service_with(name, settings, configure, Vec::new()).await
}

/// [`run_service`] with [`Worker`]s beside the server.
pub async fn run_service_with<F>(
    name: &'static str,
    settings: Settings,
    configure: F,
    workers: Vec<Worker>,
) -> anyhow::Result<()>
where
    F: Fn(&mut web::ServiceConfig) + Send + Clone + 'static,
{
    let _telemetry = telemetry::init(name, &settings, "info")?;
    let ctx = Context::connect(settings).await?;
    let (store, bus, bind) = (ctx.store.kind(), ctx.bus.kind(), ctx.settings.bind.clone());
    let (shutdown, shutdown_timeout) = (ctx.shutdown.clone(), ctx.settings.shutdown_timeout);
    let running: Vec<_> = workers
        .into_iter()
        .map(|worker| tokio::spawn(worker(ctx.clone())))
        .collect();
    let app = Application::build(ctx, configure)?;
    let host = bind.rsplit_once(':').map_or(bind.as_str(), |(h, _)| h);
    tracing::info!(
        service = name,
        store,
        bus,
        "listening on http://{host}:{}",
        app.port()
    );
    let stop = app.stop_handle();
    tokio::spawn(async move {
        let signal = wait_for_signal().await;
        tracing::info!(
            service = name,
            signal,
            "stopping: long-lived responses are told to reconnect elsewhere"
        );
        stop.stop(true).await;
    });
    let served = app.run_until_stopped().await;
    shutdown.begin();
    let drained = tokio::time::timeout(shutdown_timeout, futures_util::future::join_all(running));
    if drained.await.is_err() {
        tracing::warn!(
            service = name,
            "background work did not finish within --shutdown-timeout; stopping anyway"
        );
    }
    served?;
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

/// Waits for SIGTERM or SIGINT (Ctrl-C); returns which.
async fn wait_for_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::warn!("cannot listen for signals; stop the process with SIGKILL");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    }
}

/// CORS for browsers on other origins (`--cors-origins`). Listed origins are
/// echoed with credentials allowed (cookies carry tokens); `*` allows any
/// origin without credentials.
async fn cors(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, Error> {
    let origins = req
        .app_data::<web::Data<Context>>()
        .map(|ctx| ctx.settings.cors_origins.clone())
        .unwrap_or_default();
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .map(str::to_owned);
    let allow = match origin {
        Some(o) if origins.contains(&o) => Some((o, true)),
        Some(_) if origins.iter().any(|a| a == "*") => Some(("*".to_owned(), false)),
        _ => None,
    };
    let preflight = req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if preflight {
        let Some((origin, credentials)) = allow else {
            let err = ApiError::forbidden("this origin may not call the API (see --cors-origins)");
            return Ok(req.error_response(err));
        };
        let mut res = HttpResponse::NoContent();
        res.insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, origin))
            .insert_header((
                header::ACCESS_CONTROL_ALLOW_METHODS,
                "GET, POST, PUT, DELETE, OPTIONS",
            ))
            .insert_header((header::ACCESS_CONTROL_MAX_AGE, "600"))
            .insert_header((header::VARY, "Origin"));
        if let Some(asked) = req
            .headers()
            .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .cloned()
        {
            res.insert_header((header::ACCESS_CONTROL_ALLOW_HEADERS, asked));
        }
        if credentials {
            res.insert_header((header::ACCESS_CONTROL_ALLOW_CREDENTIALS, "true"));
        }
        return Ok(req.into_response(res.finish()));
    }
    let mut res = next.call(req).await?.map_into_boxed_body();
    if let Some((origin, credentials)) = allow {
        let headers = res.headers_mut();
        // unwrap: origins come from a valid header or the "*" literal
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            header::HeaderValue::from_str(&origin).expect("valid origin header"),
        );
        headers.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            header::HeaderValue::from_static("ETag, Retry-After, Idempotent-Replayed"),
        );
        headers.append(header::VARY, header::HeaderValue::from_static("Origin"));
        if credentials {
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                header::HeaderValue::from_static("true"),
            );
        }
    }
    Ok(res)
}

/// Per-connection socket options: a stalled reader is dropped by the kernel
/// after `user_timeout` of unacknowledged data, and holds at most
/// `send_buffer` bytes there.
fn tune_socket(
    conn: &dyn std::any::Any,
    user_timeout: std::time::Duration,
    send_buffer: Option<usize>,
) {
    let Some(tcp) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() else {
        return;
    };
    let socket = socket2::SockRef::from(tcp);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if !user_timeout.is_zero()
        && let Err(e) = socket.set_tcp_user_timeout(Some(user_timeout))
    {
        tracing::debug!(error = %e, "cannot set TCP_USER_TIMEOUT");
    }
    if let Some(size) = send_buffer
        && let Err(e) = socket.set_send_buffer_size(size)
    {
        tracing::debug!(error = %e, "cannot set SO_SNDBUF");
    }
}
