//! The `place_order` and `cancel_order` sagas through the real app: failures on purpose
//! (permanent and transient, before and after the pivot, of compensations), the deadline, the
//! stuck flag and the reservation tombstone, each with the invariants of docs/design.md
//! checked after it. Every step crashed, repeated and answered-lost is in `saga_matrix.rs`.
mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use order_saga::config::Config;
use order_saga::inventory::{self, Line};
use order_saga::orders::{OrderStatus, PlaceOrder, cancel_order, place_order};
use order_saga::saga::{Event, Fault, FaultInjector, FaultPlan, Phase, SagaFilter, SagaRecord, SagaState, StepError};
use serde_json::Value;
use sqlx::Row;

const PLACE: &str = place_order::KIND.name;
const CANCEL: &str = cancel_order::KIND.name;
/// Products and the stock added to each.
const STOCK: [(&str, i64); 2] = [("sku-a", 10), ("sku-b", 5)];
const PRICES: [(&str, i64); 2] = [("sku-a", 1250), ("sku-b", 300)];
/// The order every test places: 2 x 1250 + 1 x 300.
const ITEMS: [(&str, i64); 2] = [("sku-a", 2), ("sku-b", 1)];
const TOTAL: i64 = 2800;
const SETTLE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// A test config: fast retries flag a saga stuck after 3 failed attempts.
fn test_config(dbs: &TestDatabases) -> Config {
    let mut config = config(dbs);
    config.stuck_after_attempts = 3;
    config
}

/// An app on fresh databases with `faults`, and the test's products.
async fn app_with(faults: Arc<dyn FaultInjector>, tweak: impl FnOnce(&mut Config)) -> TestApp {
    let dbs = fresh_databases().await;
    let mut config = test_config(&dbs);
    tweak(&mut config);
    let app = spawn_app_with(config, Some(faults)).await;
    add_products(&app).await;
    app
}

async fn add_products(app: &TestApp) {
    for ((id, stock), (_, price)) in STOCK.iter().zip(PRICES) {
        app.create_product(id, price, *stock).await;
    }
}

fn plan() -> Arc<FaultPlan> {
    Arc::new(FaultPlan::new())
}

fn permanent() -> Fault {
    Fault::Fail(StepError::permanent("injected_failure", "a business rule said no"))
}

fn transient() -> Fault {
    Fault::Fail(StepError::transient("connection reset"))
}

fn lines(items: &[(&str, i64)]) -> Vec<Line> {
    items.iter().map(|(p, q)| Line { product_id: p.to_string(), quantity: *q }).collect()
}

/// POSTs the test order and returns the HTTP status and the order as it then stands.
async fn place(app: &TestApp, items: &[(&str, i64)]) -> (u16, Value) {
    let response = app.place_order("c-1", items, None).await;
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    let id = match status {
        201 | 202 => body["id"].as_str().unwrap().to_string(),
        _ => body["order_id"].as_str().unwrap_or_else(|| panic!("a rejection names its order: {body}")).to_string(),
    };
    (status, app.get_json(&format!("/orders/{id}")).await)
}

/// Places the test order and asserts it is confirmed.
async fn place_confirmed(app: &TestApp) -> Value {
    let (status, order) = place(app, &ITEMS).await;
    assert_eq!((status, order["status"].as_str()), (201, Some("confirmed")), "{order}");
    order
}

/// POSTs a cancellation and returns the HTTP status and its body.
async fn cancel(app: &TestApp, order_id: &str) -> (u16, Value) {
    let response = app.client.post(app.url(&format!("/orders/{order_id}/cancel"))).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

async fn saga(app: &TestApp, id: &str) -> (SagaRecord, Vec<Event>) {
    app.engine.saga(id).await.unwrap().expect("the saga is in the log")
}

fn count(events: &[Event], step: &str, event: &str) -> usize {
    events.iter().filter(|e| e.step.as_deref() == Some(step) && e.kind.as_str() == event).count()
}

fn str_of<'a>(value: &'a Value, key: &str) -> &'a str {
    value[key].as_str().unwrap_or_else(|| panic!("{key} in {value}"))
}

