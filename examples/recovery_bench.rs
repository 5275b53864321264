//! Recovery benchmark (issue 3's measurements), using the library directly.
//!
//! 1. Recovery throughput: places `--sagas` orders through an instance whose fault injector
//!    "crashes" every place_order saga at a random step (before or after its transaction), as a
//!    killed process leaves them; kills that instance; waits until its leases have expired; then
//!    starts a fresh instance on the same databases and times until no saga is unfinished.
//!    Prints sagas/s, and the placing rate reached while creating them.
//! 2. Takeover time: with the default lease (10,000 ms) and recovery interval (1,000 ms), an
//!    instance that owns `--takeover-sagas` unfinished sagas (its heartbeat running) is killed and
//!    another one started at once; prints the time from the kill until every saga has settled.
//!
//! ```text
//! cargo run --release --example recovery_bench -- [--sagas 10000] [--database-url postgres://...]
//! ```
//!
//! Without `--database-url` it runs on a temporary SQLite file (deleted afterwards). A PostgreSQL
//! database must be fresh (create it before, drop it after). Set `RUST_LOG` to see the service's
//! logs (every crash logs a warning, so `RUST_LOG=error` is a sensible choice).

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use order_saga::app::{self, App};
use order_saga::config::Config;
use order_saga::db::{Db, PoolSettings, now_ms};
use order_saga::inventory::{Line, NewProduct};
use order_saga::orders::{PlaceOrder, place_order};
use order_saga::saga::{Fault, FaultInjector, Phase};
use sqlx::Row;

/// Benchmark options.
#[derive(Parser, Debug, Clone)]
struct Args {
    /// Unfinished sagas to recover.
    #[arg(long, default_value_t = 10_000)]
    sagas: usize,
    /// The (fresh) log and orders database: a postgres:// URL or a SQLite path. Default: a
    /// temporary SQLite file.
    #[arg(long)]
    database_url: Option<String>,
    /// A separate (fresh) inventory database, same backend.
    #[arg(long)]
    inventory_database_url: Option<String>,
    /// Orders placed at once while creating the sagas.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Products p-1..p-N to order from, each with ample stock.
    #[arg(long, default_value_t = 1000)]
    products: usize,
    /// LEASE_MS of the instance that dies in the throughput run: its leases must run out before
    /// the recovering instance starts, so the benchmark waits up to this long.
    #[arg(long, default_value_t = 1000)]
    lease_ms: u64,
    /// LEASE_MS of the recovering instance of the throughput run.
    #[arg(long, default_value_t = 10_000)]
    recovery_lease_ms: u64,
    /// RECOVERY_INTERVAL_MS of the recovering instance of the throughput run.
    #[arg(long, default_value_t = 1000)]
    recovery_interval_ms: u64,
    /// DB_MAX_CONNECTIONS (PostgreSQL; SQLite uses one).
    #[arg(long, default_value_t = 16)]
    db_max_connections: u32,
    /// SAGA_DEADLINE_MS: long by default, so that every saga recovers forward rather than
    /// compensating because its recovery came late.
    #[arg(long, default_value_t = 3_600_000)]
    deadline_ms: u64,
    /// Unfinished sagas the killed instance owns in the takeover measurement (0 skips it).
    #[arg(long, default_value_t = 200)]
    takeover_sagas: usize,
    /// How many times to measure the takeover.
    #[arg(long, default_value_t = 3)]
    takeover_runs: usize,
    /// Skip the throughput measurement.
    #[arg(long)]
    skip_throughput: bool,
}

const STOCK: i64 = 1_000_000_000;

/// "Crashes" every place_order saga at a random step: at step i of n, with probability
/// 1/(n - i), so each step is equally likely; before the step's transaction or right after it
/// commits (never after the last step, which would complete the saga).
struct RandomCrash {
    steps: Vec<&'static str>,
    crashes: AtomicUsize,
    at_step: Vec<AtomicUsize>,
}

impl RandomCrash {
    fn new() -> Arc<Self> {
        let steps: Vec<&'static str> = place_order::definition().steps.iter().map(|s| s.name).collect();
        let at_step = steps.iter().map(|_| AtomicUsize::new(0)).collect();
        Arc::new(Self { steps, crashes: AtomicUsize::new(0), at_step })
    }
}

