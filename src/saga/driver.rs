//! The per-saga driver: one task per saga under one generation. It moves the saga one step at a
//! time, forward through the actions or backward through the compensations, as the log's state
//! says (docs/design.md, "Rules every step obeys"). A step in the log database runs through
//! [`super::batch`], together with its neighbours there; a step in another participant's
//! database runs here, and its record then rides on the next log transaction. Failures become
//! events as rule 5 says; retries back off with jitter; a log write whose answer was lost is
//! settled by reading the log back.

use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use sqlx::pool::PoolConnection;
use sqlx::{Any, Connection};

use super::batch::Plan;
use super::coordinator::Inner;
use super::definition::{DEADLINE_EXCEEDED, SagaDefinition, StepContext, StepError};
use super::fault::Fault;
use super::log::{self, SagaRecord, SagaState};
use super::state::{Change, IllegalTransition, Phase};
use super::trace;
use crate::db::now_ms;
use crate::metrics::FailureLabels;

/// Why the driving of a saga stopped before it settled.
#[derive(Debug, thiserror::Error)]
pub enum Halt {
    /// Another claim bumped the generation: this instance no longer owns the saga.
    #[error("another instance claimed the saga: generation {0} is fenced out")]
    LeaseLost(i64),
    /// The saga's row is gone from the log.
    #[error("the saga is not in the log")]
    Vanished,
    /// The saga runs a definition this build does not have; an instance that has it takes it.
    #[error("this build has no definition of {kind} version {version}")]
    UnknownDefinition {
        /// The saga's kind.
        kind: String,
        /// Its definition's version.
        version: i64,
    },
    /// A fault injection simulated this process dying.
    #[error("a fault injection simulated a crash")]
    Crash,
    /// The instance is shutting down.
    #[error("the instance is shutting down")]
    Shutdown,
    /// The saga's task panicked (a bug); its lease is released for another try.
    #[error("the saga's task panicked: {0}")]
    Panicked(String),
    /// The next event would be an illegal transition: the log and this build disagree.
    #[error("the saga's next event is illegal where it stands")]
    Illegal(#[source] IllegalTransition),
}

/// Drives one saga under one generation.
pub(super) struct Driver<'a> {
    pub(super) inner: &'a Arc<Inner>,
    pub(super) generation: i64,
    /// A log database connection handed over at launch, used by the first log transaction.
    spare: Mutex<Option<PoolConnection<Any>>>,
}

impl<'a> Driver<'a> {
    /// A driver of a saga under `generation`; `spare` serves its first log transaction.
    pub(super) fn new(inner: &'a Arc<Inner>, generation: i64, spare: Option<PoolConnection<Any>>) -> Self {
        Self { inner, generation, spare: Mutex::new(spare) }
    }

    /// A connection to the log database: the spare one if it is still there, else the pool's.
    pub(super) async fn log_conn(&self) -> Result<PoolConnection<Any>, sqlx::Error> {
        let spare = self.spare.lock().unwrap().take();
        match spare {
            Some(conn) => Ok(conn),
            None => self.inner.log.pool.acquire().await,
        }
    }

    /// Drives saga `id` (`record`, if the caller has it) until it settles or the driver halts.
    pub(super) async fn run(&self, id: &str, record: Option<SagaRecord>) -> Result<SagaRecord, Halt> {
        let mut saga = match record {
            Some(record) => record,
            None => self.load(id).await?,
        };
        if saga.generation != self.generation {
            return Err(Halt::LeaseLost(self.generation));
        }
        let Some(def) = self.inner.definitions.get(&(saga.kind.as_str(), saga.version)).cloned() else {
            // Nobody claims it again for a lease, so that instances that know the version get
            // their turn and this one does not spin on it.
            let until = now_ms() + self.inner.config.lease.as_millis() as i64;
            let _ = log::release_one(&self.inner.log, id, self.generation, until).await;
            return Err(Halt::UnknownDefinition { kind: saga.kind, version: saga.version });
        };
        normalize(&def, &mut saga);
        trace::saga_known(&def, &saga);
        loop {
            if self.inner.shutdown.is_cancelled() {
                return Err(Halt::Shutdown);
            }
            if saga.state.is_final() {
                return Ok(saga);
            }
            self.advance(&def, &mut saga).await?;
        }
    }

