//! A socket's outgoing queue and the response body that drains it straight
//! into the connection: no writer task, no second channel, and every frame
//! that is ready goes out in one chunk (one write).

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll, Waker},
    time::Duration,
};

use actix_http::ws::CloseReason;
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use futures_util::Stream;
use tokio::sync::{Notify, Semaphore};

use crate::wire;

/// A chunk stops growing past this, so that the connection's write buffer
/// (it takes chunks until it holds 32 KiB) stays near its usual size.
const CHUNK_LIMIT: usize = 16 * 1024;

/// What a socket sends.
pub(crate) enum Out {
    /// Text frames already encoded (a forwarder's batch of deliveries), and
    /// how many there are: each counts against the queue's capacity.
    Frames(Bytes, u32),
    Text(ByteString),
    Pong(Bytes),
    Ping,
    /// The last frame: the body ends once it is written.
    Close(CloseReason),
}

impl Out {
    fn frames(&self) -> u32 {
        match self {
            Out::Frames(_, count) => *count,
            _ => 1,
        }
    }
}

/// The queue stayed full for the whole wait, or the socket is gone.
#[derive(Debug)]
pub(crate) struct Full;

/// One allocation per socket for the queue, its capacity and the too-slow
/// signal (a tokio channel and its blocks cost more than this whole socket
/// should while it idles).
struct Shared {
    /// Free places, in frames.
    room: Semaphore,
    queue: Mutex<Queue>,
    /// Raised when a send fails: the connection closes the socket.
    too_slow: Notify,
}

struct Queue {
    items: VecDeque<Out>,
    /// The body, waiting for items.
    waker: Option<Waker>,
    /// Live [`Outbox`] clones: the body ends when none is left.
    senders: usize,
    /// The body ended or was dropped.
    closed: bool,
}

/// The sending side, cloned by everything that writes to the socket.
///
/// The queue holds at most `capacity` frames, counted one by one even when a
/// batch travels as one item, so `--ws-queue` and the too-slow rule mean what
/// they meant with one frame per item.
pub(crate) struct Outbox {
    shared: Arc<Shared>,
}

pub(crate) fn outbox(capacity: u32) -> (Outbox, Body) {
    let shared = Arc::new(Shared {
        room: Semaphore::new(capacity as usize),
        queue: Mutex::new(Queue {
            items: VecDeque::new(),
            waker: None,
            senders: 1,
            closed: false,
        }),
        too_slow: Notify::new(),
    });
    let body = Body {
        shared: shared.clone(),
        done: false,
    };
    (Outbox { shared }, body)
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding the lock leaves nothing half-done: the
        // queue is whole between any two statements.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Clone for Outbox {
    fn clone(&self) -> Outbox {
        self.shared.queue().senders += 1;
        Outbox {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        let mut queue = self.shared.queue();
        queue.senders -= 1;
        if queue.senders == 0
            && let Some(waker) = queue.waker.take()
        {
            waker.wake();
        }
    }
}

impl Outbox {
    /// Queues `out`, waiting up to `within` for room; a failure also raises
    /// the too-slow signal.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn would hold its arguments twice in every future awaiting a send"
    )]
    pub(crate) fn send(
        &self,
        out: Out,
        within: Duration,
    ) -> impl Future<Output = Result<(), Full>> + '_ {
        async move {
            let sent = match self.shared.room.try_acquire_many(out.frames()) {
                Ok(permit) => {
                    permit.forget();
                    self.push(out)
                }
                // Boxed: the wait's timer and semaphore entry would otherwise
                // take room in every future that sends, idle or not.
                Err(_) => {
                    let waiting = Box::pin(self.wait_and_send(out, within));
                    waiting.await
                }
            };
            if sent.is_err() {
                self.shared.too_slow.notify_one();
            }
            sent
        }
    }

    async fn wait_and_send(&self, out: Out, within: Duration) -> Result<(), Full> {
        match tokio::time::timeout(within, self.shared.room.acquire_many(out.frames())).await {
            Ok(Ok(permit)) => permit.forget(),
            _ => return Err(Full),
        }
        self.push(out)
    }

    /// Queues `out` if there is room now.
    pub(crate) fn try_send(&self, out: Out) -> Result<(), Full> {
        self.shared
            .room
            .try_acquire_many(out.frames())
            .map_err(|_| Full)?
            .forget();
        self.push(out)
    }

    fn push(&self, out: Out) -> Result<(), Full> {
        let mut queue = self.shared.queue();
        if queue.closed {
            return Err(Full);
        }
        queue.items.push_back(out);
        if let Some(waker) = queue.waker.take() {
            waker.wake();
        }
        Ok(())
    }

    /// Returns once a send failed.
    pub(crate) async fn too_slow(&self) {
        self.shared.too_slow.notified().await;
    }
}

