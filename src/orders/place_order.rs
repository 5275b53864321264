//! The `place_order` saga: reserve stock, create the order, confirm it (the pivot), commit the stock.

use std::collections::BTreeMap;

use sqlx::AnyConnection;

use super::store::{self, Order, OrderItem, OrderStatus};
use super::{FailureCode, INVENTORY};
use crate::db::now_ms;
use crate::inventory::{self, Line, MAX_SAFE_INTEGER};
use crate::saga::{Ctx, LOG_PARTICIPANT, SagaDefinition, SagaKind, SagaRecord, SagaState, StepError, StepKey};

/// The saga's kind.
pub const KIND: SagaKind<PlaceOrderInput> = SagaKind::new("place_order");

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

/// What reserve_stock keeps in the log: each product's unit price as it reserved it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reserved {
    /// Unit price by product id.
    pub prices: BTreeMap<String, i64>,
}

/// What create_order keeps in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Created {
    /// The order's total.
    pub total_cents: i64,
}

/// What confirm keeps in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Confirmed {
    /// When the order was confirmed (ms).
    pub confirmed_at: i64,
}

/// Step 1: reserve every line's stock, in the inventory.
pub const RESERVE_STOCK: StepKey<Reserved> = StepKey::new("reserve_stock");
/// Step 2: write the order's prices and total.
pub const CREATE_ORDER: StepKey<Created> = StepKey::new("create_order");
/// Step 3, the pivot: confirm the order.
pub const CONFIRM: StepKey<Confirmed> = StepKey::new("confirm");
/// Step 4: turn the reservations into sales.
pub const COMMIT_STOCK: StepKey<()> = StepKey::new("commit_stock");

/// The definition: each step with its compensation, on one screen.
pub fn definition() -> SagaDefinition {
    SagaDefinition::of(KIND, 1)
        .correlated_by("order_id")
        .step(RESERVE_STOCK, INVENTORY, reserve_stock)
        .compensated_by(release_stock)
        .step(CREATE_ORDER, LOG_PARTICIPANT, create_order)
        .compensated_by(reject_order)
        .step(CONFIRM, LOG_PARTICIPANT, confirm)
        .pivot()
        .step(COMMIT_STOCK, INVENTORY, commit_stock)
        .build()
}

async fn reserve_stock(conn: &mut AnyConnection, cx: Ctx<'_, PlaceOrderInput>) -> Result<Reserved, StepError> {
    Ok(Reserved { prices: inventory::reserve(conn, cx.saga_id, &cx.input.items).await? })
}

async fn release_stock(conn: &mut AnyConnection, cx: Ctx<'_, PlaceOrderInput>) -> Result<(), StepError> {
    inventory::release(conn, cx.saga_id, &cx.input.items).await
}

async fn create_order(conn: &mut AnyConnection, cx: Ctx<'_, PlaceOrderInput>) -> Result<Created, StepError> {
    // Prices come from the log (rule 6), so a resumed saga totals exactly as the first run.
    let (items, total_cents) = priced(&cx.input.items, &cx.output(RESERVE_STOCK)?)?;
    store::price(conn, &cx.input.order_id, &items, total_cents).await?;
    Ok(Created { total_cents })
}

async fn reject_order(conn: &mut AnyConnection, cx: Ctx<'_, PlaceOrderInput>) -> Result<(), StepError> {
    let (from, to) = (OrderStatus::Pending, OrderStatus::Rejected);
    store::transition(conn, &cx.input.order_id, from, to, cx.failure(), now_ms()).await?;
    Ok(())
}

async fn confirm(conn: &mut AnyConnection, cx: Ctx<'_, PlaceOrderInput>) -> Result<Confirmed, StepError> {
    let id = &cx.input.order_id;
    let now = now_ms();
    if store::transition(conn, id, OrderStatus::Pending, OrderStatus::Confirmed, None, now).await? {
        return Ok(Confirmed { confirmed_at: now });
    }
    // Confirmed already: this is a repeat, and the pivot has happened.
    match store::status(conn, id).await? {
        Some((OrderStatus::Confirmed, at)) => Ok(Confirmed { confirmed_at: at }),
        status => Err(FailureCode::OrderNotPending.error(format!("order is {:?}, not pending", status.map(|s| s.0)))),
    }
}

async fn commit_stock(conn: &mut AnyConnection, cx: Ctx<'_, PlaceOrderInput>) -> Result<(), StepError> {
    inventory::commit(conn, cx.saga_id).await
}

/// The order's lines with the prices logged by reserve_stock, and their total.
fn priced(lines: &[Line], reserved: &Reserved) -> Result<(Vec<OrderItem>, i64), StepError> {
    let mut items = Vec::with_capacity(lines.len());
    let mut total: i64 = 0;
    for line in lines {
        let price = *reserved
            .prices
            .get(&line.product_id)
            .ok_or_else(|| StepError::transient(format!("no price logged for {:?}", line.product_id)))?;
        total = price
            .checked_mul(line.quantity)
            .and_then(|t| t.checked_add(total))
            .filter(|t| *t <= MAX_SAFE_INTEGER)
            .ok_or_else(|| FailureCode::ValidationFailed.error("the order's total exceeds 2^53 - 1"))?;
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
    let (items, total) = priced(&lines, &RESERVE_STOCK.read(&saga.outputs).ok()?).ok()?;
    let confirmed = CONFIRM.read(&saga.outputs).ok()?;
    Some(Order {
        status: OrderStatus::Confirmed,
        items,
        total_cents: Some(total),
        updated_at: confirmed.confirmed_at,
        ..pending.clone()
    })
}
