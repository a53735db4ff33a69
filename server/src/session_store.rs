//! Where sessions live: by default in memory, written to the data directory so that a restart
//! of the host does not sign everyone out; with a shared broker, in Redis, so that every host
//! sharing it knows every session.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;
use tower_sessions::session::{Id, Record};
use tower_sessions::{session_store, SessionStore};

const SESSIONS_FILE: &str = "sessions.json";

#[derive(Clone)]
pub struct FileSessionStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    records: Mutex<HashMap<Id, Record>>,
    dirty: AtomicBool,
}

impl std::fmt::Debug for FileSessionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSessionStore")
            .field("path", &self.inner.path)
            .finish()
    }
}

impl FileSessionStore {
    /// Loads the sessions kept in `dir`, dropping expired ones.
    pub fn open(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let path = dir.join(SESSIONS_FILE);
        let records: Vec<Record> = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "unreadable sessions file; starting empty");
                Vec::new()
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let now = OffsetDateTime::now_utc();
        let records = records
            .into_iter()
            .filter(|r| r.expiry_date > now)
            .map(|r| (r.id, r))
            .collect();
        let inner = Inner {
            path,
            records: Mutex::new(records),
            dirty: AtomicBool::new(false),
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    fn records(&self) -> std::sync::MutexGuard<'_, HashMap<Id, Record>> {
        self.inner.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn changed(&self) {
        self.inner.dirty.store(true, Ordering::Release);
    }

    /// Writes the sessions out if they changed, readable by the owner only.
    pub fn flush(&self) -> io::Result<()> {
        if !self.inner.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let now = OffsetDateTime::now_utc();
        let bytes = {
            let mut records = self.records();
            records.retain(|_, r| r.expiry_date > now);
            let list: Vec<&Record> = records.values().collect();
            serde_json::to_vec(&list).map_err(io::Error::other)?
        };
        crate::config::write_private(&self.inner.path, &bytes)
    }

    /// Flushes once a second until the host stops.
    // Limitation: a host that is killed (not stopped) loses up to a second of session changes;
    // with REALTIME_REDIS_URL sessions live in Redis instead.
    pub fn spawn_flusher(&self) -> tokio::task::JoinHandle<()> {
        let store = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                if let Err(e) = store.flush() {
                    tracing::warn!(error = %e, "could not write sessions file");
                }
            }
        })
    }
}

#[async_trait]
impl SessionStore for FileSessionStore {
    async fn create(&self, record: &mut Record) -> session_store::Result<()> {
        let mut records = self.records();
        while records.contains_key(&record.id) {
            record.id = Id::default();
        }
        records.insert(record.id, record.clone());
        drop(records);
        self.changed();
        Ok(())
    }

    async fn save(&self, record: &Record) -> session_store::Result<()> {
        self.records().insert(record.id, record.clone());
        self.changed();
        Ok(())
    }

    async fn load(&self, id: &Id) -> session_store::Result<Option<Record>> {
        let now = OffsetDateTime::now_utc();
        Ok(self
            .records()
            .get(id)
            .filter(|r| r.expiry_date > now)
            .cloned())
    }

    async fn delete(&self, id: &Id) -> session_store::Result<()> {
        self.records().remove(id);
        self.changed();
        Ok(())
    }
}

/// Sessions in Redis, one key each, expiring with the session.
#[derive(Clone)]
pub struct RedisSessionStore {
    conn: redis::aio::ConnectionManager,
    prefix: String,
}

impl std::fmt::Debug for RedisSessionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSessionStore")
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl RedisSessionStore {
    pub fn new(conn: redis::aio::ConnectionManager, prefix: &str) -> Self {
        Self {
            conn,
            prefix: format!("{prefix}session:"),
        }
    }

    /// Writes `record` until its expiry; with `only_new`, only if its id is not taken.
    async fn put(&self, record: &Record, only_new: bool) -> session_store::Result<bool> {
        let json = serde_json::to_string(record).map_err(backend)?;
        let expires_ms = (record.expiry_date.unix_timestamp_nanos() / 1_000_000).max(1) as u64;
        let mut set = redis::cmd("SET");
        set.arg(format!("{}{}", self.prefix, record.id))
            .arg(json)
            .arg("PXAT")
            .arg(expires_ms);
        if only_new {
            set.arg("NX");
        }
        let reply: Option<String> = set
            .query_async(&mut self.conn.clone())
            .await
            .map_err(backend)?;
        Ok(reply.is_some())
    }
}

