//! The HTTP layer: routes, the tower-http middleware stack, and the shared state handlers use.
//! It knows the services, never SQL.

pub mod access;
pub mod early;
pub mod extract;
pub mod live;
pub mod orders;
pub mod problem;
pub mod products;
pub mod sagas;
pub mod shed;
pub mod ui;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tower_http::classify::ServerErrorsFailureClass;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnFailure, DefaultOnResponse, OnFailure, OnResponse, TraceLayer};

use crate::db::Db;
use crate::inventory::Inventory;
use crate::live::Live;
use crate::metrics::{DbLabels, HttpLabels, Metrics};
use crate::orders::Orders;
use crate::saga::Engine;
use crate::telemetry;
use problem::Problem;

/// The largest request body accepted.
pub const BODY_LIMIT: usize = crate::limits::BODY_BYTES;

/// The OpenAPI document, served at `/openapi.yaml`.
pub const OPENAPI_YAML: &str = include_str!("../../openapi.yaml");

/// Every route and its methods: the router is built from the same handlers, and the drift test
/// compares this list with `openapi.yaml`.
pub const ROUTES: &[(&str, &[&str])] = &[
    ("/products", &["get", "post"]),
    ("/products/{id}", &["get"]),
    ("/products/{id}/restock", &["post"]),
    ("/orders", &["get", "post"]),
    ("/orders/{id}", &["get"]),
    ("/orders/{id}/cancel", &["post"]),
    ("/orders/{id}/events", &["get"]),
    ("/sagas", &["get"]),
    ("/sagas/retry", &["post"]),
    // Before `/sagas/{id}`, which `route_of` would match first.
    ("/sagas/events", &["get"]),
    ("/sagas/{id}", &["get"]),
    ("/sagas/{id}/retry", &["post"]),
    ("/sagas/{id}/abort", &["post"]),
    ("/healthz", &["get"]),
    ("/readyz", &["get"]),
    ("/openapi.yaml", &["get"]),
    ("/metrics", &["get"]),
    ("/ui", &["get"]),
    ("/ui/app.js", &["get"]),
    ("/ui/app.css", &["get"]),
];

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// Places, cancels and reads orders.
    pub orders: Orders,
    /// Products and stock.
    pub inventory: Inventory,
    /// The saga engine, for `/sagas`.
    pub engine: Engine,
    /// Every configured database, for `/readyz` and the pool gauges: the log database first.
    pub databases: Vec<Db>,
    /// The metrics, unless `METRICS=false`.
    pub metrics: Option<Arc<Metrics>>,
    /// The live-progress hub behind the event streams.
    pub live: Live,
    /// Who may call: the token verifier (none with authentication off).
    pub access: access::Access,
    /// The slots of `MAX_IN_FLIGHT`.
    pub shed: shed::Shed,
}

/// HTTP settings.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Longest a request may take before a 503 `request_timeout`.
    pub request_timeout: Duration,
    /// Origins allowed to call from a browser; `*` allows any.
    pub cors_allow_origins: Vec<String>,
}