/// The response body: everything queued, encoded as WebSocket frames.
pub(crate) struct Body {
    shared: Arc<Shared>,
    done: bool,
}

/// The bytes of one poll: a lone batch goes out as it is, anything more is
/// laid out in one buffer.
#[derive(Default)]
struct Chunk {
    lone: Option<Bytes>,
    buf: BytesMut,
}

impl Chunk {
    fn len(&self) -> usize {
        self.lone.as_ref().map_or(self.buf.len(), Bytes::len)
    }

    /// The buffer, holding what came so far, with room for `more` bytes.
    fn buf(&mut self, more: usize) -> &mut BytesMut {
        if let Some(lone) = self.lone.take() {
            self.buf.reserve(lone.len() + more);
            self.buf.extend_from_slice(&lone);
        }
        self.buf.reserve(more);
        &mut self.buf
    }

    fn push(&mut self, out: Out) {
        match out {
            Out::Frames(frames, _) if self.len() == 0 => self.lone = Some(frames),
            Out::Frames(frames, _) => self.buf(frames.len()).extend_from_slice(&frames),
            Out::Text(text) => {
                wire::put_text(self.buf(wire::frame_len(text.len())), text.as_bytes());
            }
            Out::Pong(payload) => {
                let len = wire::frame_len(payload.len().min(wire::MAX_CONTROL_PAYLOAD));
                wire::put_control(self.buf(len), wire::OP_PONG, &payload);
            }
            Out::Ping => wire::put_control(self.buf(2), wire::OP_PING, b""),
            Out::Close(reason) => {
                let most = wire::frame_len(wire::MAX_CONTROL_PAYLOAD);
                wire::put_close(self.buf(most), &reason);
            }
        }
    }

    fn into_bytes(self) -> Option<Bytes> {
        match self.lone {
            Some(lone) => Some(lone),
            None if self.buf.is_empty() => None,
            None => Some(self.buf.freeze()),
        }
    }
}

impl Stream for Body {
    type Item = Bytes;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let mut chunk = Chunk::default();
        let mut freed = 0;
        let mut queue = this.shared.queue();
        while chunk.len() < CHUNK_LIMIT {
            let Some(out) = queue.items.pop_front() else {
                break;
            };
            freed += out.frames() as usize;
            let close = matches!(out, Out::Close(_));
            chunk.push(out);
            if close {
                this.done = true;
                break;
            }
        }
        if queue.items.is_empty() && queue.items.capacity() > 0 {
            // Most sockets idle between frames: their queue holds no memory.
            queue.items = VecDeque::new();
        }
        if !this.done && queue.items.is_empty() {
            if queue.senders == 0 {
                this.done = true;
            } else if !queue
                .waker
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                queue.waker = Some(cx.waker().clone());
            }
        }
        if this.done {
            // Nothing more is sent: senders waiting for room, or sending
            // later, fail at once instead of filling a queue nobody drains.
            queue.closed = true;
            queue.items = VecDeque::new();
        }
        drop(queue);
        if this.done {
            this.shared.room.close();
        } else {
            this.shared.room.add_permits(freed);
        }
        match chunk.into_bytes() {
            Some(bytes) => Poll::Ready(Some(bytes)),
            None if this.done => Poll::Ready(None),
            None => Poll::Pending,
        }
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        let mut queue = self.shared.queue();
        queue.closed = true;
        queue.items = VecDeque::new();
        drop(queue);
        self.shared.room.close();
    }
}

#[cfg(test)]
mod tests {
    use actix_http::ws::{CloseCode, Frame};
    use futures_util::StreamExt;

    use super::*;
    use crate::wire::tests::decode_all;

    const WAIT: Duration = Duration::from_millis(50);

