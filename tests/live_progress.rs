//! Live progress over server-sent events, read by a real HTTP client that parses the stream
//! itself: an order's stream (its steps in order, the final order, the close, a resume with
//! `Last-Event-ID`), a stream opened before a slow saga ends, a cancel saga appearing in it, the
//! global feed, (on PostgreSQL) a stream served by an instance that does not run the saga, and
//! an order at the bound on its cancel sagas.
mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use order_saga::limits;
use order_saga::saga::{Fault, FaultInjector, FaultPlan, Phase, StepError};
use serde_json::{Value, json};

/// How long any one event may take to arrive before the test fails.
const EVENT_WAIT: Duration = Duration::from_secs(30);

/// One server-sent event.
#[derive(Debug, Clone)]
struct SseEvent {
    event: String,
    id: Option<String>,
    data: Value,
}

/// A response body read as server-sent events (the parts of the format the service uses).
struct SseReader {
    response: reqwest::Response,
    buffer: String,
}

impl SseReader {
    async fn open(app: &TestApp, path: &str, last_event_id: Option<&str>) -> SseReader {
        let mut request = app.client.get(app.url(path)).header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = request.send().await.expect("the stream is answered");
        assert_eq!(response.status(), 200, "GET {path}");
        let media = response.headers()["content-type"].to_str().unwrap().to_string();
        assert!(media.starts_with("text/event-stream"), "GET {path}: {media}");
        SseReader { response, buffer: String::new() }
    }

    /// The next event, skipping comment lines; `None` when the server ended the stream.
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut event, mut id, mut data) = (String::from("message"), None, Vec::new());
                for line in block.lines() {
                    let (field, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    match field {
                        "" => {} // a comment, such as `: keepalive`
                        "event" => event = value.to_string(),
                        "id" => id = Some(value.to_string()),
                        "data" => data.push(value.to_string()),
                        other => panic!("unexpected SSE field {other:?} in {block:?}"),
                    }
                }
                if data.is_empty() {
                    continue;
                }
                let data = serde_json::from_str(&data.join("\n")).expect("event data is JSON");
                return Some(SseEvent { event, id, data });
            }
            match tokio::time::timeout(EVENT_WAIT, self.response.chunk()).await {
                Ok(Ok(Some(bytes))) => self.buffer.push_str(std::str::from_utf8(&bytes).expect("UTF-8")),
                Ok(Ok(None)) => {
                    assert!(self.buffer.trim().is_empty(), "the stream ended inside an event: {:?}", self.buffer);
                    return None;
                }
                Ok(Err(e)) => panic!("the stream broke: {e}"),
                Err(_) => panic!("no event within {EVENT_WAIT:?}"),
            }
        }
    }

    /// The next event, which must exist and be named `name`.
    async fn expect(&mut self, name: &str) -> SseEvent {
        let event = self.next().await.unwrap_or_else(|| panic!("the stream ended before an {name} event"));
        assert_eq!(event.event, name, "{event:?}");
        event
    }

    /// `saga` events up to and including the final `order` event, which is returned apart; then
    /// asserts that the stream ends.
    async fn rest(&mut self) -> (Vec<SseEvent>, SseEvent) {
        let mut sagas = Vec::new();
        loop {
            let event = self.next().await.expect("the stream ended before its final order event");
            match event.event.as_str() {
                "saga" => sagas.push(event),
                "order" => {
                    break {
                        assert!(self.next().await.is_none(), "the stream goes on after its final order event");
                        (sagas, event)
                    };
                }
                other => panic!("unexpected event {other}: {event:?}"),
            }
        }
    }
}

/// Fails `step` of `kind` transiently while closed, so that a test holds a saga mid-way for as
/// long as it needs and no longer.
struct Gate {
    kind: &'static str,
    step: &'static str,
    closed: AtomicBool,
}

impl Gate {
    fn closed(kind: &'static str, step: &'static str) -> Arc<Gate> {
        Arc::new(Gate { kind, step, closed: AtomicBool::new(true) })
    }

    fn open(&self) {
        self.closed.store(false, Ordering::SeqCst);
    }
}

impl FaultInjector for Gate {
    fn fault(&self, kind: &str, step: &str, phase: Phase, _attempt: u32) -> Option<Fault> {
        (kind == self.kind && step == self.step && phase == Phase::Action && self.closed.load(Ordering::SeqCst))
            .then(|| Fault::Fail(StepError::transient("injected: held by the test's gate")))
    }
}

fn spec() -> Value {
    serde_yaml::from_str(include_str!("../openapi.yaml")).expect("openapi.yaml parses")
}

