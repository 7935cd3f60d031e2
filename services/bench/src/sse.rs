//! Server-Sent Events at scale: many streams on one topic, served by the
//! all-in-one `realtime` binary running as a process of its own, so that its
//! memory is measured apart from the bench's.
//!
//! For every connection count (`--connections`, default 1,000 and 10,000) and
//! every run, the bench starts a fresh server process over a database of its
//! own (created and dropped by the bench), and on a fresh topic:
//!
//! 1. idle memory: reads the server's resident set (`VmRSS`), opens the
//!    streams (at most `--open-concurrency` at a time, each checked for a 200
//!    and its first `retry:` chunk), waits `--settle-ms`, and reads it again;
//! 2. latency at a fixed rate: publishes `--rate` events per second for
//!    `--seconds`, each carrying the wall-clock time it was sent at; every
//!    stream records, per event, arrival time minus send time, and checks
//!    that it saw every seq exactly once and in order;
//! 3. saturation: publishes `--burst` events as batch requests of `--batch`,
//!    as fast as `--publishers` concurrent publishers can, and measures
//!    deliveries (events × streams) per second from the first publish to the
//!    last stream having the last event.
//!
//! A stream the server ends (a client too far behind is disconnected) or
//! whose connection breaks reconnects at once with `Last-Event-ID`, as a
//! browser's `EventSource` would, and resumes from the log; such reconnects
//! are counted and reported, and the exactly-once, in-order check spans them.
//! The bench's own CPU time is reported next to the server's: client and
//! server share the machine.

