//! `/products`: the inventory participant's products and stock.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Value, json};

use super::AppState;
use super::extract::{self, Fields, QueryFields};
use super::problem::{ApiResult, Problem};
use crate::error::FieldError;
use crate::inventory::{NewProduct, Product};
use crate::limits;

/// The API's view of a product.
pub fn view(p: &Product) -> Value {
    json!({
        "id": p.id, "name": p.name, "price_cents": p.price_cents,
        "available": p.available, "reserved": p.reserved, "sold": p.sold,
    })
}

/// `POST /products`: 201 with the product and its `Location`.
pub async fn create(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> ApiResult<Response> {
    let object = extract::json_object(&headers, &body)?;
    let mut errors = Vec::new();
    let mut fields = Fields::new(&object, "", &mut errors);
    let id = fields.id("id");
    let name = fields.string("name", 1, limits::NAME_CHARS);
    let price_cents = fields.integer("price_cents", 0, limits::MAX_PRICE_CENTS);
    let stock = fields.integer("stock", 0, limits::MAX_STOCK);
    let (Some(id), Some(name), Some(price_cents), Some(stock)) = (id, name, price_cents, stock) else {
        return Err(Problem::validation(errors));
    };
    let product = state.inventory.create(&NewProduct { id, name, price_cents, stock }).await?;
    let location = format!("/products/{}", product.id);
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(view(&product))).into_response())
}

/// `GET /products/{id}`.
pub async fn get(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    if !extract::is_id(&id) {
        return Err(extract::no_such("product"));
    }
    Ok(Json(view(&state.inventory.get(&id).await?)))
}

/// `GET /products?limit=&cursor=`: by id, a page at a time.
pub async fn list(
    State(state): State<AppState>,
    Query(params): Query<Vec<(String, String)>>,
) -> ApiResult<Json<Value>> {
    let mut errors = Vec::new();
    let mut query = QueryFields::new(&params, &mut errors);
    let limit = query.limit();
    let cursor = query.id("cursor");
    if !errors.is_empty() {
        return Err(Problem::validation(errors));
    }
    let products = state.inventory.list(cursor.as_deref(), limit + 1).await?;
    Ok(Json(extract::page(products, limit, view, |p| p.id.clone())))
}

/// `POST /products/{id}/restock` `{"quantity"}`: adds to `available`.
pub async fn restock(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    if !extract::is_id(&id) {
        return Err(extract::no_such("product"));
    }
    let object = extract::json_object(&headers, &body)?;
    let mut errors: Vec<FieldError> = Vec::new();
    let quantity = Fields::new(&object, "", &mut errors).integer("quantity", 1, limits::MAX_STOCK);
    let Some(quantity) = quantity else { return Err(Problem::validation(errors)) };
    Ok(Json(view(&state.inventory.restock(&id, quantity).await?)))
}
