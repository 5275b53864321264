//! Load shedding and connection limits: past `MAX_IN_FLIGHT` a request is answered 503
//! `overloaded` at once and nothing is recorded for it, while health, readiness, metrics and
//! streams still answer; a saga answered early keeps its slot until it settles or is flagged
//! stuck; a silent or slow client is disconnected after `HEADER_READ_TIMEOUT_MS`, an idle one
//! after `KEEPALIVE_IDLE_MS`; the listen backlog is the kernel's limit or `LISTEN_BACKLOG`;
//! running out of file descriptors does not stop the accept loop.
mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use order_saga::idempotency;
use order_saga::saga::{Fault, FaultInjector, Phase, SagaFilter, SagaState, StepError};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longer than any answer here should take: a hang fails the test instead of stalling it.
const ANSWER_WAIT: Duration = Duration::from_secs(15);

/// The idempotency scope of `POST /orders` with authentication off.
const PLACE_SCOPE: &str = "POST /orders";

/// Fails `reserve_stock` transiently while closed, so that sagas stay in flight for as long as
/// the test needs and no longer.
struct Gate {
    closed: AtomicBool,
}

impl Gate {
    fn closed() -> Arc<Gate> {
        Arc::new(Gate { closed: AtomicBool::new(true) })
    }

    fn set_closed(&self, closed: bool) {
        self.closed.store(closed, Ordering::SeqCst);
    }
}

impl FaultInjector for Gate {
    fn fault(&self, kind: &str, step: &str, phase: Phase, _attempt: u32) -> Option<Fault> {
        (kind == "place_order"
            && step == "reserve_stock"
            && phase == Phase::Action
            && self.closed.load(Ordering::SeqCst))
        .then(|| Fault::Fail(StepError::transient("injected: held by the test's gate")))
    }
}

/// An app with `max_in_flight` slots whose sagas wait at the gate, retrying every few ms.
async fn gated_app(max_in_flight: u32, order_wait_ms: u64) -> (TestApp, Arc<Gate>) {
    gated_app_stuck_after(max_in_flight, order_wait_ms, 1_000_000).await
}

/// The same, with its sagas flagged stuck after `stuck_after_attempts` failed attempts.
async fn gated_app_stuck_after(
    max_in_flight: u32,
    order_wait_ms: u64,
    stuck_after_attempts: u32,
) -> (TestApp, Arc<Gate>) {
    let dbs = fresh_databases().await;
    let mut config = config(&dbs);
    config.max_in_flight = max_in_flight;
    config.order_wait_ms = order_wait_ms;
    config.request_timeout_ms = order_wait_ms + 20_000;
    config.backoff_base_ms = 5;
    config.backoff_cap_ms = 20;
    config.stuck_after_attempts = stuck_after_attempts;
    let gate = Gate::closed();
    let app = spawn_app_with(config, Some(gate.clone() as Arc<dyn FaultInjector>)).await;
    (app, gate)
}

/// POSTs an order for one unit of `p` with `key`, optionally `Prefer: respond-async`.
async fn post_order(app: &TestApp, customer: &str, key: &str, respond_async: bool) -> reqwest::Response {
    let mut request =
        app.client.post(app.url("/orders")).json(&order_body(customer, &[("p", 1)])).header("Idempotency-Key", key);
    if respond_async {
        request = request.header("Prefer", "respond-async");
    }
    tokio::time::timeout(ANSWER_WAIT, request.send())
        .await
        .expect("POST /orders is answered in time")
        .expect("POST /orders is answered")
}

async fn get_status(app: &TestApp, path: &str) -> u16 {
    let response = tokio::time::timeout(ANSWER_WAIT, app.client.get(app.url(path)).send())
        .await
        .unwrap_or_else(|_| panic!("GET {path} is answered in time"))
        .unwrap_or_else(|e| panic!("GET {path} is answered: {e}"));
    response.status().as_u16()
}

