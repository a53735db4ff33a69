//! The browser side of one subscription: fetch a token, open the socket, authenticate, read
//! frames into the hook's signals, refresh the token in band, and reconnect with backoff.
//! Compiled only for the browser.

use std::cell::RefCell;
use std::collections::HashMap;
use std::mem;
use std::rc::{Rc, Weak};

use leptos::prelude::*;
use leptos::task::spawn_local;

use super::cursor::Cursor;
use super::hook::{RealtimeOptions, Sinks, TopicChange};
use super::socket::{
    broker_url, now_ms, random_unit, remember_epoch, remembered_epoch, Socket, SocketEvents, Timer,
};
use super::status::{ConnectionState, RealtimeError};
use super::timing::{refresh_delay, TokenClock};
use crate::api::ApiError;
use crate::protocol::{close, ClientCommand, Envelope, ServerFrame, ServerReply, TokenGrant};

/// How the hook holds its connection; callbacks hold only a `Weak` to it.
pub(super) type SharedConnection = Rc<RefCell<Connection>>;

/// Retry a failed token refresh this soon, while the token still lives longer than that.
const REFRESH_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// A command waiting for its reply.
enum Pending {
    Auth,
    Refresh(TokenClock),
    Topics,
}

pub(super) struct Connection {
    me: Weak<RefCell<Connection>>,
    options: RealtimeOptions,
    sinks: Sinks,
    /// Whether the hook wants a connection at all.
    running: bool,
    /// Bumped whenever callbacks of the current attempt must be ignored from now on.
    attempt: u64,
    socket: Option<Socket>,
    /// The token to send in `auth` once the socket opens.
    auth_token: Option<String>,
    /// Whether `subscribed` arrived on the current socket.
    subscribed: bool,
    clock: Option<TokenClock>,
    expires_at: u64,
    cursor: Cursor,
    /// The channel the tokens are for, and the epoch last written to session storage for it.
    channel: Option<String>,
    remembered_epoch: Option<String>,
    /// Failed attempts since the last successful subscribe; drives the backoff.
    failures: u32,
    next_command: u64,
    pending: HashMap<u64, Pending>,
    /// The last `closing` notice, whose reason the close event may lack.
    closing: Option<(u16, String)>,
    batch: Vec<Envelope>,
    flush_timer: Option<Timer>,
    retry_timer: Option<Timer>,
    refresh_timer: Option<Timer>,
}

impl Connection {
    pub fn shared(options: RealtimeOptions, sinks: Sinks) -> SharedConnection {
        Rc::new_cyclic(|me| {
            RefCell::new(Self {
                me: me.clone(),
                options,
                sinks,
                running: false,
                attempt: 0,
                socket: None,
                auth_token: None,
                subscribed: false,
                clock: None,
                expires_at: 0,
                cursor: Cursor::default(),
                channel: None,
                remembered_epoch: None,
                failures: 0,
                next_command: 1,
                pending: HashMap::new(),
                closing: None,
                batch: Vec::new(),
                flush_timer: None,
                retry_timer: None,
                refresh_timer: None,
            })
        })
    }

    pub fn start(&mut self) {
        if !self.running {
            self.running = true;
            self.failures = 0;
            self.connect();
        }
    }

    /// Closes the socket (code 1000) and cancels every timer and request in flight, then
    /// reports what was gathered and the closed state.
    pub fn stop(&mut self) {
        self.shut_down();
        self.flush();
        self.sinks.state.try_set(ConnectionState::Closed);
    }

    /// Like [`Connection::stop`], but writes no signal: when the owner is cleaned up, a
    /// `Transition` may still show views that read them, and a write would wake those views
    /// just before the signals are disposed.
    pub fn shut_down(&mut self) {
        self.running = false;
        self.drop_socket();
        self.retry_timer = None;
        self.flush_timer = None;
        self.batch.clear();
    }

