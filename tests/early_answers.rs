//! Early answers reach the client: an answer given before the request's body was read (413,
//! 415, 401, 404, a 503 timeout) is read by real clients that write their whole body before
//! reading (Python's `http.client`, Node's `fetch`, a raw socket), the connection is closed in
//! order after it (`Connection: close`, no reset), and the rest of the body is never taken for
//! a next request. A body that was read keeps its keep-alive connection (`src/http/early.rs`).
mod auth_support;
mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MIB: usize = 1024 * 1024;

/// Longest any one read or write may take before the test fails as hung.
const HANG: Duration = Duration::from_secs(30);

/// A request the service must never answer: it only ever travels inside a refused body.
const SMUGGLED: &str = "GET /healthz HTTP/1.1\r\nHost: smuggled\r\n\r\n";

/// A JSON product whose id is `len` bytes long, `{"id": "xxx...", ...}`.
fn product_with_id_of(len: usize) -> String {
    json!({"id": "x".repeat(len), "name": "Big", "price_cents": 1, "stock": 1}).to_string()
}

/// A body of exactly `len` bytes made of [`SMUGGLED`] over and over (then spaces).
fn smuggling_body(len: usize) -> Vec<u8> {
    let mut body = SMUGGLED.repeat(len / SMUGGLED.len()).into_bytes();
    body.resize(len, b' ');
    body
}

/// The head of a request with a `Content-Length` body.
fn head(method: &str, path: &str, content_type: &str, length: usize, extra: &str) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: early.test\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n{extra}\r\n"
    )
}

/// A whole request with a chunked body: `chunk` `times` over.
fn chunked(method: &str, path: &str, content_type: &str, chunk: &[u8], times: usize) -> Vec<u8> {
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: early.test\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n")
            .into_bytes();
    for _ in 0..times {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    request
}

type Answer = RawAnswer;

impl RawAnswer {
    fn closes(&self) -> bool {
        self.header("connection").is_some_and(|v| v.to_ascii_lowercase().contains("close"))
    }

    /// Asserts a problem answer with `status` and `code`.
    fn assert_problem(&self, status: u16, code: &str) {
        let text = String::from_utf8_lossy(&self.body);
        assert_eq!(self.status, status, "expected {status} {code}: {self:?} {text}");
        assert_eq!(self.header("content-type"), Some("application/problem+json"), "{text}");
        let body: Value = serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        assert_eq!(body["code"], json!(code), "{body}");
        assert_eq!(body["status"], json!(status), "{body}");
    }
}

/// How a connection ended after its answers.
#[derive(Debug, PartialEq, Eq)]
enum Ending {
    /// The server closed it in order (FIN).
    Closed,
    /// The server reset it.
    Reset,
}

/// A raw client on a real socket: it writes what it is given in full, then reads.
struct Wire {
    stream: TcpStream,
    /// Bytes read and not yet taken as an answer.
    buffer: Vec<u8>,
}

impl Wire {
    async fn connect(app: &TestApp) -> Self {
        let stream = TcpStream::connect(app.base.trim_start_matches("http://")).await.expect("connect to the service");
        Wire { stream, buffer: Vec::new() }
    }

    /// Writes all of `bytes`; a reset or broken pipe here is the failure this suite is about.
    async fn send(&mut self, bytes: &[u8]) {
        tokio::time::timeout(HANG, self.stream.write_all(bytes))
            .await
            .expect("the server takes the body without hanging")
            .unwrap_or_else(|e| panic!("writing the request failed ({e}): the server dropped the body unread"));
    }

    /// Reads more bytes into the buffer; `None` at the end of the stream.
    async fn fill(&mut self) -> Option<Ending> {
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(HANG, self.stream.read(&mut chunk)).await.expect("the server answers") {
            Ok(0) => Some(Ending::Closed),
            Ok(n) => {
                self.buffer.extend_from_slice(&chunk[..n]);
                None
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Some(Ending::Reset),
            Err(e) => panic!("reading the answer: {e}"),
        }
    }

    /// Reads one whole answer (its body framed by `Content-Length`).
    async fn answer(&mut self) -> Answer {
        loop {
            if let Some(answer) = self.take_answer() {
                return answer;
            }
            if let Some(ending) = self.fill().await {
                panic!(
                    "the connection ended ({ending:?}) before a whole answer: {:?}",
                    String::from_utf8_lossy(&self.buffer)
                );
            }
        }
    }

    fn take_answer(&mut self) -> Option<Answer> {
        let end = self.buffer.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = std::str::from_utf8(&self.buffer[..end]).expect("an ASCII head").to_string();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        assert!(status_line.starts_with("HTTP/1.1 "), "a status line: {status_line:?}");
        let status = status_line[9..12].parse().expect("a status code");
        let headers: Vec<(String, String)> = lines
            .map(|line| {
                let (name, value) = line.split_once(':').unwrap_or_else(|| panic!("a header line: {line:?}"));
                (name.trim().to_ascii_lowercase(), value.trim().to_string())
            })
            .collect();
        assert!(!headers.iter().any(|(n, _)| n == "transfer-encoding"), "answers here have a known length: {head}");
        let length: usize = match headers.iter().find(|(n, _)| n == "content-length") {
            Some((_, v)) => v.parse().expect("a Content-Length"),
            None if (100..200).contains(&status) => 0,
            None => panic!("no Content-Length in {head}"),
        };
        if self.buffer.len() < end + 4 + length {
            return None;
        }
        let body = self.buffer[end + 4..end + 4 + length].to_vec();
        self.buffer.drain(..end + 4 + length);
        Some(Answer { status, headers, body })
    }

    /// Asserts that `answer`, given early, says `Connection: close`, and that the connection
    /// then ends in order (not reset) with nothing more answered.
    async fn closes_in_order_after(&mut self, answer: &Answer) {
        assert!(answer.closes(), "Connection: close on {answer:?}");
        assert_eq!(self.end().await, Ending::Closed, "the connection is closed in order, not reset");
    }

    /// Reads to the end of the connection, asserting that nothing more is answered.
    async fn end(&mut self) -> Ending {
        loop {
            if let Some(ending) = self.fill().await {
                assert!(
                    self.buffer.is_empty(),
                    "only one answer comes back; then came {:?}",
                    String::from_utf8_lossy(&self.buffer)
                );
                return ending;
            }
        }
    }
}

/// Runs `program` with `args` and `env` on a blocking thread and returns what it printed on
/// stdout as JSON; panics (never skips) if the program is missing or fails.
async fn run_client(program: &'static str, args: Vec<String>, env: Vec<(&'static str, String)>) -> Value {
    let output = tokio::task::spawn_blocking(move || Command::new(program).args(&args).envs(env).output())
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{program} is needed by this test and could not be run: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{program} failed ({}): {stderr}{stdout}", output.status);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{program} printed no JSON ({e}): {stdout} {stderr}"))
}

