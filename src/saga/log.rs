//! The saga log's storage: the `sagas` rows the engine resumes from and the append-only
//! `saga_events` history (docs/design.md, "The log"). Every write that records progress is
//! fenced by the saga's generation. What the rows' values mean, and which changes are legal,
//! is [`super::state`]'s business; this module only reads and writes them.

use std::sync::Arc;

use serde_json::{Map, Value};
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use super::state::EventKind;
pub use super::state::SagaState;
use crate::db::{Backend, Db};
use crate::insert::Insert;
use crate::sql::Sql;

/// A `sagas` row.
#[derive(Debug, Clone)]
pub struct SagaRecord {
    /// The saga's id (a UUIDv7, so ids sort by creation time).
    pub id: String,
    /// Which definition runs it.
    pub kind: String,
    /// Which version of that definition.
    pub version: i64,
    /// Where it stands.
    pub state: SagaState,
    /// Flagged when one step has failed `STUCK_AFTER_ATTEMPTS` times in a row.
    pub stuck: bool,
    /// The input it was started with (shared: it never changes).
    pub input: Arc<Value>,
    /// Outputs of the steps that succeeded, by step name (shared with the steps that read them;
    /// copied only when a new output is added).
    pub outputs: Arc<Map<String, Value>>,
    /// Why it compensates.
    pub failure: Option<Arc<Value>>,
    /// Running: the next step to run. Compensating: how many steps are still to undo.
    pub current_step: i64,
    /// Failed attempts of the current step.
    pub attempts: i64,
    /// The last failed attempt's error.
    pub last_error: Option<String>,
    /// The seq of the next event.
    pub next_seq: i64,
    /// The instance driving it.
    pub owner: Option<String>,
    /// When the owner's lease runs out (ms since epoch).
    pub lease_expires_at: i64,
    /// Fencing token, bumped by every claim.
    pub generation: i64,
    /// Past this time a saga not yet past its pivot compensates.
    pub deadline_at: i64,
    /// When it was written ahead.
    pub created_at: i64,
    /// When it last changed.
    pub updated_at: i64,
}

/// One `saga_events` row.
#[derive(Debug, Clone)]
pub struct Event {
    /// Position in the saga's history, from 0.
    pub seq: i64,
    /// The step it concerns; `None` for saga-level events.
    pub step: Option<String>,
    /// What happened.
    pub kind: EventKind,
    /// An error message or other detail.
    pub detail: Option<String>,
    /// When (ms since epoch).
    pub at: i64,
}

/// An event to append, before it has a seq.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// The step it concerns, if any.
    pub step: Option<&'static str>,
    /// What happened.
    pub kind: EventKind,
    /// Detail, if any.
    pub detail: Option<String>,
}

/// Errors of a fenced log write.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Another claim bumped the generation: this instance no longer owns the saga.
    #[error("lease lost: the saga's generation moved on")]
    LeaseLost,
    /// The log database failed.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

const COLUMNS: &str = "id, kind, version, state, stuck, input, outputs, failure, current_step, attempts, \
     last_error, next_seq, owner, lease_expires_at, generation, deadline_at, created_at, updated_at";

