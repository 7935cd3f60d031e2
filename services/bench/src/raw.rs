//! The raw ceiling: what a minimal tokio server gets out of this machine
//! writing the same pre-encoded frame to N loopback sockets, with no
//! protocol logic, so that the edges' figures can be given as a ratio of it.
//! It writes either edge's wire (`--wire sse`, the default, or `--wire ws`),
//! read by the same client code as that edge, so that each edge is held to
//! a ceiling whose client costs what its own does.
//!
//! The ceiling server is `rt-bench raw-server` (hidden), run by `rt-bench raw`
//! as a process of its own so that its memory and CPU are measured apart from
//! the bench's. It listens on a free loopback port and serves:
//!
//! - with `--wire sse`, `GET /stream`: answers `200` with
//!   `text/event-stream`, then writes every frame broadcast after it;
//! - with `--wire ws`, `GET /ws`: answers the WebSocket handshake (`101`),
//!   waits for the client's first frame (the subscription; its content is
//!   not read) and answers it with the ack the edge sends, then writes every
//!   frame broadcast after it;
//! - `POST /rate?frames=F&per_sec=R` and `POST /burst?frames=F`: broadcasts F
//!   frames, R per second or as fast as it can, then answers `204`.
//!
//! One tokio task per socket, fed by a `tokio::sync::broadcast` of `Bytes`:
//! the frames that are ready when the task wakes, at most `--coalesce`, go
//! out in one write. A frame is encoded once and its bytes go to every
//! socket, shaped and sized like the edge's: for SSE
//! `id: raw:<seq>\nevent: message\ndata: {...}\n\n` (the data with `topic`,
//! `seq`, `type`, `data.sent_us`, `time`), for WebSockets a text frame of
//! `{"op":"event",...}` with the same fields. A socket that falls more than
//! `--queue` frames behind is closed.
//!
//! The bench measures what `rt-bench sse` and `rt-bench ws` do, with the
//! same defaults: idle memory per socket, latency at a fixed rate (send time
//! stamped in the frame → frame parsed by the client, every seq exactly once
//! and in order), and deliveries per second under a burst.

use std::{
    path::Path,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use bytes::Bytes;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{Mutex, Semaphore, broadcast, mpsc::unbounded_channel},
    task::JoinSet,
};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::{
    http1::{header_value, query_param},
    server::{
        self, Burst, CpuMark, Drops, Fanout, Firsts, Idle, Msg, Outcome, Server, each_count,
        ensure_all_ran, gather, gather_last_done, gather_latencies, latency_events, mib, now_us,
        open_files_limit, print_json_lines, publisher_client, r3, spawn_clients,
    },
    sse_client, ws, ws_client,
};

/// Which edge's wire the ceiling writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Wire {
    /// Server-Sent Events in a chunked body, as sse-edge writes them.
    Sse,
    /// WebSocket text frames, as ws-edge writes them.
    Ws,
}

impl Wire {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Wire::Sse => "sse",
            Wire::Ws => "ws",
        }
    }
}

/// The topic of the ceiling's frames.
const TOPIC: &str = "raw";

/// The response head of a stream.
/// The response head of a stream: chunked, as the edge's, so that the bench
/// reads both with the same code.
const STREAM_HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Socket counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    connections: Vec<usize>,
    /// Sockets being opened at once.
    #[arg(long, default_value_t = 200)]
    open_concurrency: usize,
    /// Pause between the last socket opening and the second memory reading,
    /// in milliseconds.
    #[arg(long, default_value_t = 2000)]
    settle_ms: u64,
    /// Frames per second in the latency scenario.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Seconds of sending in the latency scenario.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Frames in the saturation burst.
    #[arg(long, default_value_t = 2000)]
    burst: u64,
    /// The server's broadcast queue, in frames: a socket further behind is
    /// closed (and the run fails).
    #[arg(long, default_value_t = 4096)]
    queue: usize,
    /// Most frames a socket task writes at once (1: one write per frame).
    #[arg(long, default_value_t = 64)]
    coalesce: usize,
    /// Longest wait, in seconds, for all sockets to open, or to get the last
    /// frame of a scenario after its last send.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Runs per connection count; the median of each figure is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// The wire written and read: SSE (the `sse` edge's) or WebSocket
    /// frames (the `ws` edge's).
    #[arg(long, value_enum, default_value_t = Wire::Sse)]
    wire: Wire,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
}

