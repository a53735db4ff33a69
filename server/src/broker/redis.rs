//! The Redis broker, which several hosts share. A channel's epoch and head live in a hash and
//! its history in a stream whose entry ids are the offsets. One Lua script assigns the offset,
//! appends, trims and publishes the frame, so every host sees one order. Each host listens to
//! every channel's live frames over one pub/sub link and hands them to its own subscribers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use futures::future::BoxFuture;
use futures::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubStream};
use redis::{AsyncCommands, Client, Msg, RedisError, Script};

use app::protocol::{close, encode_envelope, Position};
use app::token::random_hex;

use super::{
    fan_out, now_millis, recovery, replay_start, Attached, Broker, BrokerError, ConnId, Delivery,
    Draft, PublishError, SessionEvent, SessionHook, Subscriber,
};

/// Drops entries older than the age bound from the front of the stream `KEYS[2]`.
/// ARGV[1]: now in ms, ARGV[2]: the age bound in ms. Entries are `topic`, `at`, `frame`.
macro_rules! trim_by_age {
    () => {
        r#"
local function trim_by_age(log, now, max_age)
  local cutoff = tonumber(now) - tonumber(max_age)
  for _ = 1, 1000 do
    local first = redis.call('XRANGE', log, '-', '+', 'COUNT', 1)[1]
    if not first or tonumber(first[2][4]) >= cutoff then return end
    redis.call('XDEL', log, first[1])
  end
end
"#
    };
}

/// KEYS: meta, log. ARGV: now ms, max age ms, epoch for a new channel, max messages, topic,
/// the envelope after its opening brace and without epoch and offset, the live channel.
/// Returns {epoch, offset}.
static PUBLISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        trim_by_age!(),
        r#"
-- A new epoch never inherits entries: the log may outlive its meta by a moment.
if redis.call('HSETNX', KEYS[1], 'epoch', ARGV[3]) == 1 then redis.call('DEL', KEYS[2]) end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local offset = redis.call('HINCRBY', KEYS[1], 'head', 1)
local frame = '{"epoch":"' .. epoch .. '","offset":' .. offset .. ',' .. ARGV[6]
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[4], offset .. '-1',
  'topic', ARGV[5], 'at', ARGV[1], 'frame', frame)
trim_by_age(KEYS[2], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[7],
  offset .. ' ' .. epoch .. ' ' .. string.len(ARGV[5]) .. ' ' .. ARGV[5] .. frame)
return {epoch, offset}
"#
    ))
});

/// KEYS: meta, log. ARGV: now ms, max age ms, epoch for a new channel, and when resuming, the
/// resume epoch and offset. Returns {epoch, head, oldest kept offset, entries to replay}.
static ATTACH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        trim_by_age!(),
        r#"
if redis.call('HSETNX', KEYS[1], 'epoch', ARGV[3]) == 1 then redis.call('DEL', KEYS[2]) end
redis.call('HSETNX', KEYS[1], 'head', 0)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
trim_by_age(KEYS[2], ARGV[1], ARGV[2])
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local head = tonumber(redis.call('HGET', KEYS[1], 'head'))
local oldest = head + 1
local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1]
if first then oldest = tonumber(string.match(first[1], '^%d+')) end
local entries = {}
if ARGV[4] then
  local from = 0
  if ARGV[4] == epoch and tonumber(ARGV[5]) <= head then from = tonumber(ARGV[5]) end
  entries = redis.call('XRANGE', KEYS[2], (from + 1) .. '-0', '+')
end
return {epoch, head, oldest, entries}
"#
    ))
});

/// A stream entry as the scripts store it: its id and its fields, flattened.
type Entry = (String, Vec<String>);

