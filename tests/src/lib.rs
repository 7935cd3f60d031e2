//! Test support: real PostgreSQL databases, NATS subject prefixes, running
//! services on free ports, and a TCP proxy that can cut a connection.
//!
//! Services come from the environment the README's test command prepares
//! (`RT_TEST_DATABASE_URL`, `RT_TEST_NATS_URL`); a test that cannot reach
//! them fails and says how to start them.

pub mod lossy;
pub mod process;
pub mod proxy;
pub mod push_emulator;
pub mod sse;
pub mod ws;

use std::{
    sync::{Arc, Once},
    time::Duration,
};

use rt_core::{
    Context,
    bus::Bus,
    config::Settings,
    server::{Application, StopHandle},
};
use sqlx::{Connection, Executor, PgConnection};

pub use lossy::LossyBus;
pub use process::ServiceProcess;
pub use proxy::TcpProxy;

const HOW_TO_START: &str =
    "start PostgreSQL and NATS with `bash scripts/services.sh` (the README's test command does it)";

/// The Postgres server tests create their databases on.
pub fn postgres_admin_url() -> String {
    std::env::var("RT_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// The NATS server tests use, each under its own subject prefix.
pub fn nats_url() -> String {
    std::env::var("RT_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A subject prefix no other test uses.
pub fn unique_prefix() -> String {
    format!("t{}", uuid::Uuid::new_v4().simple())
}

/// Sets up tracing once per test binary: quiet unless `RT_LOG` is set; spans
/// are always recorded so trace context propagates.
pub fn init_telemetry() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let guard = rt_core::telemetry::init("tests", &Settings::default(), "off")
            .expect("telemetry set up once");
        std::mem::forget(guard);
    });
}

/// A database of its own for one test, dropped when the test ends.
pub struct TestDb {
    pub url: String,
    name: String,
    admin: String,
}

impl TestDb {
    /// A fresh database on the tests' Postgres server.
    pub async fn create() -> TestDb {
        TestDb::create_on(&postgres_admin_url()).await
    }

    /// A fresh database on the server of `admin` (a URL to any database there).
    pub async fn create_on(admin: &str) -> TestDb {
        let admin = admin.to_owned();
        let mut conn = PgConnection::connect(&admin).await.unwrap_or_else(|e| {
            panic!("PostgreSQL is not reachable at {admin}: {e}; {HOW_TO_START}")
        });
        let name = format!("rt_test_{}", uuid::Uuid::new_v4().simple());
        conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .expect("create test database");
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        TestDb {
            url: format!("{base}/{name}"),
            name,
            admin,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A direct connection, for checking what was committed.
    pub async fn connect(&self) -> PgConnection {
        PgConnection::connect(&self.url)
            .await
            .expect("connect to test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (name, admin) = (self.name.clone(), self.admin.clone());
        // Drop runs inside the test's runtime: use a thread with its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let mut conn = PgConnection::connect(&admin).await?;
                conn.execute(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .await?;
                Ok::<_, sqlx::Error>(())
            })
            .map_err(std::io::Error::other)
        })
        .join();
    }
}

/// A NATS client for watching what services put on the bus.
pub async fn nats_client() -> async_nats::Client {
    let url = nats_url();
    tokio::time::timeout(Duration::from_secs(5), async_nats::connect(&url))
        .await
        .unwrap_or_else(|_| panic!("NATS at {url} did not answer; {HOW_TO_START}"))
        .unwrap_or_else(|e| panic!("NATS is not reachable at {url}: {e}; {HOW_TO_START}"))
}

/// Settings for a service on a free port over Postgres `database_url` and NATS.
pub fn distributed_settings(database_url: &str, prefix: &str) -> Settings {
    Settings {
        bind: "127.0.0.1:0".into(),
        database_url: Some(database_url.to_owned()),
        nats_url: Some(nats_url()),
        nats_prefix: prefix.to_owned(),
        http_workers: Some(2),
        db_acquire_timeout: Duration::from_secs(2),
        startup_timeout: Duration::from_secs(10),
        ..Settings::default()
    }
}

/// Settings for the embedded default (SQLite in `dir`, in-process bus) on a free port.
pub fn embedded_settings(dir: &std::path::Path) -> Settings {
    Settings {
        bind: "127.0.0.1:0".into(),
        data_dir: dir.to_owned(),
        http_workers: Some(2),
        ..Settings::default()
    }
}

/// Which engines a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engines {
    /// Postgres + NATS, as deployed.
    Distributed,
    /// SQLite + in-process bus, as `realtime` runs with no flags.
    Embedded,
}

