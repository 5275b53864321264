//! Orders: the two order sagas and the service that starts them, waits for them and reads
//! their orders.
//!
//! - [`place_order`] and [`cancel_order`]: the saga definitions, each on one screen.
//! - [`store`]: the orders table.

pub mod cancel_order;
pub mod place_order;
pub mod store;

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::db::now_ms;
pub use crate::error::FailureCode;
use crate::error::{Error, FieldError, Result};
use crate::idempotency::{self, KeyRecord};
use crate::inventory::{Inventory, Line, MAX_SAFE_INTEGER};
use crate::saga::{Engine, SagaState, StartError};
use crate::telemetry;
use cancel_order::CancelOrderInput;
use place_order::PlaceOrderInput;
pub use store::{Failure, Order, OrderItem, OrderStatus};

/// The participant name of the inventory database in the saga definitions.
pub const INVENTORY: &str = "inventory";

/// A write-ahead's failure as the service reports it.
fn start_error(error: StartError) -> Error {
    match error {
        StartError::Exists(e) | StartError::Db(e) => e.into(),
        StartError::Refused => Error::Internal("a write-ahead without a guard was refused".into()),
    }
}

/// The idempotency-key scope of `POST /orders` with authentication off: one key space for all.
const PLACE_SCOPE: &str = "POST /orders";

/// An `Idempotency-Key` sent with a placement.
#[derive(Debug, Clone)]
pub struct IdempotencyKey<'a> {
    /// The client's key.
    pub key: &'a str,
    /// The fingerprint of the request body, `customer_id` filled in.
    pub fingerprint: String,
    /// The authenticated principal, whose keys are theirs alone; `None` with authentication off.
    pub principal: Option<&'a str>,
}

impl IdempotencyKey<'_> {
    /// The key's scope: the endpoint, and with authentication on the principal too, so that the
    /// same key from two customers is two keys.
    fn scope(&self) -> Cow<'static, str> {
        match self.principal {
            None => Cow::Borrowed(PLACE_SCOPE),
            Some(principal) => Cow::Owned(format!("{PLACE_SCOPE} {principal}")),
        }
    }
}

/// A validated request to place an order.
#[derive(Debug, Clone)]
pub struct PlaceOrder {
    /// Who places it.
    pub customer_id: String,
    /// Its lines, with distinct products.
    pub items: Vec<Line>,
}

/// The answer to a placement: the order as it now stands.
#[derive(Debug, Clone)]
pub struct Placed {
    /// The order.
    pub order: Order,
    /// True when the request replayed an earlier one with the same key.
    pub replayed: bool,
}

/// The answer to a cancellation.
#[derive(Debug, Clone)]
pub struct Cancelled {
    /// The order.
    pub order: Order,
    /// True once the cancel saga has completed (its stock is back).
    pub settled: bool,
}

/// Places, cancels and reads orders.
#[derive(Clone)]
pub struct Orders {
    engine: Engine,
    inventory: Inventory,
    wait: Duration,
    /// Whether keys recorded with authentication off may still exist: a principal's key is then
    /// looked up there too, so that it keeps replaying for the customer whose order it made.
    legacy_keys: Arc<AtomicBool>,
}

impl Orders {
    /// The service over `engine` (whose log database holds the orders) and `inventory`.
    /// `wait` is `ORDER_WAIT_MS`: how long a request waits for its saga.
    pub fn new(engine: Engine, inventory: Inventory, wait: Duration) -> Self {
        Self { engine, inventory, wait, legacy_keys: Arc::new(AtomicBool::new(false)) }
    }

    /// Looks whether keys recorded with authentication off remain (with it on, none are added,
    /// so once they expire the lookup of [`Orders::place`] stops). Returns the answer.
    pub async fn check_legacy_keys(&self) -> Result<bool> {
        let any = idempotency::any_in_scope(self.engine.log_db(), PLACE_SCOPE).await?;
        self.legacy_keys.store(any, Ordering::Relaxed);
        Ok(any)
    }

