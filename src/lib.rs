//! order-saga: places e-commerce orders across separate order and inventory databases with a
//! saga whose every decision is written to a durable log first. What it guarantees, and the
//! rules the comments cite ("rule 4"), are in `docs/design.md`.
//!
//! # Layout: one `POST /orders`, from the request down to the SQL
//!
//! 1. [`http`] checks the caller's bearer token ([`http::access`], with [`auth`]) and routes it
//!    to `http::orders::place`, which validates the body into an
//!    [`orders::PlaceOrder`] and knows no SQL; [`http::problem`] is the one place where errors
//!    ([`error::Error`], and the [`error::FailureCode`] of a rejected order) become HTTP.
//! 2. [`orders::Orders::place`] builds the pending order and the saga's input and asks the
//!    engine to write them ahead together with the [`idempotency`] record
//!    ([`saga::Engine::start`]: one transaction, group-committed on SQLite by
//!    [`group_commit`], its rows combined into one round trip by [`insert`]).
//! 3. The engine ([`saga`], which knows nothing about orders) launches the saga in its own task:
//!    the driver moves it step by step through [`orders::place_order::definition`], running
//!    steps in the inventory's database ([`inventory`]) and in the log database
//!    ([`orders::store`]), recording every event through the state machine of [`saga::state`]
//!    into the log ([`saga::log`]).
//! 4. The handler waits for the saga to settle (up to `ORDER_WAIT_MS`) and answers 201, 409 /
//!    422 or 202.
//!
//! Underneath: [`db`] opens the pools and tells the backends apart, [`migrate`] applies each
//! backend's schema, [`sql`] builds statements whose placeholders it numbers itself. [`app`]
//! wires it all from [`config`]; `main.rs` only reads the configuration and serves.
//!
//! The modules, from the bottom up:

/// Startup: builds the app from its configuration, apart from serving it.
pub mod app;
/// Bearer tokens: verifying a caller's JWT into a principal.
pub mod auth;
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
/// Every input limit of the API, one constant each, as `openapi.yaml` states them.
pub mod limits;
/// Live progress: the one poller per instance behind the event streams.
pub mod live;
/// The service's metrics, in the Prometheus text format.
pub mod metrics;
/// Embedded per-backend migrations.
pub mod migrate;
/// The order sagas and the order service.
pub mod orders;
/// The generic saga engine and its durable log.
pub mod saga;
/// The listening socket and the accept loop: connection limits and graceful shutdown.
pub mod server;
/// A statement builder that numbers its own placeholders.
pub mod sql;
/// Logging setup.
pub mod telemetry;
/// Optional HTTPS on the listener: the certificate, the key and a listener for `axum::serve`.
pub mod tls;