use std::{
    path::Path,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use serde_json::json;
use tokio::{
    sync::{Semaphore, mpsc::unbounded_channel},
    task::JoinSet,
};

use crate::server::{
    Drops, Msg, Server, Services, cpu_secs, gather, open_files_limit, publish_at_rate,
    publish_burst, publisher_client, server_binary,
};
use crate::sse_client::{Plan, follow};

#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    services: Services,
    /// SSE connection counts to measure, comma-separated; all on one topic.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    connections: Vec<usize>,
    /// Streams being opened at once.
    #[arg(long, default_value_t = 200)]
    open_concurrency: usize,
    /// Pause between the last stream opening and the second memory reading,
    /// in milliseconds.
    #[arg(long, default_value_t = 2000)]
    settle_ms: u64,
    /// Each stream on a topic of its own, every topic published to (the
    /// per-topic subscription path: one hub topic, and over NATS one
    /// subscription, per stream), instead of all streams on one topic.
    #[arg(long)]
    many_topics: bool,
    /// Events per second in the latency scenario (per topic).
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Seconds of publishing in the latency scenario.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Events in the saturation burst, per topic [default: 2000, or 20 with
    /// --many-topics].
    #[arg(long)]
    burst: Option<u64>,
    /// Events per batch request in the burst.
    #[arg(long, default_value_t = 100)]
    batch: u64,
    /// Batch requests in flight at once in the burst.
    #[arg(long, default_value_t = 4)]
    publishers: usize,
    /// Longest wait, in seconds, for all streams to open, or to get the last
    /// event of a scenario after its last publish.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Runs per connection count; the median of each figure is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
}

impl Args {
    fn burst(&self) -> u64 {
        self.burst
            .unwrap_or(if self.many_topics { 20 } else { 2000 })
    }
}

/// One run's figures (or, in the report, the median of each over the runs).
#[derive(Clone, Copy)]
struct Figure {
    /// First request → every stream has its `retry:` chunk.
    open_secs: f64,
    /// Server `VmRSS` before the streams open and after they idled.
    rss_before: f64,
    rss_after: f64,
    /// (after − before) / connections.
    bytes_per_conn: f64,
    /// Publish sent → event parsed by the stream, per event per stream.
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    /// CPU time, in seconds, the server and the bench used from the first
    /// latency publish to the last stream having its last event.
    latency_server_cpu_secs: f64,
    latency_bench_cpu_secs: f64,
    /// First burst publish → last stream has the last event.
    burst_secs: f64,
    /// Burst events × streams / `burst_secs`.
    deliveries_per_sec: f64,
    /// Streams the server ended and the bench reopened, whole run.
    closed: f64,
    /// Streams whose connection broke and the bench reopened, whole run.
    broken: f64,
    /// CPU time, in seconds, the server and the bench used during the burst.
    server_cpu_secs: f64,
    bench_cpu_secs: f64,
    /// Server `VmHWM` (peak resident set) at the end of the run.
    peak_rss: f64,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.connections.is_empty() && args.connections.iter().all(|&n| n > 0),
        "--connections must list counts of at least 1"
    );
    anyhow::ensure!(
        args.rate > 0.0 && args.seconds > 0.0,
        "--rate and --seconds must be positive"
    );
    anyhow::ensure!(
        args.burst() > 0 && args.batch > 0,
        "--burst and --batch must be at least 1"
    );
    anyhow::ensure!(
        args.open_concurrency > 0 && args.publishers > 0,
        "--open-concurrency and --publishers must be at least 1"
    );
    let binary = server_binary()?;
    if let Some(limit) = open_files_limit() {
        let most = args.connections.iter().max().copied().unwrap_or(0);
        if limit < most as u64 + 100 {
            eprintln!(
                "warning: the open-file limit is {limit}; {most} streams need about {} descriptors \
                 in the bench and as many in the server (raise it with `ulimit -n`)",
                most + 100
            );
        }
    }

    // A database of the bench's own, dropped at the end.
    let db = rt_tests::TestDb::create_on(&args.services.database_url).await;
    let mut results = Vec::new();
    for &n in &args.connections {
        let mut runs = Vec::new();
        let (mut failure, mut first_error) = (None, None);
        for run in 0..args.runs.max(1) {
            match one_run(&binary, &db.url, &args, n, run).await {
                Ok((f, error)) => {
                    if let Some(error) = &error {
                        eprintln!(
                            "  {n} connections, run {}: {} streams broke and reconnected; the first: {error}",
                            run + 1,
                            f.broken
                        );
                    }
                    first_error = first_error.or(error);
                    if !args.quiet {
                        eprintln!(
                            "  {n} connections, run {}: opened in {:.1} s, {:.1} KiB/connection idle; \
                             latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; burst {:.0} deliveries/s; reconnects: {} closed, {} broken",
                            run + 1,
                            f.open_secs,
                            f.bytes_per_conn / 1024.0,
                            f.p50_ms,
                            f.p99_ms,
                            f.max_ms,
                            f.deliveries_per_sec,
                            f.closed,
                            f.broken
                        );
                    }
                    runs.push(f);
                }
                Err(e) => {
                    eprintln!("  {n} connections, run {}: FAILED: {e:#}", run + 1);
                    failure = Some(format!("{e:#}"));
                    break;
                }
            }
        }
        results.push(Outcome {
            n,
            result: failure.map_or_else(|| Ok(medians(&runs)), Err),
            first_error,
        });
    }
    drop(db);

    print_report(&args, &results);
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

/// What came of one connection count.
struct Outcome {
    n: usize,
    /// The medians, or why a run failed.
    result: Result<Figure, String>,
    /// The first transport error a stream got (and recovered from), if any.
    first_error: Option<String>,
}

/// One run with `n` streams, on a server process of its own.
async fn one_run(
    binary: &Path,
    database_url: &str,
    args: &Args,
    n: usize,
    run: usize,
) -> anyhow::Result<(Figure, Option<String>)> {
    let mut env = vec![
        ("DATABASE_URL", database_url.to_owned()),
        ("RT_SSE_MAX_CONNECTIONS", (n + 1000).to_string()),
        ("RT_LOG_FORMAT", "text".to_owned()),
    ];
    if let Some(url) = &args.services.nats_url {
        env.push(("RT_NATS_URL", url.clone()));
        env.push((
            "RT_NATS_PREFIX",
            format!("bench{}", uuid::Uuid::new_v4().simple()),
        ));
    }
    let binary = binary.to_owned();
    let mut server = tokio::task::spawn_blocking(move || Server::start(&binary, &env)).await??;
    let mut streams = JoinSet::new();
    let drops = Arc::new(Drops::default());
    let result = measure(&server, args, n, run, &drops, &mut streams).await;
    // Streams first, so that none sees the server go and reconnects.
    streams.shutdown().await;
    let figure = result.map_err(|e| server.explain(e))?;
    let first_error = drops
        .first_error
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    Ok((figure, first_error))
}

/// The three scenarios, in order, on `n` streams of one fresh topic.
async fn measure(
    server: &Server,
    args: &Args,
    n: usize,
    run: usize,
    drops: &Arc<Drops>,
    streams: &mut JoinSet<()>,
) -> anyhow::Result<Figure> {
    let topics: Vec<String> = if args.many_topics {
        (0..n).map(|i| format!("sse{n}-{run}-{i}")).collect()
    } else {
        vec![format!("sse{n}-{run}")]
    };
    let latency_events = ((args.rate * args.seconds).round() as u64).max(1);
    let burst = args.burst();
    let addr = server.addr()?;
    let plans: Vec<Arc<Plan>> = topics
        .iter()
        .map(|topic| {
            Arc::new(Plan {
                addr,
                path: format!("/v1/sse?topic={topic}"),
                topic: topic.clone(),
                latency_events,
                last_seq: latency_events + burst,
                retry_first: true,
            })
        })
        .collect();
    let deadline = Duration::from_secs(args.timeout);
    // 1. Idle memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = server.status_kib("VmRSS")? * 1024;
    let gate = Arc::new(Semaphore::new(args.open_concurrency));
    let (tx, mut rx) = unbounded_channel();
    let opening = Instant::now();
    for id in 0..n {
        let plan = plans[id % plans.len()].clone();
        let (gate, drops, tx) = (gate.clone(), drops.clone(), tx.clone());
        streams.spawn(async move {
            if let Err(e) = follow(&plan, &gate, Some(&drops), &tx).await {
                let _ = tx.send(Msg::Failed(format!("stream {id}: {e:#}")));
            }
        });
    }
    drop(tx);
    gather(&mut rx, n, "streams", deadline, "opened", |msg| match msg {
        Msg::Opened => Ok(()),
        _ => anyhow::bail!("a stream got an event before any was published"),
    })
    .await?;
    let open_secs = opening.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(args.settle_ms)).await;
    let rss_after = server.status_kib("VmRSS")? * 1024;

    // 2. Latency at a fixed rate.
    let (server_cpu, bench_cpu) = (server.cpu_secs()?, cpu_secs("/proc/self/stat")?);
    publish_at_rate(server, &topics, latency_events, args.rate).await?;
    let mut hist = Histogram::<u32>::new(2)?;
    gather(
        &mut rx,
        n,
        "streams",
        deadline,
        "got the last latency event",
        |msg| match msg {
            Msg::Latency(h) => Ok(hist.add(&*h)?),
            _ => anyhow::bail!("unexpected report during the latency scenario"),
        },
    )
    .await?;
    let delivered = latency_events * n as u64;
    anyhow::ensure!(
        hist.len() == delivered,
        "recorded {} latencies for {delivered} deliveries",
        hist.len()
    );
    let latency_server_cpu_secs = server.cpu_secs()? - server_cpu;
    let latency_bench_cpu_secs = cpu_secs("/proc/self/stat")? - bench_cpu;

    // 3. Saturation.
    let (server_cpu, bench_cpu) = (server.cpu_secs()?, cpu_secs("/proc/self/stat")?);
    let started = Instant::now();
    let publisher = publisher_client(args.publishers)?;
    publish_burst(
        &publisher,
        server,
        &topics,
        burst,
        args.batch,
        args.publishers,
    )
    .await?;
    let mut last_done = started;
    gather(
        &mut rx,
        n,
        "streams",
        deadline,
        "got the last burst event",
        |msg| match msg {
            Msg::Done(at) => {
                last_done = last_done.max(at);
                Ok(())
            }
            _ => anyhow::bail!("unexpected report during the burst"),
        },
    )
    .await?;
    let burst_secs = last_done.duration_since(started).as_secs_f64();
    let server_cpu_secs = server.cpu_secs()? - server_cpu;
    let bench_cpu_secs = cpu_secs("/proc/self/stat")? - bench_cpu;

    let ms = |v: u64| v as f64 / 1000.0;
    Ok(Figure {
        open_secs,
        rss_before: rss_before as f64,
        rss_after: rss_after as f64,
        bytes_per_conn: (rss_after as f64 - rss_before as f64) / n as f64,
        p50_ms: ms(hist.value_at_quantile(0.5)),
        p99_ms: ms(hist.value_at_quantile(0.99)),
        p999_ms: ms(hist.value_at_quantile(0.999)),
        max_ms: ms(hist.max()),
        latency_server_cpu_secs,
        latency_bench_cpu_secs,
        burst_secs,
        deliveries_per_sec: (burst * n as u64) as f64 / burst_secs,
        closed: drops.closed.load(Ordering::Relaxed) as f64,
        broken: drops.broken.load(Ordering::Relaxed) as f64,
        server_cpu_secs,
        bench_cpu_secs,
        peak_rss: (server.status_kib("VmHWM")? * 1024) as f64,
    })
}

