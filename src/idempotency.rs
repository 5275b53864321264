//! Idempotency keys: each maps a client's key, scoped to an endpoint, to the saga its first
//! request started, with a fingerprint of that request's body.

use sha2::{Digest, Sha256};
use sqlx::Row;

use crate::db::Db;
use crate::insert::Insert;

/// The key record of a request that has been accepted.
#[derive(Debug, Clone)]
pub struct KeyRecord {
    /// SHA-256 of the canonical JSON body of the first request.
    pub fingerprint: String,
    /// The saga it started.
    pub saga_id: String,
    /// The order that saga settles.
    pub order_id: String,
}

/// The fingerprint of a parsed JSON body: SHA-256 of its canonical form (object keys sorted,
/// no insignificant white space), so formatting and key order do not matter.
pub fn fingerprint(body: &serde_json::Value) -> String {
    // serde_json's map is ordered by key, so `to_string` is canonical once numbers are.
    let digest = Sha256::digest(canonical(body).to_string().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The body with every integral number written as an integer (`2.0`, `2e0` -> `2`), since the
/// API reads them as the same value.
fn canonical(value: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Number(n) if n.as_i64().is_none() && n.as_u64().is_none() => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Value::from(f as i64),
            _ => value.clone(),
        },
        Value::Array(items) => Value::Array(items.iter().map(canonical).collect()),
        Value::Object(map) => Value::Object(map.iter().map(|(k, v)| (k.clone(), canonical(v))).collect()),
        other => other.clone(),
    }
}

/// The row that records `key` for a new saga, committed with its write-ahead. A key that exists
/// already makes that commit fail with a unique violation, and nothing of it is written.
pub fn claim(scope: &str, key: &str, record: &KeyRecord, now: i64) -> Insert {
    Insert::into("idempotency_keys")
        .value("scope", scope)
        .value("key", key)
        .value("fingerprint", record.fingerprint.as_str())
        .value("saga_id", record.saga_id.as_str())
        .value("order_id", record.order_id.as_str())
        .value("created_at", now)
}

/// The record of `key`, if one exists.
pub async fn get(db: &Db, scope: &str, key: &str) -> Result<Option<KeyRecord>, sqlx::Error> {
    let row = sqlx::query("SELECT fingerprint, saga_id, order_id FROM idempotency_keys WHERE scope = $1 AND key = $2")
        .bind(scope)
        .bind(key)
        .fetch_optional(&db.pool)
        .await?;
    row.map(|r| {
        Ok(KeyRecord {
            fingerprint: r.try_get("fingerprint")?,
            saga_id: r.try_get("saga_id")?,
            order_id: r.try_get("order_id")?,
        })
    })
    .transpose()
}

/// True if any record of `scope` exists.
pub async fn any_in_scope(db: &Db, scope: &str) -> Result<bool, sqlx::Error> {
    let row = sqlx::query("SELECT 1 FROM idempotency_keys WHERE scope = $1 LIMIT 1")
        .bind(scope)
        .fetch_optional(&db.pool)
        .await?;
    Ok(row.is_some())
}

/// Deletes the records created before `cutoff` (ms); returns how many.
pub async fn purge(db: &Db, cutoff: i64) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query("DELETE FROM idempotency_keys WHERE created_at < $1")
        .bind(cutoff)
        .execute(&db.pool)
        .await?
        .rows_affected())
}

#[cfg(test)]
mod tests {
    use super::fingerprint;
    use serde_json::json;

    #[test]
    fn fingerprints_ignore_key_order_and_number_spelling() {
        let a = json!({"customer_id": "c", "items": [{"product_id": "p", "quantity": 2}]});
        let b: serde_json::Value =
            serde_json::from_str(r#"{"items":[{"quantity":2.0,"product_id":"p"}], "customer_id":"c"}"#).unwrap();
        assert_eq!(fingerprint(&a), fingerprint(&b));
        let c = json!({"customer_id": "c", "items": [{"product_id": "p", "quantity": 3}]});
        assert_ne!(fingerprint(&a), fingerprint(&c));
    }
}
