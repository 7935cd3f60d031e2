//! Starting and stopping a service: bind, serve the routes, stop gracefully.

use std::{net::TcpListener, rc::Rc, time::Duration};

use actix_http::{HttpService, KeepAlive};
use actix_service::{
    IntoServiceFactory, ServiceFactory, ServiceFactoryExt, fn_factory, fn_service, map_config,
};
use actix_web::{
    App, Error, HttpResponse,
    body::{BoxBody, MessageBody},
    dev::{AppConfig, Server, ServerHandle, ServiceRequest, ServiceResponse},
    http::{Method, StatusCode, header},
    middleware::{Next, from_fn},
    web,
};
use futures_util::future::BoxFuture;
use tracing::Instrument;

use crate::{
    config::Settings,
    context::Context,
    error::ApiError,
    front::{AnswerRoute, Front, StreamRoute},
    http,
    metrics::Metrics,
    ops,
    shutdown::Shutdown,
    telemetry,
};

/// What a service serves: its actix-web routes, and those of them that the
/// connection front serves on the socket (see [`crate::front`]). The
/// all-in-one binary merges every service's.
#[derive(Clone, Default)]
pub struct Routes {
    services: Vec<fn(&mut web::ServiceConfig)>,
    streams: Vec<StreamRoute>,
    answers: Vec<AnswerRoute>,
}

impl Routes {
    pub fn new() -> Routes {
        Routes::default()
    }

    /// Adds routes mounted in actix-web.
    pub fn service(mut self, configure: fn(&mut web::ServiceConfig)) -> Routes {
        self.services.push(configure);
        self
    }

    /// Serves `route` on the socket itself when a connection opens with it;
    /// its actix-web route must be mounted too (by a [`Routes::service`]).
    pub fn stream(mut self, route: StreamRoute) -> Routes {
        self.streams.push(route);
        self
    }

    /// Answers `route`'s requests on the socket itself, on a fresh
    /// connection and on the kept-alive requests after it; its actix-web
    /// route must be mounted too (by a [`Routes::service`]).
    pub fn answer(mut self, route: AnswerRoute) -> Routes {
        self.answers.push(route);
        self
    }

    /// Adds everything `other` serves.
    pub fn merge(mut self, other: Routes) -> Routes {
        self.services.extend(other.services);
        self.streams.extend(other.streams);
        self.answers.extend(other.answers);
        self
    }

    fn configure(&self, cfg: &mut web::ServiceConfig) {
        for configure in &self.services {
            configure(cfg);
        }
    }
}

