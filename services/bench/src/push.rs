//! Web Push delivery throughput: many browser subscriptions on one topic, a
//! few events published to it, every (event, subscription) pair delivered to
//! a push-service emulator.
//!
//! The publisher and push-dispatcher routes and the dispatcher's delivery
//! engine run in this process on a free loopback port, over a fresh database
//! that is dropped at the end. So does the push-service emulator
//! (`rt_tests::push_emulator`), which verifies every request's VAPID token
//! and decrypts every body as a browser would: the dispatcher (encrypting,
//! signing), the emulator (verifying, decrypting) and Postgres share the
//! machine, and the bench's own CPU time is reported beside the figures.
//!
//! Each run registers `--subscriptions` subscriptions (fresh browsers on a
//! fresh emulator) on a topic of its own over HTTP, a bounded number at
//! once, then publishes `--events` events to it one after the other, each
//! carrying the wall-clock time it was sent. It waits until every pair has
//! arrived, then checks each arrived exactly once and that the emulator
//! refused nothing. Deliveries per second are pairs / (first publish → last
//! pair's first arrival); latency is publish sent → request arrived at the
//! emulator, per pair. The events go out as a burst, so with many
//! subscriptions the latency is mostly time spent queued behind the others.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use hdrhistogram::Histogram;
use rt_core::{Context, config::Settings};
use rt_tests::{
    TestApp,
    push_emulator::{Browser, Delivered, PushEmulator},
};
use serde::Deserialize;
use serde_json::json;

use crate::server::{Services, cpu_secs, now_us};

#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    services: Services,
    /// Push subscriptions on the one topic (fresh ones every run).
    #[arg(long, default_value_t = 10_000)]
    subscriptions: usize,
    /// Events published per run, one after the other.
    #[arg(long, default_value_t = 5)]
    events: u64,
    /// The dispatcher's `--push-concurrency`: Web Push requests in flight
    /// over every push service.
    #[arg(long, default_value_t = Settings::default().push_concurrency)]
    concurrency: u32,
    /// The dispatcher's `--push-host-concurrency`: requests in flight to one
    /// push-service host. Every subscription here is on the emulator's one
    /// host, so this bounds the whole run.
    #[arg(long, default_value_t = Settings::default().push_host_concurrency)]
    host_concurrency: u32,
    /// Subscription registrations (`POST /v1/push/subscriptions`) in flight.
    #[arg(long, default_value_t = 32)]
    register_concurrency: usize,
    /// Longest wait, from the first publish, for every delivery, in seconds.
    #[arg(long, default_value_t = 1200)]
    timeout: u64,
    /// Give up when no push attempt ended for this long, in seconds.
    #[arg(long, default_value_t = 60)]
    stall: u64,
    /// Runs; the median of each figure is reported. One run of the default
    /// size takes under a minute when deliveries flow at ~1,000/s.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
}

/// One run's figures (or, in the report, the median of each over the runs).
#[derive(Clone, Copy)]
struct Figure {
    /// Subscriptions registered per second, over HTTP.
    registered_per_sec: f64,
    /// Pairs (event × subscription) delivered per second, first publish →
    /// last pair's first arrival.
    deliveries_per_sec: f64,
    /// First publish → last pair's first arrival.
    secs: f64,
    /// First publish → first delivery.
    first_ms: f64,
    /// Publish sent → request arrived at the emulator, per pair.
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Pairs that arrived more than once, counting each extra arrival.
    duplicates: f64,
    /// Dispatcher attempts that were retried (timeouts, 429, 5xx).
    retries: f64,
    /// Most requests the emulator answered at once.
    emulator_max_in_flight: f64,
    /// This process's CPU time (user + system) from the first publish until
    /// every pair was seen, in seconds, per second of that time (cores), and
    /// per delivery in microseconds.
    cpu_secs: f64,
    cpu_cores: f64,
    cpu_us_per_delivery: f64,
    /// The whole machine's busy CPU time (Postgres included) over the same
    /// time, per second of it (cores).
    machine_cores: f64,
}

/// What the emulator decrypts: the event as the dispatcher sends it.
#[derive(Deserialize)]
struct Plain {
    seq: u64,
    data: Sent,
}

#[derive(Deserialize)]
struct Sent {
    #[serde(rename = "sentAtUs")]
    sent_at_us: u64,
}

