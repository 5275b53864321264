//! A load generator for `POST /orders`: creates products (unless told not to), then keeps
//! `--connections` requests in flight for `--seconds`, each order 1..3 distinct random products
//! with quantity 1..3 and a unique Idempotency-Key, and prints orders/s and latencies.
//!
//! `cargo run --release --example loadgen -- --url http://127.0.0.1:8080 --connections 64 --seconds 20`

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;

/// Load generator options.
#[derive(Parser, Debug)]
struct Args {
    /// The service's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Measured duration.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Unmeasured warm-up before it.
    #[arg(long, default_value_t = 5)]
    warmup: u64,
    /// Products p-1..p-N to order from.
    #[arg(long, default_value_t = 1000)]
    products: usize,
    /// Order only from the first N products (the contention variant); 0 = all.
    #[arg(long, default_value_t = 0)]
    hot: usize,
    /// Skip creating the products.
    #[arg(long)]
    no_setup: bool,
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    created: u64,
    other: u64,
    server_errors: u64,
    transport_errors: u64,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let client = reqwest::Client::builder().pool_max_idle_per_host(args.connections).build().unwrap();
    if !args.no_setup {
        for i in 1..=args.products {
            let body = json!({"id": format!("p-{i}"), "name": format!("Product {i}"), "price_cents": 100 + i as i64, "stock": 1_000_000_000i64});
            let response =
                client.post(format!("{}/products", args.url)).json(&body).send().await.expect("service reachable");
            assert!(response.status() == 201 || response.status() == 409, "creating p-{i}: {}", response.status());
        }
    }
    let pool = if args.hot > 0 { args.hot.min(args.products) } else { args.products };
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let mut workers = Vec::new();
    for w in 0..args.connections {
        let (client, url, measuring, stop, run_id) =
            (client.clone(), format!("{}/orders", args.url), measuring.clone(), stop.clone(), run_id.clone());
        workers.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let count = fastrand::usize(1..=3.min(pool));
                let mut picked: Vec<usize> = Vec::new();
                while picked.len() < count {
                    let p = fastrand::usize(1..=pool);
                    if !picked.contains(&p) {
                        picked.push(p);
                    }
                }
                let items: Vec<_> = picked
                    .iter()
                    .map(|p| json!({"product_id": format!("p-{p}"), "quantity": fastrand::i64(1..=3)}))
                    .collect();
                let body = json!({"customer_id": format!("load-{w}"), "items": items});
                let started = Instant::now();
                let result =
                    client.post(&url).header("Idempotency-Key", format!("{run_id}-{w}-{n}")).json(&body).send().await;
                let elapsed = started.elapsed().as_micros() as u64;
                if !measuring.load(Ordering::Relaxed) {
                    continue;
                }
                match result {
                    Ok(r) if r.status() == 201 => {
                        tally.created += 1;
                        tally.latencies_us.push(elapsed);
                    }
                    Ok(r) if r.status().is_server_error() => tally.server_errors += 1,
                    Ok(_) => tally.other += 1,
                    Err(_) => tally.transport_errors += 1,
                }
            }
            tally
        }));
    }
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut total = Tally::default();
    for worker in workers {
        let t = worker.await.unwrap();
        total.latencies_us.extend(t.latencies_us);
        total.created += t.created;
        total.other += t.other;
        total.server_errors += t.server_errors;
        total.transport_errors += t.transport_errors;
    }
    total.latencies_us.sort_unstable();
    let pct = |p: f64| -> f64 {
        if total.latencies_us.is_empty() {
            return 0.0;
        }
        let i = ((total.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        total.latencies_us[i] as f64 / 1000.0
    };
    println!(
        "orders/s {:.1}  (201: {} in {:.1}s)  p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms  other 4xx/2xx: {}  5xx: {}  transport errors: {}",
        total.created as f64 / elapsed,
        total.created,
        elapsed,
        pct(0.5),
        pct(0.99),
        pct(1.0),
        total.other,
        total.server_errors,
        total.transport_errors
    );
}
