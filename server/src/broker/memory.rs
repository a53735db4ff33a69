//! The in-memory broker: one lock per channel, history in a ring bounded by count and age.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::future::{ready, BoxFuture};

use app::protocol::{encode_envelope, Position, Recovery};
use app::token::random_hex;

use super::{
    fan_out, recovery, replay_start, Attached, Broker, BrokerError, ConnId, Delivery, Draft,
    PublishError, SessionEvent, Subscriber,
};

// Limitation: history and fan-out live in this process, so a restart loses the history (clients
// are told: the epoch changes) and no other host can share it. `RedisBroker`, chosen with
// REALTIME_REDIS_URL, lifts both.
pub struct MemoryBroker {
    channels: RwLock<HashMap<String, Arc<Mutex<Channel>>>>,
    max_publish_bytes: usize,
    history_max_messages: usize,
    history_max_age: Duration,
}

struct Channel {
    epoch: Arc<str>,
    head: u64,
    history: VecDeque<Stored>,
    subscribers: HashMap<ConnId, Subscriber>,
}

struct Stored {
    at: Instant,
    delivery: Delivery,
}

impl Channel {
    fn new() -> Self {
        Self {
            epoch: Arc::from(random_hex(8)),
            head: 0,
            history: VecDeque::new(),
            subscribers: HashMap::new(),
        }
    }

    fn position(&self) -> Position {
        Position {
            epoch: self.epoch.to_string(),
            offset: self.head,
        }
    }

    /// Offset of the oldest message still kept, or the next one when none is.
    fn oldest_offset(&self) -> u64 {
        self.history
            .front()
            .map_or(self.head + 1, |s| s.delivery.offset)
    }

    fn trim(&mut self, max_messages: usize, max_age: Duration, now: Instant) {
        while self.history.len() > max_messages {
            self.history.pop_front();
        }
        while self
            .history
            .front()
            .is_some_and(|s| now.duration_since(s.at) > max_age)
        {
            self.history.pop_front();
        }
    }

    /// What a client resuming from `resume` missed, and whether that is all of it.
    fn replay(&self, resume: &Position, topics: &[String]) -> (Vec<Delivery>, Recovery) {
        let wanted = |s: &&Stored| topics.iter().any(|t| **t == *s.delivery.topic);
        let (from, reason) = replay_start(resume, &self.epoch, self.head, self.oldest_offset());
        let replay: Vec<Delivery> = self
            .history
            .iter()
            .filter(|s| s.delivery.offset > from)
            .filter(wanted)
            .map(|s| s.delivery.clone())
            .collect();
        let recovery = recovery(reason, replay.len());
        (replay, recovery)
    }
}

impl MemoryBroker {
    pub fn new(
        max_publish_bytes: usize,
        history_max_messages: usize,
        history_max_age: Duration,
    ) -> Self {
        Self {
            channels: RwLock::new(HashMap::new()),
            max_publish_bytes,
            history_max_messages,
            history_max_age,
        }
    }

    fn channel(&self, name: &str) -> Arc<Mutex<Channel>> {
        if let Some(ch) = self
            .channels
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
        {
            return ch.clone();
        }
        let mut map = self.channels.write().unwrap_or_else(|p| p.into_inner());
        map.entry(name.to_owned())
            .or_insert_with(|| Arc::new(Mutex::new(Channel::new())))
            .clone()
    }

