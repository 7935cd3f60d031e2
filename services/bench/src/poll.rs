//! Long-poll wake-up: many waiters long-polling one topic while a publisher
//! adds events to it one at a time.
//!
//! The publisher and poll-api routes run in this process on a free loopback
//! port, over a fresh database that is dropped at the end, so client and
//! server share the machine. Every event carries the wall-clock time it was
//! sent at; every waiter records, for every event it receives, how long after
//! that the response carrying it arrived, and checks that it saw every seq
//! exactly once and in order.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use rt_core::{Context, config::Settings, server::Application};
use serde::Deserialize;
use serde_json::json;
use tokio::task::JoinSet;

use crate::{
    http1::Http1,
    poll_ceiling::Ceiling,
    server::{Latencies, Services, median_some, now_us, publish_stamped, r3},
};

#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    services: Services,
    /// Concurrent long-poll loops on the one topic.
    #[arg(long, default_value_t = 1000)]
    waiters: usize,
    /// Events published per run, one at a time.
    #[arg(long, default_value_t = 200)]
    events: u64,
    /// Pause between two publishes, in milliseconds.
    #[arg(long, default_value_t = 20)]
    interval_ms: u64,
    /// `wait` of every long poll, in seconds (the server allows up to 60).
    #[arg(long, default_value_t = 30)]
    wait: u64,
    /// `limit` of every long poll.
    #[arg(long, default_value_t = 100)]
    limit: u32,
    /// How long to let the waiters' first polls get in flight before the
    /// first publish, in milliseconds.
    #[arg(long, default_value_t = 1500)]
    settle_ms: u64,
    /// Runs; the median of each figure is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// The server's `--direct-streams`: `false` sends every poll through
    /// actix-web instead of the connection front, to compare the two paths
    /// with one build.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    direct_streams: bool,
    /// Also measure the long-poll ceiling (a minimal server answering the
    /// same waiters from memory, `poll_ceiling.rs`) in every run, its turn
    /// alternating with the server's, and give the server's figures as a
    /// ratio of it.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    ceiling: bool,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
}

/// One run's figures (or, in the report, the median of each over the runs).
#[derive(Clone, Copy)]
struct Figure {
    /// Publish sent → poll response received, per event per waiter.
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Completed poll responses, all waiters, per second.
    polls_per_sec: f64,
    /// Events × waiters per second.
    events_per_sec: f64,
    /// Events received per poll response.
    events_per_poll: f64,
    /// Responses that timed out with no event.
    empty_polls: f64,
    /// Publish request → 201, per event. The answer waits for the commit,
    /// which every wake-up waits for too (the wake-up is timed from the
    /// publish being sent), and also behind the wake-ups on the same server
    /// workers, so it overstates what a wake-up waits for.
    publish_p50_ms: f64,
    publish_p99_ms: f64,
    /// Publish sent → the commit stamp (`time`) the event carries, p99, per
    /// event per waiter: the part of the wake-up before the commit, which
    /// the ceiling does not pay. `None` for the ceiling (its stamp is fixed).
    to_commit_p99_ms: Option<f64>,
    /// Per event, the latency of the first waiter to receive it (the
    /// event's own path before the fan-out: publish, commit, bus), median
    /// and max over the events. An event late for every waiter shows here.
    first_p50_ms: f64,
    first_max_ms: f64,
    /// First publish → last waiter done.
    secs: f64,
}

/// A poll answer, as far as the bench reads it.
#[derive(Deserialize)]
struct Page {
    events: Vec<PolledEvent>,
    next: u64,
    #[serde(default)]
    reset: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct PolledEvent {
    seq: u64,
    data: Sent,
    time: String,
}

#[derive(Deserialize)]
struct Sent {
    sent_us: u64,
}

/// What one waiter hands back when it has seen the last event.
struct WaiterDone {
    /// Publish sent → response received per event, and sent → commit
    /// stamp when the events carry one.
    latencies: Latencies,
    polls: u64,
    empty_polls: u64,
    finished: Instant,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.waiters > 0, "--waiters must be at least 1");
    anyhow::ensure!(args.events > 0, "--events must be at least 1");