/// Each product's (available, reserved, sold).
async fn stock(app: &TestApp) -> Vec<(i64, i64, i64)> {
    stock_levels(app, &STOCK).await
}

/// Stock when the test order holds nothing.
const UNTOUCHED: [(i64, i64, i64); 2] = [(10, 0, 0), (5, 0, 0)];
/// Stock once the test order is sold.
const SOLD: [(i64, i64, i64); 2] = [(8, 0, 2), (4, 0, 1)];

/// Every reservation row: (saga, product) -> (quantity, status).
async fn reservations(app: &TestApp) -> BTreeMap<(String, String), (i64, String)> {
    let rows = sqlx::query("SELECT saga_id, product_id, quantity, status FROM reservations")
        .fetch_all(&app.state.inventory.db().pool)
        .await
        .unwrap();
    rows.iter()
        .map(|r| ((r.get("saga_id"), r.get("product_id")), (r.get::<i64, _>("quantity"), r.get("status"))))
        .collect()
}

/// The reservations of one saga: product -> (quantity, status).
async fn reservations_of(app: &TestApp, saga_id: &str) -> BTreeMap<String, (i64, String)> {
    reservations(app).await.into_iter().filter(|((s, _), _)| s == saga_id).map(|((_, p), v)| (p, v)).collect()
}

fn with_status(items: &[(&str, i64)], status: &str) -> BTreeMap<String, (i64, String)> {
    items.iter().map(|(p, q)| (p.to_string(), (*q, status.to_string()))).collect()
}

/// The invariants of docs/design.md, once everything has settled: stock adds up and nothing is
/// reserved; no saga unfinished or stuck; no order pending; every confirmed order's items are
/// exactly its saga's committed reservations (one per product); a rejected order holds no stock;
/// a cancelled order's stock is back; `sold` and `reserved` are exactly the committed and reserved
/// reservations.
async fn assert_invariants(app: &TestApp) {
    assert_stock_invariants(app, &STOCK, true).await;
    let sagas = app.engine.list(&SagaFilter { limit: 1000, ..SagaFilter::default() }).await.unwrap();
    for s in &sagas {
        assert!(s.state.is_final() && !s.stuck && s.owner.is_none(), "saga {} settled and released: {s:?}", s.id);
    }
    let reservations = reservations(app).await;
    let orders = app.state.orders.list(None, None, None, 1000).await.unwrap();
    for order in &orders {
        let held: BTreeMap<String, (i64, String)> = reservations
            .iter()
            .filter(|((s, _), _)| *s == order.saga_id)
            .map(|((_, p), v)| (p.clone(), v.clone()))
            .collect();
        let items: Vec<(&str, i64)> = order.items.iter().map(|i| (i.product_id.as_str(), i.quantity)).collect();
        let place_state = saga(app, &order.saga_id).await.0.state;
        match order.status {
            OrderStatus::Pending => panic!("order {} still pending once settled", order.id),
            OrderStatus::Confirmed => {
                assert_eq!(place_state, SagaState::Completed, "order {}", order.id);
                assert_eq!(held, with_status(&items, "committed"), "confirmed order {}: {order:?}", order.id);
                assert!(order.items.iter().all(|i| i.unit_price_cents.is_some()), "{order:?}");
                assert!(order.total_cents.is_some(), "{order:?}");
            }
            OrderStatus::Rejected => {
                assert_eq!(place_state, SagaState::Compensated, "order {}", order.id);
                assert!(order.failure.is_some(), "a rejected order says why: {order:?}");
                assert!(
                    held.values().all(|(_, status)| status == "released"),
                    "rejected order {} holds no stock: {held:?}",
                    order.id
                );
            }
            OrderStatus::Cancelled => {
                assert_eq!(place_state, SagaState::Completed, "order {}", order.id);
                let cancel_saga = order.cancel_saga_id.as_deref().expect("a cancelled order has a cancel saga");
                assert_eq!(saga(app, cancel_saga).await.0.state, SagaState::Completed);
                assert_eq!(held, with_status(&items, "returned"), "cancelled order {}", order.id);
            }
        }
    }
    for (product, _) in STOCK {
        let p = app.state.inventory.get(product).await.unwrap();
        let sum = |status: &str| -> i64 {
            reservations.iter().filter(|((_, pr), (_, st))| pr == product && st == status).map(|(_, (q, _))| q).sum()
        };
        assert_eq!(p.sold, sum("committed"), "sold of {product} = its committed reservations");
        assert_eq!(p.reserved, sum("reserved"), "reserved of {product} = its held reservations");
    }
}

