//! The saga log as a state machine (docs/design.md, "The log"): the kinds of event a history
//! holds, the state of a saga and of its steps, and [`next`], the one pure function that gives
//! the next state from the current one and an event. The `sagas` row is what it computes: the
//! engine applies each event it writes with [`SagaRecord::apply`] and stores the result; an
//! illegal transition is an [`IllegalTransition`], never a silent change. An event kind this
//! build does not know (a newer release may write one) is kept and shown, and changes nothing.

use std::fmt;
use std::sync::Arc;

use serde_json::Value;

use super::log::SagaRecord;

/// Where a saga stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SagaState {
    /// Going forward through its steps.
    Running,
    /// Going backward through the compensations.
    Compensating,
    /// Every step succeeded.
    Completed,
    /// Every compensation succeeded.
    Compensated,
}

impl SagaState {
    /// Every state, in order.
    pub const ALL: [SagaState; 4] =
        [SagaState::Running, SagaState::Compensating, SagaState::Completed, SagaState::Compensated];

    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            SagaState::Running => "running",
            SagaState::Compensating => "compensating",
            SagaState::Completed => "completed",
            SagaState::Compensated => "compensated",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == s)
    }

    /// True for `completed` and `compensated`: nothing is left to do.
    pub fn is_final(self) -> bool {
        matches!(self, SagaState::Completed | SagaState::Compensated)
    }
}

impl fmt::Display for SagaState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where one step stands, as `GET /sagas/{id}` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepState {
    /// Not run yet.
    Pending,
    /// The saga's current step going forward (perhaps between failed attempts).
    Running,
    /// Its action succeeded.
    Succeeded,
    /// Its last attempt failed.
    Failed,
    /// Its compensation is the saga's current step going backward.
    Compensating,
    /// Its compensation succeeded.
    Compensated,
}

impl StepState {
    /// The displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Pending => "pending",
            StepState::Running => "running",
            StepState::Succeeded => "succeeded",
            StepState::Failed => "failed",
            StepState::Compensating => "compensating",
            StepState::Compensated => "compensated",
        }
    }

    /// The state a step's own event leaves it in; `None` for events that leave it as it was
    /// (`stuck`, and kinds this build does not know).
    pub fn after(kind: &EventKind) -> Option<StepState> {
        Some(match kind {
            EventKind::Succeeded => StepState::Succeeded,
            EventKind::Failed => StepState::Failed,
            EventKind::CompensationFailed => StepState::Compensating,
            EventKind::Compensated => StepState::Compensated,
            _ => return None,
        })
    }
}

/// What an event records, stored by name in `saga_events.event`. The same kind may concern a
/// step (`step` set) or the whole saga (`step` NULL): `compensated` is both.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The saga was written ahead (always event 0).
    Created,
    /// A step's action succeeded.
    Succeeded,
    /// An attempt of a step's action failed.
    Failed,
    /// A step has failed `STUCK_AFTER_ATTEMPTS` times in a row; the saga is flagged.
    Stuck,
    /// The saga turned backward (its detail: the failure as JSON).
    Compensating,
    /// An attempt of a step's compensation failed.
    CompensationFailed,
    /// A step's compensation succeeded, or (saga-level) the last one did.
    Compensated,
    /// Every step succeeded.
    Completed,
    /// An operator asked for the current step to be attempted now (detail: who and why).
    OperatorRetry,
    /// An operator aborted the saga (detail: who and why): before its pivot it turns backward.
    OperatorAbort,
    /// A kind this build does not know, kept as stored.
    Unknown(String),
}

impl EventKind {
    /// The kinds this build writes.
    pub const KNOWN: [EventKind; 10] = [
        EventKind::Created,
        EventKind::Succeeded,
        EventKind::Failed,
        EventKind::Stuck,
        EventKind::Compensating,
        EventKind::CompensationFailed,
        EventKind::Compensated,
        EventKind::Completed,
        EventKind::OperatorRetry,
        EventKind::OperatorAbort,
    ];

    /// The stored name.
    pub fn as_str(&self) -> &str {
        match self {
            EventKind::Created => "created",
            EventKind::Succeeded => "succeeded",
            EventKind::Failed => "failed",
            EventKind::Stuck => "stuck",
            EventKind::Compensating => "compensating",
            EventKind::CompensationFailed => "compensation_failed",
            EventKind::Compensated => "compensated",
            EventKind::Completed => "completed",
            EventKind::OperatorRetry => "operator_retry",
            EventKind::OperatorAbort => "operator_abort",
            EventKind::Unknown(name) => name,
        }
    }

