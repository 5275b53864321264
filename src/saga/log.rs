//! The saga log: the `sagas` rows the engine resumes from and the append-only `saga_events`
//! history. Every write that records progress is fenced by the saga's generation.

use std::sync::Arc;

use serde_json::{Map, Value};
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use crate::db::{Backend, Db};
use crate::insert::Insert;

/// Where a saga stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SagaState {
    /// Going forward through its steps.
    Running,
    /// Going backward through the compensations.
    Compensating,
    /// Every step succeeded.
    Completed,
    /// Every compensation succeeded.
    Compensated,
}

impl SagaState {
    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            SagaState::Running => "running",
            SagaState::Compensating => "compensating",
            SagaState::Completed => "completed",
            SagaState::Compensated => "compensated",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "running" => SagaState::Running,
            "compensating" => SagaState::Compensating,
            "completed" => SagaState::Completed,
            "compensated" => SagaState::Compensated,
            _ => return None,
        })
    }

    /// True for `completed` and `compensated`: nothing is left to do.
    pub fn is_final(self) -> bool {
        matches!(self, SagaState::Completed | SagaState::Compensated)
    }
}

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
    /// Outputs of the steps that succeeded, by step name.
    pub outputs: Map<String, Value>,
    /// Why it compensates.
    pub failure: Option<Value>,
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
    /// What happened: `created`, `succeeded`, `failed`, `compensating`, `compensated`, ...
    pub event: String,
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
    pub event: &'static str,
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
        outputs: match json("outputs")? {
            Some(Value::Object(map)) => map,
            _ => Map::new(),
        },
        failure: json("failure")?,
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
        Insert::new(
            "INSERT INTO sagas (id, kind, version, state, stuck, input, outputs, failure, current_step, \
             attempts, last_error, next_seq, owner, lease_expires_at, generation, deadline_at, created_at, \
             updated_at) VALUES ($1, $2, $3, $4, 0, $5, '{}', NULL, 0, 0, NULL, 1, $6, $7, $8, $9, $10, $10)",
        )
        .text(Some(record.id.as_str()))
        .text(Some(record.kind.as_str()))
        .int(Some(record.version))
        .text(Some(record.state.as_str()))
        .text(Some(record.input.to_string()))
        .text(record.owner.as_deref())
        .int(Some(record.lease_expires_at))
        .int(Some(record.generation))
        .int(Some(record.deadline_at))
        .int(Some(record.created_at)),
        Insert::new(
            "INSERT INTO saga_events (saga_id, seq, step, event, detail, at) VALUES ($1, 0, NULL, 'created', NULL, $2)",
        )
        .text(Some(record.id.as_str()))
        .int(Some(record.created_at)),
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
    let first_seq = next.next_seq;
    let final_state = next.state.is_final();
    const UPDATE: &str = "UPDATE sagas SET state = $1, stuck = $2, outputs = $3, failure = $4, current_step = $5, \
         attempts = $6, last_error = $7, next_seq = $8, updated_at = $9, \
         owner = CASE WHEN $10 = 1 THEN NULL ELSE owner END, \
         lease_expires_at = CASE WHEN $10 = 1 THEN 0 ELSE lease_expires_at END \
         WHERE id = $11 AND generation = $12";
    // On PostgreSQL the events ride on the update: one round trip, and they are written only if
    // the fence let the update through.
    let together = !events.is_empty() && conn.backend_name() == "PostgreSQL";
    let sql = if together {
        let values: Vec<String> = (0..events.len())
            .map(|i| {
                let p = 13 + 4 * i;
                format!("(${}, ${}, ${}, ${})", p, p + 1, p + 2, p + 3)
            })
            .collect();
        format!(
            "WITH s AS ({UPDATE} RETURNING id) INSERT INTO saga_events (saga_id, seq, step, event, detail, at) \
             SELECT s.id, v.seq, v.step, v.event, v.detail, $9 FROM s, (VALUES {}) AS v (seq, step, event, detail)",
            values.join(", ")
        )
    } else {
        UPDATE.to_string()
    };
    let mut query = sqlx::query(&sql)
        .bind(next.state.as_str())
        .bind(i64::from(next.stuck))
        .bind(serde_json::to_string(&next.outputs).unwrap_or_else(|_| "{}".into()))
        .bind(next.failure.as_ref().map(Value::to_string))
        .bind(next.current_step)
        .bind(next.attempts)
        .bind(&next.last_error)
        .bind(first_seq + events.len() as i64)
        .bind(now)
        .bind(i64::from(final_state))
        .bind(&next.id)
        .bind(next.generation);
    if together {
        query = bind_events(query, first_seq, events);
    }
    if query.execute(&mut *conn).await?.rows_affected() == 0 {
        return Err(LogError::LeaseLost);
    }
    if !together && !events.is_empty() {
        // One statement for all of a write's events.
        let values: Vec<String> = (0..events.len())
            .map(|i| {
                let p = 3 + 4 * i;
                format!("($1, ${}, ${}, ${}, ${}, $2)", p, p + 1, p + 2, p + 3)
            })
            .collect();
        let sql =
            format!("INSERT INTO saga_events (saga_id, seq, step, event, detail, at) VALUES {}", values.join(", "));
        bind_events(sqlx::query(&sql).bind(&next.id).bind(now), first_seq, events).execute(&mut *conn).await?;
    }
    next.next_seq = first_seq + events.len() as i64;
    next.updated_at = now;
    if final_state {
        next.owner = None;
        next.lease_expires_at = 0;
    }
    Ok(())
}

