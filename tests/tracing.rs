//! Traces: the spans of a request and of every step attempt, as an in-process OTLP/HTTP
//! collector receives them in real export requests, the W3C `traceparent` continued and
//! answered, and the trace id in the JSON logs of the real binary.
mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::routing::post;
use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use order_saga::config::LogFormat;
use order_saga::saga::{Fault, FaultPlan, Phase, StepError};
use order_saga::telemetry::{self, Telemetry, TraceSettings};
use prost::Message;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_order-saga");

/// The spans one collector received, each with the `service.name` it came from.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

impl Collector {
    /// The spans received so far of the trace `trace_id` (hex).
    fn trace(&self, trace_id: &str) -> Vec<(String, Span)> {
        let spans = self.spans.lock().unwrap();
        spans.iter().filter(|(_, s)| hex(&s.trace_id) == trace_id).cloned().collect()
    }
}

/// What outlives each test's own runtime: a runtime for the collector and the exporter's
/// requests, the collector's URL, and the process's one tracing pipeline, exporting to it.
struct World {
    _runtime: tokio::runtime::Runtime,
    collector: Collector,
    url: String,
    telemetry: Mutex<Option<Telemetry>>,
}

static WORLD: LazyLock<World> = LazyLock::new(|| {
    // Built on a thread of its own: a test's runtime may not start another inside it.
    std::thread::spawn(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let (collector, url) = runtime.block_on(start_collector());
        let telemetry = runtime.block_on(async {
            let settings = TraceSettings { otlp_endpoint: Some(url.clone()), service_name: "traced-test".into() };
            telemetry::init(LogFormat::Json, "info", &settings).expect("the tracing pipeline installs")
        });
        World { _runtime: runtime, collector, url, telemetry: Mutex::new(Some(telemetry)) }
    })
    .join()
    .unwrap()
});

