//! The axum host: the page and its server functions, sessions, the broker's WebSocket
//! endpoint, and the background tasks that keep them tidy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{FromRef, State, WebSocketUpgrade};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use leptos::prelude::*;
use leptos_axum::{generate_route_list, LeptosRoutes};
use tower_sessions::cookie::SameSite;
use tower_sessions::{Expiry, SessionManagerLayer};

use app::api::ssr::{RealtimeHost, ServerContext};
use app::api::MAX_REQUEST_BYTES;
use app::protocol::{close, WS_PATH};
use app::token::TokenKeys;
use app::{shell, App};

use crate::broker::{Broker, LinkError, MemoryBroker, RedisBroker, SessionEvent, SessionHook};
use crate::config::{Config, ConfigError};
use crate::connections::Connections;
use crate::publisher::{AiPublisher, SampleAnswers};
use crate::session_store::{FileSessionStore, RedisSessionStore, Sessions};

/// Clients send only small commands, so a small read buffer keeps idle sockets cheap.
const WS_READ_BUFFER: usize = 4 * 1024;
/// Frames queued together are written in one go up to this size, then flushed; with
/// TCP_NODELAY on, each flush leaves at once instead of waiting on Nagle's algorithm.
const WS_WRITE_BUFFER: usize = 16 * 1024;

/// Everything the broker side shares: one per host.
pub struct Realtime {
    pub config: Config,
    pub tokens: Arc<TokenKeys>,
    pub broker: Arc<dyn Broker>,
    pub connections: Arc<Connections>,
    pub publisher: AiPublisher,
    pub sessions: Sessions,
}

impl Realtime {
    /// Tells the other hosts sharing the broker, without holding up the caller.
    fn announce(&self, event: SessionEvent) {
        let broker = self.broker.clone();
        tokio::spawn(async move {
            if let Err(e) = broker.announce(event).await {
                tracing::warn!(error = %e, "could not tell the other hosts about a session");
            }
        });
    }
}

impl RealtimeHost for Realtime {
    fn session_seen(&self, binding: &str, expires_at: SystemTime) {
        self.connections.session_seen(binding, expires_at);
        let until_secs = expires_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.announce(SessionEvent::Seen {
            binding: binding.to_owned(),
            until_secs,
        });
    }

    fn session_ended(&self, binding: &str) {
        let closed = self.connections.end_session(binding, "signed out");
        tracing::info!(closed, "session ended");
        self.announce(SessionEvent::Ended {
            binding: binding.to_owned(),
        });
    }

    fn is_session_ended(&self, binding: &str) -> bool {
        self.connections.session_ended_already(binding)
    }

    fn start_answer(&self, channel: String, prompt: String) -> Result<String, String> {
        self.publisher.start(channel, prompt)
    }
}

