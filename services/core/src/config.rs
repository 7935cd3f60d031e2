//! Settings shared by every service: CLI flags, each with an environment
//! fallback (`--bind` / `RT_BIND`, `--database-url` / `DATABASE_URL`, ...).
//!
//! Tests build [`Settings`] directly (`Settings { x, ..Settings::default() }`)
//! instead of changing the process environment.

use std::{path::PathBuf, time::Duration};

use clap::Args;

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Args)]
pub struct Settings {
    /// Address to listen on.
    #[arg(long, env = "RT_BIND", default_value = "127.0.0.1:8080")]
    pub bind: String,

    /// Postgres (`postgres://...`) or SQLite (`sqlite://path`) URL of the event
    /// log. Without it: an SQLite file in the data dir (the embedded default).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// NATS server URL(s), comma-separated. Without it: an in-process bus,
    /// which only reaches subscribers inside this process.
    #[arg(long, env = "RT_NATS_URL")]
    pub nats_url: Option<String>,

    /// First token of every NATS subject (`<prefix>.events.<topic>`), so
    /// several deployments can share one NATS.
    #[arg(long, env = "RT_NATS_PREFIX", default_value = "rt")]
    pub nats_prefix: String,

    /// Directory of the embedded default's SQLite file.
    #[arg(long, env = "RT_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,

    /// HS256 shared secret for JWT bearer tokens.
    #[arg(long, env = "RT_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// PEM file with an RS256 (RSA) or ES256 (P-256) public key for JWT bearer tokens.
    #[arg(long, env = "RT_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,

    /// Allow requests without a token when no JWT key is configured, even on a
    /// non-loopback address. Loopback binds allow them without this flag.
    #[arg(long, env = "RT_ALLOW_ANONYMOUS")]
    pub allow_anonymous: bool,

    /// Largest request body (or WebSocket message) accepted, in bytes.
    #[arg(long, env = "RT_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Most events in one batch publish.
    #[arg(long, env = "RT_MAX_BATCH_EVENTS", default_value_t = 1000)]
    pub max_batch_events: usize,

    /// Drop events older than this (e.g. `7d`, `12h`, `30m`). None: keep by age forever.
    #[arg(long, env = "RT_RETENTION_AGE", value_parser = parse_duration)]
    pub retention_age: Option<Duration>,

    /// Keep at most this many events per topic. None: no count limit.
    #[arg(long, env = "RT_RETENTION_COUNT")]
    pub retention_count: Option<u64>,

    /// How often the pruning task applies the retention settings.
    #[arg(long, env = "RT_PRUNE_INTERVAL", value_parser = parse_duration, default_value = "60s")]
    pub prune_interval: Duration,

    /// Most connections to the database.
    #[arg(long, env = "RT_DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,

    /// How long a request waits for a database connection before answering 503.
    #[arg(long, env = "RT_DB_ACQUIRE_TIMEOUT", value_parser = parse_duration, default_value = "5s")]
    pub db_acquire_timeout: Duration,

    /// How long start-up waits for the database and NATS to answer.
    #[arg(long, env = "RT_STARTUP_TIMEOUT", value_parser = parse_duration, default_value = "30s")]
    pub startup_timeout: Duration,

    /// Transactions the group committer runs at once (SQLite always uses one).
    #[arg(long, env = "RT_COMMIT_WORKERS", default_value_t = 4)]
    pub commit_workers: usize,

    /// Most events one group commit takes.
    #[arg(long, env = "RT_COMMIT_MAX_EVENTS", default_value_t = 2000)]
    pub commit_max_events: usize,

    /// Longest `wait` a long poll may ask for.
    #[arg(long, env = "RT_POLL_MAX_WAIT", value_parser = parse_duration, default_value = "60s")]
    pub poll_max_wait: Duration,

    /// Most events one poll may ask for (`limit`).
    #[arg(long, env = "RT_POLL_MAX_LIMIT", default_value_t = 1000)]
    pub poll_max_limit: u32,

    /// Events a poll returns when it gives no `limit`.
    #[arg(long, env = "RT_POLL_DEFAULT_LIMIT", default_value_t = 100)]
    pub poll_default_limit: u32,

    /// `Retry-After` hint, in seconds, on a short poll that found nothing new.
    #[arg(long, env = "RT_POLL_RETRY_AFTER", default_value_t = 1)]
    pub poll_retry_after: u32,

    /// Recent events the live hub keeps per topic, so resumes and long-poll
    /// wake-ups are served without the store.
    #[arg(long, env = "RT_HUB_CACHE_EVENTS", default_value_t = 256)]
    pub hub_cache_events: usize,

