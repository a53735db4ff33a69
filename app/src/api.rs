//! Server functions the page calls: sign-in and sign-out, the subscription token, and asking
//! the sample ai publisher. Server-only parts live in `ssr` below.

use leptos::prelude::*;
use leptos::server_fn::codec::JsonEncoding;
use leptos::server_fn::error::{FromServerFnError, ServerFnErrorErr};
use serde::{Deserialize, Serialize};

use crate::protocol::TokenGrant;

/// Longest display name accepted at sign-in, in characters.
pub const MAX_NAME_CHARS: usize = 40;
/// Longest prompt accepted by `ask`, in characters.
pub const MAX_PROMPT_CHARS: usize = 2000;
/// Largest request body a server function accepts: room for the longest prompt, percent-encoded.
pub const MAX_REQUEST_BYTES: u64 = 64 * 1024;

/// The signed-in user as the page sees them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserView {
    pub id: String,
    pub name: String,
}

/// Errors the page can show as they are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ApiError {
    #[error("You are not signed in.")]
    NotSignedIn,
    #[error("{0}")]
    BadInput(String),
    /// A limit was reached; trying again later may work.
    #[error("{0}")]
    Limited(String),
    #[error("The server failed: {0}")]
    Server(String),
    /// Something the server needs is away for now; trying again shortly should work.
    #[error("Temporarily unavailable ({0}); trying again may work in a moment.")]
    Unavailable(String),
    #[error("Could not reach the server: {0}")]
    Transport(String),
}

impl ApiError {
    /// A request body over [`MAX_REQUEST_BYTES`].
    pub fn too_large() -> Self {
        ApiError::BadInput(format!(
            "The request is larger than {} KiB, the most the server reads.",
            MAX_REQUEST_BYTES / 1024
        ))
    }
}

impl FromServerFnError for ApiError {
    type Encoder = JsonEncoding;

    fn from_server_fn_error(value: ServerFnErrorErr) -> Self {
        match value {
            // On the server these mean the request itself could not be read: the caller's
            // fault, so a 400 with the reason, not a 500.
            // The host's body limit stopped reading a body over MAX_REQUEST_BYTES.
            #[cfg(feature = "ssr")]
            ServerFnErrorErr::Deserialization(why) if why.contains("length limit exceeded") => {
                ssr::set_status(axum::http::StatusCode::PAYLOAD_TOO_LARGE);
                ApiError::too_large()
            }
            #[cfg(feature = "ssr")]
            ServerFnErrorErr::Args(why)
            | ServerFnErrorErr::MissingArg(why)
            | ServerFnErrorErr::Deserialization(why) => {
                ssr::set_status(axum::http::StatusCode::BAD_REQUEST);
                ApiError::BadInput(format!("The request could not be read: {why}."))
            }
            other => ApiError::Transport(other.to_string()),
        }
    }
}

/// The signed-in user, or `None`.
#[server(prefix = "/api", endpoint = "current_user")]
pub async fn current_user() -> Result<Option<UserView>, ApiError> {
    Ok(ssr::session_user().await?.map(|u| u.view()))
}

/// Signs in under a display name, as a new user with a fresh random id.
#[server(prefix = "/api", endpoint = "sign_in")]
pub async fn sign_in(name: String) -> Result<UserView, ApiError> {
    ssr::sign_in(name).await
}

/// Ends the session and closes its live sockets.
#[server(prefix = "/api", endpoint = "sign_out")]
pub async fn sign_out() -> Result<(), ApiError> {
    ssr::sign_out().await
}

/// A short-lived token for the signed-in user's own channel and `topics`.
#[server(prefix = "/api", endpoint = "subscription_token")]
pub async fn subscription_token(topics: Vec<String>) -> Result<TokenGrant, ApiError> {
    ssr::subscription_token(topics).await
}

/// Starts a background job that streams an answer to `prompt` into the caller's channel on
/// topic `ai`. Returns the job's run id.
#[server(prefix = "/api", endpoint = "ask")]
pub async fn ask(prompt: String) -> Result<String, ApiError> {
    ssr::ask(prompt).await
}

