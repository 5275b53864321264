//! Live progress over server-sent events: `GET /orders/{id}/events` (one order's saga steps as
//! they are logged, resumable with `Last-Event-ID`) and `GET /sagas/events` (every saga change,
//! for the dashboard). The streams are fed by the instance's one poller ([`crate::live`]).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use axum::Extension;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_core::Stream;
use serde_json::{Value, json};

use super::AppState;
use super::access::{Caller, Expiry};
use super::orders::view;
use super::problem::ApiResult;
use crate::db::rfc3339;
use crate::error::Error;
use crate::limits;
use crate::live::{FeedWatch, OrderUpdate, OrderWatch, SagaSummary};

/// How often a comment line keeps an idle stream open through proxies.
pub const KEEPALIVE: Duration = Duration::from_secs(15);

/// An SSE response over `stream`, with the keepalive comment and no proxy buffering.
fn sse(stream: impl Stream<Item = Result<Event, Infallible>> + Send + 'static) -> Response {
    let mut response =
        Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEPALIVE).text("keepalive")).into_response();
    response.headers_mut().insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// `GET /orders/{id}/events`: an `order` event, a `saga` event per history event of the order's
/// sagas (after `Last-Event-ID`, if sent), a final `order` event once they have all settled,
/// then the end of the stream.
pub async fn order_events(
    State(state): State<AppState>,
    caller: Caller,
    expiry: Option<Extension<Expiry>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    if !limits::is_uuid(&id) {
        return Err(super::extract::no_such("order"));
    }
    let last = match headers.get("last-event-id") {
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| Error::InvalidLastEventId("the header is not visible ASCII".into()))?
                .to_string(),
        ),
        None => None,
    };
    let watch = state.live.watch_order(&id, last.as_deref()).await?;
    if caller.own_customer().is_some_and(|own| own != watch.order.customer_id) {
        // Exactly what an order that does not exist answers, so that order ids leak nothing.
        return Err(Error::NotFound(format!("order {id:?}")).into());
    }
    let first = order_event(&view(&watch.order));
    // A customer sees the steps and their states, not the errors behind them.
    let details = caller.own_customer().is_none();
    Ok(sse(UntilExpiry::new(OrderEvents { first: Some(first), watch, done: false, details }, expiry)))
}

fn order_event(order: &Value) -> Event {
    Event::default().event("order").data(order.to_string())
}

/// The body of an order's stream.
struct OrderEvents {
    first: Option<Event>,
    watch: OrderWatch,
    done: bool,
    /// Whether `saga` events carry their `detail` (error texts); not for a customer.
    details: bool,
}

impl Stream for OrderEvents {
    type Item = Result<Event, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(Ok(first)));
        }
        if this.done {
            return Poll::Ready(None);
        }
        this.watch.poll_recv(cx).map(|update| match update? {
            OrderUpdate::Saga(step) => {
                let data = json!({
                    "saga_id": step.saga_id,
                    "kind": step.kind,
                    "seq": step.event.seq,
                    "step": step.event.step,
                    "event": step.event.kind.as_str(),
                    "detail": if this.details { step.event.detail } else { None },
                    "at": rfc3339(step.event.at),
                });
                Some(Ok(Event::default().event("saga").id(step.cursor.to_string()).data(data.to_string())))
            }
            OrderUpdate::Settled(order) => {
                this.done = true;
                Some(Ok(order_event(&view(&order))))
            }
        })
    }
}

/// `GET /sagas/events`: a `saga` event per saga change: first every unfinished or recently
/// created saga, then each saga created or whose history grew, on any instance.
pub async fn saga_events(State(state): State<AppState>, expiry: Option<Extension<Expiry>>) -> Response {
    sse(UntilExpiry::new(FeedEvents { watch: state.live.watch_sagas() }, expiry))
}

/// A stream that ends when the token that opened it expires; the client reconnects with a
/// fresh token (and `Last-Event-ID`), so a revoked or expired token stops reading.
struct UntilExpiry<S> {
    inner: S,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> UntilExpiry<S> {
    fn new(inner: S, expiry: Option<Extension<Expiry>>) -> Self {
        let deadline = expiry.map(|Extension(Expiry(at))| {
            let left = at.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
            Box::pin(tokio::time::sleep(left))
        });
        Self { inner, deadline }
    }
}

impl<S: Stream + Unpin> Stream for UntilExpiry<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(deadline) = self.deadline.as_mut() {
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
        }
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

/// The body of the global feed.
struct FeedEvents {
    watch: FeedWatch,
}

impl Stream for FeedEvents {
    type Item = Result<Event, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut()
            .watch
            .poll_recv(cx)
            .map(|saga| saga.map(|s| Ok(Event::default().event("saga").data(summary(&s).to_string()))))
    }
}

/// A saga as one item of `GET /sagas` shows it, with its `next_seq`.
fn summary(s: &SagaSummary) -> Value {
    json!({
        "id": s.id,
        "kind": s.kind,
        "state": s.state.as_str(),
        "stuck": s.stuck,
        "order_id": s.input.get("order_id"),
        "attempts": s.attempts,
        "last_error": s.last_error,
        "created_at": rfc3339(s.created_at),
        "updated_at": rfc3339(s.updated_at),
        "next_seq": s.next_seq,
    })
}
