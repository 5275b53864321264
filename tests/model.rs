//! A property-based model test of the whole API. proptest draws sequences of operations, each
//! with faults injected into the saga steps it runs (transient and permanent failures, a step
//! run twice, the answer to a commit lost), sends them over real HTTP to the app served on a
//! real socket, and holds each answer to a plain Rust model of what the service should do:
//! - products created (some twice: 409) and restocked (an unknown one: 404);
//! - orders placed (1 to 3 lines, some beyond the stock: 409 `insufficient_stock`, some of a
//!   product that does not exist: 422), with or without an Idempotency-Key, waiting or
//!   `respond-async`; a key sent again with the same body (even spelled otherwise) replays the
//!   order as it now stands, with another body it is 422; a keyed request sent several times at
//!   once makes one order; a body that fails validation uses up no key;
//! - orders cancelled (a confirmed one: its stock comes back; a failed cancel leaves it
//!   confirmed and a later one replaces it; a cancelled one answers again; a rejected one: 409);
//! - unkeyed orders placed at once, whose outcomes must be those of some serial order;
//! - an order held by an outage of one step until an operator aborts it (before the pivot: it
//!   ends rejected, `aborted`; past it: 409, and retried) or retries it;
//! - reads: products, orders (by customer and status, a page at a time) and an order's event
//!   stream.
//!
//! After every operation the faults left over are checked too, so a saga attempts exactly the
//! steps the model says. After each sequence the service's products, orders, sagas (state and
//! history, event by event, folded through the log's state machine), reservations and
//! idempotency keys must equal the model's, and every invariant of docs/design.md ("Invariants
//! the tests hold the service to") must hold.
//!
//! 24 cases by default (`PROPTEST_CASES` for more); a failure is shrunk to a minimal sequence,
//! printed with the reason. Failing seeds are kept under target/ (never in the repository) and
//! tried first by the next run. On PostgreSQL with `TEST_DATABASE_URL`, like every test.
mod common;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use order_saga::inventory::MAX_SAFE_INTEGER;
use order_saga::orders::{cancel_order, place_order};
use order_saga::saga::state::{Position, next};
use order_saga::saga::{EventKind, Fault, FaultInjector, Phase, SagaDefinition, StepError};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, FileFailurePersistence, TestCaseError, TestError, TestRunner};
use serde_json::{Value, json};
use sqlx::Row;

/// Products an operation may name; `p4` is never created, so orders naming it meet
/// `unknown_product`.
const PRODUCTS: [&str; 5] = ["p0", "p1", "p2", "p3", "p4"];
const CUSTOMERS: [&str; 2] = ["c0", "c1"];
/// A small key space, so that keys come back: with the same body (a replay) or another (422).
const KEYS: [&str; 4] = ["k0", "k1", "k2", "k3"];
/// `STUCK_AFTER_ATTEMPTS` for the test: a step's third failed attempt in a row flags it stuck.
const STUCK_AFTER: u32 = 3;
/// How long anything may take before the test calls it a hang.
const HANG: Duration = Duration::from_secs(30);
const PLACE: &str = place_order::KIND.name;
const CANCEL: &str = cancel_order::KIND.name;
/// The code of an injected permanent failure: the API answers it 409 `order_rejected`.
const INJECTED: &str = "injected_failure";

/// A bad `POST /orders` body for a customer: what is wrong, the field the answer must name.
type Invalid = (&'static str, &'static str, fn(&str) -> Value);

/// Bodies the API refuses with 422 `validation_failed`, using up no Idempotency-Key.
const INVALID: [Invalid; 4] = [
    (
        "a quantity of 0",
        "items[0].quantity",
        |c| json!({"customer_id": c, "items": [{"product_id": "p0", "quantity": 0}]}),
    ),
    (
        "a product twice",
        "items[1].product_id",
        |c| json!({"customer_id": c, "items": [{"product_id": "p0", "quantity": 1}, {"product_id": "p0", "quantity": 1}]}),
    ),
    ("no items", "items", |c| json!({"customer_id": c, "items": []})),
    ("no customer", "customer_id", |_| json!({"items": [{"product_id": "p0", "quantity": 1}]})),
];

// ---------------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------------

/// One failed attempt injected into a step.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Failure {
    /// Retried with backoff.
    Transient,
    /// A business rule said no: before or at the pivot the saga turns backward; past it, and in
    /// a compensation, it is retried like a transient one.
    Permanent,
}

/// A fault that must not change the outcome, injected into the attempt that finally runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Benign {
    /// The step's work runs twice (rule 3: its effect happens once).
    RunTwice,
    /// The commit that records the step happens, but the engine is told it failed.
    LoseAnswer,
}

/// The faults of one step's attempts, in order: failures, then perhaps a benign fault on the
/// attempt that runs.
#[derive(Clone, PartialEq, Eq)]
struct Script {
    failures: Vec<Failure>,
    then: Option<Benign>,
}

impl Script {
    /// How many attempts it has faults for.
    fn len(&self) -> usize {
        self.failures.len() + usize::from(self.then.is_some())
    }

    fn faults(&self) -> VecDeque<Fault> {
        let failures = self.failures.iter().map(|f| match f {
            Failure::Transient => Fault::Fail(StepError::transient("injected: connection reset")),
            Failure::Permanent => Fault::Fail(StepError::permanent(INJECTED, "injected: a business rule said no")),
        });
        let then = self.then.map(|b| match b {
            Benign::RunTwice => Fault::RunTwice,
            Benign::LoseAnswer => Fault::LoseAnswer,
        });
        failures.chain(then).collect()
    }
}

impl fmt::Debug for Script {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let failures: Vec<&str> =
            self.failures.iter().map(|x| if *x == Failure::Transient { "T" } else { "P" }).collect();
        write!(f, "[{}]", failures.join(","))?;
        if let Some(then) = self.then {
            write!(f, "+{then:?}")?;
        }
        Ok(())
    }
}

/// A step of a saga and the half of it that runs.
type Slot = (&'static str, Phase);

const PLACE_SLOTS: [Slot; 6] = [
    ("reserve_stock", Phase::Action),
    ("create_order", Phase::Action),
    ("confirm", Phase::Action),
    ("commit_stock", Phase::Action),
    ("create_order", Phase::Compensation),
    ("reserve_stock", Phase::Compensation),
];
const CANCEL_SLOTS: [Slot; 2] = [("cancel", Phase::Action), ("return_stock", Phase::Action)];
/// place_order's actions in order; the pivot is `confirm`.
const HELD: [&str; 4] = ["reserve_stock", "create_order", "confirm", "commit_stock"];

/// The faults an operation injects, by step; the first script of a slot counts.
#[derive(Clone, Default)]
struct Faults(Vec<(Slot, Script)>);

impl Faults {
    fn script(&self, slot: Slot) -> Option<&Script> {
        self.0.iter().find(|(s, _)| *s == slot).map(|(_, script)| script)
    }

    /// Each slot with its (first) script.
    fn slots(&self) -> impl Iterator<Item = (Slot, &Script)> {
        self.0
            .iter()
            .enumerate()
            .filter(|(i, (slot, _))| !self.0[..*i].iter().any(|(s, _)| s == slot))
            .map(|(_, e)| (e.0, &e.1))
    }
}

impl fmt::Debug for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for ((step, phase), script) in self.slots() {
            let undo = if phase == Phase::Compensation { " undo" } else { "" };
            write!(f, " {step}{undo}:{script:?}")?;
        }
        Ok(())
    }
}

/// One request (or several at once) to the service.
#[derive(Clone)]
enum Op {
    /// `POST /products` with its whole stock available.
    CreateProduct { product: usize, price: i64, stock: i64 },
    /// `POST /products/{id}/restock`.
    Restock { product: usize, quantity: i64 },
    /// `POST /orders`; `copies` > 1 sends the same keyed request that many times at once.
    Place {
        customer: usize,
        items: Vec<(usize, i64)>,
        key: Option<usize>,
        respond_async: bool,
        copies: usize,
        faults: Faults,
    },
    /// Sends again, with the same key and body, the `nth` keyed placement so far (modulo);
    /// `respell` writes the same JSON another way (keys reordered, spaces, `2.0` for `2`).
    Resend { nth: usize, respond_async: bool, respell: bool },
    /// A placement held by an outage of one of its steps until an operator acts: `abort` turns
    /// it backward (refused past the pivot: then it is retried), else `retry`; then the outage
    /// is lifted.
    Held { customer: usize, items: Vec<(usize, i64)>, step: usize, abort: bool },
    /// Unkeyed placements sent all at once: their outcomes must be those of some serial order.
    Burst { orders: Vec<(usize, Vec<(usize, i64)>)> },
    /// A placement the API must refuse (see [`INVALID`]) before it uses up its key.
    PlaceInvalid { customer: usize, key: Option<usize>, how: usize },
    /// Cancels the `order`th order so far (modulo); with no order yet, an unknown one. Without
    /// faults, `copies` > 1 sends the cancellation that many times at once.
    Cancel { order: usize, copies: usize, faults: Faults },
    /// `GET /products/{id}`.
    ReadProduct { product: usize },
    /// `GET /orders/{id}` of the `order`th order so far (modulo); with none yet, an unknown one.
    ReadOrder { order: usize },
    /// Reads the `order`th order's event stream to its end.
    WatchOrder { order: usize },
    /// Lists orders, perhaps of one customer or status, `page` at a time (else all at once).
    ListOrders { customer: Option<usize>, status: Option<Status>, page: Option<i64> },
    /// Lists products, `page` at a time (else all at once).
    ListProducts { page: Option<i64> },
}

