//! `GET /metrics` after a known set of orders: the counters say exactly what happened, the
//! scrape parses with a Prometheus text parser, and no label carries an id or a raw path.
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use order_saga::saga::{Fault, FaultPlan, Phase, StepError};

/// One sample of a scrape: its name, labels and value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// Parses the Prometheus text exposition format strictly: `# HELP` / `# TYPE` lines, and
/// samples `name{label="value",...} number` with escaped label values. Any other line fails.
fn parse(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut typed = std::collections::HashSet::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if line == "# EOF" {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name) = (parts.next().unwrap(), parts.next().expect("a metric name"));
            match kind {
                "HELP" => {}
                "TYPE" => {
                    let ty = parts.next().expect("a type");
                    assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&ty), "{line}");
                    typed.insert(name.to_string());
                }
                _ => panic!("unknown comment line: {line}"),
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or_else(|| panic!("no value: {line}"));
        let name = &line[..name_end];
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "metric name {name:?} in {line}"
        );
        let mut labels = Vec::new();
        let mut rest = &line[name_end..];
        if let Some(inner) = rest.strip_prefix('{') {
            let mut chars = inner.char_indices().peekable();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                if c == '}' {
                    end = Some(i);
                    break;
                }
                if c == ',' {
                    continue;
                }
                let mut key = String::from(c);
                for (_, c) in chars.by_ref() {
                    if c == '=' {
                        break;
                    }
                    key.push(c);
                }
                assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "a quoted label value in {line}");
                let mut value = String::new();
                loop {
                    match chars.next().unwrap_or_else(|| panic!("an unterminated label value in {line}")).1 {
                        '"' => break,
                        '\\' => match chars.next().unwrap().1 {
                            'n' => value.push('\n'),
                            c @ ('\\' | '"') => value.push(c),
                            c => panic!("bad escape \\{c} in {line}"),
                        },
                        c => value.push(c),
                    }
                }
                labels.push((key, value));
            }
            let end = end.unwrap_or_else(|| panic!("unclosed labels in {line}"));
            rest = &inner[end + 1..];
        }
        let value = rest.trim().split(' ').next().unwrap();
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().unwrap_or_else(|_| panic!("value {v:?} in {line}")),
        };
        let family = ["_total", "_bucket", "_count", "_sum"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
        assert!(typed.contains(family) || typed.contains(name), "a TYPE line before {line}");
        samples.push(Sample { name: name.to_string(), labels, value });
    }
    samples
}

async fn scrape(app: &TestApp) -> (String, Vec<Sample>) {
    let response = app.get("/metrics").await;
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().unwrap().to_string();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let text = response.text().await.unwrap();
    let samples = parse(&text);
    (text, samples)
}