    fn frames(chunk: Bytes) -> Vec<Frame> {
        decode_all(&mut BytesMut::from(chunk))
    }

    fn batch(texts: &[&str]) -> Out {
        let mut buf = BytesMut::new();
        for t in texts {
            wire::put_text(&mut buf, t.as_bytes());
        }
        Out::Frames(buf.freeze(), texts.len() as u32)
    }

    #[tokio::test]
    async fn everything_ready_goes_out_in_one_chunk_and_a_close_ends_the_body() {
        let (out, mut body) = outbox(16);
        out.send(batch(&["a", "b"]), WAIT).await.unwrap();
        out.send(Out::Text("c".into()), WAIT).await.unwrap();
        out.send(Out::Ping, WAIT).await.unwrap();
        out.send(Out::Pong(Bytes::from_static(b"p")), WAIT)
            .await
            .unwrap();
        out.send(Out::Close((CloseCode::Away, "bye").into()), WAIT)
            .await
            .unwrap();
        let chunk = body.next().await.unwrap();
        assert_eq!(
            frames(chunk),
            [
                Frame::Text("a".into()),
                Frame::Text("b".into()),
                Frame::Text("c".into()),
                Frame::Ping("".into()),
                Frame::Pong("p".into()),
                Frame::Close(Some((CloseCode::Away, "bye").into())),
            ]
        );
        assert!(body.next().await.is_none(), "nothing after the close");
        assert!(out.send(Out::Ping, WAIT).await.is_err());
    }

    #[tokio::test]
    async fn a_lone_batch_is_sent_without_a_copy() {
        let (out, mut body) = outbox(16);
        let Out::Frames(bytes, n) = batch(&["x", "y"]) else {
            unreachable!()
        };
        out.send(Out::Frames(bytes.clone(), n), WAIT).await.unwrap();
        let chunk = body.next().await.unwrap();
        assert_eq!(chunk.as_ptr(), bytes.as_ptr());
    }

    #[tokio::test]
    async fn the_capacity_counts_frames_not_batches() {
        let (out, mut body) = outbox(4);
        out.send(batch(&["1", "2", "3"]), WAIT).await.unwrap();
        out.send(Out::Text("4".into()), WAIT).await.unwrap();
        assert!(
            out.try_send(Out::Ping).is_err(),
            "four frames fill four places"
        );
        assert!(
            out.send(Out::Ping, WAIT).await.is_err(),
            "still full after the wait"
        );
        assert_eq!(frames(body.next().await.unwrap()).len(), 4);
        out.send(batch(&["5", "6", "7", "8"]), WAIT).await.unwrap();
        assert_eq!(frames(body.next().await.unwrap()).len(), 4);
    }

    #[tokio::test]
    async fn a_sender_waiting_for_room_gets_it_when_the_body_drains() {
        let (out, mut body) = outbox(2);
        out.send(batch(&["1", "2"]), WAIT).await.unwrap();
        let waiting = {
            let out = out.clone();
            tokio::spawn(async move {
                out.send(Out::Text("3".into()), Duration::from_secs(5))
                    .await
            })
        };
        tokio::time::sleep(WAIT).await;
        assert_eq!(frames(body.next().await.unwrap()).len(), 2);
        waiting.await.unwrap().unwrap();
        assert_eq!(
            frames(body.next().await.unwrap()),
            [Frame::Text("3".into())]
        );
    }

    #[tokio::test]
    async fn the_body_ends_when_every_sender_is_gone_and_senders_fail_when_it_is() {
        let (out, mut body) = outbox(2);
        out.send(Out::Text("last".into()), WAIT).await.unwrap();
        drop(out);
        assert_eq!(frames(body.next().await.unwrap()).len(), 1);
        assert!(body.next().await.is_none());

        let (out, body) = outbox(1);
        out.send(Out::Ping, WAIT).await.unwrap();
        let waiting = {
            let out = out.clone();
            tokio::spawn(async move { out.send(Out::Ping, Duration::from_secs(60)).await })
        };
        tokio::time::sleep(WAIT).await;
        drop(body);
        let failed = tokio::time::timeout(Duration::from_secs(1), waiting).await;
        assert!(
            failed.unwrap().unwrap().is_err(),
            "a waiting sender fails at once"
        );
    }
}
