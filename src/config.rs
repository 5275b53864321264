//! Configuration: every setting is an environment variable and the same-named command-line flag.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::auth::{AuthSettings, KeySource, Secret};
use crate::server::{self, ConnectionLimits};
use crate::telemetry::TraceSettings;

/// `MAX_IN_FLIGHT`'s default: see [`Config::max_in_flight`].
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 1024;

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// order-saga: places orders across order and inventory databases with a durable saga.
#[derive(Debug, Clone, Parser)]
#[command(name = "order-saga", version, about)]
pub struct Config {
    /// Orders and the saga log: a SQLite file path (created if missing) or a postgres:// URL.
    // hide_env_values: --help would otherwise print the variable's value, password and all.
    #[arg(long, env = "DATABASE_URL", default_value = "order-saga.db", hide_env_values = true)]
    pub database_url: String,
    /// The inventory participant's database; defaults to DATABASE_URL. Same backend required.
    #[arg(long, env = "INVENTORY_DATABASE_URL", hide_env_values = true)]
    pub inventory_database_url: Option<String>,
    /// Address to listen on.
    #[arg(long, env = "BIND_ADDR", default_value = "127.0.0.1:8080")]
    pub bind_addr: String,
    /// PEM certificate chain (the server's certificate first) to serve HTTPS with; needs
    /// TLS_KEY_FILE. Unset, the service speaks plain HTTP.
    #[arg(long, env = "TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of TLS_CERT_FILE's certificate.
    #[arg(long, env = "TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// How long POST /orders and a cancel wait for their saga before answering 202.
    #[arg(long, env = "ORDER_WAIT_MS", default_value_t = 5000)]
    pub order_wait_ms: u64,
    /// Longest a request may take (answered 503 request_timeout); must exceed ORDER_WAIT_MS.
    #[arg(long, env = "REQUEST_TIMEOUT_MS", default_value_t = 30000)]
    pub request_timeout_ms: u64,
    /// Before its pivot, a saga still failing this long after it started compensates.
    #[arg(long, env = "SAGA_DEADLINE_MS", default_value_t = 30000)]
    pub saga_deadline_ms: u64,
    /// Failed attempts of one step after which its saga is flagged stuck.
    #[arg(long, env = "STUCK_AFTER_ATTEMPTS", default_value_t = 10)]
    pub stuck_after_attempts: u32,
    /// The wait after a step's first failed attempt; it doubles with each attempt after that.
    #[arg(long, env = "BACKOFF_BASE_MS", default_value_t = 10)]
    pub backoff_base_ms: u64,
    /// The longest wait between two attempts of a failing step.
    #[arg(long, env = "BACKOFF_CAP_MS", default_value_t = 2000)]
    pub backoff_cap_ms: u64,
    /// How long idempotency records are kept.
    #[arg(long, env = "IDEMPOTENCY_TTL_SECS", default_value_t = 86400)]
    pub idempotency_ttl_secs: u64,
    /// On SIGTERM or Ctrl-C, how long running steps may take to end.
    #[arg(long, env = "SHUTDOWN_GRACE_MS", default_value_t = 10000)]
    pub shutdown_grace_ms: u64,
    /// How long a saga's owner holds it without a heartbeat before another instance may resume it.
    #[arg(long, env = "LEASE_MS", default_value_t = 10000)]
    pub lease_ms: u64,
    /// How often to look for unfinished sagas whose lease has expired.
    #[arg(long, env = "RECOVERY_INTERVAL_MS", default_value_t = 1000)]
    pub recovery_interval_ms: u64,
    /// Most requests in flight at once; past it a request is answered 503 `overloaded` at once,
    /// before anything is written for it. A request answered before the saga it started settles
    /// (`Prefer: respond-async`, a 202) leaves its slot to the saga until it settles or is
    /// flagged stuck. Health, readiness, metrics, the spec, event streams and the dashboard's
    /// files are not counted.
    /// The default is measured (README, "Load shedding"): an admitted order waits about
    /// in-flight / throughput for a database connection, and the pool gives up after 3 s (503
    /// `database_unavailable`, late and after a wasted wait); at the 300 to 500 orders/s that
    /// PostgreSQL sustains under a burst on a shared 2-core machine, that is about 1,000.
    #[arg(long, env = "MAX_IN_FLIGHT", default_value_t = DEFAULT_MAX_IN_FLIGHT)]
    pub max_in_flight: u32,
    /// The longest a client may take to send a request's head: from the connection's opening,
    /// or from its first byte after an idle keep-alive wait. A slower client is disconnected.
    #[arg(long, env = "HEADER_READ_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_read_timeout_ms: u64,
    /// How long a kept-alive connection may sit idle between an answer and the next request's
    /// first byte before it is closed.
    #[arg(long, env = "KEEPALIVE_IDLE_MS", default_value_t = 60_000)]
    pub keepalive_idle_ms: u64,
    /// The listen backlog: connections the kernel queues before they are accepted. Default: the
    /// kernel's limit (`/proc/sys/net/core/somaxconn`), else 4096; the kernel caps it there.
    #[arg(long, env = "LISTEN_BACKLOG")]
    pub listen_backlog: Option<u32>,
    /// Most connections per PostgreSQL database (SQLite uses one).
    #[arg(long, env = "DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,
    /// Comma-separated origins browsers may call from (`*` for any); none by default.
    #[arg(long, env = "CORS_ALLOW_ORIGINS", value_delimiter = ',')]
    pub cors_allow_origins: Vec<String>,
    /// Whether to record metrics and serve them at `GET /metrics` (`false` turns both off).
    #[arg(long, env = "METRICS", default_value_t = true, action = clap::ArgAction::Set)]
    pub metrics: bool,
    /// HS256 secret that signs bearer tokens (at least 32 bytes); turns authentication on.
    #[arg(long, env = "AUTH_JWT_SECRET", hide_env_values = true)]
    pub auth_jwt_secret: Option<Secret>,
    /// PEM file with the RSA (RS256) or P-256 (ES256) public key of bearer tokens; turns
    /// authentication on.
    #[arg(long, env = "AUTH_JWT_PUBLIC_KEY")]
    pub auth_jwt_public_key: Option<PathBuf>,
    /// JWKS file of token keys, chosen by `kid` and re-read on SIGHUP; turns authentication on.
    #[arg(long, env = "AUTH_JWT_JWKS")]
    pub auth_jwt_jwks: Option<PathBuf>,
    /// The `iss` every token must carry.
    #[arg(long, env = "AUTH_JWT_ISSUER")]
    pub auth_jwt_issuer: Option<String>,
    /// An `aud` every token must carry.
    #[arg(long, env = "AUTH_JWT_AUDIENCE")]
    pub auth_jwt_audience: Option<String>,
    /// Serve without authentication on a non-loopback address, on purpose (behind a gateway
    /// that authenticates).
    #[arg(long, env = "AUTH_DISABLED", default_value_t = false, action = clap::ArgAction::Set)]
    pub auth_disabled: bool,
    /// A static bearer token that may read `GET /metrics` (for a Prometheus scraper).
    #[arg(long, env = "METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<Secret>,
    /// Log filter, in tracing's EnvFilter syntax.
    #[arg(long = "rust-log", env = "RUST_LOG", default_value = "info")]
    pub rust_log: String,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// OTLP/HTTP collector to export traces to, such as `http://127.0.0.1:4318`; none when unset.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otel_exporter_otlp_endpoint: Option<String>,
    /// The `service.name` of exported traces.
    #[arg(long, env = "OTEL_SERVICE_NAME", default_value = "order-saga")]
    pub otel_service_name: String,
}

