//! A keep-alive HTTP/1.1 `GET` client for the bench's request loops (long
//! polling), for the reason `sse_client` exists: client and server share
//! the machine's cores, and an HTTP library's per-request work (a pooled
//! connection checked out and in, header maps, a body stream) is taken from
//! the server under test. One connection, one reused buffer, no allocation
//! per request beyond the request line.

use std::{fmt::Write as _, net::SocketAddr};

use anyhow::Context as _;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::{Duration, timeout},
};

/// Longest response head accepted.
const LONGEST_HEAD: usize = 16 * 1024;

pub(crate) struct Http1 {
    addr: SocketAddr,
    socket: Option<TcpStream>,
    request: String,
    buf: Vec<u8>,
}

impl Http1 {
    /// A client of `addr`; it connects on the first request.
    pub(crate) fn new(addr: SocketAddr) -> Http1 {
        Http1 {
            addr,
            socket: None,
            request: String::new(),
            buf: Vec::with_capacity(16 * 1024),
        }
    }

    /// Sends `GET path` and reads the whole answer: its status and body
    /// (which needs a `content-length`). A kept-alive connection the server
    /// closed before answering is reopened once.
    pub(crate) async fn get(&mut self, path: &str) -> anyhow::Result<(u16, &[u8])> {
        self.request.clear();
        let _ = write!(
            self.request,
            "GET {path} HTTP/1.1\r\nhost: {}\r\n\r\n",
            self.addr
        );
        let (status, body, close) = match self.exchange().await {
            Err(e) if e.downcast_ref::<ClosedIdle>().is_some() => {
                self.socket = None;
                self.exchange().await?
            }
            other => other?,
        };
        if close {
            self.socket = None;
        }
        Ok((status, &self.buf[body.0..body.1]))
    }

    /// One request and its response: status, body range in `buf`, and
    /// whether the server closes the connection after it.
    async fn exchange(&mut self) -> anyhow::Result<(u16, (usize, usize), bool)> {
        let reused = self.socket.is_some();
        let socket = match &mut self.socket {
            Some(socket) => socket,
            None => {
                let socket = TcpStream::connect(self.addr)
                    .await
                    .with_context(|| format!("connecting to {}", self.addr))?;
                socket.set_nodelay(true)?;
                self.socket.insert(socket)
            }
        };
        socket.write_all(self.request.as_bytes()).await?;
        self.buf.clear();
        let head_end = loop {
            if let Some(end) = head_end(&self.buf) {
                break end;
            }
            anyhow::ensure!(self.buf.len() < LONGEST_HEAD, "response head too long");
            self.buf.reserve(4096);
            if socket.read_buf(&mut self.buf).await? == 0 {
                if reused && self.buf.is_empty() {
                    return Err(ClosedIdle.into());
                }
                anyhow::bail!("the server closed the connection before a whole response head");
            }
        };
        let head = Head::parse(&self.buf[..head_end])?;
        if let Some(encoding) = head.transfer_encoding {
            anyhow::bail!(
                "{}: a {encoding} body (this client reads content-length bodies)",
                head.status_line
            );
        }
        let (status, close) = (head.status, head.close);
        let length = head
            .content_length
            .with_context(|| format!("{} without a content-length", head.status_line))?;
        let end = head_end + length;
        while self.buf.len() < end {
            self.buf.reserve(end - self.buf.len());
            anyhow::ensure!(
                socket.read_buf(&mut self.buf).await? > 0,
                "the server closed the connection inside a body"
            );
        }
        anyhow::ensure!(self.buf.len() == end, "bytes after the response body");
        Ok((status, (head_end, end), close))
    }
}

/// Bytes read from a socket at a time by the streaming clients.
pub(crate) const READ: usize = 16 * 1024;

/// A response head read on a fresh connection, for the streaming clients
/// (SSE, WebSocket): the socket, the bytes read so far (the head, then
/// whatever came after it) and where the head ends in them.
pub(crate) struct Opened {
    pub(crate) socket: TcpStream,
    pub(crate) wire: Vec<u8>,
    pub(crate) head_end: usize,
}

impl Opened {
    /// Connects to `addr` without Nagle's delay (the streams' frames are
    /// small and each is waited for), sends `request` (a whole head), and
    /// reads until the response head is whole.
    pub(crate) async fn request(addr: SocketAddr, request: &str) -> anyhow::Result<Opened> {
        let mut socket = timeout(Duration::from_secs(10), TcpStream::connect(addr))
            .await
            .context("connect timed out")?
            .context("connect")?;
        socket.set_nodelay(true)?;
        socket.write_all(request.as_bytes()).await?;
        let mut wire = Vec::with_capacity(READ);
        let head_end = loop {
            if let Some(end) = head_end(&wire) {
                break end;
            }
            anyhow::ensure!(wire.len() < LONGEST_HEAD, "response head too long");
            wire.reserve(READ);
            let read = timeout(Duration::from_secs(30), socket.read_buf(&mut wire))
                .await
                .context("no response head within 30 s")??;
            anyhow::ensure!(read > 0, "closed before the response head");
        };
        Ok(Opened {
            socket,
            wire,
            head_end,
        })
    }

