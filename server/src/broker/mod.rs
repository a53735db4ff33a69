//! The broker: assigns offsets, keeps each channel's recent history, and fans messages out to
//! the connections subscribed to them.
//!
//! `Broker` is the seam between the WebSocket side and the storage behind it. Everything in it
//! is asynchronous and fallible, so an implementation backed by Redis (streams for history,
//! pub/sub for fan-out between hosts) fits behind the same calls as the in-memory one.

mod memory;
mod redis;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::ws::Utf8Bytes;
use futures::future::BoxFuture;
use serde_json::value::RawValue;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, Notify};

use app::protocol::{close, Envelope, MessageKind, Position, Recovery};
use app::token::random_hex;

pub use memory::MemoryBroker;
pub use redis::{LinkError, RedisBroker};

/// A serialized envelope, shared by every connection it goes to.
pub type Frame = Utf8Bytes;

/// Identifies one WebSocket connection within this host.
pub type ConnId = u64;

/// A message before the broker gives it an id, offset and time. `data` is JSON text, checked
/// once where it came in and copied into the envelope as it is.
#[derive(Clone, Debug)]
pub struct Draft {
    pub kind: MessageKind,
    pub topic: String,
    pub data: Box<RawValue>,
    pub run_id: Option<String>,
    pub stream_id: Option<String>,
}

impl Draft {
    /// Refuses data over `limit` bytes, before anything is stored or sent.
    fn check_size(&self, limit: usize) -> Result<(), PublishError> {
        let size = self.data.get().len();
        if size > limit {
            return Err(PublishError::TooLarge { size, limit });
        }
        Ok(())
    }

    /// The envelope for this draft on `channel`, at `(epoch, offset)`, stamped now.
    fn into_envelope(self, channel: &str, epoch: String, offset: u64) -> Envelope<Box<RawValue>> {
        Envelope {
            kind: self.kind,
            id: random_hex(10),
            channel: channel.to_owned(),
            topic: self.topic,
            data: self.data,
            created_at: now_millis(),
            run_id: self.run_id,
            stream_id: self.stream_id,
            epoch,
            offset,
        }
    }
}

/// One message on its way to one connection.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// The channel's epoch when it was published: a shared broker can lose a channel's state
    /// while a connection is open, and a new epoch starts its offsets again from 1.
    pub epoch: Arc<str>,
    pub offset: u64,
    pub topic: Arc<str>,
    pub frame: Frame,
}

/// A connection as the broker sees it: which topics it wants, where to put its messages, and
/// how to tell it to close.
pub struct Subscriber {
    pub conn: ConnId,
    pub topics: Vec<String>,
    pub queue: mpsc::Sender<Delivery>,
    pub signal: Arc<CloseSignal>,
}

/// What `attach` hands back: where the channel stands, what the client missed, and how
/// complete that replay is.
#[derive(Debug)]
pub struct Attached {
    pub head: Position,
    pub replay: Vec<Delivery>,
    pub recovery: Option<Recovery>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("message data is {size} bytes; the limit is {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("broker unavailable: {0}")]
    Unavailable(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    #[error("broker unavailable: {0}")]
    Unavailable(String),
}

pub trait Broker: Send + Sync + 'static {
    /// Stores and delivers one message, or refuses it before anyone sees it.
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        draft: Draft,
    ) -> BoxFuture<'a, Result<Position, PublishError>>;

    /// Registers `subscriber` for live messages on `channel`, and returns what it missed since
    /// `resume`. Live messages may overlap the replay; the caller drops offsets it has sent.
    fn attach<'a>(
        &'a self,
        channel: &'a str,
        subscriber: Subscriber,
        resume: Option<Position>,
    ) -> BoxFuture<'a, Result<Attached, BrokerError>>;

    /// Changes which topics an attached connection receives.
    fn set_topics<'a>(
        &'a self,
        channel: &'a str,
        conn: ConnId,
        topics: Vec<String>,
    ) -> BoxFuture<'a, Result<(), BrokerError>>;

    /// Forgets a connection. Never fails: a closed connection has nothing left to lose.
    fn detach(&self, channel: &str, conn: ConnId);

    /// Drops history older than the configured age; called periodically.
    fn expire_history(&self);

    /// Tells every host sharing this broker what happened to a session, so that each one's
    /// registry agrees: when it expires, and that it ended (close its sockets, refuse its
    /// tokens). This host's own registry already knows; a broker inside one host has nobody
    /// else to tell.
    fn announce(&self, event: SessionEvent) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// Whether another host announced that the session bound to `binding` ended, for a host
    /// that was not listening then (it started later, or lost its link).
    fn session_end_announced<'a>(
        &'a self,
        binding: &'a str,
    ) -> BoxFuture<'a, Result<bool, BrokerError>>;
}

