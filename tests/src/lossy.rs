//! A bus that loses and delays messages on purpose, to prove that readers
//! fill in from the log.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use rt_core::{
    Event, Topic,
    bus::{Bus, BusError, BusSignal, BusStream, TopicStream, TraceHeaders},
};
use tokio::sync::broadcast;

/// Wraps a bus: of the events published through it, every `drop_every`-th
/// never reaches the bus and every `delay_every`-th arrives `delay` late (so
/// after later events). 0 turns either off.
pub struct LossyBus {
    inner: Arc<dyn Bus>,
    drop_every: u64,
    delay_every: u64,
    delay: Duration,
    count: AtomicU64,
    dropped: AtomicU64,
    /// While true, every publish is lost (the bus "loses the last message").
    lose_all: std::sync::atomic::AtomicBool,
}

impl LossyBus {
    pub fn new(
        inner: Arc<dyn Bus>,
        drop_every: u64,
        delay_every: u64,
        delay: Duration,
    ) -> Arc<Self> {
        Arc::new(LossyBus {
            inner,
            drop_every,
            delay_every,
            delay,
            count: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            lose_all: false.into(),
        })
    }

    /// Events that never reached the bus.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Loses every publish from now on (or stops doing so).
    pub fn lose_all(&self, on: bool) {
        self.lose_all.store(on, Ordering::Relaxed);
    }
}

#[async_trait]
impl Bus for LossyBus {
    async fn publish(&self, event: &Event, trace: &TraceHeaders) -> Result<(), BusError> {
        let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        if self.lose_all.load(Ordering::Relaxed)
            || (self.drop_every > 0 && n.is_multiple_of(self.drop_every))
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        if self.delay_every > 0 && n.is_multiple_of(self.delay_every) {
            let (inner, event, trace, delay) =
                (self.inner.clone(), event.clone(), trace.clone(), self.delay);
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = inner.publish(&event, &trace).await;
            });
            return Ok(());
        }
        self.inner.publish(event, trace).await
    }

    async fn subscribe(&self, topic: &Topic) -> Result<BusStream, BusError> {
        self.inner.subscribe(topic).await
    }

    async fn watch(&self) -> Result<TopicStream, BusError> {
        self.inner.watch().await
    }

    fn signals(&self) -> broadcast::Receiver<BusSignal> {
        self.inner.signals()
    }

    async fn ping(&self) -> Result<(), BusError> {
        self.inner.ping().await
    }

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
}