/// An OTLP/HTTP collector on a local port: decodes every `POST /v1/traces` (protobuf) and
/// keeps its spans.
async fn start_collector() -> (Collector, String) {
    let collector = Collector::default();
    let kept = collector.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let kept = kept.clone();
            async move {
                let request = ExportTraceServiceRequest::decode(body).expect("an OTLP trace export");
                let mut spans = kept.spans.lock().unwrap();
                for resource in request.resource_spans {
                    let service = resource
                        .resource
                        .as_ref()
                        .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                        .and_then(|a| a.value.as_ref())
                        .map(|v| text(&v.value))
                        .unwrap_or_default();
                    for scope in resource.scope_spans {
                        spans.extend(scope.spans.into_iter().map(|s| (service.clone(), s)));
                    }
                }
                ([(axum::http::header::CONTENT_TYPE, "application/x-protobuf")], Vec::<u8>::new())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (collector, url)
}

/// Exports every span that ended so far.
async fn flush() {
    tokio::task::spawn_blocking(|| WORLD.telemetry.lock().unwrap().as_ref().unwrap().flush()).await.unwrap();
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(value: &Option<AnyValue>) -> String {
    match value {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    }
}

/// The span's attributes as text.
fn attrs(span: &Span) -> HashMap<String, String> {
    span.attributes.iter().map(|a| (a.key.clone(), text(&a.value.as_ref().and_then(|v| v.value.clone())))).collect()
}

/// A new W3C trace id and parent span id, as a client would make them.
fn client_trace() -> (String, String) {
    let trace = uuid::Uuid::new_v4().simple().to_string();
    let parent = uuid::Uuid::new_v4().simple().to_string()[..16].to_string();
    (trace, parent)
}

/// POSTs an order of one `product` with the client's `traceparent`.
async fn order_traced(app: &TestApp, product: &str, traceparent: &str) -> reqwest::Response {
    app.client
        .post(app.url("/orders"))
        .header("traceparent", traceparent)
        .json(&order_body("c-trace", &[(product, 1)]))
        .send()
        .await
        .unwrap()
}

/// Waits until the collector holds the trace's spans of the four place_order steps, then
/// returns the whole trace.
async fn wait_for_steps(trace: &str) -> Vec<(String, Span)> {
    let steps = ["reserve_stock", "create_order", "confirm", "commit_stock"];
    eventually(Duration::from_secs(20), "every step's span is exported", || async {
        flush().await;
        let spans = WORLD.collector.trace(trace);
        steps.iter().all(|step| spans.iter().any(|(_, s)| attrs(s).get("step").map(String::as_str) == Some(step)))
    })
    .await;
    WORLD.collector.trace(trace)
}

/// The attempts each step's spans recorded, in order, with their outcomes.
fn attempts(spans: &[(String, Span)], step: &str) -> Vec<(String, String)> {
    let mut found: Vec<(u64, String, String)> = spans
        .iter()
        .map(|(_, s)| (s, attrs(s)))
        .filter(|(_, a)| a.get("step").map(String::as_str) == Some(step))
        .map(|(s, a)| (s.start_time_unix_nano, a["attempt"].clone(), a["outcome"].clone()))
        .collect();
    found.sort();
    found.into_iter().map(|(_, attempt, outcome)| (attempt, outcome)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_traceparent_is_continued_by_the_request_and_every_step() {
    let _ = &*WORLD;
    let app = spawn_app().await;
    app.create_product("tp-1", 250, 5).await;
    let (trace, parent) = client_trace();
    let response = order_traced(&app, "tp-1", &format!("00-{trace}-{parent}-01")).await;
    assert_eq!(response.status(), 201);
    let answered = response.headers()["traceparent"].to_str().unwrap().to_string();
    assert!(answered.starts_with(&format!("00-{trace}-")), "answered traceparent {answered}");
    let order: Value = response.json().await.unwrap();
    let (order_id, saga_id) = (order["id"].as_str().unwrap(), order["saga_id"].as_str().unwrap());

    let spans = wait_for_steps(&trace).await;
    assert!(spans.iter().all(|(service, _)| service == "traced-test"));
    let (_, request) = spans.iter().find(|(_, s)| s.name == "POST /orders").expect("the request's span");
    assert_eq!(hex(&request.parent_span_id), parent, "the request span is the client's span's child");
    assert_eq!(answered, format!("00-{trace}-{}-01", hex(&request.span_id)), "traceparent names the server span");
    let request_attrs = attrs(request);
    assert_eq!(request_attrs["route"], "/orders");
    assert_eq!(request_attrs["method"], "POST");
    assert_eq!(request_attrs["status"], "201");
    assert!(!request_attrs["request_id"].is_empty());
    let (_, saga) = spans.iter().find(|(_, s)| s.name == "saga").expect("the saga task's span");
    assert_eq!(saga.parent_span_id, request.span_id, "the saga's task runs under the request that started it");
    assert_eq!(attrs(saga)["saga_id"], saga_id);
    assert_eq!(attrs(saga)["order_id"], order_id);
    for step in ["reserve_stock", "create_order", "confirm", "commit_stock"] {
        let (_, span) = spans.iter().find(|(_, s)| attrs(s).get("step").map(String::as_str) == Some(step)).unwrap();
        let a = attrs(span);
        assert_eq!(span.name, step);
        assert_eq!(span.parent_span_id, saga.span_id, "{step} is a child of the saga's span");
        assert_eq!(a["saga_id"], saga_id, "{step}");
        assert_eq!(a["order_id"], order_id, "{step}");
        assert_eq!(a["kind"], "place_order", "{step}");
        assert_eq!(a["phase"], "action", "{step}");
        assert_eq!(a["attempt"], "1", "{step}");
        assert_eq!(a["outcome"], "ok", "{step}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_then_retried_step_has_attempts_one_and_two_alone_or_batched() {
    let _ = &*WORLD;
    // Inventory apart from the log: reserve_stock runs alone in its database, create_order in a
    // log transaction batched with confirm.
    let dbs = fresh_databases().await;
    let inventory = fresh_databases().await;
    let mut config = config(&dbs);
    config.inventory_database_url = Some(inventory.url);
    let plan = Arc::new(FaultPlan::new());
    let transient = || Fault::Fail(StepError::transient("connection reset"));
    plan.add("place_order", "reserve_stock", Phase::Action, transient(), 1);
    plan.add("place_order", "create_order", Phase::Action, transient(), 1);
    let app = spawn_app_with(config, Some(plan.clone())).await;
    app.create_product("tp-2", 100, 5).await;
    let (trace, parent) = client_trace();
    let response = order_traced(&app, "tp-2", &format!("00-{trace}-{parent}-01")).await;
    assert_eq!(response.status(), 201);
    assert!(plan.exhausted());

    let spans = wait_for_steps(&trace).await;
    let retried = vec![("1".to_string(), "transient".to_string()), ("2".to_string(), "ok".to_string())];
    assert_eq!(attempts(&spans, "reserve_stock"), retried, "reserve_stock, alone in the inventory");
    assert_eq!(attempts(&spans, "create_order"), retried, "create_order, in a log transaction");
    let once = vec![("1".to_string(), "ok".to_string())];
    assert_eq!(attempts(&spans, "confirm"), once);
    assert_eq!(attempts(&spans, "commit_stock"), once);
    let failed = spans
        .iter()
        .find(|(_, s)| attrs(s).get("step").map(String::as_str) == Some("create_order") && attrs(s)["attempt"] == "1")
        .unwrap();
    assert!(attrs(&failed.1)["error"].contains("connection reset"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_traceparent_starts_a_new_trace() {
    let _ = &*WORLD;
    let app = spawn_app().await;
    app.create_product("tp-3", 100, 5).await;
    let zeros = format!("00-{}-{}-01", "0".repeat(32), "1".repeat(16));
    for bad in ["not a traceparent", "00-xyz-abc-01", zeros.as_str(), ""] {
        let response = order_traced(&app, "tp-3", bad).await;
        assert_eq!(response.status(), 201, "traceparent {bad:?}");
        let answered = response.headers()["traceparent"].to_str().unwrap().to_string();
        let parts: Vec<&str> = answered.split('-').collect();
        assert_eq!(parts.len(), 4, "{answered}");
        assert_eq!(parts[1].len(), 32);
        assert_ne!(parts[1], "0".repeat(32), "a new, valid trace for {bad:?}");
    }
    // A browser may send it and read it back.
    let preflight = app
        .client
        .request(reqwest::Method::OPTIONS, app.url("/orders"))
        .header("origin", "https://shop.example")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "traceparent")
        .send()
        .await
        .unwrap();
    let allowed = preflight.headers()["access-control-allow-headers"].to_str().unwrap().to_ascii_lowercase();
    assert!(allowed.contains("traceparent"), "{allowed}");
    let response = app.client.get(app.url("/healthz")).header("origin", "https://shop.example").send().await.unwrap();
    let exposed = response.headers()["access-control-expose-headers"].to_str().unwrap().to_ascii_lowercase();
    assert!(exposed.contains("traceparent"), "{exposed}");
    assert!(response.headers().contains_key("traceparent"));
    app.stop().await;
}

/// The real binary, logging JSON and exporting to the in-process collector: a line written
/// inside the request carries the client's trace id, every line written inside a span carries
/// one, and the spans still buffered are exported on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_logs_the_trace_id_and_exports_its_spans_on_shutdown() {
    let collector_url = WORLD.url.clone();
    let dbs = fresh_databases().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut cmd = Command::new(BIN);
    cmd.env_remove("INVENTORY_DATABASE_URL")
        .env("DATABASE_URL", &dbs.url)
        .env("BIND_ADDR", format!("127.0.0.1:{port}"))
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "info,tower_http=debug")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &collector_url)
        .env("OTEL_SERVICE_NAME", "traced-binary")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(inventory) = &dbs.inventory_url {
        cmd.env("INVENTORY_DATABASE_URL", inventory);
    }
    let mut child = cmd.spawn().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    for _ in 0..600 {
        if client.get(format!("{base}/healthz")).send().await.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "the service exited early");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let product = serde_json::json!({"id": "tp-bin", "name": "Traced", "price_cents": 5, "stock": 3});
    assert_eq!(client.post(format!("{base}/products")).json(&product).send().await.unwrap().status(), 201);
    let (trace, parent) = client_trace();
    let placed = client
        .post(format!("{base}/orders"))
        .header("traceparent", format!("00-{trace}-{parent}-01"))
        .json(&order_body("c-bin", &[("tp-bin", 1)]))
        .send()
        .await
        .unwrap();
    assert_eq!(placed.status(), 201);

    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let stderr = tokio::task::spawn_blocking(move || {
        let stderr = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
        assert!(child.wait().unwrap().success());
        stderr
    })
    .await
    .unwrap();
    let lines: Vec<Value> = stderr.lines().map(|l| serde_json::from_str(l).expect("a JSON log line")).collect();
    let in_span: Vec<&Value> = lines.iter().filter(|l| l["spans"].as_array().is_some_and(|s| !s.is_empty())).collect();
    assert!(!in_span.is_empty(), "no line was written inside a span:\n{stderr}");
    for line in &in_span {
        assert!(line["trace_id"].as_str().is_some_and(|t| t.len() == 32), "a line without trace_id: {line}");
    }
    let of_order: Vec<&&Value> = in_span.iter().filter(|l| l["span"]["route"] == "/orders").collect();
    assert!(!of_order.is_empty(), "no line of the POST /orders request:\n{stderr}");
    assert!(of_order.iter().all(|l| l["trace_id"] == trace.as_str()), "{of_order:?}");

    // Exported at shutdown at the latest: nothing flushes the child from here.
    eventually(Duration::from_secs(20), "the binary's spans reach the collector", || async {
        let spans = WORLD.collector.trace(&trace);
        spans.iter().any(|(service, s)| service == "traced-binary" && s.name == "POST /orders")
            && spans.iter().any(|(_, s)| attrs(s).get("step").map(String::as_str) == Some("commit_stock"))
    })
    .await;
}

#[test]
fn the_exporter_settings_are_listed_and_a_tls_endpoint_is_refused() {
    let help = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for var in ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME"] {
        assert!(help.contains(&format!("[env: {var}")), "--help does not list {var}:\n{help}");
    }
    let refused = Command::new(BIN)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector.example:4318")
        .env("DATABASE_URL", std::env::temp_dir().join(format!("{}.db", uuid::Uuid::new_v4())))
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("http://"));
}
