//! Chaos against the real binary (issue 3): SIGKILL and restart under load, two instances on one
//! PostgreSQL database with one of them killed again and again, an outage of the inventory
//! server, SIGTERM under load, database connections cut right after a COMMIT. Clients re-send
//! every request whose answer was lost with the same Idempotency-Key until it gets a final
//! answer; at the end nothing a client was told is lost or contradicted, and the invariants of
//! docs/design.md hold.
//!
//! The binary is configured only through environment variables. The PostgreSQL-only tests are
//! ignored by default and fail loudly when run without the environment they need: they never
//! pass by skipping.
mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::TestDatabases;
use reqwest::Method;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_order-saga");

/// `LEASE_MS`: short, so that a killed instance's sagas are taken over quickly.
const LEASE_MS: u64 = 1000;
/// `RECOVERY_INTERVAL_MS`.
const RECOVERY_INTERVAL_MS: u64 = 100;
/// `ORDER_WAIT_MS` of the load tests: shorter than a takeover, so that some answers are 202s the
/// clients re-poll.
const ORDER_WAIT_MS: u64 = 500;
/// `REQUEST_TIMEOUT_MS` of the load tests.
const REQUEST_TIMEOUT_MS: u64 = 5000;
/// `SHUTDOWN_GRACE_MS`.
const SHUTDOWN_GRACE_MS: u64 = 2000;
/// How long a client keeps re-sending one request before the test fails.
const REQUEST_CAP: Duration = Duration::from_secs(30);
/// How long recovery may take to settle everything at the end before the test fails.
const SETTLE_CAP: Duration = Duration::from_secs(30);
/// Concurrent clients of the load tests.
const CLIENTS: usize = 16;
/// Most orders one client places (it stops earlier once the chaos is over).
const MAX_ORDERS_PER_CLIENT: usize = 150;

#[derive(Debug, Clone, Copy)]
struct Product {
    id: &'static str,
    price: i64,
    stock: i64,
}

const SCARCE: [Product; 2] =
    [Product { id: "scarce-a", price: 700, stock: 24 }, Product { id: "scarce-b", price: 1100, stock: 12 }];
const PLENTY: [Product; 3] = [
    Product { id: "plenty-1", price: 250, stock: 1_000_000 },
    Product { id: "plenty-2", price: 399, stock: 1_000_000 },
    Product { id: "plenty-3", price: 1999, stock: 1_000_000 },
];
/// The product whose commit the outage test holds up.
const SLOW: Product = Product { id: "slow", price: 4200, stock: 10 };
/// Sorts after every real product, so that the saga reserves the others before failing on it.
const MISSING: &str = "zz-missing";

fn catalogue_price(id: &str) -> Option<i64> {
    SCARCE.iter().chain(PLENTY.iter()).chain([SLOW].iter()).find(|p| p.id == id).map(|p| p.price)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty())
}

/// Panics unless every named variable is set: a test that needs PostgreSQL never passes by
/// skipping.
fn require_env(test: &str, names: &[&str]) {
    let missing: Vec<&str> = names.iter().copied().filter(|n| !env_set(n)).collect();
    assert!(
        missing.is_empty(),
        "{test} needs {missing:?} (PostgreSQL; see the #[ignore] reason); it refuses to pass by skipping"
    );
}

/// The inventory-outage test stops the inventory server; the other tests of this file that use
/// it hold this lock shared, that one exclusively, so that none of them runs during the outage.
async fn inventory_server_lock(exclusive: bool) -> Option<std::fs::File> {
    if !env_set("TEST_INVENTORY_DATABASE_URL") {
        return None;
    }
    let path = std::env::temp_dir().join("order-saga-chaos-inventory-server.lock");
    let file = tokio::task::spawn_blocking(move || {
        let file =
            std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).expect("open the lock");
        if exclusive { file.lock() } else { file.lock_shared() }.expect("take the lock");
        file
    })
    .await
    .unwrap();
    Some(file)
}

// ---------------------------------------------------------------------------------------------
// The binary.
// ---------------------------------------------------------------------------------------------

/// One `order-saga` process, restartable on the same databases. Clients read its current base
/// URL from `base`, which follows restarts. Dropping it SIGKILLs and reaps the process; when the
/// test is failing it also prints the end of the process's logs.
struct Instance {
    name: &'static str,
    env: Vec<(String, String)>,
    child: Option<Child>,
    base: Arc<Mutex<String>>,
    logs: Vec<PathBuf>,
    starts: usize,
}

impl Instance {
    /// An instance on `dbs` with the chaos settings, `overrides` replacing or adding variables.
    fn new(name: &'static str, dbs: &TestDatabases, overrides: &[(&str, String)]) -> Instance {
        let mut env: Vec<(String, String)> = vec![
            ("DATABASE_URL".into(), dbs.url.clone()),
            ("LEASE_MS".into(), LEASE_MS.to_string()),
            ("RECOVERY_INTERVAL_MS".into(), RECOVERY_INTERVAL_MS.to_string()),
            ("ORDER_WAIT_MS".into(), ORDER_WAIT_MS.to_string()),
            ("REQUEST_TIMEOUT_MS".into(), REQUEST_TIMEOUT_MS.to_string()),
            ("SHUTDOWN_GRACE_MS".into(), SHUTDOWN_GRACE_MS.to_string()),
            ("DB_MAX_CONNECTIONS".into(), "8".into()),
            ("RUST_LOG".into(), "warn".into()),
        ];
        if let Some(inventory) = &dbs.inventory_url {
            env.push(("INVENTORY_DATABASE_URL".into(), inventory.clone()));
        }
        for (name, value) in overrides {
            env.retain(|(n, _)| n != name);
            env.push((name.to_string(), value.clone()));
        }
        Instance {
            name,
            env,
            child: None,
            base: Arc::new(Mutex::new("http://127.0.0.1:9".into())),
            logs: Vec::new(),
            starts: 0,
        }
    }

    fn base(&self) -> String {
        self.base.lock().unwrap().clone()
    }

    /// Spawns the process on `port`, its output going to a new log file; returns that file.
    fn spawn(&mut self, port: u16) -> PathBuf {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let dir = std::env::temp_dir().join("order-saga-tests");
        std::fs::create_dir_all(&dir).unwrap();
        let log =
            dir.join(format!("chaos-{}-{}-{}.log", self.name, self.logs.len() + 1, uuid::Uuid::new_v4().simple()));
        let file = std::fs::File::create(&log).expect("create the log file");
        self.logs.push(log.clone());
        let mut command = Command::new(BIN);
        command.env_clear().envs(self.env.iter().map(|(n, v)| (n.as_str(), v.as_str())));
        command.env("BIND_ADDR", format!("127.0.0.1:{port}"));
        command.stdin(Stdio::null()).stdout(file.try_clone().unwrap()).stderr(file);
        self.child = Some(command.spawn().expect("spawn order-saga"));
        log
    }

    /// Starts the process and SIGKILLs it `after` that long, whether it is serving yet or not:
    /// a crash during start-up or during its first recovery pass.
    async fn start_and_crash(&mut self, after: Duration) {
        self.spawn(free_port());
        tokio::time::sleep(after).await;
        self.kill();
    }

    /// Starts the process on a fresh port and waits until it answers `/healthz`.
    async fn start(&mut self) {
        for attempt in 1..=5 {
            let port = free_port();
            let log = self.spawn(port);
            let base = format!("http://127.0.0.1:{port}");
            match self.wait_healthy(&base).await {
                Ok(()) if self.running() => {
                    *self.base.lock().unwrap() = base;
                    self.starts += 1;
                    return;
                }
                Ok(()) => {
                    // Someone else answered on that port and ours could not listen.
                    let status = self.child.take().unwrap().wait().unwrap();
                    let output = std::fs::read_to_string(&log).unwrap_or_default();
                    assert!(
                        attempt < 5 && output.contains("cannot listen"),
                        "{} exited ({status}):\n{output}",
                        self.name
                    );
                }
                Err(status) => {
                    self.child = None;
                    let output = std::fs::read_to_string(&log).unwrap_or_default();
                    // Another process may have taken the free port meanwhile: try another.
                    if output.contains("cannot listen") && attempt < 5 {
                        continue;
                    }
                    panic!("{} exited at start ({status}):\n{output}", self.name);
                }
            }
        }
    }

