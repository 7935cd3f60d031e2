//! The NATS bus: one subject per topic, protobuf envelope, trace context in headers.

use std::time::Duration;

use async_nats::{ConnectOptions, HeaderMap, connection::State};
use async_trait::async_trait;
use futures_util::StreamExt;
use tokio::sync::broadcast;

use super::{
    Bus, BusError, BusSignal, BusStream, TopicStream, TraceHeaders, events_prefix, subject,
};
use crate::{
    event::{Event, Topic},
    proto,
};

#[derive(Debug, Clone)]
pub struct NatsBus {
    client: async_nats::Client,
    prefix: String,
    signals: broadcast::Sender<BusSignal>,
}

impl NatsBus {
    /// Connects to NATS. Call this on the main multi-threaded runtime: the
    /// connection task lives on the runtime that connects.
    pub async fn connect(
        url: &str,
        prefix: &str,
        startup_timeout: Duration,
    ) -> anyhow::Result<NatsBus> {
        let signals = broadcast::channel(64).0;
        let tx = signals.clone();
        let connect = ConnectOptions::new()
            .name("realtime")
            .retry_on_initial_connect()
            .event_callback(move |event| {
                let tx = tx.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            tracing::info!("NATS connected");
                            let _ = tx.send(BusSignal::Reconnected);
                        }
                        async_nats::Event::Disconnected => tracing::warn!("NATS disconnected"),
                        async_nats::Event::SlowConsumer(sid) => {
                            tracing::warn!(sid, "NATS dropped messages for a slow subscriber");
                            let _ = tx.send(BusSignal::SlowConsumer);
                        }
                        other => tracing::info!(event = %other, "NATS event"),
                    }
                }
            })
            .connect(url);
        let client = tokio::time::timeout(startup_timeout, connect)
            .await
            .map_err(|_| {
                anyhow::anyhow!("NATS at {url} did not answer within {startup_timeout:?}")
            })?
            .map_err(|e| anyhow::anyhow!("cannot connect to NATS at {url}: {e}"))?;
        Ok(NatsBus {
            client,
            prefix: prefix.to_owned(),
            signals,
        })
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }
}

#[async_trait]
impl Bus for NatsBus {
    async fn publish(&self, event: &Event, trace: &TraceHeaders) -> Result<(), BusError> {
        let mut headers = HeaderMap::new();
        for (k, v) in trace {
            headers.insert(k.as_str(), v.as_str());
        }
        self.client
            .publish_with_headers(
                subject(&self.prefix, &event.topic),
                headers,
                proto::encode(event).into(),
            )
            .await
            .map_err(|e| BusError::Publish(e.to_string()))
    }

    async fn subscribe(&self, topic: &Topic) -> Result<BusStream, BusError> {
        let sub = self
            .client
            .subscribe(subject(&self.prefix, topic))
            .await
            .map_err(|e| BusError::Subscribe(e.to_string()))?;
        Ok(Box::pin(sub.filter_map(|msg| async move {
            match proto::decode(&msg.payload) {
                Ok(event) => Some(event),
                Err(e) => {
                    tracing::warn!(subject = %msg.subject, error = %e, "dropping a malformed envelope");
                    None
                }
            }
        })))
    }

    async fn watch(&self) -> Result<TopicStream, BusError> {
        let prefix = events_prefix(&self.prefix);
        let sub = self
            .client
            .subscribe(format!("{prefix}>"))
            .await
            .map_err(|e| BusError::Subscribe(e.to_string()))?;
        Ok(Box::pin(sub.filter_map(move |msg| {
            let topic = msg
                .subject
                .strip_prefix(prefix.as_str())
                .and_then(|name| Topic::parse(name).ok());
            async move { topic }
        })))
    }

    fn signals(&self) -> broadcast::Receiver<BusSignal> {
        self.signals.subscribe()
    }

    async fn ping(&self) -> Result<(), BusError> {
        match self.client.connection_state() {
            State::Connected => Ok(()),
            _ => Err(BusError::NotConnected),
        }
    }

    fn kind(&self) -> &'static str {
        "nats"
    }
}
