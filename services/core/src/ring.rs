//! A topic's live ring: one sender, many receivers, each receiver getting
//! every value sent after it subscribed, in order, unless it falls more than
//! the capacity behind (then it is told how many it missed).
//!
//! It behaves as `tokio::sync::broadcast` for the hub's use, with one
//! difference that matters at scale: storage grows with the values waiting
//! and is given back once every receiver has read them. A broadcast channel
//! allocates and initialises its whole capacity (1,024 slots, about 40 KiB)
//! when it is made, so an application with a topic per user paid that per
//! connection, idle or not. Here an idle topic holds an empty queue.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
};

use tokio::sync::Notify;

/// Why [`Receiver::recv`] returned no value.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RecvError {
    /// The receiver fell behind; this many values are gone. The next
    /// receive returns the oldest value still held.
    Lagged(u64),
    /// The sender is gone and every value was read.
    Closed,
}

/// Why [`Receiver::try_recv`] returned no value.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TryRecvError {
    Empty,
    Lagged(u64),
    Closed,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    /// Woken on every send and on close.
    sent: Notify,
    capacity: usize,
}

struct State<T> {
    /// Position of `queue[0]`; positions count every value ever sent.
    head: u64,
    /// Each value with the number of receivers that have yet to read it.
    queue: VecDeque<(T, usize)>,
    receivers: usize,
    closed: bool,
}

impl<T> State<T> {
    fn tail(&self) -> u64 {
        self.head + self.queue.len() as u64
    }

    /// Drops the values at the front that every receiver has read, and the
    /// queue's storage once it is empty.
    fn trim(&mut self) {
        while self.queue.front().is_some_and(|(_, unread)| *unread == 0) {
            self.queue.pop_front();
            self.head += 1;
        }
        if self.queue.is_empty() && self.queue.capacity() > 0 {
            self.queue = VecDeque::new();
        }
    }
}

/// The sending half; dropping it closes the ring.
pub(crate) struct Sender<T> {
    shared: Arc<Shared<T>>,
}

/// A receiving half, reading from where it subscribed.
pub(crate) struct Receiver<T> {
    shared: Arc<Shared<T>>,
    /// Position of the next value to read.
    next: u64,
}

/// A ring holding at most `capacity` values for its slowest receiver.
pub(crate) fn channel<T: Clone>(capacity: usize) -> Sender<T> {
    Sender {
        shared: Arc::new(Shared {
            state: Mutex::new(State {
                head: 0,
                queue: VecDeque::new(),
                receivers: 0,
                closed: false,
            }),
            sent: Notify::new(),
            capacity: capacity.max(1),
        }),
    }
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // unwrap: the lock is never held across a panic point
        self.state.lock().expect("ring lock")
    }
}

impl<T: Clone> Sender<T> {
    /// Hands `value` to every current receiver; with none, it is dropped.
    pub(crate) fn send(&self, value: T) {
        {
            let mut state = self.shared.lock();
            if state.receivers == 0 {
                return;
            }
            let receivers = state.receivers;
            state.queue.push_back((value, receivers));
            if state.queue.len() > self.shared.capacity {
                // The slowest receivers lose the oldest value.
                state.queue.pop_front();
                state.head += 1;
            }
        }
        self.shared.sent.notify_waiters();
    }

