//! WebSockets at scale: many sockets subscribed to one topic, served by the
//! all-in-one `realtime` binary running as a process of its own (as for
//! `rt-bench sse`), so that its memory is measured apart from the bench's;
//! with `--distributed`, by the `ws-edge` binary, the HTTP publishes going to
//! a `publisher` process of their own and carried to the edge over NATS (the
//! publishes over WebSockets stay on the edge).
//!
//! For every connection count (`--connections`, default 1,000 and 10,000) and
//! every run, the bench starts a fresh server process (or two) over a
//! database of its own (created and dropped by the bench), and on a fresh
//! topic:
//!
//! 1. idle memory: reads the server's resident set (`VmRSS`), opens the
//!    sockets (at most `--open-concurrency` at a time; each connects to
//!    `/v1/ws`, subscribes to the topic and waits for the subscription's
//!    ack), waits `--settle-ms`, and reads it again;
//! 2. latency at a fixed rate: publishes `--rate` events per second over HTTP
//!    for `--seconds`, each carrying the wall-clock time it was sent at; every
//!    socket records, per event, arrival time minus send time, and the
//!    event's commit stamp (`time`) minus send time (sent → commit, which
//!    the ceiling does not pay), and checks that it saw every seq exactly
//!    once and in order;
//! 3. saturation: publishes `--burst` events over HTTP as batch requests of
//!    `--batch`, as fast as `--publishers` concurrent publishers can, and
//!    measures deliveries (events × sockets) per second from the first
//!    publish to the last socket having the last event;
//! 4. publish → ack: `--ack-sockets` more sockets publish `--acks` events over
//!    the WebSocket, on a topic of their own, each keeping at most
//!    `--ack-window` publishes waiting for their ack, and record the time
//!    from sending a publish frame to reading its ack (the ack comes after
//!    the commit); the subscribed sockets stay connected meanwhile.
//!
//! A subscribed socket the server closes (a client too far behind is closed
//! with 1008) or whose connection breaks reconnects at once and subscribes
//! again with `after` set to the last seq it got, and resumes from the log;
//! such reconnects are counted and reported, and the exactly-once, in-order
//! check spans them. The bench's own CPU time is reported next to the
//! server's: client and server share the machine.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Deserialize;
use serde_json::{json, value::RawValue};
use tokio::{
    net::TcpStream,
    sync::{Semaphore, mpsc::UnboundedSender, mpsc::unbounded_channel},
    task::JoinSet,
};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{self, Message, protocol::WebSocketConfig},
};

use crate::{
    server::{
        self, Binaries, Burst, CpuMark, DeployArgs, Deployment, DeploymentCpuMark, Drops, Fanout,
        Firsts, Idle, Latencies, Msg, Outcome, PublishWaits, PublisherCpu, each_count,
        ensure_all_ran, gather, gather_last_done, gather_latencies, latency_events, mib, ms,
        now_us, open_files_limit, print_json_lines, publish_at_rate, publish_burst,
        publisher_client, r3, spawn_clients,
    },
    sse_client::is_transport,
    ws_client::{Incoming, WsStream},
};

#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    pub(crate) deploy: DeployArgs,
    /// WebSocket counts to measure, comma-separated; all on one topic.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    connections: Vec<usize>,
    /// Sockets being opened (connected and subscribed) at once.
    #[arg(long, default_value_t = 200)]
    open_concurrency: usize,
    /// Pause between the last subscription ack and the second memory
    /// reading, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    settle_ms: u64,
    /// Events per second in the latency scenario.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Seconds of publishing in the latency scenario.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Events in the saturation burst.
    #[arg(long, default_value_t = 2000)]
    burst: u64,
    /// Events per batch request in the burst.
    #[arg(long, default_value_t = 100)]
    batch: u64,
    /// Batch requests in flight at once in the burst.
    #[arg(long, default_value_t = 4)]
    publishers: usize,
    /// Events published over WebSockets in the publish → ack scenario.
    #[arg(long, default_value_t = 1000)]
    acks: u64,
    /// Sockets publishing in the publish → ack scenario (they share `--acks`).
    #[arg(long, default_value_t = 1)]
    ack_sockets: usize,
    /// Publishes each of those sockets keeps waiting for their ack; 1 sends
    /// the next publish only once the previous one is acknowledged.
    #[arg(long, default_value_t = 1)]
    ack_window: usize,
    /// Longest wait, in seconds, for all sockets to open, for the last event
    /// of a scenario after its last publish, or for an ack.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Runs per connection count; the median of each figure is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
}

