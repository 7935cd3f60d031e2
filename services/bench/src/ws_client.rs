//! The bench's WebSocket client for subscribed sockets, by hand, as the SSE
//! one is (see `sse_client`): client and server share the machine's two
//! cores, so what the client spends per event is taken from the server. A
//! general-purpose client (a message enum, a frame parsed into an owned
//! buffer, then a UTF-8 string) costs the bench about half as much again
//! per event as the SSE client does. This one holds one socket and two
//! reused buffers per socket and allocates nothing per event:
//!
//! - the opening handshake of RFC 6455 (section 4): a `GET` with a fresh
//!   `Sec-WebSocket-Key`, a `101` whose `Sec-WebSocket-Accept` must match;
//!   any other answer is an error carrying its status line and body;
//! - frames (section 5): the server's come unmasked, with 7-, 16- or 64-bit
//!   lengths; a fragmented message is joined; a ping is answered with a
//!   pong, pongs are skipped; a close is answered with a close and handed
//!   to the caller with its code and reason;
//! - the client's frames are masked, each with a fresh random key.

use std::net::SocketAddr;

use anyhow::Context as _;
use rand_core::{OsRng, RngCore as _};
use tokio::{io::AsyncWriteExt, net::TcpStream};
use tokio_tungstenite::tungstenite::handshake::{client::generate_key, derive_accept_key};

use crate::{
    http1::{Opened, header_value},
    sse_client::{TransportError, read_more},
};

/// Largest message accepted (the server's frames are small; a bigger one
/// means a framing error, not an event).
const LARGEST_MESSAGE: usize = 16 * 1024 * 1024;

pub(crate) const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CONTINUATION: u8 = 0x0;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

/// One open WebSocket.
pub(crate) struct WsStream {
    socket: TcpStream,
    /// Bytes read and not yet taken; frames are cut from `wire[start..]`.
    wire: Vec<u8>,
    start: usize,
    /// A fragmented message being joined, and its opcode.
    message: Vec<u8>,
    message_op: Option<u8>,
}