    /// Sends `subscribe`/`unsubscribe` when subscribed; otherwise the change waits for the
    /// next `auth`.
    pub fn change_topics(&mut self, change: TopicChange) {
        if !self.subscribed {
            self.sinks.topics.try_update(|topics| change.apply(topics));
            return;
        }
        let id = self.next_id();
        let command = match &change {
            TopicChange::Add(topics) => ClientCommand::Subscribe {
                id,
                topics: topics.clone(),
            },
            TopicChange::Remove(topics) => ClientCommand::Unsubscribe {
                id,
                topics: topics.clone(),
            },
        };
        self.pending.insert(id, Pending::Topics);
        self.send(&command);
    }

    fn connect(&mut self) {
        self.drop_socket();
        self.retry_timer = None;
        self.sinks.state.set(ConnectionState::Connecting);

        self.fetch_token(Self::on_token);
    }

    /// Asks for a token and hands it to `then`, unless this attempt is over by then.
    fn fetch_token(&self, then: fn(&mut Self, Result<TokenGrant, ApiError>, f64)) {
        let request = self
            .options
            .token_fetcher
            .fetch(self.options.topics.clone());
        let me = self.me.clone();
        let attempt = self.attempt;
        spawn_local(async move {
            let grant = request.await;
            let received_at = now_ms();
            with_attempt(&me, attempt, |c| then(c, grant, received_at));
        });
    }

    fn on_token(&mut self, grant: Result<TokenGrant, ApiError>, received_at: f64) {
        let grant = match grant {
            Ok(grant) => grant,
            // Without a session no token will ever come; the page offers sign-in instead.
            Err(e @ ApiError::NotSignedIn) => {
                self.running = false;
                self.sinks.error.set(Some(RealtimeError::Token(e)));
                self.sinks.state.set(ConnectionState::Closed);
                return;
            }
            Err(e) => return self.retry_after_failure(RealtimeError::Token(e)),
        };
        self.note_channel(&grant.channel);

        let socket = broker_url().and_then(|url| Socket::open(&url, self.socket_events()));
        match socket {
            Ok(socket) => {
                self.socket = Some(socket);
                self.clock = Some(TokenClock::new(&grant, received_at));
                self.expires_at = grant.expires_at;
                self.auth_token = Some(grant.token);
            }
            Err(e) => self.retry_after_failure(RealtimeError::Unavailable(e)),
        }
    }

    /// On the first token of a page, a tab that read this channel before (and was reloaded)
    /// resumes from the start of the epoch it last saw.
    fn note_channel(&mut self, channel: &str) {
        if self.channel.as_deref() == Some(channel) {
            return;
        }
        self.channel = Some(channel.to_owned());
        self.remembered_epoch = remembered_epoch(channel);
        if self.options.resume_after_reload && self.cursor.resume_point().is_none() {
            if let Some(epoch) = self.remembered_epoch.clone() {
                self.cursor = Cursor::replaying(epoch);
            }
        }
    }

    /// Writes the cursor's epoch to session storage when it changed.
    fn remember_position(&mut self) {
        let (Some(channel), Some(at)) = (&self.channel, self.cursor.resume_point()) else {
            return;
        };
        if self.remembered_epoch.as_deref() != Some(at.epoch.as_str()) {
            remember_epoch(channel, &at.epoch);
            self.remembered_epoch = Some(at.epoch);
        }
    }

    fn socket_events(&self) -> SocketEvents {
        let attempt = self.attempt;
        let (open, text, closed) = (self.me.clone(), self.me.clone(), self.me.clone());
        SocketEvents {
            on_open: Box::new(move || with_attempt(&open, attempt, Connection::on_open)),
            on_text: Box::new(move |raw| with_attempt(&text, attempt, |c| c.on_text(&raw))),
            on_close: Box::new(move |code, reason| {
                with_attempt(&closed, attempt, |c| c.on_close(code, reason));
            }),
        }
    }

    fn on_open(&mut self) {
        let Some(token) = self.auth_token.take() else {
            return;
        };
        let id = self.next_id();
        let topics = Some(self.sinks.topics.get_untracked());
        let resume = self.cursor.resume_point();
        self.pending.insert(id, Pending::Auth);
        self.send(&ClientCommand::Auth {
            id,
            token,
            topics,
            resume,
        });
    }

