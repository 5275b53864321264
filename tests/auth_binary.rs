//! Authentication through the real `order-saga` binary: JWKS key rotation on SIGHUP, the
//! refusal to serve a non-loopback address without authentication (and `AUTH_DISABLED=true`),
//! and logs that never show the secret or a token, even at debug level.
mod auth_support;
mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use auth_support::*;
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};

/// How long the service may take to start, stop, or act on a signal.
const WAIT: Duration = Duration::from_secs(30);

/// A command for the binary with no configuration inherited from the environment.
fn command() -> Command {
    let mut command = common::binary_command();
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    command
}

/// The databases of one run: fresh ones of the suite's backend.
async fn with_databases(command: &mut Command) {
    let dbs = common::fresh_databases().await;
    command.env("DATABASE_URL", &dbs.url);
    if let Some(inventory) = &dbs.inventory_url {
        command.env("INVENTORY_DATABASE_URL", inventory);
    }
}

/// A running binary whose stdout and stderr are collected as it writes them.
struct Service {
    child: Child,
    base: String,
    output: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    client: reqwest::Client,
}

impl Service {
    /// Starts `command` listening on `port` and waits until `/healthz` answers on loopback.
    async fn start(mut command: Command, port: u16) -> Service {
        let mut child = command.spawn().expect("the binary starts");
        let output = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            collect(child.stdout.take().unwrap(), output.clone()),
            collect(child.stderr.take().unwrap(), output.clone()),
        ];
        let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
        let mut service = Service { child, base: format!("http://127.0.0.1:{port}"), output, readers, client };
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(r) = service.client.get(service.url("/healthz")).send().await {
                if r.status() == 200 {
                    return service;
                }
            }
            if let Some(status) = service.child.try_wait().unwrap() {
                panic!("the service exited early ({status}):\n{}", service.output());
            }
            assert!(Instant::now() < deadline, "the service never became healthy:\n{}", service.output());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// The status of `GET path` with `token`.
    async fn status(&self, path: &str, token: &str) -> u16 {
        self.client.get(self.url(path)).bearer_auth(token).send().await.unwrap().status().as_u16()
    }

    fn signal(&self, name: &str) {
        let sent = Command::new("kill").args([&format!("-{name}"), &self.child.id().to_string()]).status().unwrap();
        assert!(sent.success(), "kill -{name}");
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("the service exited ({status}):\n{}", self.output());
        }
    }

    /// Stops the service with SIGTERM; returns everything it wrote, asserting a clean exit.
    fn stop(mut self) -> String {
        self.signal("TERM");
        let status = wait_exit(&mut self.child);
        for reader in self.readers.drain(..) {
            reader.join().unwrap();
        }
        let output = self.output();
        assert!(status.success(), "exit status after SIGTERM: {status}\n{output}");
        output
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // A failed test must not leave its process behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn collect(mut from: impl Read + Send + 'static, into: Arc<Mutex<String>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buffer = [0u8; 8192];
        while let Ok(n) = from.read(&mut buffer) {
            if n == 0 {
                break;
            }
            into.lock().unwrap().push_str(&String::from_utf8_lossy(&buffer[..n]));
        }
    })
}

