//! Client → server WebSocket messages, read from the request payload with
//! actix-http's frame parser, fragments joined.
//!
//! actix-ws's `MessageStream` stops reading once the response body it made
//! is dropped, and this edge writes its own body (see [`crate::outbox`]),
//! hence this reader. It keeps actix-ws's outcomes, which the close codes
//! depend on: a frame over the frame limit is [`ProtocolError::Overflow`]
//! (close 1009), everything else that is wrong another [`ProtocolError`]
//! (close 1002), with the same messages.

use std::{
    future::poll_fn,
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use actix_http::ws::{CloseReason, OpCode, Parser, ProtocolError};
use actix_web::error::PayloadError;
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use futures_util::Stream;

/// A client message, its fragments joined.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Incoming {
    Text(ByteString),
    /// Binary messages are refused, so only their size is kept.
    Binary(usize),
    Ping(Bytes),
    Pong,
    Close(Option<CloseReason>),
}

/// A fragmented message being joined.
struct Partial {
    text: bool,
    /// Bytes of every fragment so far (binary ones are counted, not kept).
    size: usize,
    data: BytesMut,
}

pub(crate) struct Reader<S> {
    payload: S,
    /// Bytes read but not yet parsed; empty (no allocation) between frames
    /// on a quiet socket.
    buf: BytesMut,
    max_frame: usize,
    max_message: usize,
    partial: Option<Partial>,
    /// The payload ended or failed: nothing more to read.
    ended: bool,
}

impl<S> Reader<S>
where
    S: Stream<Item = Result<Bytes, PayloadError>> + Unpin,
{
    /// Frames over `max_frame` payload bytes are refused as soon as their
    /// header is read, fragmented messages once their fragments add up to
    /// more than `max_message`.
    pub(crate) fn new(payload: S, max_frame: usize, max_message: usize) -> Reader<S> {
        Reader {
            payload,
            buf: BytesMut::new(),
            max_frame,
            max_message,
            partial: None,
            ended: false,
        }
    }

    /// The next message, or `None` once the client's side is closed or after
    /// an error (the socket is to be closed then).
    ///
    /// Cancel-safe: everything read so far is kept in the reader.
    pub(crate) async fn recv(&mut self) -> Option<Result<Incoming, ProtocolError>> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Incoming, ProtocolError>>> {
        loop {
            match self.parse() {
                Ok(Some(message)) => return Poll::Ready(Some(Ok(message))),
                Ok(None) => {}
                Err(e) => {
                    self.stop();
                    return Poll::Ready(Some(Err(e)));
                }
            }
            if self.ended {
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut self.payload).poll_next(cx)) {
                Some(Ok(chunk)) if self.buf.is_empty() => self.buf = BytesMut::from(chunk),
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                Some(Err(e)) => {
                    self.stop();
                    return Poll::Ready(Some(Err(ProtocolError::Io(io::Error::other(e)))));
                }
                None => self.ended = true,
            }
        }
    }

    /// After an error nothing read is trusted: the next call returns `None`.
    fn stop(&mut self) {
        self.ended = true;
        self.buf = BytesMut::new();
        self.partial = None;
    }

    /// Parses the frames at hand until one completes a message.
    fn parse(&mut self) -> Result<Option<Incoming>, ProtocolError> {
        loop {
            let Some((fin, opcode, payload)) = Parser::parse(&mut self.buf, true, self.max_frame)?
            else {
                self.check_pending_frame()?;
                if self.buf.is_empty() {
                    // Frees the last chunk's allocation while the socket idles.
                    self.buf = BytesMut::new();
                }
                return Ok(None);
            };
            let payload = payload.unwrap_or_default();
            if let Some(message) = self.frame(fin, opcode, payload)? {
                return Ok(Some(message));
            }
        }
    }

    /// Refuses a frame whose header announces more than the limit before its
    /// payload arrives, rather than buffering all of it first.
    fn check_pending_frame(&self) -> Result<(), ProtocolError> {
        let declared = match self.buf.get(1).map(|b| b & 0x7f) {
            Some(126) if self.buf.len() >= 4 => {
                u64::from(u16::from_be_bytes([self.buf[2], self.buf[3]]))
            }
            Some(127) if self.buf.len() >= 10 => {
                let mut len = [0u8; 8];
                len.copy_from_slice(&self.buf[2..10]);
                u64::from_be_bytes(len)
            }
            Some(len @ 0..=125) => u64::from(len),
            _ => return Ok(()),
        };
        if !usize::try_from(declared).is_ok_and(|len| len <= self.max_frame) {
            return Err(ProtocolError::Overflow);
        }
        Ok(())
    }

    /// One frame: a whole message, a fragment (joined), or a control frame
    /// (which may come between fragments). The fragment rules are those of
    /// actix-http's `Codec`, with its errors.
    fn frame(
        &mut self,
        fin: bool,
        opcode: OpCode,
        payload: BytesMut,
    ) -> Result<Option<Incoming>, ProtocolError> {
        match (opcode, fin) {
            (OpCode::Text | OpCode::Binary, _) if self.partial.is_some() => {
                Err(ProtocolError::ContinuationStarted)
            }
            (OpCode::Text, true) => text(payload.freeze()).map(Some),
            (OpCode::Binary, true) => Ok(Some(Incoming::Binary(payload.len()))),
            (OpCode::Text | OpCode::Binary, false) => {
                self.partial = Some(Partial {
                    text: opcode == OpCode::Text,
                    size: 0,
                    data: BytesMut::new(),
                });
                self.join(payload)?;
                Ok(None)
            }
            (OpCode::Continue, _) if self.partial.is_none() => {
                Err(ProtocolError::ContinuationNotStarted)
            }
            (OpCode::Continue, false) => {
                self.join(payload)?;
                Ok(None)
            }
            (OpCode::Continue, true) => {
                self.join(payload)?;
                let Some(whole) = self.partial.take() else {
                    return Err(ProtocolError::ContinuationNotStarted);
                };
                if whole.text {
                    text(whole.data.freeze()).map(Some)
                } else {
                    Ok(Some(Incoming::Binary(whole.size)))
                }
            }
            (_, false) => Err(ProtocolError::ContinuationFragment(opcode)),
            (OpCode::Ping, true) => Ok(Some(Incoming::Ping(payload.freeze()))),
            (OpCode::Pong, true) => Ok(Some(Incoming::Pong)),
            (OpCode::Close, true) => Parser::try_parse_close_payload(&payload)
                .map(|reason| Some(Incoming::Close(reason))),
            (OpCode::Bad, true) => Err(ProtocolError::BadOpCode),
        }
    }

    fn join(&mut self, fragment: BytesMut) -> Result<(), ProtocolError> {
        let Some(partial) = self.partial.as_mut() else {
            return Err(ProtocolError::ContinuationNotStarted);
        };
        partial.size += fragment.len();
        if partial.size > self.max_message {
            self.partial = None;
            return Err(ProtocolError::Io(io::Error::other(
                "Exceeded maximum continuation size",
            )));
        }
        if partial.text {
            if partial.data.is_empty() {
                partial.data = fragment;
            } else {
                partial.data.extend_from_slice(&fragment);
            }
        }
        Ok(())
    }
}

