//! Database connections for both backends: URL handling, pools, migrations, and what a database
//! error means for a caller (transient, so retry; or a broken invariant).

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyConnection, AnyPool, Executor};

/// The two supported backends. Every query in the service is written to run on both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The production store; many instances may share it.
    Postgres,
    /// The embedded default: one instance, one writer.
    Sqlite,
}

impl Backend {
    /// The backend a connection speaks: the one place that asks the driver. A step, which is
    /// handed only a connection, tells its dialect from this.
    pub fn of(conn: &AnyConnection) -> Backend {
        match conn.backend_name() {
            "PostgreSQL" => Backend::Postgres,
            _ => Backend::Sqlite,
        }
    }
}

/// Errors of opening or preparing a database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL names no supported backend. It holds the URL already redacted: it is printed.
    #[error("unsupported database URL {0:?}: use postgres://... or a SQLite file path / sqlite:...")]
    UnsupportedUrl(String),
    /// `DATABASE_URL` and `INVENTORY_DATABASE_URL` name different backends.
    #[error("DATABASE_URL and INVENTORY_DATABASE_URL must name the same backend (both PostgreSQL or both SQLite)")]
    MixedBackends,
    /// Another order-saga process already uses this SQLite file.
    #[error(
        "another order-saga instance is already using the SQLite database {0}; SQLite runs one \
         instance (use PostgreSQL to run several)"
    )]
    SqliteInUse(String),
    /// The instance lock file could not be opened.
    #[error("cannot open the instance lock {path}: {source}")]
    LockFile {
        /// The lock file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The database refused a connection or a migration.
    #[error("database {url}: {source}")]
    Sqlx {
        /// The URL, without its password.
        url: String,
        /// What went wrong.
        #[source]
        source: sqlx::Error,
    },
}

/// A connection pool to one database, with the backend it speaks.
#[derive(Clone)]
pub struct Db {
    /// The pool itself; every query goes through it or a transaction begun on it.
    pub pool: AnyPool,
    /// Which SQL dialect details to use (locking clauses, migrations).
    pub backend: Backend,
    /// The normalised URL; two `Db`s with the same URL are the same database.
    pub url: String,
}

// By hand, so that a URL's password never reaches a `{:?}` (the derive would print it whole).
impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").field("backend", &self.backend).field("url", &redact(&self.url)).finish_non_exhaustive()
    }
}

/// How long a SQLite caller may queue for the one connection: a local file does not go away, so
/// a wait there means load, not an outage.
const SQLITE_QUEUE_WAIT: Duration = Duration::from_secs(10);

/// Pool sizing and timeouts.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Most connections to a PostgreSQL server.
    pub max_connections: u32,
    /// How long a caller waits for a free connection before the request fails with 503.
    pub acquire_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self { max_connections: 16, acquire_timeout: Duration::from_secs(3) }
    }
}

/// Turns a configured URL into the URL sqlx expects and the backend it selects.
/// A bare path means a SQLite file, created if missing.
pub fn normalize_url(url: &str) -> Result<(String, Backend), DbError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok((url.to_string(), Backend::Postgres));
    }
    let path = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")).unwrap_or(url);
    if path.is_empty() || path.contains("://") {
        return Err(DbError::UnsupportedUrl(redact(url)));
    }
    let sep = if path.contains('?') { '&' } else { '?' };
    let with_mode = if path.contains("mode=") { path.to_string() } else { format!("{path}{sep}mode=rwc") };
    Ok((format!("sqlite://{with_mode}"), Backend::Sqlite))
}

/// The file a SQLite URL names, if it is one (and not an in-memory database).
pub fn sqlite_path(url: &str) -> Option<std::path::PathBuf> {
    let (normalized, backend) = normalize_url(url).ok()?;
    if backend != Backend::Sqlite {
        return None;
    }
    let path = normalized.strip_prefix("sqlite://")?.split('?').next()?;
    (!path.is_empty() && path != ":memory:").then(|| std::path::PathBuf::from(path))
}

/// Holds an exclusive lock beside a SQLite file for as long as it lives, so that a second
/// instance on the same file refuses to start instead of sharing its single writer.
#[derive(Debug)]
pub struct InstanceLock {
    _file: std::fs::File,
}

