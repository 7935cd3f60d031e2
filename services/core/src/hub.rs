//! The live hub: one per process, shared by every edge (polling, SSE,
//! WebSocket, push).
//!
//! - One bus subscription per topic, held while the process has local interest
//!   in it (and for a linger period after), never a firehose.
//! - Each event is encoded to JSON once; every local subscriber gets the same
//!   bytes ([`SharedEvent`]).
//! - Per topic the hub hands on events in `seq` order with no gaps: it tracks
//!   the last seq it delivered, and a gap, a bus reconnect or a slow-consumer
//!   notice makes it read the missing events from the store first. A periodic
//!   head check (one store query for every subscribed topic) catches a lost
//!   last message.
//! - A small cache of recent events per topic serves resumes and long-poll
//!   wake-ups without the store.
//!
//! Connections do not talk to the hub's channels directly: a [`Follower`]
//! resumes a topic from a client's position (log first, then live, deduped by
//! seq) and reports a position lost to retention as an explicit
//! [`Delivery::Reset`].

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex, OnceLock, RwLock, Weak,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{Notify, broadcast, watch};

use crate::{
    bus::{Bus, BusSignal, BusStream},
    config::Settings,
    event::{Event, Topic},
    metrics::Metrics,
    ring,
    store::{Store, StoreError, TopicHead},
};

/// Events read from the store per query when the hub or a follower catches up.
const FILL_PAGE: u32 = 500;
/// Most live events a follower takes from its topic's ring under one lock
/// (in a burst; one at a time otherwise).
const LIVE_BATCH: usize = 32;
/// Most topics in one head-check query.
const HEAD_CHECK_CHUNK: usize = 1000;

/// A committed event with its JSON text, encoded once per process, and each
/// edge's framing of it, also built once and shared by every connection.
#[derive(Debug)]
pub struct SharedEvent {
    pub event: Event,
    /// `{"topic","seq","type","data","time"}`: the event as every transport shows it.
    pub json: Bytes,
    sse: OnceLock<Bytes>,
    ws: OnceLock<Bytes>,
}

/// The edge framings a [`SharedEvent`] keeps once built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Sse,
    WebSocket,
}

impl SharedEvent {
    pub fn new(event: Event) -> Arc<SharedEvent> {
        let json = Bytes::from(event.to_json());
        Arc::new(SharedEvent {
            event,
            json,
            sse: OnceLock::new(),
            ws: OnceLock::new(),
        })
    }

    /// The edge's framing of this event: built by `build` the first time it
    /// is asked for, then shared.
    pub fn framed(&self, framing: Framing, build: impl FnOnce(&SharedEvent) -> Bytes) -> &Bytes {
        let slot = match framing {
            Framing::Sse => &self.sse,
            Framing::WebSocket => &self.ws,
        };
        slot.get_or_init(|| build(self))
    }

    pub fn seq(&self) -> u64 {
        self.event.seq
    }

    /// What the event holds in memory, estimated once from its JSON: the
    /// event, its JSON text and both framings, whether or not they are
    /// built yet (each framing is about as long as the JSON).
    fn cached_bytes(&self) -> usize {
        std::mem::size_of::<SharedEvent>() + 64 + 4 * self.json.len()
    }
}

/// How the hub behaves; see the `hub_*` settings.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub cache_events: usize,
    /// Bound on every topic's cache together, in (estimated) bytes.
    pub cache_bytes: usize,
    pub queue: usize,
    pub linger: Duration,
    pub head_check_interval: Duration,
    /// How long a new subscription waits for the bus and store to answer.
    pub ready_timeout: Duration,
    /// Store reads for readers (resumes, polls) at once: half the database
    /// pool, so a herd of resuming clients queues here instead of starving
    /// publishes of connections.
    pub store_readers: usize,
}

