//! Host configuration from `REALTIME_*` environment variables, with the embedded defaults, and
//! the signing secret that is generated on first start when none is configured.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use app::protocol::KNOWN_TOPICS;
use app::token::MIN_SECRET_LEN;

const SECRET_FILE: &str = "token-secret";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{name}: {message}")]
    Invalid { name: &'static str, message: String },
    #[error("secret file {path}: {source}")]
    Secret { path: PathBuf, source: io::Error },
}

/// Every limit and interval of the broker.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Messages a connection may have queued before it counts as a slow consumer.
    pub send_queue: usize,
    /// Largest frame a client may send.
    pub max_frame_bytes: usize,
    /// Largest `data` a publish may carry, as serialized JSON.
    pub max_publish_bytes: usize,
    pub max_topics_per_conn: usize,
    pub max_conns_per_user: usize,
    pub history_max_messages: usize,
    pub history_max_age: Duration,
    pub ping_interval: Duration,
    pub auth_timeout: Duration,
    /// Concurrent ai answers one user may have running.
    pub max_answers_per_user: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            send_queue: 512,
            max_frame_bytes: 16 * 1024,
            max_publish_bytes: 512 * 1024,
            max_topics_per_conn: 8,
            max_conns_per_user: 16,
            // An ai answer of a few thousand chunks fits several times over.
            history_max_messages: 10_000,
            history_max_age: Duration::from_secs(600),
            ping_interval: Duration::from_secs(20),
            auth_timeout: Duration::from_secs(10),
            max_answers_per_user: 4,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    /// The configured secret; `None` means use (or create) the one in `data_dir`.
    pub token_secret: Option<Vec<u8>>,
    pub token_ttl: Duration,
    /// Sessions end after this long without a request.
    pub session_ttl: Duration,
    /// Set the session cookie's `Secure` flag (the site is served over https).
    pub secure_cookies: bool,
    /// Origins allowed to open the WebSocket. Empty means the request's own origin only.
    pub allowed_origins: Vec<String>,
    /// Topics tokens may name.
    pub topics: Vec<String>,
    pub ai_chunk_delay: Duration,
    pub ai_answer_words: usize,
    pub limits: Limits,
    /// Where the shared broker lives. Unset: history, fan-out and sessions stay in this host.
    /// Never logged: the URL may carry a password.
    pub redis_url: Option<String>,
    /// Put before every Redis key and channel, so deployments can share one Redis.
    pub redis_prefix: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("data"),
            token_secret: None,
            token_ttl: Duration::from_secs(60),
            session_ttl: Duration::from_secs(12 * 3600),
            secure_cookies: false,
            allowed_origins: Vec::new(),
            topics: KNOWN_TOPICS.iter().map(|t| t.to_string()).collect(),
            ai_chunk_delay: Duration::from_millis(40),
            ai_answer_words: 60,
            limits: Limits::default(),
            redis_url: None,
            redis_prefix: "lr:".into(),
        }
    }
}

impl Config {
    /// Reads the `REALTIME_*` variables over the defaults.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut c = Config::default();
        let l = &mut c.limits;
        if let Some(dir) = get("REALTIME_DATA_DIR") {
            c.data_dir = PathBuf::from(dir);
        }
        if let Some(secret) = get("REALTIME_TOKEN_SECRET") {
            if secret.len() < MIN_SECRET_LEN {
                return Err(invalid(
                    "REALTIME_TOKEN_SECRET",
                    format!("must be at least {MIN_SECRET_LEN} bytes"),
                ));
            }
            c.token_secret = Some(secret.into_bytes());
        }
        secs(&get, "REALTIME_TOKEN_TTL_SECS", &mut c.token_ttl)?;
        secs(&get, "REALTIME_SESSION_TTL_SECS", &mut c.session_ttl)?;
        if let Some(v) = get("REALTIME_SECURE_COOKIES") {
            c.secure_cookies = parse_bool("REALTIME_SECURE_COOKIES", &v)?;
        }
        if let Some(v) = get("REALTIME_ALLOWED_ORIGINS") {
            c.allowed_origins = list(&v);
        }
        if let Some(v) = get("REALTIME_TOPICS") {
            c.topics = list(&v);
            if !c.topics.iter().any(|t| t == app::protocol::TOPIC_AI) {
                return Err(invalid("REALTIME_TOPICS", "must include `ai`".into()));
            }
        }
        c.redis_url = get("REALTIME_REDIS_URL").filter(|url| !url.is_empty());
        if let Some(prefix) = get("REALTIME_REDIS_PREFIX") {
            // Also a pattern in PSUBSCRIBE: glob characters would match other deployments.
            let plain =
                |ch: char| ch.is_ascii_alphanumeric() || matches!(ch, ':' | '_' | '-' | '.');
            if prefix.is_empty() || !prefix.chars().all(plain) {
                let why = "letters, digits and `:_-.` only, not empty".to_owned();
                return Err(invalid("REALTIME_REDIS_PREFIX", why));
            }
            c.redis_prefix = prefix;
        }
        millis(&get, "REALTIME_AI_CHUNK_DELAY_MS", &mut c.ai_chunk_delay)?;
        count(&get, "REALTIME_AI_ANSWER_WORDS", &mut c.ai_answer_words)?;
        count(&get, "REALTIME_SEND_QUEUE", &mut l.send_queue)?;
        count(&get, "REALTIME_MAX_FRAME_BYTES", &mut l.max_frame_bytes)?;
        count(&get, "REALTIME_MAX_PUBLISH_BYTES", &mut l.max_publish_bytes)?;
        count(
            &get,
            "REALTIME_MAX_TOPICS_PER_CONN",
            &mut l.max_topics_per_conn,
        )?;
        count(
            &get,
            "REALTIME_MAX_CONNS_PER_USER",
            &mut l.max_conns_per_user,
        )?;
        count(
            &get,
            "REALTIME_HISTORY_MAX_MESSAGES",
            &mut l.history_max_messages,
        )?;
        secs(
            &get,
            "REALTIME_HISTORY_MAX_AGE_SECS",
            &mut l.history_max_age,
        )?;
        secs(&get, "REALTIME_PING_INTERVAL_SECS", &mut l.ping_interval)?;
        secs(&get, "REALTIME_AUTH_TIMEOUT_SECS", &mut l.auth_timeout)?;
        count(
            &get,
            "REALTIME_MAX_ANSWERS_PER_USER",
            &mut l.max_answers_per_user,
        )?;
        Ok(c)
    }

    /// The configured secret, or the one kept in the data directory, created on first start.
    pub fn load_secret(&self) -> Result<Vec<u8>, ConfigError> {
        match &self.token_secret {
            Some(secret) => Ok(secret.clone()),
            None => load_or_create_secret(&self.data_dir),
        }
    }
}

