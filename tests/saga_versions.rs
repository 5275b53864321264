//! Versioned saga definitions (issue 3): a saga records the version of the definition that
//! started it, an instance resumes only the versions it knows and logs why it leaves the others,
//! and new sagas start under the newest version an instance registers.
//!
//! The toy saga `versioned` has two versions over two participants, the log database and a second
//! database ("remote"):
//!
//! | version | steps (the pivot in capitals)                      |
//! |---------|----------------------------------------------------|
//! | 1       | reserve, record, PIVOT, finish                     |
//! | 2       | reserve, record, notify, PIVOT, finish, audit      |
//!
//! Every action writes a `done` row into `ver_effects` tagged with the version of the definition
//! whose function ran it, and every compensation an `undone` tombstone; `ver_runs` counts every
//! committed run. So a test tells from the effects alone which version's steps drove a saga: a v1
//! saga resumed under v2's steps at its step 2 would run `notify` (and later `audit`), or run a
//! shared step through a v2 function.
mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, fresh_databases};
use order_saga::db::{Db, PoolSettings, now_ms};
use order_saga::saga::definition::Steps;
use order_saga::saga::{
    Ctx, Engine, EngineConfig, Event, Fault, FaultInjector, FaultPlan, LOG_PARTICIPANT, Phase, SagaDefinition,
    SagaKind, SagaRecord, SagaState, StepError, StepKey,
};
use serde_json::{Value, json};
use sqlx::{AnyConnection, Executor, Row};

const KIND: SagaKind<Value> = SagaKind::new("versioned");
const REMOTE: &str = "remote";
const SETTLE: Duration = Duration::from_secs(30);

/// Every step name of either version; a step function is `act::<VERSION, INDEX_IN_NAMES>`.
const NAMES: [&str; 6] = ["reserve", "record", "notify", "pivot", "finish", "audit"];
const RESERVE: usize = 0;
const RECORD: usize = 1;
const NOTIFY: usize = 2;
const PIVOT: usize = 3;
const FINISH: usize = 4;
const AUDIT: usize = 5;

/// The steps of version 1 and of version 2, in order.
const V1_STEPS: [&str; 4] = ["reserve", "record", "pivot", "finish"];
const V2_STEPS: [&str; 6] = ["reserve", "record", "notify", "pivot", "finish", "audit"];

// ---------------------------------------------------------------------------------------------
// The toy saga, in two versions
// ---------------------------------------------------------------------------------------------

/// Adds step `NAMES[S]` of version `V` to `steps`.
fn step<const V: i64, const S: usize>(
    steps: Steps<Value>,
    participant: &'static str,
    compensable: bool,
    pivot: bool,
) -> Steps<Value> {
    let mut steps = steps.step(StepKey::<Value>::new(NAMES[S]), participant, act::<V, S>);
    if compensable {
        steps = steps.compensated_by(undo::<V, S>);
    }
    if pivot {
        steps = steps.pivot();
    }
    steps
}

fn v1() -> SagaDefinition {
    let steps = SagaDefinition::of(KIND, 1);
    let steps = step::<1, RESERVE>(steps, REMOTE, true, false);
    let steps = step::<1, RECORD>(steps, LOG_PARTICIPANT, true, false);
    let steps = step::<1, PIVOT>(steps, LOG_PARTICIPANT, false, true);
    step::<1, FINISH>(steps, REMOTE, false, false).build()
}

/// Version 2 adds `notify` before the pivot and `audit` at the end, so its step 2 is `notify`
/// where version 1's is the pivot.
fn v2() -> SagaDefinition {
    let steps = SagaDefinition::of(KIND, 2);
    let steps = step::<2, RESERVE>(steps, REMOTE, true, false);
    let steps = step::<2, RECORD>(steps, LOG_PARTICIPANT, true, false);
    let steps = step::<2, NOTIFY>(steps, REMOTE, true, false);
    let steps = step::<2, PIVOT>(steps, LOG_PARTICIPANT, false, true);
    let steps = step::<2, FINISH>(steps, REMOTE, false, false);
    step::<2, AUDIT>(steps, LOG_PARTICIPANT, false, false).build()
}

async fn act<const V: i64, const S: usize>(conn: &mut AnyConnection, cx: Ctx<'_, Value>) -> Result<Value, StepError> {
    apply(conn, cx.saga_id, V, NAMES[S], "done").await
}

