//! The in-process bus of the embedded default: one broadcast channel per topic
//! with local subscribers.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use futures_util::stream;
use tokio::sync::broadcast;

use super::{Bus, BusError, BusSignal, BusStream, TopicStream, TraceHeaders};
use crate::event::{Event, Topic};

/// Events a subscriber may fall behind by before it is told it lost some.
const CHANNEL_CAPACITY: usize = 4096;

#[derive(Debug, Clone)]
pub struct MemoryBus {
    topics: Arc<Mutex<HashMap<Topic, broadcast::Sender<Event>>>>,
    /// Every published topic, for [`Bus::watch`].
    all: broadcast::Sender<Topic>,
    signals: broadcast::Sender<BusSignal>,
}

impl Default for MemoryBus {
    fn default() -> Self {
        MemoryBus {
            topics: Arc::default(),
            all: broadcast::channel(CHANNEL_CAPACITY).0,
            signals: broadcast::channel(64).0,
        }
    }
}

impl MemoryBus {
    pub fn new() -> MemoryBus {
        MemoryBus::default()
    }
}

#[async_trait]
impl Bus for MemoryBus {
    async fn publish(&self, event: &Event, _trace: &TraceHeaders) -> Result<(), BusError> {
        if self.all.receiver_count() > 0 {
            let _ = self.all.send(event.topic.clone());
        }
        // unwrap: the lock is never held across a panic point
        let mut topics = self.topics.lock().unwrap();
        if let Some(tx) = topics.get(&event.topic)
            && tx.send(event.clone()).is_err()
        {
            // No receiver left: forget the topic until someone subscribes again.
            topics.remove(&event.topic);
        }
        Ok(())
    }

    async fn subscribe(&self, topic: &Topic) -> Result<BusStream, BusError> {
        let rx = {
            // unwrap: see publish
            let mut topics = self.topics.lock().unwrap();
            topics
                .entry(topic.clone())
                .or_insert_with(|| broadcast::channel(CHANNEL_CAPACITY).0)
                .subscribe()
        };
        Ok(Box::pin(receive(rx, self.signals.clone())))
    }

    async fn watch(&self) -> Result<TopicStream, BusError> {
        Ok(Box::pin(receive(
            self.all.subscribe(),
            self.signals.clone(),
        )))
    }

    fn signals(&self) -> broadcast::Receiver<BusSignal> {
        self.signals.subscribe()
    }

    async fn ping(&self) -> Result<(), BusError> {
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

/// What `rx` receives, as a stream; a receiver that fell behind skips what
/// it lost and says so on `signals`, as NATS reports a slow consumer.
fn receive<T: Clone + Send + 'static>(
    rx: broadcast::Receiver<T>,
    signals: broadcast::Sender<BusSignal>,
) -> impl futures_util::Stream<Item = T> + Send {
    stream::unfold((rx, signals), |(mut rx, signals)| async move {
        loop {
            match rx.recv().await {
                Ok(item) => return Some((item, (rx, signals))),
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let _ = signals.send(BusSignal::SlowConsumer);
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
}