fn backend(e: impl std::fmt::Display) -> session_store::Error {
    session_store::Error::Backend(e.to_string())
}

#[async_trait]
impl SessionStore for RedisSessionStore {
    async fn create(&self, record: &mut Record) -> session_store::Result<()> {
        while !self.put(record, true).await? {
            record.id = Id::default();
        }
        Ok(())
    }

    async fn save(&self, record: &Record) -> session_store::Result<()> {
        self.put(record, false).await.map(|_| ())
    }

    async fn load(&self, id: &Id) -> session_store::Result<Option<Record>> {
        let json: Option<String> = redis::cmd("GET")
            .arg(format!("{}{id}", self.prefix))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(backend)?;
        json.map(|j| serde_json::from_str(&j).map_err(backend))
            .transpose()
    }

    async fn delete(&self, id: &Id) -> session_store::Result<()> {
        redis::cmd("DEL")
            .arg(format!("{}{id}", self.prefix))
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(backend)
    }
}

/// The store the session layer uses: one of the two above.
#[derive(Clone, Debug)]
pub enum Sessions {
    File(FileSessionStore),
    Redis(RedisSessionStore),
}

impl Sessions {
    /// Saves what is pending; Redis has nothing pending.
    pub fn flush(&self) -> io::Result<()> {
        match self {
            Sessions::File(store) => store.flush(),
            Sessions::Redis(_) => Ok(()),
        }
    }

    pub fn spawn_flusher(&self) -> Option<tokio::task::JoinHandle<()>> {
        match self {
            Sessions::File(store) => Some(store.spawn_flusher()),
            Sessions::Redis(_) => None,
        }
    }
}

#[async_trait]
impl SessionStore for Sessions {
    async fn create(&self, record: &mut Record) -> session_store::Result<()> {
        match self {
            Sessions::File(s) => s.create(record).await,
            Sessions::Redis(s) => s.create(record).await,
        }
    }

    async fn save(&self, record: &Record) -> session_store::Result<()> {
        match self {
            Sessions::File(s) => s.save(record).await,
            Sessions::Redis(s) => s.save(record).await,
        }
    }

    async fn load(&self, id: &Id) -> session_store::Result<Option<Record>> {
        match self {
            Sessions::File(s) => s.load(id).await,
            Sessions::Redis(s) => s.load(id).await,
        }
    }

    async fn delete(&self, id: &Id) -> session_store::Result<()> {
        match self {
            Sessions::File(s) => s.delete(id).await,
            Sessions::Redis(s) => s.delete(id).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn sessions_survive_a_reopen_and_expired_ones_do_not() {
        let dir = std::env::temp_dir().join(format!("lr-sessions-{}", app::token::random_hex(6)));
        let store = FileSessionStore::open(&dir).unwrap();
        let live = OffsetDateTime::now_utc() + time::Duration::hours(1);
        let mut kept = Record {
            id: Id::default(),
            data: Default::default(),
            expiry_date: live,
        };
        kept.data
            .insert("user".into(), serde_json::json!({"id": "u1"}));
        let mut gone = Record {
            id: Id::default(),
            data: Default::default(),
            expiry_date: live,
        };
        store.create(&mut kept).await.unwrap();
        store.create(&mut gone).await.unwrap();
        store.delete(&gone.id).await.unwrap();
        store.flush().unwrap();
        let mode = fs::metadata(dir.join(SESSIONS_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let reopened = FileSessionStore::open(&dir).unwrap();
        assert_eq!(reopened.load(&kept.id).await.unwrap(), Some(kept));
        assert_eq!(reopened.load(&gone.id).await.unwrap(), None);
        fs::remove_dir_all(dir).unwrap();
    }
}