/// Builds the router with its middleware.
pub fn router(state: AppState, config: &HttpConfig) -> Router {
    let x_request_id = HeaderName::from_static("x-request-id");
    let timeout = config.request_timeout;
    Router::new()
        .route("/products", get(products::list).post(products::create))
        .route("/products/{id}", get(products::get))
        .route("/products/{id}/restock", post(products::restock))
        .route("/orders", get(orders::list).post(orders::place))
        .route("/orders/{id}", get(orders::get))
        .route("/orders/{id}/cancel", post(orders::cancel))
        .route("/sagas", get(sagas::list))
        .route("/sagas/retry", post(sagas::retry_matching))
        .route("/sagas/{id}", get(sagas::get))
        .route("/sagas/{id}/retry", post(sagas::retry))
        .route("/sagas/{id}/abort", post(sagas::abort))
        .route("/orders/{id}/events", get(live::order_events))
        .route("/sagas/events", get(live::saga_events))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.yaml", get(openapi))
        .route("/metrics", get(metrics))
        .route("/ui", get(ui::index))
        .route("/ui/app.js", get(ui::script))
        .route("/ui/app.css", get(ui::styles))
        .fallback(|| async { Problem::for_status(StatusCode::NOT_FOUND) })
        .with_state(state.clone())
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(RequestBodyLimitLayer::new(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(timeout, request_timeout))
        .layer(middleware::map_response(problem::problem_for_bare_errors))
        // Inside CORS, so that a browser can read a 401 / 403; outside the handlers' limits, so
        // that an unauthenticated caller's body is never parsed (only drained, by `early`).
        .layer(middleware::from_fn_with_state(state.access.clone(), access::authenticate))
        // Before the token is checked: an overloaded instance refuses with the least work. Inside
        // CORS (a browser can read the 503; preflights take no slot) and the request metrics.
        .layer(middleware::from_fn_with_state(state.shed.clone(), shed::limit_in_flight))
        .layer(middleware::from_fn_with_state(state.metrics, measure))
        .layer(cors(&config.cors_allow_origins))
        .layer(PropagateRequestIdLayer::new(x_request_id.clone()))
        .layer(middleware::map_response(traceparent))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_response(|response: &Response, latency: Duration, span: &tracing::Span| {
                    span.record("status", response.status().as_u16());
                    if response.status().is_server_error() {
                        span.record("otel.status_code", "error");
                    }
                    DefaultOnResponse::default().on_response(response, latency, span);
                })
                .on_failure(|class: ServerErrorsFailureClass, latency: Duration, span: &tracing::Span| {
                    // A 503 asks the client to come back: its cause is logged where it arises (a database
                    // not answering, a request timed out) or counted (overloaded), and a burst of them
                    // must not flood the log with errors while the service is busiest.
                    let level = match class {
                        ServerErrorsFailureClass::StatusCode(StatusCode::SERVICE_UNAVAILABLE) => tracing::Level::DEBUG,
                        _ => tracing::Level::ERROR,
                    };
                    DefaultOnFailure::new().level(level).on_failure(class, latency, span);
                }),
        )
        .layer(SetRequestIdLayer::new(x_request_id, MakeRequestUuid))
        // Outermost, so that it sees every answer, whichever layer gave it before the body was
        // read: it closes the connection after such an answer and drains the body's rest.
        .layer(middleware::from_fn(early::answer_early))
}

/// The span of one request, named by its method and route template, in the trace of the
/// client's `traceparent` if it sent a valid one (docs: README, "Traces").
fn request_span(request: &Request) -> tracing::Span {
    let id = request.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("");
    let method = known_method(request.method());
    let route = route_of(request.uri().path());
    let span = tracing::info_span!("request", otel.name = %format_args!("{method} {route}"), otel.kind = "server",
        otel.status_code = tracing::field::Empty, method, route, uri = %request.uri(), request_id = %id,
        status = tracing::field::Empty, trace_id = tracing::field::Empty);
    telemetry::continue_trace(&span, request.headers());
    span
}

/// Answers with the `traceparent` of the request's span, so that a client can find its
/// request's trace.
async fn traceparent(mut response: Response) -> Response {
    telemetry::inject(&tracing::Span::current(), response.headers_mut());
    response
}

fn cors(origins: &[String]) -> CorsLayer {
    let allow_origin = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    CorsLayer::new()
        .allow_origin(allow_origin)
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("idempotency-key"),
            HeaderName::from_static("prefer"),
            HeaderName::from_static("last-event-id"),
            HeaderName::from_static("traceparent"),
        ])
        .expose_headers([
            header::LOCATION,
            header::WWW_AUTHENTICATE,
            header::RETRY_AFTER,
            HeaderName::from_static("idempotent-replayed"),
            HeaderName::from_static("x-request-id"),
            HeaderName::from_static("traceparent"),
        ])
        .max_age(Duration::from_secs(600))
}

