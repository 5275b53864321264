//! Early answers: an answer given before the request's body was read to its end (a 401 / 403
//! from the access check, a 413 from `Content-Length` or in the middle of a chunked body, a
//! 404, a 503 timeout) must still reach a client that writes its whole body before it reads, as
//! Python's `http.client`, `requests` and Node's `fetch` do. (A 415 is not one: the handlers
//! read the body before they look at its media type.)
//!
//! hyper's HTTP/1 connection reads a request body only while someone polls it. A body dropped
//! unread makes it stop reading, and once the answer is written it closes the socket with the
//! rest of the body unread in the kernel's receive buffer, which the kernel answers with a
//! reset: the client, still writing, gets a broken pipe and never reads the answer. So the
//! outermost layer, [`answer_early`], tracks whether the body was read to its end; when it was
//! not, it says `Connection: close` (the rest of the body must never be parsed as a next
//! request) and a task of its own reads and discards the rest, bounded by [`DRAIN_MAX_BYTES`]
//! and [`DRAIN_TIMEOUT`]. hyper keeps the connection open while that task holds the body, and
//! closes it in order once the body ends (or the task gives up and drops it).

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;

/// The most of an unread body's rest that is read and discarded after an early answer. A
/// client that still has more to send (or declared more in `Content-Length`) has its
/// connection closed at once instead, and may see a reset rather than the answer.
pub const DRAIN_MAX_BYTES: u64 = 4 * 1024 * 1024;

