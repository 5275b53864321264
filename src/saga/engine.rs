//! The saga execution coordinator: starts sagas, drives each in its own task through its steps
//! (or back through the compensations), retries transient failures, and resumes unfinished sagas
//! from the log: the recovery loop, the lease heartbeat and graceful shutdown.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, Connection};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::definition::{LOG_PARTICIPANT, SagaDefinition, Step, StepContext, StepError};
use super::fault::{Fault, FaultInjector, Phase};
use super::log::{self, LogError, NewEvent, SagaRecord, SagaState};
use crate::db::{Backend, Db, now_ms};
use crate::group_commit::GroupCommit;
use crate::insert::{self, Insert};

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
        }
    }
}

/// Errors the engine reports to its callers.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// No definition of this kind is registered.
    #[error("unknown saga kind {0:?}")]
    UnknownKind(String),
}

/// Why the driving of a saga stopped before it settled.
#[derive(Debug)]
enum Halt {
    /// Another claim took the saga over.
    LeaseLost,
    /// The log showed progress this driver had not seen (a commit whose answer was lost); the
    /// saga in memory was replaced by the stored one and the driver carries on from there.
    Resync,
    /// A fault injection simulated this process dying.
    Crash,
    /// The instance is shutting down.
    Shutdown,
    /// The saga's task panicked (a bug); its lease is released for another try.
    Panicked,
}

/// The outcome of one attempt at a step.
enum Attempt {
    Done,
    Failed(StepError),
    Halt(Halt),
}

/// A saga ready to be written ahead: see [`Engine::write_ahead`].
#[derive(Debug)]
pub struct WriteAhead {
    /// The saga as it stands once the rows commit; pass it to [`Engine::launch`].
    pub record: SagaRecord,
    /// The saga row and its `created` event.
    pub rows: [Insert; 2],
}

