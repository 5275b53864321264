//! HTTPS on the listener itself, for a deployment with no TLS-terminating proxy in front, so
//! that bearer tokens and data do not cross the network in clear. `TLS_CERT_FILE` and
//! `TLS_KEY_FILE` become a rustls configuration (the ring provider, HTTP/1.1 by ALPN), and
//! [`TlsListener`] hands `axum::serve` connections whose handshake has finished.
//!
//! Each handshake runs in a task of its own under [`HANDSHAKE_TIMEOUT`]: a slow, silent or
//! plain-HTTP client holds up no other connection, and a failed handshake costs only a debug
//! line.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::{self, PemObject};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::server::TlsStream;

/// The longest a client may take to finish its handshake, unless
/// [`TlsListener::with_handshake_timeout`] says otherwise: long enough for a slow network, short
/// enough that idle sockets do not pile up.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Handshakes running or finished and not yet taken by `accept`; past this the listener stops
/// taking TCP connections (the kernel's backlog queues them), so that a flood of clients that
/// never finish their handshake cannot grow memory without bound.
pub const MAX_PENDING_HANDSHAKES: usize = 1024;

/// Why the certificate and key cannot be served, naming the setting and the file, for a clear
/// startup error rather than a failure at the first connection.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file cannot be read (missing, a directory, no permission).
    #[error("cannot read {setting} {}: {source}", path.display())]
    Read {
        /// `TLS_CERT_FILE` or `TLS_KEY_FILE`.
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// What reading it said.
        source: io::Error,
    },
    /// The file is not well-formed PEM.
    #[error("{setting} {} is not valid PEM: {source}", path.display())]
    Pem {
        /// `TLS_CERT_FILE` or `TLS_KEY_FILE`.
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// What the PEM parser said.
        source: pem::Error,
    },
    /// The certificate file holds no `CERTIFICATE` block.
    #[error("TLS_CERT_FILE {} holds no certificate (expected PEM \"BEGIN CERTIFICATE\" blocks)", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The key file holds no private key block.
    #[error("TLS_KEY_FILE {} holds no private key (expected a PEM PKCS#8, PKCS#1 or SEC1 key)", path.display())]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// rustls refuses the pair: an unsupported key, a key that is not the certificate's, a
    /// malformed certificate.
    #[error("TLS_CERT_FILE {} and TLS_KEY_FILE {} cannot be served: {source}", cert.display(), key.display())]
    Rejected {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        source: rustls::Error,
    },
}

/// Reads the PEM certificate chain (the server's certificate first) and its private key, and
/// builds the server configuration: rustls's safe defaults on the ring provider, no client
/// certificates, ALPN `http/1.1` (the server speaks HTTP/1.1 only).
pub fn server_config(cert_file: &Path, key_file: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let cert_pem = read("TLS_CERT_FILE", cert_file)?;
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem { setting: "TLS_CERT_FILE", path: cert_file.to_owned(), source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: cert_file.to_owned() });
    }
    let key_pem = read("TLS_KEY_FILE", key_file)?;
    let key = match PrivateKeyDer::from_pem_slice(&key_pem) {
        Ok(key) => key,
        Err(pem::Error::NoItemsFound) => return Err(TlsError::NoKey { path: key_file.to_owned() }),
        Err(source) => return Err(TlsError::Pem { setting: "TLS_KEY_FILE", path: key_file.to_owned(), source }),
    };
    let rejected = |source| TlsError::Rejected { cert: cert_file.to_owned(), key: key_file.to_owned(), source };
    let mut config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(rejected)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(rejected)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn read(setting: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { setting, path: path.to_owned(), source })
}

/// A TCP listener whose connections `axum::serve` gets only once their TLS handshake has
/// finished. Dropping it (as `axum::serve` does when a graceful shutdown begins) closes the
/// socket and abandons the handshakes still running.
pub struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
    /// Each handshake's task; a finished one yields its stream, a failed one nothing.
    handshakes: JoinSet<Option<(TlsStream<TcpStream>, SocketAddr)>>,
}

impl TlsListener {
    /// Serves TLS with `config` on the connections `tcp` accepts.
    pub fn new(tcp: TcpListener, config: Arc<ServerConfig>) -> Self {
        Self {
            tcp,
            acceptor: TlsAcceptor::from(config),
            handshake_timeout: HANDSHAKE_TIMEOUT,
            handshakes: JoinSet::new(),
        }
    }

    /// Gives each client `timeout` instead of [`HANDSHAKE_TIMEOUT`] to finish its handshake: a
    /// test makes it long, to tell a handshake that waits from one that holds up others.
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener")
            .field("tcp", &self.tcp)
            .field("handshakes", &self.handshakes.len())
            .finish_non_exhaustive()
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    /// Takes TCP connections and starts their handshakes while waiting for one to finish.
    /// Cancel-safe: axum drops this future when a shutdown begins, and nothing is lost between
    /// two polls (an accepted connection is in the set before the next await).
    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            tokio::select! {
                accepted = self.tcp.accept(), if self.handshakes.len() < MAX_PENDING_HANDSHAKES => match accepted {
                    Ok((stream, peer)) => {
                        self.handshakes.spawn(handshake(self.acceptor.clone(), stream, peer, self.handshake_timeout));
                    }
                    Err(error) => accept_error(error).await,
                },
                Some(finished) = self.handshakes.join_next() => match finished {
                    Ok(Some(connection)) => return connection,
                    Ok(None) => {}
                    Err(error) => tracing::warn!(%error, "a TLS handshake task failed"),
                },
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// One client's handshake; `None` (logged at debug) when it fails or takes too long, which is
/// the client's affair: a plain-HTTP request, a port scanner, an untrusted certificate.
async fn handshake(
    acceptor: TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    timeout: Duration,
) -> Option<(TlsStream<TcpStream>, SocketAddr)> {
    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => Some((tls, peer)),
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "TLS handshake failed; connection dropped");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, ?timeout, "TLS handshake timed out; connection dropped");
            None
        }
    }
}

/// As `axum::serve` does for a plain listener: a connection that went away before it was taken
/// is nobody's concern; anything else (out of file descriptors, say) is logged and waited out.
async fn accept_error(error: io::Error) {
    if matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(%error, "accept error");
    tokio::time::sleep(Duration::from_secs(1)).await;
}
