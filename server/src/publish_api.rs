//! `POST /realtime/publish`: how a backend (or the load generator) publishes through the
//! host. It takes one message or an array of them, and refuses the whole request before
//! delivering anything when any message breaks a limit.

use std::fmt;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::value::MapAccessDeserializer;
use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use app::protocol::{MessageKind, Position};

use crate::broker::{Draft, PublishError};
use crate::host::Realtime;

pub const PUBLISH_PATH: &str = "/realtime/publish";

#[derive(Debug, Deserialize, Serialize)]
pub struct PublishRequest {
    pub channel: String,
    pub topic: String,
    #[serde(default = "data_kind")]
    pub kind: MessageKind,
    pub data: Box<RawValue>,
    #[serde(default)]
    pub run_id: Option<String>,
    #[serde(default)]
    pub stream_id: Option<String>,
}

fn data_kind() -> MessageKind {
    MessageKind::Data
}

#[derive(Debug)]
pub enum PublishBody {
    One(PublishRequest),
    Many(Vec<PublishRequest>),
}

/// Told apart by the first token, `{` or `[`. `#[serde(untagged)]` would copy the whole body
/// into serde's intermediate tree and parse it again per variant: under load that cost as much
/// as the broker's own work for the same messages.
impl<'de> Deserialize<'de> for PublishBody {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct OneOrMany;

        impl<'de> Visitor<'de> for OneOrMany {
            type Value = PublishBody;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a message object or an array of message objects")
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<PublishBody, A::Error> {
                PublishRequest::deserialize(MapAccessDeserializer::new(map)).map(PublishBody::One)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<PublishBody, A::Error> {
                let mut all = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX_BATCH));
                while let Some(request) = seq.next_element()? {
                    all.push(request);
                }
                Ok(PublishBody::Many(all))
            }
        }

        deserializer.deserialize_any(OneOrMany)
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Published {
    pub positions: Vec<Position>,
}

pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

/// Most messages one request may carry.
const MAX_BATCH: usize = 1000;

pub async fn publish(
    State(rt): State<Arc<Realtime>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Published>, ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| ApiError(StatusCode::UNAUTHORIZED, "missing bearer token".into()))?;
    let publisher = rt.tokens.verify_publisher(token).map_err(|e| {
        tracing::warn!(error = %e, "publish refused");
        ApiError(StatusCode::UNAUTHORIZED, e.to_string())
    })?;
    let body = body.map_err(|e| ApiError(e.status(), e.body_text()))?;
    let body = parse_body(&headers, &body)?;
    let requests = match body {
        PublishBody::One(r) => vec![r],
        PublishBody::Many(rs) => rs,
    };
    check(&rt, &requests)?;
    let total = requests.len();
    let mut positions = Vec::with_capacity(total);
    // Limitation: with the Redis broker each message is one round trip, and a batch cut off by
    // a Redis failure keeps the messages published before it; the 503 says how many.
    for r in requests {
        let draft = Draft {
            kind: r.kind,
            topic: r.topic,
            data: r.data,
            run_id: r.run_id,
            stream_id: r.stream_id,
        };
        let position = rt
            .broker
            .publish(&r.channel, draft)
            .await
            .map_err(|e| match e {
                PublishError::TooLarge { .. } => {
                    ApiError(StatusCode::PAYLOAD_TOO_LARGE, e.to_string())
                }
                PublishError::Unavailable(_) => {
                    let done = positions.len();
                    let msg = format!("{e}; {done} of {total} messages were published");
                    ApiError(StatusCode::SERVICE_UNAVAILABLE, msg)
                }
            })?;
        positions.push(position);
    }
    tracing::debug!(publisher = %publisher.sub, count = positions.len(), "published");
    Ok(Json(Published { positions }))
}

/// Parses straight from the bytes, as axum's `Json` would but without its tracking of the path
/// to every value (an allocation per key), which cost more than the parse itself for small
/// messages. Statuses match `Json`'s: 415 for another content type, 400 for broken JSON, 422
/// for JSON that is not a message.
fn parse_body(headers: &HeaderMap, body: &[u8]) -> Result<PublishBody, ApiError> {
    let media_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|m| m.trim().to_ascii_lowercase());
    let is_json = media_type.is_some_and(|m| {
        m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
    });
    if !is_json {
        let msg = "expected a request with `Content-Type: application/json`".to_owned();
        return Err(ApiError(StatusCode::UNSUPPORTED_MEDIA_TYPE, msg));
    }
    serde_json::from_slice(body).map_err(|e| {
        let status = if e.is_data() {
            StatusCode::UNPROCESSABLE_ENTITY
        } else {
            StatusCode::BAD_REQUEST
        };
        ApiError(status, format!("invalid publish body: {e}"))
    })
}