    async fn wait_healthy(&mut self, base: &str) -> Result<(), ExitStatus> {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client.get(format!("{base}/healthz")).send().await
                && r.status() == 200
            {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return Err(status);
            }
            if Instant::now() > deadline {
                self.kill();
                panic!("{} never became healthy", self.name);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// SIGKILL, then reap (so that a SQLite file's instance lock is free again).
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }

    /// SIGTERM, then wait up to `within` for the exit status (SIGKILL and panic past it).
    async fn terminate(&mut self, within: Duration) -> ExitStatus {
        let pid = self.child.as_ref().expect("running").id();
        let sent = Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
        assert!(sent.success(), "kill -TERM {pid}");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return status;
            }
            if Instant::now() > deadline {
                self.kill();
                panic!("{} did not exit within {within:?} of SIGTERM", self.name);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            for log in self.logs.iter().rev().take(3).rev() {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(40)..].join("\n");
                eprintln!("---- end of {} ({} lines) ----\n{tail}", log.display(), lines.len());
            }
        } else {
            for log in &self.logs {
                std::fs::remove_file(log).ok();
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Clients.
// ---------------------------------------------------------------------------------------------

/// What a client was told about an order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// 202: the order exists, its saga still runs.
    Pending,
    /// 201.
    Confirmed,
    /// 200 from a cancel.
    Cancelled,
    /// 409 / 422 with this code.
    Rejected(String),
}

#[derive(Debug, Clone)]
struct Told {
    key: String,
    order_id: String,
    outcome: Outcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Only plentiful products: always confirmed.
    Plenty,
    /// A scarce product (and maybe a plentiful one): confirmed or insufficient_stock.
    Scarce,
    /// A product that does not exist: unknown_product.
    Unknown,
}

struct Reply {
    status: u16,
    body: Value,
    replayed: bool,
    problem_json: bool,
}

impl Reply {
    fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }
}

/// Shared by the clients of one test: where to send, when to stop, what happened.
struct Load {
    client: reqwest::Client,
    targets: Vec<Arc<Mutex<String>>>,
    stop: AtomicBool,
    active: AtomicUsize,
    lost: AtomicUsize,
    repolled: AtomicUsize,
    unavailable: AtomicUsize,
    replays: AtomicUsize,
    cancels: AtomicUsize,
    failures: Mutex<Vec<String>>,
    told: Mutex<Vec<Told>>,
}

impl Load {
    fn new(targets: Vec<Arc<Mutex<String>>>, timeout: Duration) -> Arc<Load> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(2))
            .pool_max_idle_per_host(64)
            .build()
            .unwrap();
        Arc::new(Load {
            client,
            targets,
            stop: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            lost: AtomicUsize::new(0),
            repolled: AtomicUsize::new(0),
            unavailable: AtomicUsize::new(0),
            replays: AtomicUsize::new(0),
            cancels: AtomicUsize::new(0),
            failures: Mutex::new(Vec::new()),
            told: Mutex::new(Vec::new()),
        })
    }

    fn fail(&self, message: String) {
        eprintln!("FAILURE: {message}");
        self.failures.lock().unwrap().push(message);
    }

    /// A target at random; after a lost answer, another one when there are several.
    fn pick(&self, avoid: Option<usize>) -> usize {
        let n = self.targets.len();
        match avoid {
            Some(a) if n > 1 => (a + 1 + fastrand::usize(..n - 1)) % n,
            _ => fastrand::usize(..n),
        }
    }

    async fn send(
        &self,
        target: usize,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<Reply, String> {
        let base = self.targets[target].lock().unwrap().clone();
        let mut request = self.client.request(method, format!("{base}{path}"));
        if let Some(body) = body {
            request = request.json(body);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.map_err(|e| {
            // A dead process refuses or resets at once; a live one answers within its
            // REQUEST_TIMEOUT_MS, below the client's timeout. Silence is a failure.
            if e.is_timeout() {
                self.fail(format!("{path}: no answer within the client timeout: {e}"));
            }
            format!("{e:?}")
        })?;
        let status = response.status().as_u16();
        let replayed = response.headers().get("idempotent-replayed").is_some_and(|v| v == "true");
        let problem_json = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
        let bytes = response.bytes().await.map_err(|e| {
            if e.is_timeout() {
                self.fail(format!("{path}: the body did not arrive within the client timeout: {e}"));
            }
            format!("{e:?}")
        })?;
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Ok(Reply { status, body, replayed, problem_json })
    }

    /// An error answer must be problem+json with a code; a 503 one we re-poll.
    fn check_error_shape(&self, what: &str, reply: &Reply) -> bool {
        if reply.status >= 400 && (!reply.problem_json || reply.code().is_empty()) {
            self.fail(format!("{what}: {} without a problem+json body: {}", reply.status, reply.body));
            return false;
        }
        if reply.status == 503 && !matches!(reply.code(), "database_unavailable" | "request_timeout") {
            self.fail(format!("{what}: 503 with an unexpected code: {}", reply.body));
            return false;
        }
        true
    }
}

async fn pause(attempt: u32) {
    let ms = (20u64 << attempt.min(4)).min(300);
    tokio::time::sleep(Duration::from_millis(ms / 2 + fastrand::u64(..=ms / 2))).await;
}

fn order_body(key: &str, items: &[(String, i64)]) -> Value {
    json!({
        "customer_id": key,
        "items": items.iter().map(|(p, q)| json!({"product_id": p, "quantity": q})).collect::<Vec<_>>(),
    })
}

/// Checks an order body against what was asked: its customer and its lines.
fn check_lines(body: &Value, key: &str, items: &[(String, i64)]) -> Result<(), String> {
    if body["customer_id"] != key {
        return Err(format!("customer_id is not {key:?}: {body}"));
    }
    let mut asked: Vec<(String, i64)> = items.to_vec();
    asked.sort();
    let lines = body["items"].as_array().ok_or_else(|| format!("no items: {body}"))?;
    let got: Vec<(String, i64)> = lines
        .iter()
        .map(|l| (l["product_id"].as_str().unwrap_or("").to_string(), l["quantity"].as_i64().unwrap_or(-1)))
        .collect();
    if got != asked {
        return Err(format!("items {got:?} differ from the request's {asked:?}: {body}"));
    }
    Ok(())
}

/// Checks a confirmed (or cancelled) order's prices and total against the catalogue.
fn check_priced(body: &Value) -> Result<(), String> {
    let lines = body["items"].as_array().ok_or_else(|| format!("no items: {body}"))?;
    let mut total = 0;
    for l in lines {
        let product = l["product_id"].as_str().unwrap_or("");
        let price = catalogue_price(product).ok_or_else(|| format!("unknown product in a placed order: {body}"))?;
        if l["unit_price_cents"] != price {
            return Err(format!("unit price of {product} is not {price}: {body}"));
        }
        total += price * l["quantity"].as_i64().unwrap_or(0);
    }
    if body["total_cents"] != total {
        return Err(format!("total_cents is not {total}: {body}"));
    }
    Ok(())
}

/// Places an order with `key`, re-sending it with the same key until it gets a final answer.
/// With `respond_async` every send asks `Prefer: respond-async`. `None` once a failure is
/// recorded.
async fn place(load: &Load, key: &str, items: &[(String, i64)], kind: Kind, respond_async: bool) -> Option<Told> {
    let body = order_body(key, items);
    let mut headers = vec![("Idempotency-Key", key)];
    if respond_async {
        headers.push(("Prefer", "respond-async"));
    }
    let started = Instant::now();
    let mut order_id: Option<String> = None;
    let mut accepted = false;
    // Once any answer showed the order confirmed, it must end confirmed.
    let mut seen_confirmed = false;
    let mut avoid = None;
    let mut attempt = 0;
    let mut last = String::from("none");
    loop {
        if started.elapsed() > REQUEST_CAP {
            load.fail(format!("order {key}: no final answer within {REQUEST_CAP:?}; the last answer: {last}"));
            return None;
        }
        attempt += 1;
        let target = load.pick(avoid);
        let reply = match load.send(target, Method::POST, "/orders", Some(&body), &headers).await {
            Ok(reply) => reply,
            Err(_) => {
                // The answer was lost: the order may or may not exist. Ask again, same key.
                load.lost.fetch_add(1, Ordering::Relaxed);
                avoid = Some(target);
                pause(attempt).await;
                continue;
            }
        };
        avoid = None;
        last = format!("{} {}", reply.status, reply.body);
        let what = format!("order {key}");
        if !load.check_error_shape(&what, &reply) {
            return None;
        }
        if reply.status == 503 {
            load.unavailable.fetch_add(1, Ordering::Relaxed);
            pause(attempt).await;
            continue;
        }
        if accepted && !reply.replayed {
            load.fail(format!("{what}: an answer after a 202 is not marked Idempotent-Replayed: {}", reply.status));
        }
        let named = match reply.status {
            201 | 202 => reply.body["id"].as_str(),
            409 | 422 => reply.body["order_id"].as_str(),
            _ => None,
        };
        if let Some(id) = named {
            match &order_id {
                Some(known) if known != id => {
                    load.fail(format!("{what}: was order {known}, now answered as order {id}"));
                    return None;
                }
                _ => order_id = Some(id.to_string()),
            }
        }
        let told = |outcome| match &order_id {
            Some(id) => Some(Told { key: key.to_string(), order_id: id.clone(), outcome }),
            None => {
                load.fail(format!("order {key}: a final answer names no order: {}", reply.body));
                None
            }
        };
        match reply.status {
            202 => {
                // The first respond-async answer is 202 whatever the saga has done meanwhile.
                let fresh_async = respond_async && !reply.replayed;
                let status = reply.body["status"].as_str().unwrap_or("");
                if !(status == "pending" || (fresh_async && status == "confirmed" && kind != Kind::Unknown)) {
                    load.fail(format!("{what}: 202 with an order that is {status:?}: {}", reply.body));
                    return None;
                }
                if seen_confirmed && status == "pending" {
                    load.fail(format!("{what}: confirmed, then pending again: {}", reply.body));
                    return None;
                }
                seen_confirmed |= status == "confirmed";
                if let Err(e) = check_lines(&reply.body, key, items) {
                    load.fail(format!("{what}: {e}"));
                }
                accepted = true;
                load.repolled.fetch_add(1, Ordering::Relaxed);
                // A waiting replay waits up to ORDER_WAIT_MS for the saga; an async one does not.
                if respond_async {
                    pause(2).await;
                }
            }
            201 => {
                if kind == Kind::Unknown || reply.body["status"] != "confirmed" {
                    load.fail(format!("{what} ({kind:?}): unexpected 201: {}", reply.body));
                    return None;
                }
                if let Err(e) = check_lines(&reply.body, key, items).and_then(|()| check_priced(&reply.body)) {
                    load.fail(format!("{what}: {e}"));
                }
                return told(Outcome::Confirmed);
            }
            409 | 422 if seen_confirmed => {
                load.fail(format!("{what}: told confirmed, then rejected: {}", reply.body));
                return None;
            }
            409 if kind == Kind::Scarce && reply.code() == "insufficient_stock" => {
                let product = reply.body["product_id"].as_str().unwrap_or("");
                if !SCARCE.iter().any(|p| p.id == product) {
                    load.fail(format!("{what}: insufficient stock of a plentiful product: {}", reply.body));
                }
                return told(Outcome::Rejected("insufficient_stock".into()));
            }
            422 if kind == Kind::Unknown && reply.code() == "unknown_product" => {
                if reply.body["product_id"] != MISSING {
                    load.fail(format!("{what}: unknown_product names the wrong product: {}", reply.body));
                }
                return told(Outcome::Rejected("unknown_product".into()));
            }
            _ => {
                load.fail(format!("{what} ({kind:?}): unexpected answer {}: {}", reply.status, reply.body));
                return None;
            }
        }
        if order_id.is_none() {
            load.fail(format!("{what}: an answer names no order: {}", reply.body));
            return None;
        }
    }
}

/// Sends the same request again, through any instance, once it has a final answer: the answer
/// must be the same, marked as a replay.
async fn replay(load: &Load, told: &Told, items: &[(String, i64)]) {
    let body = order_body(&told.key, items);
    let what = format!("replay of {}", told.key);
    let started = Instant::now();
    let mut avoid = None;
    let mut attempt = 0;
    let reply = loop {
        if started.elapsed() > REQUEST_CAP {
            return load.fail(format!("{what}: no answer within {REQUEST_CAP:?}"));
        }
        attempt += 1;
        let target = load.pick(avoid);
        match load.send(target, Method::POST, "/orders", Some(&body), &[("Idempotency-Key", &told.key)]).await {
            Err(_) => {
                load.lost.fetch_add(1, Ordering::Relaxed);
                avoid = Some(target);
                pause(attempt).await;
            }
            Ok(reply) if reply.status == 503 => {
                if !load.check_error_shape(&what, &reply) {
                    return;
                }
                load.unavailable.fetch_add(1, Ordering::Relaxed);
                pause(attempt).await;
            }
            Ok(reply) => break reply,
        }
    };
    load.replays.fetch_add(1, Ordering::Relaxed);
    let (status, id) = match &told.outcome {
        Outcome::Confirmed => (201, reply.body["id"].as_str()),
        Outcome::Rejected(code) if code == "unknown_product" => (422, reply.body["order_id"].as_str()),
        Outcome::Rejected(_) => (409, reply.body["order_id"].as_str()),
        other => return load.fail(format!("{what}: no replay check for {other:?}")),
    };
    if reply.status != status || id != Some(told.order_id.as_str()) || !reply.replayed {
        load.fail(format!(
            "{what}: told {:?} (order {}), the replay answered {} replayed={}: {}",
            told.outcome, told.order_id, reply.status, reply.replayed, reply.body
        ));
    }
    if status == 201 && reply.body["status"] != "confirmed" {
        load.fail(format!("{what}: the confirmed order is no longer confirmed: {}", reply.body));
    }
}

/// Cancels a confirmed order, re-sending until it answers 200 cancelled.
async fn cancel(load: &Load, told: &mut Told) {
    let path = format!("/orders/{}/cancel", told.order_id);
    let what = format!("cancel of {} ({})", told.key, told.order_id);
    let started = Instant::now();
    let mut avoid = None;
    let mut attempt = 0;
    let mut last = String::from("none");
    loop {
        if started.elapsed() > REQUEST_CAP {
            return load.fail(format!("{what}: no final answer within {REQUEST_CAP:?}; the last answer: {last}"));
        }
        attempt += 1;
        let target = load.pick(avoid);
        let reply = match load.send(target, Method::POST, &path, None, &[]).await {
            Ok(reply) => reply,
            Err(_) => {
                load.lost.fetch_add(1, Ordering::Relaxed);
                avoid = Some(target);
                pause(attempt).await;
                continue;
            }
        };
        avoid = None;
        last = format!("{} {}", reply.status, reply.body);
        if !load.check_error_shape(&what, &reply) {
            return;
        }
        match reply.status {
            503 => {
                load.unavailable.fetch_add(1, Ordering::Relaxed);
                pause(attempt).await;
            }
            202 if reply.body["id"] == told.order_id.as_str()
                && matches!(reply.body["status"].as_str(), Some("confirmed" | "cancelled")) =>
            {
                load.repolled.fetch_add(1, Ordering::Relaxed);
            }
            200 if reply.body["id"] == told.order_id.as_str() && reply.body["status"] == "cancelled" => {
                load.cancels.fetch_add(1, Ordering::Relaxed);
                told.outcome = Outcome::Cancelled;
                return;
            }
            _ => return load.fail(format!("{what}: unexpected answer {}: {}", reply.status, reply.body)),
        }
    }
}

/// Reads the order back through any instance: it must be as the client was told.
async fn read_back(load: &Load, told: &Told) {
    let path = format!("/orders/{}", told.order_id);
    let what = format!("GET {path} ({})", told.key);
    let started = Instant::now();
    let mut avoid = None;
    let mut attempt = 0;
    let reply = loop {
        if started.elapsed() > REQUEST_CAP {
            return load.fail(format!("{what}: no answer within {REQUEST_CAP:?}"));
        }
        attempt += 1;
        let target = load.pick(avoid);
        match load.send(target, Method::GET, &path, None, &[]).await {
            Err(_) => {
                load.lost.fetch_add(1, Ordering::Relaxed);
                avoid = Some(target);
                pause(attempt).await;
            }
            Ok(reply) if reply.status == 503 => {
                if !load.check_error_shape(&what, &reply) {
                    return;
                }
                pause(attempt).await;
            }
            Ok(reply) => break reply,
        }
    };
    let expected = match &told.outcome {
        Outcome::Confirmed => "confirmed",
        Outcome::Cancelled => "cancelled",
        Outcome::Rejected(_) => "rejected",
        Outcome::Pending => return,
    };
    let code_ok = match &told.outcome {
        Outcome::Rejected(code) => reply.body["failure"]["code"] == code.as_str(),
        _ => true,
    };
    if reply.status != 200 || reply.body["status"] != expected || !code_ok {
        load.fail(format!("{what}: told {:?}, read {}: {}", told.outcome, reply.status, reply.body));
    }
}

/// A concurrent duplicate's answer agrees with the final answer of its twin.
fn check_duplicate(load: &Load, told: &Told, reply: &Reply) {
    let named = reply.body["id"].as_str().or(reply.body["order_id"].as_str());
    let consistent = match (reply.status, &told.outcome) {
        (503, _) => true,
        (202, _) => reply.body["status"] != "rejected",
        (201, Outcome::Confirmed) => reply.body["status"] == "confirmed",
        (409 | 422, Outcome::Rejected(code)) => reply.code() == code,
        _ => false,
    };
    if !consistent || (reply.status != 503 && named != Some(told.order_id.as_str())) {
        load.fail(format!(
            "concurrent duplicate of {}: told {:?} (order {}), the duplicate got {}: {}",
            told.key, told.outcome, told.order_id, reply.status, reply.body
        ));
    }
    load.replays.fetch_add(1, Ordering::Relaxed);
}

fn pick_items(rng: &mut fastrand::Rng) -> (Kind, Vec<(String, i64)>) {
    let plenty = |rng: &mut fastrand::Rng| PLENTY[rng.usize(..PLENTY.len())].id.to_string();
    let roll = rng.f64();
    if roll < 0.4 {
        let mut items = vec![(SCARCE[rng.usize(..SCARCE.len())].id.to_string(), rng.i64(1..=3))];
        if rng.bool() {
            items.push((plenty(rng), rng.i64(1..=2)));
        }
        (Kind::Scarce, items)
    } else if roll < 0.5 {
        (Kind::Unknown, vec![(plenty(rng), 1), (MISSING.to_string(), 1)])
    } else {
        let first = plenty(rng);
        let mut items = vec![(first.clone(), rng.i64(1..=3))];
        let second = plenty(rng);
        if second != first {
            items.push((second, rng.i64(1..=3)));
        }
        (Kind::Plenty, items)
    }
}

/// One client: places orders (each with a fresh key) until told to stop, replays some, cancels
/// some of the confirmed ones and reads some back. Every request is followed to a final answer.
async fn client(load: Arc<Load>, index: usize) {
    load.active.fetch_add(1, Ordering::SeqCst);
    let mut rng = fastrand::Rng::new();
    let mut n = 0;
    while !load.stop.load(Ordering::SeqCst) && n < MAX_ORDERS_PER_CLIENT {
        n += 1;
        let key = format!("c{index:02}-{n:03}-{}", uuid::Uuid::new_v4().simple());
        let (kind, items) = pick_items(&mut rng);
        let respond_async = rng.f64() < 0.2;
        let told = if rng.f64() < 0.1 {
            // A concurrent duplicate: the same request at the same time, maybe to another
            // instance. It must tell the same story.
            let duplicate = async {
                let mut headers = vec![("Idempotency-Key", key.as_str())];
                if respond_async {
                    headers.push(("Prefer", "respond-async"));
                }
                load.send(load.pick(None), Method::POST, "/orders", Some(&order_body(&key, &items)), &headers).await
            };
            let (told, duplicate) = tokio::join!(place(&load, &key, &items, kind, respond_async), duplicate);
            if let (Some(told), Ok(reply)) = (&told, duplicate) {
                check_duplicate(&load, told, &reply);
            }
            told
        } else {
            place(&load, &key, &items, kind, respond_async).await
        };
        let Some(mut told) = told else { continue };
        if rng.f64() < 0.2 {
            replay(&load, &told, &items).await;
        }
        if told.outcome == Outcome::Confirmed && rng.f64() < 0.3 {
            cancel(&load, &mut told).await;
        }
        if rng.f64() < 0.2 {
            read_back(&load, &told).await;
        }
        load.told.lock().unwrap().push(told);
        tokio::time::sleep(Duration::from_millis(rng.u64(5..40))).await;
    }
    load.active.fetch_sub(1, Ordering::SeqCst);
}

fn spawn_clients(load: &Arc<Load>) -> Vec<tokio::task::JoinHandle<()>> {
    (0..CLIENTS).map(|i| tokio::spawn(client(load.clone(), i))).collect()
}

/// Waits for every client, re-raising a client's panic.
async fn join_all(handles: Vec<tokio::task::JoinHandle<()>>) {
    for handle in handles {
        if let Err(e) = handle.await {
            if e.is_panic() {
                std::panic::resume_unwind(e.into_panic());
            }
            panic!("a client task failed: {e}");
        }
    }
}

/// Waits until clients are in flight, so that what follows happens under load.
async fn wait_for_load(load: &Load) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while load.told.lock().unwrap().len() < CLIENTS {
        assert!(Instant::now() < deadline, "the clients never got going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn assert_no_failures(load: &Load) {
    let failures = load.failures.lock().unwrap();
    assert!(failures.is_empty(), "{} client failures:\n{}", failures.len(), failures.join("\n"));
}

fn stats(load: &Load) -> String {
    let told = load.told.lock().unwrap();
    let mut by: BTreeMap<String, usize> = BTreeMap::new();
    for t in told.iter() {
        *by.entry(format!("{:?}", t.outcome)).or_default() += 1;
    }
    format!(
        "{} orders {by:?}; {} lost answers re-sent, {} 202s re-polled, {} 503s, {} replays checked, {} cancels",
        told.len(),
        load.lost.load(Ordering::Relaxed),
        load.repolled.load(Ordering::Relaxed),
        load.unavailable.load(Ordering::Relaxed),
        load.replays.load(Ordering::Relaxed),
        load.cancels.load(Ordering::Relaxed),
    )
}

// ---------------------------------------------------------------------------------------------
// The final checks.
// ---------------------------------------------------------------------------------------------

async fn get_json(client: &reqwest::Client, url: &str) -> Result<Value, String> {
    let response = client.get(url).send().await.map_err(|e| e.to_string())?;
    let status = response.status();
    let body: Value = response.json().await.map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("GET {url}: {status}: {body}"));
    }
    Ok(body)
}