/// The ceiling server's arguments (`rt-bench raw-server`).
#[derive(clap::Args)]
pub(crate) struct ServerArgs {
    /// The wire it writes.
    #[arg(long, value_enum, default_value_t = Wire::Sse)]
    wire: Wire,
    /// Broadcast queue, in frames.
    #[arg(long, default_value_t = 4096)]
    queue: usize,
    /// Most frames a socket task writes at once.
    #[arg(long, default_value_t = 64)]
    coalesce: usize,
}

// ---------------------------------------------------------------- server --

/// The ceiling server: runs until killed.
pub(crate) async fn serve(args: ServerArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.queue > 0 && args.coalesce > 0,
        "--queue and --coalesce must be at least 1"
    );
    let (coalesce, wire) = (args.coalesce, args.wire);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    println!("listening on http://{}", listener.local_addr()?);
    let (frames, _) = broadcast::channel::<Bytes>(args.queue);
    // The next seq; held while frames are sent, so sends never interleave.
    let next = Arc::new(Mutex::new(1u64));
    loop {
        let socket = match listener.accept().await {
            Ok((socket, _)) => socket,
            Err(e) => {
                // Out of descriptors, most likely: say so, and go on.
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let (frames, next) = (frames.clone(), next.clone());
        tokio::spawn(async move {
            if let Err(e) = connection(socket, &frames, &next, coalesce, wire).await {
                eprintln!("connection: {e:#}");
            }
        });
    }
}

/// One connection: a stream or a send request.
async fn connection(
    mut socket: TcpStream,
    frames: &broadcast::Sender<Bytes>,
    next: &Mutex<u64>,
    coalesce: usize,
    wire: Wire,
) -> anyhow::Result<()> {
    socket.set_nodelay(true)?;
    let head = read_head(&mut socket).await?;
    let line = head.lines().next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let param = |name: &str| -> anyhow::Result<f64> {
        query_param(query, name)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{line}: no {name}"))
    };
    match (method, path) {
        ("GET", "/stream") if wire == Wire::Sse => {
            // Subscribed before the head goes out: a client that has the head
            // gets every frame sent after it.
            let mut rx = frames.subscribe();
            socket.write_all(STREAM_HEAD).await?;
            let mut buf = Vec::new();
            loop {
                // One HTTP chunk per write, as the edge's body chunks.
                buf.clear();
                buf.extend_from_slice(b"0000\r\n");
                // Too far behind (or the server is going): close.
                if !take_ready(&mut rx, coalesce, &mut buf).await {
                    return Ok(());
                }
                let size = buf.len() - 6;
                anyhow::ensure!(size <= 0xffff, "a chunk of {size} bytes: lower --coalesce");
                buf[..4].copy_from_slice(format!("{size:04x}").as_bytes());
                buf.extend_from_slice(b"\r\n");
                socket.write_all(&buf).await?;
            }
        }
        ("GET", "/ws") if wire == Wire::Ws => {
            let key = header_value(&head, "sec-websocket-key")
                .with_context(|| format!("{line}: no Sec-WebSocket-Key"))?;
            // Subscribed before the ack goes out: a client that has the ack
            // gets every frame sent after it.
            let mut rx = frames.subscribe();
            // Boxed: what the handshake holds is freed before the socket
            // idles, and the task of an SSE socket holds none of it.
            Box::pin(ws_handshake(&mut socket, key)).await?;
            let mut buf = Vec::new();
            loop {
                buf.clear();
                if !take_ready(&mut rx, coalesce, &mut buf).await {
                    return Ok(());
                }
                socket.write_all(&buf).await?;
            }
        }
        ("POST", "/rate" | "/burst") => {
            let count = param("frames")? as u64;
            let mut next = next.lock().await;
            if path == "/rate" {
                let per_sec = param("per_sec")?;
                anyhow::ensure!(per_sec > 0.0, "{line}: per_sec must be positive");
                let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_sec));
                for _ in 0..count {
                    tick.tick().await;
                    let _ = frames.send(frame(wire, *next, now_us()));
                    *next += 1;
                }
            } else {
                for _ in 0..count {
                    let _ = frames.send(frame(wire, *next, now_us()));
                    *next += 1;
                }
            }
            drop(next);
            socket
                .write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
                .await?;
            Ok(())
        }
        _ => {
            socket
                .write_all(
                    b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                )
                .await?;
            Ok(())
        }
    }
}