impl Config {
    /// Checks settings that depend on each other.
    pub fn validate(&self) -> Result<(), String> {
        if self.request_timeout_ms <= self.order_wait_ms {
            return Err(format!(
                "REQUEST_TIMEOUT_MS ({}) must be greater than ORDER_WAIT_MS ({})",
                self.request_timeout_ms, self.order_wait_ms
            ));
        }
        if self.backoff_cap_ms == 0 {
            return Err("BACKOFF_CAP_MS must be at least 1".into());
        }
        if self.max_in_flight == 0 {
            return Err("MAX_IN_FLIGHT must be at least 1".into());
        }
        if self.header_read_timeout_ms == 0 || self.keepalive_idle_ms == 0 {
            return Err("HEADER_READ_TIMEOUT_MS and KEEPALIVE_IDLE_MS must be at least 1".into());
        }
        if self.listen_backlog == Some(0) {
            return Err("LISTEN_BACKLOG must be at least 1".into());
        }
        if self.lease_ms < 30 {
            return Err("LEASE_MS must be at least 30".into());
        }
        let set = |file: &Option<PathBuf>| file.as_ref().is_some_and(|f| !f.as_os_str().is_empty());
        match (set(&self.tls_cert_file), set(&self.tls_key_file)) {
            (true, false) => {
                return Err("TLS_CERT_FILE is set but TLS_KEY_FILE is not: set both to serve HTTPS, or neither".into());
            }
            (false, true) => {
                return Err("TLS_KEY_FILE is set but TLS_CERT_FILE is not: set both to serve HTTPS, or neither".into());
            }
            _ => {}
        }
        self.auth()?;
        Ok(())
    }