async fn undo<const V: i64, const S: usize>(conn: &mut AnyConnection, cx: Ctx<'_, Value>) -> Result<(), StepError> {
    apply(conn, cx.saga_id, V, NAMES[S], "undone").await.map(drop)
}

/// Counts the run, then writes the effect once: a `done` row unless a tombstone is there, or the
/// `undone` tombstone. Each row carries the version whose function wrote it.
async fn apply(
    conn: &mut AnyConnection,
    saga_id: &str,
    version: i64,
    step: &str,
    kind: &str,
) -> Result<Value, StepError> {
    let phase = if kind == "done" { "action" } else { "compensation" };
    sqlx::query(
        "INSERT INTO ver_runs (saga_id, step, phase, version, n) VALUES ($1, $2, $3, $4, 1) \
         ON CONFLICT (saga_id, step, phase, version) DO UPDATE SET n = ver_runs.n + 1",
    )
    .bind(saga_id)
    .bind(step)
    .bind(phase)
    .bind(version)
    .execute(&mut *conn)
    .await?;
    let tombstones: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM ver_effects WHERE saga_id = $1 AND step = $2 AND kind = 'undone'")
            .bind(saga_id)
            .bind(step)
            .fetch_one(&mut *conn)
            .await?;
    if kind == "undone" || tombstones == 0 {
        sqlx::query(
            "INSERT INTO ver_effects (saga_id, step, kind, version) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (saga_id, step, kind) DO NOTHING",
        )
        .bind(saga_id)
        .bind(step)
        .bind(kind)
        .bind(version)
        .execute(&mut *conn)
        .await?;
    }
    Ok(if kind == "done" { json!({ "step": step, "version": version }) } else { Value::Null })
}

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// The toy's two databases, with the test's own pools for reading effects.
struct Toy {
    log_url: String,
    remote_url: String,
    log: Db,
    remote: Db,
}

type Effects = BTreeSet<(String, String, i64)>;

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
                    "CREATE TABLE ver_effects (saga_id TEXT NOT NULL, step TEXT NOT NULL, kind TEXT NOT NULL, \
                     version BIGINT NOT NULL, PRIMARY KEY (saga_id, step, kind))",
                )
                .await
                .unwrap();
            db.pool
                .execute(
                    "CREATE TABLE ver_runs (saga_id TEXT NOT NULL, step TEXT NOT NULL, phase TEXT NOT NULL, \
                     version BIGINT NOT NULL, n BIGINT NOT NULL, PRIMARY KEY (saga_id, step, phase, version))",
                )
                .await
                .unwrap();
        }
        Toy { log_url, remote_url, log, remote }
    }

    /// A new engine instance (its own pools and instance id) registering `definitions`.
    async fn engine(&self, definitions: Vec<SagaDefinition>, faults: Option<Arc<FaultPlan>>) -> Engine {
        let log = connect(&self.log_url).await;
        let remote = connect(&self.remote_url).await;
        let faults = faults.map(|f| f as Arc<dyn FaultInjector>);
        Engine::new(log, HashMap::from([(REMOTE, remote)]), definitions, short_lease(), faults)
    }

    /// Every effect of saga `id` in both databases: (step, kind, version of the function).
    async fn effects(&self, id: &str) -> Effects {
        let mut effects = BTreeSet::new();
        for db in [&self.log, &self.remote] {
            let rows = sqlx::query("SELECT step, kind, version FROM ver_effects WHERE saga_id = $1")
                .bind(id)
                .fetch_all(&db.pool)
                .await
                .unwrap();
            for row in rows {
                let inserted = effects.insert((row.get("step"), row.get("kind"), row.get("version")));
                assert!(inserted, "one effect in two databases for saga {id}");
            }
        }
        effects
    }

    /// How many committed runs each (step, phase, version) of saga `id` had.
    async fn runs(&self, id: &str) -> BTreeMap<(String, String, i64), i64> {
        let mut runs = BTreeMap::new();
        for db in [&self.log, &self.remote] {
            let rows = sqlx::query("SELECT step, phase, version, n FROM ver_runs WHERE saga_id = $1")
                .bind(id)
                .fetch_all(&db.pool)
                .await
                .unwrap();
            for row in rows {
                runs.insert((row.get("step"), row.get("phase"), row.get("version")), row.get::<i64, _>("n"));
            }
        }
        runs
    }
}