/// Every item of a paginated listing.
async fn list_all(client: &reqwest::Client, base: &str, path: &str) -> Vec<Value> {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..1000 {
        let url = match &cursor {
            Some(c) => format!("{base}{path}&cursor={c}"),
            None => format!("{base}{path}"),
        };
        let page = get_json(client, &url).await.unwrap_or_else(|e| panic!("{e}"));
        items.extend(page["items"].as_array().expect("items").iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return items,
        }
    }
    panic!("{path}: endless pagination");
}

fn checker() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap()
}

/// Waits (up to SETTLE_CAP) until no order is pending and no saga is unfinished.
async fn wait_until_settled(base: &str) {
    let client = checker();
    let deadline = Instant::now() + SETTLE_CAP;
    loop {
        let mut open = 0;
        let mut seen = Vec::new();
        for path in ["/orders?status=pending", "/sagas?state=running", "/sagas?state=compensating"] {
            match get_json(&client, &format!("{base}{path}&limit=500")).await {
                Ok(page) => {
                    let items = page["items"].as_array().map_or(0, Vec::len);
                    open += items;
                    seen.push(format!("{path}: {items} {}", page["items"].get(0).cloned().unwrap_or_default()));
                }
                Err(e) => {
                    open += 1;
                    seen.push(e);
                }
            }
        }
        if open == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "not settled after {SETTLE_CAP:?}: {}", seen.join("; "));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Checks the settled ledger against itself and the stock added: one order per key (the
/// customer id is the key), one place_order saga per order and one cancel_order saga per
/// cancelled order, each finished the way its order says; per product available + reserved +
/// sold = stock, nothing reserved, and sold = what the confirmed orders hold. Returns the orders
/// by customer.
async fn check_ledger(base: &str, products: &[Product]) -> HashMap<String, Value> {
    let client = checker();
    let orders = list_all(&client, base, "/orders?limit=500").await;
    let place = list_all(&client, base, "/sagas?kind=place_order&limit=500").await;
    let cancel = list_all(&client, base, "/sagas?kind=cancel_order&limit=500").await;
    let mut by_customer: HashMap<String, Value> = HashMap::new();
    let mut sold: HashMap<String, i64> = HashMap::new();
    let mut cancelled = HashSet::new();
    for order in &orders {
        let customer = order["customer_id"].as_str().unwrap().to_string();
        let status = order["status"].as_str().unwrap();
        match status {
            "confirmed" | "cancelled" => {
                check_priced(order).unwrap_or_else(|e| panic!("{e}"));
                if status == "confirmed" {
                    for line in order["items"].as_array().unwrap() {
                        *sold.entry(line["product_id"].as_str().unwrap().to_string()).or_default() +=
                            line["quantity"].as_i64().unwrap();
                    }
                } else {
                    cancelled.insert(order["id"].as_str().unwrap().to_string());
                }
            }
            "rejected" => assert!(order["failure"]["code"].is_string(), "a rejected order without failure: {order}"),
            _ => panic!("an order is still {status}: {order}"),
        }
        if let Some(other) = by_customer.insert(customer.clone(), order.clone()) {
            panic!("two orders for one key {customer}: {other} and {order}");
        }
    }
    let mut place_by_order: HashMap<String, &Value> = HashMap::new();
    for saga in &place {
        let order_id = saga["order_id"].as_str().unwrap().to_string();
        if place_by_order.insert(order_id.clone(), saga).is_some() {
            panic!("two place_order sagas for order {order_id}");
        }
    }
    assert_eq!(place.len(), orders.len(), "place_order sagas vs orders");
    for order in &orders {
        let id = order["id"].as_str().unwrap();
        let saga = place_by_order.get(id).unwrap_or_else(|| panic!("no place_order saga for {order}"));
        assert_eq!(saga["id"], order["saga_id"], "the order's saga: {order} {saga}");
        let expected = if order["status"] == "rejected" { "compensated" } else { "completed" };
        assert_eq!(saga["state"], expected, "saga of {order}: {saga}");
    }
    let mut cancel_orders = HashSet::new();
    for saga in &cancel {
        assert_eq!(saga["state"], "completed", "cancel_order saga: {saga}");
        let order_id = saga["order_id"].as_str().unwrap().to_string();
        assert!(cancel_orders.insert(order_id.clone()), "two cancel_order sagas for order {order_id}");
    }
    assert_eq!(cancel_orders, cancelled, "cancel_order sagas vs cancelled orders");
    check_histories(base, place.iter().chain(cancel.iter()).map(|s| s["id"].as_str().unwrap().to_string()).collect())
        .await;
    for p in products {
        let got = get_json(&client, &format!("{base}/products/{}", p.id)).await.unwrap_or_else(|e| panic!("{e}"));
        let (a, r, s) =
            (got["available"].as_i64().unwrap(), got["reserved"].as_i64().unwrap(), got["sold"].as_i64().unwrap());
        assert!(a >= 0 && r >= 0 && s >= 0, "negative stock: {got}");
        assert_eq!(a + r + s, p.stock, "available + reserved + sold of {}: {got}", p.id);
        assert_eq!(r, 0, "stock still reserved: {got}");
        assert_eq!(s, sold.get(p.id).copied().unwrap_or(0), "sold vs the confirmed orders' lines: {got}");
    }
    by_customer
}

/// Each finished saga's history, whatever the crashes and takeovers: events numbered from 0
/// without a gap, `created` first, the final state last, and each step's success (or
/// compensation) recorded once; a completed saga recorded every step's success.
async fn check_histories(base: &str, ids: Vec<String>) {
    let ids = Arc::new(Mutex::new(ids));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (ids, base, client) = (ids.clone(), base.to_string(), checker());
            tokio::spawn(async move {
                loop {
                    let Some(id) = ids.lock().unwrap().pop() else { return };
                    let saga = get_json(&client, &format!("{base}/sagas/{id}")).await.unwrap_or_else(|e| panic!("{e}"));
                    check_history(&saga).unwrap_or_else(|e| panic!("saga {id}: {e}: {saga}"));
                }
            })
        })
        .collect();
    join_all(workers).await;
}