    /// Bound on what the live hub's caches hold, all topics together, in
    /// bytes (estimated from each event's JSON). Over it, every topic's
    /// cache gives up its older half until three quarters of the bound are
    /// held; readers then get older events from the store. 0: no cache.
    #[arg(long, env = "RT_HUB_CACHE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub hub_cache_bytes: usize,

    /// Events a local subscriber may fall behind the live hub before it
    /// catches up from the log instead.
    /// The ring holds only the events not yet read by every subscriber, so
    /// the bound costs nothing on an idle topic.
    #[arg(long, env = "RT_HUB_QUEUE", default_value_t = 4096)]
    pub hub_queue: usize,

    /// How long the hub keeps a topic's bus subscription and cache after its
    /// last local subscriber leaves.
    #[arg(long, env = "RT_HUB_LINGER", value_parser = parse_duration, default_value = "30s")]
    pub hub_linger: Duration,

    /// How often the hub compares the store's last seq of every subscribed
    /// topic with what it has delivered (catches a lost last message).
    #[arg(long, env = "RT_HEAD_CHECK_INTERVAL", value_parser = parse_duration, default_value = "2s")]
    pub head_check_interval: Duration,

    /// Most topics one poll, cursor, stream or socket may name.
    #[arg(long, env = "RT_MAX_TOPICS", default_value_t = 100)]
    pub max_topics: usize,

    /// Most SSE streams one process serves at once; more are refused with 503.
    #[arg(long, env = "RT_SSE_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub sse_max_connections: usize,

    /// How often an idle SSE stream gets a heartbeat comment.
    #[arg(long, env = "RT_SSE_HEARTBEAT", value_parser = parse_duration, default_value = "15s")]
    pub sse_heartbeat: Duration,

    /// The `retry:` hint sent at the start of an SSE stream: how long a
    /// browser waits before reconnecting.
    #[arg(long, env = "RT_SSE_RETRY", value_parser = parse_duration, default_value = "2s")]
    pub sse_retry: Duration,

    /// Origins allowed to call the APIs from a browser (CORS), comma-separated,
    /// e.g. `https://app.example.com`; `*` allows any origin. Credentials
    /// (cookies) are allowed for the listed origins. Empty: no CORS headers.
    #[arg(long, env = "RT_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,

    /// Most WebSocket connections one process holds; more are refused with 503.
    #[arg(long, env = "RT_WS_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub ws_max_connections: usize,

    /// Frames waiting to be written to one WebSocket; a client that lets
    /// more pile up is closed as too slow (it resubscribes with `after`).
    #[arg(long, env = "RT_WS_QUEUE", default_value_t = 1024)]
    pub ws_queue: usize,

    /// How often the server pings an idle WebSocket.
    #[arg(long, env = "RT_WS_PING_INTERVAL", value_parser = parse_duration, default_value = "20s")]
    pub ws_ping_interval: Duration,

    /// A WebSocket that sends nothing (not even a pong) for this long is closed.
    #[arg(long, env = "RT_WS_IDLE_TIMEOUT", value_parser = parse_duration, default_value = "60s")]
    pub ws_idle_timeout: Duration,

    /// Publishes per second one WebSocket may make (bursts up to the same number).
    #[arg(long, env = "RT_WS_PUBLISH_RATE", default_value_t = 100)]
    pub ws_publish_rate: u32,

    /// Close a connection whose sent data stays unacknowledged this long (a
    /// client that stopped reading); 0 turns it off (TCP_USER_TIMEOUT, Linux).
    #[arg(long, env = "RT_TCP_USER_TIMEOUT", value_parser = parse_duration, default_value = "30s")]
    pub tcp_user_timeout: Duration,

    /// Kernel send buffer per connection, in bytes (SO_SNDBUF), bounding what
    /// a stalled client holds. None: the kernel's autotuning.
    #[arg(long, env = "RT_TCP_SEND_BUFFER")]
    pub tcp_send_buffer: Option<usize>,

    /// Send each write at once (TCP_NODELAY) instead of holding small
    /// segments until the client acknowledges the last one (Nagle's
    /// algorithm), which can add a round trip (or a delayed ACK, up to
    /// 40 ms) to an event that follows another closely. Streams already
    /// gather what is ready into one write.
    #[arg(long, env = "RT_TCP_NODELAY", default_value_t = true, action = clap::ArgAction::Set)]
    pub tcp_nodelay: bool,

    /// Serve SSE streams and WebSocket upgrades that open a connection on
    /// the socket directly, without the HTTP server's per-connection buffers
    /// (about 11 KiB less per idle stream); `false` sends every request
    /// through the HTTP server.
    #[arg(long, env = "RT_DIRECT_STREAMS", default_value_t = true, action = clap::ArgAction::Set)]
    pub direct_streams: bool,

