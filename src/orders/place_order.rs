//! The `place_order` saga: reserve stock, create the order, confirm it (the pivot), commit the stock.

use serde_json::{Value, json};
use sqlx::AnyConnection;

use super::store::{self, OrderItem, OrderStatus};
use super::{INVENTORY, input_of};
use crate::inventory::{self, Line, MAX_SAFE_INTEGER};
use crate::saga::{LOG_PARTICIPANT, SagaDefinition, Step, StepContext, StepError, StepFuture};

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
        let prices = &ctx.output("reserve_stock")["prices"];
        let mut items = Vec::with_capacity(input.items.len());
        let mut total: i64 = 0;
        for line in &input.items {
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
        store::price(conn, &input.order_id, &items, total).await?;
        Ok(json!({ "total_cents": total }))
    })
}

fn reject_order<'a>(conn: &'a mut AnyConnection, ctx: &'a StepContext) -> StepFuture<'a> {
    Box::pin(async move {
        let input: PlaceOrderInput = input_of(ctx)?;
        store::transition(conn, &input.order_id, OrderStatus::Pending, OrderStatus::Rejected, ctx.failure.as_ref())
            .await?;
        Ok(Value::Null)
    })
}

fn confirm<'a>(conn: &'a mut AnyConnection, ctx: &'a StepContext) -> StepFuture<'a> {
    Box::pin(async move {
        let input: PlaceOrderInput = input_of(ctx)?;
        if !store::transition(conn, &input.order_id, OrderStatus::Pending, OrderStatus::Confirmed, None).await? {
            // Confirmed already: this is a repeat, and the pivot has happened.
            let status = store::status(conn, &input.order_id).await?;
            if status != Some(OrderStatus::Confirmed) {
                return Err(StepError::permanent("order_not_pending", format!("order is {status:?}, not pending")));
            }
        }
        Ok(Value::Null)
    })
}

fn commit_stock<'a>(conn: &'a mut AnyConnection, ctx: &'a StepContext) -> StepFuture<'a> {
    Box::pin(async move {
        let input: PlaceOrderInput = input_of(ctx)?;
        inventory::commit(conn, &ctx.saga_id, &input.items).await?;
        Ok(Value::Null)
    })
}
