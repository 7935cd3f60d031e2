//! The bench's Server-Sent Events client, shared by the `sse` and `raw`
//! scenarios so that the edge and the ceiling are read by the same code.
//!
//! Client and server share the machine's two cores, so whatever the client
//! spends per event is taken from the server. A general-purpose client
//! (an HTTP library and an SSE parser allocating a string per field) costs
//! several times what the edge spends producing the event, which made the
//! bench, not the server, the limit of the burst. This one holds one socket
//! and three reused buffers per stream and allocates nothing per event:
//!
//! - HTTP/1.1 by hand: one `GET`, the response head checked (status,
//!   `content-type: text/event-stream`), then the body decoded from
//!   `transfer-encoding: chunked` (what the edge sends, and the ceiling too)
//!   or read as is until the server closes;
//! - SSE as the spec reads it: blocks end at a blank line, `field: value`
//!   lines (`id`, `event`, `data` (several joined with `\n`), `retry`),
//!   comments (`:`) ignored, `\r\n` line ends accepted.

use std::{net::SocketAddr, time::Instant};

use anyhow::Context as _;
use serde::Deserialize;
use tokio::{
    io::AsyncReadExt,
    net::TcpStream,
    sync::{Semaphore, mpsc::UnboundedSender},
    time::{Duration, timeout},
};

use crate::{
    http1::{Opened, READ},
    server::{Drops, Latencies, Msg, now_us},
};

/// Longest response head or chunk-size line accepted.
const LONGEST_LINE: usize = 16 * 1024;

/// Where the chunked decoder is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Chunk {
    /// Reading a chunk-size line.
    Size,
    /// This many bytes of chunk data to go.
    Data(usize),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer lines after the last (empty) chunk.
    Trailer,
    /// The body is complete.
    Done,
}

/// One open event stream.
pub(crate) struct SseStream {
    socket: TcpStream,
    /// `None` for a body read until the server closes.
    chunk: Option<Chunk>,
    /// Bytes read and not yet decoded.
    wire: Vec<u8>,
    /// The decoded body; events are cut from `body[start..]`.
    body: Vec<u8>,
    start: usize,
    /// Where to look for the next blank line (`body[..scan]` has none past `start`).
    scan: usize,
    /// An event's data, joined from its `data` lines.
    data: Vec<u8>,
    /// The body ended (server closed, or the last chunk came).
    ended: bool,
}

/// One SSE block; fields it did not have are `None` (a comment-only block,
/// a keep-alive, has none).
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Block<'a> {
    pub(crate) id: Option<&'a str>,
    pub(crate) event: Option<&'a str>,
    pub(crate) data: Option<&'a [u8]>,
    pub(crate) retry: Option<&'a str>,
}

impl SseStream {
    /// Connects to `addr`, sends `GET path` with `headers`, and checks the
    /// answer is a 200 event stream; any other answer is an error carrying
    /// its status line and the start of its body.
    pub(crate) async fn open(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<SseStream> {
        let mut request =
            format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\naccept: text/event-stream\r\n");
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        let opened = Opened::request(addr, &request).await?;
        let head = opened.head()?;
        if head.status != 200 {
            anyhow::bail!("{}", opened.refusal().await);
        }
        anyhow::ensure!(
            head.content_type.starts_with("text/event-stream"),
            "{} with content type {:?}, not text/event-stream",
            head.status_line,
            head.content_type
        );
        let chunked = head.chunked();
        let Opened {
            socket,
            mut wire,
            head_end,
        } = opened;
        wire.drain(..head_end);
        let mut stream = SseStream {
            socket,
            chunk: chunked.then_some(Chunk::Size),
            wire,
            body: Vec::with_capacity(READ),
            start: 0,
            scan: 0,
            data: Vec::new(),
            ended: false,
        };
        stream.decode()?;
        Ok(stream)
    }

    /// The next block, or `None` once the server ended the stream (a
    /// partial block left at the end is an error). A read error is returned
    /// as is, so the caller can tell a broken connection from a bad stream
    /// with [`is_transport`].
    pub(crate) async fn next(&mut self) -> anyhow::Result<Option<Block<'_>>> {
        let (from, to) = loop {
            let look = self.scan.max(self.start);
            if let Some((end, next)) = blank_line(&self.body[look..]) {
                let block = (self.start, look + end);
                self.start = look + next;
                self.scan = self.start;
                break block;
            }
            self.scan = self.body.len().saturating_sub(2).max(self.start);
            if self.ended {
                anyhow::ensure!(
                    self.start == self.body.len(),
                    "the stream ended inside a block: {:?}",
                    String::from_utf8_lossy(&self.body[self.start..])
                );
                return Ok(None);
            }
            self.fill().await?;
        };
        parse_block(&self.body[from..to], &mut self.data).map(Some)
    }

