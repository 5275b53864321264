//! The real `order-saga` binary: its flags, its start-up refusals and its graceful shutdown.
mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A command for the binary with no configuration inherited from the environment.
fn command() -> Command {
    let mut command = common::binary_command();
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    command
}

async fn wait_healthy(base: &str, child: &mut Child) {
    let client = reqwest::Client::new();
    for _ in 0..300 {
        if let Ok(r) = client.get(format!("{base}/healthz")).send().await {
            if r.status() == 200 {
                return;
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the service exited early: {status}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the service never became healthy");
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            child.kill().ok();
            panic!("the service did not exit");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn help_lists_every_setting() {
    let output = command().arg("--help").output().unwrap();
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for var in [
        "DATABASE_URL",
        "INVENTORY_DATABASE_URL",
        "BIND_ADDR",
        "TLS_CERT_FILE",
        "TLS_KEY_FILE",
        "ORDER_WAIT_MS",
        "REQUEST_TIMEOUT_MS",
        "SAGA_DEADLINE_MS",
        "STUCK_AFTER_ATTEMPTS",
        "IDEMPOTENCY_TTL_SECS",
        "SHUTDOWN_GRACE_MS",
        "LEASE_MS",
        "RECOVERY_INTERVAL_MS",
        "MAX_IN_FLIGHT",
        "HEADER_READ_TIMEOUT_MS",
        "KEEPALIVE_IDLE_MS",
        "LISTEN_BACKLOG",
        "CORS_ALLOW_ORIGINS",
        "RUST_LOG",
        "LOG_FORMAT",
    ] {
        assert!(help.contains(&format!("[env: {var}")), "--help does not list {var}:\n{help}");
    }
}

#[test]
fn refuses_to_mix_backends() {
    let output = command()
        .env("DATABASE_URL", std::env::temp_dir().join(format!("{}.db", uuid::Uuid::new_v4())))
        .env("INVENTORY_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("same backend"), "{stderr}");
}

#[test]
fn never_prints_a_database_password() {
    // --help shows where each setting comes from, not the variable's value.
    let help = command().arg("--help").env("DATABASE_URL", "postgres://u:sekrit@h/d").output().unwrap();
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("[env: DATABASE_URL"), "{text}");
    assert!(!text.contains("sekrit"), "{text}");
    // A refused start names the URL, masked: in the userinfo, in a password parameter, and for a
    // URL of no supported backend; an sslpassword is refused unread. (Nothing listens on port 1: the connection is refused.)
    for (url, says) in [
        ("postgres://u:sekrit@127.0.0.1:1/d?sslmode=disable&password=sekrit", "postgres://u:***@127.0.0.1:1/d"),
        ("mysql://u:sekrit@127.0.0.1:1/d", "unsupported database URL"),
        // An encrypted key's passphrase, which sqlx would log as an unknown parameter.
        ("postgres://u@127.0.0.1:1/d?sslmode=require&sslpassword=sekrit", "sslpassword is not supported"),
    ] {
        let output = command()
            .env("DATABASE_URL", url)
            .env("BIND_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "debug")
            .output()
            .unwrap();
        assert!(!output.status.success(), "{url}: started");
        let printed = String::from_utf8_lossy(&output.stderr) + String::from_utf8_lossy(&output.stdout);
        assert!(printed.contains(says), "{url}: {printed}");
        assert!(!printed.contains("sekrit"), "{url}: {printed}");
    }
}

#[test]
fn refuses_a_request_timeout_below_the_order_wait() {
    let output = command().env("ORDER_WAIT_MS", "5000").env("REQUEST_TIMEOUT_MS", "1000").output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("REQUEST_TIMEOUT_MS"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_then_exits_zero_on_sigterm() {
    let dbs = common::fresh_databases().await;
    let port = common::free_port();
    let mut cmd = command();
    cmd.env("DATABASE_URL", &dbs.url).env("BIND_ADDR", format!("127.0.0.1:{port}")).env("LOG_FORMAT", "json");
    if let Some(inventory) = &dbs.inventory_url {
        cmd.env("INVENTORY_DATABASE_URL", inventory);
    }
    let mut child = cmd.spawn().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    wait_healthy(&base, &mut child).await;
    let client = reqwest::Client::new();
    let body = serde_json::json!({"id": "bin-1", "name": "Bin", "price_cents": 5, "stock": 3});
    let created = client.post(format!("{base}/products")).json(&body).send().await.unwrap();
    assert_eq!(created.status(), 201);
    let ready = client.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let status = wait_exit(&mut child, Duration::from_secs(30));
    assert!(status.success(), "exit status after SIGTERM: {status}");
    let stderr = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
    assert!(stderr.lines().any(|l| l.starts_with('{') && l.contains("shutting down")), "JSON logs: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_on_one_sqlite_file_refuses_to_start() {
    let file = std::env::temp_dir().join(format!("{}.db", uuid::Uuid::new_v4()));
    let port = common::free_port();
    let mut first = command().env("DATABASE_URL", &file).env("BIND_ADDR", format!("127.0.0.1:{port}")).spawn().unwrap();
    wait_healthy(&format!("http://127.0.0.1:{port}"), &mut first).await;
    let second =
        command().env("DATABASE_URL", &file).env("BIND_ADDR", format!("127.0.0.1:{}", common::free_port())).output();
    first.kill().ok();
    first.wait().ok();
    let second = second.unwrap();
    assert!(!second.status.success(), "the second instance started");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("another order-saga instance is already using"), "{stderr}");
    // Once the first is gone, the file is free again.
    let port = common::free_port();
    let mut third = command().env("DATABASE_URL", &file).env("BIND_ADDR", format!("127.0.0.1:{port}")).spawn().unwrap();
    wait_healthy(&format!("http://127.0.0.1:{port}"), &mut third).await;
    third.kill().ok();
    third.wait().ok();
}