pub struct RedisBroker {
    conn: ConnectionManager,
    keys: Keys,
    local: Arc<Local>,
    max_publish_bytes: usize,
    history_max_messages: usize,
    history_max_age: Duration,
    /// How long an ended session stays refused: the longest a token lives.
    ended_ttl: Duration,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// This host's side of the fan-out: who is subscribed here, and whether the link that brings
/// live frames is up.
#[derive(Default)]
struct Local {
    channels: Mutex<HashMap<String, HashMap<ConnId, Subscriber>>>,
    linked: AtomicBool,
}

impl Local {
    fn channels(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<ConnId, Subscriber>>> {
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remove(&self, channel: &str, conn: ConnId) {
        let mut channels = self.channels();
        if let Some(subs) = channels.get_mut(channel) {
            subs.remove(&conn);
            if subs.is_empty() {
                channels.remove(channel);
            }
        }
    }

    fn dispatch(&self, keys: &Keys, msg: &Msg, on_session: &SessionHook) {
        let name = msg.get_channel_name();
        if name == keys.sessions_channel {
            let event = std::str::from_utf8(msg.get_payload_bytes())
                .ok()
                .and_then(SessionEvent::decode);
            match event {
                Some(event) => on_session(event),
                None => tracing::warn!("unreadable session event from redis"),
            }
            return;
        }
        let Some(channel) = name.strip_prefix(&keys.live_prefix) else {
            return;
        };
        let Some(delivery) = parse_live(msg.get_payload_bytes()) else {
            tracing::warn!(%channel, "unreadable live frame from redis");
            return;
        };
        let mut channels = self.channels();
        if let Some(subs) = channels.get_mut(channel) {
            fan_out(subs, &delivery);
            if subs.is_empty() {
                channels.remove(channel);
            }
        }
    }

    /// Without the link, live frames would be missed unseen. Every subscriber here is closed
    /// with the restart code instead, so its client reconnects and resumes from the history.
    fn unlink(&self) -> usize {
        self.linked.store(false, Ordering::Release);
        let drained: Vec<_> = self.channels().drain().collect();
        let mut closed = 0;
        for (_, subs) in drained {
            for sub in subs.values() {
                sub.signal.close(
                    close::SERVICE_RESTART,
                    "lost the link to the broker; resume",
                );
                closed += 1;
            }
        }
        closed
    }
}

#[derive(Clone)]
struct Keys {
    prefix: String,
    live_prefix: String,
    sessions_channel: String,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            live_prefix: format!("{prefix}live:"),
            sessions_channel: format!("{prefix}sessions"),
        }
    }

    fn meta(&self, channel: &str) -> String {
        format!("{}ch:{channel}:meta", self.prefix)
    }

    fn log(&self, channel: &str) -> String {
        format!("{}ch:{channel}:log", self.prefix)
    }

    fn live(&self, channel: &str) -> String {
        format!("{}{channel}", self.live_prefix)
    }

    fn ended(&self, binding: &str) -> String {
        format!("{}ended:{binding}", self.prefix)
    }
}

impl RedisBroker {
    /// Connects to the Redis at `url` and starts listening for live frames. Fails when Redis
    /// cannot be reached, so a host never starts without its broker, and when another host
    /// there signs tokens with a secret other than the one `fingerprint` names.
    pub async fn connect(
        url: &str,
        prefix: &str,
        limits: &crate::config::Limits,
        ended_ttl: Duration,
        fingerprint: &str,
        on_session: SessionHook,
    ) -> Result<Self, LinkError> {
        let client = Client::open(url)?;
        // A request while Redis is away fails within about a second, so that a publish gets its
        // 503 and a client its 1012 promptly; the manager keeps reconnecting behind them.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let conn = ConnectionManager::new_with_config(client.clone(), config).await?;
        let keys = Keys::new(prefix);
        let local = Arc::new(Local::default());
        let link = Link {
            client,
            conn: conn.clone(),
            keys: keys.clone(),
            fingerprint: fingerprint.to_owned(),
        };
        let stream = link.open().await?;
        local.linked.store(true, Ordering::Release);
        let reader = tokio::spawn(read_live(link, local.clone(), stream, on_session));
        Ok(Self {
            conn,
            keys,
            local,
            max_publish_bytes: limits.max_publish_bytes,
            history_max_messages: limits.history_max_messages,
            history_max_age: limits.history_max_age,
            ended_ttl,
            reader,
        })
    }

    /// A handle on the broker's Redis connection, for the session store.
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    fn max_age_ms(&self) -> u64 {
        self.history_max_age.as_millis() as u64
    }

    async fn publish_now(&self, channel: &str, draft: Draft) -> Result<Position, PublishError> {
        draft.check_size(self.max_publish_bytes)?;
        let now = now_millis();
        let topic = draft.topic.clone();
        let tail = envelope_tail(channel, draft)?;
        let (epoch, offset): (String, u64) = PUBLISH
            .key(self.keys.meta(channel))
            .key(self.keys.log(channel))
            .arg(now)
            .arg(self.max_age_ms())
            .arg(random_hex(8))
            .arg(self.history_max_messages)
            .arg(topic)
            .arg(tail)
            .arg(self.keys.live(channel))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| PublishError::Unavailable(e.to_string()))?;
        Ok(Position { epoch, offset })
    }

