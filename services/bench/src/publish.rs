//! Publish throughput: the publisher service (HTTP, group commit, Postgres)
//! against a raw batched INSERT into the same Postgres, in one run.
//!
//! The publisher runs in this process on a free loopback port, over a fresh
//! database that is dropped at the end, so client and server share the machine.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

use hdrhistogram::Histogram;
use rt_core::{Context, config::Settings, server::Application};
use serde_json::json;
use sqlx::{Executor, postgres::PgPoolOptions};

use crate::server::Services;

#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    services: Services,
    /// Events per measured run.
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Concurrent HTTP publishers.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Events per request in the batch-publish scenario.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Rows per INSERT in the raw baseline.
    #[arg(long, default_value_t = 100)]
    raw_batch: usize,
    /// Connections inserting at once in the raw baseline.
    #[arg(long, default_value_t = 4)]
    raw_connections: usize,
    /// Runs per scenario; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Group-commit workers of the publisher under test.
    #[arg(long, default_value_t = Settings::default().commit_workers)]
    commit_workers: usize,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
}

/// One scenario's result.
struct Figure {
    name: String,
    events_per_sec: f64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    // A database of the bench's own, dropped at the end.
    let db = rt_tests::TestDb::create_on(&args.services.database_url).await;
    let mut figures = Vec::new();

    let raw = median(&args, "raw batched INSERT", |_| raw_insert(&db.url, &args)).await?;
    figures.push(raw);

    let settings = Settings {
        bind: "127.0.0.1:0".into(),
        database_url: Some(db.url.clone()),
        nats_url: args.services.nats_url.clone(),
        nats_prefix: format!("bench{}", uuid::Uuid::new_v4().simple()),
        commit_workers: args.commit_workers,
        ..Settings::default()
    };
    let ctx = Context::connect(settings).await?;
    let app = Application::build(ctx, rt_publisher::routes())?;
    let base = format!("http://127.0.0.1:{}", app.port());
    let handle = app.stop_handle();
    tokio::spawn(app.run_until_stopped());
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()?;

    // The same clients against a route that does nothing: the rate at which
    // this machine answers HTTP requests at all, the bound of one-event publishes.
    let ceiling = median(&args, "HTTP ceiling: GET /healthz, requests/s", |_| {
        healthz_load(&http, &base, &args)
    })
    .await?;
    figures.push(ceiling);

    for (name, topics, batch) in [
        ("publisher, 1 hot topic, 1 event/request", 1, 1),
        ("publisher, 100 topics, 1 event/request", 100, 1),
        ("publisher, 1 hot topic, batch requests", 1, args.batch),
        ("publisher, 100 topics, batch requests", 100, args.batch),
    ] {
        let figure = median(&args, name, |run| {
            publish_load(&http, &base, &args, topics, batch, run)
        })
        .await?;
        figures.push(figure);
    }
    handle.stop(true).await;

    print_report(&args, &figures);
    Ok(())
}

async fn median<F, Fut>(args: &Args, name: &str, mut once: F) -> anyhow::Result<Figure>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<Figure>>,
{
    let mut runs = Vec::new();
    for run in 0..args.runs.max(1) {
        let f = once(run).await?;
        if !args.quiet {
            eprintln!("  {name}: run {} {:.0} events/s", run + 1, f.events_per_sec);
        }
        runs.push(f);
    }
    runs.sort_by(|a, b| a.events_per_sec.total_cmp(&b.events_per_sec));
    let mut mid = runs.swap_remove(runs.len() / 2);
    mid.name = name.to_owned();
    Ok(mid)
}

