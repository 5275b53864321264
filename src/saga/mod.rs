//! The saga engine: generic over saga definitions, it knows nothing about orders.
//!
//! - [`definition`]: what a saga is (steps, actions, compensations, the pivot).
//! - [`log`]: the durable saga log and its fenced writes.
//! - [`engine`]: the coordinator that drives, retries, recovers and shuts down.
//! - [`fault`]: error, repetition and crash injection for tests.

pub mod definition;
pub mod engine;
pub mod fault;
pub mod log;

pub use definition::{LOG_PARTICIPANT, SagaDefinition, Step, StepContext, StepError, StepFuture, StepResult};
pub use engine::{Engine, EngineConfig, EngineError, WriteAhead};
pub use fault::{Fault, FaultInjector, FaultPlan, Phase};
pub use log::{Event, SagaFilter, SagaRecord, SagaState};
