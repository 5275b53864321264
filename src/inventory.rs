//! The inventory participant: products and their stock, and the reservation rows through which
//! the order sagas take, release, commit and return stock exactly once per saga.

use std::collections::BTreeMap;

use serde_json::Value;
use sqlx::{AnyConnection, Row};

use crate::db::{Db, now_ms};
use crate::error::{Error, FailureCode, FieldError, Result};
use crate::saga::StepError;

/// The largest integer a JavaScript client reads exactly (2^53 - 1).
pub const MAX_SAFE_INTEGER: i64 = 9_007_199_254_740_991;

/// A product with its stock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Product {
    /// Client-chosen id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Unit price.
    pub price_cents: i64,
    /// Free to reserve.
    pub available: i64,
    /// Held by running sagas.
    pub reserved: i64,
    /// Committed by confirmed orders.
    pub sold: i64,
    /// Creation time (ms).
    pub created_at: i64,
    /// Last change (ms).
    pub updated_at: i64,
}

/// A product to create.
#[derive(Debug, Clone)]
pub struct NewProduct {
    /// Client-chosen id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Unit price.
    pub price_cents: i64,
    /// Initial stock, all available.
    pub stock: i64,
}

/// One line of an order as the inventory sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Line {
    /// The product.
    pub product_id: String,
    /// How many units.
    pub quantity: i64,
}

const COLUMNS: &str = "id, name, price_cents, available, reserved, sold, created_at, updated_at";

fn decode(row: &sqlx::any::AnyRow) -> Result<Product, sqlx::Error> {
    Ok(Product {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        price_cents: row.try_get("price_cents")?,
        available: row.try_get("available")?,
        reserved: row.try_get("reserved")?,
        sold: row.try_get("sold")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// The products and stock of the inventory database.
#[derive(Clone, Debug)]
pub struct Inventory {
    db: Db,
}

impl Inventory {
    /// The inventory on `db`.
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// The inventory's database.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Creates a product; `ProductExists` if the id is taken.
    pub async fn create(&self, product: &NewProduct) -> Result<Product> {
        let now = now_ms();
        let row = sqlx::query(&format!(
            "INSERT INTO products (id, name, price_cents, available, reserved, sold, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, 0, 0, $5, $5) ON CONFLICT (id) DO NOTHING RETURNING {COLUMNS}"
        ))
        .bind(&product.id)
        .bind(&product.name)
        .bind(product.price_cents)
        .bind(product.stock)
        .bind(now)
        .fetch_optional(&self.db.pool)
        .await?;
        match row {
            Some(row) => Ok(decode(&row)?),
            None => Err(Error::ProductExists(product.id.clone())),
        }
    }

    /// Reads one product.
    pub async fn get(&self, id: &str) -> Result<Product> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM products WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.db.pool)
            .await?;
        row.map(|r| decode(&r)).transpose()?.ok_or_else(|| Error::NotFound(format!("product {id:?}")))
    }

    /// Lists products by id, after `after` (the previous page's last id).
    pub async fn list(&self, after: Option<&str>, limit: i64) -> Result<Vec<Product>> {
        let rows =
            sqlx::query(&format!("SELECT {COLUMNS} FROM products WHERE ($1 IS NULL OR id > $1) ORDER BY id LIMIT $2"))
                .bind(after)
                .bind(limit)
                .fetch_all(&self.db.pool)
                .await?;
        Ok(rows.iter().map(decode).collect::<Result<_, _>>()?)
    }

    /// Adds stock to `available`, refusing a total stock past 2^53 - 1.
    pub async fn restock(&self, id: &str, quantity: i64) -> Result<Product> {
        let row = sqlx::query(&format!(
            "UPDATE products SET available = available + $1, updated_at = $2 \
             WHERE id = $3 AND available + reserved + sold <= $4 - $1 RETURNING {COLUMNS}"
        ))
        .bind(quantity)
        .bind(now_ms())
        .bind(id)
        .bind(MAX_SAFE_INTEGER)
        .fetch_optional(&self.db.pool)
        .await?;
        match row {
            Some(row) => Ok(decode(&row)?),
            None => {
                self.get(id).await?;
                Err(Error::Validation(vec![FieldError::new(
                    "quantity",
                    format!("the product's total stock would exceed {MAX_SAFE_INTEGER}"),
                )]))
            }
        }
    }

    /// Unit prices of the given products (those that exist).
    pub async fn prices(&self, ids: &[&str]) -> Result<Vec<(String, i64)>> {
        let mut prices = Vec::with_capacity(ids.len());
        for id in ids {
            let price: Option<i64> = sqlx::query_scalar("SELECT price_cents FROM products WHERE id = $1")
                .bind(*id)
                .fetch_optional(&self.db.pool)
                .await?;
            if let Some(price) = price {
                prices.push((id.to_string(), price));
            }
        }
        Ok(prices)
    }
}

/// Where a (saga, product) reservation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservationStatus {
    /// The stock is held in `reserved`.
    Reserved,
    /// The stock is sold (`sold`).
    Committed,
    /// The stock went back to `available`; written before any reservation, a tombstone.
    Released,
    /// A cancelled order's stock went back to `available`.
    Returned,
}