    pub(crate) fn head(&self) -> anyhow::Result<Head<'_>> {
        Head::parse(&self.wire[..self.head_end])
    }

    /// An answer the client cannot use: its status line and the start of
    /// its body (read for up to 2 s more), for the error message.
    pub(crate) async fn refusal(mut self) -> String {
        let (status_line, length) = match self.head() {
            Ok(head) => (head.status_line.to_owned(), head.content_length),
            Err(e) => return format!("{e:#}"),
        };
        let want = self.head_end + length.unwrap_or(0).min(4096);
        let give_up = tokio::time::Instant::now() + Duration::from_secs(2);
        while self.wire.len() < want {
            let read = self.socket.read_buf(&mut self.wire);
            match tokio::time::timeout_at(give_up, read).await {
                Ok(Ok(read)) if read > 0 => {}
                _ => break,
            }
        }
        let body = String::from_utf8_lossy(&self.wire[self.head_end..]);
        format!("{status_line}: {}", body.trim())
    }
}

/// A header's value in a request or response head, if it has the header.
pub(crate) fn header_value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The value of `name` in a request target's query (`a=1&b=2`), if it has
/// it, as written (not percent-decoded).
pub(crate) fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
}

/// Where the response head in `buf` ends (after its blank line), once it has.
pub(crate) fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| at + 4)
}

/// A response head, as far as the bench's clients read it.
pub(crate) struct Head<'a> {
    pub(crate) status_line: &'a str,
    pub(crate) status: u16,
    pub(crate) content_type: &'a str,
    pub(crate) content_length: Option<usize>,
    pub(crate) transfer_encoding: Option<&'a str>,
    /// `connection: close`: the server closes after this response.
    pub(crate) close: bool,
}

impl<'a> Head<'a> {
    /// Parses `head` (status line, header lines, blank line).
    pub(crate) fn parse(head: &'a [u8]) -> anyhow::Result<Head<'a>> {
        let head = std::str::from_utf8(head).context("response head")?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("status line {status_line:?}"))?;
        let mut parsed = Head {
            status_line,
            status,
            content_type: "",
            content_length: None,
            transfer_encoding: None,
            close: false,
        };
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match name.trim().to_ascii_lowercase().as_str() {
                "content-type" => parsed.content_type = value,
                "content-length" => parsed.content_length = value.parse().ok(),
                "transfer-encoding" => parsed.transfer_encoding = Some(value),
                "connection" => parsed.close = value.eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
        Ok(parsed)
    }

    /// Whether the body comes in chunks.
    pub(crate) fn chunked(&self) -> bool {
        self.transfer_encoding
            .is_some_and(|e| e.eq_ignore_ascii_case("chunked"))
    }
}

/// A kept-alive connection was closed by the server while idle.
#[derive(Debug)]
struct ClosedIdle;

impl std::fmt::Display for ClosedIdle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the server closed the idle connection")
    }
}

impl std::error::Error for ClosedIdle {}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// Answers each request on one connection with the next of `replies`,
    /// then closes it; counts connections.
    async fn serve(replies: Vec<&'static str>) -> (SocketAddr, tokio::task::JoinHandle<usize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut replies = replies.into_iter();
            let mut connections = 0;
            while let Some(first) = replies.next() {
                let (mut socket, _) = listener.accept().await.unwrap();
                connections += 1;
                let mut next = Some(first);
                while let Some(reply) = next {
                    let mut head = Vec::new();
                    while !head.ends_with(b"\r\n\r\n") {
                        let mut byte = [0u8; 1];
                        if socket.read(&mut byte).await.unwrap() == 0 {
                            break;
                        }
                        head.push(byte[0]);
                    }
                    if reply.is_empty() {
                        break; // close without answering
                    }
                    for piece in reply.as_bytes().chunks(5) {
                        socket.write_all(piece).await.unwrap();
                    }
                    next = replies.next();
                }
            }
            connections
        });
        (addr, task)
    }

    #[tokio::test]
    async fn answers_come_whole_on_one_kept_alive_connection() {
        let (addr, server) = serve(vec![
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst",
            "HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}",
        ])
        .await;
        let mut http = Http1::new(addr);
        let (status, body) = http.get("/a?x=1").await.unwrap();
        assert_eq!((status, body), (200, &b"first"[..]));
        let (status, body) = http.get("/b").await.unwrap();
        assert_eq!((status, body), (404, &b"{}"[..]));
        drop(http);
        assert_eq!(server.await.unwrap(), 1);
    }

    #[tokio::test]
    async fn a_connection_closed_while_idle_is_reopened() {
        let (addr, server) = serve(vec![
            "HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na",
            "",
            "HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nb",
        ])
        .await;
        let mut http = Http1::new(addr);
        assert_eq!(http.get("/").await.unwrap().1, b"a");
        assert_eq!(http.get("/").await.unwrap().1, b"b");
        drop(http);
        assert_eq!(server.await.unwrap(), 2);
    }

    #[tokio::test]
    async fn bodies_without_a_length_are_refused() {
        let (addr, _server) = serve(vec![
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        ])
        .await;
        let err = Http1::new(addr).get("/").await.unwrap_err().to_string();
        assert!(err.contains("chunked"), "{err}");
    }
}
