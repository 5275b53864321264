//! A first end-to-end check: a product, an order, its saga.
mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn places_an_order_end_to_end() {
    let app = spawn_app().await;
    app.create_product("sku-1", 1250, 5).await;
    let response = app.place_order("c-1", &[("sku-1", 2)], None).await;
    assert_eq!(response.status(), 201);
    let order: serde_json::Value = response.json().await.unwrap();
    assert_eq!(order["status"], "confirmed");
    assert_eq!(order["total_cents"], 2500);
    let saga = app.get_json(&format!("/sagas/{}", order["saga_id"].as_str().unwrap())).await;
    assert_eq!(saga["state"], "completed");
    assert_stock_invariants(&app, &[("sku-1", 5)], true).await;
    app.stop().await;
}