fn decode(row: &AnyRow) -> Result<SagaRecord, sqlx::Error> {
    let json = |col: &str| -> Result<Option<Value>, sqlx::Error> {
        let text: Option<String> = row.try_get(col)?;
        text.map(|t| serde_json::from_str(&t).map_err(|e| sqlx::Error::Decode(Box::new(e)))).transpose()
    };
    let state: String = row.try_get("state")?;
    Ok(SagaRecord {
        id: row.try_get("id")?,
        kind: row.try_get("kind")?,
        version: row.try_get("version")?,
        state: SagaState::parse(&state)
            .ok_or_else(|| sqlx::Error::Decode(format!("unknown saga state {state:?}").into()))?,
        stuck: row.try_get::<i64, _>("stuck")? != 0,
        input: Arc::new(json("input")?.unwrap_or(Value::Null)),
        outputs: Arc::new(match json("outputs")? {
            Some(Value::Object(map)) => map,
            _ => Map::new(),
        }),
        failure: json("failure")?.map(Arc::new),
        current_step: row.try_get("current_step")?,
        attempts: row.try_get("attempts")?,
        last_error: row.try_get("last_error")?,
        next_seq: row.try_get("next_seq")?,
        owner: row.try_get("owner")?,
        lease_expires_at: row.try_get("lease_expires_at")?,
        generation: row.try_get("generation")?,
        deadline_at: row.try_get("deadline_at")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// The rows that write a new saga ahead of its first step, owned by `record.owner`: the saga
/// and its `created` event. The caller commits them, with rows of its own, before the first step.
pub fn insert(record: &SagaRecord) -> [Insert; 2] {
    [
        Insert::into("sagas")
            .value("id", record.id.as_str())
            .value("kind", record.kind.as_str())
            .value("version", record.version)
            .value("state", record.state.as_str())
            .value("stuck", false)
            .value("input", record.input.to_string())
            .value("outputs", "{}")
            .value("current_step", 0)
            .value("attempts", 0)
            .value("next_seq", 1)
            .value("owner", record.owner.as_deref())
            .value("lease_expires_at", record.lease_expires_at)
            .value("generation", record.generation)
            .value("deadline_at", record.deadline_at)
            .value("created_at", record.created_at)
            .value("updated_at", record.created_at),
        Insert::into("saga_events")
            .value("saga_id", record.id.as_str())
            .value("seq", 0)
            .value("step", None::<&str>)
            .value("event", EventKind::Created.as_str())
            .value("detail", None::<&str>)
            .value("at", record.created_at),
    ]
}

/// Records `next` (the saga as it now stands) and appends `events`, provided the saga's
/// generation is still `next.generation`. A final state gives up the lease.
pub async fn record(
    conn: &mut AnyConnection,
    next: &mut SagaRecord,
    events: &[NewEvent],
    now: i64,
) -> Result<(), LogError> {
    if write(conn, next, None, events, now).await? { Ok(()) } else { Err(LogError::LeaseLost) }
}

/// Takes the saga over for an operator action: records `next`, whose owner, lease and (bumped)
/// generation are the new owner's, and appends `events`, provided the row still stands where
/// `seen` read it (same generation and next seq). The bumped generation fences the previous
/// driver out at its next write. False when the row had moved on and nothing was written.
pub async fn take_over(
    conn: &mut AnyConnection,
    seen: &SagaRecord,
    next: &mut SagaRecord,
    events: &[NewEvent],
    now: i64,
) -> Result<bool, sqlx::Error> {
    match write(conn, next, Some(seen), events, now).await {
        Ok(written) => Ok(written),
        Err(LogError::Db(error)) => Err(error),
        Err(LogError::LeaseLost) => Ok(false),
    }
}

/// The one fenced write of a saga row and its new events: fenced by `next.generation`, or for
/// a take-over by the generation and next seq of `seen`. False when the fence held it back.
async fn write(
    conn: &mut AnyConnection,
    next: &mut SagaRecord,
    seen: Option<&SagaRecord>,
    events: &[NewEvent],
    now: i64,
) -> Result<bool, LogError> {
    let first_seq = next.next_seq;
    let outputs = serde_json::to_string(&*next.outputs).unwrap_or_else(|_| "{}".into());
    let failure = next.failure.as_ref().map(|f| f.to_string());
    let mut sql = Sql::default();
    // Where the backends differ: on PostgreSQL the events ride on the update, in one round trip,
    // and are written only if the fence let the update through; SQLite runs two statements in
    // the caller's transaction.
    let together = !events.is_empty() && Backend::of(conn) == Backend::Postgres;
    if together {
        sql.push("WITH s AS (");
        push_update(&mut sql, next, seen, &outputs, failure.as_deref(), events.len(), now);
        sql.push(" RETURNING id) INSERT INTO saga_events (saga_id, seq, step, event, detail, at) ")
            .push("SELECT s.id, v.seq, v.step, v.event, v.detail, v.at FROM s, (VALUES ");
        push_events(&mut sql, None, first_seq, events, now);
        sql.push(") AS v (seq, step, event, detail, at)");
    } else {
        push_update(&mut sql, next, seen, &outputs, failure.as_deref(), events.len(), now);
    }
    if sql.query().execute(&mut *conn).await?.rows_affected() == 0 {
        return Ok(false);
    }
    if !together && !events.is_empty() {
        let mut insert = Sql::new("INSERT INTO saga_events (saga_id, seq, step, event, detail, at) VALUES ");
        push_events(&mut insert, Some(&next.id), first_seq, events, now);
        insert.query().execute(&mut *conn).await?;
    }
    next.next_seq = first_seq + events.len() as i64;
    next.updated_at = now;
    if next.state.is_final() {
        next.owner = None;
        next.lease_expires_at = 0;
    }
    Ok(true)
}

/// The fenced update of a saga row to `next`, with `appended` events taking the next seqs; a
/// take-over (`seen` set) also moves the owner, lease and generation.
fn push_update<'a>(
    sql: &mut Sql<'a>,
    next: &'a SagaRecord,
    seen: Option<&'a SagaRecord>,
    outputs: &'a str,
    failure: Option<&'a str>,
    appended: usize,
    now: i64,
) {
    sql.push("UPDATE sagas SET state = ")
        .bind(next.state.as_str())
        .push(", stuck = ")
        .bind(next.stuck)
        .push(", outputs = ")
        .bind(outputs)
        .push(", failure = ")
        .bind(failure)
        .push(", current_step = ")
        .bind(next.current_step)
        .push(", attempts = ")
        .bind(next.attempts)
        .push(", last_error = ")
        .bind(next.last_error.as_deref())
        .push(", next_seq = ")
        .bind(next.next_seq + appended as i64)
        .push(", updated_at = ")
        .bind(now);
    if next.state.is_final() {
        sql.push(", owner = NULL, lease_expires_at = 0");
    } else if seen.is_some() {
        sql.push(", owner = ")
            .bind(next.owner.as_deref())
            .push(", lease_expires_at = ")
            .bind(next.lease_expires_at)
            .push(", generation = ")
            .bind(next.generation);
    }
    sql.push(" WHERE id = ").bind(next.id.as_str());
    match seen {
        None => sql.push(" AND generation = ").bind(next.generation),
        Some(seen) => sql.push(" AND generation = ").bind(seen.generation).push(" AND next_seq = ").bind(seen.next_seq),
    };
}

/// The events as rows of a VALUES list: `(saga_id, seq, step, event, detail, at)`, or without
/// the saga id when `saga_id` is `None` (the update's RETURNING supplies it).
fn push_events<'a>(sql: &mut Sql<'a>, saga_id: Option<&'a str>, first_seq: i64, events: &'a [NewEvent], now: i64) {
    sql.join(events.iter().enumerate(), ", ", |sql, (i, e)| {
        sql.push("(");
        if let Some(id) = saga_id {
            sql.bind(id).push(", ");
        }
        sql.bind(first_seq + i as i64)
            .push(", ")
            .bind(e.step)
            .push(", ")
            .bind(e.kind.as_str())
            .push(", ")
            .bind(e.detail.as_deref())
            .push(", ")
            .bind(now)
            .push(")");
    });
}

/// Reads one saga.
pub async fn get(db: &Db, id: &str) -> Result<Option<SagaRecord>, sqlx::Error> {
    let row =
        sqlx::query(&format!("SELECT {COLUMNS} FROM sagas WHERE id = $1")).bind(id).fetch_optional(&db.pool).await?;
    row.as_ref().map(decode).transpose()
}

/// Reads a saga's whole history, oldest first.
pub async fn events(db: &Db, id: &str) -> Result<Vec<Event>, sqlx::Error> {
    let rows = sqlx::query("SELECT seq, step, event, detail, at FROM saga_events WHERE saga_id = $1 ORDER BY seq")
        .bind(id)
        .fetch_all(&db.pool)
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Event {
                seq: r.try_get("seq")?,
                step: r.try_get("step")?,
                kind: EventKind::parse(&r.try_get::<String, _>("event")?),
                detail: r.try_get("detail")?,
                at: r.try_get("at")?,
            })
        })
        .collect()
}

