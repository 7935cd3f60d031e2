//! The in-process bus of the embedded default: per topic, a bounded queue for
//! each local subscriber.
//!
//! A queue, not one broadcast ring per topic: a ring of 4,096 events is
//! allocated whole when the topic is first subscribed to (about 460 KiB),
//! which an application with a topic per user pays per connection. A queue
//! allocates as events arrive and shrinks as they are read. A subscriber whose
//! queue is full misses the event and gets a slow-consumer signal, as a
//! lagging ring receiver did; the hub then fills the gap from the log.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use futures_util::stream;
use tokio::sync::{broadcast, mpsc};

use super::{Bus, BusError, BusSignal, BusStream, TopicStream, TraceHeaders};
use crate::event::{Event, Topic};

/// Events a subscriber may fall behind by before it is told it lost some.
/// Events a subscriber may have waiting, per topic (and for `watch`).
const CHANNEL_CAPACITY: usize = 4096;

#[derive(Debug, Clone)]
pub struct MemoryBus {
    topics: Arc<Mutex<HashMap<Topic, Vec<mpsc::Sender<Event>>>>>,
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
        if let Some(subscribers) = topics.get_mut(&event.topic) {
            subscribers.retain(|tx| match tx.try_send(event.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    let _ = self.signals.send(BusSignal::SlowConsumer);
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
            if subscribers.is_empty() {
                // No subscriber left: forget the topic until someone subscribes again.
                topics.remove(&event.topic);
            }
        }
        Ok(())
    }

    async fn subscribe(&self, topic: &Topic) -> Result<BusStream, BusError> {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        {
            // unwrap: see publish
            let mut topics = self.topics.lock().unwrap();
            let subscribers = topics.entry(topic.clone()).or_default();
            // Subscribers that left without a publish since go here.
            subscribers.retain(|tx| !tx.is_closed());
            subscribers.push(tx);
        }
        Ok(Box::pin(stream::unfold(rx, |mut rx| async move {
            let event = rx.recv().await?;
            Some((event, rx))
        })))
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

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn event(topic: &Topic, seq: u64) -> Event {
        Event {
            topic: topic.clone(),
            seq,
            event_type: "message".to_owned(),
            data: serde_json::value::RawValue::from_string("{}".to_owned()).unwrap(),
            time: chrono::Utc::now(),
        }
    }

    #[tokio::test]
    async fn every_subscriber_of_a_topic_gets_its_events_and_no_other() {
        let bus = MemoryBus::new();
        let (a, b) = (Topic::parse("a").unwrap(), Topic::parse("b").unwrap());
        let mut first = bus.subscribe(&a).await.unwrap();
        let mut second = bus.subscribe(&a).await.unwrap();
        let mut other = bus.subscribe(&b).await.unwrap();
        for seq in 1..=3 {
            bus.publish(&event(&a, seq), &TraceHeaders::default())
                .await
                .unwrap();
        }
        for stream in [&mut first, &mut second] {
            for seq in 1..=3 {
                assert_eq!(stream.next().await.unwrap().seq, seq);
            }
        }
        bus.publish(&event(&b, 1), &TraceHeaders::default())
            .await
            .unwrap();
        assert_eq!(other.next().await.unwrap().topic, b);
    }

    #[tokio::test]
    async fn a_full_queue_drops_the_event_and_signals_a_slow_consumer() {
        let bus = MemoryBus::new();
        let topic = Topic::parse("t").unwrap();
        let mut signals = bus.signals();
        let mut stream = bus.subscribe(&topic).await.unwrap();
        let total = CHANNEL_CAPACITY as u64 + 1;
        for seq in 1..=total {
            bus.publish(&event(&topic, seq), &TraceHeaders::default())
                .await
                .unwrap();
        }
        assert!(matches!(signals.try_recv(), Ok(BusSignal::SlowConsumer)));
        // The queued events are intact; the one that did not fit is gone.
        for seq in 1..total {
            assert_eq!(stream.next().await.unwrap().seq, seq);
        }
        bus.publish(&event(&topic, total + 1), &TraceHeaders::default())
            .await
            .unwrap();
        assert_eq!(stream.next().await.unwrap().seq, total + 1);
    }

    #[tokio::test]
    async fn subscribers_that_left_are_forgotten() {
        let bus = MemoryBus::new();
        let topic = Topic::parse("t").unwrap();
        drop(bus.subscribe(&topic).await.unwrap());
        let _kept = bus.subscribe(&topic).await.unwrap();
        assert_eq!(bus.topics.lock().unwrap()[&topic].len(), 1);
        drop(_kept);
        bus.publish(&event(&topic, 1), &TraceHeaders::default())
            .await
            .unwrap();
        assert!(bus.topics.lock().unwrap().is_empty());
    }
}
