//! A load generator for `POST /orders`: creates products (unless told not to), then keeps
//! `--connections` requests in flight, each order 1..3 distinct random products with quantity
//! 1..3 and a unique Idempotency-Key, for `--warmup` unmeasured seconds and then `--seconds`
//! measured ones, and prints orders/s and latencies.
//!
//! `cargo run --release --example loadgen -- --url http://127.0.0.1:8080 --connections 64 --seconds 20`
//!
//! It prints one line for people, then one `RESULT key=value ...` line for scripts (and, with
//! `--json`, the same figures as one JSON object). Two kinds of figures:
//! - `window_*`: answers that arrived inside the measured window; `orders_per_s` and the
//!   latencies are computed from the 201s among them.
//! - `total_*`: every answer the run received, warm-up and the requests still in flight when
//!   the window closed included (each worker finishes its last request before it stops), so
//!   that `total_201` can be compared with the confirmed orders in the database.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;

/// Load generator options.
#[derive(Parser, Debug)]
struct Args {
    /// The service's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Requests in flight at once (one connection each).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Measured duration, in seconds.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Unmeasured warm-up before it, in seconds.
    #[arg(long, default_value_t = 5)]
    warmup: u64,
    /// Products p-1..p-N to create and order from.
    #[arg(long, default_value_t = 1000)]
    products: usize,
    /// Order only from the first N products (the contention variant); 0 = all.
    #[arg(long, default_value_t = 0)]
    hot: usize,
    /// Units of stock each created product starts with.
    #[arg(long, default_value_t = 1_000_000_000)]
    stock: i64,
    /// Skip creating the products.
    #[arg(long, conflicts_with = "setup_only")]
    no_setup: bool,
    /// Only create the products, then exit.
    #[arg(long)]
    setup_only: bool,
    /// Give up on one request after this many seconds (counted as a transport error).
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Print orders/s so far to stderr every N seconds (0 = never); for long runs.
    #[arg(long, default_value_t = 0)]
    report_every: u64,
    /// Also print the results as one JSON object.
    #[arg(long)]
    json: bool,
}

/// Answers counted by kind.
#[derive(Default, Clone, Copy)]
struct Counts {
    /// 201 Created: the order is confirmed.
    created: u64,
    /// 202 Accepted: the saga had not settled within ORDER_WAIT_MS.
    accepted: u64,
    /// Any 4xx.
    client_errors: u64,
    /// Any 5xx.
    server_errors: u64,
    /// Any other status.
    other: u64,
    /// No answer: connection refused or reset, or the request timed out.
    transport_errors: u64,
}

impl Counts {
    fn add(&mut self, other: &Counts) {
        self.created += other.created;
        self.accepted += other.accepted;
        self.client_errors += other.client_errors;
        self.server_errors += other.server_errors;
        self.other += other.other;
        self.transport_errors += other.transport_errors;
    }

    fn requests(&self) -> u64 {
        self.created + self.non_201()
    }

    fn non_201(&self) -> u64 {
        self.accepted + self.client_errors + self.server_errors + self.other + self.transport_errors
    }

    fn count(&mut self, result: &Result<reqwest::StatusCode, reqwest::Error>) {
        match result {
            Ok(s) if *s == reqwest::StatusCode::CREATED => self.created += 1,
            Ok(s) if *s == reqwest::StatusCode::ACCEPTED => self.accepted += 1,
            Ok(s) if s.is_client_error() => self.client_errors += 1,
            Ok(s) if s.is_server_error() => self.server_errors += 1,
            Ok(_) => self.other += 1,
            Err(_) => self.transport_errors += 1,
        }
    }
}

/// What one worker saw.
#[derive(Default)]
struct Tally {
    /// Latencies of the 201s that arrived in the measured window, in microseconds.
    latencies_us: Vec<u64>,
    /// Answers that arrived in the measured window.
    window: Counts,
    /// Every answer.
    total: Counts,
}

