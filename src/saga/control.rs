//! Operator actions (docs/design.md, "Operator actions"): `retry` and `abort` of an unfinished
//! saga, on whichever instance the request lands. Each action takes the saga over with one
//! conditional write of its row in the log database: the row must still stand where it was read
//! (same generation, same next seq), the write bumps the generation, records who asked and why,
//! and for an abort turns the saga backward in the same statement. The previous driver, here or
//! on another instance, is fenced out at its next write, and this instance drives the saga on
//! at once. An abort racing the pivot is thus decided by whichever write commits first.

use std::time::Duration;

use serde_json::json;

use super::coordinator::Engine;
use super::definition::SagaDefinition;
use super::log::{self, NewEvent, SagaFilter, SagaRecord, SagaState};
use super::state::{Change, IllegalTransition, OperatorAction};
use crate::db::now_ms;
use crate::metrics::ActionLabels;

/// The failure code of a saga an operator aborted.
pub const ABORTED: &str = "aborted";

/// Most sagas one bulk retry acts on.
pub const MAX_BULK: usize = 1000;

/// How many times an action reads the row again after losing it to a concurrent write.
const TRIES: usize = 50;

/// Who asks for an action, and why: both go into the saga's history.
#[derive(Debug, Clone)]
pub struct Operator {
    /// Who asked.
    pub actor: String,
    /// Why.
    pub reason: String,
}

