//! The three systems under test and how a client talks to each: the host's own protocol
//! (token auth, envelopes with offsets), the ceiling's bare one, and NATS over WebSocket.
//! Subscribers tally what they receive; publishers stamp every message with its sequence
//! number in its channel and the time it was sent.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures::{FutureExt, SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use app::protocol::{TOPIC_AI, WS_PATH};
use app::token::{random_hex, TokenError, TokenKeys};

use crate::histogram::Histogram;
use crate::http::{HttpClient, HttpError};
use crate::nats;

type Ws = WebSocketStream<TcpStream>;

/// The host's publish endpoint (`server::publish_api::PUBLISH_PATH`).
pub const HOST_PUBLISH_PATH: &str = "/realtime/publish";
/// How long one connect-and-subscribe may take before it counts as failed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// Padding that brings a message's `data` to about 60 bytes: a small live update.
const PAD: &str = "abcdefghijklmnopqrstuvwx";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect: {0}")]
    Connect(#[from] std::io::Error),
    #[error("websocket: {0}")]
    WebSocket(#[from] tungstenite::Error),
    #[error("publish: {0}")]
    Http(#[from] HttpError),
    #[error("token: {0}")]
    Token(#[from] TokenError),
    #[error("nats: {0}")]
    Nats(#[from] nats::NatsError),
    #[error("refused: {0}")]
    Refused(String),
    #[error("no reply within {0:?}")]
    Timeout(Duration),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// leptos-realtime's host, the system this benchmark is about.
    Host,
    Ceiling,
    Nats,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Host => "leptos-realtime",
            Kind::Ceiling => "ceiling",
            Kind::Nats => "nats-ws",
        }
    }

    /// The name of `user`'s channel in this system.
    pub fn channel(self, user: &str) -> String {
        match self {
            Kind::Host | Kind::Ceiling => app::protocol::user_channel(user),
            Kind::Nats => format!("user.{user}"),
        }
    }
}

/// What the host needs from its clients: tokens signed with its secret.
pub struct HostKeys {
    pub keys: TokenKeys,
    pub publisher_token: String,
}

/// One running system, where its clients connect and publish.
pub struct Target {
    pub kind: Kind,
    /// Where subscribers open WebSockets.
    pub ws: SocketAddr,
    /// Where publishers connect: HTTP for the host and the ceiling, WebSocket for NATS.
    pub publish: SocketAddr,
    pub host_keys: Option<HostKeys>,
}

impl Target {
    /// A peer without tokens that takes subscribers and publishers on one address.
    pub fn unauthenticated(kind: Kind, addr: SocketAddr) -> Self {
        Self {
            kind,
            ws: addr,
            publish: addr,
            host_keys: None,
        }
    }
}

/// Microseconds since a base shared by publishers and subscribers of this process.
pub fn now_micros() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// What every subscriber of one workload adds to.
#[derive(Default)]
pub struct Tally {
    pub delivered: AtomicU64,
    pub duplicated: AtomicU64,
    /// Messages skipped over: a later sequence number arrived first.
    pub gaps: AtomicU64,
    /// Host envelopes whose offset is not the sequence number the publisher gave.
    pub wrong_offsets: AtomicU64,
    /// Sockets that closed or failed while the workload ran.
    pub disconnected: AtomicU64,
    pub latency: Histogram,
}

impl Tally {
    pub fn clear(&self) {
        for n in [
            &self.delivered,
            &self.duplicated,
            &self.gaps,
            &self.wrong_offsets,
            &self.disconnected,
        ] {
            n.store(0, Ordering::Relaxed);
        }
        self.latency.clear();
    }
}

/// One subscriber's place in its channel.
pub struct SubState {
    pub channel: usize,
    pub last_seq: AtomicU64,
}

/// What a message frame says about itself.
struct Stamp {
    seq: u64,
    sent_us: u64,
    offset: Option<u64>,
}

/// The unsigned number after `key` (which includes its quotes and colon) in a JSON text.
fn number_after(text: &[u8], key: &[u8]) -> Option<u64> {
    let start = memchr::memmem::find(text, key)? + key.len();
    let digits = text[start..].iter().take_while(|b| b.is_ascii_digit());
    let mut value: u64 = 0;
    let mut any = false;
    for d in digits {
        value = value.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        any = true;
    }
    any.then_some(value)
}

fn stamp(text: &[u8], with_offset: bool) -> Option<Stamp> {
    Some(Stamp {
        seq: number_after(text, b"\"seq\":")?,
        sent_us: number_after(text, b"\"t\":")?,
        offset: if with_offset {
            Some(number_after(text, b"\"offset\":")?)
        } else {
            None
        },
    })
}

/// The `data` every publisher sends; subscribers read `seq` and `t` back out of it.
pub fn payload(seq: u64, sent_us: u64) -> String {
    format!(r#"{{"pad":"{PAD}","seq":{seq},"t":{sent_us}}}"#)
}

fn record(tally: &Tally, sub: &SubState, stamp: Stamp) {
    tally
        .latency
        .record(now_micros().saturating_sub(stamp.sent_us));
    let last = sub.last_seq.load(Ordering::Relaxed);
    if stamp.seq <= last {
        tally.duplicated.fetch_add(1, Ordering::Relaxed);
    } else {
        if stamp.seq > last + 1 {
            tally
                .gaps
                .fetch_add(stamp.seq - last - 1, Ordering::Relaxed);
        }
        sub.last_seq.store(stamp.seq, Ordering::Relaxed);
    }
    if stamp.offset.is_some_and(|o| o != stamp.seq) {
        tally.wrong_offsets.fetch_add(1, Ordering::Relaxed);
    }
    tally.delivered.fetch_add(1, Ordering::Relaxed);
}

fn client_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
}

async fn open(addr: SocketAddr, path: &str) -> Result<Ws, ClientError> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let url = format!("ws://{addr}{path}");
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(url, tcp, Some(client_config())).await?;
    Ok(ws)
}

/// The next text or binary frame, answering pings on the way.
async fn next_data(ws: &mut Ws) -> Result<Message, ClientError> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Close(frame))) => {
                let why = frame.map_or_else(|| "no reason".into(), |f| f.to_string());
                return Err(ClientError::Refused(format!("closed: {why}")));
            }
            Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => return Ok(m),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => return Err(ClientError::Refused("closed".into())),
        }
    }
}