/// A short lease, so that takeovers are quick, and a fast recovery loop.
fn short_lease() -> EngineConfig {
    EngineConfig {
        lease: Duration::from_millis(300),
        recovery_interval: Duration::from_millis(50),
        deadline: Duration::from_secs(60),
        stuck_after_attempts: 10,
        backoff_base: Duration::from_millis(2),
        backoff_cap: Duration::from_millis(20),
        ..EngineConfig::default()
    }
}

/// Writes a saga ahead (committed before anything runs) and launches it. Returns its record.
async fn start(engine: &Engine) -> SagaRecord {
    let id = uuid::Uuid::now_v7().to_string();
    let ahead = engine.write_ahead(KIND, id, &json!({ "n": 1 })).unwrap();
    let record = ahead.record.clone();
    engine.start(ahead, Vec::new(), None).await.unwrap();
    record
}

/// An engine used only to read the log (it registers nothing and never runs).
async fn toy_engine_reader(toy: &Toy) -> Engine {
    toy.engine(Vec::new(), None).await
}

async fn saga(engine: &Engine, id: &str) -> (SagaRecord, Vec<Event>) {
    engine.saga(id).await.unwrap().expect("the saga is in the log")
}

async fn settle(engine: &Engine, id: &str) {
    assert!(engine.wait_settled(id, SETTLE).await.unwrap().is_some(), "saga {id} settles within {SETTLE:?}");
}

/// Starts a saga under an engine that registers only `definitions` and crashes it right before
/// the action of `crash_before`, then kills and drops that engine as a dying process would:
/// the saga stays unfinished, owned by a dead instance whose lease runs out.
async fn crash_mid_way(toy: &Toy, definitions: Vec<SagaDefinition>, crash_before: &str) -> SagaRecord {
    let plan = Arc::new(FaultPlan::new());
    plan.add(KIND.name, crash_before, Phase::Action, Fault::CrashBefore, 1);
    // No recovery loop or heartbeat: nothing but the next instance may touch the saga.
    let first = toy.engine(definitions, Some(plan.clone())).await;
    let record = start(&first).await;
    eventually(SETTLE, "the crash fault fires", || {
        let plan = plan.clone();
        async move { plan.exhausted() }
    })
    .await;
    first.kill();
    drop(first);
    record
}

/// Every effect `steps` leave when each action ran once under `version`.
fn done(steps: &[&str], version: i64) -> Effects {
    steps.iter().map(|s| (s.to_string(), "done".to_string(), version)).collect()
}

fn runs(steps: &[&str], version: i64) -> BTreeMap<(String, String, i64), i64> {
    steps.iter().map(|s| ((s.to_string(), "action".to_string(), version), 1)).collect()
}

/// `runs` with `reserve` run twice: in doubt after the crash, it ran again (harmlessly).
fn rerun_reserve(mut runs: BTreeMap<(String, String, i64), i64>) -> BTreeMap<(String, String, i64), i64> {
    for ((step, _, _), n) in runs.iter_mut() {
        if step == "reserve" {
            *n = 2;
        }
    }
    runs
}

fn succeeded(events: &[Event]) -> Vec<String> {
    events.iter().filter(|e| e.kind.as_str() == "succeeded").map(|e| e.step.clone().unwrap_or_default()).collect()
}

/// One event as a comparable tuple: (seq, step, event, detail, at).
type Entry = (i64, Option<String>, String, Option<String>, i64);

/// The history as comparable tuples.
fn history(events: &[Event]) -> Vec<Entry> {
    events.iter().map(|e| (e.seq, e.step.clone(), e.kind.to_string(), e.detail.clone(), e.at)).collect()
}

