//! Real concurrent HTTP requests against scarce and shared stock: no oversell, no deadlock,
//! no 5xx, and the stock invariants hold afterwards.
mod common;

use std::collections::HashMap;

use common::*;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_orders_for_fifty_units_sell_exactly_fifty() {
    let app = spawn_app().await;
    app.create_product("scarce", 999, 50).await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let client = app.client.clone();
        let url = app.url("/orders");
        tasks.push(tokio::spawn(async move {
            let body = order_body(&format!("customer-{i}"), &[("scarce", 1)]);
            let response = client.post(url).json(&body).send().await.expect("answered");
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap();
            (status, body)
        }));
    }
    let mut by_status: HashMap<u16, usize> = HashMap::new();
    for task in tasks {
        let (status, body) = task.await.unwrap();
        if status == 409 {
            assert_eq!(body["code"], "insufficient_stock", "{body}");
        }
        *by_status.entry(status).or_default() += 1;
    }
    assert_eq!(by_status.get(&201), Some(&50), "answers by status: {by_status:?}");
    assert_eq!(by_status.get(&409), Some(&150), "answers by status: {by_status:?}");
    assert_stock_invariants(&app, &[("scarce", 50)], true).await;
    let product = app.get_json("/products/scarce").await;
    assert_eq!(product["sold"], 50);
    assert_eq!(product["available"], 0);
    let confirmed = app.get_json("/orders?status=confirmed&limit=500").await;
    assert_eq!(confirmed["items"].as_array().unwrap().len(), 50);
    let rejected = app.get_json("/orders?status=rejected&limit=500").await;
    assert_eq!(rejected["items"].as_array().unwrap().len(), 150);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_multi_item_orders_over_shared_products_never_deadlock() {
    let app = spawn_app().await;
    let products: Vec<String> = (0..6).map(|i| format!("shared-{i}")).collect();
    for id in &products {
        app.create_product(id, 100, 120).await;
    }
    let mut tasks = Vec::new();
    for i in 0..120usize {
        let client = app.client.clone();
        let url = app.url("/orders");
        // Three distinct products per order, listed in varying orders so that a naive
        // implementation would lock rows in conflicting orders.
        let picks: Vec<(String, i64)> =
            (0..3).map(|k| (products[(i * 5 + k * (1 + i % 4)) % 6].clone(), 1 + (i % 3) as i64)).collect();
        let mut seen = std::collections::HashSet::new();
        let picks: Vec<(String, i64)> = picks.into_iter().filter(|(p, _)| seen.insert(p.clone())).collect();
        tasks.push(tokio::spawn(async move {
            let items: Vec<(&str, i64)> = picks.iter().map(|(p, q)| (p.as_str(), *q)).collect();
            let response = client.post(url).json(&order_body("shared", &items)).send().await.expect("answered");
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap();
            (status, body, picks)
        }));
    }
    let mut sold: HashMap<String, i64> = HashMap::new();
    for task in tasks {
        let (status, body, picks) = task.await.unwrap();
        assert!(status == 201 || status == 409, "unexpected {status}: {body}");
        if status == 201 {
            for (p, q) in picks {
                *sold.entry(p).or_default() += q;
            }
        }
    }
    for id in &products {
        let product = app.get_json(&format!("/products/{id}")).await;
        assert_eq!(product["sold"].as_i64().unwrap(), sold.get(id).copied().unwrap_or(0), "{product}");
    }
    let added: Vec<(&str, i64)> = products.iter().map(|p| (p.as_str(), 120)).collect();
    assert_stock_invariants(&app, &added, true).await;
    app.stop().await;
}
