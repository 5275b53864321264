//! Operator controls: `POST /sagas/{id}/retry`, `POST /sagas/{id}/abort` and `POST /sagas/retry`
//! on a real app and database. Sagas are held where a test wants them with injected step
//! failures and a long backoff (60 s or more after one failed attempt), so that a saga finishing
//! within the tests' 20 s waits was moved by the operator action, not by its own retry.
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use order_saga::saga::{Fault, FaultPlan, Phase, StepError};
use serde_json::{Value, json};

/// Long enough that a saga waiting out a backoff never finishes within a test's wait.
const LONG_BACKOFF_MS: u64 = 120_000;

/// How long a test waits for what an operator action sets off.
const WAIT: Duration = Duration::from_secs(20);

fn transient() -> Fault {
    Fault::Fail(StepError::transient("connection refused"))
}

/// An app whose failing steps wait [`LONG_BACKOFF_MS`] before their next attempt.
async fn slow_retrying_app(plan: &Arc<FaultPlan>) -> TestApp {
    let dbs = fresh_databases().await;
    let mut config = config(&dbs);
    config.backoff_base_ms = LONG_BACKOFF_MS;
    config.backoff_cap_ms = 2 * LONG_BACKOFF_MS;
    config.stuck_after_attempts = 1;
    config.order_wait_ms = 1000;
    spawn_app_with(config, Some(plan.clone())).await
}

/// Places an order without waiting for its saga; returns (order id, saga id).
async fn place_async(app: &TestApp, items: &[(&str, i64)]) -> (String, String) {
    let response = app
        .client
        .post(app.url("/orders"))
        .header("Prefer", "respond-async")
        .json(&order_body("c1", items))
        .send()
        .await
        .unwrap();
    assert!(response.status() == 202 || response.status() == 201, "{}", response.status());
    let body: Value = response.json().await.unwrap();
    (body["id"].as_str().unwrap().to_string(), body["saga_id"].as_str().unwrap().to_string())
}

fn by(reason: &str) -> Value {
    json!({"actor": "alice@ops", "reason": reason})
}

/// Waits until the saga has recorded a failed attempt (and so sits in its backoff).
async fn until_failed_once(app: &TestApp, saga: &str) {
    eventually(WAIT, "the saga records a failed attempt", || async {
        app.get_json(&format!("/sagas/{saga}")).await["attempts"].as_i64().unwrap() >= 1
    })
    .await;
}

async fn until_saga(app: &TestApp, saga: &str, state: &str) -> Value {
    let path = format!("/sagas/{saga}");
    eventually(WAIT, &format!("saga {saga} is {state}"), || async { app.get_json(&path).await["state"] == state })
        .await;
    app.get_json(&path).await
}