/// A service running on a free port, stopped when dropped.
pub struct TestApp {
    pub base: String,
    pub ctx: Context,
    pub http: reqwest::Client,
    pub prefix: String,
    pub db: Option<TestDb>,
    handle: StopHandle,
    _dir: Option<TempDir>,
}

impl TestApp {
    /// Starts the all-in-one routes on the given engines, with `tweak` applied
    /// to the settings.
    pub async fn spawn(engines: Engines, tweak: impl FnOnce(&mut Settings)) -> TestApp {
        Self::spawn_wrapped(engines, tweak, |bus| bus).await
    }

    /// Like [`TestApp::spawn`], with the bus replaced by what `wrap_bus`
    /// makes of it (a [`LossyBus`], say).
    pub async fn spawn_wrapped(
        engines: Engines,
        tweak: impl FnOnce(&mut Settings),
        wrap_bus: impl FnOnce(Arc<dyn Bus>) -> Arc<dyn Bus>,
    ) -> TestApp {
        init_telemetry();
        let prefix = unique_prefix();
        let (mut settings, db, dir) = match engines {
            Engines::Distributed => {
                let db = TestDb::create().await;
                (distributed_settings(&db.url, &prefix), Some(db), None)
            }
            Engines::Embedded => {
                let dir = TempDir::new();
                (embedded_settings(&dir.0), None, Some(dir))
            }
        };
        tweak(&mut settings);
        let store = rt_core::context::open_store(&settings)
            .await
            .expect("open the store");
        let bus = wrap_bus(
            rt_core::context::open_bus(&settings)
                .await
                .expect("open the bus"),
        );
        let ctx = Context::new(settings, store, bus).expect("service context");
        Self::serve(ctx, prefix, db, dir)
    }