    /// HTTP worker threads (default: one per core).
    #[arg(long, env = "RT_HTTP_WORKERS")]
    pub http_workers: Option<usize>,

    /// How long a stopping server waits for requests in flight.
    #[arg(long, env = "RT_SHUTDOWN_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    pub shutdown_timeout: Duration,

    /// VAPID private key of Web Push: the raw 32-byte P-256 scalar, base64url
    /// without padding, or a PEM P-256 key (`EC PRIVATE KEY` or PKCS#8
    /// `PRIVATE KEY`). None: one is generated once and kept in the store.
    #[arg(long, env = "RT_VAPID_PRIVATE_KEY", hide_env_values = true)]
    pub vapid_private_key: Option<String>,

    /// Contact put in every VAPID token (`sub` claim): a `mailto:` or
    /// `https://` URL the push services can reach the operator at.
    #[arg(long, env = "RT_VAPID_SUBJECT", value_parser = parse_vapid_subject, default_value = "mailto:admin@localhost")]
    pub vapid_subject: String,

    /// Accept `http://` push endpoints (a local push-service emulator, tests).
    /// Browsers' push services always use `https://`.
    #[arg(long, env = "RT_PUSH_ALLOW_INSECURE_ENDPOINTS")]
    pub push_allow_insecure_endpoints: bool,

    /// Send to push endpoints on loopback, private, link-local and other
    /// non-public addresses (a push service inside your own network, a local
    /// emulator). Off: such endpoints are refused at registration when the
    /// address is literal, and at sending time when a name resolves to one.
    #[arg(long, env = "RT_PUSH_ALLOW_PRIVATE_ADDRESSES")]
    pub push_allow_private_addresses: bool,

    /// Web Push messages in flight at once, over every push service.
    #[arg(long, env = "RT_PUSH_CONCURRENCY", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub push_concurrency: u32,

    /// Web Push messages in flight at once to one push-service host, so one
    /// slow push service cannot hold up the others.
    #[arg(long, env = "RT_PUSH_HOST_CONCURRENCY", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub push_host_concurrency: u32,

    /// How long a dispatcher owns the deliveries it claimed: when it dies,
    /// another replica retries them after this. Longer than a request may take.
    #[arg(long, env = "RT_PUSH_LEASE", value_parser = parse_duration, default_value = "60s")]
    pub push_lease: Duration,

    /// Timeout of one request to a push service.
    #[arg(long, env = "RT_PUSH_REQUEST_TIMEOUT", value_parser = parse_duration, default_value = "15s")]
    pub push_request_timeout: Duration,

    /// Attempts before a delivery that keeps failing (429, 5xx, network) is
    /// given up as failed.
    #[arg(long, env = "RT_PUSH_MAX_ATTEMPTS", default_value_t = 12, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub push_max_attempts: u32,

    /// First retry delay; it doubles with each attempt (with jitter), up to 10 min.
    #[arg(long, env = "RT_PUSH_RETRY_BASE", value_parser = parse_duration, default_value = "1s")]
    pub push_retry_base: Duration,

    /// Default `TTL` of Web Push messages: how long the push service keeps a
    /// message for an offline browser. An event's own `push.ttl` wins.
    #[arg(long, env = "RT_PUSH_TTL", value_parser = parse_duration, default_value = "1d")]
    pub push_ttl: Duration,

    /// Default `Urgency` of Web Push messages: very-low, low, normal or high.
    /// An event's own `push.urgency` wins.
    #[arg(long, env = "RT_PUSH_URGENCY", value_parser = crate::event::parse_urgency, default_value = "normal")]
    pub push_urgency: String,

    /// How often the dispatcher looks for undelivered work even when NATS is
    /// quiet (a lost wake-up, another replica's crash).
    #[arg(long, env = "RT_PUSH_SWEEP_INTERVAL", value_parser = parse_duration, default_value = "5s")]
    pub push_sweep_interval: Duration,

    /// How long finished deliveries (delivered or failed) stay queryable.
    #[arg(long, env = "RT_PUSH_OUTCOME_RETENTION", value_parser = parse_duration, default_value = "1d")]
    pub push_outcome_retention: Duration,