impl ReservationStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            ReservationStatus::Reserved => "reserved",
            ReservationStatus::Committed => "committed",
            ReservationStatus::Released => "released",
            ReservationStatus::Returned => "returned",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        use ReservationStatus::*;
        [Reserved, Committed, Released, Returned].into_iter().find(|status| status.as_str() == s)
    }

    /// The product column that holds the reservation's stock while it is in this status.
    fn held_in(self) -> Option<&'static str> {
        match self {
            ReservationStatus::Reserved => Some("reserved"),
            ReservationStatus::Committed => Some("sold"),
            ReservationStatus::Released | ReservationStatus::Returned => None,
        }
    }
}

fn permanent(code: FailureCode, detail: String, product_id: &str) -> StepError {
    let mut error = code.error(detail);
    if let StepError::Permanent { extra, .. } = &mut error {
        extra.insert("product_id".into(), Value::String(product_id.to_string()));
    }
    error
}

/// Reserves every line for `saga_id`, in product-id order so that concurrent sagas lock rows in
/// one order and cannot deadlock. A line already reserved (a retry) or released (a tombstone) is
/// left alone. Returns each product's unit price.
pub async fn reserve(
    conn: &mut AnyConnection,
    saga_id: &str,
    lines: &[Line],
) -> Result<BTreeMap<String, i64>, StepError> {
    let now = now_ms();
    let mut prices = BTreeMap::new();
    for line in sorted(lines) {
        let Reserve { price, fresh, taken } = dialect::reserve_line(conn, saga_id, line, now).await?;
        let Some(price) = price else {
            return Err(permanent(
                FailureCode::UnknownProduct,
                format!("product {:?} does not exist", line.product_id),
                &line.product_id,
            ));
        };
        if fresh && !taken {
            return Err(permanent(
                FailureCode::InsufficientStock,
                format!("not enough stock of product {:?} for {} units", line.product_id, line.quantity),
                &line.product_id,
            ));
        }
        prices.insert(line.product_id.clone(), price);
    }
    Ok(prices)
}

/// What reserving one line found.
struct Reserve {
    /// The product's price; `None` for an unknown product.
    price: Option<i64>,
    /// The saga had no reservation row for the product: this one is new.
    fresh: bool,
    /// The stock was taken.
    taken: bool,
}