/// Why an operator action was refused; nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No saga has this id.
    #[error("saga {0:?} not found")]
    NotFound(String),
    /// The saga has settled: nothing is left to retry or abort.
    #[error("the saga is {0}; nothing is left to do")]
    Finished(SagaState),
    /// The saga has passed its pivot (or is at a pivot in another database, which may have
    /// taken effect): it can only go forward.
    #[error("the saga is past its pivot and can only go forward")]
    PastPivot,
    /// The saga runs a definition this build does not have.
    #[error("this instance has no definition of {kind} version {version}")]
    UnknownDefinition {
        /// The saga's kind.
        kind: String,
        /// Its definition's version.
        version: i64,
    },
    /// The saga kept changing under the action; asking again will do.
    #[error("the saga kept changing while the action was written")]
    Busy,
    /// The action's events do not fit where the saga stands: a bug.
    #[error("the action does not fit where the saga stands")]
    Illegal(#[source] IllegalTransition),
    /// The log database failed.
    #[error("the log database failed")]
    Db(#[from] sqlx::Error),
}

impl Engine {
    /// Attempts saga `id`'s current step (or compensation) now, whether it is stuck or waiting
    /// out a backoff. Returns the saga as the take-over left it.
    pub async fn retry(&self, id: &str, by: &Operator) -> Result<SagaRecord, ControlError> {
        self.act(id, OperatorAction::Retry, by).await
    }

    /// Turns saga `id` backward now, with failure code [`ABORTED`], if it has not reached its
    /// pivot; a saga already compensating keeps its first cause and is driven on at once.
    pub async fn abort(&self, id: &str, by: &Operator) -> Result<SagaRecord, ControlError> {
        self.act(id, OperatorAction::Abort, by).await
    }

    /// Retries every unfinished saga that `filter` matches (its `state`, `kind` and `stuck`;
    /// at most [`MAX_BULK`]). Returns how many were retried; those that settled meanwhile are
    /// not counted.
    pub async fn retry_matching(&self, filter: &SagaFilter, by: &Operator) -> Result<usize, ControlError> {
        let states: Vec<SagaState> = match filter.state {
            Some(state) if state.is_final() => return Ok(0),
            Some(state) => vec![state],
            None => vec![SagaState::Running, SagaState::Compensating],
        };
        let mut retried = 0;
        for state in states {
            let mut page = SagaFilter { state: Some(state), before: None, limit: 200, ..filter.clone() };
            while retried < MAX_BULK {
                let sagas = log::list(&self.inner.log, &page).await?;
                for saga in &sagas {
                    if retried == MAX_BULK {
                        break;
                    }
                    match self.retry(&saga.id, by).await {
                        Ok(_) => retried += 1,
                        Err(ControlError::Finished(_) | ControlError::NotFound(_)) => {}
                        Err(ControlError::UnknownDefinition { .. }) => {}
                        Err(error) => return Err(error),
                    }
                }
                match sagas.last() {
                    Some(last) if sagas.len() as i64 == page.limit => page.before = Some(last.id.clone()),
                    _ => break,
                }
            }
        }
        Ok(retried)
    }

    /// Reads the saga, checks the action fits, and takes it over; reads it again whenever a
    /// concurrent write got there first.
    async fn act(&self, id: &str, action: OperatorAction, by: &Operator) -> Result<SagaRecord, ControlError> {
        for _ in 0..TRIES {
            let seen = log::get(&self.inner.log, id).await?.ok_or_else(|| ControlError::NotFound(id.to_string()))?;
            if seen.state.is_final() {
                return Err(ControlError::Finished(seen.state));
            }
            let Some(def) = self.inner.definitions.get(&(seen.kind.as_str(), seen.version)).cloned() else {
                return Err(ControlError::UnknownDefinition { kind: seen.kind, version: seen.version });
            };
            let mut next = seen.clone();
            let events = self.changes(&def, &seen, action, by)?;
            let mut new_events = Vec::with_capacity(events.len());
            for change in events {
                let (step, kind, detail) = next.apply(def.shape(), change).map_err(ControlError::Illegal)?;
                new_events.push(NewEvent { step, kind, detail });
            }
            let now = now_ms();
            next.generation = seen.generation + 1;
            next.owner = Some(self.inner.config.instance_id.clone());
            next.lease_expires_at = now + self.inner.config.lease.as_millis() as i64;
            if self.take_over(&seen, &mut next, new_events, now).await? {
                tracing::info!(saga_id = %id, action = action.as_str(), actor = %by.actor, reason = %by.reason,
                    generation = next.generation, "operator action taken");
                if let Some(metrics) = self.inner.metrics() {
                    metrics.operator_actions.get_or_create(&ActionLabels { action: action.as_str() }).inc();
                }
                self.spawn_driver(next.id.clone(), next.generation, Some(next.clone()), None, false);
                return Ok(next);
            }
            // The saga moved on between the read and the write: look again.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Err(ControlError::Busy)
    }

    /// The changes an action records on a saga that stands as `seen`.
    fn changes(
        &self,
        def: &SagaDefinition,
        seen: &SagaRecord,
        action: OperatorAction,
        by: &Operator,
    ) -> Result<Vec<Change>, ControlError> {
        let mut changes = vec![Change::Operator { action, actor: by.actor.clone(), reason: by.reason.clone() }];
        if action == OperatorAction::Abort && seen.state == SagaState::Running {
            let shape = def.shape();
            let current = usize::try_from(seen.current_step).unwrap_or(usize::MAX);
            // A pivot in another database may have committed there before its record here: only
            // a pivot whose effect and record share the log's transaction can lose to an abort.
            let remote_pivot = shape.pivot() == Some(current) && !self.inner.in_log(&def.steps[current]);
            if !shape.abortable(current) || remote_pivot {
                return Err(ControlError::PastPivot);
            }
            let failure = json!({
                "code": ABORTED,
                "detail": format!("aborted by an operator: {}", by.reason),
                "step": shape.name(current),
            });
            changes.push(Change::Compensating { failure });
        }
        Ok(changes)
    }

    /// Commits the take-over: on SQLite as a savepoint of the next group commit, on PostgreSQL
    /// as one statement. True once committed; false if the row had moved on.
    async fn take_over(
        &self,
        seen: &SagaRecord,
        next: &mut SagaRecord,
        events: Vec<NewEvent>,
        now: i64,
    ) -> Result<bool, sqlx::Error> {
        match &self.inner.group {
            Some(group) => {
                let (seen, mut record) = (seen.clone(), next.clone());
                let taken = group
                    .run(move |conn| {
                        Box::pin(async move {
                            match log::take_over(conn, &seen, &mut record, &events, now).await {
                                Ok(true) => Ok(record),
                                Ok(false) => Err(None),
                                Err(error) => Err(Some(error)),
                            }
                        })
                    })
                    .await?;
                match taken {
                    Ok(record) => {
                        *next = record;
                        Ok(true)
                    }
                    Err(None) => Ok(false),
                    Err(Some(error)) => Err(error),
                }
            }
            None => {
                let mut conn = self.inner.log.pool.acquire().await?;
                log::take_over(&mut conn, seen, next, &events, now).await
            }
        }
    }
}