    /// Reads a stored name; one this build does not know is kept as [`EventKind::Unknown`].
    pub fn parse(s: &str) -> Self {
        Self::KNOWN.into_iter().find(|k| k.as_str() == s).unwrap_or_else(|| EventKind::Unknown(s.to_string()))
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the transitions need to know of a definition: its steps' names, which of them have a
/// compensation, and the pivot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    names: Vec<&'static str>,
    compensable: Vec<bool>,
    pivot: Option<usize>,
}

impl Shape {
    /// The shape of steps `names`, `compensable[i]` saying whether step i has a compensation.
    pub fn new(names: Vec<&'static str>, compensable: Vec<bool>, pivot: Option<usize>) -> Self {
        assert_eq!(names.len(), compensable.len());
        Self { names, compensable, pivot }
    }

    /// How many steps.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// True for a definition without steps.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The pivot's index.
    pub fn pivot(&self) -> Option<usize> {
        self.pivot
    }

    /// The name of step `index`.
    pub fn name(&self, index: usize) -> &'static str {
        self.names[index]
    }

    /// The index of the step called `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| *n == name)
    }

    /// True once the step at `current_step` is past the pivot: the saga can only go forward.
    pub fn past_pivot(&self, current_step: usize) -> bool {
        self.pivot.is_some_and(|p| current_step > p)
    }

    /// True while a running saga at `current_step` may still turn backward: it has a step left
    /// and has not passed its pivot.
    pub fn abortable(&self, current_step: usize) -> bool {
        current_step < self.names.len() && !self.past_pivot(current_step)
    }

    /// How many steps a saga turning backward has to undo, counting from the front: every step
    /// before the pivot (all of them without one), whether or not it ran, since compensating a
    /// step that never took effect leaves a tombstone (docs/design.md, rule 3).
    fn undo_from(&self) -> usize {
        self.skip_uncompensated(self.pivot.unwrap_or(self.names.len()))
    }

    /// Moves a compensating position past the steps that have nothing to undo.
    pub fn skip_uncompensated(&self, mut left: usize) -> usize {
        while left > 0 && !self.compensable[left - 1] {
            left -= 1;
        }
        left
    }
}

/// The part of a saga's row that its events decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Where the saga stands.
    pub state: SagaState,
    /// Running: the next step to run. Compensating: how many steps are still to undo, so that
    /// step `current_step - 1` is the next compensation.
    pub current_step: usize,
    /// Failed attempts of the current step (or compensation).
    pub attempts: u32,
    /// Flagged once the current step has failed `STUCK_AFTER_ATTEMPTS` times.
    pub stuck: bool,
}

impl Position {
    /// A saga as its write-ahead leaves it: about to run step 0.
    pub const START: Position = Position { state: SagaState::Running, current_step: 0, attempts: 0, stuck: false };

    /// The step the saga works on next and in which direction, or `None` when it has only a
    /// saga-level event left to write (or is final).
    pub fn work(&self, shape: &Shape) -> Option<(usize, Phase)> {
        match self.state {
            SagaState::Running if self.current_step < shape.len() => Some((self.current_step, Phase::Action)),
            SagaState::Compensating if self.current_step > 0 => Some((self.current_step - 1, Phase::Compensation)),
            _ => None,
        }
    }

    /// The saga-level event that settles a saga with no step left, if that is where it stands.
    pub fn settling(&self, shape: &Shape) -> Option<EventKind> {
        match self.state {
            SagaState::Running if self.current_step == shape.len() => Some(EventKind::Completed),
            SagaState::Compensating if self.current_step == 0 => Some(EventKind::Compensated),
            _ => None,
        }
    }
}

/// Which half of a step runs: its action going forward, its compensation going backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// The forward transaction.
    Action,
    /// The backward transaction.
    Compensation,
}

impl Phase {
    /// The name metrics and logs use.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Action => "action",
            Phase::Compensation => "compensation",
        }
    }
}

/// What an event does: the saga's next position, and the state it leaves its step in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// The saga's position after the event.
    pub position: Position,
    /// The step the event concerns and its state after it.
    pub step: Option<(usize, StepState)>,
}