    async fn attach_now(
        &self,
        channel: &str,
        subscriber: Subscriber,
        resume: Option<Position>,
    ) -> Result<Attached, BrokerError> {
        let (conn, topics) = (subscriber.conn, subscriber.topics.clone());
        // Registered before the history is read: a frame published in between arrives both
        // ways, and the connection drops the offsets it has already sent.
        self.local
            .channels()
            .entry(channel.to_owned())
            .or_default()
            .insert(conn, subscriber);
        if !self.local.linked.load(Ordering::Acquire) {
            self.local.remove(channel, conn);
            return Err(BrokerError::Unavailable("no link to redis".into()));
        }
        let read = self.read_history(channel, resume.as_ref()).await;
        let (epoch, head, oldest, entries) = read.map_err(|e| {
            self.local.remove(channel, conn);
            BrokerError::Unavailable(e.to_string())
        })?;
        let position = Position {
            epoch,
            offset: head,
        };
        let Some(resume) = resume else {
            return Ok(Attached {
                head: position,
                replay: Vec::new(),
                recovery: None,
            });
        };
        let (from, reason) = replay_start(&resume, &position.epoch, head, oldest);
        let epoch: Arc<str> = Arc::from(position.epoch.as_str());
        let replay: Vec<Delivery> = entries
            .into_iter()
            .filter_map(|entry| parse_entry(&epoch, entry))
            .filter(|d| d.offset > from && topics.iter().any(|t| **t == *d.topic))
            .collect();
        let recovery = recovery(reason, replay.len());
        Ok(Attached {
            head: position,
            replay,
            recovery: Some(recovery),
        })
    }

    async fn read_history(
        &self,
        channel: &str,
        resume: Option<&Position>,
    ) -> Result<(String, u64, u64, Vec<Entry>), RedisError> {
        let mut call = ATTACH.key(self.keys.meta(channel));
        call.key(self.keys.log(channel))
            .arg(now_millis())
            .arg(self.max_age_ms())
            .arg(random_hex(8));
        if let Some(resume) = resume {
            call.arg(&resume.epoch).arg(resume.offset);
        }
        call.invoke_async(&mut self.conn.clone()).await
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{0}")]
    Redis(#[from] RedisError),
    #[error(
        "another host on this redis signs tokens with a different secret; \
         give every host the same REALTIME_TOKEN_SECRET"
    )]
    SecretMismatch,
}

/// What it takes to (re)open the pub/sub link.
struct Link {
    client: Client,
    conn: ConnectionManager,
    keys: Keys,
    fingerprint: String,
}

impl Link {
    /// Claims the token secret's fingerprint (again: a Redis that restarted empty has
    /// forgotten it), then subscribes a fresh pub/sub connection to every live channel and
    /// to session events.
    async fn open(&self) -> Result<PubSubStream, LinkError> {
        let key = format!("{}secret-fingerprint", self.keys.prefix);
        let mut conn = self.conn.clone();
        let _: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(&self.fingerprint)
            .arg("NX")
            .query_async(&mut conn)
            .await?;
        let recorded: Option<String> = conn.get(&key).await?;
        if recorded.as_deref() != Some(self.fingerprint.as_str()) {
            return Err(LinkError::SecretMismatch);
        }
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub
            .psubscribe(format!("{}*", self.keys.live_prefix))
            .await?;
        pubsub.subscribe(&self.keys.sessions_channel).await?;
        Ok(pubsub.into_on_message())
    }
}

