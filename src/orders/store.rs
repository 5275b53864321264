//! The orders table in the log database: the order written ahead as pending, and the single
//! guarded transitions the sagas make to it.

use serde_json::Value;
use sqlx::{AnyConnection, Row};

use crate::db::{Db, now_ms};
use crate::error::FailureCode;
use crate::insert::Insert;
use crate::sql::Sql;

/// Where an order stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderStatus {
    /// Its place_order saga has not settled it yet.
    Pending,
    /// Placed: its stock is taken.
    Confirmed,
    /// Its place_order saga compensated; it holds no stock.
    Rejected,
    /// Cancelled after confirmation; its stock goes back.
    Cancelled,
}

impl OrderStatus {
    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Pending => "pending",
            OrderStatus::Confirmed => "confirmed",
            OrderStatus::Rejected => "rejected",
            OrderStatus::Cancelled => "cancelled",
        }
    }

    /// Parses a stored or requested name.
    pub fn parse(s: &str) -> Option<Self> {
        [OrderStatus::Pending, OrderStatus::Confirmed, OrderStatus::Rejected, OrderStatus::Cancelled]
            .into_iter()
            .find(|status| status.as_str() == s)
    }
}

impl std::fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OrderItem {
    /// The product.
    pub product_id: String,
    /// How many units.
    pub quantity: i64,
    /// The price create_order fixed; `None` before that.
    pub unit_price_cents: Option<i64>,
}

/// Why an order was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Stable reason.
    pub code: FailureCode,
    /// What a person reads.
    pub detail: String,
    /// The product concerned, if one is.
    pub product_id: Option<String>,
}

/// An order.
#[derive(Debug, Clone)]
pub struct Order {
    /// Its id (a UUIDv7).
    pub id: String,
    /// Who placed it.
    pub customer_id: String,
    /// Where it stands.
    pub status: OrderStatus,
    /// Its lines.
    pub items: Vec<OrderItem>,
    /// Sum of the lines, once priced.
    pub total_cents: Option<i64>,
    /// The place_order saga.
    pub saga_id: String,
    /// The cancel_order saga, once started.
    pub cancel_saga_id: Option<String>,
    /// Why it was rejected.
    pub failure: Option<Failure>,
    /// Creation time (ms).
    pub created_at: i64,
    /// Last change (ms).
    pub updated_at: i64,
}

const COLUMNS: &str =
    "id, customer_id, status, items, total_cents, saga_id, cancel_saga_id, failure, created_at, updated_at";

fn decode(row: &sqlx::any::AnyRow) -> Result<Order, sqlx::Error> {
    let bad = |e: String| sqlx::Error::Decode(e.into());
    let status: String = row.try_get("status")?;
    let items: String = row.try_get("items")?;
    let failure: Option<String> = row.try_get("failure")?;
    let failure =
        failure.map(|f| serde_json::from_str::<Value>(&f).map_err(|e| bad(e.to_string()))).transpose()?.map(|f| {
            Failure {
                code: FailureCode::parse(f["code"].as_str().unwrap_or("unknown")),
                detail: f["detail"].as_str().unwrap_or_default().to_string(),
                product_id: f["product_id"].as_str().map(str::to_string),
            }
        });
    Ok(Order {
        id: row.try_get("id")?,
        customer_id: row.try_get("customer_id")?,
        status: OrderStatus::parse(&status).ok_or_else(|| bad(format!("unknown order status {status:?}")))?,
        items: serde_json::from_str(&items).map_err(|e| bad(e.to_string()))?,
        total_cents: row.try_get("total_cents")?,
        saga_id: row.try_get("saga_id")?,
        cancel_saga_id: row.try_get("cancel_saga_id")?,
        failure,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// The row that writes a new order as pending, committed with its saga's write-ahead.
pub fn insert_pending(order: &Order) -> Insert {
    Insert::into("orders")
        .value("id", order.id.as_str())
        .value("customer_id", order.customer_id.as_str())
        .value("status", OrderStatus::Pending.as_str())
        .value("items", serde_json::to_string(&order.items).unwrap_or_default())
        .value("total_cents", None::<i64>)
        .value("saga_id", order.saga_id.as_str())
        .value("cancel_saga_id", None::<&str>)
        .value("failure", None::<&str>)
        .value("created_at", order.created_at)
        .value("updated_at", order.created_at)
}

/// Reads one order.
pub async fn get(db: &Db, id: &str) -> Result<Option<Order>, sqlx::Error> {
    let row =
        sqlx::query(&format!("SELECT {COLUMNS} FROM orders WHERE id = $1")).bind(id).fetch_optional(&db.pool).await?;
    row.as_ref().map(decode).transpose()
}

/// Lists orders newest first, optionally of one customer and status, before id `before`.
pub async fn list(
    db: &Db,
    customer_id: Option<&str>,
    status: Option<OrderStatus>,
    before: Option<&str>,
    limit: i64,
) -> Result<Vec<Order>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM orders WHERE ($1 IS NULL OR customer_id = $1) AND ($2 IS NULL OR status = $2) \
         AND ($3 IS NULL OR id < $3) ORDER BY id DESC LIMIT $4"
    ))
    .bind(customer_id)
    .bind(status.map(OrderStatus::as_str))
    .bind(before)
    .bind(limit)
    .fetch_all(&db.pool)
    .await?;
    rows.iter().map(decode).collect()
}

