//! The live-progress poller's cost at many open order streams. Runs the service in this process
//! (on a fresh SQLite file, or `--database-url`), so that it can hold sagas mid-way with a fault
//! injector, and measures four phases of `--seconds` each: the poller's statements per second
//! (`order_saga_live_poll_queries`) and the process's CPU (utime + stime from /proc/self/stat):
//!
//! - `idle, no streams`: nothing runs; the poller sleeps.
//! - `N held, no streams`: N sagas held in reserve_stock (each retried at the engine's capped
//!   backoff, 2 s: about N/2 failed-attempt events per second in all), no stream.
//! - `idle, N streams`: the same, with an order stream open on each of them.
//! - `load, no streams`: N clients placing orders (each waits for its saga) back to back.
//! - `load, N streams`: N clients each placing an order (`Prefer: respond-async`) and reading
//!   its stream to the end, back to back: N streams open at all times.
//!
//! The CPU includes this process's HTTP clients; compare the phases with and without streams.
//!
//! `cargo run --release --example streams -- --streams 100 --seconds 30`

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use order_saga::app;
use order_saga::config::Config;
use order_saga::saga::{Fault, FaultInjector, Phase, StepError};
use serde_json::json;

/// Options.
#[derive(Parser, Debug)]
struct Args {
    /// Open order streams (and clients under load).
    #[arg(long, default_value_t = 100)]
    streams: usize,
    /// Seconds per phase.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// The log database; a fresh SQLite file when absent.
    #[arg(long)]
    database_url: Option<String>,
}

/// Holds reserve_stock (a transient failure) while set.
struct Hold(AtomicBool);

impl FaultInjector for Hold {
    fn fault(&self, kind: &str, step: &str, phase: Phase, _attempt: u32) -> Option<Fault> {
        (kind == "place_order" && step == "reserve_stock" && phase == Phase::Action && self.0.load(Ordering::SeqCst))
            .then(|| Fault::Fail(StepError::transient("held by the streams example")))
    }
}

/// This process's CPU time so far, in seconds (utime + stime; USER_HZ is 100 on Linux).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("read /proc/self/stat");
    let after = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

/// Reads a stream to its end; returns how many events it carried.
async fn read_to_end(client: &reqwest::Client, url: &str) -> usize {
    let Ok(mut response) = client.get(url).send().await else { return 0 };
    let mut events = 0;
    while let Ok(Some(chunk)) = response.chunk().await {
        events += chunk.windows(2).filter(|w| w == b"\n\n").count();
    }
    events
}

async fn place(client: &reqwest::Client, base: &str, asynchronous: bool) -> Option<String> {
    let body = json!({"customer_id": "streams", "items": [{"product_id": format!("p-{}", fastrand::u32(1..=100)), "quantity": 1}]});
    let mut request = client.post(format!("{base}/orders")).json(&body);
    if asynchronous {
        request = request.header("prefer", "respond-async");
    }
    let answer: serde_json::Value = request.send().await.ok()?.json().await.ok()?;
    answer["id"].as_str().map(str::to_string)
}

struct Measure {
    queries: u64,
    cpu: f64,
    began: Instant,
}

fn report(phase: &str, start: Measure, queries: u64, work: u64) {
    let secs = start.began.elapsed().as_secs_f64();
    let q = (queries - start.queries) as f64 / secs;
    let cpu = (cpu_seconds() - start.cpu) / secs * 100.0;
    println!(
        "{phase:<18} poll queries/s {q:>7.1}   CPU {cpu:>6.1} % of one core   orders/s {:>7.1}",
        work as f64 / secs
    );
    println!(
        "RESULT phase={} poll_queries_per_s={q:.1} cpu_percent={cpu:.1} orders_per_s={:.1}",
        phase.replace([' ', ','], "_"),
        work as f64 / secs
    );
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let url = args.database_url.clone().unwrap_or_else(|| {
        let file: PathBuf = std::env::temp_dir().join(format!("streams-{}.db", uuid::Uuid::new_v4()));
        file.display().to_string()
    });
    let mut config = <Config as Parser>::try_parse_from(["order-saga"]).expect("the defaults parse");
    config.database_url = url;
    config.saga_deadline_ms = 3_600_000;
    config.stuck_after_attempts = 1_000_000;
    config.db_max_connections = 32;
    let hold = Arc::new(Hold(AtomicBool::new(false)));
    let built = app::build(&config, Some(hold.clone())).await.expect("the app builds");
    let live = built.state.live.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(built.serve(
        listener,
        async {
            let _ = stopped.await;
        },
        Duration::from_secs(5),
    ));
    let client = reqwest::Client::builder().pool_max_idle_per_host(1024).build().unwrap();
    for i in 1..=100 {
        let body = json!({"id": format!("p-{i}"), "name": "P", "price_cents": 100, "stock": 1_000_000_000});
        client.post(format!("{base}/products")).json(&body).send().await.unwrap();
    }
    let phase = Duration::from_secs(args.seconds);
    let mark = || Measure { queries: live.queries(), cpu: cpu_seconds(), began: Instant::now() };

    let start = mark();
    tokio::time::sleep(phase).await;
    report("idle, no streams", start, live.queries(), 0);

    hold.0.store(true, Ordering::SeqCst);
    let mut held = Vec::new();
    for _ in 0..args.streams {
        held.push(place(&client, &base, true).await.expect("an order"));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start = mark();
    tokio::time::sleep(phase).await;
    report(&format!("{} held, no streams", args.streams), start, live.queries(), 0);
    let mut readers = Vec::new();
    for id in held {
        let (client, url) = (client.clone(), format!("{base}/orders/{id}/events"));
        readers.push(tokio::spawn(async move { read_to_end(&client, &url).await }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start = mark();
    tokio::time::sleep(phase).await;
    report(&format!("idle, {} streams", args.streams), start, live.queries(), 0);
    hold.0.store(false, Ordering::SeqCst);
    for reader in readers {
        reader.await.unwrap();
    }

    for streams in [false, true] {
        let placed = Arc::new(AtomicU64::new(0));
        let running = Arc::new(AtomicBool::new(true));
        let mut workers = Vec::new();
        for _ in 0..args.streams {
            let (client, base, placed, running) = (client.clone(), base.clone(), placed.clone(), running.clone());
            workers.push(tokio::spawn(async move {
                while running.load(Ordering::Relaxed) {
                    let Some(id) = place(&client, &base, streams).await else { continue };
                    if streams {
                        read_to_end(&client, &format!("{base}/orders/{id}/events")).await;
                    }
                    placed.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (start, before) = (mark(), placed.load(Ordering::Relaxed));
        tokio::time::sleep(phase).await;
        let name = if streams { format!("load, {} streams", args.streams) } else { "load, no streams".into() };
        report(&name, start, live.queries(), placed.load(Ordering::Relaxed) - before);
        running.store(false, Ordering::Relaxed);
        for worker in workers {
            worker.await.unwrap();
        }
    }
    let _ = stop.send(());
    let _ = server.await;
}