/// Which sagas a listing returns.
#[derive(Debug, Default, Clone)]
pub struct SagaFilter {
    /// Only sagas in this state.
    pub state: Option<SagaState>,
    /// Only sagas of this kind.
    pub kind: Option<String>,
    /// Only stuck (or only not stuck) sagas.
    pub stuck: Option<bool>,
    /// Only sagas with an id below this one (the previous page's last id).
    pub before: Option<String>,
    /// At most this many.
    pub limit: i64,
}

/// Lists sagas, newest first.
pub async fn list(db: &Db, filter: &SagaFilter) -> Result<Vec<SagaRecord>, sqlx::Error> {
    let sql = format!(
        "SELECT {COLUMNS} FROM sagas WHERE ($1 IS NULL OR state = $1) AND ($2 IS NULL OR kind = $2) \
         AND ($3 IS NULL OR stuck = $3) AND ($4 IS NULL OR id < $4) ORDER BY id DESC LIMIT $5"
    );
    let rows = sqlx::query(&sql)
        .bind(filter.state.map(SagaState::as_str))
        .bind(&filter.kind)
        .bind(filter.stuck.map(i64::from))
        .bind(&filter.before)
        .bind(filter.limit)
        .fetch_all(&db.pool)
        .await?;
    rows.iter().map(decode).collect()
}

