//! The client's transport, given to tonic as its connector: the CA's host resolved with the
//! configured [`Resolve`], TCP to the first address that answers, then TLS 1.3 with the host as
//! server name (verified against the trust bundle, standard webpki server verification) and
//! ALPN `h2`.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::resolve::{Named, Resolve};

/// Why a connection to the CA could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The resolver knows no address for the host.
    #[error("no address for {host}:{port}")]
    NoAddress {
        /// The CA's host.
        host: String,
        /// The CA's port.
        port: u16,
    },
    /// No address accepted a TCP connection.
    #[error("connecting to {host} ({tried:?}): {source}")]
    Tcp {
        /// The CA's host and port.
        host: String,
        /// The addresses tried.
        tried: Vec<SocketAddr>,
        /// The last address's error.
        source: io::Error,
    },
    /// The TLS handshake failed (the server's certificate does not verify for the host, for
    /// instance).
    #[error("TLS handshake with {host} at {addr}: {source}")]
    Tls {
        /// The CA's host.
        host: String,
        /// The address connected to.
        addr: SocketAddr,
        /// The cause.
        source: io::Error,
    },
    /// The server did not agree to HTTP/2 (ALPN `h2`).
    #[error("{host} at {addr} did not negotiate HTTP/2 (ALPN h2)")]
    NoH2 {
        /// The CA's host.
        host: String,
        /// The address connected to.
        addr: SocketAddr,
    },
    /// Connecting took longer than the connect timeout.
    #[error("connecting to {host} timed out after {after:?}")]
    Timeout {
        /// The CA's host and port.
        host: String,
        /// The timeout.
        after: Duration,
    },
}

/// Connects to the CA: a `tower` service from the endpoint's URI to an HTTP/2-ready stream.
#[derive(Clone)]
pub(crate) struct Connector {
    /// The host the certificate must be valid for, and resolved.
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) server_name: ServerName<'static>,
    pub(crate) tls: TlsConnector,
    pub(crate) resolver: Arc<dyn Resolve>,
    pub(crate) timeout: Duration,
}

impl Connector {
    async fn connect(self) -> Result<TokioIo<TlsStream<TcpStream>>, ConnectError> {
        let named = Named(&self.host, self.port).to_string();
        let timeout = self.timeout;
        tokio::time::timeout(timeout, self.connect_now(named.clone()))
            .await
            .unwrap_or(Err(ConnectError::Timeout {
                host: named,
                after: timeout,
            }))
    }

    async fn connect_now(
        self,
        named: String,
    ) -> Result<TokioIo<TlsStream<TcpStream>>, ConnectError> {
        let resolver = Arc::clone(&self.resolver);
        let (host, port) = (self.host.clone(), self.port);
        let addrs = tokio::task::spawn_blocking(move || resolver.resolve(&host, port))
            .await
            .unwrap_or_default();
        if addrs.is_empty() {
            return Err(ConnectError::NoAddress {
                host: self.host,
                port: self.port,
            });
        }
        let mut last = None;
        let mut connected = None;
        for addr in &addrs {
            match TcpStream::connect(addr).await {
                Ok(stream) => {
                    connected = Some((*addr, stream));
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let Some((addr, stream)) = connected else {
            return Err(ConnectError::Tcp {
                host: named,
                tried: addrs,
                source: last.unwrap_or_else(|| io::Error::other("no address tried")),
            });
        };
        let _ = stream.set_nodelay(true);
        let tls = self
            .tls
            .connect(self.server_name.clone(), stream)
            .await
            .map_err(|source| ConnectError::Tls {
                host: self.host.clone(),
                addr,
                source,
            })?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(ConnectError::NoH2 {
                host: self.host,
                addr,
            });
        }
        tracing::debug!(ca = %named, %addr, "connected to the CA");
        Ok(TokioIo::new(tls))
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    /// Connects to the configured host (the URI is the same endpoint's).
    fn call(&mut self, _uri: Uri) -> Self::Future {
        Box::pin(self.clone().connect())
    }
}