/// `raw_connections` connections insert `events` rows in batches of
/// `raw_batch`, one transaction per batch, into a table shaped like the log.
async fn raw_insert(url: &str, args: &Args) -> anyhow::Result<Figure> {
    let pool = PgPoolOptions::new()
        .max_connections(args.raw_connections as u32)
        .connect(url)
        .await?;
    pool.execute(
        "DROP TABLE IF EXISTS bench_raw;
         CREATE TABLE bench_raw (topic text NOT NULL, seq bigint NOT NULL, type text NOT NULL,
             data text NOT NULL, time timestamptz NOT NULL, idempotency_key text, PRIMARY KEY (topic, seq))",
    )
    .await?;
    let next = Arc::new(AtomicUsize::new(0));
    let data = json!({"n": 0, "text": "a small event payload"}).to_string();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.raw_connections {
        let (pool, next, data) = (pool.clone(), next.clone(), data.clone());
        let (total, batch) = (args.events, args.raw_batch);
        tasks.push(tokio::spawn(async move {
            loop {
                let from = next.fetch_add(batch, Ordering::Relaxed);
                if from >= total {
                    return Ok::<_, sqlx::Error>(());
                }
                let seqs: Vec<i64> = (from..(from + batch).min(total)).map(|s| s as i64 + 1).collect();
                let datas = vec![data.as_str(); seqs.len()];
                sqlx::query(
                    "INSERT INTO bench_raw (topic, seq, type, data, time)
                     SELECT 'hot', s, 'message', d, now() FROM unnest($1::int8[], $2::text[]) AS v(s, d)",
                )
                .bind(&seqs)
                .bind(&datas)
                .execute(&pool)
                .await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    pool.close().await;
    Ok(Figure {
        name: String::new(),
        events_per_sec: args.events as f64 / secs,
        p50_ms: None,
        p99_ms: None,
    })
}

/// `concurrency` clients send `events` requests to `GET /healthz` in all.
async fn healthz_load(http: &reqwest::Client, base: &str, args: &Args) -> anyhow::Result<Figure> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (http, next, url) = (http.clone(), next.clone(), format!("{base}/healthz"));
        let total = args.events;
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let res = http.get(&url).send().await?;
                anyhow::ensure!(
                    res.status().is_success(),
                    "/healthz answered {}",
                    res.status()
                );
                res.bytes().await?;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(Figure {
        name: String::new(),
        events_per_sec: args.events as f64 / started.elapsed().as_secs_f64(),
        p50_ms: None,
        p99_ms: None,
    })
}

/// `concurrency` clients publish `events` events over HTTP, `batch` per request.
async fn publish_load(
    http: &reqwest::Client,
    base: &str,
    args: &Args,
    topics: usize,
    batch: usize,
    run: usize,
) -> anyhow::Result<Figure> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (http, next, base) = (http.clone(), next.clone(), base.to_owned());
        let total = args.events;
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).expect("histogram");
            loop {
                let from = next.fetch_add(batch, Ordering::Relaxed);
                if from >= total {
                    return Ok::<_, anyhow::Error>(hist);
                }
                let n = batch.min(total - from);
                let topic = |i: usize| format!("bench{run}-{}", i % topics);
                let sent = Instant::now();
                let res = if batch == 1 {
                    http.post(format!("{base}/v1/topics/{}/events", topic(from)))
                        .json(&json!({"data": {"n": from, "text": "a small event payload"}}))
                        .send()
                        .await?
                } else {
                    let items: Vec<_> = (from..from + n)
                        .map(|i| json!({"topic": topic(i), "data": {"n": i, "text": "a small event payload"}}))
                        .collect();
                    http.post(format!("{base}/v1/events")).json(&items).send().await?
                };
                anyhow::ensure!(res.status() == 201, "publish answered {}", res.status());
                hist.record(sent.elapsed().as_micros() as u64)?;
            }
        }));
    }
    let mut hist = Histogram::<u64>::new(3)?;
    for t in tasks {
        hist.add(t.await??)?;
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(Figure {
        name: String::new(),
        events_per_sec: args.events as f64 / secs,
        p50_ms: Some(hist.value_at_quantile(0.5) as f64 / 1000.0),
        p99_ms: Some(hist.value_at_quantile(0.99) as f64 / 1000.0),
    })
}

fn print_report(args: &Args, figures: &[Figure]) {
    let raw = figures[0].events_per_sec;
    println!(
        "\npublish throughput: {} events per run, median of {} runs, {} HTTP publishers, raw baseline {} connections x {} rows/INSERT",
        args.events, args.runs, args.concurrency, args.raw_connections, args.raw_batch
    );
    println!(
        "{:<44} {:>12} {:>9} {:>10} {:>10}",
        "scenario", "events/s", "x raw", "p50 ms", "p99 ms"
    );
    let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
    for f in figures {
        println!(
            "{:<44} {:>12.0} {:>9.2} {:>10} {:>10}",
            f.name,
            f.events_per_sec,
            f.events_per_sec / raw,
            ms(f.p50_ms),
            ms(f.p99_ms)
        );
    }
    for f in figures {
        println!(
            "{}",
            json!({
                "scenario": "publish", "name": f.name, "events_per_sec": f.events_per_sec.round(),
                "ratio_to_raw": (f.events_per_sec / raw * 1000.0).round() / 1000.0,
                "p50_ms": f.p50_ms, "p99_ms": f.p99_ms, "events": args.events, "runs": args.runs,
            })
        );
    }
}