/// What one host tells the others about a session, named by its binding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionEvent {
    /// The session is alive until this many seconds after the Unix epoch.
    Seen {
        binding: String,
        until_secs: u64,
    },
    Ended {
        binding: String,
    },
}

impl SessionEvent {
    fn encode(&self) -> String {
        match self {
            SessionEvent::Seen {
                binding,
                until_secs,
            } => format!("seen {until_secs} {binding}"),
            SessionEvent::Ended { binding } => format!("ended {binding}"),
        }
    }

    fn decode(text: &str) -> Option<Self> {
        match text.split_once(' ')? {
            ("ended", binding) => Some(SessionEvent::Ended {
                binding: binding.to_owned(),
            }),
            ("seen", rest) => {
                let (until, binding) = rest.split_once(' ')?;
                Some(SessionEvent::Seen {
                    binding: binding.to_owned(),
                    until_secs: until.parse().ok()?,
                })
            }
            _ => None,
        }
    }
}

/// What a shared broker calls when another host announces a session event.
pub type SessionHook = Arc<dyn Fn(SessionEvent) + Send + Sync>;

/// Where a replay for a client resuming from `resume` starts (it gets every kept message after
/// that offset) and, when that cannot be all it missed, why. `oldest` is the offset of the oldest
/// message the channel still keeps, or `head + 1` when it keeps none.
fn replay_start(
    resume: &Position,
    epoch: &str,
    head: u64,
    oldest: u64,
) -> (u64, Option<&'static str>) {
    if resume.epoch != epoch {
        (0, Some("epoch_changed"))
    } else if resume.offset > head {
        (0, Some("unknown_position"))
    } else if resume.offset + 1 < oldest {
        (0, Some("history_expired"))
    } else {
        (resume.offset, None)
    }
}

/// Milliseconds since the Unix epoch: an envelope's `created_at`.
fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn recovery(reason: Option<&str>, replayed: usize) -> Recovery {
    Recovery {
        complete: reason.is_none(),
        reason: reason.map(str::to_owned),
        replayed: replayed as u64,
    }
}

/// Hands `delivery` to every subscriber that wants its topic, never waiting: a subscriber whose
/// queue is full is told to close as a slow consumer and dropped, so one stalled client cannot
/// hold up the channel.
fn fan_out(subscribers: &mut HashMap<ConnId, Subscriber>, delivery: &Delivery) {
    subscribers.retain(|_, sub| {
        if !sub.topics.iter().any(|t| **t == *delivery.topic) {
            return true;
        }
        match sub.queue.try_send(delivery.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                sub.signal
                    .close(close::SLOW_CONSUMER, "slow consumer: send queue full");
                false
            }
            Err(TrySendError::Closed(_)) => false,
        }
    });
}

/// Tells a connection task to close, from anywhere: the broker (slow consumer), sign-out,
/// shutdown. The first reason given wins.
#[derive(Default)]
pub struct CloseSignal {
    reason: Mutex<Option<(u16, String)>>,
    notify: Notify,
}

impl CloseSignal {
    pub fn close(&self, code: u16, reason: impl Into<String>) {
        let mut slot = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some((code, reason.into()));
        }
        drop(slot);
        self.notify.notify_waiters();
    }

    pub fn get(&self) -> Option<(u16, String)> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Resolves once `close` has been called.
    pub async fn wait(&self) -> (u16, String) {
        loop {
            let notified = self.notify.notified();
            if let Some(reason) = self.get() {
                return reason;
            }
            notified.await;
        }
    }
}