fn check_history(saga: &Value) -> Result<(), String> {
    let events = saga["events"].as_array().ok_or("no events")?;
    for (i, e) in events.iter().enumerate() {
        if e["seq"] != i {
            return Err(format!("event {i} has seq {}", e["seq"]));
        }
    }
    if events.first().map(|e| &e["event"]) != Some(&json!("created")) {
        return Err("the first event is not created".into());
    }
    let state = saga["state"].as_str().unwrap_or("");
    let last = events.last().map(|e| e["event"].as_str().unwrap_or("")).unwrap_or("");
    if !matches!(state, "completed" | "compensated") || last != state || !events.last().unwrap()["step"].is_null() {
        return Err(format!("state {state}, last event {last}"));
    }
    let steps: &[&str] = match saga["kind"].as_str() {
        Some("place_order") => &["reserve_stock", "create_order", "confirm", "commit_stock"],
        Some("cancel_order") => &["cancel", "return_stock"],
        other => return Err(format!("unknown kind {other:?}")),
    };
    for step in steps {
        let count = |name: &str| events.iter().filter(|e| e["step"] == *step && e["event"] == name).count();
        let (succeeded, compensated) = (count("succeeded"), count("compensated"));
        if succeeded > 1 || compensated > 1 || (state == "completed" && (succeeded != 1 || compensated != 0)) {
            return Err(format!("{step} succeeded {succeeded} and was compensated {compensated} times"));
        }
    }
    Ok(())
}

