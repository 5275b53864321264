//! The live-progress poller's reads of the saga log: new events of the watched sagas, and for
//! the global feed the unfinished sagas, the recently created ones and their summaries. Every
//! statement uses an existing index (the `saga_events` key, the `sagas_unfinished` partial
//! index, the `sagas` key); none adds work to a saga's writes.

use std::sync::Arc;

use serde_json::Value;
use sqlx::Row;

use crate::db::Db;
use crate::saga::{Event, EventKind, SagaState};
use crate::sql::Sql;

/// The events of each `(saga, from)` with `seq >= from`, ordered by saga and seq: one
/// statement, a range of the `saga_events` key per saga.
pub async fn events_since(db: &Db, from: &[(&str, i64)]) -> Result<Vec<(String, Event)>, sqlx::Error> {
    if from.is_empty() {
        return Ok(Vec::new());
    }
    let mut sql = Sql::new("SELECT saga_id, seq, step, event, detail, at FROM saga_events WHERE ");
    sql.join(from.iter(), " OR ", |sql, (id, seq)| {
        sql.push("(saga_id = ").bind(*id).push(" AND seq >= ").bind(*seq).push(")");
    })
    .push(" ORDER BY saga_id, seq");
    let rows = sql.query().fetch_all(&db.pool).await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get("saga_id")?,
                Event {
                    seq: r.try_get("seq")?,
                    step: r.try_get("step")?,
                    kind: EventKind::parse(&r.try_get::<String, _>("event")?),
                    detail: r.try_get("detail")?,
                    at: r.try_get("at")?,
                },
            ))
        })
        .collect()
}

/// Every unfinished saga's (id, next_seq), through the `sagas_unfinished` partial index.
pub async fn unfinished(db: &Db) -> Result<Vec<(String, i64)>, sqlx::Error> {
    let rows = sqlx::query("SELECT id, next_seq FROM sagas WHERE state IN ('running', 'compensating')")
        .fetch_all(&db.pool)
        .await?;
    rows.iter().map(|r| Ok((r.try_get("id")?, r.try_get("next_seq")?))).collect()
}

/// The (id, next_seq) of every saga whose id is at least `from`: as ids are UUIDv7, the sagas
/// created (by their creator's clock) since the time `from` encodes; a range of the key.
pub async fn created_since(db: &Db, from: &str) -> Result<Vec<(String, i64)>, sqlx::Error> {
    let rows = sqlx::query("SELECT id, next_seq FROM sagas WHERE id >= $1").bind(from).fetch_all(&db.pool).await?;
    rows.iter().map(|r| Ok((r.try_get("id")?, r.try_get("next_seq")?))).collect()
}

/// What the global feed shows of a saga: the summary of `GET /sagas` and its `next_seq`.
#[derive(Debug, Clone)]
pub struct SagaSummary {
    /// The saga's id.
    pub id: String,
    /// Its kind.
    pub kind: String,
    /// Where it stands.
    pub state: SagaState,
    /// Flagged stuck.
    pub stuck: bool,
    /// Its input (the order's id is in it).
    pub input: Arc<Value>,
    /// Failed attempts of its current step.
    pub attempts: i64,
    /// The last failed attempt's error.
    pub last_error: Option<String>,
    /// The seq of its next event: how long its history is.
    pub next_seq: i64,
    /// When it was written ahead (ms).
    pub created_at: i64,
    /// When it last changed (ms).
    pub updated_at: i64,
}

/// The summaries of the sagas in `ids`, by key.
pub async fn summaries(db: &Db, ids: &[&str]) -> Result<Vec<SagaSummary>, sqlx::Error> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut sql = Sql::new(
        "SELECT id, kind, state, stuck, input, attempts, last_error, next_seq, created_at, updated_at \
         FROM sagas WHERE id IN ",
    );
    sql.tuple(ids.iter().copied()).push(" ORDER BY id");
    let rows = sql.query().fetch_all(&db.pool).await?;
    rows.iter()
        .map(|r| {
            let state: String = r.try_get("state")?;
            let input: String = r.try_get("input")?;
            Ok(SagaSummary {
                id: r.try_get("id")?,
                kind: r.try_get("kind")?,
                state: SagaState::parse(&state)
                    .ok_or_else(|| sqlx::Error::Decode(format!("unknown saga state {state:?}").into()))?,
                stuck: r.try_get::<i64, _>("stuck")? != 0,
                input: Arc::new(serde_json::from_str(&input).unwrap_or(Value::Null)),
                attempts: r.try_get("attempts")?,
                last_error: r.try_get("last_error")?,
                next_seq: r.try_get("next_seq")?,
                created_at: r.try_get("created_at")?,
                updated_at: r.try_get("updated_at")?,
            })
        })
        .collect()
}
