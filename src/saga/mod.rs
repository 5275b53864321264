//! The saga engine: generic over saga definitions, it knows nothing about orders. How a saga
//! runs, and the rules each step obeys, are in docs/design.md.
//!
//! - [`definition`]: what a saga is: typed steps, actions, compensations, the pivot.
//! - [`state`]: the log as a state machine: event kinds, saga and step states, transitions.
//! - [`log`]: the log's storage: `sagas` rows and `saga_events`, fenced writes, claims.
//! - [`coordinator`]: the [`Engine`] handle: write-ahead and launch, waiting, queries.
//! - [`control`]: operator actions (retry, abort), each a take-over fenced by the generation.
//! - [`recovery`]: the recovery loop, the lease heartbeat, kill and graceful shutdown.
//! - [`driver`]: one saga's task: forward and backward moves, steps in other participants,
//!   failures, retries with backoff, resyncing from the log.
//! - [`batch`]: the driver's transactions in the log database, where neighbouring steps and
//!   their records commit together.
//! - [`trace`]: the spans of a saga's task and of each step attempt.
//! - [`fault`]: error, repetition, lost-answer and crash injection for tests.

mod batch;
pub mod control;
pub mod coordinator;
pub mod definition;
mod driver;
pub mod fault;
pub mod log;
mod recovery;
pub mod state;
mod trace;

pub use control::{ABORTED, ControlError, MAX_BULK, Operator};
pub use coordinator::{Engine, EngineConfig, EngineError, StartError, WriteAhead};
pub use definition::{
    Action, Ctx, DEADLINE_EXCEEDED, LOG_PARTICIPANT, SagaDefinition, SagaKind, Step, StepContext, StepError,
    StepFuture, StepKey,
};
pub use driver::Halt;
pub use fault::{Fault, FaultInjector, FaultPlan, Phase};
pub use log::{Event, SagaFilter, SagaRecord};
pub use state::{EventKind, IllegalTransition, OperatorAction, SagaState, StepState, StepView};