#[cfg(feature = "ssr")]
pub mod ssr {
    //! Session handling and the hooks the host provides to the server functions.

    use std::sync::Arc;
    use std::time::SystemTime;

    use axum::http::StatusCode;
    use leptos::prelude::*;
    use leptos_axum::ResponseOptions;
    use serde::{Deserialize, Serialize};
    use tower_sessions::Session;

    use super::{ApiError, UserView, MAX_NAME_CHARS, MAX_PROMPT_CHARS};
    use crate::protocol::{user_channel, TokenGrant};
    use crate::token::{random_hex, TokenError, TokenKeys};

    const USER_KEY: &str = "user";

    /// What the session stores about the signed-in user.
    #[derive(Clone, Debug, Serialize, Deserialize)]
    pub struct SessionUser {
        pub id: String,
        pub name: String,
        /// Random value that tokens carry as `sid`, so the broker can tie sockets to this
        /// session without ever seeing the session id.
        pub binding: String,
    }

    impl SessionUser {
        pub fn view(&self) -> UserView {
            UserView {
                id: self.id.clone(),
                name: self.name.clone(),
            }
        }
    }

    /// What the host does for the server functions: it owns the broker and the publisher.
    pub trait RealtimeHost: Send + Sync + 'static {
        /// The session bound to `binding` is alive until `expires_at`.
        fn session_seen(&self, binding: &str, expires_at: SystemTime);
        /// The session bound to `binding` ended: close its sockets and refuse its tokens.
        fn session_ended(&self, binding: &str);
        /// Whether the session bound to `binding` has ended (signed out elsewhere, or expired
        /// as the broker counts it), so the session must not be used again.
        fn is_session_ended(&self, binding: &str) -> bool;
        /// Starts the ai answer job for `prompt` on `channel`; returns its run id.
        fn start_answer(&self, channel: String, prompt: String) -> Result<String, String>;
    }

    /// Provided as Leptos context to every server function.
    #[derive(Clone)]
    pub struct ServerContext {
        pub tokens: Arc<TokenKeys>,
        pub host: Arc<dyn RealtimeHost>,
    }

    fn context() -> Result<ServerContext, ApiError> {
        use_context::<ServerContext>()
            .ok_or_else(|| ApiError::Server("server context missing".into()))
    }

    /// Sets the status of the server function's response, when there is one.
    pub(super) fn set_status(status: StatusCode) {
        if let Some(res) = use_context::<ResponseOptions>() {
            res.set_status(status);
        }
    }

    /// The session store failed (with a shared broker, Redis is away): 503, not 500.
    fn store_error(e: impl std::fmt::Display) -> ApiError {
        set_status(StatusCode::SERVICE_UNAVAILABLE);
        ApiError::Unavailable(format!("sessions: {e}"))
    }

    fn fail<T>(status: StatusCode, err: ApiError) -> Result<T, ApiError> {
        set_status(status);
        Err(err)
    }

    async fn session() -> Result<Session, ApiError> {
        leptos_axum::extract::<Session>()
            .await
            .map_err(|_| ApiError::Server("session layer missing".into()))
    }

    pub async fn session_user() -> Result<Option<SessionUser>, ApiError> {
        live_user(&session().await?).await
    }

    /// The session's user, unless the broker has ended the session: then the session is
    /// dropped here too, so it can mint no more tokens.
    async fn live_user(session: &Session) -> Result<Option<SessionUser>, ApiError> {
        let user = session
            .get::<SessionUser>(USER_KEY)
            .await
            .map_err(store_error)?;
        match user {
            Some(user) if context()?.host.is_session_ended(&user.binding) => {
                session.flush().await.map_err(store_error)?;
                Ok(None)
            }
            other => Ok(other),
        }
    }

    async fn require_user() -> Result<(Session, SessionUser), ApiError> {
        let session = session().await?;
        let user = live_user(&session).await?;
        match user {
            Some(user) => Ok((session, user)),
            None => fail(StatusCode::UNAUTHORIZED, ApiError::NotSignedIn),
        }
    }

    pub async fn sign_in(name: String) -> Result<UserView, ApiError> {
        let name = name.trim().to_owned();
        if name.is_empty() {
            return fail(
                StatusCode::BAD_REQUEST,
                ApiError::BadInput("Enter a display name.".into()),
            );
        }
        if name.chars().count() > MAX_NAME_CHARS {
            let msg = format!("A display name has at most {MAX_NAME_CHARS} characters.");
            return fail(StatusCode::BAD_REQUEST, ApiError::BadInput(msg));
        }
        // Bytes that are not UTF-8 reach here as U+FFFD: refuse the garbled name whole.
        if name.contains(char::REPLACEMENT_CHARACTER) {
            let msg = "A display name must be valid UTF-8 text.";
            return fail(StatusCode::BAD_REQUEST, ApiError::BadInput(msg.into()));
        }
        if name.chars().any(is_invisible_or_control) {
            let msg = "A display name cannot contain control or direction characters.";
            return fail(StatusCode::BAD_REQUEST, ApiError::BadInput(msg.into()));
        }
        let session = session().await?;
        if let Ok(Some(old)) = session.get::<SessionUser>(USER_KEY).await {
            context()?.host.session_ended(&old.binding);
        }
        // A new id on every sign-in guards against session fixation.
        session.cycle_id().await.map_err(store_error)?;
        let user = SessionUser {
            id: random_hex(12),
            name,
            binding: random_hex(16),
        };
        session.insert(USER_KEY, &user).await.map_err(store_error)?;
        tracing::info!(user = %user.id, "signed in");
        Ok(user.view())
    }

    /// Control characters and bidirectional overrides would let one name disguise another.
    fn is_invisible_or_control(c: char) -> bool {
        c.is_control() || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
    }

    pub async fn sign_out() -> Result<(), ApiError> {
        let session = session().await?;
        if let Ok(Some(user)) = session.get::<SessionUser>(USER_KEY).await {
            context()?.host.session_ended(&user.binding);
            tracing::info!(user = %user.id, "signed out");
        }
        session.flush().await.map_err(store_error)
    }

    pub async fn subscription_token(topics: Vec<String>) -> Result<TokenGrant, ApiError> {
        let (session, user) = require_user().await?;
        let ctx = context()?;
        let (token, claims) = match ctx.tokens.mint(&user.id, &user.binding, &topics) {
            Ok(minted) => minted,
            Err(e @ (TokenError::UnknownTopic(_) | TokenError::NoTopics)) => {
                return fail(StatusCode::BAD_REQUEST, ApiError::BadInput(e.to_string()))
            }
            Err(e) => {
                return fail(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ApiError::Server(e.to_string()),
                )
            }
        };
        let expiry = session.expiry_date();
        let expires_at = SystemTime::UNIX_EPOCH
            + std::time::Duration::from_secs(expiry.unix_timestamp().max(0) as u64);
        ctx.host.session_seen(&user.binding, expires_at);
        Ok(TokenGrant {
            token,
            channel: claims.channel,
            topics: claims.topics,
            expires_at: claims.exp,
            ttl_secs: ctx.tokens.ttl().as_secs(),
        })
    }

    pub async fn ask(prompt: String) -> Result<String, ApiError> {
        let (_, user) = require_user().await?;
        let prompt = prompt.trim().to_owned();
        if prompt.is_empty() {
            return fail(
                StatusCode::BAD_REQUEST,
                ApiError::BadInput("Ask something first.".into()),
            );
        }
        if prompt.chars().count() > MAX_PROMPT_CHARS {
            let msg = format!("A question has at most {MAX_PROMPT_CHARS} characters.");
            return fail(StatusCode::BAD_REQUEST, ApiError::BadInput(msg));
        }
        context()?
            .host
            .start_answer(user_channel(&user.id), prompt)
            .or_else(|e| fail(StatusCode::TOO_MANY_REQUESTS, ApiError::Limited(e)))
    }
}
