//! A real host on 127.0.0.1:0 and a WebSocket client that speaks the protocol, for tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use leptos::prelude::LeptosOptions;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use app::protocol::{ClientCommand, Envelope, MessageKind, Position, ServerFrame, ServerReply};
use server::broker::Draft;
use server::config::Config;
use server::host::{serve_until, Realtime};

pub const WAIT: Duration = Duration::from_secs(5);

/// A throwaway `redis-server` on a free loopback port, with nothing saved to disk. Stopped
/// when dropped.
pub struct RedisServer {
    pub port: u16,
    child: Option<std::process::Child>,
}

impl RedisServer {
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut redis = Self { port, child: None };
        redis.restart().await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills the server: whatever it held is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes (or thaws) the server without closing its connections, like a stalled Redis.
    pub fn pause(&self, paused: bool) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let signal = if paused { "-STOP" } else { "-CONT" };
        let status = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// Starts it again, empty, on the same port.
    pub async fn restart(&mut self) {
        self.stop();
        let port = self.port.to_string();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server on PATH (`scripts/setup test` installs it)");
        self.child = Some(child);
        for _ in 0..200 {
            if TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("redis-server did not start on port {}", self.port);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The channel position a `subscribed` reply reports.
pub fn position(reply: &ServerReply) -> Position {
    match reply {
        ServerReply::Subscribed { position, .. } => position.clone(),
        other => panic!("expected subscribed, got {other:?}"),
    }
}

/// The recovery report of a `subscribed` reply to a resume.
pub fn recovery(reply: &ServerReply) -> app::protocol::Recovery {
    match reply {
        ServerReply::Subscribed {
            recovery: Some(r), ..
        } => r.clone(),
        other => panic!("expected a recovery report, got {other:?}"),
    }
}

pub struct TestHost {
    pub addr: SocketAddr,
    pub rt: Arc<Realtime>,
    server: tokio::task::JoinHandle<()>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for TestHost {
    fn drop(&mut self) {
        self.server.abort();
        let _ = std::fs::remove_dir_all(&self.rt.config.data_dir);
    }
}

pub fn test_config() -> Config {
    Config {
        token_secret: Some(b"integration-test-secret-0123456789abcdef".to_vec()),
        // Each host gets a data directory of its own: sessions and ended sessions live there.
        data_dir: std::env::temp_dir().join(format!("lr-test-{}", app::token::random_hex(8))),
        ai_chunk_delay: Duration::from_millis(2),
        ..Config::default()
    }
}

impl TestHost {
    pub async fn start() -> Self {
        Self::with(|_| {}).await
    }

    /// A host that shares its broker and sessions through `redis`.
    pub async fn sharing(redis: &RedisServer) -> Self {
        let url = redis.url();
        Self::with(move |c| c.redis_url = Some(url)).await
    }

    pub async fn with(tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = test_config();
        tweak(&mut config);
        let rt = Realtime::new(config).await.expect("host starts");
        let options = LeptosOptions::builder()
            .output_name("leptos-realtime")
            .build();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = rt.clone();
        let server = tokio::spawn(async move {
            let stop = async move {
                let _ = stopped.await;
            };
            serve_until(listener, options, served, stop).await.unwrap();
        });
        Self {
            addr,
            rt,
            server,
            stop: Some(stop),
        }
    }

    /// What Ctrl-C or SIGTERM does to the real host.
    pub async fn shut_down(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// A token for `user` in session `binding`, minted the way the server function does.
    pub fn token(&self, user: &str, binding: &str) -> String {
        self.rt
            .tokens
            .mint(user, binding, &["ai".to_owned()])
            .unwrap()
            .0
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}{}", self.addr, app::protocol::WS_PATH)
    }

    pub async fn connect(&self) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(self.ws_url())
            .await
            .expect("upgrade");
        Client { ws, next_id: 1 }
    }

    /// Connects with a browser-style `Origin` header.
    pub async fn connect_from(
        &self,
        origin: &str,
    ) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        let mut req = self.ws_url().into_client_request().unwrap();
        req.headers_mut().insert("origin", origin.parse().unwrap());
        tokio_tungstenite::connect_async(req)
            .await
            .map(|(ws, _)| Client { ws, next_id: 1 })
    }

    pub async fn publish(&self, user: &str, n: u64) -> Position {
        self.publish_to(user, "ai", serde_json::json!({ "n": n }))
            .await
            .expect("publish")
    }

    pub async fn publish_to(
        &self,
        user: &str,
        topic: &str,
        data: serde_json::Value,
    ) -> Result<Position, server::broker::PublishError> {
        let draft = Draft {
            kind: MessageKind::Data,
            topic: topic.into(),
            data: serde_json::value::to_raw_value(&data).unwrap(),
            run_id: None,
            stream_id: None,
        };
        self.rt.broker.publish(&format!("user:{user}"), draft).await
    }

    /// POSTs JSON over a fresh HTTP/1.1 connection; returns the status and body.
    pub async fn post_json(&self, path: &str, bearer: Option<&str>, body: &str) -> (u16, String) {
        let auth = bearer
            .map(|t| format!("authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let (status, _, body) = self.post(path, "application/json", &auth, body).await;
        (status, body)
    }

    /// POSTs a form, as the page calls a server function; returns the status and body.
    pub async fn post_form(&self, path: &str, body: &str) -> (u16, String) {
        let (status, _, body) = self.post_form_as(path, None, body).await;
        (status, body)
    }

    /// Like `post_form`, with the session cookie `cookie` (`name=value`) when given; also
    /// returns the cookie the response sets, if any.
    pub async fn post_form_as(
        &self,
        path: &str,
        cookie: Option<&str>,
        body: &str,
    ) -> (u16, Option<String>, String) {
        let headers = cookie
            .map(|c| format!("cookie: {c}\r\n"))
            .unwrap_or_default();
        let ty = "application/x-www-form-urlencoded";
        let (status, head, body) = self.post(path, ty, &headers, body).await;
        let set_cookie = head.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            let value = value.trim().split(';').next()?;
            name.eq_ignore_ascii_case("set-cookie")
                .then(|| value.to_owned())
        });
        (status, set_cookie, body)
    }

    /// POSTs a form in one chunk of `Transfer-Encoding: chunked`, with no length up front.
    pub async fn post_chunked_form(&self, path: &str, body: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = TcpStream::connect(self.addr).await.unwrap();
        let request = format!(
            "POST {path} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/x-www-form-urlencoded\r\n\
             transfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            self.addr,
            body.len()
        );
        // The server may answer and close before reading all of it.
        let _ = stream.write_all(request.as_bytes()).await;
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response).await;
        let response = String::from_utf8_lossy(&response);
        let status = response
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        (status, body.to_owned())
    }

    /// Sends one request over a fresh connection; returns the status, head and body.
    async fn post(&self, path: &str, ty: &str, headers: &str, body: &str) -> (u16, String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = TcpStream::connect(self.addr).await.unwrap();
        let request = format!(
            "POST {path} HTTP/1.1\r\nhost: {}\r\ncontent-type: {ty}\r\n{headers}\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let status = response[9..12].parse().unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        (status, head.to_owned(), body.to_owned())
    }

    /// A token for `topics`, which the host's topic catalogue must know.
    pub fn token_for(&self, user: &str, binding: &str, topics: &[&str]) -> String {
        let topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
        self.rt.tokens.mint(user, binding, &topics).unwrap().0
    }
}

/// What a client saw next.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    Message(Envelope),
    Reply(ServerReply),
    Closed(u16, String),
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
}

impl Client {
    pub fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub async fn send(&mut self, cmd: &ClientCommand) {
        let text = serde_json::to_string(cmd).unwrap();
        self.ws.send(Message::Text(text.into())).await.unwrap();
    }