impl fmt::Debug for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::CreateProduct { product, price, stock } => {
                write!(f, "create {} price {price} stock {stock}", PRODUCTS[*product])
            }
            Op::Restock { product, quantity } => write!(f, "restock {} +{quantity}", PRODUCTS[*product]),
            Op::Place { customer, items, key, respond_async, copies, faults } => {
                let items: Vec<String> = items.iter().map(|(p, q)| format!("{} x{q}", PRODUCTS[*p])).collect();
                write!(f, "place {} [{}]", CUSTOMERS[*customer], items.join(", "))?;
                if let Some(key) = key {
                    write!(f, " key {}", KEYS[*key])?;
                    if *copies > 1 {
                        write!(f, " sent {copies} times at once")?;
                    }
                }
                if *respond_async {
                    write!(f, " respond-async")?;
                }
                write!(f, "{faults:?}")
            }
            Op::Resend { nth, respond_async, respell } => {
                write!(f, "resend keyed placement #{nth}")?;
                if *respell {
                    write!(f, " respelled")?;
                }
                if *respond_async {
                    write!(f, " respond-async")?;
                }
                Ok(())
            }
            Op::Held { customer, items, step, abort } => {
                let items: Vec<String> = items.iter().map(|(p, q)| format!("{} x{q}", PRODUCTS[*p])).collect();
                let action = if *abort { "abort" } else { "retry" };
                write!(
                    f,
                    "place {} [{}] held at {} until {action}",
                    CUSTOMERS[*customer],
                    items.join(", "),
                    HELD[*step]
                )
            }
            Op::Burst { orders } => {
                let orders: Vec<String> = orders
                    .iter()
                    .map(|(c, items)| {
                        let items: Vec<String> = items.iter().map(|(p, q)| format!("{} x{q}", PRODUCTS[*p])).collect();
                        format!("{} [{}]", CUSTOMERS[*c], items.join(", "))
                    })
                    .collect();
                write!(f, "at once: place {}", orders.join("; place "))
            }
            Op::PlaceInvalid { customer, key, how } => {
                write!(f, "place {} with {}", CUSTOMERS[*customer], INVALID[*how].0)?;
                match key {
                    Some(key) => write!(f, " key {}", KEYS[*key]),
                    None => Ok(()),
                }
            }
            Op::Cancel { order, copies, faults } => {
                write!(f, "cancel order #{order}")?;
                if *copies > 1 && faults.0.is_empty() {
                    write!(f, " sent {copies} times at once")?;
                }
                write!(f, "{faults:?}")
            }
            Op::ReadProduct { product } => write!(f, "read {}", PRODUCTS[*product]),
            Op::ReadOrder { order } => write!(f, "read order #{order}"),
            Op::WatchOrder { order } => write!(f, "watch order #{order}"),
            Op::ListOrders { customer, status, page } => {
                write!(f, "list orders")?;
                if let Some(c) = customer {
                    write!(f, " of {}", CUSTOMERS[*c])?;
                }
                if let Some(status) = status {
                    write!(f, " {}", status.as_str())?;
                }
                match page {
                    Some(page) => write!(f, " {page} a page"),
                    None => Ok(()),
                }
            }
            Op::ListProducts { page: Some(page) } => write!(f, "list products {page} a page"),
            Op::ListProducts { page: None } => write!(f, "list products"),
        }
    }
}

/// A generated sequence.
#[derive(Clone)]
struct Case(Vec<Op>);

impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} operations:", self.0.len())?;
        for (i, op) in self.0.iter().enumerate() {
            writeln!(f, "  {i:>2}: {op:?}")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

fn script() -> impl Strategy<Value = Script> {
    let failure = prop_oneof![2 => Just(Failure::Transient), 1 => Just(Failure::Permanent)];
    let benign = prop::option::weighted(0.4, prop_oneof![Just(Benign::RunTwice), Just(Benign::LoseAnswer)]);
    (prop::collection::vec(failure, 0..=3), benign)
        .prop_filter("a script injects something", |(f, b)| !f.is_empty() || b.is_some())
        .prop_map(|(failures, then)| Script { failures, then })
}

fn status() -> impl Strategy<Value = Status> {
    prop_oneof![Just(Status::Confirmed), Just(Status::Rejected), Just(Status::Cancelled)]
}

/// Mostly no fault; sometimes one or two steps with a script.
fn faults(slots: &'static [Slot]) -> impl Strategy<Value = Faults> {
    prop_oneof![
        3 => Just(Faults::default()),
        2 => prop::collection::vec((prop::sample::select(slots), script()), 1..=2).prop_map(Faults),
    ]
}

/// A product for an order's line: now and then the one that never exists.
fn line_product() -> impl Strategy<Value = usize> {
    prop_oneof![20 => 0..4usize, 1 => Just(4usize)]
}

/// An order's lines: 1 to 3 products, each at most once, as the API requires.
fn items() -> impl Strategy<Value = Vec<(usize, i64)>> {
    prop::collection::vec((line_product(), 1..=4i64), 1..=3).prop_map(|mut items| {
        let mut seen = Vec::new();
        items.retain(|(p, _)| {
            let fresh = !seen.contains(p);
            seen.push(*p);
            fresh
        });
        items
    })
}

fn op() -> impl Strategy<Value = Op> {
    let key = prop::option::weighted(0.6, 0..KEYS.len());
    let copies = prop_oneof![4 => Just(1usize), 1 => 2..=3usize];
    prop_oneof![
        2 => (0..4usize, 0..=2000i64, prop_oneof![12 => 0..=10i64, 1 => Just(MAX_SAFE_INTEGER)])
            .prop_map(|(product, price, stock)| Op::CreateProduct { product, price, stock }),
        // Now and then more than a product's total stock may ever hold (2^53 - 1): 422.
        2 => (0..PRODUCTS.len(), prop_oneof![12 => 1..=6i64, 1 => Just(MAX_SAFE_INTEGER)])
            .prop_map(|(product, quantity)| Op::Restock { product, quantity }),
        8 => (0..CUSTOMERS.len(), items(), key, prop::bool::weighted(0.2), copies, faults(&PLACE_SLOTS)).prop_map(
            |(customer, items, key, respond_async, copies, faults)| Op::Place {
                customer, items, key, respond_async, copies, faults
            }
        ),
        2 => (0..64usize, prop::bool::weighted(0.2), prop::bool::weighted(0.3))
            .prop_map(|(nth, respond_async, respell)| Op::Resend { nth, respond_async, respell }),
        1 => prop::collection::vec((0..CUSTOMERS.len(), items()), 2..=3).prop_map(|orders| Op::Burst { orders }),
        1 => (0..CUSTOMERS.len(), items(), 0..HELD.len(), any::<bool>())
            .prop_map(|(customer, items, step, abort)| Op::Held { customer, items, step, abort }),
        1 => (0..CUSTOMERS.len(), prop::option::of(0..KEYS.len()), 0..INVALID.len())
            .prop_map(|(customer, key, how)| Op::PlaceInvalid { customer, key, how }),
        3 => (0..64usize, prop_oneof![4 => Just(1usize), 1 => 2..=3usize], faults(&CANCEL_SLOTS))
            .prop_map(|(order, copies, faults)| Op::Cancel { order, copies, faults }),
        1 => (0..PRODUCTS.len()).prop_map(|product| Op::ReadProduct { product }),
        1 => (0..64usize).prop_map(|order| Op::ReadOrder { order }),
        1 => (0..64usize).prop_map(|order| Op::WatchOrder { order }),
        1 => (prop::option::of(0..CUSTOMERS.len()), prop::option::weighted(0.3, status()), prop::option::of(1..=3i64))
            .prop_map(|(customer, status, page)| Op::ListOrders { customer, status, page }),
        1 => prop::option::of(1..=3i64).prop_map(|page| Op::ListProducts { page }),
    ]
}

/// A sequence: most of the products first (each can shrink away like any operation), then the
/// rest.
fn case() -> impl Strategy<Value = Case> {
    let product = prop::option::weighted(0.9, (0..=2000i64, 0..=12i64));
    let setup = prop::collection::vec(product, 4).prop_map(|products| {
        products
            .into_iter()
            .enumerate()
            .filter_map(|(product, made)| made.map(|(price, stock)| Op::CreateProduct { product, price, stock }))
            .collect::<Vec<_>>()
    });
    (setup, prop::collection::vec(op(), 1..=24)).prop_map(|(mut setup, ops)| {
        setup.extend(ops);
        Case(setup)
    })
}

// ---------------------------------------------------------------------------------------------
// Fault injection, per operation
// ---------------------------------------------------------------------------------------------

/// The faults still to come, by saga kind, step and phase.
type Queues = HashMap<(&'static str, &'static str, Phase), VecDeque<Fault>>;

/// Hands each attempt of a step the next fault of its script, for the operation under way;
/// what is left over tells which attempts the engine made.
#[derive(Default)]
struct Injector {
    queues: Mutex<Queues>,
    /// A step of place_order whose every attempt fails (transiently) until the outage is lifted.
    outage: Mutex<Option<&'static str>>,
    /// The sagas of earlier operations, which get no fault: a driver that an operator's
    /// take-over fenced out still makes one late attempt, which must not use up faults armed
    /// for the next operation.
    earlier: Mutex<HashSet<String>>,
}

impl Injector {
    /// Arms `faults` for the next operation's sagas of `kind`.
    fn arm(&self, kind: &'static str, faults: &Faults) {
        let mut queues = self.queues.lock().unwrap();
        queues.clear();
        for ((step, phase), script) in faults.slots() {
            queues.insert((kind, step, phase), script.faults());
        }
    }

    /// Fails every attempt of place_order's `step` (or, with `None`, no longer).
    fn outage(&self, step: Option<&'static str>) {
        *self.outage.lock().unwrap() = step;
    }

    /// Disarms every fault; returns how many were left over per slot (none listed for none).
    fn disarm(&self) -> BTreeMap<String, usize> {
        let mut queues = self.queues.lock().unwrap();
        let left = queues
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|((_, step, phase), q)| (format!("{step} {}", phase.as_str()), q.len()))
            .collect();
        queues.clear();
        left
    }
}

