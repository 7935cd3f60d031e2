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
//!
//! Wake-ups are relayed per thread on the HTTP workers. Waking a task that
//! lives on another runtime costs a write to that runtime's eventfd, so a
//! send that woke each of a thousand streams directly from the feed's thread
//! made a thousand system calls, one after the other, before the last stream
//! could run. On a thread marked with [`relay_wakeups_here`], the receivers
//! of a ring wait on a relay of that thread instead: one task per ring and
//! thread, woken once per send, which wakes its receivers locally.

use std::{
    cell::{Cell, RefCell},
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex, MutexGuard, Weak,
        atomic::{AtomicU64, Ordering},
    },
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
    /// The relay of the thread the receiver last waited on, if it relays.
    relay: Option<Arc<Relay>>,
}

thread_local! {
    /// This thread's number if it relays wake-ups ([`relay_wakeups_here`]), else 0.
    static RELAY_THREAD: Cell<u64> = const { Cell::new(0) };
    /// This thread's relays, by the address of the ring they serve.
    static RELAYS: RefCell<HashMap<usize, Weak<Relay>>> = RefCell::new(HashMap::new());
}

/// Makes the receivers that wait on this thread share one wake-up per ring
/// (see the module's notes). Only for threads that run their tasks in a
/// `tokio::task::LocalSet` (the HTTP workers): the relays are local tasks.
pub(crate) fn relay_wakeups_here() {
    static THREADS: AtomicU64 = AtomicU64::new(1);
    if RELAY_THREAD.get() == 0 {
        RELAY_THREAD.set(THREADS.fetch_add(1, Ordering::Relaxed));
    }
}

/// One ring's wake-ups on one thread, shared by the receivers waiting there.
struct Relay {
    /// The address of the ring: its key in [`RELAYS`].
    ring: usize,
    thread: u64,
    /// The receivers of this thread that wait.
    waiters: Notify,
    /// Tells the relay task that no receiver holds the relay any more.
    retired: Arc<Notify>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.retired.notify_one();
        // A relay dropped on another thread (its receiver moved) leaves a
        // dead entry behind, replaced when its ring next relays here.
        let _ = RELAYS.try_with(|relays| {
            if let Ok(mut relays) = relays.try_borrow_mut()
                && relays
                    .get(&self.ring)
                    .is_some_and(|relay| relay.strong_count() == 0)
            {
                relays.remove(&self.ring);
            }
        });
    }
}

/// The task behind a [`Relay`]: one wait on the ring for all the receivers
/// of its thread. It ends with the ring, or when no receiver holds the relay.
async fn run_relay<T>(shared: Arc<Shared<T>>, relay: Weak<Relay>, retired: Arc<Notify>) {
    let sent = shared.sent.notified();
    tokio::pin!(sent);
    sent.as_mut().enable();
    loop {
        tokio::select! {
            () = &mut sent => {}
            () = retired.notified() => return,
        }
        // Registered again before the receivers look, so a send while they
        // read is not missed.
        sent.set(shared.sent.notified());
        sent.as_mut().enable();
        let Some(relay) = relay.upgrade() else {
            return;
        };
        relay.waiters.notify_waiters();
        drop(relay);
        if shared.lock().closed {
            return;
        }
    }
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
            relay: None,
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.sent.notify_waiters();
    }
}