    /// A receiver of every value sent from now on.
    pub(crate) fn subscribe(&self) -> Receiver<T> {
        let mut state = self.shared.lock();
        state.receivers += 1;
        Receiver {
            shared: self.shared.clone(),
            next: state.tail(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.sent.notify_waiters();
    }
}

impl<T: Clone> Receiver<T> {
    /// The next value, without waiting.
    pub(crate) fn try_recv(&mut self) -> Result<T, TryRecvError> {
        // An empty queue allocates nothing, and one value leaves it empty.
        self.try_recv_many(&mut VecDeque::new(), 1)
    }

    /// Like [`Receiver::try_recv`], and also up to `most - 1` values after
    /// the one returned, appended to `more`, under the same lock: a
    /// receiver catching up on a burst takes the lock once per batch, not
    /// once per value. `more` is only touched when there is more than one.
    pub(crate) fn try_recv_many(
        &mut self,
        more: &mut VecDeque<T>,
        most: usize,
    ) -> Result<T, TryRecvError> {
        let mut state = self.shared.lock();
        if self.next < state.head {
            let missed = state.head - self.next;
            self.next = state.head;
            return Err(TryRecvError::Lagged(missed));
        }
        let at = (self.next - state.head) as usize;
        let taken = state.queue.len().saturating_sub(at).min(most.max(1));
        if taken == 0 {
            return Err(if state.closed {
                TryRecvError::Closed
            } else {
                TryRecvError::Empty
            });
        }
        let mut values = state
            .queue
            .range_mut(at..at + taken)
            .map(|(value, unread)| {
                *unread -= 1;
                value.clone()
            });
        // unwrap: `taken` is at least one
        let first = values.next().expect("one value at least");
        more.extend(values);
        self.next += taken as u64;
        if at == 0 {
            state.trim();
        }
        Ok(first)
    }

    /// The next value, waiting for it. Cancel-safe: a dropped future has
    /// taken nothing.
    pub(crate) async fn recv(&mut self) -> Result<T, RecvError> {
        let shared = self.shared.clone();
        loop {
            let sent = shared.sent.notified();
            tokio::pin!(sent);
            // Registered before looking, so a send in between wakes it.
            sent.as_mut().enable();
            match self.try_recv() {
                Ok(value) => return Ok(value),
                Err(TryRecvError::Lagged(missed)) => return Err(RecvError::Lagged(missed)),
                Err(TryRecvError::Closed) => return Err(RecvError::Closed),
                Err(TryRecvError::Empty) => sent.await,
            }
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.receivers -= 1;
        let from = self.next.max(state.head);
        let skip = (from - state.head) as usize;
        for (_, unread) in state.queue.iter_mut().skip(skip) {
            *unread -= 1;
        }
        state.trim();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held<T>(tx: &Sender<T>) -> (usize, usize) {
        let state = tx.shared.lock();
        (state.queue.len(), state.queue.capacity())
    }

    #[tokio::test]
    async fn every_receiver_gets_what_was_sent_after_it_subscribed() {
        let tx = channel(8);
        tx.send(0); // nobody listens: dropped
        let mut a = tx.subscribe();
        tx.send(1);
        let mut b = tx.subscribe();
        tx.send(2);
        assert_eq!(a.recv().await, Ok(1));
        assert_eq!(a.recv().await, Ok(2));
        assert_eq!(b.recv().await, Ok(2));
        assert_eq!(b.try_recv(), Err(TryRecvError::Empty));
    }

    #[tokio::test]
    async fn storage_is_given_back_once_everyone_has_read() {
        let tx = channel(1024);
        let mut a = tx.subscribe();
        let mut b = tx.subscribe();
        for i in 0..100 {
            tx.send(i);
        }
        assert_eq!(held(&tx).0, 100);
        for i in 0..100 {
            assert_eq!(a.try_recv(), Ok(i));
        }
        assert_eq!(held(&tx).0, 100, "b has not read them yet");
        for i in 0..50 {
            assert_eq!(b.try_recv(), Ok(i));
        }
        assert_eq!(held(&tx).0, 50);
        drop(b);
        assert_eq!(
            held(&tx),
            (0, 0),
            "a receiver that leaves reads nothing more"
        );
    }

    #[tokio::test]
    async fn a_batch_is_taken_in_order_and_counted_as_read() {
        let tx = channel(1024);
        let mut a = tx.subscribe();
        let mut b = tx.subscribe();
        let mut more = VecDeque::new();
        assert_eq!(a.try_recv_many(&mut more, 4), Err(TryRecvError::Empty));
        tx.send(0);
        assert_eq!(a.try_recv_many(&mut more, 4), Ok(0));
        assert!(
            more.is_empty() && more.capacity() == 0,
            "a lone value needs no room"
        );
        for i in 1..=10 {
            tx.send(i);
        }
        assert_eq!(a.try_recv_many(&mut more, 4), Ok(1));
        assert_eq!(more, [2, 3, 4]);
        more.clear();
        assert_eq!(a.try_recv_many(&mut more, 100), Ok(5));
        assert_eq!(more, [6, 7, 8, 9, 10]);
        assert_eq!(held(&tx).0, 11, "b has read none of them");
        for i in 0..=10 {
            assert_eq!(b.try_recv(), Ok(i));
        }
        assert_eq!(held(&tx), (0, 0), "both read everything");
        drop(tx);
        assert_eq!(a.try_recv_many(&mut more, 4), Err(TryRecvError::Closed));
    }

    #[tokio::test]
    async fn a_batch_after_a_lag_starts_at_the_oldest_value_held() {
        let tx = channel(4);
        let mut slow = tx.subscribe();
        for i in 0..10 {
            tx.send(i);
        }
        let mut more = VecDeque::new();
        assert_eq!(
            slow.try_recv_many(&mut more, 8),
            Err(TryRecvError::Lagged(6))
        );
        assert_eq!(slow.try_recv_many(&mut more, 8), Ok(6));
        assert_eq!(more, [7, 8, 9]);
        assert_eq!(held(&tx), (0, 0));
    }

    #[tokio::test]
    async fn a_receiver_too_far_behind_is_told_what_it_missed() {
        let tx = channel(4);
        let mut slow = tx.subscribe();
        for i in 0..10 {
            tx.send(i);
        }
        assert_eq!(held(&tx).0, 4);
        assert_eq!(slow.recv().await, Err(RecvError::Lagged(6)));
        for i in 6..10 {
            assert_eq!(slow.recv().await, Ok(i));
        }
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_on_send_and_on_close() {
        let tx = channel(4);
        let mut rx = tx.subscribe();
        let waiting = tokio::spawn(async move {
            let first = rx.recv().await;
            let second = rx.recv().await;
            (first, second)
        });
        tokio::task::yield_now().await;
        tx.send("x");
        drop(tx);
        let (first, second) = waiting.await.unwrap();
        assert_eq!(first, Ok("x"));
        assert_eq!(second, Err(RecvError::Closed));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_receivers_on_threads_each_get_everything_in_order() {
        let tx = channel(64);
        let receivers: Vec<_> = (0..8).map(|_| tx.subscribe()).collect();
        let readers: Vec<_> = receivers
            .into_iter()
            .map(|mut rx| {
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    loop {
                        match rx.recv().await {
                            Ok(v) => got.push(v),
                            Err(RecvError::Closed) => return got,
                            Err(RecvError::Lagged(_)) => panic!("lagged"),
                        }
                    }
                })
            })
            .collect();
        for i in 0..10_000u32 {
            tx.send(i);
            if i % 32 == 0 {
                // Let the readers keep within the capacity.
                while held(&tx).0 > 32 {
                    tokio::task::yield_now().await;
                }
            }
        }
        drop(tx);
        for reader in readers {
            let got = reader.await.unwrap();
            assert_eq!(got, (0..10_000).collect::<Vec<_>>());
        }
    }
}
