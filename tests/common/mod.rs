//! Test harness shared by the integration tests: a fresh database per test (a SQLite file by
//! default; a new PostgreSQL database when `TEST_DATABASE_URL` is set, and a second one on
//! `TEST_INVENTORY_DATABASE_URL` when that is set too), and the app served on port 0.
#![allow(dead_code, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use order_saga::app::{self, App};
use order_saga::config::Config;
use order_saga::db::redact;
use order_saga::http::AppState;
use order_saga::saga::{Engine, FaultInjector};
use serde_json::{Value, json};
use sqlx::Connection;

/// The URLs of a fresh log database and inventory database for one test.
#[derive(Debug, Clone)]
pub struct TestDatabases {
    pub url: String,
    pub inventory_url: Option<String>,
}

/// True when the suite runs against PostgreSQL.
pub fn on_postgres() -> bool {
    std::env::var("TEST_DATABASE_URL").is_ok_and(|u| !u.is_empty())
}

/// Creates fresh, empty databases for one test.
pub async fn fresh_databases() -> TestDatabases {
    match std::env::var("TEST_DATABASE_URL") {
        Ok(base) if !base.is_empty() => {
            let url = create_pg_database(&base).await;
            let inventory_url = match std::env::var("TEST_INVENTORY_DATABASE_URL") {
                Ok(inv) if !inv.is_empty() => Some(create_pg_database(&inv).await),
                _ => None,
            };
            TestDatabases { url, inventory_url }
        }
        _ => {
            let dir = std::env::temp_dir().join("order-saga-tests");
            std::fs::create_dir_all(&dir).expect("create the test directory");
            let file = dir.join(format!("{}.db", uuid::Uuid::new_v4()));
            let inventory_url = std::env::var("TEST_SQLITE_SEPARATE_INVENTORY")
                .is_ok()
                .then(|| dir.join(format!("{}-inventory.db", uuid::Uuid::new_v4())).display().to_string());
            TestDatabases { url: file.display().to_string(), inventory_url }
        }
    }
}

/// Creates a database named after a new UUID on the server of `base`, failing loudly if that
/// server cannot be reached: a PostgreSQL run never passes by skipping.
async fn create_pg_database(base: &str) -> String {
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(base)
        .await
        .unwrap_or_else(|e| panic!("TEST_DATABASE_URL is set but PostgreSQL at {} is unreachable: {e}", redact(base)));
    let name = format!("order_saga_test_{}", uuid::Uuid::new_v4().simple());
    sqlx::raw_sql(&format!("CREATE DATABASE {name}")).execute(&mut conn).await.expect("create the test database");
    conn.close().await.ok();
    let (head, query) = match base.split_once('?') {
        Some((h, q)) => (h, format!("?{q}")),
        None => (base, String::new()),
    };
    let server = match head.rfind('/') {
        Some(i) if i > "postgres://".len() => &head[..i],
        _ => head,
    };
    format!("{server}/{name}{query}")
}

/// A configuration for tests: the given databases, fast recovery, no env leaking in.
pub fn config(dbs: &TestDatabases) -> Config {
    let mut config = Config::try_parse_from(["order-saga"]).expect("defaults parse");
    config.database_url = dbs.url.clone();
    config.inventory_database_url = dbs.inventory_url.clone();
    config.bind_addr = "127.0.0.1:0".into();
    config.order_wait_ms = 5000;
    config.request_timeout_ms = 30000;
    config.saga_deadline_ms = 30000;
    config.stuck_after_attempts = 10;
    config.lease_ms = 10000;
    config.recovery_interval_ms = 200;
    config.db_max_connections = 16;
    config.cors_allow_origins = vec!["https://shop.example".into()];
    config
}

/// A running app on its own port and databases.
pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub state: AppState,
    pub engine: Engine,
    pub dbs: TestDatabases,
    pub config: Config,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

/// Spawns the app on fresh databases with the test configuration.
pub async fn spawn_app() -> TestApp {
    let dbs = fresh_databases().await;
    spawn_app_with(config(&dbs), None).await
}