/// Writes the (saga, product) reservation row in `status` unless the saga already has one.
/// True if it was written.
async fn insert_reservation(
    conn: &mut AnyConnection,
    saga_id: &str,
    line: &Line,
    status: ReservationStatus,
    now: i64,
) -> Result<bool, StepError> {
    let done = sqlx::query(
        "INSERT INTO reservations (saga_id, product_id, quantity, status, updated_at) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (saga_id, product_id) DO NOTHING",
    )
    .bind(saga_id)
    .bind(&line.product_id)
    .bind(line.quantity)
    .bind(status.as_str())
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The price of a product, if it exists, read inside the step's transaction.
async fn price(conn: &mut AnyConnection, product_id: &str) -> Result<Option<i64>, StepError> {
    Ok(sqlx::query_scalar("SELECT price_cents FROM products WHERE id = $1")
        .bind(product_id)
        .fetch_optional(&mut *conn)
        .await?)
}

/// Releases what `saga_id` reserved. Where no reservation exists yet it writes a `released`
/// tombstone, so that a late `reserve` of the same saga is a no-op.
pub async fn release(conn: &mut AnyConnection, saga_id: &str, lines: &[Line]) -> Result<(), StepError> {
    let now = now_ms();
    for line in sorted(lines) {
        if insert_reservation(conn, saga_id, line, ReservationStatus::Released, now).await? {
            continue;
        }
        let (from, to) = (ReservationStatus::Reserved, ReservationStatus::Released);
        if let Some(q) = transition(conn, saga_id, &line.product_id, from, to, now).await? {
            move_stock(conn, &line.product_id, "reserved", "available", q, now).await?;
        }
    }
    Ok(())
}

/// Turns `saga_id`'s reservations into sales. Lines already committed or returned are left alone.
pub async fn commit(conn: &mut AnyConnection, saga_id: &str) -> Result<(), StepError> {
    dialect::commit(conn, saga_id, now_ms()).await
}

/// Puts everything `saga_id` took back into `available`, once: committed lines leave `sold`,
/// lines not yet committed leave `reserved` (and a later commit finds nothing to do).
pub async fn return_stock(conn: &mut AnyConnection, saga_id: &str) -> Result<(), StepError> {
    let now = now_ms();
    let rows = sqlx::query("SELECT product_id, status FROM reservations WHERE saga_id = $1 ORDER BY product_id")
        .bind(saga_id)
        .fetch_all(&mut *conn)
        .await?;
    for row in rows {
        let product_id: String = row.try_get("product_id").map_err(StepError::from)?;
        let stored: String = row.try_get("status").map_err(StepError::from)?;
        let status = ReservationStatus::parse(&stored)
            .ok_or_else(|| StepError::transient(format!("unknown reservation status {stored:?}")))?;
        let Some(from) = status.held_in() else { continue };
        match transition(conn, saga_id, &product_id, status, ReservationStatus::Returned, now).await? {
            Some(q) => move_stock(conn, &product_id, from, "available", q, now).await?,
            None => {
                return Err(StepError::transient(format!("reservation of {product_id:?} changed concurrently")));
            }
        }
    }
    Ok(())
}

/// Moves one reservation from status `from` to `to`; its quantity if it was in `from`.
async fn transition(
    conn: &mut AnyConnection,
    saga_id: &str,
    product_id: &str,
    from: ReservationStatus,
    to: ReservationStatus,
    now: i64,
) -> Result<Option<i64>, StepError> {
    Ok(sqlx::query_scalar(
        "UPDATE reservations SET status = $1, updated_at = $2 WHERE saga_id = $3 AND product_id = $4 AND status = $5 \
         RETURNING quantity",
    )
    .bind(to.as_str())
    .bind(now)
    .bind(saga_id)
    .bind(product_id)
    .bind(from.as_str())
    .fetch_optional(&mut *conn)
    .await?)
}

/// Moves `quantity` units of a product from stock column `from` to `to`.
async fn move_stock(
    conn: &mut AnyConnection,
    product_id: &str,
    from: &'static str,
    to: &'static str,
    quantity: i64,
    now: i64,
) -> Result<(), StepError> {
    sqlx::query(&format!("UPDATE products SET {to} = {to} + $1, {from} = {from} - $1, updated_at = $2 WHERE id = $3"))
        .bind(quantity)
        .bind(now)
        .bind(product_id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

fn sorted(lines: &[Line]) -> Vec<&Line> {
    let mut sorted: Vec<&Line> = lines.iter().collect();
    sorted.sort_by(|a, b| a.product_id.cmp(&b.product_id));
    sorted
}

/// Where PostgreSQL and SQLite differ in the inventory: PostgreSQL reserves a line and commits
/// every line of a saga in one round trip each, with data-modifying CTEs.
mod dialect {
    use sqlx::{AnyConnection, Row};

    use super::{Line, ReservationStatus, Reserve, StepError, insert_reservation, move_stock, price};
    use crate::db::Backend;

    /// Reserves one line: the reservation row if the saga has none for the product, and the
    /// stock if it is there.
    pub(super) async fn reserve_line(
        conn: &mut AnyConnection,
        saga_id: &str,
        line: &Line,
        now: i64,
    ) -> Result<Reserve, StepError> {
        let (fresh, taken) = match Backend::of(conn) {
            Backend::Postgres => {
                let row = sqlx::query(
                    "WITH ins AS (INSERT INTO reservations (saga_id, product_id, quantity, status, updated_at) \
                       VALUES ($1, $2, $3, 'reserved', $4) ON CONFLICT (saga_id, product_id) DO NOTHING RETURNING 1), \
                     upd AS (UPDATE products SET available = available - $3, reserved = reserved + $3, updated_at = $4 \
                       WHERE id = $2 AND available >= $3 AND EXISTS (SELECT 1 FROM ins) RETURNING price_cents) \
                     SELECT (SELECT count(*) FROM ins) AS fresh, (SELECT price_cents FROM upd) AS price",
                )
                .bind(saga_id)
                .bind(&line.product_id)
                .bind(line.quantity)
                .bind(now)
                .fetch_one(&mut *conn)
                .await?;
                let fresh = row.try_get::<i64, _>("fresh").map_err(StepError::from)? > 0;
                let taken: Option<i64> = row.try_get("price").map_err(StepError::from)?;
                (fresh, taken)
            }
            Backend::Sqlite => {
                let fresh = insert_reservation(conn, saga_id, line, ReservationStatus::Reserved, now).await?;
                let taken = if fresh {
                    sqlx::query_scalar(
                        "UPDATE products SET available = available - $1, reserved = reserved + $1, updated_at = $2 \
                         WHERE id = $3 AND available >= $1 RETURNING price_cents",
                    )
                    .bind(line.quantity)
                    .bind(now)
                    .bind(&line.product_id)
                    .fetch_optional(&mut *conn)
                    .await?
                } else {
                    None
                };
                (fresh, taken)
            }
        };
        if let Some(price) = taken {
            return Ok(Reserve { price: Some(price), fresh, taken: true });
        }
        // Nothing taken, which is rare: an unknown product (whose new row the step's error rolls
        // back), too little stock, or a row the saga already has (a retry, or a tombstone).
        Ok(Reserve { price: price(conn, &line.product_id).await?, fresh, taken: false })
    }

    /// Commits every reserved line of `saga_id`.
    pub(super) async fn commit(conn: &mut AnyConnection, saga_id: &str, now: i64) -> Result<(), StepError> {
        match Backend::of(conn) {
            // One round trip for every line: the reservations' move and the stock's. The row
            // locks come in the join's order, not product-id order. When the steps run as one
            // batch (one database) the saga's reserve, in the same transaction, holds them
            // already; otherwise a deadlock with another saga is detected by PostgreSQL and
            // retried (40P01 is transient).
            Backend::Postgres => {
                sqlx::query(
                    "WITH r AS (UPDATE reservations SET status = 'committed', updated_at = $2 \
                       WHERE saga_id = $1 AND status = 'reserved' RETURNING product_id, quantity) \
                     UPDATE products SET reserved = reserved - r.quantity, sold = sold + r.quantity, updated_at = $2 \
                     FROM r WHERE id = r.product_id",
                )
                .bind(saga_id)
                .bind(now)
                .execute(&mut *conn)
                .await?;
            }
            Backend::Sqlite => {
                let committed: Vec<(String, i64)> = sqlx::query_as(
                    "UPDATE reservations SET status = 'committed', updated_at = $1 \
                     WHERE saga_id = $2 AND status = 'reserved' RETURNING product_id, quantity",
                )
                .bind(now)
                .bind(saga_id)
                .fetch_all(&mut *conn)
                .await?;
                // SQLite has one writer, so the order of these row updates cannot deadlock.
                for (product_id, quantity) in committed {
                    move_stock(conn, &product_id, "reserved", "sold", quantity, now).await?;
                }
            }
        }
        Ok(())
    }
}