impl FaultInjector for RandomCrash {
    fn fault(&self, kind: &str, step: &str, phase: Phase, _attempt: u32) -> Option<Fault> {
        if kind != place_order::KIND.name || phase != Phase::Action {
            return None;
        }
        let index = self.steps.iter().position(|s| *s == step)?;
        if fastrand::usize(..self.steps.len() - index) != 0 {
            return None;
        }
        self.crashes.fetch_add(1, Ordering::Relaxed);
        self.at_step[index].fetch_add(1, Ordering::Relaxed);
        Some(if index + 1 < self.steps.len() && fastrand::bool() { Fault::CrashAfter } else { Fault::CrashBefore })
    }
}

fn config(args: &Args, url: &str, lease_ms: u64, recovery_interval_ms: u64) -> Config {
    let mut config = <Config as Parser>::try_parse_from(["order-saga"]).expect("the defaults parse");
    config.database_url = url.to_string();
    config.inventory_database_url = args.inventory_database_url.clone();
    config.lease_ms = lease_ms;
    config.recovery_interval_ms = recovery_interval_ms;
    config.saga_deadline_ms = args.deadline_ms;
    config.db_max_connections = args.db_max_connections;
    config.stuck_after_attempts = 10;
    config
}

/// Reads the log database on its own pool, as an operator's query would.
struct Monitor {
    log: Db,
    inventory: Db,
}

impl Monitor {
    async fn unfinished(&self) -> i64 {
        sqlx::query_scalar("SELECT COUNT(*) FROM sagas WHERE state IN ('running', 'compensating')")
            .fetch_one(&self.log.pool)
            .await
            .expect("count unfinished sagas")
    }

    async fn total(&self) -> i64 {
        sqlx::query_scalar("SELECT COUNT(*) FROM sagas").fetch_one(&self.log.pool).await.expect("count sagas")
    }

    /// (min, max) lease expiry of the unfinished sagas (ms since the epoch).
    async fn lease_range(&self) -> (i64, i64) {
        let row = sqlx::query(
            "SELECT COALESCE(MIN(lease_expires_at), 0) AS lo, COALESCE(MAX(lease_expires_at), 0) AS hi \
             FROM sagas WHERE state IN ('running', 'compensating')",
        )
        .fetch_one(&self.log.pool)
        .await
        .expect("lease range");
        (row.get("lo"), row.get("hi"))
    }

    async fn grouped(&self, sql: &str) -> Vec<(String, i64)> {
        let rows = sqlx::query(sql).fetch_all(&self.log.pool).await.expect("a grouped count");
        rows.iter().map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1))).collect()
    }

    /// Where the unfinished sagas stand: (state/next step, count).
    async fn unfinished_by_step(&self) -> Vec<(String, i64)> {
        self.grouped(
            "SELECT state || '@' || CAST(current_step AS TEXT), COUNT(*) FROM sagas \
             WHERE state IN ('running', 'compensating') GROUP BY state, current_step ORDER BY state, current_step",
        )
        .await
    }

    /// Checks the stock invariants, that the units sold match the committed reservations (and
    /// `expect_sold`, when given) and that no order is pending; returns what is wrong.
    async fn check(&self, expect_sold: Option<i64>) -> Vec<String> {
        let mut problems = Vec::new();
        let bad: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM products WHERE available + reserved + sold <> $1 OR reserved <> 0 \
             OR available < 0 OR sold < 0",
        )
        .bind(STOCK)
        .fetch_one(&self.inventory.pool)
        .await
        .expect("check products");
        if bad != 0 {
            problems.push(format!("{bad} products break available + reserved + sold = stock or hold reservations"));
        }
        let sold: i64 = sqlx::query_scalar("SELECT CAST(COALESCE(SUM(sold), 0) AS BIGINT) FROM products")
            .fetch_one(&self.inventory.pool)
            .await
            .expect("sum sold");
        let confirmed_units: i64 = sqlx::query_scalar(
            "SELECT CAST(COALESCE(SUM(quantity), 0) AS BIGINT) FROM reservations WHERE status = 'committed'",
        )
        .fetch_one(&self.inventory.pool)
        .await
        .expect("sum committed reservations");
        if sold != confirmed_units {
            problems.push(format!("{sold} units sold but {confirmed_units} committed in reservations"));
        }
        if let Some(expected) = expect_sold
            && sold != expected
        {
            problems.push(format!("{sold} units sold, {expected} ordered"));
        }
        let pending: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM orders WHERE status = 'pending'")
            .fetch_one(&self.log.pool)
            .await
            .expect("count pending orders");
        if pending != 0 {
            problems.push(format!("{pending} orders still pending"));
        }
        problems
    }
}

