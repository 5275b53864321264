//! Startup: builds the application from its configuration (databases, engine, services, router)
//! apart from serving it, so that tests run it on their own listener and databases.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::serve::Listener;

use crate::auth::{KeyError, Verifier};
use crate::config::Config;
use crate::db::{Db, DbError, PoolSettings, normalize_url};
use crate::http::access::Access;
use crate::http::shed::Shed;
use crate::http::{self, AppState, HttpConfig};
use crate::inventory::Inventory;
use crate::live::Live;
use crate::metrics::Metrics;
use crate::orders::{self, Orders};
use crate::saga::{Engine, EngineConfig, FaultInjector};
use crate::server::{self, ConnectionLimits};

/// Why the application could not be built.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// A database could not be opened or prepared.
    #[error(transparent)]
    Db(#[from] DbError),
    /// Settings that cannot work together.
    #[error("{0}")]
    Config(String),
    /// The token keys could not be loaded.
    #[error("authentication keys: {0}")]
    Keys(#[from] KeyError),
}

/// A built application, ready to serve.
pub struct App {
    /// The router with its middleware.
    pub router: Router,
    /// The saga engine (its background loops are running).
    pub engine: Engine,
    /// The services, for callers that drive them directly.
    pub state: AppState,
    /// `HEADER_READ_TIMEOUT_MS` and `KEEPALIVE_IDLE_MS`, applied to every connection served.
    pub limits: ConnectionLimits,
    housekeeping: Vec<tokio::task::JoinHandle<()>>,
}

/// Connects the configured databases (applying migrations), builds the engine with both order
/// sagas and starts its recovery loop. `faults` is for tests.
pub async fn build(config: &Config, faults: Option<Arc<dyn FaultInjector>>) -> Result<App, StartupError> {
    let auth = config.auth().map_err(StartupError::Config)?;
    let verifier = auth.map(Verifier::load).transpose()?.map(Arc::new);
    let (log_url, log_backend) = normalize_url(&config.database_url)?;
    let inventory_url = config.inventory_database_url.clone().unwrap_or_else(|| config.database_url.clone());
    let (inv_url, inv_backend) = normalize_url(&inventory_url)?;
    if log_backend != inv_backend {
        return Err(DbError::MixedBackends.into());
    }
    let settings = PoolSettings { max_connections: config.db_max_connections, ..PoolSettings::default() };
    let log = Db::connect(&config.database_url, &settings).await?;
    let inventory_db = if inv_url == log_url { log.clone() } else { Db::connect(&inventory_url, &settings).await? };
    let mut databases = vec![log.clone()];
    if inv_url != log_url {
        databases.push(inventory_db.clone());
    }
    let metrics = config.metrics.then(|| Arc::new(Metrics::new()));
    let engine_config = EngineConfig {
        lease: Duration::from_millis(config.lease_ms),
        recovery_interval: Duration::from_millis(config.recovery_interval_ms),
        deadline: Duration::from_millis(config.saga_deadline_ms),
        stuck_after_attempts: config.stuck_after_attempts,
        backoff_base: Duration::from_millis(config.backoff_base_ms),
        backoff_cap: Duration::from_millis(config.backoff_cap_ms),
        metrics: metrics.clone(),
        ..EngineConfig::default()
    };
    let engine = Engine::new(
        log,
        HashMap::from([(orders::INVENTORY, inventory_db.clone())]),
        vec![orders::place_order::definition(), orders::cancel_order::definition()],
        engine_config,
        faults,
    );
    engine.start_background();
    let inventory = Inventory::new(inventory_db);
    let orders = Orders::new(engine.clone(), inventory.clone(), config.order_wait());
    let live = Live::start(engine.log_db().clone(), metrics.clone());
    if verifier.is_some() {
        orders.check_legacy_keys().await.map_err(|e| StartupError::Config(format!("reading idempotency keys: {e}")))?;
    }
    let access = Access { verifier: verifier.clone(), metrics_token: config.metrics_token.clone() };
    let shed = Shed::new(config.max_in_flight as usize, engine.clone(), metrics.clone());
    let state =
        AppState { orders: orders.clone(), inventory, engine: engine.clone(), databases, metrics, live, access, shed };
    let http_config = HttpConfig {
        request_timeout: Duration::from_millis(config.request_timeout_ms),
        cors_allow_origins: config.cors_allow_origins.clone(),
    };
    let router = http::router(state.clone(), &http_config);
    let ttl = Duration::from_secs(config.idempotency_ttl_secs);
    let authenticated = verifier.is_some();
    let mut housekeeping = vec![tokio::spawn(async move {
        let every = (ttl / 10).clamp(Duration::from_secs(1), Duration::from_secs(600));
        loop {
            tokio::time::sleep(every).await;
            match orders.purge_keys(ttl).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(purged = n, "purged expired idempotency records");
                    if authenticated {
                        let _ = orders.check_legacy_keys().await;
                    }
                }
                Err(error) => tracing::warn!(%error, "could not purge idempotency records"),
            }
        }
    })];
    housekeeping.extend(reload_keys_on_sighup(verifier));
    Ok(App { router, engine, state, limits: config.connection_limits(), housekeeping })
}

impl App {
    /// Serves on `listener` until `shutdown` resolves, then stops accepting, lets running steps
    /// end within `grace` and releases this instance's leases. The listener is a plain
    /// `tokio::net::TcpListener` or a [`crate::tls::TlsListener`]; each connection is held to
    /// [`App::limits`] ([`crate::server`]).
    pub async fn serve<L>(
        self,
        listener: L,
        shutdown: impl Future<Output = ()> + Send + 'static,
        grace: Duration,
    ) -> std::io::Result<()>
    where
        L: Listener,
        L::Addr: std::fmt::Debug,
    {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let server = server::serve(listener, self.router, self.limits, async move {
            let mut rx = stop_rx;
            let _ = rx.wait_for(|stop| *stop).await;
        });
        let server = tokio::spawn(server);
        shutdown.await;
        tracing::info!("shutting down: no new requests; letting running steps end");
        let _ = stop_tx.send(true);
        // Open event streams end now, so that they do not hold the drain for the whole grace.
        self.state.live.shutdown();
        self.housekeeping.iter().for_each(|task| task.abort());
        let drained = tokio::time::timeout(grace, server).await;
        self.engine.shutdown(grace).await;
        match drained {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(std::io::Error::other(join)),
            Err(_) => {
                tracing::warn!("open connections outlived the shutdown grace");
                Ok(())
            }
        }
    }
}

/// Re-reads the key files on every SIGHUP, so that a JWKS can be rotated without a restart. A
/// file that fails to load keeps the previous keys in force. Installed whatever the keys, so
/// that a `reload` sent to a service with nothing to reload does not terminate it.
fn reload_keys_on_sighup(verifier: Option<Arc<Verifier>>) -> Option<tokio::task::JoinHandle<()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(hangups) => hangups,
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGHUP: token keys will not be reloaded");
                return None;
            }
        };
        Some(tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                let Some(verifier) = &verifier else {
                    tracing::info!("SIGHUP: nothing to reload (authentication is off)");
                    continue;
                };
                match verifier.reload() {
                    Ok(keys) => tracing::info!(keys, "SIGHUP: reloaded the token keys"),
                    Err(error) => {
                        tracing::error!(%error, "SIGHUP: the token keys did not load; the previous ones stay")
                    }
                }
            }
        }))
    }
    #[cfg(not(unix))]
    {
        let _ = verifier;
        None
    }
}
