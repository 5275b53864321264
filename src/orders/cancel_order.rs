//! The `cancel_order` saga: cancel a confirmed order (the pivot), then return its stock.

use serde_json::Value;
use sqlx::AnyConnection;

use super::store::{self, OrderStatus};
use super::{INVENTORY, input_of};
use crate::db::now_ms;
use crate::inventory;
use crate::saga::{LOG_PARTICIPANT, SagaDefinition, Step, StepContext, StepError, StepFuture};

/// The saga's kind.
pub const KIND: &str = "cancel_order";

/// What the saga is started with.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CancelOrderInput {
    /// The order to cancel.
    pub order_id: String,
    /// The place_order saga whose reservations hold the order's stock.
    pub place_saga_id: String,
}

/// The definition: each step with its compensation, on one screen.
pub fn definition() -> SagaDefinition {
    SagaDefinition {
        kind: KIND,
        version: 1,
        steps: vec![
            Step { name: "cancel", participant: LOG_PARTICIPANT, action: cancel, compensation: None, pivot: true },
            Step {
                name: "return_stock",
                participant: INVENTORY,
                action: return_stock,
                compensation: None,
                pivot: false,
            },
        ],
    }
}

fn cancel<'a>(conn: &'a mut AnyConnection, ctx: &'a StepContext) -> StepFuture<'a> {
    Box::pin(async move {
        let input: CancelOrderInput = input_of(ctx)?;
        let now = now_ms();
        if !store::transition(conn, &input.order_id, OrderStatus::Confirmed, OrderStatus::Cancelled, None, now).await? {
            let status = store::status(conn, &input.order_id).await?.map(|(status, _)| status);
            if status != Some(OrderStatus::Cancelled) {
                return Err(StepError::permanent("order_not_cancellable", format!("order is {status:?}")));
            }
        }
        Ok(Value::Null)
    })
}

fn return_stock<'a>(conn: &'a mut AnyConnection, ctx: &'a StepContext) -> StepFuture<'a> {
    Box::pin(async move {
        let input: CancelOrderInput = input_of(ctx)?;
        inventory::return_stock(conn, &input.place_saga_id).await?;
        Ok(Value::Null)
    })
}