/// Asserts that saga `id` completed under `version`: every step of that version succeeded once,
/// in order, with a gap-free history, no owner and each step's output from that version.
async fn assert_completed(engine: &Engine, id: &str, version: i64, steps: &[&str]) -> (SagaRecord, Vec<Event>) {
    let (saga, events) = saga(engine, id).await;
    assert_eq!(saga.state, SagaState::Completed, "saga {id}: {saga:?}\n{events:#?}");
    assert_eq!(saga.version, version, "the saga keeps the version it started under: {saga:?}");
    assert_eq!(saga.current_step, steps.len() as i64, "{saga:?}");
    assert!(!saga.stuck, "{saga:?}");
    assert_eq!((saga.owner.as_deref(), saga.lease_expires_at), (None, 0), "a settled saga holds no lease");
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (0..saga.next_seq).collect::<Vec<_>>(), "a gap-free history: {events:#?}");
    assert_eq!(events[0].kind.as_str(), "created");
    assert_eq!(succeeded(&events), steps, "each step of v{version} succeeded once, in order: {events:#?}");
    let step_events: BTreeSet<&str> = events.iter().filter_map(|e| e.step.as_deref()).collect();
    assert_eq!(step_events, steps.iter().copied().collect(), "no other version's step in the history: {events:#?}");
    let last = events.last().unwrap();
    assert_eq!((last.step.as_deref(), last.kind.as_str()), (None, "completed"), "{events:#?}");
    let outputs: BTreeMap<&str, &Value> = saga.outputs.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let expected: BTreeMap<&str, Value> =
        steps.iter().map(|s| (*s, json!({ "step": s, "version": version }))).collect();
    assert_eq!(outputs, expected.iter().map(|(k, v)| (*k, v)).collect(), "outputs of v{version}'s steps");
    (saga, events)
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// Crashed under v1 before its pivot, a saga resumed by an instance that knows v1 and v2
/// finishes under v1's steps, while that instance starts new sagas under v2. In v1, `record`
/// and the pivot share one transaction with the record of `reserve` (which ran in the remote
/// database), so the crash before the pivot rolls all three back: the saga stays at step 0 with
/// `reserve` in doubt (its effect committed, unrecorded), and v2 would go on to `notify`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_saga_finishes_under_its_own_version_while_new_sagas_use_the_newest() {
    let toy = Toy::new().await;
    let old = crash_mid_way(&toy, vec![v1()], "pivot").await;
    assert_eq!(old.version, 1, "an engine that knows only v1 starts v1 sagas");
    let (crashed, _) = saga(&toy_engine_reader(&toy).await, &old.id).await;
    assert_eq!((crashed.state, crashed.current_step, crashed.version), (SagaState::Running, 0, 1));
    assert_eq!(toy.effects(&old.id).await, done(&["reserve"], 1), "crashed before the pivot");

    let both = toy.engine(vec![v1(), v2()], None).await;
    assert_eq!(both.definition(KIND.name, 1).map(|d| d.steps.len()), Some(V1_STEPS.len()));
    assert_eq!(both.definition(KIND.name, 2).map(|d| d.steps.len()), Some(V2_STEPS.len()));
    both.start_background();
    settle(&both, &old.id).await;
    let (resumed, _) = assert_completed(&both, &old.id, 1, &V1_STEPS).await;
    assert!(resumed.generation >= 2, "the new instance claimed the saga: {resumed:?}");
    assert_eq!(toy.effects(&old.id).await, done(&V1_STEPS, 1), "v1's functions, and only its steps, ran");
    assert_eq!(toy.runs(&old.id).await, rerun_reserve(runs(&V1_STEPS, 1)), "each v1 action ran once, reserve again");

    let new = start(&both).await;
    assert_eq!(new.version, 2, "new sagas start under the newest registered version");
    settle(&both, &new.id).await;
    assert_completed(&both, &new.id, 2, &V2_STEPS).await;
    assert_eq!(toy.effects(&new.id).await, done(&V2_STEPS, 2));
    assert_eq!(toy.runs(&new.id).await, runs(&V2_STEPS, 2));
    both.shutdown(Duration::from_secs(5)).await;
}

