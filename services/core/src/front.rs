//! The connection front: long-lived streams served on the socket itself.
//!
//! actix-http keeps, for every connection and for its whole life, a
//! dispatcher and two buffers of a fixed 8 KiB (read and write): about
//! 11 KiB of server memory per idle connection. For requests that come and
//! go that is nothing; for an SSE stream or a WebSocket that idles for hours
//! it is most of what the connection costs.
//!
//! So each accepted connection is first peeked at (`MSG_PEEK`: nothing is
//! consumed). When its first request is a `GET` of a [`StreamRoute`], the
//! route admits it from the request head; the head is then consumed, the
//! response head written, and the response body (or, after a `101`, the
//! upgraded protocol) served on the socket with a write buffer that exists
//! only while bytes wait to be written. The socket is served on the main
//! multi-threaded runtime, where the hub's feeds run, not on the HTTP worker
//! that accepted it: a busy thread's streams are taken by the other, and a
//! feed's wake-ups stay within one runtime.
//!
//! Everything else goes to actix-http untouched: other routes, later
//! requests on a kept-alive connection, heads that are malformed, too large
//! or slow to arrive, and every stream request the route refuses. A refused
//! request is admitted again by the same code behind actix-web, which
//! answers the error with the usual JSON body, CORS headers and metrics; so
//! both paths answer alike.

use std::{
    convert::Infallible,
    fmt::Write as _,
    future::poll_fn,
    io,
    net::SocketAddr,
    pin::Pin,
    rc::Rc,
    task::{Context as TaskContext, Poll, ready},
    time::Duration,
};

use actix_web::{
    HttpResponse,
    body::{BodyStream, BoxBody},
    dev::{RequestHead, Service},
    error::PayloadError,
    http::{
        Method, StatusCode, Uri, Version,
        header::{HeaderName, HeaderValue},
    },
};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{
    Stream, StreamExt as _,
    future::LocalBoxFuture,
    stream::{BoxStream, LocalBoxStream},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf},
    net::{TcpStream, tcp::OwnedReadHalf},
};
use tracing::Instrument;

use crate::{
    context::Context,
    error::ApiError,
    server::{cors_allow, request_done, request_span},
};

