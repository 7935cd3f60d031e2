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
//! Requests of an [`AnswerRoute`] (long polls) are answered here too, one
//! after another on a kept-alive connection: a wave of wake-ups to 1,000
//! waiting polls is 1,000 responses at once, and actix-web's per-request
//! work (dispatcher, router, extractors, middleware) was most of what the
//! server spent on each. The route's own function answers on both paths,
//! errors included, so the responses are the same.
//!
//! Everything else goes to actix-http untouched: other routes (and every
//! request after one of them on the same connection), heads that are
//! malformed, too large or slow to arrive, and every stream request the
//! route refuses. A refused stream request is admitted again by the same
//! code behind actix-web, which answers the error with the usual JSON body,
//! CORS headers and metrics; so both paths answer alike.

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
    body::{BodySize, BodyStream, BoxBody, MessageBody},
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
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
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

/// A route whose requests are answered once, maybe after a long wait (long
/// polls): the front answers them itself, on a fresh connection and on every
/// kept-alive request after it, until a request of another route hands the
/// connection to actix-http. Its actix-web route must be mounted too (by the
/// service's own `configure`), calling the same `answer`.
#[derive(Clone, Copy)]
pub struct AnswerRoute {
    /// The route as actix-web names it (`http.route`, metrics labels).
    pub pattern: &'static str,
    /// Whether a request path (no query, not percent-decoded) is this route's.
    pub matches: fn(&str) -> bool,
    /// The answer to a `GET`: a sized body, or the error to answer.
    pub answer: Answer,
}

/// Answers an [`AnswerRoute`]'s request from its head.
pub type Answer =
    for<'a> fn(&'a Context, &'a RequestHead) -> LocalBoxFuture<'a, Result<HttpResponse, ApiError>>;

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
/// The buffer a head is first peeked into.
const HEAD_FIRST: usize = 1024;
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

/// One worker's front: the routes it serves and what serving them needs.
pub(crate) struct Front {
    ctx: Context,
    streams: Vec<StreamRoute>,
    answers: Vec<AnswerRoute>,
    /// How long the first bytes of a request may take (then actix, with
    /// its own request timeout, gets the connection).
    first_bytes: Duration,
}

/// A request the front serves, read from the peeked bytes.
struct Peeked {
    head: RequestHead,
    /// Bytes of the head on the socket.
    len: usize,
    route: Route,
}

#[derive(Clone, Copy)]
enum Route {
    Stream(StreamRoute),
    Answer(AnswerRoute),
}

enum Parsed {
    Served(Box<Peeked>),
    /// Not a request the front serves.
    Other,
    /// The head is not whole yet.
    Partial,
}

/// What comes next on a connection the front holds.
enum Next {
    Request(Box<Peeked>),
    /// A request for actix-http: the connection is handed over untouched.
    Other,
    /// The client left, stayed silent past the keep-alive, or the process is
    /// stopping: the connection is closed.
    Closed,
}

impl Front {
    pub(crate) fn new(
        ctx: Context,
        streams: Vec<StreamRoute>,
        answers: Vec<AnswerRoute>,
        first_bytes: Duration,
    ) -> Front {
        Front {
            ctx,
            streams,
            answers,
            first_bytes,
        }
    }

