//! The service's metrics in the Prometheus text format (`GET /metrics`), on one registry per
//! app. Every label value comes from a fixed set (saga kinds, step names, phases, outcomes, route
//! templates, methods, statuses), never from an id, so hostile requests cannot grow the series.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a saga-level series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// The saga's kind.
    pub kind: &'static str,
}

/// Labels of a finished saga.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// The saga's kind.
    pub kind: &'static str,
    /// `completed` or `compensated`.
    pub outcome: &'static str,
}

/// Labels of a step attempt.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    /// The saga's kind.
    pub kind: &'static str,
    /// The step's name.
    pub step: &'static str,
    /// `action` or `compensation`.
    pub phase: &'static str,
}

/// Labels of a failed step attempt.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// The saga's kind.
    pub kind: &'static str,
    /// The step's name.
    pub step: &'static str,
    /// `action` or `compensation`.
    pub phase: &'static str,
    /// `transient` or `permanent`.
    pub error: &'static str,
}

/// Labels of an operator action.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    /// `retry` or `abort`.
    pub action: &'static str,
}

/// Labels of an HTTP request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// The method, or `other` for one the API does not know.
    pub method: &'static str,
    /// The matched route template (`/orders/{id}`), or `unmatched`.
    pub route: &'static str,
    /// The answer's status code.
    pub status: u16,
}

/// Labels of a pool's connections.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DbLabels {
    /// `log` (orders and the saga log) or `inventory`.
    pub database: &'static str,
    /// `idle` or `used`.
    pub state: &'static str,
}

type Timings<L> = Family<L, Histogram, fn() -> Histogram>;

/// Buckets from half a millisecond to about 16 seconds.
fn timing() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Labels of the live-progress subscriber gauge.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    /// `order` (`GET /orders/{id}/events`) or `feed` (`GET /sagas/events`).
    pub stream: &'static str,
}

/// Every series the service exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Sagas this instance wrote ahead.
    pub sagas_started: Family<KindLabels, Counter>,
    /// Sagas whose final event this instance wrote.
    pub sagas_finished: Family<OutcomeLabels, Counter>,
    /// Unfinished sagas in the log (all instances), refreshed every few seconds.
    pub sagas_in_flight: Family<KindLabels, Gauge>,
    /// Stuck sagas in the log (all instances), refreshed every few seconds.
    pub sagas_stuck: Family<KindLabels, Gauge>,
    /// How long each step attempt's work took, batched or alone.
    pub step_duration: Timings<StepLabels>,
    /// Failed step attempts.
    pub step_failures: Family<FailureLabels, Counter>,
    /// Sagas this instance claimed after their lease expired.
    pub sagas_recovered: Family<KindLabels, Counter>,
    /// Operator actions taken through this instance.
    pub operator_actions: Family<ActionLabels, Counter>,
    /// HTTP requests by method, route template and status.
    pub http_duration: Timings<HttpLabels>,
    /// Each pool's connections, read at scrape time.
    pub db_connections: Family<DbLabels, Gauge>,
    /// Statements the live-progress poller ran.
    pub live_poll_queries: Counter,
    /// Open live-progress streams on this instance.
    pub live_subscribers: Family<StreamLabels, Gauge>,
    /// Requests answered 503 `overloaded` because `MAX_IN_FLIGHT` were in flight.
    pub http_shed: Counter,
    /// Slots of `MAX_IN_FLIGHT` taken, read at scrape time.
    pub http_in_flight: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every series registered, all at zero.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let sagas_started = Family::default();
        let sagas_finished = Family::default();
        let sagas_in_flight = Family::default();
        let sagas_stuck = Family::default();
        let step_duration: Timings<StepLabels> = Family::new_with_constructor(timing);
        let step_failures = Family::default();
        let sagas_recovered = Family::default();
        let operator_actions: Family<ActionLabels, Counter> = Family::default();
        // Shown at zero from the start, so that a dashboard finds them before the first action.
        for action in ["retry", "abort"] {
            operator_actions.get_or_create(&ActionLabels { action }).inc_by(0);
        }
        let http_duration: Timings<HttpLabels> = Family::new_with_constructor(timing);
        let db_connections = Family::default();
        // Counters get their `_total` suffix from the registry.
        registry.register("order_saga_sagas_started", "Sagas this instance wrote ahead", sagas_started.clone());
        registry.register(
            "order_saga_sagas_finished",
            "Sagas this instance finished (wrote the final event of)",
            sagas_finished.clone(),
        );
        registry.register(
            "order_saga_sagas_in_flight",
            "Unfinished sagas in the log, across instances (aggregate with max)",
            sagas_in_flight.clone(),
        );
        registry.register(
            "order_saga_sagas_stuck",
            "Stuck sagas in the log, across instances (aggregate with max)",
            sagas_stuck.clone(),
        );
        registry.register(
            "order_saga_step_duration_seconds",
            "Duration of each step attempt's work",
            step_duration.clone(),
        );
        registry.register("order_saga_step_failures", "Failed step attempts", step_failures.clone());
        registry.register(
            "order_saga_sagas_recovered",
            "Sagas this instance claimed after their lease expired",
            sagas_recovered.clone(),
        );
        registry.register("order_saga_operator_actions", "Operator actions taken", operator_actions.clone());
        registry.register(
            "http_server_request_duration_seconds",
            "HTTP requests by method, route template and status",
            http_duration.clone(),
        );
        registry.register("order_saga_db_connections", "Database pool connections", db_connections.clone());
        let live_poll_queries = Counter::default();
        registry.register(
            "order_saga_live_poll_queries",
            "Statements the live-progress poller ran",
            live_poll_queries.clone(),
        );
        let live_subscribers: Family<StreamLabels, Gauge> = Family::default();
        for stream in ["order", "feed"] {
            live_subscribers.get_or_create(&StreamLabels { stream }).set(0);
        }
        registry.register("order_saga_live_subscribers", "Open live-progress streams", live_subscribers.clone());
        let http_shed = Counter::default();
        registry.register(
            "order_saga_http_shed",
            "Requests answered 503 overloaded because MAX_IN_FLIGHT were in flight",
            http_shed.clone(),
        );
        let http_in_flight = Gauge::default();
        registry.register(
            "order_saga_http_in_flight",
            "Requests and sagas holding a slot of MAX_IN_FLIGHT, at scrape time",
            http_in_flight.clone(),
        );
        Self {
            registry,
            sagas_started,
            sagas_finished,
            sagas_in_flight,
            sagas_stuck,
            step_duration,
            step_failures,
            sagas_recovered,
            operator_actions,
            http_duration,
            db_connections,
            live_poll_queries,
            live_subscribers,
            http_shed,
            http_in_flight,
        }
    }

    /// Records one step attempt's work.
    pub fn step_took(&self, kind: &'static str, step: &'static str, phase: &'static str, took: Duration) {
        self.step_duration.get_or_create(&StepLabels { kind, step, phase }).observe(took.as_secs_f64());
    }

    /// The scrape: every series in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}
