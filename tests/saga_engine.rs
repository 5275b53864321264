//! The generic saga engine, driven through a toy saga that knows nothing about orders: retries,
//! compensation, the pivot, the stuck flag, the deadline, repeated steps, crashes at every step,
//! generation fencing and graceful shutdown.
//!
//! The toy saga has four steps in two participants: the log database and a second database
//! ("remote"). Each action writes a `done` row and each compensation an `undone` row (a tombstone
//! that turns a late action into a no-op) into `toy_effects`; `toy_runs` counts every committed
//! run of every action and compensation, so a test can tell "ran twice, took effect once".
mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use common::{eventually, fresh_databases};
use order_saga::db::{Db, PoolSettings, now_ms};
use order_saga::saga::log::{self, LogError, NewEvent};
use order_saga::saga::{
    Ctx, Engine, EngineConfig, Event, EventKind, Fault, FaultInjector, FaultPlan, LOG_PARTICIPANT, Phase,
    SagaDefinition, SagaFilter, SagaKind, SagaRecord, SagaState, StepError, StepKey,
};
use serde_json::{Value, json};
use sqlx::{AnyConnection, Executor, Row};
use tokio::sync::watch;

const KIND: SagaKind<Value> = SagaKind::new("toy");
const REMOTE: &str = "remote";
/// The toy saga's steps, in order: `pivot` is the pivot.
const STEPS: [&str; 4] = ["reserve", "record", "pivot", "finish"];
/// The saga's input `n`; `reserve` outputs `2n` and `record` writes that output into its effect.
const INPUT_N: i64 = 7;
const SETTLE: Duration = Duration::from_secs(30);
/// The output `reserve` keeps in the log, which `record` reads.
const RESERVE: StepKey<Value> = StepKey::new("reserve");

// ---------------------------------------------------------------------------------------------
// The toy saga
// ---------------------------------------------------------------------------------------------

fn definition() -> SagaDefinition {
    SagaDefinition::of(KIND, 1)
        .step(RESERVE, REMOTE, reserve)
        .compensated_by(unreserve)
        .step(StepKey::new("record"), LOG_PARTICIPANT, record)
        .compensated_by(unrecord)
        .step(StepKey::new("pivot"), LOG_PARTICIPANT, pivot)
        .pivot()
        .step(StepKey::new("finish"), REMOTE, finish)
        .build()
}

async fn reserve(conn: &mut AnyConnection, cx: Ctx<'_, Value>) -> Result<Value, StepError> {
    act(conn, cx, "reserve").await
}

async fn unreserve(conn: &mut AnyConnection, cx: Ctx<'_, Value>) -> Result<(), StepError> {
    undo(conn, cx, "reserve").await
}

async fn record(conn: &mut AnyConnection, cx: Ctx<'_, Value>) -> Result<Value, StepError> {
    act(conn, cx, "record").await
}

async fn unrecord(conn: &mut AnyConnection, cx: Ctx<'_, Value>) -> Result<(), StepError> {
    undo(conn, cx, "record").await
}

async fn pivot(conn: &mut AnyConnection, cx: Ctx<'_, Value>) -> Result<Value, StepError> {
    act(conn, cx, "pivot").await
}

async fn finish(conn: &mut AnyConnection, cx: Ctx<'_, Value>) -> Result<Value, StepError> {
    act(conn, cx, "finish").await
}

/// An action: counts the run, then writes its `done` effect once, unless a tombstone is there.
async fn act(conn: &mut AnyConnection, cx: Ctx<'_, Value>, step: &'static str) -> Result<Value, StepError> {
    if step == "finish" {
        gate_wait(cx.saga_id).await;
    }
    count_run(conn, cx.saga_id, step, "action").await?;
    let detail = match step {
        // Reads an earlier step's output from the log (docs/design.md, rule 6).
        "record" => Some(
            cx.output(RESERVE)?["n"]
                .as_i64()
                .ok_or_else(|| StepError::transient("no output of reserve in the log"))?
                .to_string(),
        ),
        _ => None,
    };
    let tombstones: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM toy_effects WHERE saga_id = $1 AND step = $2 AND kind = 'undone'")
            .bind(cx.saga_id)
            .bind(step)
            .fetch_one(&mut *conn)
            .await?;
    if tombstones == 0 {
        sqlx::query(
            "INSERT INTO toy_effects (saga_id, step, kind, detail) VALUES ($1, $2, 'done', $3) \
             ON CONFLICT (saga_id, step, kind) DO NOTHING",
        )
        .bind(cx.saga_id)
        .bind(step)
        .bind(detail)
        .execute(&mut *conn)
        .await?;
    }
    let n = cx.input["n"].as_i64().unwrap_or_default();
    Ok(match step {
        "reserve" => json!({ "n": n * 2 }),
        _ => json!({ "step": step }),
    })
}