    pub async fn send_raw(&mut self, msg: Message) {
        self.ws.send(msg).await.unwrap();
    }

    /// The next frame, skipping pings; fails the test after `WAIT`.
    pub async fn next(&mut self) -> Seen {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame within the wait")
                .map(|r| r.map_err(|e| e.to_string()));
            match msg {
                Some(Ok(Message::Text(text))) => {
                    return match ServerFrame::parse(&text).expect("server frames parse") {
                        ServerFrame::Message(m) => Seen::Message(m),
                        ServerFrame::Reply(r) => Seen::Reply(r),
                    };
                }
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) = frame
                        .map(|f| (u16::from(f.code), f.reason.to_string()))
                        .unwrap_or((u16::from(CloseCode::Status), String::new()));
                    return Seen::Closed(code, reason);
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Seen::Closed(0, e),
                None => return Seen::Closed(0, "stream ended".into()),
            }
        }
    }

    pub async fn auth(&mut self, token: &str, resume: Option<Position>) -> Seen {
        let id = self.next_id();
        self.send(&ClientCommand::Auth {
            id,
            token: token.into(),
            topics: None,
            resume,
        })
        .await;
        self.next().await
    }

    /// Authenticates and returns the `subscribed` reply, failing on anything else.
    pub async fn subscribe(&mut self, token: &str, resume: Option<Position>) -> ServerReply {
        match self.auth(token, resume).await {
            Seen::Reply(r @ ServerReply::Subscribed { .. }) => r,
            other => panic!("expected subscribed, got {other:?}"),
        }
    }

    pub async fn message(&mut self) -> Envelope {
        match self.next().await {
            Seen::Message(m) => m,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    /// Reads until the close frame, skipping the `closing` notice, and returns its code.
    pub async fn closed(&mut self) -> (u16, String) {
        loop {
            match self.next().await {
                Seen::Closed(code, reason) => return (code, reason),
                Seen::Reply(ServerReply::Closing { .. }) | Seen::Message(_) => continue,
                other => panic!("expected close, got {other:?}"),
            }
        }
    }

    /// Whether nothing but pings arrives for `quiet`.
    pub async fn stays_quiet(&mut self, quiet: Duration) -> bool {
        loop {
            match tokio::time::timeout(quiet, self.ws.next()).await {
                Err(_) => return true,
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                Ok(_) => return false,
            }
        }
    }
}
