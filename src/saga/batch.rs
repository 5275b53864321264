//! The driver's transactions in the log database. One transaction records what the driver has
//! to record (a step in another database, a failure, the turn backward, the settling) and then
//! runs every following step that lives in the log database, each step's effect and all their
//! events committing together (docs/design.md, rules 2 and 4: neighbouring steps in one
//! database may share a transaction; the log still records each). On SQLite the transaction is
//! a savepoint in the next group commit; on PostgreSQL, one transaction on a pool connection.
//!
//! A step that fails inside the transaction rolls all of it back; the transaction is then tried
//! again with the steps before the failed one and the failure's events in its place, so that
//! what came before still commits and the failure is handled as rule 5 says. Injected faults act
//! here as on any other path: a crash before a step discards the uncommitted steps before it,
//! exactly as a process dying mid-transaction would.

use std::sync::Arc;

use serde_json::Value;
use sqlx::{AnyConnection, Connection};
use tracing::Instrument;

use super::coordinator::Inner;
use super::definition::{SagaDefinition, StepError};
use super::driver::{Driver, Halt, context, failure};
use super::fault::Fault;
use super::log::{self, LogError, NewEvent, SagaRecord};
use super::state::{Change, Phase};
use super::trace;
use crate::db::now_ms;
use crate::metrics::OutcomeLabels;

/// What one log transaction is to do.
#[derive(Debug, Clone)]
pub(super) struct Plan {
    /// Changes to record first.
    record: Vec<Change>,
    /// The steps at these positions of the run failed on earlier tries of the transaction: the
    /// others run again, and each failure is recorded in its step's place.
    failures: Vec<(usize, StepError)>,
    /// The faults decided for the steps run so far, so that a retry of the transaction meets
    /// the same ones rather than drawing new ones.
    faults: Vec<Option<Fault>>,
    /// Lose the answer to the commit (a [`Fault::LoseAnswer`] of the step being recorded).
    pub(super) lose_answer: bool,
}

impl Plan {
    /// A transaction that records `changes`, then runs the log steps that follow.
    pub(super) fn recording(changes: Vec<Change>) -> Self {
        Self { record: changes, failures: Vec::new(), faults: Vec::new(), lose_answer: false }
    }

    /// No step runs after a retried failure, which waits for its backoff, nor after the turn
    /// backward, which is written before the first compensation acts on it.
    fn runs_steps(&self) -> bool {
        !self.record.iter().any(|c| backs_off(c) || matches!(c, Change::Compensating { .. }))
    }
}

/// True for the changes after which the saga waits before it tries again.
fn backs_off(change: &Change) -> bool {
    matches!(change, Change::Failed { retried: true, .. } | Change::CompensationFailed { .. } | Change::Stuck { .. })
}

/// A transaction that committed.
struct Done {
    /// The saga as the commit left it.
    next: SagaRecord,
    /// A step in it was to crash right after its commit.
    crash_after: bool,
    /// Its commit's answer is to be lost.
    lose_answer: bool,
    /// It recorded a failed attempt: back off for this many attempts before the next.
    backoff: Option<u32>,
}

/// Why a transaction kept nothing.
enum Stop {
    /// The step at position `at` of the run failed.
    Failed { at: usize, error: StepError, faults: Vec<Option<Fault>> },
    /// The driver must stop.
    Halt(Halt),
    /// The log database failed; the transaction may or may not have committed.
    Db(sqlx::Error),
}

impl Driver<'_> {
    /// Runs `plan` as one log transaction, trying again until it commits, and moves `saga` to
    /// where the commit left it; backs off after a failed attempt it recorded.
    pub(super) async fn local(
        &self,
        def: &Arc<SagaDefinition>,
        saga: &mut SagaRecord,
        mut plan: Plan,
    ) -> Result<(), Halt> {
        let mut unknown = 0;
        loop {
            let error = match self.transaction(def, saga, plan.clone()).await {
                Ok(done) if !done.lose_answer => {
                    if let Some(metrics) = self.inner.metrics()
                        && done.next.state.is_final()
                        && !saga.state.is_final()
                    {
                        let outcome = done.next.state.as_str();
                        metrics.sagas_finished.get_or_create(&OutcomeLabels { kind: def.kind, outcome }).inc();
                    }
                    *saga = done.next;
                    if done.crash_after {
                        return Err(Halt::Crash);
                    }
                    if let Some(attempts) = done.backoff {
                        self.backoff(attempts).await?;
                    }
                    return Ok(());
                }
                Ok(_) => sqlx::Error::Io(std::io::Error::other("injected fault: the answer to the commit was lost")),
                Err(Stop::Failed { at, error, faults }) => {
                    plan.failures.push((at, error));
                    plan.faults = faults;
                    continue;
                }
                Err(Stop::Halt(halt)) => return Err(halt),
                Err(Stop::Db(error)) => error,
            };
            // A commit may have happened although its answer was lost: the log, not memory,
            // says where the saga stands.
            unknown += 1;
            tracing::warn!(saga_id = %saga.id, %error, attempt = unknown, "log transaction failed; reading the log back");
            self.backoff(unknown).await?;
            if self.resync(def, saga).await? {
                return Ok(());
            }
            // Nothing was written. If the transaction ran a step, that step's attempt failed.
            if plan.failures.is_empty() && plan.runs_steps() {
                plan.failures.push((0, StepError::from(error)));
            }
        }
    }

    /// Runs `plan` once, in a savepoint of the next group commit or in a transaction of its own.
    async fn transaction(&self, def: &Arc<SagaDefinition>, saga: &SagaRecord, plan: Plan) -> Result<Done, Stop> {
        match &self.inner.group {
            Some(group) => {
                let (inner, def, saga) = (self.inner.clone(), def.clone(), saga.clone());
                // The group's task runs it: in the saga's span, like the steps that run here.
                let span = tracing::Span::current();
                group
                    .run(move |conn| {
                        Box::pin(async move { run(conn, &inner, &def, saga, plan).await }.instrument(span))
                    })
                    .await
                    .map_err(Stop::Db)?
            }
            None => {
                let mut conn = self.log_conn().await.map_err(Stop::Db)?;
                let mut tx = conn.begin().await.map_err(Stop::Db)?;
                let done = run(&mut tx, self.inner, def, saga.clone(), plan).await?;
                tx.commit().await.map_err(Stop::Db)?;
                Ok(done)
            }
        }
    }
}

