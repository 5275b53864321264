//! Drift between the code and `openapi.yaml`: the routes, the response bodies, the statuses, the
//! problem codes, the headers and the request bounds the spec declares are checked against the
//! running app, so that neither can change without the other.
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use common::*;
use order_saga::http::shed::UNCOUNTED;
use order_saga::http::{OPENAPI_YAML, ROUTES};
use order_saga::limits;
use order_saga::saga::{Fault, FaultPlan, Phase, StepError};
use reqwest::header::{CONTENT_TYPE, HeaderMap};
use serde_json::{Value, json};

/// The committed spec, read from disk (not the copy compiled into the binary).
const SPEC_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml");

/// The keys of an OpenAPI path item that are operations.
const HTTP_METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

/// The `detail` of the router's fallback 404, which no handler uses.
const FALLBACK_DETAIL: &str = "no resource at this path";

/// Response headers whose presence the spec must declare.
const DECLARED_HEADERS: [&str; 3] = ["location", "retry-after", "idempotent-replayed"];

fn spec_text() -> String {
    std::fs::read_to_string(SPEC_FILE).unwrap_or_else(|e| panic!("read {SPEC_FILE}: {e}"))
}

fn spec() -> Value {
    serde_yaml::from_str::<Value>(&spec_text()).expect("openapi.yaml parses as YAML")
}

/// The node a local `$ref` points at.
fn follow<'a>(doc: &'a Value, reference: &str) -> &'a Value {
    let pointer = reference.strip_prefix('#').unwrap_or_else(|| panic!("only local $refs are used: {reference}"));
    doc.pointer(pointer).unwrap_or_else(|| panic!("dangling $ref {reference}"))
}

/// Follows `$ref`s until a node without one.
fn resolve<'a>(doc: &'a Value, mut node: &'a Value) -> &'a Value {
    for _ in 0..32 {
        match node.get("$ref").and_then(Value::as_str) {
            Some(reference) => node = follow(doc, reference),
            None => return node,
        }
    }
    panic!("$ref cycle at {node}")
}

fn schema<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc.pointer(&format!("/components/schemas/{name}")).unwrap_or_else(|| panic!("no schema {name} in the spec"))
}

fn key_set(object: &Value) -> BTreeSet<String> {
    object.as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default()
}

fn string_set(array: &Value) -> BTreeSet<String> {
    array.as_array().map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect()).unwrap_or_default()
}

/// Every (path, method) the spec describes.
fn spec_operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut operations = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("the spec has paths") {
        for method in key_set(resolve(doc, item)) {
            if HTTP_METHODS.contains(&method.as_str()) {
                operations.insert((path.clone(), method));
            }
        }
    }
    operations
}

/// Every (path, method) the router serves, from `order_saga::http::ROUTES`.
fn code_operations() -> BTreeSet<(String, String)> {
    ROUTES.iter().flat_map(|(path, methods)| methods.iter().map(|m| (path.to_string(), m.to_string()))).collect()
}

/// The spec's path template a concrete path (without query) matches, literal segments first.
fn template_for(doc: &Value, path: &str) -> Option<String> {
    let path = path.split('?').next().unwrap_or(path);
    let segments: Vec<&str> = path.split('/').collect();
    let mut best: Option<(usize, String)> = None;
    for template in key_set(&doc["paths"]) {
        let parts: Vec<&str> = template.split('/').collect();
        if parts.len() != segments.len() {
            continue;
        }
        let mut literal = 0;
        let matches = parts.iter().zip(&segments).all(|(p, s)| {
            if p.starts_with('{') && p.ends_with('}') {
                !s.is_empty()
            } else {
                literal += 1;
                p == s
            }
        });
        if matches && best.as_ref().is_none_or(|(l, _)| literal > *l) {
            best = Some((literal, template));
        }
    }
    best.map(|(_, t)| t)
}

/// The operation object of `method` on `template`.
fn operation<'a>(doc: &'a Value, template: &str, method: &str) -> Option<&'a Value> {
    let item = resolve(doc, doc["paths"].get(template)?);
    item.get(method)
}

/// The response an operation declares for `status`: exact, then `4XX`-style, then `default`.
fn declared_response<'a>(doc: &'a Value, op: &'a Value, status: u16) -> Option<&'a Value> {
    let responses = &op["responses"];
    let range = format!("{}XX", status / 100);
    [status.to_string(), range, "default".to_string()]
        .iter()
        .find_map(|key| responses.get(key.as_str()))
        .map(|r| resolve(doc, r))
}

/// The parameters of an operation and of its path item.
fn parameters<'a>(doc: &'a Value, template: &str, method: &str) -> Vec<&'a Value> {
    let item = resolve(doc, &doc["paths"][template]);
    let mut all: Vec<&Value> = Vec::new();
    for list in [&item["parameters"], &item[method]["parameters"]] {
        all.extend(list.as_array().into_iter().flatten().map(|p| resolve(doc, p)));
    }
    all
}

fn media_essence(content_type: &str) -> String {
    content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase()
}