/// Claims up to `limit` unfinished sagas whose lease has expired, among the (kind, version)
/// pairs in `known` (an instance never takes a saga it cannot run): takes ownership and bumps
/// the generation, so that any earlier owner's log writes fail. Returns each claimed saga's
/// (id, generation, kind).
pub async fn claim_expired(
    db: &Db,
    owner: &str,
    now: i64,
    lease_until: i64,
    limit: i64,
    known: &[(&str, i64)],
) -> Result<Vec<(String, i64, String)>, sqlx::Error> {
    if known.is_empty() {
        return Ok(Vec::new());
    }
    let mut sql = Sql::new("UPDATE sagas SET owner = ");
    sql.bind(owner)
        .push(", generation = generation + 1, lease_expires_at = ")
        .bind(lease_until)
        .push(", updated_at = ")
        .bind(now)
        .push(" WHERE id IN (SELECT id FROM sagas WHERE state IN ('running', 'compensating') AND lease_expires_at < ")
        .bind(now)
        .push(" AND (")
        .join(known, " OR ", |sql, (kind, version)| {
            sql.push("(kind = ").bind(*kind).push(" AND version = ").bind(*version).push(")");
        })
        .push(") ORDER BY lease_expires_at LIMIT ")
        .bind(limit)
        .push(match db.backend {
            // Where the backends differ: several instances claim at once, each skipping the
            // rows another is claiming; SQLite has one instance and one connection, so the
            // statement is already exclusive.
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        })
        .push(") RETURNING id, generation, kind");
    let query = sql.query();
    let rows = query.fetch_all(&db.pool).await?;
    rows.iter().map(|r| Ok((r.try_get("id")?, r.try_get("generation")?, r.try_get("kind")?))).collect()
}

/// Unfinished sagas by kind: (kind, how many, how many of them stuck).
pub async fn unfinished_by_kind(db: &Db) -> Result<Vec<(String, i64, i64)>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT kind, COUNT(*) AS n, CAST(COALESCE(SUM(stuck), 0) AS BIGINT) AS stuck FROM sagas \
         WHERE state IN ('running', 'compensating') GROUP BY kind",
    )
    .fetch_all(&db.pool)
    .await?;
    rows.iter().map(|r| Ok((r.try_get("kind")?, r.try_get("n")?, r.try_get("stuck")?))).collect()
}

/// Extends the leases `owner` holds on the sagas in `ids` (the ones it is driving): one write
/// per instance and heartbeat (per 500 sagas), not one per saga and step.
pub async fn renew_leases(db: &Db, owner: &str, lease_until: i64, ids: &[String]) -> Result<u64, sqlx::Error> {
    let mut renewed = 0;
    for chunk in ids.chunks(500) {
        let mut sql = Sql::new("UPDATE sagas SET lease_expires_at = ");
        sql.bind(lease_until)
            .push(" WHERE owner = ")
            .bind(owner)
            .push(" AND state IN ('running', 'compensating') AND id IN ")
            .tuple(chunk);
        renewed += sql.query().execute(&db.pool).await?.rows_affected();
    }
    Ok(renewed)
}

/// Gives up `owner`'s leases so that another instance (or the next start) resumes at once.
pub async fn release_leases(db: &Db, owner: &str) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE sagas SET owner = NULL, lease_expires_at = 0 WHERE owner = $1 AND state IN ('running', 'compensating')",
    )
    .bind(owner)
    .execute(&db.pool)
    .await?;
    Ok(done.rows_affected())
}

/// Gives up the lease of one saga, if `generation` still owns it; no instance claims it again
/// before `until` (ms; 0 for at once).
pub async fn release_one(db: &Db, id: &str, generation: i64, until: i64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE sagas SET owner = NULL, lease_expires_at = $3 WHERE id = $1 AND generation = $2")
        .bind(id)
        .bind(generation)
        .bind(until)
        .execute(&db.pool)
        .await?;
    Ok(())
}