fn text(bytes: Bytes) -> Result<Incoming, ProtocolError> {
    ByteString::try_from(bytes)
        .map(Incoming::Text)
        .map_err(|e| ProtocolError::Io(io::Error::new(io::ErrorKind::InvalidData, e)))
}

#[cfg(test)]
mod tests {
    use actix_http::ws::CloseCode;
    use futures_util::stream;

    use super::*;

    /// A client frame as a browser sends it: masked, with a mask that is
    /// not all zeroes so that unmasking is exercised.
    fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut frame = vec![first];
        match payload.len() {
            len @ 0..=125 => frame.push(0x80 | len as u8),
            len @ 126..=65535 => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(len as u16).to_be_bytes());
            }
            len => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        frame
    }

    type Chunks = stream::Iter<std::vec::IntoIter<Result<Bytes, PayloadError>>>;

    /// A reader over `chunks`, as the socket delivered them.
    fn reader(chunks: Vec<Vec<u8>>, max: usize) -> Reader<Chunks> {
        let chunks: Vec<_> = chunks.into_iter().map(|c| Ok(Bytes::from(c))).collect();
        Reader::new(stream::iter(chunks), max, max)
    }

    async fn all(mut r: Reader<Chunks>) -> Vec<Result<Incoming, String>> {
        let mut out = Vec::new();
        while let Some(m) = r.recv().await {
            out.push(m.map_err(|e| e.to_string()));
        }
        out
    }

    #[tokio::test]
    async fn a_text_frame_is_a_message() {
        let got = all(reader(vec![masked(0x81, br#"{"op":"ping"}"#)], 1024)).await;
        assert_eq!(got, [Ok(Incoming::Text(r#"{"op":"ping"}"#.into()))]);
    }

    #[tokio::test]
    async fn frames_split_and_packed_across_reads_come_out_whole() {
        let mut bytes = masked(0x81, b"first");
        bytes.extend(masked(0x81, &[b'y'; 300]));
        bytes.extend(masked(0x89, b"p"));
        let (a, rest) = bytes.split_at(3);
        let (b, c) = rest.split_at(100);
        let got = all(reader(vec![a.into(), b.into(), c.into()], 1024)).await;
        assert_eq!(
            got,
            [
                Ok(Incoming::Text("first".into())),
                Ok(Incoming::Text("y".repeat(300).into())),
                Ok(Incoming::Ping(Bytes::from_static(b"p"))),
            ]
        );
    }

    #[tokio::test]
    async fn fragments_are_joined_around_control_frames() {
        let chunks = vec![
            masked(0x01, br#"{"op":"#),
            masked(0x89, b"mid"),
            masked(0x00, br#""ping","#),
            masked(0x80, br#""ref":"f"}"#),
            masked(0x8a, b""),
        ];
        let got = all(reader(chunks, 1024)).await;
        assert_eq!(
            got,
            [
                Ok(Incoming::Ping(Bytes::from_static(b"mid"))),
                Ok(Incoming::Text(r#"{"op":"ping","ref":"f"}"#.into())),
                Ok(Incoming::Pong),
            ]
        );
    }

    #[tokio::test]
    async fn binary_messages_are_measured_fragmented_or_not() {
        let chunks = vec![
            masked(0x82, &[1, 2, 3]),
            masked(0x02, &[0; 10]),
            masked(0x80, &[0; 5]),
        ];
        let got = all(reader(chunks, 1024)).await;
        assert_eq!(got, [Ok(Incoming::Binary(3)), Ok(Incoming::Binary(15))]);
    }

    #[tokio::test]
    async fn a_close_carries_its_code_and_reason() {
        let mut payload = 1000u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bye");
        let chunks = vec![masked(0x88, &payload), masked(0x88, b"")];
        let got = all(reader(chunks, 1024)).await;
        assert_eq!(
            got,
            [
                Ok(Incoming::Close(Some((CloseCode::Normal, "bye").into()))),
                Ok(Incoming::Close(None)),
            ]
        );
        let got = all(reader(vec![masked(0x88, &1005u16.to_be_bytes())], 1024)).await;
        assert_eq!(got, [Err("Bad opcode".into())], "1005 may not be sent");
    }

    #[tokio::test]
    async fn an_oversized_frame_is_refused_from_its_header() {
        // Only the header of a 1 MiB frame: no need to wait for the rest.
        let mut header = masked(0x81, &vec![b'x'; 1 << 20]);
        header.truncate(14);
        let mut r = reader(vec![header], 1024);
        assert!(matches!(r.recv().await, Some(Err(ProtocolError::Overflow))));
        // A whole frame one byte over the limit, in the 16-bit form.
        let mut r = reader(vec![masked(0x81, &[b'x'; 1025])], 1024);
        assert!(matches!(r.recv().await, Some(Err(ProtocolError::Overflow))));
        let got = all(reader(vec![masked(0x81, &[b'x'; 1024])], 1024)).await;
        assert_eq!(
            got,
            [Ok(Incoming::Text("x".repeat(1024).into()))],
            "at the limit"
        );
    }

    #[tokio::test]
    async fn fragments_over_the_message_limit_are_refused() {
        let chunks = vec![masked(0x01, &[b'x'; 600]), masked(0x80, &[b'x'; 600])];
        let got = all(reader(chunks, 1024)).await;
        assert_eq!(
            got,
            [Err("I/O error: Exceeded maximum continuation size".into())]
        );
    }

    #[tokio::test]
    async fn protocol_errors_end_the_reader() {
        let cases: [(Vec<u8>, &str); 5] = [
            // Unmasked, as only servers may send.
            (
                vec![0x81, 0x01, b'x'],
                "Received an unmasked frame from client",
            ),
            (masked(0x81, &[0xff, 0xfe]), "I/O error: invalid utf-8"),
            (masked(0x80, b"x"), "Continuation has not started"),
            (masked(0x09, b""), "Unknown continuation fragment"),
            (
                masked(0x89, &[0; 126]),
                "Invalid control frame length (126)",
            ),
        ];
        for (frame, error) in cases {
            let got = all(reader(vec![frame, masked(0x81, b"after")], 1024)).await;
            assert_eq!(got.len(), 1, "{error}: {got:?}");
            let message = got[0].as_ref().unwrap_err();
            assert!(
                message.starts_with(error),
                "{message} should start with {error}"
            );
        }
        let chunks = vec![masked(0x01, b"a"), masked(0x81, b"b")];
        let got = all(reader(chunks, 1024)).await;
        assert_eq!(
            got,
            [Err(
                "Received new continuation but it has already started".into()
            )]
        );
    }

    #[tokio::test]
    async fn a_payload_error_is_an_io_error_and_a_clean_end_is_none() {
        let chunks: Vec<Result<Bytes, PayloadError>> = vec![
            Ok(masked(0x81, b"x").into()),
            Err(PayloadError::Incomplete(None)),
        ];
        let mut r = Reader::new(stream::iter(chunks), 1024, 1024);
        assert_eq!(r.recv().await.unwrap().unwrap(), Incoming::Text("x".into()));
        assert!(matches!(r.recv().await, Some(Err(ProtocolError::Io(_)))));
        assert!(r.recv().await.is_none());
        let mut r = reader(vec![masked(0x81, b"x")[..3].to_vec()], 1024);
        assert!(r.recv().await.is_none(), "a frame cut short by the end");
    }
}