/// A subscribed socket, ready to read messages.
pub struct Subscription {
    ws: Ws,
    nats: Option<nats::Reader>,
}

impl Target {
    /// Connects and subscribes to `user`'s channel; done when the system says it is subscribed.
    pub async fn subscribe(&self, user: &str) -> Result<Subscription, ClientError> {
        tokio::time::timeout(HANDSHAKE_TIMEOUT, self.handshake(user))
            .await
            .map_err(|_| ClientError::Timeout(HANDSHAKE_TIMEOUT))?
    }

    async fn handshake(&self, user: &str) -> Result<Subscription, ClientError> {
        match self.kind {
            Kind::Host => {
                let keys = self.host_keys.as_ref().ok_or_else(no_keys)?;
                let (token, _) = keys.keys.mint(user, &random_hex(8), &[TOPIC_AI.into()])?;
                let mut ws = open(self.ws, WS_PATH).await?;
                let auth = serde_json::json!({"type": "auth", "id": 1, "token": token});
                ws.send(Message::Text(auth.to_string().into())).await?;
                expect_text(&mut ws, r#""kind":"subscribed""#).await?;
                Ok(Subscription { ws, nats: None })
            }
            Kind::Ceiling => {
                let mut ws = open(self.ws, crate::ceiling::WS_PATH).await?;
                let join = serde_json::json!({"channel": self.kind.channel(user)});
                ws.send(Message::Text(join.to_string().into())).await?;
                expect_text(&mut ws, r#""kind":"subscribed""#).await?;
                Ok(Subscription { ws, nats: None })
            }
            Kind::Nats => {
                let mut ws = open(self.ws, "/").await?;
                let ops = nats::subscribe_ops(&self.kind.channel(user), 1);
                ws.send(Message::Binary(ops.into_bytes().into())).await?;
                let mut reader = nats::Reader::default();
                wait_for_pong(&mut ws, &mut reader).await?;
                Ok(Subscription {
                    ws,
                    nats: Some(reader),
                })
            }
        }
    }

    /// Opens one publishing connection.
    pub async fn publisher(&self) -> Result<Publisher, ClientError> {
        match self.kind {
            Kind::Host | Kind::Ceiling => Ok(Publisher {
                kind: self.kind,
                http: Some(HttpClient::connect(self.publish).await?),
                ws: None,
                bearer: self.host_keys.as_ref().map(|k| k.publisher_token.clone()),
                body: Vec::with_capacity(128 * 1024),
            }),
            Kind::Nats => {
                let mut ws = open(self.publish, "/").await?;
                let hello = format!("{}PING\r\n", nats::CONNECT);
                ws.send(Message::Binary(hello.into_bytes().into())).await?;
                wait_for_pong(&mut ws, &mut nats::Reader::default()).await?;
                Ok(Publisher {
                    kind: self.kind,
                    http: None,
                    ws: Some(ws),
                    bearer: None,
                    body: Vec::with_capacity(128 * 1024),
                })
            }
        }
    }
}

fn no_keys() -> ClientError {
    ClientError::Refused("host target without token keys".into())
}

/// Reads until a text frame containing `marker`; an error reply or a close fails.
async fn expect_text(ws: &mut Ws, marker: &str) -> Result<(), ClientError> {
    loop {
        if let Message::Text(text) = next_data(ws).await? {
            if text.contains(marker) {
                return Ok(());
            }
            if text.contains(r#""kind":"error""#) || text.contains(r#""kind":"closing""#) {
                return Err(ClientError::Refused(text.to_string()));
            }
        }
    }
}

async fn wait_for_pong(ws: &mut Ws, reader: &mut nats::Reader) -> Result<(), ClientError> {
    loop {
        let frame = next_data(ws).await?;
        let mut pong = false;
        let mut refused = None;
        reader.feed(&frame.into_data(), |op| match op {
            nats::ServerOp::Pong => pong = true,
            nats::ServerOp::Err(e) => refused = Some(e),
            _ => {}
        })?;
        if let Some(e) = refused {
            return Err(ClientError::Refused(e));
        }
        if pong {
            return Ok(());
        }
    }
}

impl Subscription {
    /// Tallies every message until the socket closes (counted as a disconnect) or the task
    /// is aborted.
    pub async fn read_all(mut self, sub: Arc<SubState>, tally: Arc<Tally>, kind: Kind) {
        let with_offset = kind == Kind::Host;
        loop {
            let frame = match self.ws.next().await {
                Some(Ok(frame)) => frame,
                Some(Err(_)) | None => break,
            };
            match (frame, self.nats.as_mut()) {
                (Message::Text(text), None) => match stamp(text.as_bytes(), with_offset) {
                    Some(s) => record(&tally, &sub, s),
                    // A `closing` notice: the close frame follows.
                    None if text.contains(r#""kind":"closing""#) => break,
                    None => {}
                },
                (m @ (Message::Binary(_) | Message::Text(_)), Some(reader)) => {
                    let mut ping = false;
                    let fed = reader.feed(&m.into_data(), |op| match op {
                        nats::ServerOp::Msg { payload, .. } => {
                            if let Some(s) = stamp(payload, false) {
                                record(&tally, &sub, s);
                            }
                        }
                        nats::ServerOp::Ping => ping = true,
                        _ => {}
                    });
                    if fed.is_err() {
                        break;
                    }
                    let pong = Message::Binary(b"PONG\r\n".to_vec().into());
                    if ping && self.ws.send(pong).await.is_err() {
                        break;
                    }
                }
                (Message::Close(_), _) => break,
                _ => {}
            }
        }
        tally.disconnected.fetch_add(1, Ordering::Relaxed);
    }
}

/// One publishing connection. Every message goes out as `payload(seq, now)`.
pub struct Publisher {
    kind: Kind,
    http: Option<HttpClient>,
    ws: Option<Ws>,
    bearer: Option<String>,
    body: Vec<u8>,
}

impl Publisher {
    /// Publishes one message per `(channel name, seq)`, in order, in one request or frame.
    pub async fn send(&mut self, batch: &[(&str, u64)]) -> Result<(), ClientError> {
        let sent_us = now_micros();
        self.body.clear();
        match self.kind {
            Kind::Host | Kind::Ceiling => {
                self.body.push(b'[');
                for (i, (channel, seq)) in batch.iter().enumerate() {
                    if i > 0 {
                        self.body.push(b',');
                    }
                    let message = format!(
                        r#"{{"channel":"{channel}","topic":"{TOPIC_AI}","kind":"data","data":{}}}"#,
                        payload(*seq, sent_us)
                    );
                    self.body.extend_from_slice(message.as_bytes());
                }
                self.body.push(b']');
                let path = match self.kind {
                    Kind::Host => HOST_PUBLISH_PATH,
                    _ => crate::ceiling::PUBLISH_PATH,
                };
                let http = self.http.as_mut().ok_or_else(no_keys)?;
                let reply = http
                    .post_json(path, self.bearer.as_deref(), &self.body)
                    .await?;
                if reply.status != 200 {
                    let text = String::from_utf8_lossy(&reply.body).into_owned();
                    return Err(ClientError::Refused(format!("{}: {text}", reply.status)));
                }
                Ok(())
            }
            Kind::Nats => {
                for (subject, seq) in batch {
                    nats::push_pub(&mut self.body, subject, payload(*seq, sent_us).as_bytes());
                }
                let ws = self.ws.as_mut().ok_or_else(no_keys)?;
                // The server may ping the publisher too; answer in the same frame.
                while let Some(Some(incoming)) = ws.next().now_or_never() {
                    let incoming = incoming?;
                    if memchr::memmem::find(&incoming.into_data(), b"PING").is_some() {
                        self.body.extend_from_slice(b"PONG\r\n");
                    }
                }
                let frame = std::mem::take(&mut self.body);
                ws.send(Message::Binary(frame.into())).await?;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_come_out_of_host_envelopes_and_bare_payloads() {
        let data = payload(42, 1234);
        let envelope = format!(
            r#"{{"kind":"data","id":"ab","channel":"user:u1","topic":"ai","data":{data},"created_at":9,"epoch":"e1","offset":42}}"#
        );
        let s = stamp(envelope.as_bytes(), true).unwrap();
        assert_eq!((s.seq, s.sent_us, s.offset), (42, 1234, Some(42)));
        let s = stamp(data.as_bytes(), false).unwrap();
        assert_eq!((s.seq, s.sent_us, s.offset), (42, 1234, None));
        assert!(stamp(br#"{"kind":"subscribed"}"#, false).is_none());
    }

    #[test]
    fn duplicates_and_gaps_are_counted() {
        let tally = Tally::default();
        let sub = SubState {
            channel: 0,
            last_seq: AtomicU64::new(0),
        };
        for seq in [1, 2, 2, 5, 3, 6] {
            let s = Stamp {
                seq,
                sent_us: now_micros(),
                offset: Some(seq),
            };
            record(&tally, &sub, s);
        }
        assert_eq!(tally.delivered.load(Ordering::Relaxed), 6);
        assert_eq!(tally.duplicated.load(Ordering::Relaxed), 2);
        assert_eq!(tally.gaps.load(Ordering::Relaxed), 2);
        assert_eq!(sub.last_seq.load(Ordering::Relaxed), 6);
    }
}