/// An event that cannot follow where the saga stands.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a {kind} event of step {step:?} cannot follow a saga {} at step {}", at.state, at.current_step)]
pub struct IllegalTransition {
    /// Where the saga stood.
    pub at: Position,
    /// The step the event named (its index).
    pub step: Option<usize>,
    /// The event.
    pub kind: EventKind,
}

/// The next position of a saga of `shape` that stands at `at` when an event of `kind` about
/// `step` (`None`: the saga itself) is recorded. Pure: no I/O, no clock.
pub fn next(
    shape: &Shape,
    at: Position,
    step: Option<usize>,
    kind: &EventKind,
) -> Result<Transition, IllegalTransition> {
    use EventKind as K;
    use SagaState as S;
    let illegal = || IllegalTransition { at, step, kind: kind.clone() };
    let current = at.work(shape).map(|(index, _)| index);
    let on_current = step.is_some() && step == current;
    let position = match (at.state, step, kind) {
        (_, _, K::Unknown(_)) => return Ok(Transition { position: at, step: None }),
        (S::Running, None, K::Created) if at == Position::START => at,
        (S::Running, Some(_), K::Succeeded) if on_current => {
            Position { state: S::Running, current_step: at.current_step + 1, attempts: 0, stuck: false }
        }
        (S::Running, Some(_), K::Failed) | (S::Compensating, Some(_), K::CompensationFailed) if on_current => {
            Position { attempts: at.attempts.saturating_add(1), ..at }
        }
        (S::Running | S::Compensating, Some(_), K::Stuck) if on_current => Position { stuck: true, ..at },
        (S::Running | S::Compensating, None, K::OperatorRetry) => at,
        (S::Running, None, K::OperatorAbort) if shape.abortable(at.current_step) => at,
        (S::Compensating, None, K::OperatorAbort) => at,
        (S::Running, None, K::Compensating) if shape.abortable(at.current_step) => {
            Position { state: S::Compensating, current_step: shape.undo_from(), attempts: 0, stuck: false }
        }
        (S::Compensating, Some(_), K::Compensated) if on_current => Position {
            state: S::Compensating,
            current_step: shape.skip_uncompensated(at.current_step - 1),
            attempts: 0,
            stuck: false,
        },
        (S::Running, None, K::Completed) | (S::Compensating, None, K::Compensated)
            if at.settling(shape).as_ref() == Some(kind) =>
        {
            let state = if *kind == K::Completed { S::Completed } else { S::Compensated };
            Position { state, attempts: 0, stuck: false, ..at }
        }
        _ => return Err(illegal()),
    };
    let step = step.and_then(|index| StepState::after(kind).map(|state| (index, state)));
    Ok(Transition { position, step })
}

/// An event the engine records, with the data it sets in the row beside the position.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Step `step`'s action succeeded with `output` (kept in the log: rule 6).
    Succeeded {
        /// The step.
        step: usize,
        /// Its output.
        output: Value,
    },
    /// An attempt of step `step`'s action failed with `error`.
    Failed {
        /// The step.
        step: usize,
        /// The error, as the history shows it.
        error: String,
        /// True when the attempt will be retried: the row keeps the error as its `last_error`.
        retried: bool,
    },
    /// Step `step` has failed `attempts` times: the saga is flagged stuck.
    Stuck {
        /// The step.
        step: usize,
        /// Its failed attempts so far.
        attempts: u32,
    },
    /// The saga turns backward because of `failure` (`{code, detail, ...}`).
    Compensating {
        /// Why.
        failure: Value,
    },
    /// An attempt of step `step`'s compensation failed with `error`.
    CompensationFailed {
        /// The step.
        step: usize,
        /// The error.
        error: String,
    },
    /// Step `step`'s compensation succeeded.
    Compensated {
        /// The step.
        step: usize,
    },
    /// The saga settles: completed or compensated, as its position says.
    Settled,
    /// An operator acted on the saga.
    Operator {
        /// What they asked for.
        action: OperatorAction,
        /// Who asked.
        actor: String,
        /// Why.
        reason: String,
    },
}

/// What an operator can ask of an unfinished saga (docs/design.md, "Operator actions").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OperatorAction {
    /// Attempt the current step (or compensation) now.
    Retry,
    /// Before the pivot, turn backward now.
    Abort,
}

