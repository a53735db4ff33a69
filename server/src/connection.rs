//! One WebSocket connection, from upgrade to close: authenticate, subscribe and replay, then
//! forward messages and answer commands until something closes it.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::stream::{SplitSink, SplitStream};
use futures::{FutureExt, SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};

use app::protocol::{close, ClientCommand, ErrorCode, Position, ServerReply};
use app::token::{unix_now, Claims, TokenError};

use crate::broker::{CloseSignal, ConnId, Delivery, Subscriber};
use crate::connections::{RegisterError, Registration};
use crate::host::Realtime;

/// Most frames sent in one write before flushing.
const WRITE_BATCH: usize = 64;
/// How long one write may take before the client counts as stalled.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for the close handshake to go out.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the connection ends, as it goes on the wire.
struct Closing {
    code: u16,
    reason: String,
}

impl Closing {
    fn new(code: u16, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }
}

type Flow<T = ()> = Result<T, Closing>;

pub async fn serve(socket: WebSocket, rt: Arc<Realtime>) {
    let conn = rt.connections.next_conn_id();
    let (sink, stream) = socket.split();
    let signal = Arc::new(CloseSignal::default());
    let mut c = Connection {
        rt,
        conn,
        sink,
        stream,
        signal,
        sub: None,
        last_seen: Instant::now(),
    };
    let outcome = c.run().await;
    c.finish(outcome).await;
}

/// What an authenticated connection holds.
struct Subscribed {
    claims: Claims,
    topics: Vec<String>,
    queue: mpsc::Receiver<Delivery>,
    last_epoch: Option<Arc<str>>,
    last_offset: u64,
    _registration: Registration,
}

struct Connection {
    rt: Arc<Realtime>,
    conn: ConnId,
    sink: SplitSink<WebSocket, Message>,
    stream: SplitStream<WebSocket>,
    signal: Arc<CloseSignal>,
    sub: Option<Subscribed>,
    last_seen: Instant,
}

impl Connection {
    async fn run(&mut self) -> Flow {
        self.authenticate().await?;
        if self.sub.is_none() {
            // The client left before authenticating.
            return Ok(());
        }
        let limits = self.rt.config.limits.clone();
        let signal = self.signal.clone();
        let mut ping = tokio::time::interval(limits.ping_interval);
        ping.tick().await;
        // The close signal and the expiry timer live across iterations: making them afresh for
        // every message registered a waiter and a timer each time, which cost more than the send.
        let closed = signal.wait();
        tokio::pin!(closed);
        let mut armed_for = self.token_exp();
        let expiry = sleep_until(self.expiry_deadline());
        tokio::pin!(expiry);
        loop {
            if self.token_exp() != armed_for {
                armed_for = self.token_exp();
                expiry.as_mut().reset(self.expiry_deadline());
            }
            let sub = self.sub.as_mut().expect("authenticated");
            tokio::select! {
                biased;
                (code, reason) = &mut closed => return Err(Closing::new(code, reason)),
                first = sub.queue.recv() => match first {
                    Some(first) => self.forward(first).await?,
                    None => return Err(Closing::new(close::SLOW_CONSUMER, "dropped by broker")),
                },
                frame = self.stream.next() => match frame {
                    Some(Ok(msg)) => self.on_frame(msg).await?,
                    // The peer went away; there is nobody left to tell.
                    Some(Err(_)) | None => return Ok(()),
                },
                _ = ping.tick() => {
                    if self.last_seen.elapsed() > limits.ping_interval * 2 {
                        return Err(Closing::new(close::NORMAL, "no reply to keepalive pings"));
                    }
                    self.send_all(vec![Message::Ping(Default::default())]).await?;
                }
                _ = &mut expiry => {
                    return Err(Closing::new(close::TOKEN_EXPIRED, "token expired"));
                }
            }
        }
    }

    fn token_exp(&self) -> u64 {
        self.sub.as_ref().map_or(0, |s| s.claims.exp)
    }

    fn expiry_deadline(&self) -> Instant {
        Instant::now() + Duration::from_secs(self.token_exp().saturating_sub(unix_now()))
    }