/// Creates the products (once per database).
async fn create_products(app: &App, products: usize) {
    for i in 1..=products {
        let product = NewProduct {
            id: format!("p-{i}"),
            name: format!("Product {i}"),
            price_cents: 100 + i as i64,
            stock: STOCK,
        };
        match app.state.inventory.create(&product).await {
            Ok(_) | Err(order_saga::error::Error::ProductExists(_)) => {}
            Err(error) => panic!("creating p-{i}: {error}"),
        }
    }
}

/// What placing the orders achieved.
struct Placing {
    placed: usize,
    failed: usize,
    units: i64,
    elapsed: Duration,
    /// Orders per second between the 10th and the 90th percentile of completions.
    steady_rate: f64,
}

/// Places `n` orders (1..3 distinct random products, quantity 1..3) with `concurrency` in flight,
/// answering as soon as each is written ahead (`respond_async`).
async fn place_orders(app: &App, n: usize, concurrency: usize, products: usize) -> Placing {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (orders, next) = (app.state.orders.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let (mut done, mut failed, mut units) = (Vec::new(), 0usize, 0i64);
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let count = fastrand::usize(1..=3.min(products));
                let mut picked: Vec<usize> = Vec::with_capacity(count);
                while picked.len() < count {
                    let p = fastrand::usize(1..=products);
                    if !picked.contains(&p) {
                        picked.push(p);
                    }
                }
                let items: Vec<Line> = picked
                    .iter()
                    .map(|p| Line { product_id: format!("p-{p}"), quantity: fastrand::i64(1..=3) })
                    .collect();
                let ordered: i64 = items.iter().map(|l| l.quantity).sum();
                let request = PlaceOrder { customer_id: format!("c-{}", fastrand::u32(..1000)), items };
                match orders.place(request, None, true).await {
                    Ok(_) => {
                        done.push(started.elapsed());
                        units += ordered;
                    }
                    Err(error) => {
                        failed += 1;
                        eprintln!("placing an order failed: {error}");
                    }
                }
            }
            (done, failed, units)
        }));
    }
    let (mut times, mut failed, mut units) = (Vec::new(), 0, 0);
    for worker in workers {
        let (done, f, u) = worker.await.expect("a placing task");
        times.extend(done);
        failed += f;
        units += u;
    }
    let elapsed = started.elapsed();
    times.sort();
    let steady_rate = if times.len() >= 20 {
        let (lo, hi) = (times.len() / 10, times.len() * 9 / 10);
        (hi - lo) as f64 / (times[hi] - times[lo]).as_secs_f64().max(1e-9)
    } else {
        times.len() as f64 / elapsed.as_secs_f64()
    };
    Placing { placed: times.len(), failed, units, elapsed, steady_rate }
}