    fn on_text(&mut self, raw: &str) {
        match ServerFrame::parse(raw) {
            Ok(ServerFrame::Message(message)) => self.on_message(message),
            Ok(ServerFrame::Reply(reply)) => self.on_reply(reply),
            Err(e) => {
                leptos::logging::warn!("realtime: unreadable frame: {e}");
                self.sinks
                    .error
                    .set(Some(RealtimeError::BadFrame(e.to_string())));
            }
        }
    }

    fn on_message(&mut self, message: Envelope) {
        if !self.cursor.accept(&message) {
            return;
        }
        self.remember_position();
        self.batch.push(message);
        match self.options.buffer_interval {
            None => self.flush(),
            Some(interval) if self.flush_timer.is_none() => {
                let me = self.me.clone();
                self.flush_timer = Timer::once(interval, move || with_connection(&me, Self::flush));
            }
            Some(_) => {}
        }
    }

    fn on_reply(&mut self, reply: ServerReply) {
        match reply {
            ServerReply::Subscribed {
                id,
                topics,
                position,
                expires_at,
                recovery,
                ..
            } => {
                self.pending.remove(&id);
                self.subscribed = true;
                self.failures = 0;
                // `position` is the offset of the channel's newest message. With a replay
                // coming, the replayed messages move the cursor themselves.
                if recovery.as_ref().is_none_or(|r| r.replayed == 0) {
                    self.cursor.skip_to(position);
                    self.remember_position();
                }
                if recovery.is_some() {
                    self.sinks.recovery.set(recovery);
                }
                self.sinks.topics.set(topics);
                self.sinks.error.set(None);
                self.sinks.state.set(ConnectionState::Active);
                self.expires_at = expires_at;
                self.schedule_refresh();
            }
            // An ack carries the connection's whole topic list, which a refresh may shrink.
            ServerReply::Ack {
                id,
                topics,
                expires_at,
            } => match self.pending.remove(&id) {
                Some(Pending::Refresh(clock)) => {
                    self.clock = Some(clock);
                    self.expires_at = expires_at;
                    self.sinks.topics.set(topics);
                    self.sinks.state.set(ConnectionState::Active);
                    self.schedule_refresh();
                }
                Some(Pending::Topics) => self.sinks.topics.set(topics),
                Some(Pending::Auth) | None => {}
            },
            ServerReply::Error { id, code, message } => {
                let pending = id.and_then(|id| self.pending.remove(&id));
                if matches!(pending, Some(Pending::Refresh(_))) {
                    self.sinks.state.set(ConnectionState::Active);
                }
                self.sinks
                    .error
                    .set(Some(RealtimeError::Refused { code, message }));
            }
            ServerReply::Closing { code, reason } => self.closing = Some((code, reason)),
        }
    }

    fn on_close(&mut self, code: u16, reason: String) {
        let reason = match self.closing.take() {
            Some((noticed, notice)) if noticed == code && reason.is_empty() => notice,
            _ => reason,
        };
        self.drop_socket();
        self.flush();

        if !close::should_reconnect(code) {
            self.running = false;
            if code != close::NORMAL {
                self.sinks
                    .error
                    .set(Some(RealtimeError::Closed { code, reason }));
            }
            self.sinks.state.set(ConnectionState::Closed);
        } else if code == close::SERVICE_RESTART {
            // A planned restart: come back promptly, without growing the backoff.
            self.sinks.state.set(ConnectionState::Connecting);
            self.retry_in(self.options.backoff.delay(0, random_unit()));
        } else {
            self.retry_after_failure(RealtimeError::Closed { code, reason });
        }
    }

    fn retry_after_failure(&mut self, error: RealtimeError) {
        self.drop_socket();
        self.sinks.error.set(Some(error));
        self.sinks.state.set(ConnectionState::Error);
        let delay = self.options.backoff.delay(self.failures, random_unit());
        self.failures = self.failures.saturating_add(1);
        self.retry_in(delay);
    }

