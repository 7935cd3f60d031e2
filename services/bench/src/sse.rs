//! Server-Sent Events at scale: many streams on one topic, served by the
//! all-in-one `realtime` binary running as a process of its own, so that its
//! memory is measured apart from the bench's; with `--distributed`, by the
//! `sse-edge` binary, the events published to a `publisher` process of
//! their own and carried to the edge over NATS.
//!
//! For every connection count (`--connections`, default 1,000 and 10,000) and
//! every run, the bench starts a fresh server process (or two) over a
//! database of its own (created and dropped by the bench), and on a fresh
//! topic:
//!
//! 1. idle memory: reads the server's resident set (`VmRSS`), opens the
//!    streams (at most `--open-concurrency` at a time, each checked for a 200
//!    and its first `retry:` chunk), waits `--settle-ms`, and reads it again;
//! 2. latency at a fixed rate: publishes `--rate` events per second for
//!    `--seconds`, each carrying the wall-clock time it was sent at; every
//!    stream records, per event, arrival time minus send time, and the
//!    event's commit stamp (`time`) minus send time (sent → commit, which
//!    the ceiling does not pay), and checks that it saw every seq exactly
//!    once and in order;
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
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use serde_json::json;
use tokio::{
    sync::{Semaphore, mpsc::unbounded_channel},
    task::JoinSet,
};

use crate::server::{
    self, Binaries, Burst, DeployArgs, Deployment, DeploymentCpuMark, Drops, Fanout, Firsts, Idle,
    Msg, Outcome, PublishWaits, PublisherCpu, each_count, ensure_all_ran, gather, gather_last_done,
    gather_latencies, latency_events, mib, open_files_limit, print_json_lines, publish_at_rate,
    publish_burst, publisher_client, r3, spawn_clients,
};
use crate::sse_client::{Plan, follow};