/// One run's figures (or, in the report, the median of each over the runs).
#[derive(Clone, Copy)]
struct Figure {
    /// The idle memory, latency and saturation scenarios'.
    fanout: Fanout,
    /// The publisher process's CPU in the latency and saturation scenarios
    /// (publishes over the WebSocket go to the edge).
    publisher_cpu: PublisherCpu,
    /// The latency scenario's publishes, sent → answered and sent →
    /// committed.
    publish: PublishWaits,
    /// Publish frame sent → its ack read, over the WebSocket.
    ack_p50_ms: f64,
    ack_p99_ms: f64,
    ack_p999_ms: f64,
    ack_max_ms: f64,
    /// First publish frame sent → last ack read.
    ack_secs: f64,
    /// `--acks` / `ack_secs`.
    publishes_per_sec: f64,
    /// CPU time, in seconds, the server and the bench used for the publishes.
    ack_server_cpu_secs: f64,
    ack_bench_cpu_secs: f64,
    /// Sockets the server closed and the bench reopened, whole run.
    closed: f64,
    /// Sockets whose connection broke and the bench reopened, whole run.
    broken: f64,
}

/// What every subscribed socket of a run is told.
pub(crate) struct Plan {
    topic: String,
    /// The server, and the path of its WebSocket (the edge's `/v1/ws`).
    addr: SocketAddr,
    path: String,
    /// Seqs 1..=latency_events are the latency scenario's.
    latency_events: u64,
    /// The burst's last seq.
    last_seq: u64,
    /// How the edge's event frames on the topic begin, up to the seq: see
    /// [`quick_seq`].
    event_start: Vec<u8>,
    /// The events' `time` is their commit stamp (the edge's; the ceiling's
    /// is a fixed one): sent → commit is recorded too.
    commit_stamped: bool,
}

impl Plan {
    /// Sockets of `addr`'s WebSocket at `path`, subscribed to `topic`, whose
    /// seqs up to `latency_events` measure latency (and sent → commit, when
    /// the events are `commit_stamped`), the run ending at `last_seq`.
    pub(crate) fn new(
        addr: SocketAddr,
        path: &str,
        topic: &str,
        latency_events: u64,
        last_seq: u64,
        commit_stamped: bool,
    ) -> Plan {
        Plan {
            topic: topic.to_owned(),
            addr,
            path: path.to_owned(),
            latency_events,
            last_seq,
            event_start: event_start(topic),
            commit_stamped,
        }
    }
}

/// A server frame, as far as the bench reads it: an event, an ack, or
/// anything else (an error, a reset), which the bench reports whole.
#[derive(Deserialize)]
struct Frame<'a> {
    op: &'a str,
    topic: Option<&'a str>,
    seq: Option<u64>,
    /// Subscription acks: the position the subscription starts after.
    after: Option<u64>,
    #[serde(rename = "ref")]
    reference: Option<&'a str>,
    #[serde(rename = "type")]
    event_type: Option<&'a str>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    /// Events: the commit stamp (RFC 3339).
    time: Option<&'a str>,
}

#[derive(Deserialize)]
struct Sent {
    sent_us: u64,
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long a connect, a handshake or a subscription ack may take.
const OPEN_WAIT: Duration = Duration::from_secs(30);

/// The `ref` of every subscription.
const SUBSCRIBE_REF: &str = "s";

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    args.deploy.check()?;
    anyhow::ensure!(
        !args.connections.is_empty() && args.connections.iter().all(|&n| n > 0),
        "--connections must list counts of at least 1"
    );
    anyhow::ensure!(
        args.rate > 0.0 && args.seconds > 0.0,
        "--rate and --seconds must be positive"
    );
    anyhow::ensure!(
        args.burst > 0 && args.batch > 0,
        "--burst and --batch must be at least 1"
    );
    anyhow::ensure!(
        args.open_concurrency > 0 && args.publishers > 0,
        "--open-concurrency and --publishers must be at least 1"
    );
    anyhow::ensure!(
        args.acks > 0 && args.ack_sockets > 0 && args.ack_window > 0,
        "--acks, --ack-sockets and --ack-window must be at least 1"
    );
    let binaries = args.deploy.binaries(EDGE)?;
    if let Some(limit) = open_files_limit() {
        let most = args.connections.iter().max().copied().unwrap_or(0) + args.ack_sockets;
        if limit < most as u64 + 100 {
            eprintln!(
                "warning: the open-file limit is {limit}; {most} sockets need about {} descriptors \
                 in the bench and as many in the server (raise it with `ulimit -n`)",
                most + 100
            );
        }
    }

    // A database of the bench's own, dropped at the end.
    let db = rt_tests::TestDb::create_on(&args.deploy.services.database_url).await;
    let results = each_count(
        &args.connections,
        args.runs,
        |n, run| one_run(&binaries, &db.url, &args, n, run),
        |at, f, firsts| {
            if let Some(error) = &firsts.error {
                eprintln!(
                    "{at}: {} sockets broke and reconnected; the first: {error}",
                    f.broken
                );
            }
            if let Some(close) = &firsts.close {
                eprintln!(
                    "{at}: the server closed {} sockets, which reconnected; the first: {close}",
                    f.closed
                );
            }
            if !args.quiet {
                eprintln!(
                    "{at}: opened in {:.1} s, {:.1} KiB/connection idle; \
                     latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; burst {:.0} deliveries/s; \
                     publish -> ack p50 {:.2} ms, p99 {:.2} ms, {:.0} publishes/s; \
                     reconnects: {} closed, {} broken",
                    f.fanout.open_secs,
                    f.fanout.bytes_per_conn / 1024.0,
                    f.fanout.p50_ms,
                    f.fanout.p99_ms,
                    f.fanout.max_ms,
                    f.fanout.deliveries_per_sec,
                    f.ack_p50_ms,
                    f.ack_p99_ms,
                    f.publishes_per_sec,
                    f.closed,
                    f.broken
                );
            }
        },
        medians,
    )
    .await;
    drop(db);