/// A message the caller sees; pings and pongs are handled inside.
#[derive(Debug, PartialEq)]
pub(crate) enum Incoming<'a> {
    /// A text message (its UTF-8 is the caller's to check).
    Text(&'a [u8]),
    /// A binary message.
    Binary(&'a [u8]),
    /// The server closed: its code and reason, if it gave them. The close
    /// was answered; the socket is done.
    Close(Option<(u16, String)>),
}

/// One frame's header, once whole in the buffer.
struct Header {
    fin: bool,
    op: u8,
    /// Where the payload starts, from the frame's first byte.
    payload_at: usize,
    len: usize,
}

impl WsStream {
    /// Connects to `addr` and opens a WebSocket on `path`.
    pub(crate) async fn open(addr: SocketAddr, path: &str) -> anyhow::Result<WsStream> {
        let key = generate_key();
        let request = format!(
            "GET {path} HTTP/1.1\r\nhost: {addr}\r\nupgrade: websocket\r\n\
             connection: Upgrade\r\nsec-websocket-key: {key}\r\n\
             sec-websocket-version: 13\r\n\r\n"
        );
        let opened = Opened::request(addr, &request).await?;
        if opened.head()?.status != 101 {
            let refusal = opened.refusal().await;
            anyhow::bail!("the WebSocket handshake was answered {refusal}");
        }
        let Opened {
            socket,
            wire,
            head_end,
        } = opened;
        let head = std::str::from_utf8(&wire[..head_end]).unwrap_or_default();
        let accept = header_value(head, "sec-websocket-accept");
        let expected = derive_accept_key(key.as_bytes());
        anyhow::ensure!(
            accept == Some(expected.as_str()),
            "the 101 carries Sec-WebSocket-Accept {accept:?}, not {expected:?}"
        );
        // Frames the server sent right after its head stay in the buffer.
        Ok(WsStream {
            socket,
            wire,
            start: head_end,
            message: Vec::new(),
            message_op: None,
        })
    }

    /// Sends a text message, in one masked frame.
    pub(crate) async fn send_text(&mut self, text: &[u8]) -> anyhow::Result<()> {
        self.send(TEXT, text).await
    }

    /// The next message; `None` when the connection ended without a close.
    /// A read error is returned as a [`TransportError`], so the caller can
    /// tell a broken connection (see `sse_client::is_transport`) from a
    /// server that broke the protocol.
    pub(crate) async fn next(&mut self) -> anyhow::Result<Option<Incoming<'_>>> {
        // Where the message is, found first and lent after the loop.
        let (op, joined, from, to) = loop {
            let Some(h) = parse_header(&self.wire[self.start..])? else {
                if !self.fill().await? {
                    return Ok(None);
                }
                continue;
            };
            if self.wire.len() - self.start < h.payload_at + h.len {
                if !self.fill().await? {
                    return Ok(None);
                }
                continue;
            }
            let from = self.start + h.payload_at;
            let to = from + h.len;
            self.start = to;
            match h.op {
                PING => {
                    let payload = self.wire[from..to].to_vec();
                    self.send(PONG, &payload).await?;
                }
                PONG => {}
                CLOSE => {
                    let payload = &self.wire[from..to];
                    let close = match payload {
                        [] => None,
                        [_] => anyhow::bail!("a close frame with a one-byte payload"),
                        [hi, lo, reason @ ..] => Some((
                            u16::from_be_bytes([*hi, *lo]),
                            String::from_utf8_lossy(reason).into_owned(),
                        )),
                    };
                    // Echo the code, as the protocol asks; the socket is
                    // done either way, so a failed write changes nothing.
                    let echo = payload.get(..2).unwrap_or_default().to_vec();
                    let _ = self.send(CLOSE, &echo).await;
                    return Ok(Some(Incoming::Close(close)));
                }
                TEXT | BINARY if self.message_op.is_some() => {
                    anyhow::bail!("a new message began inside a fragmented one")
                }
                TEXT | BINARY if h.fin => break (h.op, false, from, to),
                TEXT | BINARY => {
                    self.message.clear();
                    self.message.extend_from_slice(&self.wire[from..to]);
                    self.message_op = Some(h.op);
                }
                CONTINUATION => {
                    let op = self
                        .message_op
                        .context("a continuation frame outside a fragmented message")?;
                    anyhow::ensure!(
                        self.message.len() + h.len <= LARGEST_MESSAGE,
                        "a fragmented message over {LARGEST_MESSAGE} bytes"
                    );
                    self.message.extend_from_slice(&self.wire[from..to]);
                    if h.fin {
                        self.message_op = None;
                        break (op, true, 0, self.message.len());
                    }
                }
                other => anyhow::bail!("a frame with the reserved opcode {other:#x}"),
            }
        };
        let data = match joined {
            true => &self.message[from..to],
            false => &self.wire[from..to],
        };
        Ok(Some(match op {
            TEXT => Incoming::Text(data),
            _ => Incoming::Binary(data),
        }))
    }

    /// Reads from the socket once; false when the connection ended.
    async fn fill(&mut self) -> anyhow::Result<bool> {
        // Move the unread part to the front before the buffer grows.
        if self.start > 0 {
            self.wire.drain(..self.start);
            self.start = 0;
        }
        Ok(read_more(&mut self.socket, &mut self.wire).await? > 0)
    }

    /// Writes one frame, final and masked.
    async fn send(&mut self, op: u8, payload: &[u8]) -> anyhow::Result<()> {
        let mut mask = [0; 4];
        OsRng.fill_bytes(&mut mask);
        let frame = masked_frame(op, payload, mask);
        self.socket
            .write_all(&frame)
            .await
            .map_err(TransportError)?;
        Ok(())
    }
}

