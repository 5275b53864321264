//! Who may do what over HTTP: the middleware that authenticates each request's bearer token
//! and checks the scope its route needs, and the [`Caller`] that handlers read to keep
//! customers apart. With authentication off every caller is [`Caller::Open`].
//!
//! | routes | need |
//! |---|---|
//! | `/healthz`, `/readyz`, `/openapi.yaml`, the dashboard's files | nothing |
//! | orders (place, list, read, cancel, stream), `GET` products | `orders` or `admin` |
//! | product writes, restocks, `/sagas` and its controls | `admin` |
//! | `/metrics` | `admin`, or the static `METRICS_TOKEN` |
//! | anything else (answered 404 / 405) | any valid token |

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::problem::Problem;
use super::route_of;
use crate::auth::{Principal, Secret, Verifier};

/// Who is calling, as the handlers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Authentication is off: anyone may do anything (loopback, or `AUTH_DISABLED=true`).
    Open,
    /// A token with the `orders` scope only: a customer who sees and acts on their own orders.
    Customer(String),
    /// A token with the `admin` scope.
    Admin(String),
}

impl Caller {
    /// The authenticated principal's `sub`, if authentication is on.
    pub fn principal(&self) -> Option<&str> {
        match self {
            Caller::Open => None,
            Caller::Customer(sub) | Caller::Admin(sub) => Some(sub),
        }
    }

    /// The customer whose orders alone this caller may see, if it is limited to its own.
    pub fn own_customer(&self) -> Option<&str> {
        match self {
            Caller::Customer(sub) => Some(sub),
            Caller::Open | Caller::Admin(_) => None,
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        // Set by `authenticate` on every route a handler reads it on; its absence is a wiring bug.
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| Problem::for_status(StatusCode::INTERNAL_SERVER_ERROR))
    }
}

/// When the caller's token stops being accepted: a stream it opened ends then, so that a long
/// stream does not outlive its token. Absent with authentication off.
#[derive(Debug, Clone, Copy)]
pub struct Expiry(pub SystemTime);

/// What the middleware needs: the verifier (none with authentication off) and the metrics token.
#[derive(Clone, Default)]
pub struct Access {
    /// Verifies tokens; `None` turns authentication off.
    pub verifier: Option<Arc<Verifier>>,
    /// `METRICS_TOKEN`: also accepted for `GET /metrics`.
    pub metrics_token: Option<Secret>,
}

/// What a route asks of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    Nothing,
    OrdersOrAdmin,
    Admin,
    Metrics,
    AnyToken,
}

/// The scopes any one of which allows `method` on `route` (a template of `http::ROUTES`): none
/// for a public route; `metrics_token` stands for `METRICS_TOKEN`. The drift test compares
/// this with each operation's `security` in `openapi.yaml`.
pub fn accepted_scopes(method: &Method, route: &str) -> &'static [&'static str] {
    match need(method, route) {
        Need::Nothing => &[],
        Need::OrdersOrAdmin => &["orders", "admin"],
        Need::Admin => &["admin"],
        Need::Metrics => &["admin", "metrics_token"],
        Need::AnyToken => &["any"],
    }
}

fn need(method: &Method, route: &str) -> Need {
    match route {
        "/healthz" | "/readyz" | "/openapi.yaml" | "/ui" | "/ui/app.js" | "/ui/app.css" => Need::Nothing,
        "/metrics" => Need::Metrics,
        "/orders" | "/orders/{id}" | "/orders/{id}/cancel" | "/orders/{id}/events" => Need::OrdersOrAdmin,
        "/products" | "/products/{id}" if method == Method::GET || method == Method::HEAD => Need::OrdersOrAdmin,
        "/products" | "/products/{id}" | "/products/{id}/restock" => Need::Admin,
        route if route.starts_with("/sagas") => Need::Admin,
        _ => Need::AnyToken,
    }
}