/// How long a client may take to send a request head, and to close after
/// the server's last response (actix-web's defaults).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(1);

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
    /// and `routes`.
    pub fn build(ctx: Context, routes: Routes) -> anyhow::Result<Application> {
        let listener = TcpListener::bind(&ctx.settings.bind)
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", ctx.settings.bind))?;
        let addr = listener.local_addr()?;
        let workers = ctx
            .settings
            .http_workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
        let shutdown = ctx.shutdown.clone();
        let builder = Server::build()
            .workers(workers)
            .shutdown_timeout(ctx.settings.shutdown_timeout.as_secs().max(1))
            // run_service handles SIGTERM/SIGINT itself, to signal long-lived
            // responses before the server stops.
            .disable_signals();
        let graceful = builder.graceful_shutdown_signal();
        let server = builder
            .listen("realtime-http", listener, move || {
                let data = web::Data::new(ctx.clone());
                let (streams, answers) = match ctx.settings.direct_streams {
                    true => (routes.streams.clone(), routes.answers.clone()),
                    false => (Vec::new(), Vec::new()),
                };
                let routes = routes.clone();
                let app = App::new()
                    .app_data(data)
                    .app_data(web::QueryConfig::default().error_handler(|e, _| {
                        ApiError::bad_request("invalid_query", e.to_string()).into()
                    }))
                    .app_data(web::PathConfig::default().error_handler(|e, _| {
                        ApiError::bad_request("invalid_path", e.to_string()).into()
                    }))
                    .wrap(from_fn(cors))
                    .wrap(from_fn(observe))
                    .configure(ops::configure)
                    .configure(move |cfg| routes.configure(cfg))
                    .default_service(web::to(http::not_found));
                let app = app
                    .into_factory()
                    .map_err(|err: Error| err.error_response());
                let graceful = graceful.clone();
                let http = HttpService::build()
                    .graceful_shutdown_signal(move || {
                        let signal = graceful.clone();
                        async move { signal.notified().await }
                    })
                    .keep_alive(KeepAlive::default())
                    .client_request_timeout(REQUEST_TIMEOUT)
                    .client_disconnect_timeout(DISCONNECT_TIMEOUT)
                    .local_addr(addr)
                    .finish(map_config(app, |()| AppConfig::default()));
                let front = Rc::new(Front::new(ctx.clone(), streams, answers, REQUEST_TIMEOUT));
                let tuning = Tuning::from_settings(&ctx.settings);
                fn_factory(move || {
                    let http = http.new_service(());
                    let front = front.clone();
                    async move {
                        let http = Rc::new(http.await?);
                        Ok::<_, ()>(fn_service(move |io: actix_web::rt::net::TcpStream| {
                            tune_socket(&io, &tuning);
                            front.clone().connection(io, http.clone())
                        }))
                    }
                })
            })?
            .run();
        Ok(Application {
            server,
            port: addr.port(),
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
pub async fn run_service(
    name: &'static str,
    settings: Settings,
    routes: Routes,
) -> anyhow::Result<()> {
    run_service_with(name, settings, routes, Vec::new()).await
}

/// [`run_service`] with [`Worker`]s beside the server.
pub async fn run_service_with(
    name: &'static str,
    settings: Settings,
    routes: Routes,
    workers: Vec<Worker>,
) -> anyhow::Result<()> {
    let _telemetry = telemetry::init(name, &settings, "info")?;
    let ctx = Context::connect(settings).await?;
    let (store, bus, bind) = (ctx.store.kind(), ctx.bus.kind(), ctx.settings.bind.clone());
    let (shutdown, shutdown_timeout) = (ctx.shutdown.clone(), ctx.settings.shutdown_timeout);
    let detached = ctx.detached.clone();
    let running: Vec<_> = workers
        .into_iter()
        .map(|worker| tokio::spawn(worker(ctx.clone())))
        .collect();
    let app = Application::build(ctx, routes)?;
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
    detached.close();
    let drained = tokio::time::timeout(
        shutdown_timeout,
        futures_util::future::join(futures_util::future::join_all(running), detached.wait()),
    );
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
    let span = request_span(req.method(), &route, req.headers());
    let metrics = req
        .app_data::<web::Data<Context>>()
        .map(|ctx| ctx.metrics.clone());
    let res = next.call(req).instrument(span.clone()).await?;
    request_done(&span, metrics.as_deref(), &route, res.status());
    Ok(res)
}

/// A request's span, child of the caller's W3C trace context (the
/// middleware's and the connection front's).
pub(crate) fn request_span(
    method: &Method,
    route: &str,
    headers: &header::HeaderMap,
) -> tracing::Span {
    let span = tracing::info_span!(
        "http.request",
        http.method = %method,
        http.route = %route,
        http.status = tracing::field::Empty,
    );
    telemetry::set_parent_from_headers(&span, headers);
    span
}

/// Records a request's answer on its span, in the debug log and in
/// `rt_http_requests_total`.
pub(crate) fn request_done(
    span: &tracing::Span,
    metrics: Option<&Metrics>,
    route: &str,
    status: StatusCode,
) {
    span.record("http.status", status.as_u16());
    tracing::debug!(parent: span, status = status.as_u16(), "request done");
    if let Some(metrics) = metrics {
        metrics
            .http_requests
            .with_label_values(&[route, status.as_str()])
            .inc();
    }
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

/// Whether a request's `Origin` may read responses (`--cors-origins`):
/// the value for `Access-Control-Allow-Origin`, and whether credentials are
/// allowed. Listed origins are echoed with credentials allowed (cookies
/// carry tokens); `*` allows any origin without credentials.
pub(crate) fn cors_allow(
    origins: &[String],
    headers: &header::HeaderMap,
) -> Option<(String, bool)> {
    let origin = headers.get(header::ORIGIN)?.to_str().ok()?;
    if origins.iter().any(|o| o == origin) {
        Some((origin.to_owned(), true))
    } else if origins.iter().any(|a| a == "*") {
        Some(("*".to_owned(), false))
    } else {
        None
    }
}

/// The CORS headers of a response to an allowed origin.
pub(crate) fn put_cors_headers(headers: &mut header::HeaderMap, origin: &str, credentials: bool) {
    // unwrap: origins come from a valid header or the "*" literal
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        header::HeaderValue::from_str(origin).expect("valid origin header"),
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

/// CORS for browsers on other origins (see [`cors_allow`]).
async fn cors(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, Error> {
    let allow = match req.app_data::<web::Data<Context>>() {
        Some(ctx) => cors_allow(&ctx.settings.cors_origins, req.headers()),
        None => None,
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
        put_cors_headers(res.headers_mut(), &origin, credentials);
    }
    Ok(res)
}

/// The socket options every accepted connection gets.
#[derive(Debug, Clone, Copy)]
struct Tuning {
    user_timeout: Duration,
    send_buffer: Option<usize>,
    nodelay: bool,
}

impl Tuning {
    fn from_settings(s: &Settings) -> Tuning {
        Tuning {
            user_timeout: s.tcp_user_timeout,
            send_buffer: s.tcp_send_buffer,
            nodelay: s.tcp_nodelay,
        }
    }
}

/// Per-connection socket options: a stalled reader is dropped by the kernel
/// after `user_timeout` of unacknowledged data, and holds at most
/// `send_buffer` bytes there; with `nodelay`, each write leaves at once
/// instead of waiting for the client's last acknowledgement (at 1,000
/// streams and 100 events/s, p99 fell by a quarter to a third: rt-bench,
/// docs/benchmarks.md).
fn tune_socket(tcp: &actix_web::rt::net::TcpStream, tuning: &Tuning) {
    let socket = socket2::SockRef::from(tcp);
    if tuning.nodelay
        && let Err(e) = socket.set_tcp_nodelay(true)
    {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if !tuning.user_timeout.is_zero()
        && let Err(e) = socket.set_tcp_user_timeout(Some(tuning.user_timeout))
    {
        tracing::debug!(error = %e, "cannot set TCP_USER_TIMEOUT");
    }
    if let Some(size) = tuning.send_buffer
        && let Err(e) = socket.set_send_buffer_size(size)
    {
        tracing::debug!(error = %e, "cannot set SO_SNDBUF");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An accepted socket, tuned as the server tunes it.
    async fn tuned(tuning: Tuning) -> actix_web::rt::net::TcpStream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        drop(client.unwrap());
        let (io, _) = accepted.unwrap();
        tune_socket(&io, &tuning);
        io
    }

    #[tokio::test]
    async fn accepted_sockets_get_nodelay_unless_turned_off() {
        let on = Tuning::from_settings(&Settings::default());
        assert!(on.nodelay, "TCP_NODELAY is the default");
        assert!(tuned(on).await.nodelay().unwrap());
        let off = Tuning {
            nodelay: false,
            ..on
        };
        assert!(!tuned(off).await.nodelay().unwrap());
    }

    #[tokio::test]
    async fn accepted_sockets_get_the_send_buffer_asked_for() {
        let tuning = Tuning {
            send_buffer: Some(64 * 1024),
            ..Tuning::from_settings(&Settings::default())
        };
        let io = tuned(tuning).await;
        // Linux doubles what it is given, for its bookkeeping.
        let size = socket2::SockRef::from(&io).send_buffer_size().unwrap();
        assert!((64 * 1024..=128 * 1024).contains(&size), "SO_SNDBUF {size}");
    }
}
