//! The edges against the raw ceiling, in one invocation.
//!
//! `rt-bench compare` re-executes this binary four times per connection
//! count, one child after the other (never at once: client and server already
//! share the machine's cores): `rt-bench raw --wire sse`, `rt-bench sse`,
//! `rt-bench raw --wire ws`, then `rt-bench ws`, each with `--connections N
//! --runs R --quiet` (and `--nats-url` / `--database-url` / `--distributed`
//! for the two edges when given; the ceiling runs the same either way). Each
//! edge is held to the ceiling of its own wire, read by the same client
//! code, so that what the bench's client spends per event weighs alike on
//! both sides of a ratio. It reads the JSON lines the children print (other
//! lines are skipped), and reports every edge figure next to its ceiling's
//! from the same invocation, and as a ratio of it, against the project's
//! targets:
//!
//! - burst deliveries/s at least 0.5× the ceiling's (at 1,000 connections);
//! - latency p99 at most 2× the ceiling's;
//! - idle memory at most 8 KiB per connection (the ceiling's shown next to it).
//!
//! A child that fails, or whose output lacks a needed JSON object, fails the
//! comparison with its command line, exit status and the tail of its stderr.

use std::{
    collections::VecDeque,
    io::{BufRead as _, BufReader, Read as _},
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::Context as _;
use serde_json::{Map, Value, json};

use crate::plot::{self, Series};
use crate::server::{check_distributed, deployment_name};

/// Lines of a child's stderr kept for an error message.
const STDERR_TAIL: usize = 20;

/// One child of a comparison.
#[derive(Clone, Copy)]
struct Step {
    /// Its name in the report.
    label: &'static str,
    /// The rt-bench scenario it runs.
    scenario: &'static str,
    /// The ceiling's wire (`raw --wire`).
    wire: Option<&'static str>,
}

/// The children, in the order they run: each edge after the ceiling of its
/// wire.
const STEPS: [Step; 4] = [
    Step {
        label: "raw-sse",
        scenario: "raw",
        wire: Some("sse"),
    },
    Step {
        label: "sse",
        scenario: "sse",
        wire: None,
    },
    Step {
        label: "raw-ws",
        scenario: "raw",
        wire: Some("ws"),
    },
    Step {
        label: "ws",
        scenario: "ws",
        wire: None,
    },
];

/// Deliveries/s of an edge over the ceiling's: at least this.
const DELIVERIES_TARGET: f64 = 0.5;
/// The connection count the deliveries target is stated for.
const DELIVERIES_TARGET_AT: usize = 1000;
/// Latency p99 of an edge over the ceiling's: at most this.
const P99_TARGET: f64 = 2.0;
/// Idle memory of an edge, KiB per connection: at most this.
const KIB_TARGET: f64 = 8.0;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Connection counts to compare at, comma-separated; the two ceilings and
    /// the two edges run in turn for each.
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    connections: Vec<usize>,
    /// Runs per connection count, passed to each scenario (each reports the
    /// median of its runs).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Events (frames) per second in the latency scenario, passed to each.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Seconds of publishing in the latency scenario, passed to each. With
    /// the default 5 s at 20 events/s a run has 100 events, so a few slow
    /// ones on a shared host set the p99 of the ceiling and of the edges
    /// alike; a longer scenario steadies it.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// NATS URL for the edges under test (sse, ws); without it, their
    /// in-process bus.
    #[arg(long, env = "RT_BENCH_NATS_URL")]
    pub(crate) nats_url: Option<String>,
    /// Run the edges distributed (passed to sse and ws; needs --nats-url):
    /// the `publisher` and the edge as two processes, memory and server CPU
    /// the edge's. The raw ceiling runs the same either way.
    #[arg(long)]
    distributed: bool,
    /// Postgres server for the edges (sse, ws); without it, theirs by default.
    #[arg(long)]
    database_url: Option<String>,
    /// Also draw SVG charts of the figures into this directory:
    /// `latency.svg` (p50 and p99 against connections, per technique) and
    /// `deliveries.svg` (burst deliveries/s against connections).
    #[arg(long)]
    plot_dir: Option<std::path::PathBuf>,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
}