impl HubConfig {
    pub fn from_settings(s: &Settings) -> HubConfig {
        HubConfig {
            cache_events: s.hub_cache_events,
            cache_bytes: s.hub_cache_bytes,
            queue: s.hub_queue.max(16),
            linger: s.hub_linger,
            head_check_interval: s.head_check_interval.max(Duration::from_millis(10)),
            ready_timeout: s.db_acquire_timeout.max(Duration::from_secs(1)),
            store_readers: (s.db_max_connections as usize / 2).max(1),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("the event log is unavailable: {0}")]
    Store(#[from] StoreError),
    #[error("the live feed of topic {0} is not ready: the store or the bus does not answer")]
    NotReady(Topic),
    #[error("the live feed of topic {0} stopped")]
    Closed(Topic),
    #[error("the subscriber fell more than the queue behind topic {0}")]
    Lagged(Topic),
}

/// Events after a position, with the topic's counters as the reader knows them.
#[derive(Debug, Clone)]
pub struct HubRead {
    pub events: Vec<Arc<SharedEvent>>,
    pub head: TopicHead,
}

/// The process's live hub. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

struct Inner {
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    metrics: Arc<Metrics>,
    config: HubConfig,
    /// Feed tasks run here (the main runtime), not on the HTTP worker that
    /// happened to subscribe first.
    runtime: tokio::runtime::Handle,
    topics: Mutex<HashMap<Topic, Slot>>,
    readers: tokio::sync::Semaphore,
    cache: Arc<CacheBudget>,
}

/// What every topic's cache holds together, against `--hub-cache-bytes`.
struct CacheBudget {
    bytes: AtomicUsize,
    limit: usize,
    /// Set while one feed trims every cache; the others go on.
    trimming: AtomicBool,
    metrics: Arc<Metrics>,
}

impl CacheBudget {
    fn add(&self, bytes: usize) {
        let now = self.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.metrics.hub_cache_bytes.set(gauge(now));
    }

    fn sub(&self, bytes: usize) {
        let now = self.bytes.fetch_sub(bytes, Ordering::Relaxed) - bytes;
        self.metrics.hub_cache_bytes.set(gauge(now));
    }

    fn held(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }
}

fn gauge(bytes: usize) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

/// A topic's feed and the local interest in it.
struct Slot {
    feed: Arc<TopicFeed>,
    interest: usize,
    idle_since: Option<Instant>,
}

/// One topic's live feed: its bus subscription task, channel and cache.
struct TopicFeed {
    topic: Topic,
    budget: Arc<CacheBudget>,
    tx: ring::Sender<Arc<SharedEvent>>,
    state: RwLock<FeedState>,
    ready: watch::Sender<bool>,
    fill: Notify,
    stop: Notify,
}

#[derive(Default)]
struct FeedState {
    /// Highest seq handed on; everything up to it was handed on in order.
    last: u64,
    low_seq: u64,
    /// The most recent events, contiguous, ending at `last` (or empty);
    /// each counts its [`SharedEvent::cached_bytes`] against the budget.
    cache: VecDeque<Arc<SharedEvent>>,
}

impl Hub {
    /// Creates the hub and its head-check task. Call on the runtime that
    /// should run the hub's tasks (the service's main runtime).
    pub fn new(
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
        metrics: Arc<Metrics>,
        config: HubConfig,
    ) -> Hub {
        let cache = Arc::new(CacheBudget {
            bytes: AtomicUsize::new(0),
            limit: config.cache_bytes,
            trimming: AtomicBool::new(false),
            metrics: metrics.clone(),
        });
        let inner = Arc::new(Inner {
            store,
            bus,
            metrics,
            runtime: tokio::runtime::Handle::current(),
            topics: Mutex::new(HashMap::new()),
            readers: tokio::sync::Semaphore::new(config.store_readers),
            cache,
            config,
        });
        inner
            .runtime
            .spawn(head_check_forever(Arc::downgrade(&inner)));
        Hub { inner }
    }

    /// The runtime the hub's tasks run on (the service's main runtime).
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.inner.runtime
    }

    /// Registers local interest in `topic`: from the returned subscription's
    /// creation on, every event the hub hands on reaches it. Waits until the
    /// topic's feed knows its last seq (at most the ready timeout).
    pub async fn subscribe(&self, topic: &Topic) -> Result<Subscription, HubError> {
        let (feed, rx) = {
            let mut topics = self.inner.lock_topics();
            let slot = topics.entry(topic.clone()).or_insert_with(|| Slot {
                feed: self.inner.start_feed(topic),
                interest: 0,
                idle_since: None,
            });
            slot.interest += 1;
            slot.idle_since = None;
            let rx = slot.feed.tx.subscribe();
            (slot.feed.clone(), rx)
        };
        let mut sub = Subscription {
            hub: self.clone(),
            feed,
            rx,
            start_last: 0,
        };
        let mut ready = sub.feed.ready.subscribe();
        match tokio::time::timeout(self.inner.config.ready_timeout, ready.wait_for(|r| *r)).await {
            Ok(Ok(_)) => {}
            _ => return Err(HubError::NotReady(topic.clone())),
        }
        sub.start_last = sub.feed.read_state().last;
        Ok(sub)
    }

    /// Up to `limit` events of `topic` with seq > `after`: from the cache
    /// when it covers them, else from the store.
    pub async fn read(&self, topic: &Topic, after: u64, limit: u32) -> Result<HubRead, HubError> {
        if let Some(read) = self.inner.read_cached(topic, after, limit) {
            self.inner
                .metrics
                .hub_reads
                .with_label_values(&["cache"])
                .inc();
            return Ok(read);
        }
        self.inner
            .metrics
            .hub_reads
            .with_label_values(&["store"])
            .inc();
        // The read runs as a task of its own: callers race reads against
        // timeouts and drop them, and a store query dropped half-way can
        // leave its connection inside a transaction for the next user.
        let inner = self.inner.clone();
        let name = topic.clone();
        let r = tokio::spawn(async move {
            // The semaphore is never closed.
            let _permit = inner.readers.acquire().await.ok();
            inner.store.read(&name, after, limit).await
        })
        .await
        .map_err(|e| StoreError::Corrupt(format!("a store read did not finish: {e}")))??;
        Ok(HubRead {
            events: r.events.into_iter().map(SharedEvent::new).collect(),
            head: r.head,
        })
    }

    /// Topics with a live feed in this process (for tests and metrics).
    pub fn topic_count(&self) -> usize {
        self.inner.lock_topics().len()
    }

    fn release(&self, topic: &Topic) {
        let mut topics = self.inner.lock_topics();
        if let Some(slot) = topics.get_mut(topic) {
            slot.interest = slot.interest.saturating_sub(1);
            if slot.interest == 0 {
                slot.idle_since = Some(Instant::now());
            }
        }
    }
}

impl Inner {
    fn lock_topics(&self) -> std::sync::MutexGuard<'_, HashMap<Topic, Slot>> {
        // unwrap: the lock is never held across a panic point
        self.topics.lock().expect("hub topics lock")
    }

