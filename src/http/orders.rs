//! `/orders`: placing orders through the place_order saga, reading them, cancelling them.

use std::collections::HashSet;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Value, json};

use super::AppState;
use super::access::{self, Caller};
use super::extract::{self, Fields, QueryFields};
use super::problem::{ApiResult, Problem};
use super::shed::SagaInFlight;
use crate::db::rfc3339;
use crate::error::{Error, FieldError};
use crate::idempotency;
use crate::inventory::Line;
use crate::limits;
use crate::orders::{FailureCode, IdempotencyKey, Order, OrderStatus, PlaceOrder};

/// The API's view of an order.
pub fn view(o: &Order) -> Value {
    json!({
        "id": o.id,
        "customer_id": o.customer_id,
        "status": o.status.as_str(),
        "items": o.items.iter().map(|i| json!({
            "product_id": i.product_id, "quantity": i.quantity, "unit_price_cents": i.unit_price_cents,
        })).collect::<Vec<_>>(),
        "total_cents": o.total_cents,
        "saga_id": o.saga_id,
        "cancel_saga_id": o.cancel_saga_id,
        "failure": o.failure.as_ref().map(|f| json!({ "code": f.code.as_str(), "detail": f.detail })),
        "created_at": rfc3339(o.created_at),
        "updated_at": rfc3339(o.updated_at),
    })
}

/// Reads and validates a `POST /orders` body.
fn parse_place(object: &serde_json::Map<String, Value>) -> Result<PlaceOrder, Problem> {
    let mut errors = Vec::new();
    let mut fields = Fields::new(object, "", &mut errors);
    let customer_id = fields.string("customer_id", 1, limits::CUSTOMER_ID_CHARS);
    let raw_items = fields.array("items", 1, limits::MAX_ITEMS);
    let mut items = Vec::new();
    let mut seen = HashSet::new();
    for (i, raw) in raw_items.into_iter().flatten().enumerate() {
        let Some(item) = raw.as_object() else {
            errors.push(FieldError::new(format!("items[{i}]"), "must be an object"));
            continue;
        };
        let mut fields = Fields::new(item, format!("items[{i}]."), &mut errors);
        let product_id = fields.id("product_id");
        let quantity = fields.integer("quantity", 1, limits::MAX_QUANTITY);
        if let (Some(product_id), Some(quantity)) = (product_id, quantity) {
            if !seen.insert(product_id.clone()) {
                errors.push(FieldError::new(format!("items[{i}].product_id"), "each product may appear only once"));
            }
            items.push(Line { product_id, quantity });
        }
    }
    match customer_id {
        Some(customer_id) if errors.is_empty() => Ok(PlaceOrder { customer_id, items }),
        _ => Err(Problem::validation(errors)),
    }
}

/// `POST /orders`: 201 confirmed, 202 pending, 409/422 rejected (see the OpenAPI spec). With
/// authentication on, `customer_id` defaults to the caller's `sub`, and a customer may place
/// orders only for themselves.
pub async fn place(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let key = extract::idempotency_key(&headers)?;
    let mut object = extract::json_object(&headers, &body)?;
    if let Some(principal) = caller.principal() {
        // Before the fingerprint, so that a retry that omits it replays one that named it. A
        // null member counts as missing (the spec's convention), so it defaults too.
        let customer = object.entry("customer_id").or_insert(Value::Null);
        if customer.is_null() {
            *customer = Value::from(principal);
        }
    }
    let request = parse_place(&object)?;
    if caller.own_customer().is_some_and(|own| own != request.customer_id) {
        return Ok(access::forbidden("admin"));
    }
    let fingerprint = key.as_ref().map(|_| idempotency::fingerprint(&Value::Object(object)));
    let key = key.as_deref().zip(fingerprint).map(|(key, fingerprint)| IdempotencyKey {
        key,
        fingerprint,
        principal: caller.principal(),
    });
    let respond_async = extract::prefers_async(&headers);
    let placed = state.orders.place(request, key, respond_async).await?;
    let mut response = if respond_async && !placed.replayed && placed.order.status != OrderStatus::Rejected {
        // The client asked not to wait: 202 whatever the saga has done meanwhile. A replay
        // answers like the first request did, from the order as it now stands.
        accepted(&placed.order, format!("/orders/{}", placed.order.id))
    } else {
        placement_response(&placed.order)
    };
    if placed.replayed {
        response.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
    } else {
        // The saga may still run (respond-async, a 202, or past its pivot): it keeps the slot.
        response.extensions_mut().insert(SagaInFlight(placed.order.saga_id.clone()));
    }
    Ok(response)
}