/// The body of one log transaction on `conn`: the plan's records, then each following step in
/// the log database, then every event in one fenced write. The caller commits.
async fn run(
    conn: &mut AnyConnection,
    inner: &Inner,
    def: &SagaDefinition,
    mut next: SagaRecord,
    plan: Plan,
) -> Result<Done, Stop> {
    let shape = def.shape();
    let mut events = Vec::new();
    let mut apply = |next: &mut SagaRecord, change: Change| -> Result<(), Stop> {
        let (step, kind, detail) = next.apply(shape, change).map_err(|e| Stop::Halt(Halt::Illegal(e)))?;
        events.push(NewEvent { step, kind, detail });
        Ok(())
    };
    let runs_steps = plan.runs_steps();
    let mut backoff = plan.record.iter().any(backs_off);
    for change in plan.record {
        apply(&mut next, change)?;
    }
    let mut faults = plan.faults;
    let (mut crash_after, mut lose_answer) = (false, plan.lose_answer);
    let mut run = 0;
    while let Some((index, phase)) = next.position().work(shape).filter(|_| runs_steps) {
        let step = &def.steps[index];
        if !inner.in_log(step) {
            break;
        }
        if let Some((_, error)) = plan.failures.iter().find(|(at, _)| *at == run) {
            // The failure's events end the transaction: a retry waits for its backoff, and a
            // turn backward is written before the first compensation acts on it.
            let changes = failure(inner, def, &next, index, phase, error.clone());
            backoff = changes.iter().any(backs_off);
            for change in changes {
                apply(&mut next, change)?;
            }
            break;
        }
        let fault = match faults.get(run) {
            Some(decided) => decided.clone(),
            None => {
                let fault = inner.fault(&next.id, def, step, phase, next.attempts);
                faults.push(fault.clone());
                fault
            }
        };
        match &fault {
            Some(Fault::CrashBefore) => return Err(Stop::Halt(Halt::Crash)),
            Some(Fault::Fail(error)) => {
                trace::injected(def, &next, index, phase, error);
                return Err(Stop::Failed { at: run, error: error.clone(), faults });
            }
            _ => {}
        }
        let function = match phase {
            Phase::Action => &step.action,
            Phase::Compensation => step.compensation.as_ref().expect("only steps with a compensation are undone"),
        };
        let ctx = context(&next);
        let mut output = Value::Null;
        for _ in 0..if matches!(fault, Some(Fault::RunTwice)) { 2 } else { 1 } {
            let ran = trace::attempt(inner, def, &next, index, phase, function(conn, &ctx)).await;
            match ran {
                Ok(value) => output = value,
                Err(error) => return Err(Stop::Failed { at: run, error, faults }),
            }
        }
        crash_after |= matches!(fault, Some(Fault::CrashAfter));
        lose_answer |= matches!(fault, Some(Fault::LoseAnswer));
        drop(ctx);
        apply(
            &mut next,
            match phase {
                Phase::Action => Change::Succeeded { step: index, output },
                Phase::Compensation => Change::Compensated { step: index },
            },
        )?;
        run += 1;
    }
    // Past the last step (or the last compensation) the saga settles in the same write, which
    // saves a commit per saga.
    if next.position().settling(shape).is_some() {
        apply(&mut next, Change::Settled)?;
    }
    match log::record(conn, &mut next, &events, now_ms()).await {
        Ok(()) => {}
        Err(LogError::LeaseLost) => return Err(Stop::Halt(Halt::LeaseLost(next.generation))),
        Err(LogError::Db(error)) => return Err(Stop::Db(error)),
    }
    let backoff = backoff.then(|| u32::try_from(next.attempts).unwrap_or(u32::MAX));
    Ok(Done { next, crash_after, lose_answer, backoff })
}
