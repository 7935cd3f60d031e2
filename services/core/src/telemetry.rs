//! Logs and traces, set up in one place.
//!
//! Logs go to stdout as text or JSON (`--log-format`), filtered by `RT_LOG`
//! (default `info`). Spans are exported over OTLP/HTTP when an endpoint is
//! configured. W3C trace context is read from incoming requests and written
//! into NATS headers, so a trace runs from the publish request to the edges.

use std::collections::HashMap;

use opentelemetry::{
    global,
    propagation::{Extractor, TextMapPropagator as _},
    trace::TracerProvider as _,
};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    EnvFilter, Layer as _, filter::LevelFilter, layer::SubscriberExt, util::SubscriberInitExt,
};

use crate::{
    bus::TraceHeaders,
    config::{LogFormat, Settings},
};

/// Flushes and stops trace export when dropped (at the end of `main`).
#[must_use = "dropping the guard stops trace export"]
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("trace export did not shut down cleanly: {e}");
        }
    }
}

/// Installs the global subscriber and tracer provider for `service`. Logs are
/// filtered by `RT_LOG`, else `default_filter`; spans for traces are kept at
/// info level whatever the log filter, so trace context always propagates.
pub fn init(
    service: &'static str,
    settings: &Settings,
    default_filter: &str,
) -> anyhow::Result<TelemetryGuard> {
    global::set_text_map_propagator(TraceContextPropagator::new());
    let mut builder = SdkTracerProvider::builder()
        .with_resource(Resource::builder().with_service_name(service).build());
    if let Some(endpoint) = &settings.otlp_endpoint {
        use opentelemetry_otlp::WithExportConfig as _;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
            .build()
            .map_err(|e| anyhow::anyhow!("cannot set up OTLP export to {endpoint}: {e}"))?;
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();
    global::set_tracer_provider(provider.clone());
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(service))
        .with_filter(LevelFilter::INFO);
    let filter =
        || EnvFilter::try_from_env("RT_LOG").unwrap_or_else(|_| EnvFilter::new(default_filter));
    let registry = tracing_subscriber::registry().with(otel);
    let result = match settings.log_format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(false)
                    .with_filter(filter()),
            )
            .try_init(),
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_filter(filter()))
            .try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("telemetry is already set up: {e}"))?;
    Ok(TelemetryGuard { provider })
}

/// The trace context of the current span, as W3C headers.
pub fn current_trace_headers() -> TraceHeaders {
    let cx = tracing::Span::current().context();
    let mut map = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut map);
    map.into_iter().collect()
}

/// Makes `span` a child of the W3C trace context in `headers`, if any.
pub fn set_parent_from_headers(span: &tracing::Span, headers: &actix_web::http::header::HeaderMap) {
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let _ = span.set_parent(parent);
}

struct HeaderExtractor<'a>(&'a actix_web::http::header::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}
