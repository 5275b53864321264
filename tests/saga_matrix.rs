//! Every step of every order saga, failed, crashed, repeated and answered-lost on purpose, on
//! the path production runs: batching on, the log database's steps sharing transactions (in
//! the spirit of omicron's saga test helpers). For each step of `definition().steps` the matrix:
//! - fails it permanently: before or at the pivot nothing is left behind; after it, the saga
//!   retries until done;
//! - crashes the engine right before it and right after its commit, and lets a fresh engine on
//!   the same databases finish the saga;
//! - runs it twice; loses the answer to the commit that records it (the resync path);
//! - and for each step with a compensation, after the pivot failed: runs the compensation twice,
//!   crashes before and after it, loses its answer.
//!
//! A saga is a [`Subject`]: how to start one, and what a completed or compensated one must have
//! left. Adding a step to a definition adds its cases, because they are drawn from the
//! definition. Every case checks the history too: gap-free, each step succeeded at most once,
//! and folded through the log's state machine it gives exactly the `sagas` row.
mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use order_saga::config::Config;
use order_saga::inventory::Line;
use order_saga::orders::{OrderStatus, PlaceOrder, cancel_order, place_order};
use order_saga::saga::state::{Position, next};
use order_saga::saga::{EventKind, Fault, FaultPlan, Phase, SagaDefinition, SagaState, StepError};
use sqlx::Row;

const SETTLE: Duration = Duration::from_secs(30);
/// Products and the stock added to each.
const STOCK: [(&str, i64); 2] = [("sku-a", 10), ("sku-b", 5)];
const PRICES: [(&str, i64); 2] = [("sku-a", 1250), ("sku-b", 300)];
/// The order every case places: 2 x 1250 + 1 x 300.
const ITEMS: [(&str, i64); 2] = [("sku-a", 2), ("sku-b", 1)];
/// Stock when the order holds nothing, and once it is sold: (available, reserved, sold).
const UNTOUCHED: [(i64, i64, i64); 2] = [(10, 0, 0), (5, 0, 0)];
const SOLD: [(i64, i64, i64); 2] = [(8, 0, 2), (4, 0, 1)];

// ---------------------------------------------------------------------------------------------
// The sagas under test
// ---------------------------------------------------------------------------------------------

/// One started saga: its id and its order.
struct Started {
    saga_id: String,
    order_id: String,
}

/// A saga under test.
trait Subject {
    /// The definition whose steps the matrix walks.
    fn definition() -> SagaDefinition;
    /// Prepares `app` (which has the faults) and starts one saga, not waiting for it.
    async fn start(app: &TestApp) -> Started;
    /// What a completed saga must leave.
    async fn completed(app: &TestApp, started: &Started);
    /// What a compensated saga must leave: nothing behind.
    async fn compensated(app: &TestApp, started: &Started);
}

struct PlaceOrderSaga;

impl Subject for PlaceOrderSaga {
    fn definition() -> SagaDefinition {
        place_order::definition()
    }

    async fn start(app: &TestApp) -> Started {
        let request = PlaceOrder { customer_id: "c-1".into(), items: lines() };
        let order = app.state.orders.place(request, None, true).await.unwrap().order;
        Started { saga_id: order.saga_id, order_id: order.id }
    }

    async fn completed(app: &TestApp, started: &Started) {
        let order = app.state.orders.get(&started.order_id).await.unwrap();
        assert_eq!(order.status, OrderStatus::Confirmed, "{order:?}");
        assert_eq!(order.total_cents, Some(2800), "{order:?}");
        assert_eq!(stock(app).await, SOLD);
        assert_eq!(reservations(app, &started.saga_id).await, with_status("committed"));
    }

    async fn compensated(app: &TestApp, started: &Started) {
        let order = app.state.orders.get(&started.order_id).await.unwrap();
        assert_eq!(order.status, OrderStatus::Rejected, "{order:?}");
        assert!(order.failure.is_some(), "a rejected order says why: {order:?}");
        assert_eq!(stock(app).await, UNTOUCHED, "a rejected order holds no stock");
        assert_eq!(reservations(app, &started.saga_id).await, with_status("released"), "released or tombstones");
    }
}

struct CancelOrderSaga;

impl Subject for CancelOrderSaga {
    fn definition() -> SagaDefinition {
        cancel_order::definition()
    }

