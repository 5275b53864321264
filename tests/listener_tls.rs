//! HTTPS on the listener (`TLS_CERT_FILE`, `TLS_KEY_FILE`): the real binary serves a TLS client
//! that trusts a CA made here, drops plain-HTTP clients without holding up the others, refuses a
//! half or unusable configuration at startup, and warns when it serves plain HTTP off loopback.
mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use order_saga::app;
use order_saga::tls::{self, TlsListener};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long anything may take before the test calls it hung: a guard, not a measure.
const HANG: Duration = Duration::from_secs(60);

/// A CA, and a certificate for `localhost` and 127.0.0.1 that it signed, in files of their own.
struct Pki {
    dir: PathBuf,
    ca_pem: String,
    cert: PathBuf,
    key: PathBuf,
}

fn pki() -> Pki {
    let dir = std::env::temp_dir().join("order-saga-tests").join(format!("tls-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.distinguished_name.push(DnType::CommonName, "order-saga test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, "localhost");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &*ca).unwrap();
    let (cert_file, key_file) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    Pki { ca_pem: ca.pem(), cert: cert_file, key: key_file, dir }
}

/// A new client (so a new connection) that trusts the test CA and nothing else.
fn https_client(pki: &Pki) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap())
        .timeout(HANG)
        .build()
        .unwrap()
}

/// A command for the binary with no configuration inherited from the environment.
fn command() -> Command {
    let mut command = common::binary_command();
    command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    command
}

/// The binary on fresh databases, port 0 of `host`, with JSON logs.
async fn service(host: &str) -> Command {
    let dbs = common::fresh_databases().await;
    let mut command = command();
    command.env("DATABASE_URL", &dbs.url).env("BIND_ADDR", format!("{host}:0")).env("LOG_FORMAT", "json");
    if let Some(inventory) = &dbs.inventory_url {
        command.env("INVENTORY_DATABASE_URL", inventory);
    }
    command
}

/// A started binary: where it listens (from its `order-saga listening` line) and its log lines.
struct Running {
    child: Child,
    addr: SocketAddr,
    tls: bool,
    lines: Receiver<String>,
    /// The lines read so far, the `listening` one last.
    seen: Vec<String>,
}

fn message(line: &Value) -> &str {
    line["fields"]["message"].as_str().unwrap_or_default()
}

/// Starts `command` and reads its stderr until it says where it listens.
fn start(mut command: Command) -> Running {
    let mut child = command.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    loop {
        let line = match lines.recv_timeout(HANG) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => {
                child.kill().ok();
                panic!("the service never said where it listens:\n{}", seen.join("\n"));
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = child.wait().unwrap();
                panic!("the service exited ({status}) before it listened:\n{}", seen.join("\n"));
            }
        };
        let parsed: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        seen.push(line);
        if message(&parsed) == "order-saga listening" {
            let addr = parsed["fields"]["addr"].as_str().expect("the listening line has addr").parse().unwrap();
            let tls = parsed["fields"]["tls"].as_bool().expect("the listening line has tls");
            return Running { child, addr, tls, lines, seen };
        }
    }
}

