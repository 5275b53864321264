//! Customers kept apart, end to end, with authentication on: lists, reads, cancels and streams
//! of another's order; Idempotency-Keys scoped per principal (and one recorded with
//! authentication off, which keeps replaying for its customer); the operator controls' actor;
//! a customer's stream without error details; `METRICS_TOKEN`; CORS around 401s.
mod auth_support;
mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use auth_support::*;
use common::*;
use order_saga::config::Config;
use order_saga::saga::{Fault, FaultPlan, Phase, StepError};
use serde_json::{Value, json};

const SECRET: &str = "the-isolation-tests-hs256-secret-0123456789";
const CUSTOMER_A: &str = "cust-a";
const CUSTOMER_B: &str = "cust-b";
const ADMIN: &str = "ops@shop.example";
const ORIGIN: &str = "https://shop.example";

/// How long a test waits for a saga to get where it wants it.
const WAIT: Duration = Duration::from_secs(20);

fn bearer(sub: &str, scope: &str) -> Auth {
    Auth::Bearer(hs256(SECRET.as_bytes(), &claims(sub, scope)))
}

/// The three callers of these tests.
struct Callers {
    a: Auth,
    b: Auth,
    admin: Auth,
}

fn callers() -> Callers {
    Callers { a: bearer(CUSTOMER_A, "orders"), b: bearer(CUSTOMER_B, "orders"), admin: bearer(ADMIN, "admin") }
}

fn with_auth(mut config: Config) -> Config {
    config.auth_jwt_secret = Some(SECRET.parse().unwrap());
    config
}

async fn auth_app() -> TestApp {
    let dbs = fresh_databases().await;
    spawn_app_with(with_auth(config(&dbs)), None).await
}

async fn get(app: &TestApp, auth: &Auth, path: &str) -> reqwest::Response {
    auth.apply(app.client.get(app.url(path))).send().await.unwrap()
}

async fn post(app: &TestApp, auth: &Auth, path: &str, body: &Value) -> reqwest::Response {
    auth.apply(app.client.post(app.url(path)).json(body)).send().await.unwrap()
}

/// POST /orders with an optional Idempotency-Key.
async fn place(app: &TestApp, auth: &Auth, body: &Value, key: Option<&str>) -> reqwest::Response {
    let mut request = app.client.post(app.url("/orders")).json(body);
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    auth.apply(request).send().await.unwrap()
}

/// An order body of one line of `p1`, with `customer_id` if given.
fn body(customer: Option<&str>, quantity: i64) -> Value {
    let mut body = json!({"items": [{"product_id": "p1", "quantity": quantity}]});
    if let Some(customer) = customer {
        body["customer_id"] = json!(customer);
    }
    body
}

async fn create_product(app: &TestApp, admin: &Auth, id: &str, stock: i64) {
    let product = json!({"id": id, "name": format!("Product {id}"), "price_cents": 250, "stock": stock});
    success(post(app, admin, "/products", &product).await, 201).await;
}

/// The ids of a listing that fits in one page.
async fn listed(app: &TestApp, auth: &Auth, path: &str) -> BTreeSet<String> {
    let page = success(get(app, auth, path).await, 200).await;
    assert_eq!(page["next_cursor"], Value::Null, "{path}: {page}");
    page["items"].as_array().unwrap().iter().map(|o| o["id"].as_str().unwrap().to_string()).collect()
}