    /// Log format.
    #[arg(long, env = "RT_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// OTLP/HTTP endpoint for trace export (e.g. `http://127.0.0.1:4318`). None: no export.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            bind: "127.0.0.1:8080".into(),
            database_url: None,
            nats_url: None,
            nats_prefix: "rt".into(),
            data_dir: "data".into(),
            jwt_secret: None,
            jwt_public_key: None,
            allow_anonymous: false,
            max_body_bytes: 1024 * 1024,
            max_batch_events: 1000,
            retention_age: None,
            retention_count: None,
            prune_interval: Duration::from_secs(60),
            db_max_connections: 16,
            db_acquire_timeout: Duration::from_secs(5),
            startup_timeout: Duration::from_secs(30),
            commit_workers: 4,
            commit_max_events: 2000,
            poll_max_wait: Duration::from_secs(60),
            poll_max_limit: 1000,
            poll_default_limit: 100,
            poll_retry_after: 1,
            hub_cache_events: 256,
            hub_cache_bytes: 64 * 1024 * 1024,
            hub_queue: 4096,
            hub_linger: Duration::from_secs(30),
            head_check_interval: Duration::from_secs(2),
            max_topics: 100,
            sse_max_connections: 10_000,
            sse_heartbeat: Duration::from_secs(15),
            sse_retry: Duration::from_secs(2),
            cors_origins: Vec::new(),
            ws_max_connections: 10_000,
            ws_queue: 1024,
            ws_ping_interval: Duration::from_secs(20),
            ws_idle_timeout: Duration::from_secs(60),
            ws_publish_rate: 100,
            tcp_user_timeout: Duration::from_secs(30),
            tcp_send_buffer: None,
            tcp_nodelay: true,
            direct_streams: true,
            http_workers: None,
            shutdown_timeout: Duration::from_secs(10),
            vapid_private_key: None,
            vapid_subject: "mailto:admin@localhost".into(),
            push_allow_insecure_endpoints: false,
            push_allow_private_addresses: false,
            push_concurrency: 128,
            push_host_concurrency: 32,
            push_lease: Duration::from_secs(60),
            push_request_timeout: Duration::from_secs(15),
            push_max_attempts: 12,
            push_retry_base: Duration::from_secs(1),
            push_ttl: Duration::from_secs(86_400),
            push_urgency: "normal".into(),
            push_sweep_interval: Duration::from_secs(5),
            push_outcome_retention: Duration::from_secs(86_400),
            log_format: LogFormat::Text,
            otlp_endpoint: None,
        }
    }
}

impl Settings {
    /// Whether `bind` is a loopback address (127.0.0.0/8, ::1 or localhost).
    pub fn binds_loopback(&self) -> bool {
        let host = match self.bind.rsplit_once(':') {
            Some((host, _)) => host.trim_start_matches('[').trim_end_matches(']'),
            None => self.bind.as_str(),
        };
        host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

/// Checks a VAPID subject: a `mailto:` or `https:` URL (RFC 8292, section 2.1).
pub fn parse_vapid_subject(s: &str) -> Result<String, String> {
    let s = s.trim();
    let rest = s
        .strip_prefix("mailto:")
        .or_else(|| s.strip_prefix("https://"))
        .ok_or_else(|| format!("{s:?} is neither a mailto: nor an https:// URL"))?;
    if rest.is_empty() || rest.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{s:?} is not a usable contact URL"));
    }
    Ok(s.to_owned())
}

/// Parses `250ms`, `30s`, `5m`, `12h`, `7d` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 5m, 12h or 7d"))?;
    let secs = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?}; use ms, s, m, h or d"
            ));
        }
    };
    Ok(Duration::from_secs(n * secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        settings: Settings,
    }

    #[test]
    fn defaults_match_the_flags_defaults() {
        // Guards against the two lists of defaults drifting apart. Only valid
        // when no RT_* variable is set in the test environment.
        if std::env::vars().any(|(k, _)| k.starts_with("RT_") || k == "DATABASE_URL") {
            return;
        }
        let parsed = Cli::try_parse_from(["x"]).unwrap().settings;
        assert_eq!(parsed, Settings::default());
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("12"), Ok(Duration::from_secs(12)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5y").is_err());
    }

    #[test]
    fn vapid_subjects_are_mailto_or_https() {
        assert_eq!(
            parse_vapid_subject("mailto:ops@example.com").as_deref(),
            Ok("mailto:ops@example.com")
        );
        assert!(parse_vapid_subject("https://example.com/contact").is_ok());
        assert!(parse_vapid_subject(&Settings::default().vapid_subject).is_ok());
        for bad in [
            "ops@example.com",
            "http://example.com",
            "mailto:",
            "mailto:a b",
        ] {
            assert!(parse_vapid_subject(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn loopback_binds_are_recognised() {
        for (bind, want) in [
            ("127.0.0.1:8080", true),
            ("localhost:80", true),
            ("[::1]:8080", true),
            ("0.0.0.0:8080", false),
            ("10.1.2.3:8080", false),
        ] {
            let s = Settings {
                bind: bind.into(),
                ..Settings::default()
            };
            assert_eq!(s.binds_loopback(), want, "{bind}");
        }
    }
}