// Limitation: every host receives every channel's frames and drops those it has no subscriber
// for; per-channel SUBSCRIBE would let many hosts scale further. A link that hangs without
// closing is not noticed until Redis closes it.
async fn read_live(
    link: Link,
    local: Arc<Local>,
    mut stream: PubSubStream,
    on_session: SessionHook,
) {
    loop {
        while let Some(msg) = stream.next().await {
            local.dispatch(&link.keys, &msg, &on_session);
        }
        let closed = local.unlink();
        tracing::warn!(
            connections = closed,
            "lost the link to redis; closed its subscribers"
        );
        let mut delay = Duration::from_millis(100);
        stream = loop {
            tokio::time::sleep(delay).await;
            match link.open().await {
                Ok(stream) => break stream,
                Err(e @ LinkError::SecretMismatch) => {
                    tracing::error!(error = %e, "redis link refused")
                }
                Err(e) => tracing::warn!(error = %e, "redis link still down"),
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        };
        local.linked.store(true, Ordering::Release);
        tracing::info!("redis link restored");
    }
}

/// The envelope's JSON after its opening brace, without `epoch` and `offset`: the publish
/// script puts those two in front once it has assigned them.
fn envelope_tail(channel: &str, draft: Draft) -> Result<String, PublishError> {
    let envelope = draft.into_envelope(channel, String::new(), 0);
    let json = encode_envelope(&envelope);
    json.strip_prefix('{')
        .and_then(|j| j.strip_suffix(r#","epoch":"","offset":0}"#))
        .map(|body| format!("{body}}}"))
        .ok_or_else(|| {
            PublishError::Unavailable("envelope fields out of the expected order".into())
        })
}

/// A live frame as the publish script sends it:
/// `<offset> <epoch> <topic length> <topic><frame>`.
fn parse_live(payload: &[u8]) -> Option<Delivery> {
    let text = std::str::from_utf8(payload).ok()?;
    let (offset, rest) = text.split_once(' ')?;
    let (epoch, rest) = rest.split_once(' ')?;
    let (len, rest) = rest.split_once(' ')?;
    let len: usize = len.parse().ok()?;
    let (topic, frame) = (rest.get(..len)?, rest.get(len..)?);
    Some(Delivery {
        epoch: Arc::from(epoch),
        offset: offset.parse().ok()?,
        topic: Arc::from(topic),
        frame: Utf8Bytes::from(frame.to_owned()),
    })
}

fn parse_entry(epoch: &Arc<str>, (id, fields): Entry) -> Option<Delivery> {
    let offset = id.split('-').next()?.parse().ok()?;
    let (mut topic, mut frame) = (None, None);
    let mut fields = fields.into_iter();
    while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
        match name.as_str() {
            "topic" => topic = Some(value),
            "frame" => frame = Some(value),
            _ => {}
        }
    }
    Some(Delivery {
        epoch: epoch.clone(),
        offset,
        topic: Arc::from(topic?.as_str()),
        frame: Utf8Bytes::from(frame?),
    })
}

impl Broker for RedisBroker {
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        draft: Draft,
    ) -> BoxFuture<'a, Result<Position, PublishError>> {
        Box::pin(self.publish_now(channel, draft))
    }

    fn attach<'a>(
        &'a self,
        channel: &'a str,
        subscriber: Subscriber,
        resume: Option<Position>,
    ) -> BoxFuture<'a, Result<Attached, BrokerError>> {
        Box::pin(self.attach_now(channel, subscriber, resume))
    }

    fn set_topics<'a>(
        &'a self,
        channel: &'a str,
        conn: ConnId,
        topics: Vec<String>,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        if let Some(sub) = self
            .local
            .channels()
            .get_mut(channel)
            .and_then(|subs| subs.get_mut(&conn))
        {
            sub.topics = topics;
        }
        Box::pin(futures::future::ready(Ok(())))
    }

    fn detach(&self, channel: &str, conn: ConnId) {
        self.local.remove(channel, conn);
    }

    /// Redis trims on every publish and attach, and idle channels expire on their own.
    fn expire_history(&self) {}

    fn announce(&self, event: SessionEvent) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            let mut pipe = redis::pipe();
            pipe.atomic();
            if let SessionEvent::Ended { binding } = &event {
                let ttl = self.ended_ttl.as_secs().max(1);
                pipe.set_ex(self.keys.ended(binding), 1, ttl).ignore();
            }
            pipe.publish(&self.keys.sessions_channel, event.encode())
                .ignore()
                .query_async::<()>(&mut self.conn.clone())
                .await
                .map_err(|e| BrokerError::Unavailable(e.to_string()))
        })
    }

    fn session_end_announced<'a>(
        &'a self,
        binding: &'a str,
    ) -> BoxFuture<'a, Result<bool, BrokerError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            conn.exists(self.keys.ended(binding))
                .await
                .map_err(|e| BrokerError::Unavailable(e.to_string()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use app::protocol::MessageKind;

    #[test]
    fn the_tail_and_the_script_prefix_make_the_whole_envelope() {
        let draft = Draft {
            kind: MessageKind::Chunk,
            topic: "ai".into(),
            data: serde_json::value::to_raw_value(&serde_json::json!({"text": "hi"})).unwrap(),
            run_id: Some("r".into()),
            stream_id: None,
        };
        let tail = envelope_tail("user:u", draft).unwrap();
        // What the publish script builds around it.
        let frame = format!(r#"{{"epoch":"e1","offset":42,{tail}"#);
        let envelope: app::protocol::Envelope = serde_json::from_str(&frame).unwrap();
        assert_eq!((envelope.epoch.as_str(), envelope.offset), ("e1", 42));
        assert_eq!(envelope.channel, "user:u");
        assert_eq!(envelope.data["text"], "hi");
        assert!(envelope.created_at > 0);
    }

    #[test]
    fn live_frames_split_into_offset_epoch_topic_and_frame() {
        let d = parse_live(b"12 e1 2 ai{\"x\":1}").unwrap();
        assert_eq!((d.offset, &*d.epoch, &*d.topic), (12, "e1", "ai"));
        assert_eq!(d.frame.as_str(), "{\"x\":1}");
        assert!(parse_live(b"12 e1 9 ai{}").is_none());
        assert!(parse_live(b"x e1 2 ai{}").is_none());
    }
}