// ---------------------------------------------------------------------------------------------
// place_order: failures before the pivot
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn places_an_order_without_faults() {
    let app = app_with(plan(), |_| {}).await;
    let order = place_confirmed(&app).await;
    assert_eq!(order["total_cents"], TOTAL);
    assert_eq!(stock(&app).await, SOLD);
    let (record, _) = saga(&app, str_of(&order, "saga_id")).await;
    assert_eq!(record.state, SagaState::Completed);
    assert_invariants(&app).await;
    app.stop().await;
}

/// A permanent failure of `step` (before or at the pivot) rejects the order and holds no stock.
async fn rejected_by_permanent_failure_of(step: &str) {
    let plan = plan();
    plan.add(PLACE, step, Phase::Action, permanent(), 1);
    let app = app_with(plan.clone(), |_| {}).await;
    let (status, order) = place(&app, &ITEMS).await;
    assert_eq!(status, 409, "{order}");
    assert_eq!(order["status"], "rejected", "{order}");
    assert_eq!(order["failure"]["code"], "injected_failure", "{order}");
    assert!(plan.exhausted());
    let saga_id = str_of(&order, "saga_id");
    let (record, events) = saga(&app, saga_id).await;
    assert_eq!(record.state, SagaState::Compensated, "{events:#?}");
    assert_eq!(record.failure.as_ref().unwrap()["step"], step);
    let undone: Vec<&str> =
        events.iter().filter(|e| e.kind.as_str() == "compensated").filter_map(|e| e.step.as_deref()).collect();
    assert_eq!(undone, ["create_order", "reserve_stock"], "compensated last to first: {events:#?}");
    assert_eq!(stock(&app).await, UNTOUCHED);
    assert_eq!(reservations_of(&app, saga_id).await, with_status(&ITEMS, "released"));
    assert_invariants(&app).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failure_of_reserve_stock_rejects_the_order() {
    rejected_by_permanent_failure_of("reserve_stock").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failure_of_create_order_rejects_the_order() {
    rejected_by_permanent_failure_of("create_order").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failure_of_confirm_rejects_the_order() {
    rejected_by_permanent_failure_of("confirm").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insufficient_stock_rejects_the_order_and_holds_nothing() {
    let app = app_with(plan(), |_| {}).await;
    let response = app.place_order("c-1", &[("sku-a", 2), ("sku-b", 6)], None).await;
    assert_eq!(response.status(), 409);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "insufficient_stock", "{problem}");
    assert_eq!(problem["product_id"], "sku-b", "{problem}");
    let order = app.get_json(&format!("/orders/{}", str_of(&problem, "order_id"))).await;
    assert_eq!(order["status"], "rejected");
    assert_eq!(stock(&app).await, UNTOUCHED, "sku-a's reservation rolled back with sku-b's failure");
    assert_invariants(&app).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_before_the_pivot_are_retried() {
    let plan = plan();
    for step in ["reserve_stock", "create_order", "confirm"] {
        plan.add(PLACE, step, Phase::Action, transient(), 2);
    }
    let app = app_with(plan.clone(), |_| {}).await;
    let order = place_confirmed(&app).await;
    assert!(plan.exhausted());
    let (_, events) = saga(&app, str_of(&order, "saga_id")).await;
    for step in ["reserve_stock", "create_order", "confirm"] {
        assert_eq!(count(&events, step, "failed"), 2, "{step}: {events:#?}");
        assert_eq!(count(&events, step, "succeeded"), 1, "{step}: {events:#?}");
    }
    assert_eq!(stock(&app).await, SOLD);
    assert_invariants(&app).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_failing_past_its_deadline_rejects_the_order() {
    let plan = plan();
    plan.add(PLACE, "create_order", Phase::Action, transient(), u32::MAX);
    let app = app_with(plan, |c| c.saga_deadline_ms = 300).await;
    let (status, order) = place(&app, &ITEMS).await;
    assert_eq!(status, 409, "{order}");
    assert_eq!(order["status"], "rejected");
    assert_eq!(order["failure"]["code"], "deadline_exceeded", "{order}");
    assert_eq!(stock(&app).await, UNTOUCHED);
    assert_invariants(&app).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_compensations_are_retried_until_compensated() {
    let plan = plan();
    plan.add(PLACE, "confirm", Phase::Action, permanent(), 1);
    plan.add(PLACE, "create_order", Phase::Compensation, transient(), 3);
    plan.add(PLACE, "reserve_stock", Phase::Compensation, transient(), 3);
    let app = app_with(plan.clone(), |_| {}).await;
    let (status, order) = place(&app, &ITEMS).await;
    assert_eq!((status, order["status"].as_str()), (409, Some("rejected")), "{order}");
    assert!(plan.exhausted());
    let (record, events) = saga(&app, str_of(&order, "saga_id")).await;
    assert_eq!(record.state, SagaState::Compensated);
    for step in ["create_order", "reserve_stock"] {
        assert_eq!(count(&events, step, "compensation_failed"), 3, "{step}: {events:#?}");
        assert_eq!(count(&events, step, "stuck"), 1, "{step} flagged stuck at the 3rd attempt: {events:#?}");
        assert_eq!(count(&events, step, "compensated"), 1, "{step}: {events:#?}");
    }
    assert_eq!(stock(&app).await, UNTOUCHED);
    assert_invariants(&app).await;
    app.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Failures after the pivot: retried until done
// ---------------------------------------------------------------------------------------------

async fn commit_stock_retried_after(fault: Fault) {
    let plan = plan();
    plan.add(PLACE, "commit_stock", Phase::Action, fault, 4);
    let app = app_with(plan.clone(), |_| {}).await;
    let order = place_confirmed(&app).await;
    assert!(plan.exhausted());
    let (record, events) = saga(&app, str_of(&order, "saga_id")).await;
    assert_eq!(record.state, SagaState::Completed);
    assert!(!record.stuck, "the stuck flag cleared");
    assert_eq!(count(&events, "commit_stock", "failed"), 4, "{events:#?}");
    assert_eq!(count(&events, "commit_stock", "stuck"), 1, "{events:#?}");
    assert!(events.iter().all(|e| e.kind.as_str() != "compensating"), "never compensates past the pivot: {events:#?}");
    assert_eq!(stock(&app).await, SOLD);
    assert_invariants(&app).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_stock_failing_permanently_is_retried_until_done() {
    commit_stock_retried_after(permanent()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_stock_failing_transiently_is_retried_until_done() {
    commit_stock_retried_after(transient()).await;
}

/// Cancels the test order with `fault` on `step` of cancel_order, `times` times.
async fn cancelled_despite(step: &str, fault: Fault, times: u32) {
    let plan = plan();
    plan.add(CANCEL, step, Phase::Action, fault, times);
    let app = app_with(plan.clone(), |_| {}).await;
    let order = place_confirmed(&app).await;
    let (status, body) = cancel(&app, str_of(&order, "id")).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("cancelled")), "{body}");
    assert!(plan.exhausted());
    let cancelled = app.state.orders.get(str_of(&order, "id")).await.unwrap();
    let (record, events) = saga(&app, cancelled.cancel_saga_id.as_deref().unwrap()).await;
    assert_eq!(record.state, SagaState::Completed, "{events:#?}");
    assert_eq!(count(&events, step, "failed"), times as usize, "{events:#?}");
    assert_eq!(stock(&app).await, UNTOUCHED, "the stock is back");
    assert_invariants(&app).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn return_stock_failing_permanently_is_retried_until_done() {
    cancelled_despite("return_stock", permanent(), 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn return_stock_failing_transiently_is_retried_until_done() {
    cancelled_despite("return_stock", transient(), 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_failing_transiently_is_retried() {
    cancelled_despite("cancel", transient(), 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_failing_permanently_leaves_the_order_confirmed() {
    let plan = plan();
    plan.add(CANCEL, "cancel", Phase::Action, permanent(), 1);
    let app = app_with(plan.clone(), |_| {}).await;
    let order = place_confirmed(&app).await;
    let (status, body) = cancel(&app, str_of(&order, "id")).await;
    assert_eq!(status, 409, "{body}");
    let after = app.state.orders.get(str_of(&order, "id")).await.unwrap();
    assert_eq!(after.status, OrderStatus::Confirmed);
    let (record, _) = saga(&app, after.cancel_saga_id.as_deref().unwrap()).await;
    assert_eq!(record.state, SagaState::Compensated);
    assert_eq!(stock(&app).await, SOLD, "the stock stays sold");
    assert_invariants(&app).await;
    app.stop().await;
}

/// Fails commit_stock transiently while `failing` is set.
struct CommitOutage {
    failing: AtomicBool,
}

impl FaultInjector for CommitOutage {
    fn fault(&self, kind: &str, step: &str, phase: Phase, _attempt: u32) -> Option<Fault> {
        (kind == PLACE && step == "commit_stock" && phase == Phase::Action && self.failing.load(Ordering::SeqCst))
            .then(transient)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_while_commit_stock_still_retries_returns_the_reserved_stock() {
    let outage = Arc::new(CommitOutage { failing: AtomicBool::new(true) });
    let app = app_with(outage.clone(), |_| {}).await;
    let request = PlaceOrder { customer_id: "c-1".into(), items: lines(&ITEMS) };
    let order = app.state.orders.place(request, None, true).await.unwrap().order;
    // Confirmed at the pivot, its stock still reserved while commit_stock retries.
    eventually(SETTLE, "the order is confirmed and commit_stock retries", || {
        let (app, id) = (&app, &order.saga_id);
        async move { saga(app, id).await.0.current_step == 3 && saga(app, id).await.0.attempts >= 1 }
    })
    .await;
    assert_eq!(app.state.orders.get(&order.id).await.unwrap().status, OrderStatus::Confirmed);
    assert_eq!(stock(&app).await, [(8, 2, 0), (4, 1, 0)]);
    let (status, body) = cancel(&app, &order.id).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("cancelled")), "{body}");
    assert_eq!(stock(&app).await, UNTOUCHED, "the reserved stock went back");
    outage.failing.store(false, Ordering::SeqCst);
    assert!(app.engine.wait_settled(&order.saga_id, SETTLE).await.unwrap().is_some());
    assert_eq!(saga(&app, &order.saga_id).await.0.state, SagaState::Completed);
    assert_eq!(stock(&app).await, UNTOUCHED, "a late commit finds nothing to commit");
    assert_invariants(&app).await;
    app.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The reservation tombstone
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_before_the_reserve_leaves_a_tombstone_that_makes_the_reserve_a_no_op() {
    let app = app_with(plan(), |_| {}).await;
    let saga_id = uuid::Uuid::now_v7().to_string();
    let lines = lines(&ITEMS);
    let pool = &app.state.inventory.db().pool;

    let mut tx = pool.begin().await.unwrap();
    inventory::release(&mut tx, &saga_id, &lines).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(reservations_of(&app, &saga_id).await, with_status(&ITEMS, "released"), "tombstones");

    let mut tx = pool.begin().await.unwrap();
    let prices = inventory::reserve(&mut tx, &saga_id, &lines).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(prices["sku-a"], 1250);
    assert_eq!(stock(&app).await, UNTOUCHED, "the late reserve took nothing");
    assert_eq!(reservations_of(&app, &saga_id).await, with_status(&ITEMS, "released"));

    // Neither a late commit nor a return finds anything to move.
    let mut tx = pool.begin().await.unwrap();
    inventory::commit(&mut tx, &saga_id).await.unwrap();
    inventory::return_stock(&mut tx, &saga_id).await.unwrap();
    inventory::release(&mut tx, &saga_id, &lines).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(stock(&app).await, UNTOUCHED);
    assert_eq!(reservations_of(&app, &saga_id).await, with_status(&ITEMS, "released"));
    assert_invariants(&app).await;
    app.stop().await;
}