/// Runs saga definitions against the log database and the participants' databases.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    log: Db,
    participants: HashMap<&'static str, Db>,
    definitions: HashMap<(&'static str, i64), Arc<SagaDefinition>>,
    latest: HashMap<&'static str, Arc<SagaDefinition>>,
    config: EngineConfig,
    faults: Option<Arc<dyn FaultInjector>>,
    /// Sagas this instance drives, each with a channel that flips to true when it settles.
    /// Only these get their leases renewed: a saga written ahead whose launch never happened
    /// (its commit's answer was lost) must see its lease run out so that recovery takes it.
    watchers: Mutex<HashMap<String, Watch>>,
    recovering: AtomicUsize,
    /// On SQLite, the group commit that the write-aheads and the step batches share.
    group: Option<GroupCommit>,
    /// Wakes the recovery loop when a recovered saga ends, so a backlog drains without waiting
    /// an interval per batch.
    recovery_wake: Arc<tokio::sync::Notify>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    background: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Inner {
    /// True when `step` runs in the log database, so that its effect and its record can share
    /// one transaction.
    fn in_log(&self, step: &Step) -> bool {
        self.participants[step.participant].url == self.log.url
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

    /// A new saga of `kind`, owned by this instance, and the rows that write it ahead of its
    /// first step (design rule 1). [`Engine::start`] commits them and launches the saga; a
    /// caller that must commit them in a transaction of its own runs [`Engine::launch`] after.
    pub fn write_ahead(&self, kind: &str, id: String, input: Value) -> Result<WriteAhead, EngineError> {
        let def = self.inner.latest.get(kind).ok_or_else(|| EngineError::UnknownKind(kind.to_string()))?;
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

    /// Commits a saga's write-ahead rows, with the caller's `rows` before them in the same
    /// transaction, then launches it (design rule 1). On PostgreSQL that is one statement whose
    /// connection goes on to serve the saga; on SQLite a savepoint in the next group commit.
    pub async fn start(&self, ahead: WriteAhead, rows: Vec<Insert>) -> Result<(), sqlx::Error> {
        let mut all = rows;
        all.extend(ahead.rows);
        let conn = match &self.inner.group {
            Some(group) => {
                group.run(move |conn| Box::pin(async move { insert::execute_together(conn, &all).await })).await??;
                None
            }
            None => Some(insert::commit_together(&self.inner.log, &all).await?),
        };
        // The connection is worth keeping only if the saga's first step runs in the log database;
        // held across a step elsewhere, it would sit idle while others wait for one.
        let first_in_log = self.definition(&ahead.record.kind, ahead.record.version).and_then(|def| def.steps.first());
        let conn = conn.filter(|_| first_in_log.is_some_and(|step| self.inner.in_log(step)));
        self.launch(ahead.record, conn);
        Ok(())
    }

    /// Drives a saga this instance wrote ahead, in its own task: a caller that goes away never
    /// interrupts it (design rule 7). `conn`, a connection to the log database (the one the
    /// write-ahead used, say), serves the saga's first log transaction, which saves handing it
    /// back to the pool and taking another.
    pub fn launch(&self, record: SagaRecord, conn: Option<PoolConnection<Any>>) {
        self.spawn_driver(record.id.clone(), record.generation, Some(record), conn, false);
    }

    /// Waits up to `timeout` for a saga to settle. Returns it as it settled (here or on another
    /// instance), or `None` if it is still running.
    pub async fn wait_settled(&self, id: &str, timeout: Duration) -> Result<Option<Arc<SagaRecord>>, sqlx::Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        let local = self.inner.watchers.lock().unwrap().get(id).map(|w| w.settled.subscribe());
        if let Some(mut rx) = local {
            let settled = tokio::time::timeout_at(deadline, rx.wait_for(Option::is_some)).await;
            if let Ok(Ok(saga)) = settled {
                return Ok(saga.clone());
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

    /// Starts the recovery loop and the lease heartbeat. Recovery runs at once, then every
    /// `recovery_interval`.
    pub fn start_background(&self) {
        let weak = Arc::downgrade(&self.inner);
        let interval = self.inner.config.recovery_interval;
        let recovery = tokio::spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else { return };
                if inner.shutdown.is_cancelled() {
                    return;
                }
                let claimed = match (Engine { inner: inner.clone() }).recover_once().await {
                    Ok(claimed) => claimed,
                    Err(error) => {
                        tracing::warn!(%error, "recovery pass failed; retrying next interval");
                        0
                    }
                };
                if claimed > 0 {
                    // A backlog: claim more as soon as there is room, not an interval later.
                    continue;
                }
                let wake = inner.recovery_wake.clone();
                drop(inner);
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = wake.notified() => {}
                }
            }
        });
        let weak = Arc::downgrade(&self.inner);
        let beat = self.inner.config.lease / 3;
        let heartbeat = tokio::spawn(async move {
            loop {
                tokio::time::sleep(beat).await;
                let Some(inner) = weak.upgrade() else { return };
                if inner.shutdown.is_cancelled() {
                    return;
                }
                let until = now_ms() + inner.config.lease.as_millis() as i64;
                let driving: Vec<String> = inner.watchers.lock().unwrap().keys().cloned().collect();
                if let Err(error) = log::renew_leases(&inner.log, &inner.config.instance_id, until, &driving).await {
                    tracing::warn!(%error, "lease heartbeat failed");
                }
            }
        });
        self.inner.background.lock().unwrap().extend([recovery, heartbeat]);
    }

    /// One recovery pass: claims unfinished sagas whose lease has expired and drives each.
    /// Returns how many it claimed.
    pub async fn recover_once(&self) -> Result<usize, sqlx::Error> {
        let inner = &self.inner;
        let room = inner.config.max_recovering.saturating_sub(inner.recovering.load(Ordering::Relaxed));
        if room == 0 || inner.shutdown.is_cancelled() {
            return Ok(0);
        }
        let now = now_ms();
        let until = now + inner.config.lease.as_millis() as i64;
        let known: Vec<(&str, i64)> = inner.definitions.keys().copied().collect();
        let claimed =
            log::claim_expired(&inner.log, &inner.config.instance_id, now, until, room as i64, &known).await?;
        for (id, generation) in &claimed {
            tracing::info!(saga_id = %id, generation, "resuming saga from the log");
            self.spawn_driver(id.clone(), *generation, None, None, true);
        }
        Ok(claimed.len())
    }

    /// Simulates this instance dying: its loops and saga tasks stop at their next step boundary
    /// and its leases are kept, so only their expiry lets another engine resume its sagas.
    pub fn kill(&self) {
        self.inner.shutdown.cancel();
        for handle in self.inner.background.lock().unwrap().drain(..) {
            handle.abort();
        }
    }

    /// Stops starting work, lets running steps end within `grace`, then releases this
    /// instance's leases so that another instance (or the next start) resumes at once.
    pub async fn shutdown(&self, grace: Duration) {
        let inner = &self.inner;
        inner.shutdown.cancel();
        for handle in inner.background.lock().unwrap().drain(..) {
            handle.abort();
        }
        inner.tasks.close();
        if tokio::time::timeout(grace, inner.tasks.wait()).await.is_err() {
            tracing::warn!("saga tasks still running after the shutdown grace; their steps resume elsewhere");
        }
        match log::release_leases(&inner.log, &inner.config.instance_id).await {
            Ok(n) => tracing::info!(released = n, "released saga leases"),
            Err(error) => tracing::warn!(%error, "could not release leases; they expire after LEASE_MS"),
        }
    }

    fn spawn_driver(
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
            let watch =
                watchers.entry(id.clone()).or_insert_with(|| Watch { generation, settled: watch::channel(None).0 });
            watch.generation = generation;
        }
        if recovered {
            inner.recovering.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.tasks.spawn(async move {
            let task_inner = inner.clone();
            let task_id = id.clone();
            let joined = tokio::spawn(async move {
                let driver = Driver { inner: &task_inner, generation, spare: Mutex::new(conn) };
                driver.run(&task_id, record).await
            })
            .await;
            let outcome = joined.unwrap_or_else(|error| {
                tracing::error!(saga_id = %id, %error, "saga task panicked");
                Err(Halt::Panicked)
            });
            if matches!(outcome, Err(Halt::Panicked)) {
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
                    if let Some(watch) = watchers.remove(&id) {
                        watch.settled.send_replace(settled);
                    }
                }
            }
            match outcome {
                Ok(_) => {}
                Err(Halt::Shutdown) => tracing::info!(saga_id = %id, "saga left for the next owner at shutdown"),
                Err(halt) => tracing::warn!(saga_id = %id, ?halt, "stopped driving saga"),
            }
        });
    }
}