/// Reads up to the end of a request head (the bytes after it are ignored).
async fn read_head(socket: &mut TcpStream) -> anyhow::Result<String> {
    let mut head = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        anyhow::ensure!(head.len() < 8192, "request head over 8 KiB");
        let n = socket.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "connection closed in the request head");
        head.extend_from_slice(&chunk[..n]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// Appends the frames at hand to `buf`: the next one (waited for), then
/// those already queued, `coalesce` at most; false when the socket fell too
/// far behind or the server is going.
async fn take_ready(
    rx: &mut broadcast::Receiver<Bytes>,
    coalesce: usize,
    buf: &mut Vec<u8>,
) -> bool {
    let Ok(frame) = rx.recv().await else {
        return false;
    };
    buf.extend_from_slice(&frame);
    for _ in 1..coalesce {
        match rx.try_recv() {
            Ok(more) => buf.extend_from_slice(&more),
            Err(broadcast::error::TryRecvError::Empty) => break,
            Err(_) => return false,
        }
    }
    true
}

/// Answers a WebSocket handshake whose key is `key`, waits for the client's
/// subscription (its content does not matter) and answers it with the ack
/// the edge sends.
async fn ws_handshake(socket: &mut TcpStream, key: &str) -> anyhow::Result<()> {
    let accept = derive_accept_key(key.as_bytes());
    let head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\
         connection: Upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n"
    );
    socket.write_all(head.as_bytes()).await?;
    let mut scratch = [0u8; 512];
    anyhow::ensure!(
        socket.read(&mut scratch).await? > 0,
        "closed before subscribing"
    );
    let ack = format!(r#"{{"op":"ack","ref":"s","topic":"{TOPIC}","after":0}}"#);
    socket.write_all(&ws_text(ack.as_bytes())).await?;
    Ok(())
}

/// Frame `seq`, stamped with `sent_us`, shaped and sized like the edge's on
/// `wire`.
fn frame(wire: Wire, seq: u64, sent_us: u64) -> Bytes {
    let fields = event_fields(TOPIC, seq, sent_us);
    match wire {
        Wire::Sse => Bytes::from(format!(
            "id: {TOPIC}:{seq}\nevent: message\ndata: {{{fields}}}\n\n"
        )),
        Wire::Ws => ws_text(format!("{{\"op\":\"event\",{fields}}}").as_bytes()).into(),
    }
}

/// The fields of event `seq` of `topic`, stamped with `sent_us`, as the
/// edges encode an event (without the braces around them).
pub(crate) fn event_fields(topic: &str, seq: u64, sent_us: u64) -> String {
    format!(
        "\"topic\":\"{topic}\",\"seq\":{seq},\"type\":\"message\",\
         \"data\":{{\"sent_us\":{sent_us}}},\"time\":\"2026-11-28T12:00:00.000000Z\""
    )
}

/// A server's (unmasked) WebSocket text frame of `text`.
fn ws_text(text: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(text.len() + 10);
    ws_client::put_frame_head(&mut frame, ws_client::TEXT, text.len(), false);
    frame.extend_from_slice(text);
    frame
}

// ----------------------------------------------------------------- bench --

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
        args.burst > 0 && args.open_concurrency > 0 && args.coalesce > 0,
        "--burst, --open-concurrency and --coalesce must be at least 1"
    );
    let latency_events = latency_events(args.rate, args.seconds);
    anyhow::ensure!(
        args.queue as u64 >= latency_events + args.burst,
        "--queue ({}) is below the frames of a run ({}): sockets would be closed",
        args.queue,
        latency_events + args.burst
    );
    let exe = std::env::current_exe().context("cannot find the rt-bench executable")?;
    if let Some(limit) = open_files_limit() {
        let most = args.connections.iter().max().copied().unwrap_or(0);
        if limit < most as u64 + 100 {
            eprintln!(
                "warning: the open-file limit is {limit}; {most} sockets need about {} descriptors \
                 in the bench and as many in the server (raise it with `ulimit -n`)",
                most + 100
            );
        }
    }
    let results = each_count(
        &args.connections,
        args.runs,
        |n, _| one_run(&exe, &args, n),
        |at, f, _| {
            if !args.quiet {
                eprintln!(
                    "{at}: opened in {:.1} s, {:.1} KiB/connection idle; \
                     latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; burst {:.0} deliveries/s",
                    f.open_secs,
                    f.bytes_per_conn / 1024.0,
                    f.p50_ms,
                    f.p99_ms,
                    f.max_ms,
                    f.deliveries_per_sec,
                );
            }
        },
        |runs| Fanout::medians(runs, |f| f),
    )
    .await;
    print_report(&args, &results);
    ensure_all_ran(&results)
}

