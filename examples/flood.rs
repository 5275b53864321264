//! A flood of `POST /orders`: `--orders` requests sent at once, each on its own connection with
//! its own `Idempotency-Key`, against a running instance; prints the answers by status and
//! problem code, and the latencies (p50 / p99 / max). It measures what load shedding
//! (`MAX_IN_FLIGHT`) does with a burst, where `loadgen` measures a steady rate.
//!
//! ```sh
//! cargo run --release --example flood -- --url http://127.0.0.1:8080 --orders 5000
//! ```
//!
//! Products `f-1`..`f-N` are created first (`--no-setup` skips it); each order takes one unit of
//! one of them. The process needs a file descriptor per connection: raise `ulimit -n` first if
//! it is below `--orders` plus a margin (it says so).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{Value, json};

/// Flood options.
#[derive(Parser, Debug)]
struct Args {
    /// The service's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Orders sent at once, one connection each.
    #[arg(long, default_value_t = 5000)]
    orders: usize,
    /// Products f-1..f-N to create and order from.
    #[arg(long, default_value_t = 100)]
    products: usize,
    /// Units of stock each created product starts with.
    #[arg(long, default_value_t = 1_000_000_000)]
    stock: i64,
    /// Skip creating the products.
    #[arg(long)]
    no_setup: bool,
    /// Give up on one request after this many seconds (counted as a transport error).
    #[arg(long, default_value_t = 120)]
    timeout: u64,
}

/// One request's outcome: its status (0 without an answer), its problem code, its latency.
struct Outcome {
    status: u16,
    code: Option<String>,
    latency: Duration,
}

/// The soft limit on open files, from `/proc/self/limits` (no unsafe code needed).
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if let Some(limit) = open_files_limit() {
        if limit < args.orders as u64 + 64 {
            eprintln!(
                "flood: the open-file limit is {limit}, below {} connections: run `ulimit -n` higher",
                args.orders
            );
            std::process::exit(2);
        }
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(args.timeout))
        .pool_max_idle_per_host(args.orders)
        .build()
        .expect("an HTTP client");
    if !args.no_setup {
        for i in 1..=args.products {
            let body =
                json!({"id": format!("f-{i}"), "name": format!("Flood {i}"), "price_cents": 100, "stock": args.stock});
            let response = client.post(format!("{}/products", args.url)).json(&body).send().await.expect("setup");
            assert!(matches!(response.status().as_u16(), 201 | 409), "creating f-{i}: {}", response.status());
        }
    }
    let run = uuid::Uuid::new_v4().simple().to_string();
    let began = Instant::now();
    let requests: Vec<_> = (0..args.orders)
        .map(|i| {
            let client = client.clone();
            let url = format!("{}/orders", args.url);
            let body = json!({
                "customer_id": format!("flood-{}", i % 100),
                "items": [{"product_id": format!("f-{}", 1 + i % args.products), "quantity": 1}],
            });
            let key = format!("flood-{run}-{i}");
            tokio::spawn(async move {
                let sent = Instant::now();
                let answer = client.post(url).json(&body).header("Idempotency-Key", key).send().await;
                let (status, code) = match answer {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        let body: Value = response.json().await.unwrap_or(Value::Null);
                        (status, body["code"].as_str().map(str::to_string))
                    }
                    Err(_) => (0, None),
                };
                Outcome { status, code, latency: sent.elapsed() }
            })
        })
        .collect();
    let mut outcomes = Vec::with_capacity(args.orders);
    for request in requests {
        outcomes.push(request.await.expect("a request task"));
    }
    let wall = began.elapsed();

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut by_answer: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
    for o in &outcomes {
        let key = match (o.status, &o.code) {
            (0, _) => "no answer".to_string(),
            (status, Some(code)) => format!("{status} {code}"),
            (status, None) => status.to_string(),
        };
        by_answer.entry(key).or_default().push(o.latency);
    }
    let mut answered: Vec<Duration> = outcomes.iter().filter(|o| o.status != 0).map(|o| o.latency).collect();
    answered.sort();
    let mut created: Vec<Duration> = outcomes.iter().filter(|o| o.status == 201).map(|o| o.latency).collect();
    created.sort();
    println!("flood: {} orders at once against {} in {:.2} s", args.orders, args.url, wall.as_secs_f64());
    for (answer, latencies) in &mut by_answer {
        latencies.sort();
        println!(
            "  {answer:<28} {:>6}   p50 {:>6.0} ms, p99 {:>6.0} ms, max {:>6.0} ms",
            latencies.len(),
            ms(percentile(latencies, 50.0)),
            ms(percentile(latencies, 99.0)),
            ms(percentile(latencies, 100.0)),
        );
    }
    println!(
        "  latency of all answers: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        ms(percentile(&answered, 50.0)),
        ms(percentile(&answered, 99.0)),
        ms(percentile(&answered, 100.0)),
    );
    println!(
        "  latency of the 201s:    p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; {:.0} confirmed orders/s over the run",
        ms(percentile(&created, 50.0)),
        ms(percentile(&created, 99.0)),
        ms(percentile(&created, 100.0)),
        created.len() as f64 / wall.as_secs_f64(),
    );
    let count = |f: &dyn Fn(&Outcome) -> bool| outcomes.iter().filter(|o| f(o)).count();
    println!(
        "RESULT orders={} wall_s={:.3} s201={} s202={} s409={} s503_overloaded={} s503_other={} s5xx_other={} no_answer={} p50_ms={:.1} p99_ms={:.1} max_ms={:.1}",
        args.orders,
        wall.as_secs_f64(),
        count(&|o| o.status == 201),
        count(&|o| o.status == 202),
        count(&|o| o.status == 409),
        count(&|o| o.status == 503 && o.code.as_deref() == Some("overloaded")),
        count(&|o| o.status == 503 && o.code.as_deref() != Some("overloaded")),
        count(&|o| o.status >= 500 && o.status != 503),
        count(&|o| o.status == 0),
        ms(percentile(&answered, 50.0)),
        ms(percentile(&answered, 99.0)),
        ms(percentile(&answered, 100.0)),
    );
}
