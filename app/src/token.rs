//! Subscription tokens: short-lived HS256 JWTs scoped to one user's channel and named topics,
//! and bound to the session that minted them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{decode, encode, errors::ErrorKind, Algorithm, DecodingKey, EncodingKey};
use jsonwebtoken::{Header, Validation};
use serde::{Deserialize, Serialize};

use crate::protocol::{user_channel, KNOWN_TOPICS};

/// Shortest secret accepted: HS256 keys shorter than the hash are weak.
pub const MIN_SECRET_LEN: usize = 32;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Always `user:<sub>`.
    pub channel: String,
    pub topics: Vec<String>,
    /// A random value stored in the session at sign-in. Not the session id.
    pub sid: String,
    pub iat: u64,
    pub exp: u64,
    /// Unique token id.
    pub jti: String,
}

/// Claims of a token that lets a backend publish to any channel through the host's HTTP
/// publish endpoint. It cannot subscribe: it lacks every subscription claim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublisherClaims {
    pub sub: String,
    /// Always `publish`.
    pub scope: String,
    pub iat: u64,
    pub exp: u64,
    pub jti: String,
}

const PUBLISH_SCOPE: &str = "publish";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("unknown topic `{0}`")]
    UnknownTopic(String),
    #[error("a token needs at least one topic")]
    NoTopics,
    #[error("token expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(&'static str),
    #[error("topic `{0}` is not covered by this token")]
    TopicNotGranted(String),
    #[error("channel `{0}` is not covered by this token")]
    ChannelNotGranted(String),
    #[error("the signing secret must be at least {MIN_SECRET_LEN} bytes")]
    WeakSecret,
}

impl Claims {
    /// Whether this token lets its holder read `topic` on `channel`.
    pub fn allows(&self, channel: &str, topic: &str) -> Result<(), TokenError> {
        if self.channel != channel {
            return Err(TokenError::ChannelNotGranted(channel.to_owned()));
        }
        if !self.topics.iter().any(|t| t == topic) {
            return Err(TokenError::TopicNotGranted(topic.to_owned()));
        }
        Ok(())
    }
}

/// Signs and verifies subscription tokens with one secret.
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl: Duration,
    topics: Vec<String>,
    fingerprint: String,
}