/// Asserts that `response` is the 503 `overloaded` problem with `Retry-After`.
async fn assert_overloaded(response: reqwest::Response, what: &str) {
    assert_eq!(response.status(), 503, "{what}");
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    assert_eq!(header("content-type").as_deref(), Some("application/problem+json"), "{what}");
    let retry_after = header("retry-after").unwrap_or_else(|| panic!("{what}: no Retry-After"));
    assert!(retry_after.parse::<u64>().is_ok_and(|s| s >= 1), "{what}: Retry-After {retry_after:?}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "overloaded", "{what}: {body}");
    assert_eq!(body["status"], 503, "{what}: {body}");
}

/// An unlabelled series as `GET /metrics` shows it.
async fn metric(app: &TestApp, name: &str) -> u64 {
    let text = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

async fn shed_total(app: &TestApp) -> u64 {
    metric(app, "order_saga_http_shed_total").await
}

async fn in_flight(app: &TestApp) -> u64 {
    metric(app, "order_saga_http_in_flight").await
}

/// The place_order sagas in the log.
async fn place_sagas(app: &TestApp) -> Vec<order_saga::saga::SagaRecord> {
    let filter = SagaFilter { kind: Some("place_order".into()), limit: 100, ..SagaFilter::default() };
    app.engine.list(&filter).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_bound_a_request_is_refused_at_once_and_nothing_is_recorded() {
    let (app, gate) = gated_app(2, 20_000).await;
    app.create_product("p", 100, 100).await;
    assert_eq!(shed_total(&app).await, 0);

    // Two orders whose requests wait for their held sagas: both slots are taken.
    let held: Vec<_> = ["held-1", "held-2"]
        .into_iter()
        .map(|key| {
            let (client, url) = (app.client.clone(), app.url("/orders"));
            tokio::spawn(async move {
                client
                    .post(url)
                    .json(&order_body("held", &[("p", 1)]))
                    .header("Idempotency-Key", key)
                    .send()
                    .await
                    .expect("a held order is answered")
            })
        })
        .collect();
    eventually(ANSWER_WAIT, "both held orders are written ahead", || async { place_sagas(&app).await.len() == 2 })
        .await;

    // A third order, and a read, are refused at once, without a token of work done.
    let mut shed = 0;
    assert_overloaded(post_order(&app, "shed", "shed-key", false).await, "a third order").await;
    shed += 1;
    assert_overloaded(app.client.get(app.url("/products/p")).send().await.unwrap(), "a read while saturated").await;
    shed += 1;
    assert!(idempotency::get(app.engine.log_db(), PLACE_SCOPE, "shed-key").await.unwrap().is_none());
    assert!(app.state.orders.list(Some("shed"), None, None, 10).await.unwrap().is_empty());
    assert_eq!(place_sagas(&app).await.len(), 2, "the refused order started no saga");

    // What is not counted still answers: liveness, readiness, metrics, the spec, the dashboard,
    // and an event stream.
    for path in ["/healthz", "/readyz", "/openapi.yaml", "/ui", "/ui/app.js"] {
        assert_eq!(get_status(&app, path).await, 200, "GET {path} while saturated");
    }
    let feed = tokio::time::timeout(ANSWER_WAIT, app.client.get(app.url("/sagas/events")).send())
        .await
        .expect("the feed is answered in time")
        .unwrap();
    assert_eq!(feed.status(), 200, "GET /sagas/events while saturated");
    drop(feed);
    assert_eq!(shed_total(&app).await, shed, "the metric counts each refusal");
    assert_eq!(in_flight(&app).await, 2, "the two held requests hold the slots");

    // The load ends: the held orders are confirmed and new requests get slots again.
    gate.set_closed(false);
    for request in held {
        let response = request.await.unwrap();
        assert_eq!(response.status(), 201, "a held order, once let through");
    }
    let deadline = tokio::time::Instant::now() + ANSWER_WAIT;
    loop {
        match get_status(&app, "/products/p").await {
            200 => break,
            503 => shed += 1,
            other => panic!("GET /products/p after the load: {other}"),
        }
        assert!(tokio::time::Instant::now() < deadline, "no slot came free after the load");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The refused key was never recorded: it places a fresh order now, which it then replays.
    let retried = post_order(&app, "shed", "shed-key", false).await;
    assert_eq!(retried.status(), 201);
    assert!(retried.headers().get("idempotent-replayed").is_none(), "a refused request's key is new");
    let order: Value = retried.json().await.unwrap();
    let replayed = post_order(&app, "shed", "shed-key", false).await;
    assert_eq!(replayed.status(), 201);
    assert_eq!(replayed.headers().get("idempotent-replayed").map(|v| v.to_str().unwrap()), Some("true"));
    assert_eq!(replayed.json::<Value>().await.unwrap()["id"], order["id"]);
    assert_eq!(app.state.orders.list(Some("shed"), None, None, 10).await.unwrap().len(), 1);

    assert_eq!(shed_total(&app).await, shed);
    assert_stock_invariants(&app, &[("p", 100)], true).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_answered_early_keeps_its_slot_until_it_settles() {
    let (app, gate) = gated_app(1, 300).await;
    app.create_product("p", 100, 100).await;

    // `Prefer: respond-async`: 202 at once, and the saga holds the one slot after the answer.
    gate.set_closed(true);
    let accepted = post_order(&app, "async", "async-1", true).await;
    assert_eq!(accepted.status(), 202);
    let saga_id = accepted.json::<Value>().await.unwrap()["saga_id"].as_str().unwrap().to_string();
    assert_eq!(in_flight(&app).await, 1, "the answered request's saga holds its slot");
    assert_overloaded(app.client.get(app.url("/products/p")).send().await.unwrap(), "while the saga runs").await;
    gate.set_closed(false);
    let settled = app.engine.wait_settled(&saga_id, ANSWER_WAIT).await.unwrap().expect("the saga settles");
    assert_eq!(settled.state, SagaState::Completed);
    eventually(ANSWER_WAIT, "the settled saga's slot is free", || async {
        get_status(&app, "/products/p").await == 200
    })
    .await;

    // 202 after ORDER_WAIT_MS: the same.
    gate.set_closed(true);
    let pending = post_order(&app, "sync", "sync-1", false).await;
    assert_eq!(pending.status(), 202, "still running after ORDER_WAIT_MS");
    let saga_id = pending.json::<Value>().await.unwrap()["saga_id"].as_str().unwrap().to_string();
    assert_overloaded(post_order(&app, "other", "other-1", false).await, "while the saga runs").await;
    gate.set_closed(false);
    app.engine.wait_settled(&saga_id, ANSWER_WAIT).await.unwrap().expect("the saga settles");
    eventually(ANSWER_WAIT, "the settled saga's slot is free", || async {
        get_status(&app, "/products/p").await == 200
    })
    .await;

    // A replay starts nothing and keeps no slot.
    let replayed = post_order(&app, "async", "async-1", true).await;
    assert_eq!(replayed.headers().get("idempotent-replayed").map(|v| v.to_str().unwrap()), Some("true"));
    assert_eq!(get_status(&app, "/products/p").await, 200);
    assert_eq!(in_flight(&app).await, 0);
    assert_stock_invariants(&app, &[("p", 100)], true).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_saga_gives_its_slot_back() {
    let (app, gate) = gated_app_stuck_after(1, 300, 5).await;
    app.create_product("p", 100, 100).await;
    gate.set_closed(true);
    let accepted = post_order(&app, "async", "async-1", true).await;
    assert_eq!(accepted.status(), 202);
    let saga_id = accepted.json::<Value>().await.unwrap()["saga_id"].as_str().unwrap().to_string();

    // Its attempts fail every few ms: after the fifth it is flagged stuck and lets the slot go,
    // though it is still running (and still retried).
    eventually(ANSWER_WAIT, "the stuck saga's slot is free", || async { get_status(&app, "/products/p").await == 200 })
        .await;
    let (saga, _) = app.engine.saga(&saga_id).await.unwrap().expect("the saga");
    assert!(saga.stuck, "it let go because it is stuck");
    assert!(!saga.state.is_final(), "it let go before settling: {:?}", saga.state);
    assert_eq!(in_flight(&app).await, 0);

    gate.set_closed(false);
    let settled = app.engine.wait_settled(&saga_id, ANSWER_WAIT).await.unwrap().expect("the saga settles");
    assert_eq!(settled.state, SagaState::Completed);
    assert_eq!(in_flight(&app).await, 0);
    assert_stock_invariants(&app, &[("p", 100)], true).await;
    app.stop().await;
}

/// Reads until the server closes the connection (end of stream or a reset); panics if it has
/// not within `within`, or if it answers.
async fn assert_closed_by_server(stream: &mut TcpStream, within: Duration, what: &str) {
    let mut buf = [0u8; 1024];
    match tokio::time::timeout(within, stream.read(&mut buf)).await {
        Err(_) => panic!("{what}: the connection is still open after {within:?}"),
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("{what}: the server answered: {}", String::from_utf8_lossy(&buf[..n])),
    }
}

/// Sends a GET of `/healthz` on `stream` and reads its answer (it has a Content-Length).
async fn healthz_on(stream: &mut TcpStream) -> String {
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = tokio::time::timeout(ANSWER_WAIT, stream.read(&mut buf)).await.expect("answered in time").unwrap();
        assert!(n > 0, "the connection closed before the answer: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&answer).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                .and_then(|v| v.parse::<usize>().ok())
                .expect("a Content-Length");
            if body.len() >= length {
                return text;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_silent_and_idle_connections_are_closed() {
    let dbs = fresh_databases().await;
    let mut config = config(&dbs);
    config.header_read_timeout_ms = 300;
    config.keepalive_idle_ms = 8_000;
    let app = spawn_app_with(config, None).await;
    let addr = app.base.trim_start_matches("http://").to_string();

    // Opens and says nothing.
    let mut silent = TcpStream::connect(&addr).await.unwrap();
    // Sends half a head and stops.
    let mut half = TcpStream::connect(&addr).await.unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: te").await.unwrap();
    // Trickles a head a byte at a time, never finishing it in time.
    let mut trickle = TcpStream::connect(&addr).await.unwrap();
    let trickling = tokio::spawn(async move {
        for byte in b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Slow: ".iter().cycle().take(400) {
            if trickle.write_all(&[*byte]).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    });
    // Well within the idle limit, which (with hyper's own timer, the limits' sum) would close
    // them later: it is the head timeout that closes them.
    let within = Duration::from_secs(5);
    assert_closed_by_server(&mut silent, within, "a silent connection").await;
    assert_closed_by_server(&mut half, within, "half a head").await;
    assert!(trickling.await.unwrap(), "a head trickled byte by byte was cut off");

    // A kept-alive connection may idle longer than the head timeout between requests, and is
    // closed once it idles past KEEPALIVE_IDLE_MS.
    let mut kept = TcpStream::connect(&addr).await.unwrap();
    assert!(healthz_on(&mut kept).await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert!(healthz_on(&mut kept).await.starts_with("HTTP/1.1 200"), "idle for 4 head timeouts, still open");
    assert_closed_by_server(&mut kept, ANSWER_WAIT, "an idle kept-alive connection").await;

    // The service is unharmed.
    assert_eq!(get_status(&app, "/healthz").await, 200);
    app.stop().await;
}

/// A child process killed when the test ends, failed or not.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary on fresh databases under `sh -c "<limits> && exec binary"`, with `env`, and
/// waits until it answers; returns it (killed when dropped) and its address.
async fn start_binary(shell_limits: &str, env: &[(&str, &str)]) -> (Killed, String) {
    let dbs = fresh_databases().await;
    let addr = format!("127.0.0.1:{}", free_port());
    let binary = binary_command();
    let mut command = Command::new("sh");
    command.arg("-c").arg(format!("{shell_limits} && exec \"$0\"")).arg(binary.get_program());
    for (name, value) in binary.get_envs() {
        match value {
            Some(value) => command.env(name, value),
            None => command.env_remove(name),
        };
    }
    command.env("DATABASE_URL", &dbs.url).env("BIND_ADDR", &addr).stdout(Stdio::null()).stderr(Stdio::piped());
    if let Some(inventory) = &dbs.inventory_url {
        command.env("INVENTORY_DATABASE_URL", inventory);
    }
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = Killed(command.spawn().expect("the binary starts"));
    let client = reqwest::Client::builder().timeout(ANSWER_WAIT).build().unwrap();
    for _ in 0..600 {
        if client.get(format!("http://{addr}/healthz")).send().await.is_ok_and(|r| r.status() == 200) {
            return (child, addr);
        }
        assert!(child.0.try_wait().unwrap().is_none(), "the service exited early");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the service never became healthy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listen_backlog_is_the_kernels_limit_unless_set() {
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn").unwrap().trim().parse().unwrap();
    for (env, expected) in [(None, somaxconn), (Some("77"), 77)] {
        let settings: Vec<(&str, &str)> = env.map(|v| ("LISTEN_BACKLOG", v)).into_iter().collect();
        let (_service, addr) = start_binary("true", &settings).await;
        let port = addr.rsplit(':').next().unwrap();
        // `ss` shows a listening socket's backlog as its Send-Q.
        let ss = Command::new("ss").args(["-Hltn", &format!("sport = :{port}")]).output().expect("ss (iproute2) runs");
        let listing = String::from_utf8_lossy(&ss.stdout);
        let backlog: u32 = listing
            .split_whitespace()
            .nth(2)
            .and_then(|q| q.parse().ok())
            .unwrap_or_else(|| panic!("no listening socket on port {port} in `ss`: {listing:?}"));
        assert_eq!(backlog, expected, "LISTEN_BACKLOG {env:?}: {listing}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_does_not_stop_the_accept_loop() {
    // The binary under a limit of 64 open files: well under the connections opened below.
    let (mut service, addr) =
        start_binary("ulimit -n 64", &[("HEADER_READ_TIMEOUT_MS", "300"), ("DB_MAX_CONNECTIONS", "4")]).await;
    let child = &mut service.0;
    let healthz = format!("http://{addr}/healthz");

    // 150 silent connections: the service accepts what its descriptors allow, is refused the
    // rest (EMFILE), and takes them as the head timeout frees descriptors.
    let mut silent = Vec::new();
    for _ in 0..150 {
        silent.push(TcpStream::connect(&addr).await.expect("the kernel queues the connection"));
    }
    for (i, stream) in silent.iter_mut().enumerate() {
        assert_closed_by_server(stream, Duration::from_secs(60), &format!("silent connection {i}")).await;
    }
    let fresh = reqwest::Client::builder().timeout(ANSWER_WAIT).build().unwrap();
    assert_eq!(fresh.get(&healthz).send().await.expect("answered after EMFILE").status(), 200);
    assert!(child.try_wait().unwrap().is_none(), "the service is still running");

    child.kill().unwrap();
    child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(
        stderr.to_ascii_lowercase().contains("accept error") && stderr.contains("Too many open files"),
        "the service ran out of descriptors and logged it:\n{stderr}"
    );
}