/// The sum of the samples `name` whose labels include every pair of `labels`; for a histogram,
/// pass its `_count`.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.iter().any(|(l, w)| l == k && w == v)))
        .map(|s| s.value)
        .fold(0.0, |a, b| a + b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_after_a_known_set_of_orders() {
    let dbs = fresh_databases().await;
    let mut config = config(&dbs);
    // A failed attempt waits long enough for the test to abort its saga.
    config.backoff_base_ms = 120_000;
    config.backoff_cap_ms = 120_000;
    let faults = Arc::new(FaultPlan::new());
    let app = spawn_app_with(config, Some(faults.clone())).await;
    app.create_product("m-a", 100, 10).await;
    app.create_product("m-b", 250, 1).await;
    let mut confirmed = Vec::new();
    for _ in 0..3 {
        let response = app.place_order("m-cust", &[("m-a", 1)], None).await;
        assert_eq!(response.status(), 201);
        confirmed.push(response.json::<serde_json::Value>().await.unwrap());
    }
    for _ in 0..2 {
        assert_eq!(app.place_order("m-cust", &[("m-b", 5)], None).await.status(), 409);
    }
    let id = confirmed[0]["id"].as_str().unwrap();
    let cancelled = app.client.post(app.url(&format!("/orders/{id}/cancel"))).send().await.unwrap();
    assert_eq!(cancelled.status(), 200);
    // One aborted while its reserve_stock waits out a backoff after a transient failure.
    faults.add("place_order", "reserve_stock", Phase::Action, Fault::Fail(StepError::transient("down")), 1);
    let response = app
        .client
        .post(app.url("/orders"))
        .header("Prefer", "respond-async")
        .json(&order_body("m-cust", &[("m-a", 1)]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let aborted: serde_json::Value = response.json().await.unwrap();
    let saga_path = format!("/sagas/{}", aborted["saga_id"].as_str().unwrap());
    eventually(Duration::from_secs(15), "the saga waits out a backoff", || async {
        app.get_json(&saga_path).await["attempts"] == 1
    })
    .await;
    let by = serde_json::json!({"actor": "ops", "reason": "metrics test"});
    assert_eq!(app.post(&format!("{saga_path}/abort"), &by).await.status(), 200);
    eventually(Duration::from_secs(15), "the aborted saga compensates", || async {
        app.get_json(&saga_path).await["state"] == "compensated"
    })
    .await;
    // Hostile requests share one route value and one method value.
    assert_eq!(app.get("/orders/no-such-order/nope/x").await.status(), 404);
    let brew = reqwest::Method::from_bytes(b"BREW").unwrap();
    let _ = app.client.request(brew, app.url("/orders")).send().await.unwrap();

    let (text, m) = scrape(&app).await;
    let place = [("kind", "place_order")];
    let cancel = [("kind", "cancel_order")];
    assert_eq!(value(&m, "order_saga_sagas_started_total", &place), 6.0, "{text}");
    assert_eq!(value(&m, "order_saga_sagas_started_total", &cancel), 1.0, "{text}");
    let finished = "order_saga_sagas_finished_total";
    assert_eq!(value(&m, finished, &[("kind", "place_order"), ("outcome", "completed")]), 3.0, "{text}");
    assert_eq!(value(&m, finished, &[("kind", "place_order"), ("outcome", "compensated")]), 3.0, "{text}");
    assert_eq!(value(&m, finished, &[("kind", "cancel_order"), ("outcome", "completed")]), 1.0, "{text}");
    let failures = [("kind", "place_order"), ("step", "reserve_stock"), ("phase", "action"), ("error", "permanent")];
    assert_eq!(value(&m, "order_saga_step_failures_total", &failures), 2.0, "{text}");
    let transient = [("kind", "place_order"), ("step", "reserve_stock"), ("phase", "action"), ("error", "transient")];
    assert_eq!(value(&m, "order_saga_step_failures_total", &transient), 1.0, "{text}");
    assert_eq!(value(&m, "order_saga_sagas_recovered_total", &place), 0.0, "{text}");
    // Every step ran and was timed: three completed sagas passed through commit_stock, the
    // cancel through return_stock, the five reserves that ran (three that took stock, two that
    // failed; the aborted saga's injected failure never ran one), and the compensations of the
    // two rejected sagas and of the aborted one.
    let steps = "order_saga_step_duration_seconds_count";
    let commit = [("kind", "place_order"), ("step", "commit_stock"), ("phase", "action")];
    assert_eq!(value(&m, steps, &commit), 3.0, "{text}");
    let reserve = [("kind", "place_order"), ("step", "reserve_stock"), ("phase", "action")];
    assert_eq!(value(&m, steps, &reserve), 5.0, "{text}");
    let released = [("kind", "place_order"), ("step", "reserve_stock"), ("phase", "compensation")];
    assert_eq!(value(&m, steps, &released), 3.0, "{text}");
    let unpriced = [("kind", "place_order"), ("step", "create_order"), ("phase", "compensation")];
    assert_eq!(value(&m, steps, &unpriced), 3.0, "{text}");
    assert_eq!(value(&m, steps, &[("kind", "cancel_order"), ("step", "return_stock")]), 1.0, "{text}");

    let http = "http_server_request_duration_seconds_count";
    assert_eq!(value(&m, http, &[("method", "POST"), ("route", "/orders"), ("status", "201")]), 3.0, "{text}");
    assert_eq!(value(&m, http, &[("method", "POST"), ("route", "/orders"), ("status", "409")]), 2.0, "{text}");
    assert_eq!(value(&m, http, &[("method", "POST"), ("route", "/orders/{id}/cancel")]), 1.0, "{text}");
    assert_eq!(value(&m, http, &[("method", "GET"), ("route", "unmatched"), ("status", "404")]), 1.0, "{text}");
    assert_eq!(value(&m, http, &[("method", "other"), ("route", "/orders")]), 1.0, "{text}");
    for order in &confirmed {
        let id = order["id"].as_str().unwrap();
        let saga = order["saga_id"].as_str().unwrap();
        assert!(!text.contains(id) && !text.contains(saga), "no label carries an id: {text}");
    }
    assert!(!text.contains("no-such-order"), "no label carries a raw path: {text}");
    assert!(value(&m, "order_saga_db_connections", &[("database", "log"), ("state", "idle")]) >= 0.0);
    assert!(text.contains("order_saga_db_connections{database=\"log\",state=\"used\"}"), "{text}");
    assert!(text.contains("order_saga_operator_actions_total{action=\"retry\"} 0"), "shown at zero: {text}");
    assert_eq!(value(&m, "order_saga_operator_actions_total", &[("action", "abort")]), 1.0, "{text}");
    let abort = [("method", "POST"), ("route", "/sagas/{id}/abort"), ("status", "200")];
    assert_eq!(value(&m, http, &abort), 1.0, "{text}");

    // The gauges are the log's: every saga has settled, so none is in flight or stuck.
    eventually(Duration::from_secs(15), "the in-flight gauges are read from the log", || async {
        let (text, m) = scrape(&app).await;
        text.contains("order_saga_sagas_in_flight{kind=\"place_order\"}")
            && value(&m, "order_saga_sagas_in_flight", &place) == 0.0
            && value(&m, "order_saga_sagas_stuck", &place) == 0.0
    })
    .await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_off_records_nothing_and_serves_404() {
    let dbs = fresh_databases().await;
    let mut config = config(&dbs);
    config.metrics = false;
    let app = spawn_app_with(config, None).await;
    let response = app.get("/metrics").await;
    assert_eq!(response.status(), 404);
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gauges_count_the_unfinished_and_stuck_sagas_in_the_log() {
    let plan = std::sync::Arc::new(order_saga::saga::FaultPlan::new());
    let transient = order_saga::saga::Fault::Fail(order_saga::saga::StepError::transient("injected outage"));
    plan.add("place_order", "commit_stock", order_saga::saga::Phase::Action, transient, u32::MAX);
    let dbs = fresh_databases().await;
    let mut config = config(&dbs);
    config.stuck_after_attempts = 2;
    let app = spawn_app_with(config, Some(plan)).await;
    app.create_product("g-a", 100, 10).await;
    assert_eq!(app.place_order("g-cust", &[("g-a", 1)], None).await.status(), 201, "confirmed at the pivot");
    let place = [("kind", "place_order")];
    eventually(Duration::from_secs(20), "the gauges show one unfinished, stuck saga", || async {
        let (_, m) = scrape(&app).await;
        value(&m, "order_saga_sagas_in_flight", &place) == 1.0 && value(&m, "order_saga_sagas_stuck", &place) == 1.0
    })
    .await;
    let (text, m) = scrape(&app).await;
    let failures = [("step", "commit_stock"), ("error", "transient")];
    assert!(value(&m, "order_saga_step_failures_total", &failures) >= 2.0, "{text}");
    assert_eq!(value(&m, "order_saga_sagas_in_flight", &[("kind", "cancel_order")]), 0.0, "{text}");
    app.stop().await;
}
