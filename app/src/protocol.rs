//! The wire protocol between the broker and its clients: the message envelope, the commands a
//! client sends, the replies it gets, and the close codes. `docs/PROTOCOL.md` is the prose form.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The only topic that exists so far: the sample ai publisher's answers.
pub const TOPIC_AI: &str = "ai";
/// Topics a token may name. Anything else is refused when the token is minted.
pub const KNOWN_TOPICS: &[&str] = &[TOPIC_AI];
/// Path of the broker's WebSocket endpoint on the host.
pub const WS_PATH: &str = "/realtime/ws";

/// Name of the per-user channel.
pub fn user_channel(user_id: &str) -> String {
    format!("user:{user_id}")
}

/// What a published message is, mirroring Inngest Realtime's `kind` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MessageKind {
    /// A whole message on its own.
    Data,
    /// The first message of a stream (for the ai topic: an answer begins).
    DatastreamStart,
    /// One piece of a stream.
    Chunk,
    /// The last message of a stream.
    DatastreamEnd,
}

/// Where a message sits in its channel: offsets only grow within one epoch, and the epoch
/// changes whenever the channel's history is lost.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub epoch: String,
    pub offset: u64,
}

/// A message as delivered to subscribers. Field names follow Inngest Realtime where it has a
/// field of the same meaning (`kind`, `channel`, `topic`, `data`, `created_at`, `run_id`,
/// `stream_id`). Clients read `data` as a JSON value; the broker carries it as the raw JSON
/// text it was published with, so it is never parsed into a tree or serialized again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope<Data = serde_json::Value> {
    pub kind: MessageKind,
    /// Unique id of this message.
    pub id: String,
    pub channel: String,
    pub topic: String,
    pub data: Data,
    /// Milliseconds since the Unix epoch, set by the broker when it accepted the publish.
    pub created_at: u64,
    /// The background job that published it, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// Groups the start, chunks and end of one stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_id: Option<String>,
    pub epoch: String,
    pub offset: u64,
}

impl<Data> Envelope<Data> {
    pub fn position(&self) -> Position {
        Position {
            epoch: self.epoch.clone(),
            offset: self.offset,
        }
    }
}

/// What a client sends. Every command carries an `id` that the reply echoes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientCommand {
    /// Must come first. Verifies the token and subscribes to `topics` (all of the token's topics
    /// when absent). With `resume`, replays what came after that position before going live.
    Auth {
        id: u64,
        token: String,
        #[serde(default)]
        topics: Option<Vec<String>>,
        #[serde(default)]
        resume: Option<Position>,
    },
    /// Replaces the connection's token with a fresh one for the same user, channel and session.
    Refresh {
        id: u64,
        token: String,
    },
    Subscribe {
        id: u64,
        topics: Vec<String>,
    },
    Unsubscribe {
        id: u64,
        topics: Vec<String>,
    },
}

impl ClientCommand {
    /// Parses one command frame. Only a JSON object is a command: serde would also take the
    /// array form of a tagged enum, which this protocol does not have.
    pub fn parse(raw: &str) -> Result<Self, String> {
        if !raw.trim_start().starts_with('{') {
            return Err("a command is a JSON object".to_owned());
        }
        serde_json::from_str(raw).map_err(|e| e.to_string())
    }
}

/// Reads just the `id` of a frame, to report which command a bad frame tried to be.
pub fn command_id(raw: &str) -> Option<u64> {
    #[derive(Deserialize)]
    struct IdOnly {
        id: Option<u64>,
    }
    serde_json::from_str::<IdOnly>(raw).ok().and_then(|i| i.id)
}

/// How a resumed subscription went.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recovery {
    /// True when everything after the client's position was replayed.
    pub complete: bool,
    /// Why not, when it was not: `epoch_changed` or `history_expired`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// How many messages are replayed right after this reply.
    pub replayed: u64,
}

/// What the broker sends that is not a message: replies to commands and the closing notice.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ServerReply {
    /// Reply to `auth`: the connection is subscribed. Replayed messages, if any, follow.
    Subscribed {
        id: u64,
        channel: String,
        topics: Vec<String>,
        /// The channel's current head, so a client knows where it is even before a message.
        position: Position,
        /// Seconds since the Unix epoch at which the token expires.
        expires_at: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        recovery: Option<Recovery>,
    },
    /// Reply to `refresh`, `subscribe` and `unsubscribe`.
    Ack {
        id: u64,
        topics: Vec<String>,
        expires_at: u64,
    },
    /// A command was refused; the connection stays open.
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        code: ErrorCode,
        message: String,
    },
    /// The server is about to close the connection with `code`.
    Closing { code: u16, reason: String },
}

