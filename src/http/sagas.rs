//! `/sagas`: what operators see of the saga log: each saga's steps and full history.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use bytes::Bytes;
use serde_json::{Value, json};

use super::AppState;
use super::access::Caller;
use super::extract::{self, Fields, QueryFields};
use super::problem::{ApiResult, Problem};
use crate::db::rfc3339;
use crate::error::{Error, FieldError};
use crate::limits;
use crate::saga::state::step_views;
use crate::saga::{Event, Operator, SagaDefinition, SagaFilter, SagaRecord, SagaState};

fn summary(s: &SagaRecord) -> Value {
    json!({
        "id": s.id,
        "kind": s.kind,
        "state": s.state.as_str(),
        "stuck": s.stuck,
        "order_id": s.input.get("order_id"),
        "attempts": s.attempts,
        "last_error": s.last_error,
        "created_at": rfc3339(s.created_at),
        "updated_at": rfc3339(s.updated_at),
    })
}

/// Each step's state, attempts and times, folded from the saga's events.
fn steps(saga: &SagaRecord, def: Option<&SagaDefinition>, events: &[Event]) -> Vec<Value> {
    let names: Vec<String> = match def {
        Some(def) => def.steps.iter().map(|s| s.name.to_string()).collect(),
        None => {
            let mut names: Vec<String> = Vec::new();
            for e in events.iter().filter_map(|e| e.step.clone()) {
                if !names.contains(&e) {
                    names.push(e);
                }
            }
            names
        }
    };
    step_views(&names, &saga.position(), events)
        .into_iter()
        .map(|step| {
            json!({
                "name": step.name,
                "state": step.state.as_str(),
                "attempts": step.attempts,
                "started_at": step.started_at.map(rfc3339),
                "finished_at": step.finished_at.map(rfc3339),
                "last_error": step.last_error,
            })
        })
        .collect()
}

/// `GET /sagas/{id}`: the saga, its steps and its events.
pub async fn get(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    if !limits::is_uuid(&id) {
        return Err(extract::no_such("saga"));
    }
    detail(&state, &id).await
}

/// The saga body: the summary, the steps and the whole history.
async fn detail(state: &AppState, id: &str) -> ApiResult<Json<Value>> {
    let (saga, events) =
        state.engine.saga(id).await.map_err(Error::from)?.ok_or_else(|| Error::NotFound(format!("saga {id:?}")))?;
    let def = state.engine.definition(&saga.kind, saga.version);
    let mut body = summary(&saga);
    body["steps"] = Value::Array(steps(&saga, def, &events));
    body["events"] = events
        .iter()
        .map(|e| json!({ "seq": e.seq, "at": rfc3339(e.at), "step": e.step, "event": e.kind.as_str(), "detail": e.detail }))
        .collect();
    Ok(Json(body))
}

/// `POST /sagas/{id}/retry`: the saga's current step is attempted now.
pub async fn retry(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    if !limits::is_uuid(&id) {
        return Err(extract::no_such("saga"));
    }
    let by = operator(&caller, &headers, &body)?;
    state.engine.retry(&id, &by).await.map_err(Error::from)?;
    detail(&state, &id).await
}

/// `POST /sagas/{id}/abort`: a saga short of its pivot turns backward now.
pub async fn abort(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    if !limits::is_uuid(&id) {
        return Err(extract::no_such("saga"));
    }
    let by = operator(&caller, &headers, &body)?;
    state.engine.abort(&id, &by).await.map_err(Error::from)?;
    detail(&state, &id).await
}

/// `POST /sagas/retry?state=&kind=&stuck=`: retries every unfinished saga that matches.
pub async fn retry_matching(
    State(state): State<AppState>,
    caller: Caller,
    Query(params): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let mut errors = Vec::new();
    let filter = filter(&mut QueryFields::new(&params, &mut errors));
    let by = operator(&caller, &headers, &body);
    if !errors.is_empty() {
        return Err(Problem::validation(errors));
    }
    let retried = state.engine.retry_matching(&filter, &by?).await.map_err(Error::from)?;
    Ok(Json(json!({ "retried": retried })))
}

/// Who asks for an operator action and why: the authenticated principal, or with
/// authentication off the body's `actor`; the body's `reason` always.
fn operator(caller: &Caller, headers: &HeaderMap, body: &Bytes) -> ApiResult<Operator> {
    let object = extract::json_object(headers, body)?;
    let mut errors = Vec::new();
    let mut fields = Fields::new(&object, "", &mut errors);
    // With authentication on the body's actor is ignored, but one that is there is still held to
    // the spec's schema: turning authentication on must not widen what is accepted.
    let stated = match caller.principal() {
        Some(_) if object.get("actor").is_none_or(Value::is_null) => None,
        _ => fields.string("actor", 1, limits::ACTOR_CHARS),
    };
    let reason = fields.string("reason", 1, limits::REASON_CHARS);
    for (name, value) in [("actor", &stated), ("reason", &reason)] {
        if value.as_deref().is_some_and(limits::is_blank) {
            errors.push(FieldError::new(name, "must not be blank"));
        }
    }
    let actor = caller.principal().map(str::to_string).or(stated);
    match (actor, reason) {
        (Some(actor), Some(reason)) if errors.is_empty() => Ok(Operator { actor, reason }),
        _ => Err(Problem::validation(errors)),
    }
}

/// `GET /sagas?state=&kind=&stuck=&limit=&cursor=`: newest first.
pub async fn list(
    State(state): State<AppState>,
    Query(params): Query<Vec<(String, String)>>,
) -> ApiResult<Json<Value>> {
    let mut errors = Vec::new();
    let mut query = QueryFields::new(&params, &mut errors);
    let limit = query.limit();
    let mut filter = filter(&mut query);
    if !errors.is_empty() {
        return Err(Problem::validation(errors));
    }
    filter.limit = limit + 1;
    let sagas = state.engine.list(&filter).await.map_err(Error::from)?;
    Ok(Json(extract::page(sagas, limit, summary, |s| s.id.clone())))
}

/// The `state`, `kind`, `stuck` and `cursor` filters of a saga listing.
fn filter(query: &mut QueryFields) -> SagaFilter {
    let state = query.choice("state", SagaState::parse, "running, compensating, completed, compensated");
    let stuck = query.choice(
        "stuck",
        |s| match s {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        },
        "true, false",
    );
    SagaFilter { state, kind: query.id("kind"), stuck, before: query.uuid("cursor"), limit: 0 }
}
