//! Server → client WebSocket frames (RFC 6455 §5.2): FIN set, never masked,
//! never fragmented. Written here rather than through actix-http's codec so
//! that a batch of event frames can be laid out in one buffer, once.

use actix_http::ws::CloseReason;
use bytes::{BufMut, BytesMut};

pub(crate) const OP_TEXT: u8 = 0x1;
pub(crate) const OP_CLOSE: u8 = 0x8;
pub(crate) const OP_PING: u8 = 0x9;
pub(crate) const OP_PONG: u8 = 0xA;

const FIN: u8 = 0x80;
/// Control frames carry at most this much (RFC 6455 §5.5); strict clients
/// (Chromium) fail the connection on a longer one.
pub(crate) const MAX_CONTROL_PAYLOAD: usize = 125;
/// A close payload is the 2-byte code, then the reason.
pub(crate) const MAX_CLOSE_REASON: usize = MAX_CONTROL_PAYLOAD - 2;

/// Bytes a frame of `len` payload bytes takes.
pub(crate) fn frame_len(len: usize) -> usize {
    let header = if len < 126 {
        2
    } else if len <= usize::from(u16::MAX) {
        4
    } else {
        10
    };
    header + len
}

/// Appends one whole frame.
pub(crate) fn put_frame(buf: &mut BytesMut, opcode: u8, payload: &[u8]) {
    buf.reserve(frame_len(payload.len()));
    buf.put_u8(FIN | opcode);
    let len = payload.len();
    if let Ok(short) = u8::try_from(len)
        && short < 126
    {
        buf.put_u8(short);
    } else if let Ok(medium) = u16::try_from(len) {
        buf.put_u8(126);
        buf.put_u16(medium);
    } else {
        buf.put_u8(127);
        buf.put_u64(len as u64);
    }
    buf.put_slice(payload);
}

pub(crate) fn put_text(buf: &mut BytesMut, text: &[u8]) {
    put_frame(buf, OP_TEXT, text);
}

/// A ping or pong, its payload cut to what a control frame may carry.
pub(crate) fn put_control(buf: &mut BytesMut, opcode: u8, payload: &[u8]) {
    put_frame(
        buf,
        opcode,
        &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)],
    );
}

/// A close frame: the code, then the reason cut to fit a control frame
/// without splitting a character.
pub(crate) fn put_close(buf: &mut BytesMut, reason: &CloseReason) {
    let mut description = reason.description.as_deref().unwrap_or_default();
    if description.len() > MAX_CLOSE_REASON {
        let mut end = MAX_CLOSE_REASON;
        while !description.is_char_boundary(end) {
            end -= 1;
        }
        description = &description[..end];
    }
    let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
    payload[..2].copy_from_slice(&u16::from(reason.code).to_be_bytes());
    payload[2..2 + description.len()].copy_from_slice(description.as_bytes());
    put_frame(buf, OP_CLOSE, &payload[..2 + description.len()]);
}

#[cfg(test)]
pub(crate) mod tests {
    use actix_http::ws::{CloseCode, Frame, OpCode, Parser};

    use super::*;

    /// Reads `buf` back with actix-http's parser in client mode, an
    /// implementation independent of the encoder under test.
    pub(crate) fn decode_all(buf: &mut BytesMut) -> Vec<Frame> {
        let mut frames = Vec::new();
        while let Some((fin, opcode, payload)) = Parser::parse(buf, false, 1 << 20).unwrap() {
            assert!(fin, "never fragmented");
            let payload = payload.unwrap_or_default().freeze();
            frames.push(match opcode {
                OpCode::Text => Frame::Text(payload),
                OpCode::Ping => Frame::Ping(payload),
                OpCode::Pong => Frame::Pong(payload),
                OpCode::Close => Frame::Close(Parser::try_parse_close_payload(&payload).unwrap()),
                other => panic!("{other:?}"),
            });
        }
        assert!(buf.is_empty(), "a partial frame was left");
        frames
    }

    #[test]
    fn lengths_take_the_7_16_and_64_bit_forms() {
        for (len, header) in [
            (0, 2),
            (125, 2),
            (126, 4),
            (65_535, 4),
            (65_536, 10),
            (200_000, 10),
        ] {
            let payload = vec![b'x'; len];
            let mut buf = BytesMut::new();
            put_text(&mut buf, &payload);
            assert_eq!(buf.len(), header + len, "{len}");
            assert_eq!(frame_len(len), header + len);
            assert_eq!(buf[0], 0x81, "FIN and text");
            assert_eq!(buf[1] & 0x80, 0, "servers do not mask");
            match &decode_all(&mut buf)[..] {
                [Frame::Text(text)] => assert_eq!(text.len(), len),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn frames_laid_end_to_end_read_back_one_by_one() {
        let mut buf = BytesMut::new();
        put_text(&mut buf, br#"{"op":"event"}"#);
        put_control(&mut buf, OP_PING, b"");
        put_control(&mut buf, OP_PONG, &[7; 300]);
        put_text(&mut buf, "é".repeat(100).as_bytes());
        let frames = decode_all(&mut buf);
        assert_eq!(frames.len(), 4);
        assert_eq!(frames[0], Frame::Text(r#"{"op":"event"}"#.into()));
        assert_eq!(frames[1], Frame::Ping("".into()));
        assert_eq!(frames[2], Frame::Pong(vec![7; 125].into()), "cut to 125");
        assert_eq!(frames[3], Frame::Text("é".repeat(100).into()));
    }

    #[test]
    fn close_reasons_are_cut_at_a_character_boundary() {
        let mut buf = BytesMut::new();
        put_close(&mut buf, &(CloseCode::Away, "idle").into());
        put_close(&mut buf, &CloseCode::Normal.into());
        // 61 two-byte characters then one more: 124 bytes, one too many.
        put_close(&mut buf, &(CloseCode::Policy, "é".repeat(62)).into());
        let frames = decode_all(&mut buf);
        assert_eq!(
            frames[0],
            Frame::Close(Some((CloseCode::Away, "idle").into()))
        );
        assert_eq!(frames[1], Frame::Close(Some(CloseCode::Normal.into())));
        assert_eq!(
            frames[2],
            Frame::Close(Some((CloseCode::Policy, "é".repeat(61)).into()))
        );
    }

    #[test]
    fn a_close_with_an_unregistered_code_keeps_it() {
        let mut buf = BytesMut::new();
        put_close(&mut buf, &(CloseCode::Other(4000), "app").into());
        assert_eq!(&buf[..], b"\x88\x05\x0f\xa0app");
    }
}