/// The members a schema of the spec requires (they are all of its members).
fn required(doc: &Value, name: &str) -> BTreeSet<String> {
    doc["components"]["schemas"][name]["required"]
        .as_array()
        .unwrap_or_else(|| panic!("schema {name}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

fn keys(value: &Value) -> BTreeSet<String> {
    value.as_object().expect("an object").keys().cloned().collect()
}

/// Each saga event as `GET /sagas/{id}` lists it: (seq, step, event, detail, at).
fn as_history(events: &[&SseEvent]) -> Vec<Value> {
    events
        .iter()
        .map(|e| json!({"seq": e.data["seq"], "step": e.data["step"], "event": e.data["event"], "detail": e.data["detail"], "at": e.data["at"]}))
        .collect()
}

/// `GET /sagas/{id}`'s events, in the same shape.
async fn history(app: &TestApp, saga_id: &str) -> Vec<Value> {
    let saga = app.get_json(&format!("/sagas/{saga_id}")).await;
    saga["events"].as_array().unwrap().to_vec()
}

fn of_saga<'a>(events: &'a [SseEvent], saga_id: &str) -> Vec<&'a SseEvent> {
    events.iter().filter(|e| e.data["saga_id"] == saga_id).collect()
}

async fn problem(app: &TestApp, path: &str, last_event_id: &str) -> (u16, Value) {
    let response = app.client.get(app.url(path)).header("last-event-id", last_event_id).send().await.unwrap();
    let status = response.status().as_u16();
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    (status, response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orders_stream_shows_its_steps_in_order_then_closes_and_resumes_without_repeats() {
    let doc = spec();
    let app = spawn_app().await;
    app.create_product("mug", 1250, 5).await;
    let placed = app.place_order("c-1", &[("mug", 2)], None).await;
    assert_eq!(placed.status(), 201);
    let placed: Value = placed.json().await.unwrap();
    let (order_id, saga_id) = (placed["id"].as_str().unwrap(), placed["saga_id"].as_str().unwrap());
    let path = format!("/orders/{order_id}/events");
    let order = app.get_json(&format!("/orders/{order_id}")).await;

    let mut stream = SseReader::open(&app, &path, None).await;
    let first = stream.expect("order").await;
    assert_eq!((first.data.clone(), first.id), (order.clone(), None));
    let (sagas, last) = stream.rest().await;
    assert_eq!(last.data, order, "the final order event is the order as it stands");
    let steps: Vec<(String, Value)> =
        sagas.iter().map(|e| (e.data["event"].as_str().unwrap().to_string(), e.data["step"].clone())).collect();
    let expected = [
        ("created", Value::Null),
        ("succeeded", json!("reserve_stock")),
        ("succeeded", json!("create_order")),
        ("succeeded", json!("confirm")),
        ("succeeded", json!("commit_stock")),
        ("completed", Value::Null),
    ];
    assert_eq!(steps, expected.map(|(e, s)| (e.to_string(), s)), "{sagas:?}");
    assert_eq!(as_history(&sagas.iter().collect::<Vec<_>>()), history(&app, saga_id).await);
    for (i, event) in sagas.iter().enumerate() {
        assert_eq!((event.data["saga_id"].as_str(), event.data["kind"].as_str()), (Some(saga_id), Some("place_order")));
        assert_eq!(event.id.as_deref(), Some((i + 1).to_string().as_str()), "the cursor after event {i}");
        assert_eq!(keys(&event.data), required(&doc, "OrderSagaEvent"));
    }
    assert_eq!(keys(&first.data), required(&doc, "Order"));

    // Resumed after the third event: the rest, nothing repeated, nothing lost.
    let middle = sagas[2].id.clone().unwrap();
    let mut resumed = SseReader::open(&app, &path, Some(&middle)).await;
    assert_eq!(resumed.expect("order").await.data, order);
    let (again, last) = resumed.rest().await;
    assert_eq!(as_history(&again.iter().collect::<Vec<_>>()), history(&app, saga_id).await[3..].to_vec());
    assert_eq!(last.data, order);
    // Resumed after everything: the order twice and the end.
    let end = sagas.last().unwrap().id.clone().unwrap();
    let mut done = SseReader::open(&app, &path, Some(&end)).await;
    done.expect("order").await;
    assert!(done.rest().await.0.is_empty());

    for bad in ["x", "1.", "-1", "3.1", "99", ""] {
        let (status, body) = problem(&app, &path, bad).await;
        assert_eq!((status, body["code"].as_str()), (400, Some("invalid_last_event_id")), "{bad:?}: {body}");
    }
    let missing = app.get("/orders/no-such-order/events").await;
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.json::<Value>().await.unwrap()["code"], "not_found");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_opened_before_a_slow_saga_finishes_sees_its_later_steps_live() {
    let dbs = fresh_databases().await;
    let gate = Gate::closed("place_order", "reserve_stock");
    let app = spawn_app_with(config(&dbs), Some(gate.clone())).await;
    app.create_product("mug", 1250, 5).await;
    let placed = app
        .client
        .post(app.url("/orders"))
        .header("prefer", "respond-async")
        .json(&order_body("c-1", &[("mug", 1)]))
        .send()
        .await
        .unwrap();
    assert_eq!(placed.status(), 202);
    let placed: Value = placed.json().await.unwrap();
    let (order_id, saga_id) = (placed["id"].as_str().unwrap(), placed["saga_id"].as_str().unwrap());

    let mut stream = SseReader::open(&app, &format!("/orders/{order_id}/events"), None).await;
    assert_eq!(stream.expect("order").await.data["status"], "pending");
    let mut sagas = vec![stream.expect("saga").await];
    assert_eq!(sagas[0].data["event"], "created");
    // A failed attempt arrives while the saga is held: the stream is live.
    loop {
        let event = stream.expect("saga").await;
        let failed = event.data["event"] == "failed";
        sagas.push(event);
        if failed {
            break;
        }
    }
    assert_eq!(sagas.last().unwrap().data["step"], "reserve_stock");
    gate.open();
    let (rest, last) = stream.rest().await;
    sagas.extend(rest);
    assert_eq!(last.data["status"], "confirmed");
    assert_eq!(sagas.last().unwrap().data["event"], "completed");
    assert_eq!(as_history(&sagas.iter().collect::<Vec<_>>()), history(&app, saga_id).await);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancels_events_appear_in_the_orders_stream() {
    let dbs = fresh_databases().await;
    // The place saga is held past its pivot (the order confirmed), so the stream is open when
    // the cancel saga starts.
    let gate = Gate::closed("place_order", "commit_stock");
    let app = spawn_app_with(config(&dbs), Some(gate.clone())).await;
    app.create_product("mug", 1250, 5).await;
    let placed = app
        .client
        .post(app.url("/orders"))
        .header("prefer", "respond-async")
        .json(&order_body("c-1", &[("mug", 2)]))
        .send()
        .await
        .unwrap();
    let placed: Value = placed.json().await.unwrap();
    let (order_id, saga_id) = (placed["id"].as_str().unwrap().to_string(), placed["saga_id"].as_str().unwrap());
    let path = format!("/orders/{order_id}/events");
    let order_path = format!("/orders/{order_id}");
    eventually(Duration::from_secs(20), "the order is confirmed", || async {
        app.get_json(&order_path).await["status"] == "confirmed"
    })
    .await;

    let mut stream = SseReader::open(&app, &path, None).await;
    stream.expect("order").await;
    let cancelled = app.post(&format!("/orders/{order_id}/cancel"), &json!({})).await;
    assert!(matches!(cancelled.status().as_u16(), 200 | 202));
    let cancel_saga = app.state.orders.get(&order_id).await.unwrap().cancel_saga_id.expect("the cancel saga");
    let mut sagas = Vec::new();
    loop {
        let event = stream.expect("saga").await;
        let done = event.data["saga_id"] == cancel_saga.as_str() && event.data["event"] == "completed";
        sagas.push(event);
        if done {
            break;
        }
    }
    gate.open();
    let (rest, last) = stream.rest().await;
    sagas.extend(rest);
    assert_eq!(last.data["status"], "cancelled");
    assert_eq!(as_history(&of_saga(&sagas, saga_id)), history(&app, saga_id).await);
    let cancels = of_saga(&sagas, &cancel_saga);
    assert_eq!(as_history(&cancels), history(&app, &cancel_saga).await);
    assert!(cancels.iter().all(|e| e.data["kind"] == "cancel_order"));
    let (place_n, cancel_n) = (of_saga(&sagas, saga_id).len(), cancels.len());
    assert_eq!(sagas.last().unwrap().id, Some(format!("{place_n}.{cancel_n}")));

    // Resumed after the cancel saga's first event: exactly what came after it.
    let first_cancel = sagas.iter().position(|e| e.data["saga_id"] == cancel_saga.as_str()).unwrap();
    let mut resumed = SseReader::open(&app, &path, sagas[first_cancel].id.as_deref()).await;
    resumed.expect("order").await;
    let (again, _) = resumed.rest().await;
    let mut expected: Vec<Value> = as_history(&sagas[first_cancel + 1..].iter().collect::<Vec<_>>());
    let mut got = as_history(&again.iter().collect::<Vec<_>>());
    expected.sort_by_key(|v| v.to_string());
    got.sort_by_key(|v| v.to_string());
    assert_eq!(got, expected);
    app.stop().await;
}

/// Reads the feed until `saga_id` shows `state`, checking that no (id, next_seq) comes twice.
async fn feed_until(feed: &mut SseReader, saga_id: &str, state: &str) -> Vec<Value> {
    let mut seen = BTreeSet::new();
    let mut of_saga = Vec::new();
    loop {
        let event = feed.expect("saga").await;
        let key = (event.data["id"].as_str().unwrap().to_string(), event.data["next_seq"].as_i64().unwrap());
        assert!(seen.insert(key), "sent twice: {}", event.data);
        if event.data["id"] == saga_id {
            of_saga.push(event.data.clone());
            if event.data["state"] == state {
                return of_saga;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_feed_shows_a_new_saga_and_its_changes() {
    let doc = spec();
    let dbs = fresh_databases().await;
    let gate = Gate::closed("place_order", "reserve_stock");
    let app = spawn_app_with(config(&dbs), Some(gate.clone())).await;
    app.create_product("mug", 1250, 5).await;
    let mut feed = SseReader::open(&app, "/sagas/events", None).await;
    let placed = app
        .client
        .post(app.url("/orders"))
        .header("prefer", "respond-async")
        .json(&order_body("c-1", &[("mug", 1)]))
        .send()
        .await
        .unwrap();
    let placed: Value = placed.json().await.unwrap();
    let saga_id = placed["saga_id"].as_str().unwrap();
    let running = feed_until(&mut feed, saga_id, "running").await;
    assert_eq!(running[0]["order_id"], placed["id"]);
    gate.open();
    let changes = feed_until(&mut feed, saga_id, "completed").await;
    let last = changes.last().unwrap();
    assert_eq!(keys(last), required(&doc, "SagaChange"));
    let mut listed = app.get_json("/sagas?kind=place_order").await["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == saga_id)
        .unwrap()
        .clone();
    listed["next_seq"] = json!(history(&app, saga_id).await.len());
    assert_eq!(last, &listed, "the feed's item is GET /sagas's with next_seq");
    app.stop().await;
}

/// Two instances on one PostgreSQL: the saga runs on one, the streams are served by the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: TEST_DATABASE_URL; run with --run-ignored all"]
async fn a_stream_served_by_another_instance_sees_the_saga_live() {
    assert!(on_postgres(), "needs TEST_DATABASE_URL (PostgreSQL); it refuses to pass by skipping");
    let dbs = fresh_databases().await;
    let gate = Gate::closed("place_order", "reserve_stock");
    let runner = spawn_app_with(config(&dbs), Some(gate.clone())).await;
    let watcher = spawn_app_with(config(&dbs), None).await;
    runner.create_product("mug", 1250, 5).await;
    let mut feed = SseReader::open(&watcher, "/sagas/events", None).await;
    let placed = runner
        .client
        .post(runner.url("/orders"))
        .header("prefer", "respond-async")
        .json(&order_body("c-1", &[("mug", 1)]))
        .send()
        .await
        .unwrap();
    let placed: Value = placed.json().await.unwrap();
    let (order_id, saga_id) = (placed["id"].as_str().unwrap(), placed["saga_id"].as_str().unwrap());

    let mut stream = SseReader::open(&watcher, &format!("/orders/{order_id}/events"), None).await;
    assert_eq!(stream.expect("order").await.data["status"], "pending");
    let mut sagas = Vec::new();
    loop {
        let event = stream.expect("saga").await;
        let failed = event.data["event"] == "failed";
        sagas.push(event);
        if failed {
            break;
        }
    }
    feed_until(&mut feed, saga_id, "running").await;
    gate.open();
    let (rest, last) = stream.rest().await;
    sagas.extend(rest);
    assert_eq!(last.data["status"], "confirmed");
    assert_eq!(as_history(&sagas.iter().collect::<Vec<_>>()), history(&watcher, saga_id).await);
    let changes = feed_until(&mut feed, saga_id, "completed").await;
    assert_eq!(changes.last().unwrap()["next_seq"], json!(sagas.len()));
    watcher.stop().await;
    runner.stop().await;
}

/// A stream opened with a token ends when the token does (its `exp` plus the 30 s leeway), so
/// that it cannot outlive it; the client reconnects with a fresh token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_when_its_token_expires() {
    const SECRET: &str = "stream-expiry-test-secret-0123456789";
    let dbs = fresh_databases().await;
    let mut config = config(&dbs);
    config.auth_jwt_secret = Some(SECRET.parse().unwrap());
    let app = spawn_app_with(config, None).await;
    let now = jsonwebtoken::get_current_timestamp();
    let token = |exp: u64| {
        let claims = json!({"sub": "ops-1", "scope": "admin", "exp": exp});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let open = |token: String| {
        let request = app.client.get(app.url("/sagas/events")).bearer_auth(token);
        async move { request.send().await.unwrap() }
    };
    // Expired 27 s ago: accepted within the leeway for about 3 s more.
    let mut ending = open(token(now - 27)).await;
    assert_eq!(ending.status(), 200);
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        while ending.chunk().await.expect("the stream ends cleanly").is_some() {}
    })
    .await;
    assert!(ended.is_ok(), "the stream of an expiring token ended");
    // A token good for an hour keeps its stream open past that point.
    let mut lasting = open(token(now + 3600)).await;
    assert_eq!(lasting.status(), 200);
    let still_open = tokio::time::timeout(Duration::from_secs(6), async {
        while lasting.chunk().await.expect("no error").is_some() {}
    })
    .await;
    assert!(still_open.is_err(), "the stream of a lasting token is still open");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orders_cancels_are_bounded_so_its_stream_follows_every_saga() {
    let dbs = fresh_databases().await;
    // Every cancel saga fails at its pivot (its first step) and settles compensated, leaving the
    // order confirmed, so each cancel after it starts a new saga that replaces the one before.
    let plan = Arc::new(FaultPlan::new());
    let refused = Fault::Fail(StepError::permanent("injected", "injected: the cancel is refused"));
    plan.add("cancel_order", "cancel", Phase::Action, refused, u32::MAX);
    let app = spawn_app_with(config(&dbs), Some(plan)).await;
    app.create_product("mug", 1250, 5).await;
    let placed: Value = app.place_order("c-1", &[("mug", 2)], None).await.json().await.unwrap();
    let order_id = placed["id"].as_str().unwrap().to_string();
    let cancel = format!("/orders/{order_id}/cancel");

    let mut cancel_sagas = BTreeSet::new();
    for attempt in 1..=limits::MAX_CANCEL_SAGAS {
        let answer = app.post(&cancel, &json!({})).await;
        assert_eq!(answer.status(), 409, "cancel {attempt}");
        let body: Value = answer.json().await.unwrap();
        assert_eq!(body["code"], "order_not_cancellable", "cancel {attempt}: {body}");
        let order = app.get_json(&format!("/orders/{order_id}")).await;
        assert_eq!(order["status"], "confirmed");
        assert!(cancel_sagas.insert(order["cancel_saga_id"].as_str().unwrap().to_string()), "a new saga each time");
    }
    let answer = app.post(&cancel, &json!({})).await;
    assert_eq!(answer.status(), 409);
    assert_eq!(answer.headers()["content-type"], "application/problem+json");
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["code"], "cancel_attempts_exhausted", "{body}");
    let order = app.get_json(&format!("/orders/{order_id}")).await;
    assert_eq!(order["status"], "confirmed");
    assert!(cancel_sagas.contains(order["cancel_saga_id"].as_str().unwrap()), "no saga was started for it");
    let cancels = app.get_json("/sagas?kind=cancel_order&limit=500").await;
    assert_eq!(cancels["items"].as_array().unwrap().len(), limits::MAX_CANCEL_SAGAS);

    // The stream follows all of them, the place saga first, and its last cursor resumes.
    let path = format!("/orders/{order_id}/events");
    let mut stream = SseReader::open(&app, &path, None).await;
    stream.expect("order").await;
    let (sagas, last) = stream.rest().await;
    assert_eq!(last.data["status"], "confirmed");
    let followed: BTreeSet<&str> = sagas.iter().map(|e| e.data["saga_id"].as_str().unwrap()).collect();
    assert_eq!(followed.len(), limits::MAX_SAGAS_PER_ORDER);
    assert!(followed.contains(placed["saga_id"].as_str().unwrap()));
    for saga in &cancel_sagas {
        assert_eq!(as_history(&of_saga(&sagas, saga)), history(&app, saga).await);
    }
    let cursor = sagas.last().unwrap().id.clone().unwrap();
    assert_eq!(cursor.split('.').count(), limits::MAX_SAGAS_PER_ORDER, "{cursor}");
    let mut resumed = SseReader::open(&app, &path, Some(&cursor)).await;
    resumed.expect("order").await;
    let (again, _) = resumed.rest().await;
    assert!(again.is_empty(), "resumed after the last event, nothing is repeated: {again:?}");
    app.stop().await;
}