/// Codes of `error` replies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not JSON, or not a command this server knows.
    BadCommand,
    /// A topic the token does not cover.
    TopicForbidden,
    /// More topics than the per-connection limit.
    TooManyTopics,
    /// `auth` sent twice.
    AlreadyAuthenticated,
}

/// Close codes the broker uses. 1xxx are the standard ones; 4xxx are this protocol's own.
pub mod close {
    pub const NORMAL: u16 = 1000;
    /// Binary frames are not part of the protocol.
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// A client frame larger than the inbound limit.
    pub const FRAME_TOO_BIG: u16 = 1009;
    /// The host is shutting down; reconnect and resume.
    pub const SERVICE_RESTART: u16 = 1012;
    /// The token is malformed, forged, uses another algorithm, or names another channel.
    pub const TOKEN_INVALID: u16 = 4001;
    /// The token expired and no fresh one arrived in time.
    pub const TOKEN_EXPIRED: u16 = 4002;
    /// The session behind the token was signed out or expired.
    pub const SESSION_ENDED: u16 = 4003;
    /// A refresh carried a token that is expired, forged or for another user or session.
    pub const REFRESH_REJECTED: u16 = 4004;
    /// No `auth` command arrived in time, or another command came before it.
    pub const AUTH_REQUIRED: u16 = 4005;
    /// The client did not read fast enough and its send queue filled up.
    pub const SLOW_CONSUMER: u16 = 4008;
    /// The user already has as many connections as allowed.
    pub const TOO_MANY_CONNECTIONS: u16 = 4009;

    /// Whether a client should try again after this close (with a fresh token).
    pub fn should_reconnect(code: u16) -> bool {
        !matches!(code, SESSION_ENDED | NORMAL)
    }
}

/// What the token server function hands the page.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenGrant {
    pub token: String,
    pub channel: String,
    pub topics: Vec<String>,
    /// Seconds since the Unix epoch.
    pub expires_at: u64,
    /// Seconds the token lives, so a client can schedule its refresh.
    pub ttl_secs: u64,
}

/// Serialize an envelope once for every subscriber. Kept here so server and tests agree.
pub fn encode_envelope<Data: Serialize>(envelope: &Envelope<Data>) -> String {
    serde_json::to_string(envelope).expect("envelopes always serialize")
}

/// A frame from the broker, as a client reads it.
#[derive(Clone, Debug, PartialEq)]
pub enum ServerFrame {
    Message(Envelope),
    Reply(ServerReply),
}

impl ServerFrame {
    pub fn parse(raw: &str) -> Result<Self, serde_json::Error> {
        #[derive(Deserialize)]
        struct KindOnly<'a> {
            #[serde(borrow)]
            kind: &'a RawValue,
        }
        let kind: KindOnly = serde_json::from_str(raw)?;
        let is_message = serde_json::from_str::<MessageKind>(kind.kind.get()).is_ok();
        if is_message {
            serde_json::from_str(raw).map(ServerFrame::Message)
        } else {
            serde_json::from_str(raw).map(ServerFrame::Reply)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_tell_messages_from_replies() {
        let env = Envelope {
            kind: MessageKind::Chunk,
            id: "m1".into(),
            channel: user_channel("u1"),
            topic: TOPIC_AI.into(),
            data: serde_json::json!({"text": "hi"}),
            created_at: 1,
            run_id: Some("r1".into()),
            stream_id: Some("r1".into()),
            epoch: "e".into(),
            offset: 3,
        };
        let raw = encode_envelope(&env);
        assert_eq!(ServerFrame::parse(&raw).unwrap(), ServerFrame::Message(env));

        let reply = ServerReply::Closing {
            code: close::SERVICE_RESTART,
            reason: "bye".into(),
        };
        let raw = serde_json::to_string(&reply).unwrap();
        assert_eq!(ServerFrame::parse(&raw).unwrap(), ServerFrame::Reply(reply));
    }

    #[test]
    fn commands_parse_from_json() {
        let cmd: ClientCommand =
            serde_json::from_str(r#"{"type":"subscribe","id":7,"topics":["ai"]}"#).unwrap();
        assert_eq!(
            cmd,
            ClientCommand::Subscribe {
                id: 7,
                topics: vec!["ai".into()]
            }
        );
        assert!(serde_json::from_str::<ClientCommand>(r#"{"type":"nope","id":1}"#).is_err());
        assert_eq!(command_id(r#"{"type":"nope","id":9}"#), Some(9));
        assert!(ClientCommand::parse(r#"["subscribe", 7, ["ai"]]"#).is_err());
        assert!(ClientCommand::parse(r#" {"type":"subscribe","id":7,"topics":[]}"#).is_ok());
    }
}