    print_report(&args, &results);
    ensure_all_ran(&results)
}

/// The edge binary of a distributed deployment.
const EDGE: &str = "ws-edge";

/// One run with `n` sockets, on a server process (or two) of its own.
async fn one_run(
    binaries: &Binaries,
    database_url: &str,
    args: &Args,
    n: usize,
    run: usize,
) -> anyhow::Result<(Figure, Firsts)> {
    let env = [
        (
            "RT_WS_MAX_CONNECTIONS",
            (n + args.ack_sockets + 1000).to_string(),
        ),
        ("RT_WS_PUBLISH_RATE", "1000000".to_owned()),
    ];
    let mut deployment = args.deploy.start(binaries, database_url, &env).await?;
    let mut sockets = JoinSet::new();
    let drops = Arc::new(Drops::default());
    let result = measure(&deployment, args, n, run, &drops, &mut sockets).await;
    // Sockets first, so that none sees the server go and reconnects.
    sockets.shutdown().await;
    let figure = result.map_err(|e| deployment.explain(e))?;
    Ok((figure, drops.take_firsts()))
}

/// The four scenarios, in order, on `n` sockets subscribed to one fresh topic.
async fn measure(
    deployment: &Deployment,
    args: &Args,
    n: usize,
    run: usize,
    drops: &Arc<Drops>,
    sockets: &mut JoinSet<()>,
) -> anyhow::Result<Figure> {
    let server = &deployment.edge;
    let topic = format!("ws{n}-{run}");
    let latency_events = latency_events(args.rate, args.seconds);
    let ws_url = format!("{}/v1/ws", server.url("").replacen("http://", "ws://", 1));
    let plan = Arc::new(Plan::new(
        server.addr()?,
        "/v1/ws",
        &topic,
        latency_events,
        latency_events + args.burst,
        true,
    ));
    let deadline = Duration::from_secs(args.timeout);

    // 1. Idle memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = server.status_kib("VmRSS")? * 1024;
    let gate = Arc::new(Semaphore::new(args.open_concurrency));
    let (tx, mut rx) = unbounded_channel();
    let opening = Instant::now();
    spawn_clients(sockets, n, "socket", &tx, |_| {
        let (plan, gate, drops, tx) = (plan.clone(), gate.clone(), drops.clone(), tx.clone());
        async move { follow(&plan, &gate, &drops, &tx).await }
    });
    drop(tx);
    gather(
        &mut rx,
        n,
        "sockets",
        deadline,
        "subscribed",
        |msg| match msg {
            Msg::Opened => Ok(()),
            _ => anyhow::bail!("a socket got an event before any was published"),
        },
    )
    .await?;
    let open_secs = opening.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(args.settle_ms)).await;
    let rss_after = server.status_kib("VmRSS")? * 1024;

    // 2. Latency at a fixed rate.
    let cpu = DeploymentCpuMark::now(deployment)?;
    let answered = publish_at_rate(
        deployment.publish_to(),
        std::slice::from_ref(&plan.topic),
        latency_events,
        args.rate,
    )
    .await?;
    let latencies = gather_latencies(
        &mut rx,
        n,
        "sockets",
        deadline,
        "got the last latency event",
        latency_events,
        true,
    )
    .await?;
    let to_commit = latencies.stamped()?;
    let (latency_cpu, latency_publisher_cpu) = cpu.used(deployment)?;

    // 3. Saturation.
    let cpu = DeploymentCpuMark::now(deployment)?;
    let started = Instant::now();
    let publisher = publisher_client(args.publishers)?;
    publish_burst(
        &publisher,
        deployment.publish_to(),
        std::slice::from_ref(&plan.topic),
        args.burst,
        args.batch,
        args.publishers,
    )
    .await?;
    let last_done = gather_last_done(
        &mut rx,
        n,
        "sockets",
        deadline,
        "got the last burst event",
        started,
    )
    .await?;
    let (burst_cpu, burst_publisher_cpu) = cpu.used(deployment)?;

    // 4. Publish → ack over the WebSocket, on a topic of its own (the edge
    // commits these itself, distributed or not).
    let cpu = CpuMark::now(server)?;
    let (acks, ack_secs) = publish_over_sockets(&ws_url, &format!("{}-acks", plan.topic), args)
        .await
        .context("publish -> ack")?;
    let (ack_server_cpu_secs, ack_bench_cpu_secs) = cpu.used(server)?;
    // A subscribed socket that failed after its last event (an unexpected
    // frame, a reconnect that did not work) fails the run too.
    while let Ok(msg) = rx.try_recv() {
        if let Msg::Failed(e) = msg {
            anyhow::bail!("after its last event, {e}");
        }
    }

    Ok(Figure {
        ack_p50_ms: ms(acks.value_at_quantile(0.5)),
        ack_p99_ms: ms(acks.value_at_quantile(0.99)),
        ack_p999_ms: ms(acks.value_at_quantile(0.999)),
        ack_max_ms: ms(acks.max()),
        ack_secs,
        publishes_per_sec: args.acks as f64 / ack_secs,
        ack_server_cpu_secs,
        ack_bench_cpu_secs,
        publisher_cpu: PublisherCpu {
            latency_secs: latency_publisher_cpu,
            burst_secs: burst_publisher_cpu,
        },
        publish: PublishWaits::of(&answered, to_commit),
        closed: drops.closed.load(Ordering::Relaxed) as f64,
        broken: drops.broken.load(Ordering::Relaxed) as f64,
        fanout: Fanout::measured(
            n,
            Idle {
                open_secs,
                rss_before,
                rss_after,
            },
            &latencies.received,
            latency_cpu,
            Burst {
                deliveries: args.burst * n as u64,
                secs: last_done.duration_since(started).as_secs_f64(),
                cpu: burst_cpu,
            },
            server.status_kib("VmHWM")? * 1024,
        ),
    })
}