impl InstanceLock {
    /// Takes the lock for the SQLite database at `url`; `None` for PostgreSQL.
    pub fn acquire(url: &str) -> Result<Option<InstanceLock>, DbError> {
        let Some(path) = sqlite_path(url) else { return Ok(None) };
        let mut lock_path = path.clone().into_os_string();
        lock_path.push(".lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| DbError::LockFile { path: lock_path.to_string_lossy().into_owned(), source })?;
        match file.try_lock() {
            Ok(()) => Ok(Some(InstanceLock { _file: file })),
            Err(std::fs::TryLockError::WouldBlock) => Err(DbError::SqliteInUse(path.display().to_string())),
            Err(std::fs::TryLockError::Error(source)) => {
                Err(DbError::LockFile { path: lock_path.to_string_lossy().into_owned(), source })
            }
        }
    }
}

/// Masks the secrets of a database URL so that it can be logged or printed: the password of
/// `user:password@`, a `password=` query parameter, and a private key written inline as
/// `sslkey=-----BEGIN...`. Every message naming a URL goes through it.
pub fn redact(url: &str) -> String {
    // What sqlx reads as the password is what url::Url parses as one, so mask exactly that.
    if let Ok(parsed) = url::Url::parse(url) {
        use url::Position;
        let mut out = String::with_capacity(url.len());
        match parsed.password() {
            Some(_) => {
                out.push_str(&parsed[..Position::BeforePassword]);
                out.push_str("***");
                out.push_str(&parsed[Position::AfterPassword..Position::AfterPath]);
            }
            None => out.push_str(&parsed[..Position::AfterPath]),
        }
        if let Some(query) = parsed.query() {
            out.push('?');
            out.push_str(&redact_query(query));
        }
        return out;
    }
    // Not a URL (a SQLite path, or a malformed URL sqlx will refuse): everything between the
    // scheme and the last '@' may be a password with unescaped characters; mask generously.
    let masked = match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => match url[s + 3..at].find(':') {
            Some(c) => format!("{}:***{}", &url[..s + 3 + c], &url[at..]),
            None => url.to_string(),
        },
        _ => url.to_string(),
    };
    match masked.split_once('?') {
        Some((head, query)) => format!("{head}?{}", redact_query(query)),
        None => masked,
    }
}

/// Masks the secret values of a query string, keeping every other pair as written.
fn redact_query(query: &str) -> String {
    let pairs = query.split('&').map(|pair| {
        // Decoded the way sqlx decodes them, so that `pass%77ord=` is masked too.
        let decoded = url::form_urlencoded::parse(pair.as_bytes()).next();
        let secret = decoded.is_some_and(|(key, value)| {
            key == "password" || (matches!(&*key, "sslkey" | "ssl-key") && value.trim_start().starts_with("-----BEGIN"))
        });
        match (secret, pair.split_once('=')) {
            (true, Some((key, _))) => format!("{key}=***"),
            _ => pair.to_string(),
        }
    });
    pairs.collect::<Vec<_>>().join("&")
}

impl Db {
    /// Opens a pool on `url` and applies the backend's migrations.
    pub async fn connect(url: &str, settings: &PoolSettings) -> Result<Db, DbError> {
        sqlx::any::install_default_drivers();
        let (url, backend) = normalize_url(url)?;
        let wrap = |source| DbError::Sqlx { url: redact(&url), source };
        let options = AnyConnectOptions::from_str(&url).map_err(wrap)?;
        let pool_options = match backend {
            // No ping before each acquire: it costs a round trip per transaction, and a dead
            // connection fails its first statement anyway, which every caller handles as
            // transient (a retry, or a 503).
            Backend::Postgres => AnyPoolOptions::new()
                .max_connections(settings.max_connections)
                .acquire_timeout(settings.acquire_timeout)
                .test_before_acquire(false),
            // SQLite has one writer; a single connection serialises writers without SQLITE_BUSY
            // and keeps every transaction's view consistent.
            Backend::Sqlite => AnyPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(settings.acquire_timeout.max(SQLITE_QUEUE_WAIT))
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        conn.execute(
                            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                         PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON;",
                        )
                        .await?;
                        Ok(())
                    })
                }),
        };
        let pool = pool_options.connect_with(options).await.map_err(wrap)?;
        let db = Db { pool, backend, url: url.clone() };
        crate::migrate::run(&db).await.map_err(wrap)?;
        Ok(db)
    }

    /// Answers whether the database responds, within `timeout`.
    pub async fn ping(&self, timeout: Duration) -> bool {
        matches!(tokio::time::timeout(timeout, sqlx::query("SELECT 1").execute(&self.pool)).await, Ok(Ok(_)))
    }
}