    async fn start(app: &TestApp) -> Started {
        let request = PlaceOrder { customer_id: "c-1".into(), items: lines() };
        let placed = app.state.orders.place(request, None, false).await.unwrap().order;
        assert_eq!(placed.status, OrderStatus::Confirmed);
        // Waits ORDER_WAIT_MS at most; the answer is moot, the saga goes on in its own task.
        let _ = app.state.orders.cancel(&placed.id, None).await;
        let order = app.state.orders.get(&placed.id).await.unwrap();
        Started { saga_id: order.cancel_saga_id.expect("the cancel saga is written ahead"), order_id: placed.id }
    }

    async fn completed(app: &TestApp, started: &Started) {
        let order = app.state.orders.get(&started.order_id).await.unwrap();
        assert_eq!(order.status, OrderStatus::Cancelled, "{order:?}");
        assert_eq!(stock(app).await, UNTOUCHED, "the stock is back");
        assert_eq!(reservations(app, &order.saga_id).await, with_status("returned"));
    }

    async fn compensated(app: &TestApp, started: &Started) {
        let order = app.state.orders.get(&started.order_id).await.unwrap();
        assert_eq!(order.status, OrderStatus::Confirmed, "a cancel that failed leaves the order: {order:?}");
        assert_eq!(stock(app).await, SOLD, "the stock stays sold");
        assert_eq!(reservations(app, &order.saga_id).await, with_status("committed"));
    }
}

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

fn lines() -> Vec<Line> {
    ITEMS.iter().map(|(p, q)| Line { product_id: p.to_string(), quantity: *q }).collect()
}

/// Fast retries, a short lease (a killed engine's sagas are taken over quickly), short waits.
fn matrix_config(dbs: &TestDatabases) -> Config {
    let mut config = config(dbs);
    config.stuck_after_attempts = 3;
    config.lease_ms = 300;
    config.recovery_interval_ms = 50;
    config.order_wait_ms = 200;
    config
}

/// An app on fresh databases with `plan`, and the products.
async fn app_with(plan: Arc<FaultPlan>) -> TestApp {
    let dbs = fresh_databases().await;
    let app = spawn_app_with(matrix_config(&dbs), Some(plan)).await;
    for ((id, stock), (_, price)) in STOCK.iter().zip(PRICES) {
        app.create_product(id, price, *stock).await;
    }
    app
}

fn permanent() -> Fault {
    Fault::Fail(StepError::permanent("injected_failure", "a business rule said no"))
}

/// Each product's (available, reserved, sold).
async fn stock(app: &TestApp) -> Vec<(i64, i64, i64)> {
    stock_levels(app, &STOCK).await
}

/// The reservations of one place_order saga: product -> (quantity, status).
async fn reservations(app: &TestApp, saga_id: &str) -> BTreeMap<String, (i64, String)> {
    let rows = sqlx::query("SELECT product_id, quantity, status FROM reservations WHERE saga_id = $1")
        .bind(saga_id)
        .fetch_all(&app.state.inventory.db().pool)
        .await
        .unwrap();
    rows.iter().map(|r| (r.get("product_id"), (r.get::<i64, _>("quantity"), r.get("status")))).collect()
}

fn with_status(status: &str) -> BTreeMap<String, (i64, String)> {
    ITEMS.iter().map(|(p, q)| (p.to_string(), (*q, status.to_string()))).collect()
}

/// Waits for `saga_id` to settle on `app` and checks its history against its row: seqs gap-free
/// from 0, only kinds this build writes, each step succeeded at most once, and the events folded
/// through the state machine from the start give exactly the row's position.
async fn settled<S: Subject>(app: &TestApp, saga_id: &str, state: SagaState, case: &str) {
    assert!(app.engine.wait_settled(saga_id, SETTLE).await.unwrap().is_some(), "{case}: the saga settles");
    let (saga, events) = app.engine.saga(saga_id).await.unwrap().unwrap();
    assert_eq!(saga.state, state, "{case}: {saga:?}\n{events:#?}");
    assert!(!saga.stuck && saga.owner.is_none() && saga.lease_expires_at == 0, "{case}: released: {saga:?}");
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (0..saga.next_seq).collect::<Vec<_>>(), "{case}: a gap-free history: {events:#?}");
    let def = S::definition();
    let shape = def.shape();
    let mut position = Position::START;
    for event in &events {
        assert!(!matches!(event.kind, EventKind::Unknown(_)), "{case}: {event:?}");
        let step = event.step.as_deref().map(|name| shape.index_of(name).expect("a step of the definition"));
        position = next(shape, position, step, &event.kind)
            .unwrap_or_else(|e| panic!("{case}: the history is legal: {e}\n{events:#?}"))
            .position;
    }
    assert_eq!(position, saga.position(), "{case}: the row is what the history computes: {events:#?}");
    for step in &def.steps {
        let succeeded =
            events.iter().filter(|e| e.step.as_deref() == Some(step.name) && e.kind == EventKind::Succeeded).count();
        assert!(succeeded <= 1, "{case}: {} succeeded {succeeded} times: {events:#?}", step.name);
    }
}