/// The figures compared, for one technique at one connection count.
#[derive(Clone, Copy, Default)]
struct Figures {
    bytes_per_conn: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    latency_server_cpu_secs: f64,
    latency_bench_cpu_secs: f64,
    deliveries_per_sec: f64,
    burst_secs: f64,
    server_cpu_secs: f64,
    bench_cpu_secs: f64,
    peak_rss_bytes: f64,
    /// CPU seconds of the publisher process in the latency and saturation
    /// scenarios (edges run distributed only).
    latency_publisher_cpu_secs: Option<f64>,
    burst_publisher_cpu_secs: Option<f64>,
    /// The latency scenario's publish requests, sent → answered (the
    /// edges only: the ceiling commits nothing). The answer also waits
    /// behind the fan-out, so it overstates what a delivery waits for.
    publish_p99_ms: Option<f64>,
    /// The latency scenario's publishes, sent → the commit stamp of their
    /// event as the clients read it: what the ceiling does not pay (the
    /// edges only).
    to_commit_p99_ms: Option<f64>,
    /// Wall-clock time of the child process.
    elapsed_secs: f64,
}

impl Figures {
    fn kib(&self) -> f64 {
        self.bytes_per_conn / 1024.0
    }

    fn to_json(self) -> Value {
        let r3 = |v: f64| (v * 1000.0).round() / 1000.0;
        json!({
            "kib_per_connection": r3(self.kib()),
            "bytes_per_connection": self.bytes_per_conn.round() as i64,
            "p50_ms": r3(self.p50_ms), "p99_ms": r3(self.p99_ms),
            "p999_ms": r3(self.p999_ms), "max_ms": r3(self.max_ms),
            "latency_server_cpu_secs": r3(self.latency_server_cpu_secs),
            "latency_bench_cpu_secs": r3(self.latency_bench_cpu_secs),
            "deliveries_per_sec": self.deliveries_per_sec.round() as u64,
            "burst_secs": r3(self.burst_secs),
            "burst_server_cpu_secs": r3(self.server_cpu_secs),
            "burst_bench_cpu_secs": r3(self.bench_cpu_secs),
            "peak_rss_bytes": self.peak_rss_bytes.round() as u64,
            "latency_publisher_cpu_secs": self.latency_publisher_cpu_secs.map(r3),
            "burst_publisher_cpu_secs": self.burst_publisher_cpu_secs.map(r3),
            "publish_p99_ms": self.publish_p99_ms.map(r3),
            "to_commit_p99_ms": self.to_commit_p99_ms.map(r3),
            "elapsed_secs": r3(self.elapsed_secs),
        })
    }
}