    /// One move: the next step's action or compensation (with whatever log steps follow it),
    /// the turn backward at the deadline, or the saga-level event that settles it.
    async fn advance(&self, def: &Arc<SagaDefinition>, saga: &mut SagaRecord) -> Result<(), Halt> {
        let shape = def.shape();
        let Some((index, phase)) = saga.position().work(shape) else {
            // Every step is recorded; only the final event is missing.
            return self.local(def, saga, Plan::recording(vec![Change::Settled])).await;
        };
        if phase == Phase::Action && !shape.past_pivot(index) && now_ms() > saga.deadline_at {
            let failure = json!({"code": DEADLINE_EXCEEDED,
                "detail": format!("the saga did not reach its pivot within {} ms", self.inner.config.deadline.as_millis())});
            return self.local(def, saga, Plan::recording(vec![Change::Compensating { failure }])).await;
        }
        if self.inner.in_log(&def.steps[index]) {
            self.local(def, saga, Plan::recording(Vec::new())).await
        } else {
            self.remote(def, saga, index, phase).await
        }
    }

    /// Runs step `index` in another participant's database: its transaction commits there,
    /// then the log records it. If that record fails the step is in doubt and runs again,
    /// which rule 3 makes harmless.
    async fn remote(
        &self,
        def: &Arc<SagaDefinition>,
        saga: &mut SagaRecord,
        index: usize,
        phase: Phase,
    ) -> Result<(), Halt> {
        let step = &def.steps[index];
        let fault = self.inner.fault(&saga.id, def, step, phase, saga.attempts);
        match &fault {
            Some(Fault::CrashBefore) => return Err(Halt::Crash),
            Some(Fault::Fail(error)) => {
                trace::injected(def, saga, index, phase, error);
                return self.failed(def, saga, index, phase, error.clone()).await;
            }
            _ => {}
        }
        let function = match phase {
            Phase::Action => &step.action,
            Phase::Compensation => step.compensation.as_ref().expect("only steps with a compensation are undone"),
        };
        let ctx = context(saga);
        let db = &self.inner.participants[step.participant];
        let runs = if matches!(fault, Some(Fault::RunTwice)) { 2 } else { 1 };
        let mut output = Value::Null;
        for _ in 0..runs {
            let ran = trace::attempt(self.inner, def, saga, index, phase, async {
                let mut conn = db.pool.acquire().await?;
                let mut tx = conn.begin().await?;
                let output = function(&mut tx, &ctx).await?;
                tx.commit().await?;
                Ok(output)
            })
            .await;
            match ran {
                Ok(value) => output = value,
                Err(error) => return self.failed(def, saga, index, phase, error).await,
            }
        }
        if matches!(fault, Some(Fault::CrashAfter)) {
            return Err(Halt::Crash);
        }
        let done = match phase {
            Phase::Action => Change::Succeeded { step: index, output },
            Phase::Compensation => Change::Compensated { step: index },
        };
        let mut plan = Plan::recording(vec![done]);
        plan.lose_answer = matches!(fault, Some(Fault::LoseAnswer));
        self.local(def, saga, plan).await
    }

    /// Records a failed attempt of step `index` in another database (and backs off, or turns
    /// the saga backward).
    async fn failed(
        &self,
        def: &Arc<SagaDefinition>,
        saga: &mut SagaRecord,
        index: usize,
        phase: Phase,
        error: StepError,
    ) -> Result<(), Halt> {
        let changes = failure(self.inner, def, saga, index, phase, error);
        self.local(def, saga, Plan::recording(changes)).await
    }

