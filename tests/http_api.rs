//! The HTTP API through real HTTP: products, request hygiene, orders, idempotency, cancellation,
//! the saga log, operations and the tower-http middleware. Every error answer is checked to be
//! `application/problem+json` with `type`, `title`, `status`, `detail` and `code`.
mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use order_saga::saga::{Fault, FaultInjector, Phase, StepError};
use reqwest::Method;
use serde_json::{Value, json};

/// 2^53 - 1, the largest stock, total or restock the API accepts.
const MAX_SAFE: i64 = 9_007_199_254_740_991;

// ----------------------------------------------------------------------------------------------
// Helpers
// ----------------------------------------------------------------------------------------------

/// A response header as a string, if present.
fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response.headers().get(name).map(|v| v.to_str().expect("an ASCII header").to_string())
}

/// Asserts an RFC 9457 problem answer with `status` and `code`, and returns its body.
async fn problem(response: reqwest::Response, status: u16, code: &str) -> Value {
    let got = response.status().as_u16();
    let content_type = header(&response, "content-type").unwrap_or_default();
    let text = response.text().await.expect("a readable body");
    assert_eq!(got, status, "expected {status} {code}; body: {text}");
    assert!(
        content_type.starts_with("application/problem+json"),
        "an error must be application/problem+json, got {content_type:?}; body: {text}"
    );
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("problem body is not JSON ({e}): {text}"));
    for member in ["type", "title", "detail", "code"] {
        assert!(body[member].as_str().is_some_and(|s| !s.is_empty()), "problem member {member:?} missing: {body}");
    }
    assert_eq!(body["status"], json!(status), "problem status member: {body}");
    assert_eq!(body["code"], json!(code), "problem code: {body}");
    body
}

/// The fields a `validation_failed` problem names, each with a message.
fn fields(problem: &Value) -> Vec<String> {
    let errors = problem["errors"].as_array().unwrap_or_else(|| panic!("validation problem without errors: {problem}"));
    assert!(!errors.is_empty(), "validation problem with an empty errors list: {problem}");
    errors
        .iter()
        .map(|e| {
            assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "field error without message: {e}");
            e["field"].as_str().unwrap_or_else(|| panic!("field error without field: {e}")).to_string()
        })
        .collect()
}

/// Asserts a 422 `validation_failed` that names exactly `expected` (in any order).
async fn invalid(response: reqwest::Response, expected: &[&str], what: &str) -> Value {
    let body = problem(response, 422, "validation_failed").await;
    let mut named = fields(&body);
    named.sort();
    let mut wanted: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    wanted.sort();
    assert_eq!(named, wanted, "fields named for {what}: {body}");
    body
}