/// One comparison line: an edge figure, possibly over the ceiling's, and its
/// target if it has one.
struct Check {
    technique: &'static str,
    /// Key in the JSON (`deliveries_per_sec_ratio`, ...).
    key: &'static str,
    /// Label in the table.
    label: String,
    /// `None` when the ceiling's figure is zero or below (no ratio).
    value: Option<f64>,
    /// A ratio (printed with `×`) or an absolute figure.
    ratio: bool,
    /// `(">=" or "<=", bound)`.
    target: Option<(&'static str, f64)>,
}

impl Check {
    fn met(&self) -> Option<bool> {
        let (op, bound) = self.target?;
        let value = self.value?;
        Some(if op == ">=" {
            value >= bound
        } else {
            value <= bound
        })
    }
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.connections.is_empty() && args.connections.iter().all(|&n| n > 0),
        "--connections must list counts of at least 1"
    );
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    anyhow::ensure!(args.rate > 0.0, "--rate must be positive");
    anyhow::ensure!(args.seconds > 0.0, "--seconds must be positive");
    check_distributed(args.distributed, args.nats_url.as_deref())?;
    let exe = std::env::current_exe().context("cannot find the rt-bench executable")?;
    let bus = if args.nats_url.is_some() {
        "nats"
    } else {
        "in-process"
    };
    let started = Instant::now();
    let mut reports = Vec::new();
    for &n in &args.connections {
        let mut figures = [Figures::default(); 4];
        for (slot, step) in figures.iter_mut().zip(STEPS) {
            let child_args = child_args(&args, step, n);
            if !args.quiet {
                eprintln!(
                    "compare: {n} connections: running rt-bench {} ...",
                    child_args.join(" ")
                );
            }
            let exe = exe.clone();
            let quiet = args.quiet;
            let output = tokio::task::spawn_blocking(move || {
                run_child(&exe, step.label, &child_args, quiet)
            })
            .await??;
            // The edges must have run as asked; the ceiling has no deployment.
            let deployment = step
                .wire
                .is_none()
                .then(|| deployment_name(args.distributed));
            *slot = figures_of(&output, step, n, deployment)?;
            if !args.quiet {
                eprintln!(
                    "compare: {n} connections: {} done in {:.1} s \
                     ({:.1} KiB/idle connection, p99 {:.2} ms, {} deliveries/s)",
                    step.label,
                    slot.elapsed_secs,
                    slot.kib(),
                    slot.p99_ms,
                    thousands(slot.deliveries_per_sec)
                );
            }
        }
        reports.push((n, figures));
    }
    if !args.quiet {
        eprintln!(
            "compare: all done in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    print_report(&args, bus, &reports);
    if let Some(dir) = &args.plot_dir {
        plot(dir, &args, bus, &reports)?;
    }
    Ok(())
}

/// The two charts of `--plot-dir`.
fn plot(
    dir: &Path,
    args: &Args,
    bus: &str,
    reports: &[(usize, [Figures; 4])],
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let series = |label: &str, i: usize, get: fn(&Figures) -> f64| Series {
        label: label.to_owned(),
        points: reports
            .iter()
            .map(|(n, figures)| (*n as f64, get(&figures[i])))
            .collect(),
    };
    let mut latency = Vec::new();
    for (i, step) in STEPS.iter().enumerate() {
        latency.push(series(&format!("{} p50", step.label), i, |f| f.p50_ms));
        latency.push(series(&format!("{} p99", step.label), i, |f| f.p99_ms));
    }
    let deliveries: Vec<Series> = STEPS
        .iter()
        .enumerate()
        .map(|(i, step)| series(step.label, i, |f| f.deliveries_per_sec))
        .collect();
    let latency_path = dir.join("latency.svg");
    plot::lines(
        &latency_path,
        &format!(
            "publish -> receive latency at {} events/s ({}, {bus} bus)",
            args.rate,
            deployment_name(args.distributed)
        ),
        "connections on one topic",
        "ms",
        &latency,
    )?;
    let deliveries_path = dir.join("deliveries.svg");
    plot::lines(
        &deliveries_path,
        &format!(
            "burst deliveries per second ({}, {bus} bus)",
            deployment_name(args.distributed)
        ),
        "connections on one topic",
        "deliveries/s",
        &deliveries,
    )?;
    println!(
        "charts: {} and {}",
        latency_path.display(),
        deliveries_path.display()
    );
    Ok(())
}

/// The command line of one child, without the executable.
fn child_args(args: &Args, step: Step, n: usize) -> Vec<String> {
    let mut out = vec![
        step.scenario.to_owned(),
        "--connections".to_owned(),
        n.to_string(),
        "--runs".to_owned(),
        args.runs.to_string(),
        "--rate".to_owned(),
        args.rate.to_string(),
        "--seconds".to_owned(),
        args.seconds.to_string(),
        "--quiet".to_owned(),
    ];
    if let Some(wire) = step.wire {
        out.extend(["--wire".to_owned(), wire.to_owned()]);
    } else {
        if let Some(url) = &args.nats_url {
            out.extend(["--nats-url".to_owned(), url.clone()]);
        }
        if let Some(url) = &args.database_url {
            out.extend(["--database-url".to_owned(), url.clone()]);
        }
        if args.distributed {
            out.push("--distributed".to_owned());
        }
    }
    out
}

/// What one child printed: its JSON objects, and how long it took.
struct ChildOutput {
    command: String,
    objects: Vec<Map<String, Value>>,
    elapsed_secs: f64,
}

/// Runs `exe args` to its end (blocks). Its stderr is passed through, unless
/// `quiet`, and its tail kept for an error; its stdout is parsed for JSON
/// objects, one a line. Fails when it exits unsuccessfully.
fn run_child(
    exe: &Path,
    technique: &str,
    args: &[String],
    quiet: bool,
) -> anyhow::Result<ChildOutput> {
    let command = format!("rt-bench {}", args.join(" "));
    let started = Instant::now();
    let mut child = Command::new(exe)
        .args(args)
        // Its error, not where in this binary it was made, is the useful
        // part of its stderr tail.
        .env("RUST_LIB_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{command}` ({})", exe.display()))?;
    let stderr = child.stderr.take();
    let prefix = format!("  [{technique}] ");
    // Read to the end on a thread of its own, so the child never blocks on
    // a full pipe while its stdout is read here.
    let tail = std::thread::spawn(move || {
        let mut tail = VecDeque::with_capacity(STDERR_TAIL);
        let Some(stderr) = stderr else {
            return tail;
        };
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !quiet {
                eprintln!("{prefix}{line}");
            }
            if tail.len() == STDERR_TAIL {
                tail.pop_front();
            }
            tail.push_back(line);
        }
        tail
    });
    let mut stdout = String::new();
    if let Some(mut pipe) = child.stdout.take() {
        pipe.read_to_string(&mut stdout)
            .with_context(|| format!("reading the output of `{command}`"))?;
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{command}`"))?;
    let tail: Vec<String> = tail.join().unwrap_or_default().into();
    let objects: Vec<Map<String, Value>> = stdout
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    if !status.success() {
        let errors: Vec<&str> = objects
            .iter()
            .filter_map(|o| o.get("error").and_then(Value::as_str))
            .collect();
        anyhow::bail!(
            "`{command}` failed ({status}){}\nits stderr, last {} lines:\n{}",
            if errors.is_empty() {
                String::new()
            } else {
                format!(": {}", errors.join("; "))
            },
            tail.len(),
            indent(&tail)
        );
    }
    Ok(ChildOutput {
        command,
        objects,
        elapsed_secs: started.elapsed().as_secs_f64(),
    })
}

fn indent(lines: &[String]) -> String {
    if lines.is_empty() {
        return "  (empty)".to_owned();
    }
    lines
        .iter()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The figures of `step` at `n` connections in a child's output, which must
/// say it ran as `deployment` when one is given, and on the step's wire.
fn figures_of(
    output: &ChildOutput,
    step: Step,
    n: usize,
    deployment: Option<&str>,
) -> anyhow::Result<Figures> {
    let technique = step.scenario;
    let find = |what: &str| -> anyhow::Result<&Map<String, Value>> {
        let name = format!("{what}, {n} connections");
        output
            .objects
            .iter()
            .find(|o| {
                o.get("scenario").and_then(Value::as_str) == Some(technique)
                    && o.get("name").and_then(Value::as_str) == Some(name.as_str())
            })
            .with_context(|| {
                format!(
                    "`{}` exited successfully but printed no JSON object \
                     {{\"scenario\":\"{technique}\",\"name\":\"{name}\"}} ({} JSON objects found)",
                    output.command,
                    output.objects.len()
                )
            })
    };
    // Null or absent for the ceiling and the all-in-one edges.
    let publisher_cpu =
        |o: &Map<String, Value>| o.get("publisher_cpu_secs").and_then(Value::as_f64);
    let number = |o: &Map<String, Value>, key: &str| -> anyhow::Result<f64> {
        o.get(key).and_then(Value::as_f64).with_context(|| {
            format!(
                "`{}`: no number {key:?} in {}",
                output.command,
                Value::Object(o.clone())
            )
        })
    };
    let (idle, latency, burst) = (find("idle memory")?, find("latency")?, find("saturation")?);
    // The child must have run what it was asked for (its idle object names
    // its wire and its deployment).
    let ran_as_asked = |key: &str, asked: Option<&str>| -> anyhow::Result<()> {
        let Some(asked) = asked else {
            return Ok(());
        };
        let ran = idle.get(key).and_then(Value::as_str);
        anyhow::ensure!(
            ran == Some(asked),
            "`{}` ran {key} {} where {key} {asked} was asked for",
            output.command,
            ran.unwrap_or("(none named)")
        );
        Ok(())
    };
    ran_as_asked("wire", step.wire)?;
    ran_as_asked("deployment", deployment)?;
    Ok(Figures {
        bytes_per_conn: number(idle, "bytes_per_connection")?,
        p50_ms: number(latency, "p50_ms")?,
        p99_ms: number(latency, "p99_ms")?,
        p999_ms: number(latency, "p999_ms")?,
        max_ms: number(latency, "max_ms")?,
        latency_server_cpu_secs: number(latency, "server_cpu_secs")?,
        latency_bench_cpu_secs: number(latency, "bench_cpu_secs")?,
        deliveries_per_sec: number(burst, "deliveries_per_sec")?,
        burst_secs: number(burst, "secs")?,
        server_cpu_secs: number(burst, "server_cpu_secs")?,
        bench_cpu_secs: number(burst, "bench_cpu_secs")?,
        peak_rss_bytes: number(burst, "peak_rss_bytes")?,
        latency_publisher_cpu_secs: publisher_cpu(latency),
        burst_publisher_cpu_secs: publisher_cpu(burst),
        publish_p99_ms: latency.get("publish_p99_ms").and_then(Value::as_f64),
        to_commit_p99_ms: latency.get("to_commit_p99_ms").and_then(Value::as_f64),
        elapsed_secs: output.elapsed_secs,
    })
}

/// `edge / raw`, when `raw` is above zero.
fn ratio(edge: f64, raw: f64) -> Option<f64> {
    (raw > 0.0).then(|| edge / raw)
}

/// The comparison lines of one edge against its ceiling (`ceiling`, as the
/// report names it), at `n` connections.
fn checks(
    technique: &'static str,
    edge: &Figures,
    ceiling: &str,
    raw: &Figures,
    n: usize,
) -> Vec<Check> {
    let deliveries_target = (n == DELIVERIES_TARGET_AT).then_some((">=", DELIVERIES_TARGET));
    vec![
        Check {
            technique,
            key: "deliveries_per_sec_ratio",
            label: format!("{technique}/{ceiling} burst deliveries/s"),
            value: ratio(edge.deliveries_per_sec, raw.deliveries_per_sec),
            ratio: true,
            target: deliveries_target,
        },
        Check {
            technique,
            key: "p99_ratio",
            label: format!("{technique}/{ceiling} latency p99"),
            value: ratio(edge.p99_ms, raw.p99_ms),
            ratio: true,
            target: Some(("<=", P99_TARGET)),
        },
        Check {
            technique,
            key: "p50_ratio",
            label: format!("{technique}/{ceiling} latency p50"),
            value: ratio(edge.p50_ms, raw.p50_ms),
            ratio: true,
            target: None,
        },
        Check {
            technique,
            key: "kib_per_connection",
            label: format!("{technique} KiB/idle conn ({ceiling} {:.1})", raw.kib()),
            value: Some(edge.kib()),
            ratio: false,
            target: Some(("<=", KIB_TARGET)),
        },
        Check {
            technique,
            key: "kib_per_connection_ratio",
            label: format!("{technique}/{ceiling} KiB/idle conn"),
            value: ratio(edge.bytes_per_conn, raw.bytes_per_conn),
            ratio: true,
            target: None,
        },
        Check {
            technique,
            key: "burst_server_cpu_ratio",
            label: format!("{technique}/{ceiling} burst server CPU s"),
            value: ratio(edge.server_cpu_secs, raw.server_cpu_secs),
            ratio: true,
            target: None,
        },
    ]
}

/// `1234567.8` → `1,234,568`.
fn thousands(v: f64) -> String {
    let digits = (v.round().max(0.0) as u64).to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn print_report(args: &Args, bus: &str, reports: &[(usize, [Figures; 4])]) {
    let r3 = |v: f64| (v * 1000.0).round() / 1000.0;
    let labels = STEPS.map(|s| s.label);
    let order = labels.join(", ");
    let deployment = deployment_name(args.distributed);
    println!(
        "\nEdges against the raw ceiling: each scenario in a child process of its own, \
         one after the other (order: {order}), {} run{} each (median), edges {} on the {bus} bus, \
         latency at {} events/s for {} s",
        args.runs,
        if args.runs == 1 { "" } else { "s" },
        if args.distributed {
            "distributed (publisher and edge in processes of their own; \
             memory and server CPU the edge's)"
        } else {
            "all-in-one"
        },
        args.rate,
        args.seconds
    );
    // The publisher's CPU, when the edges have one of their own.
    let publisher_head = if args.distributed {
        format!(" {:>24}", "burst publisher CPU s")
    } else {
        String::new()
    };
    for (n, figures) in reports {
        let n = *n;
        println!("\n{n} connections: absolute figures");
        println!(
            "{:<10} {:>14} {:>8} {:>8} {:>16} {:>18} {:>14} {:>20} {:>19} {:>8}{publisher_head}",
            "technique",
            "KiB/idle conn",
            "p50 ms",
            "p99 ms",
            "publish p99 ms",
            "to commit p99 ms",
            "deliveries/s",
            "burst server CPU s",
            "burst bench CPU s",
            "wall s"
        );
        for (technique, f) in labels.iter().zip(figures) {
            let publisher = match (args.distributed, f.burst_publisher_cpu_secs) {
                (false, _) => String::new(),
                (true, None) => format!(" {:>24}", "-"),
                (true, Some(secs)) => format!(" {secs:>24.2}"),
            };
            let cell = |ms: Option<f64>| ms.map_or_else(|| "-".to_owned(), |ms| format!("{ms:.2}"));
            let (publish, to_commit) = (cell(f.publish_p99_ms), cell(f.to_commit_p99_ms));
            println!(
                "{technique:<10} {:>14.2} {:>8.2} {:>8.2} {publish:>16} {to_commit:>18} {:>14} {:>20.2} {:>19.2} {:>8.1}{publisher}",
                f.kib(),
                f.p50_ms,
                f.p99_ms,
                thousands(f.deliveries_per_sec),
                f.server_cpu_secs,
                f.bench_cpu_secs,
                f.elapsed_secs
            );
        }
        let [raw_sse, sse, raw_ws, ws] = figures;
        let all: Vec<Check> = checks("sse", sse, "raw-sse", raw_sse, n)
            .into_iter()
            .chain(checks("ws", ws, "raw-ws", raw_ws, n))
            .collect();
        println!(
            "\n{n} connections: each edge against the ceiling of its wire (deliveries/s: \
             higher is better; latency, memory, CPU: lower is better)"
        );
        println!(
            "{:<36} {:>9} {:>9} {:>8}",
            "figure", "value", "target", "met"
        );
        for c in &all {
            let value = match (c.value, c.ratio) {
                (None, _) => "n/a".to_owned(),
                (Some(v), true) => format!("{v:.2}×"),
                (Some(v), false) => format!("{v:.1}"),
            };
            let target = match (c.target, c.ratio) {
                (None, _) => "-".to_owned(),
                (Some((op, bound)), ratio) => {
                    let op = if op == ">=" { "≥" } else { "≤" };
                    format!("{op} {bound}{}", if ratio { "×" } else { "" })
                }
            };
            let met = match c.met() {
                Some(true) => "met",
                Some(false) => "NOT MET",
                None => "-",
            };
            println!("{:<36} {value:>9} {target:>9} {met:>8}", c.label);
        }
        if n != DELIVERIES_TARGET_AT {
            println!(
                "(the deliveries/s target, ≥ {DELIVERIES_TARGET}× raw, is stated at \
                 {DELIVERIES_TARGET_AT} connections only)"
            );
        }

        let mut ratios = Map::new();
        for technique in ["sse", "ws"] {
            let fields: Map<String, Value> = all
                .iter()
                .filter(|c| c.technique == technique && c.ratio)
                .map(|c| (c.key.to_owned(), c.value.map(r3).into()))
                .collect();
            ratios.insert(technique.to_owned(), fields.into());
        }
        let targets: Vec<Value> = all
            .iter()
            .filter_map(|c| {
                let (op, bound) = c.target?;
                Some(json!({
                    "technique": c.technique, "figure": c.key,
                    "value": c.value.map(r3), "target": format!("{op} {bound}"),
                    "met": c.met(),
                }))
            })
            .collect();
        let line = json!({
            "scenario": "compare", "name": format!("compare, {n} connections"),
            "connections": n, "runs": args.runs, "rate": args.rate, "seconds": args.seconds, "bus": bus,
            "deployment": deployment,
            "order": labels,
            "raw_sse": raw_sse.to_json(), "sse": sse.to_json(),
            "raw_ws": raw_ws.to_json(), "ws": ws.to_json(),
            "ratios": ratios, "targets": targets,
            "all_targets_met": targets.iter().all(|t| t["met"] == true),
        });
        println!("{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(4_690_123.0), "4,690,123");
    }

    /// What a child that printed `lines` left to read.
    fn child_output(command: &str, lines: &[&str]) -> ChildOutput {
        ChildOutput {
            command: command.to_owned(),
            objects: lines
                .iter()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect(),
            elapsed_secs: 1.0,
        }
    }

    #[test]
    fn figures_are_read_from_json_lines() {
        let lines = [
            r#"{"scenario":"raw","name":"idle memory, 10 connections","bytes_per_connection":2048,"wire":"sse"}"#,
            r#"{"scenario":"raw","name":"latency, 10 connections","p50_ms":1.5,"p99_ms":3.0,"p999_ms":3.5,"max_ms":4.0,"server_cpu_secs":0.1,"bench_cpu_secs":0.2}"#,
            r#"{"scenario":"raw","name":"saturation, 10 connections","deliveries_per_sec":1000,"secs":2.0,"server_cpu_secs":0.3,"bench_cpu_secs":0.4,"peak_rss_bytes":1048576}"#,
        ];
        let output = child_output("rt-bench raw", &lines);
        let f = figures_of(&output, STEPS[0], 10, None).unwrap_or_default();
        assert!((f.kib() - 2.0).abs() < 1e-9);
        assert!((f.p99_ms - 3.0).abs() < 1e-9);
        assert!((f.deliveries_per_sec - 1000.0).abs() < 1e-9);
        assert_eq!(f.burst_publisher_cpu_secs, None);
        assert_eq!(f.publish_p99_ms, None);
        assert_eq!(f.to_commit_p99_ms, None);
        assert!(f.to_json()["to_commit_p99_ms"].is_null());
        assert!(figures_of(&output, STEPS[0], 11, None).is_err());
        assert!(figures_of(&output, STEPS[1], 10, None).is_err());
        // The ceiling of the other wire.
        let err = figures_of(&output, STEPS[2], 10, None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("ran wire sse where wire ws"), "{err}");
    }

    #[test]
    fn an_edge_must_have_run_as_asked_and_its_publisher_cpu_is_read() {
        let lines = [
            r#"{"scenario":"sse","name":"idle memory, 10 connections","bytes_per_connection":2048,"deployment":"distributed"}"#,
            r#"{"scenario":"sse","name":"latency, 10 connections","p50_ms":1.5,"p99_ms":3.0,"p999_ms":3.5,"max_ms":4.0,"server_cpu_secs":0.1,"bench_cpu_secs":0.2,"publisher_cpu_secs":0.25,"publish_p99_ms":1.75,"to_commit_p99_ms":0.625}"#,
            r#"{"scenario":"sse","name":"saturation, 10 connections","deliveries_per_sec":1000,"secs":2.0,"server_cpu_secs":0.3,"bench_cpu_secs":0.4,"peak_rss_bytes":1048576,"publisher_cpu_secs":0.5}"#,
        ];
        let output = child_output("rt-bench sse", &lines);
        let f = figures_of(&output, STEPS[1], 10, Some("distributed")).unwrap_or_default();
        assert_eq!(f.latency_publisher_cpu_secs, Some(0.25));
        assert_eq!(f.burst_publisher_cpu_secs, Some(0.5));
        assert_eq!(f.publish_p99_ms, Some(1.75));
        assert_eq!(f.to_commit_p99_ms, Some(0.625));
        let json = f.to_json();
        assert_eq!(json["publish_p99_ms"], 1.75);
        assert_eq!(json["to_commit_p99_ms"], 0.625);
        let err = figures_of(&output, STEPS[1], 10, Some("all-in-one"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("ran deployment distributed where deployment all-in-one"),
            "{err}"
        );
    }

    fn parse(argv: &[&str]) -> Args {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        use clap::Parser as _;
        Cli::try_parse_from(argv)
            .unwrap_or_else(|e| panic!("{e}"))
            .args
    }

    #[test]
    fn distributed_is_passed_to_the_edges_and_not_to_the_ceiling() {
        let args = parse(&[
            "compare",
            "--distributed",
            "--nats-url",
            "nats://127.0.0.1:4222",
        ]);
        for edge in [STEPS[1], STEPS[3]] {
            let child = child_args(&args, edge, 1000);
            assert_eq!(child[0], edge.scenario);
            assert!(!child.iter().any(|a| a == "--wire"), "{child:?}");
            assert!(child.iter().any(|a| a == "--distributed"), "{child:?}");
            let nats = child.iter().position(|a| a == "--nats-url");
            assert_eq!(
                nats.and_then(|i| child.get(i + 1)).map(String::as_str),
                Some("nats://127.0.0.1:4222"),
                "{child:?}"
            );
        }
        for (ceiling, wire) in [(STEPS[0], "sse"), (STEPS[2], "ws")] {
            let raw = child_args(&args, ceiling, 1000);
            assert!(
                !raw.iter()
                    .any(|a| a == "--distributed" || a == "--nats-url"),
                "{raw:?}"
            );
            assert_eq!(raw[0], "raw");
            let at = raw.iter().position(|a| a == "--wire");
            assert_eq!(
                at.and_then(|i| raw.get(i + 1)).map(String::as_str),
                Some(wire)
            );
        }
        let args = parse(&["compare", "--nats-url", "nats://127.0.0.1:4222"]);
        assert!(
            !child_args(&args, STEPS[1], 1000)
                .iter()
                .any(|a| a == "--distributed")
        );
    }

    #[test]
    fn the_latency_scenario_s_rate_and_length_are_passed_to_all_four() {
        let value = |child: &[String], flag: &str| {
            let at = child.iter().position(|a| a == flag);
            at.and_then(|i| child.get(i + 1)).cloned()
        };
        let args = parse(&["compare", "--rate", "100", "--seconds", "20"]);
        for step in STEPS {
            let child = child_args(&args, step, 1000);
            assert_eq!(value(&child, "--rate").as_deref(), Some("100"), "{child:?}");
            assert_eq!(
                value(&child, "--seconds").as_deref(),
                Some("20"),
                "{child:?}"
            );
        }
        let child = child_args(&parse(&["compare"]), STEPS[0], 1000);
        assert_eq!(
            value(&child, "--seconds").as_deref(),
            Some("5"),
            "{child:?}"
        );
    }

    #[test]
    fn targets_compare_in_the_right_direction() {
        let raw = Figures {
            bytes_per_conn: 2048.0,
            p99_ms: 10.0,
            deliveries_per_sec: 1000.0,
            ..Figures::default()
        };
        let edge = Figures {
            bytes_per_conn: 13.0 * 1024.0,
            p99_ms: 18.0,
            deliveries_per_sec: 600.0,
            ..Figures::default()
        };
        let c = checks("sse", &edge, "raw-sse", &raw, 1000);
        let met = |key: &str| c.iter().find(|c| c.key == key).and_then(Check::met);
        assert_eq!(met("deliveries_per_sec_ratio"), Some(true));
        assert_eq!(met("p99_ratio"), Some(true));
        assert_eq!(met("kib_per_connection"), Some(false));
        assert_eq!(met("p50_ratio"), None);
        let c = checks("sse", &edge, "raw-sse", &raw, 10);
        assert_eq!(c[0].met(), None);
    }
}