/// What the client sends on an upgraded socket.
pub enum Inbound {
    /// Read from the socket by the front, on the main runtime: may move
    /// between its threads.
    Socket(BoxStream<'static, Result<Bytes, PayloadError>>),
    /// actix-web's request payload (a socket the front handed over): stays
    /// on the HTTP worker that reads it.
    Payload(LocalBoxStream<'static, Result<Bytes, PayloadError>>),
}

/// Serves an upgraded socket: reads what the client sends, and returns
/// what the server sends.
pub type Opener = Box<dyn FnOnce(Inbound) -> SendBody + Send>;

/// A response body that may be served from any thread: the front serves a
/// stream on the main runtime, whose threads share the work, rather than on
/// the HTTP worker that accepted its connection.
pub type SendBody = BoxStream<'static, Bytes>;

/// A route's response of `head` and `body` as actix-web serves it, for the
/// requests the front hands over.
pub fn actix_response(head: HttpResponse<()>, body: SendBody) -> HttpResponse {
    let body = BodyStream::new(body.map(Ok::<_, Infallible>));
    head.set_body(BoxBody::new(body))
}

/// Admits a stream request from its head: the response, or the error actix
/// will answer (the same function runs again there).
pub type Admit =
    for<'a> fn(&'a Context, &'a RequestHead) -> LocalBoxFuture<'a, Result<Accepted, ApiError>>;

/// A route whose responses last: served by the front when a connection
/// opens with it, and mounted in actix-web as well (by the service's own
/// `configure`) for everything the front hands over.
#[derive(Clone, Copy)]
pub struct StreamRoute {
    /// The exact path (no query).
    pub path: &'static str,
    pub admit: Admit,
}

/// An admitted stream request.
pub enum Accepted {
    /// A response whose body is sent (chunked) until it ends or the client
    /// leaves; what the client sends meanwhile is read and ignored.
    Stream(HttpResponse<()>, SendBody),
    /// A `101 Switching Protocols` response; then the socket carries what
    /// the opener's body yields, and the opener reads what the client sends.
    Upgrade(HttpResponse<()>, Opener),
}

/// The largest request head the front reads; a larger one goes to actix.
const HEAD_LIMIT: usize = 8 * 1024;
/// Most headers in a head the front reads.
const MAX_HEADERS: usize = 64;
/// How often an incomplete head is peeked at again.
const PEEK_AGAIN: Duration = Duration::from_millis(5);
/// How long a head may take to arrive whole before actix gets the connection.
const HEAD_WAIT: Duration = Duration::from_secs(1);
/// The write buffer takes body chunks until it holds this much, then writes
/// (as actix-http does).
const WRITE_HIGH: usize = 32 * 1024;
/// Bytes read from an upgraded socket at a time.
const READ_CHUNK: usize = 4 * 1024;

/// One worker's front: the stream routes and what serving them needs.
pub(crate) struct Front {
    ctx: Context,
    streams: Vec<StreamRoute>,
    /// How long the first bytes of a request may take (then actix, with
    /// its own request timeout, gets the connection).
    first_bytes: Duration,
}

/// A stream request, read from the peeked bytes.
struct Peeked {
    head: RequestHead,
    /// Bytes of the head on the socket.
    len: usize,
    route: StreamRoute,
}

enum Parsed {
    Stream(Box<Peeked>),
    /// Not a stream request the front serves.
    Other,
    /// The head is not whole yet.
    Partial,
}

impl Front {
    pub(crate) fn new(ctx: Context, streams: Vec<StreamRoute>, first_bytes: Duration) -> Front {
        Front {
            ctx,
            streams,
            first_bytes,
        }
    }

    /// Serves a connection: a stream here, anything else through `http`.
    pub(crate) async fn connection<H>(
        self: Rc<Self>,
        io: TcpStream,
        http: Rc<H>,
    ) -> Result<(), H::Error>
    where
        H: Service<(TcpStream, actix_http::Protocol, Option<SocketAddr>), Response = ()>,
    {
        let io = if self.streams.is_empty() {
            io
        } else {
            // Boxed: a connection's task holds only what its phase needs.
            let served = Box::pin(self.clone().serve(io));
            match served.await {
                Ok(()) => return Ok(()),
                Err(io) => io,
            }
        };
        let peer = io.peer_addr().ok();
        let call = Box::pin(http.call((io, actix_http::Protocol::Http1, peer)));
        call.await
    }

    /// Serves the connection when it opens with a stream request the route
    /// admits; gives it back untouched otherwise.
    async fn serve(self: Rc<Self>, mut io: TcpStream) -> Result<(), TcpStream> {
        let peeked = Box::pin(self.peek(&io)).await;
        let Some(Peeked { head, len, route }) = peeked else {
            return Err(io);
        };
        let span = request_span(&head.method, route.path, &head.headers);
        let admitted = Box::pin((route.admit)(&self.ctx, &head))
            .instrument(span.clone())
            .await;
        let Ok(accepted) = admitted else {
            return Err(io);
        };
        // The head was peeked, so it is there to be read.
        let mut consumed = vec![0; len];
        if io.read_exact(&mut consumed).await.is_err() {
            return Ok(());
        }
        drop(consumed);
        let cors = cors_allow(&self.ctx.settings.cors_origins, &head.headers);
        let (mut response, body) = match accepted {
            Accepted::Stream(response, body) => (response, Body::Stream(body)),
            Accepted::Upgrade(response, opener) => (response, Body::Upgrade(opener)),
        };
        let metrics = &self.ctx.metrics;
        request_done(&span, Some(metrics), route.path, response.status());
        drop(span);
        metrics
            .streams_direct
            .with_label_values(&[route.path])
            .inc();
        if let Some((origin, credentials)) = cors {
            crate::server::put_cors_headers(response.headers_mut(), &origin, credentials);
        }
        let start = response_head(&response, matches!(body, Body::Stream(_)));
        let (runtime, detached) = (self.ctx.hub.runtime().clone(), self.ctx.detached.clone());
        drop((response, head, self));
        // The rest is served on the main runtime: its threads take streams
        // from each other when one is busy, and the hub's feeds wake them
        // there without crossing runtimes.
        let Ok(io) = io.into_std() else {
            return Ok(());
        };
        let serve = async move {
            let Ok(io) = TcpStream::from_std(io) else {
                return;
            };
            let (mut read, mut write) = io.into_split();
            match body {
                Body::Stream(body) => {
                    drive(&mut write, Some(&mut read), body, start, true).await;
                }
                Body::Upgrade(open) => {
                    let body = open(Inbound::Socket(Box::pin(SocketStream(read))));
                    drive::<_, OwnedReadHalf, _>(&mut write, None, body, start, false).await;
                }
            }
        };
        detached.spawn_on(serve, &runtime);
        Ok(())
    }

    /// Waits for the connection's first request head, and reads it when it
    /// is a stream request the front serves.
    async fn peek(&self, io: &TcpStream) -> Option<Peeked> {
        // The buffer is made once there is something to read: a connection
        // opened ahead of its first request holds none.
        let first = tokio::time::timeout(self.first_bytes, io.readable());
        first.await.ok()?.ok()?;
        let mut buf = vec![0; HEAD_LIMIT];
        let mut seen = io.peek(&mut buf).await.ok()?;
        let deadline = tokio::time::Instant::now() + HEAD_WAIT;
        loop {
            if seen == 0 {
                return None;
            }
            match parse(&self.streams, &buf[..seen]) {
                Parsed::Stream(peeked) => return Some(*peeked),
                Parsed::Other => return None,
                Parsed::Partial if seen == buf.len() => return None,
                Parsed::Partial => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(PEEK_AGAIN).await;
            seen = io.peek(&mut buf).await.ok()?;
        }
    }
}

/// Reads `bytes` as the start of a connection: a stream request whole, or
/// not one, or not known yet.
fn parse(streams: &[StreamRoute], bytes: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let Ok(status) = req.parse(bytes) else {
        return Parsed::Other;
    };
    // The request line decides as soon as it is whole.
    let Some(target) = req.path else {
        return Parsed::Partial;
    };
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    let Some(route) = streams.iter().find(|r| r.path == path) else {
        return Parsed::Other;
    };
    if req.method != Some("GET") {
        return Parsed::Other;
    }
    let httparse::Status::Complete(len) = status else {
        return Parsed::Partial;
    };
    if req.version != Some(1) {
        return Parsed::Other;
    }
    let Ok(uri) = target.parse::<Uri>() else {
        return Parsed::Other;
    };
    let mut head = RequestHead::default();
    head.method = Method::GET;
    head.uri = uri;
    head.version = Version::HTTP_11;
    for header in req.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(header.name.as_bytes()),
            HeaderValue::from_bytes(header.value),
        ) else {
            return Parsed::Other;
        };
        head.headers.append(name, value);
    }
    // A request body (or a framing question about one) is actix's.
    let has_body = head.headers.contains_key("transfer-encoding")
        || head
            .headers
            .get("content-length")
            .is_some_and(|v| v.as_bytes() != b"0");
    if has_body {
        return Parsed::Other;
    }
    Parsed::Stream(Box::new(Peeked {
        head,
        len,
        route: *route,
    }))
}

/// The status line and headers, with `date`, and `transfer-encoding` for a
/// chunked body or `connection` for a switch, as actix-http adds them.
fn response_head(response: &HttpResponse<()>, chunked: bool) -> BytesMut {
    let status = response.status();
    let mut out = BytesMut::with_capacity(256);
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(status.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.put_slice(b"\r\n");
    for (name, value) in response.headers() {
        out.put_slice(name.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
    if chunked {
        out.put_slice(b"transfer-encoding: chunked\r\n");
    } else if status == StatusCode::SWITCHING_PROTOCOLS {
        // actix-http writes this from the response's connection type.
        out.put_slice(b"connection: upgrade\r\n");
    }
    let date = chrono::Utc::now().format("%a, %d %b %Y %H:%M:%S GMT");
    out.put_slice(format!("date: {date}\r\n\r\n").as_bytes());
    out
}

/// Writes `start`, then the body as it comes (chunk-encoded when
/// `chunked`), until the body ends, a write fails, or `watch` (the client's
/// side, when nothing else reads it) reaches its end.
async fn drive<W, R, B>(
    write: &mut W,
    mut watch: Option<&mut R>,
    body: B,
    start: BytesMut,
    chunked: bool,
) where
    W: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
    B: Stream<Item = Bytes> + Unpin,
{
    let mut body = Some(body);
    let mut out = start;
    let done = poll_fn(|cx| {
        if let Some(read) = watch.as_deref_mut()
            && client_left(read, cx)
        {
            return Poll::Ready(false);
        }
        loop {
            // Take what the body has ready, up to the high-water mark.
            while out.len() < WRITE_HIGH
                && let Some(b) = body.as_mut()
            {
                match Pin::new(b).poll_next(cx) {
                    Poll::Ready(Some(chunk)) => put_chunk(&mut out, &chunk, chunked),
                    Poll::Ready(None) => {
                        body = None;
                        if chunked {
                            out.put_slice(b"0\r\n\r\n");
                        }
                    }
                    Poll::Pending => break,
                }
            }
            if out.is_empty() {
                if body.is_none() {
                    return Poll::Ready(true);
                }
                // Idle: hold no buffer until the next bytes.
                out = BytesMut::new();
                return Poll::Pending;
            }
            match ready!(Pin::new(&mut *write).poll_write(cx, &out)) {
                Ok(0) | Err(_) => return Poll::Ready(false),
                Ok(n) => out.advance(n),
            }
        }
    });
    if done.await {
        let _ = poll_fn(|cx| Pin::new(&mut *write).poll_shutdown(cx)).await;
    }
}

fn put_chunk(out: &mut BytesMut, chunk: &[u8], chunked: bool) {
    if chunk.is_empty() {
        return;
    }
    // The size line and the CRLF after the data: at most 12 bytes.
    out.reserve(chunk.len() + 12);
    if chunked {
        // unwrap: writing into a BytesMut cannot fail
        write!(out, "{:X}\r\n", chunk.len()).expect("BytesMut grows");
        out.put_slice(chunk);
        out.put_slice(b"\r\n");
    } else {
        out.put_slice(chunk);
    }
}

/// Reads and drops what the client sends; true once its side is closed.
fn client_left<R: AsyncRead + Unpin>(read: &mut R, cx: &mut TaskContext<'_>) -> bool {
    let mut scratch = [0; 512];
    loop {
        let mut buf = ReadBuf::new(&mut scratch);
        match Pin::new(&mut *read).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) if buf.filled().is_empty() => return true,
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(_)) => return true,
            Poll::Pending => return false,
        }
    }
}

/// What an admitted request's response is followed by.
enum Body {
    Stream(SendBody),
    Upgrade(Opener),
}

/// The read side of an upgraded socket as a stream of chunks.
struct SocketStream(OwnedReadHalf);

impl Stream for SocketStream {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let mut scratch = [0; READ_CHUNK];
        let mut buf = ReadBuf::new(&mut scratch);
        match ready!(Pin::new(&mut self.0).poll_read(cx, &mut buf)) {
            Ok(()) if buf.filled().is_empty() => Poll::Ready(None),
            Ok(()) => Poll::Ready(Some(Ok(Bytes::copy_from_slice(buf.filled())))),
            Err(e) => Poll::Ready(Some(Err(PayloadError::Io(io::Error::new(e.kind(), e))))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncWriteExt, duplex};

    fn refuse<'a>(
        _: &'a Context,
        _: &'a RequestHead,
    ) -> LocalBoxFuture<'a, Result<Accepted, ApiError>> {
        Box::pin(async { Err(ApiError::forbidden("no")) })
    }