    /// Waits for `auth`, checks the token and subscribes. Anything else first is refused.
    async fn authenticate(&mut self) -> Flow {
        let deadline = Instant::now() + self.rt.config.limits.auth_timeout;
        while self.sub.is_none() {
            let frame = tokio::select! {
                (code, reason) = self.signal.wait() => return Err(Closing::new(code, reason)),
                _ = sleep_until(deadline) => {
                    return Err(Closing::new(close::AUTH_REQUIRED, "no auth command in time"));
                }
                frame = self.stream.next() => frame,
            };
            let text = match frame {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Binary(_))) => return Err(binary_refused()),
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return Ok(()),
                Some(Ok(_)) => continue,
            };
            self.check_frame_size(text.len())?;
            match self.parse(&text).await? {
                Some(ClientCommand::Auth {
                    id,
                    token,
                    topics,
                    resume,
                }) => self.on_auth(id, &token, topics, resume).await?,
                Some(_) => {
                    return Err(Closing::new(
                        close::AUTH_REQUIRED,
                        "send auth before other commands",
                    ))
                }
                None => {}
            }
        }
        Ok(())
    }

    async fn on_auth(
        &mut self,
        id: u64,
        token: &str,
        topics: Option<Vec<String>>,
        resume: Option<Position>,
    ) -> Flow {
        let claims = self.rt.tokens.verify(token).map_err(|e| {
            tracing::warn!(conn = self.conn, error = %e, "token refused");
            match e {
                TokenError::Expired => Closing::new(close::TOKEN_EXPIRED, "token expired"),
                other => Closing::new(close::TOKEN_INVALID, other.to_string()),
            }
        })?;
        let topics = topics.unwrap_or_else(|| claims.topics.clone());
        if topics.is_empty() {
            let message = "subscribe to at least one topic".to_owned();
            let code = ErrorCode::BadCommand;
            return self
                .reply(ServerReply::Error {
                    id: Some(id),
                    code,
                    message,
                })
                .await;
        }
        let topics = match self.check_topics(&claims, dedup(topics)) {
            Ok(topics) => topics,
            Err((code, message)) => {
                return self
                    .reply(ServerReply::Error {
                        id: Some(id),
                        code,
                        message,
                    })
                    .await
            }
        };
        // A host that was not listening when another host ended the session learns it here.
        let ended_elsewhere = self
            .rt
            .broker
            .session_end_announced(&claims.sid)
            .await
            .map_err(|e| Closing::new(close::SERVICE_RESTART, e.to_string()))?;
        if ended_elsewhere {
            self.rt.connections.end_session(&claims.sid, "signed out");
        }
        let registration = self
            .rt
            .connections
            .register(self.conn, &claims.sub, &claims.sid, self.signal.clone())
            .map_err(|e| match e {
                RegisterError::TooManyConnections(_) => {
                    tracing::warn!(conn = self.conn, user = %claims.sub, "connection limit reached");
                    Closing::new(close::TOO_MANY_CONNECTIONS, e.to_string())
                }
                RegisterError::SessionEnded => Closing::new(close::SESSION_ENDED, "session ended"),
                RegisterError::ShuttingDown => {
                    Closing::new(close::SERVICE_RESTART, "server is restarting")
                }
            })?;

        let (tx, rx) = mpsc::channel(self.rt.config.limits.send_queue);
        let subscriber = Subscriber {
            conn: self.conn,
            topics: topics.clone(),
            queue: tx,
            signal: self.signal.clone(),
        };
        let attached = self
            .rt
            .broker
            .attach(&claims.channel, subscriber, resume)
            .await
            .map_err(|e| Closing::new(close::SERVICE_RESTART, e.to_string()))?;
        tracing::info!(conn = self.conn, user = %claims.sub, channel = %claims.channel, "subscribed");

        let reply = ServerReply::Subscribed {
            id,
            channel: claims.channel.clone(),
            topics: topics.clone(),
            position: attached.head.clone(),
            expires_at: claims.exp,
            recovery: attached.recovery,
        };
        self.sub = Some(Subscribed {
            claims,
            topics,
            queue: rx,
            last_epoch: None,
            last_offset: 0,
            _registration: registration,
        });
        self.reply(reply).await?;
        self.send_deliveries(attached.replay).await
    }

    fn check_topics(
        &self,
        claims: &Claims,
        topics: Vec<String>,
    ) -> Result<Vec<String>, (ErrorCode, String)> {
        for topic in &topics {
            claims
                .allows(&claims.channel, topic)
                .map_err(|e| (ErrorCode::TopicForbidden, e.to_string()))?;
        }
        let max = self.rt.config.limits.max_topics_per_conn;
        if topics.len() > max {
            let msg = format!(
                "{} topics requested; at most {max} per connection",
                topics.len()
            );
            return Err((ErrorCode::TooManyTopics, msg));
        }
        Ok(topics)
    }

    /// Sends `first` and whatever else is already queued, in one flush.
    async fn forward(&mut self, first: Delivery) -> Flow {
        let mut batch = vec![first];
        let sub = self.sub.as_mut().expect("authenticated");
        while batch.len() < WRITE_BATCH {
            match sub.queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        self.send_deliveries(batch).await
    }

    /// Sends messages the connection has not sent yet, on topics it still wants.
    async fn send_deliveries(&mut self, deliveries: Vec<Delivery>) -> Flow {
        let sub = self.sub.as_mut().expect("authenticated");
        let mut frames = Vec::with_capacity(deliveries.len());
        for d in deliveries {
            // The same rule as the client's cursor: a new epoch starts its offsets afresh.
            if sub.last_epoch.as_ref() != Some(&d.epoch) {
                sub.last_epoch = Some(d.epoch.clone());
                sub.last_offset = 0;
            }
            if d.offset <= sub.last_offset || !sub.topics.iter().any(|t| **t == *d.topic) {
                continue;
            }
            sub.last_offset = d.offset;
            frames.push(Message::Text(d.frame));
        }
        self.send_all(frames).await
    }

    async fn on_frame(&mut self, msg: Message) -> Flow {
        self.last_seen = Instant::now();
        let text = match msg {
            Message::Text(text) => text,
            Message::Binary(_) => return Err(binary_refused()),
            // tungstenite answers the close handshake itself.
            Message::Close(_) => return Ok(()),
            Message::Ping(_) | Message::Pong(_) => return Ok(()),
        };
        self.check_frame_size(text.len())?;
        let Some(cmd) = self.parse(&text).await? else {
            return Ok(());
        };
        match cmd {
            ClientCommand::Auth { id, .. } => {
                let message = "this connection is already authenticated".to_owned();
                self.reply(ServerReply::Error {
                    id: Some(id),
                    code: ErrorCode::AlreadyAuthenticated,
                    message,
                })
                .await
            }
            ClientCommand::Refresh { id, token } => self.on_refresh(id, &token).await,
            ClientCommand::Subscribe { id, topics } => {
                let mut wanted = self.sub.as_ref().expect("authenticated").topics.clone();
                wanted.extend(topics);
                self.change_topics(id, dedup(wanted)).await
            }
            ClientCommand::Unsubscribe { id, topics } => {
                let mut wanted = self.sub.as_ref().expect("authenticated").topics.clone();
                wanted.retain(|t| !topics.contains(t));
                self.change_topics(id, wanted).await
            }
        }
    }

    async fn change_topics(&mut self, id: u64, topics: Vec<String>) -> Flow {
        let sub = self.sub.as_ref().expect("authenticated");
        let topics = match self.check_topics(&sub.claims, topics) {
            Ok(topics) => topics,
            Err((code, message)) => {
                return self
                    .reply(ServerReply::Error {
                        id: Some(id),
                        code,
                        message,
                    })
                    .await
            }
        };
        let channel = sub.claims.channel.clone();
        self.rt
            .broker
            .set_topics(&channel, self.conn, topics.clone())
            .await
            .map_err(|e| Closing::new(close::SERVICE_RESTART, e.to_string()))?;
        let sub = self.sub.as_mut().expect("authenticated");
        sub.topics = topics.clone();
        let expires_at = sub.claims.exp;
        self.reply(ServerReply::Ack {
            id,
            topics,
            expires_at,
        })
        .await
    }

    /// Swaps in a fresh token for the same user and session. Any fault closes the connection:
    /// a refresh that fails must never leave the old token running longer.
    async fn on_refresh(&mut self, id: u64, token: &str) -> Flow {
        let refused = |reason: String| {
            tracing::warn!(conn = self.conn, %reason, "token refresh refused");
            Closing::new(
                close::REFRESH_REJECTED,
                format!("refresh refused: {reason}"),
            )
        };
        let fresh = self
            .rt
            .tokens
            .verify(token)
            .map_err(|e| refused(e.to_string()))?;
        let sub = self.sub.as_mut().expect("authenticated");
        if fresh.sub != sub.claims.sub || fresh.channel != sub.claims.channel {
            return Err(refused("token is for another user".into()));
        }
        if fresh.sid != sub.claims.sid {
            return Err(refused("token is for another session".into()));
        }
        if self.rt.connections.session_ended_already(&fresh.sid) {
            return Err(Closing::new(close::SESSION_ENDED, "session ended"));
        }
        let kept: Vec<String> = sub
            .topics
            .iter()
            .filter(|t| fresh.topics.contains(t))
            .cloned()
            .collect();
        let dropped = kept.len() != sub.topics.len();
        sub.claims = fresh;
        if dropped {
            let channel = sub.claims.channel.clone();
            self.rt
                .broker
                .set_topics(&channel, self.conn, kept.clone())
                .await
                .ok();
            self.sub.as_mut().expect("authenticated").topics = kept;
        }
        let sub = self.sub.as_ref().expect("authenticated");
        let (topics, expires_at) = (sub.topics.clone(), sub.claims.exp);
        tracing::debug!(conn = self.conn, expires_at, "token refreshed");
        self.reply(ServerReply::Ack {
            id,
            topics,
            expires_at,
        })
        .await
    }

    fn check_frame_size(&self, len: usize) -> Flow {
        let limit = self.rt.config.limits.max_frame_bytes;
        if len > limit {
            tracing::warn!(conn = self.conn, len, limit, "client frame too large");
            return Err(Closing::new(
                close::FRAME_TOO_BIG,
                format!("frame of {len} bytes exceeds the {limit}-byte limit"),
            ));
        }
        Ok(())
    }

    /// A command, or `None` after replying with an error for a frame that is not one.
    async fn parse(&mut self, text: &str) -> Flow<Option<ClientCommand>> {
        match ClientCommand::parse(text) {
            Ok(cmd) => Ok(Some(cmd)),
            Err(e) => {
                tracing::warn!(conn = self.conn, error = %e, "bad command");
                let id = app::protocol::command_id(text);
                let message = format!("not a valid command: {e}");
                self.reply(ServerReply::Error {
                    id,
                    code: ErrorCode::BadCommand,
                    message,
                })
                .await?;
                Ok(None)
            }
        }
    }

    async fn reply(&mut self, reply: ServerReply) -> Flow {
        let text = serde_json::to_string(&reply).expect("replies always serialize");
        self.send_all(vec![Message::Text(text.into())]).await
    }

    /// Writes and flushes, unless the client stalls or something asks the connection to close.
    async fn send_all(&mut self, frames: Vec<Message>) -> Flow {
        if frames.is_empty() {
            return Ok(());
        }
        let sink = &mut self.sink;
        let signal = &self.signal;
        let write = async {
            for frame in frames {
                sink.feed(frame).await?;
            }
            sink.flush().await
        };
        let mut write = std::pin::pin!(write);
        let lost = |_| Closing::new(close::NORMAL, "connection lost");
        // Most writes fit in the socket buffer and finish on the first poll; only one that has
        // to wait needs the timeout and the close signal watched.
        if let Some(done) = write.as_mut().now_or_never() {
            return done.map_err(lost);
        }
        tokio::select! {
            done = write => done.map_err(lost),
            (code, reason) = signal.wait() => Err(Closing::new(code, reason)),
            _ = tokio::time::sleep(WRITE_TIMEOUT) => {
                Err(Closing::new(close::SLOW_CONSUMER, "slow consumer: write timed out"))
            }
        }
    }

    /// Detaches from the broker and, when the server is the one closing, says why.
    async fn finish(mut self, outcome: Flow) {
        if let Some(sub) = self.sub.take() {
            self.rt.broker.detach(&sub.claims.channel, self.conn);
        }
        let Err(Closing { code, reason }) = outcome else {
            return;
        };
        if code == close::SLOW_CONSUMER {
            // The one close that says the host could not keep up with a reader.
            tracing::warn!(conn = self.conn, code, %reason, "closing connection");
        } else {
            tracing::info!(conn = self.conn, code, %reason, "closing connection");
        }
        let notice = serde_json::to_string(&ServerReply::Closing {
            code,
            reason: reason.clone(),
        })
        .expect("replies always serialize");
        let frame = CloseFrame {
            code,
            reason: truncate_reason(&reason).into(),
        };
        let goodbye = async {
            if code != close::SLOW_CONSUMER {
                self.sink.feed(Message::Text(notice.into())).await?;
            }
            self.sink.send(Message::Close(Some(frame))).await
        };
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, goodbye).await;
    }
}

fn binary_refused() -> Closing {
    Closing::new(
        close::UNSUPPORTED_DATA,
        "binary frames are not part of this protocol",
    )
}

fn dedup(mut topics: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    topics.retain(|t| seen.insert(t.clone()));
    topics
}

/// A close frame's reason has room for 123 bytes; the full reason went in the `closing` reply.
fn truncate_reason(reason: &str) -> String {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}