/// The operator events of a saga's history, as (event, actor, reason).
fn operator_events(saga: &Value) -> Vec<(String, String, String)> {
    saga["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"].as_str().unwrap().starts_with("operator_"))
        .map(|e| {
            assert!(e["step"].is_null(), "an operator event is saga-level: {e}");
            let detail: Value = serde_json::from_str(e["detail"].as_str().unwrap()).unwrap();
            (
                e["event"].as_str().unwrap().to_string(),
                detail["actor"].as_str().unwrap().to_string(),
                detail["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

async fn problem(response: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(response.status(), status);
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], code, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread")]
async fn abort_before_the_pivot_compensates_and_rejects_the_order_as_aborted() {
    let plan = Arc::new(FaultPlan::new());
    plan.add("place_order", "reserve_stock", Phase::Action, transient(), 1);
    let app = slow_retrying_app(&plan).await;
    app.create_product("p1", 500, 10).await;
    let (order, saga) = place_async(&app, &[("p1", 2)]).await;
    until_failed_once(&app, &saga).await;

    let response = app.post(&format!("/sagas/{saga}/abort"), &by("customer called to cancel")).await;
    assert_eq!(response.status(), 200);
    let answered: Value = response.json().await.unwrap();
    assert_eq!(answered["id"], saga.as_str());
    assert_ne!(answered["state"], "running", "a 200 abort has turned the saga backward: {answered}");

    let settled = until_saga(&app, &saga, "compensated").await;
    assert_eq!(
        operator_events(&settled),
        [("operator_abort".to_string(), "alice@ops".to_string(), "customer called to cancel".to_string())]
    );
    let events: Vec<&str> =
        settled["events"].as_array().unwrap().iter().map(|e| e["event"].as_str().unwrap()).collect();
    let abort_at = events.iter().position(|e| *e == "operator_abort").unwrap();
    assert_eq!(events[abort_at + 1], "compensating", "{events:?}");
    let order = app.get_json(&format!("/orders/{order}")).await;
    assert_eq!(order["status"], "rejected");
    assert_eq!(order["failure"]["code"], "aborted", "{order}");
    assert_stock_invariants(&app, &[("p1", 10)], true).await;
    assert_eq!(app.get_json("/products/p1").await["available"], 10);
    // Settled now: both actions are refused.
    for action in ["abort", "retry"] {
        let response = app.post(&format!("/sagas/{saga}/{action}"), &by("again")).await;
        let body = problem(response, 409, "saga_finished").await;
        assert_eq!(body["state"], "compensated");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_after_the_pivot_finishes_the_saga_now_and_abort_is_refused() {
    let plan = Arc::new(FaultPlan::new());
    plan.add("place_order", "commit_stock", Phase::Action, transient(), 1);
    let app = slow_retrying_app(&plan).await;
    app.create_product("p1", 500, 10).await;
    let (order, saga) = place_async(&app, &[("p1", 3)]).await;
    until_failed_once(&app, &saga).await;
    let stuck = app.get_json(&format!("/sagas/{saga}")).await;
    assert_eq!((stuck["state"].as_str(), stuck["stuck"].as_bool()), (Some("running"), Some(true)), "{stuck}");
    assert_eq!(app.get_json(&format!("/orders/{order}")).await["status"], "confirmed");

    let response = app.post(&format!("/sagas/{saga}/abort"), &by("too late")).await;
    problem(response, 409, "saga_past_pivot").await;

    let response = app.post(&format!("/sagas/{saga}/retry"), &by("inventory is back")).await;
    assert_eq!(response.status(), 200);
    let settled = until_saga(&app, &saga, "completed").await;
    assert_eq!(
        operator_events(&settled),
        [("operator_retry".to_string(), "alice@ops".to_string(), "inventory is back".to_string())],
        "the refused abort wrote nothing"
    );
    assert_eq!(app.get_json("/products/p1").await["sold"], 3);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn abort_of_a_compensating_saga_keeps_its_first_cause_and_drives_it_on_now() {
    let plan = Arc::new(FaultPlan::new());
    plan.add(
        "place_order",
        "create_order",
        Phase::Action,
        Fault::Fail(StepError::permanent("injected_failure", "a business rule said no")),
        1,
    );
    plan.add("place_order", "create_order", Phase::Compensation, transient(), 1);
    let app = slow_retrying_app(&plan).await;
    app.create_product("p1", 500, 10).await;
    let (order, saga) = place_async(&app, &[("p1", 1)]).await;
    until_failed_once(&app, &saga).await;
    assert_eq!(app.get_json(&format!("/sagas/{saga}")).await["state"], "compensating");

    let response = app.post(&format!("/sagas/{saga}/abort"), &by("stop it")).await;
    assert_eq!(response.status(), 200);
    let settled = until_saga(&app, &saga, "compensated").await;
    assert_eq!(operator_events(&settled).len(), 1);
    let order = app.get_json(&format!("/orders/{order}")).await;
    assert_eq!(order["status"], "rejected");
    assert_eq!(order["failure"]["code"], "injected_failure", "the first cause is kept: {order}");
    assert_eq!(app.get_json("/products/p1").await["available"], 10);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_aborted_cancel_leaves_the_order_confirmed_and_cancellable_again() {
    let plan = Arc::new(FaultPlan::new());
    let app = slow_retrying_app(&plan).await;
    app.create_product("p1", 500, 10).await;
    let placed = app.place_order("c1", &[("p1", 4)], None).await;
    assert_eq!(placed.status(), 201);
    let order: Value = placed.json().await.unwrap();
    let order_id = order["id"].as_str().unwrap();

    plan.add("cancel_order", "cancel", Phase::Action, transient(), 1);
    let response = app
        .client
        .post(app.url(&format!("/orders/{order_id}/cancel")))
        .header("Prefer", "respond-async")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let cancelling = app.get_json(&format!("/orders/{order_id}")).await;
    let cancel_saga = cancelling["cancel_saga_id"].as_str().expect("the cancel saga is attached").to_string();
    until_failed_once(&app, &cancel_saga).await;

    let response = app.post(&format!("/sagas/{cancel_saga}/abort"), &by("wrong order")).await;
    assert_eq!(response.status(), 200);
    until_saga(&app, &cancel_saga, "compensated").await;
    let order = app.get_json(&format!("/orders/{order_id}")).await;
    assert_eq!(order["status"], "confirmed", "{order}");
    assert_eq!(app.get_json("/products/p1").await["sold"], 4);

    // Cancellable again, by a new cancel saga.
    let response = app.client.post(app.url(&format!("/orders/{order_id}/cancel"))).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let cancelled: Value = response.json().await.unwrap();
    assert_eq!(cancelled["status"], "cancelled");
    let second_cancel = cancelled["cancel_saga_id"].as_str().unwrap().to_string();
    assert_ne!(second_cancel, cancel_saga);
    assert_eq!(app.get_json("/products/p1").await["available"], 10);

    // The order's event stream shows its three sagas in the order they were created, and the
    // last cursor counts the events of each.
    let stream = app.get(&format!("/orders/{order_id}/events")).await.text().await.unwrap();
    let mut sagas: Vec<String> = Vec::new();
    let mut last_id = String::new();
    for line in stream.lines() {
        if let Some(id) = line.strip_prefix("id: ") {
            last_id = id.to_string();
        }
        if let Some(data) = line.strip_prefix("data: ") {
            let data: Value = serde_json::from_str(data).unwrap();
            // `saga` events carry a seq; `order` events carry the order's own saga_id.
            let saga = data["saga_id"].as_str().filter(|_| data["seq"].is_i64());
            if let Some(saga) = saga.filter(|s| sagas.last().is_none_or(|l| l != s)) {
                sagas.push(saga.to_string());
            }
        }
    }
    let place_saga = order["saga_id"].as_str().unwrap().to_string();
    assert_eq!(sagas, [place_saga.clone(), cancel_saga.clone(), second_cancel.clone()], "{stream}");
    let counts: Vec<i64> = last_id.split('.').map(|n| n.parse().unwrap()).collect();
    let mut lengths = Vec::new();
    for saga in [&place_saga, &cancel_saga, &second_cancel] {
        lengths.push(app.get_json(&format!("/sagas/{saga}")).await["events"].as_array().unwrap().len() as i64);
    }
    assert_eq!(counts, lengths, "{stream}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bulk_retry_retries_every_matching_unfinished_saga() {
    let plan = Arc::new(FaultPlan::new());
    plan.add("place_order", "commit_stock", Phase::Action, transient(), 3);
    let app = slow_retrying_app(&plan).await;
    app.create_product("p1", 500, 10).await;
    let mut sagas = Vec::new();
    for _ in 0..3 {
        let (_, saga) = place_async(&app, &[("p1", 1)]).await;
        until_failed_once(&app, &saga).await;
        sagas.push(saga);
    }
    // One saga of the kind that has settled is not counted, nor is another kind.
    let done = app.place_order("c2", &[("p1", 1)], None).await;
    assert_eq!(done.status(), 201);

    let response = app.post("/sagas/retry?kind=cancel_order&stuck=true", &by("nothing")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap(), json!({"retried": 0}));
    let response = app.post("/sagas/retry?kind=place_order&stuck=true", &by("inventory is back")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap(), json!({"retried": 3}));
    for saga in &sagas {
        let settled = until_saga(&app, saga, "completed").await;
        assert_eq!(operator_events(&settled).len(), 1);
    }
    let response = app.post("/sagas/retry?stuck=maybe", &by("x")).await;
    problem(response, 422, "validation_failed").await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_operator_requests_get_clear_problems() {
    let app = spawn_app().await;
    app.create_product("p1", 500, 10).await;
    let placed: Value = app.place_order("c1", &[("p1", 1)], None).await.json().await.unwrap();
    let saga = placed["saga_id"].as_str().unwrap();
    let path = format!("/sagas/{saga}/retry");

    let body = problem(app.post(&path, &json!({"actor": "bob"})).await, 422, "validation_failed").await;
    assert_eq!(body["errors"][0]["field"], "reason");
    let body = problem(app.post(&path, &json!({"actor": " ", "reason": ""})).await, 422, "validation_failed").await;
    let fields: Vec<&str> = body["errors"].as_array().unwrap().iter().map(|e| e["field"].as_str().unwrap()).collect();
    assert_eq!(fields, ["reason", "actor"]);
    let long = "x".repeat(501);
    problem(app.post(&path, &json!({"actor": "bob", "reason": long})).await, 422, "validation_failed").await;
    let response = app.client.post(app.url(&path)).body("reason=why").send().await.unwrap();
    problem(response, 415, "unsupported_media_type").await;
    let response =
        app.client.post(app.url(&path)).header("content-type", "application/json").body("{").send().await.unwrap();
    problem(response, 400, "malformed_json").await;
    problem(app.post("/sagas/nope/abort", &by("x")).await, 404, "not_found").await;
    problem(app.post(&path, &by("x")).await, 409, "saga_finished").await;
    app.stop().await;
}

/// Aborts racing the pivot: whichever write commits first in the log database wins, and an
/// abort answered 200 never ends with its saga past the pivot.
#[tokio::test(flavor = "multi_thread")]
async fn an_abort_racing_the_pivot_is_decided_by_the_log() {
    let app = spawn_app().await;
    app.create_product("p1", 100, 1000).await;
    let app = Arc::new(app);
    let mut races = Vec::new();
    for _ in 0..40 {
        let app = app.clone();
        races.push(tokio::spawn(async move {
            let (order, saga) = place_async(&app, &[("p1", 1)]).await;
            let response = app.post(&format!("/sagas/{saga}/abort"), &by("race")).await;
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap();
            (order, saga, status, body)
        }));
    }
    let (mut won, mut lost) = (0, 0);
    for race in races {
        let (order, saga, status, body) = race.await.unwrap();
        let settled = until_saga_settled(&app, &saga).await;
        let order = app.get_json(&format!("/orders/{order}")).await;
        match status {
            200 => {
                won += 1;
                assert_eq!(settled, "compensated", "a 200 abort never ends past the pivot");
                assert_eq!(
                    (order["status"].as_str(), order["failure"]["code"].as_str()),
                    (Some("rejected"), Some("aborted"))
                );
            }
            409 => {
                lost += 1;
                assert!(body["code"] == "saga_past_pivot" || body["code"] == "saga_finished", "{body}");
                assert_eq!(settled, "completed");
                assert_eq!(order["status"], "confirmed");
            }
            other => panic!("abort answered {other}: {body}"),
        }
    }
    assert_eq!(won + lost, 40);
    let p = app.get_json("/products/p1").await;
    assert_eq!(p["sold"].as_i64().unwrap(), lost, "{p}");
    assert_eq!(p["reserved"], 0);
}

async fn until_saga_settled(app: &TestApp, saga: &str) -> String {
    let path = format!("/sagas/{saga}");
    eventually(WAIT, "the saga settles", || async {
        matches!(app.get_json(&path).await["state"].as_str(), Some("completed" | "compensated"))
    })
    .await;
    app.get_json(&path).await["state"].as_str().unwrap().to_string()
}