/// Every answer a client got still holds: the key's one order has the id the client was told
/// and the status it was told (a cancelled one only if the client cancelled it). With
/// `every_key`, no order exists without a key the clients used.
fn check_told(orders: &HashMap<String, Value>, told: &[Told], every_key: bool) {
    for t in told {
        let order = orders.get(&t.key).unwrap_or_else(|| panic!("{t:?}: the order is lost"));
        assert_eq!(order["id"], t.order_id.as_str(), "{t:?}: another order for the key: {order}");
        match &t.outcome {
            Outcome::Pending => {}
            Outcome::Confirmed => assert_eq!(order["status"], "confirmed", "{t:?}: {order}"),
            Outcome::Cancelled => assert_eq!(order["status"], "cancelled", "{t:?}: {order}"),
            Outcome::Rejected(code) => {
                assert_eq!(order["status"], "rejected", "{t:?}: {order}");
                assert_eq!(order["failure"]["code"], code.as_str(), "{t:?}: {order}");
            }
        }
    }
    if every_key {
        let keys: HashSet<&str> = told.iter().map(|t| t.key.as_str()).collect();
        assert_eq!(keys.len(), told.len(), "a key was used twice");
        let stray: Vec<&String> = orders.keys().filter(|k| !keys.contains(k.as_str())).collect();
        assert!(stray.is_empty(), "orders nobody was told about: {stray:?}");
    }
}

async fn create_products(base: &str, products: &[Product]) {
    let client = checker();
    for p in products {
        let body = json!({"id": p.id, "name": format!("Product {}", p.id), "price_cents": p.price, "stock": p.stock});
        let response = client.post(format!("{base}/products")).json(&body).send().await.unwrap();
        assert_eq!(response.status(), 201, "create {}", p.id);
    }
}

fn load_products() -> Vec<Product> {
    SCARCE.iter().chain(PLENTY.iter()).copied().collect()
}

fn random_ms(range: std::ops::Range<u64>) -> Duration {
    Duration::from_millis(fastrand::u64(range))
}

// ---------------------------------------------------------------------------------------------
// The tests.
// ---------------------------------------------------------------------------------------------

/// SIGKILL at random moments under load, restart on the same databases: every request whose
/// answer was lost is re-sent with its key until it gets a final answer, and at the end every
/// answer still holds and every saga has finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_sigkill_and_restart_settles_every_request() {
    let _lock = inventory_server_lock(false).await;
    let dbs = common::fresh_databases().await;
    let products = load_products();
    let mut service = Instance::new("service", &dbs, &[]);
    service.start().await;
    create_products(&service.base(), &products).await;
    let load = Load::new(vec![service.base.clone()], Duration::from_secs(10));
    let clients = spawn_clients(&load);
    wait_for_load(&load).await;
    for kill in 1..=6 {
        // The second kill comes right after the restart, during its first recovery pass.
        tokio::time::sleep(if kill == 2 { random_ms(0..100) } else { random_ms(100..1000) }).await;
        assert!(load.active.load(Ordering::SeqCst) > 0, "kill {kill} would not be under load");
        service.kill();
        tokio::time::sleep(random_ms(0..300)).await;
        if kill == 3 {
            // Once, die again while starting up or recovering.
            service.start_and_crash(random_ms(0..400)).await;
        }
        service.start().await;
    }
    load.stop.store(true, Ordering::SeqCst);
    join_all(clients).await;
    assert_no_failures(&load);
    // One more crash with the clients done, then recovery alone must settle what is left.
    service.kill();
    service.start().await;
    wait_until_settled(&service.base()).await;
    let orders = check_ledger(&service.base(), &products).await;
    let told = load.told.lock().unwrap().clone();
    check_told(&orders, &told, true);
    eprintln!("sigkill chaos: {} starts; {}", service.starts, stats(&load));
}

/// Two instances on one PostgreSQL database (or one per participant): any instance answers any
/// request, replays of another's keys included; one instance is SIGKILLed again and again and
/// restarted under load, and at the end stays dead: the other finishes its sagas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: TEST_DATABASE_URL (and for 3, a separate inventory server); run with --run-ignored all"]
async fn two_instances_share_the_work_and_finish_a_killed_ones_sagas() {
    require_env("two_instances_share_the_work_and_finish_a_killed_ones_sagas", &["TEST_DATABASE_URL"]);
    let _lock = inventory_server_lock(false).await;
    let dbs = common::fresh_databases().await;
    assert!(dbs.url.starts_with("postgres"), "TEST_DATABASE_URL must name PostgreSQL: {}", dbs.url);
    let products = load_products();
    let mut a = Instance::new("a", &dbs, &[]);
    let mut b = Instance::new("b", &dbs, &[]);
    a.start().await;
    b.start().await;
    create_products(&a.base(), &products).await;
    let load = Load::new(vec![a.base.clone(), b.base.clone()], Duration::from_secs(10));
    let clients = spawn_clients(&load);
    wait_for_load(&load).await;
    for kill in 1..=6 {
        tokio::time::sleep(random_ms(200..1000)).await;
        assert!(load.active.load(Ordering::SeqCst) > 0, "kill {kill} would not be under load");
        a.kill();
        tokio::time::sleep(random_ms(0..300)).await;
        a.start().await;
    }
    tokio::time::sleep(random_ms(200..1000)).await;
    assert!(load.active.load(Ordering::SeqCst) > 0, "the last kill would not be under load");
    a.kill();
    // From here on only b answers, and only b can finish what a had started.
    load.stop.store(true, Ordering::SeqCst);
    join_all(clients).await;
    assert_no_failures(&load);
    wait_until_settled(&b.base()).await;
    assert!(b.running(), "b died");
    assert_eq!(b.starts, 1, "b was restarted");
    let orders = check_ledger(&b.base(), &products).await;
    let told = load.told.lock().unwrap().clone();
    check_told(&orders, &told, true);
    eprintln!("two instances: a started {} times; {}", a.starts, stats(&load));
}

/// SIGTERM under load, twice: the process exits 0 each time, and the next start on the same
/// databases settles everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_zero_and_the_next_start_finishes() {
    let _lock = inventory_server_lock(false).await;
    let dbs = common::fresh_databases().await;
    let products = load_products();
    let mut service = Instance::new("service", &dbs, &[]);
    service.start().await;
    create_products(&service.base(), &products).await;
    let load = Load::new(vec![service.base.clone()], Duration::from_secs(10));
    let clients = spawn_clients(&load);
    wait_for_load(&load).await;
    for round in 1..=2 {
        tokio::time::sleep(random_ms(300..1200)).await;
        assert!(load.active.load(Ordering::SeqCst) > 0, "SIGTERM {round} would not be under load");
        let status = service.terminate(Duration::from_millis(3 * SHUTDOWN_GRACE_MS + 10_000)).await;
        assert_eq!(status.code(), Some(0), "exit status after SIGTERM {round}: {status}");
        if round == 2 {
            load.stop.store(true, Ordering::SeqCst);
        }
        service.start().await;
    }
    join_all(clients).await;
    assert_no_failures(&load);
    wait_until_settled(&service.base()).await;
    let orders = check_ledger(&service.base(), &products).await;
    let told = load.told.lock().unwrap().clone();
    check_told(&orders, &told, true);
    eprintln!("sigterm: {} starts; {}", service.starts, stats(&load));
}

// ---------------------------------------------------------------------------------------------
// The inventory server's outage.
// ---------------------------------------------------------------------------------------------

/// The PostgreSQL cluster of the inventory database (`TEST_INVENTORY_PG_CLUSTER`, such as
/// `15/inventory`), driven with `pg_ctlcluster`. Dropping it starts the cluster again, whatever
/// happened to the test.
struct Cluster {
    version: String,
    name: String,
}

impl Cluster {
    fn from_env() -> Cluster {
        let spec = std::env::var("TEST_INVENTORY_PG_CLUSTER").unwrap();
        let (version, name) = spec
            .split_once('/')
            .unwrap_or_else(|| panic!("TEST_INVENTORY_PG_CLUSTER must look like 15/inventory, not {spec:?}"));
        Cluster { version: version.to_string(), name: name.to_string() }
    }

    fn ctl(&self, action: &str) -> std::process::Output {
        Command::new("pg_ctlcluster")
            .args(["--skip-systemctl-redirect", &self.version, &self.name, action])
            .output()
            .unwrap_or_else(|e| panic!("cannot run pg_ctlcluster: {e}"))
    }

    fn is_up(&self) -> bool {
        self.ctl("status").status.success()
    }

