//! A log written by an older release (tests/fixtures/release-449ea8c: sagas left unfinished
//! before and after every step and compensation by killed instances) is resumed and finished
//! by this build, on whichever backend and database layout the suite runs on.
mod common;

use std::time::Duration;

use common::*;
use order_saga::db::{Db, PoolSettings};
use order_saga::orders::OrderStatus;
use order_saga::saga::{SagaFilter, SagaState};
use serde_json::Value;
use sqlx::Row;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/release-449ea8c");
const ADDED: [(&str, i64); 3] = [("fx-a", 100), ("fx-b", 50), ("fx-c", 1)];

/// Loads the fixture's rows into fresh databases (migrated by this build first).
async fn load(dbs: &TestDatabases) {
    let log = Db::connect(&dbs.url, &PoolSettings::default()).await.expect("the log database");
    let inventory = match &dbs.inventory_url {
        Some(url) => Db::connect(url, &PoolSettings::default()).await.expect("the inventory database"),
        None => log.clone(),
    };
    for (db, file) in [(&log, "log.sql"), (&inventory, "inventory.sql")] {
        let sql = std::fs::read_to_string(format!("{FIXTURE}/{file}")).expect("read the fixture");
        sqlx::raw_sql(&sql).execute(&db.pool).await.unwrap_or_else(|e| panic!("load {file}: {e}"));
    }
    let unfinished: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sagas WHERE state IN ('running', 'compensating')")
        .fetch_one(&log.pool)
        .await
        .unwrap();
    assert_eq!(unfinished, 18, "the fixture's unfinished sagas are loaded");
    log.pool.close().await;
    inventory.pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_written_by_release_449ea8c_is_resumed_and_finished() {
    let dbs = fresh_databases().await;
    load(&dbs).await;
    let app = spawn_app_with(config(&dbs), None).await;
    eventually(Duration::from_secs(60), "every saga of the old log settles", || {
        let engine = app.engine.clone();
        async move {
            let all = engine.list(&SagaFilter { limit: 1000, ..SagaFilter::default() }).await.unwrap();
            all.iter().all(|s| s.state.is_final())
        }
    })
    .await;

    let manifest: serde_json::Map<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(format!("{FIXTURE}/manifest.json")).unwrap()).unwrap();
    assert!(manifest.len() >= 20, "the fixture covers every step: {}", manifest.len());
    let reservations = sqlx::query("SELECT saga_id, status FROM reservations")
        .fetch_all(&app.state.inventory.db().pool)
        .await
        .unwrap();
    let statuses_of = |saga: &str| -> Vec<String> {
        reservations.iter().filter(|r| r.get::<String, _>("saga_id") == saga).map(|r| r.get("status")).collect()
    };
    for (scenario, entry) in &manifest {
        let order = app.state.orders.get(entry["order_id"].as_str().unwrap()).await.unwrap();
        let expect = OrderStatus::parse(entry["expect"].as_str().unwrap()).unwrap();
        assert_eq!(order.status, expect, "{scenario}: {order:?}");
        let (saga, events) = app.engine.saga(&order.saga_id).await.unwrap().unwrap();
        let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (0..saga.next_seq).collect::<Vec<_>>(), "{scenario}: a gap-free history");
        assert!(!saga.stuck && saga.owner.is_none(), "{scenario}: settled and released: {saga:?}");
        let held = statuses_of(&order.saga_id);
        match expect {
            OrderStatus::Confirmed => {
                assert_eq!(saga.state, SagaState::Completed, "{scenario}");
                assert!(held.len() == 2 && held.iter().all(|s| s == "committed"), "{scenario}: {held:?}");
                assert_eq!(order.total_cents, Some(2800), "{scenario}");
            }
            OrderStatus::Rejected => {
                assert_eq!(saga.state, SagaState::Compensated, "{scenario}");
                assert!(held.iter().all(|s| s == "released"), "{scenario}: {held:?}");
            }
            OrderStatus::Cancelled => {
                let cancel = order.cancel_saga_id.as_deref().expect("a cancel saga");
                let (cancel, _) = app.engine.saga(cancel).await.unwrap().unwrap();
                assert_eq!(cancel.state, SagaState::Completed, "{scenario}");
                assert!(held.len() == 2 && held.iter().all(|s| s == "returned"), "{scenario}: {held:?}");
            }
            OrderStatus::Pending => unreachable!(),
        }
    }
    assert_stock_invariants(&app, &ADDED, true).await;
    for (product, _) in ADDED {
        let p = app.state.inventory.get(product).await.unwrap();
        let committed: i64 = sqlx::query_scalar(
            "SELECT CAST(COALESCE(SUM(quantity), 0) AS BIGINT) FROM reservations WHERE product_id = $1 AND status = 'committed'",
        )
        .bind(product)
        .fetch_one(&app.state.inventory.db().pool)
        .await
        .unwrap();
        assert_eq!(p.sold, committed, "sold of {product} = its committed reservations");
    }
    app.stop().await;
}