    const ROUTES: &[StreamRoute] = &[StreamRoute {
        path: "/v1/sse",
        admit: refuse,
    }];

    fn parsed(bytes: &str) -> Parsed {
        parse(ROUTES, bytes.as_bytes())
    }

    #[test]
    fn a_whole_stream_request_is_read_with_its_length() {
        let req = "GET /v1/sse?topic=a HTTP/1.1\r\nHost: x\r\nLast-Event-ID: a:3\r\n\r\n";
        let Parsed::Stream(p) = parsed(&format!("{req}trailing")) else {
            panic!("not a stream request");
        };
        assert_eq!(p.len, req.len());
        assert_eq!(p.route.path, "/v1/sse");
        assert_eq!(p.head.uri.query(), Some("topic=a"));
        assert_eq!(p.head.headers.get("last-event-id").unwrap(), "a:3");
    }

    #[test]
    fn an_incomplete_head_waits_unless_the_request_line_already_decides() {
        assert!(matches!(parsed("GET /v1/s"), Parsed::Partial));
        assert!(matches!(
            parsed("GET /v1/sse HTTP/1.1\r\nHost: x\r\n"),
            Parsed::Partial
        ));
        assert!(matches!(
            parsed("GET /v1/topics/a/events HTTP/1.1\r\nHo"),
            Parsed::Other
        ));
        assert!(matches!(parsed("POST /v1/sse HTTP/1.1\r\n"), Parsed::Other));
    }