    fn start(&self) {
        if self.is_up() {
            return;
        }
        let out = self.ctl("start");
        assert!(
            out.status.success() || self.is_up(),
            "pg_ctlcluster start {}/{}: {}",
            self.version,
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn stop(&self) {
        let out = self.ctl("stop");
        assert!(
            out.status.success(),
            "pg_ctlcluster stop {}/{}: {}",
            self.version,
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.is_up() {
            let out = self.ctl("start");
            if !out.status.success() {
                eprintln!(
                    "COULD NOT RESTART the inventory cluster {}/{}: {}",
                    self.version,
                    self.name,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// `POST /orders`, waiting for the saga.
    PlaceSync,
    /// `POST /orders` with `Prefer: respond-async`.
    PlaceAsync,
    /// `GET /products/{id}`.
    Product,
    /// `GET /readyz`.
    Ready,
    /// `GET /orders/{id}` of an order placed earlier.
    Order,
}

struct Sample {
    op: Op,
    sent: Instant,
    answered: Instant,
    reply: Result<Reply, String>,
}

/// A client of the outage test: one request at a time, each answer recorded with when it was
/// sent and answered; nothing re-sent.
async fn outage_client(load: Arc<Load>, samples: Arc<Mutex<Vec<Sample>>>, index: usize) {
    let mut rng = fastrand::Rng::new();
    let mut mine: Vec<String> = Vec::new();
    let product = PLENTY[0].id;
    let mut n = 0;
    while !load.stop.load(Ordering::SeqCst) && n < 500 {
        n += 1;
        let op = match rng.u32(..10) {
            0..=2 => Op::PlaceSync,
            3 => Op::PlaceAsync,
            4 | 5 => Op::Product,
            6 | 7 => Op::Ready,
            _ if mine.is_empty() => Op::Product,
            _ => Op::Order,
        };
        let key = format!("o{index}-{n:03}-{}", uuid::Uuid::new_v4().simple());
        let items = vec![(product.to_string(), 1)];
        let body = order_body(&key, &items);
        let sent = Instant::now();
        let reply = match op {
            Op::PlaceSync => load.send(0, Method::POST, "/orders", Some(&body), &[("Idempotency-Key", &key)]).await,
            Op::PlaceAsync => {
                let headers = [("Idempotency-Key", key.as_str()), ("Prefer", "respond-async")];
                load.send(0, Method::POST, "/orders", Some(&body), &headers).await
            }
            Op::Product => load.send(0, Method::GET, &format!("/products/{product}"), None, &[]).await,
            Op::Ready => load.send(0, Method::GET, "/readyz", None, &[]).await,
            Op::Order => {
                let id = &mine[rng.usize(..mine.len())];
                load.send(0, Method::GET, &format!("/orders/{id}"), None, &[]).await
            }
        };
        let answered = Instant::now();
        if let (Op::PlaceSync | Op::PlaceAsync, Ok(r)) = (op, &reply) {
            let outcome = match (r.status, r.code()) {
                (201, _) => Some(Outcome::Confirmed),
                (202, _) if r.body["status"] == "confirmed" => Some(Outcome::Confirmed),
                (202, _) => Some(Outcome::Pending),
                (409, "deadline_exceeded") => Some(Outcome::Rejected("deadline_exceeded".into())),
                _ => None,
            };
            let id = r.body["id"].as_str().or(r.body["order_id"].as_str());
            if let (Some(outcome), Some(id)) = (outcome, id) {
                mine.push(id.to_string());
                load.told.lock().unwrap().push(Told { key: key.clone(), order_id: id.to_string(), outcome });
            }
        }
        samples.lock().unwrap().push(Sample { op, sent, answered, reply });
        tokio::time::sleep(Duration::from_millis(rng.u64(20..80))).await;
    }
}

/// Judges one answer of the outage test: `down` when it was sent and answered while the
/// inventory server was stopped.
fn judge(sample: &Sample, down: bool) -> Result<(), String> {
    let reply = match &sample.reply {
        Ok(reply) => reply,
        Err(e) => return Err(format!("{:?}: no answer (a client timeout counts as a failure): {e}", sample.op)),
    };
    let (status, code) = (reply.status, reply.code());
    if status >= 400 && (!reply.problem_json || code.is_empty()) {
        return Err(format!("{:?}: {status} without a problem+json body: {}", sample.op, reply.body));
    }
    if status >= 500 && !(status == 503 && code == "database_unavailable") {
        return Err(format!("{:?}: {status}: {}", sample.op, reply.body));
    }
    let ok = match (sample.op, down) {
        (Op::PlaceSync, false) => matches!(status, 201 | 202 | 503) || (status == 409 && code == "deadline_exceeded"),
        (Op::PlaceSync, true) => status == 202 || (status == 409 && code == "deadline_exceeded"),
        (Op::PlaceAsync, false) => matches!(status, 202 | 503),
        (Op::PlaceAsync, true) => status == 202,
        (Op::Product | Op::Ready, false) => matches!(status, 200 | 503),
        (Op::Product | Op::Ready, true) => status == 503,
        (Op::Order, _) => status == 200,
    };
    if !ok {
        return Err(format!("{:?} (inventory down: {down}): unexpected {status}: {}", sample.op, reply.body));
    }
    if status == 201 && reply.body["status"] != "confirmed" {
        return Err(format!("{:?}: 201 for an order that is not confirmed: {}", sample.op, reply.body));
    }
    // The first respond-async answer is 202 whatever the saga has done meanwhile.
    let settled_ok = sample.op == Op::PlaceAsync && reply.body["status"] == "confirmed";
    if status == 202 && reply.body["status"] != "pending" && !settled_ok {
        return Err(format!("{:?}: 202 for an order that is not pending: {}", sample.op, reply.body));
    }
    Ok(())
}

/// Sends one request and returns its answer, panicking when none comes.
async fn must_answer(load: &Load, method: Method, path: &str, body: Option<&Value>, headers: &[(&str, &str)]) -> Reply {
    load.send(0, method, path, body, headers).await.unwrap_or_else(|e| panic!("{path}: no answer: {e}"))
}

/// Polls `GET /orders/{id}` until `done` holds for the body, for up to `cap`.
async fn poll_order(load: &Load, id: &str, cap: Duration, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + cap;
    loop {
        let reply = must_answer(load, Method::GET, &format!("/orders/{id}"), None, &[]).await;
        assert_eq!(reply.status, 200, "GET /orders/{id}: {}", reply.body);
        if done(&reply.body) {
            return reply.body;
        }
        assert!(Instant::now() < deadline, "{what}: order {id} is still {}", reply.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The inventory server stops under load and starts again, the service never restarted: no 500,
/// every answer within the request timeout, 503 `database_unavailable` (or 202) for what needs
/// the inventory, `/readyz` 503; a saga held past its deadline before its pivot ends rejected
/// with `deadline_exceeded`; a saga past its pivot, blocked in `commit_stock`, completes once
/// the server is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: TEST_DATABASE_URL (and for 3, a separate inventory server); run with --run-ignored all"]
async fn inventory_server_outage_is_survived() {
    require_env(
        "inventory_server_outage_is_survived",
        &["TEST_DATABASE_URL", "TEST_INVENTORY_DATABASE_URL", "TEST_INVENTORY_PG_CLUSTER"],
    );
    use sqlx::Connection;
    let _lock = inventory_server_lock(true).await;
    let cluster = Cluster::from_env();
    tokio::task::block_in_place(|| cluster.start());
    let dbs = common::fresh_databases().await;
    let inventory_url = dbs.inventory_url.clone().expect("a separate inventory database");
    assert!(inventory_url.starts_with("postgres"), "TEST_INVENTORY_DATABASE_URL must name PostgreSQL");
    let request_timeout_ms = 5000;
    let mut service = Instance::new(
        "service",
        &dbs,
        &[
            ("ORDER_WAIT_MS", "1500".into()),
            ("REQUEST_TIMEOUT_MS", request_timeout_ms.to_string()),
            ("SAGA_DEADLINE_MS", "3000".into()),
        ],
    );
    service.start().await;
    let products: Vec<Product> = PLENTY.iter().copied().chain([SLOW]).collect();
    create_products(&service.base(), &products).await;
    // Every answer must come within the request timeout: the client waits barely longer.
    let load = Load::new(vec![service.base.clone()], Duration::from_millis(request_timeout_ms + 1000));
    let tell = |key: &str, body: &Value, outcome: Outcome| {
        let order_id = body["id"].as_str().or(body["order_id"].as_str()).unwrap().to_string();
        load.told.lock().unwrap().push(Told { key: key.to_string(), order_id, outcome });
    };

    // Confirmed orders, one of which is cancelled during the outage.
    let mut before = Vec::new();
    for i in 1..=3 {
        let key = format!("before-{i}");
        let body = order_body(&key, &[(PLENTY[1].id.to_string(), 2)]);
        let reply = must_answer(&load, Method::POST, "/orders", Some(&body), &[("Idempotency-Key", &key)]).await;
        assert_eq!(reply.status, 201, "{}", reply.body);
        before.push((key, reply.body["id"].as_str().unwrap().to_string()));
    }

    // A saga past its pivot, blocked in commit_stock: hold the product row so that the saga
    // waits in reserve_stock, then the order row so that it waits in create_order, then the
    // reservation row so that, once it has confirmed, it waits in commit_stock.
    let mut inventory = sqlx::PgConnection::connect(&inventory_url).await.unwrap();
    let mut inventory_2 = sqlx::PgConnection::connect(&inventory_url).await.unwrap();
    let mut orders_db = sqlx::PgConnection::connect(&dbs.url).await.unwrap();
    let mut product_lock = inventory.begin().await.unwrap();
    sqlx::query("SELECT id FROM products WHERE id = $1 FOR UPDATE")
        .bind(SLOW.id)
        .execute(&mut *product_lock)
        .await
        .unwrap();
    let key = "blocked-commit";
    let body = order_body(key, &[(SLOW.id.to_string(), 2)]);
    let headers = [("Idempotency-Key", key), ("Prefer", "respond-async")];
    let reply = must_answer(&load, Method::POST, "/orders", Some(&body), &headers).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    let blocked_order = reply.body["id"].as_str().unwrap().to_string();
    let blocked_saga = reply.body["saga_id"].as_str().unwrap().to_string();
    let mut order_lock = orders_db.begin().await.unwrap();
    sqlx::query("SELECT id FROM orders WHERE id = $1 FOR UPDATE")
        .bind(&blocked_order)
        .execute(&mut *order_lock)
        .await
        .unwrap();
    product_lock.rollback().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status: Option<String> = sqlx::query_scalar("SELECT status FROM reservations WHERE saga_id = $1")
            .bind(&blocked_saga)
            .fetch_optional(&mut inventory_2)
            .await
            .unwrap();
        if status.as_deref() == Some("reserved") {
            break;
        }
        assert!(Instant::now() < deadline, "the blocked saga never reserved: {status:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut reservation_lock = inventory_2.begin().await.unwrap();
    sqlx::query("SELECT saga_id FROM reservations WHERE saga_id = $1 FOR UPDATE")
        .bind(&blocked_saga)
        .execute(&mut *reservation_lock)
        .await
        .unwrap();
    order_lock.rollback().await.unwrap();
    let confirmed = poll_order(&load, &blocked_order, Duration::from_secs(10), "the blocked saga's pivot", |o| {
        o["status"] != "pending"
    })
    .await;
    assert_eq!(
        confirmed["status"], "confirmed",
        "the blocked saga did not pass its pivot (SAGA_DEADLINE_MS too short for this machine?): {confirmed}"
    );
    tell(key, &confirmed, Outcome::Confirmed);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()",
        )
        .fetch_one(&mut inventory)
        .await
        .unwrap();
        // Only the saga's commit_stock can be waiting for a lock here: nothing else runs.
        if waiting >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the saga is not waiting in commit_stock ({waiting} waiting)");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Load, then the outage.
    let samples = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..4).map(|i| tokio::spawn(outage_client(load.clone(), samples.clone(), i))).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::block_in_place(|| cluster.stop());
    let down_at = Instant::now();
    drop(reservation_lock);
    drop((inventory, inventory_2));

    let ready = must_answer(&load, Method::GET, "/readyz", None, &[]).await;
    assert_eq!((ready.status, ready.code()), (503, "database_unavailable"), "/readyz while down: {}", ready.body);
    assert!(ready.problem_json, "/readyz while down is not problem+json");
    let product = must_answer(&load, Method::GET, &format!("/products/{}", PLENTY[0].id), None, &[]).await;
    assert_eq!((product.status, product.code()), (503, "database_unavailable"), "GET /products: {}", product.body);
    assert!(product.problem_json, "GET /products while down is not problem+json");
    // The pivot of the blocked saga holds; it waits for the inventory.
    let saga = must_answer(&load, Method::GET, &format!("/sagas/{blocked_saga}"), None, &[]).await;
    assert_eq!(saga.body["state"], "running", "{}", saga.body);
    assert_eq!(saga.body["steps"][3]["name"], "commit_stock", "{}", saga.body);
    assert_eq!(saga.body["steps"][3]["state"], "running", "{}", saga.body);
    poll_order(&load, &blocked_order, Duration::ZERO, "the pivot holds", |o| o["status"] == "confirmed").await;
    // A cancel passes its pivot (in the orders database) and waits to return the stock.
    let (cancel_key, cancel_id) = before[0].clone();
    let reply = must_answer(&load, Method::POST, &format!("/orders/{cancel_id}/cancel"), None, &[]).await;
    assert_eq!(reply.status, 202, "cancel while the inventory is down: {}", reply.body);
    let cancelled =
        poll_order(&load, &cancel_id, Duration::from_secs(10), "the cancel's pivot", |o| o["status"] == "cancelled")
            .await;
    tell(&cancel_key, &cancelled, Outcome::Cancelled);
    for (key, id) in &before[1..] {
        tell(key, &json!({ "id": id }), Outcome::Confirmed);
    }
    // A new order cannot reserve: past its deadline, before its pivot, it is rejected.
    let key = "past-deadline";
    let body = order_body(key, &[(PLENTY[2].id.to_string(), 2)]);
    let reply = must_answer(&load, Method::POST, "/orders", Some(&body), &[("Idempotency-Key", key)]).await;
    assert!(
        reply.status == 202 || (reply.status == 409 && reply.code() == "deadline_exceeded"),
        "POST /orders while the inventory is down: {} {}",
        reply.status,
        reply.body
    );
    let late_order = reply.body["id"].as_str().or(reply.body["order_id"].as_str()).unwrap().to_string();
    let rejected =
        poll_order(&load, &late_order, Duration::from_secs(20), "deadline_exceeded", |o| o["status"] != "pending")
            .await;
    assert_eq!(rejected["status"], "rejected", "{rejected}");
    assert_eq!(rejected["failure"]["code"], "deadline_exceeded", "{rejected}");
    tell(key, &rejected, Outcome::Rejected("deadline_exceeded".into()));
    let late_saga = rejected["saga_id"].as_str().unwrap();
    let saga = must_answer(&load, Method::GET, &format!("/sagas/{late_saga}"), None, &[]).await;
    assert_eq!(saga.body["state"], "compensating", "its stock release waits for the inventory: {}", saga.body);
    // Let the load see the outage for longer than a request may take.
    let min_outage = Duration::from_millis(request_timeout_ms + 1500);
    if down_at.elapsed() < min_outage {
        tokio::time::sleep(min_outage - down_at.elapsed()).await;
    }
    assert!(service.running(), "the service died during the outage");

    let up_at = Instant::now();
    tokio::task::block_in_place(|| cluster.start());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = must_answer(&load, Method::GET, "/readyz", None, &[]).await;
        if ready.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "/readyz never recovered: {}", ready.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    load.stop.store(true, Ordering::SeqCst);
    join_all(clients).await;

    // Everything settles without a restart of the service.
    wait_until_settled(&service.base()).await;
    assert!(service.running(), "the service died");
    assert_eq!(service.starts, 1, "the service was restarted");
    let saga = must_answer(&load, Method::GET, &format!("/sagas/{blocked_saga}"), None, &[]).await;
    assert_eq!(saga.body["state"], "completed", "{}", saga.body);
    let orders = check_ledger(&service.base(), &products).await;
    let told = load.told.lock().unwrap().clone();
    check_told(&orders, &told, false);
    let samples = samples.lock().unwrap();
    let mut failures = Vec::new();
    let mut during = 0;
    for sample in samples.iter() {
        let down = sample.sent >= down_at && sample.answered <= up_at;
        during += usize::from(down);
        if let Err(e) = judge(sample, down) {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{} bad answers of {}:\n{}", failures.len(), samples.len(), failures.join("\n"));
    assert_no_failures(&load);
    eprintln!("inventory outage: {} answers, {during} while down; {} orders", samples.len(), orders.len());
}

// ---------------------------------------------------------------------------------------------
// Connections to the log database cut right after a COMMIT went out.
// ---------------------------------------------------------------------------------------------

/// A TCP proxy in front of a PostgreSQL server that, while armed, cuts a connection (both ways)
/// right after forwarding a `COMMIT` to the server, with probability `permille`/1000: the commit
/// happens, its answer never arrives. Needs `sslmode=disable` to read the protocol.
struct CommitCutter {
    port: u16,
    permille: Arc<AtomicUsize>,
    cuts: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CommitCutter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CommitCutter {
    async fn start(upstream: String) -> CommitCutter {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let permille = Arc::new(AtomicUsize::new(0));
        let cuts = Arc::new(AtomicUsize::new(0));
        let (p, c) = (permille.clone(), cuts.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, upstream.clone(), p.clone(), c.clone()));
            }
        });
        CommitCutter { port, permille, cuts, task }
    }
}

/// Relays one connection, cutting it after a COMMIT as `permille` says.
async fn relay(client: tokio::net::TcpStream, upstream: String, permille: Arc<AtomicUsize>, cuts: Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else { return };
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let cut = Arc::new(AtomicBool::new(false));
    let cut2 = cut.clone();
    let back = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if cut2.load(Ordering::SeqCst) || cw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let forth = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            let commit = chunk.windows(6).any(|w| w == b"COMMIT");
            let arm = permille.load(Ordering::SeqCst);
            if commit && arm > 0 && fastrand::usize(..1000) < arm {
                // Counted first: the other half may end this connection (and drop this future)
                // as soon as the server's answer arrives.
                cuts.fetch_add(1, Ordering::SeqCst);
                cut.store(true, Ordering::SeqCst);
                let _ = sw.write_all(chunk).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                return;
            }
            if sw.write_all(chunk).await.is_err() {
                return;
            }
        }
    };
    // Whichever way ends first ends both: every half is dropped, the sockets close.
    tokio::select! {
        _ = back => {}
        _ = forth => {}
    }
}

/// The PostgreSQL URL `url` rewritten to go through 127.0.0.1:`port` without TLS.
fn through_proxy(url: &str, port: u16) -> (String, String) {
    let rest = url.strip_prefix("postgres://").or_else(|| url.strip_prefix("postgresql://")).expect("postgres URL");
    let (auth, rest) = match rest.split_once('@') {
        Some((auth, rest)) => (format!("{auth}@"), rest),
        None => (String::new(), rest),
    };
    let (host, path) = rest.split_once('/').expect("a database in the URL");
    let sep = if path.contains('?') { '&' } else { '?' };
    (format!("postgres://{auth}127.0.0.1:{port}/{path}{sep}sslmode=disable"), host.to_string())
}

/// Database connections die under load right after a COMMIT went out (the commit happened, its
/// answer was lost), the service staying up: clients re-send with their keys, and once the
/// connections are healthy again every order settles, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: TEST_DATABASE_URL (and for 3, a separate inventory server); run with --run-ignored all"]
async fn answers_lost_at_commit_leave_nothing_pending() {
    require_env("answers_lost_at_commit_leave_nothing_pending", &["TEST_DATABASE_URL"]);
    let _lock = inventory_server_lock(false).await;
    let dbs = common::fresh_databases().await;
    // Every connection goes through a cutter: one per server.
    let (_, upstream) = through_proxy(&dbs.url, 0);
    let mut cutters = vec![CommitCutter::start(upstream).await];
    let (url, _) = through_proxy(&dbs.url, cutters[0].port);
    let mut inventory_url = None;
    if let Some(inventory) = &dbs.inventory_url {
        let (_, upstream) = through_proxy(inventory, 0);
        cutters.push(CommitCutter::start(upstream).await);
        inventory_url = Some(through_proxy(inventory, cutters[1].port).0);
    }
    let proxied = TestDatabases { url, inventory_url };
    let products = load_products();
    let mut service = Instance::new("service", &proxied, &[]);
    service.start().await;
    create_products(&service.base(), &products).await;
    let load = Load::new(vec![service.base.clone()], Duration::from_secs(10));
    let clients = spawn_clients(&load);
    wait_for_load(&load).await;
    for cutter in &cutters {
        cutter.permille.store(30, Ordering::SeqCst);
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    for cutter in &cutters {
        cutter.permille.store(0, Ordering::SeqCst);
    }
    load.stop.store(true, Ordering::SeqCst);
    join_all(clients).await;
    let cuts: usize = cutters.iter().map(|c| c.cuts.load(Ordering::SeqCst)).sum();
    eprintln!("answers lost at commit: {cuts} commits cut; {}", stats(&load));
    assert!(cuts > 0, "no commit was cut");
    assert_no_failures(&load);
    wait_until_settled(&service.base()).await;
    assert!(service.running(), "the service died");
    let orders = check_ledger(&service.base(), &products).await;
    let told = load.told.lock().unwrap().clone();
    check_told(&orders, &told, true);
}

// ---------------------------------------------------------------------------------------------
// Operator controls during an outage of the inventory server.
// ---------------------------------------------------------------------------------------------

/// Sends one request to `base` and returns its status and JSON body.
async fn call(client: &reqwest::Client, method: Method, url: String, body: Option<&Value>) -> (u16, Value) {
    let mut request = client.request(method, url);
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().await.expect("the service answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Polls saga `id` at `base` until `done` holds, for up to `cap`.
async fn poll_saga(
    client: &reqwest::Client,
    base: &str,
    id: &str,
    cap: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + cap;
    loop {
        let (status, saga) = call(client, Method::GET, format!("{base}/sagas/{id}"), None).await;
        if status == 200 && done(&saga) {
            return saga;
        }
        assert!(Instant::now() < deadline, "saga {id} did not get there within {cap:?}: {saga}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The (event, actor, reason) of each operator event in a saga's history.
fn operator_events(saga: &Value) -> Vec<(String, String, String)> {
    saga["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"].as_str().is_some_and(|k| k.starts_with("operator_")))
        .map(|e| {
            let detail: Value = serde_json::from_str(e["detail"].as_str().unwrap()).unwrap();
            let field = |name: &str| detail[name].as_str().unwrap().to_string();
            (e["event"].as_str().unwrap().to_string(), field("actor"), field("reason"))
        })
        .collect()
}

/// Two instances on two PostgreSQL servers; the inventory server is stopped. A new order sticks
/// before its pivot and is aborted; a cancel sticks after its pivot. Once the server is back,
/// the aborted saga ends compensated (its order `rejected`, `aborted`), and a retry sent to the
/// instance that does not drive the cancel finishes it at once, where its own driver would
/// still wait out a backoff of 30 s or more.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs two PostgreSQL servers and the inventory cluster to stop (TEST_INVENTORY_PG_CLUSTER)"]
async fn operator_controls_during_an_inventory_outage() {
    require_env(
        "operator_controls_during_an_inventory_outage",
        &["TEST_DATABASE_URL", "TEST_INVENTORY_DATABASE_URL", "TEST_INVENTORY_PG_CLUSTER"],
    );
    let _lock = inventory_server_lock(true).await;
    let cluster = Cluster::from_env();
    tokio::task::block_in_place(|| cluster.start());
    let dbs = common::fresh_databases().await;
    assert!(dbs.inventory_url.as_deref().is_some_and(|u| u.starts_with("postgres")), "two PostgreSQL servers");
    let shared = [("SAGA_DEADLINE_MS", "600000".to_string()), ("STUCK_AFTER_ATTEMPTS", "1".to_string())];
    // `quick` retries within a second; `slow` waits 30 to 60 s after a failed attempt.
    let mut quick = Instance::new("quick", &dbs, &[&shared[..], &[("BACKOFF_CAP_MS", "500".to_string())]].concat());
    let slow_backoff = [("BACKOFF_BASE_MS", "60000".to_string()), ("BACKOFF_CAP_MS", "120000".to_string())];
    let mut slow = Instance::new("slow", &dbs, &[&shared[..], &slow_backoff[..]].concat());
    quick.start().await;
    slow.start().await;
    let (quick_base, slow_base) = (quick.base(), slow.base());
    let client = checker();
    let product = &PLENTY[0];
    create_products(&quick_base, &[*product]).await;
    let line = json!([{"product_id": product.id, "quantity": 2}]);
    let (status, confirmed) =
        call(&client, Method::POST, format!("{slow_base}/orders"), Some(&json!({"customer_id": "c1", "items": line})))
            .await;
    assert_eq!(status, 201, "{confirmed}");
    let confirmed_id = confirmed["id"].as_str().unwrap().to_string();

    tokio::task::block_in_place(|| cluster.stop());

    // Stuck before its pivot: reserve_stock cannot reach the inventory.
    let response = client
        .post(format!("{quick_base}/orders"))
        .header("Prefer", "respond-async")
        .json(&json!({"customer_id": "c2", "items": line}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let pending: Value = response.json().await.unwrap();
    let (pending_id, place_saga) =
        (pending["id"].as_str().unwrap().to_string(), pending["saga_id"].as_str().unwrap().to_string());
    poll_saga(&client, &quick_base, &place_saga, Duration::from_secs(20), |s| s["stuck"] == true).await;

    // Stuck after its pivot: the cancel commits in the orders database, return_stock cannot.
    let (status, body) = call(&client, Method::POST, format!("{slow_base}/orders/{confirmed_id}/cancel"), None).await;
    assert_eq!((status, body["status"].as_str()), (202, Some("cancelled")), "{body}");
    let cancel_saga = body["cancel_saga_id"].as_str().unwrap().to_string();
    poll_saga(&client, &slow_base, &cancel_saga, Duration::from_secs(20), |s| s["stuck"] == true).await;

    let by = |reason: &str| json!({"actor": "oncall@shop", "reason": reason});
    let (status, body) =
        call(&client, Method::POST, format!("{quick_base}/sagas/{cancel_saga}/abort"), Some(&by("no"))).await;
    assert_eq!((status, body["code"].as_str()), (409, Some("saga_past_pivot")), "{body}");
    let (status, body) =
        call(&client, Method::POST, format!("{quick_base}/sagas/{place_saga}/abort"), Some(&by("inventory outage")))
            .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "compensating", "{body}");

    tokio::task::block_in_place(|| cluster.start());

    let aborted =
        poll_saga(&client, &slow_base, &place_saga, Duration::from_secs(30), |s| s["state"] == "compensated").await;
    assert_eq!(
        operator_events(&aborted),
        [("operator_abort".to_string(), "oncall@shop".to_string(), "inventory outage".to_string())]
    );
    let (_, order) = call(&client, Method::GET, format!("{slow_base}/orders/{pending_id}"), None).await;
    assert_eq!(
        (order["status"].as_str(), order["failure"]["code"].as_str()),
        (Some("rejected"), Some("aborted")),
        "{order}"
    );

    // The cancel's own driver (on `slow`) sits in a backoff of 30 s or more: the retry, sent to
    // the other instance, attempts return_stock now.
    let (status, body) =
        call(&client, Method::POST, format!("{quick_base}/sagas/{cancel_saga}/retry"), Some(&by("inventory is back")))
            .await;
    assert_eq!(status, 200, "{body}");
    let finished =
        poll_saga(&client, &quick_base, &cancel_saga, Duration::from_secs(20), |s| s["state"] == "completed").await;
    assert_eq!(
        operator_events(&finished),
        [("operator_retry".to_string(), "oncall@shop".to_string(), "inventory is back".to_string())],
        "the refused abort wrote nothing"
    );
    let (status, body) =
        call(&client, Method::POST, format!("{quick_base}/sagas/{cancel_saga}/retry"), Some(&by("again"))).await;
    assert_eq!((status, body["code"].as_str()), (409, Some("saga_finished")), "{body}");
    let (_, stock) = call(&client, Method::GET, format!("{quick_base}/products/{}", product.id), None).await;
    assert_eq!(
        (stock["available"].as_i64(), stock["reserved"].as_i64(), stock["sold"].as_i64()),
        (Some(product.stock), Some(0), Some(0)),
        "both orders gave their stock back: {stock}"
    );
    assert!(quick.running() && slow.running(), "an instance died");
}