#[derive(Clone, FromRef)]
pub struct AppState {
    pub leptos_options: LeptosOptions,
    pub realtime: Arc<Realtime>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("token keys: {0}")]
    Token(#[from] app::token::TokenError),
    #[error("data directory: {0}")]
    DataDir(#[from] std::io::Error),
    #[error("redis (REALTIME_REDIS_URL): {0}")]
    Redis(#[from] redis::RedisError),
    #[error("{}", LinkError::SecretMismatch)]
    SecretMismatch,
}

impl Realtime {
    /// Opens what the host keeps in its data directory and, when configured, connects to the
    /// shared broker in Redis.
    pub async fn new(config: Config) -> Result<Arc<Self>, StartError> {
        let secret = config.load_secret()?;
        let tokens = TokenKeys::new(&secret, config.token_ttl)?.with_topics(config.topics.clone());
        let l = &config.limits;
        let connections = Arc::new(Connections::open(
            l.max_conns_per_user,
            config.token_ttl,
            &config.data_dir,
        )?);
        let (broker, sessions): (Arc<dyn Broker>, Sessions) = match &config.redis_url {
            Some(url) => {
                let hook = session_hook(Arc::downgrade(&connections));
                let prefix = &config.redis_prefix;
                let fingerprint = tokens.fingerprint();
                let redis =
                    RedisBroker::connect(url, prefix, l, config.token_ttl, fingerprint, hook)
                        .await
                        .map_err(|e| match e {
                            LinkError::SecretMismatch => StartError::SecretMismatch,
                            LinkError::Redis(e) => StartError::Redis(e),
                        })?;
                let sessions = RedisSessionStore::new(redis.connection(), &config.redis_prefix);
                tracing::info!(prefix = %config.redis_prefix, "sharing the broker through redis");
                (Arc::new(redis), Sessions::Redis(sessions))
            }
            None => {
                let memory = MemoryBroker::new(
                    l.max_publish_bytes,
                    l.history_max_messages,
                    l.history_max_age,
                );
                let sessions = FileSessionStore::open(&config.data_dir)?;
                (Arc::new(memory), Sessions::File(sessions))
            }
        };
        let source = SampleAnswers {
            words: config.ai_answer_words,
            delay: config.ai_chunk_delay,
        };
        let publisher = AiPublisher::new(broker.clone(), Arc::new(source), l.max_answers_per_user);
        let tokens = Arc::new(tokens);
        Ok(Arc::new(Self {
            tokens,
            broker,
            connections,
            publisher,
            sessions,
            config,
        }))
    }

    /// Ends expired sessions, ages out history and saves sessions, until the host stops.
    pub fn spawn_housekeeping(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let rt = Arc::downgrade(self);
        let flusher = self.sessions.spawn_flusher();
        tokio::spawn(async move {
            let _flusher = flusher.map(AbortOnDrop);
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            let mut n = 0u64;
            loop {
                tick.tick().await;
                let Some(rt) = rt.upgrade() else { return };
                rt.connections.sweep(SystemTime::now());
                n += 1;
                if n.is_multiple_of(4) {
                    rt.broker.expire_history();
                }
            }
        })
    }

    /// Tells every client the host is restarting, then waits (briefly) for them to go.
    pub async fn shut_down(&self) {
        let n = self
            .connections
            .shut_down(close::SERVICE_RESTART, "server restarting");
        tracing::info!(connections = n, "shutting down");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while !self.connections.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Err(e) = self.sessions.flush() {
            tracing::warn!(error = %e, "could not write sessions file");
        }
    }
}

/// What this host does when another one announces a session event: the same as if it had
/// happened here, without announcing it again.
fn session_hook(connections: std::sync::Weak<Connections>) -> SessionHook {
    Arc::new(move |event| {
        let Some(connections) = connections.upgrade() else {
            return;
        };
        match event {
            SessionEvent::Seen {
                binding,
                until_secs,
            } => {
                let until = UNIX_EPOCH + Duration::from_secs(until_secs);
                connections.session_seen(&binding, until);
            }
            SessionEvent::Ended { binding } => {
                let closed = connections.end_session(&binding, "signed out");
                if closed > 0 {
                    tracing::info!(closed, "session ended on another host");
                }
            }
        }
    })
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The whole host as one router.
pub fn router(leptos_options: LeptosOptions, realtime: Arc<Realtime>) -> Router {
    let routes = generate_route_list(App);
    let context = ServerContext {
        tokens: realtime.tokens.clone(),
        host: realtime.clone(),
    };
    let sessions = SessionManagerLayer::new(realtime.sessions.clone())
        .with_name("lr_session")
        .with_http_only(true)
        .with_same_site(SameSite::Lax)
        .with_secure(realtime.config.secure_cookies)
        .with_expiry(Expiry::OnInactivity(
            tower_sessions::cookie::time::Duration::seconds(
                realtime.config.session_ttl.as_secs() as i64
            ),
        ));
    let state = AppState {
        leptos_options: leptos_options.clone(),
        realtime,
    };
    Router::new()
        .leptos_routes_with_context(
            &state,
            routes,
            move || provide_context(context.clone()),
            move || shell(leptos_options.clone()),
        )
        .fallback(leptos_axum::file_and_error_handler::<AppState, _>(shell))
        // Server-function calls carry small forms: a larger body, with or without a declared
        // length, stops being read here and is answered 413 (see `ApiError::too_large`).
        .layer(axum::extract::DefaultBodyLimit::max(
            MAX_REQUEST_BYTES as usize,
        ))
        .route(WS_PATH, get(upgrade))
        .route(
            crate::publish_api::PUBLISH_PATH,
            axum::routing::post(crate::publish_api::publish),
        )
        .route("/healthz", get(|| async { "ok" }))
        .layer(sessions)
        .with_state(state)
}

async fn upgrade(
    State(rt): State<Arc<Realtime>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if let Err(why) = check_origin(
        &headers,
        &rt.config.allowed_origins,
        rt.config.secure_cookies,
    ) {
        tracing::warn!(%why, "websocket upgrade refused");
        return (StatusCode::FORBIDDEN, why).into_response();
    }
    if rt.connections.is_shutting_down() {
        return (StatusCode::SERVICE_UNAVAILABLE, "server restarting").into_response();
    }
    let frame_limit = rt.config.limits.max_frame_bytes;
    // Frames a little over the limit still arrive whole, so they can be refused with 1009 and a
    // reason; far larger ones are cut off by the WebSocket layer itself.
    let hard_limit = (frame_limit * 4).max(64 * 1024);
    ws.read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        .max_message_size(hard_limit)
        .max_frame_size(hard_limit)
        .on_upgrade(move |socket| crate::connection::serve(socket, rt))
}

/// Allows browsers only from the configured origins or, when none are configured, from the
/// site itself: the Origin's host equals the Host the request was sent to, and its scheme is
/// https when the site is served over https (`secure`). Clients that send no Origin are not
/// browsers and cannot be hijacked cross-site, so they pass.
fn check_origin(headers: &HeaderMap, allowed: &[String], secure: bool) -> Result<(), String> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin
        .to_str()
        .map_err(|_| "unreadable Origin header".to_owned())?;
    let ok = if allowed.is_empty() {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        origin_authority(origin, secure).is_some_and(|a| a.eq_ignore_ascii_case(host))
    } else {
        allowed.iter().any(|a| a.eq_ignore_ascii_case(origin))
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "origin {origin} is not allowed to open a realtime connection"
        ))
    }
}