impl OperatorAction {
    /// The name metrics use.
    pub fn as_str(self) -> &'static str {
        match self {
            OperatorAction::Retry => "retry",
            OperatorAction::Abort => "abort",
        }
    }

    /// The event kind it is recorded as.
    pub fn event(self) -> EventKind {
        match self {
            OperatorAction::Retry => EventKind::OperatorRetry,
            OperatorAction::Abort => EventKind::OperatorAbort,
        }
    }
}

impl Change {
    /// The step it concerns, the event kind it is stored as, and the event's detail, given the
    /// position `at` it is applied to.
    pub fn event(&self, at: &Position, shape: &Shape) -> (Option<usize>, EventKind, Option<String>) {
        match self {
            Change::Succeeded { step, .. } => (Some(*step), EventKind::Succeeded, None),
            Change::Failed { step, error, .. } => (Some(*step), EventKind::Failed, Some(error.clone())),
            Change::Stuck { step, attempts } => {
                (Some(*step), EventKind::Stuck, Some(format!("{attempts} failed attempts")))
            }
            Change::Compensating { failure } => (None, EventKind::Compensating, Some(failure.to_string())),
            Change::CompensationFailed { step, error } => {
                (Some(*step), EventKind::CompensationFailed, Some(error.clone()))
            }
            Change::Compensated { step } => (Some(*step), EventKind::Compensated, None),
            Change::Settled => (None, at.settling(shape).unwrap_or(EventKind::Completed), None),
            Change::Operator { action, actor, reason } => {
                let detail = serde_json::json!({ "actor": actor, "reason": reason }).to_string();
                (None, action.event(), Some(detail))
            }
        }
    }
}

impl SagaRecord {
    /// Where the row stands.
    pub fn position(&self) -> Position {
        Position {
            state: self.state,
            current_step: usize::try_from(self.current_step).unwrap_or(0),
            attempts: u32::try_from(self.attempts).unwrap_or(u32::MAX),
            stuck: self.stuck,
        }
    }

    /// Applies `change` through [`next`]: the row's position moves as the event says and its
    /// data (outputs, failure, last error) follow. Returns the event to store. On an illegal
    /// transition the row is left as it was.
    pub fn apply(
        &mut self,
        shape: &Shape,
        change: Change,
    ) -> Result<(Option<&'static str>, EventKind, Option<String>), IllegalTransition> {
        let at = self.position();
        let (step, kind, detail) = change.event(&at, shape);
        let position = next(shape, at, step, &kind)?.position;
        self.state = position.state;
        self.current_step = position.current_step as i64;
        self.attempts = i64::from(position.attempts);
        self.stuck = position.stuck;
        match change {
            Change::Succeeded { step, output } => {
                Arc::make_mut(&mut self.outputs).insert(shape.name(step).to_string(), output);
                self.last_error = None;
            }
            Change::Compensated { .. } => self.last_error = None,
            Change::Failed { error, retried: true, .. } | Change::CompensationFailed { error, .. } => {
                self.last_error = Some(error)
            }
            Change::Compensating { failure } => self.failure = Some(Arc::new(failure)),
            Change::Failed { retried: false, .. }
            | Change::Stuck { .. }
            | Change::Settled
            | Change::Operator { .. } => {}
        }
        Ok((step.map(|i| shape.name(i)), kind, detail))
    }
}

/// One step as `GET /sagas/{id}` shows it, folded from the saga's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepView {
    /// The step's name.
    pub name: String,
    /// Where it stands.
    pub state: StepState,
    /// Its attempts: succeeded and failed actions.
    pub attempts: usize,
    /// When its first event was written (ms).
    pub started_at: Option<i64>,
    /// When its last event was written, once it succeeded, failed or was compensated (ms).
    pub finished_at: Option<i64>,
    /// The detail of its last failed action or compensation.
    pub last_error: Option<String>,
}

