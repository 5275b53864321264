//! Database connections for both backends: URL handling, pools, migrations, and what a database
//! error means for a caller (transient, so retry; or a broken invariant).

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::postgres::{PgConnectOptions, PgSslMode};
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
    /// A TLS connection to PostgreSQL failed. A startup message: the cause in the terms of the
    /// URL's `sslmode` / `sslrootcert` / `sslcert`, so that an operator knows what to change.
    #[error("TLS to PostgreSQL at {server} failed: {failure}")]
    Tls {
        /// `host:port` (or the socket) the driver connected to.
        server: String,
        /// Why, in the URL's terms.
        failure: TlsFailure,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// A certificate or key file named by the URL cannot be read. Checked before connecting:
    /// the driver would report it as a bare I/O error naming no file.
    #[error("cannot read the {param} file {path} for PostgreSQL at {server}: {source}")]
    TlsFile {
        /// `host:port` (or the socket) of the server.
        server: String,
        /// The URL parameter: `sslrootcert`, `sslcert` or `sslkey`.
        param: &'static str,
        /// The file it names.
        path: String,
        /// Why it cannot be read.
        #[source]
        source: std::io::Error,
    },
    /// libpq's `sslpassword` (the passphrase of an encrypted `sslkey`), which sqlx does not
    /// support: it would log the value as an unknown parameter, then fail on the key.
    #[error(
        "sslpassword is not supported for PostgreSQL at {server}: the driver reads only unencrypted \
         keys; decrypt sslkey (openssl pkey -in key -out key.plain) and keep it mode 0600"
    )]
    SslPassword {
        /// `host:port` (or the socket) of the server.
        server: String,
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

/// Why a TLS connection to PostgreSQL failed, told apart from the driver's error chain so that
/// the startup message says what to fix rather than "invalid peer certificate: UnknownIssuer".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsFailure {
    /// The server answered that it does not speak TLS, and the mode demands it.
    #[error("the server does not support TLS but sslmode={sslmode}")]
    NotSupported {
        /// The URL's mode (`require`, `verify-ca`, `verify-full`).
        sslmode: String,
    },
    /// No trusted CA signed the server's certificate. (sqlx trusts the public web roots as well
    /// as sslrootcert, so a managed server with a public certificate needs no sslrootcert.)
    #[error("{}", untrusted(sslrootcert.as_deref()))]
    UntrustedCertificate {
        /// The CA file the URL names, if any.
        sslrootcert: Option<String>,
    },
    /// The server's certificate is for other names than the host connected to.
    #[error("the server's certificate is for {presented}, not for the host {host} of the URL")]
    WrongHost {
        /// The host of the URL.
        host: String,
        /// The names the certificate lists (comma-separated), or "other names".
        presented: String,
    },
    /// The server's certificate is outside its validity period.
    #[error("the server's certificate has expired or is not valid yet")]
    CertificateOutOfDate,
    /// The server's certificate is refused for another reason.
    #[error("the server's certificate is refused: {0}")]
    CertificateRefused(String),
    /// The server refused the client certificate of `sslcert` / `sslkey` (a TLS alert from it).
    #[error("the server refused the client certificate in sslcert ({sslcert}): TLS alert {alert}")]
    ClientCertificateRefused {
        /// The client certificate file.
        sslcert: String,
        /// The alert the server sent.
        alert: String,
    },
    /// Any other TLS failure, in the TLS library's words.
    #[error("{0}")]
    Other(String),
}

fn untrusted(sslrootcert: Option<&str>) -> String {
    match sslrootcert {
        Some(path) => {
            format!("the server's certificate is not signed by a CA in sslrootcert ({path}) nor by a public root CA")
        }
        None => "the server's certificate is not signed by a public root CA, and no sslrootcert names its CA".into(),
    }
}