/// A saga this instance drives: under which generation, and the channel its waiters watch.
struct Watch {
    generation: i64,
    settled: watch::Sender<Option<Arc<SagaRecord>>>,
}

/// Drives one saga under one generation.
struct Driver<'a> {
    inner: &'a Arc<Inner>,
    generation: i64,
    /// A log database connection handed over at launch, used by the first log transaction.
    spare: Mutex<Option<PoolConnection<Any>>>,
}

impl Driver<'_> {
    /// A connection to the log database: the spare one if it is still there, else the pool's.
    async fn log_conn(&self) -> Result<PoolConnection<Any>, sqlx::Error> {
        let spare = self.spare.lock().unwrap().take();
        match spare {
            Some(conn) => Ok(conn),
            None => self.inner.log.pool.acquire().await,
        }
    }

    async fn run(&self, id: &str, record: Option<SagaRecord>) -> Result<SagaRecord, Halt> {
        let mut saga = match record {
            Some(record) => record,
            None => self.load(id).await?,
        };
        if saga.generation != self.generation {
            return Err(Halt::LeaseLost);
        }
        let Some(def) = self.inner.definitions.get(&(saga.kind.as_str(), saga.version)).cloned() else {
            tracing::error!(saga_id = %id, kind = %saga.kind, version = saga.version,
                "no definition of this saga's kind and version in this build; leaving it to an instance that has it");
            // Nobody claims it again for a lease, so that instances that know the version get
            // their turn and this one does not spin on it.
            let until = now_ms() + self.inner.config.lease.as_millis() as i64;
            let _ = log::release_one(&self.inner.log, id, self.generation, until).await;
            return Err(Halt::LeaseLost);
        };
        loop {
            if self.inner.shutdown.is_cancelled() {
                return Err(Halt::Shutdown);
            }
            match saga.state {
                SagaState::Completed | SagaState::Compensated => return Ok(saga),
                SagaState::Running => match self.forward(&def, &mut saga).await {
                    Err(Halt::Resync) | Ok(()) => {}
                    Err(halt) => return Err(halt),
                },
                SagaState::Compensating => match self.backward(&def, &mut saga).await {
                    Err(Halt::Resync) | Ok(()) => {}
                    Err(halt) => return Err(halt),
                },
            }
        }
    }

    /// Loads the saga, retrying while the log database is unreachable.
    async fn load(&self, id: &str) -> Result<SagaRecord, Halt> {
        let mut attempt = 0;
        loop {
            match log::get(&self.inner.log, id).await {
                Ok(Some(saga)) => return Ok(saga),
                Ok(None) => return Err(Halt::LeaseLost),
                Err(error) => {
                    attempt += 1;
                    tracing::warn!(saga_id = %id, %error, "cannot load saga; retrying");
                    self.backoff(attempt).await?;
                }
            }
        }
    }

    /// One forward move: run the current step once, or finish, or turn to compensation.
    async fn forward(&self, def: &Arc<SagaDefinition>, saga: &mut SagaRecord) -> Result<(), Halt> {
        let index = saga.current_step as usize;
        let Some(step) = def.steps.get(index) else {
            // Every step is recorded; only the final state is missing.
            return self.write(saga, |s| s.state = SagaState::Completed, &[event(None, "completed", None)]).await;
        };
        let past_pivot = def.past_pivot(index);
        if !past_pivot && now_ms() > saga.deadline_at {
            let failure = json!({"code": "deadline_exceeded",
                "detail": format!("the saga did not reach its pivot within {} ms", self.inner.config.deadline.as_millis())});
            return self.compensate(def, saga, failure, None).await;
        }
        if self.inner.faults.is_none() && self.inner.in_log(step) {
            // Fault injection names one step at a time, so batches run only without it.
            match self.run_batch(def, saga, index).await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(halt) => return Err(halt),
            }
        }
        match self.attempt(def, saga, step, Phase::Action).await {
            Attempt::Done => Ok(()),
            Attempt::Halt(halt) => Err(halt),
            Attempt::Failed(StepError::Permanent { code, detail, extra }) if !past_pivot => {
                let mut failure = extra;
                failure.insert("code".into(), code.clone().into());
                failure.insert("detail".into(), detail.clone().into());
                failure.insert("step".into(), step.name.into());
                let failed = event(Some(step.name), "failed", Some(format!("{code}: {detail}")));
                self.compensate(def, saga, Value::Object(failure), Some(failed)).await
            }
            Attempt::Failed(error) => self.failed_attempt(saga, step, error, "failed").await,
        }
    }

    /// Runs the steps from `start` on that share the log database as ONE transaction, with all
    /// their log records (design: neighbouring steps in one database may share a transaction;
    /// the log still records each step). On SQLite that transaction is a savepoint in the next
    /// group commit. True if it committed. On any error nothing is kept and the caller runs
    /// `start` alone, which meets the same error and handles it step by step.
    async fn run_batch(&self, def: &Arc<SagaDefinition>, saga: &mut SagaRecord, start: usize) -> Result<bool, Halt> {
        let outcome = match &self.inner.group {
            Some(group) => {
                let (inner, def, next) = (self.inner.clone(), def.clone(), saga.clone());
                let grouped =
                    group.run(move |conn| Box::pin(async move { batch(conn, &inner, &def, next, start).await })).await;
                grouped.unwrap_or(Err(BatchFailure::Db))
            }
            None => {
                let Ok(mut conn) = self.log_conn().await else { return Ok(false) };
                let Ok(mut tx) = conn.begin().await else { return Ok(false) };
                match batch(&mut tx, self.inner, def, saga.clone(), start).await {
                    // If the commit did happen, the step-by-step path finds out from the log.
                    Ok(next) => tx.commit().await.map(|()| next).map_err(|_| BatchFailure::Db),
                    Err(failure) => Err(failure),
                }
            }
        };
        match outcome {
            Ok(next) => {
                *saga = next;
                Ok(true)
            }
            Err(BatchFailure::LeaseLost) => Err(Halt::LeaseLost),
            Err(BatchFailure::Db) => Ok(false),
        }
    }

    /// One backward move: run the next compensation once, or finish.
    async fn backward(&self, def: &SagaDefinition, saga: &mut SagaRecord) -> Result<(), Halt> {
        skip_uncompensated(saga, def);
        if saga.current_step == 0 {
            return self.write(saga, |s| s.state = SagaState::Compensated, &[event(None, "compensated", None)]).await;
        }
        let step = &def.steps[saga.current_step as usize - 1];
        match self.attempt(def, saga, step, Phase::Compensation).await {
            Attempt::Done => Ok(()),
            Attempt::Halt(halt) => Err(halt),
            // A compensation never gives up (design rule 5).
            Attempt::Failed(error) => self.failed_attempt(saga, step, error, "compensation_failed").await,
        }
    }

    /// Turns the saga backward. Every step before the pivot is compensated, last to first,
    /// whether or not it ran: a compensation of a step that never took effect leaves a tombstone
    /// that makes a late action a no-op (design rule 3), and a step in doubt is covered either way.
    async fn compensate(
        &self,
        def: &SagaDefinition,
        saga: &mut SagaRecord,
        failure: Value,
        failed: Option<NewEvent>,
    ) -> Result<(), Halt> {
        let undo = def.pivot_index().unwrap_or(def.steps.len()) as i64;
        let detail = failure.to_string();
        let mut events: Vec<NewEvent> = failed.into_iter().collect();
        events.push(event(None, "compensating", Some(detail)));
        self.write(
            saga,
            |s| {
                s.state = SagaState::Compensating;
                s.failure = Some(failure);
                s.current_step = undo;
                s.attempts = 0;
                s.stuck = false;
            },
            &events,
        )
        .await
    }

    /// Records a failed attempt, flags the saga stuck past the threshold, and backs off.
    async fn failed_attempt(
        &self,
        saga: &mut SagaRecord,
        step: &Step,
        error: StepError,
        name: &'static str,
    ) -> Result<(), Halt> {
        let attempts = saga.attempts + 1;
        let stuck = attempts >= i64::from(self.inner.config.stuck_after_attempts);
        let message = error.to_string();
        tracing::warn!(saga_id = %saga.id, step = step.name, attempts, error = %message, "step attempt failed; retrying");
        let mut events = vec![event(Some(step.name), name, Some(message.clone()))];
        if stuck && !saga.stuck {
            events.push(event(Some(step.name), "stuck", Some(format!("{attempts} failed attempts"))));
        }
        self.write(
            saga,
            |s| {
                s.attempts = attempts;
                s.last_error = Some(message);
                s.stuck = stuck;
            },
            &events,
        )
        .await?;
        self.backoff(attempts as u32).await
    }

    /// Runs one attempt of a step's action or compensation and records its success.
    async fn attempt(&self, def: &SagaDefinition, saga: &mut SagaRecord, step: &Step, phase: Phase) -> Attempt {
        let function = match phase {
            Phase::Action => step.action,
            Phase::Compensation => step.compensation.expect("only steps with a compensation are undone"),
        };
        let fault =
            self.inner.faults.as_ref().and_then(|f| f.fault(def.kind, step.name, phase, saga.attempts as u32 + 1));
        match &fault {
            Some(Fault::Fail(error)) => return Attempt::Failed(error.clone()),
            Some(Fault::CrashBefore) => return Attempt::Halt(Halt::Crash),
            _ => {}
        }
        let ctx = StepContext {
            saga_id: saga.id.clone(),
            input: saga.input.clone(),
            outputs: saga.outputs.clone(),
            failure: saga.failure.clone(),
        };
        let db = &self.inner.participants[step.participant];
        let in_log = db.url == self.inner.log.url;
        let runs = if matches!(fault, Some(Fault::RunTwice)) { 2 } else { 1 };
        let mut output = Value::Null;
        for run in 1..=runs {
            let result: Result<(), Attempt> = async {
                let mut conn = if in_log { self.log_conn().await } else { db.pool.acquire().await }
                    .map_err(|e| Attempt::Failed(e.into()))?;
                let mut tx = conn.begin().await.map_err(|e| Attempt::Failed(e.into()))?;
                output = function(&mut tx, &ctx).await.map_err(Attempt::Failed)?;
                if in_log && run == runs {
                    // In the log database the effect and its record commit together (rule 4).
                    let mut next = saga.clone();
                    let events = advance(&mut next, def, step, phase, &output);
                    log::record(&mut tx, &mut next, &events, now_ms()).await.map_err(log_failure)?;
                    tx.commit().await.map_err(|e| Attempt::Failed(e.into()))?;
                    *saga = next;
                } else {
                    tx.commit().await.map_err(|e| Attempt::Failed(e.into()))?;
                }
                Ok(())
            }
            .await;
            if let Err(outcome) = result {
                return outcome;
            }
        }
        if matches!(fault, Some(Fault::CrashAfter)) {
            return Attempt::Halt(Halt::Crash);
        }
        if !in_log {
            // The step committed in its own database; now the log records it. If this fails the
            // step is in doubt and runs again, which rule 3 makes harmless.
            let mut next = saga.clone();
            let events = advance(&mut next, def, step, phase, &output);
            let recorded = self.write(saga, |s| *s = next, &events).await;
            if let Err(halt) = recorded {
                return Attempt::Halt(halt);
            }
        }
        Attempt::Done
    }

    /// Applies `change` to a copy of the saga and records it with `events`; the saga in memory
    /// changes only once the write commits. While the log database fails, retries with backoff.
    async fn write(
        &self,
        saga: &mut SagaRecord,
        change: impl FnOnce(&mut SagaRecord),
        events: &[NewEvent],
    ) -> Result<(), Halt> {
        let mut next = saga.clone();
        change(&mut next);
        let mut attempt = 0;
        loop {
            let mut candidate = next.clone();
            let result: Result<(), LogError> = async {
                let mut conn = self.log_conn().await?;
                let mut tx = conn.begin().await?;
                log::record(&mut tx, &mut candidate, events, now_ms()).await?;
                tx.commit().await?;
                Ok(())
            }
            .await;
            match result {
                Ok(()) => {
                    *saga = candidate;
                    return Ok(());
                }
                Err(LogError::LeaseLost) => return Err(Halt::LeaseLost),
                Err(LogError::Db(error)) => {
                    attempt += 1;
                    tracing::warn!(saga_id = %saga.id, %error, attempt, "log write failed; retrying");
                    self.backoff(attempt).await?;
                    // A commit may have succeeded although its answer was lost, here or in an
                    // earlier write: the log, not memory, says where the saga stands.
                    let stored = self.load(&saga.id).await?;
                    if stored.generation != self.generation {
                        return Err(Halt::LeaseLost);
                    }
                    if stored.next_seq != saga.next_seq {
                        *saga = stored;
                        return Err(Halt::Resync);
                    }
                }
            }
        }
    }

    /// Sleeps the retry delay for `attempt` (exponential, capped, with jitter), unless shut down.
    async fn backoff(&self, attempt: u32) -> Result<(), Halt> {
        let config = &self.inner.config;
        let exp = config.backoff_base.saturating_mul(1u32 << attempt.min(20).saturating_sub(1));
        let delay = exp.min(config.backoff_cap);
        // Equal jitter: half fixed, half random, so retries of many sagas spread out.
        let jittered = delay / 2 + delay.mul_f64(fastrand::f64() / 2.0);
        tokio::select! {
            _ = tokio::time::sleep(jittered) => Ok(()),
            _ = self.inner.shutdown.cancelled() => Err(Halt::Shutdown),
        }
    }
}