/// Spawns the app with `config` and, optionally, a fault injector.
pub async fn spawn_app_with(config: Config, faults: Option<Arc<dyn FaultInjector>>) -> TestApp {
    let app: App = app::build(&config, faults).await.expect("the app builds");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
    let base = format!("http://{}", listener.local_addr().unwrap());
    let state = app.state.clone();
    let engine = app.engine.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let grace = config.shutdown_grace();
    let server = tokio::spawn(app.serve(
        listener,
        async {
            let _ = stopped.await;
        },
        grace,
    ));
    let client =
        reqwest::Client::builder().timeout(Duration::from_secs(60)).pool_max_idle_per_host(256).build().unwrap();
    let dbs = TestDatabases { url: config.database_url.clone(), inventory_url: config.inventory_database_url.clone() };
    TestApp { base, client, state, engine, dbs, config, stop: Some(stop), server: Some(server) }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client.post(self.url(path)).json(body).send().await.expect("POST is answered")
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.expect("GET is answered")
    }

    /// GETs `path` and returns its JSON body, asserting 200.
    pub async fn get_json(&self, path: &str) -> Value {
        let response = self.get(path).await;
        assert_eq!(response.status(), 200, "GET {path}");
        response.json().await.unwrap()
    }

    pub async fn create_product(&self, id: &str, price_cents: i64, stock: i64) -> Value {
        let response = self
            .post(
                "/products",
                &json!({"id": id, "name": format!("Product {id}"), "price_cents": price_cents, "stock": stock}),
            )
            .await;
        assert_eq!(response.status(), 201, "create product {id}");
        response.json().await.unwrap()
    }

    /// POSTs an order with the given (product, quantity) lines and optional key.
    pub async fn place_order(&self, customer: &str, items: &[(&str, i64)], key: Option<&str>) -> reqwest::Response {
        let body = order_body(customer, items);
        let mut request = self.client.post(self.url("/orders")).json(&body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        request.send().await.expect("POST /orders is answered")
    }

    /// Stops serving and shuts the engine down gracefully.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
    }
}

pub fn order_body(customer: &str, items: &[(&str, i64)]) -> Value {
    json!({
        "customer_id": customer,
        "items": items.iter().map(|(p, q)| json!({"product_id": p, "quantity": q})).collect::<Vec<_>>(),
    })
}

/// Waits until `check` holds, polling, for up to `timeout`; panics with `what` otherwise.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks the stock invariant of docs/design.md for every product: available + reserved + sold =
/// `added` (stock ever added), none negative, and (when `settled`) nothing reserved.
pub async fn assert_stock_invariants(app: &TestApp, added: &[(&str, i64)], settled: bool) {
    for (id, total) in added {
        let p = app.get_json(&format!("/products/{id}")).await;
        let (a, r, s) =
            (p["available"].as_i64().unwrap(), p["reserved"].as_i64().unwrap(), p["sold"].as_i64().unwrap());
        assert!(a >= 0 && r >= 0 && s >= 0, "negative stock on {id}: {p}");
        assert_eq!(a + r + s, *total, "available + reserved + sold of {id}: {p}");
        if settled {
            assert_eq!(r, 0, "stock still reserved on {id}: {p}");
        }
    }
}

/// The (available, reserved, sold) of each product of `products` (id, stock added).
pub async fn stock_levels(app: &TestApp, products: &[(&str, i64)]) -> Vec<(i64, i64, i64)> {
    let mut stock = Vec::new();
    for (id, _) in products {
        let p = app.state.inventory.get(id).await.unwrap();
        stock.push((p.available, p.reserved, p.sold));
    }
    stock
}

/// A free port on loopback, for a binary told to listen on it.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A command for the `order-saga` binary with no configuration inherited from the environment.
pub fn binary_command() -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_order-saga"));
    for var in [
        "DATABASE_URL",
        "INVENTORY_DATABASE_URL",
        "BIND_ADDR",
        "RUST_LOG",
        "LOG_FORMAT",
        "TLS_CERT_FILE",
        "TLS_KEY_FILE",
        "AUTH_JWT_SECRET",
        "AUTH_JWT_PUBLIC_KEY",
        "AUTH_JWT_JWKS",
        "AUTH_JWT_ISSUER",
        "AUTH_JWT_AUDIENCE",
        "AUTH_DISABLED",
        "METRICS_TOKEN",
        "CORS_ALLOW_ORIGINS",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "MAX_IN_FLIGHT",
        "HEADER_READ_TIMEOUT_MS",
        "KEEPALIVE_IDLE_MS",
        "LISTEN_BACKLOG",
        "ORDER_WAIT_MS",
        "REQUEST_TIMEOUT_MS",
        "DB_MAX_CONNECTIONS",
    ] {
        command.env_remove(var);
    }
    command
}

/// One HTTP/1.1 answer as it came over a raw socket, for the suites that write requests byte
/// by byte (early answers, hostile inputs).
#[derive(Debug)]
pub struct RawAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawAnswer {
    /// The first header named `name`, in any case.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}