/// The header of the frame at the start of `buf`, once it is whole there.
fn parse_header(buf: &[u8]) -> anyhow::Result<Option<Header>> {
    let [b0, b1, rest @ ..] = buf else {
        return Ok(None);
    };
    let (fin, op) = (b0 & 0x80 != 0, b0 & 0x0F);
    anyhow::ensure!(b0 & 0x70 == 0, "a frame with reserved bits set ({b0:#x})");
    anyhow::ensure!(b1 & 0x80 == 0, "a masked frame from the server");
    let (len, payload_at) = match b1 & 0x7F {
        126 => match rest {
            [a, b, ..] => (u64::from(u16::from_be_bytes([*a, *b])), 4),
            _ => return Ok(None),
        },
        127 => match rest.get(..8) {
            Some(bytes) => {
                let mut be = [0; 8];
                be.copy_from_slice(bytes);
                (u64::from_be_bytes(be), 10)
            }
            None => return Ok(None),
        },
        short => (u64::from(short), 2),
    };
    if op >= CLOSE {
        anyhow::ensure!(fin, "a fragmented control frame (opcode {op:#x})");
        anyhow::ensure!(len <= 125, "a control frame of {len} bytes");
    }
    anyhow::ensure!(
        len <= LARGEST_MESSAGE as u64,
        "a frame of {len} bytes (over {LARGEST_MESSAGE})"
    );
    Ok(Some(Header {
        fin,
        op,
        payload_at,
        len: len as usize,
    }))
}

