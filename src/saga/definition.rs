//! What a saga definition is: ordered steps, each an action and an optional compensation that run
//! as one local transaction in one participant's database, and which step is the pivot.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::{Map, Value};
use sqlx::AnyConnection;

/// The participant whose database holds the saga log. Steps in it commit their effect and their
/// log record in one transaction.
pub const LOG_PARTICIPANT: &str = "log";

/// What an action or compensation returns: the step's output (stored in the log) or an error.
pub type StepResult = Result<Value, StepError>;

/// The future an action returns; it borrows the transaction's connection and the context.
pub type StepFuture<'a> = Pin<Box<dyn Future<Output = StepResult> + Send + 'a>>;

/// An action or a compensation: one local transaction's worth of work on `conn`, which is
/// inside a transaction the engine begins and commits. It must be idempotent (design rule 3).
pub type StepFn = for<'a> fn(&'a mut AnyConnection, &'a StepContext) -> StepFuture<'a>;

/// Why a step failed, which decides what the engine does next (design rule 5).
#[derive(Debug, Clone, thiserror::Error)]
pub enum StepError {
    /// A business rule said no: the saga compensates (or, past the pivot, retries anyway).
    #[error("{code}: {detail}")]
    Permanent {
        /// Stable, machine-readable reason, such as `insufficient_stock`.
        code: String,
        /// What a person reads.
        detail: String,
        /// Extra fields the failure carries (for example the product that ran out).
        extra: Map<String, Value>,
    },
    /// Worth retrying: a lost connection, a timeout, a deadlock.
    #[error("{0}")]
    Transient(String),
}

impl StepError {
    /// A permanent failure with no extra fields.
    pub fn permanent(code: &str, detail: impl Into<String>) -> Self {
        StepError::Permanent { code: code.to_string(), detail: detail.into(), extra: Map::new() }
    }
}

impl From<sqlx::Error> for StepError {
    /// Every database error inside a step is retried: a business rule is a `Permanent` error
    /// the step returns itself, so anything else is either transient or a fault that retrying
    /// (and, before the pivot, the deadline) resolves.
    fn from(error: sqlx::Error) -> Self {
        StepError::Transient(error.to_string())
    }
}

/// What a running step may read: the saga's identity, its input and the outputs of earlier steps.
#[derive(Debug, Clone)]
pub struct StepContext {
    /// The saga's id: the key that makes every step's effect happen once.
    pub saga_id: String,
    /// The input the saga was started with (shared, not copied, per step).
    pub input: Arc<Value>,
    /// Outputs of the steps that succeeded so far, by step name.
    pub outputs: Map<String, Value>,
    /// Why the saga compensates (`{code, detail, ...}`), when it does.
    pub failure: Option<Value>,
}

impl StepContext {
    /// The stored output of the step called `step`, or `Null` if it has none.
    pub fn output(&self, step: &str) -> &Value {
        self.outputs.get(step).unwrap_or(&Value::Null)
    }
}

/// One step of a saga definition.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    /// Name shown in the log and the API; unique within the definition.
    pub name: &'static str,
    /// The participant whose database the step runs in.
    pub participant: &'static str,
    /// The forward transaction.
    pub action: StepFn,
    /// The backward transaction; `None` for the pivot and the steps after it.
    pub compensation: Option<StepFn>,
    /// After this step has succeeded the saga only goes forward.
    pub pivot: bool,
}

/// A saga definition: a kind, its version and its ordered steps.
#[derive(Debug, Clone)]
pub struct SagaDefinition {
    /// The kind, such as `place_order`.
    pub kind: &'static str,
    /// Recorded with each saga, so that an instance resumes only versions it knows.
    pub version: i64,
    /// The steps, in the order they run.
    pub steps: Vec<Step>,
}

impl SagaDefinition {
    /// Index of the pivot step, if the definition has one.
    pub fn pivot_index(&self) -> Option<usize> {
        self.steps.iter().position(|s| s.pivot)
    }

    /// True once the step at `current_step` is past the pivot: the saga can only go forward.
    pub fn past_pivot(&self, current_step: usize) -> bool {
        self.pivot_index().is_some_and(|p| current_step > p)
    }
}