/// Answers 503 `request_timeout` when a request outlives `REQUEST_TIMEOUT_MS`. A saga the
/// request started keeps running in its own task.
async fn request_timeout(State(timeout): State<Duration>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(?timeout, "request timed out (REQUEST_TIMEOUT_MS)");
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "request_timeout",
                "the request took longer than REQUEST_TIMEOUT_MS",
            )
            .into_response()
        }
    }
}

/// `GET /healthz`: the process is up.
async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /readyz`: 200 when every database answers, else 503.
async fn readyz(State(state): State<AppState>) -> Response {
    for db in &state.databases {
        if !db.ping(Duration::from_secs(1)).await {
            return Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "database_unavailable",
                "a database is not answering",
            )
            .into_response();
        }
    }
    Json(json!({ "status": "ready" })).into_response()
}

/// `GET /openapi.yaml`: the API description.
async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI_YAML).into_response()
}

/// `GET /metrics`: every series in the Prometheus text format; 404 with `METRICS=false`.
async fn metrics(State(state): State<AppState>) -> Response {
    let Some(metrics) = &state.metrics else { return Problem::for_status(StatusCode::NOT_FOUND).into_response() };
    for (db, database) in state.databases.iter().zip(["log", "inventory"]) {
        let idle = db.pool.num_idle() as i64;
        let used = i64::from(db.pool.size()) - idle;
        metrics.db_connections.get_or_create(&DbLabels { database, state: "idle" }).set(idle);
        metrics.db_connections.get_or_create(&DbLabels { database, state: "used" }).set(used.max(0));
    }
    metrics.http_in_flight.set(state.shed.in_flight() as i64);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], metrics.encode()).into_response()
}

/// Times every request into `http_server_request_duration_seconds`, labelled by its route
/// template (never the raw path) and a method from a fixed list.
async fn measure(State(metrics): State<Option<Arc<Metrics>>>, request: Request, next: Next) -> Response {
    let Some(metrics) = metrics else { return next.run(request).await };
    let method = known_method(request.method());
    let route = route_of(request.uri().path());
    let began = Instant::now();
    let response = next.run(request).await;
    let labels = HttpLabels { method, route, status: response.status().as_u16() };
    metrics.http_duration.get_or_create(&labels).observe(began.elapsed().as_secs_f64());
    response
}

/// The method's name if the API knows it, else `other`.
fn known_method(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// The route template of [`ROUTES`] that `path` matches (`{...}` matches any one segment), or
/// `unmatched`.
pub fn route_of(path: &str) -> &'static str {
    let segments: Vec<&str> = path.split('/').collect();
    ROUTES
        .iter()
        .map(|(template, _)| *template)
        .find(|template| {
            let parts: Vec<&str> = template.split('/').collect();
            parts.len() == segments.len()
                && parts.iter().zip(&segments).all(|(p, s)| (p.starts_with('{') && !s.is_empty()) || p == s)
        })
        .unwrap_or("unmatched")
}

#[cfg(test)]
mod tests {
    use super::route_of;

    #[test]
    fn requests_are_labelled_by_their_route_template() {
        assert_eq!(route_of("/orders"), "/orders");
        assert_eq!(route_of("/orders/01a2/cancel"), "/orders/{id}/cancel");
        assert_eq!(route_of("/sagas/x"), "/sagas/{id}");
        assert_eq!(route_of("/orders/"), "unmatched");
        assert_eq!(route_of("/nope/1/2/3"), "unmatched");
        assert_eq!(route_of("/metrics"), "/metrics");
        assert_eq!(route_of("/sagas/events"), "/sagas/events");
        assert_eq!(route_of("/orders/x/events"), "/orders/{id}/events");
    }
}