    // A database of the bench's own, dropped at the end.
    let db = rt_tests::TestDb::create_on(&args.services.database_url).await;
    let settings = Settings {
        bind: "127.0.0.1:0".into(),
        database_url: Some(db.url.clone()),
        nats_url: args.services.nats_url.clone(),
        nats_prefix: format!("bench{}", uuid::Uuid::new_v4().simple()),
        direct_streams: args.direct_streams,
        ..Settings::default()
    };
    let ctx = Context::connect(settings).await?;
    let app = Application::build(ctx, realtime::routes())?;
    let base = format!("http://127.0.0.1:{}", app.port());
    let handle = app.stop_handle();
    tokio::spawn(app.run_until_stopped());
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(args.wait + 30))
        .build()?;

    // As many threads as the server has HTTP workers (its default).
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let (mut runs, mut ceilings) = (Vec::new(), Vec::new());
    for run in 0..args.runs.max(1) {
        // The ceiling goes first in runs 1, 3, ..., second in the others.
        let ceiling_first = run % 2 == 0;
        for ceiling_turn in [ceiling_first, !ceiling_first] {
            if !ceiling_turn {
                let f = wake_up(&http, &base, &args, run, true).await?;
                progress(&args, run, "server", &f);
                runs.push(f);
            } else if args.ceiling {
                let ceiling = Ceiling::start(threads, &format!("poll{run}"))?;
                let f = wake_up(&http, &ceiling.base(), &args, run, false).await;
                ceiling.stop().await;
                let f = f.context("the long-poll ceiling")?;
                progress(&args, run, "ceiling", &f);
                ceilings.push(f);
            }
        }
    }
    handle.stop(true).await;

    let ceiling = (!ceilings.is_empty()).then(|| medians(&ceilings));
    print_report(&args, &medians(&runs), ceiling.as_ref());
    Ok(())
}

fn progress(args: &Args, run: usize, server: &str, f: &Figure) {
    if !args.quiet {
        eprintln!(
            "  run {} ({server}): wake-up p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {:.0} polls/s, {:.0} events/s, {:.2} events/poll",
            run + 1,
            f.p50_ms,
            f.p99_ms,
            f.max_ms,
            f.polls_per_sec,
            f.events_per_sec,
            f.events_per_poll
        );
    }
}

/// One run: `waiters` long-poll loops on a fresh topic, then `events`
/// publishes `interval_ms` apart; done when every waiter has the last event.
/// With `commit_stamped`, the events' `time` is read as their commit stamp.
async fn wake_up(
    http: &reqwest::Client,
    base: &str,
    args: &Args,
    run: usize,
    commit_stamped: bool,
) -> anyhow::Result<Figure> {
    let url = format!("{base}/v1/topics/poll{run}/events");
    let addr: std::net::SocketAddr = base
        .strip_prefix("http://")
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("the server's address {base:?}"))?;
    let path = format!("/v1/topics/poll{run}/events");
    let ready = Arc::new(AtomicUsize::new(0));
    let firsts: Arc<[AtomicU64]> = (0..=args.events)
        .map(|_| AtomicU64::new(u64::MAX))
        .collect();
    // Dropping the set (on an error) aborts the waiters still polling.
    let mut waiters = JoinSet::new();
    for id in 0..args.waiters {
        let (path, ready, firsts) = (path.clone(), ready.clone(), firsts.clone());
        let (events, limit, wait) = (args.events, args.limit, args.wait);
        waiters.spawn(async move {
            ready.fetch_add(1, Ordering::Relaxed);
            let mut done = WaiterDone::new(commit_stamped)?;
            let poll = Poll {
                path: &path,
                events,
                limit,
                wait,
                firsts: &firsts,
            };
            waiter(Http1::new(addr), &poll, id, &mut done).await?;
            anyhow::Ok(done)
        });
    }
    let spawned = Instant::now();
    while ready.load(Ordering::Relaxed) < args.waiters {
        anyhow::ensure!(
            spawned.elapsed() < Duration::from_secs(30),
            "only {} of {} waiters started within 30 s",
            ready.load(Ordering::Relaxed),
            args.waiters
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(args.settle_ms)).await;
    if let Some(done) = waiters.try_join_next() {
        // A waiter ended before anything was published: it failed.
        done??;
        anyhow::bail!("a waiter finished before any event was published");
    }

    let started = Instant::now();
    let publish_hist = publish(http, &url, args.events, args.interval_ms).await?;

    let deadline = Duration::from_secs(args.wait + 30);
    let mut all = WaiterDone::new(commit_stamped)?;
    let mut last_done = started;
    let mut finished = 0;
    while finished < args.waiters {
        let done = tokio::time::timeout(deadline, waiters.join_next())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "{} of {} waiters did not get all {} events within {} s of the last publish",
                    args.waiters - finished,
                    args.waiters,
                    args.events,
                    deadline.as_secs()
                )
            })?
            .ok_or_else(|| anyhow::anyhow!("waiter set emptied early"))???;
        all.add(&done)?;
        last_done = last_done.max(done.finished);
        finished += 1;
    }
    let delivered = args.events * args.waiters as u64;
    all.latencies.check(delivered)?;
    let WaiterDone {
        latencies: Latencies {
            received: hist,
            to_commit,
        },
        polls,
        empty_polls,
        ..
    } = all;
    let secs = last_done.duration_since(started).as_secs_f64();
    let mut firsts: Vec<u64> = firsts[1..]
        .iter()
        .map(|f| f.load(Ordering::Relaxed))
        .collect();
    firsts.sort_unstable();
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    Ok(Figure {
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p99_ms: ms(0.99),
        max_ms: hist.max() as f64 / 1000.0,
        polls_per_sec: polls as f64 / secs,
        events_per_sec: delivered as f64 / secs,
        events_per_poll: delivered as f64 / polls as f64,
        empty_polls: empty_polls as f64,
        publish_p50_ms: publish_hist.value_at_quantile(0.5) as f64 / 1000.0,
        publish_p99_ms: publish_hist.value_at_quantile(0.99) as f64 / 1000.0,
        to_commit_p99_ms: to_commit.map(|h| h.value_at_quantile(0.99) as f64 / 1000.0),
        first_p50_ms: firsts[firsts.len() / 2] as f64 / 1000.0,
        first_max_ms: firsts[firsts.len() - 1] as f64 / 1000.0,
        secs,
    })
}