fn is_json_media(essence: &str) -> bool {
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// The JSON Schema type names of a schema's `type` (a string or a list); empty if it has none.
fn types_of(schema: &Value) -> Vec<String> {
    match &schema["type"] {
        Value::String(t) => vec![t.clone()],
        Value::Array(ts) => ts.iter().filter_map(|t| t.as_str().map(str::to_string)).collect(),
        _ => Vec::new(),
    }
}

fn has_type(value: &Value, name: &str) -> bool {
    match name {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "string" => value.is_string(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        other => panic!("unknown JSON Schema type {other:?} in the spec"),
    }
}

/// Loosely an RFC 3339 UTC time with milliseconds, as the service writes them.
fn looks_like_date_time(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 24
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'.'
        && b[23] == b'Z'
        && s.chars().filter(char::is_ascii_digit).count() == 17
}

/// Checks JSON values against the spec's schemas: types (a list such as `["integer", "null"]`
/// included), enums, `date-time` formats, required members, no undeclared member, all the way
/// down through objects and array items. Remembers which named schemas it checked something
/// against.
struct Validator<'a> {
    doc: &'a Value,
    seen: BTreeSet<String>,
    errors: Vec<String>,
}

impl<'a> Validator<'a> {
    fn new(doc: &'a Value) -> Self {
        Self { doc, seen: BTreeSet::new(), errors: Vec::new() }
    }

    fn check(&mut self, schema: &'a Value, value: &Value, at: &str) {
        let mut schema = schema;
        for _ in 0..32 {
            let Some(reference) = schema.get("$ref").and_then(Value::as_str) else { break };
            self.seen.insert(reference.rsplit('/').next().unwrap_or(reference).to_string());
            schema = follow(self.doc, reference);
        }
        for combinator in ["anyOf", "oneOf"] {
            if let Some(alternatives) = schema.get(combinator).and_then(Value::as_array) {
                let mut matched = false;
                for alternative in alternatives {
                    let mut inner = Validator::new(self.doc);
                    inner.check(alternative, value, at);
                    if inner.errors.is_empty() {
                        self.seen.extend(inner.seen);
                        matched = true;
                        break;
                    }
                }
                if !matched {
                    self.errors.push(format!("{at}: {value} matches none of the {combinator} alternatives"));
                }
            }
        }
        if let Some(parts) = schema.get("allOf").and_then(Value::as_array) {
            for part in parts {
                self.check(part, value, at);
            }
        }
        let types = types_of(schema);
        if !types.is_empty() && !types.iter().any(|t| has_type(value, t)) {
            self.errors.push(format!("{at}: {value} is not of type {types:?}"));
            return;
        }
        if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
            if !allowed.contains(value) {
                self.errors.push(format!("{at}: {value} is not one of {allowed:?}"));
            }
        }
        if let (Some("date-time"), Some(s)) = (schema["format"].as_str(), value.as_str()) {
            if !looks_like_date_time(s) {
                self.errors.push(format!("{at}: {s:?} is not an RFC 3339 time"));
            }
        }
        match value {
            Value::Object(members) => {
                let Some(properties) = schema.get("properties").and_then(Value::as_object) else { return };
                for required in string_set(&schema["required"]) {
                    if !members.contains_key(&required) {
                        self.errors.push(format!("{at}: required member {required:?} is missing from {value}"));
                    }
                }
                for (name, member) in members {
                    match properties.get(name) {
                        Some(property) => self.check(property, member, &format!("{at}.{name}")),
                        None => self.errors.push(format!("{at}: member {name:?} is not declared in the schema")),
                    }
                }
            }
            Value::Array(elements) => {
                if let Some(items) = schema.get("items") {
                    for (i, element) in elements.iter().enumerate() {
                        self.check(items, element, &format!("{at}[{i}]"));
                    }
                }
            }
            _ => {}
        }
    }
}

/// An answer the app gave.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// One request and its answer, kept to be checked against the spec.
#[derive(Debug)]
struct Observation {
    method: String,
    path: String,
    template: Option<String>,
    status: u16,
    media: Option<String>,
    headers: BTreeSet<String>,
    body: Value,
}

/// A request body.
enum Body<'b> {
    Empty,
    Json(&'b Value),
    Raw { content_type: &'b str, text: &'b str },
}

/// Sends requests to the app and remembers every answer, so that `verify` can hold each one to
/// what the spec declares for its operation and status.
struct Probe<'a> {
    app: &'a TestApp,
    doc: &'a Value,
    observed: Mutex<Vec<Observation>>,
}

impl<'a> Probe<'a> {
    fn new(app: &'a TestApp, doc: &'a Value) -> Self {
        Self { app, doc, observed: Mutex::new(Vec::new()) }
    }