/// rustls lists a certificate's names as `DnsName("db.example")` / `IpAddress(10.0.0.1)`; an
/// operator compares them with a host name, so show them bare.
fn bare_name(name: &str) -> &str {
    let inner = name.strip_prefix("DnsName(\"").and_then(|n| n.strip_suffix("\")"));
    inner.or_else(|| name.strip_prefix("IpAddress(").and_then(|n| n.strip_suffix(')'))).unwrap_or(name)
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
/// `user:password@`, a `password=` or `sslpassword=` query parameter, and a private key written
/// inline as `sslkey=-----BEGIN...`. Every message naming a URL goes through it.
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
            matches!(&*key, "password" | "sslpassword")
                || (matches!(&*key, "sslkey" | "ssl-key") && value.trim_start().starts_with("-----BEGIN"))
        });
        match (secret, pair.split_once('=')) {
            (true, Some((key, _))) => format!("{key}=***"),
            _ => pair.to_string(),
        }
    });
    pairs.collect::<Vec<_>>().join("&")
}

/// What a PostgreSQL URL asks of TLS, read as the driver reads it (environment defaults such as
/// `PGSSLMODE` included): to check its files first and to explain a failed handshake.
struct PgTls {
    /// `host:port`, or the socket path.
    server: String,
    host: String,
    mode: PgSslMode,
    root_cert: Option<String>,
    client_cert: Option<String>,
    client_key: Option<String>,
    /// Whether the URL has libpq's `sslpassword`, which sqlx ignores.
    ssl_password: bool,
}

impl PgTls {
    /// `None` when the URL does not parse; the driver then reports why.
    fn of(url: &str) -> Option<PgTls> {
        let parsed = url::Url::parse(url).ok()?;
        // Parse only the keys that name the server and the mode: sqlx's parser logs every key it
        // does not know with its value (an `sslpassword`, say), and the driver parses it anyway.
        let mut server_only = parsed.clone();
        let kept: Vec<(String, String)> = parsed
            .query_pairs()
            .filter(|(key, _)| matches!(&**key, "sslmode" | "ssl-mode" | "host" | "hostaddr" | "port"))
            .map(|(key, value)| (key.into_owned(), value.into_owned()))
            .collect();
        server_only.set_query(None);
        if !kept.is_empty() {
            server_only.query_pairs_mut().extend_pairs(kept);
        }
        let options = PgConnectOptions::from_str(server_only.as_str()).ok()?;
        // The last of a parameter's spellings wins, as in sqlx's parser; then the environment.
        let ssl_password = parsed.query_pairs().any(|(key, _)| key == "sslpassword");
        let param = |names: &[&str], env: &str| {
            parsed
                .query_pairs()
                .filter(|(key, _)| names.contains(&&**key))
                .last()
                .map(|(_, value)| value.into_owned())
                .or_else(|| std::env::var(env).ok())
        };
        let server = match options.get_socket() {
            Some(socket) => socket.display().to_string(),
            None => format!("{}:{}", options.get_host(), options.get_port()),
        };
        Some(PgTls {
            server,
            host: options.get_host().to_string(),
            mode: options.get_ssl_mode(),
            root_cert: param(&["sslrootcert", "ssl-root-cert", "ssl-ca"], "PGSSLROOTCERT"),
            client_cert: param(&["sslcert", "ssl-cert"], "PGSSLCERT"),
            client_key: param(&["sslkey", "ssl-key"], "PGSSLKEY"),
            ssl_password,
        })
    }

    /// Whether the driver tries TLS at all: sqlx treats `allow` as `disable`.
    fn attempts_tls(&self) -> bool {
        !matches!(self.mode, PgSslMode::Disable | PgSslMode::Allow)
    }

    /// Before connecting: fails on `sslpassword`, and on a certificate or key file that cannot
    /// be read, naming it (inline PEM is skipped).
    fn preflight(&self) -> Result<(), DbError> {
        if self.ssl_password {
            return Err(DbError::SslPassword { server: self.server.clone() });
        }
        if !self.attempts_tls() {
            return Ok(());
        }
        let files = [("sslrootcert", &self.root_cert), ("sslcert", &self.client_cert), ("sslkey", &self.client_key)];
        for (param, path) in files {
            let Some(path) = path.as_deref().filter(|p| !p.trim_start().starts_with("-----BEGIN")) else { continue };
            if let Err(source) = std::fs::File::open(path) {
                return Err(DbError::TlsFile { server: self.server.clone(), param, path: path.to_string(), source });
            }
        }
        Ok(())
    }