    /// Reads from the socket once and decodes what came.
    async fn fill(&mut self) -> anyhow::Result<()> {
        // Move the unread part of the body to the front before it grows.
        if self.start > 0 {
            self.body.drain(..self.start);
            self.scan -= self.start.min(self.scan);
            self.start = 0;
        }
        let read = read_more(&mut self.socket, &mut self.wire).await?;
        if read == 0 {
            anyhow::ensure!(
                self.chunk.is_none() || self.chunk == Some(Chunk::Done),
                TransportError(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the connection closed inside the chunked body"
                ))
            );
            self.ended = true;
            return Ok(());
        }
        self.decode()
    }

    /// Moves what `wire` holds into `body`, undoing the chunked framing.
    fn decode(&mut self) -> anyhow::Result<()> {
        let Some(mut state) = self.chunk else {
            self.body.extend_from_slice(&self.wire);
            self.wire.clear();
            return Ok(());
        };
        let wire = &self.wire;
        let mut at = 0;
        loop {
            match state {
                Chunk::Size | Chunk::Trailer => {
                    let Some(nl) = find(&wire[at..], b"\r\n") else {
                        anyhow::ensure!(
                            wire.len() - at < LONGEST_LINE,
                            "a chunk-size line longer than {LONGEST_LINE} bytes"
                        );
                        break;
                    };
                    let line = &wire[at..at + nl];
                    at += nl + 2;
                    if state == Chunk::Trailer {
                        if line.is_empty() {
                            state = Chunk::Done;
                        }
                        continue;
                    }
                    let digits = line.split(|&b| b == b';').next().unwrap_or_default();
                    let size = std::str::from_utf8(digits)
                        .ok()
                        .and_then(|d| usize::from_str_radix(d.trim(), 16).ok())
                        .with_context(|| {
                            format!("bad chunk-size line {:?}", String::from_utf8_lossy(line))
                        })?;
                    state = if size == 0 {
                        Chunk::Trailer
                    } else {
                        Chunk::Data(size)
                    };
                }
                Chunk::Data(left) => {
                    let take = left.min(wire.len() - at);
                    if take == 0 {
                        break;
                    }
                    self.body.extend_from_slice(&wire[at..at + take]);
                    at += take;
                    state = if take == left {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left - take)
                    };
                }
                Chunk::DataEnd => {
                    if wire.len() - at < 2 {
                        break;
                    }
                    anyhow::ensure!(
                        &wire[at..at + 2] == b"\r\n",
                        "chunk data not followed by CRLF"
                    );
                    at += 2;
                    state = Chunk::Size;
                }
                Chunk::Done => {
                    anyhow::ensure!(at == wire.len(), "bytes after the chunked body");
                    self.ended = true;
                    break;
                }
            }
        }
        self.chunk = Some(state);
        self.wire.drain(..at);
        Ok(())
    }
}

/// An I/O error on the socket, reading or writing: the connection broke, as
/// opposed to the server sending something that is not an event stream.
#[derive(Debug)]
pub(crate) struct TransportError(pub(crate) std::io::Error);

impl std::fmt::Display for TransportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the connection broke: {}", self.0)
    }
}

impl std::error::Error for TransportError {}

/// Reads from `socket` once, up to [`READ`] bytes more, onto the end of
/// `wire`; 0 when the connection ended.
pub(crate) async fn read_more(
    socket: &mut TcpStream,
    wire: &mut Vec<u8>,
) -> Result<usize, TransportError> {
    wire.reserve(READ);
    socket.read_buf(wire).await.map_err(TransportError)
}

/// Whether `e` is a broken connection rather than a bad stream.
pub(crate) fn is_transport(e: &anyhow::Error) -> bool {
    e.downcast_ref::<TransportError>().is_some()
}