#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    pub(crate) deploy: DeployArgs,
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
    /// The idle memory, latency and saturation scenarios'.
    fanout: Fanout,
    /// The publisher process's CPU in the latency and saturation scenarios.
    publisher_cpu: PublisherCpu,
    /// The latency scenario's publishes, sent → answered and sent →
    /// committed.
    publish: PublishWaits,
    /// Streams the server ended and the bench reopened, whole run.
    closed: f64,
    /// Streams whose connection broke and the bench reopened, whole run.
    broken: f64,
}

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
        args.burst() > 0 && args.batch > 0,
        "--burst and --batch must be at least 1"
    );
    anyhow::ensure!(
        args.open_concurrency > 0 && args.publishers > 0,
        "--open-concurrency and --publishers must be at least 1"
    );
    let binaries = args.deploy.binaries(EDGE)?;
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
    let db = rt_tests::TestDb::create_on(&args.deploy.services.database_url).await;
    let results = each_count(
        &args.connections,
        args.runs,
        |n, run| one_run(&binaries, &db.url, &args, n, run),
        |at, f, firsts| {
            if let Some(error) = &firsts.error {
                eprintln!(
                    "{at}: {} streams broke and reconnected; the first: {error}",
                    f.broken
                );
            }
            if !args.quiet {
                eprintln!(
                    "{at}: opened in {:.1} s, {:.1} KiB/connection idle; \
                     latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; burst {:.0} deliveries/s; reconnects: {} closed, {} broken",
                    f.fanout.open_secs,
                    f.fanout.bytes_per_conn / 1024.0,
                    f.fanout.p50_ms,
                    f.fanout.p99_ms,
                    f.fanout.max_ms,
                    f.fanout.deliveries_per_sec,
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
const EDGE: &str = "sse-edge";

/// One run with `n` streams, on a server process (or two) of its own.
async fn one_run(
    binaries: &Binaries,
    database_url: &str,
    args: &Args,
    n: usize,
    run: usize,
) -> anyhow::Result<(Figure, Firsts)> {
    let env = [("RT_SSE_MAX_CONNECTIONS", (n + 1000).to_string())];
    let mut deployment = args.deploy.start(binaries, database_url, &env).await?;
    let mut streams = JoinSet::new();
    let drops = Arc::new(Drops::default());
    let result = measure(&deployment, args, n, run, &drops, &mut streams).await;
    // Streams first, so that none sees the server go and reconnects.
    streams.shutdown().await;
    let figure = result.map_err(|e| deployment.explain(e))?;
    Ok((figure, drops.take_firsts()))
}

/// The three scenarios, in order, on `n` streams of one fresh topic.
async fn measure(
    deployment: &Deployment,
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
    let latency_events = latency_events(args.rate, args.seconds);
    let burst = args.burst();
    let server = &deployment.edge;
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
                commit_stamped: true,
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
    spawn_clients(streams, n, "stream", &tx, |id| {
        let plan = plans[id % plans.len()].clone();
        let (gate, drops, tx) = (gate.clone(), drops.clone(), tx.clone());
        async move { follow(&plan, &gate, Some(&drops), &tx).await }
    });
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
    let cpu = DeploymentCpuMark::now(deployment)?;
    let answered =
        publish_at_rate(deployment.publish_to(), &topics, latency_events, args.rate).await?;
    let latencies = gather_latencies(
        &mut rx,
        n,
        "streams",
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
        &topics,
        burst,
        args.batch,
        args.publishers,
    )
    .await?;
    let last_done = gather_last_done(
        &mut rx,
        n,
        "streams",
        deadline,
        "got the last burst event",
        started,
    )
    .await?;
    let (burst_cpu, burst_publisher_cpu) = cpu.used(deployment)?;

    let closed = drops.closed.load(Ordering::Relaxed) as f64;
    let broken = drops.broken.load(Ordering::Relaxed) as f64;
    Ok(Figure {
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
                deliveries: burst * n as u64,
                secs: last_done.duration_since(started).as_secs_f64(),
                cpu: burst_cpu,
            },
            server.status_kib("VmHWM")? * 1024,
        ),
        publisher_cpu: PublisherCpu {
            latency_secs: latency_publisher_cpu,
            burst_secs: burst_publisher_cpu,
        },
        publish: PublishWaits::of(&answered, to_commit),
        closed,
        broken,
    })
}

/// The median of every figure, each taken on its own over the runs.
fn medians(runs: &[Figure]) -> Figure {
    let median = |get: fn(&Figure) -> f64| crate::server::median(runs, get);
    Figure {
        fanout: Fanout::medians(runs, |f| &f.fanout),
        publisher_cpu: PublisherCpu::medians(runs, |f| &f.publisher_cpu),
        publish: PublishWaits::medians(runs, |f| &f.publish),
        closed: median(|f| f.closed),
        broken: median(|f| f.broken),
    }
}

fn print_report(args: &Args, results: &[Outcome<Figure>]) {
    let bus = args.deploy.services.bus();
    let latency_events = latency_events(args.rate, args.seconds);
    println!(
        "\nSSE, {}, {}, median of {} runs (each figure on its own)",
        if args.many_topics {
            "each stream on a topic of its own"
        } else {
            "all streams on one topic"
        },
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
            "idle memory (server VmRSS, {} ms after the last stream opened)",
            args.settle_ms
        ),
        Fanout::idle_head(),
        &|f| f.fanout.idle_row(),
    );
    table(
        format!(
            "latency: {latency_events} events at {}/s, publish sent -> event parsed by the client",
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
            "saturation: burst of {} events in batch requests of {}, {} in flight; \
             reconnects over the whole run",
            args.burst(),
            args.batch,
            args.publishers
        ),
        format!(
            "{:<12} {:>13} {:>8} {:>13} {:>12} {:>13} {:>13} {:>13}{publisher_head}",
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
                "{:>13.0} {:>8.2} {:>13.2} {:>12.2} {:>13.1} {:>13.0} {:>13.0}{}",
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
    for o in results {
        if let Some(e) = &o.firsts.error {
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
            "connections": n, "bus": bus, "deployment": args.deploy.name(),
            "runs": args.runs.max(1), "topics": if args.many_topics { n } else { 1 },
        });
        let lines = match &o.result {
            Ok(f) => vec![
                f.fanout.idle_json(
                    "sse",
                    format!("idle memory, {n} connections{shape}"),
                    args.settle_ms,
                ),
                PublisherCpu::json(
                    f.publish.json(f.fanout.latency_json(
                        "sse",
                        format!("latency, {n} connections{shape}"),
                        latency_events,
                        args.rate,
                    )),
                    f.publisher_cpu.latency_secs,
                ),
                json!({
                    "scenario": "sse", "name": format!("saturation, {n} connections{shape}"),
                    "deliveries_per_sec": f.fanout.deliveries_per_sec.round() as u64,
                    "secs": r3(f.fanout.burst_secs),
                    "server_cpu_secs": r3(f.fanout.server_cpu_secs), "bench_cpu_secs": r3(f.fanout.bench_cpu_secs),
                    "publisher_cpu_secs": f.publisher_cpu.burst_secs.map(r3),
                    "peak_rss_bytes": f.fanout.peak_rss.round() as u64,
                    "streams_ended_and_resumed": f.closed.round() as u64,
                    "streams_broken_and_resumed": f.broken.round() as u64,
                    "first_transport_error": o.firsts.error,
                    "burst": args.burst(), "batch": args.batch, "publishers": args.publishers,
                }),
            ],
            Err(e) => vec![json!({
                "scenario": "sse", "name": format!("{n} connections"), "error": e,
            })],
        };
        print_json_lines(&common, lines);
    }
}