/// An instance that registers only v2 never claims an unfinished v1 saga, even once its lease
/// has run out; an instance that knows v1 later finishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_does_not_know_a_version_leaves_its_sagas_to_one_that_does() {
    let toy = Toy::new().await;
    let old = crash_mid_way(&toy, vec![v1()], "pivot").await;
    let reader = toy_engine_reader(&toy).await;
    let (before, before_events) = saga(&reader, &old.id).await;
    assert_eq!((before.state, before.current_step, before.generation), (SagaState::Running, 0, 1));
    let before_effects = toy.effects(&old.id).await;
    assert_eq!(before_effects, done(&["reserve"], 1));
    wait_lease_expired(&reader, &old.id).await;

    let newer = toy.engine(vec![v2()], None).await;
    assert!(newer.definition(KIND.name, 1).is_none());
    for _ in 0..5 {
        assert_eq!(newer.recover_once().await.unwrap(), 0, "a v2-only instance claims no v1 saga");
    }
    let (left, left_events) = saga(&reader, &old.id).await;
    assert_unchanged(&before, &before_events, &left, &left_events);
    assert_eq!(left.generation, before.generation, "not even claimed: {left:?}");
    assert_eq!(toy.effects(&old.id).await, before_effects, "no step ran");
    assert_eq!(toy.runs(&old.id).await, runs(&["reserve"], 1), "no step ran, not even partly");

    // An instance that knows v1 finishes it, under v1's steps, while the v2-only one keeps
    // running its recovery loop beside it.
    newer.start_background();
    let later = toy.engine(vec![v1(), v2()], None).await;
    later.start_background();
    settle(&later, &old.id).await;
    let (finished, events) = assert_completed(&later, &old.id, 1, &V1_STEPS).await;
    assert!(finished.generation > before.generation, "{finished:?}");
    assert_eq!(history(&events[..before_events.len()]), history(&before_events), "the history only grew");
    assert_eq!(toy.effects(&old.id).await, done(&V1_STEPS, 1));
    assert_eq!(toy.runs(&old.id).await, rerun_reserve(runs(&V1_STEPS, 1)));
    newer.shutdown(Duration::from_secs(5)).await;
    later.shutdown(Duration::from_secs(5)).await;
}

/// A rollback: a v2 saga crashed at `notify` (a step v1 lacks; v1's step 2 is its pivot) is left
/// alone by an old v1-only instance, and finished under v2's steps by a v2 instance that runs
/// beside it on the same log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_instance_leaves_newer_sagas_to_a_new_instance_running_beside_it() {
    let toy = Toy::new().await;
    let new = crash_mid_way(&toy, vec![v1(), v2()], "notify").await;
    assert_eq!(new.version, 2);
    let reader = toy_engine_reader(&toy).await;
    let (before, before_events) = saga(&reader, &new.id).await;
    assert_eq!((before.state, before.current_step), (SagaState::Running, 2));
    wait_lease_expired(&reader, &new.id).await;

    let old = toy.engine(vec![v1()], None).await;
    for _ in 0..5 {
        assert_eq!(old.recover_once().await.unwrap(), 0, "a v1-only instance claims no v2 saga");
    }
    let (left, left_events) = saga(&reader, &new.id).await;
    assert_unchanged(&before, &before_events, &left, &left_events);
    assert_eq!(left.generation, before.generation, "not even claimed: {left:?}");
    assert_eq!(toy.effects(&new.id).await, done(&["reserve", "record"], 2), "v1's pivot did not run");

    old.start_background();
    let current = toy.engine(vec![v2()], None).await;
    current.start_background();
    assert!(current.wait_settled(&new.id, SETTLE).await.unwrap().is_some(), "the new instance finishes the saga");
    assert_completed(&current, &new.id, 2, &V2_STEPS).await;
    assert_eq!(toy.effects(&new.id).await, done(&V2_STEPS, 2));
    assert_eq!(toy.runs(&new.id).await, runs(&V2_STEPS, 2), "each v2 action ran once, no v1 action ran");
    old.shutdown(Duration::from_secs(5)).await;
    current.shutdown(Duration::from_secs(5)).await;
}

/// Waits until the crashed owner's lease on `id` has run out, so that any instance may claim it.
async fn wait_lease_expired(reader: &Engine, id: &str) {
    eventually(SETTLE, "the crashed owner's lease runs out", || {
        let (reader, id) = (reader.clone(), id.to_string());
        async move { saga(&reader, &id).await.0.lease_expires_at < now_ms() }
    })
    .await;
}

/// A saga left alone: the same state, step, outputs and history; only its ownership columns
/// (generation, owner, lease) may have moved.
fn assert_unchanged(before: &SagaRecord, before_events: &[Event], after: &SagaRecord, after_events: &[Event]) {
    let essence = |s: &SagaRecord| {
        (
            (s.kind.clone(), s.version, s.state, s.stuck),
            (s.input.clone(), s.outputs.clone(), s.failure.clone()),
            (s.current_step, s.attempts, s.last_error.clone(), s.next_seq),
            (s.deadline_at, s.created_at),
        )
    };
    assert_eq!(essence(after), essence(before), "the saga is left as it was: {after:?}");
    assert_eq!(history(after_events), history(before_events), "its history gains nothing");
}
