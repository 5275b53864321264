//! The service's typed errors, shared by the domain modules; `http::problem` maps them to HTTP.

use crate::db;
use crate::orders::OrderStatus;
use crate::saga::StepError;

/// Why a step of the order sagas said no, and so why an order was rejected: the stable codes
/// the API answers with (`http::problem` gives each its status).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum FailureCode {
    /// Not enough stock of a product for the quantity asked.
    InsufficientStock,
    /// A product that does not exist.
    UnknownProduct,
    /// The order's total would pass 2^53 - 1.
    ValidationFailed,
    /// The saga did not reach its pivot within `SAGA_DEADLINE_MS`.
    DeadlineExceeded,
    /// confirm found the order no longer pending.
    OrderNotPending,
    /// cancel found the order no longer confirmed.
    OrderNotCancellable,
    /// An operator aborted the saga before its pivot.
    Aborted,
    /// A code this build does not know (from a test's injected failure, or a newer release).
    Other(String),
}

impl FailureCode {
    const KNOWN: [FailureCode; 7] = [
        FailureCode::InsufficientStock,
        FailureCode::UnknownProduct,
        FailureCode::ValidationFailed,
        FailureCode::DeadlineExceeded,
        FailureCode::OrderNotPending,
        FailureCode::OrderNotCancellable,
        FailureCode::Aborted,
    ];

    /// The stored and answered code.
    pub fn as_str(&self) -> &str {
        match self {
            FailureCode::InsufficientStock => "insufficient_stock",
            FailureCode::UnknownProduct => "unknown_product",
            FailureCode::ValidationFailed => "validation_failed",
            FailureCode::DeadlineExceeded => crate::saga::DEADLINE_EXCEEDED,
            FailureCode::OrderNotPending => "order_not_pending",
            FailureCode::OrderNotCancellable => "order_not_cancellable",
            FailureCode::Aborted => crate::saga::ABORTED,
            FailureCode::Other(code) => code,
        }
    }

    /// Reads a stored code; one this build does not know is kept as [`FailureCode::Other`].
    pub fn parse(code: &str) -> Self {
        Self::KNOWN.into_iter().find(|c| c.as_str() == code).unwrap_or_else(|| FailureCode::Other(code.to_string()))
    }

    /// The permanent step failure with this code.
    pub fn error(self, detail: impl Into<String>) -> StepError {
        match self {
            FailureCode::Other(code) => StepError::permanent(code, detail),
            known => StepError::permanent(known.as_str().to_string(), detail),
        }
    }
}

/// One invalid field of a request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FieldError {
    /// The field's name or JSON path, such as `items[2].quantity`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl FieldError {
    /// A field error.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

/// Everything a service operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The named resource does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// A product with this id already exists.
    #[error("product {0:?} already exists")]
    ProductExists(String),
    /// The request is well-formed JSON but some fields are missing, mistyped or out of range.
    #[error("the request has invalid fields")]
    Validation(Vec<FieldError>),
    /// The Idempotency-Key was first used with a different request body.
    #[error("this Idempotency-Key was already used with a different request body")]
    IdempotencyKeyReused,
    /// Only confirmed orders can be cancelled.
    #[error("order {id} is {status} and cannot be cancelled")]
    OrderNotCancellable {
        /// The order.
        id: String,
        /// Its status.
        status: OrderStatus,
    },
    /// The order's cancel settled before its pivot [`crate::limits::MAX_CANCEL_SAGAS`] times;
    /// it is not tried again.
    #[error("order {id} was not cancelled after {} attempts; it stays confirmed", crate::limits::MAX_CANCEL_SAGAS)]
    CancelAttemptsExhausted {
        /// The order.
        id: String,
    },
    /// A `Last-Event-ID` that is not a cursor of the stream it was sent to.
    #[error("invalid Last-Event-ID: {0}")]
    InvalidLastEventId(String),
    /// A database did not answer (connection refused or lost, pool exhausted, timeout).
    #[error("a database is unavailable")]
    Unavailable(#[source] sqlx::Error),
    /// A query failed for another reason than the database being away: a bug.
    #[error("a database query failed")]
    Database(#[source] sqlx::Error),
    /// An operator action was refused.
    #[error(transparent)]
    Control(#[from] crate::saga::ControlError),
    /// The saga engine refused a request: a bug.
    #[error("the saga engine refused")]
    Engine(#[from] crate::saga::EngineError),
    /// A task the request waited on panicked: a bug.
    #[error("a task failed")]
    Task(#[from] tokio::task::JoinError),
    /// A broken invariant; logged, answered with 500.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<sqlx::Error> for Error {
    fn from(error: sqlx::Error) -> Self {
        if db::is_transient(&error) { Error::Unavailable(error) } else { Error::Database(error) }
    }
}

/// Shorthand for the service's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;
