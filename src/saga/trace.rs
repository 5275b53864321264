//! The engine's spans: one per saga task (a child of the request that wrote the saga ahead, or
//! the root of a new trace when recovery resumed it) and one per step attempt, wherever the step
//! runs: alone in another participant's database, or batched with its neighbours in one log
//! transaction. Each attempt is timed into the step metrics at the same place.

use std::future::Future;
use std::time::Instant;

use serde_json::Value;
use tracing::field::Empty;
use tracing::{Instrument, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::coordinator::Inner;
use super::definition::{SagaDefinition, StepError};
use super::log::SagaRecord;
use super::state::Phase;
use crate::telemetry;

/// The span of the task that drives saga `id`: under the current span (the request's, at
/// launch), or a new trace's root when nothing is current (recovery).
pub(super) fn saga_span(id: &str, generation: i64, recovered: bool) -> Span {
    let span = tracing::info_span!("saga", saga_id = %id, generation, recovered, kind = Empty, trace_id = Empty);
    telemetry::record_trace_id(&span);
    span
}

/// Once the driver knows the saga's definition: its kind and correlation on the saga's span.
pub(super) fn saga_known(def: &SagaDefinition, saga: &SagaRecord) {
    let span = Span::current();
    span.record("kind", def.kind);
    correlate(&span, def, saga);
}

/// Runs `attempt`, attempt number `saga.attempts + 1` of `phase` of step `index`, inside its
/// own span, and times it into the step metrics.
pub(super) async fn attempt<F>(
    inner: &Inner,
    def: &SagaDefinition,
    saga: &SagaRecord,
    index: usize,
    phase: Phase,
    attempt: F,
) -> Result<Value, StepError>
where
    F: Future<Output = Result<Value, StepError>>,
{
    let span = attempt_span(def, saga, index, phase);
    let began = Instant::now();
    let ran = attempt.instrument(span.clone()).await;
    inner.step_took(def, &def.steps[index], phase, began.elapsed());
    ended(&span, ran.as_ref().err());
    ran
}

/// An attempt that an injected fault failed before it ran: its span, with the error.
pub(super) fn injected(def: &SagaDefinition, saga: &SagaRecord, index: usize, phase: Phase, error: &StepError) {
    ended(&attempt_span(def, saga, index, phase), Some(error));
}

fn attempt_span(def: &SagaDefinition, saga: &SagaRecord, index: usize, phase: Phase) -> Span {
    let step = def.steps[index].name;
    let span = tracing::info_span!("step", otel.name = step, otel.status_code = Empty, saga_id = %saga.id,
        kind = def.kind, step, phase = phase.as_str(), attempt = saga.attempts + 1, outcome = Empty, error = Empty);
    correlate(&span, def, saga);
    span
}

fn ended(span: &Span, error: Option<&StepError>) {
    match error {
        None => {
            span.record("outcome", "ok");
        }
        Some(error) => {
            let outcome = if matches!(error, StepError::Permanent { .. }) { "permanent" } else { "transient" };
            span.record("outcome", outcome);
            span.record("error", tracing::field::display(error));
            span.record("otel.status_code", "error");
        }
    }
}

/// The definition's correlation field of the input, if it has one, as an attribute of `span`.
fn correlate(span: &Span, def: &SagaDefinition, saga: &SagaRecord) {
    if let Some(field) = def.correlation {
        if let Some(value) = saga.input.get(field).and_then(Value::as_str) {
            span.set_attribute(field, value.to_string());
        }
    }
}