/// Appends the head of a final frame of `op` carrying `len` bytes: the
/// mask bit set for a client's frame (its key follows), not for a server's.
pub(crate) fn put_frame_head(frame: &mut Vec<u8>, op: u8, len: usize, masked: bool) {
    let mask_bit = if masked { 0x80 } else { 0 };
    frame.push(0x80 | op);
    match len {
        0..=125 => frame.push(mask_bit | len as u8),
        126..=0xFFFF => {
            frame.push(mask_bit | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            frame.push(mask_bit | 127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
}

/// A final client frame: head, mask key, masked payload.
fn masked_frame(op: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(payload.len() + 14);
    put_frame_head(&mut frame, op, payload.len(), true);
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    frame
}

#[cfg(test)]
mod tests {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio::{io::AsyncReadExt as _, net::TcpListener};
    use tokio_tungstenite::tungstenite::{
        Message,
        protocol::{
            CloseFrame,
            frame::{
                Frame,
                coding::{CloseCode, Data, OpCode},
            },
        },
    };

    use super::*;

    /// A WebSocket server (another implementation) that runs `script` on
    /// the first socket it accepts.
    async fn serve<F, Fut>(script: F) -> (SocketAddr, tokio::task::JoinHandle<()>)
    where
        F: FnOnce(tokio_tungstenite::WebSocketStream<TcpStream>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (io, _) = listener.accept().await.unwrap();
            let ws = tokio_tungstenite::accept_async(io).await.unwrap();
            script(ws).await;
        });
        (addr, task)
    }

    #[tokio::test]
    async fn messages_of_every_length_form_come_out_whole_and_the_client_is_read() {
        let big = "x".repeat(70_000);
        let sent = big.clone();
        let (addr, server) = serve(move |mut ws| async move {
            for text in ["short", &"m".repeat(300), &sent] {
                ws.send(Message::text(text)).await.unwrap();
            }
            ws.send(Message::binary(vec![1, 2, 3])).await.unwrap();
            // What the client sends arrives unmasked by the server, intact.
            let got = ws.next().await.unwrap().unwrap();
            assert_eq!(got, Message::text(r#"{"op":"subscribe"}"#));
        })
        .await;
        let mut ws = WsStream::open(addr, "/v1/ws").await.unwrap();
        let expect = [b"short".to_vec(), vec![b'm'; 300], big.into_bytes()];
        for want in expect {
            assert_eq!(ws.next().await.unwrap(), Some(Incoming::Text(&want[..])));
        }
        assert_eq!(
            ws.next().await.unwrap(),
            Some(Incoming::Binary(&[1, 2, 3][..]))
        );
        ws.send_text(br#"{"op":"subscribe"}"#).await.unwrap();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn fragments_are_joined_pings_answered_and_a_close_reported() {
        let (addr, server) = serve(|mut ws| async move {
            let part = |data: &str, op, fin| {
                Message::Frame(Frame::message(data.as_bytes().to_vec(), op, fin))
            };
            ws.send(part("hel", OpCode::Data(Data::Text), false))
                .await
                .unwrap();
            ws.send(Message::Ping(b"p1".to_vec().into())).await.unwrap();
            ws.send(part("lo", OpCode::Data(Data::Continue), true))
                .await
                .unwrap();
            // The ping came back as a pong, with its payload.
            let got = ws.next().await.unwrap().unwrap();
            assert_eq!(got, Message::Pong(b"p1".to_vec().into()));
            ws.close(Some(CloseFrame {
                code: CloseCode::Policy,
                reason: "too slow".into(),
            }))
            .await
            .unwrap();
            // The close was echoed.
            while let Some(Ok(m)) = ws.next().await {
                if let Message::Close(frame) = m {
                    assert_eq!(frame.map(|f| f.code), Some(CloseCode::Policy));
                    return;
                }
            }
            panic!("the client did not answer the close");
        })
        .await;
        let mut ws = WsStream::open(addr, "/").await.unwrap();
        assert_eq!(
            ws.next().await.unwrap(),
            Some(Incoming::Text(&b"hello"[..]))
        );
        assert_eq!(
            ws.next().await.unwrap(),
            Some(Incoming::Close(Some((1008, "too slow".to_owned()))))
        );
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_refused_handshake_is_an_error_with_its_status_and_body() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut io, _) = listener.accept().await.unwrap();
            let mut buf = [0; 1024];
            let _ = io.read(&mut buf).await;
            let body = r#"{"error":"unauthorized"}"#;
            let reply = format!(
                "HTTP/1.1 401 Unauthorized\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            io.write_all(reply.as_bytes()).await.unwrap();
        });
        let err = WsStream::open(addr, "/v1/ws").await.err().unwrap();
        let msg = format!("{err:#}");
        assert!(msg.contains("401") && msg.contains("unauthorized"), "{msg}");
    }

    #[test]
    fn bad_frames_are_refused_and_partial_ones_wait() {
        assert!(parse_header(&[0x81]).unwrap().is_none());
        assert!(parse_header(&[0x81, 126, 0]).unwrap().is_none());
        assert!(parse_header(&[0x81, 127, 0, 0, 0]).unwrap().is_none());
        let h = parse_header(&[0x81, 126, 0x01, 0x00]).unwrap().unwrap();
        assert_eq!((h.fin, h.op, h.payload_at, h.len), (true, TEXT, 4, 256));
        for (bytes, says) in [
            (&[0x81, 0x85][..], "masked"),
            (&[0xC1, 0x05][..], "reserved bits"),
            (&[0x09, 0x00][..], "fragmented control"),
            (&[0x89, 126, 0, 200][..], "control frame of 200"),
        ] {
            let err = parse_header(bytes).err().unwrap().to_string();
            assert!(err.contains(says), "{bytes:?}: {err}");
        }
    }

    #[test]
    fn client_frames_are_masked_with_their_key() {
        let frame = masked_frame(TEXT, b"abcd", [1, 2, 3, 4]);
        assert_eq!(
            frame,
            [
                0x81,
                0x84,
                1,
                2,
                3,
                4,
                b'a' ^ 1,
                b'b' ^ 2,
                b'c' ^ 3,
                b'd' ^ 4
            ]
        );
        let long = masked_frame(TEXT, &[0; 300], [0; 4]);
        assert_eq!(&long[..4], &[0x81, 0x80 | 126, 0x01, 0x2C]);
    }
}
