//! The coordinator: the [`Engine`] handle. It registers the definitions, writes each new saga
//! ahead of its first step (one path for every kind, group-committed on SQLite), launches it in
//! its own task, waits for sagas to settle and answers questions about the log.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, Connection};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::definition::{LOG_PARTICIPANT, SagaDefinition, SagaKind, Step};
use super::driver::{Driver, Halt};
use super::fault::{Fault, FaultInjector, Phase};
use super::log::{self, SagaRecord, SagaState};
use super::trace;
use crate::db::{Backend, Db, is_unique_violation, now_ms};
use crate::group_commit::GroupCommit;
use crate::insert::{self, Insert};
use crate::metrics::{KindLabels, Metrics};
use crate::sql::Sql;
use crate::telemetry;

/// Timing and limits of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// This instance's identity in the `owner` column.
    pub instance_id: String,
    /// How long a claim or heartbeat holds a saga (`LEASE_MS`).
    pub lease: Duration,
    /// How often to look for sagas to resume (`RECOVERY_INTERVAL_MS`).
    pub recovery_interval: Duration,
    /// Before the pivot, a saga still failing this long after it started compensates.
    pub deadline: Duration,
    /// Failed attempts of one step after which the saga is flagged stuck.
    pub stuck_after_attempts: u32,
    /// First retry delay; doubled per attempt up to `backoff_cap`.
    pub backoff_base: Duration,
    /// The longest retry delay.
    pub backoff_cap: Duration,
    /// Most sagas the recovery loop drives at once.
    pub max_recovering: usize,
    /// Where the engine reports what it does; `None` records nothing.
    pub metrics: Option<Arc<Metrics>>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            instance_id: uuid::Uuid::new_v4().to_string(),
            lease: Duration::from_secs(10),
            recovery_interval: Duration::from_secs(1),
            deadline: Duration::from_secs(30),
            stuck_after_attempts: 10,
            backoff_base: Duration::from_millis(10),
            backoff_cap: Duration::from_secs(2),
            max_recovering: 256,
            metrics: None,
        }
    }
}

