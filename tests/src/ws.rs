//! A WebSocket client for tests, on an independent implementation
//! (tokio-tungstenite) rather than the server's own.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{Message, client::IntoClientRequest, protocol::CloseFrame},
};

pub type Socket = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects to `ws://.../v1/ws` (given the service's `http://` base).
pub async fn connect(base: &str) -> Socket {
    let url = format!("{}/v1/ws", base.replacen("http://", "ws://", 1));
    connect_request(url.into_client_request().unwrap())
        .await
        .unwrap_or_else(|e| panic!("WebSocket connect failed: {e}"))
}

/// Connects with a prepared request (extra headers, subprotocols).
pub async fn connect_request(
    req: tokio_tungstenite::tungstenite::handshake::client::Request,
) -> Result<Socket, tokio_tungstenite::tungstenite::Error> {
    tokio_tungstenite::connect_async(req)
        .await
        .map(|(ws, _)| ws)
}

pub async fn send(ws: &mut Socket, frame: Value) {
    ws.send(Message::Text(frame.to_string().into()))
        .await
        .expect("send frame");
}

/// What a socket read returned, pings and pongs skipped.
#[derive(Debug)]
pub enum Received {
    Json(Value),
    Closed(Option<CloseFrame>),
}

/// The next text frame as JSON, or the close; fails the test after `within`.
pub async fn recv(ws: &mut Socket, within: Duration) -> Received {
    loop {
        let next = tokio::time::timeout(within, ws.next())
            .await
            .unwrap_or_else(|_| panic!("nothing received within {within:?}"));
        match next {
            Some(Ok(Message::Text(t))) => {
                return Received::Json(serde_json::from_str(&t).expect("JSON text frame"));
            }
            Some(Ok(Message::Close(frame))) => return Received::Closed(frame),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(other)) => panic!("unexpected frame {other:?}"),
            Some(Err(e)) => panic!("socket error: {e}"),
            None => return Received::Closed(None),
        }
    }
}

/// The next JSON frame; fails the test on a close.
pub async fn recv_json(ws: &mut Socket, within: Duration) -> Value {
    match recv(ws, within).await {
        Received::Json(v) => v,
        Received::Closed(frame) => panic!("socket closed: {frame:?}"),
    }
}