/// One subscribed socket: opens and subscribes, then reads events until the
/// burst's last one, checking that seqs come exactly once and in order,
/// reconnecting and subscribing with `after` when the server closes it or
/// the connection breaks. Then it keeps reading (answering the server's
/// pings) until the run ends, failing on any further frame.
pub(crate) async fn follow(
    plan: &Plan,
    gate: &Semaphore,
    drops: &Drops,
    tx: &UnboundedSender<Msg>,
) -> anyhow::Result<()> {
    let mut ws = {
        let _permit = gate.acquire().await?;
        subscribe(plan, None).await?
    };
    if tx.send(Msg::Opened).is_err() {
        return Ok(());
    }
    let mut latencies = Latencies::new(plan.commit_stamped)?;
    let mut last = 0;
    loop {
        match ws.next().await {
            Ok(Some(Incoming::Text(text))) => {
                if !on_event(plan, text, &mut last, &mut latencies, tx)? {
                    return Ok(());
                }
                continue;
            }
            Ok(Some(Incoming::Binary(_))) => anyhow::bail!("got a binary frame after seq {last}"),
            Ok(Some(Incoming::Close(close))) => {
                let why = close.map_or_else(
                    || "a close without a code".to_owned(),
                    |(code, reason)| format!("{code} {reason}"),
                );
                drops.closed(format!("after seq {last}: {why}"));
            }
            Ok(None) => drops.broken(format!(
                "after seq {last}: the socket ended without a close"
            )),
            Err(e) if is_transport(&e) => {
                drops.broken(format!("{:#}", e.context(format!("after seq {last}"))));
            }
            Err(e) => return Err(e.context(format!("reading the socket after seq {last}"))),
        }
        let _permit = gate.acquire().await?;
        ws = subscribe(plan, Some(last))
            .await
            .with_context(|| format!("reconnecting after seq {last}"))?;
    }
}

/// One event frame read by [`follow`]: checks it comes next, records its
/// latency (and sent → commit, when stamped) and reports what the run waits
/// for; false once the run stopped listening.
fn on_event(
    plan: &Plan,
    text: &[u8],
    last: &mut u64,
    latencies: &mut Latencies,
    tx: &UnboundedSender<Msg>,
) -> anyhow::Result<bool> {
    // A burst event needs only its seq, as the SSE client reads only its id.
    let burst = quick_seq(text, &plan.event_start).filter(|&s| s > plan.latency_events);
    let seq = match burst {
        Some(seq) => {
            take_seq(plan, last, seq)?;
            seq
        }
        None => {
            let received = now_us();
            let shown = || String::from_utf8_lossy(text);
            let frame: Frame = serde_json::from_slice(text)
                .with_context(|| format!("frame {:?} after seq {last}", shown()))?;
            anyhow::ensure!(
                frame.op == "event"
                    && frame.topic == Some(plan.topic.as_str())
                    && frame.event_type == Some("message"),
                "got {} after seq {last}",
                shown()
            );
            let seq = frame
                .seq
                .with_context(|| format!("an event without a seq after seq {last}: {}", shown()))?;
            take_seq(plan, last, seq)?;
            if seq <= plan.latency_events {
                let data = frame
                    .data
                    .with_context(|| format!("event {seq} has no data: {}", shown()))?;
                let sent: Sent = serde_json::from_str(data.get())
                    .with_context(|| format!("event {seq} data {:?}", data.get()))?;
                latencies
                    .record(received, sent.sent_us, frame.time)
                    .with_context(|| format!("event {seq}: {}", shown()))?;
                if seq == plan.latency_events {
                    let done = std::mem::replace(latencies, Latencies::new(plan.commit_stamped)?);
                    if tx.send(Msg::Latency(Box::new(done))).is_err() {
                        return Ok(false);
                    }
                }
            }
            seq
        }
    };
    Ok(!(seq == plan.last_seq && tx.send(Msg::Done(Instant::now())).is_err()))
}