    /// The certificate and key files when HTTPS is asked for (both set and not empty; `validate`
    /// refuses one without the other).
    pub fn tls_files(&self) -> Option<(&Path, &Path)> {
        let cert = self.tls_cert_file.as_deref().filter(|f| !f.as_os_str().is_empty())?;
        let key = self.tls_key_file.as_deref().filter(|f| !f.as_os_str().is_empty())?;
        Some((cert, key))
    }

    /// How callers are authenticated: `None` means not at all, which is allowed only on a
    /// loopback address or with `AUTH_DISABLED=true` (safe by default).
    pub fn auth(&self) -> Result<Option<AuthSettings>, String> {
        let secret = self.auth_jwt_secret.clone().filter(|s| !s.expose().is_empty()).map(KeySource::Secret);
        let pem = self.auth_jwt_public_key.clone().filter(|p| !p.as_os_str().is_empty()).map(KeySource::PublicKey);
        let jwks = self.auth_jwt_jwks.clone().filter(|p| !p.as_os_str().is_empty()).map(KeySource::Jwks);
        let mut sources: Vec<KeySource> = [secret, pem, jwks].into_iter().flatten().collect();
        let issuer = self.auth_jwt_issuer.clone().filter(|s| !s.is_empty());
        let audience = self.auth_jwt_audience.clone().filter(|s| !s.is_empty());
        match (sources.len(), self.auth_disabled) {
            (0, true) => Ok(None),
            (0, false) if issuer.is_some() || audience.is_some() => Err(
                "AUTH_JWT_ISSUER / AUTH_JWT_AUDIENCE are set but no key is: set AUTH_JWT_SECRET, AUTH_JWT_PUBLIC_KEY \
                 or AUTH_JWT_JWKS"
                    .into(),
            ),
            (0, false) if is_loopback(&self.bind_addr) => Ok(None),
            (0, false) => Err(format!(
                "refusing to serve {} without authentication: set AUTH_JWT_SECRET, AUTH_JWT_PUBLIC_KEY or \
                 AUTH_JWT_JWKS, or AUTH_DISABLED=true if a gateway in front authenticates every request",
                self.bind_addr
            )),
            (1, false) => Ok(Some(AuthSettings { source: sources.remove(0), issuer, audience })),
            (1, true) => Err("AUTH_DISABLED=true contradicts the AUTH_JWT_* key that is set: choose one".into()),
            _ => Err("set only one of AUTH_JWT_SECRET, AUTH_JWT_PUBLIC_KEY and AUTH_JWT_JWKS".into()),
        }
    }

    /// Where traces go.
    pub fn traces(&self) -> TraceSettings {
        TraceSettings {
            otlp_endpoint: self.otel_exporter_otlp_endpoint.clone().filter(|e| !e.is_empty()),
            service_name: self.otel_service_name.clone(),
        }
    }

    /// `ORDER_WAIT_MS` as a duration.
    pub fn order_wait(&self) -> Duration {
        Duration::from_millis(self.order_wait_ms)
    }

    /// The per-connection limits: `HEADER_READ_TIMEOUT_MS` and `KEEPALIVE_IDLE_MS`.
    pub fn connection_limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            header_read_timeout: Duration::from_millis(self.header_read_timeout_ms),
            keepalive_idle: Duration::from_millis(self.keepalive_idle_ms),
        }
    }

    /// `LISTEN_BACKLOG`, or the kernel's limit when it is not set.
    pub fn listen_backlog(&self) -> u32 {
        self.listen_backlog.unwrap_or_else(server::default_backlog)
    }

    /// `SHUTDOWN_GRACE_MS` as a duration.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
}

