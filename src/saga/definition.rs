//! What a saga definition is: ordered steps, each an action and an optional compensation that run
//! as one local transaction in one participant's database, and which step is the pivot. Steps
//! are plain async functions with a typed input and output; [`SagaDefinition::of`] erases the
//! types so that the engine drives every definition alike.

use std::borrow::Cow;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use sqlx::AnyConnection;

use super::state::Shape;

/// The participant whose database holds the saga log. Steps in it commit their effect and their
/// log record in one transaction (docs/design.md, "Rules every step obeys", rule 4).
pub const LOG_PARTICIPANT: &str = "log";

/// The failure code the engine gives a saga that did not reach its pivot within its deadline.
pub const DEADLINE_EXCEEDED: &str = "deadline_exceeded";

/// The future of an erased step: it borrows the transaction's connection and the context.
pub type StepFuture<'a> = Pin<Box<dyn Future<Output = Result<Value, StepError>> + Send + 'a>>;

/// An action or a compensation with its types erased: one local transaction's worth of work on
/// `conn`, inside a transaction the engine begins and commits, returning the step's output as
/// the log stores it. It must be idempotent (docs/design.md, rule 3).
pub type StepFn = Arc<dyn for<'a> Fn(&'a mut AnyConnection, &'a StepContext) -> StepFuture<'a> + Send + Sync>;

/// Why a step failed, which decides what the engine does next (docs/design.md, rule 5).
#[derive(Debug, Clone, thiserror::Error)]
pub enum StepError {
    /// A business rule said no: the saga compensates (or, past the pivot, retries anyway).
    #[error("{code}: {detail}")]
    Permanent {
        /// Stable, machine-readable reason, such as `insufficient_stock`.
        code: Cow<'static, str>,
        /// What a person reads.
        detail: String,
        /// Extra fields the failure carries (for example the product that ran out).
        extra: Map<String, Value>,
    },
    /// Worth retrying: a lost connection, a timeout, a deadlock.
    #[error("{message}")]
    Transient {
        /// What went wrong, as the log records it.
        message: String,
        /// The database error behind it, if one is.
        #[source]
        source: Option<Arc<sqlx::Error>>,
    },
}

impl StepError {
    /// A permanent failure with no extra fields.
    pub fn permanent(code: impl Into<Cow<'static, str>>, detail: impl Into<String>) -> Self {
        StepError::Permanent { code: code.into(), detail: detail.into(), extra: Map::new() }
    }

    /// A transient failure that no other error caused.
    pub fn transient(message: impl Into<String>) -> Self {
        StepError::Transient { message: message.into(), source: None }
    }
}

impl From<sqlx::Error> for StepError {
    /// Every database error inside a step is retried: a business rule is a `Permanent` error
    /// the step returns itself, so anything else is either transient or a fault that retrying
    /// (and, before the pivot, the deadline) resolves.
    fn from(error: sqlx::Error) -> Self {
        StepError::Transient { message: error.to_string(), source: Some(Arc::new(error)) }
    }
}

/// What a running step may read, as the engine holds it: the saga's identity, its input and the
/// outputs of earlier steps, untyped. Typed steps see it through [`Ctx`].
#[derive(Debug, Clone)]
pub struct StepContext {
    /// The saga's id: the key that makes every step's effect happen once.
    pub saga_id: String,
    /// The input the saga was started with (shared, not copied, per step).
    pub input: Arc<Value>,
    /// Outputs of the steps that succeeded so far, by step name.
    pub outputs: Arc<Map<String, Value>>,
    /// Why the saga compensates (`{code, detail, ...}`), when it does.
    pub failure: Option<Arc<Value>>,
}

/// The name of a step whose action outputs an `O`: later steps read that output through it,
/// typed (docs/design.md, rule 6: outputs later steps need are kept in the log).
#[derive(Debug)]
pub struct StepKey<O> {
    /// The step's name in the log and the API; unique within its definition.
    pub name: &'static str,
    output: PhantomData<fn() -> O>,
}

impl<O> Clone for StepKey<O> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<O> Copy for StepKey<O> {}

impl<O> StepKey<O> {
    /// The key of the step called `name`.
    pub const fn new(name: &'static str) -> Self {
        Self { name, output: PhantomData }
    }
}

impl<O: DeserializeOwned> StepKey<O> {
    /// This step's output among a saga's stored `outputs`; an error if it is missing or does
    /// not read as an `O` (a bug, so it is retried rather than compensated).
    pub fn read(&self, outputs: &Map<String, Value>) -> Result<O, StepError> {
        let value =
            outputs.get(self.name).ok_or_else(|| StepError::transient(format!("no output of {}", self.name)))?;
        O::deserialize(value).map_err(|e| StepError::transient(format!("malformed output of {}: {e}", self.name)))
    }
}

/// The kind of a saga whose input is an `I`.
#[derive(Debug)]
pub struct SagaKind<I> {
    /// The kind's name, such as `place_order`, stored with every saga.
    pub name: &'static str,
    input: PhantomData<fn() -> I>,
}

impl<I> Clone for SagaKind<I> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<I> Copy for SagaKind<I> {}

impl<I> SagaKind<I> {
    /// The kind called `name`.
    pub const fn new(name: &'static str) -> Self {
        Self { name, input: PhantomData }
    }
}

/// What a typed step reads: its saga's id, its input, and the outputs of earlier steps.
#[derive(Debug)]
pub struct Ctx<'a, I> {
    /// The saga's id: the key that makes the step's effect happen once.
    pub saga_id: &'a str,
    /// The saga's input.
    pub input: &'a I,
    raw: &'a StepContext,
}

