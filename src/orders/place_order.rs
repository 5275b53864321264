//! The `place_order` saga: reserve stock, create the order, confirm it (the pivot), commit the stock.

use serde_json::{Value, json};
use sqlx::AnyConnection;

use super::store::{self, Order, OrderItem, OrderStatus};
use super::{INVENTORY, input_of};
use crate::db::now_ms;
use crate::inventory::{self, Line, MAX_SAFE_INTEGER};
use crate::saga::{LOG_PARTICIPANT, SagaDefinition, SagaRecord, SagaState, Step, StepContext, StepError, StepFuture};

/// The saga's kind.
pub const KIND: &str = "place_order";

/// What the saga is started with.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PlaceOrderInput {
    /// The order written ahead as pending.
    pub order_id: String,
    /// Who placed it.
    pub customer_id: String,
    /// Its lines, sorted by product id.
    pub items: Vec<Line>,
}

/// The definition: each step with its compensation, on one screen.
pub fn definition() -> SagaDefinition {
    SagaDefinition {
        kind: KIND,
        version: 1,
        steps: vec![
            Step {
                name: "reserve_stock",
                participant: INVENTORY,
                action: reserve_stock,
                compensation: Some(release_stock),
                pivot: false,
            },
            Step {
                name: "create_order",
                participant: LOG_PARTICIPANT,
                action: create_order,
                compensation: Some(reject_order),
                pivot: false,
            },
            Step { name: "confirm", participant: LOG_PARTICIPANT, action: confirm, compensation: None, pivot: true },
            Step {
                name: "commit_stock",
                participant: INVENTORY,
                action: commit_stock,
                compensation: None,
                pivot: false,
            },
        ],
    }
}

fn reserve_stock<'a>(conn: &'a mut AnyConnection, ctx: &'a StepContext) -> StepFuture<'a> {
    Box::pin(async move {
        let input: PlaceOrderInput = input_of(ctx)?;
        let prices = inventory::reserve(conn, &ctx.saga_id, &input.items).await?;
        Ok(json!({ "prices": prices }))
    })
}

fn release_stock<'a>(conn: &'a mut AnyConnection, ctx: &'a StepContext) -> StepFuture<'a> {
    Box::pin(async move {
        let input: PlaceOrderInput = input_of(ctx)?;
        inventory::release(conn, &ctx.saga_id, &input.items).await?;
        Ok(Value::Null)
    })
}

fn create_order<'a>(conn: &'a mut AnyConnection, ctx: &'a StepContext) -> StepFuture<'a> {
    Box::pin(async move {
        let input: PlaceOrderInput = input_of(ctx)?;
        // Prices come from the log (rule 6), so a resumed saga totals exactly as the first run.
        let (items, total) = priced(&input.items, &ctx.output("reserve_stock")["prices"])?;
        store::price(conn, &input.order_id, &items, total).await?;
        Ok(json!({ "total_cents": total }))
    })
}

fn reject_order<'a>(conn: &'a mut AnyConnection, ctx: &'a StepContext) -> StepFuture<'a> {
    Box::pin(async move {
        let input: PlaceOrderInput = input_of(ctx)?;
        let (from, to) = (OrderStatus::Pending, OrderStatus::Rejected);
        store::transition(conn, &input.order_id, from, to, ctx.failure.as_ref(), now_ms()).await?;
        Ok(Value::Null)
    })
}

fn confirm<'a>(conn: &'a mut AnyConnection, ctx: &'a StepContext) -> StepFuture<'a> {
    Box::pin(async move {
        let input: PlaceOrderInput = input_of(ctx)?;
        let now = now_ms();
        let mut confirmed_at = now;
        if !store::transition(conn, &input.order_id, OrderStatus::Pending, OrderStatus::Confirmed, None, now).await? {
            // Confirmed already: this is a repeat, and the pivot has happened.
            match store::status(conn, &input.order_id).await? {
                Some((OrderStatus::Confirmed, at)) => confirmed_at = at,
                status => {
                    let status = status.map(|(s, _)| s);
                    return Err(StepError::permanent("order_not_pending", format!("order is {status:?}, not pending")));
                }
            }
        }
        Ok(json!({ "confirmed_at": confirmed_at }))
    })
}

fn commit_stock<'a>(conn: &'a mut AnyConnection, ctx: &'a StepContext) -> StepFuture<'a> {
    Box::pin(async move {
        inventory::commit(conn, &ctx.saga_id).await?;
        Ok(Value::Null)
    })
}

/// The order's lines with the prices logged by reserve_stock, and their total.
fn priced(lines: &[Line], prices: &Value) -> Result<(Vec<OrderItem>, i64), StepError> {
    let mut items = Vec::with_capacity(lines.len());
    let mut total: i64 = 0;
    for line in lines {
        let price = prices[&line.product_id]
            .as_i64()
            .ok_or_else(|| StepError::Transient(format!("no price logged for {:?}", line.product_id)))?;
        total = price
            .checked_mul(line.quantity)
            .and_then(|t| t.checked_add(total))
            .filter(|t| *t <= MAX_SAFE_INTEGER)
            .ok_or_else(|| StepError::permanent("validation_failed", "the order's total exceeds 2^53 - 1"))?;
        items.push(OrderItem {
            product_id: line.product_id.clone(),
            quantity: line.quantity,
            unit_price_cents: Some(price),
        });
    }
    Ok((items, total))
}

/// The order as a completed saga left it, from what the saga logged: the same rows its steps
/// wrote, without reading them back. `None` unless the saga completed.
pub fn confirmed_order(pending: &Order, saga: &SagaRecord) -> Option<Order> {
    if saga.state != SagaState::Completed {
        return None;
    }
    let lines: Vec<Line> =
        pending.items.iter().map(|i| Line { product_id: i.product_id.clone(), quantity: i.quantity }).collect();
    let (items, total) = priced(&lines, &saga.outputs.get("reserve_stock")?["prices"]).ok()?;
    let confirmed_at = saga.outputs.get("confirm")?["confirmed_at"].as_i64()?;
    Some(Order {
        status: OrderStatus::Confirmed,
        items,
        total_cents: Some(total),
        updated_at: confirmed_at,
        ..pending.clone()
    })
}