    /// Serves a connection: streams and answers here, anything else through
    /// `http`.
    pub(crate) async fn connection<H>(
        self: Rc<Self>,
        io: TcpStream,
        http: Rc<H>,
    ) -> Result<(), H::Error>
    where
        H: Service<(TcpStream, actix_http::Protocol, Option<SocketAddr>), Response = ()>,
    {
        let io = if self.streams.is_empty() && self.answers.is_empty() {
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

    /// Serves the connection's requests while they are the front's: answers
    /// one after another, then maybe a stream. Gives the connection back
    /// untouched (its next request not yet read) for anything else.
    async fn serve(self: Rc<Self>, mut io: TcpStream) -> Result<(), TcpStream> {
        // The head buffer, made once there is something to read: a
        // connection opened ahead of its first request holds none.
        let mut buf = Vec::new();
        // The last answered request's head, parsed into again: its header
        // map is a few KiB, which malloc and free cost on every poll.
        let mut spare = None;
        let mut kept = false;
        loop {
            let next = Box::pin(self.peek(&io, &mut buf, &mut spare, kept)).await;
            let peeked = match next {
                Next::Request(peeked) => *peeked,
                Next::Other => return Err(io),
                Next::Closed => return Ok(()),
            };
            match peeked.route {
                Route::Stream(route) => {
                    let stream = self.stream(io, &mut buf, peeked.head, peeked.len, route);
                    return Box::pin(stream).await;
                }
                Route::Answer(route) => {
                    let answered = self.answer(&mut io, &mut buf, &peeked, route);
                    if !Box::pin(answered).await {
                        return Ok(());
                    }
                    spare = Some(peeked.head);
                    kept = true;
                }
            }
        }
    }

    /// Serves a stream on the connection when the route admits it; gives
    /// the connection back untouched otherwise.
    async fn stream(
        self: Rc<Self>,
        mut io: TcpStream,
        buf: &mut [u8],
        head: RequestHead,
        len: usize,
        route: StreamRoute,
    ) -> Result<(), TcpStream> {
        let span = request_span(&head.method, route.path, &head.headers);
        let admitted = Box::pin((route.admit)(&self.ctx, &head))
            .instrument(span.clone())
            .await;
        let Ok(accepted) = admitted else {
            return Err(io);
        };
        if !consume(&mut io, buf, len).await {
            return Ok(());
        }
        let (mut response, body) = match accepted {
            Accepted::Stream(response, body) => (response, Body::Stream(body)),
            Accepted::Upgrade(response, opener) => (response, Body::Upgrade(opener)),
        };
        let direct = &self.ctx.metrics.streams_direct;
        self.finish(span, route.path, direct, &head, &mut response);
        let framing = match body {
            Body::Stream(_) => Framing::Chunked,
            Body::Upgrade(_) => Framing::Upgrade,
        };
        let start = response_head(&response, framing);
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

    /// Records a response the front writes (its span, `rt_http_requests_total`
    /// and `direct`) and adds the CORS headers the request's origin gets.
    fn finish(
        &self,
        span: tracing::Span,
        route: &str,
        direct: &prometheus::IntCounterVec,
        request: &RequestHead,
        response: &mut HttpResponse<()>,
    ) {
        request_done(&span, Some(&self.ctx.metrics), route, response.status());
        direct.with_label_values(&[route]).inc();
        let cors = cors_allow(&self.ctx.settings.cors_origins, &request.headers);
        if let Some((origin, credentials)) = cors {
            crate::server::put_cors_headers(response.headers_mut(), &origin, credentials);
        }
    }

    /// Answers one request of `route` on the socket; true when the
    /// connection stays open for the next one.
    async fn answer(
        &self,
        io: &mut TcpStream,
        buf: &mut [u8],
        peeked: &Peeked,
        route: AnswerRoute,
    ) -> bool {
        let Peeked { head, len, .. } = peeked;
        if !consume(io, buf, *len).await {
            return false;
        }
        let span = request_span(&head.method, route.pattern, &head.headers);
        let answering = (route.answer)(&self.ctx, head).instrument(span.clone());
        let answered = tokio::select! {
            // An answer at hand is written without a look at the socket.
            biased;
            answered = answering => answered,
            // A client that leaves mid-wait frees what its request holds.
            () = client_gone(io) => return false,
        };
        let (mut response, body) = match answered {
            Ok(response) => sized(response),
            Err(e) => sized(actix_web::ResponseError::error_response(&e)),
        };
        let direct = &self.ctx.metrics.requests_direct;
        self.finish(span, route.pattern, direct, head, &mut response);
        let close = wants_close(head) || self.ctx.shutdown.is_started();
        let mut out = response_head(
            &response,
            Framing::Sized(body.as_ref().map(Bytes::len), close),
        );
        if let Some(body) = body {
            out.put_slice(&body);
        }
        io.write_all(&out).await.is_ok() && !close
    }

    /// Waits for the connection's next request head, and reads it when it is
    /// a request the front serves. `kept`: a request was answered on the
    /// connection already, which then closes rather than going to actix-http
    /// when nothing comes within the keep-alive, the client leaves or the
    /// process stops.
    async fn peek(
        &self,
        io: &TcpStream,
        buf: &mut Vec<u8>,
        spare: &mut Option<RequestHead>,
        kept: bool,
    ) -> Next {
        let not_served = || if kept { Next::Closed } else { Next::Other };
        let first = tokio::time::timeout(self.first_bytes, io.readable());
        let ready = if kept {
            tokio::select! {
                ready = first => ready,
                () = self.ctx.shutdown.started() => return Next::Closed,
            }
        } else {
            first.await
        };
        if !matches!(ready, Ok(Ok(()))) {
            return not_served();
        }
        // Most heads fit the first size; a larger one is peeked at again.
        if buf.is_empty() {
            buf.resize(HEAD_FIRST, 0);
        }
        let Ok(mut seen) = io.peek(buf).await else {
            return not_served();
        };
        let deadline = tokio::time::Instant::now() + HEAD_WAIT;
        loop {
            if seen == 0 {
                return not_served();
            }
            match parse(&self.streams, &self.answers, &buf[..seen], spare) {
                Parsed::Served(peeked) => return Next::Request(peeked),
                Parsed::Other => return Next::Other,
                Parsed::Partial if seen == HEAD_LIMIT => return Next::Other,
                Parsed::Partial if seen == buf.len() => buf.resize(HEAD_LIMIT, 0),
                Parsed::Partial => {
                    if tokio::time::Instant::now() >= deadline {
                        return Next::Other;
                    }
                    tokio::time::sleep(PEEK_AGAIN).await;
                }
            }
            seen = match io.peek(buf).await {
                Ok(seen) => seen,
                Err(_) => return not_served(),
            };
        }
    }
}

/// A response's head, and its body as bytes (`None`: a status without a
/// body, `204` and `304`, whose head has no `content-length` either, as
/// actix-http writes them). A body that is not sized is a route's bug:
/// answered as an internal error.
fn sized(response: HttpResponse) -> (HttpResponse<()>, Option<Bytes>) {
    let (response, body) = response.into_parts();
    let bodiless = matches!(
        response.status(),
        StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED
    );
    if bodiless || matches!(body.size(), BodySize::None) {
        return (response, None);
    }
    match body.try_into_bytes() {
        Ok(bytes) => (response, Some(bytes)),
        Err(_) => {
            let e = ApiError::internal(anyhow::anyhow!("an answer route returned a streamed body"));
            let (response, body) = actix_web::ResponseError::error_response(&e).into_parts();
            (response, Some(body.try_into_bytes().unwrap_or_default()))
        }
    }
}

/// Reads the request head of `len` bytes off the socket, into `buf` (which
/// it was peeked into, so it is there to be read); false when the socket
/// failed.
async fn consume(io: &mut TcpStream, buf: &mut [u8], len: usize) -> bool {
    io.read_exact(&mut buf[..len]).await.is_ok()
}

/// Whether the client asked to close the connection after this request.
fn wants_close(head: &RequestHead) -> bool {
    head.headers
        .get_all("connection")
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("close"))
}

/// Resolves when the client has closed its side (or the socket failed).
/// Bytes waiting to be read (a pipelined request) mean the client is still
/// there: then it never resolves.
async fn client_gone(io: &TcpStream) {
    let mut byte = [0; 1];
    match io.peek(&mut byte).await {
        Ok(0) | Err(_) => {}
        Ok(_) => std::future::pending().await,
    }
}

/// Reads `bytes` as the next request on a connection: a request the front
/// serves, whole, or not one, or not known yet. A served request's head is
/// `spare` (a previous request's, cleared) when there is one.
fn parse(
    streams: &[StreamRoute],
    answers: &[AnswerRoute],
    bytes: &[u8],
    spare: &mut Option<RequestHead>,
) -> Parsed {
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
    let stream = streams
        .iter()
        .find(|r| r.path == path)
        .map(|r| Route::Stream(*r));
    let route = stream.or_else(|| {
        answers
            .iter()
            .find(|r| (r.matches)(path))
            .map(|r| Route::Answer(*r))
    });
    let Some(route) = route else {
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
    let mut head = spare.take().unwrap_or_default();
    head.headers.clear();
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
        || head.headers.contains_key("expect")
        || head
            .headers
            .get("content-length")
            .is_some_and(|v| v.as_bytes() != b"0");
    if has_body {
        return Parsed::Other;
    }
    Parsed::Served(Box::new(Peeked { head, len, route }))
}

/// How a response's body follows its head.
#[derive(Clone, Copy)]
enum Framing {
    /// Chunks until the stream ends.
    Chunked,
    /// A switch of protocols (`101`).
    Upgrade,
    /// A body of this many bytes (none: a status without one), and whether
    /// the connection closes after it.
    Sized(Option<usize>, bool),
}

/// The status line and headers, with `date`, and the framing headers as
/// actix-http writes them: `transfer-encoding` for a chunked body,
/// `connection` for a switch, `content-length` (and `connection: close`)
/// for a sized one.
fn response_head(response: &HttpResponse<()>, framing: Framing) -> BytesMut {
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
    match framing {
        Framing::Chunked => out.put_slice(b"transfer-encoding: chunked\r\n"),
        // actix-http writes this from the response's connection type.
        Framing::Upgrade => out.put_slice(b"connection: upgrade\r\n"),
        Framing::Sized(len, close) => {
            if let Some(len) = len {
                // unwrap: writing into a BytesMut cannot fail
                write!(out, "content-length: {len}\r\n").expect("BytesMut grows");
            }
            if close {
                out.put_slice(b"connection: close\r\n");
            }
        }
    }
    out.put_slice(b"date: ");
    put_date(&mut out);
    out.put_slice(b"\r\n\r\n");
    out
}

thread_local! {
    /// The `date` header's value for the current second, formatted once per
    /// second per thread (a wave of poll answers writes thousands a second).
    static DATE: std::cell::RefCell<(i64, String)> = const {
        std::cell::RefCell::new((i64::MIN, String::new()))
    };
}

/// Appends the HTTP date of now (`Tue, 01 Dec 2026 19:31:26 GMT`).
fn put_date(out: &mut BytesMut) {
    let now = chrono::Utc::now();
    DATE.with_borrow_mut(|(second, formatted)| {
        if *second != now.timestamp() {
            *second = now.timestamp();
            formatted.clear();
            // unwrap: writing into a String cannot fail
            write!(formatted, "{}", now.format("%a, %d %b %Y %H:%M:%S GMT")).expect("String grows");
        }
        out.put_slice(formatted.as_bytes());
    });
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
    use tokio::io::duplex;

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

    fn nothing<'a>(
        _: &'a Context,
        _: &'a RequestHead,
    ) -> LocalBoxFuture<'a, Result<HttpResponse, ApiError>> {
        Box::pin(async { Ok(HttpResponse::NoContent().finish()) })
    }

    const ANSWERS: &[AnswerRoute] = &[AnswerRoute {
        pattern: "/v1/things/{thing}",
        matches: |path| path.starts_with("/v1/things/"),
        answer: nothing,
    }];

    fn parsed(bytes: &str) -> Parsed {
        parse(ROUTES, ANSWERS, bytes.as_bytes(), &mut None)
    }

    fn served(bytes: &str) -> Peeked {
        match parsed(bytes) {
            Parsed::Served(p) => *p,
            _ => panic!("not a request the front serves: {bytes:?}"),
        }
    }

    #[test]
    fn a_whole_stream_request_is_read_with_its_length() {
        let req = "GET /v1/sse?topic=a HTTP/1.1\r\nHost: x\r\nLast-Event-ID: a:3\r\n\r\n";
        let p = served(&format!("{req}trailing"));
        assert_eq!(p.len, req.len());
        assert!(matches!(p.route, Route::Stream(r) if r.path == "/v1/sse"));
        assert_eq!(p.head.uri.query(), Some("topic=a"));
        assert_eq!(p.head.headers.get("last-event-id").unwrap(), "a:3");
    }

    #[test]
    fn a_spare_head_is_parsed_into_with_nothing_of_the_request_before() {
        let first = served(
            "GET /v1/things/a?x=1 HTTP/1.1\r\nIf-None-Match: \"e\"\r\nConnection: close\r\n\r\n",
        );
        let mut spare = Some(first.head);
        let next = "GET /v1/things/b HTTP/1.1\r\nHost: y\r\n\r\n";
        let Parsed::Served(p) = parse(ROUTES, ANSWERS, next.as_bytes(), &mut spare) else {
            panic!("not served: {next:?}");
        };
        assert!(spare.is_none(), "the spare head was not used");
        assert_eq!(p.head.uri.path(), "/v1/things/b");
        assert_eq!(p.head.uri.query(), None);
        let names: Vec<_> = p.head.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["host"]);
        assert!(!wants_close(&p.head));
    }