/// Whether `bind_addr` (a `BIND_ADDR` value) listens on the loopback interface only, where
/// nothing crosses a network: rules that depend on exposure (the plain-HTTP warning, refusing to
/// run without auth) ask this. Knows `127.0.0.0/8`, `::1` (also IPv4-mapped), `localhost` and
/// `localhost.`, with or without a port and brackets. Any other host name is not resolved and
/// counts as not loopback, and so do `0.0.0.0` and `[::]`, which listen on every interface.
pub fn is_loopback(bind_addr: &str) -> bool {
    let addr = bind_addr.trim();
    if let Ok(socket) = addr.parse::<SocketAddr>() {
        return socket.ip().to_canonical().is_loopback();
    }
    if let Ok(ip) = addr.parse::<IpAddr>() {
        return ip.to_canonical().is_loopback();
    }
    let host = match addr.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => addr,
    };
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if let Ok(ip) = host.parse::<IpAddr>() {
        return ip.to_canonical().is_loopback();
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    host.eq_ignore_ascii_case("localhost")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Config {
        Config::try_parse_from(std::iter::once("order-saga").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn loopback_addresses() {
        for addr in [
            "127.0.0.1:8080",
            "127.0.0.1:0",
            "127.1.2.3:80",
            "127.0.0.1",
            "[::1]:8080",
            "[::1]",
            "::1",
            "[::ffff:127.0.0.1]:8080",
            "localhost:8080",
            "localhost",
            "LocalHost:8080",
            "localhost.:8080",
            " 127.0.0.1:8080 ",
        ] {
            assert!(is_loopback(addr), "{addr} is loopback");
        }
    }

    #[test]
    fn addresses_that_reach_a_network() {
        for addr in [
            "0.0.0.0:8080",
            "0.0.0.0",
            "[::]:8080",
            "::",
            "192.168.1.10:8080",
            "10.0.0.1:80",
            "[2001:db8::1]:443",
            "[::ffff:10.0.0.1]:80",
            "example.com:8080",
            "myhost:8080",
            "localhost.example.com:8080",
            "notlocalhost:8080",
            "",
            ":8080",
        ] {
            assert!(!is_loopback(addr), "{addr} is not loopback");
        }
    }

    #[test]
    fn tls_settings_go_together() {
        let mut config = Config::try_parse_from(["order-saga"]).unwrap();
        config.tls_cert_file = None;
        config.tls_key_file = None;
        assert!(config.validate().is_ok());
        assert!(config.tls_files().is_none());
        config.tls_cert_file = Some("cert.pem".into());
        assert!(config.validate().unwrap_err().contains("TLS_KEY_FILE is not"));
        config.tls_key_file = Some("key.pem".into());
        assert!(config.validate().is_ok());
        assert_eq!(config.tls_files(), Some((Path::new("cert.pem"), Path::new("key.pem"))));
        config.tls_cert_file = Some("".into());
        assert!(config.validate().unwrap_err().contains("TLS_CERT_FILE is not"));
    }

    #[test]
    fn auth_is_off_only_on_loopback_or_on_purpose() {
        let secret = "--auth-jwt-secret=0123456789abcdef0123456789abcdef";
        assert!(config(&["--bind-addr", "127.0.0.1:8080"]).auth().unwrap().is_none());
        let refused = config(&["--bind-addr", "0.0.0.0:8080"]).auth().unwrap_err();
        assert!(refused.contains("without authentication"), "{refused}");
        assert!(config(&["--bind-addr", "0.0.0.0:8080", "--auth-disabled", "true"]).auth().unwrap().is_none());
        assert!(config(&["--bind-addr", "0.0.0.0:8080", secret]).auth().unwrap().is_some());
        assert!(config(&[secret, "--auth-disabled", "true"]).auth().is_err());
        assert!(config(&[secret, "--auth-jwt-jwks", "keys.json"]).auth().is_err());
        assert!(config(&["--auth-jwt-issuer", "https://issuer.example"]).auth().is_err());
    }

    #[test]
    fn secrets_do_not_print() {
        let c = config(&["--auth-jwt-secret=sekrit-sekrit-sekrit-sekrit-sekrit", "--metrics-token", "scrape-me"]);
        let printed = format!("{c:?}");
        assert!(!printed.contains("sekrit") && !printed.contains("scrape-me"), "{printed}");
    }
}