/// Runs one case: a fresh app with `plan`, one saga, and (if `crash`) the engine killed once the
/// plan's faults are used up and a fresh app started on the same databases. Returns the app
/// that finishes the saga (and the first one, to stop) and the saga.
async fn run_case<S: Subject>(plan: Arc<FaultPlan>, crash: bool) -> (TestApp, Option<TestApp>, Started) {
    let first = app_with(plan.clone()).await;
    let started = S::start(&first).await;
    eventually(SETTLE, "the planned faults fire", || {
        let plan = plan.clone();
        async move { plan.exhausted() }
    })
    .await;
    if !crash {
        return (first, None, started);
    }
    // The first engine dies: its leases stay until they expire, as a killed process's would.
    first.engine.kill();
    let second = spawn_app_with(matrix_config(&first.dbs), None).await;
    assert_ne!(second.engine.instance_id(), first.engine.instance_id());
    (second, Some(first), started)
}

async fn finish(app: TestApp, first: Option<TestApp>) {
    app.stop().await;
    if let Some(first) = first {
        first.stop().await;
    }
}

/// True when a permanent failure of step `index` still turns the saga backward (it is not past
/// the pivot).
fn compensable_before_pivot(def: &SagaDefinition, index: usize) -> bool {
    !def.shape().past_pivot(index)
}

// ---------------------------------------------------------------------------------------------
// The cases, each over every step of the definition
// ---------------------------------------------------------------------------------------------

/// Fails each step's action permanently.
async fn fail_permanently<S: Subject>() {
    let def = S::definition();
    for (index, step) in def.steps.iter().enumerate() {
        let case = format!("{} fails permanently", step.name);
        let plan = Arc::new(FaultPlan::new());
        let times = if compensable_before_pivot(&def, index) { 1 } else { 4 };
        plan.add(def.kind, step.name, Phase::Action, permanent(), times);
        let (app, first, started) = run_case::<S>(plan, false).await;
        if compensable_before_pivot(&def, index) {
            settled::<S>(&app, &started.saga_id, SagaState::Compensated, &case).await;
            S::compensated(&app, &started).await;
            let (saga, _) = app.engine.saga(&started.saga_id).await.unwrap().unwrap();
            assert_eq!(saga.failure.as_ref().unwrap()["step"], step.name, "{case}");
        } else {
            // Past the pivot a saga only goes forward: the failure is retried until done.
            settled::<S>(&app, &started.saga_id, SagaState::Completed, &case).await;
            S::completed(&app, &started).await;
            let (_, events) = app.engine.saga(&started.saga_id).await.unwrap().unwrap();
            let failed = events.iter().filter(|e| e.step.as_deref() == Some(step.name) && e.kind == EventKind::Failed);
            assert_eq!(failed.count(), 4, "{case}: {events:#?}");
            assert!(events.iter().all(|e| e.kind != EventKind::Compensating), "{case}: {events:#?}");
        }
        finish(app, first).await;
    }
}

/// Applies `fault` to each step's action once; `crash` kills the engine after it.
async fn each_action<S: Subject>(fault: Fault, crash: bool, what: &str) {
    let def = S::definition();
    for step in &def.steps {
        let case = format!("{what} {}", step.name);
        let plan = Arc::new(FaultPlan::new());
        plan.add(def.kind, step.name, Phase::Action, fault.clone(), 1);
        let (app, first, started) = run_case::<S>(plan, crash).await;
        settled::<S>(&app, &started.saga_id, SagaState::Completed, &case).await;
        S::completed(&app, &started).await;
        if matches!(fault, Fault::LoseAnswer) {
            let (_, events) = app.engine.saga(&started.saga_id).await.unwrap().unwrap();
            assert!(
                events.iter().all(|e| e.kind != EventKind::Failed),
                "{case}: the driver read the log back instead of failing the step: {events:#?}"
            );
        }
        finish(app, first).await;
    }
}