    fn start_feed(self: &Arc<Self>, topic: &Topic) -> Arc<TopicFeed> {
        let feed = Arc::new(TopicFeed {
            topic: topic.clone(),
            budget: self.cache.clone(),
            tx: ring::channel(self.config.queue),
            state: RwLock::new(FeedState {
                low_seq: 1,
                ..FeedState::default()
            }),
            ready: watch::channel(false).0,
            fill: Notify::new(),
            stop: Notify::new(),
        });
        self.metrics.hub_topics.inc();
        self.runtime.spawn(run_feed(self.clone(), feed.clone()));
        feed
    }

    fn read_cached(&self, topic: &Topic, after: u64, limit: u32) -> Option<HubRead> {
        let feed = {
            let topics = self.lock_topics();
            topics.get(topic)?.feed.clone()
        };
        if !*feed.ready.borrow() {
            return None;
        }
        let state = feed.read_state();
        let head = TopicHead {
            low_seq: state.low_seq,
            last_seq: state.last,
        };
        if after >= state.last {
            return Some(HubRead {
                events: Vec::new(),
                head,
            });
        }
        let first = state.cache.front()?.seq();
        if first > after + 1 {
            return None;
        }
        let skip = (after + 1 - first) as usize;
        let events = state
            .cache
            .iter()
            .skip(skip)
            .take(limit as usize)
            .cloned()
            .collect();
        Some(HubRead { events, head })
    }
}

impl TopicFeed {
    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, FeedState> {
        // unwrap: the lock is never held across a panic point
        self.state.read().expect("feed state lock")
    }

    fn last(&self) -> u64 {
        self.read_state().last
    }

    /// Hands an event on: cache, then every local subscriber.
    fn deliver(&self, event: Arc<SharedEvent>, cache_events: usize) {
        {
            // unwrap: see read_state
            let mut state = self.state.write().expect("feed state lock");
            state.last = event.seq();
            if cache_events > 0 && self.budget.limit > 0 {
                self.budget.add(event.cached_bytes());
                state.cache.push_back(event.clone());
            }
            let over = state.cache.len().saturating_sub(cache_events);
            self.drop_oldest(&mut state, over);
        }
        // No receiver is fine: the cache still serves readers.
        self.tx.send(event);
    }

