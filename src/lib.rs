//! order-saga: places e-commerce orders across separate order and inventory databases with a
//! saga whose every decision is written to a durable log first.
//!
//! A guided tour, from the bottom up:

/// Startup: builds the app from its configuration, apart from serving it.
pub mod app;
/// Settings from environment variables and flags.
pub mod config;
/// Pools, URLs, migrations and database error classification for PostgreSQL and SQLite.
pub mod db;
/// The service's typed errors.
pub mod error;
/// Group commit for SQLite's single writer.
pub mod group_commit;
/// The HTTP API: routes, middleware, problem+json errors.
pub mod http;
/// Idempotency-Key records.
pub mod idempotency;
/// Inserts built by the module that owns a table and committed together with another's.
pub mod insert;
/// The inventory participant: products, stock and reservations.
pub mod inventory;
/// Embedded per-backend migrations.
pub mod migrate;
/// The order sagas and the order service.
pub mod orders;
/// The generic saga engine and its durable log.
pub mod saga;
/// A statement builder that numbers its own placeholders.
pub mod sql;
/// Logging setup.
pub mod telemetry;