impl FaultInjector for Injector {
    fn fault(&self, _kind: &str, _step: &str, _phase: Phase, _attempt: u32) -> Option<Fault> {
        unreachable!("the engine asks fault_for")
    }

    fn fault_for(&self, saga_id: &str, kind: &str, step: &str, phase: Phase, _attempt: u32) -> Option<Fault> {
        if self.earlier.lock().unwrap().contains(saga_id) {
            return None;
        }
        if kind == PLACE && phase == Phase::Action && *self.outage.lock().unwrap() == Some(step) {
            return Some(Fault::Fail(StepError::transient("injected: an outage")));
        }
        let mut queues = self.queues.lock().unwrap();
        queues.iter_mut().find(|((k, s, p), _)| *k == kind && *s == step && *p == phase)?.1.pop_front()
    }
}

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Confirmed,
    Rejected,
    Cancelled,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Confirmed => "confirmed",
            Status::Rejected => "rejected",
            Status::Cancelled => "cancelled",
        }
    }
}

/// Why a saga turned backward.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rejection {
    code: &'static str,
    product: Option<&'static str>,
}

impl Rejection {
    fn injected() -> Self {
        Rejection { code: INJECTED, product: None }
    }

    /// The HTTP status and problem code the API answers for it.
    fn answer(&self) -> (u16, &'static str) {
        match self.code {
            "insufficient_stock" => (409, "insufficient_stock"),
            "unknown_product" => (422, "unknown_product"),
            "aborted" => (409, "aborted"),
            _ => (409, "order_rejected"),
        }
    }
}

#[derive(Debug, Clone)]
struct Product {
    price: i64,
    available: i64,
    sold: i64,
    /// Stock ever added: at creation and by restocks.
    added: i64,
}

/// What a saga must have left in the log: its final state and its history, event by event.
#[derive(Debug, Clone)]
struct ExpectedSaga {
    id: String,
    kind: &'static str,
    state: &'static str,
    events: Vec<(Option<&'static str>, &'static str)>,
    /// How many retried failures come in between is not the model's to say: the saga ran
    /// alongside others (a deadlock is retried), or an outage held it until an operator acted.
    lenient: bool,
}

impl ExpectedSaga {
    /// Whether `got` is the history the model expects.
    fn matches(&self, got: &[(Option<&str>, &str)]) -> bool {
        /// The history without retried failures: each `failed` but the one that turned the saga
        /// backward, each `compensation_failed`, each `stuck`.
        fn settled<'a>(events: &[(Option<&'a str>, &'a str)]) -> Vec<(Option<&'a str>, &'a str)> {
            let mut kept = Vec::new();
            for (i, event) in events.iter().enumerate() {
                let turned = events.get(i + 1) == Some(&(None, "compensating"));
                if matches!(event.1, "failed" | "compensation_failed" | "stuck") && !(event.1 == "failed" && turned) {
                    continue;
                }
                kept.push(*event);
            }
            kept
        }
        if self.lenient { settled(got) == settled(&self.events) } else { got == self.events.as_slice() }
    }
}

#[derive(Debug, Clone)]
struct Order {
    id: String,
    customer: &'static str,
    /// Sorted by product id, as the service stores them.
    items: Vec<(&'static str, i64)>,
    /// Each line's unit price once create_order has run.
    prices: Option<Vec<i64>>,
    status: Status,
    failure: Option<Rejection>,
    saga: ExpectedSaga,
    /// Its cancel sagas, oldest first: each one that failed before its pivot was replaced.
    cancels: Vec<ExpectedSaga>,
}

impl Order {
    fn total(&self) -> Option<i64> {
        self.prices.as_ref().map(|p| p.iter().zip(&self.items).map(|(price, (_, q))| price * q).sum())
    }

    /// The API's view of the order, without its times and the failure's text.
    fn view(&self) -> Value {
        let items: Vec<Value> = self
            .items
            .iter()
            .enumerate()
            .map(|(i, (p, q))| {
                json!({"product_id": p, "quantity": q, "unit_price_cents": self.prices.as_ref().map(|prices| prices[i])})
            })
            .collect();
        json!({
            "id": self.id,
            "customer_id": self.customer,
            "status": self.status.as_str(),
            "items": items,
            "total_cents": self.total(),
            "saga_id": self.saga.id,
            "cancel_saga_id": self.cancels.last().map(|s| s.id.clone()),
            "failure": self.failure.as_ref().map(|f| json!({"code": f.code})),
        })
    }
}

/// A placement to send.
struct Placing {
    customer: &'static str,
    /// Its lines as sent.
    lines: Vec<(&'static str, i64)>,
    /// Its body, as the API reads it.
    body: Value,
    /// The body's text, when it is not `body` as serde_json writes it.
    wire: Option<String>,
    key: Option<&'static str>,
    respond_async: bool,
    copies: usize,
}

/// A keyed placement as it was sent, for `Resend`.
#[derive(Debug, Clone)]
struct Sent {
    key: &'static str,
    customer: &'static str,
    items: Vec<(&'static str, i64)>,
    body: Value,
}

#[derive(Default)]
struct Model {
    products: BTreeMap<&'static str, Product>,
    /// Oldest first.
    orders: Vec<Order>,
    /// Each recorded key: the body it was first sent with and its order.
    keys: BTreeMap<&'static str, (Value, usize)>,
    sent: Vec<Sent>,
}

/// A saga's history as the model builds it, and the faults it uses up on the way.
struct History<'a> {
    faults: &'a Faults,
    events: Vec<(Option<&'static str>, &'static str)>,
    used: BTreeMap<String, usize>,
}

impl<'a> History<'a> {
    fn new(faults: &'a Faults) -> Self {
        Self { faults, events: vec![(None, "created")], used: BTreeMap::new() }
    }

    fn script(&mut self, step: &'static str, phase: Phase) -> Script {
        self.faults.script((step, phase)).cloned().unwrap_or(Script { failures: Vec::new(), then: None })
    }

    fn use_one(&mut self, step: &'static str, phase: Phase) {
        *self.used.entry(format!("{step} {}", phase.as_str())).or_default() += 1;
    }

    /// A retried failure of `step`: its event, and `stuck` at the attempt that reaches the
    /// threshold.
    fn retried(&mut self, step: &'static str, event: &'static str, retried: &mut u32) {
        self.events.push((Some(step), event));
        *retried += 1;
        if *retried == STUCK_AFTER {
            self.events.push((Some(step), "stuck"));
        }
    }

    /// An action before or at the pivot whose real run gives `real`: an error turns the saga
    /// backward, as an injected permanent failure does.
    fn before_pivot(&mut self, step: &'static str, real: Result<(), Rejection>) -> Result<(), Rejection> {
        let script = self.script(step, Phase::Action);
        let mut retried = 0;
        for failure in &script.failures {
            self.use_one(step, Phase::Action);
            match failure {
                Failure::Transient => self.retried(step, "failed", &mut retried),
                Failure::Permanent => {
                    self.events.push((Some(step), "failed"));
                    return Err(Rejection::injected());
                }
            }
        }
        if script.then.is_some() {
            self.use_one(step, Phase::Action);
        }
        self.events.push((Some(step), if real.is_ok() { "succeeded" } else { "failed" }));
        real
    }

    /// An action past the pivot: every failure is retried until it succeeds.
    fn after_pivot(&mut self, step: &'static str) {
        self.retried_until_done(step, Phase::Action, "failed", "succeeded");
    }

