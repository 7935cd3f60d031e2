//! The server under test, and what the scenarios that measure it share.
//!
//! The all-in-one `realtime` binary runs as a process of its own, next to
//! `rt-bench`, so that its memory and CPU time are read from `/proc` apart
//! from the bench's. With `--distributed`, a [`Deployment`] is two processes
//! instead, over the same database and NATS: the `publisher`, which the HTTP
//! publishes go to, and the edge (`sse-edge`, `ws-edge`), which the clients
//! connect to and whose memory and CPU time are the server's. The scenarios
//! (`sse`, `ws`) publish over HTTP with the same helpers, and their clients
//! report to the run the same way.

use std::{
    collections::VecDeque,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use serde::Deserialize;
use serde_json::json;
use tokio::{
    sync::mpsc::{UnboundedReceiver, UnboundedSender},
    task::JoinSet,
};

/// What the clients (SSE streams, WebSockets) report to the run.
pub(crate) enum Msg {
    /// The client is connected and ready (an SSE stream's 200 and `retry:`
    /// chunk, a WebSocket's subscription ack).
    Opened,
    /// The last event of the latency scenario arrived: its latencies.
    Latency(Box<Latencies>),
    /// The last event of the burst arrived, at that instant.
    Done(Instant),
    /// The client failed; the run fails.
    Failed(String),
}

/// What one client (or, merged, all clients of a run) recorded in the
/// latency scenario, per latency event, in µs.
pub(crate) struct Latencies {
    /// Publish sent (`sent_us`, stamped by the bench) → event parsed by the
    /// client.
    pub(crate) received: Histogram<u32>,
    /// Publish sent → the commit stamp the event carries (`time`, taken by
    /// the publisher just before it commits the event): the part of the
    /// latency that the ceiling does not pay. `None` when the events carry
    /// no commit stamp (the ceiling's carry a fixed one).
    pub(crate) to_commit: Option<Histogram<u32>>,
}

impl Latencies {
    /// None recorded yet; sent → commit times too when `commit_stamped`.
    pub(crate) fn new(commit_stamped: bool) -> anyhow::Result<Latencies> {
        Latencies::with_sigfig(commit_stamped, 2)
    }

    /// [`Latencies::new`], the histograms keeping `sigfig` significant
    /// digits.
    pub(crate) fn with_sigfig(commit_stamped: bool, sigfig: u8) -> anyhow::Result<Latencies> {
        Ok(Latencies {
            received: Histogram::new(sigfig)?,
            to_commit: commit_stamped.then(|| Histogram::new(sigfig)).transpose()?,
        })
    }

    /// Records one latency event, sent at `sent_us` and received at
    /// `received_us`; when commit stamped, its `time` must be there and
    /// read as RFC 3339 (it is not read otherwise).
    pub(crate) fn record(
        &mut self,
        received_us: u64,
        sent_us: u64,
        time: Option<&str>,
    ) -> anyhow::Result<()> {
        if let Some(to_commit) = &mut self.to_commit {
            let time = time.context("the event has no `time` (its commit stamp)")?;
            to_commit.record(to_commit_us(time, sent_us)?)?;
        }
        self.received.record(received_us.saturating_sub(sent_us))?;
        Ok(())
    }

    /// The sent → commit times of a commit-stamped run.
    pub(crate) fn stamped(&self) -> anyhow::Result<&Histogram<u32>> {
        self.to_commit
            .as_ref()
            .context("the clients recorded no sent -> commit times")
    }

    /// Adds a client's latencies to these, which must be commit stamped
    /// alike.
    pub(crate) fn add(&mut self, client: &Latencies) -> anyhow::Result<()> {
        match (&mut self.to_commit, &client.to_commit) {
            (Some(all), Some(one)) => all.add(one)?,
            (None, None) => {}
            (Some(_), None) => {
                anyhow::bail!("a client recorded no sent -> commit times, the events being stamped")
            }
            (None, Some(_)) => anyhow::bail!(
                "a client recorded sent -> commit times, the events carrying no commit stamp"
            ),
        }
        self.received.add(&client.received)?;
        Ok(())
    }

    /// Checks that there is a latency for every one of `delivered`
    /// deliveries, and as many sent → commit times when commit stamped.
    pub(crate) fn check(&self, delivered: u64) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.received.len() == delivered,
            "recorded {} latencies for {delivered} deliveries",
            self.received.len()
        );
        if let Some(to_commit) = &self.to_commit {
            anyhow::ensure!(
                to_commit.len() == delivered,
                "recorded {} sent -> commit times for {delivered} deliveries",
                to_commit.len()
            );
        }
        Ok(())
    }
}

/// Microseconds from `sent_us` (the bench's wall clock, µs since the UNIX
/// epoch) to `time`, an event's commit stamp (RFC 3339, as the publisher
/// writes it: `2026-12-01T17:10:00.123456Z`), taken by the same clock on the
/// same machine; 0 for a stamp before `sent_us` (the clock stepped back).
pub(crate) fn to_commit_us(time: &str, sent_us: u64) -> anyhow::Result<u64> {
    // chrono as sqlx re-exports it: the crate the publisher stamps with,
    // without a dependency of the bench's own.
    let committed = sqlx::types::chrono::DateTime::parse_from_rfc3339(time)
        .with_context(|| format!("the commit stamp `time` {time:?} is not RFC 3339"))?;
    let committed_us = u64::try_from(committed.timestamp_micros()).unwrap_or(0);
    Ok(committed_us.saturating_sub(sent_us))
}

/// Starts `n` clients in `set`, the `id`th running `client(id)`; one that
/// fails tells the run, as `Msg::Failed("{what} {id}: ...")`.
pub(crate) fn spawn_clients<F, Fut>(
    set: &mut JoinSet<()>,
    n: usize,
    what: &'static str,
    tx: &UnboundedSender<Msg>,
    client: F,
) where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    for id in 0..n {
        let (run, tx) = (client(id), tx.clone());
        set.spawn(async move {
            if let Err(e) = run.await {
                let _ = tx.send(Msg::Failed(format!("{what} {id}: {e:#}")));
            }
        });
    }
}

/// Clients that lost their connection and reconnected, in one run.
#[derive(Default)]
pub(crate) struct Drops {
    /// The server ended the stream or closed the socket (a client too far
    /// behind is closed).
    pub(crate) closed: AtomicU64,
    /// The connection broke (a transport error reading it).
    pub(crate) broken: AtomicU64,
    /// The first transport error, for the report.
    pub(crate) first_error: Mutex<Option<String>>,
    /// The first close the server sent (WebSockets: code and reason).
    pub(crate) first_close: Mutex<Option<String>>,
}

impl Drops {
    pub(crate) fn broken(&self, error: String) {
        self.broken.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert(error);
    }

    /// Counts a connection the server closed, keeping the first `reason`.
    pub(crate) fn closed(&self, reason: String) {
        self.closed.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_close.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert(reason);
    }
}

/// How to build the all-in-one server next to rt-bench.
const BUILD_ALL_IN_ONE: &str = "cargo build --release -p realtime";

/// How to build the distributed services next to rt-bench.
const BUILD_DISTRIBUTED: &str =
    "cargo build --release -p rt-bench -p realtime -p rt-publisher -p rt-sse-edge -p rt-ws-edge";