/// Waits until `check` holds, polling every 20 ms, for up to `timeout`; exits otherwise.
async fn wait_for<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        if Instant::now() > deadline {
            eprintln!("gave up after {timeout:?} waiting for: {what}");
            std::process::exit(2);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Kills an instance as a dying process: its loops and saga tasks stop, its leases stay, and its
/// connections go away.
async fn kill(app: App) {
    app.engine.kill();
    for db in &app.state.databases {
        db.pool.close().await;
    }
}

/// Places `n` sagas through an instance that crashes every one of them, waits until each has
/// crashed, and returns the instance (still alive, owning them) with how the placing went.
async fn leave_unfinished(args: &Args, url: &str, n: usize, lease_ms: u64, recovery_ms: u64) -> (App, Placing) {
    let faults = RandomCrash::new();
    let app = app::build(&config(args, url, lease_ms, recovery_ms), Some(faults.clone()))
        .await
        .expect("the crashing instance builds");
    create_products(&app, args.products).await;
    let placing = place_orders(&app, n, args.concurrency, args.products).await;
    let placed = placing.placed;
    wait_for(Duration::from_secs(600), "every placed saga to crash", || {
        let crashes = faults.crashes.load(Ordering::Relaxed);
        async move { crashes >= placed }
    })
    .await;
    let at_step: Vec<String> =
        faults.steps.iter().zip(&faults.at_step).map(|(s, c)| format!("{s} {}", c.load(Ordering::Relaxed))).collect();
    println!("  crashes injected by step: {}", at_step.join(", "));
    (app, placing)
}

async fn throughput(args: &Args, url: &str, monitor: &Monitor) {
    println!(
        "== recovery throughput: {} sagas; LEASE_MS {} (dying instance), {} (recovering instance) ==",
        args.sagas, args.lease_ms, args.recovery_lease_ms
    );
    let before = monitor.total().await;
    // Its recovery loop runs once, at its start: under load its heartbeat may lag past its short
    // lease, and it must not take its own crashed sagas back.
    let (dying, placing) = leave_unfinished(args, url, args.sagas, args.lease_ms, 3_600_000).await;
    println!(
        "  placed {} orders ({} failed) in {:.2} s: {:.0} orders/s overall, {:.0} orders/s steady (10th-90th percentile), \
         concurrency {}",
        placing.placed,
        placing.failed,
        placing.elapsed.as_secs_f64(),
        placing.placed as f64 / placing.elapsed.as_secs_f64(),
        placing.steady_rate,
        args.concurrency
    );
    kill(dying).await;
    let unfinished = monitor.unfinished().await;
    println!("  killed the instance; unfinished sagas: {unfinished} (state@next step: {:?})", {
        monitor.unfinished_by_step().await
    });
    if unfinished as usize != placing.placed {
        println!("  note: {} sagas placed but {unfinished} unfinished", placing.placed);
    }
    let (_, expiry) = monitor.lease_range().await;
    let wait = (expiry + 5 - now_ms()).max(0) as u64;
    println!("  waiting {wait} ms for the dead instance's leases to expire");
    tokio::time::sleep(Duration::from_millis(wait)).await;

    let started = Instant::now();
    let recovering = app::build(&config(args, url, args.recovery_lease_ms, args.recovery_interval_ms), None)
        .await
        .expect("the recovering instance builds");
    let built = started.elapsed();
    let first_progress = Cell::new(None);
    wait_for(Duration::from_secs(3600), "every saga to settle", || {
        let (started, first_progress) = (&started, &first_progress);
        async move {
            let left = monitor.unfinished().await;
            if left < unfinished && first_progress.get().is_none() {
                first_progress.set(Some(started.elapsed()));
            }
            left == 0
        }
    })
    .await;
    let elapsed = started.elapsed();
    println!(
        "  RECOVERY: {unfinished} sagas settled in {:.2} s = {:.0} sagas/s (instance built in {} ms, first saga \
         settled after {} ms; RECOVERY_INTERVAL_MS {}, at most 256 sagas recovered at once)",
        elapsed.as_secs_f64(),
        unfinished as f64 / elapsed.as_secs_f64(),
        built.as_millis(),
        first_progress.get().unwrap_or_default().as_millis(),
        args.recovery_interval_ms
    );
    let states = monitor.grouped("SELECT state, COUNT(*) FROM sagas GROUP BY state ORDER BY state").await;
    let orders = monitor.grouped("SELECT status, COUNT(*) FROM orders GROUP BY status ORDER BY status").await;
    println!("  sagas by state: {states:?}; orders by status: {orders:?}");
    let reclaimed: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sagas WHERE generation > 2")
        .fetch_one(&monitor.log.pool)
        .await
        .expect("count sagas claimed more than once");
    println!("  sagas claimed more than once (a lease that ran out under load): {reclaimed}");
    let expect_sold = (before == 0 && placing.failed == 0).then_some(placing.units);
    report_problems(monitor.check(expect_sold).await);
    recovering.engine.shutdown(Duration::from_secs(10)).await;
    for db in &recovering.state.databases {
        db.pool.close().await;
    }
}

async fn takeover(args: &Args, url: &str, monitor: &Monitor, run: usize) {
    let (lease_ms, interval_ms) = (10_000, 1_000);
    println!(
        "== takeover #{run}: {} sagas, LEASE_MS {lease_ms}, RECOVERY_INTERVAL_MS {interval_ms} ==",
        args.takeover_sagas
    );
    let (owner, placing) = leave_unfinished(args, url, args.takeover_sagas, lease_ms, interval_ms).await;
    let unfinished = monitor.unfinished().await;
    // Let the heartbeat run a little, as a live instance's would, so the kill falls at a
    // random point of its cycle.
    tokio::time::sleep(Duration::from_millis(fastrand::u64(0..lease_ms / 3))).await;
    let killed = Instant::now();
    let killed_ms = now_ms();
    kill(owner).await;
    let (lo, hi) = monitor.lease_range().await;
    let successor =
        app::build(&config(args, url, lease_ms, interval_ms), None).await.expect("the successor instance builds");
    let first_progress = Cell::new(None);
    wait_for(Duration::from_secs(120), "the successor to settle every saga", || {
        let (killed, first_progress) = (&killed, &first_progress);
        async move {
            let left = monitor.unfinished().await;
            if left < unfinished && first_progress.get().is_none() {
                first_progress.set(Some(killed.elapsed()));
            }
            left == 0
        }
    })
    .await;
    let elapsed = killed.elapsed();
    println!(
        "  TAKEOVER: {} unfinished sagas ({} placed) all settled {:.2} s after the kill (their leases ran out \
         {:.2}-{:.2} s after it; first saga settled at {:.2} s)",
        unfinished,
        placing.placed,
        elapsed.as_secs_f64(),
        (lo - killed_ms) as f64 / 1000.0,
        (hi - killed_ms) as f64 / 1000.0,
        first_progress.get().unwrap_or_default().as_secs_f64()
    );
    report_problems(monitor.check(None).await);
    successor.engine.shutdown(Duration::from_secs(10)).await;
    for db in &successor.state.databases {
        db.pool.close().await;
    }
}

fn report_problems(problems: Vec<String>) {
    if problems.is_empty() {
        println!("  checks: stock invariants hold, no reservation held, no order pending");
    } else {
        for problem in problems {
            println!("  CHECK FAILED: {problem}");
        }
        std::process::exit(1);
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if let Ok(filter) = std::env::var("RUST_LOG") {
        tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::new(filter)).init();
    }
    let temp = args.database_url.is_none().then(|| {
        std::env::temp_dir().join(format!("recovery-bench-{}.db", uuid::Uuid::new_v4().simple())).display().to_string()
    });
    let url = args.database_url.clone().or_else(|| temp.clone()).unwrap();
    println!(
        "database: {}{}; {} cores available",
        order_saga::db::redact(&url),
        args.inventory_database_url
            .as_ref()
            .map(|u| format!(", inventory {}", order_saga::db::redact(u)))
            .unwrap_or_default(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    let settings = PoolSettings { max_connections: 2, ..PoolSettings::default() };
    let log = Db::connect(&url, &settings).await.expect("connect the log database");
    let inventory = match &args.inventory_database_url {
        Some(inv) => Db::connect(inv, &settings).await.expect("connect the inventory database"),
        None => log.clone(),
    };
    let monitor = Monitor { log, inventory };
    if monitor.total().await != 0 {
        println!("note: the database already holds sagas; the sold-units check is skipped");
    }
    if !args.skip_throughput && args.sagas > 0 {
        throughput(&args, &url, &monitor).await;
    }
    if args.takeover_sagas > 0 {
        for run in 1..=args.takeover_runs {
            takeover(&args, &url, &monitor, run).await;
        }
    }
    monitor.log.pool.close().await;
    monitor.inventory.pool.close().await;
    if let Some(path) = temp {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{path}{suffix}"));
        }
    }
}
