//! Hostile inputs against every endpoint, as one table: each row is a request a careless or
//! malicious client could send (SQL-looking and path-traversal ids, NUL bytes, invalid UTF-8,
//! 1 MB strings, integers past every bound, 10,000-deep JSON, duplicate members, huge headers,
//! bad `Idempotency-Key`s...) and the answer it must get: a status below 500, an
//! `application/problem+json` body with the expected stable `code` for an error, no internals
//! (SQL, driver or Rust names, source paths, panics), and an answer at all (a per-request
//! timeout fails a hang). Requests go over a raw TCP connection, so that paths, header bytes and
//! bodies reach the server exactly as written, which an HTTP client library would normalise.
//!
//! After the table the service is still healthy, a normal order is still confirmed, and the
//! invariants hold: stock is conserved and moved only by the requests the table expects to be
//! accepted, and no order or saga is left unsettled. Runs on SQLite, and on PostgreSQL with
//! `TEST_DATABASE_URL` (the same test).
//!
//! Decisions the table pins down (stated in `openapi.yaml` too): unknown JSON members and
//! unknown query parameters are ignored; a JSON member given twice, or a query parameter given
//! twice, is refused; integers written as `1.0` are integers; text may not hold control
//! characters; a path id that cannot exist is 404 without echoing it.
mod common;

use std::time::Duration;

use common::*;
use order_saga::limits;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long one request may take before the test calls it a hang. No latency is asserted.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);

/// Bytes of a request: literal text (in which `{product}`, `{order}` and `{saga}` name the
/// fixtures), literal bytes, or bytes made by a function (for what is too big to write out).
#[derive(Clone, Copy)]
enum Data {
    Text(&'static str),
    Bytes(&'static [u8]),
    Made(fn() -> Vec<u8>),
}

/// Who is expected to answer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Layer {
    /// The application: an error is a problem+json with a code.
    App,
    /// The HTTP/1 parser (hyper), before any application code runs: a request head larger than
    /// its buffer is answered with a bare status and the connection is closed.
    Http,
}

/// How much of the request is sent.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Sending {
    /// Head and body.
    All,
    /// The head only, declaring the body's length: the server must answer without the body.
    HeadOnly,
}

/// One hostile request and the answer it must get.
#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    method: &'static str,
    path: Data,
    headers: &'static [(&'static str, Data)],
    body: Option<Data>,
    sending: Sending,
    /// Acceptable statuses.
    status: &'static [u16],
    /// The problem's `code` for an error answer.
    code: Option<&'static str>,
    layer: Layer,
}

const BASE: Case = Case {
    name: "",
    method: "GET",
    path: Data::Text("/"),
    headers: &[],
    body: None,
    sending: Sending::All,
    status: &[200],
    code: None,
    layer: Layer::App,
};

use Data::{Bytes as B, Made as M, Text as T};

const JSON: (&str, Data) = ("content-type", T("application/json"));
/// Valid bodies, sent where something else about the request is wrong.
const PRODUCT: &str = r#"{"id": "t", "name": "T", "price_cents": 1, "stock": 1}"#;
const ORDER: &str = r#"{"customer_id": "c", "items": [{"product_id": "hx-1", "quantity": 1}]}"#;
const REASON: &str = r#"{"actor": "ops", "reason": "hostile table"}"#;
/// More headers than the HTTP layer takes (100).
static HUNDRED_AND_ONE: &[(&str, Data)] = &[("x-h", T("1")); 101];

/// `'{'`-nested 10,000 times: `{"a":{"a":...}}`.
fn deep_object() -> Vec<u8> {
    let n = 10_000;
    let mut body = "{\"a\":".repeat(n);
    body.push('1');
    body.push_str(&"}".repeat(n));
    body.into_bytes()
}