    /// Drops the `n` oldest cached events; returns the bytes freed.
    fn drop_oldest(&self, state: &mut FeedState, n: usize) -> usize {
        let freed: usize = state.cache.drain(..n).map(|e| e.cached_bytes()).sum();
        if freed > 0 {
            self.budget.sub(freed);
        }
        freed
    }

    /// Drops the older half of the cache (all of a one-event cache);
    /// returns the bytes freed.
    fn halve_cache(&self) -> usize {
        // unwrap: see read_state
        let mut state = self.state.write().expect("feed state lock");
        let n = state.cache.len().div_ceil(2);
        self.drop_oldest(&mut state, n)
    }
}

impl Drop for TopicFeed {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        let held: usize = state.cache.iter().map(|e| e.cached_bytes()).sum();
        self.budget.sub(held);
    }
}

impl Inner {
    /// Hands an event on (see [`TopicFeed::deliver`]), then keeps every
    /// cache together within `--hub-cache-bytes`.
    fn deliver(&self, feed: &TopicFeed, event: Arc<SharedEvent>) {
        feed.deliver(event, self.config.cache_events);
        if self.cache.held() > self.cache.limit {
            self.trim_caches();
        }
    }

    /// Over the bound: every topic's cache gives up its older half, again
    /// until at most three quarters of the bound is held. Each topic keeps
    /// its newest events (what resumes and wake-ups ask for), and a trim
    /// makes room for a quarter of the bound before the next one.
    fn trim_caches(&self) {
        if self.cache.trimming.swap(true, Ordering::Acquire) {
            return;
        }
        let feeds: Vec<Arc<TopicFeed>> = self
            .lock_topics()
            .values()
            .map(|slot| slot.feed.clone())
            .collect();
        while self.cache.held() > self.cache.limit / 4 * 3 {
            let freed: usize = feeds.iter().map(|feed| feed.halve_cache()).sum();
            if freed == 0 {
                break;
            }
        }
        self.cache.trimming.store(false, Ordering::Release);
    }
}

/// Local interest in one topic; dropping it releases the interest.
pub struct Subscription {
    hub: Hub,
    feed: Arc<TopicFeed>,
    rx: ring::Receiver<Arc<SharedEvent>>,
    start_last: u64,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("topic", &self.feed.topic)
            .field("start_last", &self.start_last)
            .finish()
    }
}

impl Subscription {
    pub fn topic(&self) -> &Topic {
        &self.feed.topic
    }

    /// The hub's last seq when this subscription became ready: every event
    /// above it reaches the subscription live; the ones up to it are in the log.
    pub fn start_last(&self) -> u64 {
        self.start_last
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.release(&self.feed.topic);
    }
}

/// What a follower hands on.
#[derive(Debug, Clone)]
pub enum Delivery {
    Event(Arc<SharedEvent>),
    /// The client's position is older than retention: the events after it up
    /// to `from` are gone, and delivery continues after `from`.
    Reset {
        topic: Topic,
        from: u64,
    },
}

/// Follows one topic from a client's position: the log first (cache, else
/// store), then live events, in seq order, with no gap and no duplicate.
///
/// [`Follower::next`] and [`Follower::catch_up`] are cancel-safe: dropping
/// one of their futures loses nothing, so they can be raced against timeouts.
pub struct Follower {
    sub: Subscription,
    /// Highest seq handed out.
    last: u64,
    backlog: VecDeque<Arc<SharedEvent>>,
    /// Live events taken from the topic's ring in one batch and not yet
    /// handed out (empty, holding nothing, unless a burst is being read).
    live: VecDeque<Arc<SharedEvent>>,
    pending_reset: Option<u64>,
    caught_up: bool,
    page: u32,
    /// Streams close a subscriber that falls behind instead of letting it
    /// catch up from the log forever.
    fail_on_lag: bool,
    lagged_out: bool,
}

impl std::fmt::Debug for Follower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follower")
            .field("topic", self.topic())
            .field("last", &self.last)
            .field("caught_up", &self.caught_up)
            .finish()
    }
}