/// The directory of the rt-bench executable, where the servers it starts are.
fn bench_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the rt-bench executable")?;
    Ok(exe
        .parent()
        .context("the rt-bench executable has no directory")?
        .to_owned())
}

/// The binary `name` in `dir`, or an error saying it is missing and that
/// `build` builds it.
fn binary_in(dir: &Path, name: &str, build: &str) -> anyhow::Result<PathBuf> {
    let binary = dir.join(name);
    anyhow::ensure!(
        binary.is_file(),
        "the server binary {} is missing: build it next to rt-bench with `{build}` \
         (without --release for a debug rt-bench)",
        binary.display()
    );
    Ok(binary)
}

/// An HTTP client for one scenario's publishes. Fresh per scenario, and it
/// drops connections idle for a second: the server answers a connection that
/// sent no request within 5 s with a 408, and one that idled longer than its
/// keep-alive it closes, either of which would fail the next publish sent on
/// it (a publish is not retried: that could duplicate the event).
pub(crate) fn publisher_client(publishers: usize) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(publishers + 1)
        .pool_idle_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(60))
        .build()
}

/// Takes `n` reports from the `clients` ("streams", "sockets"), each
/// through `take`, within `deadline`.
pub(crate) async fn gather(
    rx: &mut UnboundedReceiver<Msg>,
    n: usize,
    clients: &str,
    deadline: Duration,
    what: &str,
    mut take: impl FnMut(Msg) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let until = tokio::time::Instant::now() + deadline;
    for got in 0..n {
        let msg = tokio::time::timeout_at(until, rx.recv())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "only {got} of {n} {clients} {what} within {} s",
                    deadline.as_secs()
                )
            })?
            .ok_or_else(|| anyhow::anyhow!("the {clients} ended early"))?;
        match msg {
            Msg::Failed(e) => anyhow::bail!("{e} ({got} of {n} {clients} had {what} by then)"),
            msg => take(msg)?,
        }
    }
    Ok(())
}

/// Most events in one batch request (the publisher's default limit).
const MAX_BATCH: usize = 1000;

/// Publishes `events` events to each of `topics`, `rate` per second per
/// topic, each carrying the wall-clock time it was sent at. One topic gets
/// one event per request; several get one batch request per tick with an
/// event for each (split into batches of at most 1,000, sent at once).
///
/// The publisher runs on a thread and runtime of its own. On the bench's
/// runtime its sends would queue behind the thousands of reader tasks the
/// previous event woke, and that wait would count as the edge's latency.
/// The ceiling's publisher is a timer inside its own server, which the
/// readers never delay.
///
/// Returns how long each publish request took to be answered (µs). The
/// answer waits for the commit, and also behind the fan-out on the same
/// server workers, so it overstates what a delivery waits for: the events'
/// commit stamps (see [`Latencies`]) tell what the ceiling does not pay.
pub(crate) async fn publish_at_rate(
    server: &Server,
    topics: &[String],
    events: u64,
    rate: f64,
) -> anyhow::Result<Histogram<u32>> {
    let (base, topics) = (server.base.clone(), topics.to_vec());
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("rate-publisher".into())
        .spawn(move || {
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(publish_paced(&base, &topics, events, rate)));
            let _ = tx.send(result);
        })
        .context("cannot start the rate publisher's thread")?;
    rx.await.context("the rate publisher's thread stopped")?
}

async fn publish_paced(
    base: &str,
    topics: &[String],
    events: u64,
    rate: f64,
) -> anyhow::Result<Histogram<u32>> {
    #[derive(Deserialize)]
    struct Published {
        seq: u64,
    }
    #[derive(Deserialize)]
    struct Batch {
        events: Vec<Published>,
    }
    let http = &publisher_client(topics.len().div_ceil(MAX_BATCH))?;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let mut answered = Histogram::<u32>::new(3)?;
    for seq in 1..=events {
        tick.tick().await;
        let sent = Instant::now();
        if let [topic] = topics {
            publish_stamped(http, &format!("{base}/v1/topics/{topic}/events"), seq).await?;
            answered.record(sent.elapsed().as_micros() as u64)?;
            continue;
        }
        let url = format!("{base}/v1/events");
        let requests = topics.chunks(MAX_BATCH).map(|chunk| {
            let items: Vec<_> = chunk
                .iter()
                .map(|topic| json!({"topic": topic, "data": {"sent_us": now_us()}}))
                .collect();
            let request = http.post(&url).json(&items);
            async move {
                let res = request.send().await?;
                anyhow::ensure!(
                    res.status() == 201,
                    "batch publish answered {}",
                    res.status()
                );
                let batch: Batch = res.json().await?;
                anyhow::ensure!(
                    batch.events.iter().all(|p| p.seq == seq),
                    "a batch publish got seqs other than {seq}"
                );
                Ok(())
            }
        });
        for done in futures_util::future::join_all(requests).await {
            done?;
        }
        answered.record(sent.elapsed().as_micros() as u64)?;
    }
    Ok(answered)
}

/// Publishes one event carrying the wall-clock time it was sent at to the
/// topic route `url`, checking that it got `seq`.
pub(crate) async fn publish_stamped(
    http: &reqwest::Client,
    url: &str,
    seq: u64,
) -> anyhow::Result<()> {
    #[derive(Deserialize)]
    struct Published {
        seq: u64,
    }
    let res = http
        .post(url)
        .json(&json!({"data": {"sent_us": now_us()}}))
        .send()
        .await?;
    anyhow::ensure!(res.status() == 201, "publish answered {}", res.status());
    let published: Published = res.json().await?;
    anyhow::ensure!(
        published.seq == seq,
        "publish got seq {} (expected {seq})",
        published.seq
    );
    Ok(())
}