    #[test]
    fn what_actix_answers_better_is_left_to_it() {
        for req in [
            "GET /v1/sse HTTP/1.0\r\n\r\n",
            "GET /v1/sse HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            "GET /v1/sse HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET /v1/sse/ HTTP/1.1\r\n\r\n",
            "GET /v1/sse HTTP/1.1\r\nBad Header: x\r\n\r\n",
            "\u{1}\u{2} garbage\r\n\r\n",
        ] {
            assert!(matches!(parsed(req), Parsed::Other), "{req:?}");
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        let req = format!("GET /v1/sse HTTP/1.1\r\n{many}\r\n");
        assert!(matches!(parsed(&req), Parsed::Other));
    }

    fn body(chunks: &[&'static str]) -> impl Stream<Item = Bytes> + Unpin {
        let items: Vec<Bytes> = chunks
            .iter()
            .map(|c| Bytes::from_static(c.as_bytes()))
            .collect();
        futures_util::stream::iter(items)
    }

    #[tokio::test]
    async fn a_body_is_written_chunked_after_the_head_and_ended() {
        let (mut server, mut client) = duplex(64);
        let (mut read, mut write) = tokio::io::split(&mut server);
        let head = BytesMut::from(&b"HEAD\r\n\r\n"[..]);
        let writing = drive(
            &mut write,
            Some(&mut read),
            body(&["retry: 1\n\n", "", "data: x\n\n"]),
            head,
            true,
        );
        let reading = async {
            let mut got = String::new();
            client.read_to_string(&mut got).await.unwrap();
            got
        };
        let ((), got) = tokio::join!(writing, reading);
        assert_eq!(
            got,
            "HEAD\r\n\r\nA\r\nretry: 1\n\n\r\n9\r\ndata: x\n\n\r\n0\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn a_stream_ends_when_the_client_leaves() {
        let (mut server, mut client) = duplex(1024);
        let (mut read, mut write) = tokio::io::split(&mut server);
        let pending = futures_util::stream::pending::<Bytes>();
        let writing = drive(
            &mut write,
            Some(&mut read),
            pending,
            BytesMut::from(&b"H"[..]),
            true,
        );
        let leaving = async {
            let mut first = [0; 1];
            client.read_exact(&mut first).await.unwrap();
            client.write_all(b"ignored").await.unwrap();
            client.shutdown().await.unwrap();
        };
        let ((), ()) = tokio::time::timeout(Duration::from_secs(5), async {
            tokio::join!(writing, leaving)
        })
        .await
        .expect("the stream ends once the client has left");
    }

    #[tokio::test]
    async fn an_upgraded_body_is_written_as_is() {
        let (mut server, mut client) = duplex(64);
        let writing = drive::<_, tokio::io::DuplexStream, _>(
            &mut server,
            None,
            body(&["\u{81}\u{2}hi", "\u{88}\u{0}"]),
            BytesMut::from(&b"101\r\n\r\n"[..]),
            false,
        );
        let reading = async {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        };
        let ((), got) = tokio::join!(writing, reading);
        assert_eq!(got, "101\r\n\r\n\u{81}\u{2}hi\u{88}\u{0}".as_bytes());
    }
}
