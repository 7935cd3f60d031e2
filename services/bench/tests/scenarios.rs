//! `rt-bench` end to end, small. `sse` and `ws` start the all-in-one
//! `realtime` built beside the bench (the workspace's test build has it),
//! over a database of their own on the test Postgres and over NATS, and
//! their clients must read every event of every scenario exactly once;
//! `raw` runs the ceiling of each wire, and `poll` its routes in-process,
//! next to its long-poll ceiling.

use std::process::Command;

use serde_json::Value;

/// Runs `rt-bench <scenario>` on 20 connections, one run, publishing in
/// batches of 50, against the test Postgres and NATS, and returns its JSON
/// lines by scenario name (`latency`, `saturation`, ...).
fn run(scenario: &str) -> Vec<(String, Value)> {
    let services = [
        "--batch",
        "50",
        "--database-url",
        &rt_tests::postgres_admin_url(),
        "--nats-url",
        &rt_tests::nats_url(),
    ]
    .map(str::to_owned);
    run_with(&[scenario], &services)
}

/// Runs `rt-bench <head>` small, then `tail`, and returns its JSON lines
/// by scenario name.
fn run_with(head: &[&str], tail: &[String]) -> Vec<(String, Value)> {
    let small = [
        "--connections",
        "20",
        "--runs",
        "1",
        "--rate",
        "50",
        "--seconds",
        "1",
        "--burst",
        "200",
        "--settle-ms",
        "100",
        "--timeout",
        "60",
        "--quiet",
    ]
    .map(str::to_owned);
    let args: Vec<String> = head
        .iter()
        .map(|a| (*a).to_owned())
        .chain(small)
        .chain(tail.iter().cloned())
        .collect();
    bench(&args)
        .into_iter()
        .map(|v| {
            let name = v["name"].as_str().unwrap_or_default();
            (name.split(',').next().unwrap_or_default().to_owned(), v)
        })
        .collect()
}

/// Runs `rt-bench args`, which must succeed, and returns the JSON lines it
/// printed.
fn bench(args: &[String]) -> Vec<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_rt-bench"))
        .args(args)
        .output()
        .expect("rt-bench runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "rt-bench {} failed ({}); if Postgres or NATS is not running, \
         `bash scripts/test.sh` starts them:\n{stderr}\n{stdout}",
        args.join(" "),
        out.status
    );
    stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn figure<'a>(lines: &'a [(String, Value)], name: &str) -> &'a Value {
    lines
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("no {name:?} line in {lines:?}"))
}

/// What both edges' reports must show: latencies measured, a burst
/// delivered, and none of the `reconnects` counted (nothing closed or broken
/// on the way).
fn check_common(lines: &[(String, Value)], reconnects: [&str; 2]) {
    let idle = figure(lines, "idle memory");
    assert_eq!(idle["connections"], 20, "{idle}");
    let latency = figure(lines, "latency");
    assert_eq!(latency["events"], 50, "{latency}");
    let (p50, p99) = (latency["p50_ms"].as_f64(), latency["p99_ms"].as_f64());
    assert!(
        p50.is_some_and(|p| p > 0.0) && p99 >= p50,
        "latency percentiles: {latency}"
    );
    assert!(latency["publish_p99_ms"].as_f64() > Some(0.0), "{latency}");
    // Sent -> commit: read from the events' commit stamps, never negative.
    let to_commit = ["to_commit_p50_ms", "to_commit_p99_ms", "to_commit_max_ms"]
        .map(|key| latency[key].as_f64());
    assert!(
        to_commit[0] >= Some(0.0) && to_commit[1] >= to_commit[0] && to_commit[2] >= to_commit[1],
        "sent -> commit: {latency}"
    );
    let burst = figure(lines, "saturation");
    assert!(burst["deliveries_per_sec"].as_f64() > Some(0.0), "{burst}");
    for counted in reconnects {
        assert_eq!(burst[counted], 0, "{counted}: {burst}");
    }
}