/// Errors the engine reports to its callers.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// No definition of this kind is registered.
    #[error("unknown saga kind {0:?}")]
    UnknownKind(String),
    /// A saga's input could not be stored as JSON.
    #[error("the input of a {kind} saga cannot be stored")]
    Input {
        /// The saga's kind.
        kind: &'static str,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// Why a write-ahead did not commit; nothing of it was written.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The guard statement changed no row: the caller's precondition does not hold.
    #[error("the write-ahead's guard matched no row")]
    Refused,
    /// One of the rows exists already (a unique violation, such as an idempotency key).
    #[error("a row of the write-ahead exists already")]
    Exists(#[source] sqlx::Error),
    /// The log database failed.
    #[error("the write-ahead did not commit")]
    Db(#[source] sqlx::Error),
}

impl From<sqlx::Error> for StartError {
    fn from(error: sqlx::Error) -> Self {
        if is_unique_violation(&error) { StartError::Exists(error) } else { StartError::Db(error) }
    }
}

/// A saga ready to be written ahead: see [`Engine::write_ahead`] and [`Engine::start`].
#[derive(Debug)]
pub struct WriteAhead {
    /// The saga as it stands once the rows commit.
    pub record: SagaRecord,
    rows: [Insert; 2],
}

/// Runs saga definitions against the log database and the participants' databases.
#[derive(Clone)]
pub struct Engine {
    pub(super) inner: Arc<Inner>,
}

/// What the engine's tasks share.
pub(super) struct Inner {
    /// The log database (the orders database).
    pub(super) log: Db,
    /// Each participant's database, the log's included.
    pub(super) participants: HashMap<&'static str, Db>,
    /// Every registered (kind, version).
    pub(super) definitions: HashMap<(&'static str, i64), Arc<SagaDefinition>>,
    /// The newest version of each kind, which new sagas run.
    latest: HashMap<&'static str, Arc<SagaDefinition>>,
    pub(super) config: EngineConfig,
    faults: Option<Arc<dyn FaultInjector>>,
    /// Sagas this instance drives, each with a channel that flips to `Some` when it settles.
    /// Only these get their leases renewed: a saga written ahead whose launch never happened
    /// (its commit's answer was lost) must see its lease run out so that recovery takes it.
    pub(super) watchers: Mutex<HashMap<String, Watch>>,
    /// How many sagas the recovery loop claimed are still being driven.
    pub(super) recovering: AtomicUsize,
    /// On SQLite, the group commit that write-aheads and the driver's log transactions share.
    pub(super) group: Option<GroupCommit>,
    /// Wakes the recovery loop when a recovered saga ends, so a backlog drains without waiting
    /// an interval per batch.
    pub(super) recovery_wake: Arc<tokio::sync::Notify>,
    pub(super) tasks: TaskTracker,
    pub(super) shutdown: CancellationToken,
    pub(super) background: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// A saga this instance drives: under which generation, and the channel its waiters watch.
pub(super) struct Watch {
    generation: i64,
    progress: watch::Sender<Progress>,
}

/// Where a saga this instance drives stands, as its waiters see it. A driver that lets go of
/// the saga without settling it drops the channel instead.
#[derive(Debug, Clone)]
enum Progress {
    /// Not settled, not stuck.
    Running,
    /// An attempt failed past `STUCK_AFTER_ATTEMPTS`: the saga waits on an outage or an
    /// operator now, not on this instance's capacity.
    Stuck,
    /// Settled, as it settled.
    Settled(Arc<SagaRecord>),
}

impl Inner {
    /// True when `step` runs in the log database, so that its effect and its record share one
    /// transaction (docs/design.md, rule 4).
    pub(super) fn in_log(&self, step: &Step) -> bool {
        self.participants[step.participant].url == self.log.url
    }

    /// Says to the waiters of saga `id`, if this instance drives it, that it is stuck.
    pub(super) fn flag_stuck(&self, id: &str) {
        if let Some(watch) = self.watchers.lock().unwrap().get(id) {
            watch.progress.send_if_modified(|progress| {
                let running = matches!(progress, Progress::Running);
                if running {
                    *progress = Progress::Stuck;
                }
                running
            });
        }
    }

    /// The metrics, if the engine reports any.
    pub(super) fn metrics(&self) -> Option<&Metrics> {
        self.config.metrics.as_deref()
    }

    /// Records how long an attempt of `phase` of `step` took.
    pub(super) fn step_took(&self, def: &SagaDefinition, step: &Step, phase: Phase, took: Duration) {
        if let Some(metrics) = self.metrics() {
            metrics.step_took(def.kind, step.name, phase.as_str(), took);
        }
    }

    /// The injected fault, if any, for attempt `attempt` of `phase` of `step` of saga `saga_id`.
    pub(super) fn fault(
        &self,
        saga_id: &str,
        def: &SagaDefinition,
        step: &Step,
        phase: Phase,
        attempt: i64,
    ) -> Option<Fault> {
        let attempt = u32::try_from(attempt + 1).unwrap_or(u32::MAX);
        self.faults.as_ref().and_then(|f| f.fault_for(saga_id, def.kind, step.name, phase, attempt))
    }
}

impl Drop for Inner {
    /// Dropping the engine stops its loops without releasing leases, as a crash would.
    fn drop(&mut self) {
        self.shutdown.cancel();
        for handle in self.background.lock().unwrap().drain(..) {
            handle.abort();
        }
    }
}

impl Engine {
    /// Builds an engine. `participants` maps each participant name used by a step to its
    /// database; the log participant is added. The newest version of each kind starts new sagas.
    pub fn new(
        log: Db,
        participants: HashMap<&'static str, Db>,
        definitions: Vec<SagaDefinition>,
        config: EngineConfig,
        faults: Option<Arc<dyn FaultInjector>>,
    ) -> Engine {
        let mut participants = participants;
        participants.insert(LOG_PARTICIPANT, log.clone());
        let mut by_version = HashMap::new();
        let mut latest: HashMap<&'static str, Arc<SagaDefinition>> = HashMap::new();
        for def in definitions {
            for step in &def.steps {
                assert!(
                    participants.contains_key(step.participant),
                    "no database for participant {}",
                    step.participant
                );
            }
            let def = Arc::new(def);
            if latest.get(def.kind).is_none_or(|l| l.version < def.version) {
                latest.insert(def.kind, def.clone());
            }
            by_version.insert((def.kind, def.version), def);
        }
        Engine {
            inner: Arc::new(Inner {
                log: log.clone(),
                participants,
                definitions: by_version,
                latest,
                config,
                faults,
                watchers: Mutex::new(HashMap::new()),
                recovering: AtomicUsize::new(0),
                group: (log.backend == Backend::Sqlite).then(|| GroupCommit::start(log.pool.clone())),
                recovery_wake: Arc::new(tokio::sync::Notify::new()),
                tasks: TaskTracker::new(),
                shutdown: CancellationToken::new(),
                background: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The log database.
    pub fn log_db(&self) -> &Db {
        &self.inner.log
    }

    /// This instance's id, as written in the `owner` column.
    pub fn instance_id(&self) -> &str {
        &self.inner.config.instance_id
    }

    /// A new saga of `kind` with `input`, owned by this instance, and the rows that write it
    /// ahead of its first step (docs/design.md, rule 1). [`Engine::start`] commits and launches it.
    pub fn write_ahead<I: Serialize>(
        &self,
        kind: SagaKind<I>,
        id: String,
        input: &I,
    ) -> Result<WriteAhead, EngineError> {
        let def = self.inner.latest.get(kind.name).ok_or_else(|| EngineError::UnknownKind(kind.name.to_string()))?;
        let input = serde_json::to_value(input).map_err(|source| EngineError::Input { kind: def.kind, source })?;
        let now = now_ms();
        let record = SagaRecord {
            id,
            kind: def.kind.to_string(),
            version: def.version,
            state: SagaState::Running,
            stuck: false,
            input: Arc::new(input),
            outputs: Default::default(),
            failure: None,
            current_step: 0,
            attempts: 0,
            last_error: None,
            next_seq: 1,
            owner: Some(self.inner.config.instance_id.clone()),
            lease_expires_at: now + self.inner.config.lease.as_millis() as i64,
            generation: 1,
            deadline_at: now + self.inner.config.deadline.as_millis() as i64,
            created_at: now,
            updated_at: now,
        };
        let rows = log::insert(&record);
        Ok(WriteAhead { record, rows })
    }

    /// Commits a saga's write-ahead in one transaction with the caller's `rows` before it, then
    /// launches the saga. `guard`, a statement run first in the same transaction, must change a
    /// row, or nothing is written ([`StartError::Refused`]). On SQLite the transaction is a
    /// savepoint in the next group commit; on PostgreSQL, without a guard, it is one statement
    /// whose connection goes on to serve the saga's first log transaction.
    pub async fn start(
        &self,
        ahead: WriteAhead,
        rows: Vec<Insert>,
        guard: Option<Sql<'static>>,
    ) -> Result<(), StartError> {
        let mut all = rows;
        all.extend(ahead.rows);
        let conn = match &self.inner.group {
            Some(group) => {
                group
                    .run(move |conn| Box::pin(async move { write_ahead(conn, guard.as_ref(), &all).await }))
                    .await
                    .map_err(StartError::Db)??;
                None
            }
            None => {
                let mut conn = self.inner.log.pool.acquire().await.map_err(StartError::Db)?;
                match &guard {
                    // A single statement is its own transaction: no BEGIN and COMMIT round trips.
                    None => write_ahead(&mut conn, None, &all).await?,
                    Some(guard) => {
                        let mut tx = conn.begin().await.map_err(StartError::Db)?;
                        write_ahead(&mut tx, Some(guard), &all).await?;
                        tx.commit().await.map_err(StartError::Db)?;
                    }
                }
                Some(conn)
            }
        };
        // The connection is worth keeping only if the saga's first step runs in the log database;
        // held across a step elsewhere, it would sit idle while others wait for one.
        let def = self.definition(&ahead.record.kind, ahead.record.version);
        if let (Some(metrics), Some(def)) = (self.inner.metrics(), def) {
            metrics.sagas_started.get_or_create(&KindLabels { kind: def.kind }).inc();
        }
        let first_in_log = def.and_then(|def| def.steps.first());
        let conn = conn.filter(|_| first_in_log.is_some_and(|step| self.inner.in_log(step)));
        self.launch(ahead.record, conn);
        Ok(())
    }

    /// Drives a saga this instance wrote ahead, in its own task: a caller that goes away never
    /// interrupts it (docs/design.md, rule 7).
    fn launch(&self, record: SagaRecord, conn: Option<PoolConnection<Any>>) {
        self.spawn_driver(record.id.clone(), record.generation, Some(record), conn, false);
    }

    /// Waits up to `timeout` for a saga to settle. Returns it as it settled (here or on another
    /// instance), or `None` if it is still running.
    pub async fn wait_settled(&self, id: &str, timeout: Duration) -> Result<Option<Arc<SagaRecord>>, sqlx::Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        let local = self.inner.watchers.lock().unwrap().get(id).map(|w| w.progress.subscribe());
        if let Some(mut rx) = local {
            let settled = rx.wait_for(|p| matches!(p, Progress::Settled(_)));
            if let Ok(Ok(progress)) = tokio::time::timeout_at(deadline, settled).await
                && let Progress::Settled(saga) = &*progress
            {
                return Ok(Some(saga.clone()));
            }
        }
        // Driven elsewhere (another instance, or a recovery yet to come): poll the log.
        loop {
            if let Some(saga) = log::get(&self.inner.log, id).await?
                && saga.state.is_final()
            {
                return Ok(Some(Arc::new(saga)));
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            tokio::time::sleep_until((now + Duration::from_millis(25)).min(deadline)).await;
        }
    }

    /// Keeps `token` until saga `id`, which this instance drives, settles, is flagged stuck or
    /// stops being driven here (shutdown, a lost lease); drops it at once if this instance does
    /// not drive it. The HTTP layer hands it the slot of a request answered before its saga
    /// settled, so that the saga's work stays counted against `MAX_IN_FLIGHT`
    /// (src/http/shed.rs). A stuck saga lets go: it is retried at the backoff cap until an
    /// outage ends or an operator acts, and holding slots that long would shed every request.
    pub fn hold_until_settled<T: Send + 'static>(&self, id: &str, token: T) {
        let watching = self.inner.watchers.lock().unwrap().get(id).map(|w| w.progress.subscribe());
        let Some(mut progress) = watching else { return };
        tokio::spawn(async move {
            // An error means the driver let go of the saga without settling it: no longer ours.
            let _ = progress.wait_for(|p| !matches!(p, Progress::Running)).await;
            drop(token);
        });
    }

    /// Reads one saga with its history.
    pub async fn saga(&self, id: &str) -> Result<Option<(SagaRecord, Vec<log::Event>)>, sqlx::Error> {
        let Some(saga) = log::get(&self.inner.log, id).await? else { return Ok(None) };
        let events = log::events(&self.inner.log, id).await?;
        Ok(Some((saga, events)))
    }

    /// Lists sagas, newest first.
    pub async fn list(&self, filter: &log::SagaFilter) -> Result<Vec<SagaRecord>, sqlx::Error> {
        log::list(&self.inner.log, filter).await
    }

    /// The definition a saga runs under, if this build knows it.
    pub fn definition(&self, kind: &str, version: i64) -> Option<&SagaDefinition> {
        self.inner.definitions.iter().find(|((k, v), _)| *k == kind && *v == version).map(|(_, d)| d.as_ref())
    }

    /// Drives saga `id` under `generation` in its own task. `record` is the saga as it stands
    /// if the caller has it (else the driver loads it), `conn` a log connection for its first
    /// transaction, `recovered` whether the recovery loop claimed it.
    pub(super) fn spawn_driver(
        &self,
        id: String,
        generation: i64,
        record: Option<SagaRecord>,
        conn: Option<PoolConnection<Any>>,
        recovered: bool,
    ) {
        let inner = self.inner.clone();
        {
            let mut watchers = inner.watchers.lock().unwrap();
            let watch = watchers
                .entry(id.clone())
                .or_insert_with(|| Watch { generation, progress: watch::channel(Progress::Running).0 });
            watch.generation = generation;
        }
        if recovered {
            inner.recovering.fetch_add(1, Ordering::Relaxed);
        }
        let span = trace::saga_span(&id, generation, recovered);
        self.inner.tasks.spawn(telemetry::within(span, async move {
            let task_inner = inner.clone();
            let task_id = id.clone();
            let joined = telemetry::spawn(async move {
                let driver = Driver::new(&task_inner, generation, conn);
                driver.run(&task_id, record).await
            })
            .await;
            let outcome = joined.unwrap_or_else(|error| Err(Halt::Panicked(error.to_string())));
            if matches!(outcome, Err(Halt::Panicked(_))) {
                // Give the saga back at once rather than holding it under a live heartbeat.
                let _ = log::release_one(&inner.log, &id, generation, 0).await;
            }
            if recovered {
                inner.recovering.fetch_sub(1, Ordering::Relaxed);
                // Room for the next saga of a backlog.
                inner.recovery_wake.notify_one();
            }
            let settled = match &outcome {
                Ok(saga) if saga.state.is_final() => Some(Arc::new(saga.clone())),
                _ => None,
            };
            {
                let mut watchers = inner.watchers.lock().unwrap();
                // A newer claim of the same saga by this instance owns the entry now; and a
                // simulated crash keeps it, so the lease lives on until the engine is killed,
                // as a dead process's would until it expires.
                let mine = watchers.get(&id).is_some_and(|w| w.generation == generation);
                if mine && !matches!(outcome, Err(Halt::Crash)) {
                    // Dropped with the entry: a waiter not told it settled hears that it was let go.
                    if let (Some(watch), Some(saga)) = (watchers.remove(&id), settled) {
                        watch.progress.send_replace(Progress::Settled(saga));
                    }
                }
            }
            match outcome {
                Ok(_) => {}
                Err(halt @ (Halt::Shutdown | Halt::Crash)) => {
                    tracing::info!(saga_id = %id, %halt, "saga left for the next owner")
                }
                Err(halt @ Halt::Panicked(_)) => tracing::error!(saga_id = %id, %halt, "stopped driving saga"),
                Err(halt) => {
                    tracing::warn!(saga_id = %id, error = &halt as &dyn std::error::Error, "stopped driving saga")
                }
            }
        }));
    }
}

/// Runs a write-ahead on `conn`: the guard first (it must change a row), then every row.
async fn write_ahead(
    conn: &mut AnyConnection,
    guard: Option<&Sql<'static>>,
    rows: &[Insert],
) -> Result<(), StartError> {
    if let Some(guard) = guard {
        if guard.query().execute(&mut *conn).await.map_err(StartError::Db)?.rows_affected() == 0 {
            return Err(StartError::Refused);
        }
    }
    Ok(insert::execute_together(conn, rows).await?)
}
