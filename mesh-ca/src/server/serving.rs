//! The CA's TLS endpoint: TLS 1.3 only, ALPN `h2`, a serving certificate under the CA's own root
//! for the Service's DNS names (re-issued when half its lifetime has passed), handshakes done
//! concurrently off the accept loop, and the streams handed to tonic.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures_util::Stream;
use mesh_identity::{BuiltinCa, CryptoProvider, WorkloadKey};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::Connected;
use tracing::{debug, warn};

use super::ServerError;

/// Lifetime of the serving certificate (re-issued at half of it).
const SERVING_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long a client may take to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the gRPC server.
const BACKLOG: usize = 64;

/// The serving certificate: issued by the CA for the Service's names, re-issued when due.
struct ServingCert {
    ca: Arc<BuiltinCa>,
    names: Vec<String>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// The current certificate and when to replace it.
    current: Mutex<(Arc<CertifiedKey>, SystemTime)>,
}

impl fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServingCert")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl ServingCert {
    fn new(
        ca: Arc<BuiltinCa>,
        names: Vec<String>,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> Result<Self, ServerError> {
        let first = issue(&ca, &names, &provider)?;
        Ok(Self {
            ca,
            names,
            provider,
            current: Mutex::new(first),
        })
    }
}

/// A new serving certificate and key, and when to replace it.
fn issue(
    ca: &BuiltinCa,
    names: &[String],
    provider: &rustls::crypto::CryptoProvider,
) -> Result<(Arc<CertifiedKey>, SystemTime), ServerError> {
    let key = WorkloadKey::generate().map_err(ServerError::ServingKey)?;
    let der = ca
        .issue_serving(&key, names, SERVING_LIFETIME)
        .map_err(|e| ServerError::ServingCert(Box::new(e)))?;
    let signing_key = provider
        .key_provider
        .load_private_key(key.private_key_der())
        .map_err(ServerError::Tls)?;
    let renew_at = SystemTime::now() + SERVING_LIFETIME / 2;
    Ok((
        Arc::new(CertifiedKey::new(vec![der], signing_key)),
        renew_at,
    ))
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if SystemTime::now() >= current.1 {
            match issue(&self.ca, &self.names, &self.provider) {
                Ok(fresh) => *current = fresh,
                Err(error) => {
                    warn!(%error, "re-issuing the CA's serving certificate failed; serving the current one");
                }
            }
        }
        Some(Arc::clone(&current.0))
    }
}

/// The server's TLS configuration: TLS 1.3, ALPN `h2`, no client certificates (callers
/// authenticate with their token).
pub(crate) fn tls_config(
    ca: Arc<BuiltinCa>,
    names: Vec<String>,
) -> Result<Arc<rustls::ServerConfig>, ServerError> {
    let provider = Arc::new(CryptoProvider::AwsLcRs.build());
    let serving = ServingCert::new(ca, names, Arc::clone(&provider))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(ServerError::Tls)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(serving));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The client's address, in each request's extensions.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Peer(pub(crate) Option<SocketAddr>);

/// A handshaken TLS connection, as tonic serves it.
pub(crate) struct TlsConn(TlsStream<TcpStream>);

impl Connected for TlsConn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        Peer(self.0.get_ref().0.peer_addr().ok())
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// The handshaken connections of `listener`: each accepted connection's handshake runs in a
/// task of its own (at most [`HANDSHAKE_TIMEOUT`]), so a slow client holds up no other. The
/// accept loop ends when the stream is dropped.
pub(crate) fn incoming(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
) -> impl Stream<Item = Result<TlsConn, io::Error>> {
    let (tx, rx) = mpsc::channel::<TlsConn>(BACKLOG);
    let acceptor = TlsAcceptor::from(tls);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        warn!(%error, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = tx.closed() => return,
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(TlsConn(tls)).await;
                    }
                    Ok(Err(error)) => debug!(%peer, %error, "TLS handshake failed"),
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|conn| (Ok(conn), rx))
    })
}