// Limitation: a plain-http host cannot tell whether a proxy in front of it terminates TLS, so
// without `secure` both schemes pass; REALTIME_ALLOWED_ORIGINS pins the exact origin.
fn origin_authority(origin: &str, secure: bool) -> Option<&str> {
    let https = origin.strip_prefix("https://");
    if secure {
        https
    } else {
        https.or_else(|| origin.strip_prefix("http://"))
    }
}

/// Binds `addr` and serves until Ctrl-C or SIGTERM.
pub async fn serve(
    addr: SocketAddr,
    leptos_options: LeptosOptions,
    rt: Arc<Realtime>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    serve_until(listener, leptos_options, rt, shutdown_signal()).await
}

/// Serves on `listener` until `stop` resolves, then stops accepting and closes every client
/// with the restart code, so their hooks reconnect and resume elsewhere or after the restart.
pub async fn serve_until(
    listener: tokio::net::TcpListener,
    leptos_options: LeptosOptions,
    rt: Arc<Realtime>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let housekeeping = rt.spawn_housekeeping();
    let app = router(leptos_options, rt.clone());
    let stopping = rt.clone();
    // Streamed chunks are small and latency matters more than packet count.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
    });
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            stop.await;
            stopping.shut_down().await;
        })
        .await;
    housekeeping.abort();
    served
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_str(host).unwrap());
        if let Some(o) = origin {
            h.insert(header::ORIGIN, HeaderValue::from_str(o).unwrap());
        }
        h
    }

    #[test]
    fn same_origin_passes_and_cross_site_is_refused() {
        let site = "127.0.0.1:3000";
        let from = |origin| headers(Some(origin), site);
        assert!(check_origin(&from("http://127.0.0.1:3000"), &[], false).is_ok());
        assert!(check_origin(&from("https://evil.example"), &[], false).is_err());
        assert!(check_origin(&from("http://127.0.0.1:3001"), &[], false).is_err());
        assert!(check_origin(&headers(None, site), &[], false).is_ok());

        let list = vec!["https://app.example".to_owned()];
        let proxied = headers(Some("https://app.example"), "internal:80");
        assert!(check_origin(&proxied, &list, false).is_ok());
        assert!(check_origin(&from("http://127.0.0.1:3000"), &list, false).is_err());
    }

    #[test]
    fn a_site_served_over_https_refuses_its_plain_http_origin() {
        let from = |origin| headers(Some(origin), "app.example");
        assert!(check_origin(&from("https://app.example"), &[], true).is_ok());
        assert!(check_origin(&from("http://app.example"), &[], true).is_err());
    }
}