/// `[`-nested 10,000 times, as a product's name.
fn deep_array() -> Vec<u8> {
    let n = 10_000;
    format!(r#"{{"id": "deep", "name": {}1{}, "price_cents": 1, "stock": 1}}"#, "[".repeat(n), "]".repeat(n))
        .into_bytes()
}

/// A product whose name is 1,000,000 characters: within the body limit, past the name's.
fn megabyte_name() -> Vec<u8> {
    format!(r#"{{"id": "big-name", "name": "{}", "price_cents": 1, "stock": 1}}"#, "n".repeat(1_000_000)).into_bytes()
}

/// An order whose customer id is 1,000,000 characters.
fn megabyte_customer() -> Vec<u8> {
    format!(r#"{{"customer_id": "{}", "items": [{{"product_id": "hx-1", "quantity": 1}}]}}"#, "c".repeat(1_000_000))
        .into_bytes()
}

/// A valid product body padded with white space to exactly the body limit.
fn exactly_the_limit() -> Vec<u8> {
    let head = r#"{"id": "hx-exact", "name": "Exact", "price_cents": 1, "stock": 0}"#;
    format!("{head}{}", " ".repeat(limits::BODY_BYTES - head.len())).into_bytes()
}

/// One byte over the body limit (sent as a head only, with `Expect: 100-continue`).
fn over_the_limit() -> Vec<u8> {
    vec![b' '; limits::BODY_BYTES + 1]
}

/// An order of one more line than allowed.
fn too_many_items() -> Vec<u8> {
    let items: Vec<Value> =
        (0..=limits::MAX_ITEMS).map(|i| json!({"product_id": format!("p{i}"), "quantity": 1})).collect();
    json!({"customer_id": "c", "items": items}).to_string().into_bytes()
}

/// The largest lines at the largest price, over every product of [`MAX_PRODUCTS`]: the total
/// passes 2^53 - 1 and is refused before anything is written.
fn total_past_2_53() -> Vec<u8> {
    max_order(limits::MAX_QUANTITY)
}

/// 900,000 units of each of [`MAX_PRODUCTS`] at the largest price: a total of 9 * 10^15 cents,
/// just under 2^53 - 1. It must be confirmed with that exact total.
fn total_just_under_2_53() -> Vec<u8> {
    max_order(BIG_QUANTITY)
}

fn max_order(quantity: i64) -> Vec<u8> {
    let items: Vec<Value> =
        (0..MAX_PRODUCTS).map(|i| json!({"product_id": max_product(i), "quantity": quantity})).collect();
    json!({"customer_id": "whale", "items": items}).to_string().into_bytes()
}

/// How many products the total cases use: as many as an order may have lines.
const MAX_PRODUCTS: usize = limits::MAX_ITEMS;
/// The stock of each of them, and what the accepted total case orders of each.
const BIG_QUANTITY: i64 = 900_000;

fn max_product(i: usize) -> String {
    format!("hx-max-{i:03}")
}

fn long_text(n: usize, c: char) -> Vec<u8> {
    std::iter::repeat_n(c, n).collect::<String>().into_bytes()
}

/// A 60 KiB product id in the path: under the HTTP layer's limit on a request target.
fn path_of_60_kib() -> Vec<u8> {
    [b"/products/".as_slice(), &long_text(60 * 1024, 'p')].concat()
}

/// A 100 KiB request target: over the HTTP layer's limit (65,534 bytes).
fn path_of_100_kib() -> Vec<u8> {
    [b"/products/".as_slice(), &long_text(100 * 1024, 'p')].concat()
}

fn key_of_256() -> Vec<u8> {
    long_text(limits::IDEMPOTENCY_KEY_CHARS + 1, 'k')
}

fn header_of_100_kib() -> Vec<u8> {
    long_text(100 * 1024, 'h')
}

/// A header larger than the HTTP layer's whole buffer for a request head.
fn header_of_1_mib() -> Vec<u8> {
    long_text(1024 * 1024, 'h')
}

/// A `Last-Event-ID` of one count more than an order can have sagas.
fn cursor_of_too_many_parts() -> Vec<u8> {
    vec!["0"; limits::MAX_SAGAS_PER_ORDER + 1].join(".").into_bytes()
}

fn customer_of_129() -> Vec<u8> {
    [b"/orders?customer_id=".as_slice(), &long_text(limits::CUSTOMER_ID_CHARS + 1, 'c')].concat()
}

fn reason_of_501() -> Vec<u8> {
    json!({"actor": "ops", "reason": "r".repeat(limits::REASON_CHARS + 1)}).to_string().into_bytes()
}

fn actor_of_101() -> Vec<u8> {
    json!({"actor": "a".repeat(limits::ACTOR_CHARS + 1), "reason": "x"}).to_string().into_bytes()
}

/// Every hostile request. Fixtures: product `hx-1` (price 1000, stock 100), its confirmed order
/// `{order}` (1 unit) and that order's completed saga `{saga}`; `hx-max-000`.. `hx-max-099`
/// (price 10^8, stock 900,000 each). `{ORDER}` is the order's id in upper case.
#[rustfmt::skip]
static CASES: &[Case] = &[
    // POST /products: media type, syntax, structure
    Case { name: "product: text/plain body", method: "POST", path: T("/products"), headers: &[("content-type", T("text/plain"))], body: Some(T(PRODUCT)), status: &[415], code: Some("unsupported_media_type"), ..BASE },
    Case { name: "product: no content type", method: "POST", path: T("/products"), body: Some(T(PRODUCT)), status: &[415], code: Some("unsupported_media_type"), ..BASE },
    Case { name: "product: a form body", method: "POST", path: T("/products"), headers: &[("content-type", T("application/x-www-form-urlencoded"))], body: Some(T("id=t&name=T&price_cents=1&stock=1")), status: &[415], code: Some("unsupported_media_type"), ..BASE },
    Case { name: "product: empty body", method: "POST", path: T("/products"), headers: &[JSON], body: Some(T("")), status: &[400], code: Some("malformed_json"), ..BASE },
    Case { name: "product: truncated JSON", method: "POST", path: T("/products"), headers: &[JSON], body: Some(T(r#"{"id": "t", "name": "#)), status: &[400], code: Some("malformed_json"), ..BASE },
    Case { name: "product: trailing garbage", method: "POST", path: T("/products"), headers: &[JSON], body: Some(T(r#"{"id": "t", "name": "T", "price_cents": 1, "stock": 1} DROP"#)), status: &[400], code: Some("malformed_json"), ..BASE },
    Case { name: "product: invalid UTF-8 in a string", method: "POST", path: T("/products"), headers: &[JSON], body: Some(B(b"{\"id\": \"t\", \"name\": \"\xff\xfe\", \"price_cents\": 1, \"stock\": 1}")), status: &[400], code: Some("malformed_json"), ..BASE },
    Case { name: "product: a lone surrogate escape", method: "POST", path: T("/products"), headers: &[JSON], body: Some(T(r#"{"id": "t", "name": "\ud800", "price_cents": 1, "stock": 1}"#)), status: &[400], code: Some("malformed_json"), ..BASE },
    Case { name: "product: a byte order mark", method: "POST", path: T("/products"), headers: &[JSON], body: Some(B(b"\xef\xbb\xbf{\"id\": \"t\", \"name\": \"T\", \"price_cents\": 1, \"stock\": 1}")), status: &[400], code: Some("malformed_json"), ..BASE },
    Case { name: "product: 10,000-deep object", method: "POST", path: T("/products"), headers: &[JSON], body: Some(M(deep_object)), status: &[400], code: Some("malformed_json"), ..BASE },
    Case { name: "product: 10,000-deep array in a member", method: "POST", path: T("/products"), headers: &[JSON], body: Some(M(deep_array)), status: &[400], code: Some("malformed_json"), ..BASE },
    Case { name: "product: a duplicate member", method: "POST", path: T("/products"), headers: &[JSON], body: Some(T(r#"{"id": "dup-a", "name": "D", "price_cents": 1, "stock": 1, "id": "dup-b"}"#)), status: &[400], code: Some("malformed_json"), ..BASE },
    Case { name: "product: an array body", method: "POST", path: T("/products"), headers: &[JSON], body: Some(T("[]")), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "product: a null body", method: "POST", path: T("/products"), headers: &[JSON], body: Some(T("null")), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "product: every field of the wrong type", method: "POST", path: T("/products"), headers: &[JSON], body: Some(T(r#"{"id": 7, "name": [], "price_cents": {}, "stock": true}"#)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "product: an unknown member is ignored", method: "POST", path: T("/products"), headers: &[JSON], body: Some(T(r#"{"id": "hx-unknown", "name": "U", "price_cents": 1, "stock": 0, "admin": true}"#)), status: &[201], ..BASE },
    Case { name: "product: integers written as 1.5e2 and 0.0 are integers", method: "POST", path: T("/products"), headers: &[JSON], body: Some(T(r#"{"id": "hx-float", "name": "F", "price_cents": 1.5e2, "stock": 0.0}"#)), status: &[201], ..BASE },
    Case { name: "product: a body of exactly 1 MiB", method: "POST", path: T("/products"), headers: &[JSON], body: Some(M(exactly_the_limit)), status: &[201], ..BASE },
    Case { name: "product: 1 MiB + 1 declared, Expect: 100-continue", method: "POST", path: T("/products"), headers: &[JSON, ("expect", T("100-continue"))], body: Some(M(over_the_limit)), sending: Sending::HeadOnly, status: &[413], code: Some("payload_too_large"), ..BASE },
    Case { name: "product: 1 MiB + 1 declared, body never sent", method: "POST", path: T("/products"), headers: &[JSON], body: Some(M(over_the_limit)), sending: Sending::HeadOnly, status: &[413], code: Some("payload_too_large"), ..BASE },
    // POST /products: each field
    Case { name: "product: an SQL-looking id", method: "POST", path: T("/products"), headers: &[JSON], body: Some(T(r#"{"id": "' OR 1=1 --", "name": "S", "price_cents": 1, "stock": 1}"#)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "product: a path-traversal id", method: "POST", path: T("/products"), headers: &[JSON], body: Some(T(r#"{"id": "../../etc/passwd", "name": "P", "price_cents": 1, "stock": 1}"#)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "product: a NUL in the id", method: "POST", path: T("/products"), headers: &[JSON], body: Some(T(r#"{"id": "nul\u0000id", "name": "N", "price_cents": 1, "stock": 1}"#)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "product: a NUL in the name", method: "POST", path: T("/products"), headers: &[JSON], body: Some(T(r#"{"id": "nul-name", "name": "a\u0000b", "price_cents": 1, "stock": 1}"#)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "product: an escape sequence in the name", method: "POST", path: T("/products"), headers: &[JSON], body: Some(T(r#"{"id": "esc-name", "name": "\u001b[31mred", "price_cents": 1, "stock": 1}"#)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "product: a 1,000,000-character name", method: "POST", path: T("/products"), headers: &[JSON], body: Some(M(megabyte_name)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "product: price 2^63", method: "POST", path: T("/products"), headers: &[JSON], body: Some(T(r#"{"id": "p63", "name": "P", "price_cents": 9223372036854775808, "stock": 1}"#)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "product: price 2^64", method: "POST", path: T("/products"), headers: &[JSON], body: Some(T(r#"{"id": "p64", "name": "P", "price_cents": 18446744073709551616, "stock": 1}"#)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "product: price -1", method: "POST", path: T("/products"), headers: &[JSON], body: Some(T(r#"{"id": "pneg", "name": "P", "price_cents": -1, "stock": 1}"#)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "product: price 1e309", method: "POST", path: T("/products"), headers: &[JSON], body: Some(T(r#"{"id": "pinf", "name": "P", "price_cents": 1e309, "stock": 1}"#)), status: &[400], code: Some("malformed_json"), ..BASE },
    Case { name: "product: price 1.5", method: "POST", path: T("/products"), headers: &[JSON], body: Some(T(r#"{"id": "pfrac", "name": "P", "price_cents": 1.5, "stock": 1}"#)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "product: price one over the maximum", method: "POST", path: T("/products"), headers: &[JSON], body: Some(T(r#"{"id": "pmax", "name": "P", "price_cents": 100000001, "stock": 1}"#)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "product: price as a string", method: "POST", path: T("/products"), headers: &[JSON], body: Some(T(r#"{"id": "pstr", "name": "P", "price_cents": "100", "stock": 1}"#)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "product: stock 2^53", method: "POST", path: T("/products"), headers: &[JSON], body: Some(T(r#"{"id": "s53", "name": "P", "price_cents": 1, "stock": 9007199254740992}"#)), status: &[422], code: Some("validation_failed"), ..BASE },
    // GET /products
    Case { name: "products: limit 0", path: T("/products?limit=0"), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "products: limit 501", path: T("/products?limit=501"), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "products: limit -1", path: T("/products?limit=-1"), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "products: limit 2^63", path: T("/products?limit=9223372036854775808"), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "products: limit 1e2", path: T("/products?limit=1e2"), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "products: limit empty", path: T("/products?limit="), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "products: limit of invalid UTF-8", path: T("/products?limit=%FF"), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "products: limit given twice", path: T("/products?limit=1&limit=500"), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "products: a NUL cursor", path: T("/products?cursor=%00"), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "products: an SQL-looking cursor", path: T("/products?cursor=%27%20OR%201%3D1%20--"), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "products: unknown parameters are ignored", path: T("/products?admin=true&%00=%00&x&x"), status: &[200], ..BASE },
    // /products/{id}
    Case { name: "product: an SQL-looking path id", path: T("/products/%27%20OR%201%3D1%20--"), status: &[404], code: Some("not_found"), ..BASE },
    Case { name: "product: an encoded path traversal", path: T("/products/..%2F..%2Fetc%2Fpasswd"), status: &[404], code: Some("not_found"), ..BASE },
    Case { name: "product: a fully encoded path traversal", path: T("/products/%2e%2e%2f%2e%2e%2fetc%2fpasswd"), status: &[404], code: Some("not_found"), ..BASE },
    Case { name: "product: a raw path traversal", path: T("/products/../../etc/passwd"), status: &[404], code: Some("not_found"), ..BASE },
    Case { name: "product: a NUL path id", path: T("/products/%00"), status: &[404], code: Some("not_found"), ..BASE },
    Case { name: "product: a path id of invalid UTF-8", path: T("/products/%FF%FE"), status: &[400], code: Some("bad_request"), ..BASE },
    Case { name: "product: a 60 KiB path id", path: M(path_of_60_kib), status: &[404], code: Some("not_found"), ..BASE },
    Case { name: "product: DELETE is no method here", method: "DELETE", path: T("/products/{product}"), status: &[405], code: Some("method_not_allowed"), ..BASE },
    // POST /products/{id}/restock
    Case { name: "restock: quantity 2^53", method: "POST", path: T("/products/{product}/restock"), headers: &[JSON], body: Some(T(r#"{"quantity": 9007199254740992}"#)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "restock: 2^53 - 1 more than the product may hold", method: "POST", path: T("/products/{product}/restock"), headers: &[JSON], body: Some(T(r#"{"quantity": 9007199254740991}"#)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "restock: quantity 0", method: "POST", path: T("/products/{product}/restock"), headers: &[JSON], body: Some(T(r#"{"quantity": 0}"#)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "restock: quantity -5", method: "POST", path: T("/products/{product}/restock"), headers: &[JSON], body: Some(T(r#"{"quantity": -5}"#)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "restock: quantity true", method: "POST", path: T("/products/{product}/restock"), headers: &[JSON], body: Some(T(r#"{"quantity": true}"#)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "restock: quantity given twice", method: "POST", path: T("/products/{product}/restock"), headers: &[JSON], body: Some(T(r#"{"quantity": 1, "quantity": 1000}"#)), status: &[400], code: Some("malformed_json"), ..BASE },
    Case { name: "restock: a NUL product", method: "POST", path: T("/products/%00/restock"), headers: &[JSON], body: Some(T(r#"{"quantity": 1}"#)), status: &[404], code: Some("not_found"), ..BASE },
    Case { name: "restock: text/plain", method: "POST", path: T("/products/{product}/restock"), headers: &[("content-type", T("text/plain"))], body: Some(T(r#"{"quantity": 1}"#)), status: &[415], code: Some("unsupported_media_type"), ..BASE },
    // POST /orders: Idempotency-Key
    Case { name: "order: an empty Idempotency-Key", method: "POST", path: T("/orders"), headers: &[JSON, ("idempotency-key", T(""))], body: Some(T(ORDER)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "order: a 256-character Idempotency-Key", method: "POST", path: T("/orders"), headers: &[JSON, ("idempotency-key", M(key_of_256))], body: Some(T(ORDER)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "order: a 100 KiB Idempotency-Key", method: "POST", path: T("/orders"), headers: &[JSON, ("idempotency-key", M(header_of_100_kib))], body: Some(T(ORDER)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "order: an Idempotency-Key of non-ASCII bytes", method: "POST", path: T("/orders"), headers: &[JSON, ("idempotency-key", B(b"key-\xff\xfe"))], body: Some(T(ORDER)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "order: two Idempotency-Keys", method: "POST", path: T("/orders"), headers: &[JSON, ("idempotency-key", T("key-a")), ("idempotency-key", T("key-b"))], body: Some(T(ORDER)), status: &[422], code: Some("validation_failed"), ..BASE },
    // POST /orders: the body
    Case { name: "order: 101 items", method: "POST", path: T("/orders"), headers: &[JSON], body: Some(M(too_many_items)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "order: no items", method: "POST", path: T("/orders"), headers: &[JSON], body: Some(T(r#"{"customer_id": "c", "items": []}"#)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "order: items is an object", method: "POST", path: T("/orders"), headers: &[JSON], body: Some(T(r#"{"customer_id": "c", "items": {"product_id": "hx-1", "quantity": 1}}"#)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "order: an item is a string", method: "POST", path: T("/orders"), headers: &[JSON], body: Some(T(r#"{"customer_id": "c", "items": ["hx-1"]}"#)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "order: quantity 2^63", method: "POST", path: T("/orders"), headers: &[JSON], body: Some(T(r#"{"customer_id": "c", "items": [{"product_id": "hx-1", "quantity": 9223372036854775808}]}"#)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "order: quantity 2^64", method: "POST", path: T("/orders"), headers: &[JSON], body: Some(T(r#"{"customer_id": "c", "items": [{"product_id": "hx-1", "quantity": 18446744073709551616}]}"#)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "order: quantity 1e309", method: "POST", path: T("/orders"), headers: &[JSON], body: Some(T(r#"{"customer_id": "c", "items": [{"product_id": "hx-1", "quantity": 1e309}]}"#)), status: &[400], code: Some("malformed_json"), ..BASE },
    Case { name: "order: quantity -1", method: "POST", path: T("/orders"), headers: &[JSON], body: Some(T(r#"{"customer_id": "c", "items": [{"product_id": "hx-1", "quantity": -1}]}"#)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "order: quantity 1.5", method: "POST", path: T("/orders"), headers: &[JSON], body: Some(T(r#"{"customer_id": "c", "items": [{"product_id": "hx-1", "quantity": 1.5}]}"#)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "order: quantity as a string", method: "POST", path: T("/orders"), headers: &[JSON], body: Some(T(r#"{"customer_id": "c", "items": [{"product_id": "hx-1", "quantity": "1"}]}"#)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "order: quantity given twice", method: "POST", path: T("/orders"), headers: &[JSON], body: Some(T(r#"{"customer_id": "c", "items": [{"product_id": "hx-1", "quantity": 1, "quantity": 100000}]}"#)), status: &[400], code: Some("malformed_json"), ..BASE },
    Case { name: "order: the same product twice", method: "POST", path: T("/orders"), headers: &[JSON], body: Some(T(r#"{"customer_id": "c", "items": [{"product_id": "hx-1", "quantity": 1}, {"product_id": "hx-1", "quantity": 1}]}"#)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "order: a path-traversal product", method: "POST", path: T("/orders"), headers: &[JSON], body: Some(T(r#"{"customer_id": "c", "items": [{"product_id": "../../etc/passwd", "quantity": 1}]}"#)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "order: a NUL in the customer id", method: "POST", path: T("/orders"), headers: &[JSON], body: Some(T(r#"{"customer_id": "c\u0000", "items": [{"product_id": "hx-1", "quantity": 1}]}"#)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "order: a 1,000,000-character customer id", method: "POST", path: T("/orders"), headers: &[JSON], body: Some(M(megabyte_customer)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "order: an SQL-looking customer, an unknown product", method: "POST", path: T("/orders"), headers: &[JSON], body: Some(T(r#"{"customer_id": "'; DROP TABLE orders; --", "items": [{"product_id": "no-such-product", "quantity": 1}]}"#)), status: &[422], code: Some("unknown_product"), ..BASE },
    Case { name: "order: more than the stock", method: "POST", path: T("/orders"), headers: &[JSON], body: Some(T(r#"{"customer_id": "c", "items": [{"product_id": "hx-1", "quantity": 1000000}]}"#)), status: &[409], code: Some("insufficient_stock"), ..BASE },
    Case { name: "order: every line at the largest quantity and price", method: "POST", path: T("/orders"), headers: &[JSON], body: Some(M(total_past_2_53)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "order: a total just under 2^53", method: "POST", path: T("/orders"), headers: &[JSON], body: Some(M(total_just_under_2_53)), status: &[201], ..BASE },
    Case { name: "order: respond-async does not skip validation", method: "POST", path: T("/orders"), headers: &[JSON, ("prefer", T("respond-async"))], body: Some(T(r#"{"customer_id": "c", "items": [{"product_id": "hx-1", "quantity": 0}]}"#)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "order: PUT is no method here", method: "PUT", path: T("/orders"), headers: &[JSON], body: Some(T("{}")), status: &[405], code: Some("method_not_allowed"), ..BASE },
    // GET /orders
    Case { name: "orders: an upper-case status", path: T("/orders?status=PENDING"), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "orders: a NUL customer", path: T("/orders?customer_id=%00"), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "orders: an empty customer", path: T("/orders?customer_id="), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "orders: a 129-character customer", path: M(customer_of_129), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "orders: a cursor that is no order id", path: T("/orders?cursor=not-a-uuid"), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "orders: an SQL-looking cursor", path: T("/orders?cursor=%27%20OR%201%3D1%20--"), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "orders: status given twice", path: T("/orders?status=pending&status=confirmed"), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "orders: limit 1.5", path: T("/orders?limit=1.5"), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "orders: an SQL-looking customer finds nothing", path: T("/orders?customer_id=%27%20OR%201%3D1%20--"), status: &[200], ..BASE },
    // /orders/{id}, cancel, events
    Case { name: "order: an SQL-looking path id", path: T("/orders/%27%20OR%201%3D1%20--"), status: &[404], code: Some("not_found"), ..BASE },
    Case { name: "order: an encoded path traversal", path: T("/orders/..%2F..%2Fetc%2Fpasswd"), status: &[404], code: Some("not_found"), ..BASE },
    Case { name: "order: a NUL path id", path: T("/orders/%00"), status: &[404], code: Some("not_found"), ..BASE },
    Case { name: "order: a NUL after a real id", path: T("/orders/{order}%00"), status: &[404], code: Some("not_found"), ..BASE },
    Case { name: "order: a real id in upper case", path: T("/orders/{ORDER}"), status: &[404], code: Some("not_found"), ..BASE },
    Case { name: "order: a path id of invalid UTF-8", path: T("/orders/%C3%28"), status: &[400], code: Some("bad_request"), ..BASE },
    Case { name: "cancel: a NUL order", method: "POST", path: T("/orders/%00/cancel"), status: &[404], code: Some("not_found"), ..BASE },
    Case { name: "cancel: an SQL-looking order", method: "POST", path: T("/orders/1%20OR%201%3D1/cancel"), status: &[404], code: Some("not_found"), ..BASE },
    Case { name: "events: a NUL order", path: T("/orders/%00/events"), status: &[404], code: Some("not_found"), ..BASE },
    Case { name: "events: a traversal order", path: T("/orders/..%2F..%2F/events"), status: &[404], code: Some("not_found"), ..BASE },
    Case { name: "events: a cursor past 10^15", path: T("/orders/{order}/events"), headers: &[("last-event-id", T("99999999999999999999"))], status: &[400], code: Some("invalid_last_event_id"), ..BASE },
    Case { name: "events: a negative cursor", path: T("/orders/{order}/events"), headers: &[("last-event-id", T("-1"))], status: &[400], code: Some("invalid_last_event_id"), ..BASE },
    Case { name: "events: a cursor of non-ASCII bytes", path: T("/orders/{order}/events"), headers: &[("last-event-id", B(b"1\xff"))], status: &[400], code: Some("invalid_last_event_id"), ..BASE },
    Case { name: "events: a cursor of too many counts", path: T("/orders/{order}/events"), headers: &[("last-event-id", M(cursor_of_too_many_parts))], status: &[400], code: Some("invalid_last_event_id"), ..BASE },
    Case { name: "events: a 100 KiB cursor", path: T("/orders/{order}/events"), headers: &[("last-event-id", M(header_of_100_kib))], status: &[400], code: Some("invalid_last_event_id"), ..BASE },
    Case { name: "events: a cursor past the history", path: T("/orders/{order}/events"), headers: &[("last-event-id", T("1000"))], status: &[400], code: Some("invalid_last_event_id"), ..BASE },
    // GET /sagas, POST /sagas/retry
    Case { name: "sagas: a NUL state", path: T("/sagas?state=%00"), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "sagas: stuck=yes", path: T("/sagas?stuck=yes"), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "sagas: a NUL kind", path: T("/sagas?kind=%00"), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "sagas: an SQL-looking kind", path: T("/sagas?kind=%27%20OR%201%3D1%20--"), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "sagas: a NUL cursor", path: T("/sagas?cursor=%00"), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "sagas: kind given twice", path: T("/sagas?kind=place_order&kind=cancel_order"), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "sagas: an unknown kind finds nothing", path: T("/sagas?kind=no_such_kind"), status: &[200], ..BASE },
    Case { name: "bulk retry: stuck=1", method: "POST", path: T("/sagas/retry?stuck=1"), headers: &[JSON], body: Some(T(REASON)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "bulk retry: a NUL kind", method: "POST", path: T("/sagas/retry?kind=%00"), headers: &[JSON], body: Some(T(REASON)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "bulk retry: no reason", method: "POST", path: T("/sagas/retry"), headers: &[JSON], body: Some(T(r#"{"actor": "ops"}"#)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "bulk retry: a NUL reason", method: "POST", path: T("/sagas/retry"), headers: &[JSON], body: Some(T(r#"{"actor": "ops", "reason": "\u0000"}"#)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "bulk retry: a 501-character reason", method: "POST", path: T("/sagas/retry"), headers: &[JSON], body: Some(M(reason_of_501)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "bulk retry: text/plain", method: "POST", path: T("/sagas/retry"), headers: &[("content-type", T("text/plain"))], body: Some(T(REASON)), status: &[415], code: Some("unsupported_media_type"), ..BASE },
    // /sagas/{id}, retry, abort
    Case { name: "saga: a NUL path id", path: T("/sagas/%00"), status: &[404], code: Some("not_found"), ..BASE },
    Case { name: "saga: an encoded path traversal", path: T("/sagas/..%2F..%2Fetc%2Fpasswd"), status: &[404], code: Some("not_found"), ..BASE },
    Case { name: "saga: an SQL-looking path id", path: T("/sagas/%27%20OR%201%3D1%20--"), status: &[404], code: Some("not_found"), ..BASE },
    Case { name: "retry: a NUL saga", method: "POST", path: T("/sagas/%00/retry"), headers: &[JSON], body: Some(T(REASON)), status: &[404], code: Some("not_found"), ..BASE },
    Case { name: "retry: a reason of control characters", method: "POST", path: T("/sagas/{saga}/retry"), headers: &[JSON], body: Some(T(r#"{"actor": "ops", "reason": "\u0000\u0007"}"#)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "retry: a settled saga", method: "POST", path: T("/sagas/{saga}/retry"), headers: &[JSON], body: Some(T(REASON)), status: &[409], code: Some("saga_finished"), ..BASE },
    Case { name: "abort: a NUL saga", method: "POST", path: T("/sagas/%00/abort"), headers: &[JSON], body: Some(T(REASON)), status: &[404], code: Some("not_found"), ..BASE },
    Case { name: "abort: a 101-character actor", method: "POST", path: T("/sagas/{saga}/abort"), headers: &[JSON], body: Some(M(actor_of_101)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "abort: a reason of the wrong type", method: "POST", path: T("/sagas/{saga}/abort"), headers: &[JSON], body: Some(T(r#"{"actor": "ops", "reason": 5}"#)), status: &[422], code: Some("validation_failed"), ..BASE },
    Case { name: "abort: a 10,000-deep body", method: "POST", path: T("/sagas/{saga}/abort"), headers: &[JSON], body: Some(M(deep_object)), status: &[400], code: Some("malformed_json"), ..BASE },
    // Operations and the dashboard
    Case { name: "feed: garbage parameters are ignored", path: T("/sagas/events?limit=%00&cursor=%FF"), status: &[200], ..BASE },
    Case { name: "healthz: a NUL query", path: T("/healthz?%00"), status: &[200], ..BASE },
    Case { name: "metrics: an SQL-looking bearer token (authentication off)", path: T("/metrics"), headers: &[("authorization", T("Bearer ' OR 1=1 --"))], status: &[200], ..BASE },
    Case { name: "openapi: a path traversal after it", path: T("/openapi.yaml/../../etc/passwd"), status: &[404], code: Some("not_found"), ..BASE },
    Case { name: "ui: a raw path traversal", path: T("/ui/../../etc/passwd"), status: &[404], code: Some("not_found"), ..BASE },
    Case { name: "ui: an encoded path traversal", path: T("/ui/%2e%2e/%2e%2e/etc/passwd"), status: &[404], code: Some("not_found"), ..BASE },
    Case { name: "ui: a NUL after the script's name", path: T("/ui/app.js%00"), status: &[404], code: Some("not_found"), ..BASE },
    Case { name: "ui: a 100 KiB If-None-Match", path: T("/ui"), headers: &[("if-none-match", M(header_of_100_kib))], status: &[200], ..BASE },
    Case { name: "an unknown route with a NUL", path: T("/nope%00"), status: &[404], code: Some("not_found"), ..BASE },
    Case { name: "an unknown method", method: "BREW", path: T("/orders"), status: &[405], code: Some("method_not_allowed"), ..BASE },
    Case { name: "healthz: a 100 KiB X-Request-Id", path: T("/healthz"), headers: &[("x-request-id", M(header_of_100_kib))], status: &[200], ..BASE },
    Case { name: "healthz: a malformed traceparent", path: T("/healthz"), headers: &[("traceparent", T("00-' OR 1=1 --"))], status: &[200], ..BASE },
    // Refused by the HTTP/1 parser before the application: a bare status, no body
    Case { name: "http: a 100 KiB request target", path: M(path_of_100_kib), status: &[414], layer: Layer::Http, ..BASE },
    Case { name: "http: a 1 MiB header", path: T("/healthz"), headers: &[("x-filler", M(header_of_1_mib))], status: &[431], layer: Layer::Http, ..BASE },
    Case { name: "http: 101 headers", path: T("/healthz"), headers: HUNDRED_AND_ONE, status: &[431], layer: Layer::Http, ..BASE },
    Case { name: "http: a raw NUL in the target", path: B(b"/products/\x00"), status: &[400], layer: Layer::Http, ..BASE },
    Case { name: "http: raw non-ASCII in the target", path: B(b"/products/\xff"), status: &[400], layer: Layer::Http, ..BASE },
    Case { name: "http: a NUL in a header value", path: T("/healthz"), headers: &[("x-nul", B(b"a\x00b"))], status: &[400], layer: Layer::Http, ..BASE },
];

/// Text that would show internals if an answer held it: SQL, driver and database messages, Rust
/// names, source paths, panics. serde's "at line 1 column 5" is fine to show: it points into the
/// client's own body. A marker the request itself holds may be echoed (an id in a 404).
const LEAKS: &[&str] = &[
    "sqlx",
    "sqlite",
    "SQLite",
    "postgres",
    "Postgres",
    "SELECT ",
    "INSERT ",
    "UPDATE ",
    "DELETE FROM",
    "syntax error",
    "constraint",
    "violates",
    "duplicate key value",
    "invalid byte sequence",
    "error returned from database",
    "pool timed out",
    "database is locked",
    "panicked",
    "RUST_BACKTRACE",
    "stack backtrace",
    "src/",
    ".rs:",
    "/home/",
    "/root/",
    "/tmp/",
    "std::",
    "core::",
    "alloc::",
    "serde_json::",
    "order_saga::",
    "tokio::",
    "hyper::",
    "axum::",
    "Error {",
    "Some(",
    "Box<",
];

/// The fixtures a case's text may name.
struct Fixtures {
    order: String,
    saga: String,
}

impl Data {
    fn bytes(&self, fixtures: &Fixtures) -> Vec<u8> {
        match self {
            Data::Text(text) => text
                .replace("{product}", "hx-1")
                .replace("{order}", &fixtures.order)
                .replace("{ORDER}", &fixtures.order.to_uppercase())
                .replace("{saga}", &fixtures.saga)
                .into_bytes(),
            Data::Bytes(bytes) => bytes.to_vec(),
            Data::Made(make) => make(),
        }
    }
}

type Answer = RawAnswer;

impl RawAnswer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends one request on a new connection (`Connection: close`) and reads its answer: the head,
/// then the body by its length or its chunks; an event stream's head only.
async fn exchange(
    authority: &str,
    method: &str,
    target: &[u8],
    headers: &[(String, Vec<u8>)],
    body: Option<&[u8]>,
    sending: Sending,
) -> std::io::Result<Answer> {
    let mut stream = tokio::net::TcpStream::connect(authority).await?;
    let mut head = Vec::new();
    head.extend_from_slice(method.as_bytes());
    head.push(b' ');
    head.extend_from_slice(target);
    head.extend_from_slice(format!(" HTTP/1.1\r\nhost: {authority}\r\nconnection: close\r\n").as_bytes());
    for (name, value) in headers {
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value);
        head.extend_from_slice(b"\r\n");
    }
    if let Some(body) = body {
        head.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    // A server that refuses a request before reading all of it (hyper past its head buffer)
    // answers and closes, and the rest of the write meets a reset; the answer sent before it is
    // still there to read, and is what counts.
    let written = async {
        stream.write_all(&head).await?;
        if let (Some(body), Sending::All) = (body, sending) {
            stream.write_all(body).await?;
        }
        Ok::<(), std::io::Error>(())
    }
    .await;
    match (read_answer(&mut stream).await, written) {
        (Ok(answer), _) => Ok(answer),
        (Err(read), Ok(())) => Err(read),
        (Err(read), Err(write)) => Err(std::io::Error::other(format!("writing: {write}; then reading: {read}"))),
    }
}

async fn read_answer(stream: &mut tokio::net::TcpStream) -> std::io::Result<Answer> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        // A head ends at the first empty line; 1xx answers are skipped.
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
            let mut lines = head.split("\r\n");
            let status: u16 = lines
                .next()
                .and_then(|l| l.split(' ').nth(1))
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| std::io::Error::other(format!("no status line in {head:?}")))?;
            let rest = buffer.split_off(end + 4);
            if (100..200).contains(&status) {
                buffer = rest;
                continue;
            }
            let headers: Vec<(String, String)> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            let mut answer = Answer { status, headers, body: rest };
            read_body(stream, &mut answer).await?;
            return Ok(answer);
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::other(format!(
                "the connection closed before a whole head: {:?}",
                String::from_utf8_lossy(&buffer)
            )));
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}

async fn read_body(stream: &mut tokio::net::TcpStream, answer: &mut Answer) -> std::io::Result<()> {
    if answer.header("content-type").is_some_and(|t| t.starts_with("text/event-stream")) {
        answer.body.clear();
        return Ok(());
    }
    let chunked = answer.header("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked"));
    let length: Option<usize> = answer.header("content-length").and_then(|l| l.parse().ok());
    let mut raw = std::mem::take(&mut answer.body);
    let mut chunk = [0u8; 64 * 1024];
    loop {
        if let Some(length) = length.filter(|_| !chunked) {
            if raw.len() >= length {
                raw.truncate(length);
                answer.body = raw;
                return Ok(());
            }
        }
        if chunked {
            if let Some(body) = dechunk(&raw) {
                answer.body = body;
                return Ok(());
            }
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            if chunked || length.is_some() {
                return Err(std::io::Error::other("the connection closed inside the body"));
            }
            answer.body = raw;
            return Ok(());
        }
        raw.extend_from_slice(&chunk[..n]);
    }
}

/// The body of complete chunked data, or `None` while its last chunk has not arrived.
fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n")?;
        let size_text = String::from_utf8_lossy(&raw[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Some(body);
        }
        if raw.len() < size + 2 {
            return None;
        }
        body.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

/// Sends `case` and checks its answer; returns what went wrong, if anything.
async fn run(authority: &str, fixtures: &Fixtures, case: &Case) -> Result<Answer, String> {
    let target = case.path.bytes(fixtures);
    let headers: Vec<(String, Vec<u8>)> =
        case.headers.iter().map(|(name, value)| (name.to_string(), value.bytes(fixtures))).collect();
    let body = case.body.map(|b| b.bytes(fixtures));
    let sent = tokio::time::timeout(
        CLIENT_TIMEOUT,
        exchange(authority, case.method, &target, &headers, body.as_deref(), case.sending),
    )
    .await;
    let answer = match sent {
        Err(_) => return Err(format!("no answer within {CLIENT_TIMEOUT:?} (a hang)")),
        Ok(Err(e)) => return Err(format!("the exchange failed: {e}")),
        Ok(Ok(answer)) => answer,
    };
    let text = answer.text();
    let shown: String = text.chars().take(400).collect();
    if answer.status >= 500 {
        return Err(format!("{} (a server error): {shown}", answer.status));
    }
    if !case.status.contains(&answer.status) {
        return Err(format!("{}, expected one of {:?}: {shown}", answer.status, case.status));
    }
    let request_text = [
        String::from_utf8_lossy(&target).into_owned(),
        String::from_utf8_lossy(body.as_deref().unwrap_or_default()).into_owned(),
        headers.iter().map(|(_, v)| String::from_utf8_lossy(v).into_owned()).collect::<String>(),
    ]
    .concat();
    for leak in LEAKS {
        if text.contains(leak) && !request_text.contains(leak) {
            return Err(format!("the answer shows internals ({leak:?}): {shown}"));
        }
    }
    if case.layer == Layer::Http {
        // Refused by the HTTP parser before any application code: nothing to say but the status.
        if !answer.body.is_empty() {
            return Err(format!("an answer of the HTTP layer with a body: {shown}"));
        }
        return Ok(answer);
    }
    if answer.header("x-request-id").is_none() {
        return Err("no x-request-id: the answer did not come through the application".into());
    }
    if answer.status >= 400 {
        let media = answer.header("content-type").unwrap_or_default();
        if !media.starts_with("application/problem+json") {
            return Err(format!("an error of type {media:?}, not application/problem+json: {shown}"));
        }
        let problem: Value = serde_json::from_str(&text).map_err(|e| format!("a problem that is not JSON ({e})"))?;
        if problem["status"] != json!(answer.status) {
            return Err(format!("the problem's status member differs: {shown}"));
        }
        let code = problem["code"].as_str().unwrap_or_default();
        if Some(code) != case.code {
            return Err(format!("code {code:?}, expected {:?}: {shown}", case.code));
        }
        if problem["type"] != json!(format!("urn:order-saga:problem:{code}")) {
            return Err(format!("the problem's type does not name its code: {shown}"));
        }
        if code == "validation_failed" && problem["errors"].as_array().is_none_or(Vec::is_empty) {
            return Err(format!("validation_failed without the fields it found: {shown}"));
        }
        // An answer never repeats a long input back: it names what was wrong, not the bytes.
        if text.len() > 4096 {
            return Err(format!("a {} byte problem", text.len()));
        }
    }
    Ok(answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_inputs_get_clean_answers_and_change_nothing() {
    assert!(CASES.len() >= 50, "the table has {} cases", CASES.len());
    let app = spawn_app().await;
    let authority = app.base.trim_start_matches("http://").to_string();

    // Fixtures: a product with a confirmed order and its settled saga, and the products at the
    // largest price for the total cases.
    app.create_product("hx-1", 1000, 100).await;
    let placed = app.place_order("hx-customer", &[("hx-1", 1)], None).await;
    assert_eq!(placed.status(), 201);
    let placed: Value = placed.json().await.unwrap();
    let fixtures = Fixtures {
        order: placed["id"].as_str().unwrap().to_string(),
        saga: placed["saga_id"].as_str().unwrap().to_string(),
    };
    let mut added: Vec<(String, i64)> = vec![("hx-1".to_string(), 100)];
    for i in 0..MAX_PRODUCTS {
        app.create_product(&max_product(i), limits::MAX_PRICE_CENTS, BIG_QUANTITY).await;
        added.push((max_product(i), BIG_QUANTITY));
    }

    let mut failures = Vec::new();
    let mut accepted_orders = Vec::new();
    for case in CASES {
        match run(&authority, &fixtures, case).await {
            Ok(answer) => {
                if case.method == "POST" && case.path.bytes(&fixtures) == b"/orders" && answer.status == 201 {
                    accepted_orders.push(serde_json::from_slice::<Value>(&answer.body).unwrap());
                }
            }
            Err(what) => failures.push(format!("{}: {what}", case.name)),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} hostile inputs were mishandled:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );

    // The one accepted order: 100 lines of 900,000 units at 10^8 cents, priced exactly.
    assert_eq!(accepted_orders.len(), 1, "{accepted_orders:?}");
    let whale = &accepted_orders[0];
    assert_eq!(whale["status"], "confirmed", "{whale}");
    let expected_total = MAX_PRODUCTS as i64 * BIG_QUANTITY * limits::MAX_PRICE_CENTS;
    assert!(expected_total <= order_saga::inventory::MAX_SAFE_INTEGER);
    assert_eq!(whale["total_cents"], json!(expected_total), "{whale}");

    // Still healthy, and a normal order is still confirmed.
    assert_eq!(app.get("/healthz").await.status(), 200);
    let normal = app.place_order("hx-customer", &[("hx-1", 2)], None).await;
    assert_eq!(normal.status(), 201, "a normal order after the table");

    // Nothing left unsettled, and stock moved only by the accepted orders: `hx-1` sold the
    // fixture's 1 and the normal order's 2; each `hx-max` product sold the whale's units.
    eventually(Duration::from_secs(30), "every order settles", || async {
        app.get_json("/orders?status=pending&limit=500").await["items"].as_array().unwrap().is_empty()
    })
    .await;
    for state in ["running", "compensating"] {
        let unfinished = app.get_json(&format!("/sagas?state={state}&limit=500")).await;
        assert!(unfinished["items"].as_array().unwrap().is_empty(), "{state} sagas remain: {unfinished}");
    }
    let added: Vec<(&str, i64)> = added.iter().map(|(id, n)| (id.as_str(), *n)).collect();
    assert_stock_invariants(&app, &added, true).await;
    let hx = app.get_json("/products/hx-1").await;
    assert_eq!((hx["available"].as_i64(), hx["sold"].as_i64()), (Some(97), Some(3)), "{hx}");
    for i in [0, MAX_PRODUCTS - 1] {
        let p = app.get_json(&format!("/products/{}", max_product(i))).await;
        assert_eq!(p["sold"], json!(BIG_QUANTITY), "{p}");
    }
    // Refused product bodies created nothing; the accepted ones did.
    for id in ["t", "deep", "dup-a", "dup-b", "nul-name", "esc-name", "big-name", "p63", "pneg", "pfrac", "s53"] {
        assert_eq!(app.get(&format!("/products/{id}")).await.status(), 404, "product {id} was created");
    }
    for id in ["hx-unknown", "hx-exact"] {
        assert_eq!(app.get(&format!("/products/{id}")).await.status(), 200, "product {id}");
    }
    assert_eq!(app.get_json("/products/hx-float").await["price_cents"], json!(150));
    app.stop().await;
}

/// The limits `openapi.yaml` states are the constants the code enforces.
#[test]
fn the_spec_states_the_limits_the_code_enforces() {
    let doc: Value = serde_yaml::from_str(order_saga::http::OPENAPI_YAML).unwrap();
    let schemas = &doc["components"]["schemas"];
    let at = |pointer: &str| doc.pointer(pointer).cloned().unwrap_or_else(|| panic!("openapi.yaml has no {pointer}"));
    let n = |v: usize| json!(v);
    let i = |v: i64| json!(v);
    assert_eq!(schemas["ProductIdString"]["maxLength"], n(limits::ID_CHARS));
    assert_eq!(schemas["ProductIdString"]["pattern"], json!(limits::ID_PATTERN));
    assert_eq!(schemas["NewProduct"]["properties"]["name"]["maxLength"], n(limits::NAME_CHARS));
    assert_eq!(schemas["NewProduct"]["properties"]["price_cents"]["maximum"], i(limits::MAX_PRICE_CENTS));
    assert_eq!(schemas["NewProduct"]["properties"]["stock"]["maximum"], i(limits::MAX_STOCK));
    assert_eq!(schemas["Restock"]["properties"]["quantity"]["maximum"], i(limits::MAX_STOCK));
    assert_eq!(schemas["PlaceOrder"]["properties"]["customer_id"]["maxLength"], n(limits::CUSTOMER_ID_CHARS));
    assert_eq!(schemas["PlaceOrder"]["properties"]["items"]["maxItems"], n(limits::MAX_ITEMS));
    assert_eq!(schemas["PlaceOrderItem"]["properties"]["quantity"]["maximum"], i(limits::MAX_QUANTITY));
    assert_eq!(schemas["OperatorRequest"]["properties"]["actor"]["maxLength"], n(limits::ACTOR_CHARS));
    assert_eq!(schemas["OperatorRequest"]["properties"]["reason"]["maxLength"], n(limits::REASON_CHARS));
    assert_eq!(schemas["Retried"]["properties"]["retried"]["maximum"], n(order_saga::saga::MAX_BULK));
    for text in [&schemas["NewProduct"]["properties"]["name"], &schemas["PlaceOrder"]["properties"]["customer_id"]] {
        assert_eq!(text["pattern"], json!(limits::TEXT_PATTERN), "{text:?}");
    }
    for line in
        [&schemas["OperatorRequest"]["properties"]["actor"], &schemas["OperatorRequest"]["properties"]["reason"]]
    {
        assert_eq!(line["pattern"], json!(limits::LINE_PATTERN), "{line:?}");
    }
    let limit = at("/components/parameters/Limit/schema");
    assert_eq!(
        (limit["minimum"].clone(), limit["maximum"].clone(), limit["default"].clone()),
        (i(limits::PAGE_MIN), i(limits::PAGE_MAX), i(limits::PAGE_DEFAULT))
    );
    assert_eq!(at("/components/parameters/OrderId/schema/pattern"), json!(limits::UUID_PATTERN));
    assert_eq!(at("/components/parameters/SagaId/schema/pattern"), json!(limits::UUID_PATTERN));
    assert_eq!(at("/components/parameters/ProductId/schema/pattern"), json!(limits::ID_PATTERN));
    let key = at("/paths/~1orders/post/parameters/0");
    assert_eq!(key["name"], "Idempotency-Key");
    assert_eq!(key["schema"]["maxLength"], n(limits::IDEMPOTENCY_KEY_CHARS));
    let last_event_id = at("/paths/~1orders~1{id}~1events/get/parameters/1/schema/pattern");
    assert_eq!(last_event_id, json!(limits::last_event_id_pattern()));
    let description = doc["info"]["description"].as_str().unwrap();
    for stated in
        [format!("{} MiB", limits::BODY_BYTES / (1024 * 1024)), format!("more than {} levels deep", limits::JSON_DEPTH)]
    {
        assert!(description.contains(&stated), "the conventions state {stated:?}");
    }
    assert_eq!(order_saga::http::BODY_LIMIT, limits::BODY_BYTES);
    assert_eq!(order_saga::auth::MAX_SUBJECT_CHARS, limits::CUSTOMER_ID_CHARS, "a subject is a customer id");
}

/// A statement the database refuses for its data is a bug to report (500), never an outage to
/// retry (503 `database_unavailable`): PostgreSQL's SQLSTATE 22021 for a NUL in a string once
/// passed for SQLite's BUSY, whose code shares its low byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_statement_is_not_a_database_outage() {
    use order_saga::error::Error;
    let app = spawn_app().await;
    let pool = &app.state.databases[0].pool;
    let refused = if on_postgres() {
        sqlx::query("SELECT $1 AS x").bind("a\u{0}b").fetch_optional(pool).await
    } else {
        sqlx::query("SELECT x FROM no_such_table").fetch_optional(pool).await
    };
    let error = refused.map(|_| ()).expect_err("the database refuses the statement");
    assert!(matches!(Error::from(error), Error::Database(_)), "classified as a database outage");
    app.stop().await;
}