/// Why a batch of steps kept nothing.
enum BatchFailure {
    /// Another claim took the saga over.
    LeaseLost,
    /// A step or the log write failed; the step-by-step path sorts out which and why.
    Db,
}

/// Runs the steps of `def` from `start` on that share the log database, then records them, on
/// `conn`, inside a transaction the caller commits. Returns the saga as it then stands.
async fn batch(
    conn: &mut AnyConnection,
    inner: &Inner,
    def: &SagaDefinition,
    mut next: SagaRecord,
    start: usize,
) -> Result<SagaRecord, BatchFailure> {
    let mut events = Vec::new();
    for step in def.steps[start..].iter().take_while(|s| inner.in_log(s)) {
        let ctx = StepContext {
            saga_id: next.id.clone(),
            input: next.input.clone(),
            outputs: next.outputs.clone(),
            failure: None,
        };
        let output = (step.action)(conn, &ctx).await.map_err(|_| BatchFailure::Db)?;
        events.extend(advance(&mut next, def, step, Phase::Action, &output));
    }
    match log::record(conn, &mut next, &events, now_ms()).await {
        Ok(()) => Ok(next),
        Err(LogError::LeaseLost) => Err(BatchFailure::LeaseLost),
        Err(LogError::Db(_)) => Err(BatchFailure::Db),
    }
}

