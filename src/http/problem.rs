//! RFC 9457 problem details: the one place where errors become HTTP responses, each with a
//! stable `code`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::error::{Error, FailureCode, FieldError};
use crate::saga::ControlError;

/// The media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// An error answer: status, stable code, human text and extra top-level members.
#[derive(Debug)]
pub struct Problem {
    /// The HTTP status.
    pub status: StatusCode,
    /// The stable machine-readable code.
    pub code: &'static str,
    /// What a person reads.
    pub detail: String,
    /// Extra members, such as `errors` or `order_id`.
    pub extra: Map<String, Value>,
}

impl Problem {
    /// A problem with no extra members.
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self { status, code, detail: detail.into(), extra: Map::new() }
    }

    /// Adds a top-level member.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extra.insert(key.to_string(), value.into());
        self
    }

    /// 422 `validation_failed` listing each bad field.
    pub fn validation(errors: Vec<FieldError>) -> Self {
        let detail = errors.iter().map(|e| format!("{}: {}", e.field, e.message)).collect::<Vec<_>>().join("; ");
        Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed", detail)
            .with("errors", serde_json::to_value(errors).unwrap_or_default())
    }

    /// The answer to an order its saga rejected with `code`: its status and the code answered.
    pub fn rejected(code: &FailureCode, detail: impl Into<String>) -> Self {
        let (status, code) = match code {
            FailureCode::InsufficientStock => (StatusCode::CONFLICT, "insufficient_stock"),
            FailureCode::UnknownProduct => (StatusCode::UNPROCESSABLE_ENTITY, "unknown_product"),
            FailureCode::ValidationFailed => (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
            FailureCode::DeadlineExceeded => (StatusCode::CONFLICT, "deadline_exceeded"),
            FailureCode::Aborted => (StatusCode::CONFLICT, "aborted"),
            FailureCode::OrderNotPending | FailureCode::OrderNotCancellable | FailureCode::Other(_) => {
                (StatusCode::CONFLICT, "order_rejected")
            }
        };
        Problem::new(status, code, detail)
    }

    /// 503 `overloaded`: `MAX_IN_FLIGHT` requests are in flight, so this one was refused before
    /// anything was done for it; retrying it after `Retry-After` is safe.
    pub fn overloaded() -> Self {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "too many requests are in flight (MAX_IN_FLIGHT); nothing was done for this one, retry after Retry-After",
        )
    }

    /// The problem for a bare error status that no handler described (from axum or tower-http).
    pub fn for_status(status: StatusCode) -> Self {
        let (code, detail) = match status {
            StatusCode::NOT_FOUND => ("not_found", "no resource at this path"),
            StatusCode::METHOD_NOT_ALLOWED => ("method_not_allowed", "this method is not allowed on this path"),
            StatusCode::PAYLOAD_TOO_LARGE => ("payload_too_large", "the request body is larger than 1 MiB"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ("unsupported_media_type", "send Content-Type: application/json"),
            StatusCode::REQUEST_TIMEOUT => ("request_timeout", "the request took too long"),
            StatusCode::BAD_REQUEST => ("bad_request", "the request is malformed"),
            s if s.is_server_error() => ("internal_error", "an unexpected error occurred"),
            _ => ("http_error", "the request failed"),
        };
        Problem::new(status, code, detail)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut body = Map::new();
        body.insert("type".into(), json!(format!("urn:order-saga:problem:{}", self.code)));
        body.insert("title".into(), json!(self.status.canonical_reason().unwrap_or("Error")));
        body.insert("status".into(), json!(self.status.as_u16()));
        body.insert("detail".into(), json!(self.detail));
        body.insert("code".into(), json!(self.code));
        body.extend(self.extra);
        let mut response = (self.status, Value::Object(body).to_string()).into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<Error> for Problem {
    fn from(error: Error) -> Self {
        match error {
            Error::NotFound(what) => Problem::new(StatusCode::NOT_FOUND, "not_found", format!("{what} not found")),
            Error::ProductExists(id) => {
                Problem::new(StatusCode::CONFLICT, "product_exists", format!("product {id:?} already exists"))
            }
            Error::Validation(errors) => Problem::validation(errors),
            e @ Error::IdempotencyKeyReused => {
                Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused", e.to_string())
            }
            Error::InvalidLastEventId(detail) => {
                Problem::new(StatusCode::BAD_REQUEST, "invalid_last_event_id", format!("Last-Event-ID: {detail}"))
            }
            e @ Error::OrderNotCancellable { .. } => {
                Problem::new(StatusCode::CONFLICT, "order_not_cancellable", e.to_string())
            }
            e @ Error::CancelAttemptsExhausted { .. } => {
                Problem::new(StatusCode::CONFLICT, "cancel_attempts_exhausted", e.to_string())
            }
            Error::Unavailable(source) => {
                tracing::warn!(error = &source as &dyn std::error::Error, "database unavailable");
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "database_unavailable",
                    "a database is not answering; retry shortly",
                )
            }
            Error::Control(error) => Problem::from(error),
            e @ (Error::Database(_) | Error::Engine(_) | Error::Task(_) | Error::Internal(_)) => {
                tracing::error!(error = &e as &dyn std::error::Error, "internal error");
                Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", "an unexpected error occurred")
            }
        }
    }
}

impl From<ControlError> for Problem {
    fn from(error: ControlError) -> Self {
        let detail = error.to_string();
        match error {
            ControlError::NotFound(_) => Problem::new(StatusCode::NOT_FOUND, "not_found", detail),
            ControlError::Finished(state) => {
                Problem::new(StatusCode::CONFLICT, "saga_finished", detail).with("state", state.as_str())
            }
            ControlError::PastPivot => Problem::new(StatusCode::CONFLICT, "saga_past_pivot", detail),
            ControlError::UnknownDefinition { .. } => {
                Problem::new(StatusCode::CONFLICT, "saga_definition_unknown", detail)
            }
            ControlError::Busy => Problem::new(StatusCode::SERVICE_UNAVAILABLE, "saga_busy", detail),
            ControlError::Db(source) => Problem::from(Error::from(source)),
            e @ ControlError::Illegal(_) => {
                tracing::error!(error = &e as &dyn std::error::Error, "internal error");
                Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", "an unexpected error occurred")
            }
        }
    }
}

/// Handlers return this; `?` turns service errors into problems.
pub type ApiResult<T> = Result<T, Problem>;

/// Rewrites any error answer that is not yet problem+json (axum's 404/405, tower-http's 413,
/// a body-limit rejection) into one, so that every error has the same shape.
pub async fn problem_for_bare_errors(response: Response) -> Response {
    let status = response.status();
    let is_problem =
        response.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(PROBLEM_JSON.as_bytes()));
    if (status.is_client_error() || status.is_server_error()) && !is_problem {
        let mut problem = Problem::for_status(status).into_response();
        for (name, value) in response.headers() {
            if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
                problem.headers_mut().insert(name.clone(), value.clone());
            }
        }
        return problem;
    }
    response
}
