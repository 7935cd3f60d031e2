//! Prometheus metrics of one service process, served at `/metrics`.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// The metrics every service shares. Each [`crate::Context`] has its own
/// registry, so several services in one process (tests) do not collide.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub events_committed: IntCounter,
    pub commit_batch_events: Histogram,
    pub commit_seconds: Histogram,
    pub store_errors: IntCounter,
    pub bus_publish_errors: IntCounter,
    pub events_pruned: IntCounter,
    pub hub_topics: IntGauge,
    pub hub_cache_bytes: IntGauge,
    pub hub_fills: IntCounterVec,
    pub hub_reads: IntCounterVec,
    pub hub_lagged: IntCounter,
    pub streams_open: IntGaugeVec,
    pub streams_closed: IntCounterVec,
    pub streams_direct: IntCounterVec,
    pub requests_direct: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some("rt".into()), None).expect("valid prefix");
        let http_requests = IntCounterVec::new(
            Opts::new(
                "http_requests_total",
                "HTTP requests answered, by route and status",
            ),
            &["route", "status"],
        )
        .expect("valid metric");
        let events_committed =
            IntCounter::new("events_committed_total", "Events committed to the log")
                .expect("valid metric");
        let commit_batch_events = Histogram::with_opts(
            HistogramOpts::new("commit_batch_events", "Events per group commit").buckets(vec![
                1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0,
            ]),
        )
        .expect("valid metric");
        let commit_seconds = Histogram::with_opts(
            HistogramOpts::new("commit_seconds", "Duration of group commits")
                .buckets(prometheus::exponential_buckets(0.0005, 2.0, 14).expect("valid buckets")),
        )
        .expect("valid metric");
        let store_errors =
            IntCounter::new("store_errors_total", "Failed store operations").expect("valid metric");
        let bus_publish_errors = IntCounter::new(
            "bus_publish_errors_total",
            "Committed events the bus failed to carry (readers fill them in from the log)",
        )
        .expect("valid metric");
        let events_pruned = IntCounter::new("events_pruned_total", "Events removed by retention")
            .expect("valid metric");
        let hub_topics = IntGauge::new(
            "hub_topics",
            "Topics the live hub holds a bus subscription for",
        )
        .expect("valid metric");
        let hub_cache_bytes = IntGauge::new(
            "hub_cache_bytes",
            "Bytes the live hub's caches of recent events hold, all topics together (estimated)",
        )
        .expect("valid metric");
        let hub_fills = IntCounterVec::new(
            Opts::new(
                "hub_fills_total",
                "Times the live hub read missed events from the log, by what triggered it",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let hub_reads = IntCounterVec::new(
            Opts::new(
                "hub_reads_total",
                "Reads of recent events, by where they were served from (cache or store)",
            ),
            &["source"],
        )
        .expect("valid metric");
        let hub_lagged = IntCounter::new(
            "hub_lagged_total",
            "Local subscribers that fell behind the live hub and caught up from the log",
        )
        .expect("valid metric");
        let streams_open = IntGaugeVec::new(
            Opts::new(
                "streams_open",
                "Open long-lived connections, by kind (sse, ws)",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let streams_closed = IntCounterVec::new(
            Opts::new(
                "streams_closed_total",
                "Long-lived connections closed by the server, by kind and reason",
            ),
            &["kind", "reason"],
        )
        .expect("valid metric");
        let streams_direct = IntCounterVec::new(
            Opts::new(
                "streams_direct_total",
                "Long-lived responses served on their socket by the connection front, by route \
                 (the others went through the HTTP server: requests after another route's on a \
                 kept-alive connection, and refusals)",
            ),
            &["route"],
        )
        .expect("valid metric");
        let requests_direct = IntCounterVec::new(
            Opts::new(
                "requests_direct_total",
                "Requests answered on their socket by the connection front (long polls, \
                 and the later ones on the same kept-alive connection), by route",
            ),
            &["route"],
        )
        .expect("valid metric");
        for c in [
            Box::new(http_requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(requests_direct.clone()),
            Box::new(events_committed.clone()),
            Box::new(commit_batch_events.clone()),
            Box::new(commit_seconds.clone()),
            Box::new(store_errors.clone()),
            Box::new(bus_publish_errors.clone()),
            Box::new(events_pruned.clone()),
            Box::new(hub_topics.clone()),
            Box::new(hub_cache_bytes.clone()),
            Box::new(hub_fills.clone()),
            Box::new(hub_reads.clone()),
            Box::new(hub_lagged.clone()),
            Box::new(streams_open.clone()),
            Box::new(streams_closed.clone()),
            Box::new(streams_direct.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        Metrics {
            registry,
            http_requests,
            events_committed,
            commit_batch_events,
            commit_seconds,
            store_errors,
            bus_publish_errors,
            events_pruned,
            hub_topics,
            hub_cache_bytes,
            hub_fills,
            hub_reads,
            hub_lagged,
            streams_open,
            streams_closed,
            streams_direct,
            requests_direct,
        }
    }

    /// Registers a service's own metric in this registry.
    pub fn register(&self, c: Box<dyn prometheus::core::Collector>) -> prometheus::Result<()> {
        self.registry.register(c)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // unwrap: encoding into a Vec cannot fail
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("encode metrics");
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
