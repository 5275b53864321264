//! The `cancel_order` saga: cancel a confirmed order (the pivot), then return its stock.

use sqlx::AnyConnection;

use super::store::{self, OrderStatus};
use super::{FailureCode, INVENTORY};
use crate::db::now_ms;
use crate::inventory;
use crate::saga::{Ctx, LOG_PARTICIPANT, SagaDefinition, SagaKind, StepError, StepKey};

/// The saga's kind.
pub const KIND: SagaKind<CancelOrderInput> = SagaKind::new("cancel_order");

/// What the saga is started with.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CancelOrderInput {
    /// The order to cancel.
    pub order_id: String,
    /// The place_order saga whose reservations hold the order's stock.
    pub place_saga_id: String,
    /// The order's earlier cancel saga that this one replaces (it was aborted before its pivot),
    /// so that the order's sagas can be followed back in the order they were created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<String>,
}

/// Step 1, the pivot: the order's status becomes cancelled.
pub const CANCEL: StepKey<()> = StepKey::new("cancel");
/// Step 2: the order's stock goes back to available.
pub const RETURN_STOCK: StepKey<()> = StepKey::new("return_stock");

/// The definition: each step with its compensation, on one screen.
pub fn definition() -> SagaDefinition {
    SagaDefinition::of(KIND, 1)
        .correlated_by("order_id")
        .step(CANCEL, LOG_PARTICIPANT, cancel)
        .pivot()
        .step(RETURN_STOCK, INVENTORY, return_stock)
        .build()
}

async fn cancel(conn: &mut AnyConnection, cx: Ctx<'_, CancelOrderInput>) -> Result<(), StepError> {
    let id = &cx.input.order_id;
    if !store::transition(conn, id, OrderStatus::Confirmed, OrderStatus::Cancelled, None, now_ms()).await? {
        let status = store::status(conn, id).await?.map(|(status, _)| status);
        if status != Some(OrderStatus::Cancelled) {
            return Err(FailureCode::OrderNotCancellable.error(format!("order is {status:?}")));
        }
    }
    Ok(())
}

async fn return_stock(conn: &mut AnyConnection, cx: Ctx<'_, CancelOrderInput>) -> Result<(), StepError> {
    inventory::return_stock(conn, &cx.input.place_saga_id).await
}