fn ids(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

fn id(order: &Value) -> String {
    order["id"].as_str().unwrap().to_string()
}

/// Reads an event stream to its end (bounded): each event as (name, data).
async fn stream_to_end(response: reqwest::Response) -> Vec<(String, Value)> {
    assert_eq!(response.status(), 200);
    assert!(header(&response, "content-type").unwrap().starts_with("text/event-stream"));
    let text = tokio::time::timeout(WAIT, response.text()).await.expect("the stream ends").unwrap();
    text.split("\n\n")
        .filter_map(|block| {
            let mut name = "message".to_string();
            let mut data = Vec::new();
            for line in block.lines() {
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "event" => name = value.to_string(),
                    "data" => data.push(value),
                    _ => {}
                }
            }
            (!data.is_empty()).then(|| (name, serde_json::from_str(&data.join("\n")).expect("JSON data")))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn customers_see_and_act_on_their_own_orders_only() {
    let app = auth_app().await;
    let Callers { a, b, admin } = callers();
    create_product(&app, &admin, "p1", 100).await;
    let a1 = id(&success(place(&app, &a, &body(Some(CUSTOMER_A), 1), None).await, 201).await);
    let a2 = success(place(&app, &a, &body(None, 2), None).await, 201).await;
    assert_eq!(a2["customer_id"], CUSTOMER_A, "customer_id defaults to the token's sub: {a2}");
    let a2 = id(&a2);
    let b1 = id(&success(place(&app, &b, &body(None, 4), None).await, 201).await);

    // Lists: each customer their own, whatever the filters; the admin everyone's.
    assert_eq!(listed(&app, &a, "/orders").await, ids(&[&a1, &a2]));
    assert_eq!(listed(&app, &a, "/orders?customer_id=cust-a").await, ids(&[&a1, &a2]));
    assert_eq!(listed(&app, &b, "/orders").await, ids(&[&b1]));
    assert_eq!(listed(&app, &b, "/orders?status=confirmed").await, ids(&[&b1]));
    assert_eq!(listed(&app, &admin, "/orders").await, ids(&[&a1, &a2, &b1]));
    assert_eq!(listed(&app, &admin, "/orders?customer_id=cust-a").await, ids(&[&a1, &a2]));
    problem(get(&app, &b, "/orders?customer_id=cust-a").await, 403, "forbidden").await;

    // B cannot read, cancel or stream A's order: 404, as for an order that does not exist.
    let missing = uuid::Uuid::now_v7().to_string();
    for path in ["/orders/{id}", "/orders/{id}/events"] {
        let theirs = problem(get(&app, &b, &path.replace("{id}", &a1)).await, 404, "not_found").await;
        let none = problem(get(&app, &b, &path.replace("{id}", &missing)).await, 404, "not_found").await;
        assert_eq!(theirs.to_string().replace(&a1, "ID"), none.to_string().replace(&missing, "ID"), "{path}");
    }
    let cancel = |id: &str| format!("/orders/{id}/cancel");
    let theirs = problem(post(&app, &b, &cancel(&a1), &json!({})).await, 404, "not_found").await;
    let none = problem(post(&app, &b, &cancel(&missing), &json!({})).await, 404, "not_found").await;
    assert_eq!(theirs.to_string().replace(&a1, "ID"), none.to_string().replace(&missing, "ID"));
    // Nor place one for A.
    problem(place(&app, &b, &body(Some(CUSTOMER_A), 1), None).await, 403, "forbidden").await;

    // A's orders are untouched: still confirmed, their stock still sold, no other order made.
    for order in [&a1, &a2] {
        let seen = success(get(&app, &a, &format!("/orders/{order}")).await, 200).await;
        assert_eq!((seen["status"].as_str(), seen["cancel_saga_id"].as_str()), (Some("confirmed"), None), "{seen}");
    }
    let p1 = success(get(&app, &a, "/products/p1").await, 200).await;
    assert_eq!((p1["available"].as_i64(), p1["sold"].as_i64()), (Some(93), Some(7)), "{p1}");
    assert_eq!(listed(&app, &admin, "/orders").await, ids(&[&a1, &a2, &b1]));

    // A can cancel their own.
    let cancelled = success(post(&app, &a, &cancel(&a1), &json!({})).await, 200).await;
    assert_eq!(cancelled["status"], "cancelled");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotency_keys_are_scoped_to_their_principal() {
    let app = auth_app().await;
    let Callers { a, b, admin } = callers();
    create_product(&app, &admin, "p1", 100).await;

    let first = place(&app, &a, &body(Some(CUSTOMER_A), 1), Some("key-1")).await;
    assert_eq!(header(&first, "idempotent-replayed"), None);
    let first = success(first, 201).await;

    // A retry that omits customer_id is the same request: customer_id defaults to sub before
    // the body's fingerprint is taken.
    let retry = place(&app, &a, &body(None, 1), Some("key-1")).await;
    assert_eq!(header(&retry, "idempotent-replayed").as_deref(), Some("true"));
    assert_eq!(id(&success(retry, 201).await), id(&first));
    // So is one whose customer_id is null, which counts as missing.
    let mut null_customer = body(None, 1);
    null_customer["customer_id"] = Value::Null;
    let retry = place(&app, &a, &null_customer, Some("key-1")).await;
    assert_eq!(header(&retry, "idempotent-replayed").as_deref(), Some("true"));
    assert_eq!(id(&success(retry, 201).await), id(&first));

    // The same key and body from B is B's own order.
    let other = place(&app, &b, &body(None, 1), Some("key-1")).await;
    assert_eq!(header(&other, "idempotent-replayed"), None, "B's first use of the key is no replay");
    let other = success(other, 201).await;
    assert_ne!(id(&other), id(&first));
    assert_eq!(other["customer_id"], CUSTOMER_B);
    let again = place(&app, &b, &body(None, 1), Some("key-1")).await;
    assert_eq!(header(&again, "idempotent-replayed").as_deref(), Some("true"));
    assert_eq!(id(&success(again, 201).await), id(&other));

    // The other way round: a key first sent without customer_id replays for a body naming sub.
    let omitted = success(place(&app, &a, &body(None, 3), Some("key-2")).await, 201).await;
    let named = place(&app, &a, &body(Some(CUSTOMER_A), 3), Some("key-2")).await;
    assert_eq!(header(&named, "idempotent-replayed").as_deref(), Some("true"));
    assert_eq!(id(&success(named, 201).await), id(&omitted));

    // Within one principal the key still guards its body.
    problem(place(&app, &a, &body(None, 2), Some("key-1")).await, 422, "idempotency_key_reused").await;

    let all = listed(&app, &admin, "/orders").await;
    assert_eq!(all, ids(&[&id(&first), &id(&other), &id(&omitted)]));
    let p1 = success(get(&app, &admin, "/products/p1").await, 200).await;
    assert_eq!(p1["sold"], 5, "1 + 1 + 3 units: {p1}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_recorded_with_auth_off_keeps_replaying_for_the_customer_whose_order_it_made() {
    // Authentication off: the key is recorded in the one key space of POST /orders.
    let dbs = fresh_databases().await;
    let open = spawn_app_with(config(&dbs), None).await;
    open.create_product("p1", 250, 100).await;
    let legacy = open.post("/products/p1/restock", &json!({"quantity": 1})).await;
    assert_eq!(legacy.status(), 200, "authentication is off");
    let made = open.place_order(CUSTOMER_A, &[("p1", 2)], Some("legacy-key")).await;
    let made = success(made, 201).await;
    open.stop().await;

    // The same databases with authentication on.
    let app = spawn_app_with(with_auth(config(&dbs)), None).await;
    let Callers { a, b, admin } = callers();
    assert_eq!(app.get("/orders").await.status(), 401, "authentication is on");
    for same in [body(Some(CUSTOMER_A), 2), body(None, 2)] {
        let replay = place(&app, &a, &same, Some("legacy-key")).await;
        assert_eq!(header(&replay, "idempotent-replayed").as_deref(), Some("true"), "{same}");
        let replay = success(replay, 201).await;
        assert_eq!(id(&replay), id(&made), "{same}");
    }
    // Another customer's use of the key is a new order of their own.
    let theirs = place(&app, &b, &body(None, 2), Some("legacy-key")).await;
    assert_eq!(header(&theirs, "idempotent-replayed"), None);
    let theirs = success(theirs, 201).await;
    assert_ne!(id(&theirs), id(&made));
    assert_eq!(theirs["customer_id"], CUSTOMER_B);
    // A's legacy key still guards its body.
    problem(place(&app, &a, &body(None, 3), Some("legacy-key")).await, 422, "idempotency_key_reused").await;

    assert_eq!(listed(&app, &admin, "/orders").await, ids(&[&id(&made), &id(&theirs)]));
    let p1 = success(get(&app, &admin, "/products/p1").await, 200).await;
    assert_eq!(p1["sold"], 4, "the legacy order and B's: {p1}");
    app.stop().await;
}

/// The operator events of a saga's history as (event, actor, reason).
fn operator_events(saga: &Value) -> Vec<(String, String, String)> {
    saga["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"].as_str().unwrap().starts_with("operator_"))
        .map(|e| {
            let detail: Value = serde_json::from_str(e["detail"].as_str().unwrap()).unwrap();
            let field = |name: &str| detail[name].as_str().unwrap().to_string();
            (e["event"].as_str().unwrap().to_string(), field("actor"), field("reason"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_controls_record_the_principal_as_actor() {
    // Three sagas held in the backoff after their first reserve_stock attempt failed.
    let plan = Arc::new(FaultPlan::new());
    plan.add("place_order", "reserve_stock", Phase::Action, Fault::Fail(StepError::transient("refused")), 3);
    let dbs = fresh_databases().await;
    let mut config = with_auth(config(&dbs));
    config.backoff_base_ms = 120_000;
    config.backoff_cap_ms = 240_000;
    config.stuck_after_attempts = 1;
    let app = spawn_app_with(config, Some(plan.clone())).await;
    let Callers { a, admin, .. } = callers();
    create_product(&app, &admin, "p1", 100).await;
    let mut sagas = Vec::new();
    for _ in 0..3 {
        let request = app.client.post(app.url("/orders")).header("prefer", "respond-async").json(&body(None, 1));
        let placed = success(a.apply(request).send().await.unwrap(), 202).await;
        let saga = placed["saga_id"].as_str().unwrap().to_string();
        let path = format!("/sagas/{saga}");
        eventually(WAIT, "the saga failed its first attempt", || async {
            success(get(&app, &admin, &path).await, 200).await["stuck"] == true
        })
        .await;
        sagas.push(saga);
    }
    assert!(plan.exhausted());

    // The body's actor does not count with authentication on; none is needed.
    let settled = |saga: String| {
        let (app, admin) = (&app, &admin);
        async move {
            let path = format!("/sagas/{saga}");
            eventually(WAIT, "the saga settles", || async {
                let state = success(get(app, admin, &path).await, 200).await["state"].clone();
                state == "completed" || state == "compensated"
            })
            .await;
            success(get(app, admin, &path).await, 200).await
        }
    };
    // Ignored, but not unchecked: an actor the spec refuses is refused with a token too, and the
    // saga is left alone.
    let controls = [format!("/sagas/{}/retry", sagas[0]), format!("/sagas/{}/abort", sagas[0]), "/sagas/retry".into()];
    for bad in [json!("a".repeat(101)), json!(""), json!(" \t"), json!(7)] {
        let body = json!({"actor": bad, "reason": "inventory is back"});
        for path in &controls {
            let refused = problem(post(&app, &admin, path, &body).await, 422, "validation_failed").await;
            assert_eq!(refused["errors"][0]["field"], "actor", "{path} with actor {bad}: {refused}");
        }
    }
    let untouched = success(get(&app, &admin, &format!("/sagas/{}", sagas[0])).await, 200).await;
    assert!(operator_events(&untouched).is_empty(), "{untouched}");
    let claimed = json!({"actor": "someone-else", "reason": "inventory is back"});
    success(post(&app, &admin, &format!("/sagas/{}/retry", sagas[0]), &claimed).await, 200).await;
    let retried = settled(sagas[0].clone()).await;
    let claimed = json!({"actor": "someone-else", "reason": "customer called"});
    success(post(&app, &admin, &format!("/sagas/{}/abort", sagas[1]), &claimed).await, 200).await;
    let aborted = settled(sagas[1].clone()).await;
    let bulk = success(post(&app, &admin, "/sagas/retry?stuck=true", &json!({"reason": "all of them"})).await, 200);
    assert_eq!(bulk.await["retried"], 1, "only the third saga is still stuck");
    let bulk_retried = settled(sagas[2].clone()).await;

    let actor = |event: &str, reason: &str| vec![(event.to_string(), ADMIN.to_string(), reason.to_string())];
    assert_eq!(operator_events(&retried), actor("operator_retry", "inventory is back"));
    assert_eq!(retried["state"], "completed");
    assert_eq!(operator_events(&aborted), actor("operator_abort", "customer called"));
    assert_eq!(aborted["state"], "compensated");
    assert_eq!(operator_events(&bulk_retried), actor("operator_retry", "all of them"));
    assert_eq!(bulk_retried["state"], "completed");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_customers_order_stream_carries_steps_and_states_but_no_error_details() {
    let app = auth_app().await;
    let Callers { a, admin, .. } = callers();
    create_product(&app, &admin, "p1", 1).await;
    let rejected = problem(place(&app, &a, &body(None, 5), None).await, 409, "insufficient_stock").await;
    let path = format!("/orders/{}/events", rejected["order_id"].as_str().unwrap());

    let saga_events = |events: Vec<(String, Value)>| -> Vec<Value> {
        assert_eq!(events.first().map(|e| e.0.as_str()), Some("order"), "{events:?}");
        assert_eq!(events.last().map(|e| e.0.as_str()), Some("order"), "{events:?}");
        events.into_iter().filter(|(name, _)| name == "saga").map(|(_, data)| data).collect()
    };
    let customer = saga_events(stream_to_end(get(&app, &a, &path).await).await);
    let operator = saga_events(stream_to_end(get(&app, &admin, &path).await).await);

    // The admin sees why the step failed.
    let details: Vec<&Value> = operator.iter().map(|e| &e["detail"]).filter(|d| !d.is_null()).collect();
    assert!(!details.is_empty(), "the failed saga's events have details for the admin: {operator:#?}");
    assert!(details.iter().any(|d| d.to_string().contains("insufficient")), "{details:?}");
    // The customer sees the same steps and states, every detail null.
    let without_detail = |events: &[Value]| -> Vec<Value> {
        events
            .iter()
            .map(|e| json!({"saga_id": e["saga_id"], "seq": e["seq"], "step": e["step"], "event": e["event"]}))
            .collect()
    };
    assert_eq!(without_detail(&customer), without_detail(&operator));
    assert!(customer.iter().any(|e| e["step"] == "reserve_stock"), "{customer:#?}");
    for event in &customer {
        assert!(event.as_object().unwrap().contains_key("detail"), "{event}");
        assert_eq!(event["detail"], Value::Null, "a customer's saga event carries no detail: {event}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_accept_the_static_metrics_token_and_only_there() {
    const SCRAPE: &str = "static-scrape-token-0123456789";
    let dbs = fresh_databases().await;
    let mut config = with_auth(config(&dbs));
    config.metrics_token = Some(SCRAPE.parse().unwrap());
    let app = spawn_app_with(config, None).await;
    let Callers { a, admin, .. } = callers();
    let scrape = Auth::Bearer(SCRAPE.into());

    let metrics = get(&app, &scrape, "/metrics").await;
    assert_eq!(metrics.status(), 200);
    assert!(header(&metrics, "content-type").unwrap().starts_with("text/plain"));
    assert!(metrics.text().await.unwrap().contains("# TYPE order_saga_db_connections gauge"));
    assert_eq!(get(&app, &admin, "/metrics").await.status(), 200);
    problem(get(&app, &a, "/metrics").await, 403, "forbidden").await;
    problem(get(&app, &Auth::Nothing, "/metrics").await, 401, "unauthorized").await;
    let near_miss = Auth::Bearer(format!("{SCRAPE}x"));
    problem(get(&app, &near_miss, "/metrics").await, 401, "unauthorized").await;
    // The static token is no token anywhere else.
    for path in ["/products", "/orders", "/sagas"] {
        problem(get(&app, &scrape, path).await, 401, "unauthorized").await;
    }
    app.stop().await;
}

/// The comma-separated tokens of a header, lower-cased.
fn listed_in(response: &reqwest::Response, name: &str) -> BTreeSet<String> {
    header(response, name)
        .unwrap_or_else(|| panic!("no {name}"))
        .split(',')
        .map(|s| s.trim().to_ascii_lowercase())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn browsers_of_the_allowed_origin_preflight_without_a_token_and_read_401s() {
    let app = auth_app().await;
    let Callers { a, .. } = callers();
    let order = uuid::Uuid::now_v7().to_string();

    for (path, method) in [(format!("/orders/{order}/events"), "GET"), ("/orders".to_string(), "POST")] {
        let preflight = app
            .client
            .request(reqwest::Method::OPTIONS, app.url(&path))
            .header("origin", ORIGIN)
            .header("access-control-request-method", method)
            .header("access-control-request-headers", "authorization, last-event-id")
            .send()
            .await
            .unwrap();
        assert_eq!(preflight.status(), 200, "a preflight needs no token: {method} {path}");
        assert_eq!(header(&preflight, "access-control-allow-origin").as_deref(), Some(ORIGIN));
        let allowed = listed_in(&preflight, "access-control-allow-headers");
        assert!(allowed.contains("authorization") && allowed.contains("last-event-id"), "{allowed:?}");
        assert!(listed_in(&preflight, "access-control-allow-methods").contains(&method.to_ascii_lowercase()));
    }

    // A 401 is readable by the page, challenge included.
    let refused = app.client.get(app.url("/orders")).header("origin", ORIGIN).send().await.unwrap();
    assert_eq!(header(&refused, "access-control-allow-origin").as_deref(), Some(ORIGIN));
    assert!(listed_in(&refused, "access-control-expose-headers").contains("www-authenticate"));
    assert!(header(&refused, "www-authenticate").unwrap().starts_with("Bearer "));
    problem(refused, 401, "unauthorized").await;
    // So is a 403.
    let request = app.client.get(app.url("/sagas")).header("origin", ORIGIN);
    let forbidden = a.apply(request).send().await.unwrap();
    assert_eq!(header(&forbidden, "access-control-allow-origin").as_deref(), Some(ORIGIN));
    problem(forbidden, 403, "forbidden").await;
    // Another origin is not let in.
    let elsewhere = app.client.get(app.url("/orders")).header("origin", "https://evil.example").send().await.unwrap();
    assert_eq!(header(&elsewhere, "access-control-allow-origin"), None);
    problem(elsewhere, 401, "unauthorized").await;
    app.stop().await;
}