/// The dispatcher's push attempts by outcome, from its metrics.
#[derive(Clone, Copy, Default, Debug)]
struct Outcomes {
    delivered: u64,
    notice: u64,
    retry: u64,
    failed: u64,
    gone: u64,
}

impl Outcomes {
    fn read(ctx: &Context) -> Outcomes {
        let mut o = Outcomes::default();
        for line in ctx.metrics.render().lines() {
            let Some(rest) = line.strip_prefix("rt_push_outcomes_total{outcome=\"") else {
                continue;
            };
            let Some((label, value)) = rest.split_once("\"} ") else {
                continue;
            };
            let value = value.trim().parse::<f64>().unwrap_or(0.0) as u64;
            match label {
                "delivered" => o.delivered = value,
                "notice" => o.notice = value,
                "retry" => o.retry = value,
                "failed" => o.failed = value,
                "gone" => o.gone = value,
                _ => {}
            }
        }
        o
    }

    fn since(self, base: Outcomes) -> Outcomes {
        Outcomes {
            delivered: self.delivered - base.delivered,
            notice: self.notice - base.notice,
            retry: self.retry - base.retry,
            failed: self.failed - base.failed,
            gone: self.gone - base.gone,
        }
    }

    fn ended(self) -> u64 {
        self.delivered + self.notice + self.retry + self.failed + self.gone
    }
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.subscriptions > 0, "--subscriptions must be at least 1");
    anyhow::ensure!(args.events > 0, "--events must be at least 1");
    anyhow::ensure!(
        args.concurrency > 0 && args.host_concurrency > 0,
        "--concurrency and --host-concurrency must be at least 1"
    );
    anyhow::ensure!(
        args.register_concurrency > 0,
        "--register-concurrency must be at least 1"
    );

    // A database of the bench's own, dropped with the app at the end.
    let db = rt_tests::TestDb::create_on(&args.services.database_url).await;
    let settings = Settings {
        bind: "127.0.0.1:0".into(),
        database_url: Some(db.url.clone()),
        nats_url: args.services.nats_url.clone(),
        nats_prefix: format!("bench{}", uuid::Uuid::new_v4().simple()),
        // The emulator is plain http on loopback.
        push_allow_insecure_endpoints: true,
        push_allow_private_addresses: true,
        push_concurrency: args.concurrency,
        push_host_concurrency: args.host_concurrency,
        ..Settings::default()
    };
    let ctx = Context::connect(settings).await?;
    let prefix = ctx.settings.nats_prefix.clone();
    let app = TestApp::serve(ctx, prefix, Some(db), None);
    let dispatcher = app.start_dispatcher();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.register_concurrency + 1)
        .timeout(Duration::from_secs(60))
        .build()?;
    let res = http
        .get(app.url("/v1/push/vapid-public-key"))
        .send()
        .await?;
    anyhow::ensure!(
        res.status() == 200,
        "GET /v1/push/vapid-public-key answered {}",
        res.status()
    );
    let key: serde_json::Value = res.json().await?;
    let vapid_key = key["publicKey"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no publicKey in {key}"))?
        .to_owned();

    let mut runs = Vec::new();
    for run in 0..args.runs.max(1) {
        let f = deliver(&app, &http, &vapid_key, &args, run).await?;
        if !args.quiet {
            eprintln!(
                "  run {}: {:.0} deliveries/s ({:.1} s), latency p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; \
                 {:.0} registrations/s; bench CPU {:.1} s ({:.2} cores, {:.0} µs/delivery), machine busy {:.2} cores",
                run + 1,
                f.deliveries_per_sec,
                f.secs,
                f.p50_ms,
                f.p99_ms,
                f.max_ms,
                f.registered_per_sec,
                f.cpu_secs,
                f.cpu_cores,
                f.cpu_us_per_delivery,
                f.machine_cores
            );
        }
        runs.push(f);
    }
    app.stop().await;
    let _ = tokio::time::timeout(Duration::from_secs(20), dispatcher).await;
    // Dropping the app drops the database.
    drop(app);

    print_report(&args, &medians(&runs));
    Ok(())
}

