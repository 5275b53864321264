//! Serving connections: the listening socket with its backlog, and the accept loop with the
//! per-connection limits that `axum::serve` lacks, so that a slow or silent client cannot hold a
//! connection (and its file descriptor) forever.
//!
//! Each connection is HTTP/1.1 (hyper) under a small watch of its own:
//! - from its opening, and from the first byte of each later request, the request's head must
//!   be complete within `HEADER_READ_TIMEOUT_MS`;
//! - between an answer and the next request's first byte it may sit idle `KEEPALIVE_IDLE_MS`;
//! - while a request is being answered (a long event stream included) no limit applies here:
//!   `REQUEST_TIMEOUT_MS` bounds the handler.
//!
//! A connection past a limit is closed without an answer. hyper's own head timer cannot do this
//! alone: it runs from the end of the previous answer, so it cannot tell a slow head from an
//! idle keep-alive wait; it is set to the two limits' sum, as a backstop.
//!
//! Graceful shutdown stops accepting, lets each connection finish the request it is answering
//! (idle ones close at once), and returns once every connection has closed.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::serve::Listener;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// The listen backlog when the kernel's limit cannot be read.
pub const FALLBACK_BACKLOG: u32 = 4096;

/// Where Linux says how long a listen backlog it allows; a longer one is cut to it.
const SOMAXCONN: &str = "/proc/sys/net/core/somaxconn";

/// How long a connection may take over each part of a request (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// From the opening, or a request's first byte, to the end of its head.
    pub header_read_timeout: Duration,
    /// From the end of an answer to the next request's first byte.
    pub keepalive_idle: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self { header_read_timeout: Duration::from_secs(10), keepalive_idle: Duration::from_secs(60) }
    }
}

/// The kernel's listen backlog limit (`net.core.somaxconn`), else [`FALLBACK_BACKLOG`]: a
/// longer backlog is cut to it, and tokio's default (1,024) would be shorter on most systems.
pub fn default_backlog() -> u32 {
    std::fs::read_to_string(SOMAXCONN)
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(FALLBACK_BACKLOG)
}

/// Listens on `addr` (an address or `host:port`; the first of its addresses that binds) with a
/// listen backlog of `backlog` connections: a burst of connections longer than the backlog
/// waits in the kernel's SYN queue and in clients' retries, for up to a minute.
pub async fn bind(addr: &str, backlog: u32) -> io::Result<TcpListener> {
    let mut last_error = None;
    for addr in tokio::net::lookup_host(addr).await? {
        match listen_on(addr, backlog) {
            Ok(listener) => return Ok(listener),
            Err(error) => last_error = Some(error),
        }
    }
    Err(last_error.unwrap_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the address resolves to nothing")))
}

fn listen_on(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    // As `TcpListener::bind` does: a restart does not wait for the old sockets' TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Serves `router` on the connections `listener` accepts until `stop` resolves, then shuts down
/// gracefully (module docs) and returns once every connection has closed. An accept error (out
/// of file descriptors, say) never ends the loop: the listener logs it and waits a moment (a
/// second for a plain TCP listener, as hyper and axum do; see also [`crate::tls::TlsListener`]).
pub async fn serve<L>(
    mut listener: L,
    router: Router,
    limits: ConnectionLimits,
    stop: impl Future<Output = ()> + Send,
) -> io::Result<()>
where
    L: Listener,
    L::Addr: std::fmt::Debug,
{
    let connections = TaskTracker::new();
    let (stopping_tx, stopping) = watch::channel(false);
    let mut stop = pin!(stop);
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stop => break,
        };
        tracing::trace!(?peer, "connection accepted");
        connections.spawn(connection(io, router.clone(), limits, stopping.clone()));
    }
    // Closing the socket: new connections are refused rather than queued for nobody.
    drop(listener);
    let _ = stopping_tx.send(true);
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Serves one connection until it closes, the client exceeds a limit, or shutdown finishes its
/// request in progress.
async fn connection<I>(io: I, router: Router, limits: ConnectionLimits, mut stopping: watch::Receiver<bool>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let watch = Arc::new(ConnectionWatch::new());
    let io = TokioIo::new(Watched { io, watch: watch.clone() });
    let service = {
        let watch = watch.clone();
        tower::service_fn(move |request: hyper::Request<Incoming>| {
            let busy = Busy::start(watch.clone());
            let router = router.clone();
            async move {
                let Ok(response) = router.oneshot(request).await;
                // The request counts as in progress until its answer's body is done with.
                Ok::<_, Infallible>(response.map(|body| {
                    Body::new(body.map_frame(move |frame| {
                        let _in_progress = &busy;
                        frame
                    }))
                }))
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(limits.header_read_timeout + limits.keepalive_idle);
    let mut conn = pin!(builder.serve_connection(io, TowerToHyperService::new(service)));
    let mut shutting_down = false;
    loop {
        let deadline = watch.deadline(&limits);
        let changed = watch.changed.notified();
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(error) = served {
                    tracing::debug!(%error, "connection ended with an error");
                }
                return;
            }
            () = sleep_until(deadline) => {
                if watch.deadline(&limits).is_some_and(|d| d <= Instant::now()) {
                    tracing::debug!("closing a connection that sent no complete request in time");
                    return;
                }
            }
            () = changed => {}
            _ = stopping.wait_for(|stop| *stop), if !shutting_down => {
                shutting_down = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Where a connection stands, as its reads and its requests tell.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// A request's head is expected, since this instant (the opening, or its first byte).
    Head(Instant),
    /// This many requests are being answered.
    Busy(usize),
    /// Idle since the end of the last answer, no byte of a next request yet.
    Idle(Instant),
}

/// A connection's phase, shared by its reads, its requests and its watchdog.
struct ConnectionWatch {
    phase: Mutex<Phase>,
    /// Wakes the watchdog when the phase gets a new deadline.
    changed: Notify,
}

impl ConnectionWatch {
    fn new() -> Self {
        Self { phase: Mutex::new(Phase::Head(Instant::now())), changed: Notify::new() }
    }

    /// When the connection is past its limit, if it has one now.
    fn deadline(&self, limits: &ConnectionLimits) -> Option<Instant> {
        match *self.phase.lock().unwrap() {
            Phase::Head(since) => Some(since + limits.header_read_timeout),
            Phase::Idle(since) => Some(since + limits.keepalive_idle),
            Phase::Busy(_) => None,
        }
    }

    /// Bytes arrived: on an idle connection they start the next request's head.
    fn bytes_read(&self) {
        let mut phase = self.phase.lock().unwrap();
        if let Phase::Idle(_) = *phase {
            *phase = Phase::Head(Instant::now());
            drop(phase);
            self.changed.notify_one();
        }
    }
}

/// One request in progress on a connection, from its parsed head to its answer's end.
struct Busy(Arc<ConnectionWatch>);

impl Busy {
    fn start(watch: Arc<ConnectionWatch>) -> Self {
        {
            let mut phase = watch.phase.lock().unwrap();
            *phase = match *phase {
                Phase::Busy(n) => Phase::Busy(n + 1),
                Phase::Head(_) | Phase::Idle(_) => Phase::Busy(1),
            };
        }
        Busy(watch)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut phase = self.0.phase.lock().unwrap();
        *phase = match *phase {
            Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
            _ => Phase::Idle(Instant::now()),
        };
        drop(phase);
        self.0.changed.notify_one();
    }
}

/// The connection's stream, telling its watch when bytes arrive.
struct Watched<I> {
    io: I,
    watch: Arc<ConnectionWatch>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.watch.bytes_read();
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, data)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