impl Running {
    /// SIGTERM, then the exit status and every log line.
    fn stop(mut self) -> (ExitStatus, Vec<String>) {
        let killed = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(killed.success());
        let deadline = std::time::Instant::now() + HANG;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                self.child.kill().ok();
                panic!("the service did not exit after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // The reader ends at EOF, once the process is gone.
        self.seen.extend(self.lines.iter());
        (status, self.seen)
    }
}

/// A plain-HTTP request written on a raw socket, and whatever comes back before the server
/// closes the connection.
async fn plain_http_answer(addr: SocketAddr) -> Vec<u8> {
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    match tokio::time::timeout(HANG, socket.read_to_end(&mut answer)).await {
        Ok(Ok(_)) => {}
        // Closed with the request unread: a reset, after whatever came before it.
        Ok(Err(error)) if error.kind() == std::io::ErrorKind::ConnectionReset => {}
        Ok(Err(error)) => panic!("reading the plain-HTTP answer: {error}"),
        Err(_) => panic!("the server kept a plain-HTTP connection open"),
    }
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_https_over_http1_to_a_client_that_trusts_the_ca() {
    let pki = pki();
    let mut command = service("127.0.0.1").await;
    command.env("TLS_CERT_FILE", &pki.cert).env("TLS_KEY_FILE", &pki.key);
    let running = start(command);
    assert!(running.tls, "the listening line says tls: {:?}", running.seen.last());
    let port = running.addr.port();

    let response = https_client(&pki).get(format!("https://localhost:{port}/healthz")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    // The client offers h2 too; the server's ALPN picks HTTP/1.1.
    assert_eq!(response.version(), reqwest::Version::HTTP_11);
    // The certificate names 127.0.0.1 as well.
    let response = https_client(&pki).get(format!("https://127.0.0.1:{port}/readyz")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    // A client that does not trust the CA is refused by its own side.
    let untrusting = reqwest::Client::builder().timeout(HANG).build().unwrap();
    assert!(untrusting.get(format!("https://localhost:{port}/healthz")).send().await.is_err());

    let (status, lines) = running.stop();
    assert!(status.success(), "exit status after SIGTERM: {status}");
    assert!(lines.iter().any(|l| l.contains("shutting down")), "{lines:#?}");
    assert!(!lines.iter().any(|l| l.contains("in clear")), "no plain-HTTP warning with TLS on: {lines:#?}");
    std::fs::remove_dir_all(&pki.dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_http_client_gets_no_answer_and_tls_clients_are_still_served() {
    let pki = pki();
    let mut command = service("127.0.0.1").await;
    command.env("TLS_CERT_FILE", &pki.cert).env("TLS_KEY_FILE", &pki.key).env("RUST_LOG", "info,order_saga::tls=debug");
    let running = start(command);
    let port = running.addr.port();
    let healthz = format!("https://localhost:{port}/healthz");
    assert_eq!(https_client(&pki).get(&healthz).send().await.unwrap().status(), 200);

    for _ in 0..3 {
        let answer = plain_http_answer(running.addr).await;
        assert!(
            !answer.starts_with(b"HTTP/"),
            "a plain-HTTP request got an HTTP answer: {}",
            String::from_utf8_lossy(&answer)
        );
        // A new connection each time: the listener goes on accepting and handshaking.
        assert_eq!(https_client(&pki).get(&healthz).send().await.unwrap().status(), 200);
    }

    let (status, lines) = running.stop();
    assert!(status.success(), "exit status after SIGTERM: {status}");
    let failed: Vec<&String> = lines.iter().filter(|l| l.contains("TLS handshake failed")).collect();
    assert_eq!(failed.len(), 3, "one debug line per plain-HTTP client: {lines:#?}");
    assert!(failed.iter().all(|l| l.contains("\"level\":\"DEBUG\"")), "{failed:#?}");
    std::fs::remove_dir_all(&pki.dir).ok();
}

/// In process, with `App::serve` on a `TlsListener` whose handshakes may wait an hour: a client
/// that connects and says nothing does not hold up the next one, and a shutdown does not wait
/// for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_handshake_holds_up_no_other_client_nor_the_shutdown() {
    let pki = pki();
    let dbs = common::fresh_databases().await;
    let config = common::config(&dbs);
    let app = app::build(&config, None).await.expect("the app builds");
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let listener = TlsListener::new(tcp, tls::server_config(&pki.cert, &pki.key).unwrap())
        .with_handshake_timeout(Duration::from_secs(3600));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.serve(
        listener,
        async {
            let _ = stopped.await;
        },
        config.shutdown_grace(),
    ));

    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    let response = https_client(&pki).get(format!("https://localhost:{}/healthz", addr.port())).send().await.unwrap();
    assert_eq!(response.status(), 200, "served while an earlier client stalls its handshake");
    let mut byte = [0u8; 1];
    match stalled.try_read(&mut byte) {
        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the stalled connection should still be waiting for its handshake: {other:?}"),
    }

    let _ = stop.send(());
    tokio::time::timeout(HANG, server).await.expect("the server stops").unwrap().unwrap();
    // The listener is gone, and with it the handshake still waiting: its connection is closed.
    match tokio::time::timeout(HANG, stalled.read(&mut byte)).await.expect("the stalled connection is closed") {
        Ok(0) => {}
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the stalled connection got an answer: {other:?}"),
    }
    std::fs::remove_dir_all(&pki.dir).ok();
}

/// Runs the binary with the TLS settings given, expecting it to refuse to start; its stderr.
fn refused(settings: &[(&str, &std::path::Path)]) -> String {
    let mut command = command();
    let db = std::env::temp_dir().join("order-saga-tests").join(format!("{}.db", uuid::Uuid::new_v4()));
    command.env("DATABASE_URL", &db).env("BIND_ADDR", "127.0.0.1:0");
    for (var, value) in settings {
        command.env(var, value);
    }
    let output = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(2), "{settings:?} should be refused at startup: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!db.exists(), "refused before opening the database");
    stderr
}

#[test]
fn one_tls_setting_without_the_other_is_refused() {
    let pki = pki();
    let stderr = refused(&[("TLS_CERT_FILE", &pki.cert)]);
    assert!(stderr.contains("TLS_CERT_FILE is set but TLS_KEY_FILE is not"), "{stderr}");
    let stderr = refused(&[("TLS_KEY_FILE", &pki.key)]);
    assert!(stderr.contains("TLS_KEY_FILE is set but TLS_CERT_FILE is not"), "{stderr}");
    std::fs::remove_dir_all(&pki.dir).ok();
}

#[test]
fn a_missing_or_unusable_tls_file_is_refused_naming_it() {
    let pki = pki();
    let missing = pki.dir.join("missing.pem");
    let stderr = refused(&[("TLS_CERT_FILE", &missing), ("TLS_KEY_FILE", &pki.key)]);
    assert!(stderr.contains(&format!("cannot read TLS_CERT_FILE {}", missing.display())), "{stderr}");
    let stderr = refused(&[("TLS_CERT_FILE", &pki.cert), ("TLS_KEY_FILE", &missing)]);
    assert!(stderr.contains(&format!("cannot read TLS_KEY_FILE {}", missing.display())), "{stderr}");

    // A file that is no PEM at all, in either place.
    let junk = pki.dir.join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let stderr = refused(&[("TLS_CERT_FILE", &junk), ("TLS_KEY_FILE", &pki.key)]);
    assert!(stderr.contains(&format!("TLS_CERT_FILE {} holds no certificate", junk.display())), "{stderr}");
    let stderr = refused(&[("TLS_CERT_FILE", &pki.cert), ("TLS_KEY_FILE", &junk)]);
    assert!(stderr.contains(&format!("TLS_KEY_FILE {} holds no private key", junk.display())), "{stderr}");
    // The certificate given as the key: PEM, but no key in it.
    let stderr = refused(&[("TLS_CERT_FILE", &pki.cert), ("TLS_KEY_FILE", &pki.cert)]);
    assert!(stderr.contains("holds no private key"), "{stderr}");

    // A well-formed key that is not the certificate's.
    let other = pki.dir.join("other-key.pem");
    std::fs::write(&other, KeyPair::generate().unwrap().serialize_pem()).unwrap();
    let stderr = refused(&[("TLS_CERT_FILE", &pki.cert), ("TLS_KEY_FILE", &other)]);
    assert!(stderr.contains("cannot be served"), "{stderr}");
    assert!(stderr.contains(&other.display().to_string()), "{stderr}");
    std::fs::remove_dir_all(&pki.dir).ok();
}

fn clear_text_warnings(lines: &[String]) -> Vec<&String> {
    lines
        .iter()
        .filter(|l| {
            let line: Value = serde_json::from_str(l).unwrap_or(Value::Null);
            line["level"] == "WARN" && message(&line).contains("in clear")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_on_every_interface_is_warned_about() {
    // Off loopback the service needs authentication, or to be told a gateway does it.
    let mut command = service("0.0.0.0").await;
    command.env("AUTH_DISABLED", "true");
    let running = start(command);
    assert!(!running.tls);
    let warnings = clear_text_warnings(&running.seen);
    assert_eq!(warnings.len(), 1, "{:#?}", running.seen);
    assert!(warnings[0].contains("TLS_CERT_FILE") && warnings[0].contains("TLS_KEY_FILE"), "{}", warnings[0]);
    // It serves all the same, on every interface.
    let base = format!("http://127.0.0.1:{}", running.addr.port());
    let health = reqwest::Client::new().get(format!("{base}/healthz")).timeout(HANG).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let (status, _) = running.stop();
    assert!(status.success(), "exit status after SIGTERM: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_on_loopback_is_not_warned_about() {
    let running = start(service("127.0.0.1").await);
    assert!(!running.tls);
    let (status, lines) = running.stop();
    assert!(status.success(), "exit status after SIGTERM: {status}");
    assert!(clear_text_warnings(&lines).is_empty(), "{lines:#?}");
    assert!(!lines.iter().any(|l| l.contains("in clear")), "{lines:#?}");
}