/// Asserts that a client read, for every body it sent (a JSON array of status, `Connection`,
/// `Content-Type` and the body as text), the 413 problem.
fn assert_clients_read_413(printed: &Value) {
    let answers = printed.as_array().expect("an array of answers");
    assert_eq!(answers.len(), ID_LENGTHS.split(' ').count(), "{printed}");
    for answer in answers {
        assert!(answer["length"].as_u64().unwrap() <= order_saga::http::early::DRAIN_MAX_BYTES, "{answer}");
        assert_eq!(answer["status"], json!(413), "{answer}");
        assert_eq!(answer["content_type"], json!("application/problem+json"), "{answer}");
        let body: Value = serde_json::from_str(answer["body"].as_str().unwrap()).expect("a JSON problem");
        assert_eq!(body["code"], json!("payload_too_large"), "{body}");
    }
}

/// Sizes of the ids the clients send, in bytes: from 2 MiB to just under [`DRAIN_MAX_BYTES`]
/// with the rest of the JSON. Without the drain a client reads the 413 of a 2 MiB body only
/// when the kernel's buffers happen to take all of it; of a 4 MiB one, almost never.
const ID_LENGTHS: &str = "2097152 3145728 3932160 4128768";

/// Prints, as a JSON array, what `http.client` read for each id length of `EARLY_ID_LENGTHS`,
/// each sent on a connection of its own.
const PYTHON_CLIENT: &str = r#"
import http.client, json, os
printed = []
for length in os.environ["EARLY_ID_LENGTHS"].split():
    body = json.dumps({"id": "x" * int(length), "name": "Big", "price_cents": 1, "stock": 1})
    connection = http.client.HTTPConnection("127.0.0.1", int(os.environ["EARLY_PORT"]), timeout=30)
    # http.client writes the whole body before it reads anything.
    connection.request("POST", "/products", body=body.encode(), headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    printed.append({
        "length": len(body),
        "status": response.status,
        "connection": response.getheader("Connection"),
        "content_type": response.getheader("Content-Type"),
        "body": response.read().decode(),
    })
    connection.close()
print(json.dumps(printed))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_http_client_reads_the_413() {
    let app = spawn_app().await;
    let port = app.base.rsplit(':').next().unwrap().to_string();
    let env = vec![("EARLY_PORT", port), ("EARLY_ID_LENGTHS", ID_LENGTHS.to_string())];
    let printed = run_client("python3", vec!["-c".into(), PYTHON_CLIENT.into()], env).await;
    assert_clients_read_413(&printed);
    for answer in printed.as_array().unwrap() {
        assert_eq!(answer["connection"], json!("close"), "{answer}");
    }
    assert!(one_page(&app).await.is_empty(), "nothing was created");
    app.stop().await;
}

/// The same with `fetch`, one request at a time.
const NODE_CLIENT: &str = r#"
const printed = [];
for (const length of process.env.EARLY_ID_LENGTHS.split(" ")) {
  const body = JSON.stringify({ id: "x".repeat(Number(length)), name: "Big", price_cents: 1, stock: 1 });
  const response = await fetch(process.env.EARLY_URL + "/products", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body,
  });
  printed.push({
    length: body.length,
    status: response.status,
    connection: response.headers.get("connection"),
    content_type: response.headers.get("content-type"),
    body: await response.text(),
  });
}
console.log(JSON.stringify(printed));
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_fetch_reads_the_413() {
    let app = spawn_app().await;
    let env = vec![("EARLY_URL", app.base.clone()), ("EARLY_ID_LENGTHS", ID_LENGTHS.to_string())];
    let args = vec!["--input-type=module".into(), "-e".into(), NODE_CLIENT.into()];
    let printed = run_client("node", args, env).await;
    assert_clients_read_413(&printed);
    assert!(one_page(&app).await.is_empty(), "nothing was created");
    app.stop().await;
}