/// Fixes a pending order's prices and total. False if it is no longer pending (rejected by a
/// compensation that ran first: a late create_order is then a no-op).
pub async fn price(conn: &mut AnyConnection, id: &str, items: &[OrderItem], total: i64) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE orders SET items = $1, total_cents = $2, updated_at = $3 WHERE id = $4 AND status = 'pending'",
    )
    .bind(serde_json::to_string(items).unwrap_or_default())
    .bind(total)
    .bind(now_ms())
    .bind(id)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Moves an order from status `from` to `to` at time `now`, recording `failure` if given. False
/// if it was not in `from`.
pub async fn transition(
    conn: &mut AnyConnection,
    id: &str,
    from: OrderStatus,
    to: OrderStatus,
    failure: Option<&Value>,
    now: i64,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE orders SET status = $1, failure = COALESCE($2, failure), updated_at = $3 WHERE id = $4 AND status = $5",
    )
    .bind(to.as_str())
    .bind(failure.map(Value::to_string))
    .bind(now)
    .bind(id)
    .bind(from.as_str())
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The status of an order and when it last changed, read inside a step's transaction.
pub async fn status(conn: &mut AnyConnection, id: &str) -> Result<Option<(OrderStatus, i64)>, sqlx::Error> {
    let row =
        sqlx::query("SELECT status, updated_at FROM orders WHERE id = $1").bind(id).fetch_optional(&mut *conn).await?;
    let Some(row) = row else { return Ok(None) };
    let status: String = row.try_get("status")?;
    Ok(OrderStatus::parse(&status).map(|s| (s, row.try_get("updated_at").unwrap_or_default())))
}

/// The statement that attaches a cancel saga to a confirmed order that has none (or has
/// `replacing`, a cancel saga that settled without cancelling, such as an aborted one): the
/// guard of the cancel saga's write-ahead, which changes no row (and so writes nothing) if the
/// order has another cancel saga already or is not confirmed.
pub fn attach_cancel(id: &str, cancel_saga_id: &str, replacing: Option<&str>, now: i64) -> Sql<'static> {
    let mut sql = Sql::new("UPDATE orders SET cancel_saga_id = ");
    sql.bind(cancel_saga_id.to_string())
        .push(", updated_at = ")
        .bind(now)
        .push(" WHERE id = ")
        .bind(id.to_string())
        .push(" AND status = 'confirmed' AND ");
    match replacing {
        None => sql.push("cancel_saga_id IS NULL"),
        Some(old) => sql.push("cancel_saga_id = ").bind(old.to_string()),
    };
    sql
}

/// Reads the orders whose ids are in `ids` (any order), for the live-progress poller, which
/// watches many orders with one statement.
pub async fn get_many(db: &Db, ids: &[&str]) -> Result<Vec<Order>, sqlx::Error> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut sql = Sql::new(&format!("SELECT {COLUMNS} FROM orders WHERE id IN "));
    sql.tuple(ids.iter().copied());
    let rows = sql.query().fetch_all(&db.pool).await?;
    rows.iter().map(decode).collect()
}