impl Follower {
    /// Registers interest in `topic` and prepares to hand on events after
    /// `after`, reading the log `page` events at a time.
    pub async fn start(
        hub: &Hub,
        topic: &Topic,
        after: u64,
        page: u32,
    ) -> Result<Follower, HubError> {
        let sub = hub.subscribe(topic).await?;
        Ok(Follower {
            sub,
            last: after,
            backlog: VecDeque::new(),
            live: VecDeque::new(),
            pending_reset: None,
            caught_up: false,
            page: page.clamp(1, FILL_PAGE),
            fail_on_lag: false,
            lagged_out: false,
        })
    }

    /// Makes falling more than the hub's queue behind an error
    /// ([`HubError::Lagged`], from the next call on) instead of a catch-up
    /// from the log: for streams, whose clients resume from their last
    /// position. Nothing more is handed out once it lagged.
    pub fn fail_on_lag(mut self) -> Follower {
        self.fail_on_lag = true;
        self
    }

    /// Like [`Follower::start`], from the topic's current head: only events
    /// committed from now on.
    pub async fn start_live(hub: &Hub, topic: &Topic, page: u32) -> Result<Follower, HubError> {
        let mut follower = Follower::start(hub, topic, 0, page).await?;
        follower.last = follower.sub.start_last();
        Ok(follower)
    }

    pub fn topic(&self) -> &Topic {
        self.sub.topic()
    }

    /// The position reached: the seq of the last event handed out (or the
    /// starting position, or the `from` of a reset).
    pub fn position(&self) -> u64 {
        self.last
    }

    /// Whether everything committed before the follower started has been
    /// read from the log (handed out or waiting in the backlog).
    pub fn is_caught_up(&self) -> bool {
        self.caught_up
    }

    /// The next delivery, waiting for a live event when there is none.
    pub async fn next(&mut self) -> Result<Delivery, HubError> {
        loop {
            if self.lagged_out {
                return Err(HubError::Lagged(self.topic().clone()));
            }
            if let Some(d) = self.pop_ready() {
                return Ok(d);
            }
            if !self.caught_up {
                self.catch_up().await?;
                continue;
            }
            if let Some(e) = self.take_live() {
                if let Some(d) = self.accept_live(e) {
                    return Ok(d);
                }
                continue;
            }
            match self.sub.rx.recv().await {
                Ok(e) => {
                    if let Some(d) = self.accept_live(e) {
                        return Ok(d);
                    }
                }
                Err(ring::RecvError::Lagged(_)) => self.lagged(),
                Err(ring::RecvError::Closed) => {
                    return Err(HubError::Closed(self.topic().clone()));
                }
            }
        }
    }

    /// The next delivery if one is at hand, without waiting or reading the
    /// store (call [`Follower::catch_up`] when this returns `None` and the
    /// follower is not caught up).
    pub fn try_next(&mut self) -> Option<Delivery> {
        if self.lagged_out {
            return None;
        }
        loop {
            if let Some(d) = self.pop_ready() {
                return Some(d);
            }
            if !self.caught_up {
                return None;
            }
            let next = match self.take_live() {
                Some(e) => Ok(e),
                None => self.sub.rx.try_recv_many(&mut self.live, LIVE_BATCH),
            };
            match next {
                Ok(e) => {
                    if let Some(d) = self.accept_live(e) {
                        return Some(d);
                    }
                }
                Err(ring::TryRecvError::Lagged(_)) => self.lagged(),
                Err(_) => return None,
            }
        }
    }

    /// The next live event already taken from the ring; the batch's room
    /// is given back with its last event.
    fn take_live(&mut self) -> Option<Arc<SharedEvent>> {
        let e = self.live.pop_front()?;
        if self.live.is_empty() {
            self.live = VecDeque::new();
        }
        Some(e)
    }