fn invalid(name: &'static str, message: String) -> ConfigError {
    ConfigError::Invalid { name, message }
}

fn list(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn parse_bool(name: &'static str, v: &str) -> Result<bool, ConfigError> {
    match v.trim() {
        "1" | "true" | "yes" => Ok(true),
        "0" | "false" | "no" => Ok(false),
        other => Err(invalid(
            name,
            format!("expected true or false, got `{other}`"),
        )),
    }
}

fn number(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
) -> Result<Option<u64>, ConfigError> {
    get(name)
        .map(|v| {
            v.trim()
                .parse::<u64>()
                .map_err(|_| invalid(name, format!("expected a whole number, got `{v}`")))
        })
        .transpose()
}

fn count(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    out: &mut usize,
) -> Result<(), ConfigError> {
    if let Some(n) = number(get, name)? {
        if n == 0 {
            return Err(invalid(name, "must be at least 1".into()));
        }
        *out = n as usize;
    }
    Ok(())
}

fn secs(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    out: &mut Duration,
) -> Result<(), ConfigError> {
    if let Some(n) = number(get, name)? {
        if n == 0 {
            return Err(invalid(name, "must be at least 1".into()));
        }
        *out = Duration::from_secs(n);
    }
    Ok(())
}

fn millis(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    out: &mut Duration,
) -> Result<(), ConfigError> {
    if let Some(n) = number(get, name)? {
        *out = Duration::from_millis(n);
    }
    Ok(())
}

/// Reads `<dir>/token-secret`, or writes a new random one readable by the owner only.
pub fn load_or_create_secret(dir: &Path) -> Result<Vec<u8>, ConfigError> {
    let path = dir.join(SECRET_FILE);
    let err = |source| ConfigError::Secret {
        path: path.clone(),
        source,
    };
    match fs::read(&path) {
        Ok(secret) if secret.len() >= MIN_SECRET_LEN => {
            let mode = fs::metadata(&path).map_err(err)?.permissions().mode();
            if mode & 0o077 != 0 {
                fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(err)?;
                tracing::warn!(path = %path.display(), "secret file was readable by others; made it owner-only");
            }
            Ok(secret)
        }
        Ok(_) => Err(err(io::Error::new(
            io::ErrorKind::InvalidData,
            "secret file is too short",
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).map_err(err)?;
            let encoded = app::token::random_hex(48);
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(err)?;
            file.write_all(encoded.as_bytes()).map_err(err)?;
            tracing::info!(path = %path.display(), "generated a new token signing secret");
            Ok(encoded.into_bytes())
        }
        Err(e) => Err(err(e)),
    }
}

/// Replaces `path` with `bytes` through a temporary file, readable by the owner only.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }
    }

    #[test]
    fn defaults_apply_without_variables() {
        let c = Config::from_lookup(env(&[])).unwrap();
        assert_eq!(c.token_ttl, Duration::from_secs(60));
        assert_eq!(c.limits.max_publish_bytes, 512 * 1024);
        assert_eq!(c.topics, vec!["ai".to_string()]);
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = Config::from_lookup(env(&[("REALTIME_TOKEN_TTL_SECS", "soon")])).unwrap_err();
        assert!(e.to_string().contains("REALTIME_TOKEN_TTL_SECS"), "{e}");
        let e = Config::from_lookup(env(&[("REALTIME_TOKEN_SECRET", "short")])).unwrap_err();
        assert!(e.to_string().contains("at least 32"), "{e}");
        let e = Config::from_lookup(env(&[("REALTIME_SEND_QUEUE", "0")])).unwrap_err();
        assert!(e.to_string().contains("at least 1"), "{e}");
    }

    #[test]
    fn generated_secret_is_owner_only_and_stable() {
        let dir = std::env::temp_dir().join(format!("lr-secret-{}", app::token::random_hex(6)));
        let first = load_or_create_secret(&dir).unwrap();
        let mode = fs::metadata(dir.join(SECRET_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(first.len() >= MIN_SECRET_LEN);
        assert_eq!(load_or_create_secret(&dir).unwrap(), first);
        fs::remove_dir_all(dir).unwrap();
    }
}
