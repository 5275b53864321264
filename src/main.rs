//! The `order-saga` binary: read the configuration, set up logging, build, serve until SIGTERM
//! or Ctrl-C.

use std::future::Future;
use std::process::ExitCode;

use clap::Parser;
use order_saga::config::{self, Config};
use order_saga::tls::{self, TlsListener};
use order_saga::{app, db, server, telemetry};

// The service allocates on every request and statement; mimalloc spends markedly less CPU on
// that than the system allocator (see bench/README.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    let telemetry = match telemetry::init(config.log_format, &config.rust_log, &config.traces()) {
        Ok(telemetry) => telemetry,
        Err(message) => {
            eprintln!("order-saga: {message}");
            return ExitCode::from(2);
        }
    };
    if let Err(message) = config.validate() {
        eprintln!("order-saga: {message}");
        return ExitCode::from(2);
    }
    // Before anything else starts: a certificate that cannot be served is a configuration error.
    let tls = match config.tls_files().map(|(cert, key)| tls::server_config(cert, key)).transpose() {
        Ok(tls) => tls,
        Err(error) => {
            eprintln!("order-saga: {error}");
            return ExitCode::from(2);
        }
    };
    // One process per SQLite file: hold its lock for the process's whole life.
    let mut locks = Vec::new();
    for url in [Some(&config.database_url), config.inventory_database_url.as_ref()].into_iter().flatten() {
        match db::InstanceLock::acquire(url) {
            Ok(lock) => locks.extend(lock),
            Err(error) => {
                eprintln!("order-saga: cannot start: {error}");
                return ExitCode::FAILURE;
            }
        }
    }
    let app = match app::build(&config, None).await {
        Ok(app) => app,
        Err(error) => {
            eprintln!("order-saga: cannot start: {error}");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = shutdown_signal();
    let listener = match server::bind(&config.bind_addr, config.listen_backlog()).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("order-saga: cannot listen on {}: {error}", config.bind_addr);
            return ExitCode::FAILURE;
        }
    };
    if tls.is_none() && !config::is_loopback(&config.bind_addr) {
        tracing::warn!(
            addr = %config.bind_addr,
            "serving plain HTTP on an address that is not loopback: bearer tokens and all data cross \
             the network in clear; set TLS_CERT_FILE and TLS_KEY_FILE (PEM) to serve HTTPS, or bind \
             127.0.0.1 behind a TLS-terminating proxy"
        );
    }
    // The bound address, not BIND_ADDR: with port 0 it says which port was chosen.
    let addr = listener.local_addr().map_or_else(|_| config.bind_addr.clone(), |a| a.to_string());
    tracing::info!(%addr, tls = tls.is_some(), "order-saga listening");
    let grace = config.shutdown_grace();
    let served = match tls {
        Some(tls) => app.serve(TlsListener::new(listener, tls), shutdown, grace).await,
        None => app.serve(listener, shutdown, grace).await,
    };
    // The last spans are exported by tasks of this runtime, which the flush waits for.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("order-saga: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C. The handlers are in place when this returns, not at the first
/// poll: a signal between the `listening` line and serving (a supervisor, a test) is then a
/// graceful shutdown instead of the default action, death without releasing leases.
#[cfg(unix)]
fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let term = received(signal(SignalKind::terminate()));
    let int = received(signal(SignalKind::interrupt()));
    async move {
        tokio::select! {
            _ = term => {},
            _ = int => {},
        }
    }
}

/// Waits for a signal registered beforehand; never, if it could not be.
#[cfg(unix)]
async fn received(signal: std::io::Result<tokio::signal::unix::Signal>) {
    match signal {
        Ok(mut signal) => {
            signal.recv().await;
        }
        Err(_) => std::future::pending::<()>().await,
    }
}

/// Resolves on Ctrl-C.
#[cfg(not(unix))]
fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