    fn existing(&self, name: &str) -> Option<Arc<Mutex<Channel>>> {
        self.channels
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    fn publish_now(&self, channel: &str, draft: Draft) -> Result<Position, PublishError> {
        // Measured before anything is stored, so a refused publish leaves no trace.
        draft.check_size(self.max_publish_bytes)?;
        let ch = self.channel(channel);
        let mut ch = ch.lock().unwrap_or_else(|p| p.into_inner());
        ch.head += 1;
        let envelope = draft.into_envelope(channel, ch.epoch.to_string(), ch.head);
        let delivery = Delivery {
            epoch: ch.epoch.clone(),
            offset: envelope.offset,
            topic: Arc::from(envelope.topic.as_str()),
            frame: encode_envelope(&envelope).into(),
        };
        let now = Instant::now();
        ch.history.push_back(Stored {
            at: now,
            delivery: delivery.clone(),
        });
        ch.trim(self.history_max_messages, self.history_max_age, now);
        fan_out(&mut ch.subscribers, &delivery);
        Ok(ch.position())
    }
}

impl Broker for MemoryBroker {
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        draft: Draft,
    ) -> BoxFuture<'a, Result<Position, PublishError>> {
        Box::pin(ready(self.publish_now(channel, draft)))
    }

    fn attach<'a>(
        &'a self,
        channel: &'a str,
        subscriber: Subscriber,
        resume: Option<Position>,
    ) -> BoxFuture<'a, Result<Attached, BrokerError>> {
        let ch = self.channel(channel);
        let mut ch = ch.lock().unwrap_or_else(|p| p.into_inner());
        ch.trim(
            self.history_max_messages,
            self.history_max_age,
            Instant::now(),
        );
        let (replay, recovery) = match &resume {
            Some(resume) => {
                let (replay, recovery) = ch.replay(resume, &subscriber.topics);
                (replay, Some(recovery))
            }
            None => (Vec::new(), None),
        };
        // Registered under the same lock as the replay snapshot: nothing falls between them.
        ch.subscribers.insert(subscriber.conn, subscriber);
        Box::pin(ready(Ok(Attached {
            head: ch.position(),
            replay,
            recovery,
        })))
    }

    fn set_topics<'a>(
        &'a self,
        channel: &'a str,
        conn: ConnId,
        topics: Vec<String>,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        if let Some(ch) = self.existing(channel) {
            let mut ch = ch.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(sub) = ch.subscribers.get_mut(&conn) {
                sub.topics = topics;
            }
        }
        Box::pin(ready(Ok(())))
    }

    fn detach(&self, channel: &str, conn: ConnId) {
        if let Some(ch) = self.existing(channel) {
            ch.lock()
                .unwrap_or_else(|p| p.into_inner())
                .subscribers
                .remove(&conn);
        }
    }

    fn announce(&self, _event: SessionEvent) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(ready(Ok(())))
    }

    fn session_end_announced<'a>(
        &'a self,
        _binding: &'a str,
    ) -> BoxFuture<'a, Result<bool, BrokerError>> {
        Box::pin(ready(Ok(false)))
    }

    fn expire_history(&self) {
        let now = Instant::now();
        let mut map = self.channels.write().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, ch| {
            let mut ch = ch.lock().unwrap_or_else(|p| p.into_inner());
            ch.trim(self.history_max_messages, self.history_max_age, now);
            // A channel nobody listens to and with nothing left to replay is dropped; when it
            // comes back it has a new epoch, so resuming clients learn their history is gone.
            !(ch.subscribers.is_empty() && ch.history.is_empty())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::CloseSignal;
    use app::protocol::{close, MessageKind};
    use tokio::sync::mpsc;

    fn draft(topic: &str, n: u64) -> Draft {
        Draft {
            kind: MessageKind::Data,
            topic: topic.into(),
            data: serde_json::value::to_raw_value(&serde_json::json!({ "n": n })).unwrap(),
            run_id: None,
            stream_id: None,
        }
    }

    fn subscriber(
        conn: ConnId,
        cap: usize,
    ) -> (Subscriber, mpsc::Receiver<Delivery>, Arc<CloseSignal>) {
        let (tx, rx) = mpsc::channel(cap);
        let signal = Arc::new(CloseSignal::default());
        let sub = Subscriber {
            conn,
            topics: vec!["ai".into()],
            queue: tx,
            signal: signal.clone(),
        };
        (sub, rx, signal)
    }

    fn broker() -> MemoryBroker {
        MemoryBroker::new(1024, 5, Duration::from_secs(60))
    }

    #[tokio::test]
    async fn resume_replays_only_what_was_missed() {
        let b = broker();
        for n in 0..3 {
            b.publish("user:a", draft("ai", n)).await.unwrap();
        }
        let (sub, _rx, _) = subscriber(1, 8);
        let head = b.attach("user:a", sub, None).await.unwrap().head;
        assert_eq!(head.offset, 3);

        let (sub, _rx, _) = subscriber(2, 8);
        let resume = Position {
            epoch: head.epoch.clone(),
            offset: 1,
        };
        let attached = b.attach("user:a", sub, Some(resume)).await.unwrap();
        let offsets: Vec<u64> = attached.replay.iter().map(|d| d.offset).collect();
        assert_eq!(offsets, vec![2, 3]);
        assert!(attached.recovery.unwrap().complete);
    }

    #[tokio::test]
    async fn gaps_older_than_history_or_another_epoch_are_incomplete() {
        let b = broker();
        for n in 0..8 {
            b.publish("user:a", draft("ai", n)).await.unwrap();
        }
        let (sub, _rx, _) = subscriber(1, 8);
        let epoch = b.attach("user:a", sub, None).await.unwrap().head.epoch;

        let (sub, _rx, _) = subscriber(2, 8);
        let old = Position {
            epoch: epoch.clone(),
            offset: 1,
        };
        let r = b.attach("user:a", sub, Some(old)).await.unwrap();
        assert_eq!(
            r.recovery.as_ref().unwrap().reason.as_deref(),
            Some("history_expired")
        );
        assert_eq!(r.replay.len(), 5, "what is left is still replayed");

        let (sub, _rx, _) = subscriber(3, 8);
        let other = Position {
            epoch: "not-this-one".into(),
            offset: 8,
        };
        let r = b.attach("user:a", sub, Some(other)).await.unwrap();
        assert_eq!(r.recovery.unwrap().reason.as_deref(), Some("epoch_changed"));
    }

    #[tokio::test]
    async fn a_full_queue_closes_that_subscriber_only() {
        let b = broker();
        let (slow, _slow_rx, slow_signal) = subscriber(1, 2);
        let (fast, mut fast_rx, fast_signal) = subscriber(2, 64);
        b.attach("user:a", slow, None).await.unwrap();
        b.attach("user:a", fast, None).await.unwrap();
        for n in 0..10 {
            b.publish("user:a", draft("ai", n)).await.unwrap();
        }
        assert_eq!(
            slow_signal.get().map(|(c, _)| c),
            Some(close::SLOW_CONSUMER)
        );
        assert!(fast_signal.get().is_none());
        let mut got = 0;
        while fast_rx.try_recv().is_ok() {
            got += 1;
        }
        assert_eq!(got, 10);
    }

    #[tokio::test]
    async fn oversize_publish_is_refused_and_leaves_no_offset() {
        let b = broker();
        let big = Draft {
            data: serde_json::value::to_raw_value(&"x".repeat(2000)).unwrap(),
            ..draft("ai", 0)
        };
        let err = b.publish("user:a", big).await.unwrap_err();
        assert!(matches!(err, PublishError::TooLarge { limit: 1024, .. }));
        let pos = b.publish("user:a", draft("ai", 1)).await.unwrap();
        assert_eq!(pos.offset, 1);
    }
}