    /// Loads the saga, retrying while the log database is unreachable.
    pub(super) async fn load(&self, id: &str) -> Result<SagaRecord, Halt> {
        let mut attempt = 0;
        loop {
            match log::get(&self.inner.log, id).await {
                Ok(Some(saga)) => return Ok(saga),
                Ok(None) => return Err(Halt::Vanished),
                Err(error) => {
                    attempt += 1;
                    tracing::warn!(saga_id = %id, %error, "cannot load saga; retrying");
                    self.backoff(attempt).await?;
                }
            }
        }
    }

    /// After a log transaction whose outcome is unknown (its commit's answer was lost, or a
    /// statement failed): reads the saga back. True if the log moved on, in which case `saga`
    /// is now what the log holds; false if nothing of that transaction was written.
    pub(super) async fn resync(&self, def: &SagaDefinition, saga: &mut SagaRecord) -> Result<bool, Halt> {
        let mut stored = self.load(&saga.id).await?;
        if stored.generation != self.generation {
            return Err(Halt::LeaseLost(self.generation));
        }
        if stored.next_seq == saga.next_seq {
            return Ok(false);
        }
        tracing::info!(saga_id = %saga.id, seq = stored.next_seq, "the log moved on; resuming from it");
        normalize(def, &mut stored);
        *saga = stored;
        Ok(true)
    }

    /// Sleeps the retry delay for `attempt` (exponential, capped, with jitter), unless shut down.
    pub(super) async fn backoff(&self, attempt: u32) -> Result<(), Halt> {
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

/// What a step reads of the saga as it stands.
pub(super) fn context(saga: &SagaRecord) -> StepContext {
    StepContext {
        saga_id: saga.id.clone(),
        input: saga.input.clone(),
        outputs: saga.outputs.clone(),
        failure: saga.failure.clone(),
    }
}

/// A row written by an older release may point a compensating saga at a step with nothing to
/// undo; the transitions never leave it there, so move it on before driving it.
fn normalize(def: &SagaDefinition, saga: &mut SagaRecord) {
    if saga.state == SagaState::Compensating {
        saga.current_step = def.shape().skip_uncompensated(saga.position().current_step) as i64;
    }
}

/// The events a failed attempt of step `index` records (docs/design.md, rule 5): before the
/// pivot a permanent failure of an action turns the saga backward; anything else is retried,
/// and past `STUCK_AFTER_ATTEMPTS` flags the saga stuck. A compensation never gives up.
pub(super) fn failure(
    inner: &Inner,
    def: &SagaDefinition,
    saga: &SagaRecord,
    index: usize,
    phase: Phase,
    error: StepError,
) -> Vec<Change> {
    let name = def.steps[index].name;
    if let Some(metrics) = inner.metrics() {
        let error = if matches!(error, StepError::Permanent { .. }) { "permanent" } else { "transient" };
        let labels = FailureLabels { kind: def.kind, step: name, phase: phase.as_str(), error };
        metrics.step_failures.get_or_create(&labels).inc();
    }
    match (phase, error) {
        (Phase::Action, StepError::Permanent { code, detail, extra }) if !def.shape().past_pivot(index) => {
            let error = format!("{code}: {detail}");
            let mut failure = extra;
            failure.insert("code".into(), code.as_ref().into());
            failure.insert("detail".into(), detail.into());
            failure.insert("step".into(), name.into());
            vec![
                Change::Failed { step: index, error, retried: false },
                Change::Compensating { failure: Value::Object(failure) },
            ]
        }
        (phase, error) => {
            let attempts = u32::try_from(saga.attempts + 1).unwrap_or(u32::MAX);
            let error = error.to_string();
            tracing::warn!(saga_id = %saga.id, step = name, phase = phase.as_str(), attempts, %error,
                "step attempt failed; retrying");
            let mut changes = vec![match phase {
                Phase::Action => Change::Failed { step: index, error, retried: true },
                Phase::Compensation => Change::CompensationFailed { step: index, error },
            }];
            if attempts >= inner.config.stuck_after_attempts {
                inner.flag_stuck(&saga.id);
                if !saga.stuck {
                    changes.push(Change::Stuck { step: index, attempts });
                }
            }
            changes
        }
    }
}