/// The longest the rest of an unread body is read for after an early answer: a client that
/// sends more slowly has its connection closed then.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The outermost middleware: passes a request with a body on with its body tracked, and after
/// the answer, if the body was not read to its end, adds `Connection: close` and drains the
/// rest (or, for an `Expect: 100-continue` body nobody asked for, lets hyper close without it).
pub async fn answer_early(request: Request, next: Next) -> Response {
    // hyper's body is at its end from the start unless the request declares one (a
    // `Content-Length` above 0, or chunked): then nothing can be left unread.
    if request.body().is_end_stream() {
        return next.run(request).await;
    }
    let expects_continue =
        request.headers().get(header::EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let fate = Arc::new(Mutex::new(Fate::InUse));
    let request = request.map(|inner| Body::new(Tracked { inner, polled: false, ended: false, fate: fate.clone() }));
    let mut response = next.run(request).await;
    let fate = std::mem::replace(&mut *fate.lock().unwrap_or_else(PoisonError::into_inner), Fate::InUse);
    match fate {
        Fate::Read => return response,
        // Still held somewhere (nothing here does that): it cannot be drained from here, and
        // hyper stops reading when it is dropped.
        Fate::InUse => {}
        // hyper sends `100 Continue` only when the body is first polled, so a client that waits
        // for it has sent nothing: closing loses nothing.
        Fate::Unread { polled: false, .. } if expects_continue => {}
        Fate::Unread { rest, .. } => {
            let request_id = response.headers().get("x-request-id").cloned();
            tokio::spawn(drain(rest, request_id));
        }
    }
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// What became of a tracked body, as its [`Tracked`] left it when dropped.
enum Fate {
    /// Not dropped yet.
    InUse,
    /// Read to its end.
    Read,
    /// Dropped before its end: the rest, still attached to the connection, and whether anyone
    /// had polled it.
    Unread { rest: Body, polled: bool },
}

/// A request body that remembers whether it was read to its end and, if not, hands the rest
/// to [`answer_early`] when dropped rather than dropping it (which would make hyper stop
/// reading). Two plain flags while it is read; the shared [`Fate`] is touched once, on drop.
struct Tracked {
    inner: Body,
    polled: bool,
    ended: bool,
    fate: Arc<Mutex<Fate>>,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        self.polled = true;
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        // A reader may stop at `is_end_stream` without polling the final `None`.
        let fate = if self.ended || self.inner.is_end_stream() {
            Fate::Read
        } else {
            Fate::Unread { rest: std::mem::take(&mut self.inner), polled: self.polled }
        };
        *self.fate.lock().unwrap_or_else(PoisonError::into_inner) = fate;
    }
}

/// Reads and discards the rest of an unread body within the caps, then drops it, which lets
/// hyper close the connection: in order if the body ended, else with whatever is left unread.
async fn drain(mut rest: Body, request_id: Option<HeaderValue>) {
    let declared = rest.size_hint().lower();
    let mut read = 0u64;
    let outcome = if declared > DRAIN_MAX_BYTES {
        "too large"
    } else {
        let to_the_end = async {
            while let Some(frame) = rest.frame().await {
                let Ok(frame) = frame else { return "broken" };
                read += frame.data_ref().map_or(0, |data| data.len() as u64);
                if read > DRAIN_MAX_BYTES {
                    return "too large";
                }
            }
            "ended"
        };
        tokio::time::timeout(DRAIN_TIMEOUT, to_the_end).await.unwrap_or("too slow")
    };
    let request_id = request_id.as_ref().and_then(|id| id.to_str().ok()).unwrap_or_default();
    tracing::debug!(outcome, declared, read, request_id, "drained the rest of a request body after an early answer");
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use axum::Router;
    use axum::routing::post;
    use tower::ServiceExt;

    use super::*;

    fn app() -> Router {
        Router::new()
            .route("/read", post(|body: Bytes| async move { body.len().to_string() }))
            .route("/ignore", post(|| async { "ignored" }))
            .layer(axum::middleware::from_fn(answer_early))
    }

    async fn call(path: &str, body: Body, expect: bool) -> Response {
        let mut request = Request::post(path);
        if expect {
            request = request.header(header::EXPECT, "100-continue");
        }
        app().oneshot(request.body(body).unwrap()).await.unwrap()
    }

    fn closes(response: &Response) -> bool {
        response.headers().get(header::CONNECTION).is_some_and(|v| v == "close")
    }

    /// A body whose client never sends anything, which tells whether it was polled or dropped.
    #[derive(Default)]
    struct Probe {
        polled: Arc<AtomicBool>,
        dropped: Arc<AtomicBool>,
    }

    impl HttpBody for Probe {
        type Data = Bytes;
        type Error = axum::Error;

        fn poll_frame(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
            self.polled.store(true, Ordering::SeqCst);
            Poll::Pending
        }
    }

    impl Drop for Probe {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_body_read_to_its_end_keeps_the_connection() {
        assert!(!closes(&call("/read", Body::from("some body"), false).await));
    }

    #[tokio::test]
    async fn no_body_keeps_the_connection() {
        assert!(!closes(&call("/ignore", Body::empty(), false).await));
    }

    #[tokio::test]
    async fn a_body_left_unread_closes_the_connection_and_is_drained() {
        let probe = Probe::default();
        let (polled, dropped) = (probe.polled.clone(), probe.dropped.clone());
        let response = call("/ignore", Body::new(probe), false).await;
        assert!(closes(&response));
        // Held by the drain, which waits for the rest (never sent here) up to DRAIN_TIMEOUT.
        assert!(!dropped.load(Ordering::SeqCst), "the rest is kept to be drained");
        eventually_polled(&polled).await;
    }

    #[tokio::test]
    async fn an_unwanted_expect_100_continue_body_is_closed_not_drained() {
        let probe = Probe::default();
        let (polled, dropped) = (probe.polled.clone(), probe.dropped.clone());
        let response = call("/ignore", Body::new(probe), true).await;
        assert!(closes(&response));
        assert!(dropped.load(Ordering::SeqCst), "dropped with the answer: hyper then closes");
        assert!(!polled.load(Ordering::SeqCst), "never asked for, so no 100 Continue is sent");
    }

    /// Waits (a hang is stopped by the test's own timeout) until the drain task polls `polled`.
    async fn eventually_polled(polled: &AtomicBool) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while !polled.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the drain reads the rest");
    }
}