/// One run with `n` sockets, on a ceiling server process of its own.
async fn one_run(exe: &Path, args: &Args, n: usize) -> anyhow::Result<(Fanout, Firsts)> {
    let exe = exe.to_owned();
    let server_args = vec![
        "raw-server".to_owned(),
        "--wire".to_owned(),
        args.wire.name().to_owned(),
        "--queue".to_owned(),
        args.queue.to_string(),
        "--coalesce".to_owned(),
        args.coalesce.to_string(),
    ];
    let mut server =
        tokio::task::spawn_blocking(move || Server::start_with_args(&exe, &server_args, &[]))
            .await??;
    let mut sockets = JoinSet::new();
    let result = measure(&server, args, n, &mut sockets).await;
    sockets.shutdown().await;
    // No reconnects to report: a socket the server closes fails the run.
    let figure = result.map_err(|e| server.explain(e))?;
    Ok((figure, Firsts::default()))
}

/// The three scenarios, in order, on `n` sockets.
async fn measure(
    server: &Server,
    args: &Args,
    n: usize,
    sockets: &mut JoinSet<()>,
) -> anyhow::Result<Fanout> {
    let addr = server.addr()?;
    let latency_events = latency_events(args.rate, args.seconds);
    let last_seq = latency_events + args.burst;
    let deadline = Duration::from_secs(args.timeout);

    // 1. Idle memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = server.status_kib("VmRSS")? * 1024;
    let gate = Arc::new(Semaphore::new(args.open_concurrency));
    let (tx, mut rx) = unbounded_channel();
    let opening = Instant::now();
    // A socket the server closes fails the run: the ceiling has no
    // reconnects to report.
    let drops = Arc::new(Drops::default());
    match args.wire {
        Wire::Sse => {
            let plan = Arc::new(sse_client::Plan {
                addr,
                path: "/stream".to_owned(),
                topic: TOPIC.to_owned(),
                latency_events,
                last_seq,
                retry_first: false,
                // The frames' `time` is a fixed dummy.
                commit_stamped: false,
            });
            spawn_clients(sockets, n, "socket", &tx, |_| {
                let (plan, gate, tx) = (plan.clone(), gate.clone(), tx.clone());
                async move { sse_client::follow(&plan, &gate, None, &tx).await }
            });
        }
        Wire::Ws => {
            // The frames' `time` is a fixed dummy: not commit stamped.
            let plan = Arc::new(ws::Plan::new(
                addr,
                "/ws",
                TOPIC,
                latency_events,
                last_seq,
                false,
            ));
            spawn_clients(sockets, n, "socket", &tx, |_| {
                let (plan, gate, drops, tx) =
                    (plan.clone(), gate.clone(), drops.clone(), tx.clone());
                async move { ws::follow(&plan, &gate, &drops, &tx).await }
            });
        }
    }
    drop(tx);
    gather(&mut rx, n, "sockets", deadline, "opened", |msg| match msg {
        Msg::Opened => Ok(()),
        _ => anyhow::bail!("a socket got a frame before any was sent"),
    })
    .await?;
    let open_secs = opening.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(args.settle_ms)).await;
    let rss_after = server.status_kib("VmRSS")? * 1024;

    // 2. Latency at a fixed rate (the server paces and stamps the frames).
    let control = publisher_client(1)?;
    let cpu = CpuMark::now(server)?;
    let res = control
        .post(server.url(&format!(
            "/rate?frames={latency_events}&per_sec={}",
            args.rate
        )))
        .send()
        .await?;
    anyhow::ensure!(res.status() == 204, "/rate answered {}", res.status());
    let latencies = gather_latencies(
        &mut rx,
        n,
        "sockets",
        deadline,
        "got the last latency frame",
        latency_events,
        false,
    )
    .await?;
    let latency_cpu = cpu.used(server)?;

    // 3. Saturation.
    let cpu = CpuMark::now(server)?;
    let started = Instant::now();
    let res = control
        .post(server.url(&format!("/burst?frames={}", args.burst)))
        .send()
        .await?;
    anyhow::ensure!(res.status() == 204, "/burst answered {}", res.status());
    let last_done = gather_last_done(
        &mut rx,
        n,
        "sockets",
        deadline,
        "got the last burst frame",
        started,
    )
    .await?;
    let burst_cpu = cpu.used(server)?;
    let reopened = drops.closed.load(Ordering::Relaxed) + drops.broken.load(Ordering::Relaxed);
    anyhow::ensure!(
        reopened == 0,
        "{reopened} socket(s) were closed or broke and were reopened (first: {:?} {:?})",
        drops.first_close.lock().unwrap_or_else(|e| e.into_inner()),
        drops.first_error.lock().unwrap_or_else(|e| e.into_inner())
    );

    Ok(Fanout::measured(
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
    ))
}