impl<T: Clone + 'static> Receiver<T> {
    /// The next value, without waiting.
    pub(crate) fn try_recv(&mut self) -> Result<T, TryRecvError> {
        let mut state = self.shared.lock();
        if self.next < state.head {
            let missed = state.head - self.next;
            self.next = state.head;
            return Err(TryRecvError::Lagged(missed));
        }
        let at = (self.next - state.head) as usize;
        let Some((value, unread)) = state.queue.get_mut(at) else {
            return Err(if state.closed {
                TryRecvError::Closed
            } else {
                TryRecvError::Empty
            });
        };
        let value = value.clone();
        *unread -= 1;
        self.next += 1;
        if at == 0 {
            state.trim();
        }
        Ok(value)
    }

    /// The next value, waiting for it. Cancel-safe: a dropped future has
    /// taken nothing.
    pub(crate) async fn recv(&mut self) -> Result<T, RecvError> {
        let relay = self.relay();
        let shared;
        let wakes = match &relay {
            Some(relay) => &relay.waiters,
            None => {
                shared = self.shared.clone();
                &shared.sent
            }
        };
        loop {
            let sent = wakes.notified();
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

    /// This thread's relay of the ring, started if need be; `None` on a
    /// thread that does not relay.
    fn relay(&mut self) -> Option<Arc<Relay>> {
        let thread = RELAY_THREAD.get();
        if thread == 0 {
            return None;
        }
        if let Some(relay) = &self.relay
            && relay.thread == thread
        {
            return Some(relay.clone());
        }
        let ring = Arc::as_ptr(&self.shared) as usize;
        let relay = RELAYS.with_borrow_mut(|relays| {
            if let Some(relay) = relays.get(&ring).and_then(Weak::upgrade) {
                return relay;
            }
            let retired = Arc::new(Notify::new());
            let fresh = Arc::new(Relay {
                ring,
                thread,
                waiters: Notify::new(),
                retired: retired.clone(),
            });
            relays.insert(ring, Arc::downgrade(&fresh));
            tokio::task::spawn_local(run_relay(
                self.shared.clone(),
                Arc::downgrade(&fresh),
                retired,
            ));
            fresh
        });
        self.relay = Some(relay.clone());
        Some(relay)
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

    /// A thread that relays, as an HTTP worker: a current-thread runtime
    /// running `body` in a LocalSet.
    fn on_relaying_thread<F, Fut>(body: F) -> std::thread::JoinHandle<Fut::Output>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future + 'static,
        Fut::Output: Send + 'static,
    {
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            relay_wakeups_here();
            tokio::task::LocalSet::new().block_on(&rt, body())
        })
    }

    fn relays_here() -> usize {
        RELAYS.with_borrow(|relays| relays.values().filter(|r| r.strong_count() > 0).count())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn receivers_on_a_relaying_thread_share_one_wait_and_get_everything() {
        let tx = channel(64);
        let receivers: Vec<_> = (0..50).map(|_| tx.subscribe()).collect();
        let (waiting_tx, waiting) = std::sync::mpsc::channel();
        let worker = on_relaying_thread(move || async move {
            let readers: Vec<_> = receivers
                .into_iter()
                .map(|mut rx| {
                    tokio::task::spawn_local(async move {
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
            tokio::task::yield_now().await;
            waiting_tx.send(relays_here()).unwrap();
            let mut all = Vec::new();
            for reader in readers {
                all.push(reader.await.unwrap());
            }
            // Every receiver is gone: so are the relay and its entry.
            tokio::task::yield_now().await;
            (all, relays_here(), RELAYS.with_borrow(HashMap::len))
        });
        let relays = tokio::task::spawn_blocking(move || waiting.recv().unwrap())
            .await
            .unwrap();
        assert_eq!(relays, 1, "one relay for fifty receivers of one ring");
        // The sender is on this runtime's threads, the receivers on the worker.
        for i in 0..5_000u32 {
            tx.send(i);
            while held(&tx).0 > 32 {
                tokio::task::yield_now().await;
            }
        }
        drop(tx);
        let (all, live, entries) = tokio::task::spawn_blocking(move || worker.join().unwrap())
            .await
            .unwrap();
        for got in all {
            assert_eq!(got, (0..5_000).collect::<Vec<_>>());
        }
        assert_eq!((live, entries), (0, 0));
    }

    #[test]
    fn a_relay_ends_when_its_receivers_leave_and_starts_again_for_new_ones() {
        let tx = channel::<u32>(8);
        let shared = tx.shared.clone();
        let (mut a, mut b) = (tx.subscribe(), tx.subscribe());
        let tx = Arc::new(tx);
        let sender = tx.clone();
        let worker = on_relaying_thread(move || async move {
            let wait = tokio::task::spawn_local(async move {
                let got = a.recv().await;
                (a, got)
            });
            tokio::task::yield_now().await;
            assert_eq!(relays_here(), 1);
            // Sent from another thread, through the relay.
            std::thread::spawn(move || sender.send(7)).join().unwrap();
            let (a, got) = wait.await.unwrap();
            assert_eq!(got, Ok(7));
            drop(a);
            tokio::task::yield_now().await;
            // b never waited here: nothing holds the relay, and its task ended.
            let ended = relays_here() == 0 && RELAYS.with_borrow(HashMap::len) == 0;
            // A new waiter starts a new relay.
            assert_eq!(b.try_recv(), Ok(7));
            let again = tokio::task::spawn_local(async move { b.recv().await });
            tokio::task::yield_now().await;
            let restarted = relays_here();
            (ended, restarted, again)
        });
        let (ended, restarted, again) = worker.join().unwrap();
        assert!(ended, "the relay outlived its receivers");
        assert_eq!(restarted, 1);
        // The relay task (and the ring it held) went with the worker's runtime.
        drop(again);
        drop(tx);
        assert_eq!(Arc::strong_count(&shared), 1);
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