/// Publishes `burst` events to each of `topics` (round robin) as batch
/// requests of `batch`, `publishers` requests in flight at once.
pub(crate) async fn publish_burst(
    http: &reqwest::Client,
    server: &Server,
    topics: &[String],
    burst: u64,
    batch: u64,
    publishers: usize,
) -> anyhow::Result<()> {
    let url = server.url("/v1/events");
    let total = burst * topics.len() as u64;
    let topics: Arc<[String]> = topics.into();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..publishers {
        let (http, url, next, topics) = (http.clone(), url.clone(), next.clone(), topics.clone());
        tasks.spawn(async move {
            loop {
                let from = next.fetch_add(batch, Ordering::Relaxed);
                if from >= total {
                    return Ok::<_, anyhow::Error>(());
                }
                let items: Vec<_> = (from..(from + batch).min(total))
                    .map(|i| {
                        let topic = &topics[(i % topics.len() as u64) as usize];
                        json!({"topic": topic, "data": {"n": i, "sent_us": now_us()}})
                    })
                    .collect();
                let res = http.post(&url).json(&items).send().await?;
                anyhow::ensure!(
                    res.status() == 201,
                    "batch publish answered {}",
                    res.status()
                );
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

/// Microseconds since the UNIX epoch, by the wall clock (the same clock for
/// the server process and the bench: they share the machine).
pub(crate) fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The soft limit on open files (`ulimit -n`), which the server inherits.
pub(crate) fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// User plus system CPU time, in seconds, from a `/proc/<pid>/stat` file.
pub(crate) fn cpu_secs(stat: &str) -> anyhow::Result<f64> {
    let text = std::fs::read_to_string(stat).with_context(|| format!("reading {stat}"))?;
    // Fields after the command name (which may hold spaces), from field 3.
    let fields: Vec<&str> = text
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no field {} in {stat}", i + 3))
    };
    // utime and stime are fields 14 and 15, in USER_HZ (100 on Linux).
    Ok((ticks(11)? + ticks(12)?) as f64 / 100.0)
}

/// A server under test (the `realtime` binary, a service's, the raw
/// ceiling's) as a child process, killed when dropped. Mirrors
/// `rt_tests::ServiceProcess`, keeping the pid for `/proc` and the last
/// lines it logged for failure messages.
pub(crate) struct Server {
    child: Child,
    base: String,
    log: Arc<Mutex<VecDeque<String>>>,
}

/// Lines of the server's log kept for failure messages.
const LOG_TAIL: usize = 12;

impl Server {
    /// Starts `binary` on a free loopback port with `env` and waits until it
    /// logs the address it listens on. Blocks.
    pub(crate) fn start(binary: &Path, env: &[(&str, String)]) -> anyhow::Result<Server> {
        Server::start_with_args(binary, &[], env)
    }

    /// [`Server::start`], passing `args` to `binary`.
    pub(crate) fn start_with_args(
        binary: &Path,
        args: &[String],
        env: &[(&str, String)],
    ) -> anyhow::Result<Server> {
        let mut child = Command::new(binary)
            .args(args)
            .env("RT_BIND", "127.0.0.1:0")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let log = Arc::new(Mutex::new(VecDeque::with_capacity(LOG_TAIL)));
        let (tx, lines) = mpsc::channel();
        let pipes: [Option<Box<dyn std::io::Read + Send>>; 2] = [
            child.stdout.take().map(|p| Box::new(p) as _),
            child.stderr.take().map(|p| Box::new(p) as _),
        ];
        for pipe in pipes.into_iter().flatten() {
            let (tx, log) = (tx.clone(), log.clone());
            // Reads to the end, so the server never blocks on a full pipe.
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let line = strip_ansi(&line);
                    {
                        let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                        if log.len() == LOG_TAIL {
                            log.pop_front();
                        }
                        log.push_back(line.clone());
                    }
                    let _ = tx.send(line);
                }
            });
        }
        drop(tx);
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut server = Server {
            child,
            base: String::new(),
            log,
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(at) = line.find("listening on http://") {
                        server.base = line[at + "listening on ".len()..]
                            .split(|c: char| c.is_whitespace() || c == '"')
                            .next()
                            .unwrap_or_default()
                            .to_owned();
                        return Ok(server);
                    }
                }
                Err(_) => {
                    return Err(server.explain(anyhow::anyhow!(
                        "{} did not report its address within 30 s",
                        binary.display()
                    )));
                }
            }
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The address the server listens on.
    pub(crate) fn addr(&self) -> anyhow::Result<std::net::SocketAddr> {
        self.base
            .strip_prefix("http://")
            .and_then(|a| a.trim_end_matches('/').parse().ok())
            .with_context(|| format!("the server's address {:?}", self.base))
    }

    /// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in KiB.
    pub(crate) fn status_kib(&self, field: &str) -> anyhow::Result<u64> {
        let path = format!("/proc/{}/status", self.child.id());
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        text.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse().ok())
            .with_context(|| format!("no {field} in {path}"))
    }

    pub(crate) fn cpu_secs(&self) -> anyhow::Result<f64> {
        cpu_secs(&format!("/proc/{}/stat", self.child.id()))
    }

    /// `err`, followed by whether the server still runs and what it logged last.
    pub(crate) fn explain(&mut self, err: anyhow::Error) -> anyhow::Error {
        anyhow::anyhow!("{err:#}\n  ({})", self.state_and_log("the server"))
    }

    /// Whether the server (`who`, for the message) still runs, and what it
    /// logged last.
    fn state_and_log(&mut self, who: &str) -> String {
        let state = match self.child.try_wait() {
            Ok(None) => format!("{who} is still running"),
            Ok(Some(status)) => format!("{who} exited ({status})"),
            Err(e) => format!("the state of {who} is unknown ({e})"),
        };
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let tail: Vec<&str> = log.iter().map(String::as_str).collect();
        format!("{state}; its last log lines:\n    {}", tail.join("\n    "))
    }
}