/// One run: a fresh emulator and topic, `subscriptions` registered on it,
/// `events` published; done when every pair has arrived.
async fn deliver(
    app: &TestApp,
    http: &reqwest::Client,
    vapid_key: &str,
    args: &Args,
    run: usize,
) -> anyhow::Result<Figure> {
    let topic = format!("push{run}");
    let emulator = PushEmulator::start().await;
    emulator.set_vapid_public_key(vapid_key);
    let browsers: Vec<Browser> = (0..args.subscriptions)
        .map(|_| emulator.new_browser())
        .collect();
    let index: HashMap<&str, usize> = browsers
        .iter()
        .enumerate()
        .map(|(i, b)| (b.id.as_str(), i))
        .collect();

    let registered_per_sec = register(app, http, &browsers, &topic, args, run).await?;

    // Everything from here on is the delivery phase.
    let base = Outcomes::read(&app.ctx);
    let cpu_before = cpu_secs("/proc/self/stat")?;
    let machine_before = machine_busy_secs()?;
    let started = Instant::now();
    // Maps the events' wall-clock send times onto the emulator's `Instant`s.
    let (anchor, anchor_us) = (Instant::now(), now_us());
    let url = app.url(&format!("/v1/topics/{topic}/events"));
    let mut first_seq = None;
    for i in 0..args.events {
        let res = http
            .post(&url)
            .json(&json!({"data": {"sentAtUs": now_us(), "i": i}}))
            .send()
            .await?;
        anyhow::ensure!(res.status() == 201, "publish answered {}", res.status());
        let published: serde_json::Value = res.json().await?;
        let seq = published["seq"]
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("no seq in {published}"))?;
        let first = *first_seq.get_or_insert(seq);
        anyhow::ensure!(
            seq == first + i,
            "publish {i} got seq {seq} (expected {})",
            first + i
        );
    }
    let first_seq = first_seq.unwrap_or(1);

    let pairs = args.subscriptions as u64 * args.events;
    let timeout = Duration::from_secs(args.timeout);
    let stall = Duration::from_secs(args.stall);
    let (mut last_ended, mut last_change) = (0, Instant::now());
    let mut next_progress = Instant::now() + Duration::from_secs(10);
    let failure = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The dispatcher counts a delivery once the emulator has answered
        // 2xx, which it does only after recording it: cheaper to watch than
        // the emulator's list.
        let o = Outcomes::read(&app.ctx).since(base);
        if o.delivered + o.notice >= pairs {
            break None;
        }
        if o.ended() != last_ended {
            (last_ended, last_change) = (o.ended(), Instant::now());
        }
        if !args.quiet && Instant::now() >= next_progress {
            next_progress += Duration::from_secs(10);
            eprintln!(
                "  run {}: {} of {pairs} delivered after {:.0} s ({} retried, {} failed)",
                run + 1,
                o.delivered + o.notice,
                started.elapsed().as_secs_f64(),
                o.retry,
                o.failed
            );
        }
        if started.elapsed() >= timeout {
            break Some(format!("not all delivered within {} s", timeout.as_secs()));
        }
        if last_change.elapsed() >= stall {
            break Some(format!(
                "no push attempt ended for {} s (stalled)",
                stall.as_secs()
            ));
        }
    };
    let window = started.elapsed().as_secs_f64();
    let cpu = cpu_secs("/proc/self/stat")? - cpu_before;
    let machine = machine_busy_secs()? - machine_before;
    let outcomes = Outcomes::read(&app.ctx).since(base);

    let delivered = emulator.deliveries();
    let check = check_pairs(&delivered, &index, first_seq, args.events);
    let rejections = emulator.rejections();
    let summary = format!(
        "{} of {pairs} (event, subscription) pairs arrived ({} duplicates, {} unexpected) \
         {:.1} s after the first publish; dispatcher outcomes: {outcomes:?}; \
         {} rejections by the emulator{}",
        check.arrived,
        check.duplicates,
        check.unexpected,
        window,
        rejections.len(),
        rejections
            .first()
            .map_or(String::new(), |r| format!(" (first: {r})"))
    );
    if let Some(why) = failure {
        anyhow::bail!("run {}: {why}: {summary}", run + 1);
    }
    anyhow::ensure!(
        check.arrived == pairs && check.unexpected == 0,
        "run {}: deliveries are missing: {summary}",
        run + 1
    );
    anyhow::ensure!(
        rejections.is_empty(),
        "run {}: the emulator refused requests: {summary}",
        run + 1
    );

    let mut hist = Histogram::<u64>::new(3)?;
    let mut last = started;
    let mut first = None::<Instant>;
    for d in check.firsts.iter().flatten() {
        let plain: Plain = serde_json::from_slice(&d.plaintext)?;
        let sent = anchor
            + Duration::from_micros(plain.data.sent_at_us)
                .saturating_sub(Duration::from_micros(anchor_us));
        hist.record(d.at.saturating_duration_since(sent).as_micros() as u64)?;
        last = last.max(d.at);
        first = Some(first.map_or(d.at, |f| f.min(d.at)));
    }
    let secs = last.duration_since(started).as_secs_f64();
    let ms = |v: u64| v as f64 / 1000.0;
    let figure = Figure {
        registered_per_sec,
        deliveries_per_sec: pairs as f64 / secs,
        secs,
        first_ms: first.map_or(0.0, |f| f.duration_since(started).as_secs_f64() * 1000.0),
        p50_ms: ms(hist.value_at_quantile(0.5)),
        p90_ms: ms(hist.value_at_quantile(0.9)),
        p99_ms: ms(hist.value_at_quantile(0.99)),
        max_ms: ms(hist.max()),
        duplicates: check.duplicates as f64,
        retries: outcomes.retry as f64,
        emulator_max_in_flight: emulator.max_concurrent() as f64,
        cpu_secs: cpu,
        cpu_cores: cpu / window,
        cpu_us_per_delivery: cpu * 1e6 / pairs as f64,
        machine_cores: machine / window,
    };
    emulator.stop().await;
    Ok(figure)
}