    async fn send(&self, method: &str, path: &str, headers: &[(&str, &str)], body: Body<'_>) -> Answer {
        let verb = reqwest::Method::from_bytes(method.to_ascii_uppercase().as_bytes()).expect("an HTTP method");
        let mut request = self.app.client.request(verb, self.app.url(path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request = match body {
            Body::Empty => request,
            Body::Json(value) => request.json(value),
            Body::Raw { content_type, text } => request.header(CONTENT_TYPE, content_type).body(text.to_string()),
        };
        let response = request.send().await.unwrap_or_else(|e| panic!("{method} {path} is answered: {e}"));
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let media = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(media_essence);
        // An event stream does not end by itself: its status and media type are checked here,
        // its events' data against the spec's schemas in tests/live_progress.rs.
        let text = if media.as_deref() == Some("text/event-stream") {
            String::new()
        } else {
            response.text().await.expect("the body is read")
        };
        let body = match &media {
            Some(m) if is_json_media(m) => serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{method} {path}: {m} body is not JSON ({e}): {text}")),
            _ if text.is_empty() => Value::Null,
            _ => Value::String(text),
        };
        self.observed.lock().unwrap().push(Observation {
            method: method.to_string(),
            path: path.to_string(),
            template: template_for(self.doc, path),
            status,
            media,
            headers: DECLARED_HEADERS.iter().filter(|h| headers.contains_key(**h)).map(|h| h.to_string()).collect(),
            body: body.clone(),
        });
        Answer { status, headers, body }
    }

    async fn get(&self, path: &str) -> Answer {
        self.send("get", path, &[], Body::Empty).await
    }

    async fn post(&self, path: &str, body: &Value) -> Answer {
        self.send("post", path, &[], Body::Json(body)).await
    }

    /// GETs `path`, asserting 200, and returns the body.
    async fn get_ok(&self, path: &str) -> Value {
        let answer = self.get(path).await;
        assert_eq!(answer.status, 200, "GET {path}: {}", answer.body);
        answer.body
    }

    /// The statuses observed per operation.
    fn statuses(&self) -> BTreeMap<(String, String), BTreeSet<u16>> {
        let mut statuses: BTreeMap<(String, String), BTreeSet<u16>> = BTreeMap::new();
        for o in self.observed.lock().unwrap().iter() {
            if let Some(template) = &o.template {
                statuses.entry((template.clone(), o.method.clone())).or_default().insert(o.status);
            }
        }
        statuses
    }

    /// Holds every observed answer to its operation's declared response: the status is declared,
    /// with the media type answered, the body matches the declared schema, a problem's `code` is
    /// named in the response's description, and the notable headers it carries are declared (and
    /// the ones declared `required` are present). Panics listing every mismatch; returns the
    /// names of the schemas the bodies were checked against.
    fn verify(&self) -> BTreeSet<String> {
        let doc = self.doc;
        let mut validator = Validator::new(doc);
        let mut errors = Vec::new();
        for o in self.observed.lock().unwrap().iter() {
            let what = format!("{} {} -> {}", o.method.to_uppercase(), o.path, o.status);
            let Some(template) = &o.template else {
                errors.push(format!("{what}: the path matches no path of the spec"));
                continue;
            };
            let Some(op) = operation(doc, template, &o.method) else {
                errors.push(format!("{what}: the spec has no {} {template}", o.method));
                continue;
            };
            let Some(response) = declared_response(doc, op, o.status) else {
                errors.push(format!("{what}: status {} is not declared for {} {template}", o.status, o.method));
                continue;
            };
            let declared_headers = response.get("headers").map(key_set).unwrap_or_default();
            let declared_lower: BTreeSet<String> = declared_headers.iter().map(|h| h.to_ascii_lowercase()).collect();
            for header in &o.headers {
                if !declared_lower.contains(header) {
                    errors.push(format!("{what}: header {header} is sent but not declared"));
                }
            }
            for (name, header) in response.get("headers").and_then(Value::as_object).into_iter().flatten() {
                let header = resolve(doc, header);
                if header["required"] == json!(true) && !o.headers.contains(&name.to_ascii_lowercase()) {
                    errors.push(format!("{what}: required header {name} is missing"));
                }
            }
            let Some(media) = &o.media else {
                if !o.body.is_null() {
                    errors.push(format!("{what}: a body without Content-Type"));
                }
                continue;
            };
            let Some(content) = response["content"].get(media.as_str()) else {
                errors.push(format!(
                    "{what}: media type {media} is not declared (declared: {:?})",
                    key_set(&response["content"])
                ));
                continue;
            };
            if is_json_media(media) {
                let before = validator.errors.len();
                validator.check(&content["schema"], &o.body, &format!("{what}: body"));
                if validator.errors.len() > before {
                    errors.push(format!("{what}: body {}", o.body));
                }
            }
            if media == "application/problem+json" {
                let code = o.body["code"].as_str().unwrap_or_default();
                if o.body["status"] != json!(o.status) {
                    errors.push(format!("{what}: the problem's status is {}", o.body["status"]));
                }
                if o.body["type"] != json!(format!("urn:order-saga:problem:{code}")) {
                    errors.push(format!("{what}: the problem's type is {}", o.body["type"]));
                }
                let description = response["description"].as_str().unwrap_or_default();
                if !description.contains(&format!("`{code}`")) {
                    errors.push(format!("{what}: code `{code}` is not named in the response's description"));
                }
            }
        }
        errors.extend(validator.errors);
        assert!(errors.is_empty(), "the app and openapi.yaml disagree:\n{}", errors.join("\n"));
        validator.seen
    }
}

/// Every operation that load shedding counts answers 503 `overloaded` once `MAX_IN_FLIGHT` are in
/// flight, and declares it; the ones it does not count still answer, never `overloaded`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overloaded_answers_are_declared_by_every_operation_that_can_give_them() {
    let doc = spec();
    let dbs = fresh_databases().await;
    let mut config = config(&dbs);
    config.max_in_flight = 1;
    let faults = Arc::new(FaultPlan::new());
    let app = spawn_app_with(config, Some(faults.clone())).await;
    let p = Probe::new(&app, &doc);
    app.create_product("mug", 1250, 10).await;
    // A saga answered at once but held at its first step keeps the only slot.
    let injected = Fault::Fail(StepError::transient("injected: held for the drift test"));
    faults.add("place_order", "reserve_stock", Phase::Action, injected, u32::MAX);
    let held = app
        .client
        .post(app.url("/orders"))
        .header("Prefer", "respond-async")
        .json(&order_body("c-1", &[("mug", 1)]))
        .send()
        .await
        .unwrap();
    assert_eq!(held.status(), 202);

    for (template, methods) in ROUTES {
        let path = template.replace("{id}", "drift-probe");
        for method in *methods {
            let answer = match *method {
                "post" => p.post(&path, &json!({})).await,
                _ => p.get(&path).await,
            };
            if UNCOUNTED.contains(template) {
                assert_ne!(answer.body["code"], "overloaded", "{method} {template} is not counted: {}", answer.body);
            } else {
                assert_eq!(answer.status, 503, "{method} {template} while saturated: {}", answer.body);
                assert_eq!(answer.body["code"], "overloaded", "{method} {template}");
                assert_eq!(answer.header("retry-after"), Some("1"), "{method} {template}");
            }
        }
    }
    p.verify();
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spec_operations_equal_the_router_routes() {
    let doc = spec();
    let in_spec = spec_operations(&doc);
    let in_code = code_operations();
    let undocumented: Vec<_> = in_code.difference(&in_spec).collect();
    let unserved: Vec<_> = in_spec.difference(&in_code).collect();
    assert!(undocumented.is_empty(), "routes missing from openapi.yaml: {undocumented:?}");
    assert!(unserved.is_empty(), "operations in openapi.yaml that ROUTES does not list: {unserved:?}");

    // Every `{name}` of a path is a declared path parameter of each of its operations, and no
    // operation declares a path parameter its path lacks.
    for (template, method) in &in_spec {
        let in_template: BTreeSet<String> = template
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(str::to_string)
            .collect();
        let declared: BTreeSet<String> = parameters(&doc, template, method)
            .into_iter()
            .filter(|p| p["in"] == "path")
            .map(|p| {
                assert_eq!(p["required"], json!(true), "{method} {template}: path parameter {p} must be required");
                p["name"].as_str().unwrap_or_default().to_string()
            })
            .collect();
        assert_eq!(declared, in_template, "{method} {template}: declared path parameters");
        let op = operation(&doc, template, method).unwrap();
        assert!(op["responses"].as_object().is_some_and(|r| !r.is_empty()), "{method} {template} declares no response");
        assert!(op["operationId"].is_string(), "{method} {template} has no operationId");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spec_operation_is_routed() {
    let doc = spec();
    let app = spawn_app().await;
    let probe = Probe::new(&app, &doc);

    // The fallback is recognisable, so that the check below means something.
    let fallback = probe.app.get("/no/such/path").await;
    assert_eq!(fallback.status(), 404);
    let fallback: Value = fallback.json().await.unwrap();
    assert_eq!(fallback["detail"], FALLBACK_DETAIL, "the router fallback's detail changed: {fallback}");

    for (template, method) in spec_operations(&doc) {
        let path: String = template
            .split('/')
            .map(|s| if s.starts_with('{') && s.ends_with('}') { "drift-probe" } else { s })
            .collect::<Vec<_>>()
            .join("/");
        let body = json!({});
        let answer =
            probe.send(&method, &path, &[], if method == "post" { Body::Json(&body) } else { Body::Empty }).await;
        assert_ne!(answer.status, 405, "{method} {path}: the router does not serve this method");
        assert!(
            !(answer.status == 404 && answer.body["detail"] == FALLBACK_DETAIL),
            "{method} {path}: answered by the router fallback"
        );
    }

    // No path of the spec serves a method the spec does not describe.
    let described = spec_operations(&doc);
    for template in key_set(&doc["paths"]) {
        let path = template.replace("{id}", "drift-probe");
        for method in ["put", "patch", "delete"] {
            if described.contains(&(template.clone(), method.to_string())) {
                continue;
            }
            let verb = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let response = app.client.request(verb, app.url(&path)).send().await.unwrap();
            assert_eq!(response.status(), 405, "{method} {path} is served but not in the spec");
        }
    }
    probe.verify();
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_schemas_declare_every_member_required() {
    // Every member of these bodies is always sent (null when it has no value), so each schema's
    // `required` lists all of its `properties`: a body then matches only if its key set equals
    // the schema's properties. A Problem has five base members and optional extensions.
    let doc = spec();
    for name in [
        "Product",
        "ProductPage",
        "Order",
        "OrderItem",
        "OrderPage",
        "Saga",
        "SagaStep",
        "SagaEvent",
        "SagaSummary",
        "SagaPage",
        "FieldError",
        "Health",
        "Retried",
        "OrderSagaEvent",
        "SagaChange",
        "OrderFailure",
    ] {
        let s = schema(&doc, name);
        assert_eq!(types_of(s), ["object"], "{name} is an object");
        assert_eq!(string_set(&s["required"]), key_set(&s["properties"]), "{name}: required vs properties");
    }
    let problem = schema(&doc, "Problem");
    let base: BTreeSet<String> = ["type", "title", "status", "detail", "code"].map(String::from).into();
    assert_eq!(string_set(&problem["required"]), base, "Problem's required members");
    let extensions: BTreeSet<String> =
        ["errors", "order_id", "saga_id", "product_id", "state"].map(String::from).into();
    assert_eq!(key_set(&problem["properties"]), &base | &extensions, "Problem's members");
    // A Saga is a SagaSummary with its steps and events.
    let summary = key_set(&schema(&doc, "SagaSummary")["properties"]);
    let full = key_set(&schema(&doc, "Saga")["properties"]);
    let extra: BTreeSet<String> = ["steps", "events"].map(String::from).into();
    assert_eq!(full, &summary | &extra, "Saga = SagaSummary + steps + events");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_order_flow_answers_as_the_spec_declares() {
    let doc = spec();
    let app = spawn_app().await;
    let p = Probe::new(&app, &doc);

    // Products.
    let created = p.post("/products", &json!({"id": "mug", "name": "Mug", "price_cents": 1250, "stock": 5})).await;
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(created.header("location"), Some("/products/mug"));
    let created = p.post("/products", &json!({"id": "pen", "name": "Pen", "price_cents": 99, "stock": 2})).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let again = p.post("/products", &json!({"id": "mug", "name": "Mug", "price_cents": 1, "stock": 1})).await;
    assert_eq!((again.status, again.body["code"].as_str()), (409, Some("product_exists")));
    let invalid = p.post("/products", &json!({"id": "bad id", "price_cents": -1, "stock": "7"})).await;
    assert_eq!((invalid.status, invalid.body["code"].as_str()), (422, Some("validation_failed")));
    let fields = invalid.body["errors"].as_array().map(|e| e.iter().map(|e| e["field"].clone()).collect::<Vec<_>>());
    assert_eq!(fields, Some(vec![json!("id"), json!("name"), json!("price_cents"), json!("stock")]));
    let malformed =
        p.send("post", "/products", &[], Body::Raw { content_type: "application/json", text: "{\"id\": " }).await;
    assert_eq!((malformed.status, malformed.body["code"].as_str()), (400, Some("malformed_json")));
    let plain = p.send("post", "/products", &[], Body::Raw { content_type: "text/plain", text: "mug" }).await;
    assert_eq!((plain.status, plain.body["code"].as_str()), (415, Some("unsupported_media_type")));
    let not_object = p.post("/products", &json!([1, 2])).await;
    assert_eq!((not_object.status, not_object.body["errors"][0]["field"].as_str()), (422, Some("body")));
    assert_eq!(p.get_ok("/products/mug").await["available"], 5);
    assert_eq!(p.get("/products/nope").await.status, 404);
    assert_eq!(p.get("/products/not%20an%20id").await.status, 404);
    let restocked = p.post("/products/pen/restock", &json!({"quantity": 3})).await;
    assert_eq!((restocked.status, &restocked.body["available"]), (200, &json!(5)));
    assert_eq!(p.post("/products/nope/restock", &json!({"quantity": 3})).await.status, 404);
    assert_eq!(p.post("/products/pen/restock", &json!({"quantity": 0})).await.status, 422);
    let page = p.get_ok("/products?limit=1").await;
    assert_eq!((page["items"][0]["id"].as_str(), page["next_cursor"].as_str()), (Some("mug"), Some("mug")));
    let page = p.get_ok("/products?limit=1&cursor=mug").await;
    assert_eq!(page["items"][0]["id"], "pen");
    assert_eq!(p.get("/products?limit=501").await.status, 422);

    // Orders: confirmed, replayed, key reused, rejected three ways.
    let body = order_body("c-1", &[("mug", 2), ("pen", 1)]);
    let key = [("Idempotency-Key", "drift-key-1")];
    let placed = p.send("post", "/orders", &key, Body::Json(&body)).await;
    assert_eq!(placed.status, 201, "{}", placed.body);
    assert_eq!(placed.body["status"], "confirmed");
    assert_eq!(placed.body["total_cents"], 2599);
    let order_id = placed.body["id"].as_str().unwrap().to_string();
    let saga_id = placed.body["saga_id"].as_str().unwrap().to_string();
    assert_eq!(placed.header("location"), Some(format!("/orders/{order_id}").as_str()));
    assert_eq!(placed.header("idempotent-replayed"), None);
    let replayed = p.send("post", "/orders", &key, Body::Json(&body)).await;
    assert_eq!((replayed.status, replayed.header("idempotent-replayed")), (201, Some("true")));
    assert_eq!(replayed.body["id"], order_id.as_str());
    let reused = p.send("post", "/orders", &key, Body::Json(&order_body("c-1", &[("mug", 1)]))).await;
    assert_eq!((reused.status, reused.body["code"].as_str()), (422, Some("idempotency_key_reused")));
    let bad_key = "k".repeat(256);
    let refused = p.send("post", "/orders", &[("Idempotency-Key", &bad_key)], Body::Json(&body)).await;
    assert_eq!((refused.status, refused.body["errors"][0]["field"].as_str()), (422, Some("Idempotency-Key")));
    let short = p.post("/orders", &order_body("c-2", &[("pen", 99)])).await;
    assert_eq!((short.status, short.body["code"].as_str()), (409, Some("insufficient_stock")));
    assert_eq!(short.body["product_id"], "pen");
    let rejected_id = short.body["order_id"].as_str().unwrap().to_string();
    assert_eq!(short.header("location"), Some(format!("/orders/{rejected_id}").as_str()));
    let unknown = p.post("/orders", &order_body("c-2", &[("ghost", 1)])).await;
    assert_eq!((unknown.status, unknown.body["code"].as_str()), (422, Some("unknown_product")));
    assert!(unknown.body["saga_id"].is_string() && unknown.body["order_id"].is_string(), "{}", unknown.body);
    let twice = p.post("/orders", &order_body("c-2", &[("pen", 1), ("pen", 1)])).await;
    assert_eq!((twice.status, twice.body["code"].as_str()), (422, Some("validation_failed")));
    let rejected = p.get_ok(&format!("/orders/{rejected_id}")).await;
    assert_eq!(
        (rejected["status"].as_str(), rejected["failure"]["code"].as_str()),
        (Some("rejected"), Some("insufficient_stock"))
    );
    let confirmed = p.get_ok(&format!("/orders/{order_id}")).await;
    assert_eq!(confirmed["items"][0]["unit_price_cents"], 1250);
    assert_eq!(confirmed["failure"], Value::Null);
    assert_eq!(p.get("/orders/nope").await.status, 404);
    let mine = p.get_ok("/orders?customer_id=c-1&status=confirmed").await;
    assert_eq!(mine["items"].as_array().map(Vec::len), Some(1));
    let newest = p.get_ok("/orders?limit=1").await;
    assert!(newest["next_cursor"].is_string(), "{newest}");
    assert_eq!(p.get("/orders?status=shipped").await.status, 422);

    // Cancelling.
    let cancelled = p.post(&format!("/orders/{order_id}/cancel"), &json!({})).await;
    assert!(matches!(cancelled.status, 200 | 202), "{}", cancelled.body);
    assert_eq!(cancelled.body["status"], "cancelled");
    let cancelled_again = p.post(&format!("/orders/{order_id}/cancel"), &json!({})).await;
    assert!(matches!(cancelled_again.status, 200 | 202), "{}", cancelled_again.body);
    let not_cancellable = p.post(&format!("/orders/{rejected_id}/cancel"), &json!({})).await;
    assert_eq!((not_cancellable.status, not_cancellable.body["code"].as_str()), (409, Some("order_not_cancellable")));
    assert_eq!(p.post("/orders/nope/cancel", &json!({})).await.status, 404);

    // Sagas and operations.
    let saga = p.get_ok(&format!("/sagas/{saga_id}")).await;
    assert_eq!((saga["state"].as_str(), saga["order_id"].as_str()), (Some("completed"), Some(order_id.as_str())));
    assert_eq!(saga["steps"].as_array().map(Vec::len), Some(4));
    let failed = p.get_ok(&format!("/sagas/{}", short.body["saga_id"].as_str().unwrap())).await;
    assert_eq!(failed["state"], "compensated");
    let sagas = p.get_ok("/sagas?kind=place_order&limit=2").await;
    assert_eq!(sagas["items"].as_array().map(Vec::len), Some(2));
    assert!(sagas["next_cursor"].is_string(), "{sagas}");
    assert!(!p.get_ok("/sagas?state=compensated&stuck=false").await["items"].as_array().unwrap().is_empty());
    assert_eq!(p.get("/sagas?stuck=maybe").await.status, 422);
    assert_eq!(p.get("/sagas?state=done").await.status, 422);
    assert_eq!(p.get("/sagas/nope").await.status, 404);
    assert_eq!(p.get_ok("/healthz").await, json!({"status": "ok"}));
    assert_eq!(p.get_ok("/readyz").await, json!({"status": "ready"}));
    assert_eq!(p.get("/openapi.yaml").await.status, 200);
    // A path id that is not percent-encoded UTF-8 is a malformed request on every such path.
    for (template, method) in spec_operations(&doc).into_iter().filter(|(t, _)| t.contains('{')) {
        let path = template.replace("{id}", "%FF");
        let body = json!({"quantity": 1});
        let answer = p.send(&method, &path, &[], if method == "post" { Body::Json(&body) } else { Body::Empty }).await;
        assert_eq!((answer.status, answer.body["code"].as_str()), (400, Some("bad_request")), "{method} {path}");
    }

    let seen = p.verify();
    for name in [
        "Product",
        "ProductPage",
        "Order",
        "OrderFailure",
        "OrderItem",
        "OrderPage",
        "Saga",
        "SagaStep",
        "StepState",
        "SagaEvent",
        "SagaSummary",
        "SagaPage",
        "Problem",
        "FieldError",
        "Health",
    ] {
        assert!(seen.contains(name), "no answer was checked against schema {name}; checked: {seen:?}");
    }
    let statuses = p.statuses();
    let orders_post = &statuses[&("/orders".to_string(), "post".to_string())];
    assert!([201, 409, 422].iter().all(|s| orders_post.contains(s)), "POST /orders statuses seen: {orders_post:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_orders_and_stuck_sagas_answer_as_the_spec_declares() {
    let doc = spec();
    let dbs = fresh_databases().await;
    let mut config = config(&dbs);
    // Long enough for a healthy step to commit under load, short enough to wait for a few 202s.
    config.order_wait_ms = 2000;
    config.saga_deadline_ms = 600_000;
    config.stuck_after_attempts = 1;
    let faults = Arc::new(FaultPlan::new());
    let app = spawn_app_with(config, Some(faults.clone())).await;
    let p = Probe::new(&app, &doc);
    app.create_product("mug", 1250, 10).await;
    let injected = || Fault::Fail(StepError::transient("injected: the inventory database is unreachable"));

    // A cancel whose stock cannot go back yet: cancelled, 202 while return_stock retries.
    let placed = p.post("/orders", &order_body("c-1", &[("mug", 1)])).await;
    assert_eq!(placed.status, 201, "{}", placed.body);
    let confirmed_id = placed.body["id"].as_str().unwrap().to_string();
    faults.add("cancel_order", "return_stock", Phase::Action, injected(), u32::MAX);
    let cancel = p.post(&format!("/orders/{confirmed_id}/cancel"), &json!({})).await;
    assert_eq!((cancel.status, cancel.body["status"].as_str()), (202, Some("cancelled")), "{}", cancel.body);
    assert_eq!(cancel.header("location"), Some(format!("/orders/{confirmed_id}").as_str()));
    assert_eq!(cancel.header("retry-after"), Some("1"));

    // Orders whose saga cannot reserve: 202 pending, at once or after ORDER_WAIT_MS.
    faults.add("place_order", "reserve_stock", Phase::Action, injected(), u32::MAX);
    let body = order_body("c-2", &[("mug", 2)]);
    let asynchronous = p
        .send(
            "post",
            "/orders",
            &[("Prefer", "respond-async"), ("Idempotency-Key", "drift-pending")],
            Body::Json(&body),
        )
        .await;
    assert_eq!((asynchronous.status, asynchronous.body["status"].as_str()), (202, Some("pending")));
    assert_eq!(asynchronous.body["total_cents"], Value::Null);
    assert_eq!(asynchronous.body["items"][0]["unit_price_cents"], Value::Null);
    assert_eq!(asynchronous.header("retry-after"), Some("1"));
    let pending_id = asynchronous.body["id"].as_str().unwrap().to_string();
    let saga_id = asynchronous.body["saga_id"].as_str().unwrap().to_string();
    let replayed = p.send("post", "/orders", &[("Idempotency-Key", "drift-pending")], Body::Json(&body)).await;
    assert_eq!((replayed.status, replayed.header("idempotent-replayed")), (202, Some("true")));
    assert_eq!(replayed.body["id"], pending_id.as_str());
    let waited = p.post("/orders", &order_body("c-3", &[("mug", 1)])).await;
    assert_eq!((waited.status, waited.body["status"].as_str()), (202, Some("pending")), "{}", waited.body);
    assert_eq!(p.get_ok(&format!("/orders/{pending_id}")).await["status"], "pending");
    let not_yet = p.post(&format!("/orders/{pending_id}/cancel"), &json!({})).await;
    assert_eq!((not_yet.status, not_yet.body["code"].as_str()), (409, Some("order_not_cancellable")));

    // The saga is flagged stuck and keeps its last error.
    let path = format!("/sagas/{saga_id}");
    eventually(std::time::Duration::from_secs(20), "the saga is flagged stuck", || async {
        app.get_json(&path).await["stuck"] == json!(true)
    })
    .await;
    let saga = p.get_ok(&path).await;
    assert_eq!(saga["state"], "running");
    assert!(saga["last_error"].as_str().is_some_and(|e| e.contains("injected")), "{saga}");
    assert_eq!(saga["steps"][0]["state"], "running");
    assert!(saga["steps"][0]["last_error"].as_str().is_some_and(|e| e.contains("injected")), "{saga}");
    let stuck = p.get_ok("/sagas?stuck=true&kind=place_order").await;
    assert!(stuck["items"].as_array().unwrap().iter().any(|s| s["id"] == saga_id.as_str()), "{stuck}");
    assert!(!p.get_ok("/orders?status=pending").await["items"].as_array().unwrap().is_empty());

    // Operator controls on the stuck sagas.
    let by = json!({"actor": "alice@ops", "reason": "drift"});
    let cancel_saga =
        p.get_ok(&format!("/orders/{confirmed_id}")).await["cancel_saga_id"].as_str().unwrap().to_string();
    let past = p.post(&format!("/sagas/{cancel_saga}/abort"), &by).await;
    assert_eq!((past.status, past.body["code"].as_str()), (409, Some("saga_past_pivot")), "{}", past.body);
    let retried = p.post(&format!("/sagas/{cancel_saga}/retry"), &by).await;
    assert_eq!(retried.status, 200, "{}", retried.body);
    let bulk = p.post("/sagas/retry?kind=cancel_order&stuck=true", &by).await;
    assert_eq!((bulk.status, bulk.body["retried"].as_i64()), (200, Some(1)), "{}", bulk.body);
    let aborted = p.post(&format!("/sagas/{saga_id}/abort"), &by).await;
    assert_eq!(aborted.status, 200, "{}", aborted.body);
    eventually(std::time::Duration::from_secs(20), "the aborted saga compensates", || async {
        app.get_json(&path).await["state"] == "compensated"
    })
    .await;
    let finished = p.post(&format!("/sagas/{saga_id}/retry"), &by).await;
    assert_eq!((finished.status, finished.body["code"].as_str()), (409, Some("saga_finished")));
    let order = p.get_ok(&format!("/orders/{pending_id}")).await;
    assert_eq!(order["failure"]["code"], "aborted");
    let blank = p.post("/sagas/retry", &json!({"actor": "alice@ops"})).await;
    assert_eq!((blank.status, blank.body["code"].as_str()), (422, Some("validation_failed")));

    let seen = p.verify();
    for name in ["Order", "OrderItem", "Saga", "SagaStep", "SagaEvent", "SagaSummary", "Problem", "Retried"] {
        assert!(seen.contains(name), "no answer was checked against schema {name}; checked: {seen:?}");
    }
    let statuses = p.statuses();
    assert!(statuses[&("/orders".to_string(), "post".to_string())].contains(&202), "{statuses:?}");
    assert!(statuses[&("/orders/{id}/cancel".to_string(), "post".to_string())].contains(&202), "{statuses:?}");
    app.stop().await;
}

/// What a request field's schema allows, read from the spec: values it must refuse and
/// boundary values it must accept.
fn refused_and_accepted(doc: &Value, schema: &Value, example: &Value) -> (Vec<Value>, Vec<Value>) {
    let schema = resolve(doc, schema);
    let (mut refused, mut accepted) = (Vec::new(), Vec::new());
    let types = types_of(schema);
    let int = |key: &str| schema[key].as_i64();
    let len = |key: &str| schema[key].as_u64().map(|n| n as usize);
    if types.iter().any(|t| t == "integer") {
        refused.push(json!("1"));
        refused.push(json!(1.5));
        if let Some(min) = int("minimum") {
            refused.push(json!(min - 1));
            accepted.push(json!(min));
        }
        if let Some(max) = int("maximum") {
            refused.push(json!(max + 1));
            accepted.push(json!(max));
        }
    } else if types.iter().any(|t| t == "string") {
        refused.push(json!(7));
        // Within the id pattern, only ASCII letters are sure to fit; otherwise count characters,
        // not bytes, with a two-byte one. Each pattern the spec uses has a value it refuses.
        let (unit, off_pattern) = match schema["pattern"].as_str() {
            None => ("é", None),
            Some(limits::ID_PATTERN) => ("a", Some("not an id!")),
            Some(limits::TEXT_PATTERN) => ("é", Some("a bell\u{7} rings")),
            Some(limits::LINE_PATTERN) => ("é", Some(" \u{a0}\u{3000} ")),
            Some(other) => panic!("no value known to break the pattern {other}"),
        };
        refused.extend(off_pattern.map(|v| json!(v)));
        if let Some(min) = len("minLength") {
            if min > 0 {
                refused.push(json!(unit.repeat(min - 1)));
            }
            accepted.push(json!(unit.repeat(min.max(1))));
        }
        if let Some(max) = len("maxLength") {
            refused.push(json!(unit.repeat(max + 1)));
            accepted.push(json!(unit.repeat(max)));
        }
    } else if types.iter().any(|t| t == "array") {
        refused.push(json!("not an array"));
        let element = example.get(0).cloned().unwrap_or(Value::Null);
        if let Some(min) = len("minItems") {
            if min > 0 {
                refused.push(Value::Array(vec![element.clone(); min - 1]));
            }
        }
        if let Some(max) = len("maxItems") {
            refused.push(Value::Array(vec![element; max + 1]));
        }
    } else if types.iter().any(|t| t == "object") {
        refused.push(json!("not an object"));
    }
    (refused, accepted)
}

/// The field name the service reports for a member at `pointer` (`/items/0/quantity` ->
/// `items[0].quantity`).
fn field_name(pointer: &str) -> String {
    let mut name = String::new();
    for part in pointer.trim_start_matches('/').split('/') {
        if part.parse::<usize>().is_ok() {
            name.push_str(&format!("[{part}]"));
        } else {
            if !name.is_empty() {
                name.push('.');
            }
            name.push_str(part);
        }
    }
    name
}

fn reported_fields(answer: &Answer) -> Vec<String> {
    answer.body["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["field"].as_str().map(str::to_string))
        .collect()
}

/// `example` with the member `member` of the object at `pointer` set to `value`, or removed.
fn with_member(example: &Value, pointer: &str, member: &str, value: Option<Value>) -> Value {
    let mut body = example.clone();
    let target = body.pointer_mut(pointer).and_then(Value::as_object_mut).expect("the example has the object");
    match value {
        Some(v) => target.insert(member.to_string(), v),
        None => target.remove(member),
    };
    body
}

/// Sends `example` with each member of the object at `pointer` (described by `schema`) missing,
/// and set to each value the schema refuses or accepts at its bounds, expecting the service to
/// report that member as invalid exactly when the spec says it is. Recurses into arrays of
/// objects through their first element. Request number `n` (counted in `sent`) goes to
/// `path(n)`.
async fn check_request_bounds(
    p: &Probe<'_>,
    path: &dyn Fn(usize) -> String,
    sent: &mut usize,
    example: &Value,
    pointer: &str,
    schema: &Value,
) {
    let doc = p.doc;
    let schema = resolve(doc, schema);
    let object = example.pointer(pointer).unwrap_or_else(|| panic!("the example has {pointer}"));
    let required = string_set(&schema["required"]);
    for (member, member_schema) in schema["properties"].as_object().expect("an object schema with properties") {
        let at = format!("{pointer}/{member}");
        let field = field_name(&at);
        let present = object.get(member).cloned().unwrap_or(Value::Null);
        let mut cases: Vec<(Option<Value>, bool)> = Vec::new();
        if required.contains(member) {
            cases.push((None, false));
        }
        let (refused, accepted) = refused_and_accepted(doc, member_schema, &present);
        cases.extend(refused.into_iter().map(|v| (Some(v), false)));
        cases.extend(accepted.into_iter().map(|v| (Some(v), true)));
        for (value, valid) in cases {
            let shown = value.as_ref().map_or("missing".to_string(), |v| v.to_string().chars().take(80).collect());
            *sent += 1;
            let answer = p.post(&path(*sent), &with_member(example, pointer, member, value)).await;
            let fields = reported_fields(&answer);
            if valid {
                assert!(
                    answer.body["code"] != "validation_failed" && answer.status != 404,
                    "{field} = {shown} is within the spec's bounds but refused: {}",
                    answer.body
                );
            } else {
                assert_eq!(answer.status, 422, "{field} = {shown} is refused: {}", answer.body);
                assert_eq!(answer.body["code"], "validation_failed", "{field} = {shown}");
                assert!(
                    fields.iter().any(|f| f == &field || f.starts_with(&format!("{field}["))),
                    "{field} = {shown} is reported: {}",
                    answer.body
                );
            }
        }
        let member_schema = resolve(doc, member_schema);
        if types_of(member_schema).iter().any(|t| t == "array") && present.get(0).is_some_and(Value::is_object) {
            let items = &member_schema["items"];
            Box::pin(check_request_bounds(p, path, sent, example, &format!("{at}/0"), items)).await;
        }
    }
}

/// The request body schema and example of an operation.
fn request_body<'a>(doc: &'a Value, template: &str, method: &str) -> (&'a Value, &'a Value) {
    let op = operation(doc, template, method).unwrap_or_else(|| panic!("{method} {template} is in the spec"));
    let body = resolve(doc, &op["requestBody"]);
    assert_eq!(body["required"], json!(true), "{method} {template}: the body is required");
    let media = &body["content"]["application/json"];
    assert!(media["example"].is_object(), "{method} {template} has an example body");
    (&media["schema"], &media["example"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bounds_in_the_spec_are_the_ones_enforced() {
    let doc = spec();
    let app = spawn_app().await;
    let p = Probe::new(&app, &doc);

    // Each example body of the spec is accepted as it stands.
    let (product_schema, product_example) = request_body(&doc, "/products", "post");
    let created = p.post("/products", product_example).await;
    assert_eq!(created.status, 201, "the NewProduct example is accepted: {}", created.body);
    let product = product_example["id"].as_str().unwrap().to_string();
    let (restock_schema, restock_example) = request_body(&doc, "/products/{id}/restock", "post");
    let restocked = p.post(&format!("/products/{product}/restock"), restock_example).await;
    assert_eq!(restocked.status, 200, "the Restock example is accepted: {}", restocked.body);
    let (order_schema, order_example) = request_body(&doc, "/orders", "post");
    let placed = p.post("/orders", order_example).await;
    assert_eq!(placed.status, 201, "the PlaceOrder example is accepted: {}", placed.body);

    let mut sent = 0;
    check_request_bounds(&p, &|_| "/products".to_string(), &mut sent, product_example, "", product_schema).await;
    check_request_bounds(&p, &|_| "/orders".to_string(), &mut sent, order_example, "", order_schema).await;
    // Restocking adds up, so each request goes to a product of its own with no stock.
    const EMPTY: usize = 16;
    for i in 1..=EMPTY {
        app.create_product(&format!("empty-{i}"), 1, 0).await;
    }
    let mut sent = 0;
    let path = |i: usize| format!("/products/empty-{i}/restock");
    check_request_bounds(&p, &path, &mut sent, restock_example, "", restock_schema).await;
    assert!(sent <= EMPTY, "{sent} restocks need as many empty products");
    // An operator request within bounds is taken (here refused 409: the saga has settled).
    let saga = placed.body["saga_id"].as_str().unwrap().to_string();
    let (operator_schema, operator_example) = request_body(&doc, "/sagas/{id}/retry", "post");
    let mut sent = 0;
    let path = |_| format!("/sagas/{saga}/retry");
    check_request_bounds(&p, &path, &mut sent, operator_example, "", operator_schema).await;
    let (_, abort_example) = request_body(&doc, "/sagas/{id}/abort", "post");
    let (_, bulk_example) = request_body(&doc, "/sagas/retry", "post");
    assert_eq!((abort_example, bulk_example), (operator_example, operator_example));

    // Query parameters: integers out of range, unknown enum values, booleans other than `true` /
    // `false`, strings off their pattern or length and any parameter given twice are refused,
    // naming the parameter; their bounds, every enum value, both booleans and a string in its
    // pattern are accepted.
    for (template, method) in spec_operations(&doc) {
        if method != "get" || template.contains('{') {
            continue;
        }
        for parameter in parameters(&doc, &template, &method).into_iter().filter(|p| p["in"] == "query") {
            let name = parameter["name"].as_str().unwrap();
            let schema = resolve(&doc, &parameter["schema"]);
            let mut refused: Vec<String> = Vec::new();
            let mut accepted: Vec<String> = Vec::new();
            if let Some(values) = schema["enum"].as_array() {
                refused.push("no-such-value".into());
                accepted.extend(values.iter().map(|v| v.as_str().unwrap().to_string()));
            }
            if types_of(schema).iter().any(|t| t == "boolean") {
                refused.push("yes".into());
                accepted.extend(["true".into(), "false".into()]);
            }
            if types_of(schema).iter().any(|t| t == "integer") {
                refused.push("ten".into());
                for (key, step) in [("minimum", -1), ("maximum", 1)] {
                    if let Some(bound) = schema[key].as_i64() {
                        refused.push((bound + step).to_string());
                        accepted.push(bound.to_string());
                    }
                }
            }
            // Values in the query string's percent-encoding.
            match schema["pattern"].as_str() {
                None => {}
                Some(limits::ID_PATTERN) => {
                    refused.extend(["not%20an%20id!".to_string(), "a".repeat(limits::ID_CHARS + 1)]);
                    accepted.extend(["a".to_string(), "a".repeat(limits::ID_CHARS)]);
                }
                Some(limits::UUID_PATTERN) => {
                    let id = "01a23634-0bb2-7601-8584-c888bcfe076e";
                    refused.extend(["not-a-uuid".to_string(), id.to_uppercase(), format!("{id}0"), "%00".into()]);
                    accepted.push(id.to_string());
                }
                Some(limits::TEXT_PATTERN) => {
                    refused.extend(["a%07b".to_string(), "%00".into()]);
                    accepted.push("caf%C3%A9".to_string());
                }
                Some(other) => panic!("{template}?{name}: no value known to break the pattern {other}"),
            }
            if let Some(max) = schema["maxLength"].as_u64() {
                refused.push("c".repeat(max as usize + 1));
                accepted.push("c".repeat(max as usize));
            }
            if let Some(min) = schema["minLength"].as_u64().filter(|m| *m > 0) {
                refused.push("c".repeat(min as usize - 1));
            }
            if let Some(value) = accepted.first() {
                refused.push(format!("{value}&{name}={value}"));
            }
            for value in refused {
                let answer = p.get(&format!("{template}?{name}={value}")).await;
                assert_eq!(answer.status, 422, "{template}?{name}={value} is refused: {}", answer.body);
                assert_eq!(reported_fields(&answer), [name], "{template}?{name}={value}");
            }
            for value in accepted {
                let answer = p.get(&format!("{template}?{name}={value}")).await;
                assert_eq!(answer.status, 200, "{template}?{name}={value} is accepted: {}", answer.body);
            }
        }
    }
    p.verify();
    app.stop().await;
}

/// Each operation's `security` names exactly the scopes the access layer accepts for it, and
/// every operation that needs a token declares its 401 and 403.
#[test]
fn operation_security_is_the_access_rule() {
    let doc = spec();
    for (template, method) in spec_operations(&doc) {
        let op = operation(&doc, &template, &method).unwrap();
        let requirements =
            op["security"].as_array().unwrap_or_else(|| panic!("{method} {template} states its security"));
        let mut declared: BTreeSet<String> = BTreeSet::new();
        for requirement in requirements {
            for (scheme, scopes) in requirement.as_object().unwrap() {
                match scheme.as_str() {
                    "bearerAuth" => declared.extend(string_set(scopes)),
                    "metricsToken" => {
                        declared.insert("metrics_token".to_string());
                    }
                    other => panic!("{method} {template}: unknown security scheme {other}"),
                }
            }
        }
        let verb = axum::http::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let accepted: BTreeSet<String> =
            order_saga::http::access::accepted_scopes(&verb, &template).iter().map(|s| s.to_string()).collect();
        assert_eq!(declared, accepted, "{method} {template}: the spec's security and the access rule differ");
        let secured = !accepted.is_empty();
        for status in [401, 403] {
            assert_eq!(
                declared_response(&doc, op, status).is_some(),
                secured,
                "{method} {template}: a {status} is declared exactly when a token is needed"
            );
        }
        assert!(doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_document_is_the_committed_file() {
    let app = spawn_app().await;
    let response = app.get("/openapi.yaml").await;
    assert_eq!(response.status(), 200);
    let media = response.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(media_essence);
    assert_eq!(media.as_deref(), Some("application/yaml"));
    let served = response.text().await.unwrap();
    let committed = spec_text();
    assert!(served == committed, "GET /openapi.yaml differs from the committed openapi.yaml: rebuild the service");
    assert_eq!(OPENAPI_YAML, committed, "the compiled-in document is the committed file");
    let doc: Value = serde_yaml::from_str(&served).expect("the served document parses");
    assert_eq!(doc["openapi"].as_str().map(|v| v.starts_with("3.1")), Some(true), "an OpenAPI 3.1 document");
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    app.stop().await;
}
