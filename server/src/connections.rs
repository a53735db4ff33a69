//! Which connections are live, for whom, under which session; which sessions have ended.
//! Sign-out, session expiry and shutdown close sockets through here.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use app::protocol::close;

use crate::broker::{CloseSignal, ConnId};

const ENDED_FILE: &str = "ended-sessions.json";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    #[error("this user already has {0} connections, the most allowed")]
    TooManyConnections(usize),
    #[error("session ended")]
    SessionEnded,
    #[error("server is shutting down")]
    ShuttingDown,
}

struct Live {
    user: String,
    binding: String,
    signal: Arc<CloseSignal>,
}

#[derive(Default)]
struct Inner {
    live: HashMap<ConnId, Live>,
    per_user: HashMap<String, usize>,
    per_binding: HashMap<String, HashSet<ConnId>>,
    /// Ended sessions, kept until every token they could have minted has expired.
    ended: HashMap<String, SystemTime>,
    /// When each known session expires unless it is used again.
    expiry: HashMap<String, SystemTime>,
}

// Limitation: the registry is this host's. With a shared broker, other hosts hear of session
// expiries and ends through it (`Broker::announce`), but the per-user connection limit still
// counts only this host's connections.
pub struct Connections {
    inner: Mutex<Inner>,
    next_id: AtomicU64,
    shutting_down: AtomicBool,
    max_per_user: usize,
    /// How long an ended session is remembered: the longest a token lives.
    token_ttl: Duration,
    /// Where ended sessions are kept, so a restart does not forget them.
    ended_file: Option<PathBuf>,
}

/// Unregisters its connection when dropped.
pub struct Registration {
    registry: Arc<Connections>,
    pub conn: ConnId,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("conn", &self.conn)
            .finish()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.unregister(self.conn);
    }
}

