//! The ceiling: the least a channel-routing broadcast server can do on the host's own stack
//! (axum 0.8 WebSockets over tungstenite), with no auth, history, offsets or envelope. The
//! host is measured against it to see what its features cost.
//!
//! A client sends `{"channel":"…"}` as its first frame and gets `{"kind":"subscribed"}`;
//! `POST /publish` takes a JSON array of `{"channel":"…","data":…}` and sends each `data`,
//! as it came, to that channel's sockets.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use axum::extract::ws::{Message, Utf8Bytes, WebSocket};
use axum::extract::{State, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use futures::SinkExt;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

/// The same socket settings as the host's `upgrade`, so both pay the same per-socket cost.
pub const READ_BUFFER: usize = 4 * 1024;
pub const WRITE_BUFFER: usize = 16 * 1024;
/// The same per-socket queue and write batch as the host's defaults.
pub const QUEUE: usize = 512;
const WRITE_BATCH: usize = 64;

pub const WS_PATH: &str = "/ws";
pub const PUBLISH_PATH: &str = "/publish";

type Outbox = mpsc::Sender<Utf8Bytes>;

struct Hub {
    channels: RwLock<HashMap<String, Vec<(u64, Outbox)>>>,
    next_socket: AtomicU64,
    /// Messages queued for one socket before the next is lost.
    queue: usize,
}

impl Hub {
    fn join(&self, channel: &str, outbox: Outbox) -> u64 {
        let id = self.next_socket.fetch_add(1, Ordering::Relaxed);
        let mut channels = self.channels.write().unwrap_or_else(|p| p.into_inner());
        channels
            .entry(channel.to_owned())
            .or_default()
            .push((id, outbox));
        id
    }

    fn leave(&self, channel: &str, id: u64) {
        let mut channels = self.channels.write().unwrap_or_else(|p| p.into_inner());
        if let Some(sockets) = channels.get_mut(channel) {
            sockets.retain(|(s, _)| *s != id);
            if sockets.is_empty() {
                channels.remove(channel);
            }
        }
    }
}

#[derive(Deserialize)]
struct Join {
    channel: String,
}

#[derive(Deserialize)]
struct Outgoing {
    channel: String,
    data: Box<RawValue>,
}

/// Serves until the process is killed, queueing up to `queue` messages per socket.
pub async fn serve(addr: SocketAddr, queue: usize) -> std::io::Result<()> {
    serve_on(tokio::net::TcpListener::bind(addr).await?, queue).await
}

async fn serve_on(listener: tokio::net::TcpListener, queue: usize) -> std::io::Result<()> {
    let hub = Hub {
        channels: RwLock::default(),
        next_socket: AtomicU64::default(),
        queue,
    };
    let app = Router::new()
        .route(WS_PATH, get(upgrade))
        .route(PUBLISH_PATH, post(publish))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(Arc::new(hub));
    // TCP_NODELAY, like the host.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await
}

async fn upgrade(State(hub): State<Arc<Hub>>, ws: WebSocketUpgrade) -> Response {
    ws.read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .on_upgrade(move |socket| session(socket, hub))
}

async fn session(mut socket: WebSocket, hub: Arc<Hub>) {
    let channel = match socket.recv().await {
        Some(Ok(Message::Text(text))) => match serde_json::from_str::<Join>(&text) {
            Ok(join) => join.channel,
            Err(_) => return,
        },
        _ => return,
    };
    let (outbox, mut inbox) = mpsc::channel(hub.queue);
    let id = hub.join(&channel, outbox);
    if socket
        .send(Message::Text(r#"{"kind":"subscribed"}"#.into()))
        .await
        .is_ok()
    {
        forward(&mut socket, &mut inbox).await;
    }
    hub.leave(&channel, id);
}

async fn forward(socket: &mut WebSocket, inbox: &mut mpsc::Receiver<Utf8Bytes>) {
    loop {
        tokio::select! {
            first = inbox.recv() => {
                let Some(first) = first else { return };
                if socket.feed(Message::Text(first)).await.is_err() {
                    return;
                }
                for _ in 1..WRITE_BATCH {
                    let Ok(next) = inbox.try_recv() else { break };
                    if socket.feed(Message::Text(next)).await.is_err() {
                        return;
                    }
                }
                if socket.flush().await.is_err() {
                    return;
                }
            }
            frame = socket.recv() => match frame {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
        }
    }
}

async fn publish(State(hub): State<Arc<Hub>>, Json(batch): Json<Vec<Outgoing>>) -> Response {
    let channels = hub.channels.read().unwrap_or_else(|p| p.into_inner());
    let mut sent = 0u64;
    for message in &batch {
        let Some(sockets) = channels.get(&message.channel) else {
            continue;
        };
        let frame = Utf8Bytes::from(message.data.get());
        for (_, outbox) in sockets {
            // A full queue loses the message for that socket; the load generator counts it.
            if outbox.try_send(frame.clone()).is_ok() {
                sent += 1;
            }
        }
    }
    drop(channels);
    (StatusCode::OK, Json(serde_json::json!({ "sent": sent }))).into_response()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;

    use super::*;
    use crate::systems::{Kind, SubState, Tally, Target};

    #[tokio::test]
    async fn published_messages_reach_only_their_channel_in_order() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_on(listener, QUEUE));
        let target = Target {
            kind: Kind::Ceiling,
            ws: addr,
            publish: addr,
            host_keys: None,
        };
        let tally = Arc::new(Tally::default());
        for user in ["a", "b"] {
            let sub = Arc::new(SubState {
                channel: 0,
                last_seq: AtomicU64::new(0),
            });
            let subscription = target.subscribe(user).await.unwrap();
            tokio::spawn(subscription.read_all(sub, tally.clone(), Kind::Ceiling));
        }
        let channel = Kind::Ceiling.channel("a");
        let mut publisher = target.publisher().await.unwrap();
        publisher
            .send(&[(channel.as_str(), 1), (channel.as_str(), 2)])
            .await
            .unwrap();
        let delivered = || tally.delivered.load(Ordering::Relaxed);
        for _ in 0..100 {
            if delivered() >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(delivered(), 2, "b must get nothing");
        assert_eq!(tally.gaps.load(Ordering::Relaxed), 0);
        assert_eq!(tally.duplicated.load(Ordering::Relaxed), 0);
    }
}
