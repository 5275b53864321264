//! Fault injection for tests: make a chosen step fail, run twice, or "crash" the engine around it,
//! through the engine itself rather than any HTTP backdoor.

use std::sync::Mutex;

use super::definition::StepError;

/// Which half of a step a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The forward transaction.
    Action,
    /// The backward transaction.
    Compensation,
}

/// What happens to one attempt of a step.
#[derive(Debug, Clone)]
pub enum Fault {
    /// The attempt fails with this error without touching any database.
    Fail(StepError),
    /// The step's transaction runs and commits twice, as a retry after a lost answer would.
    RunTwice,
    /// The engine stops driving the saga before the attempt, as if the process died.
    CrashBefore,
    /// The engine stops right after the step's own transaction commits, before anything else
    /// (in another participant's database, before its log record).
    CrashAfter,
}

/// Decides the fault, if any, for an attempt. Implemented by tests; production passes none.
pub trait FaultInjector: Send + Sync + 'static {
    /// The fault for attempt number `attempt` (1-based) of `step` of a saga of `kind`.
    fn fault(&self, kind: &str, step: &str, phase: Phase, attempt: u32) -> Option<Fault>;
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
