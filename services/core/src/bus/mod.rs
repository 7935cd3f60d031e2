//! The bus: the fast path that carries committed events from the publisher to
//! the edges. NATS when distributed, an in-process channel when embedded.
//!
//! The bus is not the record: a lost message is found again in the store.

mod memory;
mod nats;

use std::pin::Pin;

use async_trait::async_trait;
use futures_util::Stream;
use tokio::sync::broadcast;

use crate::event::{Event, Topic};

pub use memory::MemoryBus;
pub use nats::NatsBus;

/// W3C trace context headers (`traceparent`, `tracestate`) carried with an event.
pub type TraceHeaders = Vec<(String, String)>;

/// Live events of one topic, in the order the bus delivers them.
pub type BusStream = Pin<Box<dyn Stream<Item = Event> + Send>>;

/// The topics of events as they are published, every topic: what a consumer
/// of the whole log (the push dispatcher) wakes up on. A topic may come once
/// per event or less; the log says what is new.
pub type TopicStream = Pin<Box<dyn Stream<Item = Topic> + Send>>;

/// Something that may have cost the subscribers messages: whoever relies on
/// the bus fills in from the store when it sees one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusSignal {
    /// The connection came back after an outage.
    Reconnected,
    /// The bus dropped messages for a subscriber that fell behind.
    SlowConsumer,
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus publish failed: {0}")]
    Publish(String),
    #[error("bus subscribe failed: {0}")]
    Subscribe(String),
    #[error("bus is not connected")]
    NotConnected,
}

#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Sends a committed event to the topic's live subscribers.
    async fn publish(&self, event: &Event, trace: &TraceHeaders) -> Result<(), BusError>;

    /// Live events of `topic` from now on.
    async fn subscribe(&self, topic: &Topic) -> Result<BusStream, BusError>;

    /// The topic of every event published from now on, whatever its topic.
    async fn watch(&self) -> Result<TopicStream, BusError>;

    /// Reconnects and slow-consumer notices.
    fn signals(&self) -> broadcast::Receiver<BusSignal>;

    /// Checks that the bus is connected.
    async fn ping(&self) -> Result<(), BusError>;

    /// `nats` or `memory`, for logs and readiness.
    fn kind(&self) -> &'static str;
}

/// The NATS subject of a topic's events: `<prefix>.events.<topic>`.
pub fn subject(prefix: &str, topic: &Topic) -> String {
    format!("{}{topic}", events_prefix(prefix))
}

/// What every event subject starts with: `<prefix>.events.`.
pub(crate) fn events_prefix(prefix: &str) -> String {
    format!("{prefix}.events.")
}