impl<I> Clone for Ctx<'_, I> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<I> Copy for Ctx<'_, I> {}

impl<I> Ctx<'_, I> {
    /// The output of an earlier step.
    pub fn output<O: DeserializeOwned>(&self, step: StepKey<O>) -> Result<O, StepError> {
        step.read(&self.raw.outputs)
    }

    /// Why the saga compensates (`{code, detail, ...}`), in a compensation.
    pub fn failure(&self) -> Option<&Value> {
        self.raw.failure.as_deref()
    }
}

/// An async function usable as a step: `async fn(&mut AnyConnection, Ctx<'_, I>) -> Result<O,
/// StepError>`. Implemented for every such function; the trait only names its future.
pub trait Action<'a, I: 'a, O>: Fn(&'a mut AnyConnection, Ctx<'a, I>) -> Self::Fut {
    /// The function's future.
    type Fut: Future<Output = Result<O, StepError>> + Send + 'a;
}

impl<'a, I: 'a, O, F, Fut> Action<'a, I, O> for F
where
    F: Fn(&'a mut AnyConnection, Ctx<'a, I>) -> Fut,
    Fut: Future<Output = Result<O, StepError>> + Send + 'a,
{
    type Fut = Fut;
}

/// Erases a typed step: parses the input, runs `f`, stores its output as JSON.
fn erase<I, O, F>(f: F) -> StepFn
where
    I: DeserializeOwned + Send + Sync + 'static,
    O: Serialize + 'static,
    F: for<'a> Action<'a, I, O> + Copy + Send + Sync + 'static,
{
    Arc::new(move |conn, raw| {
        Box::pin(async move {
            // A malformed input is a bug, not a business rule: retried (and flagged stuck).
            let input =
                I::deserialize(&*raw.input).map_err(|e| StepError::transient(format!("malformed saga input: {e}")))?;
            let output = f(conn, Ctx { saga_id: &raw.saga_id, input: &input, raw }).await?;
            serde_json::to_value(output).map_err(|e| StepError::transient(format!("unstorable step output: {e}")))
        })
    })
}

/// One step of a saga definition.
#[derive(Clone)]
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

impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Step")
            .field("name", &self.name)
            .field("participant", &self.participant)
            .field("compensable", &self.compensation.is_some())
            .field("pivot", &self.pivot)
            .finish()
    }
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
    /// A top-level field of the input that names what the saga is about to the outside (such
    /// as `order_id`): the saga's spans carry its value under the same name.
    pub correlation: Option<&'static str>,
    shape: Shape,
}

impl SagaDefinition {
    /// Starts a definition of `kind` at `version`; add its steps in order.
    pub fn of<I>(kind: SagaKind<I>, version: i64) -> Steps<I> {
        Steps { kind: kind.name, version, steps: Vec::new(), correlation: None, input: PhantomData }
    }

    /// What the log's transitions need to know of the definition.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// Index of the pivot step, if the definition has one.
    pub fn pivot_index(&self) -> Option<usize> {
        self.shape.pivot()
    }
}

/// A definition being built: [`SagaDefinition::of`], then each step in order, then
/// [`Steps::build`]. Every step's action and compensation take the same input type `I`.
pub struct Steps<I> {
    kind: &'static str,
    version: i64,
    steps: Vec<Step>,
    correlation: Option<&'static str>,
    input: PhantomData<fn() -> I>,
}

impl<I: DeserializeOwned + Send + Sync + 'static> Steps<I> {
    /// Adds a step called `key.name`, running `action` in `participant`'s database.
    pub fn step<O, F>(mut self, key: StepKey<O>, participant: &'static str, action: F) -> Self
    where
        O: Serialize + 'static,
        F: for<'a> Action<'a, I, O> + Copy + Send + Sync + 'static,
    {
        assert!(self.steps.iter().all(|s| s.name != key.name), "step {} is defined twice", key.name);
        self.steps.push(Step { name: key.name, participant, action: erase(action), compensation: None, pivot: false });
        self
    }

    /// Gives the step added last its compensation, which runs in the same database.
    pub fn compensated_by<F>(mut self, compensation: F) -> Self
    where
        F: for<'a> Action<'a, I, ()> + Copy + Send + Sync + 'static,
    {
        self.steps.last_mut().expect("a step to compensate").compensation = Some(erase(compensation));
        self
    }

    /// Names the input's top-level string field whose value the saga's spans carry, under the
    /// field's own name, so that a trace can be found by it (see
    /// [`SagaDefinition::correlation`]).
    pub fn correlated_by(mut self, field: &'static str) -> Self {
        self.correlation = Some(field);
        self
    }

    /// Makes the step added last the pivot: once it has succeeded the saga only goes forward.
    pub fn pivot(mut self) -> Self {
        assert!(self.steps.iter().all(|s| !s.pivot), "a definition has one pivot");
        self.steps.last_mut().expect("a step to be the pivot").pivot = true;
        self
    }

    /// The definition.
    pub fn build(self) -> SagaDefinition {
        let pivot = self.steps.iter().position(|s| s.pivot);
        if let Some(pivot) = pivot {
            assert!(
                self.steps[pivot..].iter().all(|s| s.compensation.is_none()),
                "the pivot and the steps after it have no compensation"
            );
        }
        let shape = Shape::new(
            self.steps.iter().map(|s| s.name).collect(),
            self.steps.iter().map(|s| s.compensation.is_some()).collect(),
            pivot,
        );
        SagaDefinition {
            kind: self.kind,
            version: self.version,
            steps: self.steps,
            correlation: self.correlation,
            shape,
        }
    }
}