/// In `body`, the end of the first block (after its last line's `\n`) and
/// the start of the next (after the blank line), if a blank line is there.
fn blank_line(body: &[u8]) -> Option<(usize, usize)> {
    let mut from = 0;
    while let Some(at) = body[from..].iter().position(|&b| b == b'\n') {
        let nl = from + at;
        match body.get(nl + 1..(nl + 3).min(body.len()))? {
            [b'\n', ..] => return Some((nl + 1, nl + 2)),
            [b'\r', b'\n'] => return Some((nl + 1, nl + 3)),
            [b'\r'] | [] => return None,
            _ => from = nl + 1,
        }
    }
    None
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Parses one block (without its blank line); `data` holds the joined data.
pub(crate) fn parse_block<'a>(block: &'a [u8], data: &'a mut Vec<u8>) -> anyhow::Result<Block<'a>> {
    let text = std::str::from_utf8(block).context("an SSE block that is not UTF-8")?;
    let mut parsed = Block::default();
    let mut data_lines = 0;
    data.clear();
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => parsed.id = Some(value),
            "event" => parsed.event = Some(value),
            "retry" => parsed.retry = Some(value),
            "data" => {
                if data_lines > 0 {
                    data.push(b'\n');
                }
                data.extend_from_slice(value.as_bytes());
                data_lines += 1;
            }
            _ => {}
        }
    }
    if data_lines > 0 {
        parsed.data = Some(data.as_slice());
    }
    Ok(parsed)
}

// ------------------------------------------------------------- following --

/// The `data` of an event, as far as the bench reads it.
#[derive(Deserialize)]
struct Message<'a> {
    topic: String,
    seq: u64,
    data: Sent,
    /// The commit stamp (RFC 3339), read only when the plan says the events
    /// are commit stamped; borrowed, so that the ceiling's streams, which
    /// do not read it, do not allocate it either.
    #[serde(borrow)]
    time: Option<&'a str>,
}

#[derive(Deserialize)]
struct Sent {
    sent_us: u64,
}

/// What one stream of a run is told.
pub(crate) struct Plan {
    pub(crate) addr: SocketAddr,
    pub(crate) path: String,
    /// The topic in event ids (`<topic>:<seq>`) and in the data.
    pub(crate) topic: String,
    /// Seqs 1..=latency_events are the latency scenario's.
    pub(crate) latency_events: u64,
    /// The burst's last seq.
    pub(crate) last_seq: u64,
    /// The stream begins with a `retry:` block (the edge's do).
    pub(crate) retry_first: bool,
    /// The events' `time` is their commit stamp (the edge's; the ceiling's
    /// is a fixed one): sent → commit is recorded too.
    pub(crate) commit_stamped: bool,
}