/// What a waiter polls: `path` (`after` from 0, following `next`) with
/// `limit` and `wait`, until it holds seq `events`.
struct Poll<'a> {
    path: &'a str,
    events: u64,
    limit: u32,
    wait: u64,
    /// Per seq, the lowest latency any waiter had for it, in µs.
    firsts: &'a [AtomicU64],
}

impl WaiterDone {
    fn new(commit_stamped: bool) -> anyhow::Result<WaiterDone> {
        Ok(WaiterDone {
            latencies: Latencies::with_sigfig(commit_stamped, 3)?,
            polls: 0,
            empty_polls: 0,
            finished: Instant::now(),
        })
    }

    /// Adds another waiter's figures to these.
    fn add(&mut self, other: &WaiterDone) -> anyhow::Result<()> {
        self.latencies.add(&other.latencies)?;
        self.polls += other.polls;
        self.empty_polls += other.empty_polls;
        Ok(())
    }
}

/// Long-polls until it holds the last event, recording into `done`; every
/// seq must come exactly once and in order.
async fn waiter(
    mut http: Http1,
    poll: &Poll<'_>,
    id: usize,
    done: &mut WaiterDone,
) -> anyhow::Result<()> {
    let Poll {
        path,
        events,
        limit,
        wait,
        firsts,
    } = *poll;
    let mut last = 0;
    while last < events {
        let (status, body) = http
            .get(&format!("{path}?after={last}&limit={limit}&wait={wait}"))
            .await?;
        let received = now_us();
        anyhow::ensure!(
            status == 200,
            "waiter {id}: poll after {last} answered {status}: {}",
            String::from_utf8_lossy(body)
        );
        let page: Page = serde_json::from_slice(body)?;
        done.polls += 1;
        anyhow::ensure!(
            page.reset.is_none(),
            "waiter {id}: poll after {last} reported a reset"
        );
        if page.events.is_empty() {
            done.empty_polls += 1;
        }
        for e in &page.events {
            anyhow::ensure!(
                e.seq == last + 1 && e.seq <= events,
                "waiter {id}: got seq {} after seq {last} (expected {})",
                e.seq,
                last + 1
            );
            last = e.seq;
            let sent = e.data.sent_us;
            done.latencies.record(received, sent, Some(&e.time))?;
            firsts[e.seq as usize].fetch_min(received.saturating_sub(sent), Ordering::Relaxed);
        }
        anyhow::ensure!(
            page.next == last,
            "waiter {id}: next is {} after seq {last}",
            page.next
        );
    }
    done.finished = Instant::now();
    Ok(())
}

/// Publishes `events` events one at a time, `interval_ms` apart, each
/// carrying the time it was sent; returns the publish → 201 latencies.
async fn publish(
    http: &reqwest::Client,
    url: &str,
    events: u64,
    interval_ms: u64,
) -> anyhow::Result<Histogram<u32>> {
    let mut hist = Histogram::<u32>::new(3)?;
    for seq in 1..=events {
        if seq > 1 {
            tokio::time::sleep(Duration::from_millis(interval_ms)).await;
        }
        let sent = Instant::now();
        publish_stamped(http, url, seq).await?;
        hist.record(sent.elapsed().as_micros() as u64)?;
    }
    Ok(hist)
}

/// The median of every figure, each taken on its own over the runs.
fn medians(runs: &[Figure]) -> Figure {
    let median = |get: fn(&Figure) -> f64| crate::server::median(runs, get);
    Figure {
        p50_ms: median(|f| f.p50_ms),
        p90_ms: median(|f| f.p90_ms),
        p99_ms: median(|f| f.p99_ms),
        max_ms: median(|f| f.max_ms),
        polls_per_sec: median(|f| f.polls_per_sec),
        events_per_sec: median(|f| f.events_per_sec),
        events_per_poll: median(|f| f.events_per_poll),
        empty_polls: median(|f| f.empty_polls),
        publish_p50_ms: median(|f| f.publish_p50_ms),
        publish_p99_ms: median(|f| f.publish_p99_ms),
        first_p50_ms: median(|f| f.first_p50_ms),
        first_max_ms: median(|f| f.first_max_ms),
        to_commit_p99_ms: median_some(runs.iter().map(|f| f.to_commit_p99_ms)),
        secs: median(|f| f.secs),
    }
}