    /// The TLS cause of a failed connection, if it is one.
    fn failure(&self, error: &sqlx::Error) -> Option<TlsFailure> {
        if !self.attempts_tls() {
            return None;
        }
        match error {
            sqlx::Error::Tls(inner) => Some(match inner.downcast_ref::<rustls::Error>() {
                Some(tls) => self.explain(tls),
                // sqlx 0.8's words when the server answers the SSLRequest with 'N'.
                None if inner.to_string() == "server does not support TLS" => {
                    TlsFailure::NotSupported { sslmode: ssl_mode_name(self.mode).to_string() }
                }
                None => TlsFailure::Other(inner.to_string()),
            }),
            // rustls reports a failed handshake, and an alert the server sends later, as an I/O
            // error of kind InvalidData around its own error.
            sqlx::Error::Io(io) => {
                io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()).map(|e| self.explain(e))
            }
            _ => None,
        }
    }

    fn explain(&self, error: &rustls::Error) -> TlsFailure {
        use rustls::{AlertDescription as Alert, CertificateError as Cert};
        match error {
            rustls::Error::InvalidCertificate(cert) => match cert {
                Cert::UnknownIssuer => TlsFailure::UntrustedCertificate { sslrootcert: self.root_cert.clone() },
                Cert::NotValidForName => {
                    TlsFailure::WrongHost { host: self.host.clone(), presented: "other names".into() }
                }
                Cert::NotValidForNameContext { presented, .. } => {
                    let presented = presented.iter().map(|n| bare_name(n)).collect::<Vec<_>>().join(", ");
                    TlsFailure::WrongHost { host: self.host.clone(), presented }
                }
                Cert::Expired | Cert::ExpiredContext { .. } | Cert::NotValidYet | Cert::NotValidYetContext { .. } => {
                    TlsFailure::CertificateOutOfDate
                }
                other => TlsFailure::CertificateRefused(format!("{other:?}")),
            },
            // Alerts about a certificate, received when this side sent one: the server's verdict
            // on the client certificate (PostgreSQL checks it against its ssl_ca_file).
            rustls::Error::AlertReceived(
                alert @ (Alert::BadCertificate
                | Alert::UnsupportedCertificate
                | Alert::CertificateRevoked
                | Alert::CertificateExpired
                | Alert::CertificateUnknown
                | Alert::UnknownCA
                | Alert::AccessDenied),
            ) if self.client_cert.is_some() => TlsFailure::ClientCertificateRefused {
                sslcert: self.client_cert.clone().unwrap_or_default(),
                alert: format!("{alert:?}"),
            },
            other => TlsFailure::Other(other.to_string()),
        }
    }
}

/// The URL spelling of a mode, for messages.
fn ssl_mode_name(mode: PgSslMode) -> &'static str {
    match mode {
        PgSslMode::Disable => "disable",
        PgSslMode::Allow => "allow",
        PgSslMode::Prefer => "prefer",
        PgSslMode::Require => "require",
        PgSslMode::VerifyCa => "verify-ca",
        PgSslMode::VerifyFull => "verify-full",
    }
}

impl Db {
    /// Opens a pool on `url` and applies the backend's migrations.
    pub async fn connect(url: &str, settings: &PoolSettings) -> Result<Db, DbError> {
        sqlx::any::install_default_drivers();
        let (url, backend) = normalize_url(url)?;
        // The Any driver hands the postgres driver the URL itself, which reads sslmode,
        // sslrootcert, sslcert and sslkey from it; the same reading explains a TLS failure.
        let tls = (backend == Backend::Postgres).then(|| PgTls::of(&url)).flatten();
        if let Some(tls) = &tls {
            tls.preflight()?;
            if matches!(tls.mode, PgSslMode::Require) && tls.root_cert.is_some() {
                tracing::warn!(
                    server = %tls.server,
                    "sslmode=require does not check the server's certificate against sslrootcert with this \
                     driver (libpq would); use sslmode=verify-full"
                );
            }
        }
        let wrap = |source: sqlx::Error| match tls.as_ref().and_then(|tls| Some((tls, tls.failure(&source)?))) {
            Some((tls, failure)) => DbError::Tls { server: tls.server.clone(), failure, source },
            None => DbError::Sqlx { url: redact(&url), source },
        };
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
            if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                // SQLite: SQLITE_BUSY (5) and SQLITE_LOCKED (6) with their extended codes. Only
                // for SQLite: many SQLSTATEs are digits too, and 22021 (a NUL in a string) or
                // 42501 (no privilege) end in byte 5 and would pass for a busy database.
                return code.parse::<i64>().is_ok_and(|c| c & 0xff == 5 || c & 0xff == 6);
            }
            // PostgreSQL: serialization failure, deadlock, connection exceptions (08*), login
            // refused (28*), a database not accepting connections or gone (55*, 3D000),
            // operator intervention such as shutdown (57*), insufficient resources (53*).
            matches!(code.as_ref(), "40001" | "40P01" | "3D000")
                || ["08", "28", "53", "55", "57"].iter().any(|class| code.starts_with(class))
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

