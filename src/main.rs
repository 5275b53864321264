//! The `order-saga` binary: read the configuration, set up logging, build, serve until SIGTERM
//! or Ctrl-C.

use std::process::ExitCode;

use clap::Parser;
use order_saga::{app, config::Config, db, telemetry};

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
    let listener = match tokio::net::TcpListener::bind(&config.bind_addr).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("order-saga: cannot listen on {}: {error}", config.bind_addr);
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(addr = %config.bind_addr, "order-saga listening");
    let served = app.serve(listener, shutdown_signal(), config.shutdown_grace()).await;
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

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