/// Every check that can refuse a message, run on all of them before any is published.
fn check(rt: &Realtime, requests: &[PublishRequest]) -> Result<(), ApiError> {
    if requests.is_empty() || requests.len() > MAX_BATCH {
        let msg = format!("send between 1 and {MAX_BATCH} messages per request");
        return Err(ApiError(StatusCode::BAD_REQUEST, msg));
    }
    let limit = rt.config.limits.max_publish_bytes;
    for (i, r) in requests.iter().enumerate() {
        if !r.channel.starts_with("user:") || r.channel.len() <= "user:".len() {
            let msg = format!("message {i}: channel must be `user:<id>`");
            return Err(ApiError(StatusCode::BAD_REQUEST, msg));
        }
        if !rt.config.topics.contains(&r.topic) {
            let msg = format!("message {i}: unknown topic `{}`", r.topic);
            return Err(ApiError(StatusCode::BAD_REQUEST, msg));
        }
        let size = r.data.get().len();
        if size > limit {
            let msg = format!("message {i}: data is {size} bytes; the limit is {limit} bytes");
            return Err(ApiError(StatusCode::PAYLOAD_TOO_LARGE, msg));
        }
        if let Err(e) = serde_json::from_str::<StrictJson>(r.data.get()) {
            let msg = format!("message {i}: data is JSON that clients cannot read: {e}");
            return Err(ApiError(StatusCode::UNPROCESSABLE_ENTITY, msg));
        }
    }
    Ok(())
}

/// Walks JSON the way a client's parser reads it, without building it: skipping it unread, as
/// `RawValue` does, lets through numbers out of range and broken escapes that every subscriber
/// would then fail to parse.
struct StrictJson;

impl<'de> Deserialize<'de> for StrictJson {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictJson)
    }
}

impl<'de> Visitor<'de> for StrictJson {
    type Value = StrictJson;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_str<E>(self, _: &str) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_unit<E>(self) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<StrictJson>()?.is_some() {}
        Ok(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self, A::Error> {
        while map.next_entry::<StrictJson, StrictJson>()?.is_some() {}
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn json_headers(content_type: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_str(content_type).unwrap(),
        );
        h
    }

    fn status_of(content_type: &str, body: &str) -> StatusCode {
        match parse_body(&json_headers(content_type), body.as_bytes()) {
            Ok(_) => StatusCode::OK,
            Err(ApiError(status, _)) => status,
        }
    }

    #[test]
    fn one_message_or_an_array_parses() {
        let one = r#"{"channel":"user:a","topic":"ai","data":{"n":1}}"#;
        let body = parse_body(&json_headers("application/json"), one.as_bytes());
        assert!(matches!(body, Ok(PublishBody::One(r)) if r.kind == MessageKind::Data));
        let many = format!("[{one},{one}]");
        let body = parse_body(
            &json_headers("application/json; charset=utf-8"),
            many.as_bytes(),
        );
        assert!(matches!(body, Ok(PublishBody::Many(rs)) if rs.len() == 2));
    }

    #[test]
    fn data_a_client_could_not_parse_is_caught() {
        for good in [
            r#"{"a":[1,-2,3.5,"x\n",true,null,{}]}"#,
            "1e300",
            r#""\ud83d\ude00""#,
        ] {
            assert!(serde_json::from_str::<StrictJson>(good).is_ok(), "{good}");
            assert!(
                serde_json::from_str::<serde_json::Value>(good).is_ok(),
                "{good}"
            );
        }
        for bad in ["1e400", r#""\ud800""#, r#"{"a":-1e999}"#] {
            assert!(serde_json::from_str::<Box<RawValue>>(bad).is_ok(), "{bad}");
            assert!(serde_json::from_str::<StrictJson>(bad).is_err(), "{bad}");
            assert!(
                serde_json::from_str::<serde_json::Value>(bad).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn bad_bodies_get_the_statuses_axum_json_gives() {
        let one = r#"{"channel":"user:a","topic":"ai","data":1}"#;
        assert_eq!(
            status_of("text/plain", one),
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        assert_eq!(
            status_of("application/json", "{\"channel\":"),
            StatusCode::BAD_REQUEST
        );
        let no_topic = r#"[{"channel":"user:a","data":1}]"#;
        assert_eq!(
            status_of("application/json", no_topic),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            status_of("application/json", "42"),
            StatusCode::UNPROCESSABLE_ENTITY
        );
    }
}
