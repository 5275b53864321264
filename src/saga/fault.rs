//! Fault injection for tests: make a chosen step fail, run twice, lose the answer to its commit,
//! or "crash" the engine around it, through the engine itself rather than any HTTP backdoor. A
//! fault acts wherever the step runs: alone, or inside a batch of neighbouring steps that share
//! one transaction, exactly as production runs it.

use std::sync::Mutex;

use super::definition::StepError;
pub use super::state::Phase;

/// What happens to one attempt of a step.
#[derive(Debug, Clone)]
pub enum Fault {
    /// The attempt fails with this error; whatever its transaction did is rolled back.
    Fail(StepError),
    /// The step's work runs twice: in another participant's database its transaction commits
    /// twice (a retry after a lost answer); in the log database its action runs twice inside the
    /// transaction that records it.
    RunTwice,
    /// The engine stops driving the saga right before the step runs, as if the process died:
    /// inside a batch, the steps before it in the same transaction are rolled back with it.
    CrashBefore,
    /// The engine stops right after the transaction holding the step's effect commits, before
    /// anything else (in another participant's database: before the log records it).
    CrashAfter,
    /// The transaction that records the step in the log commits, but the engine is told it
    /// failed, as when a connection drops right after COMMIT: the driver must find out from the
    /// log where the saga stands.
    LoseAnswer,
}

/// Decides the fault, if any, for an attempt. Implemented by tests; production passes none.
pub trait FaultInjector: Send + Sync + 'static {
    /// The fault for attempt number `attempt` (1-based) of `step` of a saga of `kind`.
    fn fault(&self, kind: &str, step: &str, phase: Phase, attempt: u32) -> Option<Fault>;

    /// The fault for an attempt of saga `saga_id`, which the engine asks for: by default
    /// [`FaultInjector::fault`], whatever the saga. A test that aims faults at one saga among
    /// several overrides it (a driver fenced out by a take-over still makes one late attempt,
    /// which must not use up faults meant for another saga).
    fn fault_for(&self, saga_id: &str, kind: &str, step: &str, phase: Phase, attempt: u32) -> Option<Fault> {
        let _ = saga_id;
        self.fault(kind, step, phase, attempt)
    }
}

/// A list of planned faults, each used up after `times` matching attempts.
#[derive(Debug, Default)]
pub struct FaultPlan {
    faults: Mutex<Vec<Planned>>,
}

#[derive(Debug)]
struct Planned {
    kind: String,
    step: String,
    phase: Phase,
    fault: Fault,
    times: u32,
}

impl FaultPlan {
    /// An empty plan.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a fault for the next `times` attempts of `phase` of `kind`.`step`.
    pub fn add(&self, kind: &str, step: &str, phase: Phase, fault: Fault, times: u32) -> &Self {
        self.faults.lock().unwrap().push(Planned {
            kind: kind.to_string(),
            step: step.to_string(),
            phase,
            fault,
            times,
        });
        self
    }

    /// True once every planned fault has been used up.
    pub fn exhausted(&self) -> bool {
        self.faults.lock().unwrap().iter().all(|p| p.times == 0)
    }
}

impl FaultInjector for FaultPlan {
    fn fault(&self, kind: &str, step: &str, phase: Phase, _attempt: u32) -> Option<Fault> {
        let mut faults = self.faults.lock().unwrap();
        let planned =
            faults.iter_mut().find(|p| p.times > 0 && p.kind == kind && p.step == step && p.phase == phase)?;
        planned.times -= 1;
        Some(planned.fault.clone())
    }
}