/// Checks that `seq` is the one after `last`, within the run, and takes it.
fn take_seq(plan: &Plan, last: &mut u64, seq: u64) -> anyhow::Result<()> {
    anyhow::ensure!(
        seq == *last + 1 && seq <= plan.last_seq,
        "got seq {seq} after seq {last} (expected {}, the last being {})",
        *last + 1,
        plan.last_seq
    );
    *last = seq;
    Ok(())
}

/// `{"op":"event","topic":<topic>,"seq":`: how the edge writes an event
/// frame of `topic`, up to its seq (the op, then the event's fields in
/// their order).
pub(crate) fn event_start(topic: &str) -> Vec<u8> {
    let topic = serde_json::to_string(topic).unwrap_or_default();
    format!(r#"{{"op":"event","topic":{topic},"seq":"#).into_bytes()
}

/// The seq of an event frame that begins with `start` (see [`event_start`])
/// and has the type `message`; `None` for any other frame, which is then
/// read as JSON.
pub(crate) fn quick_seq(text: &[u8], start: &[u8]) -> Option<u64> {
    let rest = text.strip_prefix(start)?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if !rest[digits..].starts_with(br#","type":"message","#) {
        return None;
    }
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

/// Connects to `url` without Nagle's delay (frames are small and each is
/// waited for).
async fn connect(url: &str, config: WebSocketConfig) -> anyhow::Result<Socket> {
    let connected = tokio::time::timeout(
        OPEN_WAIT,
        tokio_tungstenite::connect_async_with_config(url, Some(config), true),
    )
    .await
    .map_err(|_| anyhow::anyhow!("no WebSocket handshake within {} s", OPEN_WAIT.as_secs()))?;
    match connected {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(res)) => {
            let body = res
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            anyhow::bail!(
                "the WebSocket handshake was answered {}: {body}",
                res.status()
            )
        }
        Err(e) => Err(anyhow::Error::new(e).context("WebSocket connect")),
    }
}

/// Opens a socket to the plan's server and subscribes it to the topic (after
/// `after`, or from now on), waiting for the subscription's ack, which must
/// name `after` (0, the topic being fresh, when none is given).
async fn subscribe(plan: &Plan, after: Option<u64>) -> anyhow::Result<WsStream> {
    let opened = tokio::time::timeout(OPEN_WAIT, WsStream::open(plan.addr, &plan.path));
    let mut ws = opened
        .await
        .map_err(|_| anyhow::anyhow!("no WebSocket handshake within {} s", OPEN_WAIT.as_secs()))?
        .context("WebSocket connect")?;
    let mut frame = json!({"op": "subscribe", "topic": plan.topic, "ref": SUBSCRIBE_REF});
    if let Some(after) = after {
        frame["after"] = after.into();
    }
    ws.send_text(frame.to_string().as_bytes())
        .await
        .context("sending the subscribe frame")?;
    let answer = tokio::time::timeout(OPEN_WAIT, ws.next())
        .await
        .map_err(|_| anyhow::anyhow!("no subscription ack within {} s", OPEN_WAIT.as_secs()))?
        .context("waiting for the subscription ack")?;
    let text = match answer {
        Some(Incoming::Text(text)) => text,
        other => anyhow::bail!("the subscription was answered with {other:?}"),
    };
    let shown = || String::from_utf8_lossy(text);
    let ack: Frame = serde_json::from_slice(text)
        .with_context(|| format!("subscription answer {:?}", shown()))?;
    let expected = after.unwrap_or(0);
    anyhow::ensure!(
        ack.op == "ack"
            && ack.reference == Some(SUBSCRIBE_REF)
            && ack.topic == Some(plan.topic.as_str()),
        "the subscription was answered with {}",
        shown()
    );
    anyhow::ensure!(
        ack.after == Some(expected),
        "the subscription ack should start after {expected}: {}",
        shown()
    );
    Ok(ws)
}

/// The next text frame, pings and pongs skipped; a close, a binary frame, an
/// error or nothing within `within` is an error.
async fn next_text(ws: &mut Socket, within: Duration) -> anyhow::Result<tungstenite::Utf8Bytes> {
    let until = tokio::time::Instant::now() + within;
    loop {
        let next = tokio::time::timeout_at(until, ws.next())
            .await
            .map_err(|_| anyhow::anyhow!("nothing within {} s", within.as_secs()))?;
        match next {
            Some(Ok(Message::Text(text))) => return Ok(text),
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
            Some(Ok(Message::Binary(_))) => anyhow::bail!("got a binary frame"),
            Some(Ok(Message::Close(frame))) => {
                anyhow::bail!("the server closed the socket: {frame:?}")
            }
            Some(Err(e)) => return Err(anyhow::Error::new(e).context("reading the socket")),
            None => anyhow::bail!("the socket ended"),
        }
    }
}

/// Scenario 4: `--ack-sockets` sockets (connected before the clock starts)
/// share `--acks` publishes to `topic`, each with up to `--ack-window`
/// waiting for their ack. Returns the send → ack latencies (µs) and the time
/// from the first publish to the last ack, and checks that the acks' seqs
/// are 1..=acks, each once, increasing on every socket.
async fn publish_over_sockets(
    url: &str,
    topic: &str,
    args: &Args,
) -> anyhow::Result<(Histogram<u32>, f64)> {
    let mut sockets = Vec::with_capacity(args.ack_sockets);
    for _ in 0..args.ack_sockets {
        sockets.push(connect(url, WebSocketConfig::default()).await?);
    }
    let deadline = Duration::from_secs(args.timeout);
    let k = args.ack_sockets as u64;
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for (i, ws) in sockets.into_iter().enumerate() {
        let quota = args.acks / k + u64::from((i as u64) < args.acks % k);
        let (topic, window) = (topic.to_owned(), args.ack_window);
        tasks.spawn(async move {
            publish_and_wait(ws, &topic, i, quota, window, deadline)
                .await
                .with_context(|| format!("publishing socket {i}"))
        });
    }
    let mut hist = Histogram::<u32>::new(2)?;
    let mut seqs = Vec::with_capacity(args.acks as usize);
    while let Some(done) = tasks.join_next().await {
        let (h, s) = done??;
        hist.add(&h)?;
        seqs.extend(s);
    }
    let secs = started.elapsed().as_secs_f64();
    seqs.sort_unstable();
    anyhow::ensure!(
        seqs.iter().copied().eq(1..=args.acks),
        "the {} acks do not carry the seqs 1 to {}, each once (first {:?}, last {:?})",
        seqs.len(),
        args.acks,
        seqs.first(),
        seqs.last()
    );
    Ok((hist, secs))
}

/// One publishing socket: sends `quota` publishes (ref `"{socket}-{i}"`),
/// at most `window` waiting for their ack, and reads the acks, which come in
/// the order the publishes were sent.
async fn publish_and_wait(
    mut ws: Socket,
    topic: &str,
    socket: usize,
    quota: u64,
    window: usize,
    deadline: Duration,
) -> anyhow::Result<(Histogram<u32>, Vec<u64>)> {
    let mut hist = Histogram::<u32>::new(2)?;
    let mut seqs = Vec::with_capacity(quota as usize);
    let mut waiting: VecDeque<(String, Instant)> = VecDeque::with_capacity(window);
    let mut sent = 0;
    while (seqs.len() as u64) < quota {
        while waiting.len() < window && sent < quota {
            let reference = format!("{socket}-{sent}");
            let frame = json!({
                "op": "publish", "topic": topic, "ref": reference,
                "data": {"n": sent, "sent_us": now_us()},
            });
            waiting.push_back((reference, Instant::now()));
            ws.send(Message::Text(frame.to_string().into()))
                .await
                .with_context(|| format!("sending publish {sent}"))?;
            sent += 1;
        }
        let text = next_text(&mut ws, deadline)
            .await
            .with_context(|| format!("waiting for an ack after {} acks", seqs.len()))?;
        let acked = Instant::now();
        let (reference, at) = waiting
            .pop_front()
            .with_context(|| format!("got {text} with no publish waiting"))?;
        let ack: Frame =
            serde_json::from_str(&text).with_context(|| format!("publish answer {text:?}"))?;
        anyhow::ensure!(
            ack.op == "ack"
                && ack.reference == Some(reference.as_str())
                && ack.topic == Some(topic),
            "publish {reference} was answered with {text}"
        );
        let seq = ack
            .seq
            .with_context(|| format!("the ack of publish {reference} has no seq: {text}"))?;
        anyhow::ensure!(
            seqs.last().is_none_or(|&prev| seq > prev),
            "publish {reference} got seq {seq}, after {:?} for the one before",
            seqs.last()
        );
        hist.record(acked.duration_since(at).as_micros() as u64)?;
        seqs.push(seq);
    }
    Ok((hist, seqs))
}

/// The median of every figure, each taken on its own over the runs.
fn medians(runs: &[Figure]) -> Figure {
    let median = |get: fn(&Figure) -> f64| crate::server::median(runs, get);
    Figure {
        fanout: Fanout::medians(runs, |f| &f.fanout),
        publisher_cpu: PublisherCpu::medians(runs, |f| &f.publisher_cpu),
        publish: PublishWaits::medians(runs, |f| &f.publish),
        ack_p50_ms: median(|f| f.ack_p50_ms),
        ack_p99_ms: median(|f| f.ack_p99_ms),
        ack_p999_ms: median(|f| f.ack_p999_ms),
        ack_max_ms: median(|f| f.ack_max_ms),
        ack_secs: median(|f| f.ack_secs),
        publishes_per_sec: median(|f| f.publishes_per_sec),
        ack_server_cpu_secs: median(|f| f.ack_server_cpu_secs),
        ack_bench_cpu_secs: median(|f| f.ack_bench_cpu_secs),
        closed: median(|f| f.closed),
        broken: median(|f| f.broken),
    }
}

fn print_report(args: &Args, results: &[Outcome<Figure>]) {
    let bus = args.deploy.services.bus();
    let latency_events = latency_events(args.rate, args.seconds);
    println!(
        "\nWebSockets, all subscribed to one topic, {}, median of {} runs (each figure on its own)",
        args.deploy.title(EDGE),
        args.runs.max(1)
    );
    let publisher_head = args.deploy.publisher_cpu_head();
    // One table per scenario, a row per connection count.
    let table = |title: String, head: String, row: &dyn Fn(&Figure) -> String| {
        server::table(results, &title, &head, row);
    };

    table(
        format!(
            "idle memory (server VmRSS, {} ms after the last subscription ack)",
            args.settle_ms
        ),
        Fanout::idle_head(),
        &|f| f.fanout.idle_row(),
    );
    table(
        format!(
            "latency: {latency_events} events at {}/s over HTTP, publish sent -> event frame parsed by the client",
            args.rate
        ),
        Fanout::latency_head() + &PublishWaits::head() + &publisher_head,
        &|f| {
            f.fanout.latency_row()
                + &f.publish.cells()
                + &PublisherCpu::cell(f.publisher_cpu.latency_secs)
        },
    );
    table(
        format!(
            "saturation: burst of {} events in HTTP batch requests of {}, {} in flight; \
             reconnects over the whole run",
            args.burst, args.batch, args.publishers
        ),
        format!(
            "{:<12} {:>13} {:>8} {:>13} {:>12} {:>13} {:>13} {:>13}{publisher_head}",
            "connections",
            "deliveries/s",
            "secs",
            "server CPU s",
            "bench CPU s",
            "peak RSS MiB",
            "closed+resumed",
            "broke+resumed"
        ),
        &|f| {
            format!(
                "{:>13.0} {:>8.2} {:>13.2} {:>12.2} {:>13.1} {:>14.0} {:>13.0}{}",
                f.fanout.deliveries_per_sec,
                f.fanout.burst_secs,
                f.fanout.server_cpu_secs,
                f.fanout.bench_cpu_secs,
                mib(f.fanout.peak_rss),
                f.closed,
                f.broken,
                PublisherCpu::cell(f.publisher_cpu.burst_secs)
            )
        },
    );
    table(
        format!(
            "publish -> ack over the WebSocket: {} publishes on {} socket(s), {} waiting at most per socket, \
             on a topic of their own while the subscribed sockets idle",
            args.acks, args.ack_sockets, args.ack_window
        ),
        format!(
            "{:<12} {:>8} {:>8} {:>9} {:>8} {:>12} {:>13} {:>12}",
            "connections",
            "p50 ms",
            "p99 ms",
            "p999 ms",
            "max ms",
            "publishes/s",
            "server CPU s",
            "bench CPU s"
        ),
        &|f| {
            format!(
                "{:>8.2} {:>8.2} {:>9.2} {:>8.2} {:>12.0} {:>13.2} {:>12.2}",
                f.ack_p50_ms,
                f.ack_p99_ms,
                f.ack_p999_ms,
                f.ack_max_ms,
                f.publishes_per_sec,
                f.ack_server_cpu_secs,
                f.ack_bench_cpu_secs
            )
        },
    );
    for o in results {
        if let Some(e) = &o.firsts.close {
            println!(
                "\n{} connections: the server closed sockets, which resumed; the first close: {e}",
                o.n
            );
        }
        if let Some(e) = &o.firsts.error {
            println!(
                "\n{} connections: sockets broke and resumed; the first error: {e}",
                o.n
            );
        }
        if let Err(e) = &o.result {
            println!("\n{} connections FAILED: {e}", o.n);
        }
    }

    for o in results {
        let n = o.n;
        let common = json!({
            "connections": n, "bus": bus, "deployment": args.deploy.name(),
            "runs": args.runs.max(1),
        });
        let lines = match &o.result {
            Ok(f) => vec![
                f.fanout.idle_json(
                    "ws",
                    format!("idle memory, {n} connections"),
                    args.settle_ms,
                ),
                PublisherCpu::json(
                    f.publish.json(f.fanout.latency_json(
                        "ws",
                        format!("latency, {n} connections"),
                        latency_events,
                        args.rate,
                    )),
                    f.publisher_cpu.latency_secs,
                ),
                json!({
                    "scenario": "ws", "name": format!("saturation, {n} connections"),
                    "deliveries_per_sec": f.fanout.deliveries_per_sec.round() as u64,
                    "secs": r3(f.fanout.burst_secs),
                    "server_cpu_secs": r3(f.fanout.server_cpu_secs), "bench_cpu_secs": r3(f.fanout.bench_cpu_secs),
                    "publisher_cpu_secs": f.publisher_cpu.burst_secs.map(r3),
                    "peak_rss_bytes": f.fanout.peak_rss.round() as u64,
                    "sockets_closed_and_resumed": f.closed.round() as u64,
                    "sockets_broken_and_resumed": f.broken.round() as u64,
                    "first_close": o.firsts.close,
                    "first_transport_error": o.firsts.error,
                    "burst": args.burst, "batch": args.batch, "publishers": args.publishers,
                }),
                json!({
                    "scenario": "ws", "name": format!("publish ack, {n} connections"),
                    "p50_ms": r3(f.ack_p50_ms), "p99_ms": r3(f.ack_p99_ms),
                    "p999_ms": r3(f.ack_p999_ms), "max_ms": r3(f.ack_max_ms),
                    "publishes_per_sec": f.publishes_per_sec.round() as u64,
                    "secs": r3(f.ack_secs),
                    "server_cpu_secs": r3(f.ack_server_cpu_secs),
                    "bench_cpu_secs": r3(f.ack_bench_cpu_secs),
                    "acks": args.acks, "sockets": args.ack_sockets, "window": args.ack_window,
                }),
            ],
            Err(e) => vec![json!({
                "scenario": "ws", "name": format!("{n} connections"), "error": e,
            })],
        };
        print_json_lines(&common, lines);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_event_is_read_up_to_its_seq_and_anything_else_as_json() {
        let start = event_start("ws1000-0");
        let frame = |rest: &str| format!(r#"{{"op":"event","topic":"ws1000-0",{rest}"#);
        let event =
            frame(r#""seq":42,"type":"message","data":{"n":1},"time":"2026-11-28T00:00:00Z"}"#);
        assert_eq!(quick_seq(event.as_bytes(), &start), Some(42));
        for other in [
            // Another type, topic, field order, or no digits: read as JSON.
            frame(r#""seq":42,"type":"other","data":1}"#),
            frame(r#""type":"message","seq":42,"data":1}"#),
            frame(r#""seq":,"type":"message","data":1}"#),
            event.replace("ws1000-0", "ws1000-1"),
            r#"{"op":"reset","topic":"ws1000-0","from":3}"#.to_owned(),
        ] {
            assert_eq!(quick_seq(other.as_bytes(), &start), None, "{other}");
        }
    }

    #[test]
    fn latency_events_record_sent_to_commit_only_when_stamped() {
        // 2026-12-01T17:10:00.123456Z, in µs since the epoch.
        let stamp = 1_796_145_000_123_456u64;
        let sent_us = stamp - 250;
        let event = |seq: u64, time: Option<&str>| {
            let time = time.map_or_else(String::new, |t| format!(r#","time":"{t}""#));
            format!(
                r#"{{"op":"event","topic":"t","seq":{seq},"type":"message","data":{{"sent_us":{sent_us}}}{time}}}"#
            )
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], 1));
        let (tx, mut rx) = unbounded_channel();
        // Events 1 and 2 of 3 are the latency scenario's.
        let mut read = |plan: &Plan, frames: &[String]| -> anyhow::Result<Option<Latencies>> {
            let (mut last, mut latencies) = (0, Latencies::new(plan.commit_stamped)?);
            for frame in frames {
                on_event(plan, frame.as_bytes(), &mut last, &mut latencies, &tx)?;
            }
            Ok(match rx.try_recv() {
                Ok(Msg::Latency(l)) => Some(*l),
                _ => None,
            })
        };
        let time = Some("2026-12-01T17:10:00.123456Z");
        let stamped = Plan::new(addr, "/v1/ws", "t", 2, 3, true);
        let got = read(&stamped, &[event(1, time), event(2, time)])
            .unwrap_or_else(|e| panic!("{e:#}"))
            .unwrap_or_else(|| panic!("no latencies after the last latency event"));
        assert_eq!(got.received.len(), 2);
        let to_commit = got.to_commit.map(|h| (h.len(), h.min(), h.max()));
        assert_eq!(to_commit, Some((2, 250, 250)));
        for (time, says) in [
            (None, "no `time`"),
            (Some("2026-12-01T17:10:00"), "is not RFC 3339"),
        ] {
            let err = read(&stamped, &[event(1, time)])
                .err()
                .map(|e| format!("{e:#}"))
                .unwrap_or_default();
            assert!(err.contains("event 1") && err.contains(says), "{err}");
        }
        // The ceiling's fixed stamp is not read.
        let ceiling = Plan::new(addr, "/ws", "t", 2, 3, false);
        let got = read(&ceiling, &[event(1, Some("fixed")), event(2, None)])
            .unwrap_or_else(|e| panic!("{e:#}"))
            .unwrap_or_else(|| panic!("no latencies after the last latency event"));
        assert_eq!(got.received.len(), 2);
        assert!(got.to_commit.is_none());
    }

    #[test]
    fn event_and_ack_frames_are_read() {
        let event: Frame = serde_json::from_str(
            r#"{"op":"event","topic":"t","seq":3,"type":"message","data":{"sent_us":7,"n":1},"time":"2026-11-28T00:00:00Z"}"#,
        )
        .expect("an event frame");
        assert_eq!(
            (event.op, event.topic, event.seq),
            ("event", Some("t"), Some(3))
        );
        let sent: Sent = serde_json::from_str(event.data.expect("data").get()).expect("sent_us");
        assert_eq!(sent.sent_us, 7);

        let ack: Frame = serde_json::from_str(r#"{"op":"ack","ref":"s","topic":"t","after":0}"#)
            .expect("an ack frame");
        assert_eq!(
            (ack.reference, ack.after, ack.seq),
            (Some("s"), Some(0), None)
        );
    }
}
