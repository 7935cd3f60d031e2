//! An SSE client for tests, parsing with an independent implementation
//! (eventsource-stream) rather than the server's own framing code.

use std::{pin::Pin, time::Duration};

use eventsource_stream::{Event, Eventsource};
use futures_util::{Stream, StreamExt};

/// Parsed events of one SSE response.
pub type SseStream = Pin<Box<dyn Stream<Item = Result<Event, String>> + Send>>;

/// Opens `url` as an event stream, resuming from `last_event_id` when given.
/// Returns the status and, on 200, the parsed events.
pub async fn connect(
    http: &reqwest::Client,
    url: &str,
    last_event_id: Option<&str>,
) -> Result<SseStream, (u16, serde_json::Value)> {
    let mut req = http.get(url).header("Accept", "text/event-stream");
    if let Some(id) = last_event_id {
        req = req.header("Last-Event-ID", id);
    }
    let res = req.send().await.expect("SSE request");
    let status = res.status().as_u16();
    if status != 200 {
        let body = res.json().await.unwrap_or(serde_json::Value::Null);
        return Err((status, body));
    }
    let content_type = res.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(
        content_type.starts_with("text/event-stream"),
        "content type {content_type}"
    );
    Ok(Box::pin(
        res.bytes_stream()
            .eventsource()
            .map(|r| r.map_err(|e| e.to_string())),
    ))
}

/// The next event of the stream, failing the test after `within`.
pub async fn next_event(stream: &mut SseStream, within: Duration) -> Option<Event> {
    match tokio::time::timeout(within, stream.next()).await {
        Ok(Some(Ok(event))) => Some(event),
        Ok(Some(Err(e))) => panic!("SSE stream failed: {e}"),
        Ok(None) => None,
        Err(_) => panic!("no SSE event within {within:?}"),
    }
}
