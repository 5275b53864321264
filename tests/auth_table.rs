//! Authentication, operation by operation: every route and method of `order_saga::http::ROUTES`
//! against every kind of credential, each cell's status and problem `code` compared with the
//! table written below. Run with `--nocapture` to print the table the service answered, as
//! markdown. Also: HS/RS confusion and `alg` checks against apps configured with a PEM key.
mod auth_support;
mod common;

use std::collections::BTreeSet;

use auth_support::*;
use common::*;
use jsonwebtoken::Algorithm;
use order_saga::http::ROUTES;
use order_saga::saga::SagaFilter;
use serde_json::{Value, json};

const SECRET: &str = "the-table-tests-hs256-secret-0123456789";
const ISSUER: &str = "https://id.shop.example";
const AUDIENCE: &str = "order-saga";
const CUSTOMER_A: &str = "cust-a";
const CUSTOMER_B: &str = "cust-b";
const ADMIN: &str = "ops@shop.example";

/// What the service must answer: a row per operation, a column per credential. A success is
/// its status alone; anything else is the status and the problem's `code`. `A` in an operation
/// is customer A, `{id}` the fixture's product, order of customer A, or its saga.
const EXPECTED: &str = "
| operation | no token | Bearer not.a.jwt | Basic | expired | not yet valid | no exp | wrong signature | wrong issuer | wrong audience | alg none | no scope | customer A | customer B | admin |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
| GET /products | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 403 forbidden | 200 | 200 | 200 |
| POST /products | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 403 forbidden | 403 forbidden | 403 forbidden | 201 |
| GET /products/{id} | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 403 forbidden | 200 | 200 | 200 |
| POST /products/{id}/restock | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 403 forbidden | 403 forbidden | 403 forbidden | 200 |
| GET /orders | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 403 forbidden | 200 | 200 | 200 |
| GET /orders?customer_id=A | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 403 forbidden | 200 | 403 forbidden | 200 |
| POST /orders for A | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 403 forbidden | 201 | 403 forbidden | 201 |
| GET /orders/{id} | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 403 forbidden | 200 | 404 not_found | 200 |
| POST /orders/{id}/cancel | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 403 forbidden | 200 | 404 not_found | 200 |
| GET /orders/{id}/events | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 403 forbidden | 200 | 404 not_found | 200 |
| GET /sagas | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 403 forbidden | 403 forbidden | 403 forbidden | 200 |
| POST /sagas/retry | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 403 forbidden | 403 forbidden | 403 forbidden | 200 |
| GET /sagas/events | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 403 forbidden | 403 forbidden | 403 forbidden | 200 |
| GET /sagas/{id} | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 403 forbidden | 403 forbidden | 403 forbidden | 200 |
| POST /sagas/{id}/retry | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 403 forbidden | 403 forbidden | 403 forbidden | 409 saga_finished |
| POST /sagas/{id}/abort | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 403 forbidden | 403 forbidden | 403 forbidden | 409 saga_finished |
| GET /healthz | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 |
| GET /readyz | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 |
| GET /openapi.yaml | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 |
| GET /metrics | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 401 unauthorized | 403 forbidden | 403 forbidden | 403 forbidden | 200 |
| GET /ui | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 |
| GET /ui/app.js | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 |
| GET /ui/app.css | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 | 200 |
";

/// One credential: a column of the table.
struct Credential {
    name: &'static str,
    auth: Auth,
}

impl Credential {
    /// Whether it carries a bearer token, which a 401 then calls `invalid_token`.
    fn sends_a_bearer_token(&self) -> bool {
        match &self.auth {
            Auth::Nothing => false,
            Auth::Bearer(_) => true,
            Auth::Raw(value) => value.to_ascii_lowercase().starts_with("bearer "),
        }
    }
}

/// Claims of customer A that this app accepts: issuer, audience, ten minutes to go.
fn good_claims(sub: &str, scope: &str) -> Value {
    let mut claims = claims(sub, scope);
    claims["iss"] = json!(ISSUER);
    claims["aud"] = json!(AUDIENCE);
    claims
}

fn token(claims: &Value) -> Auth {
    Auth::Bearer(hs256(SECRET.as_bytes(), claims))
}