fn print_report(args: &Args, results: &[Outcome<Fanout>]) {
    let latency_events = latency_events(args.rate, args.seconds);
    println!(
        "\nRaw ceiling ({} wire): one pre-encoded frame per send to every socket, no protocol \
         logic, server in its own process, median of {} runs (each figure on its own)",
        args.wire.name(),
        args.runs.max(1)
    );
    let table = |title: String, head: String, row: &dyn Fn(&Fanout) -> String| {
        server::table(results, &title, &head, row);
    };
    table(
        format!(
            "idle memory (server VmRSS, {} ms after the last socket opened)",
            args.settle_ms
        ),
        Fanout::idle_head(),
        &|f| f.idle_row(),
    );
    table(
        format!(
            "latency: {latency_events} frames at {}/s, send stamped by the server -> frame parsed by the client",
            args.rate
        ),
        Fanout::latency_head(),
        &|f| f.latency_row(),
    );
    table(
        format!(
            "saturation: burst of {} frames as fast as the server sends them, \
             at most {} per write",
            args.burst, args.coalesce
        ),
        format!(
            "{:<12} {:>13} {:>8} {:>13} {:>12} {:>13}",
            "connections", "deliveries/s", "secs", "server CPU s", "bench CPU s", "peak RSS MiB"
        ),
        &|f| {
            format!(
                "{:>13.0} {:>8.2} {:>13.2} {:>12.2} {:>13.1}",
                f.deliveries_per_sec,
                f.burst_secs,
                f.server_cpu_secs,
                f.bench_cpu_secs,
                mib(f.peak_rss)
            )
        },
    );
    for o in results {
        if let Err(e) = &o.result {
            println!("\n{} connections FAILED: {e}", o.n);
        }
    }

    for o in results {
        let n = o.n;
        let common = json!({"connections": n, "runs": args.runs.max(1), "wire": args.wire.name()});
        let lines = match &o.result {
            Ok(f) => vec![
                f.idle_json(
                    "raw",
                    format!("idle memory, {n} connections"),
                    args.settle_ms,
                ),
                f.latency_json(
                    "raw",
                    format!("latency, {n} connections"),
                    latency_events,
                    args.rate,
                ),
                json!({
                    "scenario": "raw", "name": format!("saturation, {n} connections"),
                    "deliveries_per_sec": f.deliveries_per_sec.round() as u64,
                    "secs": r3(f.burst_secs),
                    "server_cpu_secs": r3(f.server_cpu_secs), "bench_cpu_secs": r3(f.bench_cpu_secs),
                    "peak_rss_bytes": f.peak_rss.round() as u64,
                    "burst": args.burst, "queue": args.queue, "coalesce": args.coalesce,
                }),
            ],
            Err(e) => vec![json!({
                "scenario": "raw", "name": format!("{n} connections"), "error": e,
            })],
        };
        print_json_lines(&common, lines);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_frames_are_text_frames_of_event_json_read_up_to_their_seq() {
        let f = frame(Wire::Ws, 1234, 1_795_000_000_123_456);
        // 126: a 16-bit length follows, the frame being over 125 bytes.
        assert_eq!((f[0], f[1]), (0x81, 126), "a final, unmasked text frame");
        let (len, text) = (usize::from(u16::from_be_bytes([f[2], f[3]])), &f[4..]);
        assert_eq!(len, text.len());
        assert!((120..200).contains(&len), "{len} bytes");
        let json: serde_json::Value = serde_json::from_slice(text).unwrap();
        assert_eq!(json["op"], "event");
        assert_eq!(json["topic"], TOPIC);
        assert_eq!(json["type"], "message");
        assert_eq!(json["data"]["sent_us"], 1_795_000_000_123_456u64);
        // Begun as the edge's are: the bench reads it as it reads theirs.
        assert_eq!(ws::quick_seq(text, &ws::event_start(TOPIC)), Some(1234));
        let long = ws_text(&[b'x'; 300]);
        assert_eq!(&long[..4], &[0x81, 126, 0x01, 0x2C]);
    }

    #[test]
    fn frames_are_sse_events_shaped_and_sized_like_the_edge() {
        let f = frame(Wire::Sse, 1234, 1_795_000_000_123_456);
        assert!(f.ends_with(b"\n\n"));
        assert!((120..200).contains(&f.len()), "{} bytes", f.len());
        let mut data = Vec::new();
        let block = crate::sse_client::parse_block(&f[..f.len() - 1], &mut data).unwrap();
        assert_eq!(block.id, Some("raw:1234"));
        assert_eq!(block.event, Some("message"));
        let json: serde_json::Value = serde_json::from_slice(block.data.unwrap()).unwrap();
        assert_eq!(json["topic"], "raw");
        assert_eq!(json["seq"], 1234);
        assert_eq!(json["data"]["sent_us"], 1_795_000_000_123_456u64);
    }
}
