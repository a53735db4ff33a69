//! What a subscription tells the page about itself: its connection state and its last error.

use std::fmt;

use crate::api::ApiError;
use crate::protocol::{close, ErrorCode};

/// Where the subscription's connection is, mirroring the states of Inngest's hook.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConnectionState {
    /// Fetching a token, opening the socket or waiting for `subscribed`.
    #[default]
    Connecting,
    /// Subscribed: messages flow.
    Active,
    /// Subscribed, and a fresh token is on its way to the server.
    RefreshingToken,
    /// Not connected and not trying to be: disabled, unmounted or the session ended.
    Closed,
    /// The last attempt failed; another one follows after a backoff.
    Error,
}

impl ConnectionState {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionState::Connecting => "connecting",
            ConnectionState::Active => "active",
            ConnectionState::RefreshingToken => "refreshing",
            ConnectionState::Closed => "closed",
            ConnectionState::Error => "error",
        }
    }
}

impl fmt::Display for ConnectionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why the subscription is not (or was not) delivering, in words a person can act on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RealtimeError {
    /// The server closed the connection (or the browser lost it) with this code.
    #[error("{}", describe_close(*code, reason))]
    Closed { code: u16, reason: String },
    /// The token fetcher failed with this server function error.
    #[error("Could not get a subscription token: {0}")]
    Token(ApiError),
    /// The server refused a command but kept the connection.
    #[error("The server refused a command ({code:?}): {message}")]
    Refused { code: ErrorCode, message: String },
    /// The browser would not open a socket at all.
    #[error("Could not open the connection: {0}")]
    Unavailable(String),
    /// A frame from the server that is not part of the protocol.
    #[error("Unreadable frame from the server: {0}")]
    BadFrame(String),
}

impl RealtimeError {
    /// The close code, when the error is a closed connection.
    pub fn close_code(&self) -> Option<u16> {
        match self {
            RealtimeError::Closed { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether the user's session is gone, so only signing in again can help.
    pub fn ends_session(&self) -> bool {
        matches!(
            self,
            RealtimeError::Closed {
                code: close::SESSION_ENDED,
                ..
            } | RealtimeError::Token(ApiError::NotSignedIn)
        )
    }
}

fn describe_close(code: u16, reason: &str) -> String {
    let headline = match code {
        close::TOKEN_INVALID
        | close::REFRESH_REJECTED
        | close::AUTH_REQUIRED
        | close::TOO_MANY_CONNECTIONS
        | close::UNSUPPORTED_DATA
        | close::FRAME_TOO_BIG => "Connection refused",
        close::TOKEN_EXPIRED => "Connection expired",
        close::SESSION_ENDED => "Session ended",
        close::SLOW_CONSUMER => "Connection dropped",
        close::SERVICE_RESTART => "Server restarting",
        _ => "Connection lost",
    };
    if reason.is_empty() {
        format!("{headline} ({code})")
    } else {
        format!("{headline} ({code}): {reason}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_errors_name_code_and_reason() {
        let refused = RealtimeError::Closed {
            code: close::TOKEN_INVALID,
            reason: "invalid token: bad signature".into(),
        };
        assert_eq!(
            refused.to_string(),
            "Connection refused (4001): invalid token: bad signature"
        );
        assert_eq!(refused.close_code(), Some(4001));

        let lost = RealtimeError::Closed {
            code: 1006,
            reason: String::new(),
        };
        assert_eq!(lost.to_string(), "Connection lost (1006)");
        assert!(!lost.ends_session());
    }

    #[test]
    fn only_a_gone_session_ends_the_session() {
        let signed_out = RealtimeError::Closed {
            code: close::SESSION_ENDED,
            reason: "signed out".into(),
        };
        assert!(signed_out.ends_session());
        assert!(RealtimeError::Token(ApiError::NotSignedIn).ends_session());
        let flaky = RealtimeError::Token(ApiError::Transport("reset".into()));
        assert!(!flaky.ends_session());
        assert_eq!(
            flaky.to_string(),
            "Could not get a subscription token: Could not reach the server: reset"
        );
    }

    #[test]
    fn states_have_stable_names() {
        assert_eq!(ConnectionState::RefreshingToken.as_str(), "refreshing");
        assert_eq!(ConnectionState::default().to_string(), "connecting");
    }
}