    /// Reads the next page of the log after the position into the backlog.
    /// Does nothing while the backlog still holds events.
    pub async fn catch_up(&mut self) -> Result<(), HubError> {
        if self.lagged_out {
            return Err(HubError::Lagged(self.topic().clone()));
        }
        if !self.backlog.is_empty() || self.pending_reset.is_some() {
            return Ok(());
        }
        let read = self
            .sub
            .hub
            .read(self.topic(), self.last, self.page)
            .await?;
        // Nothing changes before the read completes: cancel-safe.
        let from = match read.events.first() {
            Some(first) if first.seq() > self.last + 1 => Some(first.seq() - 1),
            None if read.head.last_seq > self.last && read.head.low_seq > self.last + 1 => {
                Some(read.head.last_seq)
            }
            _ => None,
        };
        if let Some(from) = from {
            self.pending_reset = Some(from);
        }
        self.caught_up = (read.events.len() as u32) < self.page;
        self.backlog.extend(read.events);
        Ok(())
    }

    fn pop_ready(&mut self) -> Option<Delivery> {
        if let Some(from) = self.pending_reset.take() {
            self.last = from;
            return Some(Delivery::Reset {
                topic: self.topic().clone(),
                from,
            });
        }
        let event = self.backlog.pop_front()?;
        self.last = event.seq();
        Some(Delivery::Event(event))
    }

    /// Step 4 of a resume, per connection: older seqs are dropped, the next
    /// one is handed out, anything beyond means a gap to read from the log.
    fn accept_live(&mut self, event: Arc<SharedEvent>) -> Option<Delivery> {
        let seq = event.seq();
        if seq <= self.last {
            None
        } else if seq == self.last + 1 {
            self.last = seq;
            Some(Delivery::Event(event))
        } else {
            self.caught_up = false;
            None
        }
    }

    fn lagged(&mut self) {
        self.sub.hub.inner.metrics.hub_lagged.inc();
        self.caught_up = false;
        self.lagged_out = self.fail_on_lag;
    }
}

/// A topic's feed task: subscribe to the bus, learn the last seq, then hand
/// on live events in order, filling gaps from the store.
async fn run_feed(inner: Arc<Inner>, feed: Arc<TopicFeed>) {
    let topic = feed.topic.clone();
    let mut signals = Some(inner.bus.signals());
    let Some(mut stream) = subscribe_bus(&inner, &feed).await else {
        return finish(&inner);
    };
    // The bus subscription exists before the head is read, so nothing
    // committed after the read can be missed.
    let mut backoff = Backoff::new();
    loop {
        match inner.store.heads(std::slice::from_ref(&topic)).await {
            Ok(heads) => {
                let head = heads.get(&topic).copied().unwrap_or_default();
                // unwrap: see TopicFeed::read_state
                let mut state = feed.state.write().expect("feed state lock");
                state.last = head.last_seq;
                state.low_seq = head.low_seq;
                break;
            }
            Err(e) => {
                inner.metrics.store_errors.inc();
                tracing::warn!(%topic, error = %e, "live feed cannot read the topic's head; retrying");
                if backoff.wait_or_stop(&feed).await {
                    return finish(&inner);
                }
            }
        }
    }
    feed.ready.send_replace(true);

    loop {
        tokio::select! {
            biased;
            _ = feed.stop.notified() => break,
            _ = feed.fill.notified() => {
                inner.metrics.hub_fills.with_label_values(&["head_check"]).inc();
                if !fill(&inner, &feed).await { break; }
            }
            signal = recv_signal(&mut signals) => {
                let reason = match signal {
                    Some(BusSignal::Reconnected) => "reconnect",
                    Some(BusSignal::SlowConsumer) | None => "slow_consumer",
                };
                inner.metrics.hub_fills.with_label_values(&[reason]).inc();
                if !fill(&inner, &feed).await { break; }
            }
            event = stream.next() => match event {
                Some(event) => {
                    let last = feed.last();
                    if event.seq == last + 1 {
                        inner.deliver(&feed, SharedEvent::new(event));
                    } else if event.seq > last + 1 {
                        // A gap, or an arrival ahead of its predecessors: the log
                        // holds everything up to this seq.
                        inner.metrics.hub_fills.with_label_values(&["gap"]).inc();
                        if !fill(&inner, &feed).await { break; }
                    }
                }
                None => {
                    tracing::warn!(%topic, "bus subscription ended; subscribing again");
                    let Some(s) = subscribe_bus(&inner, &feed).await else { break };
                    stream = s;
                    inner.metrics.hub_fills.with_label_values(&["resubscribe"]).inc();
                    if !fill(&inner, &feed).await { break; }
                }
            },
        }
    }
    finish(&inner);
}

fn finish(inner: &Inner) {
    inner.metrics.hub_topics.dec();
}