    #[test]
    fn a_request_of_an_answer_route_is_read_with_its_length() {
        let req = "GET /v1/things/a?wait=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        let p = served(&format!("{req}GET /next"));
        assert_eq!(p.len, req.len());
        assert!(matches!(p.route, Route::Answer(r) if r.pattern == "/v1/things/{thing}"));
        assert_eq!(p.head.uri.path(), "/v1/things/a");
        assert!(wants_close(&p.head));
        for other in [
            "POST /v1/things/a HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            "HEAD /v1/things/a HTTP/1.1\r\n\r\n",
            "GET /v1/things/a HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            "GET /v1/other HTTP/1.1\r\n\r\n",
        ] {
            assert!(matches!(parsed(other), Parsed::Other), "{other:?}");
        }
        let kept = served("GET /v1/things/b HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\n\r\n");
        assert!(!wants_close(&kept.head));
    }

    #[test]
    fn a_sized_head_carries_its_length_and_a_close() {
        let ok = HttpResponse::Ok()
            .content_type("application/json")
            .finish()
            .drop_body();
        let head = response_head(&ok, Framing::Sized(Some(12), false));
        let head = std::str::from_utf8(&head).unwrap();
        assert!(
            head.starts_with(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 12\r\ndate: "
            ),
            "{head}"
        );
        assert!(head.ends_with(" GMT\r\n\r\n"), "{head}");
        assert!(!head.contains("connection"), "{head}");
        let none = HttpResponse::NoContent().finish().drop_body();
        let head = response_head(&none, Framing::Sized(None, true));
        let head = std::str::from_utf8(&head).unwrap();
        assert!(
            head.starts_with("HTTP/1.1 204 No Content\r\nconnection: close\r\ndate: "),
            "{head}"
        );
    }

    #[test]
    fn an_answer_body_is_taken_as_bytes_or_as_none() {
        let (head, body) = sized(HttpResponse::Ok().body("{}"));
        assert_eq!(head.status(), StatusCode::OK);
        assert_eq!(body.as_deref(), Some(&b"{}"[..]));
        let (_, empty) = sized(HttpResponse::Ok().finish());
        assert_eq!(empty.as_deref(), Some(&b""[..]));
        let (_, none) = sized(HttpResponse::NotModified().finish());
        assert_eq!(none, None, "a 304 has no body and no length");
        let streamed = futures_util::stream::iter([Ok::<_, Infallible>(Bytes::from_static(b"x"))]);
        let (head, body) = sized(HttpResponse::Ok().streaming(streamed));
        assert_eq!(head.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(String::from_utf8_lossy(&body.unwrap()).contains("\"internal\""));
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