/// The answer a placement gets for the order as it now stands.
fn placement_response(order: &Order) -> Response {
    let location = format!("/orders/{}", order.id);
    match order.status {
        OrderStatus::Confirmed | OrderStatus::Cancelled => {
            (StatusCode::CREATED, [(header::LOCATION, location)], Json(view(order))).into_response()
        }
        OrderStatus::Pending => accepted(order, location),
        OrderStatus::Rejected => {
            let failure = order.failure.clone().unwrap_or_else(|| crate::orders::Failure {
                code: FailureCode::Other("rejected".into()),
                detail: "the order was rejected".into(),
                product_id: None,
            });
            let mut problem = Problem::rejected(&failure.code, failure.detail)
                .with("order_id", order.id.clone())
                .with("saga_id", order.saga_id.clone());
            if let Some(product_id) = failure.product_id {
                problem = problem.with("product_id", product_id);
            }
            let mut response = problem.into_response();
            if let Ok(value) = HeaderValue::from_str(&location) {
                response.headers_mut().insert(header::LOCATION, value);
            }
            response
        }
    }
}

/// 202 with the order, where to poll it and when.
fn accepted(order: &Order, location: String) -> Response {
    (StatusCode::ACCEPTED, [(header::LOCATION, location), (header::RETRY_AFTER, "1".to_string())], Json(view(order)))
        .into_response()
}

/// `GET /orders/{id}`: a customer's own orders only.
pub async fn get(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    if !limits::is_uuid(&id) {
        return Err(extract::no_such("order"));
    }
    Ok(Json(view(&state.orders.get_owned(&id, caller.own_customer()).await?)))
}

/// `GET /orders?customer_id=&status=&limit=&cursor=`: newest first; a customer's own only.
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(params): Query<Vec<(String, String)>>,
) -> ApiResult<Response> {
    let mut errors = Vec::new();
    let mut query = QueryFields::new(&params, &mut errors);
    let limit = query.limit();
    let status = query.choice("status", OrderStatus::parse, "pending, confirmed, rejected, cancelled");
    let asked = query.text("customer_id", limits::CUSTOMER_ID_CHARS);
    let cursor = query.uuid("cursor");
    if !errors.is_empty() {
        return Err(Problem::validation(errors));
    }
    let customer = match (asked.as_deref(), caller.own_customer()) {
        (Some(asked), Some(own)) if asked != own => return Ok(access::forbidden("admin")),
        (asked, own) => own.or(asked),
    };
    let orders = state.orders.list(customer, status, cursor.as_deref(), limit + 1).await?;
    Ok(Json(extract::page(orders, limit, view, |o| o.id.clone())).into_response())
}

/// `POST /orders/{id}/cancel`: 200 once cancelled and its stock returned, 202 while that runs.
/// A customer cancels their own orders only.
pub async fn cancel(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Response> {
    if !limits::is_uuid(&id) {
        return Err(extract::no_such("order"));
    }
    let cancelled = state.orders.cancel(&id, caller.own_customer()).await.map_err(|e| match e {
        Error::NotFound(_) => Error::NotFound(format!("order {id:?}")),
        other => other,
    })?;
    if cancelled.settled {
        return Ok((StatusCode::OK, Json(view(&cancelled.order))).into_response());
    }
    let mut response = accepted(&cancelled.order, format!("/orders/{}", cancelled.order.id));
    if let Some(saga_id) = &cancelled.order.cancel_saga_id {
        response.extensions_mut().insert(SagaInFlight(saga_id.clone()));
    }
    Ok(response)
}