/// A compensation: counts the run and writes the `undone` tombstone once.
async fn undo(conn: &mut AnyConnection, cx: Ctx<'_, Value>, step: &'static str) -> Result<(), StepError> {
    count_run(conn, cx.saga_id, step, "compensation").await?;
    sqlx::query(
        "INSERT INTO toy_effects (saga_id, step, kind, detail) VALUES ($1, $2, 'undone', NULL) \
         ON CONFLICT (saga_id, step, kind) DO NOTHING",
    )
    .bind(cx.saga_id)
    .bind(step)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn count_run(conn: &mut AnyConnection, saga_id: &str, step: &str, phase: &str) -> Result<(), StepError> {
    sqlx::query(
        "INSERT INTO toy_runs (saga_id, step, phase, n) VALUES ($1, $2, $3, 1) \
         ON CONFLICT (saga_id, step, phase) DO UPDATE SET n = toy_runs.n + 1",
    )
    .bind(saga_id)
    .bind(step)
    .bind(phase)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A gate a test can put in front of the first run of `finish` of one saga: that run waits
/// (before touching its database) until the test opens it; later runs pass.
struct Gate {
    entered: AtomicBool,
    open: watch::Sender<bool>,
}

static GATES: LazyLock<Mutex<HashMap<String, Arc<Gate>>>> = LazyLock::new(Default::default);

fn add_gate(saga_id: &str) -> Arc<Gate> {
    let gate = Arc::new(Gate { entered: AtomicBool::new(false), open: watch::channel(false).0 });
    GATES.lock().unwrap().insert(saga_id.to_string(), gate.clone());
    gate
}

async fn gate_wait(saga_id: &str) {
    let gate = GATES.lock().unwrap().get(saga_id).cloned();
    if let Some(gate) = gate {
        if !gate.entered.swap(true, Ordering::SeqCst) {
            let mut open = gate.open.subscribe();
            let _ = open.wait_for(|open| *open).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fault injectors
// ---------------------------------------------------------------------------------------------

/// A `FaultPlan` that also records every attempt the engine asks about.
#[derive(Default)]
struct Recorder {
    plan: FaultPlan,
    calls: Mutex<Vec<(String, Phase, u32)>>,
}

impl Recorder {
    fn attempts(&self, step: &str, phase: Phase) -> Vec<u32> {
        self.calls.lock().unwrap().iter().filter(|(s, p, _)| s == step && *p == phase).map(|(_, _, a)| *a).collect()
    }
}

impl FaultInjector for Recorder {
    fn fault(&self, kind: &str, step: &str, phase: Phase, attempt: u32) -> Option<Fault> {
        self.calls.lock().unwrap().push((step.to_string(), phase, attempt));
        self.plan.fault(kind, step, phase, attempt)
    }
}

/// Fails every attempt of one action transiently while `failing` is set.
struct Outage {
    step: &'static str,
    failing: AtomicBool,
}

impl Outage {
    fn new(step: &'static str) -> Arc<Self> {
        Arc::new(Self { step, failing: AtomicBool::new(true) })
    }
}

impl FaultInjector for Outage {
    fn fault(&self, _kind: &str, step: &str, phase: Phase, _attempt: u32) -> Option<Fault> {
        (step == self.step && phase == Phase::Action && self.failing.load(Ordering::SeqCst))
            .then(|| Fault::Fail(StepError::transient("injected outage")))
    }
}

fn permanent() -> Fault {
    Fault::Fail(StepError::permanent("injected", "a business rule said no"))
}

fn transient() -> Fault {
    Fault::Fail(StepError::transient("flaky connection"))
}

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// The two databases of a toy test, with the test's own pools for reading effects.
struct Toy {
    log_url: String,
    remote_url: String,
    log: Db,
    remote: Db,
}

async fn connect(url: &str) -> Db {
    Db::connect(url, &PoolSettings::default()).await.expect("connect a test database")
}

impl Toy {
    async fn new() -> Toy {
        let log_url = fresh_databases().await.url;
        let remote_url = fresh_databases().await.url;
        let log = connect(&log_url).await;
        let remote = connect(&remote_url).await;
        for db in [&log, &remote] {
            db.pool
                .execute(
                    "CREATE TABLE toy_effects (saga_id TEXT NOT NULL, step TEXT NOT NULL, kind TEXT NOT NULL, \
                     detail TEXT, PRIMARY KEY (saga_id, step, kind))",
                )
                .await
                .unwrap();
            db.pool
                .execute(
                    "CREATE TABLE toy_runs (saga_id TEXT NOT NULL, step TEXT NOT NULL, phase TEXT NOT NULL, \
                     n BIGINT NOT NULL, PRIMARY KEY (saga_id, step, phase))",
                )
                .await
                .unwrap();
        }
        Toy { log_url, remote_url, log, remote }
    }

    /// A new engine instance (its own pools, its own instance id) on the toy's databases.
    async fn engine(&self, config: EngineConfig, faults: Option<Arc<dyn FaultInjector>>) -> Engine {
        let log = connect(&self.log_url).await;
        let remote = connect(&self.remote_url).await;
        Engine::new(log, HashMap::from([(REMOTE, remote)]), vec![definition()], config, faults)
    }

    /// Every effect of saga `id` in both databases: (step, kind, detail).
    async fn effects(&self, id: &str) -> BTreeSet<(String, String, Option<String>)> {
        let mut effects = BTreeSet::new();
        for db in [&self.log, &self.remote] {
            let rows = sqlx::query("SELECT step, kind, detail FROM toy_effects WHERE saga_id = $1")
                .bind(id)
                .fetch_all(&db.pool)
                .await
                .unwrap();
            for row in rows {
                let inserted = effects.insert((row.get("step"), row.get("kind"), row.get("detail")));
                assert!(inserted, "one effect in two databases for saga {id}");
            }
        }
        effects
    }

    /// How many committed runs each (step, phase) of saga `id` had.
    async fn runs(&self, id: &str) -> BTreeMap<(String, String), i64> {
        let mut runs = BTreeMap::new();
        for db in [&self.log, &self.remote] {
            let rows = sqlx::query("SELECT step, phase, n FROM toy_runs WHERE saga_id = $1")
                .bind(id)
                .fetch_all(&db.pool)
                .await
                .unwrap();
            for row in rows {
                runs.insert((row.get::<String, _>("step"), row.get::<String, _>("phase")), row.get::<i64, _>("n"));
            }
        }
        runs
    }
}

fn config() -> EngineConfig {
    EngineConfig {
        lease: Duration::from_secs(10),
        recovery_interval: Duration::from_millis(50),
        deadline: Duration::from_secs(30),
        stuck_after_attempts: 10,
        backoff_base: Duration::from_millis(2),
        backoff_cap: Duration::from_millis(20),
        ..EngineConfig::default()
    }
}

/// An engine config with a short lease, for crash and takeover tests.
fn short_lease() -> EngineConfig {
    EngineConfig { lease: Duration::from_millis(300), ..config() }
}

fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Writes a toy saga ahead (committed before anything runs) and launches it.
async fn start_with_id(engine: &Engine, id: &str) {
    let ahead = engine.write_ahead(KIND, id.to_string(), &json!({ "n": INPUT_N })).unwrap();
    assert_eq!(ahead.record.generation, 1);
    assert_eq!(ahead.record.owner.as_deref(), Some(engine.instance_id()));
    engine.start(ahead, Vec::new(), None).await.unwrap();
}

async fn start(engine: &Engine) -> String {
    let id = new_id();
    start_with_id(engine, &id).await;
    id
}

async fn settle(engine: &Engine, id: &str) {
    assert!(engine.wait_settled(id, SETTLE).await.unwrap().is_some(), "saga {id} settles");
}

async fn saga(engine: &Engine, id: &str) -> (SagaRecord, Vec<Event>) {
    engine.saga(id).await.unwrap().expect("the saga is in the log")
}

fn effect(step: &str, kind: &str) -> (String, String, Option<String>) {
    let detail = (step == "record" && kind == "done").then(|| (INPUT_N * 2).to_string());
    (step.to_string(), kind.to_string(), detail)
}

/// The effects of a completed saga: every action once, no compensation.
fn completed_effects() -> BTreeSet<(String, String, Option<String>)> {
    STEPS.iter().map(|s| effect(s, "done")).collect()
}

/// The effects of a compensated saga whose first `ran` actions took effect: every step before
/// the pivot is compensated (a tombstone where its action never ran), nothing from the pivot on.
fn compensated_effects(ran: usize) -> BTreeSet<(String, String, Option<String>)> {
    let mut effects: BTreeSet<_> = STEPS[..ran].iter().map(|s| effect(s, "done")).collect();
    effects.insert(effect("reserve", "undone"));
    effects.insert(effect("record", "undone"));
    effects
}

fn runs_of(entries: &[(&str, &str, i64)]) -> BTreeMap<(String, String), i64> {
    entries.iter().map(|(s, p, n)| ((s.to_string(), p.to_string()), *n)).collect()
}

/// Every action ran (and committed) once, except the `(step, n)` overrides.
fn action_runs(overrides: &[(&str, i64)]) -> BTreeMap<(String, String), i64> {
    STEPS
        .iter()
        .map(|s| {
            let n = overrides.iter().find(|(o, _)| o == s).map_or(1, |(_, n)| *n);
            ((s.to_string(), "action".to_string()), n)
        })
        .collect()
}

fn names(events: &[Event], event: &str) -> Vec<String> {
    events.iter().filter(|e| e.kind.as_str() == event).map(|e| e.step.clone().unwrap_or_default()).collect()
}

fn count(events: &[Event], step: &str, event: &str) -> usize {
    events.iter().filter(|e| e.step.as_deref() == Some(step) && e.kind.as_str() == event).count()
}

/// The log invariants of a settled saga: final state, no owner, lease given up, not stuck, a
/// gap-free history from `created` to one final event, and the steps it records in order.
async fn assert_settled(engine: &Engine, id: &str, state: SagaState) -> (SagaRecord, Vec<Event>) {
    let (saga, events) = saga(engine, id).await;
    assert_eq!(saga.state, state, "final state of saga {id}: {saga:?}\n{events:#?}");
    assert!(!saga.stuck, "a settled saga is not stuck: {saga:?}");
    assert_eq!(saga.owner, None, "a settled saga has no owner");
    assert_eq!(saga.lease_expires_at, 0, "a settled saga holds no lease");
    assert_eq!(saga.current_step, if state == SagaState::Completed { STEPS.len() as i64 } else { 0 });
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (0..saga.next_seq).collect::<Vec<_>>(), "a gap-free history: {events:#?}");
    assert_eq!(events[0].kind.as_str(), "created");
    let last = events.last().unwrap();
    assert_eq!((last.step.as_deref(), last.kind.as_str()), (None, state.as_str()), "{events:#?}");
    assert_eq!(events.iter().filter(|e| e.step.is_none() && e.kind.as_str() == state.as_str()).count(), 1);
    match state {
        SagaState::Completed => {
            assert_eq!(names(&events, "succeeded"), STEPS, "each step succeeded once, in order: {events:#?}");
            assert!(names(&events, "compensating").is_empty(), "{events:#?}");
            assert!(saga.failure.is_none());
            assert_eq!(saga.outputs["reserve"], json!({ "n": INPUT_N * 2 }));
        }
        SagaState::Compensated => {
            assert_eq!(names(&events, "compensating"), [""], "one turn backward: {events:#?}");
            let undone: Vec<String> = events
                .iter()
                .filter(|e| e.kind.as_str() == "compensated" && e.step.is_some())
                .map(|e| e.step.clone().unwrap())
                .collect();
            assert_eq!(undone, ["record", "reserve"], "compensated last to first, once each: {events:#?}");
            assert_eq!(count(&events, "pivot", "succeeded") + count(&events, "finish", "succeeded"), 0);
            assert!(saga.failure.is_some());
        }
        _ => unreachable!(),
    }
    (saga, events)
}

// ---------------------------------------------------------------------------------------------
// Forward, backward, retries
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_every_step_once_without_faults() {
    let toy = Toy::new().await;
    let engine = toy.engine(config(), None).await;
    let id = start(&engine).await;
    settle(&engine, &id).await;
    let (saga, _) = assert_settled(&engine, &id, SagaState::Completed).await;
    assert_eq!(saga.generation, 1);
    assert_eq!(saga.attempts, 0);
    assert_eq!(toy.effects(&id).await, completed_effects());
    assert_eq!(toy.runs(&id).await, action_runs(&[]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_then_succeed() {
    let toy = Toy::new().await;
    let recorder = Arc::new(Recorder::default());
    for step in STEPS {
        recorder.plan.add(KIND.name, step, Phase::Action, transient(), 2);
    }
    let engine = toy.engine(config(), Some(recorder.clone())).await;
    let id = start(&engine).await;
    settle(&engine, &id).await;
    let (saga, events) = assert_settled(&engine, &id, SagaState::Completed).await;
    assert!(recorder.plan.exhausted());
    for step in STEPS {
        assert_eq!(recorder.attempts(step, Phase::Action), [1, 2, 3], "attempts of {step}");
        let history: Vec<(&str, Option<&str>)> = events
            .iter()
            .filter(|e| e.step.as_deref() == Some(step))
            .map(|e| (e.kind.as_str(), e.detail.as_deref()))
            .collect();
        assert_eq!(
            history,
            [("failed", Some("flaky connection")), ("failed", Some("flaky connection")), ("succeeded", None)],
            "history of {step}"
        );
    }
    assert_eq!((saga.attempts, saga.last_error), (0, None));
    assert_eq!(toy.effects(&id).await, completed_effects());
    assert_eq!(toy.runs(&id).await, action_runs(&[]), "a failed attempt commits nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failure_before_the_pivot_compensates_last_to_first() {
    let toy = Toy::new().await;
    // The pivot itself is not yet past the pivot: a permanent failure there compensates too.
    for (index, step) in STEPS[..3].iter().enumerate() {
        let plan = Arc::new(FaultPlan::new());
        plan.add(KIND.name, step, Phase::Action, permanent(), 1);
        let engine = toy.engine(config(), Some(plan.clone())).await;
        let id = start(&engine).await;
        settle(&engine, &id).await;
        let (saga, events) = assert_settled(&engine, &id, SagaState::Compensated).await;
        let failure = saga.failure.clone().unwrap();
        assert_eq!(failure["code"], "injected", "{failure}");
        assert_eq!(failure["step"], *step, "{failure}");
        assert_eq!(names(&events, "succeeded"), STEPS[..index], "the steps before {step} ran: {events:#?}");
        assert_eq!(count(&events, step, "failed"), 1);
        let failed_at = events.iter().position(|e| e.kind.as_str() == "failed").unwrap();
        let turned_at = events.iter().position(|e| e.kind.as_str() == "compensating").unwrap();
        assert!(failed_at < turned_at, "the failure is recorded before the turn: {events:#?}");
        assert_eq!(toy.effects(&id).await, compensated_effects(index), "after a failure of {step}");
        let mut runs: Vec<(&str, &str, i64)> = STEPS[..index].iter().map(|s| (*s, "action", 1)).collect();
        runs.extend([("reserve", "compensation", 1), ("record", "compensation", 1)]);
        assert_eq!(toy.runs(&id).await, runs_of(&runs), "after a failure of {step}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failure_after_the_pivot_is_retried_and_flags_stuck() {
    let toy = Toy::new().await;
    let recorder = Arc::new(Recorder::default());
    recorder.plan.add(KIND.name, "finish", Phase::Action, permanent(), 5);
    let engine = toy.engine(EngineConfig { stuck_after_attempts: 3, ..config() }, Some(recorder.clone())).await;
    let id = start(&engine).await;
    settle(&engine, &id).await;
    let (_, events) = assert_settled(&engine, &id, SagaState::Completed).await;
    assert_eq!(recorder.attempts("finish", Phase::Action), [1, 2, 3, 4, 5, 6]);
    let history: Vec<&str> =
        events.iter().filter(|e| e.step.as_deref() == Some("finish")).map(|e| e.kind.as_str()).collect();
    assert_eq!(
        history,
        ["failed", "failed", "failed", "stuck", "failed", "failed", "succeeded"],
        "flagged stuck once, at the third failed attempt"
    );
    assert_eq!(toy.effects(&id).await, completed_effects());
    assert_eq!(toy.runs(&id).await, action_runs(&[]));
    let stuck = engine.list(&SagaFilter { stuck: Some(true), limit: 100, ..SagaFilter::default() }).await.unwrap();
    assert!(stuck.is_empty(), "the flag cleared when the saga completed: {stuck:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_saga_is_listed_and_its_flag_clears_when_it_completes() {
    let toy = Toy::new().await;
    let outage = Outage::new("finish");
    // A deadline that passes while the saga is stuck: past the pivot it does not matter.
    let config = EngineConfig { stuck_after_attempts: 2, deadline: Duration::from_millis(200), ..config() };
    let engine = toy.engine(config, Some(outage.clone())).await;
    let id = start(&engine).await;
    eventually(SETTLE, "the saga is flagged stuck and past its deadline", || {
        let (engine, id) = (engine.clone(), id.clone());
        async move {
            let (saga, _) = saga(&engine, &id).await;
            saga.stuck && now_ms() > saga.deadline_at
        }
    })
    .await;
    let (stuck, events) = saga(&engine, &id).await;
    assert_eq!(stuck.state, SagaState::Running);
    assert_eq!(stuck.current_step, 3, "stuck on finish");
    assert!(stuck.attempts >= 2, "{stuck:?}");
    assert_eq!(stuck.last_error.as_deref(), Some("injected outage"));
    assert_eq!(count(&events, "finish", "stuck"), 1, "{events:#?}");
    let listed = |stuck: bool| {
        let engine = engine.clone();
        async move {
            let filter = SagaFilter { stuck: Some(stuck), limit: 100, ..SagaFilter::default() };
            engine.list(&filter).await.unwrap().into_iter().map(|s| s.id).collect::<Vec<_>>()
        }
    };
    assert_eq!(listed(true).await, [id.as_str()]);
    assert!(listed(false).await.is_empty());
    let kind_filter =
        SagaFilter { kind: Some(KIND.name.into()), state: Some(SagaState::Running), limit: 10, ..Default::default() };
    assert_eq!(engine.list(&kind_filter).await.unwrap().len(), 1);

    outage.failing.store(false, Ordering::SeqCst);
    settle(&engine, &id).await;
    assert_settled(&engine, &id, SagaState::Completed).await;
    assert!(listed(true).await.is_empty(), "the flag cleared when the saga completed");
    assert_eq!(listed(false).await, [id.as_str()]);
    assert_eq!(toy.effects(&id).await, completed_effects());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_past_the_deadline_before_the_pivot_compensate() {
    let toy = Toy::new().await;
    let outage = Outage::new("record");
    let engine = toy.engine(EngineConfig { deadline: Duration::from_millis(300), ..config() }, Some(outage)).await;
    let id = start(&engine).await;
    settle(&engine, &id).await;
    let (saga, events) = assert_settled(&engine, &id, SagaState::Compensated).await;
    let failure = saga.failure.unwrap();
    assert_eq!(failure["code"], "deadline_exceeded", "{failure}");
    assert!(count(&events, "record", "failed") >= 1, "{events:#?}");
    assert_eq!(names(&events, "succeeded"), ["reserve"]);
    assert_eq!(toy.effects(&id).await, compensated_effects(1));
    assert_eq!(
        toy.runs(&id).await,
        runs_of(&[("reserve", "action", 1), ("reserve", "compensation", 1), ("record", "compensation", 1)])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compensations_never_give_up() {
    let toy = Toy::new().await;
    let recorder = Arc::new(Recorder::default());
    recorder.plan.add(KIND.name, "pivot", Phase::Action, permanent(), 1);
    recorder.plan.add(KIND.name, "record", Phase::Compensation, transient(), 3);
    recorder.plan.add(KIND.name, "reserve", Phase::Compensation, permanent(), 3);
    let engine = toy.engine(EngineConfig { stuck_after_attempts: 2, ..config() }, Some(recorder.clone())).await;
    let id = start(&engine).await;
    settle(&engine, &id).await;
    let (_, events) = assert_settled(&engine, &id, SagaState::Compensated).await;
    assert!(recorder.plan.exhausted());
    for step in ["record", "reserve"] {
        assert_eq!(recorder.attempts(step, Phase::Compensation), [1, 2, 3, 4], "compensation attempts of {step}");
        assert_eq!(count(&events, step, "compensation_failed"), 3, "{events:#?}");
        assert_eq!(count(&events, step, "stuck"), 1, "{events:#?}");
    }
    assert_eq!(toy.effects(&id).await, compensated_effects(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_action_run_twice_takes_effect_once() {
    let toy = Toy::new().await;
    let plan = Arc::new(FaultPlan::new());
    for step in STEPS {
        plan.add(KIND.name, step, Phase::Action, Fault::RunTwice, 1);
    }
    let engine = toy.engine(config(), Some(plan.clone())).await;
    let id = start(&engine).await;
    settle(&engine, &id).await;
    assert_settled(&engine, &id, SagaState::Completed).await;
    assert!(plan.exhausted());
    assert_eq!(toy.effects(&id).await, completed_effects());
    let twice: Vec<(&str, i64)> = STEPS.iter().map(|s| (*s, 2)).collect();
    assert_eq!(toy.runs(&id).await, action_runs(&twice), "each action really ran twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_compensation_run_twice_takes_effect_once() {
    let toy = Toy::new().await;
    let plan = Arc::new(FaultPlan::new());
    plan.add(KIND.name, "reserve", Phase::Action, Fault::RunTwice, 1);
    plan.add(KIND.name, "record", Phase::Action, Fault::RunTwice, 1);
    plan.add(KIND.name, "pivot", Phase::Action, permanent(), 1);
    plan.add(KIND.name, "record", Phase::Compensation, Fault::RunTwice, 1);
    plan.add(KIND.name, "reserve", Phase::Compensation, Fault::RunTwice, 1);
    let engine = toy.engine(config(), Some(plan.clone())).await;
    let id = start(&engine).await;
    settle(&engine, &id).await;
    assert_settled(&engine, &id, SagaState::Compensated).await;
    assert!(plan.exhausted());
    assert_eq!(toy.effects(&id).await, compensated_effects(2));
    assert_eq!(
        toy.runs(&id).await,
        runs_of(&[
            ("reserve", "action", 2),
            ("record", "action", 2),
            ("reserve", "compensation", 2),
            ("record", "compensation", 2),
        ])
    );
}

// ---------------------------------------------------------------------------------------------
// Crashes: at every step, before and after its transaction, forward and backward
// ---------------------------------------------------------------------------------------------

/// Crashes the engine (fault `fault` on `phase` of `step`), kills it, and lets a fresh engine
/// with a new instance id and a short lease finish the saga from the log.
async fn crash_and_resume(step: &'static str, phase: Phase, fault: Fault) {
    let toy = Toy::new().await;
    let plan = Arc::new(FaultPlan::new());
    if phase == Phase::Compensation {
        plan.add(KIND.name, "pivot", Phase::Action, permanent(), 1);
    }
    let after = matches!(fault, Fault::CrashAfter);
    plan.add(KIND.name, step, phase, fault, 1);
    let first = toy.engine(short_lease(), Some(plan.clone())).await;
    first.start_background();
    let id = start(&first).await;
    eventually(SETTLE, "the crash fault fires", || {
        let plan = plan.clone();
        async move { plan.exhausted() }
    })
    .await;
    first.kill();
    let first_id = first.instance_id().to_string();
    drop(first);

    let second = toy.engine(short_lease(), None).await;
    assert_ne!(second.instance_id(), first_id);
    second.start_background();
    settle(&second, &id).await;
    let state = if phase == Phase::Action { SagaState::Completed } else { SagaState::Compensated };
    let (saga, _) = assert_settled(&second, &id, state).await;
    assert!(saga.generation >= 2, "the second engine claimed the saga: {saga:?}");

    // A step in the log database commits its effect with its record, so it ran (committed) once
    // whatever the crash. A step in the remote database may be in doubt after the crash: its
    // effect committed, its record not (it rides on the next log transaction, which the crash
    // can roll back), and then it ran again, harmlessly: once or twice.
    let phase_name = if phase == Phase::Action { "action" } else { "compensation" };
    let (effects, expected) = match phase {
        Phase::Action => (completed_effects(), action_runs(&[])),
        Phase::Compensation => (
            compensated_effects(2),
            runs_of(&[
                ("reserve", "action", 1),
                ("record", "action", 1),
                ("reserve", "compensation", 1),
                ("record", "compensation", 1),
            ]),
        ),
    };
    assert_eq!(toy.effects(&id).await, effects, "effects applied once");
    let runs = toy.runs(&id).await;
    assert_eq!(runs.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>(), "the steps that ran: {runs:?}");
    for ((name, run_phase), n) in &runs {
        let remote = matches!(name.as_str(), "reserve" | "finish");
        let crashed_after_it = after && name == step && run_phase == phase_name;
        let allowed = if remote { 1..=2 } else { 1..=1 };
        assert!(allowed.contains(n), "{name} {run_phase} ran {n} times: {runs:?}");
        if remote && crashed_after_it {
            assert_eq!(*n, 2, "a remote step crashed after its commit is in doubt and runs again: {runs:?}");
        }
    }
    second.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_reserve() {
    crash_and_resume("reserve", Phase::Action, Fault::CrashBefore).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_reserve() {
    crash_and_resume("reserve", Phase::Action, Fault::CrashAfter).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_record() {
    crash_and_resume("record", Phase::Action, Fault::CrashBefore).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_record() {
    crash_and_resume("record", Phase::Action, Fault::CrashAfter).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_pivot() {
    crash_and_resume("pivot", Phase::Action, Fault::CrashBefore).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_pivot() {
    crash_and_resume("pivot", Phase::Action, Fault::CrashAfter).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_finish() {
    crash_and_resume("finish", Phase::Action, Fault::CrashBefore).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_finish() {
    crash_and_resume("finish", Phase::Action, Fault::CrashAfter).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_compensating_record() {
    crash_and_resume("record", Phase::Compensation, Fault::CrashBefore).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_compensating_record() {
    crash_and_resume("record", Phase::Compensation, Fault::CrashAfter).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_compensating_reserve() {
    crash_and_resume("reserve", Phase::Compensation, Fault::CrashBefore).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_compensating_reserve() {
    crash_and_resume("reserve", Phase::Compensation, Fault::CrashAfter).await;
}

// ---------------------------------------------------------------------------------------------
// Ownership: fencing, kill, graceful shutdown
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_fences_the_previous_owner() {
    let toy = Toy::new().await;
    // The first owner has no heartbeat: its lease runs out while `finish` hangs.
    let first = toy.engine(short_lease(), None).await;
    let id = new_id();
    let gate = add_gate(&id);
    start_with_id(&first, &id).await;
    eventually(SETTLE, "the first owner hangs in finish", || {
        let gate = gate.clone();
        async move { gate.entered.load(Ordering::SeqCst) }
    })
    .await;
    let (stale, _) = saga(&first, &id).await;
    assert_eq!((stale.generation, stale.current_step), (1, 3));

    let second = toy.engine(config(), None).await;
    eventually(SETTLE, "the second engine claims the saga once the lease expires", || {
        let second = second.clone();
        async move { second.recover_once().await.unwrap() == 1 }
    })
    .await;
    settle(&second, &id).await;
    let (settled, events) = assert_settled(&second, &id, SagaState::Completed).await;
    assert_eq!(settled.generation, 2);

    // A log write under the old generation is refused and changes nothing.
    let mut late = stale.clone();
    late.current_step = 4;
    late.state = SagaState::Completed;
    let mut tx = toy.log.pool.begin().await.unwrap();
    let fenced = log::record(
        &mut tx,
        &mut late,
        &[NewEvent { step: Some("finish"), kind: EventKind::Succeeded, detail: None }],
        now_ms(),
    )
    .await;
    assert!(matches!(fenced, Err(LogError::LeaseLost)), "a stale generation is fenced: {fenced:?}");
    drop(tx);

    // The first owner wakes up: its late action runs (harmlessly), its log write is refused.
    gate.open.send_replace(true);
    eventually(SETTLE, "the first owner's late finish commits", || {
        let runs = toy.runs(&id);
        async move { runs.await.get(&("finish".to_string(), "action".to_string())) == Some(&2) }
    })
    .await;
    first.shutdown(Duration::from_secs(10)).await;
    let (after, after_events) = assert_settled(&second, &id, SagaState::Completed).await;
    assert_eq!((after.generation, after.next_seq, after.updated_at), (2, settled.next_seq, settled.updated_at));
    assert_eq!(after_events.len(), events.len(), "the fenced owner appended nothing");
    assert_eq!(toy.effects(&id).await, completed_effects());
    assert_eq!(toy.runs(&id).await, action_runs(&[("finish", 2)]));
    second.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_engine_keeps_its_leases() {
    let toy = Toy::new().await;
    let first = toy.engine(config(), Some(Outage::new("finish"))).await;
    first.start_background();
    let id = start(&first).await;
    eventually(SETTLE, "the saga retries finish", || {
        let (first, id) = (first.clone(), id.clone());
        async move { saga(&first, &id).await.0.attempts >= 1 }
    })
    .await;
    first.kill();
    let (held, _) = saga(&first, &id).await;
    assert_eq!(held.owner.as_deref(), Some(first.instance_id()));
    assert!(held.lease_expires_at > now_ms(), "the 10 s lease still holds");
    let second = toy.engine(config(), None).await;
    assert_eq!(second.recover_once().await.unwrap(), 0, "nothing to claim while the lease holds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_releases_leases_for_an_immediate_resume() {
    let toy = Toy::new().await;
    // A 10 s lease: only the release lets the next engine resume at once.
    let first = toy.engine(config(), Some(Outage::new("finish"))).await;
    first.start_background();
    let id = start(&first).await;
    eventually(SETTLE, "the saga retries finish", || {
        let (first, id) = (first.clone(), id.clone());
        async move { saga(&first, &id).await.0.attempts >= 1 }
    })
    .await;
    first.shutdown(Duration::from_secs(5)).await;
    let (released, _) = saga(&first, &id).await;
    assert_eq!(released.state, SagaState::Running);
    assert_eq!((released.owner, released.lease_expires_at), (None, 0), "the lease is released");

    let second = toy.engine(config(), None).await;
    assert_eq!(second.recover_once().await.unwrap(), 1, "resumed at once, not after the lease");
    settle(&second, &id).await;
    let (saga, _) = assert_settled(&second, &id, SagaState::Completed).await;
    assert_eq!(saga.generation, 2);
    assert_eq!(toy.effects(&id).await, completed_effects());
    assert_eq!(toy.runs(&id).await, action_runs(&[]));
    second.shutdown(Duration::from_secs(5)).await;
}
