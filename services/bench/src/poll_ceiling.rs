//! The long-poll ceiling: a minimal HTTP/1.1 server that holds long polls
//! and answers them from an in-memory list of pre-encoded events, with no
//! store, no auth and no framework, so that `rt-bench poll` can give the
//! server's wake-up figures as a ratio of what this machine does with the
//! same waiters, the same publisher and the same wire in the same run.
//!
//! It runs in the bench's process, as the server under test does, on as many
//! threads as the server has HTTP workers, each a single-threaded tokio
//! runtime accepting from the one listener. It serves, on kept-alive
//! connections:
//!
//! - `GET <path>?after=N&limit=L&wait=S` (any path, one topic for all):
//!   answers at once with the events after `N` (at most `L`), or waits up to
//!   `S` seconds for the next one; `200` with
//!   `{"events":[...],"next":N}` and the header set the server sends
//!   (`content-length`, `content-type`, `etag`, `cache-control`, `date`,
//!   fixed where the server computes them);
//! - `POST <path>` with a `{"data":{"sent_us":T}}` body (`content-length`):
//!   appends the next event, encoded once as the edges encode it, wakes the
//!   waiters and answers `201` with `{"seq":N}`.
//!
//! Anything else is answered `400` and the connection closed.

use std::{
    io::Write as _,
    net::SocketAddr,
    sync::{Arc, RwLock},
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Context as _;
use bytes::Bytes;
use serde::Deserialize;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

use crate::{
    http1::{head_end, header_value, query_param},
    raw::event_fields,
};

/// Longest request head or publish body read.
const LONGEST: usize = 8 * 1024;

/// A running ceiling; [`Ceiling::stop`] ends it.
pub(crate) struct Ceiling {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    threads: Vec<JoinHandle<()>>,
}

/// The events published so far, and the last seq, which waiters watch.
struct Log {
    topic: String,
    events: RwLock<Vec<Bytes>>,
    last: watch::Sender<u64>,
}

impl Ceiling {
    /// Listens on a free loopback port, with `threads` threads, for events
    /// of `topic`.
    pub(crate) fn start(threads: usize, topic: &str) -> anyhow::Result<Ceiling> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let log = Arc::new(Log {
            topic: topic.to_owned(),
            events: RwLock::new(Vec::new()),
            last: watch::Sender::new(0),
        });
        let (stop, _) = watch::channel(false);
        let mut started = Vec::new();
        for i in 0..threads.max(1) {
            let listener = listener.try_clone()?;
            let (log, mut stopped) = (log.clone(), stop.subscribe());
            let thread = std::thread::Builder::new()
                .name(format!("poll-ceiling-{i}"))
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime,
                        Err(e) => return eprintln!("poll ceiling: {e}"),
                    };
                    runtime.block_on(async move {
                        let listener = match TcpListener::from_std(listener) {
                            Ok(listener) => listener,
                            Err(e) => return eprintln!("poll ceiling: {e}"),
                        };
                        tokio::select! {
                            () = accept(listener, log) => {}
                            _ = stopped.wait_for(|&stop| stop) => {}
                        }
                    });
                    // Dropping the runtime ends its connections.
                })?;
            started.push(thread);
        }
        Ok(Ceiling {
            addr,
            stop,
            threads: started,
        })
    }

    /// `http://<addr>`.
    pub(crate) fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops every thread and waits for them.
    pub(crate) async fn stop(self) {
        self.stop.send_replace(true);
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

async fn accept(listener: TcpListener, log: Arc<Log>) {
    loop {
        match listener.accept().await {
            Ok((socket, _)) => {
                let log = log.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(socket, &log).await {
                        eprintln!("poll ceiling: {e:#}");
                    }
                });
            }
            Err(e) => {
                // Out of descriptors, most likely: say so, and go on.
                eprintln!("poll ceiling: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// One kept-alive connection's requests, until the client closes it.
async fn connection(mut socket: TcpStream, log: &Log) -> anyhow::Result<()> {
    socket.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(1024);
    let mut out = Vec::with_capacity(1024);
    loop {
        let end = loop {
            if let Some(end) = head_end(&buf) {
                break end;
            }
            anyhow::ensure!(buf.len() < LONGEST, "request head over 8 KiB");
            buf.reserve(1024);
            if socket.read_buf(&mut buf).await? == 0 {
                anyhow::ensure!(buf.is_empty(), "closed inside a request head");
                return Ok(());
            }
        };
        let head = std::str::from_utf8(&buf[..end]).context("request head")?;
        let line = head.lines().next().unwrap_or_default();
        out.clear();
        match line.split(' ').next() {
            Some("GET") => {
                let poll = match Poll::parse(line) {
                    Ok(poll) => poll,
                    Err(e) => return refuse(&mut socket, e).await,
                };
                buf.drain(..end);
                poll.answer(log, &mut out).await;
            }
            Some("POST") => {
                let length: usize = header_value(head, "content-length")
                    .and_then(|v| v.parse().ok())
                    .with_context(|| format!("{line}: no content-length"))?;
                anyhow::ensure!(length <= LONGEST, "{line}: a body over 8 KiB");
                while buf.len() < end + length {
                    buf.reserve(end + length - buf.len());
                    anyhow::ensure!(
                        socket.read_buf(&mut buf).await? > 0,
                        "closed inside a publish body"
                    );
                }
                let seq = match log.publish(&buf[end..end + length]) {
                    Ok(seq) => seq,
                    Err(e) => return refuse(&mut socket, e).await,
                };
                buf.drain(..end + length);
                let body = format!("{{\"seq\":{seq}}}");
                let _ = write!(
                    out,
                    "HTTP/1.1 201 Created\r\ncontent-length: {}\r\n\
                     content-type: application/json\r\n\r\n{body}",
                    body.len()
                );
            }
            _ => {
                let e = anyhow::anyhow!("{line}: not a poll or a publish");
                return refuse(&mut socket, e).await;
            }
        }
        socket.write_all(&out).await?;
    }
}

/// Answers `400` and closes: the request was not one the bench sends.
async fn refuse(socket: &mut TcpStream, error: anyhow::Error) -> anyhow::Result<()> {
    socket
        .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        .await?;
    Err(error)
}

/// A poll's `after`, `limit` and `wait`.
#[derive(Debug, PartialEq)]
struct Poll {
    after: u64,
    limit: usize,
    wait: Duration,
}

impl Poll {
    fn parse(line: &str) -> anyhow::Result<Poll> {
        let target = line.split(' ').nth(1).unwrap_or_default();
        let query = target.split_once('?').map_or("", |(_, q)| q);
        let number = |name: &str, default: u64| -> anyhow::Result<u64> {
            query_param(query, name).map_or(Ok(default), |v| {
                v.parse()
                    .with_context(|| format!("{line}: {name} is not a whole number"))
            })
        };
        Ok(Poll {
            after: number("after", 0)?,
            limit: number("limit", 100)?.max(1) as usize,
            wait: Duration::from_secs(number("wait", 0)?),
        })
    }

    /// Waits (up to `wait`) for an event after `after`, then writes the
    /// response with what there is into `out`.
    async fn answer(&self, log: &Log, out: &mut Vec<u8>) {
        let mut last = log.last.subscribe();
        if *last.borrow_and_update() <= self.after && !self.wait.is_zero() {
            let after = self.after;
            let _ = tokio::time::timeout(self.wait, last.wait_for(|&seq| seq > after)).await;
        }
        let mut body = Vec::with_capacity(512);
        body.extend_from_slice(b"{\"events\":[");
        let mut next = self.after;
        {
            let events = log.events.read().unwrap_or_else(|e| e.into_inner());
            let from = (self.after as usize).min(events.len());
            for (i, event) in events[from..].iter().take(self.limit).enumerate() {
                if i > 0 {
                    body.push(b',');
                }
                body.extend_from_slice(event);
                next += 1;
            }
        }
        let _ = write!(body, "],\"next\":{next}}}");
        let _ = write!(
            out,
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: application/json\r\n\
             etag: \"{next:016x}\"\r\ncache-control: no-cache\r\n\
             date: Tue, 01 Dec 2026 12:00:00 GMT\r\n\r\n",
            body.len()
        );
        out.extend_from_slice(&body);
    }
}

impl Log {
    /// Appends the event `body` (`{"data":{"sent_us":T}}`) carries; its seq.
    fn publish(&self, body: &[u8]) -> anyhow::Result<u64> {
        #[derive(Deserialize)]
        struct Publish {
            data: Stamp,
        }
        #[derive(Deserialize)]
        struct Stamp {
            sent_us: u64,
        }
        let publish: Publish = serde_json::from_slice(body).context("publish body")?;
        let seq = {
            let mut events = self.events.write().unwrap_or_else(|e| e.into_inner());
            let seq = events.len() as u64 + 1;
            let fields = event_fields(&self.topic, seq, publish.data.sent_us);
            events.push(Bytes::from(format!("{{{fields}}}")));
            seq
        };
        self.last.send_replace(seq);
        Ok(seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http1::Http1;

    #[test]
    fn polls_are_read_from_the_request_line() {
        let poll = Poll::parse("GET /v1/topics/t/events?after=12&limit=5&wait=30 HTTP/1.1");
        let expected = Poll {
            after: 12,
            limit: 5,
            wait: Duration::from_secs(30),
        };
        assert_eq!(poll.unwrap(), expected);
        let short = Poll::parse("GET /x HTTP/1.1").unwrap();
        assert_eq!(
            (short.after, short.limit, short.wait),
            (0, 100, Duration::ZERO)
        );
        let err = Poll::parse("GET /x?after=-1 HTTP/1.1").unwrap_err();
        assert!(err.to_string().contains("after"), "{err}");
    }

    /// The bench's own client and publisher against the ceiling: a waiting
    /// poll is woken by a publish, a poll behind gets what it missed up to
    /// its limit, and a short poll with nothing new answers at once.
    #[tokio::test]
    async fn waiting_polls_are_woken_and_polls_behind_catch_up() {
        let ceiling = Ceiling::start(2, "t").unwrap();
        let addr = ceiling.addr;
        let url = format!("{}/v1/topics/t/events", ceiling.base());
        let waiting = tokio::spawn(async move {
            let mut http = Http1::new(addr);
            let (status, body) = http.get("/v1/topics/t/events?after=0&wait=30").await?;
            anyhow::Ok((status, serde_json::from_slice::<serde_json::Value>(body)?))
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiting.is_finished(), "the poll did not wait");
        let http = reqwest::Client::new();
        for seq in 1..=3 {
            crate::server::publish_stamped(&http, &url, seq)
                .await
                .unwrap();
        }
        let (status, woken) = waiting.await.unwrap().unwrap();
        assert_eq!(status, 200);
        assert_eq!(woken["events"][0]["seq"], 1);
        assert_eq!(woken["events"][0]["topic"], "t");
        assert!(woken["events"][0]["data"]["sent_us"].as_u64().unwrap() > 0);

        let mut http = Http1::new(addr);
        let (_, body) = http
            .get("/v1/topics/t/events?after=0&limit=2")
            .await
            .unwrap();
        let page: serde_json::Value = serde_json::from_slice(body).unwrap();
        let seqs: Vec<_> = page["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["seq"].clone())
            .collect();
        assert_eq!(
            (seqs, page["next"].clone()),
            (vec![1.into(), 2.into()], 2.into())
        );
        let (_, body) = http
            .get("/v1/topics/t/events?after=3&wait=0")
            .await
            .unwrap();
        let page: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(page, serde_json::json!({"events": [], "next": 3}));
        ceiling.stop().await;
    }
}