impl Connections {
    pub fn new(max_per_user: usize, token_ttl: Duration) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            next_id: AtomicU64::new(1),
            shutting_down: AtomicBool::new(false),
            max_per_user,
            token_ttl,
            ended_file: None,
        }
    }

    /// Like `new`, remembering ended sessions in `dir` across restarts.
    pub fn open(max_per_user: usize, token_ttl: Duration, dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(ENDED_FILE);
        let mut registry = Self::new(max_per_user, token_ttl);
        if let Ok(bytes) = std::fs::read(&path) {
            let saved: HashMap<String, u64> = serde_json::from_slice(&bytes).unwrap_or_default();
            let ended = saved
                .into_iter()
                .map(|(b, secs)| (b, UNIX_EPOCH + Duration::from_secs(secs)));
            registry.lock().ended.extend(ended);
        }
        registry.ended_file = Some(path);
        Ok(registry)
    }

    fn save_ended(&self, inner: &Inner) {
        let Some(path) = &self.ended_file else { return };
        let saved: HashMap<&str, u64> = inner
            .ended
            .iter()
            .map(|(b, t)| {
                (
                    b.as_str(),
                    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
                )
            })
            .collect();
        let write = serde_json::to_vec(&saved)
            .map_err(std::io::Error::other)
            .and_then(|bytes| crate::config::write_private(path, &bytes));
        if let Err(e) = write {
            tracing::warn!(error = %e, "could not save ended sessions");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn next_conn_id(&self) -> ConnId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn register(
        self: &Arc<Self>,
        conn: ConnId,
        user: &str,
        binding: &str,
        signal: Arc<CloseSignal>,
    ) -> Result<Registration, RegisterError> {
        if self.is_shutting_down() {
            return Err(RegisterError::ShuttingDown);
        }
        let mut inner = self.lock();
        if inner.ended.contains_key(binding) {
            return Err(RegisterError::SessionEnded);
        }
        let count = inner.per_user.get(user).copied().unwrap_or(0);
        if count >= self.max_per_user {
            return Err(RegisterError::TooManyConnections(self.max_per_user));
        }
        *inner.per_user.entry(user.to_owned()).or_default() += 1;
        inner
            .per_binding
            .entry(binding.to_owned())
            .or_default()
            .insert(conn);
        let live = Live {
            user: user.to_owned(),
            binding: binding.to_owned(),
            signal,
        };
        inner.live.insert(conn, live);
        Ok(Registration {
            registry: self.clone(),
            conn,
        })
    }

    fn unregister(&self, conn: ConnId) {
        let mut inner = self.lock();
        let Some(live) = inner.live.remove(&conn) else {
            return;
        };
        if let Some(n) = inner.per_user.get_mut(&live.user) {
            *n -= 1;
            if *n == 0 {
                inner.per_user.remove(&live.user);
            }
        }
        if let Some(set) = inner.per_binding.get_mut(&live.binding) {
            set.remove(&conn);
            if set.is_empty() {
                inner.per_binding.remove(&live.binding);
            }
        }
    }

    pub fn session_ended_already(&self, binding: &str) -> bool {
        self.lock().ended.contains_key(binding)
    }

    /// Remembers that the session bound to `binding` is alive until `expires_at`.
    pub fn session_seen(&self, binding: &str, expires_at: SystemTime) {
        let mut inner = self.lock();
        if !inner.ended.contains_key(binding) {
            inner.expiry.insert(binding.to_owned(), expires_at);
        }
    }

    /// Ends a session: its live sockets close and its tokens are refused from now on.
    pub fn end_session(&self, binding: &str, reason: &str) -> usize {
        let mut inner = self.lock();
        inner.expiry.remove(binding);
        inner
            .ended
            .insert(binding.to_owned(), SystemTime::now() + self.token_ttl);
        self.save_ended(&inner);
        let conns: Vec<ConnId> = inner
            .per_binding
            .get(binding)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        for conn in &conns {
            if let Some(live) = inner.live.get(conn) {
                live.signal.close(close::SESSION_ENDED, reason);
            }
        }
        conns.len()
    }

    /// Ends sessions whose time is up and forgets ended ones that can hold no live token.
    pub fn sweep(&self, now: SystemTime) {
        let expired: Vec<String> = {
            let mut inner = self.lock();
            let before = inner.ended.len();
            inner.ended.retain(|_, until| *until > now);
            if inner.ended.len() != before {
                self.save_ended(&inner);
            }
            inner
                .expiry
                .iter()
                .filter(|(_, at)| **at <= now)
                .map(|(b, _)| b.clone())
                .collect()
        };
        for binding in expired {
            let closed = self.end_session(&binding, "session expired");
            tracing::info!(closed, "session expired");
        }
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Refuses new connections and tells every live one to close with `code`.
    pub fn shut_down(&self, code: u16, reason: &str) -> usize {
        self.shutting_down.store(true, Ordering::Release);
        let inner = self.lock();
        for live in inner.live.values() {
            live.signal.close(code, reason);
        }
        inner.live.len()
    }

    pub fn len(&self) -> usize {
        self.lock().live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_user_limit_counts_live_connections() {
        let reg = Arc::new(Connections::new(2, Duration::from_secs(60)));
        let sig = || Arc::new(CloseSignal::default());
        let a = reg.register(1, "u", "b", sig()).unwrap();
        let _b = reg.register(2, "u", "b", sig()).unwrap();
        assert_eq!(
            reg.register(3, "u", "b", sig()).unwrap_err(),
            RegisterError::TooManyConnections(2)
        );
        drop(a);
        assert!(reg.register(4, "u", "b", sig()).is_ok());
    }

    #[test]
    fn ending_a_session_closes_its_sockets_and_refuses_it_later() {
        let reg = Arc::new(Connections::new(8, Duration::from_secs(60)));
        let mine = Arc::new(CloseSignal::default());
        let other = Arc::new(CloseSignal::default());
        let _m = reg.register(1, "u1", "s1", mine.clone()).unwrap();
        let _o = reg.register(2, "u2", "s2", other.clone()).unwrap();
        assert_eq!(reg.end_session("s1", "signed out"), 1);
        assert_eq!(mine.get().map(|(c, _)| c), Some(close::SESSION_ENDED));
        assert!(other.get().is_none());
        let again = reg.register(3, "u1", "s1", Arc::new(CloseSignal::default()));
        assert_eq!(again.unwrap_err(), RegisterError::SessionEnded);
    }

    #[test]
    fn ended_sessions_are_remembered_across_a_restart() {
        let dir = std::env::temp_dir().join(format!("lr-ended-{}", app::token::random_hex(6)));
        let reg = Connections::open(8, Duration::from_secs(60), &dir).unwrap();
        reg.end_session("s1", "signed out");
        let reopened = Arc::new(Connections::open(8, Duration::from_secs(60), &dir).unwrap());
        assert!(reopened.session_ended_already("s1"));
        assert!(!reopened.session_ended_already("s2"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn sweep_ends_expired_sessions() {
        let reg = Arc::new(Connections::new(8, Duration::from_secs(60)));
        let sig = Arc::new(CloseSignal::default());
        let _r = reg.register(1, "u1", "s1", sig.clone()).unwrap();
        let now = SystemTime::now();
        reg.session_seen("s1", now + Duration::from_secs(5));
        reg.sweep(now);
        assert!(sig.get().is_none());
        reg.sweep(now + Duration::from_secs(6));
        assert_eq!(
            sig.get(),
            Some((close::SESSION_ENDED, "session expired".into()))
        );
    }
}