async fn recv_signal(signals: &mut Option<broadcast::Receiver<BusSignal>>) -> Option<BusSignal> {
    let Some(rx) = signals.as_mut() else {
        return std::future::pending().await;
    };
    match rx.recv().await {
        Ok(signal) => Some(signal),
        // Missed signals: treat as one more reason to fill.
        Err(broadcast::error::RecvError::Lagged(_)) => None,
        Err(broadcast::error::RecvError::Closed) => {
            *signals = None;
            std::future::pending().await
        }
    }
}

/// Subscribes to the topic on the bus, retrying until it works or the feed
/// is stopped (then `None`).
async fn subscribe_bus(inner: &Inner, feed: &TopicFeed) -> Option<BusStream> {
    let mut backoff = Backoff::new();
    loop {
        match inner.bus.subscribe(&feed.topic).await {
            Ok(stream) => return Some(stream),
            Err(e) => {
                tracing::warn!(topic = %feed.topic, error = %e, "live feed cannot subscribe to the bus; retrying");
                if backoff.wait_or_stop(feed).await {
                    return None;
                }
            }
        }
    }
}

/// Reads everything after the feed's last seq from the store and hands it on.
/// Retries while the store fails. Returns false when the feed was stopped.
async fn fill(inner: &Inner, feed: &TopicFeed) -> bool {
    let mut backoff = Backoff::new();
    loop {
        let last = feed.last();
        match inner.store.read(&feed.topic, last, FILL_PAGE).await {
            Ok(read) => {
                let n = read.events.len();
                {
                    // unwrap: see TopicFeed::read_state
                    feed.state.write().expect("feed state lock").low_seq = read.head.low_seq;
                }
                for event in read.events {
                    if event.seq > feed.last() {
                        inner.deliver(feed, SharedEvent::new(event));
                    }
                }
                if n < FILL_PAGE as usize {
                    return true;
                }
            }
            Err(e) => {
                inner.metrics.store_errors.inc();
                tracing::warn!(topic = %feed.topic, error = %e, "live feed cannot fill a gap from the store; retrying");
                if backoff.wait_or_stop(feed).await {
                    return false;
                }
            }
        }
    }
}

/// Every interval: release topics idle for longer than the linger period,
/// and compare the store's last seq of every live topic (one query per
/// thousand topics) with what the hub has handed on.
async fn head_check_forever(inner: Weak<Inner>) {
    let interval = match inner.upgrade() {
        Some(inner) => inner.config.head_check_interval,
        None => return,
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let feeds: Vec<Arc<TopicFeed>> = {
            let mut topics = inner.lock_topics();
            let linger = inner.config.linger;
            topics.retain(|_, slot| {
                let expired = slot.interest == 0
                    && slot
                        .idle_since
                        .is_some_and(|since| since.elapsed() >= linger);
                if expired {
                    slot.feed.stop.notify_one();
                }
                !expired
            });
            topics
                .values()
                .filter(|slot| *slot.feed.ready.borrow())
                .map(|slot| slot.feed.clone())
                .collect()
        };
        for chunk in feeds.chunks(HEAD_CHECK_CHUNK) {
            let names: Vec<Topic> = chunk.iter().map(|f| f.topic.clone()).collect();
            match inner.store.heads(&names).await {
                Ok(heads) => {
                    for feed in chunk {
                        let head = heads.get(&feed.topic).copied().unwrap_or_default();
                        // unwrap: see TopicFeed::read_state
                        let mut state = feed.state.write().expect("feed state lock");
                        state.low_seq = head.low_seq;
                        if head.last_seq > state.last {
                            feed.fill.notify_one();
                        }
                    }
                }
                Err(e) => {
                    inner.metrics.store_errors.inc();
                    tracing::warn!(error = %e, "head check failed; will retry");
                }
            }
        }
    }
}

/// Exponential backoff from 100 ms to 5 s, interrupted by a feed's stop.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            next: Duration::from_millis(100),
        }
    }

    /// Sleeps; true when the feed was stopped meanwhile.
    async fn wait_or_stop(&mut self, feed: &TopicFeed) -> bool {
        let wait = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(5));
        tokio::select! {
            _ = feed.stop.notified() => true,
            _ = tokio::time::sleep(wait) => false,
        }
    }
}