/// The columns, in the table's order. Each bad token is customer A's good token with one defect.
fn credentials() -> Vec<Credential> {
    let a = || good_claims(CUSTOMER_A, "orders");
    let with = |member: &str, value: Value| {
        let mut claims = a();
        claims[member] = value;
        claims
    };
    vec![
        Credential { name: "no token", auth: Auth::Nothing },
        Credential { name: "Bearer not.a.jwt", auth: Auth::Raw("Bearer not.a.jwt".into()) },
        Credential { name: "Basic", auth: Auth::Raw(format!("Basic {}", b64url(b"cust-a:password"))) },
        Credential { name: "expired", auth: token(&with("exp", json!(now() - 300))) },
        Credential { name: "not yet valid", auth: token(&with("nbf", json!(now() + 300))) },
        Credential {
            name: "no exp",
            auth: token(&{
                let mut claims = a();
                claims.as_object_mut().unwrap().remove("exp");
                claims
            }),
        },
        Credential {
            name: "wrong signature",
            auth: Auth::Bearer(hs256(b"another-secret-of-32-bytes-or-more-000", &a())),
        },
        Credential { name: "wrong issuer", auth: token(&with("iss", json!("https://id.elsewhere.example"))) },
        Credential { name: "wrong audience", auth: token(&with("aud", json!("another-service"))) },
        Credential { name: "alg none", auth: Auth::Bearer(alg_none(&a())) },
        Credential { name: "no scope", auth: token(&good_claims(CUSTOMER_A, "profile email")) },
        Credential { name: "customer A", auth: token(&a()) },
        Credential { name: "customer B", auth: token(&good_claims(CUSTOMER_B, "orders")) },
        Credential { name: "admin", auth: token(&good_claims(ADMIN, "admin")) },
    ]
}

/// One operation: a row of the table.
struct Operation {
    label: &'static str,
    method: &'static str,
    route: &'static str,
    /// The path after the route, such as a query string.
    suffix: &'static str,
    body: Option<Value>,
    /// Acts on a fresh confirmed order of customer A, placed before each cell, so that a cell
    /// that cancels does not take the order from the cells after it.
    fresh_order: bool,
}

fn operations() -> Vec<Operation> {
    let op = |label, method, route| Operation { label, method, route, suffix: "", body: None, fresh_order: false };
    let reason = || Some(json!({"reason": "the auth table"}));
    vec![
        op("GET /products", "GET", "/products"),
        Operation {
            body: Some(json!({"id": "p-table", "name": "Made by the table", "price_cents": 100, "stock": 5})),
            ..op("POST /products", "POST", "/products")
        },
        op("GET /products/{id}", "GET", "/products/{id}"),
        Operation {
            body: Some(json!({"quantity": 1})),
            ..op("POST /products/{id}/restock", "POST", "/products/{id}/restock")
        },
        op("GET /orders", "GET", "/orders"),
        Operation { suffix: "?customer_id=cust-a", ..op("GET /orders?customer_id=A", "GET", "/orders") },
        Operation { body: Some(order_body(CUSTOMER_A, &[("p1", 1)])), ..op("POST /orders for A", "POST", "/orders") },
        op("GET /orders/{id}", "GET", "/orders/{id}"),
        Operation { fresh_order: true, ..op("POST /orders/{id}/cancel", "POST", "/orders/{id}/cancel") },
        op("GET /orders/{id}/events", "GET", "/orders/{id}/events"),
        op("GET /sagas", "GET", "/sagas"),
        Operation { body: reason(), ..op("POST /sagas/retry", "POST", "/sagas/retry") },
        op("GET /sagas/events", "GET", "/sagas/events"),
        op("GET /sagas/{id}", "GET", "/sagas/{id}"),
        Operation { body: reason(), ..op("POST /sagas/{id}/retry", "POST", "/sagas/{id}/retry") },
        Operation { body: reason(), ..op("POST /sagas/{id}/abort", "POST", "/sagas/{id}/abort") },
        op("GET /healthz", "GET", "/healthz"),
        op("GET /readyz", "GET", "/readyz"),
        op("GET /openapi.yaml", "GET", "/openapi.yaml"),
        op("GET /metrics", "GET", "/metrics"),
        op("GET /ui", "GET", "/ui"),
        op("GET /ui/app.js", "GET", "/ui/app.js"),
        op("GET /ui/app.css", "GET", "/ui/app.css"),
    ]
}