    /// Serves an already built context (tests that wrap the store or bus).
    pub fn serve(
        ctx: Context,
        prefix: String,
        db: Option<TestDb>,
        dir: Option<TempDir>,
    ) -> TestApp {
        let app = Application::build(ctx.clone(), realtime::routes()).expect("bind");
        let base = format!("http://127.0.0.1:{}", app.port());
        let handle = app.stop_handle();
        tokio::spawn(app.run_until_stopped());
        TestApp {
            base,
            ctx,
            http: reqwest::Client::new(),
            prefix,
            db,
            handle,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `POST /v1/topics/{topic}/events` with a JSON body.
    pub async fn publish(&self, topic: &str, body: &serde_json::Value) -> reqwest::Response {
        self.http
            .post(self.url(&format!("/v1/topics/{topic}/events")))
            .json(body)
            .send()
            .await
            .expect("publish request")
    }

    /// Publishes `data` and returns its seq, failing the test on any error.
    pub async fn publish_ok(&self, topic: &str, data: serde_json::Value) -> u64 {
        let res = self
            .publish(topic, &serde_json::json!({"data": data}))
            .await;
        let status = res.status();
        let body: serde_json::Value = res.json().await.expect("JSON answer");
        assert_eq!(status, 201, "publish to {topic} failed: {body}");
        body["seq"].as_u64().expect("seq in answer")
    }

    /// `GET path`: the status and the JSON answer (`Null` when there is no body).
    pub async fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        let res = self
            .http
            .get(self.url(path))
            .send()
            .await
            .expect("GET request");
        let status = res.status().as_u16();
        let body = res.bytes().await.expect("answer body");
        let json = if body.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&body).expect("JSON answer")
        };
        (status, json)
    }

    /// Polls one topic after `after`, waiting up to `wait` seconds: the seqs
    /// returned and `next`. Fails the test on anything but 200.
    pub async fn poll(&self, topic: &str, after: u64, wait: u32) -> (Vec<u64>, u64) {
        let (status, body) = self
            .get_json(&format!(
                "/v1/topics/{topic}/events?after={after}&wait={wait}&limit=1000"
            ))
            .await;
        assert_eq!(status, 200, "poll of {topic} failed: {body}");
        (seqs(&body), body["next"].as_u64().expect("next in answer"))
    }

    /// Runs the push dispatcher's delivery engine on this app's context, as
    /// `realtime` and `push-dispatcher` do beside their servers. It stops
    /// with the app (its shutdown signal).
    pub fn start_dispatcher(&self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(rt_push_dispatcher::run(self.ctx.clone()))
    }

    /// A handle that stops the server (shutdown signal first).
    pub fn stop_handle(&self) -> StopHandle {
        self.handle.clone()
    }

    /// A raw socket to the server with a 4 KiB receive buffer, that has sent
    /// `GET path` with `extra` headers (each ending in CRLF): a client that
    /// can stop reading whenever the test likes.
    pub async fn raw_get(&self, path: &str, extra: &str) -> tokio::net::TcpStream {
        use tokio::io::AsyncWriteExt;
        let addr = self.base.trim_start_matches("http://").to_owned();
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("receive buffer");
        let mut tcp = socket
            .connect(addr.parse().expect("address"))
            .await
            .expect("connect");
        tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}\r\n").as_bytes())
            .await
            .expect("send request");
        tcp
    }

    /// Publishes `batches` batch requests of 100 events to `topic`, each event
    /// padded to about `pad` bytes.
    pub async fn publish_padded(&self, topic: &str, batches: usize, pad: usize) {
        let big = "x".repeat(pad);
        for chunk in 0..batches {
            let batch: Vec<serde_json::Value> = (0..100)
                .map(|i| serde_json::json!({"topic": topic, "data": {"i": chunk * 100 + i, "pad": big}}))
                .collect();
            let res = self
                .http
                .post(self.url("/v1/events"))
                .json(&batch)
                .send()
                .await
                .expect("batch publish");
            assert_eq!(res.status(), 201);
        }
    }

    /// Stops the server, finishing requests in flight.
    pub async fn stop(&self) {
        self.handle.stop(true).await;
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let handle = self.handle.clone();
        // Stopping is async: let the runtime finish it (or drop it with the test).
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { handle.stop(false).await });
        }
    }
}

/// Request headers that ask for a WebSocket upgrade (for [`TestApp::raw_get`]).
pub const WS_UPGRADE_HEADERS: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\n\
    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";

/// The HS256 secret tests give services as `--jwt-secret`.
pub const JWT_SECRET: &str = "a-test-secret-of-32-bytes-length";

/// An HS256 token signed with `secret`: `claims` (`sub`, `subscribe`,
/// `publish`, ...) plus an `exp` `valid_for` seconds from now (negative:
/// already expired).
pub fn jwt(secret: &str, valid_for: i64, mut claims: serde_json::Value) -> String {
    claims["exp"] = (chrono::Utc::now().timestamp() + valid_for).into();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("token encodes")
}

/// The seqs of a poll answer's `events`.
pub fn seqs(body: &serde_json::Value) -> Vec<u64> {
    body["events"]
        .as_array()
        .expect("events in answer")
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq in event"))
        .collect()
}

/// A temporary directory removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let dir = std::env::temp_dir().join(format!("rt-test-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Default for TempDir {
    fn default() -> Self {
        TempDir::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Reads a JSON error body and returns its `code`, failing if it is not
/// the contract's `{"error": {"code", "message"}}`.
pub async fn error_code(res: reqwest::Response) -> (u16, String) {
    let status = res.status().as_u16();
    let body: serde_json::Value = res.json().await.expect("error answer is JSON");
    let code = body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error.code in {body}"))
        .to_owned();
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "no error.message in {body}"
    );
    (status, code)
}