/// Registers every browser on `topic`, `register_concurrency` at a time;
/// returns registrations per second.
async fn register(
    app: &TestApp,
    http: &reqwest::Client,
    browsers: &[Browser],
    topic: &str,
    args: &Args,
    run: usize,
) -> anyhow::Result<f64> {
    let url = app.url("/v1/push/subscriptions");
    let started = Instant::now();
    let mut requests = futures_util::stream::iter(browsers.iter().map(|b| {
        let request = http.post(&url).json(&b.subscription_json(&[topic]));
        async move {
            let res = request.send().await?;
            let status = res.status();
            if status != 201 {
                let body = res.text().await.unwrap_or_default();
                anyhow::bail!("registering a subscription answered {status}: {body}");
            }
            Ok(())
        }
    }))
    .buffer_unordered(args.register_concurrency);
    let mut done = 0;
    while let Some(result) = requests.next().await {
        result?;
        done += 1;
        if !args.quiet && done % 2500 == 0 && done < browsers.len() {
            eprintln!(
                "  run {}: {done} of {} subscriptions registered",
                run + 1,
                browsers.len()
            );
        }
    }
    let secs = started.elapsed().as_secs_f64();
    if !args.quiet {
        eprintln!(
            "  run {}: {} subscriptions registered in {secs:.1} s ({:.0}/s, {} in flight)",
            run + 1,
            browsers.len(),
            browsers.len() as f64 / secs,
            args.register_concurrency
        );
    }
    Ok(browsers.len() as f64 / secs)
}

/// How the deliveries cover the (event, subscription) pairs.
struct PairCheck<'a> {
    /// Each pair's first arrival, by `browser × events + (seq - first_seq)`.
    firsts: Vec<Option<&'a Delivered>>,
    arrived: u64,
    duplicates: u64,
    /// Deliveries to no browser of this run, of another seq, or unreadable.
    unexpected: u64,
}

fn check_pairs<'a>(
    delivered: &'a [Delivered],
    index: &HashMap<&str, usize>,
    first_seq: u64,
    events: u64,
) -> PairCheck<'a> {
    let events_n = events as usize;
    let mut check = PairCheck {
        firsts: vec![None; index.len() * events_n],
        arrived: 0,
        duplicates: 0,
        unexpected: 0,
    };
    // `delivered` is in arrival order, so the first one seen is the first.
    for d in delivered {
        let seq = serde_json::from_slice::<Plain>(&d.plaintext).map(|p| p.seq);
        let slot = match (index.get(d.browser_id.as_str()), seq) {
            (Some(&browser), Ok(seq)) if seq >= first_seq && seq < first_seq + events => {
                browser * events_n + (seq - first_seq) as usize
            }
            _ => {
                check.unexpected += 1;
                continue;
            }
        };
        match &mut check.firsts[slot] {
            Some(_) => check.duplicates += 1,
            empty => {
                *empty = Some(d);
                check.arrived += 1;
            }
        }
    }
    check
}