async fn create_products(client: &reqwest::Client, args: &Args) {
    const PARALLEL: usize = 16;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..PARALLEL {
        let (client, url, products, stock) =
            (client.clone(), format!("{}/products", args.url), args.products, args.stock);
        tasks.spawn(async move {
            for i in (1 + w..=products).step_by(PARALLEL) {
                let body = json!({"id": format!("p-{i}"), "name": format!("Product {i}"), "price_cents": 100 + i as i64, "stock": stock});
                let response = client.post(&url).json(&body).send().await.expect("service reachable");
                let status = response.status();
                assert!(status == 201 || status == 409, "creating p-{i}: {status}");
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("product creation task");
    }
}

/// The order body: 1..3 distinct products among p-1..p-`pool`, quantity 1..3 each.
fn order_body(worker: usize, pool: usize) -> serde_json::Value {
    let count = fastrand::usize(1..=3.min(pool));
    let mut picked: Vec<usize> = Vec::with_capacity(count);
    while picked.len() < count {
        let p = fastrand::usize(1..=pool);
        if !picked.contains(&p) {
            picked.push(p);
        }
    }
    let items: Vec<_> =
        picked.iter().map(|p| json!({"product_id": format!("p-{p}"), "quantity": fastrand::i64(1..=3)})).collect();
    json!({"customer_id": format!("load-{worker}"), "items": items})
}

fn percentile(sorted_us: &[u64], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let i = ((sorted_us.len() as f64 - 1.0) * p).round() as usize;
    sorted_us[i] as f64 / 1000.0
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    // With authentication on, every request carries the token `bench/run.sh --auth` minted.
    let mut headers = reqwest::header::HeaderMap::new();
    if let Ok(token) = std::env::var("LOADGEN_TOKEN") {
        let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")).expect("a token fits a header");
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let client = reqwest::Client::builder()
        .default_headers(headers)
        .pool_max_idle_per_host(args.connections)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(args.timeout))
        .build()
        .unwrap();
    if !args.no_setup {
        let started = Instant::now();
        create_products(&client, &args).await;
        eprintln!("loadgen: {} products ready in {:.1}s", args.products, started.elapsed().as_secs_f64());
        if args.setup_only {
            return;
        }
    }
    let pool = if args.hot > 0 { args.hot.min(args.products) } else { args.products };
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicU64::new(0));
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let mut workers = Vec::new();
    for w in 0..args.connections {
        let (client, url, measuring, stop, progress, run_id) = (
            client.clone(),
            format!("{}/orders", args.url),
            measuring.clone(),
            stop.clone(),
            progress.clone(),
            run_id.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let body = order_body(w, pool);
                let started = Instant::now();
                let result = client
                    .post(&url)
                    .header("Idempotency-Key", format!("{run_id}-{w}-{n}"))
                    .json(&body)
                    .send()
                    .await
                    .map(|r| r.status());
                let elapsed = started.elapsed().as_micros() as u64;
                tally.total.count(&result);
                if matches!(result, Ok(s) if s == reqwest::StatusCode::CREATED) {
                    progress.fetch_add(1, Ordering::Relaxed);
                }
                if measuring.load(Ordering::Relaxed) {
                    tally.window.count(&result);
                    if matches!(result, Ok(s) if s == reqwest::StatusCode::CREATED) {
                        tally.latencies_us.push(elapsed);
                    }
                }
            }
            tally
        }));
    }
    let reporter = (args.report_every > 0).then(|| {
        let (progress, every) = (progress.clone(), Duration::from_secs(args.report_every));
        tokio::spawn(async move {
            let started = Instant::now();
            let mut last = 0;
            loop {
                tokio::time::sleep(every).await;
                let now = progress.load(Ordering::Relaxed);
                eprintln!(
                    "loadgen: t={:.0}s orders/s={:.1}",
                    started.elapsed().as_secs_f64(),
                    (now - last) as f64 / every.as_secs_f64()
                );
                last = now;
            }
        })
    });
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let window = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let (mut in_window, mut total) = (Counts::default(), Counts::default());
    for worker in workers {
        let t = worker.await.unwrap();
        latencies.extend(t.latencies_us);
        in_window.add(&t.window);
        total.add(&t.total);
    }
    if let Some(reporter) = reporter {
        reporter.abort();
    }
    latencies.sort_unstable();
    let orders_per_s = in_window.created as f64 / window;
    let mean_ms =
        if latencies.is_empty() { 0.0 } else { latencies.iter().sum::<u64>() as f64 / latencies.len() as f64 / 1000.0 };
    let (p50, p90, p99, max) = (
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.9),
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0),
    );
    println!(
        "orders/s {orders_per_s:.1}  (201: {} in {window:.1}s)  p50 {p50:.1} ms  p99 {p99:.1} ms  max {max:.1} ms  \
         non-201: {} (202: {}, 4xx: {}, 5xx: {}, transport: {})  all 201s incl. warm-up and tail: {} of {} requests",
        in_window.created,
        in_window.non_201(),
        in_window.accepted,
        in_window.client_errors,
        in_window.server_errors,
        in_window.transport_errors,
        total.created,
        total.requests(),
    );
    let figures: Vec<(&str, String)> = vec![
        ("connections", args.connections.to_string()),
        ("products", pool.to_string()),
        ("window_s", format!("{window:.3}")),
        ("orders_per_s", format!("{orders_per_s:.1}")),
        ("mean_ms", format!("{mean_ms:.2}")),
        ("p50_ms", format!("{p50:.2}")),
        ("p90_ms", format!("{p90:.2}")),
        ("p99_ms", format!("{p99:.2}")),
        ("max_ms", format!("{max:.2}")),
        ("window_201", in_window.created.to_string()),
        ("window_non201", in_window.non_201().to_string()),
        ("window_202", in_window.accepted.to_string()),
        ("window_4xx", in_window.client_errors.to_string()),
        ("window_5xx", in_window.server_errors.to_string()),
        ("window_other", in_window.other.to_string()),
        ("window_transport_errors", in_window.transport_errors.to_string()),
        ("total_requests", total.requests().to_string()),
        ("total_201", total.created.to_string()),
        ("total_non201", total.non_201().to_string()),
        ("total_202", total.accepted.to_string()),
        ("total_4xx", total.client_errors.to_string()),
        ("total_5xx", total.server_errors.to_string()),
        ("total_other", total.other.to_string()),
        ("total_transport_errors", total.transport_errors.to_string()),
    ];
    let line: Vec<String> = figures.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("RESULT {}", line.join(" "));
    if args.json {
        let object: serde_json::Map<String, serde_json::Value> = figures
            .iter()
            .map(|(k, v)| {
                let value = v
                    .parse::<u64>()
                    .map(serde_json::Value::from)
                    .or_else(|_| v.parse::<f64>().map(serde_json::Value::from));
                (k.to_string(), value.unwrap_or_else(|_| serde_json::Value::String(v.clone())))
            })
            .collect();
        println!("{}", serde_json::Value::Object(object));
    }
}