/// Each step's view: `names` in order (the definition's, or those the history names when this
/// build does not know the definition), each step's state after its own last event
/// ([`StepState::after`]), and the row's current step marked running or compensating.
pub fn step_views(names: &[String], row: &Position, events: &[super::log::Event]) -> Vec<StepView> {
    names
        .iter()
        .enumerate()
        .map(|(index, name)| {
            let mine: Vec<&super::log::Event> = events.iter().filter(|e| e.step.as_deref() == Some(name)).collect();
            let folded = mine.iter().rev().find_map(|e| StepState::after(&e.kind));
            let current = row.current_step;
            let state = match (row.state, folded) {
                (SagaState::Compensating, folded)
                    if current >= 1 && current - 1 == index && folded != Some(StepState::Compensated) =>
                {
                    StepState::Compensating
                }
                (_, Some(state @ (StepState::Succeeded | StepState::Compensated | StepState::Compensating))) => state,
                (SagaState::Running, _) if current == index => StepState::Running,
                (_, Some(StepState::Failed)) => StepState::Failed,
                _ => StepState::Pending,
            };
            let finished = matches!(state, StepState::Succeeded | StepState::Failed | StepState::Compensated);
            StepView {
                name: name.clone(),
                state,
                attempts: mine.iter().filter(|e| matches!(e.kind, EventKind::Succeeded | EventKind::Failed)).count(),
                started_at: mine.first().map(|e| e.at),
                finished_at: if finished { mine.last().map(|e| e.at) } else { None },
                last_error: mine
                    .iter()
                    .rev()
                    .find(|e| matches!(e.kind, EventKind::Failed | EventKind::CompensationFailed))
                    .and_then(|e| e.detail.clone()),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use EventKind as K;
    use SagaState as S;

    /// place_order's shape: two compensable steps, the pivot, one step after it.
    fn shape() -> Shape {
        Shape::new(vec!["a", "b", "pivot", "d"], vec![true, true, false, false], Some(2))
    }

    fn at(state: SagaState, current_step: usize) -> Position {
        Position { state, current_step, attempts: 0, stuck: false }
    }

    fn go(at: Position, step: Option<usize>, kind: EventKind) -> Result<Position, IllegalTransition> {
        next(&shape(), at, step, &kind).map(|t| t.position)
    }

    #[test]
    fn forward_through_every_step_to_completed() {
        let mut p = go(Position::START, None, K::Created).unwrap();
        for step in 0..4 {
            let t = next(&shape(), p, Some(step), &K::Succeeded).unwrap();
            assert_eq!(t.step, Some((step, StepState::Succeeded)));
            p = t.position;
            assert_eq!(p, at(S::Running, step + 1));
        }
        assert_eq!(p.settling(&shape()), Some(K::Completed));
        assert_eq!(go(p, None, K::Completed).unwrap(), at(S::Completed, 4));
    }

    #[test]
    fn failed_attempts_count_and_stuck_flags_until_a_success_clears_them() {
        let p = go(at(S::Running, 1), Some(1), K::Failed).unwrap();
        assert_eq!(p.attempts, 1);
        let p = go(p, Some(1), K::Failed).unwrap();
        let p = go(p, Some(1), K::Stuck).unwrap();
        assert_eq!((p.attempts, p.stuck), (2, true));
        assert_eq!(go(p, Some(1), K::Succeeded).unwrap(), at(S::Running, 2));
    }

    #[test]
    fn turning_backward_undoes_every_step_before_the_pivot_last_to_first() {
        for from in 0..=2 {
            let p = go(at(S::Running, from), None, K::Compensating).unwrap();
            assert_eq!(p, at(S::Compensating, 2), "from step {from}");
        }
        let p = go(at(S::Compensating, 2), Some(1), K::CompensationFailed).unwrap();
        assert_eq!(p.attempts, 1);
        let p = go(p, Some(1), K::Stuck).unwrap();
        let p = go(p, Some(1), K::Compensated).unwrap();
        assert_eq!(p, at(S::Compensating, 1));
        let p = go(p, Some(0), K::Compensated).unwrap();
        assert_eq!(p, at(S::Compensating, 0));
        assert_eq!(go(p, None, K::Compensated).unwrap(), at(S::Compensated, 0));
    }

    #[test]
    fn steps_without_compensation_are_skipped_going_backward() {
        // a, b (no compensation), c (compensable), no pivot: turning back undoes c, then a.
        let shape = Shape::new(vec!["a", "b", "c"], vec![true, false, true], None);
        let p = next(&shape, at(S::Running, 1), None, &K::Compensating).unwrap().position;
        assert_eq!(p, at(S::Compensating, 3));
        let p = next(&shape, p, Some(2), &K::Compensated).unwrap().position;
        assert_eq!(p, at(S::Compensating, 1), "b is skipped");
        assert_eq!(p.work(&shape), Some((0, Phase::Compensation)));
        // Only non-compensable steps before the pivot: nothing to undo at all.
        let shape = Shape::new(vec!["cancel", "return"], vec![false, false], Some(0));
        let p = next(&shape, Position::START, None, &K::Compensating).unwrap().position;
        assert_eq!(p, at(S::Compensating, 0));
        assert_eq!(p.settling(&shape), Some(K::Compensated));
    }

    #[test]
    fn illegal_transitions_are_typed_errors() {
        let cases = [
            (at(S::Running, 1), Some(0), K::Succeeded),          // not the current step
            (at(S::Running, 1), Some(2), K::Failed),             // not the current step
            (at(S::Running, 3), None, K::Compensating),          // past the pivot
            (at(S::Running, 2), None, K::Completed),             // steps left
            (at(S::Running, 4), Some(3), K::Succeeded),          // no step left
            (at(S::Running, 0), Some(0), K::Compensated),        // not compensating
            (at(S::Running, 0), Some(0), K::CompensationFailed), // not compensating
            (at(S::Compensating, 2), Some(0), K::Compensated),   // not the next to undo
            (at(S::Compensating, 2), Some(1), K::Succeeded),     // going backward
            (at(S::Compensating, 1), None, K::Compensated),      // a step left to undo
            (at(S::Compensating, 2), None, K::Compensating),     // turned already
            (at(S::Completed, 4), Some(3), K::Succeeded),        // final
            (at(S::Completed, 4), None, K::Completed),           // final
            (at(S::Compensated, 0), None, K::Compensated),       // final
            (at(S::Running, 1), None, K::Created),               // only first
            (at(S::Running, 1), None, K::Succeeded),             // a step event without a step
            (at(S::Running, 1), Some(1), K::Created),            // a saga event with a step
        ];
        for (from, step, kind) in cases {
            let error = go(from, step, kind.clone()).expect_err(&format!("{kind} of {step:?} at {from:?}"));
            assert_eq!(error, IllegalTransition { at: from, step, kind });
        }
    }

    #[test]
    fn operator_events_change_no_position_and_abort_only_before_the_pivot() {
        for from in
            [at(S::Running, 1), Position { attempts: 3, stuck: true, ..at(S::Running, 3) }, at(S::Compensating, 2)]
        {
            assert_eq!(go(from, None, K::OperatorRetry).unwrap(), from);
        }
        for step in 0..=2 {
            assert_eq!(go(at(S::Running, step), None, K::OperatorAbort).unwrap(), at(S::Running, step));
        }
        assert_eq!(go(at(S::Compensating, 1), None, K::OperatorAbort).unwrap(), at(S::Compensating, 1));
        let refused = [
            (at(S::Running, 3), None, K::OperatorAbort),     // past the pivot
            (at(S::Running, 4), None, K::OperatorAbort),     // no step left
            (at(S::Completed, 4), None, K::OperatorRetry),   // final
            (at(S::Compensated, 0), None, K::OperatorAbort), // final
            (at(S::Running, 1), Some(1), K::OperatorRetry),  // a saga event with a step
        ];
        for (from, step, kind) in refused {
            assert!(go(from, step, kind.clone()).is_err(), "{kind} at {from:?}");
        }
    }

    #[test]
    fn an_unknown_event_kind_is_kept_and_changes_nothing() {
        let kind = EventKind::parse("operator_paused");
        assert_eq!(kind, K::Unknown("operator_paused".into()));
        assert_eq!(kind.as_str(), "operator_paused");
        for from in [at(S::Running, 1), at(S::Compensating, 2), at(S::Completed, 4)] {
            for step in [None, Some(1), Some(7)] {
                let t = next(&shape(), from, step, &kind).unwrap();
                assert_eq!(t, Transition { position: from, step: None });
            }
        }
    }

    #[test]
    fn every_known_kind_reads_back_as_itself() {
        for kind in EventKind::KNOWN {
            assert_eq!(EventKind::parse(kind.as_str()), kind);
        }
        for state in SagaState::ALL {
            assert_eq!(SagaState::parse(state.as_str()), Some(state));
        }
        assert_eq!(SagaState::parse("stuck"), None);
    }

    #[test]
    fn a_step_event_leaves_its_step_in_the_state_it_names() {
        let cases = [
            (K::Succeeded, Some(StepState::Succeeded)),
            (K::Failed, Some(StepState::Failed)),
            (K::CompensationFailed, Some(StepState::Compensating)),
            (K::Compensated, Some(StepState::Compensated)),
            (K::Stuck, None),
            (K::Unknown("x".into()), None),
        ];
        for (kind, state) in cases {
            assert_eq!(StepState::after(&kind), state, "{kind}");
        }
    }
}