#[test]
fn ws_reads_every_event_on_every_socket() {
    let lines = run("ws");
    check_common(
        &lines,
        ["sockets_closed_and_resumed", "sockets_broken_and_resumed"],
    );
    let acks = figure(&lines, "publish ack");
    assert!(acks["publishes_per_sec"].as_f64() > Some(0.0), "{acks}");
}

#[test]
fn sse_reads_every_event_on_every_stream() {
    let lines = run("sse");
    check_common(
        &lines,
        ["streams_ended_and_resumed", "streams_broken_and_resumed"],
    );
}

#[test]
fn the_ceiling_of_each_wire_is_read_whole_by_its_edges_client() {
    for wire in ["sse", "ws"] {
        let lines = run_with(&["raw", "--wire", wire], &[]);
        let burst = figure(&lines, "saturation");
        assert_eq!(burst["wire"], wire, "{burst}");
        assert!(burst["deliveries_per_sec"].as_f64() > Some(0.0), "{burst}");
        let latency = figure(&lines, "latency");
        assert!(latency["p99_ms"].as_f64() > Some(0.0), "{latency}");
        // Its frames carry no commit stamp.
        assert!(latency.get("to_commit_p99_ms").is_none(), "{latency}");
    }
}

#[test]
fn poll_reports_the_wake_up_and_the_publish_it_waited_for() {
    let args = [
        "poll",
        "--waiters",
        "20",
        "--events",
        "20",
        "--runs",
        "1",
        "--settle-ms",
        "300",
        "--quiet",
        "--database-url",
        &rt_tests::postgres_admin_url(),
    ]
    .map(str::to_owned);
    let lines = bench(&args);
    let v = lines.first().unwrap_or_else(|| panic!("no JSON line"));
    let (p50, p99) = (v["wake_p50_ms"].as_f64(), v["wake_p99_ms"].as_f64());
    assert!(p50.is_some_and(|p| p > 0.0) && p99 >= p50, "{v}");
    let (publish_p50, publish_p99) = (v["publish_p50_ms"].as_f64(), v["publish_p99_ms"].as_f64());
    assert!(
        publish_p50.is_some_and(|p| p > 0.0) && publish_p99 >= publish_p50,
        "{v}"
    );
    assert_eq!(v["empty_polls"], 0, "{v}");
    // The ceiling ran on the same waiters, and the ratios are of it.
    let ceiling = &v["ceiling"];
    let ceiling_p99 = ceiling["wake_p99_ms"].as_f64();
    assert!(ceiling_p99.is_some_and(|p| p > 0.0), "{v}");
    assert_eq!(
        ceiling["events_per_poll"].as_f64().map(|e| e >= 1.0),
        Some(true),
        "{v}"
    );
    let ratio = v["vs_ceiling"]["wake_p99"].as_f64();
    let expected = p99.zip(ceiling_p99).map(|(p, c)| p / c);
    assert!(
        ratio
            .zip(expected)
            .is_some_and(|(r, e)| (r - e).abs() < 0.01),
        "{v}"
    );
    assert!(v["wake_p99_target_met"].is_boolean(), "{v}");
    // The server's events carry their commit stamp; the ceiling's a fixed one.
    let to_commit = v["to_commit_p99_ms"].as_f64();
    assert!(
        to_commit.is_some_and(|t| t > 0.0) && to_commit <= p99,
        "{v}"
    );
    assert!(ceiling["to_commit_p99_ms"].is_null(), "{v}");
    // Each event's first waiter is no later than the latest delivery.
    let (first_p50, first_max) = (v["first_p50_ms"].as_f64(), v["first_max_ms"].as_f64());
    assert!(
        first_p50.is_some_and(|f| f > 0.0) && first_max >= first_p50,
        "{v}"
    );
    assert!(first_max <= v["wake_max_ms"].as_f64(), "{v}");
}