    fn retry_in(&mut self, delay: std::time::Duration) {
        let me = self.me.clone();
        self.retry_timer = Timer::once(delay, move || {
            with_connection(&me, |c| {
                if c.running {
                    c.connect();
                }
            });
        });
    }

    fn schedule_refresh(&mut self) {
        let Some(clock) = self.clock else { return };
        let delay = refresh_delay(clock.remaining(self.expires_at, now_ms()));
        let me = self.me.clone();
        let attempt = self.attempt;
        self.refresh_timer = Timer::once(delay, move || with_attempt(&me, attempt, Self::refresh));
    }

    fn refresh(&mut self) {
        self.refresh_timer = None;
        self.sinks.state.set(ConnectionState::RefreshingToken);
        self.fetch_token(Self::on_refresh_token);
    }

    fn on_refresh_token(&mut self, grant: Result<TokenGrant, ApiError>, received_at: f64) {
        match grant {
            Ok(grant) => {
                let id = self.next_id();
                self.pending
                    .insert(id, Pending::Refresh(TokenClock::new(&grant, received_at)));
                self.send(&ClientCommand::Refresh {
                    id,
                    token: grant.token,
                });
            }
            // The socket stays up until the old token expires; the server then closes it
            // (4002) and the reconnect fetches a token afresh.
            Err(e) => {
                self.sinks.error.set(Some(RealtimeError::Token(e)));
                self.sinks.state.set(ConnectionState::Active);
                let left = self.clock.map(|c| c.remaining(self.expires_at, now_ms()));
                if left.is_some_and(|left| left > REFRESH_RETRY) {
                    let me = self.me.clone();
                    let attempt = self.attempt;
                    self.refresh_timer = Timer::once(REFRESH_RETRY, move || {
                        with_attempt(&me, attempt, Self::refresh);
                    });
                }
            }
        }
    }

    /// Delivers the gathered batch to the signals.
    fn flush(&mut self) {
        self.flush_timer = None;
        if self.batch.is_empty() {
            return;
        }
        let batch = mem::take(&mut self.batch);
        // Limitation: `data` keeps every message for the life of the component, like
        // Inngest's hook; a cap that drops the oldest would bound memory in long sessions.
        self.sinks
            .data
            .try_update(|data| data.extend(batch.iter().cloned()));
        self.sinks.latest_data.try_set(batch.last().cloned());
        self.sinks.fresh_data.try_set(batch);
    }

    fn send(&mut self, command: &ClientCommand) {
        let Some(socket) = &self.socket else { return };
        // A failed send means the socket is closing; its close event drives the reconnect.
        if let Err(e) = socket.send(command) {
            leptos::logging::warn!("realtime: send failed: {e}");
        }
    }

    /// Forgets the current socket and everything tied to it; its late events are ignored.
    fn drop_socket(&mut self) {
        self.attempt += 1;
        self.socket = None;
        self.auth_token = None;
        self.subscribed = false;
        self.refresh_timer = None;
        self.pending.clear();
        self.closing = None;
    }

    fn next_id(&mut self) -> u64 {
        let id = self.next_command;
        self.next_command += 1;
        id
    }
}

/// Runs `f` on the connection if it still exists.
fn with_connection(me: &Weak<RefCell<Connection>>, f: impl FnOnce(&mut Connection)) {
    let Some(shared) = me.upgrade() else { return };
    // Browser callbacks never run inside another one, so the borrow is always free; a busy
    // borrow would mean a bug, and dropping the event beats a panic in a callback.
    let borrowed = shared.try_borrow_mut();
    match borrowed {
        Ok(mut connection) => f(&mut connection),
        Err(_) => leptos::logging::warn!("realtime: connection busy, event dropped"),
    }
}

/// Runs `f` only if the connection is still on `attempt` and still wanted.
fn with_attempt(me: &Weak<RefCell<Connection>>, attempt: u64, f: impl FnOnce(&mut Connection)) {
    with_connection(me, |c| {
        if c.running && c.attempt == attempt {
            f(c);
        }
    });
}
