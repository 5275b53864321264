//! The service's typed errors, shared by the domain modules; `http::problem` maps them to HTTP.

use crate::db;

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
        status: String,
    },
    /// A database did not answer (connection refused or lost, pool exhausted, timeout).
    #[error("a database is unavailable: {0}")]
    Unavailable(sqlx::Error),
    /// A bug or a broken invariant; logged, answered with 500.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<sqlx::Error> for Error {
    fn from(error: sqlx::Error) -> Self {
        if db::is_transient(&error) { Error::Unavailable(error) } else { Error::Internal(error.to_string()) }
    }
}

impl From<crate::saga::EngineError> for Error {
    fn from(error: crate::saga::EngineError) -> Self {
        Error::Internal(error.to_string())
    }
}

/// Shorthand for the service's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;