/// `line` without ANSI escape sequences (the text log format colours).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ parameters, ended by a letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_are_stripped_from_log_lines() {
        assert_eq!(
            strip_ansi(
                "\u{1b}[2m12:00\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m listening on http://127.0.0.1:1"
            ),
            "12:00  INFO listening on http://127.0.0.1:1"
        );
    }

    fn deploy(distributed: bool, nats_url: Option<&str>) -> DeployArgs {
        DeployArgs {
            services: Services {
                database_url: "postgres://127.0.0.1/postgres".to_owned(),
                nats_url: nats_url.map(str::to_owned),
            },
            distributed,
        }
    }

    #[test]
    fn distributed_needs_a_nats_url() {
        let err = deploy(true, None)
            .check()
            .expect_err("refused without NATS");
        assert!(
            err.to_string().contains("--distributed needs --nats-url"),
            "{err}"
        );
        assert!(deploy(true, Some("nats://127.0.0.1:4222")).check().is_ok());
        assert!(deploy(false, None).check().is_ok());
        assert!(check_distributed(true, None).is_err());
    }

    #[test]
    fn distributed_is_a_flag_of_the_deploy_args() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            deploy: DeployArgs,
        }
        use clap::Parser as _;
        let cli = Cli::try_parse_from(["t", "--distributed", "--nats-url", "nats://n:4222"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(cli.deploy.distributed);
        assert_eq!(cli.deploy.name(), "distributed");
        assert!(
            cli.deploy
                .title("sse-edge")
                .contains("publisher and sse-edge")
        );
        assert!(cli.deploy.title("sse-edge").contains("nats bus"));
        let cli = Cli::try_parse_from(["t"]).unwrap_or_else(|e| panic!("{e}"));
        assert!(!cli.deploy.distributed);
        assert_eq!(cli.deploy.name(), "all-in-one");
        assert!(cli.deploy.title("sse-edge").starts_with("all-in-one"));
        assert_eq!(cli.deploy.publisher_cpu_head(), "");
    }

    #[test]
    fn binaries_are_the_edge_and_the_publisher_when_distributed() {
        let dir = std::env::temp_dir().join(format!("rt-bench-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let nats = Some("nats://127.0.0.1:4222");
        let missing = deploy(true, nats)
            .binaries_in(&dir, "sse-edge")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(missing.contains("sse-edge is missing"), "{missing}");
        assert!(missing.contains(BUILD_DISTRIBUTED), "{missing}");
        for name in ["sse-edge", "publisher"] {
            std::fs::write(dir.join(name), "").unwrap_or_else(|e| panic!("{e}"));
        }
        let found = deploy(true, nats).binaries_in(&dir, "sse-edge");
        let all_in_one = deploy(false, None).binaries_in(&dir, "sse-edge");
        let _ = std::fs::remove_dir_all(&dir);
        let found = found.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(found.edge, dir.join("sse-edge"));
        assert_eq!(found.publisher, Some(dir.join("publisher")));
        let missing = all_in_one.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(missing.contains("realtime is missing"), "{missing}");
    }

    #[test]
    fn publisher_cpu_is_a_median_when_there_is_a_publisher() {
        let runs = [
            PublisherCpu {
                latency_secs: Some(3.0),
                burst_secs: Some(1.0),
            },
            PublisherCpu {
                latency_secs: Some(1.0),
                burst_secs: Some(2.0),
            },
            PublisherCpu {
                latency_secs: Some(2.0),
                burst_secs: Some(9.0),
            },
        ];
        let m = PublisherCpu::medians(&runs, |p| p);
        assert_eq!((m.latency_secs, m.burst_secs), (Some(2.0), Some(2.0)));
        let none = PublisherCpu::medians(&[PublisherCpu::default()], |p| p);
        assert_eq!((none.latency_secs, none.burst_secs), (None, None));
        assert_eq!(PublisherCpu::cell(None), "");
        assert_eq!(PublisherCpu::cell(Some(1.234)).trim(), "1.23");
        let line = PublisherCpu::json(json!({"name": "x"}), Some(0.12345));
        assert_eq!(line["publisher_cpu_secs"], json!(0.123));
        let line = PublisherCpu::json(json!({"name": "x"}), None);
        assert!(line["publisher_cpu_secs"].is_null());
    }

    #[test]
    fn publish_waits_are_read_from_the_answer_and_commit_times_and_reported_as_medians() {
        let mut answered = Histogram::<u32>::new(3).unwrap_or_else(|e| panic!("{e}"));
        for us in 1..=1000 {
            answered.record(us * 10).unwrap_or_else(|e| panic!("{e}"));
        }
        let mut to_commit = Histogram::<u32>::new(2).unwrap_or_else(|e| panic!("{e}"));
        for us in 1..=100 {
            to_commit.record(us).unwrap_or_else(|e| panic!("{e}"));
        }
        let one = PublishWaits::of(&answered, &to_commit);
        // Within the answer histogram's precision; the sent -> commit
        // times, below 256 µs, are held exactly.
        let near = |a: f64, b: f64| (a - b).abs() < 0.01;
        assert!(near(one.answered.p50_ms, 5.0), "{one:?}");
        assert!(near(one.answered.p99_ms, 9.9), "{one:?}");
        assert!(near(one.answered.max_ms, 10.0), "{one:?}");
        assert_eq!(
            one.to_commit,
            Waits {
                p50_ms: 0.05,
                p99_ms: 0.099,
                max_ms: 0.1
            }
        );
        let runs = [
            one,
            PublishWaits {
                answered: Waits {
                    p50_ms: 1.0,
                    p99_ms: 50.0,
                    max_ms: 90.0,
                },
                to_commit: Waits {
                    p50_ms: 2.0,
                    p99_ms: 3.0,
                    max_ms: 4.0,
                },
            },
            PublishWaits::default(),
        ];
        let m = PublishWaits::medians(&runs, |w| w);
        assert_eq!(m.answered.p50_ms, 1.0);
        assert!(near(m.answered.p99_ms, 9.9), "{m:?}");
        assert!(near(m.answered.max_ms, 10.0), "{m:?}");
        assert_eq!(m.to_commit, one.to_commit, "each the middle of three");
        let line = m.json(json!({"name": "x"}));
        assert_eq!(line["name"], json!("x"));
        assert_eq!(line["publish_p50_ms"], json!(1.0));
        assert_eq!(line["publish_p99_ms"], json!(r3(m.answered.p99_ms)));
        assert_eq!(line["publish_max_ms"], json!(r3(m.answered.max_ms)));
        assert_eq!(line["to_commit_p50_ms"], json!(0.05));
        assert_eq!(line["to_commit_p99_ms"], json!(0.099));
        assert_eq!(line["to_commit_max_ms"], json!(0.1));
        let head = PublishWaits::head();
        assert!(
            head.contains("publish p99") && head.contains("to commit p99"),
            "{head}"
        );
        assert_eq!(head.len(), m.cells().len(), "columns line up");
    }

    #[test]
    fn commit_stamps_are_read_as_microseconds_after_the_send() {
        // 2026-12-01T17:10:00.123456Z, in µs since the epoch.
        let stamp = 1_796_145_000_123_456;
        let time = "2026-12-01T17:10:00.123456Z";
        let us = |time: &str, sent_us: u64| {
            to_commit_us(time, sent_us).unwrap_or_else(|e| panic!("{e:#}"))
        };
        assert_eq!(us(time, stamp - 1500), 1500);
        assert_eq!(us(time, stamp), 0);
        assert_eq!(us("2026-12-01T18:10:00.123456+01:00", stamp - 7), 7);
        // A stamp before the send (the clock stepped back) is no wait.
        assert_eq!(us(time, stamp + 250), 0);
        for bad in ["", "yesterday", "2026-12-01 17:10:00", "1796145000123456"] {
            let err = to_commit_us(bad, stamp)
                .err()
                .map(|e| format!("{e:#}"))
                .unwrap_or_default();
            assert!(err.contains("is not RFC 3339"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn the_commit_stamp_is_needed_and_read_only_when_the_events_are_stamped() {
        let stamp = 1_796_145_000_123_456;
        let time = "2026-12-01T17:10:00.123456Z";
        let mut stamped = Latencies::new(true).unwrap_or_else(|e| panic!("{e}"));
        stamped
            .record(stamp + 50, stamp - 200, Some(time))
            .unwrap_or_else(|e| panic!("{e:#}"));
        let to_commit = stamped.to_commit.as_ref().map(|h| (h.len(), h.max()));
        assert_eq!(to_commit, Some((1, 200)));
        assert_eq!((stamped.received.len(), stamped.received.max()), (1, 250));
        let missing = stamped
            .record(stamp, stamp, None)
            .err()
            .map(|e| format!("{e:#}"));
        assert!(
            missing.as_deref().unwrap_or_default().contains("no `time`"),
            "{missing:?}"
        );
        let bad = stamped
            .record(stamp, stamp, Some("soon"))
            .err()
            .map(|e| format!("{e:#}"));
        assert!(
            bad.as_deref()
                .unwrap_or_default()
                .contains("\"soon\" is not RFC 3339"),
            "{bad:?}"
        );
        // The ceiling's fixed stamp is not read.
        let mut ceiling = Latencies::new(false).unwrap_or_else(|e| panic!("{e}"));
        for time in [Some("soon"), None] {
            ceiling
                .record(stamp + 100, stamp, time)
                .unwrap_or_else(|e| panic!("{e:#}"));
        }
        assert!(ceiling.to_commit.is_none());
        assert_eq!(ceiling.received.len(), 2);
    }

    /// A client's report: these latencies and sent → commit times, in µs.
    fn client(received: &[u64], to_commit: Option<&[u64]>) -> Msg {
        let mut latencies = Latencies::new(to_commit.is_some()).unwrap_or_else(|e| panic!("{e}"));
        for &us in received {
            latencies
                .received
                .record(us)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        if let (Some(hist), Some(values)) = (&mut latencies.to_commit, to_commit) {
            for &us in values {
                hist.record(us).unwrap_or_else(|e| panic!("{e}"));
            }
        }
        Msg::Latency(Box::new(latencies))
    }

    /// What `gather_latencies` makes of the `reports` of 2 clients, 2
    /// events each.
    async fn gathered(reports: Vec<Msg>, commit_stamped: bool) -> anyhow::Result<Latencies> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for msg in reports {
            tx.send(msg)
                .unwrap_or_else(|_| panic!("the channel is open"));
        }
        let deadline = Duration::from_secs(5);
        gather_latencies(
            &mut rx,
            2,
            "streams",
            deadline,
            "reported",
            2,
            commit_stamped,
        )
        .await
    }

    #[tokio::test]
    async fn gathered_latencies_are_merged_and_counted() {
        let reports = vec![
            client(&[100, 200], Some(&[10, 20])),
            client(&[150, 250], Some(&[15, 25])),
        ];
        let all = gathered(reports, true)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!((all.received.len(), all.received.max()), (4, 250));
        let to_commit = all.to_commit.as_ref().map(|h| (h.len(), h.min(), h.max()));
        assert_eq!(to_commit, Some((4, 10, 25)));

        let ceiling = vec![client(&[100, 200], None), client(&[150, 250], None)];
        let all = gathered(ceiling, false)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(all.received.len(), 4);
        assert!(all.to_commit.is_none());

        let err = |reports: Vec<Msg>, stamped: bool| async move {
            gathered(reports, stamped)
                .await
                .err()
                .map(|e| format!("{e:#}"))
                .unwrap_or_default()
        };
        // A stamped run with a sent → commit time missing.
        let missing = vec![
            client(&[100, 200], Some(&[10])),
            client(&[150, 250], Some(&[15, 25])),
        ];
        let e = err(missing, true).await;
        assert!(
            e.contains("recorded 3 sent -> commit times for 4 deliveries"),
            "{e}"
        );
        // A latency missing.
        let e = err(vec![client(&[100], None), client(&[150, 250], None)], false).await;
        assert!(e.contains("recorded 3 latencies for 4 deliveries"), "{e}");
        // A client without commit stamps in a stamped run, and one with
        // them in a run without.
        for (stamped, want) in [
            (true, "recorded no sent -> commit times"),
            (false, "the events carrying no commit stamp"),
        ] {
            let mixed = vec![
                client(&[100, 200], None),
                client(&[150, 250], Some(&[15, 25])),
            ];
            let e = err(mixed, stamped).await;
            assert!(e.contains(want), "stamped {stamped}: {e}");
        }
    }
}

/// Where the services under test keep their log and bus: the arguments every
/// scenario that runs them shares.
#[derive(clap::Args)]
pub(crate) struct Services {
    /// Postgres server to benchmark against (a database is created and dropped).
    #[arg(
        long,
        env = "RT_BENCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub(crate) database_url: String,
    /// NATS URL for the services under test; without it, their in-process bus.
    #[arg(long, env = "RT_BENCH_NATS_URL")]
    pub(crate) nats_url: Option<String>,
}

impl Services {
    /// The environment every server process of one run gets: `database_url`,
    /// this bus (over NATS, under a subject prefix of its own, the same for
    /// every process of the run), and text logs.
    fn env(&self, database_url: &str) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("DATABASE_URL", database_url.to_owned()),
            ("RT_LOG_FORMAT", "text".to_owned()),
        ];
        if let Some(url) = &self.nats_url {
            env.push(("RT_NATS_URL", url.clone()));
            env.push((
                "RT_NATS_PREFIX",
                format!("bench{}", uuid::Uuid::new_v4().simple()),
            ));
        }
        env
    }

    /// The bus, as the reports name it.
    pub(crate) fn bus(&self) -> &'static str {
        if self.nats_url.is_some() {
            "nats"
        } else {
            "in-process"
        }
    }
}

/// How the edge scenarios (`sse`, `ws`) run the services under test: where
/// they keep their log and bus, and whether all in one process.
#[derive(clap::Args)]
pub(crate) struct DeployArgs {
    #[command(flatten)]
    pub(crate) services: Services,
    /// Run the services distributed (needs --nats-url): the `publisher` and
    /// the edge (`sse-edge`, `ws-edge`) as two processes over the same
    /// database and NATS, instead of the all-in-one `realtime`. Clients
    /// connect to the edge, HTTP publishes go to the publisher; memory and
    /// server CPU are the edge's.
    #[arg(long)]
    pub(crate) distributed: bool,
}

/// Refuses `--distributed` without a NATS URL: the publisher reaches the
/// edge over NATS only.
pub(crate) fn check_distributed(distributed: bool, nats_url: Option<&str>) -> anyhow::Result<()> {
    anyhow::ensure!(
        !distributed || nats_url.is_some(),
        "--distributed needs --nats-url (or RT_BENCH_NATS_URL): the publisher and the edge \
         are separate processes, and events reach the edge over NATS only"
    );
    Ok(())
}

/// How the reports name a deployment.
pub(crate) fn deployment_name(distributed: bool) -> &'static str {
    if distributed {
        "distributed"
    } else {
        "all-in-one"
    }
}

/// The binaries of a deployment, found next to rt-bench.
pub(crate) struct Binaries {
    /// The server the clients connect to: `realtime`, or the edge.
    edge: PathBuf,
    /// The `publisher`, when distributed.
    publisher: Option<PathBuf>,
}

impl DeployArgs {
    /// Refuses flags that do not go together.
    pub(crate) fn check(&self) -> anyhow::Result<()> {
        check_distributed(self.distributed, self.services.nats_url.as_deref())
    }

    /// The binaries to run, next to rt-bench: `realtime`, or the `publisher`
    /// and `edge` (`sse-edge`, `ws-edge`) when distributed.
    pub(crate) fn binaries(&self, edge: &str) -> anyhow::Result<Binaries> {
        self.binaries_in(&bench_dir()?, edge)
    }

    fn binaries_in(&self, dir: &Path, edge: &str) -> anyhow::Result<Binaries> {
        if !self.distributed {
            return Ok(Binaries {
                edge: binary_in(dir, "realtime", BUILD_ALL_IN_ONE)?,
                publisher: None,
            });
        }
        Ok(Binaries {
            edge: binary_in(dir, edge, BUILD_DISTRIBUTED)?,
            publisher: Some(binary_in(dir, "publisher", BUILD_DISTRIBUTED)?),
        })
    }

    /// Starts `binaries` over `database_url`, on this bus, the edge (or the
    /// all-in-one server) with `edge_env` added: when distributed, the
    /// publisher first (it applies the database's migrations; the edge
    /// would too, under a lock), then the edge, under the same NATS prefix.
    pub(crate) async fn start(
        &self,
        binaries: &Binaries,
        database_url: &str,
        edge_env: &[(&'static str, String)],
    ) -> anyhow::Result<Deployment> {
        let env = self.services.env(database_url);
        let publisher = match &binaries.publisher {
            Some(binary) => Some(start_blocking(binary, env.clone()).await?),
            None => None,
        };
        // The run's settings last: the scenario's cannot change its database,
        // bus or log format.
        let edge = start_blocking(&binaries.edge, [edge_env, env.as_slice()].concat()).await?;
        Ok(Deployment {
            edge,
            edge_name: file_name(&binaries.edge),
            publisher,
        })
    }

    /// How the reports name the deployment.
    pub(crate) fn name(&self) -> &'static str {
        deployment_name(self.distributed)
    }

    /// The deployment and bus, for a report's title: `edge` is the edge
    /// binary's name.
    pub(crate) fn title(&self, edge: &str) -> String {
        let bus = self.services.bus();
        if self.distributed {
            format!(
                "distributed: publisher and {edge} in processes of their own ({bus} bus; \
                 memory and server CPU are the {edge}'s)"
            )
        } else {
            format!("all-in-one server in its own process ({bus} bus)")
        }
    }

    /// The head of the publisher CPU column that ends the latency and
    /// saturation tables when distributed (nothing when all-in-one).
    pub(crate) fn publisher_cpu_head(&self) -> String {
        if self.distributed {
            format!(" {:>16}", "publisher CPU s")
        } else {
            String::new()
        }
    }
}

/// [`Server::start`] on a blocking thread.
async fn start_blocking(binary: &Path, env: Vec<(&'static str, String)>) -> anyhow::Result<Server> {
    let binary = binary.to_owned();
    tokio::task::spawn_blocking(move || Server::start(&binary, &env)).await?
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// The servers under test of one run: the all-in-one server, or the edge
/// and the publisher. Killed when dropped.
pub(crate) struct Deployment {
    /// The server the clients connect to and whose memory and CPU are
    /// measured: `realtime`, or the edge (`sse-edge`, `ws-edge`).
    pub(crate) edge: Server,
    /// Its binary's name, for failure messages.
    edge_name: String,
    /// The `publisher`, when distributed.
    publisher: Option<Server>,
}

impl Deployment {
    /// The server HTTP publishes go to: the publisher, or the all-in-one
    /// server.
    pub(crate) fn publish_to(&self) -> &Server {
        self.publisher.as_ref().unwrap_or(&self.edge)
    }

    /// `err`, followed by whether each server still runs and what it logged
    /// last.
    pub(crate) fn explain(&mut self, err: anyhow::Error) -> anyhow::Error {
        let Some(publisher) = &mut self.publisher else {
            return self.edge.explain(err);
        };
        let edge = self.edge.state_and_log(&format!("the {}", self.edge_name));
        anyhow::anyhow!(
            "{err:#}\n  ({edge})\n  ({})",
            publisher.state_and_log("the publisher")
        )
    }
}

/// CPU seconds the publisher process used in the latency and saturation
/// scenarios; `None` when the server is all-in-one (its CPU includes the
/// publishing).
#[derive(Clone, Copy, Default)]
pub(crate) struct PublisherCpu {
    pub(crate) latency_secs: Option<f64>,
    pub(crate) burst_secs: Option<f64>,
}

impl PublisherCpu {
    /// The median of each figure over the runs (`get` finds the figures in
    /// a run's).
    pub(crate) fn medians<R>(runs: &[R], get: fn(&R) -> &PublisherCpu) -> PublisherCpu {
        let of = |field: fn(&PublisherCpu) -> Option<f64>| {
            median_some(runs.iter().map(|r| field(get(r))))
        };
        PublisherCpu {
            latency_secs: of(|p| p.latency_secs),
            burst_secs: of(|p| p.burst_secs),
        }
    }

    /// A table cell of `secs`, under [`DeployArgs::publisher_cpu_head`]
    /// (nothing when all-in-one).
    pub(crate) fn cell(secs: Option<f64>) -> String {
        secs.map_or_else(String::new, |s| format!(" {s:>16.2}"))
    }

    /// `line`, a JSON object, with `"publisher_cpu_secs": secs` (null when
    /// all-in-one).
    pub(crate) fn json(mut line: serde_json::Value, secs: Option<f64>) -> serde_json::Value {
        if let Some(line) = line.as_object_mut() {
            line.insert("publisher_cpu_secs".to_owned(), json!(secs.map(r3)));
        }
        line
    }
}

/// p50, p99 and max of one of the waits of [`PublishWaits`], in ms.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Waits {
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
}

impl Waits {
    /// From one run's waits, in µs.
    pub(crate) fn of(waits: &Histogram<u32>) -> Waits {
        Waits {
            p50_ms: ms(waits.value_at_quantile(0.5)),
            p99_ms: ms(waits.value_at_quantile(0.99)),
            max_ms: ms(waits.max()),
        }
    }

    /// The median of each figure over the runs (`get` finds the figures in
    /// a run's).
    fn medians<R>(runs: &[R], get: impl Fn(&R) -> &Waits) -> Waits {
        Waits {
            p50_ms: median(runs, |r| get(r).p50_ms),
            p99_ms: median(runs, |r| get(r).p99_ms),
            max_ms: median(runs, |r| get(r).max_ms),
        }
    }
}

/// How long the publishes of an edge's latency scenario took, besides the
/// deliveries' latencies, so that the commit's tail can be told from the
/// fan-out's.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct PublishWaits {
    /// Publish request sent → its `201`. The answer waits for the commit,
    /// and also behind the fan-out on the same server workers, so it
    /// overstates what a delivery waits for.
    pub(crate) answered: Waits,
    /// Publish sent → the commit stamp (`time`) of its event, as every
    /// client read it: what a delivery waits for before the fan-out, and
    /// what the ceiling does not pay.
    pub(crate) to_commit: Waits,
}

/// The figures of [`PublishWaits`], in its order: the words of the latency
/// table's column heads and the start of the JSON keys.
const PUBLISH_WAITS: [(&str, &str); 2] = [("publish", "publish"), ("to commit", "to_commit")];

impl PublishWaits {
    /// From one run's answer times of the publishes and sent → commit
    /// times of the events, in µs.
    pub(crate) fn of(answered: &Histogram<u32>, to_commit: &Histogram<u32>) -> PublishWaits {
        PublishWaits {
            answered: Waits::of(answered),
            to_commit: Waits::of(to_commit),
        }
    }

    /// The median of each figure over the runs (`get` finds the figures in
    /// a run's).
    pub(crate) fn medians<R>(runs: &[R], get: fn(&R) -> &PublishWaits) -> PublishWaits {
        PublishWaits {
            answered: Waits::medians(runs, |r| &get(r).answered),
            to_commit: Waits::medians(runs, |r| &get(r).to_commit),
        }
    }

    fn each(&self) -> [&Waits; 2] {
        [&self.answered, &self.to_commit]
    }

    /// The latency table's columns for these figures.
    pub(crate) fn head() -> String {
        PUBLISH_WAITS
            .iter()
            .map(|(head, _)| {
                format!(
                    " {:>13} {:>13} {:>13}",
                    format!("{head} p50"),
                    format!("{head} p99"),
                    format!("{head} max")
                )
            })
            .collect()
    }

    pub(crate) fn cells(&self) -> String {
        self.each()
            .iter()
            .map(|w| format!(" {:>13.2} {:>13.2} {:>13.2}", w.p50_ms, w.p99_ms, w.max_ms))
            .collect()
    }

    /// `line`, a JSON object, with `publish_p50_ms`, `publish_p99_ms`,
    /// `publish_max_ms`, `to_commit_p50_ms`, `to_commit_p99_ms` and
    /// `to_commit_max_ms`.
    pub(crate) fn json(&self, mut line: serde_json::Value) -> serde_json::Value {
        if let Some(line) = line.as_object_mut() {
            for ((_, key), w) in PUBLISH_WAITS.iter().zip(self.each()) {
                for (figure, value) in [("p50", w.p50_ms), ("p99", w.p99_ms), ("max", w.max_ms)] {
                    line.insert(format!("{key}_{figure}_ms"), json!(r3(value)));
                }
            }
        }
        line
    }
}

/// The median of one figure over several runs.
pub(crate) fn median<T>(runs: &[T], get: impl Fn(&T) -> f64) -> f64 {
    let mut v: Vec<f64> = runs.iter().map(get).collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The median of the figures that are there; `None` when none is.
pub(crate) fn median_some(figures: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let some: Vec<f64> = figures.flatten().collect();
    (!some.is_empty()).then(|| median(&some, |&v| v))
}

/// The rounded count of events a latency scenario publishes: `rate` per
/// second for `seconds`, at least one.
pub(crate) fn latency_events(rate: f64, seconds: f64) -> u64 {
    ((rate * seconds).round() as u64).max(1)
}

/// The first transport error and the first close the clients got (and
/// recovered from), in one run or over the runs of a connection count.
#[derive(Default)]
pub(crate) struct Firsts {
    pub(crate) error: Option<String>,
    pub(crate) close: Option<String>,
}

impl Drops {
    /// Takes the first error and close, for the run's report.
    pub(crate) fn take_firsts(&self) -> Firsts {
        let take = |m: &Mutex<Option<String>>| m.lock().unwrap_or_else(|e| e.into_inner()).take();
        Firsts {
            error: take(&self.first_error),
            close: take(&self.first_close),
        }
    }
}

/// What came of one connection count.
pub(crate) struct Outcome<F> {
    pub(crate) n: usize,
    /// The medians, or why a run failed.
    pub(crate) result: Result<F, String>,
    /// The first error and close over its runs (a failed run's are lost).
    pub(crate) firsts: Firsts,
}

/// Runs `one_run(n, run)` `runs` times (at least once) for every count `n`
/// in `connections`, each count's runs stopping at the first that fails.
/// `progress` gets every run that succeeded, with the prefix of its progress
/// lines ("  {n} connections, run {r}"); a failure is printed here. Each
/// count's figures are the `medians` of its runs.
pub(crate) async fn each_count<F, Fut>(
    connections: &[usize],
    runs: usize,
    one_run: impl Fn(usize, usize) -> Fut,
    progress: impl Fn(&str, &F, &Firsts),
    medians: fn(&[F]) -> F,
) -> Vec<Outcome<F>>
where
    Fut: Future<Output = anyhow::Result<(F, Firsts)>>,
{
    let mut results = Vec::new();
    for &n in connections {
        let mut figures = Vec::new();
        let (mut failure, mut firsts) = (None, Firsts::default());
        for run in 0..runs.max(1) {
            let at = format!("  {n} connections, run {}", run + 1);
            match one_run(n, run).await {
                Ok((f, these)) => {
                    progress(&at, &f, &these);
                    firsts.error = firsts.error.or(these.error);
                    firsts.close = firsts.close.or(these.close);
                    figures.push(f);
                }
                Err(e) => {
                    eprintln!("{at}: FAILED: {e:#}");
                    failure = Some(format!("{e:#}"));
                    break;
                }
            }
        }
        results.push(Outcome {
            n,
            result: failure.map_or_else(|| Ok(medians(&figures)), Err),
            firsts,
        });
    }
    results
}

/// Fails the command if any connection count failed (the report says why).
pub(crate) fn ensure_all_ran<F>(results: &[Outcome<F>]) -> anyhow::Result<()> {
    let failed: Vec<String> = results
        .iter()
        .filter(|o| o.result.is_err())
        .map(|o| o.n.to_string())
        .collect();
    anyhow::ensure!(
        failed.is_empty(),
        "the run with {} connections failed (see above)",
        failed.join(" and ")
    );
    Ok(())
}

/// Prints one scenario's table: `title`, `head`, and a row per connection
/// count (its `row`, or "failed").
pub(crate) fn table<F>(
    results: &[Outcome<F>],
    title: &str,
    head: &str,
    row: &dyn Fn(&F) -> String,
) {
    println!("\n{title}\n{head}");
    for o in results {
        match &o.result {
            Ok(f) => println!("{:<12} {}", o.n, row(f)),
            Err(_) => println!("{:<12} failed", o.n),
        }
    }
}

/// Prints `lines` as JSON lines, each with the fields of `common` added.
pub(crate) fn print_json_lines(common: &serde_json::Value, lines: Vec<serde_json::Value>) {
    for mut line in lines {
        if let (Some(line), Some(common)) = (line.as_object_mut(), common.as_object()) {
            line.extend(common.clone());
        }
        println!("{line}");
    }
}

/// The latency scenario's wait: every client's latencies, `events` of them
/// per client, merged; with as many sent → commit times when the events
/// are `commit_stamped`, none otherwise.
pub(crate) async fn gather_latencies(
    rx: &mut UnboundedReceiver<Msg>,
    n: usize,
    clients: &str,
    deadline: Duration,
    what: &str,
    events: u64,
    commit_stamped: bool,
) -> anyhow::Result<Latencies> {
    let mut all = Latencies::new(commit_stamped)?;
    gather(rx, n, clients, deadline, what, |msg| match msg {
        Msg::Latency(client) => all.add(&client),
        _ => anyhow::bail!("unexpected report during the latency scenario"),
    })
    .await?;
    all.check(events * n as u64)?;
    Ok(all)
}

/// The burst's wait: when the last client had the last event (`started`,
/// if all had it before).
pub(crate) async fn gather_last_done(
    rx: &mut UnboundedReceiver<Msg>,
    n: usize,
    clients: &str,
    deadline: Duration,
    what: &str,
    started: Instant,
) -> anyhow::Result<Instant> {
    let mut last_done = started;
    gather(rx, n, clients, deadline, what, |msg| match msg {
        Msg::Done(at) => {
            last_done = last_done.max(at);
            Ok(())
        }
        _ => anyhow::bail!("unexpected report during the burst"),
    })
    .await?;
    Ok(last_done)
}

/// The CPU time the server and the bench had used at the start of a
/// scenario, so that what the scenario used can be told apart.
pub(crate) struct CpuMark {
    server: f64,
    bench: f64,
}

impl CpuMark {
    pub(crate) fn now(server: &Server) -> anyhow::Result<CpuMark> {
        Ok(CpuMark {
            server: server.cpu_secs()?,
            bench: cpu_secs("/proc/self/stat")?,
        })
    }

    /// CPU seconds the server and the bench used since the mark.
    pub(crate) fn used(&self, server: &Server) -> anyhow::Result<(f64, f64)> {
        Ok((
            server.cpu_secs()? - self.server,
            cpu_secs("/proc/self/stat")? - self.bench,
        ))
    }
}

/// The CPU time a deployment's edge, its publisher and the bench had used at
/// the start of a scenario.
pub(crate) struct DeploymentCpuMark {
    edge: CpuMark,
    publisher: Option<f64>,
}

impl DeploymentCpuMark {
    pub(crate) fn now(deployment: &Deployment) -> anyhow::Result<DeploymentCpuMark> {
        Ok(DeploymentCpuMark {
            edge: CpuMark::now(&deployment.edge)?,
            publisher: deployment
                .publisher
                .as_ref()
                .map(Server::cpu_secs)
                .transpose()?,
        })
    }

    /// CPU seconds the edge (or all-in-one server) and the bench used since
    /// the mark, and the publisher (`None` when all-in-one).
    pub(crate) fn used(
        &self,
        deployment: &Deployment,
    ) -> anyhow::Result<((f64, f64), Option<f64>)> {
        let publisher = match (&deployment.publisher, self.publisher) {
            (Some(server), Some(before)) => Some(server.cpu_secs()? - before),
            _ => None,
        };
        Ok((self.edge.used(&deployment.edge)?, publisher))
    }
}

/// What the idle memory, latency and saturation scenarios measure, which the
/// edges (`sse`, `ws`) and the ceiling (`raw`) all run, for one run (or, in
/// the report, the median of each over the runs).
#[derive(Clone, Copy)]
pub(crate) struct Fanout {
    /// First connect → every client is ready.
    pub(crate) open_secs: f64,
    /// Server `VmRSS` before the clients open and after they idled.
    pub(crate) rss_before: f64,
    pub(crate) rss_after: f64,
    /// (after − before) / connections.
    pub(crate) bytes_per_conn: f64,
    /// Sent → parsed by the client, per event per client.
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) p999_ms: f64,
    pub(crate) max_ms: f64,
    /// CPU time, in seconds, the server and the bench used from the first
    /// latency event sent to the last client having its last event.
    pub(crate) latency_server_cpu_secs: f64,
    pub(crate) latency_bench_cpu_secs: f64,
    /// First burst event sent → last client has the last event.
    pub(crate) burst_secs: f64,
    /// Burst events × clients / `burst_secs`.
    pub(crate) deliveries_per_sec: f64,
    /// CPU time, in seconds, the server and the bench used during the burst.
    pub(crate) server_cpu_secs: f64,
    pub(crate) bench_cpu_secs: f64,
    /// Server `VmHWM` (peak resident set) at the end of the run.
    pub(crate) peak_rss: f64,
}

/// What a run read in the idle memory scenario.
pub(crate) struct Idle {
    /// First connect → every client is ready.
    pub(crate) open_secs: f64,
    /// Server `VmRSS`, in bytes, before the clients open and after they idled.
    pub(crate) rss_before: u64,
    pub(crate) rss_after: u64,
}

/// What a run read in the saturation scenario.
pub(crate) struct Burst {
    /// Burst events × clients.
    pub(crate) deliveries: u64,
    /// First burst event sent → last client has the last event.
    pub(crate) secs: f64,
    /// CPU seconds the server and the bench used meanwhile.
    pub(crate) cpu: (f64, f64),
}

impl Fanout {
    /// One run's figures, from what it read for `n` connections: the idle
    /// memory, the latencies (µs) and the CPU they cost, the burst, and the
    /// server's peak resident set in bytes.
    pub(crate) fn measured(
        n: usize,
        idle: Idle,
        latencies: &Histogram<u32>,
        latency_cpu: (f64, f64),
        burst: Burst,
        peak_rss: u64,
    ) -> Fanout {
        let (rss_before, rss_after) = (idle.rss_before as f64, idle.rss_after as f64);
        Fanout {
            open_secs: idle.open_secs,
            rss_before,
            rss_after,
            bytes_per_conn: (rss_after - rss_before) / n as f64,
            p50_ms: ms(latencies.value_at_quantile(0.5)),
            p99_ms: ms(latencies.value_at_quantile(0.99)),
            p999_ms: ms(latencies.value_at_quantile(0.999)),
            max_ms: ms(latencies.max()),
            latency_server_cpu_secs: latency_cpu.0,
            latency_bench_cpu_secs: latency_cpu.1,
            burst_secs: burst.secs,
            deliveries_per_sec: burst.deliveries as f64 / burst.secs,
            server_cpu_secs: burst.cpu.0,
            bench_cpu_secs: burst.cpu.1,
            peak_rss: peak_rss as f64,
        }
    }

    /// The median of every figure, each taken on its own over the runs
    /// (`get` finds the figures in a run's).
    pub(crate) fn medians<R>(runs: &[R], get: fn(&R) -> &Fanout) -> Fanout {
        let median = |field: fn(&Fanout) -> f64| median(runs, |r| field(get(r)));
        Fanout {
            open_secs: median(|f| f.open_secs),
            rss_before: median(|f| f.rss_before),
            rss_after: median(|f| f.rss_after),
            bytes_per_conn: median(|f| f.bytes_per_conn),
            p50_ms: median(|f| f.p50_ms),
            p99_ms: median(|f| f.p99_ms),
            p999_ms: median(|f| f.p999_ms),
            max_ms: median(|f| f.max_ms),
            latency_server_cpu_secs: median(|f| f.latency_server_cpu_secs),
            latency_bench_cpu_secs: median(|f| f.latency_bench_cpu_secs),
            burst_secs: median(|f| f.burst_secs),
            deliveries_per_sec: median(|f| f.deliveries_per_sec),
            server_cpu_secs: median(|f| f.server_cpu_secs),
            bench_cpu_secs: median(|f| f.bench_cpu_secs),
            peak_rss: median(|f| f.peak_rss),
        }
    }

    /// The idle memory table's head, as every scenario prints it.
    pub(crate) fn idle_head() -> String {
        format!(
            "{:<12} {:>8} {:>15} {:>14} {:>14}",
            "connections", "open s", "RSS before MiB", "RSS after MiB", "KiB/connection"
        )
    }

    /// This run's row of the idle memory table.
    pub(crate) fn idle_row(&self) -> String {
        format!(
            "{:>8.2} {:>15.1} {:>14.1} {:>14.2}",
            self.open_secs,
            mib(self.rss_before),
            mib(self.rss_after),
            self.bytes_per_conn / 1024.0
        )
    }

    /// The latency table's head, as every scenario prints it.
    pub(crate) fn latency_head() -> String {
        format!(
            "{:<12} {:>8} {:>8} {:>9} {:>8} {:>13} {:>12}",
            "connections", "p50 ms", "p99 ms", "p999 ms", "max ms", "server CPU s", "bench CPU s"
        )
    }

    /// This run's row of the latency table.
    pub(crate) fn latency_row(&self) -> String {
        format!(
            "{:>8.2} {:>8.2} {:>9.2} {:>8.2} {:>13.2} {:>12.2}",
            self.p50_ms,
            self.p99_ms,
            self.p999_ms,
            self.max_ms,
            self.latency_server_cpu_secs,
            self.latency_bench_cpu_secs
        )
    }

    /// The idle memory JSON line of `scenario`, named `name`.
    pub(crate) fn idle_json(
        &self,
        scenario: &str,
        name: String,
        settle_ms: u64,
    ) -> serde_json::Value {
        json!({
            "scenario": scenario, "name": name,
            "open_secs": r3(self.open_secs),
            "rss_before_bytes": self.rss_before.round() as u64,
            "rss_after_bytes": self.rss_after.round() as u64,
            "bytes_per_connection": self.bytes_per_conn.round() as i64,
            "settle_ms": settle_ms,
        })
    }

    /// The latency JSON line of `scenario`, named `name`: `events` sent at
    /// `rate` per second.
    pub(crate) fn latency_json(
        &self,
        scenario: &str,
        name: String,
        events: u64,
        rate: f64,
    ) -> serde_json::Value {
        json!({
            "scenario": scenario, "name": name,
            "p50_ms": r3(self.p50_ms), "p99_ms": r3(self.p99_ms), "p999_ms": r3(self.p999_ms),
            "max_ms": r3(self.max_ms), "events": events, "rate": rate,
            "server_cpu_secs": r3(self.latency_server_cpu_secs),
            "bench_cpu_secs": r3(self.latency_bench_cpu_secs),
        })
    }
}

/// Microseconds (as the histograms hold them) in milliseconds.
pub(crate) fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Bytes in MiB, for the tables.
pub(crate) fn mib(v: f64) -> f64 {
    v / (1024.0 * 1024.0)
}

/// `v` rounded to three decimals, for the JSON lines.
pub(crate) fn r3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}