    fn pg_tls(url: &str) -> PgTls {
        PgTls::of(url).expect("the URL parses")
    }

    #[test]
    fn explains_tls_failures() {
        let url = "postgres://u@db.example:6543/d?sslmode=verify-full&sslrootcert=/etc/ca.crt";
        let tls = pg_tls(url);
        assert_eq!(tls.server, "db.example:6543");
        let io = |e: rustls::Error| sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, e));
        let unknown = io(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer));
        assert_eq!(
            tls.failure(&unknown),
            Some(TlsFailure::UntrustedCertificate { sslrootcert: Some("/etc/ca.crt".into()) })
        );
        let refused = sqlx::Error::Tls("server does not support TLS".into());
        assert_eq!(tls.failure(&refused), Some(TlsFailure::NotSupported { sslmode: "verify-full".into() }));
        assert_eq!(
            tls.failure(&refused).unwrap().to_string(),
            "the server does not support TLS but sslmode=verify-full"
        );
        let names = vec!["DnsName(\"db.example\")".to_string(), "IpAddress(10.0.0.1)".to_string()];
        let wrong = io(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForNameContext {
            expected: rustls::pki_types::ServerName::try_from("db.example").unwrap(),
            presented: names,
        }));
        assert_eq!(
            tls.failure(&wrong).unwrap().to_string(),
            "the server's certificate is for db.example, 10.0.0.1, not for the host db.example of the URL"
        );
        // Not TLS: a refused TCP connection.
        let tcp = sqlx::Error::Io(std::io::ErrorKind::ConnectionRefused.into());
        assert_eq!(tls.failure(&tcp), None);
        // An alert about a certificate is the client certificate's only when one was sent.
        let alert = io(rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA));
        assert!(matches!(tls.failure(&alert), Some(TlsFailure::Other(_))));
        let with_cert = pg_tls(&format!("{url}&sslcert=/c.crt&sslkey=/c.key"));
        assert!(matches!(with_cert.failure(&alert), Some(TlsFailure::ClientCertificateRefused { .. })));
        // Without TLS nothing is a TLS failure.
        assert_eq!(pg_tls("postgres://u@h/d?sslmode=disable").failure(&unknown), None);
    }

    #[test]
    fn a_missing_certificate_file_is_named() {
        let error = pg_tls("postgres://u@h:1/d?sslmode=verify-full&sslrootcert=/nonexistent/ca.crt")
            .preflight()
            .unwrap_err()
            .to_string();
        assert!(error.contains("sslrootcert file /nonexistent/ca.crt"), "{error}");
        // An encrypted key's passphrase is refused before sqlx logs it as an unknown parameter.
        let error = pg_tls("postgres://u@h:1/d?sslmode=verify-full&sslkey=/k&sslpassword=sekrit").preflight();
        assert!(matches!(error, Err(DbError::SslPassword { .. })), "{error:?}");
        assert!(!format!("{error:?}").contains("sekrit"));
        assert_eq!(redact("postgres://u@h/d?sslpassword=sekrit"), "postgres://u@h/d?sslpassword=***");
        // sqlx reads no file when it will not try TLS.
        assert!(pg_tls("postgres://u@h/d?sslmode=disable&sslrootcert=/nonexistent/ca.crt").preflight().is_ok());
    }
}