/// One stream: opens it, then reads events until the burst's last one,
/// checking that seqs come exactly once and in order. A stream the server
/// ends or whose connection breaks is reopened with `Last-Event-ID`, as a
/// browser's `EventSource` would, and counted in `drops`; without `drops`
/// (the ceiling never closes one) it fails the run.
pub(crate) async fn follow(
    plan: &Plan,
    gate: &Semaphore,
    drops: Option<&Drops>,
    tx: &UnboundedSender<Msg>,
) -> anyhow::Result<()> {
    let mut stream = {
        let _permit = gate.acquire().await?;
        open(plan, None).await?
    };
    if tx.send(Msg::Opened).is_err() {
        return Ok(());
    }
    let mut latencies = Latencies::new(plan.commit_stamped)?;
    let mut last = 0;
    while last < plan.last_seq {
        let block = match stream.next().await {
            Ok(Some(block)) => block,
            outcome => {
                let Some(drops) = drops else {
                    outcome.with_context(|| format!("after seq {last}"))?;
                    anyhow::bail!("the server ended the stream after seq {last}");
                };
                match outcome {
                    Err(e) if is_transport(&e) => drops.broken(format!("after seq {last}: {e:#}")),
                    Err(e) => return Err(e.context(format!("after seq {last}"))),
                    _ => {
                        drops
                            .closed
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                let _permit = gate.acquire().await?;
                let id = format!("{}:{last}", plan.topic);
                stream = open(plan, Some(&id))
                    .await
                    .with_context(|| format!("reopening after seq {last}"))?;
                continue;
            }
        };
        let Some(data) = block.data else {
            continue; // a keep-alive comment
        };
        let received = now_us();
        anyhow::ensure!(
            block.event == Some("message"),
            "got a {:?} event after seq {last}: {}",
            block.event,
            String::from_utf8_lossy(data)
        );
        let id = block.id.unwrap_or_default();
        let seq = id
            .strip_prefix(plan.topic.as_str())
            .and_then(|s| s.strip_prefix(':'))
            .and_then(|s| s.parse::<u64>().ok())
            .with_context(|| format!("event id {id:?} after seq {last}"))?;
        anyhow::ensure!(
            seq == last + 1,
            "got seq {seq} after seq {last} (expected {})",
            last + 1
        );
        last = seq;
        if seq <= plan.latency_events {
            let m: Message = serde_json::from_slice(data)
                .with_context(|| format!("event data {:?}", String::from_utf8_lossy(data)))?;
            anyhow::ensure!(
                m.topic == plan.topic && m.seq == seq,
                "event id {id:?} carries topic {:?} seq {}",
                m.topic,
                m.seq
            );
            latencies
                .record(received, m.data.sent_us, m.time)
                .with_context(|| format!("event id {id:?}"))?;
            if seq == plan.latency_events {
                let done = std::mem::replace(&mut latencies, Latencies::new(plan.commit_stamped)?);
                if tx.send(Msg::Latency(Box::new(done))).is_err() {
                    return Ok(());
                }
            }
        }
    }
    if tx.send(Msg::Done(Instant::now())).is_ok() {
        // Stay connected until the run ends, so that no stream closes while
        // others are still being measured.
        let _stream = stream;
        std::future::pending::<()>().await;
    }
    Ok(())
}

/// Opens the plan's stream (resuming after `last_event_id`) and, for the
/// edge's streams, reads its first `retry:` block.
async fn open(plan: &Plan, last_event_id: Option<&str>) -> anyhow::Result<SseStream> {
    let headers: Vec<(&str, &str)> = last_event_id
        .map(|id| ("last-event-id", id))
        .into_iter()
        .collect();
    let mut stream = SseStream::open(plan.addr, &plan.path, &headers).await?;
    if plan.retry_first {
        let first = timeout(Duration::from_secs(30), stream.next())
            .await
            .context("no `retry:` block within 30 s of the 200")??
            .context("the stream ended before its first block")?;
        anyhow::ensure!(
            first.retry.is_some() && first.data.is_none(),
            "the stream began with {first:?}, not a `retry:` block"
        );
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{io::AsyncWriteExt as _, net::TcpListener};

    /// Serves `reply` (head and body as given, then closes) to one request.
    async fn serve(reply: Vec<u8>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            while find(&head, b"\r\n\r\n").is_none() {
                let mut buf = [0u8; 1024];
                let n = socket.read(&mut buf).await.unwrap();
                head.extend_from_slice(&buf[..n]);
            }
            // Dribble the reply out in small pieces, to cut lines and chunks.
            for piece in reply.chunks(7) {
                socket.write_all(piece).await.unwrap();
                socket.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        addr
    }

    async fn blocks(reply: &str) -> anyhow::Result<Vec<String>> {
        let addr = serve(reply.as_bytes().to_vec()).await;
        let mut stream = SseStream::open(addr, "/s", &[]).await?;
        let mut seen = Vec::new();
        while let Some(block) = stream.next().await? {
            seen.push(format!(
                "{:?} {:?} {:?} {:?}",
                block.id,
                block.event,
                block.data.map(|d| String::from_utf8_lossy(d).into_owned()),
                block.retry
            ));
        }
        Ok(seen)
    }

    fn chunked(body: &str) -> String {
        let mut out = String::from(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
        );
        // Chunks that cut blocks and lines anywhere.
        for piece in body.as_bytes().chunks(11) {
            out.push_str(&format!(
                "{:x}\r\n{}\r\n",
                piece.len(),
                std::str::from_utf8(piece).unwrap()
            ));
        }
        out.push_str("0\r\n\r\n");
        out
    }

    #[tokio::test]
    async fn chunked_events_come_out_whole_whatever_the_cuts() {
        let body = "retry: 1000\n\nid: t:1\nevent: message\ndata: {\"a\":1}\n\n: keep-alive\n\n\
                    id: t:2\r\nevent: message\r\ndata: line one\r\ndata: line two\r\n\r\n";
        let seen = blocks(&chunked(body)).await.unwrap();
        assert_eq!(
            seen,
            [
                "None None None Some(\"1000\")",
                "Some(\"t:1\") Some(\"message\") Some(\"{\\\"a\\\":1}\") None",
                "None None None None",
                "Some(\"t:2\") Some(\"message\") Some(\"line one\\nline two\") None",
            ]
        );
    }

    #[tokio::test]
    async fn a_body_without_chunking_is_read_until_the_close() {
        let reply =
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\nid: t:1\ndata: x\n\n";
        let seen = blocks(reply).await.unwrap();
        assert_eq!(seen, ["Some(\"t:1\") None Some(\"x\") None"]);
    }

    #[tokio::test]
    async fn a_close_inside_a_chunk_is_a_broken_connection() {
        let reply = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n\
                     20\r\nid: t:1\ndata: x";
        let err = blocks(reply).await.unwrap_err();
        assert!(is_transport(&err), "{err:#}");
    }

    #[tokio::test]
    async fn errors_and_wrong_content_types_are_refused_with_what_came() {
        let reply = "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: 19\r\n\r\n\
                     {\"error\":\"no auth\"}";
        let err = blocks(reply).await.unwrap_err().to_string();
        assert!(err.contains("401") && err.contains("no auth"), "{err}");
        let reply = "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 0\r\n\r\n";
        let err = blocks(reply).await.unwrap_err().to_string();
        assert!(err.contains("text/plain"), "{err}");
    }

    /// What [`follow`] reports of an edge-like stream of topic `t` whose
    /// events 1 and 2 (of 3) are the latency scenario's, the first stamped
    /// `times[0]` and the second `times[1]` (`None`: 200 µs after the send).
    async fn followed(times: [Option<&str>; 2], commit_stamped: bool) -> anyhow::Result<Latencies> {
        let sent_us = now_us() - 1000;
        let committed = sqlx::types::chrono::DateTime::from_timestamp_micros(sent_us as i64 + 200)
            .map(|t| t.to_rfc3339())
            .unwrap_or_default();
        let mut body = "retry: 1000\n\n".to_owned();
        for (seq, time) in times.iter().enumerate() {
            let seq = seq + 1;
            let data = serde_json::json!({
                "topic": "t", "seq": seq, "type": "message", "data": {"sent_us": sent_us},
                "time": time.unwrap_or(&committed),
            });
            body.push_str(&format!("id: t:{seq}\nevent: message\ndata: {data}\n\n"));
        }
        body.push_str("id: t:3\nevent: message\ndata: {}\n\n");
        let plan = Plan {
            addr: serve(chunked(&body).into_bytes()).await,
            path: "/s".to_owned(),
            topic: "t".to_owned(),
            latency_events: 2,
            last_seq: 3,
            retry_first: true,
            commit_stamped,
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move { follow(&plan, &Semaphore::new(1), None, &tx).await });
        let mut latencies = None;
        while let Some(msg) = rx.recv().await {
            match msg {
                Msg::Latency(l) => latencies = Some(*l),
                Msg::Done(_) => {
                    task.abort();
                    return latencies.context("no latencies before the last event");
                }
                _ => {}
            }
        }
        task.await??;
        anyhow::bail!("the stream ended before its last event")
    }

    #[tokio::test]
    async fn the_commit_stamps_of_latency_events_are_read_when_stamped() {
        let stamped = followed([None, None], true)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(stamped.received.len(), 2);
        assert!(stamped.received.min() >= 1000, "received after the send");
        let to_commit = stamped.to_commit.map(|h| (h.len(), h.min(), h.max()));
        assert_eq!(to_commit, Some((2, 200, 200)));
        // The ceiling's stamp is not read.
        let ceiling = followed([Some("2026-11-28T12:00:00.000000Z"), Some("fixed")], false)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(ceiling.received.len(), 2);
        assert!(ceiling.to_commit.is_none());
        // A stamp that does not parse fails the stream.
        let err = followed([None, Some("2026-13-45T00:00:00Z")], true)
            .await
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(
            err.contains("event id \"t:2\"") && err.contains("is not RFC 3339"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn bad_chunk_sizes_are_refused() {
        let reply = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n\
                     zz\r\n";
        let err = blocks(reply).await.unwrap_err().to_string();
        assert!(err.contains("chunk-size"), "{err}");
    }
}