/// The median of every figure, each taken on its own over the runs.
fn medians(runs: &[Figure]) -> Figure {
    let median = |get: fn(&Figure) -> f64| crate::server::median(runs, get);
    Figure {
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
        closed: median(|f| f.closed),
        broken: median(|f| f.broken),
        server_cpu_secs: median(|f| f.server_cpu_secs),
        bench_cpu_secs: median(|f| f.bench_cpu_secs),
        peak_rss: median(|f| f.peak_rss),
    }
}

fn print_report(args: &Args, results: &[Outcome]) {
    let bus = args.services.bus();
    let latency_events = ((args.rate * args.seconds).round() as u64).max(1);
    let mib = |v: f64| v / (1024.0 * 1024.0);
    let r3 = |v: f64| (v * 1000.0).round() / 1000.0;
    println!(
        "\nSSE, {}, server in its own process ({bus} bus), median of {} runs (each figure on its own)",
        if args.many_topics {
            "each stream on a topic of its own"
        } else {
            "all streams on one topic"
        },
        args.runs.max(1)
    );
    // One table per scenario, a row per connection count.
    let table = |title: String, head: String, row: &dyn Fn(&Figure) -> String| {
        println!("\n{title}\n{head}");
        for o in results {
            match &o.result {
                Ok(f) => println!("{:<12} {}", o.n, row(f)),
                Err(_) => println!("{:<12} failed", o.n),
            }
        }
    };

    table(
        format!(
            "idle memory (server VmRSS, {} ms after the last stream opened)",
            args.settle_ms
        ),
        format!(
            "{:<12} {:>8} {:>15} {:>14} {:>14}",
            "connections", "open s", "RSS before MiB", "RSS after MiB", "KiB/connection"
        ),
        &|f| {
            format!(
                "{:>8.2} {:>15.1} {:>14.1} {:>14.2}",
                f.open_secs,
                mib(f.rss_before),
                mib(f.rss_after),
                f.bytes_per_conn / 1024.0
            )
        },
    );
    table(
        format!(
            "latency: {latency_events} events at {}/s, publish sent -> event parsed by the client",
            args.rate
        ),
        format!(
            "{:<12} {:>8} {:>8} {:>9} {:>8} {:>13} {:>12}",
            "connections", "p50 ms", "p99 ms", "p999 ms", "max ms", "server CPU s", "bench CPU s"
        ),
        &|f| {
            format!(
                "{:>8.2} {:>8.2} {:>9.2} {:>8.2} {:>13.2} {:>12.2}",
                f.p50_ms,
                f.p99_ms,
                f.p999_ms,
                f.max_ms,
                f.latency_server_cpu_secs,
                f.latency_bench_cpu_secs
            )
        },
    );
    table(
        format!(
            "saturation: burst of {} events in batch requests of {}, {} in flight; \
             reconnects over the whole run",
            args.burst(),
            args.batch,
            args.publishers
        ),
        format!(
            "{:<12} {:>13} {:>8} {:>13} {:>12} {:>13} {:>13} {:>13}",
            "connections",
            "deliveries/s",
            "secs",
            "server CPU s",
            "bench CPU s",
            "peak RSS MiB",
            "ended+resumed",
            "broke+resumed"
        ),
        &|f| {
            format!(
                "{:>13.0} {:>8.2} {:>13.2} {:>12.2} {:>13.1} {:>13.0} {:>13.0}",
                f.deliveries_per_sec,
                f.burst_secs,
                f.server_cpu_secs,
                f.bench_cpu_secs,
                mib(f.peak_rss),
                f.closed,
                f.broken
            )
        },
    );
    for o in results {
        if let Some(e) = &o.first_error {
            println!(
                "\n{} connections: streams broke and resumed; the first error: {e}",
                o.n
            );
        }
        if let Err(e) = &o.result {
            println!("\n{} connections FAILED: {e}", o.n);
        }
    }

    // Names the comparison looks up stay as they are for one topic.
    let shape = if args.many_topics {
        ", a topic each"
    } else {
        ""
    };
    for o in results {
        let n = o.n;
        let common = json!({
            "connections": n, "bus": bus, "runs": args.runs.max(1),
            "topics": if args.many_topics { n } else { 1 },
        });
        let lines = match &o.result {
            Ok(f) => vec![
                json!({
                    "scenario": "sse", "name": format!("idle memory, {n} connections{shape}"),
                    "open_secs": r3(f.open_secs),
                    "rss_before_bytes": f.rss_before.round() as u64,
                    "rss_after_bytes": f.rss_after.round() as u64,
                    "bytes_per_connection": f.bytes_per_conn.round() as i64,
                    "settle_ms": args.settle_ms,
                }),
                json!({
                    "scenario": "sse", "name": format!("latency, {n} connections{shape}"),
                    "p50_ms": r3(f.p50_ms), "p99_ms": r3(f.p99_ms), "p999_ms": r3(f.p999_ms),
                    "max_ms": r3(f.max_ms), "events": latency_events, "rate": args.rate,
                    "server_cpu_secs": r3(f.latency_server_cpu_secs),
                    "bench_cpu_secs": r3(f.latency_bench_cpu_secs),
                }),
                json!({
                    "scenario": "sse", "name": format!("saturation, {n} connections{shape}"),
                    "deliveries_per_sec": f.deliveries_per_sec.round() as u64,
                    "secs": r3(f.burst_secs),
                    "server_cpu_secs": r3(f.server_cpu_secs), "bench_cpu_secs": r3(f.bench_cpu_secs),
                    "peak_rss_bytes": f.peak_rss.round() as u64,
                    "streams_ended_and_resumed": f.closed.round() as u64,
                    "streams_broken_and_resumed": f.broken.round() as u64,
                    "first_transport_error": o.first_error,
                    "burst": args.burst(), "batch": args.batch, "publishers": args.publishers,
                }),
            ],
            Err(e) => vec![json!({
                "scenario": "sse", "name": format!("{n} connections"), "error": e,
            })],
        };
        for mut line in lines {
            if let (Some(line), Some(common)) = (line.as_object_mut(), common.as_object()) {
                line.extend(common.clone());
            }
            println!("{line}");
        }
    }
}