    /// Places an order: writes it ahead with its saga (and key), runs the saga in its own task
    /// and waits for it up to `ORDER_WAIT_MS` unless `respond_async`. With a key seen before,
    /// starts nothing and answers with that key's order.
    pub async fn place(
        &self,
        request: PlaceOrder,
        key: Option<IdempotencyKey<'_>>,
        respond_async: bool,
    ) -> Result<Placed> {
        self.check_total(&request).await?;
        if let Some(key) = key.as_ref().filter(|k| k.principal.is_some()) {
            if self.legacy_keys.load(Ordering::Relaxed) {
                if let Some(placed) = self.replay_legacy(key, respond_async).await? {
                    return Ok(placed);
                }
            }
        }
        let mut items = request.items.clone();
        items.sort_by(|a, b| a.product_id.cmp(&b.product_id));
        let order = Order {
            id: uuid::Uuid::now_v7().to_string(),
            customer_id: request.customer_id.clone(),
            status: OrderStatus::Pending,
            items: items
                .iter()
                .map(|l| OrderItem { product_id: l.product_id.clone(), quantity: l.quantity, unit_price_cents: None })
                .collect(),
            total_cents: None,
            saga_id: uuid::Uuid::now_v7().to_string(),
            cancel_saga_id: None,
            failure: None,
            created_at: now_ms(),
            updated_at: now_ms(),
        };
        let input = PlaceOrderInput { order_id: order.id.clone(), customer_id: order.customer_id.clone(), items };
        let engine = self.engine.clone();
        let record = key.as_ref().map(|key| {
            (
                key.scope(),
                key.key.to_string(),
                KeyRecord {
                    fingerprint: key.fingerprint.clone(),
                    saga_id: order.saga_id.clone(),
                    order_id: order.id.clone(),
                },
            )
        });
        let pending = order.clone();
        // Its own task, so that a client hanging up cannot stop it between the write-ahead commit
        // and the launch, which would leave a saga owned by a live instance but driven by none.
        let written = telemetry::spawn(async move {
            let ahead = engine.write_ahead(place_order::KIND, pending.saga_id.clone(), &input)?;
            let mut rows = Vec::with_capacity(4);
            if let Some((scope, key, record)) = &record {
                rows.push(idempotency::claim(scope, key, record, pending.created_at));
            }
            rows.push(store::insert_pending(&pending));
            match engine.start(ahead, rows, None).await {
                Ok(()) => Ok::<bool, Error>(true),
                // Order and saga ids are fresh UUIDs: only the key can be taken already.
                Err(StartError::Exists(_)) if record.is_some() => Ok(false),
                Err(e) => Err(start_error(e)),
            }
        })
        .await??;
        if !written {
            let key = key.as_ref().expect("only a key can be taken already");
            let record = idempotency::get(self.engine.log_db(), &key.scope(), key.key)
                .await?
                .ok_or_else(|| Error::Internal("idempotency key vanished between claim and read".into()))?;
            return self.replay(&record, &key.fingerprint, respond_async).await;
        }
        if respond_async {
            return Ok(Placed { order, replayed: false });
        }
        let settled = self.engine.wait_settled(&order.saga_id, self.wait).await?;
        // A confirmed order is answered from what its saga logged; any other from the table.
        let order = match settled.as_deref().and_then(|saga| place_order::confirmed_order(&order, saga)) {
            Some(confirmed) => confirmed,
            None => self.get(&order.id).await?,
        };
        Ok(Placed { order, replayed: false })
    }

    /// The replay of a key recorded with authentication off, if it made an order of this
    /// principal's.
    async fn replay_legacy(&self, key: &IdempotencyKey<'_>, respond_async: bool) -> Result<Option<Placed>> {
        let Some(record) = idempotency::get(self.engine.log_db(), PLACE_SCOPE, key.key).await? else { return Ok(None) };
        let order = self.get(&record.order_id).await?;
        if Some(order.customer_id.as_str()) != key.principal {
            return Ok(None);
        }
        self.replay(&record, &key.fingerprint, respond_async).await.map(Some)
    }

    async fn replay(&self, record: &KeyRecord, fingerprint: &str, respond_async: bool) -> Result<Placed> {
        if record.fingerprint != fingerprint {
            return Err(Error::IdempotencyKeyReused);
        }
        if !respond_async {
            self.engine.wait_settled(&record.saga_id, self.wait).await?;
        }
        Ok(Placed { order: self.get(&record.order_id).await?, replayed: true })
    }

    /// Refuses an order whose total would pass 2^53 - 1. Only large quantities can, so the
    /// prices are read only then.
    async fn check_total(&self, request: &PlaceOrder) -> Result<()> {
        let units: i64 = request.items.iter().map(|l| l.quantity).sum();
        if units.saturating_mul(crate::limits::MAX_PRICE_CENTS) <= MAX_SAFE_INTEGER {
            return Ok(());
        }
        let ids: Vec<&str> = request.items.iter().map(|l| l.product_id.as_str()).collect();
        let prices = self.inventory.prices(&ids).await?;
        let total = request.items.iter().try_fold(0i64, |sum, line| {
            let price = prices.iter().find(|(id, _)| *id == line.product_id).map_or(0, |(_, p)| *p);
            price.checked_mul(line.quantity).and_then(|t| t.checked_add(sum)).filter(|t| *t <= MAX_SAFE_INTEGER)
        });
        match total {
            Some(_) => Ok(()),
            None => Err(Error::Validation(vec![FieldError::new(
                "items",
                format!("the order's total would exceed {MAX_SAFE_INTEGER} cents"),
            )])),
        }
    }