    /// A compensation: never gives up.
    fn undo(&mut self, step: &'static str) {
        self.retried_until_done(step, Phase::Compensation, "compensation_failed", "compensated");
    }

    /// A step's `phase` whose every scripted failure (`failed` events) is retried until it
    /// ends with `done`.
    fn retried_until_done(&mut self, step: &'static str, phase: Phase, failed: &'static str, done: &'static str) {
        let script = self.script(step, phase);
        let mut retried = 0;
        for _ in &script.failures {
            self.use_one(step, phase);
            self.retried(step, failed, &mut retried);
        }
        if script.then.is_some() {
            self.use_one(step, phase);
        }
        self.events.push((Some(step), done));
    }

    fn settle(mut self, kind: &'static str, state: &'static str) -> (ExpectedSaga, BTreeMap<String, usize>) {
        self.events.push((None, state));
        (ExpectedSaga { id: String::new(), kind, state, events: self.events, lenient: false }, self.used)
    }
}

/// reserve_stock's real run on `products`: lines in product-id order, the first unknown or
/// short one fails.
fn reserve(products: &BTreeMap<&'static str, Product>, items: &[(&'static str, i64)]) -> Result<(), Rejection> {
    for (product, quantity) in items {
        match products.get(product) {
            None => return Err(Rejection { code: "unknown_product", product: Some(product) }),
            Some(p) if p.available < *quantity => {
                return Err(Rejection { code: "insufficient_stock", product: Some(product) });
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Takes a confirmed order's stock.
fn take(products: &mut BTreeMap<&'static str, Product>, items: &[(&'static str, i64)]) {
    for (product, quantity) in items {
        let p = products.get_mut(product).expect("a confirmed order's product exists");
        p.available -= quantity;
        p.sold += quantity;
    }
}

/// What a new placement does, by the model.
struct Placement {
    status: Status,
    failure: Option<Rejection>,
    priced: bool,
    saga: ExpectedSaga,
    used: BTreeMap<String, usize>,
}

impl Model {
    fn place(&self, items: &[(&'static str, i64)], faults: &Faults) -> Placement {
        Model::placement(reserve(&self.products, items), faults)
    }

    /// A new placement whose reserve_stock, when it runs, gives `reserved`.
    fn placement(reserved: Result<(), Rejection>, faults: &Faults) -> Placement {
        let mut history = History::new(faults);
        let mut priced = false;
        let mut outcome = history.before_pivot("reserve_stock", reserved);
        if outcome.is_ok() {
            outcome = history.before_pivot("create_order", Ok(()));
            priced = outcome.is_ok();
        }
        if outcome.is_ok() {
            outcome = history.before_pivot("confirm", Ok(()));
        }
        match outcome {
            Ok(()) => {
                history.after_pivot("commit_stock");
                let (saga, used) = history.settle(PLACE, "completed");
                Placement { status: Status::Confirmed, failure: None, priced, saga, used }
            }
            Err(rejection) => {
                // Every step before the pivot is compensated, last to first, whether or not it ran.
                history.events.push((None, "compensating"));
                history.undo("create_order");
                history.undo("reserve_stock");
                let (saga, used) = history.settle(PLACE, "compensated");
                Placement { status: Status::Rejected, failure: Some(rejection), priced, saga, used }
            }
        }
    }

    /// A placement an operator aborted while step `step` (before or at the pivot) was failing:
    /// the steps before it succeeded, then every step before the pivot is compensated.
    fn aborted(step: usize) -> Placement {
        let faults = Faults::default();
        let mut history = History::new(&faults);
        for done in &HELD[..step] {
            history.events.push((Some(done), "succeeded"));
        }
        history.events.extend([(None, "operator_abort"), (None, "compensating")]);
        history.undo("create_order");
        history.undo("reserve_stock");
        let (saga, used) = history.settle(PLACE, "compensated");
        let failure = Some(Rejection { code: "aborted", product: None });
        Placement { status: Status::Rejected, failure, priced: step > 1, saga, used }
    }

    /// What a new cancel saga does: true if it cancels.
    fn cancel(faults: &Faults) -> (bool, ExpectedSaga, BTreeMap<String, usize>) {
        let mut history = History::new(faults);
        match history.before_pivot("cancel", Ok(())) {
            Ok(()) => {
                history.after_pivot("return_stock");
                let (saga, used) = history.settle(CANCEL, "completed");
                (true, saga, used)
            }
            Err(_) => {
                // The pivot is the first step: nothing to undo.
                history.events.push((None, "compensating"));
                let (saga, used) = history.settle(CANCEL, "compensated");
                (false, saga, used)
            }
        }
    }

    /// Faults of `faults` the model expects left over, given those it used.
    fn left_over(faults: &Faults, used: &BTreeMap<String, usize>) -> BTreeMap<String, usize> {
        faults
            .slots()
            .map(|((step, phase), script)| {
                let name = format!("{step} {}", phase.as_str());
                let left = script.len() - used.get(&name).copied().unwrap_or(0);
                (name, left)
            })
            .filter(|(_, left)| *left > 0)
            .collect()
    }

    fn product_view(&self, id: &str) -> Option<Value> {
        self.products.get(id).map(|p| {
            json!({"id": id, "name": format!("Product {id}"), "price_cents": p.price,
                "available": p.available, "reserved": 0, "sold": p.sold})
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Talking to the service
// ---------------------------------------------------------------------------------------------

/// An answer, read whole.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    content_type: String,
    replayed: bool,
    location: Option<String>,
    body: Value,
}

async fn send(request: reqwest::RequestBuilder) -> Answer {
    let response = request.send().await.expect("the service answers");
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let content_type = header("content-type").unwrap_or_default();
    let replayed = header("idempotent-replayed").as_deref() == Some("true");
    let location = header("location");
    let status = response.status().as_u16();
    let bytes = response.bytes().await.expect("the body is read");
    let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    Answer { status, content_type, replayed, location, body }
}

/// Fails the case with `message` unless `condition` holds.
macro_rules! ensure {
    ($condition:expr, $($message:tt)+) => {
        if !$condition {
            return Err(TestCaseError::fail(format!($($message)+)));
        }
    };
}

/// Checks that `answer` is the problem `code` with `status`.
fn problem(answer: &Answer, status: u16, code: &str) -> Result<(), TestCaseError> {
    ensure!(
        answer.status == status && answer.body["code"] == code,
        "expected {status} {code}, got {} {}",
        answer.status,
        answer.body
    );
    ensure!(answer.content_type.starts_with("application/problem+json"), "problem+json: {answer:?}");
    ensure!(answer.body["status"] == status, "the problem's status member: {}", answer.body);
    Ok(())
}

/// Checks a success answer's status and media type.
fn success(answer: &Answer, status: u16) -> Result<(), TestCaseError> {
    success_of(answer, status, "application/json")
}

fn success_of(answer: &Answer, status: u16, media: &str) -> Result<(), TestCaseError> {
    ensure!(answer.status == status, "expected {status}, got {} {}", answer.status, answer.body);
    ensure!(answer.content_type.starts_with(media), "{media}: {answer:?}");
    Ok(())
}

/// The body of `order_body(customer, items)` written another way: members in another order,
/// white space, each quantity as a float. The same JSON to the API, so the same fingerprint.
fn respelled(customer: &str, items: &[(&str, i64)]) -> String {
    let items: Vec<String> =
        items.iter().map(|(p, q)| format!("{{ \"quantity\" : {q}.0 ,\n \"product_id\":\"{p}\" }}")).collect();
    format!("{{\n  \"items\": [ {} ],\n  \"customer_id\" : \"{customer}\"\n}}", items.join(" , "))
}

/// An order view without what the model does not decide: times, and a failure's text.
fn comparable(view: &Value) -> Value {
    let mut view = view.clone();
    if let Some(object) = view.as_object_mut() {
        object.remove("created_at");
        object.remove("updated_at");
        if let Some(failure) = object.get_mut("failure").and_then(Value::as_object_mut) {
            failure.remove("detail");
        }
    }
    view
}

/// The answer a placement of `order` (as it now stands) gets: a first answer once settled, or a
/// replay.
fn placement_answer(answer: &Answer, order: &Order) -> Result<(), TestCaseError> {
    match order.status {
        Status::Confirmed | Status::Cancelled => {
            success(answer, 201)?;
            ensure!(
                comparable(&answer.body) == order.view(),
                "the order: got {}\nwant {}",
                comparable(&answer.body),
                order.view()
            );
        }
        Status::Rejected => {
            let rejection = order.failure.as_ref().expect("a rejected order has a failure");
            let (status, code) = rejection.answer();
            problem(answer, status, code)?;
            ensure!(
                answer.body["order_id"] == order.id.as_str() && answer.body["saga_id"] == order.saga.id.as_str(),
                "the rejection names its order and saga: {}",
                answer.body
            );
            ensure!(
                answer.body.get("product_id").and_then(Value::as_str) == rejection.product,
                "the rejection's product: {} for {rejection:?}",
                answer.body
            );
        }
    }
    ensure!(answer.location.as_deref() == Some(&format!("/orders/{}", order.id)), "Location: {answer:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Running a sequence
// ---------------------------------------------------------------------------------------------

struct Run<'a> {
    app: &'a TestApp,
    injector: &'a Injector,
    model: Model,
}

impl Run<'_> {
    async fn get(&self, path: &str) -> Answer {
        send(self.app.client.get(self.app.url(path))).await
    }

    async fn post(&self, path: &str, body: &Value) -> Answer {
        send(self.app.client.post(self.app.url(path)).json(body)).await
    }

    async fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::CreateProduct { product, price, stock } => {
                self.create_product(PRODUCTS[*product], *price, *stock).await
            }
            Op::Restock { product, quantity } => self.restock(PRODUCTS[*product], *quantity).await,
            Op::Place { customer, items, key, respond_async, copies, faults } => {
                let customer = CUSTOMERS[*customer];
                let lines: Vec<(&'static str, i64)> = items.iter().map(|(p, q)| (PRODUCTS[*p], *q)).collect();
                let key = key.map(|k| KEYS[k]);
                let placing = Placing {
                    customer,
                    body: order_body(customer, &lines),
                    wire: None,
                    lines,
                    key,
                    respond_async: *respond_async,
                    copies: if key.is_some() { *copies } else { 1 },
                };
                self.place(placing, faults).await
            }
            Op::Resend { nth, respond_async, respell } => {
                if self.model.sent.is_empty() {
                    return Ok(());
                }
                let sent = self.model.sent[nth % self.model.sent.len()].clone();
                let placing = Placing {
                    customer: sent.customer,
                    lines: sent.items.clone(),
                    wire: respell.then(|| respelled(sent.customer, &sent.items)),
                    body: sent.body,
                    key: Some(sent.key),
                    respond_async: *respond_async,
                    copies: 1,
                };
                self.place(placing, &Faults::default()).await
            }
            Op::Held { customer, items, step, abort } => {
                let lines: Vec<(&'static str, i64)> = items.iter().map(|(p, q)| (PRODUCTS[*p], *q)).collect();
                self.held(CUSTOMERS[*customer], &lines, *step, *abort).await
            }
            Op::Burst { orders } => {
                let orders: Vec<(&'static str, Vec<(&'static str, i64)>)> = orders
                    .iter()
                    .map(|(c, items)| (CUSTOMERS[*c], items.iter().map(|(p, q)| (PRODUCTS[*p], *q)).collect()))
                    .collect();
                self.burst(&orders).await
            }
            Op::PlaceInvalid { customer, key, how } => {
                let (_, field, body) = INVALID[*how];
                let body = body(CUSTOMERS[*customer]);
                let mut request = self.app.client.post(self.app.url("/orders")).json(&body);
                if let Some(key) = key {
                    request = request.header("Idempotency-Key", KEYS[*key]);
                }
                let answer = send(request).await;
                problem(&answer, 422, "validation_failed")?;
                let fields: Vec<&str> = answer.body["errors"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e["field"].as_str())
                    .collect();
                ensure!(fields == [field], "the bad field is named: {}", answer.body);
                Ok(())
            }
            Op::Cancel { order, copies, faults } => {
                let copies = if faults.0.is_empty() { *copies } else { 1 };
                self.cancel(*order, copies, faults).await
            }
            Op::ReadProduct { product } => {
                let id = PRODUCTS[*product];
                let answer = self.get(&format!("/products/{id}")).await;
                match self.model.product_view(id) {
                    Some(view) => {
                        success(&answer, 200)?;
                        ensure!(answer.body == view, "product {id}: got {}\nwant {view}", answer.body);
                    }
                    None => problem(&answer, 404, "not_found")?,
                }
                Ok(())
            }
            Op::ReadOrder { order } => {
                if self.model.orders.is_empty() {
                    let answer = self.get(&format!("/orders/{}", uuid::Uuid::now_v7())).await;
                    return problem(&answer, 404, "not_found");
                }
                let order = &self.model.orders[order % self.model.orders.len()];
                let answer = self.get(&format!("/orders/{}", order.id)).await;
                success(&answer, 200)?;
                ensure!(comparable(&answer.body) == order.view(), "got {}\nwant {}", answer.body, order.view());
                Ok(())
            }
            Op::WatchOrder { order } => {
                if self.model.orders.is_empty() {
                    let answer = self.get(&format!("/orders/{}/events", uuid::Uuid::now_v7())).await;
                    return problem(&answer, 404, "not_found");
                }
                self.watch(&self.model.orders[order % self.model.orders.len()]).await
            }
            Op::ListOrders { customer, status, page } => {
                let customer = customer.map(|c| CUSTOMERS[c]);
                let mut query = String::new();
                if let Some(c) = customer {
                    query.push_str(&format!("&customer_id={c}"));
                }
                if let Some(status) = status {
                    query.push_str(&format!("&status={}", status.as_str()));
                }
                let got: Vec<Value> = self.list("/orders", &query, *page).await?.iter().map(comparable).collect();
                let want: Vec<Value> = self
                    .model
                    .orders
                    .iter()
                    .rev()
                    .filter(|o| customer.is_none_or(|c| o.customer == c) && status.is_none_or(|s| o.status == s))
                    .map(Order::view)
                    .collect();
                ensure!(got == want, "GET /orders?{query}, newest first:\ngot  {got:?}\nwant {want:?}");
                Ok(())
            }
            Op::ListProducts { page } => {
                let got = self.list("/products", "", *page).await?;
                let want: Vec<Value> =
                    self.model.products.keys().filter_map(|id| self.model.product_view(id)).collect();
                ensure!(got == want, "GET /products:\ngot  {got:?}\nwant {want:?}");
                Ok(())
            }
        }
    }

    /// Every item of a listing, `page` at a time (following `next_cursor`) or all at once.
    async fn list(&self, path: &str, query: &str, page: Option<i64>) -> Result<Vec<Value>, TestCaseError> {
        let limit = page.unwrap_or(500);
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..100 {
            let after = cursor.as_ref().map(|c| format!("&cursor={c}")).unwrap_or_default();
            let answer = self.get(&format!("{path}?limit={limit}{query}{after}")).await;
            success(&answer, 200)?;
            let page = answer.body["items"].as_array().cloned().unwrap_or_default();
            ensure!(page.len() as i64 <= limit, "a page of at most {limit}: {}", answer.body);
            items.extend(page);
            match answer.body["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_string()),
                None => return Ok(items),
            }
        }
        Err(TestCaseError::fail(format!("{path}?{query}: a listing that never ends")))
    }

    /// Reads an order's event stream, which ends once its sagas have settled: the order first
    /// and last, between them every event of its sagas' histories, each saga's in order.
    async fn watch(&self, order: &Order) -> Result<(), TestCaseError> {
        let answer = self.get(&format!("/orders/{}/events", order.id)).await;
        success_of(&answer, 200, "text/event-stream")?;
        let text = answer.body.as_str().unwrap_or_default();
        let events: Vec<(String, Value)> = text
            .split("\n\n")
            .filter_map(|block| {
                let field =
                    |name: &str| block.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim_start().to_string()));
                Some((field("event:")?, serde_json::from_str(&field("data:")?).ok()?))
            })
            .collect();
        let n = events.len();
        ensure!(n >= 2 && events[0].0 == "order" && events[n - 1].0 == "order", "order events first and last: {text}");
        for (_, view) in [&events[0], &events[n - 1]] {
            ensure!(comparable(view) == order.view(), "the stream's order: got {view}\nwant {}", order.view());
        }
        ensure!(events[1..n - 1].iter().all(|(kind, _)| kind == "saga"), "saga events between: {text}");
        for saga in std::iter::once(&order.saga).chain(&order.cancels) {
            let got: Vec<(Option<&str>, &str)> = events[1..n - 1]
                .iter()
                .filter(|(_, e)| e["saga_id"] == saga.id.as_str())
                .map(|(_, e)| (e["step"].as_str(), e["event"].as_str().unwrap_or_default()))
                .collect();
            ensure!(saga.matches(&got), "the stream's {} events:\ngot  {got:?}\nwant {:?}", saga.kind, saga.events);
        }
        let ours =
            |e: &Value| std::iter::once(&order.saga).chain(&order.cancels).any(|s| e["saga_id"] == s.id.as_str());
        ensure!(events[1..n - 1].iter().all(|(_, e)| ours(e)), "no saga event but the order's: {text}");
        Ok(())
    }

    async fn create_product(&mut self, id: &'static str, price: i64, stock: i64) -> Result<(), TestCaseError> {
        let body = json!({"id": id, "name": format!("Product {id}"), "price_cents": price, "stock": stock});
        let answer = self.post("/products", &body).await;
        if self.model.products.contains_key(id) {
            return problem(&answer, 409, "product_exists");
        }
        self.model.products.insert(id, Product { price, available: stock, sold: 0, added: stock });
        success(&answer, 201)?;
        let view = self.model.product_view(id).unwrap();
        ensure!(answer.body == view, "created {id}: got {}\nwant {view}", answer.body);
        ensure!(answer.location.as_deref() == Some(&format!("/products/{id}")), "Location: {answer:?}");
        Ok(())
    }

    async fn restock(&mut self, id: &'static str, quantity: i64) -> Result<(), TestCaseError> {
        let answer = self.post(&format!("/products/{id}/restock"), &json!({"quantity": quantity})).await;
        let Some(product) = self.model.products.get_mut(id) else { return problem(&answer, 404, "not_found") };
        if product.added > MAX_SAFE_INTEGER - quantity {
            problem(&answer, 422, "validation_failed")?;
            ensure!(answer.body["errors"][0]["field"] == "quantity", "the field named: {}", answer.body);
            return Ok(());
        }
        product.available += quantity;
        product.added += quantity;
        success(&answer, 200)?;
        let view = self.model.product_view(id).unwrap();
        ensure!(answer.body == view, "restocked {id}: got {}\nwant {view}", answer.body);
        Ok(())
    }

    /// Sends a placement `copies` times at once and checks every answer and what it did.
    async fn place(&mut self, placing: Placing, faults: &Faults) -> Result<(), TestCaseError> {
        let Placing { customer, lines, body, wire, key, respond_async, copies } = placing;
        let mut items = lines.clone();
        items.sort();
        // What the key says, before the request: a replay, a reuse, or nothing.
        let recorded = key.and_then(|k| self.model.keys.get(k)).cloned();
        if let Some(key) = key {
            self.model.sent.push(Sent { key, customer, items: lines.clone(), body: body.clone() });
        }
        self.injector.arm(PLACE, faults);
        let mut tasks = Vec::new();
        for _ in 0..copies {
            let mut request = match &wire {
                Some(text) => self
                    .app
                    .client
                    .post(self.app.url("/orders"))
                    .header("content-type", "application/json")
                    .body(text.clone()),
                None => self.app.client.post(self.app.url("/orders")).json(&body),
            };
            if let Some(key) = key {
                request = request.header("Idempotency-Key", key);
            }
            if respond_async {
                request = request.header("Prefer", "respond-async");
            }
            tasks.push(tokio::spawn(send(request)));
        }
        let mut answers = Vec::new();
        for task in tasks {
            answers.push(task.await.expect("the request task"));
        }
        let used = match recorded {
            Some((first_body, index)) if first_body == body => {
                let order = &self.model.orders[index];
                for answer in &answers {
                    ensure!(answer.replayed, "a replay says so: {answer:?}");
                    placement_answer(answer, order)?;
                }
                self.same_as_read(&answers, order).await?;
                BTreeMap::new()
            }
            Some(_) => {
                for answer in &answers {
                    problem(answer, 422, "idempotency_key_reused")?;
                }
                BTreeMap::new()
            }
            None => self.new_order(customer, items, key, body, respond_async, &answers, faults).await?,
        };
        self.faults_used_as_modelled(faults, &used)
    }

    /// Checks the answers of a placement that made a new order, waits for it if it was answered
    /// early, and adds it to the model. Returns the faults its saga used.
    #[allow(clippy::too_many_arguments)]
    async fn new_order(
        &mut self,
        customer: &'static str,
        items: Vec<(&'static str, i64)>,
        key: Option<&'static str>,
        body: Value,
        respond_async: bool,
        answers: &[Answer],
        faults: &Faults,
    ) -> Result<BTreeMap<String, usize>, TestCaseError> {
        let firsts: Vec<&Answer> = answers.iter().filter(|a| !a.replayed).collect();
        ensure!(firsts.len() == 1, "exactly one of {} copies makes the order: {answers:#?}", answers.len());
        let first = firsts[0];
        let placement = self.model.place(&items, faults);
        let ids = |a: &Answer| {
            let id = a.body.get("id").or_else(|| a.body.get("order_id")).and_then(Value::as_str).map(str::to_string);
            let saga = a.body.get("saga_id").and_then(Value::as_str).map(str::to_string);
            id.zip(saga)
        };
        let Some((id, saga_id)) = ids(first) else {
            return Err(TestCaseError::fail(format!("the answer names its order and saga: {first:?}")));
        };
        for answer in answers {
            ensure!(ids(answer).is_some_and(|(i, _)| i == id), "every copy answers the same order: {answers:#?}");
        }
        let prices = placement
            .priced
            .then(|| items.iter().map(|(p, _)| self.model.products.get(p).map_or(0, |p| p.price)).collect());
        let order = Order {
            id: id.clone(),
            customer,
            items: items.clone(),
            prices,
            status: placement.status,
            failure: placement.failure,
            saga: ExpectedSaga { id: saga_id.clone(), ..placement.saga },
            cancels: Vec::new(),
        };
        if respond_async {
            success(first, 202)?;
            let pending = json!({
                "id": id, "customer_id": customer, "status": "pending",
                "items": items.iter().map(|(p, q)| json!({"product_id": p, "quantity": q, "unit_price_cents": null}))
                    .collect::<Vec<_>>(),
                "total_cents": null, "saga_id": saga_id, "cancel_saga_id": null, "failure": null,
            });
            ensure!(comparable(&first.body) == pending, "202: got {}\nwant {pending}", first.body);
            ensure!(first.location.as_deref() == Some(&format!("/orders/{id}")), "Location: {first:?}");
            self.wait_settled(&saga_id).await?;
            // A replay that came in while the saga ran is answered as the order then stood.
            for replay in answers.iter().filter(|a| a.replayed) {
                if replay.status != 202 {
                    placement_answer(replay, &order)?;
                }
            }
        } else {
            for answer in answers {
                placement_answer(answer, &order)?;
            }
        }
        if order.status == Status::Confirmed {
            take(&mut self.model.products, &items);
        }
        let index = self.model.orders.len();
        self.model.orders.push(order);
        if let Some(key) = key {
            self.model.keys.insert(key, (body, index));
        }
        let order = &self.model.orders[index];
        let settled: Vec<Answer> = answers.iter().filter(|a| a.status != 202).cloned().collect();
        self.same_as_read(&settled, order).await?;
        Ok(placement.used)
    }

    /// Places an order whose step `HELD[step]` fails until an operator has acted on its saga.
    async fn held(
        &mut self,
        customer: &'static str,
        lines: &[(&'static str, i64)],
        step: usize,
        abort: bool,
    ) -> Result<(), TestCaseError> {
        let mut items = lines.to_vec();
        items.sort();
        let reserved = reserve(&self.model.products, &items);
        // The outage holds the saga only if it gets that far.
        let reaches = step == 0 || reserved.is_ok();
        self.injector.outage(Some(HELD[step]));
        let request = self.app.client.post(self.app.url("/orders")).header("Prefer", "respond-async");
        let answer = send(request.json(&order_body(customer, lines))).await;
        success(&answer, 202)?;
        let (Some(id), Some(saga_id)) = (answer.body["id"].as_str(), answer.body["saga_id"].as_str()) else {
            return Err(TestCaseError::fail(format!("the answer names its order and saga: {answer:?}")));
        };
        let (id, saga_id) = (id.to_string(), saga_id.to_string());
        let operator = json!({"actor": "model", "reason": "the model test says so"});
        let mut placement = Model::placement(reserved.clone(), &Faults::default());
        if reaches {
            // Held: its step has failed at least once.
            let deadline = tokio::time::Instant::now() + HANG;
            loop {
                let saga = self.get(&format!("/sagas/{saga_id}")).await;
                let failed = saga.body["events"]
                    .as_array()
                    .is_some_and(|events| events.iter().any(|e| e["step"] == HELD[step] && e["event"] == "failed"));
                if failed {
                    break;
                }
                ensure!(tokio::time::Instant::now() < deadline, "the outage never held the saga: {}", saga.body);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let mut retry = !abort;
            if abort {
                let answer = self.post(&format!("/sagas/{saga_id}/abort"), &operator).await;
                if step < 3 {
                    success(&answer, 200)?;
                    placement = Model::aborted(step);
                } else {
                    // Past the pivot a saga only goes forward: retried instead.
                    problem(&answer, 409, "saga_past_pivot")?;
                    retry = true;
                }
            }
            if retry {
                let answer = self.post(&format!("/sagas/{saga_id}/retry"), &operator).await;
                success(&answer, 200)?;
                // Before the held step's first event: its success, or its real failure.
                let at = placement.saga.events.iter().position(|e| e.0 == Some(HELD[step])).unwrap();
                placement.saga.events.insert(at, (None, "operator_retry"));
            }
            self.injector.outage(None);
        } else {
            self.injector.outage(None);
        }
        self.wait_settled(&saga_id).await?;
        if !reaches {
            let action = if abort { "abort" } else { "retry" };
            let answer = self.post(&format!("/sagas/{saga_id}/{action}"), &operator).await;
            problem(&answer, 409, "saga_finished")?;
        }
        let prices = placement.priced.then(|| items.iter().map(|(p, _)| self.model.products[p].price).collect());
        let order = Order {
            id,
            customer,
            items: items.clone(),
            prices,
            status: placement.status,
            failure: placement.failure,
            saga: ExpectedSaga { id: saga_id, lenient: reaches, ..placement.saga },
            cancels: Vec::new(),
        };
        if order.status == Status::Confirmed {
            take(&mut self.model.products, &items);
        }
        self.same_as_read(&[], &order).await?;
        self.model.orders.push(order);
        Ok(())
    }

    /// Sends unkeyed placements at once. Their outcomes must be those of one of the serial
    /// orders of the same requests; the model then takes that one.
    async fn burst(&mut self, orders: &[(&'static str, Vec<(&'static str, i64)>)]) -> Result<(), TestCaseError> {
        self.injector.arm(PLACE, &Faults::default());
        let tasks: Vec<_> = orders
            .iter()
            .map(|(customer, lines)| {
                tokio::spawn(send(self.app.client.post(self.app.url("/orders")).json(&order_body(customer, lines))))
            })
            .collect();
        let mut answers = Vec::new();
        for task in tasks {
            answers.push(task.await.expect("the request task"));
        }
        // What each request got: its order, saga and outcome.
        let mut seen = Vec::new();
        for answer in &answers {
            let outcome = match answer.status {
                201 => Ok(()),
                409 | 422 => {
                    let code =
                        ["insufficient_stock", "unknown_product"].into_iter().find(|c| answer.body["code"] == *c);
                    let product = PRODUCTS.into_iter().find(|p| answer.body["product_id"] == *p);
                    match code {
                        Some(code) => Err(Rejection { code, product }),
                        None => return Err(TestCaseError::fail(format!("an unexpected rejection: {answer:?}"))),
                    }
                }
                _ => return Err(TestCaseError::fail(format!("an unexpected answer: {answer:?}"))),
            };
            let id = answer.body.get("id").or_else(|| answer.body.get("order_id")).and_then(Value::as_str);
            let saga = answer.body["saga_id"].as_str();
            let (Some(id), Some(saga)) = (id, saga) else {
                return Err(TestCaseError::fail(format!("the answer names its order and saga: {answer:?}")));
            };
            seen.push((id.to_string(), saga.to_string(), outcome));
        }
        let mut explained = None;
        for order in serial_orders(orders.len()) {
            let mut products = self.model.products.clone();
            let fits = order.iter().all(|&i| {
                let mut items = orders[i].1.clone();
                items.sort();
                let outcome = reserve(&products, &items);
                if outcome.is_ok() {
                    take(&mut products, &items);
                }
                outcome == seen[i].2
            });
            if fits {
                explained = Some(products);
                break;
            }
        }
        let Some(products) = explained else {
            return Err(TestCaseError::fail(format!("no serial order gives these outcomes: {seen:?}")));
        };
        self.model.products = products;
        // Into the model in the order of their ids, which is how the service lists them.
        let mut by_id: Vec<usize> = (0..orders.len()).collect();
        by_id.sort_by(|a, b| seen[*a].0.cmp(&seen[*b].0));
        for i in by_id {
            let (customer, lines) = &orders[i];
            let mut items = lines.clone();
            items.sort();
            let (id, saga_id, outcome) = seen[i].clone();
            let placement = Model::placement(outcome, &Faults::default());
            let prices = placement.priced.then(|| items.iter().map(|(p, _)| self.model.products[p].price).collect());
            let order = Order {
                id,
                customer,
                items,
                prices,
                status: placement.status,
                failure: placement.failure,
                saga: ExpectedSaga { id: saga_id, lenient: true, ..placement.saga },
                cancels: Vec::new(),
            };
            placement_answer(&answers[i], &order)?;
            self.same_as_read(&answers[i..=i], &order).await?;
            self.model.orders.push(order);
        }
        let left = self.injector.disarm();
        ensure!(left.is_empty(), "no fault was armed, yet {left:?} are left");
        Ok(())
    }

    /// Disarms the injector and checks that the faults left unused are what the model, having
    /// used `used` of `faults`, expects.
    fn faults_used_as_modelled(&self, faults: &Faults, used: &BTreeMap<String, usize>) -> Result<(), TestCaseError> {
        let left = self.injector.disarm();
        let want = Model::left_over(faults, used);
        ensure!(
            left == want,
            "faults left over: {left:?}, the model expects {want:?} (its saga attempted other steps)"
        );
        Ok(())
    }

    /// Every settled 201 among `answers` is exactly what `GET /orders/{id}` reads, times
    /// included: an answer built from the saga's log equals the table.
    async fn same_as_read(&self, answers: &[Answer], order: &Order) -> Result<(), TestCaseError> {
        let read = self.get(&format!("/orders/{}", order.id)).await;
        success(&read, 200)?;
        ensure!(comparable(&read.body) == order.view(), "GET the order: got {}\nwant {}", read.body, order.view());
        for answer in answers.iter().filter(|a| a.status == 201) {
            ensure!(
                answer.body == read.body,
                "the answer {} differs from the order read back {}",
                answer.body,
                read.body
            );
        }
        Ok(())
    }

    async fn wait_settled(&self, saga_id: &str) -> Result<(), TestCaseError> {
        let deadline = tokio::time::Instant::now() + HANG;
        loop {
            let saga = self.get(&format!("/sagas/{saga_id}")).await;
            if matches!(saga.body["state"].as_str(), Some("completed" | "compensated")) {
                return Ok(());
            }
            ensure!(tokio::time::Instant::now() < deadline, "saga {saga_id} never settled: {}", saga.body);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn cancel(&mut self, order: usize, copies: usize, faults: &Faults) -> Result<(), TestCaseError> {
        self.injector.arm(CANCEL, faults);
        if self.model.orders.is_empty() {
            let answer = self.post(&format!("/orders/{}/cancel", uuid::Uuid::now_v7()), &json!({})).await;
            problem(&answer, 404, "not_found")?;
            return self.faults_used_as_modelled(faults, &BTreeMap::new());
        }
        let index = order % self.model.orders.len();
        let id = self.model.orders[index].id.clone();
        let mut tasks = Vec::new();
        for _ in 0..copies {
            tasks.push(tokio::spawn(send(self.app.client.post(self.app.url(&format!("/orders/{id}/cancel"))))));
        }
        let mut answers = Vec::new();
        for task in tasks {
            answers.push(task.await.expect("the request task"));
        }
        // Copies at once all follow the one cancel saga attached first.
        let answer = answers[0].clone();
        for other in &answers[1..] {
            ensure!(other.status == answer.status && other.body == answer.body, "copies answer alike: {answers:#?}");
        }
        let mut used = BTreeMap::new();
        let status = self.model.orders[index].status;
        match status {
            Status::Rejected => problem(&answer, 409, "order_not_cancellable")?,
            Status::Cancelled => success(&answer, 200)?,
            Status::Confirmed => {
                let (cancels, saga, saga_used) = Model::cancel(faults);
                used = saga_used;
                let read = self.get(&format!("/orders/{id}")).await;
                let Some(saga_id) = read.body["cancel_saga_id"].as_str() else {
                    return Err(TestCaseError::fail(format!("a cancel saga is attached: {}", read.body)));
                };
                let order = &mut self.model.orders[index];
                ensure!(order.cancels.iter().all(|s| s.id != saga_id), "a new cancel saga: {}", read.body);
                order.cancels.push(ExpectedSaga { id: saga_id.to_string(), ..saga });
                if cancels {
                    order.status = Status::Cancelled;
                    for (product, quantity) in order.items.clone() {
                        let p = self.model.products.get_mut(product).unwrap();
                        p.available += quantity;
                        p.sold -= quantity;
                    }
                    success(&answer, 200)?;
                } else {
                    problem(&answer, 409, "order_not_cancellable")?;
                }
            }
        }
        let order = &self.model.orders[index];
        if answer.status == 200 {
            ensure!(comparable(&answer.body) == order.view(), "cancelled: got {}\nwant {}", answer.body, order.view());
        }
        self.faults_used_as_modelled(faults, &used)
    }

    /// After the sequence: everything the service holds equals the model, and the invariants of
    /// docs/design.md hold.
    async fn check_everything(&self) -> Result<(), TestCaseError> {
        // Products: as the model has them; stock conserved, none negative, nothing reserved.
        let answer = self.get("/products?limit=500").await;
        success(&answer, 200)?;
        let want: Vec<Value> = self.model.products.keys().filter_map(|id| self.model.product_view(id)).collect();
        ensure!(answer.body["items"] == json!(want), "products:\ngot  {}\nwant {want:?}", answer.body["items"]);
        for p in answer.body["items"].as_array().unwrap() {
            let id = p["id"].as_str().unwrap();
            let (a, r, s) =
                (p["available"].as_i64().unwrap(), p["reserved"].as_i64().unwrap(), p["sold"].as_i64().unwrap());
            ensure!(a >= 0 && r == 0 && s >= 0, "no oversell, nothing reserved once settled: {p}");
            ensure!(a + r + s == self.model.products[id].added, "stock of {id} conserved: {p}");
        }
        // Orders: as the model has them, newest first, none pending.
        let answer = self.get("/orders?limit=500").await;
        success(&answer, 200)?;
        let got: Vec<Value> = answer.body["items"].as_array().unwrap().iter().map(comparable).collect();
        let want: Vec<Value> = self.model.orders.iter().rev().map(Order::view).collect();
        ensure!(got == want, "orders:\ngot  {got:#?}\nwant {want:#?}");
        // Sagas: each finished as the model says, its history event by event; no other saga.
        let answer = self.get("/sagas?limit=500").await;
        success(&answer, 200)?;
        let listed = answer.body["items"].as_array().unwrap();
        let expected: Vec<&ExpectedSaga> =
            self.model.orders.iter().flat_map(|o| std::iter::once(&o.saga).chain(&o.cancels)).collect();
        ensure!(listed.len() == expected.len(), "{} sagas in the log, the model has {}", listed.len(), expected.len());
        for saga in &expected {
            self.check_saga(saga).await?;
        }
        // Each order's status is its sagas' outcome.
        for order in &self.model.orders {
            let cancelled = order.cancels.last().is_some_and(|s| s.state == "completed");
            let want = match (order.saga.state, cancelled) {
                ("completed", false) => Status::Confirmed,
                ("completed", true) => Status::Cancelled,
                _ => Status::Rejected,
            };
            ensure!(order.status == want, "order {} is {:?} but its sagas say {want:?}", order.id, order.status);
            let failed = order.cancels.iter().rev().skip(1).all(|s| s.state == "compensated");
            ensure!(failed, "only the last cancel saga of order {} may have cancelled it", order.id);
        }
        self.check_reservations().await?;
        self.check_keys().await
    }

    /// One saga: its state, released and not stuck, its history as the model expects, and that
    /// history, folded through the log's state machine, gives exactly its row.
    async fn check_saga(&self, want: &ExpectedSaga) -> Result<(), TestCaseError> {
        let answer = self.get(&format!("/sagas/{}", want.id)).await;
        success(&answer, 200)?;
        let body = &answer.body;
        ensure!(
            body["kind"] == want.kind && body["state"] == want.state && body["stuck"] == false,
            "saga {} ({}): {body}",
            want.id,
            want.kind
        );
        let events: Vec<(Option<String>, String)> = body["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["step"].as_str().map(str::to_string), e["event"].as_str().unwrap().to_string()))
            .collect();
        let got: Vec<(Option<&str>, &str)> = events.iter().map(|(s, e)| (s.as_deref(), e.as_str())).collect();
        ensure!(
            want.matches(&got),
            "the history of {} saga {}:\ngot  {got:?}\nwant {:?}",
            want.kind,
            want.id,
            want.events
        );
        let (saga, events) = self.app.engine.saga(&want.id).await.unwrap().expect("the saga is in the log");
        ensure!(saga.owner.is_none() && saga.lease_expires_at == 0, "saga {} released: {saga:?}", want.id);
        let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
        ensure!(seqs == (0..saga.next_seq).collect::<Vec<_>>(), "a gap-free history: {events:?}");
        let def: SagaDefinition =
            if want.kind == PLACE { place_order::definition() } else { cancel_order::definition() };
        let shape = def.shape();
        let mut position = Position::START;
        for event in &events {
            ensure!(!matches!(event.kind, EventKind::Unknown(_)), "{event:?}");
            let step = event.step.as_deref().map(|name| shape.index_of(name).expect("a step of the definition"));
            position = match next(shape, position, step, &event.kind) {
                Ok(transition) => transition.position,
                Err(e) => return Err(TestCaseError::fail(format!("an illegal history: {e}: {events:?}"))),
            };
        }
        ensure!(position == saga.position(), "the row of {} is what its history computes: {saga:?}", want.id);
        Ok(())
    }

    /// Reservations: a confirmed order's lines committed, a rejected one's released, a
    /// cancelled one's returned; `sold` is exactly the committed ones.
    async fn check_reservations(&self) -> Result<(), TestCaseError> {
        let rows = sqlx::query("SELECT saga_id, product_id, quantity, status FROM reservations")
            .fetch_all(&self.app.state.inventory.db().pool)
            .await
            .unwrap();
        let mut got: BTreeMap<(String, String), (i64, String)> = BTreeMap::new();
        for row in &rows {
            got.insert((row.get("saga_id"), row.get("product_id")), (row.get::<i64, _>("quantity"), row.get("status")));
        }
        let mut want = BTreeMap::new();
        for order in &self.model.orders {
            let status = match order.status {
                Status::Confirmed => "committed",
                Status::Rejected => "released",
                Status::Cancelled => "returned",
            };
            for (product, quantity) in &order.items {
                want.insert((order.saga.id.clone(), product.to_string()), (*quantity, status.to_string()));
            }
        }
        ensure!(got == want, "reservations:\ngot  {got:?}\nwant {want:?}");
        for (id, product) in &self.model.products {
            let committed: i64 =
                got.iter().filter(|((_, p), (_, s))| p == id && s == "committed").map(|(_, (q, _))| q).sum();
            ensure!(committed == product.sold, "sold of {id} = its committed reservations ({committed})");
        }
        Ok(())
    }

    /// One order per idempotency key: the keys recorded are the model's, each with its order.
    async fn check_keys(&self) -> Result<(), TestCaseError> {
        let rows = sqlx::query("SELECT scope, key, saga_id, order_id FROM idempotency_keys")
            .fetch_all(&self.app.engine.log_db().pool)
            .await
            .unwrap();
        let got: BTreeMap<String, (String, String, String)> =
            rows.iter().map(|r| (r.get("key"), (r.get("scope"), r.get("order_id"), r.get("saga_id")))).collect();
        let want: BTreeMap<String, (String, String, String)> = self
            .model
            .keys
            .iter()
            .map(|(key, (_, index))| {
                let order = &self.model.orders[*index];
                (key.to_string(), ("POST /orders".to_string(), order.id.clone(), order.saga.id.clone()))
            })
            .collect();
        ensure!(rows.len() == got.len() && got == want, "idempotency keys:\ngot  {got:?}\nwant {want:?}");
        Ok(())
    }
}

/// Runs one sequence against a fresh app on fresh databases.
async fn run_case(case: &Case) -> Result<(), TestCaseError> {
    let dbs = fresh_databases().await;
    let mut config = config(&dbs);
    config.stuck_after_attempts = STUCK_AFTER;
    // A saga here settles in milliseconds: a request still waiting after this long hangs.
    config.order_wait_ms = HANG.as_millis() as u64;
    let injector = Arc::new(Injector::default());
    let app = spawn_app_with(config, Some(injector.clone())).await;
    let mut run = Run { app: &app, injector: &injector, model: Model::default() };
    for (i, op) in case.0.iter().enumerate() {
        run.apply(op).await.map_err(|e| TestCaseError::fail(format!("operation {i} ({op:?}): {e}")))?;
        let sagas = run.model.orders.iter().flat_map(|o| std::iter::once(&o.saga).chain(&o.cancels));
        injector.earlier.lock().unwrap().extend(sagas.map(|s| s.id.clone()));
    }
    run.check_everything().await.map_err(|e| TestCaseError::fail(format!("after the sequence: {e}")))?;
    drop(run);
    app.stop().await;
    if !on_postgres() {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", dbs.url));
        }
    }
    Ok(())
}

/// Every order in which `n` requests could have run, one after the other.
fn serial_orders(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![Vec::new()];
    }
    let mut all = Vec::new();
    for shorter in serial_orders(n - 1) {
        for at in 0..=shorter.len() {
            let mut order = shorter.clone();
            order.insert(at, n - 1);
            all.push(order);
        }
    }
    all
}

/// The runner's settings: 24 cases unless `PROPTEST_CASES` says otherwise (proptest reads its
/// other `PROPTEST_*` variables itself); shrinking tries up to 1000 sequences, for 2 minutes at
/// most, so that the minimal sequence is printed before nextest's limit (4 minutes) stops a
/// failing run; failing seeds kept under target/.
fn proptest_config() -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = 24;
    }
    if std::env::var_os("PROPTEST_MAX_SHRINK_ITERS").is_none() {
        config.max_shrink_iters = 1000;
    }
    if std::env::var_os("PROPTEST_MAX_SHRINK_TIME").is_none() {
        config.max_shrink_time = 2 * 60 * 1000;
    }
    config.failure_persistence =
        Some(Box::new(FileFailurePersistence::Direct(concat!(env!("CARGO_TARGET_TMPDIR"), "/model-regressions.txt"))));
    config
}

#[test]
fn the_service_behaves_like_its_model() {
    let mut runner = TestRunner::new(proptest_config());
    let result = runner.run(&case(), |case| {
        // A runtime per case: whatever a failed case left running ends with it.
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(run_case(&case))
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, case)) => panic!("{reason}\nminimal failing sequence, {case:?}"),
        Err(TestError::Abort(reason)) => panic!("proptest gave up: {reason}"),
    }
}