/// True when retrying the same work later may succeed: lost connections, pool timeouts,
/// serialization failures, deadlocks, a busy SQLite file.
pub fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // PostgreSQL: serialization failure, deadlock, connection exceptions (08*), login
            // refused (28*), a database not accepting connections or gone (55*, 3D000),
            // operator intervention such as shutdown (57*), insufficient resources (53*).
            // SQLite: SQLITE_BUSY (5) and SQLITE_LOCKED (6) with their extended codes.
            matches!(code.as_ref(), "40001" | "40P01" | "3D000")
                || ["08", "28", "53", "55", "57"].iter().any(|class| code.starts_with(class))
                || code.parse::<i64>().is_ok_and(|c| c & 0xff == 5 || c & 0xff == 6)
        }
        _ => false,
    }
}

/// True when a statement failed on a unique constraint (a row with that key exists).
pub fn is_unique_violation(error: &sqlx::Error) -> bool {
    error.as_database_error().is_some_and(|e| e.is_unique_violation())
}

/// Milliseconds since the Unix epoch: the one clock every stored time uses.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Formats a stored time as RFC 3339 (UTC, milliseconds) for the API.
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil-from-days (Howard Hinnant's algorithm), so no date crate is needed for one format.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}.{millis:03}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_times() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_701_600_123), "2026-11-26T14:00:00.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn normalizes_urls() {
        assert_eq!(
            normalize_url("order-saga.db").unwrap(),
            ("sqlite://order-saga.db?mode=rwc".into(), Backend::Sqlite)
        );
        assert_eq!(normalize_url("sqlite:/tmp/x.db").unwrap().0, "sqlite:///tmp/x.db?mode=rwc");
        assert_eq!(normalize_url("postgres://u@h/d").unwrap().1, Backend::Postgres);
        assert!(normalize_url("mysql://h/d").is_err());
        assert_eq!(redact("postgres://u:secret@h/d"), "postgres://u:***@h/d");
    }

    #[test]
    fn redacts_every_secret_of_a_url() {
        // The userinfo password, with the rest kept as written.
        assert_eq!(
            redact("postgres://u:s%40cret@h:5432/d?sslmode=verify-full&sslrootcert=/etc/ca.crt"),
            "postgres://u:***@h:5432/d?sslmode=verify-full&sslrootcert=/etc/ca.crt"
        );
        // A password parameter, however its key is spelt to sqlx's decoder.
        assert_eq!(
            redact("postgres://u@h/d?password=secret&sslmode=require"),
            "postgres://u@h/d?password=***&sslmode=require"
        );
        assert_eq!(redact("postgres://u@h/d?pass%77ord=secret"), "postgres://u@h/d?pass%77ord=***");
        assert_eq!(redact("postgres://u:a@h/d?password=b"), "postgres://u:***@h/d?password=***");
        // A private key written inline; a key file's path is kept.
        let inline = redact("postgres://u@h/d?sslkey=-----BEGIN%20PRIVATE%20KEY-----secret");
        assert_eq!(inline, "postgres://u@h/d?sslkey=***");
        assert_eq!(redact("postgres://u@h/d?sslkey=/k.pem"), "postgres://u@h/d?sslkey=/k.pem");
        // An '@' in the query is not the end of the userinfo.
        assert_eq!(redact("postgres://u@h/d?application_name=a@b"), "postgres://u@h/d?application_name=a@b");
        // A malformed URL (a '/' in the password makes "u:pa" a host with a bad port) is masked
        // up to its last '@', where a password might end.
        let malformed = redact("postgres://u:pa/ss@h/d?password=x");
        assert!(!malformed.contains("pa/ss") && !malformed.contains("=x"), "{malformed}");
        // SQLite paths pass through.
        assert_eq!(redact("order-saga.db"), "order-saga.db");
        assert_eq!(redact("sqlite:///tmp/x.db?mode=rwc"), "sqlite:///tmp/x.db?mode=rwc");
        // Nor do the errors and Debug that carry a URL leak it.
        let err = normalize_url("mysql://u:secret@h/d").unwrap_err().to_string();
        assert!(!err.contains("secret"), "{err}");
    }
}