/// Moves the saga past a step that succeeded (forward) or was compensated (backward) and
/// returns the events that record it. Past the last step the saga completes in the same write,
/// which saves a commit per saga.
fn advance(saga: &mut SagaRecord, def: &SagaDefinition, step: &Step, phase: Phase, output: &Value) -> Vec<NewEvent> {
    saga.attempts = 0;
    saga.last_error = None;
    saga.stuck = false;
    match phase {
        Phase::Action => {
            saga.outputs.insert(step.name.to_string(), output.clone());
            saga.current_step += 1;
            let mut events = vec![event(Some(step.name), "succeeded", None)];
            if saga.current_step as usize == def.steps.len() {
                saga.state = SagaState::Completed;
                events.push(event(None, "completed", None));
            }
            events
        }
        Phase::Compensation => {
            saga.current_step -= 1;
            let mut events = vec![event(Some(step.name), "compensated", None)];
            // Past the last compensation the saga is compensated in the same write.
            skip_uncompensated(saga, def);
            if saga.current_step == 0 {
                saga.state = SagaState::Compensated;
                events.push(event(None, "compensated", None));
            }
            events
        }
    }
}

/// Moves a compensating saga past the steps that have nothing to undo.
fn skip_uncompensated(saga: &mut SagaRecord, def: &SagaDefinition) {
    while saga.current_step > 0 && def.steps[saga.current_step as usize - 1].compensation.is_none() {
        saga.current_step -= 1;
    }
}

fn event(step: Option<&'static str>, name: &'static str, detail: Option<String>) -> NewEvent {
    NewEvent { step, event: name, detail }
}

fn log_failure(error: LogError) -> Attempt {
    match error {
        LogError::LeaseLost => Attempt::Halt(Halt::LeaseLost),
        LogError::Db(e) => Attempt::Failed(e.into()),
    }
}
