//! Configuration: every setting is an environment variable and the same-named command-line flag.

use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::telemetry::TraceSettings;

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
    /// Most connections per PostgreSQL database (SQLite uses one).
    #[arg(long, env = "DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,
    /// Comma-separated origins browsers may call from (`*` for any); none by default.
    #[arg(long, env = "CORS_ALLOW_ORIGINS", value_delimiter = ',')]
    pub cors_allow_origins: Vec<String>,
    /// Whether to record metrics and serve them at `GET /metrics` (`false` turns both off).
    #[arg(long, env = "METRICS", default_value_t = true, action = clap::ArgAction::Set)]
    pub metrics: bool,
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
        if self.lease_ms < 30 {
            return Err("LEASE_MS must be at least 30".into());
        }
        Ok(())
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

    /// `SHUTDOWN_GRACE_MS` as a duration.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
}