/// The fixture's ids.
struct Fixture {
    product: String,
    order: String,
    saga: String,
}

/// A markdown table as (header, rows of (label, cells)).
type Table = (Vec<String>, Vec<(String, Vec<String>)>);

fn parse_table(text: &str) -> Table {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let cells =
        |line: &str| -> Vec<String> { line.trim_matches('|').split('|').map(|c| c.trim().to_string()).collect() };
    let header = cells(lines.next().expect("a header"));
    lines.next().expect("the header's rule");
    let rows = lines
        .map(|line| {
            let mut row = cells(line);
            assert_eq!(row.len(), header.len(), "a row of the expected table has as many cells as its header: {line}");
            let label = row.remove(0);
            (label, row)
        })
        .collect();
    (header, rows)
}

fn render_table(table: &Table) -> String {
    let (header, rows) = table;
    let mut out = format!("| {} |\n|{}\n", header.join(" | "), "---|".repeat(header.len()));
    for (label, cells) in rows {
        out.push_str(&format!("| {label} | {} |\n", cells.join(" | ")));
    }
    out
}

/// What can change: every order, product and saga. A refused request must leave it as it was.
async fn world(app: &TestApp) -> String {
    let orders = app.state.orders.list(None, None, None, 10_000).await.unwrap();
    let products = app.state.inventory.list(None, 10_000).await.unwrap();
    let filter = SagaFilter { state: None, kind: None, stuck: None, before: None, limit: 10_000 };
    let sagas = app.engine.list(&filter).await.unwrap();
    let mut out = String::new();
    for o in &orders {
        out.push_str(&format!(
            "order {} {} {} {:?} {}\n",
            o.id, o.customer_id, o.status, o.cancel_saga_id, o.updated_at
        ));
    }
    for p in &products {
        out.push_str(&format!("product {} {} {} {} {}\n", p.id, p.available, p.reserved, p.sold, p.updated_at));
    }
    for s in &sagas {
        out.push_str(&format!("saga {} {} {}\n", s.id, s.state.as_str(), s.next_seq));
    }
    out
}

async fn table_app() -> TestApp {
    let dbs = fresh_databases().await;
    let mut config = config(&dbs);
    config.auth_jwt_secret = Some(SECRET.parse().unwrap());
    config.auth_jwt_issuer = Some(ISSUER.into());
    config.auth_jwt_audience = Some(AUDIENCE.into());
    spawn_app_with(config, None).await
}