fn wait_exit(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            child.kill().ok();
            panic!("the service did not exit within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `check` every 50 ms until it holds, failing after [`WAIT`].
async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Replaces `path` at once (a rename), so that a reload never reads half a file.
fn write_atomically(path: &Path, contents: &str) {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, contents).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_keys_rotate_on_sighup() {
    let dir = TempDir::new();
    let k1 = KeyPair::rsa(dir.path(), "k1");
    let k2 = KeyPair::ec(dir.path(), "k2");
    let jwks = dir.join("jwks.json");
    // k1 leaves its algorithm to the key type; k2 states it.
    let both = json!({"keys": [k1.rsa_jwk("k1", None), k2.ec_jwk("k2", Some("ES256"))]});
    write_atomically(&jwks, &both.to_string());

    let port = common::free_port();
    let mut cmd = command();
    with_databases(&mut cmd).await;
    cmd.env("BIND_ADDR", format!("127.0.0.1:{port}")).env("AUTH_JWT_JWKS", &jwks);
    let mut service = Service::start(cmd, port).await;

    let claims = claims("cust-a", "orders");
    let by_k1 = sign(Algorithm::RS256, Some("k1"), &k1.rsa_encoding_key(), &claims);
    let by_k2 = sign(Algorithm::ES256, Some("k2"), &k2.ec_encoding_key(), &claims);
    assert_eq!(service.status("/products", &by_k1).await, 200, "RS256 by k1");
    assert_eq!(service.status("/products", &by_k2).await, 200, "ES256 by k2");
    let unknown_kid = sign(Algorithm::RS256, Some("k3"), &k1.rsa_encoding_key(), &claims);
    assert_eq!(service.status("/products", &unknown_kid).await, 401, "a kid the JWKS does not have");
    let no_kid = sign(Algorithm::RS256, None, &k1.rsa_encoding_key(), &claims);
    assert_eq!(service.status("/products", &no_kid).await, 401, "no kid among two keys");
    let wrong_kid = sign(Algorithm::RS256, Some("k2"), &k1.rsa_encoding_key(), &claims);
    assert_eq!(service.status("/products", &wrong_kid).await, 401, "k1's RS256 signature under k2's kid");

    // k1 is retired: the file no longer has it, but the keys are read on SIGHUP only.
    let only_k2 = json!({"keys": [k2.ec_jwk("k2", Some("ES256"))]});
    write_atomically(&jwks, &only_k2.to_string());
    assert_eq!(service.status("/products", &by_k1).await, 200, "k1 stays until the SIGHUP");
    service.signal("HUP");
    until("k1's token is refused after SIGHUP", || async { service.status("/products", &by_k1).await == 401 }).await;
    assert_eq!(service.status("/products", &by_k2).await, 200, "k2 still passes");
    assert_eq!(service.status("/products", &unknown_kid).await, 401);
    service.assert_running();
    until("the reload is logged", || async { service.output().contains("SIGHUP: reloaded the token keys") }).await;

    // A file that does not load keeps the keys in force.
    write_atomically(&jwks, "{ not a JWKS");
    service.signal("HUP");
    until("the failed reload is logged", || async { service.output().contains("the token keys did not load") }).await;
    assert_eq!(service.status("/products", &by_k2).await, 200, "k2 still passes after a failed reload");
    assert_eq!(service.status("/products", &by_k1).await, 401);
    service.assert_running();
    service.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_a_non_loopback_address_without_authentication() {
    let port = common::free_port();
    let file = std::env::temp_dir().join(format!("order-saga-refusal-{}.db", uuid::Uuid::new_v4()));
    let mut child = command()
        .env("DATABASE_URL", &file)
        .env("BIND_ADDR", format!("0.0.0.0:{port}"))
        .spawn()
        .expect("the binary starts");
    let status = wait_exit(&mut child);
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(!status.success(), "it served 0.0.0.0 without authentication: {status}\n{stderr}");
    assert!(stderr.contains(&format!("refusing to serve 0.0.0.0:{port} without authentication")), "{stderr}");
    assert!(stderr.contains("AUTH_DISABLED"), "the message names AUTH_DISABLED: {stderr}");
    assert!(stderr.contains("AUTH_JWT_SECRET"), "and the settings that turn it on: {stderr}");
    assert!(!file.exists(), "it refused before opening the database");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_a_non_loopback_address_with_auth_disabled_on_purpose() {
    let port = common::free_port();
    let mut cmd = command();
    with_databases(&mut cmd).await;
    cmd.env("BIND_ADDR", format!("0.0.0.0:{port}")).env("AUTH_DISABLED", "true");
    let mut service = Service::start(cmd, port).await;
    // Authentication is off: no token needed, for customers' routes or the admin's.
    for path in ["/products", "/orders", "/sagas"] {
        let response = service.client.get(service.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "GET {path} without a token");
    }
    // A reload sent to a service with no keys to reload leaves it running.
    service.signal("HUP");
    until("the SIGHUP is logged", || async { service.output().contains("SIGHUP: nothing to reload") }).await;
    service.assert_running();
    assert_eq!(service.client.get(service.url("/healthz")).send().await.unwrap().status(), 200);
    service.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_secret_is_refused_without_being_printed() {
    let secret = "short-secret-0123456789"; // 23 bytes
    let mut child = command()
        .env("DATABASE_URL", std::env::temp_dir().join(format!("order-saga-short-{}.db", uuid::Uuid::new_v4())))
        .env("AUTH_JWT_SECRET", secret)
        .spawn()
        .unwrap();
    let status = wait_exit(&mut child);
    let mut output = String::new();
    child.stderr.take().unwrap().read_to_string(&mut output).unwrap();
    child.stdout.take().unwrap().read_to_string(&mut output).unwrap();
    assert!(!status.success(), "it started with a 23-byte secret: {output}");
    assert!(output.contains("at least 32 bytes"), "{output}");
    assert!(!output.contains(secret), "the secret was printed: {output}");
}

/// Every part of a token that could betray it if printed: the token and its three segments.
fn pieces(token: &str) -> Vec<String> {
    let mut pieces = vec![token.to_string()];
    pieces.extend(token.split('.').filter(|s| s.len() >= 8).map(str::to_string));
    pieces
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_secret_and_tokens_never_reach_the_logs_even_at_debug() {
    for format in ["text", "json"] {
        let secret = format!("secret-{}", uuid::Uuid::new_v4().simple());
        let scrape = format!("scrape-{}", uuid::Uuid::new_v4().simple());
        let port = common::free_port();
        let mut cmd = command();
        with_databases(&mut cmd).await;
        cmd.env("BIND_ADDR", format!("127.0.0.1:{port}"))
            .env("AUTH_JWT_SECRET", &secret)
            .env("METRICS_TOKEN", &scrape)
            .env("RUST_LOG", "debug")
            .env("LOG_FORMAT", format);
        let service = Service::start(cmd, port).await;

        let sign_with = |key: &str, claims: &Value| hs256(key.as_bytes(), claims);
        let customer = sign_with(&secret, &claims("cust-a", "orders"));
        let admin = sign_with(&secret, &claims("ops", "admin"));
        let mut expired = claims("cust-a", "orders");
        expired["exp"] = json!(now() - 300);
        let refused = [
            sign_with(&secret, &expired),
            sign_with("not-the-secret-but-long-enough-000000", &claims("cust-a", "orders")),
            alg_none(&claims("cust-a", "admin")),
            "not.a.jwt".to_string(),
            format!("{scrape}-wrong"),
        ];
        let client = &service.client;
        let product = json!({"id": "p1", "name": "Logged", "price_cents": 100, "stock": 10});
        let created = client.post(service.url("/products")).bearer_auth(&admin).json(&product).send().await.unwrap();
        assert_eq!(created.status(), 201);
        let order = json!({"items": [{"product_id": "p1", "quantity": 1}]});
        let placed = client.post(service.url("/orders")).bearer_auth(&customer).json(&order).send().await.unwrap();
        assert_eq!(placed.status(), 201);
        assert_eq!(service.status("/orders", &customer).await, 200);
        assert_eq!(service.status("/sagas", &customer).await, 403);
        assert_eq!(service.status("/metrics", &scrape).await, 200);
        for token in &refused {
            assert_eq!(service.status("/orders", token).await, 401, "{token}");
            assert_eq!(service.status("/metrics", token).await, 401, "{token}");
        }
        let basic = format!("Basic {}", b64url(format!("cust-a:{secret}").as_bytes()));
        let response = client.get(service.url("/orders")).header("authorization", &basic).send().await.unwrap();
        assert_eq!(response.status(), 401);
        let output = service.stop();

        // The log is at debug level and saw the requests and the refusals...
        assert!(output.contains("bearer token refused"), "{format}: {output}");
        assert!(output.contains("/orders"), "{format}: {output}");
        // ...and shows none of the secrets.
        let mut secrets = vec![secret.clone(), scrape.clone(), basic["Basic ".len()..].to_string()];
        for token in [&customer, &admin].into_iter().chain(&refused) {
            secrets.extend(pieces(token));
        }
        let leaked: Vec<&String> = secrets.iter().filter(|s| output.contains(s.as_str())).collect();
        assert!(leaked.is_empty(), "{format} logs print {leaked:?}:\n{output}");
    }
}
