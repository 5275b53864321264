//! Load shedding: a bound on the work in flight (`MAX_IN_FLIGHT`), so that a burst past what the
//! service can answer in time is refused at once instead of queueing until every request is late.
//!
//! Each counted request takes a slot (a semaphore permit) before anything else runs for it, or is
//! answered 503 `overloaded` with `Retry-After`: nothing was written for it, so a retry with the
//! same `Idempotency-Key` starts afresh. A request answered while the saga it started still runs
//! (`Prefer: respond-async`, a 202 after `ORDER_WAIT_MS`, a 201 whose saga is past its pivot but
//! still committing the stock, a cancel answered 202) hands its slot to that saga, which holds it
//! until it settles, is flagged stuck or this instance stops driving it: the bound is on work,
//! and the saga is the work (a stuck one waits on an outage or an operator). Health, readiness,
//! metrics, the event streams and the static files are never counted: an overloaded instance
//! still says it is alive, can be watched, and does not hold a slot for a stream's whole life.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use super::problem::Problem;
use super::route_of;
use crate::metrics::Metrics;
use crate::saga::Engine;

/// Route templates whose requests take no slot.
pub const UNCOUNTED: &[&str] = &[
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.yaml",
    "/orders/{id}/events",
    "/sagas/events",
    "/ui",
    "/ui/app.js",
    "/ui/app.css",
];

/// At most one warning per this long while shedding: the metric counts every refusal, and the log
/// must not grow with the very load it reports.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The slots, and what a slot handed to a saga waits on.
#[derive(Clone)]
pub struct Shed {
    slots: Arc<Semaphore>,
    max: usize,
    engine: Engine,
    metrics: Option<Arc<Metrics>>,
    /// Refusals since the start, for the warning.
    refused: Arc<AtomicU64>,
    /// When the last warning was logged, in ms after `started` (0: never).
    warned_at: Arc<AtomicU64>,
    started: Instant,
}

impl Shed {
    /// `max` slots (`MAX_IN_FLIGHT`); sagas handed a slot are watched through `engine`.
    pub fn new(max: usize, engine: Engine, metrics: Option<Arc<Metrics>>) -> Self {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            slots: Arc::new(Semaphore::new(max)),
            max,
            engine,
            metrics,
            refused: Arc::new(AtomicU64::new(0)),
            warned_at: Arc::new(AtomicU64::new(0)),
            started: Instant::now(),
        }
    }

    /// Counts a refusal, and says so in the log at most every [`WARN_EVERY`].
    fn refused(&self) {
        if let Some(metrics) = &self.metrics {
            metrics.http_shed.inc();
        }
        let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let now = (self.started.elapsed().as_millis() as u64).max(1);
        let last = self.warned_at.load(Ordering::Relaxed);
        let due = last == 0 || now - last.min(now) >= WARN_EVERY.as_millis() as u64;
        if due && self.warned_at.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            tracing::warn!(
                max_in_flight = self.max,
                refused_since_start = refused,
                "shedding load: MAX_IN_FLIGHT requests are in flight, answering 503 overloaded"
            );
        }
    }

    /// The slots taken now: counted requests running, and sagas holding a handed-over slot
    /// (`order_saga_http_in_flight`).
    pub fn in_flight(&self) -> usize {
        self.max - self.slots.available_permits()
    }
}

/// Set on a response (as an extension) by a handler that started a saga, or waits on one, with
/// the saga's id: if the saga has not settled when the answer goes, the request's slot goes to
/// it until it does.
#[derive(Debug, Clone)]
pub struct SagaInFlight(pub String);

/// The middleware: a slot for the request, or 503 `overloaded` without running it.
pub async fn limit_in_flight(State(shed): State<Shed>, request: Request, next: Next) -> Response {
    if UNCOUNTED.contains(&route_of(request.uri().path())) {
        return next.run(request).await;
    }
    let Ok(slot) = shed.slots.clone().try_acquire_owned() else {
        shed.refused();
        return Problem::overloaded().into_response();
    };
    let response = next.run(request).await;
    if let Some(SagaInFlight(saga_id)) = response.extensions().get::<SagaInFlight>() {
        shed.engine.hold_until_settled(saga_id, slot);
    }
    response
}