/// Places an order of customer A as customer A; returns (order id, saga id).
async fn order_of_a(app: &TestApp, a: &Auth) -> (String, String) {
    let request = app.client.post(app.url("/orders")).json(&order_body(CUSTOMER_A, &[("p1", 1)]));
    let order = success(a.apply(request).send().await.unwrap(), 201).await;
    assert_eq!((order["customer_id"].as_str(), order["status"].as_str()), (Some(CUSTOMER_A), Some("confirmed")));
    (order["id"].as_str().unwrap().to_string(), order["saga_id"].as_str().unwrap().to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_operation_answers_every_credential_as_the_table_says() {
    let app = table_app().await;
    let credentials = credentials();
    let operations = operations();
    let expected = parse_table(EXPECTED);

    // The table covers the API: every route and method, nothing else.
    let covered: BTreeSet<(String, String)> =
        operations.iter().map(|o| (o.method.to_string(), o.route.to_string())).collect();
    let routes: BTreeSet<(String, String)> = ROUTES
        .iter()
        .flat_map(|(route, methods)| methods.iter().map(|m| (m.to_ascii_uppercase(), route.to_string())))
        .collect();
    assert_eq!(covered, routes, "the table's operations are exactly order_saga::http::ROUTES");
    let names: Vec<&str> = credentials.iter().map(|c| c.name).collect();
    assert_eq!(expected.0[1..], names, "the expected table's columns");
    let labels: Vec<&str> = operations.iter().map(|o| o.label).collect();
    let expected_labels: Vec<&str> = expected.1.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(expected_labels, labels, "the expected table's rows");

    // The fixture: a product, an order of customer A and its saga.
    let admin = &credentials.iter().find(|c| c.name == "admin").unwrap().auth;
    let a = &credentials.iter().find(|c| c.name == "customer A").unwrap().auth;
    let created = admin.apply(app.client.post(app.url("/products")).json(&json!({
        "id": "p1", "name": "Table product", "price_cents": 500, "stock": 1000
    })));
    success(created.send().await.unwrap(), 201).await;
    let (order, saga) = order_of_a(&app, a).await;
    let fixture = Fixture { product: "p1".into(), order, saga };

    let mut rows = Vec::new();
    let mut unauthorized_bodies = BTreeSet::new();
    let mut invalid_token_challenges = BTreeSet::new();
    for operation in &operations {
        let mut cells = Vec::new();
        for credential in &credentials {
            let order = if operation.fresh_order { order_of_a(&app, a).await.0 } else { fixture.order.clone() };
            let id = match operation.route {
                r if r.starts_with("/products/") => fixture.product.as_str(),
                r if r.starts_with("/orders/") => order.as_str(),
                r if r.starts_with("/sagas/") => fixture.saga.as_str(),
                _ => "",
            };
            let path = format!("{}{}", operation.route.replace("{id}", id), operation.suffix);
            let what = format!("{} ({path}) with {}", operation.label, credential.name);
            let before = world(&app).await;
            let method = reqwest::Method::from_bytes(operation.method.as_bytes()).unwrap();
            let mut request = app.client.request(method, app.url(&path));
            if let Some(body) = &operation.body {
                request = request.json(body);
            }
            let response = credential.auth.apply(request).send().await.unwrap();
            let status = response.status().as_u16();
            if status < 300 {
                // A success is recorded by its status alone; an event stream is left unread.
                cells.push(status.to_string());
                continue;
            }
            let challenge = header(&response, "www-authenticate");
            let content_type = header(&response, "content-type").unwrap_or_default();
            let text = response.text().await.unwrap();
            assert_eq!(content_type, "application/problem+json", "{what}: {text}");
            let body: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text}"));
            assert_eq!(body["status"], json!(status), "{what}: {body}");
            let code = body["code"].as_str().unwrap_or_else(|| panic!("{what}: a problem has a code: {body}"));
            cells.push(format!("{status} {code}"));
            if status == 401 {
                let challenge = challenge.unwrap_or_else(|| panic!("{what}: a 401 carries WWW-Authenticate"));
                assert!(challenge.starts_with("Bearer "), "{what}: {challenge}");
                let invalid = challenge.contains("error=\"invalid_token\"");
                assert_eq!(
                    invalid,
                    credential.sends_a_bearer_token(),
                    "{what}: error=\"invalid_token\" exactly when a bearer token was sent: {challenge}"
                );
                if invalid {
                    invalid_token_challenges.insert(challenge);
                }
                unauthorized_bodies.insert(text);
            }
            // Nothing a refused request asked for happened.
            assert_eq!(world(&app).await, before, "{what} was refused ({status} {code}) but changed something");
        }
        rows.push((operation.label.to_string(), cells));
    }

    let actual = (expected.0.clone(), rows);
    println!("{}", render_table(&actual));
    let mismatches: Vec<String> = expected
        .1
        .iter()
        .zip(&actual.1)
        .flat_map(|((label, want), (_, got))| {
            want.iter()
                .zip(got)
                .zip(&credentials)
                .filter(|((w, g), _)| w != g)
                .map(move |((w, g), c)| format!("{label} with {}: expected {w}, got {g}", c.name))
        })
        .collect();
    assert!(mismatches.is_empty(), "cells that differ from the expected table:\n{}", mismatches.join("\n"));
    // A 401 never says which check failed: every one is the same answer.
    assert_eq!(unauthorized_bodies.len(), 1, "every 401 has the same body: {unauthorized_bodies:#?}");
    assert_eq!(
        invalid_token_challenges.len(),
        1,
        "every invalid_token challenge is the same: {invalid_token_challenges:#?}"
    );
    app.stop().await;
}

/// An app whose tokens are verified with the public key in `pem`.
async fn pem_app(pem: &std::path::Path) -> TestApp {
    let dbs = fresh_databases().await;
    let mut config = config(&dbs);
    config.auth_jwt_public_key = Some(pem.to_path_buf());
    spawn_app_with(config, None).await
}

/// `GET /products` with `token`: its status, and for a 401 the challenge.
async fn products_with(app: &TestApp, token: &str) -> (u16, Option<String>) {
    let response = app.client.get(app.url("/products")).bearer_auth(token).send().await.unwrap();
    let status = response.status().as_u16();
    let challenge = header(&response, "www-authenticate");
    if status == 401 {
        problem(response, 401, "unauthorized").await;
    }
    (status, challenge)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_hs256_token_keyed_with_the_rsa_public_key_is_refused() {
    let dir = TempDir::new();
    let rsa = KeyPair::rsa(dir.path(), "rsa");
    let app = pem_app(&rsa.public_path).await;
    let claims = claims(CUSTOMER_A, "orders");

    // The key works: a token signed with its private half passes.
    let genuine = sign(Algorithm::RS256, None, &rsa.rsa_encoding_key(), &claims);
    assert_eq!(products_with(&app, &genuine).await.0, 200);

    // HS/RS confusion: the public key, which anyone may have, used as an HMAC secret, as the PEM
    // text the app reads and without its final newline.
    for hmac_key in [rsa.public_pem.as_str(), rsa.public_pem.trim_end()] {
        let forged = hs256(hmac_key.as_bytes(), &claims);
        let (status, challenge) = products_with(&app, &forged).await;
        assert_eq!(status, 401, "an HS256 token keyed with the RSA public key");
        assert!(challenge.unwrap().contains("error=\"invalid_token\""));
    }
    // Nor does `alg: none` or an RS256 token of another RSA key pass.
    assert_eq!(products_with(&app, &alg_none(&claims)).await.0, 401);
    let other = KeyPair::rsa(dir.path(), "other");
    assert_eq!(products_with(&app, &sign(Algorithm::RS256, None, &other.rsa_encoding_key(), &claims)).await.0, 401);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_es256_public_key_accepts_es256_tokens_only() {
    let dir = TempDir::new();
    let ec = KeyPair::ec(dir.path(), "ec");
    let rsa = KeyPair::rsa(dir.path(), "rsa");
    let app = pem_app(&ec.public_path).await;
    let claims = claims(CUSTOMER_A, "orders");

    let genuine = sign(Algorithm::ES256, None, &ec.ec_encoding_key(), &claims);
    assert_eq!(products_with(&app, &genuine).await.0, 200, "an ES256 token signed with the key");
    let rs256 = sign(Algorithm::RS256, None, &rsa.rsa_encoding_key(), &claims);
    assert_eq!(products_with(&app, &rs256).await.0, 401, "an RS256 token");
    let other = KeyPair::ec(dir.path(), "other");
    let foreign = sign(Algorithm::ES256, None, &other.ec_encoding_key(), &claims);
    assert_eq!(products_with(&app, &foreign).await.0, 401, "an ES256 token of another key");
    let confused = hs256(ec.public_pem.as_bytes(), &claims);
    assert_eq!(products_with(&app, &confused).await.0, 401, "an HS256 token keyed with the EC public key");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn exp_and_nbf_have_thirty_seconds_of_leeway() {
    let app = table_app().await;
    let with = |member: &str, offset: i64| {
        let mut claims = good_claims(CUSTOMER_A, "orders");
        claims[member] = json!(now() + offset);
        hs256(SECRET.as_bytes(), &claims)
    };
    // Well inside the 30 s either way passes; well outside does not.
    assert_eq!(products_with(&app, &with("exp", -10)).await.0, 200, "expired 10 s ago");
    assert_eq!(products_with(&app, &with("nbf", 10)).await.0, 200, "valid in 10 s");
    assert_eq!(products_with(&app, &with("exp", -60)).await.0, 401, "expired 60 s ago");
    assert_eq!(products_with(&app, &with("nbf", 60)).await.0, 401, "valid in 60 s");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn spellings_of_an_admin_path_do_not_let_a_customer_in() {
    let app = table_app().await;
    let customer = hs256(SECRET.as_bytes(), &good_claims(CUSTOMER_A, "orders"));
    // The access check and the router must agree on which route a path is: a spelling that
    // the check does not know must not reach an admin handler.
    for path in
        ["/sagas/", "//sagas", "/%73agas", "/SAGAS", "/sagas%2Fevents", "/sagas/events/", "/metrics/", "//metrics"]
    {
        let response = app.client.get(app.url(path)).bearer_auth(&customer).send().await.unwrap();
        let status = response.status().as_u16();
        assert!(matches!(status, 401 | 403 | 404), "GET {path} as a customer: {status}");
    }
    app.stop().await;
}