/// Fails the pivot permanently, and applies `fault` once to each compensation that then runs;
/// `crash` kills the engine after it.
async fn each_compensation<S: Subject>(fault: Fault, crash: bool, what: &str) {
    let def = S::definition();
    let pivot = def.steps[def.pivot_index().expect("a pivot")].name;
    let compensable: Vec<&str> = def.steps.iter().filter(|s| s.compensation.is_some()).map(|s| s.name).collect();
    for step in &compensable {
        let case = format!("{what} the compensation of {step}");
        let plan = Arc::new(FaultPlan::new());
        plan.add(def.kind, pivot, Phase::Action, permanent(), 1);
        plan.add(def.kind, step, Phase::Compensation, fault.clone(), 1);
        let (app, first, started) = run_case::<S>(plan, crash).await;
        settled::<S>(&app, &started.saga_id, SagaState::Compensated, &case).await;
        S::compensated(&app, &started).await;
        let (_, events) = app.engine.saga(&started.saga_id).await.unwrap().unwrap();
        let undone = events.iter().filter(|e| e.step.as_deref() == Some(*step) && e.kind == EventKind::Compensated);
        assert_eq!(undone.count(), 1, "{case}: compensated once in the history: {events:#?}");
        finish(app, first).await;
    }
    if compensable.is_empty() {
        // Nothing to undo (cancel_order): a failed pivot compensates at once, leaving nothing.
        let plan = Arc::new(FaultPlan::new());
        plan.add(def.kind, pivot, Phase::Action, permanent(), 1);
        let (app, first, started) = run_case::<S>(plan, crash).await;
        settled::<S>(&app, &started.saga_id, SagaState::Compensated, what).await;
        S::compensated(&app, &started).await;
        finish(app, first).await;
    }
}

macro_rules! matrix {
    ($($saga:ident: $subject:ty;)*) => {$(
        mod $saga {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn every_step_failed_permanently() {
                fail_permanently::<$subject>().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn every_step_crashed_before() {
                each_action::<$subject>(Fault::CrashBefore, true, "crash before").await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn every_step_crashed_after() {
                each_action::<$subject>(Fault::CrashAfter, true, "crash after").await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn every_step_run_twice() {
                each_action::<$subject>(Fault::RunTwice, false, "run twice").await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn every_step_losing_the_answer_to_its_commit() {
                each_action::<$subject>(Fault::LoseAnswer, false, "lose the answer to").await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn every_compensation_run_twice() {
                each_compensation::<$subject>(Fault::RunTwice, false, "run twice").await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn every_compensation_crashed_before() {
                each_compensation::<$subject>(Fault::CrashBefore, true, "crash before").await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn every_compensation_crashed_after() {
                each_compensation::<$subject>(Fault::CrashAfter, true, "crash after").await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn every_compensation_losing_the_answer_to_its_commit() {
                each_compensation::<$subject>(Fault::LoseAnswer, false, "lose the answer to").await;
            }
        }
    )*};
}

matrix! {
    place_order_saga: PlaceOrderSaga;
    cancel_order_saga: CancelOrderSaga;
}

/// A fault aimed at a step inside a batch acts inside it: a crash right before confirm, whose
/// transaction also holds create_order (and, with one database, reserve_stock; with two, the
/// record of reserve_stock), rolls all of that back, as a process dying mid-transaction would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_inside_a_batch_rolls_back_the_steps_before_it_in_the_same_transaction() {
    let plan = Arc::new(FaultPlan::new());
    plan.add(place_order::KIND.name, place_order::CONFIRM.name, Phase::Action, Fault::CrashBefore, 1);
    let (app, first, started) = run_case::<PlaceOrderSaga>(plan, false).await;
    let (saga, events) = app.engine.saga(&started.saga_id).await.unwrap().unwrap();
    assert_eq!((saga.state, saga.current_step), (SagaState::Running, 0), "nothing recorded: {events:#?}");
    assert_eq!(events.len(), 1, "only `created`: {events:#?}");
    let order = app.state.orders.get(&started.order_id).await.unwrap();
    assert_eq!((order.status, order.total_cents), (OrderStatus::Pending, None), "create_order rolled back");
    let held = reservations(&app, &started.saga_id).await;
    if app.dbs.inventory_url.is_some() {
        assert_eq!(held, with_status("reserved"), "reserve_stock committed in its own database, in doubt");
    } else {
        assert!(held.is_empty(), "reserve_stock rolled back with the batch: {held:?}");
    }
    finish(app, first).await;
}