/// Authenticates the request and checks its route's scope, answering 401 / 403 problems;
/// passes a [`Caller`] on to the handler.
pub async fn authenticate(State(access): State<Access>, mut request: Request, next: Next) -> Response {
    let Some(verifier) = &access.verifier else {
        request.extensions_mut().insert(Caller::Open);
        return next.run(request).await;
    };
    let need = need(request.method(), route_of(request.uri().path()));
    if need == Need::Nothing {
        return next.run(request).await;
    }
    let token = match bearer(request.headers().get(header::AUTHORIZATION)) {
        Bearer::Absent => return unauthorized(false),
        Bearer::Malformed => return unauthorized(true),
        Bearer::Token(token) => token,
    };
    if need == Need::Metrics && access.metrics_token.as_ref().is_some_and(|t| t.matches(token.as_bytes())) {
        return next.run(request).await;
    }
    let principal = match verifier.verify(&token) {
        Ok(principal) => principal,
        Err(error) => {
            tracing::debug!(%error, "bearer token refused");
            return unauthorized(true);
        }
    };
    let allowed = match need {
        Need::OrdersOrAdmin => principal.orders || principal.admin,
        Need::Admin | Need::Metrics => principal.admin,
        Need::AnyToken | Need::Nothing => true,
    };
    if !allowed {
        return forbidden(if need == Need::OrdersOrAdmin { "orders" } else { "admin" });
    }
    let expiry = SystemTime::UNIX_EPOCH + Duration::from_secs(principal.expires_at);
    request.extensions_mut().insert(Expiry(expiry));
    request.extensions_mut().insert(caller(principal));
    next.run(request).await
}

fn caller(principal: Principal) -> Caller {
    if principal.admin { Caller::Admin(principal.subject) } else { Caller::Customer(principal.subject) }
}

enum Bearer {
    /// No bearer credentials: no `Authorization` header, or one of another scheme (`Basic`).
    Absent,
    Malformed,
    Token(String),
}

/// The token of an `Authorization: Bearer <token>` header (RFC 6750, 2.1). Credentials of
/// another scheme are no bearer token at all, which the challenge answers without an error code
/// (RFC 6750, 3.1), as if none had been sent.
fn bearer(header: Option<&HeaderValue>) -> Bearer {
    let Some(value) = header else { return Bearer::Absent };
    let Ok(value) = value.to_str() else { return Bearer::Malformed };
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Bearer::Absent;
    }
    match token.trim() {
        "" => Bearer::Malformed,
        token => Bearer::Token(token.to_string()),
    }
}

/// 401 with the challenge of RFC 6750: `error="invalid_token"` when a token was sent. The detail
/// never says which check failed.
fn unauthorized(invalid: bool) -> Response {
    let challenge =
        if invalid { "Bearer realm=\"order-saga\", error=\"invalid_token\"" } else { "Bearer realm=\"order-saga\"" };
    let mut response =
        Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", "a valid bearer token is required").into_response();
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
    response
}

/// 403 for a good token without the scope the route needs.
pub fn forbidden(scope: &'static str) -> Response {
    let challenge = match scope {
        "orders" => "Bearer realm=\"order-saga\", error=\"insufficient_scope\", scope=\"orders admin\"",
        _ => "Bearer realm=\"order-saga\", error=\"insufficient_scope\", scope=\"admin\"",
    };
    let mut response =
        Problem::new(StatusCode::FORBIDDEN, "forbidden", "the token does not allow this request").into_response();
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_needs_what_the_table_says() {
        assert_eq!(need(&Method::GET, "/healthz"), Need::Nothing);
        assert_eq!(need(&Method::GET, "/ui/app.js"), Need::Nothing);
        assert_eq!(need(&Method::POST, "/orders"), Need::OrdersOrAdmin);
        assert_eq!(need(&Method::GET, "/orders/{id}/events"), Need::OrdersOrAdmin);
        assert_eq!(need(&Method::GET, "/products/{id}"), Need::OrdersOrAdmin);
        assert_eq!(need(&Method::POST, "/products"), Need::Admin);
        assert_eq!(need(&Method::POST, "/products/{id}/restock"), Need::Admin);
        assert_eq!(need(&Method::GET, "/sagas/events"), Need::Admin);
        assert_eq!(need(&Method::POST, "/sagas/{id}/abort"), Need::Admin);
        assert_eq!(need(&Method::GET, "/metrics"), Need::Metrics);
        assert_eq!(need(&Method::GET, "unmatched"), Need::AnyToken);
    }

    #[test]
    fn only_a_bearer_header_carries_a_token() {
        let h = |s: &str| HeaderValue::from_str(s).unwrap();
        assert!(matches!(bearer(None), Bearer::Absent));
        assert!(matches!(bearer(Some(&h("Bearer abc"))), Bearer::Token(t) if t == "abc"));
        assert!(matches!(bearer(Some(&h("bearer abc"))), Bearer::Token(_)));
        assert!(matches!(bearer(Some(&h("Basic abc"))), Bearer::Absent));
        assert!(matches!(bearer(Some(&h("Bearer "))), Bearer::Malformed));
        assert!(matches!(bearer(Some(&h("Bearer"))), Bearer::Malformed));
    }
}