/// The products' first page.
async fn one_page(app: &TestApp) -> Vec<Value> {
    app.get_json("/products").await["items"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_413_closes_after_the_body_and_answers_nothing_in_it() {
    let app = spawn_app().await;
    let body = smuggling_body(2 * MIB);
    let mut wire = Wire::connect(&app).await;
    wire.send(head("POST", "/products", "application/json", body.len(), "").as_bytes()).await;
    wire.send(&body).await;
    let answer = wire.answer().await;
    answer.assert_problem(413, "payload_too_large");
    wire.closes_in_order_after(&answer).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_sent_after_a_refused_body_is_not_answered() {
    let app = spawn_app().await;
    let body = smuggling_body(2 * MIB);
    let mut wire = Wire::connect(&app).await;
    let mut request = head("POST", "/products", "application/json", body.len(), "").into_bytes();
    request.extend_from_slice(&body);
    request.extend_from_slice(SMUGGLED.as_bytes());
    wire.send(&request).await;
    let answer = wire.answer().await;
    answer.assert_problem(413, "payload_too_large");
    assert!(answer.closes(), "Connection: close on {answer:?}");
    // The server closes with the pipelined request unread, which the kernel may turn into a
    // reset: either way, no second answer.
    wire.end().await;
    app.stop().await;
}

/// A 415 is not an early answer here: the handlers read the body (up to the limit) before they
/// look at its media type. The client reads it, and the connection carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_415_with_a_large_body_reaches_the_client() {
    let app = spawn_app().await;
    // At the limit, so that it is the content type that is refused, not the size.
    let body = smuggling_body(MIB);
    let mut wire = Wire::connect(&app).await;
    wire.send(head("POST", "/products", "text/plain", body.len(), "").as_bytes()).await;
    wire.send(&body).await;
    let answer = wire.answer().await;
    answer.assert_problem(415, "unsupported_media_type");
    assert!(!answer.closes(), "the body was read, so the connection is kept: {answer:?}");
    wire.send(b"GET /products HTTP/1.1\r\nHost: early.test\r\nConnection: close\r\n\r\n").await;
    let answer = wire.answer().await;
    assert_eq!(answer.status, 200, "the next request on the connection is answered: {answer:?}");
    assert_eq!(wire.end().await, Ending::Closed, "one answer for each request, then the close asked for");
    app.stop().await;
}

/// A chunked body over the limit is refused while it is read: the answer comes in the middle
/// of the body, whose rest is drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_over_the_limit_is_refused_in_the_middle() {
    let app = spawn_app().await;
    let mut wire = Wire::connect(&app).await;
    wire.send(&chunked("POST", "/products", "application/json", &smuggling_body(MIB), 3)).await;
    let answer = wire.answer().await;
    answer.assert_problem(413, "payload_too_large");
    wire.closes_in_order_after(&answer).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_404_with_a_chunked_body_reaches_the_client() {
    let app = spawn_app().await;
    let mut wire = Wire::connect(&app).await;
    let request = chunked("POST", "/nowhere", "application/json", &smuggling_body(MIB), 3);
    wire.send(&request).await;
    let answer = wire.answer().await;
    answer.assert_problem(404, "not_found");
    wire.closes_in_order_after(&answer).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_before_the_body_reaches_the_client() {
    let dbs = fresh_databases().await;
    let mut config = config(&dbs);
    config.auth_jwt_secret = Some("the-early-answers-hs256-secret-0123456789".parse().unwrap());
    let app = spawn_app_with(config, None).await;
    let body = product_with_id_of(2 * MIB);
    let mut wire = Wire::connect(&app).await;
    wire.send(head("POST", "/products", "application/json", body.len(), "").as_bytes()).await;
    wire.send(body.as_bytes()).await;
    let answer = wire.answer().await;
    answer.assert_problem(401, "unauthorized");
    assert!(answer.header("www-authenticate").is_some(), "{answer:?}");
    wire.closes_in_order_after(&answer).await;

    // A 403: a valid token without the scope, answered before the body is read too.
    let token =
        auth_support::hs256(b"the-early-answers-hs256-secret-0123456789", &auth_support::claims("cust-1", "orders"));
    let mut wire = Wire::connect(&app).await;
    let auth = format!("Authorization: Bearer {token}\r\n");
    wire.send(head("POST", "/products", "application/json", body.len(), &auth).as_bytes()).await;
    wire.send(body.as_bytes()).await;
    let answer = wire.answer().await;
    answer.assert_problem(403, "forbidden");
    wire.closes_in_order_after(&answer).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_in_the_middle_of_the_body_reaches_the_client() {
    let dbs = fresh_databases().await;
    let mut config = config(&dbs);
    config.order_wait_ms = 100;
    config.request_timeout_ms = 300;
    let app = spawn_app_with(config, None).await;
    let body = product_with_id_of(64 * 1024);
    let (first, rest) = body.as_bytes().split_at(body.len() / 2);
    let mut wire = Wire::connect(&app).await;
    wire.send(head("POST", "/products", "application/json", body.len(), "").as_bytes()).await;
    wire.send(first).await;
    // The handler waits for the rest of the body until the request times out.
    let answer = wire.answer().await;
    answer.assert_problem(503, "request_timeout");
    assert!(answer.closes(), "Connection: close on {answer:?}");
    // The client finishes its body after the answer, and the connection then closes in order.
    wire.send(rest).await;
    assert_eq!(wire.end().await, Ending::Closed, "the connection is closed in order, not reset");
    assert!(one_page(&app).await.is_empty(), "nothing was created");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expect_100_continue_body_that_is_not_wanted_is_never_asked_for() {
    let app = spawn_app().await;
    let mut wire = Wire::connect(&app).await;
    wire.send(head("POST", "/products", "application/json", 2 * MIB, "Expect: 100-continue\r\n").as_bytes()).await;
    // No body is sent: the client waits for 100 Continue, which must not come.
    let answer = wire.answer().await;
    answer.assert_problem(413, "payload_too_large");
    assert!(answer.closes(), "Connection: close on {answer:?}");
    assert_eq!(wire.end().await, Ending::Closed, "closed at once, with nothing to drain");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_was_read_keeps_its_connection() {
    let app = spawn_app().await;
    let mut wire = Wire::connect(&app).await;
    let body = json!({"id": "kept", "name": "Kept", "price_cents": 1, "stock": 1}).to_string();
    wire.send(head("POST", "/products", "application/json", body.len(), "").as_bytes()).await;
    wire.send(body.as_bytes()).await;
    let answer = wire.answer().await;
    assert_eq!(answer.status, 201, "{answer:?}");
    assert!(!answer.closes(), "a read body keeps the connection: {answer:?}");
    // The same connection carries the next request.
    wire.send(b"GET /products/kept HTTP/1.1\r\nHost: early.test\r\n\r\n").await;
    let answer = wire.answer().await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(!answer.closes(), "{answer:?}");
    app.stop().await;
}

/// The bounds of the drain are the ones the spec and the README state.
#[test]
fn the_drain_bounds_are_the_documented_ones() {
    use order_saga::http::early::{DRAIN_MAX_BYTES, DRAIN_TIMEOUT};
    assert_eq!(DRAIN_MAX_BYTES, 4 * MIB as u64);
    assert_eq!(DRAIN_TIMEOUT, Duration::from_secs(5));
    let readme = include_str!("../README.md");
    for (document, text, words) in
        [("openapi.yaml", order_saga::http::OPENAPI_YAML, "up to"), ("README.md", readme, "at most")]
    {
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        for bound in ["4 MiB", "5 s"] {
            assert!(text.contains(&format!("{words} {bound}")), "{document} states the drain's bound: {words} {bound}");
        }
    }
}