/// The long-poll wake-up target: p99 at most this, with 1,000 waiters.
const TARGET_P99_MS: f64 = 50.0;

fn print_report(args: &Args, f: &Figure, ceiling: Option<&Figure>) {
    let name = format!("{} waiters on one topic", args.waiters);
    println!(
        "\nlong-poll wake-up: {} events {} ms apart, limit {}, wait {} s, median of {} runs (each figure on its own)",
        args.events,
        args.interval_ms,
        args.limit,
        args.wait,
        args.runs.max(1)
    );
    println!(
        "{:<40} {:>8} {:>8} {:>8} {:>8} {:>10} {:>10} {:>12} {:>13} {:>13} {:>16} {:>10} {:>10}",
        "scenario",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "polls/s",
        "events/s",
        "events/poll",
        "publish p50",
        "publish p99",
        "to commit p99",
        "first p50",
        "first max"
    );
    let row = |label: &str, f: &Figure| {
        println!(
            "{:<40} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>10.0} {:>10.0} {:>12.2} {:>13.2} {:>13.2} {:>16} {:>10.2} {:>10.2}",
            label,
            f.p50_ms,
            f.p90_ms,
            f.p99_ms,
            f.max_ms,
            f.polls_per_sec,
            f.events_per_sec,
            f.events_per_poll,
            f.publish_p50_ms,
            f.publish_p99_ms,
            f.to_commit_p99_ms
                .map_or_else(|| "-".to_owned(), |ms| format!("{ms:.2}")),
            f.first_p50_ms,
            f.first_max_ms
        );
    };
    if let Some(c) = ceiling {
        row(&format!("{name}, ceiling"), c);
    }
    row(&name, f);
    let ratios = ceiling.map(|c| Ratios::of(f, c));
    if let Some(r) = &ratios {
        println!(
            "server / ceiling: wake-up p50 {:.2}x, p99 {:.2}x; polls/s {:.2}x",
            r.p50, r.p99, r.polls_per_sec
        );
    }
    println!(
        "wake-up p99 target (<= {TARGET_P99_MS} ms): {}",
        if f.p99_ms <= TARGET_P99_MS {
            "met"
        } else {
            "missed"
        }
    );
    let mut line = json!({
        "scenario": "poll", "name": name,
        "waiters": args.waiters, "events": args.events, "interval_ms": args.interval_ms,
        "limit": args.limit, "wait": args.wait, "runs": args.runs.max(1),
        "bus": args.services.bus(), "direct_streams": args.direct_streams,
        "wake_p99_target_met": f.p99_ms <= TARGET_P99_MS,
        "ceiling": ceiling.copied().map(Figure::to_json),
        "vs_ceiling": ratios.map(|r| json!({
            "wake_p50": r3(r.p50), "wake_p99": r3(r.p99), "polls_per_sec": r3(r.polls_per_sec),
        })),
    });
    if let (Some(line), serde_json::Value::Object(figures)) = (line.as_object_mut(), f.to_json()) {
        line.extend(figures);
    }
    println!("{line}");
}

/// The server's figures over the ceiling's.
struct Ratios {
    p50: f64,
    p99: f64,
    polls_per_sec: f64,
}

impl Ratios {
    fn of(server: &Figure, ceiling: &Figure) -> Ratios {
        Ratios {
            p50: server.p50_ms / ceiling.p50_ms,
            p99: server.p99_ms / ceiling.p99_ms,
            polls_per_sec: server.polls_per_sec / ceiling.polls_per_sec,
        }
    }
}

impl Figure {
    fn to_json(self) -> serde_json::Value {
        json!({
            "wake_p50_ms": r3(self.p50_ms), "wake_p90_ms": r3(self.p90_ms),
            "wake_p99_ms": r3(self.p99_ms), "wake_max_ms": r3(self.max_ms),
            "polls_per_sec": self.polls_per_sec.round(), "events_per_sec": self.events_per_sec.round(),
            "events_per_poll": r3(self.events_per_poll), "empty_polls": self.empty_polls.round() as u64,
            "publish_p50_ms": r3(self.publish_p50_ms), "publish_p99_ms": r3(self.publish_p99_ms),
            "to_commit_p99_ms": self.to_commit_p99_ms.map(r3),
            "first_p50_ms": r3(self.first_p50_ms), "first_max_ms": r3(self.first_max_ms),
            "secs": r3(self.secs),
        })
    }
}