/// The machine's busy CPU time so far (every CPU, every process), in
/// seconds: the `cpu` line of `/proc/stat` without idle and iowait.
fn machine_busy_secs() -> anyhow::Result<f64> {
    let text = std::fs::read_to_string("/proc/stat")?;
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| anyhow::anyhow!("no cpu line in /proc/stat"))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is in user).
    let busy: u64 = ticks
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, t)| t)
        .sum();
    // In USER_HZ (100 on Linux).
    Ok(busy as f64 / 100.0)
}

/// The median of every figure, each taken on its own over the runs.
fn medians(runs: &[Figure]) -> Figure {
    let median = |get: fn(&Figure) -> f64| crate::server::median(runs, get);
    Figure {
        registered_per_sec: median(|f| f.registered_per_sec),
        deliveries_per_sec: median(|f| f.deliveries_per_sec),
        secs: median(|f| f.secs),
        first_ms: median(|f| f.first_ms),
        p50_ms: median(|f| f.p50_ms),
        p90_ms: median(|f| f.p90_ms),
        p99_ms: median(|f| f.p99_ms),
        max_ms: median(|f| f.max_ms),
        duplicates: median(|f| f.duplicates),
        retries: median(|f| f.retries),
        emulator_max_in_flight: median(|f| f.emulator_max_in_flight),
        cpu_secs: median(|f| f.cpu_secs),
        cpu_cores: median(|f| f.cpu_cores),
        cpu_us_per_delivery: median(|f| f.cpu_us_per_delivery),
        machine_cores: median(|f| f.machine_cores),
    }
}

/// CPUs this process may run on.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, usize::from)
}

fn print_report(args: &Args, f: &Figure) {
    let name = format!("{} subscriptions on one topic", args.subscriptions);
    let bus = args.services.bus();
    println!(
        "\nWeb Push delivery: {} events × {} subscriptions to the push-service emulator, \
         push concurrency {}, per host {}, {bus} bus, median of {} runs (each figure on its own); \
         the events are a burst: latency is mostly queueing",
        args.events,
        args.subscriptions,
        args.concurrency,
        args.host_concurrency,
        args.runs.max(1)
    );
    println!(
        "{:<32} {:>12} {:>8} {:>9} {:>8} {:>8} {:>8} {:>8} {:>11}",
        "scenario",
        "deliveries/s",
        "secs",
        "first ms",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "register/s"
    );
    println!(
        "{:<32} {:>12.0} {:>8.2} {:>9.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>11.0}",
        name,
        f.deliveries_per_sec,
        f.secs,
        f.first_ms,
        f.p50_ms,
        f.p90_ms,
        f.p99_ms,
        f.max_ms,
        f.registered_per_sec
    );
    println!(
        "every pair arrived; duplicates {:.0}, dispatcher retries {:.0}, emulator max in flight {:.0}",
        f.duplicates, f.retries, f.emulator_max_in_flight
    );
    println!(
        "bench process CPU (dispatcher, emulator verifying VAPID and decrypting every body, \
         publisher and HTTP client share it; Postgres apart): {:.2} s, {:.2} cores, {:.0} µs per delivery; \
         whole machine busy {:.2} of {} cores",
        f.cpu_secs,
        f.cpu_cores,
        f.cpu_us_per_delivery,
        f.machine_cores,
        cores()
    );
    let r3 = |v: f64| (v * 1000.0).round() / 1000.0;
    println!(
        "{}",
        json!({
            "scenario": "push", "name": name,
            "deliveries_per_sec": f.deliveries_per_sec.round(), "secs": r3(f.secs),
            "first_delivery_ms": r3(f.first_ms),
            "latency_p50_ms": r3(f.p50_ms), "latency_p90_ms": r3(f.p90_ms),
            "latency_p99_ms": r3(f.p99_ms), "latency_max_ms": r3(f.max_ms),
            "registrations_per_sec": f.registered_per_sec.round(),
            "duplicates": f.duplicates.round() as u64, "retries": f.retries.round() as u64,
            "emulator_max_in_flight": f.emulator_max_in_flight.round() as u64,
            "bench_cpu_secs": r3(f.cpu_secs), "bench_cpu_cores": r3(f.cpu_cores),
            "bench_cpu_us_per_delivery": f.cpu_us_per_delivery.round(),
            "machine_busy_cores": r3(f.machine_cores), "machine_cores": cores(),
            "subscriptions": args.subscriptions, "events": args.events,
            "push_concurrency": args.concurrency, "push_host_concurrency": args.host_concurrency,
            "register_concurrency": args.register_concurrency,
            "runs": args.runs.max(1), "bus": bus,
        })
    );
}