/// Binds each event's seq, step, event and detail, in order.
fn bind_events<'q>(
    mut query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    first_seq: i64,
    events: &'q [NewEvent],
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    for (i, e) in events.iter().enumerate() {
        query = query.bind(first_seq + i as i64).bind(e.step).bind(e.event).bind(&e.detail);
    }
    query
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
                event: r.try_get("event")?,
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
/// the generation, so that any earlier owner's log writes fail. Returns (id, generation) pairs.
pub async fn claim_expired(
    db: &Db,
    owner: &str,
    now: i64,
    lease_until: i64,
    limit: i64,
    known: &[(&str, i64)],
) -> Result<Vec<(String, i64)>, sqlx::Error> {
    if known.is_empty() {
        return Ok(Vec::new());
    }
    let lock = match db.backend {
        // Several instances claim at once; each skips the rows another is claiming.
        Backend::Postgres => "FOR UPDATE SKIP LOCKED",
        // One instance, one connection: the statement is already exclusive.
        Backend::Sqlite => "",
    };
    let versions: Vec<String> =
        (0..known.len()).map(|i| format!("(kind = ${} AND version = ${})", 5 + 2 * i, 6 + 2 * i)).collect();
    let sql = format!(
        "UPDATE sagas SET owner = $1, generation = generation + 1, lease_expires_at = $2, updated_at = $3 \
         WHERE id IN (SELECT id FROM sagas WHERE state IN ('running', 'compensating') \
         AND lease_expires_at < $3 AND ({}) ORDER BY lease_expires_at LIMIT $4 {lock}) RETURNING id, generation",
        versions.join(" OR ")
    );
    let mut query = sqlx::query(&sql).bind(owner).bind(lease_until).bind(now).bind(limit);
    for (kind, version) in known {
        query = query.bind(*kind).bind(*version);
    }
    let rows = query.fetch_all(&db.pool).await?;
    rows.iter().map(|r| Ok((r.try_get("id")?, r.try_get("generation")?))).collect()
}

/// Extends the leases `owner` holds on the sagas in `ids` (the ones it is driving): one write
/// per instance and heartbeat (per 500 sagas), not one per saga and step.
pub async fn renew_leases(db: &Db, owner: &str, lease_until: i64, ids: &[String]) -> Result<u64, sqlx::Error> {
    let mut renewed = 0;
    for chunk in ids.chunks(500) {
        let placeholders: Vec<String> = (0..chunk.len()).map(|i| format!("${}", i + 3)).collect();
        let sql = format!(
            "UPDATE sagas SET lease_expires_at = $1 WHERE owner = $2 AND state IN ('running', 'compensating') \
             AND id IN ({})",
            placeholders.join(", ")
        );
        let mut query = sqlx::query(&sql).bind(lease_until).bind(owner);
        for id in chunk {
            query = query.bind(id);
        }
        renewed += query.execute(&db.pool).await?.rows_affected();
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