impl TokenKeys {
    pub fn new(secret: &[u8], ttl: Duration) -> Result<Self, TokenError> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(TokenError::WeakSecret);
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.leeway = 0;
        validation.validate_nbf = false;
        validation.set_required_spec_claims(&["exp", "iat", "sub"]);
        Ok(Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            ttl,
            topics: KNOWN_TOPICS.iter().map(|t| t.to_string()).collect(),
            fingerprint: fingerprint(secret),
        })
    }

    /// Names the secret without revealing it, so hosts can check they share one.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Replaces the catalogue of topics tokens may name (by default `KNOWN_TOPICS`).
    pub fn with_topics(mut self, topics: Vec<String>) -> Self {
        self.topics = topics;
        self
    }

    pub fn topics(&self) -> &[String] {
        &self.topics
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Mints a token for `user_id`'s own channel and `topics`, bound to `session_binding`.
    pub fn mint(
        &self,
        user_id: &str,
        session_binding: &str,
        topics: &[String],
    ) -> Result<(String, Claims), TokenError> {
        self.check_topics(topics)?;
        let mut granted: Vec<String> = Vec::with_capacity(topics.len());
        for topic in topics {
            if !granted.contains(topic) {
                granted.push(topic.clone());
            }
        }
        let iat = unix_now();
        let claims = Claims {
            sub: user_id.to_owned(),
            channel: user_channel(user_id),
            topics: granted,
            sid: session_binding.to_owned(),
            iat,
            exp: iat + self.ttl.as_secs().max(1),
            jti: random_hex(16),
        };
        let token = encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|_| TokenError::Invalid("could not sign"))?;
        Ok((token, claims))
    }

    /// Checks signature, algorithm, expiry and that the claims are self-consistent.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let data =
            decode::<Claims>(token, &self.decoding, &self.validation).map_err(|e| {
                match e.kind() {
                    ErrorKind::ExpiredSignature => TokenError::Expired,
                    ErrorKind::InvalidSignature => TokenError::Invalid("bad signature"),
                    ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                        TokenError::Invalid("algorithm not allowed")
                    }
                    ErrorKind::MissingRequiredClaim(_) => TokenError::Invalid("missing claim"),
                    _ => TokenError::Invalid("malformed token"),
                }
            })?;
        let claims = data.claims;
        // `exp` is checked again without leeway at whole-second precision.
        if claims.exp <= unix_now() {
            return Err(TokenError::Expired);
        }
        if claims.channel != user_channel(&claims.sub) {
            return Err(TokenError::Invalid(
                "channel does not belong to the subject",
            ));
        }
        self.check_topics(&claims.topics)
            .map_err(|_| TokenError::Invalid("unknown topic"))?;
        Ok(claims)
    }

    /// Mints a publisher token named `name` that lives `ttl`.
    pub fn mint_publisher(&self, name: &str, ttl: Duration) -> Result<String, TokenError> {
        let iat = unix_now();
        let claims = PublisherClaims {
            sub: name.to_owned(),
            scope: PUBLISH_SCOPE.to_owned(),
            iat,
            exp: iat + ttl.as_secs().max(1),
            jti: random_hex(16),
        };
        encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|_| TokenError::Invalid("could not sign"))
    }

    pub fn verify_publisher(&self, token: &str) -> Result<PublisherClaims, TokenError> {
        let claims = decode::<PublisherClaims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid("not a publisher token"),
            })?
            .claims;
        if claims.exp <= unix_now() {
            return Err(TokenError::Expired);
        }
        if claims.scope != PUBLISH_SCOPE {
            return Err(TokenError::Invalid("not a publisher token"));
        }
        Ok(claims)
    }

    fn check_topics(&self, topics: &[String]) -> Result<(), TokenError> {
        if topics.is_empty() {
            return Err(TokenError::NoTopics);
        }
        match topics.iter().find(|t| !self.topics.contains(t)) {
            Some(unknown) => Err(TokenError::UnknownTopic(unknown.clone())),
            None => Ok(()),
        }
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn fingerprint(secret: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(b"leptos-realtime token secret fingerprint\0")
        .chain_update(secret)
        .finalize();
    hex::encode(&digest[..16])
}

/// `bytes` random bytes as lowercase hex.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::fill(&mut buf[..]);
    hex::encode(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::TOPIC_AI;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test-only";

    fn keys() -> TokenKeys {
        TokenKeys::new(SECRET, Duration::from_secs(60)).unwrap()
    }

    fn ai() -> Vec<String> {
        vec![TOPIC_AI.to_owned()]
    }

    fn sign_raw(header: &Header, claims: &Claims, secret: &[u8]) -> String {
        encode(header, claims, &EncodingKey::from_secret(secret)).unwrap()
    }

    fn b64(bytes: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    #[test]
    fn a_topic_asked_for_twice_is_granted_once() {
        let keys = keys();
        let twice = vec![TOPIC_AI.to_owned(), TOPIC_AI.to_owned()];
        let (_, claims) = keys.mint("u1", "bind1", &twice).unwrap();
        assert_eq!(claims.topics, vec![TOPIC_AI.to_owned()]);
    }

    #[test]
    fn mint_then_verify_round_trips() {
        let keys = keys();
        let (token, claims) = keys.mint("u1", "bind1", &ai()).unwrap();
        let verified = keys.verify(&token).unwrap();
        assert_eq!(verified, claims);
        assert_eq!(verified.channel, "user:u1");
        assert_eq!(verified.sid, "bind1");
        assert!(verified.exp > verified.iat);
        assert!(verified.allows("user:u1", TOPIC_AI).is_ok());
    }

    #[test]
    fn each_token_has_a_unique_id() {
        let keys = keys();
        let (_, a) = keys.mint("u1", "b", &ai()).unwrap();
        let (_, b) = keys.mint("u1", "b", &ai()).unwrap();
        assert_ne!(a.jti, b.jti);
    }

    #[test]
    fn unknown_or_missing_topics_are_refused_at_mint() {
        let keys = keys();
        assert_eq!(
            keys.mint("u1", "b", &["secrets".to_owned()]).unwrap_err(),
            TokenError::UnknownTopic("secrets".into())
        );
        assert_eq!(keys.mint("u1", "b", &[]).unwrap_err(), TokenError::NoTopics);
    }

    #[test]
    fn expired_token_is_refused() {
        let keys = keys();
        let (_, mut claims) = keys.mint("u1", "b", &ai()).unwrap();
        claims.iat -= 120;
        claims.exp = unix_now() - 1;
        let token = sign_raw(&Header::new(Algorithm::HS256), &claims, SECRET);
        assert_eq!(keys.verify(&token).unwrap_err(), TokenError::Expired);
    }

    #[test]
    fn forged_signature_is_refused() {
        let keys = keys();
        let (_, claims) = keys.mint("u1", "b", &ai()).unwrap();
        let forged = sign_raw(
            &Header::new(Algorithm::HS256),
            &claims,
            b"another-secret-another-secret-xx",
        );
        assert_eq!(
            keys.verify(&forged).unwrap_err(),
            TokenError::Invalid("bad signature")
        );

        let (token, _) = keys.mint("u1", "b", &ai()).unwrap();
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        parts[1] = b64(serde_json::to_string(&Claims {
            sub: "u2".into(),
            channel: "user:u2".into(),
            ..claims
        })
        .unwrap()
        .as_bytes());
        assert!(
            keys.verify(&parts.join(".")).is_err(),
            "a swapped payload must not verify"
        );
    }

    #[test]
    fn alg_none_and_other_algorithms_are_refused() {
        let keys = keys();
        let (token, claims) = keys.mint("u1", "b", &ai()).unwrap();
        let payload = token.split('.').nth(1).unwrap();

        let none_header = b64(br#"{"alg":"none","typ":"JWT"}"#);
        assert!(keys.verify(&format!("{none_header}.{payload}.")).is_err());

        for alg in [Algorithm::HS384, Algorithm::HS512] {
            let other = sign_raw(&Header::new(alg), &claims, SECRET);
            assert_eq!(
                keys.verify(&other).unwrap_err(),
                TokenError::Invalid("algorithm not allowed")
            );
        }
    }

    #[test]
    fn another_users_channel_is_refused() {
        let keys = keys();
        let (token, mut claims) = keys.mint("u1", "b", &ai()).unwrap();
        let own = keys.verify(&token).unwrap();
        assert_eq!(
            own.allows("user:u2", TOPIC_AI).unwrap_err(),
            TokenError::ChannelNotGranted("user:u2".into())
        );

        claims.channel = "user:u2".into();
        let mismatched = sign_raw(&Header::new(Algorithm::HS256), &claims, SECRET);
        assert!(matches!(
            keys.verify(&mismatched),
            Err(TokenError::Invalid(_))
        ));
    }

    #[test]
    fn topic_outside_the_token_is_refused() {
        let keys = keys();
        let (token, _) = keys.mint("u1", "b", &ai()).unwrap();
        let claims = keys.verify(&token).unwrap();
        assert_eq!(
            claims.allows("user:u1", "billing").unwrap_err(),
            TokenError::TopicNotGranted("billing".into())
        );
    }

    #[test]
    fn publisher_and_subscription_tokens_do_not_stand_in_for_each_other() {
        let keys = keys();
        let publisher = keys
            .mint_publisher("loadgen", Duration::from_secs(60))
            .unwrap();
        assert_eq!(keys.verify_publisher(&publisher).unwrap().sub, "loadgen");
        assert!(keys.verify(&publisher).is_err());
        let (subscriber, _) = keys.mint("u1", "b", &ai()).unwrap();
        assert!(keys.verify_publisher(&subscriber).is_err());
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(matches!(
            TokenKeys::new(b"short", Duration::from_secs(60)),
            Err(TokenError::WeakSecret)
        ));
    }
}