    /// Cancels a confirmed order through `cancel_order`, waiting up to `ORDER_WAIT_MS` for it.
    /// A cancelled order answers again; a pending or rejected one cannot be cancelled.
    /// With `owner`, only that customer's order can be cancelled: another's is not found.
    pub async fn cancel(&self, id: &str, owner: Option<&str>) -> Result<Cancelled> {
        let order = self.get_owned(id, owner).await?;
        let cancel_saga_id = match (order.status, &order.cancel_saga_id) {
            (OrderStatus::Confirmed, Some(existing)) if self.settled_without_cancelling(existing).await? => {
                // Its cancel saga was aborted before its pivot: the order is cancellable again,
                // up to a bound that keeps its sagas few enough for its event stream's cursor.
                if self.cancel_sagas(existing).await? >= crate::limits::MAX_CANCEL_SAGAS {
                    return Err(Error::CancelAttemptsExhausted { id: id.to_string() });
                }
                self.start_cancel(&order, Some(existing)).await?
            }
            (OrderStatus::Confirmed | OrderStatus::Cancelled, Some(existing)) => existing.clone(),
            (OrderStatus::Confirmed, None) => self.start_cancel(&order, None).await?,
            (status, _) => return Err(Error::OrderNotCancellable { id: id.to_string(), status }),
        };
        let settled = self.engine.wait_settled(&cancel_saga_id, self.wait).await?.is_some();
        let order = self.get(id).await?;
        // A cancel saga still short of its pivot is answered 202 like any running saga; one that
        // settled without cancelling found the order no longer confirmed.
        if settled && order.status != OrderStatus::Cancelled {
            return Err(Error::OrderNotCancellable { id: id.to_string(), status: order.status });
        }
        Ok(Cancelled { order, settled })
    }

    /// True if cancel saga `id` has settled backward: it never reached its pivot.
    async fn settled_without_cancelling(&self, id: &str) -> Result<bool> {
        let saga = self.engine.saga(id).await?;
        Ok(saga.is_some_and(|(saga, _)| saga.state == SagaState::Compensated))
    }

    /// How many cancel sagas an order has, counted back from its newest, `newest`, through the
    /// ones each replaced; counting stops past [`crate::limits::MAX_CANCEL_SAGAS`].
    async fn cancel_sagas(&self, newest: &str) -> Result<usize> {
        let (mut count, mut next) = (0, Some(newest.to_string()));
        while let Some(id) = next.take() {
            count += 1;
            if count > crate::limits::MAX_CANCEL_SAGAS {
                break;
            }
            let saga = crate::saga::log::get(self.engine.log_db(), &id).await?;
            next = saga.and_then(|s| s.input.get("replaces")?.as_str().map(str::to_string));
        }
        Ok(count)
    }

    /// Writes the cancel saga ahead, attached to the order so that there is only ever one
    /// running: the attachment (in place of `replacing`, if given) is the write-ahead's guard.
    async fn start_cancel(&self, order: &Order, replacing: Option<&str>) -> Result<String> {
        let saga_id = uuid::Uuid::now_v7().to_string();
        let input = CancelOrderInput {
            order_id: order.id.clone(),
            place_saga_id: order.saga_id.clone(),
            replaces: replacing.map(str::to_string),
        };
        let engine = self.engine.clone();
        let guard = store::attach_cancel(&order.id, &saga_id, replacing, now_ms());
        let id = saga_id.clone();
        // Its own task, for the same reason as in `place`.
        let attached = telemetry::spawn(async move {
            let ahead = engine.write_ahead(cancel_order::KIND, id, &input)?;
            match engine.start(ahead, Vec::new(), Some(guard)).await {
                Ok(()) => Ok::<bool, Error>(true),
                Err(StartError::Refused) => Ok(false),
                Err(e) => Err(start_error(e)),
            }
        })
        .await??;
        if attached {
            return Ok(saga_id);
        }
        // A concurrent cancel attached its saga first; follow that one.
        let order = self.get(&order.id).await?;
        order.cancel_saga_id.ok_or_else(|| Error::OrderNotCancellable { id: order.id.clone(), status: order.status })
    }

    /// Reads one order.
    pub async fn get(&self, id: &str) -> Result<Order> {
        store::get(self.engine.log_db(), id).await?.ok_or_else(|| Error::NotFound(format!("order {id:?}")))
    }

    /// Reads one order that, with `owner`, must be that customer's: another's is not found,
    /// exactly like an order that does not exist, so that order ids leak nothing.
    pub async fn get_owned(&self, id: &str, owner: Option<&str>) -> Result<Order> {
        let order = self.get(id).await?;
        match owner {
            Some(owner) if owner != order.customer_id => Err(Error::NotFound(format!("order {id:?}"))),
            _ => Ok(order),
        }
    }

    /// Lists orders newest first.
    pub async fn list(
        &self,
        customer_id: Option<&str>,
        status: Option<OrderStatus>,
        before: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Order>> {
        Ok(store::list(self.engine.log_db(), customer_id, status, before, limit).await?)
    }

    /// Deletes idempotency records older than `ttl`.
    pub async fn purge_keys(&self, ttl: Duration) -> Result<u64> {
        Ok(idempotency::purge(self.engine.log_db(), now_ms() - ttl.as_millis() as i64).await?)
    }
}