/// Asserts a JSON success answer with `status` and returns its body.
async fn success(response: reqwest::Response, status: u16) -> Value {
    let got = response.status().as_u16();
    let content_type = header(&response, "content-type").unwrap_or_default();
    let text = response.text().await.expect("a readable body");
    assert_eq!(got, status, "body: {text}");
    assert!(content_type.starts_with("application/json"), "content-type {content_type:?}; body: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("body is not JSON ({e}): {text}"))
}

/// A request with a raw body and an optional Content-Type.
async fn raw(app: &TestApp, method: Method, path: &str, content_type: Option<&str>, body: String) -> reqwest::Response {
    let mut request = app.client.request(method, app.url(path)).body(body);
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    request.send().await.expect("the request is answered")
}

/// POSTs a JSON body to `/orders` with extra headers.
async fn post_order(app: &TestApp, body: &Value, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = app.client.post(app.url("/orders")).json(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.expect("POST /orders is answered")
}

/// POSTs `/orders/{id}/cancel`.
async fn cancel(app: &TestApp, id: &str) -> reqwest::Response {
    app.client.post(app.url(&format!("/orders/{id}/cancel"))).send().await.expect("cancel is answered")
}

/// Every item of a listing that fits in one page.
async fn one_page(app: &TestApp, path: &str) -> Vec<Value> {
    let page = app.get_json(path).await;
    assert_eq!(page["next_cursor"], Value::Null, "{path} fits in one page: {page}");
    page["items"].as_array().unwrap_or_else(|| panic!("{path} has items: {page}")).clone()
}

/// Walks a listing page by page with `limit`, checking each page's size and cursor.
async fn walk(app: &TestApp, path: &str, limit: usize) -> Vec<Value> {
    let sep = if path.contains('?') { '&' } else { '?' };
    let mut all = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..100 {
        let url = match &cursor {
            Some(c) => format!("{path}{sep}limit={limit}&cursor={c}"),
            None => format!("{path}{sep}limit={limit}"),
        };
        let page = app.get_json(&url).await;
        let items = page["items"].as_array().unwrap_or_else(|| panic!("{url}: {page}")).clone();
        assert!(items.len() <= limit, "{url} returned more than {limit}: {page}");
        all.extend(items.iter().cloned());
        match page["next_cursor"].as_str() {
            Some(next) => {
                assert_eq!(items.len(), limit, "a page with a next_cursor is full: {page}");
                cursor = Some(next.to_string());
            }
            None => {
                assert_eq!(page["next_cursor"], Value::Null, "{url}: {page}");
                return all;
            }
        }
    }
    panic!("{path} did not end within 100 pages");
}

fn ids(items: &[Value]) -> Vec<String> {
    items.iter().map(|i| i["id"].as_str().expect("an id").to_string()).collect()
}

/// (available, reserved, sold) of a product.
async fn stock(app: &TestApp, id: &str) -> (i64, i64, i64) {
    let p = app.get_json(&format!("/products/{id}")).await;
    (p["available"].as_i64().unwrap(), p["reserved"].as_i64().unwrap(), p["sold"].as_i64().unwrap())
}

async fn sagas_of_kind(app: &TestApp, kind: &str) -> Vec<Value> {
    one_page(app, &format!("/sagas?kind={kind}")).await
}

/// Waits until a saga has settled (completed or compensated) and returns it. An order is
/// confirmed at the pivot, before its stock is committed, so stock is checked after this.
async fn settled_saga(app: &TestApp, saga_id: &str) -> Value {
    let path = format!("/sagas/{saga_id}");
    eventually(Duration::from_secs(15), &format!("saga {saga_id} settles"), || async {
        matches!(app.get_json(&path).await["state"].as_str(), Some("completed" | "compensated"))
    })
    .await;
    app.get_json(&path).await
}

/// Asserts that no order and no saga exist.
async fn assert_nothing_placed(app: &TestApp, what: &str) {
    assert!(one_page(app, "/orders").await.is_empty(), "{what}: an order was created");
    assert!(one_page(app, "/sagas").await.is_empty(), "{what}: a saga was started");
}

// ----------------------------------------------------------------------------------------------
// Products
// ----------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn product_is_created_read_and_not_duplicated() {
    let app = spawn_app().await;
    let response =
        app.post("/products", &json!({"id": "sku-a", "name": "Alpha", "price_cents": 1999, "stock": 7})).await;
    assert_eq!(header(&response, "location").as_deref(), Some("/products/sku-a"));
    let created = success(response, 201).await;
    let expected =
        json!({"id": "sku-a", "name": "Alpha", "price_cents": 1999, "available": 7, "reserved": 0, "sold": 0});
    assert_eq!(created, expected);
    assert_eq!(success(app.get("/products/sku-a").await, 200).await, expected);

    // A second create with the same id changes nothing.
    let again = app.post("/products", &json!({"id": "sku-a", "name": "Other", "price_cents": 1, "stock": 1})).await;
    problem(again, 409, "product_exists").await;
    assert_eq!(app.get_json("/products/sku-a").await, expected);

    // The edges of every range are accepted.
    let id64 = format!("Az09._-{}", "x".repeat(57));
    assert_eq!(id64.len(), 64);
    let edge = app
        .post("/products", &json!({"id": id64, "name": "n".repeat(200), "price_cents": 100_000_000, "stock": MAX_SAFE}))
        .await;
    let edge = success(edge, 201).await;
    assert_eq!(edge["available"], json!(MAX_SAFE));
    assert_eq!(edge["price_cents"], json!(100_000_000));
    let zero = app.post("/products", &json!({"id": "free", "name": "Free", "price_cents": 0, "stock": 0})).await;
    assert_eq!(success(zero, 201).await["available"], 0);
    // A whole number written as a float is an integer.
    let float = app.post("/products", &json!({"id": "flt", "name": "F", "price_cents": 5.0, "stock": 2.0})).await;
    assert_eq!(success(float, 201).await["price_cents"], 5);

    problem(app.get("/products/nope").await, 404, "not_found").await;
    problem(app.get("/products/not%20an%20id").await, 404, "not_found").await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn product_validation_names_each_bad_field() {
    let app = spawn_app().await;
    let good = json!({"id": "ok-1", "name": "Fine", "price_cents": 100, "stock": 5});
    let with = |field: &str, value: Value| {
        let mut body = good.clone();
        body[field] = value;
        body
    };
    let without = |field: &str| {
        let mut body = good.clone();
        body.as_object_mut().unwrap().remove(field);
        body
    };
    let cases: Vec<(&str, Value)> = vec![
        ("id", without("id")),
        ("id", with("id", Value::Null)),
        ("id", with("id", json!(""))),
        ("id", with("id", json!("x".repeat(65)))),
        ("id", with("id", json!("has space"))),
        ("id", with("id", json!("slash/id"))),
        ("id", with("id", json!("café"))),
        ("id", with("id", json!(12))),
        ("name", without("name")),
        ("name", with("name", json!(""))),
        ("name", with("name", json!("n".repeat(201)))),
        ("name", with("name", json!(5))),
        ("price_cents", without("price_cents")),
        ("price_cents", with("price_cents", json!(-1))),
        ("price_cents", with("price_cents", json!(100_000_001))),
        ("price_cents", with("price_cents", json!(1.5))),
        ("price_cents", with("price_cents", json!("100"))),
        ("price_cents", with("price_cents", json!(true))),
        ("stock", without("stock")),
        ("stock", with("stock", json!(-1))),
        ("stock", with("stock", json!(MAX_SAFE + 1))),
        ("stock", with("stock", json!(1e300))),
        ("stock", with("stock", json!(2.5))),
        ("stock", with("stock", json!("3"))),
        ("stock", with("stock", json!([3]))),
    ];
    for (field, body) in &cases {
        invalid(app.post("/products", body).await, &[field], &body.to_string()).await;
    }

    // Several bad fields at once: every one is listed.
    let all_bad = json!({"id": "", "name": 3, "price_cents": -5, "stock": "x"});
    invalid(app.post("/products", &all_bad).await, &["id", "name", "price_cents", "stock"], "all bad").await;
    invalid(app.post("/products", &json!({})).await, &["id", "name", "price_cents", "stock"], "empty object").await;
    let two_bad = json!({"id": "fine", "name": "Fine", "price_cents": 100_000_001, "stock": -3});
    invalid(app.post("/products", &two_bad).await, &["price_cents", "stock"], "two bad").await;

    assert!(one_page(&app, "/products").await.is_empty(), "a refused product was created");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn products_paginate_by_cursor_and_refuse_bad_limits() {
    let app = spawn_app().await;
    let mut expected = Vec::new();
    for i in [5, 2, 7, 1, 4, 6, 3] {
        let id = format!("p-{i:02}");
        app.create_product(&id, 100 * i, i).await;
        expected.push(id);
    }
    expected.sort();

    let walked = walk(&app, "/products", 3).await;
    assert_eq!(ids(&walked), expected, "pages of 3 walk every product once, by id");
    assert_eq!(ids(&walk(&app, "/products", 1).await), expected);
    assert_eq!(ids(&walk(&app, "/products", 500).await), expected);
    assert_eq!(ids(&one_page(&app, "/products").await), expected, "the default limit holds 7");
    assert_eq!(
        walked[0],
        json!({"id": "p-01", "name": "Product p-01", "price_cents": 100, "available": 1, "reserved": 0, "sold": 0})
    );

    for limit in ["0", "501", "abc", "-1", "2.5", ""] {
        let response = app.get(&format!("/products?limit={limit}")).await;
        invalid(response, &["limit"], &format!("limit={limit}")).await;
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restock_adds_available_and_refuses_overflow_and_unknown_products() {
    let app = spawn_app().await;
    app.create_product("r-1", 100, 5).await;
    let restocked = success(app.post("/products/r-1/restock", &json!({"quantity": 3})).await, 200).await;
    assert_eq!(restocked["available"], 8);
    assert_eq!(stock(&app, "r-1").await, (8, 0, 0));

    problem(app.post("/products/ghost/restock", &json!({"quantity": 3})).await, 404, "not_found").await;
    for quantity in [json!(0), json!(-2), json!("3"), json!(1.5), json!(MAX_SAFE + 1), Value::Null] {
        let response = app.post("/products/r-1/restock", &json!({"quantity": quantity})).await;
        invalid(response, &["quantity"], &format!("restock {quantity}")).await;
    }
    assert_eq!(stock(&app, "r-1").await, (8, 0, 0), "refused restocks change nothing");

    // Up to exactly 2^53 - 1 in total, and not one more.
    app.create_product("big", 1, MAX_SAFE - 10).await;
    let full = success(app.post("/products/big/restock", &json!({"quantity": 10})).await, 200).await;
    assert_eq!(full["available"], json!(MAX_SAFE));
    invalid(app.post("/products/big/restock", &json!({"quantity": 1})).await, &["quantity"], "past 2^53-1").await;
    assert_eq!(stock(&app, "big").await, (MAX_SAFE, 0, 0));

    // Sold stock counts towards the total too.
    app.create_product("sold", 1, MAX_SAFE - 5).await;
    assert_eq!(app.place_order("c", &[("sold", 3)], None).await.status(), 201);
    assert_eq!(stock(&app, "sold").await, (MAX_SAFE - 8, 0, 3));
    invalid(app.post("/products/sold/restock", &json!({"quantity": 6})).await, &["quantity"], "with sold").await;
    let exact = success(app.post("/products/sold/restock", &json!({"quantity": 5})).await, 200).await;
    assert_eq!(exact["available"], json!(MAX_SAFE - 3));
    assert_stock_invariants(&app, &[("r-1", 8), ("big", MAX_SAFE), ("sold", MAX_SAFE)], true).await;
    app.stop().await;
}

// ----------------------------------------------------------------------------------------------
// Request hygiene
// ----------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_and_media_types_are_refused() {
    let app = spawn_app().await;
    let product = r#"{"id": "h-1", "name": "H", "price_cents": 1, "stock": 1}"#.to_string();
    let json = Some("application/json");

    for path in ["/products", "/orders", "/products/h-1/restock"] {
        problem(raw(&app, Method::POST, path, json, r#"{"id": "#.into()).await, 400, "malformed_json").await;
        problem(raw(&app, Method::POST, path, json, "not json".into()).await, 400, "malformed_json").await;
        problem(raw(&app, Method::POST, path, json, String::new()).await, 400, "malformed_json").await;
    }
    for content_type in [Some("text/plain"), Some("application/x-www-form-urlencoded"), None] {
        let response = raw(&app, Method::POST, "/products", content_type, product.clone()).await;
        problem(response, 415, "unsupported_media_type").await;
        let order = r#"{"customer_id": "c", "items": [{"product_id": "h-1", "quantity": 1}]}"#.to_string();
        problem(raw(&app, Method::POST, "/orders", content_type, order).await, 415, "unsupported_media_type").await;
    }
    // A JSON body that is not an object.
    for body in ["[]", "[1, 2]", "\"text\"", "42", "null"] {
        let response = raw(&app, Method::POST, "/products", json, body.into()).await;
        invalid(response, &["body"], body).await;
        invalid(raw(&app, Method::POST, "/orders", json, body.into()).await, &["body"], body).await;
    }
    assert!(one_page(&app, "/products").await.is_empty());
    assert_nothing_placed(&app, "refused bodies").await;

    // Parameters of the media type are fine.
    let response = raw(&app, Method::POST, "/products", Some("application/json; charset=utf-8"), product).await;
    success(response, 201).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_one_mib_are_refused() {
    let app = spawn_app().await;
    let response = declared_oversized(&app, "/products").await;
    assert!(header(&response, "x-request-id").is_some(), "a 413 has an x-request-id");
    problem(response, 413, "payload_too_large").await;
    problem(declared_oversized(&app, "/orders").await, 413, "payload_too_large").await;
    problem(declared_oversized(&app, "/products/over/restock").await, 413, "payload_too_large").await;
    problem(app.get("/products/over").await, 404, "not_found").await;
    assert_nothing_placed(&app, "oversized bodies").await;

    // Exactly 1 MiB is within the limit.
    let response = raw(&app, Method::POST, "/products", Some("application/json"), padded("exact", MIB)).await;
    success(response, 201).await;
    app.stop().await;
}

/// Sends a `POST` with a body of 1 MiB + 1 byte, written in full before anything is read (as
/// most clients do), and reads the answer. The server answers 413 from the declared length,
/// drains the body it did not read (src/http/early.rs) and closes, so the client neither hangs
/// nor meets a reset.
async fn declared_oversized(app: &TestApp, path: &str) -> reqwest::Response {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let authority = app.base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(authority).await.expect("connect to the service");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        MIB + 1
    );
    let mut request = head.into_bytes();
    request.resize(request.len() + MIB + 1, b' ');
    tokio::time::timeout(Duration::from_secs(10), stream.write_all(&request))
        .await
        .expect("the server takes the body")
        .expect("send the request");
    let mut answer = Vec::new();
    // The server closes after its answer (it says Connection: close), which ends this read.
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("the server answers and closes")
        .expect("read the answer: the connection is closed in order, not reset");
    let text = String::from_utf8(answer).expect("an ASCII answer");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no end of head in {text:?}"));
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let mut builder = axum::http::Response::builder().status(status);
    for line in lines {
        let (name, value) = line.split_once(':').unwrap_or_else(|| panic!("bad header line {line:?}"));
        assert!(!(name.eq_ignore_ascii_case("transfer-encoding")), "a 413 answer has a known length, not {line:?}");
        builder = builder.header(name.trim(), value.trim());
    }
    reqwest::Response::from(builder.body(body.to_string()).expect("a response"))
}

const MIB: usize = 1024 * 1024;

/// A product body padded with white space to `len` bytes.
fn padded(id: &str, len: usize) -> String {
    let head = format!(r#"{{"id": "{id}", "name": "Big", "price_cents": 1, "stock": 1}}"#);
    format!("{head}{}", " ".repeat(len - head.len()))
}

/// A 413 sent before the body was read is followed by the server closing the connection; the
/// answer must say so (`Connection: close`), or a keep-alive client puts the connection back in
/// its pool and its next request on it fails (hyper: IncompleteMessage).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_413_announces_the_close() {
    let app = spawn_app().await;
    let response = declared_oversized(&app, "/products").await;
    let connection = header(&response, "connection").unwrap_or_default().to_ascii_lowercase();
    problem(response, 413, "payload_too_large").await;
    assert!(connection.contains("close"), "a 413 that leaves the body unread says Connection: close: {connection:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_and_wrong_methods_are_problems() {
    let app = spawn_app().await;
    problem(app.get("/nope").await, 404, "not_found").await;
    problem(app.get("/products/a/b/c").await, 404, "not_found").await;
    problem(raw(&app, Method::POST, "/nope", Some("application/json"), "{}".into()).await, 404, "not_found").await;

    for (method, path, allowed) in [
        (Method::DELETE, "/products", &["GET", "POST"][..]),
        (Method::PUT, "/products/x", &["GET"][..]),
        (Method::GET, "/products/x/restock", &["POST"][..]),
        (Method::PATCH, "/orders", &["GET", "POST"][..]),
        (Method::DELETE, "/orders/x", &["GET"][..]),
        (Method::GET, "/orders/x/cancel", &["POST"][..]),
        (Method::POST, "/sagas", &["GET"][..]),
        (Method::POST, "/healthz", &["GET"][..]),
    ] {
        let response = raw(&app, method.clone(), path, Some("application/json"), "{}".into()).await;
        let allow = header(&response, "allow").unwrap_or_default().to_ascii_uppercase();
        problem(response, 405, "method_not_allowed").await;
        for m in allowed {
            assert!(allow.contains(m), "405 on {method} {path}: Allow {allow:?} lacks {m}");
        }
    }
    app.stop().await;
}

// ----------------------------------------------------------------------------------------------
// Orders
// ----------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_is_confirmed_with_location_prices_and_total() {
    let app = spawn_app().await;
    app.create_product("o-a", 250, 10).await;
    app.create_product("o-b", 1000, 5).await;
    let response = app.place_order("cust-1", &[("o-b", 2), ("o-a", 3)], None).await;
    let location = header(&response, "location");
    assert_eq!(header(&response, "idempotent-replayed"), None);
    let order = success(response, 201).await;
    let id = order["id"].as_str().expect("an order id");
    assert_eq!(location, Some(format!("/orders/{id}")));
    assert_eq!(order["status"], "confirmed");
    assert_eq!(order["customer_id"], "cust-1");
    assert_eq!(order["total_cents"], 3 * 250 + 2 * 1000);
    assert_eq!(order["failure"], Value::Null);
    assert!(order["saga_id"].as_str().is_some_and(|s| !s.is_empty()));
    let items = order["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    for (product, quantity, price) in [("o-a", 3, 250), ("o-b", 2, 1000)] {
        let item = items.iter().find(|i| i["product_id"] == product).unwrap_or_else(|| panic!("{product} in {order}"));
        assert_eq!(item["quantity"], quantity);
        assert_eq!(item["unit_price_cents"], price);
    }
    // The 201 is built from what the saga logged, not read back: it must be the stored order.
    let read = app.get_json(&format!("/orders/{id}")).await;
    assert_eq!(read, order, "the 201 body is the order as stored");
    assert_eq!(stock(&app, "o-a").await, (7, 0, 3));
    assert_eq!(stock(&app, "o-b").await, (3, 0, 2));
    assert_stock_invariants(&app, &[("o-a", 10), ("o-b", 5)], true).await;

    // The edges: a 128-character customer, 1,000,000 units, the whole stock.
    app.create_product("o-c", 1, 1_000_000).await;
    let customer = "c".repeat(128);
    let edge = success(app.place_order(&customer, &[("o-c", 1_000_000)], None).await, 201).await;
    assert_eq!(edge["customer_id"], json!(customer));
    assert_eq!(edge["total_cents"], 1_000_000);
    assert_eq!(stock(&app, "o-c").await, (0, 0, 1_000_000));

    problem(app.get("/orders/00000000-0000-0000-0000-000000000000").await, 404, "not_found").await;
    problem(app.get("/orders/nope").await, 404, "not_found").await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insufficient_stock_rejects_the_order_and_takes_nothing() {
    let app = spawn_app().await;
    app.create_product("i-a", 100, 5).await;
    app.create_product("i-b", 200, 1).await;
    let response = app.place_order("cust-i", &[("i-a", 2), ("i-b", 2)], None).await;
    let body = problem(response, 409, "insufficient_stock").await;
    assert_eq!(body["product_id"], "i-b", "{body}");
    let order_id = body["order_id"].as_str().unwrap_or_else(|| panic!("order_id in {body}"));
    let saga_id = body["saga_id"].as_str().unwrap_or_else(|| panic!("saga_id in {body}"));

    let order = app.get_json(&format!("/orders/{order_id}")).await;
    assert_eq!(order["status"], "rejected");
    assert_eq!(order["saga_id"], json!(saga_id));
    assert_eq!(order["failure"]["code"], "insufficient_stock", "{order}");
    assert_eq!(order["total_cents"], Value::Null, "{order}");
    for item in order["items"].as_array().unwrap() {
        assert_eq!(item["unit_price_cents"], Value::Null, "{order}");
    }
    assert_eq!(stock(&app, "i-a").await, (5, 0, 0));
    assert_eq!(stock(&app, "i-b").await, (1, 0, 0));
    assert_stock_invariants(&app, &[("i-a", 5), ("i-b", 1)], true).await;

    // The stock left is still there to take.
    success(app.place_order("cust-i", &[("i-a", 5), ("i-b", 1)], None).await, 201).await;
    assert_eq!(stock(&app, "i-a").await, (0, 0, 5));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_product_rejects_the_order() {
    let app = spawn_app().await;
    app.create_product("u-a", 100, 5).await;
    let body =
        problem(app.place_order("cust-u", &[("u-a", 1), ("ghost", 1)], None).await, 422, "unknown_product").await;
    assert_eq!(body["product_id"], "ghost", "{body}");
    let order_id = body["order_id"].as_str().unwrap_or_else(|| panic!("order_id in {body}"));
    assert!(body["saga_id"].as_str().is_some(), "saga_id in {body}");
    let order = app.get_json(&format!("/orders/{order_id}")).await;
    assert_eq!(order["status"], "rejected");
    assert_eq!(order["failure"]["code"], "unknown_product", "{order}");
    assert_eq!(order["total_cents"], Value::Null);
    assert_eq!(stock(&app, "u-a").await, (5, 0, 0));
    assert_stock_invariants(&app, &[("u-a", 5)], true).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_orders_create_nothing_and_leave_the_key_unused() {
    let app = spawn_app().await;
    app.create_product("v-a", 100, 10).await;
    app.create_product("v-b", 100, 10).await;
    let item = |p: &str, q: Value| json!({"product_id": p, "quantity": q});
    let order = |customer: Value, items: Value| json!({"customer_id": customer, "items": items});
    let many: Vec<Value> = (0..101).map(|i| item(&format!("m-{i}"), json!(1))).collect();
    let cases: Vec<(Vec<&str>, Value)> = vec![
        (vec!["items"], order(json!("v"), json!([]))),
        (vec!["items"], order(json!("v"), json!(many))),
        (vec!["items"], order(json!("v"), json!({"product_id": "v-a", "quantity": 1}))),
        (vec!["items"], json!({"customer_id": "v"})),
        (vec!["items[1].product_id"], order(json!("v"), json!([item("v-a", json!(1)), item("v-a", json!(2))]))),
        (vec!["items[0].quantity"], order(json!("v"), json!([item("v-a", json!(0))]))),
        (vec!["items[0].quantity"], order(json!("v"), json!([item("v-a", json!(1_000_001))]))),
        (vec!["items[0].quantity"], order(json!("v"), json!([item("v-a", json!(1.5))]))),
        (vec!["items[0].quantity"], order(json!("v"), json!([item("v-a", json!("2"))]))),
        (vec!["items[0].quantity"], order(json!("v"), json!([item("v-a", json!(-1))]))),
        (vec!["items[1].quantity"], order(json!("v"), json!([item("v-a", json!(1)), {"product_id": "v-b"}]))),
        (vec!["customer_id"], order(json!(""), json!([item("v-a", json!(1))]))),
        (vec!["customer_id"], order(json!("c".repeat(129)), json!([item("v-a", json!(1))]))),
        (vec!["customer_id"], order(json!(7), json!([item("v-a", json!(1))]))),
        (vec!["customer_id"], json!({"items": [item("v-a", json!(1))]})),
        (vec!["items[0].product_id"], order(json!("v"), json!([item("bad id", json!(1))]))),
        (vec!["items[0].product_id"], order(json!("v"), json!([item(&"p".repeat(65), json!(1))]))),
        (vec!["items[0]"], order(json!("v"), json!(["v-a"]))),
        (
            vec!["customer_id", "items[0].quantity", "items[1].product_id"],
            order(json!(""), json!([item("v-a", json!(0)), item("no/pe", json!(1))])),
        ),
    ];
    for (expected, body) in &cases {
        let response = post_order(&app, body, &[("Idempotency-Key", "kept-key")]).await;
        invalid(response, expected, &body.to_string()).await;
    }
    let valid = order(json!("v"), json!([item("v-a", json!(2))]));
    let malformed = app
        .client
        .post(app.url("/orders"))
        .header("content-type", "application/json")
        .header("Idempotency-Key", "kept-key")
        .body(r#"{"customer_id": "v", "items": ["#)
        .send()
        .await
        .unwrap();
    problem(malformed, 400, "malformed_json").await;
    let wrong_type = app
        .client
        .post(app.url("/orders"))
        .header("content-type", "text/plain")
        .header("Idempotency-Key", "kept-key")
        .body(valid.to_string())
        .send()
        .await
        .unwrap();
    problem(wrong_type, 415, "unsupported_media_type").await;
    assert_nothing_placed(&app, "refused orders").await;
    assert!(one_page(&app, "/orders?customer_id=v").await.is_empty());
    assert_stock_invariants(&app, &[("v-a", 10), ("v-b", 10)], true).await;
    assert_eq!(stock(&app, "v-a").await, (10, 0, 0));

    // The key was not used up: a valid body with it starts a new order.
    let response = post_order(&app, &valid, &[("Idempotency-Key", "kept-key")]).await;
    assert_eq!(header(&response, "idempotent-replayed"), None, "the first valid use is not a replay");
    let placed = success(response, 201).await;
    assert_eq!(placed["status"], "confirmed");
    assert_eq!(ids(&one_page(&app, "/orders?customer_id=v").await), ids(&[placed]));
    assert_eq!(stock(&app, "v-a").await, (8, 0, 2));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_total_past_2_pow_53_is_refused() {
    let app = spawn_app().await;
    // 91 lines of 1,000,000 units at 100,000,000 cents = 9.1e15 > 2^53 - 1 (~9.007e15); 90 such
    // lines (9.0e15) fit. A line costs at most 1e14, so 91 lines is the fewest that overflow.
    let pricey: Vec<String> = (0..91).map(|i| format!("t-{i:02}")).collect();
    for id in &pricey {
        app.create_product(id, 100_000_000, 1_000_000).await;
    }
    app.create_product("t-cheap", 1, 1_000_000).await;
    let over: Vec<(&str, i64)> = pricey.iter().map(|id| (id.as_str(), 1_000_000)).collect();
    let response = post_order(&app, &order_body("big-spender", &over), &[("Idempotency-Key", "total-key")]).await;
    invalid(response, &["items"], "a total past 2^53 - 1").await;
    assert_nothing_placed(&app, "an overflowing total").await;
    assert_eq!(stock(&app, "t-90").await, (1_000_000, 0, 0));

    // 90 lines at the top price plus one cheap line: 9,000,000,001,000,000 fits. The refusal above
    // did not use up the key either.
    let mut fits: Vec<(&str, i64)> = over[..90].to_vec();
    fits.push(("t-cheap", 1_000_000));
    let response = post_order(&app, &order_body("big-spender", &fits), &[("Idempotency-Key", "total-key")]).await;
    assert_eq!(header(&response, "idempotent-replayed"), None);
    let placed = success(response, 201).await;
    assert_eq!(placed["status"], "confirmed", "{placed}");
    assert_eq!(placed["total_cents"], json!(9_000_000_001_000_000_i64));
    assert_eq!(stock(&app, "t-00").await, (0, 0, 1_000_000));
    assert_eq!(stock(&app, "t-90").await, (1_000_000, 0, 0));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn respond_async_answers_202_then_the_order_confirms() {
    let app = spawn_app().await;
    app.create_product("a-1", 300, 50).await;
    let mut placed = Vec::new();
    for i in 0..10 {
        let body = order_body(&format!("async-{i}"), &[("a-1", 1)]);
        let response = post_order(&app, &body, &[("Prefer", "respond-async")]).await;
        let location = header(&response, "location");
        let retry_after = header(&response, "retry-after");
        let order = success(response, 202).await;
        let id = order["id"].as_str().expect("an order id").to_string();
        assert_eq!(location, Some(format!("/orders/{id}")));
        let retry: u64 = retry_after.expect("Retry-After on 202").parse().expect("Retry-After in seconds");
        assert!(retry >= 1);
        assert!(matches!(order["status"].as_str(), Some("pending" | "confirmed")), "{order}");
        placed.push((id, order["saga_id"].as_str().unwrap().to_string()));
    }
    for (id, saga_id) in &placed {
        assert_eq!(settled_saga(&app, saga_id).await["state"], "completed");
        let order = app.get_json(&format!("/orders/{id}")).await;
        assert_eq!(order["status"], "confirmed");
        assert_eq!(order["total_cents"], 300);
    }
    assert_eq!(stock(&app, "a-1").await, (40, 0, 10));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_list_filters_and_paginates_newest_first() {
    let app = spawn_app().await;
    app.create_product("l-a", 10, 100).await;
    app.create_product("l-scarce", 10, 1).await;
    let mut mine = Vec::new();
    for _ in 0..5 {
        mine.push(success(app.place_order("l-cust", &[("l-a", 1)], None).await, 201).await);
    }
    let rejected = problem(app.place_order("l-cust", &[("l-scarce", 2)], None).await, 409, "insufficient_stock").await;
    let other = success(app.place_order("l-other", &[("l-a", 1)], None).await, 201).await;
    let mut newest_first: Vec<String> = ids(&mine);
    newest_first.push(rejected["order_id"].as_str().unwrap().to_string());
    newest_first.reverse();

    assert_eq!(ids(&one_page(&app, "/orders?customer_id=l-cust").await), newest_first);
    assert_eq!(ids(&walk(&app, "/orders?customer_id=l-cust", 2).await), newest_first);
    assert_eq!(ids(&walk(&app, "/orders?customer_id=l-cust", 1).await), newest_first);
    let confirmed = one_page(&app, "/orders?customer_id=l-cust&status=confirmed").await;
    assert_eq!(ids(&confirmed), newest_first[1..].to_vec());
    assert!(confirmed.iter().all(|o| o["status"] == "confirmed"));
    let only_rejected = one_page(&app, "/orders?customer_id=l-cust&status=rejected").await;
    assert_eq!(ids(&only_rejected), newest_first[..1].to_vec());
    assert!(one_page(&app, "/orders?customer_id=l-cust&status=pending").await.is_empty());
    assert!(one_page(&app, "/orders?customer_id=nobody").await.is_empty());
    assert_eq!(ids(&one_page(&app, "/orders?customer_id=l-other").await), ids(std::slice::from_ref(&other)));
    let everyone = one_page(&app, "/orders").await;
    assert_eq!(everyone.len(), 7);
    assert_eq!(everyone[0]["id"], other["id"], "the newest order is first");
    assert_eq!(ids(&walk(&app, "/orders?status=confirmed", 4).await).len(), 6);

    // Cancelled orders are found by their status too.
    success(cancel(&app, mine[0]["id"].as_str().unwrap()).await, 200).await;
    assert_eq!(ids(&one_page(&app, "/orders?status=cancelled").await), ids(&mine[..1]));

    for (query, field) in [
        ("status=bogus", "status"),
        ("status=CONFIRMED", "status"),
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=abc", "limit"),
    ] {
        invalid(app.get(&format!("/orders?{query}")).await, &[field], query).await;
    }
    invalid(app.get("/orders?status=nope&limit=0").await, &["limit", "status"], "both bad").await;
    app.stop().await;
}

// ----------------------------------------------------------------------------------------------
// Idempotency
// ----------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_answers_the_same_order_without_a_second_saga() {
    let app = spawn_app().await;
    app.create_product("k-a", 150, 10).await;
    let first = r#"{"customer_id":"k-cust","items":[{"product_id":"k-a","quantity":2}]}"#;
    let reordered =
        "{\n  \"items\" : [ { \"quantity\" : 2 ,\t\"product_id\" : \"k-a\" } ] ,\n  \"customer_id\" : \"k-cust\"\n}";

    let send = |body: &'static str, prefer: bool| {
        let mut request = app
            .client
            .post(app.url("/orders"))
            .header("content-type", "application/json")
            .header("Idempotency-Key", "replay-key-1")
            .body(body);
        if prefer {
            request = request.header("Prefer", "respond-async");
        }
        request.send()
    };
    let response = send(first, false).await.unwrap();
    assert_eq!(header(&response, "idempotent-replayed"), None);
    let original = success(response, 201).await;
    assert_eq!(original["status"], "confirmed");

    for (body, prefer) in [(reordered, false), (first, false), (first, true)] {
        let response = send(body, prefer).await.unwrap();
        assert_eq!(header(&response, "idempotent-replayed").as_deref(), Some("true"));
        let location = header(&response, "location");
        let replay = success(response, 201).await;
        assert_eq!(replay["id"], original["id"], "the same order");
        assert_eq!(replay["saga_id"], original["saga_id"]);
        assert_eq!(replay["status"], "confirmed");
        assert_eq!(replay["total_cents"], 300);
        assert_eq!(location, Some(format!("/orders/{}", original["id"].as_str().unwrap())));
    }
    assert_eq!(sagas_of_kind(&app, "place_order").await.len(), 1, "a replay starts no saga");
    assert_eq!(one_page(&app, "/orders?customer_id=k-cust").await.len(), 1);
    assert_eq!(stock(&app, "k-a").await, (8, 0, 2), "stock is taken once");

    // Without a key the same body is a new order.
    success(raw(&app, Method::POST, "/orders", Some("application/json"), first.into()).await, 201).await;
    assert_eq!(sagas_of_kind(&app, "place_order").await.len(), 2);
    assert_eq!(stock(&app, "k-a").await, (6, 0, 4));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_reused_with_another_body_is_refused() {
    let app = spawn_app().await;
    app.create_product("k-b", 100, 10).await;
    let first = success(app.place_order("r-cust", &[("k-b", 2)], Some("reused-key")).await, 201).await;
    for other in [
        order_body("r-cust", &[("k-b", 3)]),
        order_body("someone-else", &[("k-b", 2)]),
        json!({"customer_id": "r-cust", "items": [{"product_id": "k-b", "quantity": 2}], "note": "extra"}),
    ] {
        let response = post_order(&app, &other, &[("Idempotency-Key", "reused-key")]).await;
        problem(response, 422, "idempotency_key_reused").await;
    }
    assert_eq!(sagas_of_kind(&app, "place_order").await.len(), 1);
    assert_eq!(ids(&one_page(&app, "/orders").await), ids(&[first]));
    assert_eq!(stock(&app, "k-b").await, (8, 0, 2));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_may_spell_the_same_numbers_differently() {
    let app = spawn_app().await;
    app.create_product("k-n", 100, 10).await;
    let send = |body: &'static str| {
        app.client
            .post(app.url("/orders"))
            .header("content-type", "application/json")
            .header("Idempotency-Key", "number-key")
            .body(body)
            .send()
    };
    let first = send(r#"{"customer_id":"n","items":[{"product_id":"k-n","quantity":2}]}"#).await.unwrap();
    let first = success(first, 201).await;
    // The API reads 2.0, 2e0 and 20e-1 as the integer 2 (a whole float is an integer), so each
    // of these is the same request as the first, written differently: the canonical form of the
    // parsed body is the same.
    for body in [
        r#"{"customer_id":"n","items":[{"product_id":"k-n","quantity":2.0}]}"#,
        r#"{"customer_id":"n","items":[{"product_id":"k-n","quantity":2e0}]}"#,
        r#"{"customer_id":"n","items":[{"product_id":"k-n","quantity":20e-1}]}"#,
    ] {
        let response = send(body).await.unwrap();
        let status = response.status().as_u16();
        let replayed = header(&response, "idempotent-replayed");
        let text = response.text().await.unwrap();
        assert_eq!(status, 201, "{body} replays the order: {text}");
        assert_eq!(replayed.as_deref(), Some("true"), "{body}");
        let replay: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(replay["id"], first["id"], "{body}");
    }
    assert_eq!(sagas_of_kind(&app, "place_order").await.len(), 1);
    assert_eq!(stock(&app, "k-n").await, (8, 0, 2));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_of_a_rejected_order_is_rejected_the_same_way() {
    let app = spawn_app().await;
    app.create_product("k-c", 100, 1).await;
    let first = problem(app.place_order("rj", &[("k-c", 5)], Some("rej-key")).await, 409, "insufficient_stock").await;
    let response = app.place_order("rj", &[("k-c", 5)], Some("rej-key")).await;
    assert_eq!(header(&response, "idempotent-replayed").as_deref(), Some("true"));
    let replay = problem(response, 409, "insufficient_stock").await;
    assert_eq!(replay["order_id"], first["order_id"]);
    assert_eq!(replay["saga_id"], first["saga_id"]);
    assert_eq!(replay["product_id"], "k-c");

    let unknown = problem(app.place_order("rj", &[("ghost", 1)], Some("unk-key")).await, 422, "unknown_product").await;
    let response = app.place_order("rj", &[("ghost", 1)], Some("unk-key")).await;
    assert_eq!(header(&response, "idempotent-replayed").as_deref(), Some("true"));
    assert_eq!(problem(response, 422, "unknown_product").await["order_id"], unknown["order_id"]);

    // Restocking does not turn the replay into a new attempt.
    success(app.post("/products/k-c/restock", &json!({"quantity": 10})).await, 200).await;
    let again = problem(app.place_order("rj", &[("k-c", 5)], Some("rej-key")).await, 409, "insufficient_stock").await;
    assert_eq!(again["order_id"], first["order_id"]);
    assert_eq!(sagas_of_kind(&app, "place_order").await.len(), 2);
    assert_eq!(one_page(&app, "/orders?customer_id=rj&status=rejected").await.len(), 2);
    assert_eq!(stock(&app, "k-c").await, (11, 0, 0));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_with_one_key_make_one_order() {
    let app = spawn_app().await;
    app.create_product("cc", 500, 100).await;
    let body = order_body("cc-cust", &[("cc", 3)]);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (client, url, body) = (app.client.clone(), app.url("/orders"), body.clone());
        tasks.push(tokio::spawn(async move {
            let response =
                client.post(url).header("Idempotency-Key", "concurrent-key").json(&body).send().await.unwrap();
            let replayed = header(&response, "idempotent-replayed");
            (response.status().as_u16(), replayed, response.text().await.unwrap())
        }));
    }
    let mut order_ids = HashSet::new();
    let mut originals = 0;
    for task in tasks {
        let (status, replayed, text) = task.await.unwrap();
        assert_eq!(status, 201, "{text}");
        let order: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(order["status"], "confirmed", "{order}");
        order_ids.insert(order["id"].as_str().unwrap().to_string());
        match replayed.as_deref() {
            None => originals += 1,
            Some(v) => assert_eq!(v, "true"),
        }
    }
    assert_eq!(order_ids.len(), 1, "one order across all answers: {order_ids:?}");
    assert_eq!(originals, 1, "exactly one answer is not a replay");
    assert_eq!(sagas_of_kind(&app, "place_order").await.len(), 1);
    assert_eq!(one_page(&app, "/orders").await.len(), 1);
    assert_eq!(stock(&app, "cc").await, (97, 0, 3));
    assert_stock_invariants(&app, &[("cc", 100)], true).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_idempotency_keys_are_refused() {
    let app = spawn_app().await;
    app.create_product("ik", 100, 10).await;
    let body = order_body("ik-cust", &[("ik", 1)]);
    let long = "k".repeat(256);
    let keys: Vec<reqwest::header::HeaderValue> = vec![
        reqwest::header::HeaderValue::from_static(""),
        reqwest::header::HeaderValue::from_str(&long).unwrap(),
        reqwest::header::HeaderValue::from_bytes("clé".as_bytes()).unwrap(),
        reqwest::header::HeaderValue::from_bytes(b"tab\there").unwrap(),
    ];
    for key in keys {
        let response = app
            .client
            .post(app.url("/orders"))
            .header("Idempotency-Key", key.clone())
            .json(&body)
            .send()
            .await
            .unwrap();
        invalid(response, &["Idempotency-Key"], &format!("key {key:?}")).await;
    }
    assert_nothing_placed(&app, "invalid keys").await;

    // 255 printable characters are a valid key.
    let key = format!("{} ~!", "K".repeat(252));
    assert_eq!(key.len(), 255);
    let first = success(app.place_order("ik-cust", &[("ik", 1)], Some(&key)).await, 201).await;
    let response = app.place_order("ik-cust", &[("ik", 1)], Some(&key)).await;
    assert_eq!(header(&response, "idempotent-replayed").as_deref(), Some("true"));
    assert_eq!(success(response, 201).await["id"], first["id"]);
    app.stop().await;
}

// ----------------------------------------------------------------------------------------------
// Cancellation
// ----------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_returns_the_stock_once() {
    let app = spawn_app().await;
    app.create_product("x-a", 100, 10).await;
    app.create_product("x-b", 40, 3).await;
    let order = success(app.place_order("x-cust", &[("x-a", 4), ("x-b", 3)], None).await, 201).await;
    let id = order["id"].as_str().unwrap();
    assert_eq!(stock(&app, "x-a").await, (6, 0, 4));

    let cancelled = success(cancel(&app, id).await, 200).await;
    assert_eq!(cancelled["id"], order["id"]);
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(app.get_json(&format!("/orders/{id}")).await["status"], "cancelled");
    assert_eq!(stock(&app, "x-a").await, (10, 0, 0));
    assert_eq!(stock(&app, "x-b").await, (3, 0, 0));
    assert_stock_invariants(&app, &[("x-a", 10), ("x-b", 3)], true).await;

    // Again: the same answer, the stock is not returned twice, no second saga.
    let again = success(cancel(&app, id).await, 200).await;
    assert_eq!(again["status"], "cancelled");
    assert_eq!(stock(&app, "x-a").await, (10, 0, 0));
    let sagas = sagas_of_kind(&app, "cancel_order").await;
    assert_eq!(sagas.len(), 1, "{sagas:?}");
    assert_eq!(sagas[0]["state"], "completed");
    assert_eq!(sagas[0]["order_id"], order["id"]);
    let saga = app.get_json(&format!("/sagas/{}", sagas[0]["id"].as_str().unwrap())).await;
    let steps: Vec<(&str, &str)> = saga["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s["state"].as_str().unwrap()))
        .collect();
    assert_eq!(steps, [("cancel", "succeeded"), ("return_stock", "succeeded")]);

    // The returned stock can be sold again.
    success(app.place_order("x-cust", &[("x-b", 3)], None).await, 201).await;
    assert_eq!(stock(&app, "x-b").await, (0, 0, 3));

    // Only confirmed orders can be cancelled.
    let rejected = problem(app.place_order("x-cust", &[("x-a", 11)], None).await, 409, "insufficient_stock").await;
    let rejected_id = rejected["order_id"].as_str().unwrap();
    problem(cancel(&app, rejected_id).await, 409, "order_not_cancellable").await;
    assert_eq!(app.get_json(&format!("/orders/{rejected_id}")).await["status"], "rejected");
    problem(cancel(&app, "no-such-order").await, 404, "not_found").await;
    assert_eq!(sagas_of_kind(&app, "cancel_order").await.len(), 1);
    assert_stock_invariants(&app, &[("x-a", 10), ("x-b", 3)], true).await;
    app.stop().await;
}

// ----------------------------------------------------------------------------------------------
// Sagas
// ----------------------------------------------------------------------------------------------

/// Asserts that a saga's events have seq 0, 1, 2, ... and start with `created`.
fn assert_history(saga: &Value) -> Vec<(Option<String>, String)> {
    let events = saga["events"].as_array().unwrap_or_else(|| panic!("events in {saga}"));
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["seq"], json!(i), "event seq: {saga}");
        assert!(e["at"].as_str().is_some(), "event time: {e}");
    }
    assert_eq!(events[0]["event"], "created", "{saga}");
    assert_eq!(events[0]["step"], Value::Null, "{saga}");
    events.iter().map(|e| (e["step"].as_str().map(str::to_string), e["event"].as_str().unwrap().to_string())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_place_order_saga_shows_its_steps_and_history() {
    let app = spawn_app().await;
    app.create_product("s-a", 100, 5).await;
    let order = success(app.place_order("s-cust", &[("s-a", 2)], None).await, 201).await;
    let saga = app.get_json(&format!("/sagas/{}", order["saga_id"].as_str().unwrap())).await;
    assert_eq!(saga["id"], order["saga_id"]);
    assert_eq!(saga["kind"], "place_order");
    assert_eq!(saga["state"], "completed");
    assert_eq!(saga["stuck"], false);
    assert_eq!(saga["order_id"], order["id"]);
    let steps = saga["steps"].as_array().unwrap();
    let names: Vec<&str> = steps.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["reserve_stock", "create_order", "confirm", "commit_stock"]);
    for step in steps {
        assert_eq!(step["state"], "succeeded", "{step}");
        assert_eq!(step["attempts"], 1, "{step}");
        assert_eq!(step["last_error"], Value::Null, "{step}");
        assert!(step["started_at"].as_str().is_some() && step["finished_at"].as_str().is_some(), "{step}");
    }
    let history = assert_history(&saga);
    let succeeded: Vec<&str> =
        history.iter().filter(|(_, e)| e == "succeeded").filter_map(|(s, _)| s.as_deref()).collect();
    assert_eq!(succeeded, names, "each step succeeded once, in order");
    assert!(!history.iter().any(|(_, e)| e == "failed" || e.starts_with("compensat")), "{saga}");
    assert_eq!(history.last().unwrap(), &(None, "completed".to_string()));
    problem(app.get("/sagas/00000000-0000-0000-0000-000000000000").await, 404, "not_found").await;
    problem(app.get("/sagas/nope").await, 404, "not_found").await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensated_place_order_saga_shows_why_and_what_was_undone() {
    let app = spawn_app().await;
    app.create_product("s-b", 100, 1).await;
    let rejected = problem(app.place_order("s-cust", &[("s-b", 2)], None).await, 409, "insufficient_stock").await;
    let saga = app.get_json(&format!("/sagas/{}", rejected["saga_id"].as_str().unwrap())).await;
    assert_eq!(saga["state"], "compensated");
    assert_eq!(saga["kind"], "place_order");
    assert_eq!(saga["order_id"], rejected["order_id"]);
    let steps = saga["steps"].as_array().unwrap();
    let reserve = &steps[0];
    assert_eq!(reserve["name"], "reserve_stock");
    assert!(matches!(reserve["state"].as_str(), Some("failed" | "compensated")), "{reserve}");
    assert!(reserve["last_error"].as_str().is_some_and(|e| e.contains("insufficient_stock")), "{reserve}");
    for step in &steps[2..] {
        assert_eq!(step["state"], "pending", "a step after the failure never ran: {step}");
    }
    let history = assert_history(&saga);
    let has = |step: Option<&str>, event: &str| history.iter().any(|(s, e)| s.as_deref() == step && e == event);
    assert!(has(Some("reserve_stock"), "failed"), "{saga}");
    assert!(has(None, "compensating"), "{saga}");
    assert!(has(Some("reserve_stock"), "compensated"), "{saga}");
    assert!(!has(Some("confirm"), "succeeded"), "{saga}");
    assert_eq!(history.last().unwrap(), &(None, "compensated".to_string()));
    let compensating = history.iter().position(|(_, e)| e == "compensating").unwrap();
    let failed = history.iter().position(|(s, e)| s.as_deref() == Some("reserve_stock") && e == "failed").unwrap();
    assert!(failed < compensating, "the failure comes before the compensation: {saga}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_list_filters_and_paginates() {
    let app = spawn_app().await;
    app.create_product("f-a", 100, 10).await;
    let mut confirmed = Vec::new();
    for _ in 0..3 {
        confirmed.push(success(app.place_order("f", &[("f-a", 1)], None).await, 201).await);
    }
    let rejected = problem(app.place_order("f", &[("f-a", 100)], None).await, 409, "insufficient_stock").await;
    success(cancel(&app, confirmed[0]["id"].as_str().unwrap()).await, 200).await;

    let all = one_page(&app, "/sagas").await;
    assert_eq!(all.len(), 5);
    let all_ids = ids(&all);
    let mut sorted = all_ids.clone();
    sorted.sort();
    sorted.reverse();
    assert_eq!(all_ids, sorted, "newest first");
    assert_eq!(all[0]["kind"], "cancel_order", "the newest saga is the cancel");

    assert_eq!(sagas_of_kind(&app, "place_order").await.len(), 4);
    assert_eq!(sagas_of_kind(&app, "cancel_order").await.len(), 1);
    assert!(sagas_of_kind(&app, "no_such_kind").await.is_empty());
    let compensated = one_page(&app, "/sagas?state=compensated").await;
    assert_eq!(ids(&compensated), [rejected["saga_id"].as_str().unwrap()]);
    assert_eq!(one_page(&app, "/sagas?state=completed").await.len(), 4);
    assert_eq!(one_page(&app, "/sagas?state=completed&kind=place_order").await.len(), 3);
    assert!(one_page(&app, "/sagas?state=running").await.is_empty());
    assert!(one_page(&app, "/sagas?stuck=true").await.is_empty());
    assert_eq!(one_page(&app, "/sagas?stuck=false").await.len(), 5);
    assert_eq!(ids(&walk(&app, "/sagas", 2).await), all_ids);
    assert_eq!(ids(&walk(&app, "/sagas?kind=place_order", 3).await), all_ids[1..].to_vec());

    for (query, field) in [
        ("state=bogus", "state"),
        ("state=stuck", "state"),
        ("stuck=yes", "stuck"),
        ("stuck=1", "stuck"),
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=abc", "limit"),
    ] {
        invalid(app.get(&format!("/sagas?{query}")).await, &[field], query).await;
    }
    invalid(app.get("/sagas?state=x&stuck=x&limit=x").await, &["limit", "state", "stuck"], "all bad").await;
    app.stop().await;
}

/// Fails every attempt of place_order's commit_stock (after the pivot) while switched on.
struct FailCommits {
    on: AtomicBool,
}

impl FaultInjector for FailCommits {
    fn fault(&self, kind: &str, step: &str, phase: Phase, _attempt: u32) -> Option<Fault> {
        let hit = self.on.load(Ordering::SeqCst) && kind == "place_order" && step == "commit_stock";
        (hit && phase == Phase::Action).then(|| Fault::Fail(StepError::transient("injected: commit refused")))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_saga_is_listed_as_stuck_until_it_completes() {
    let dbs = fresh_databases().await;
    let mut config = config(&dbs);
    config.stuck_after_attempts = 2;
    let faults = Arc::new(FailCommits { on: AtomicBool::new(true) });
    let app = spawn_app_with(config, Some(faults.clone())).await;
    app.create_product("st", 100, 5).await;
    let response = post_order(&app, &order_body("st-c", &[("st", 2)]), &[("Prefer", "respond-async")]).await;
    let order = success(response, 202).await;
    let saga_id = order["saga_id"].as_str().unwrap().to_string();

    eventually(Duration::from_secs(15), "the saga is flagged stuck", || async {
        !one_page(&app, "/sagas?stuck=true").await.is_empty()
    })
    .await;
    let stuck = one_page(&app, "/sagas?stuck=true").await;
    assert_eq!(ids(&stuck), [saga_id.as_str()]);
    assert_eq!(stuck[0]["state"], "running");
    assert_eq!(stuck[0]["stuck"], true);
    assert!(stuck[0]["attempts"].as_i64().is_some_and(|a| a >= 2), "{}", stuck[0]);
    assert!(stuck[0]["last_error"].as_str().is_some_and(|e| e.contains("injected")), "{}", stuck[0]);
    assert!(one_page(&app, "/sagas?stuck=false").await.is_empty());
    assert_eq!(ids(&one_page(&app, "/sagas?state=running&stuck=true&kind=place_order").await), [saga_id.as_str()]);
    assert!(one_page(&app, "/sagas?stuck=true&kind=cancel_order").await.is_empty());

    // Past the pivot: the order is confirmed and its stock reserved, not yet sold.
    let order_path = format!("/orders/{}", order["id"].as_str().unwrap());
    assert_eq!(app.get_json(&order_path).await["status"], "confirmed");
    assert_eq!(stock(&app, "st").await, (3, 2, 0));
    assert_stock_invariants(&app, &[("st", 5)], false).await;
    let saga = app.get_json(&format!("/sagas/{saga_id}")).await;
    assert_eq!(saga["stuck"], true);
    let commit = &saga["steps"][3];
    assert_eq!(commit["name"], "commit_stock");
    assert!(matches!(commit["state"].as_str(), Some("running" | "failed")), "{commit}");
    assert!(commit["attempts"].as_i64().is_some_and(|a| a >= 2), "{commit}");
    assert!(commit["last_error"].as_str().is_some_and(|e| e.contains("injected")), "{commit}");
    assert_eq!(saga["steps"][2]["state"], "succeeded", "confirm: {saga}");
    let history = assert_history(&saga);
    assert!(history.iter().any(|(s, e)| s.as_deref() == Some("commit_stock") && e == "stuck"), "{saga}");

    // The fault clears: the saga completes and is no longer stuck.
    faults.on.store(false, Ordering::SeqCst);
    let path = format!("/sagas/{saga_id}");
    eventually(Duration::from_secs(15), "the stuck saga completes", || async {
        app.get_json(&path).await["state"] == "completed"
    })
    .await;
    let saga = app.get_json(&path).await;
    assert_eq!(saga["stuck"], false, "{saga}");
    assert!(one_page(&app, "/sagas?stuck=true").await.is_empty());
    assert_eq!(stock(&app, "st").await, (3, 0, 2));
    assert_stock_invariants(&app, &[("st", 5)], true).await;
    app.stop().await;
}

// ----------------------------------------------------------------------------------------------
// Operations
// ----------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness_answer() {
    let app = spawn_app().await;
    assert_eq!(success(app.get("/healthz").await, 200).await["status"], "ok");
    assert_eq!(success(app.get("/readyz").await, 200).await["status"], "ready");
    app.stop().await;
}

/// A TCP proxy in front of a PostgreSQL server, which can be cut (new connections refused,
/// open ones dropped) as a network partition or a dead server would.
struct Proxy {
    addr: std::net::SocketAddr,
    upstream: String,
    cut: tokio_util::sync::CancellationToken,
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let proxy = Proxy { addr, upstream, cut: tokio_util::sync::CancellationToken::new() };
        proxy.serve(listener);
        proxy
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let (upstream, cut) = (self.upstream.clone(), self.cut.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = cut.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((mut inbound, _)) = accepted else { continue };
                let (upstream, cut) = (upstream.clone(), cut.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = cut.cancelled() => {}
                        _ = async {
                            if let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await {
                                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                            }
                        } => {}
                    }
                });
            }
        });
    }

    /// Refuses new connections and drops the open ones.
    fn cut(&self) {
        self.cut.cancel();
    }

    /// Accepts connections again on the same address.
    async fn restore(&mut self) {
        self.cut = tokio_util::sync::CancellationToken::new();
        let listener = tokio::net::TcpListener::bind(self.addr).await.expect("rebind the proxy port");
        self.serve(listener);
    }
}

/// Splits a postgres:// URL into (before host, host:port, after host).
fn split_pg_url(url: &str) -> (String, String, String) {
    let start = url.find("://").unwrap() + 3;
    let end = url[start..].find(['/', '?']).map_or(url.len(), |i| start + i);
    let at = url[start..end].rfind('@').map_or(start, |i| start + i + 1);
    (url[..at].to_string(), url[at..end].to_string(), url[end..].to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_inventory_database_answers_503() {
    let dbs = fresh_databases().await;
    let mut config = config(&dbs);
    let mut proxy = None;
    if on_postgres() {
        // The inventory goes through a proxy to the same server and database, so that it can be
        // made unreachable while the log database stays up.
        let inventory = dbs.inventory_url.clone().unwrap_or_else(|| dbs.url.clone());
        let (head, host, tail) = split_pg_url(&inventory);
        let upstream = if host.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
            host
        } else {
            format!("{host}:5432")
        };
        let started = Proxy::start(upstream).await;
        config.inventory_database_url = Some(format!("{head}{}{tail}", started.addr));
        proxy = Some(started);
    }
    let app = spawn_app_with(config, None).await;
    app.create_product("d-a", 100, 5).await;
    success(app.get("/readyz").await, 200).await;

    match &proxy {
        Some(proxy) => proxy.cut(),
        None => app.state.inventory.db().pool.close().await,
    }

    // Every request that needs the inventory answers 503 (sent together: each waits at most the
    // pool's acquire timeout).
    let product = json!({"id": "d-b", "name": "B", "price_cents": 1, "stock": 1});
    let restock = json!({"quantity": 1});
    let (read, create, add, list, ready) = tokio::join!(
        app.get("/products/d-a"),
        app.post("/products", &product),
        app.post("/products/d-a/restock", &restock),
        app.get("/products"),
        app.get("/readyz"),
    );
    assert_eq!(header(&read, "retry-after").as_deref(), Some("1"), "a 503 says when to retry");
    problem(read, 503, "database_unavailable").await;
    problem(create, 503, "database_unavailable").await;
    problem(add, 503, "database_unavailable").await;
    problem(list, 503, "database_unavailable").await;
    problem(ready, 503, "database_unavailable").await;
    assert_eq!(success(app.get("/healthz").await, 200).await["status"], "ok", "the process itself is up");

    if let Some(proxy) = proxy.as_mut() {
        // The log database is still up: an order is written ahead and waits for the inventory.
        let body = order_body("d-cust", &[("d-a", 2)]);
        let headers = [("Prefer", "respond-async"), ("Idempotency-Key", "outage-key")];
        let pending = success(post_order(&app, &body, &headers).await, 202).await;
        assert_eq!(pending["status"], "pending");
        let path = format!("/orders/{}", pending["id"].as_str().unwrap());
        assert_eq!(app.get_json(&path).await["status"], "pending");
        let response = post_order(&app, &body, &headers).await;
        assert_eq!(header(&response, "idempotent-replayed").as_deref(), Some("true"));
        assert_eq!(success(response, 202).await["id"], pending["id"], "a replay while pending answers 202");
        problem(cancel(&app, pending["id"].as_str().unwrap()).await, 409, "order_not_cancellable").await;
        problem(app.get("/orders/nope").await, 404, "not_found").await;

        // Once the database is back, the service is ready again and the order completes.
        proxy.restore().await;
        eventually(Duration::from_secs(15), "readyz answers 200 again", || async {
            app.get("/readyz").await.status() == 200
        })
        .await;
        assert_eq!(settled_saga(&app, pending["saga_id"].as_str().unwrap()).await["state"], "completed");
        assert_eq!(app.get_json(&path).await["status"], "confirmed");
        assert_eq!(stock(&app, "d-a").await, (3, 0, 2));
        let response = post_order(&app, &body, &[("Idempotency-Key", "outage-key")]).await;
        assert_eq!(header(&response, "idempotent-replayed").as_deref(), Some("true"));
        assert_eq!(success(response, 201).await["status"], "confirmed");
        assert_eq!(sagas_of_kind(&app, "place_order").await.len(), 1);
    }
    app.stop().await;
}

/// Runs one statement from its own connection on the PostgreSQL server that holds the inventory
/// (`TEST_INVENTORY_DATABASE_URL` when set, else `TEST_DATABASE_URL`).
async fn pg_admin(sql: &str) {
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    let url = std::env::var("TEST_INVENTORY_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| std::env::var("TEST_DATABASE_URL").expect("on PostgreSQL"));
    let mut admin = sqlx::AnyConnection::connect(&url).await.expect("an admin connection");
    sqlx::raw_sql(sql).execute(&mut admin).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    admin.close().await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_refuses_connections_answers_503() {
    let app = spawn_app().await;
    app.create_product("rf", 100, 5).await;
    let url = app.dbs.inventory_url.clone().unwrap_or_else(|| app.dbs.url.clone());
    let name = url.rsplit('/').next().unwrap().split('?').next().unwrap().to_string();
    if on_postgres() {
        // The server is up but the database takes no connections (as during maintenance), and
        // the open ones are gone.
        pg_admin(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false")).await;
        pg_admin(&format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")).await;
    } else {
        app.state.inventory.db().pool.close().await;
    }
    let (read, ready) = tokio::join!(app.get("/products/rf"), app.get("/readyz"));
    if on_postgres() {
        // Opened again before asserting, so that a failure leaves no database locked.
        pg_admin(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true")).await;
    }
    problem(read, 503, "database_unavailable").await;
    problem(ready, 503, "database_unavailable").await;
    if on_postgres() {
        eventually(Duration::from_secs(15), "the database answers again", || async {
            app.get("/products/rf").await.status() == 200
        })
        .await;
        success(app.get("/readyz").await, 200).await;
    }
    app.stop().await;
}

// ----------------------------------------------------------------------------------------------
// tower-http: request ids and CORS
// ----------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_has_a_request_id_and_a_sent_one_is_echoed() {
    let app = spawn_app().await;
    app.create_product("rq", 100, 5).await;
    let json = Some("application/json");
    let responses = vec![
        app.get("/healthz").await,
        app.get("/products/rq").await,
        app.get("/products/none").await,
        app.get("/no/such/path").await,
        raw(&app, Method::DELETE, "/products", None, String::new()).await,
        raw(&app, Method::POST, "/products", json, "{".into()).await,
        raw(&app, Method::POST, "/products", Some("text/plain"), "{}".into()).await,
        app.post("/products", &json!({})).await,
        app.place_order("rq-c", &[("rq", 1)], None).await,
        app.get("/sagas?limit=0").await,
    ];
    let mut seen = HashSet::new();
    for response in responses {
        let id = header(&response, "x-request-id").unwrap_or_else(|| panic!("no x-request-id on {}", response.url()));
        assert!(!id.is_empty());
        assert!(seen.insert(id.clone()), "request id {id} reused");
    }

    for path in ["/healthz", "/nope", "/products/none"] {
        let response = app.client.get(app.url(path)).header("x-request-id", "client-chosen-42").send().await.unwrap();
        assert_eq!(header(&response, "x-request-id").as_deref(), Some("client-chosen-42"), "{path}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_allows_the_configured_origin_only() {
    let app = spawn_app().await;
    app.create_product("co", 100, 5).await;
    let preflight = |origin: &'static str| {
        app.client
            .request(Method::OPTIONS, app.url("/orders"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type,idempotency-key,prefer")
            .send()
    };
    let response = preflight("https://shop.example").await.unwrap();
    assert!(response.status().is_success(), "preflight: {}", response.status());
    assert_eq!(header(&response, "access-control-allow-origin").as_deref(), Some("https://shop.example"));
    let allowed = header(&response, "access-control-allow-headers").unwrap_or_default().to_ascii_lowercase();
    for name in ["content-type", "idempotency-key", "prefer"] {
        assert!(allowed.contains(name), "preflight allows {name}: {allowed:?}");
    }
    let methods = header(&response, "access-control-allow-methods").unwrap_or_default().to_ascii_uppercase();
    assert!(methods.contains("POST") && methods.contains("GET"), "{methods:?}");
    assert!(header(&response, "x-request-id").is_some());

    // An actual cross-origin request exposes the headers a client needs to read.
    let response = app
        .client
        .post(app.url("/orders"))
        .header("origin", "https://shop.example")
        .header("Idempotency-Key", "cors-key")
        .json(&order_body("co-c", &[("co", 1)]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(header(&response, "access-control-allow-origin").as_deref(), Some("https://shop.example"));
    let exposed = header(&response, "access-control-expose-headers").unwrap_or_default().to_ascii_lowercase();
    for name in ["location", "retry-after", "idempotent-replayed"] {
        assert!(exposed.contains(name), "{name} is exposed: {exposed:?}");
    }

    // Another origin gets no permission.
    let response = preflight("https://evil.example").await.unwrap();
    assert_eq!(header(&response, "access-control-allow-origin"), None);
    let response =
        app.client.get(app.url("/products/co")).header("origin", "https://evil.example").send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "access-control-allow-origin"), None);
    app.stop().await;
}
