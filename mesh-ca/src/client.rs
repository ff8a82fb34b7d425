//! [`IstioCaClient`]: the agents' [`CertificateAuthority`] backed by a CA service that speaks
//! Istio's certificate API: this crate's server (`mesh-agent ca`) or istiod.
//!
//! Each signing reads the token file again (projected tokens rotate), sends the CSR as PEM with
//! the lifetime wanted in seconds and the identity as `ImpersonatedIdentity` (as ztunnel does),
//! with `authorization: Bearer <token>`, over a channel kept between requests. The server is
//! verified by the address's host name against the roots file, which is also the trust bundle
//! of the mesh. The answer is checked before it is used: each entry one PEM certificate, the
//! leaf naming exactly the identity requested, the chain verifying to the bundle.
//!
//! Failures are [`CaError`]s the certificate manager retries with backoff, serving its current
//! certificates meanwhile: [`CaError::TokenFile`], [`CaError::Unreachable`] (resolution,
//! connection, TLS, timeouts; the channel is made anew at the next try), [`CaError::Refused`]
//! (the CA's gRPC status) and [`CaError::BadResponse`].

mod connector;
mod resolve;
mod response;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::error::Error as StdError;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use mesh_identity::{
    CaError, CaFuture, CertificateAuthority, CryptoProvider, CsrRequest, IdentityError,
    IssuedChain, TrustBundle,
};
use prost_types::{value::Kind, Struct, Value};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::TlsConnector;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

use crate::proto::istio_certificate_service_client::IstioCertificateServiceClient;
use crate::proto::{IstioCertificateRequest, IMPERSONATED_IDENTITY};

pub use connector::ConnectError;
pub use resolve::{Resolve, StaticResolver, SystemResolver};

/// Where the kubelet puts the projected token of audience `istio-ca` in Istio's charts.
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/tokens/istio-token";
/// How long connecting (resolution, TCP, TLS) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one request may take, once connected.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How to reach and trust a remote CA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IstioCaOptions {
    /// `https://<host>:<port>`; the server's certificate must be valid for `<host>`.
    pub address: String,
    /// PEM file of the root certificates: the mesh's trust bundle, and what the CA server's
    /// certificate is verified against.
    pub root_cert: PathBuf,
    /// The bearer token's file, read at every request.
    pub token_file: PathBuf,
    /// The trust domain of the identities asked for.
    pub trust_domain: String,
    /// Send the identity wanted as `ImpersonatedIdentity` (a node agent asking for its
    /// workloads; always on in the agent, as in ztunnel). Off, the CA issues the caller's own.
    pub impersonate: bool,
    /// See [`CONNECT_TIMEOUT`].
    pub connect_timeout: Duration,
    /// See [`REQUEST_TIMEOUT`].
    pub request_timeout: Duration,
}

impl IstioCaOptions {
    /// Options with impersonation on and the default timeouts.
    pub fn new(
        address: impl Into<String>,
        root_cert: impl Into<PathBuf>,
        token_file: impl Into<PathBuf>,
        trust_domain: impl Into<String>,
    ) -> Self {
        Self {
            address: address.into(),
            root_cert: root_cert.into(),
            token_file: token_file.into(),
            trust_domain: trust_domain.into(),
            impersonate: true,
            connect_timeout: CONNECT_TIMEOUT,
            request_timeout: REQUEST_TIMEOUT,
        }
    }
}

/// What is wrong with a CA address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressProblem {
    /// It does not parse as a URI.
    NotAUri,
    /// Its scheme is not `https`.
    NotHttps,
    /// It has no host.
    NoHost,
    /// It has a path, query or user information.
    NotJustHostAndPort,
    /// Its host cannot be a TLS server name.
    BadHost,
}

impl fmt::Display for AddressProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotAUri => "it is not a URI",
            Self::NotHttps => "its scheme must be https",
            Self::NoHost => "it has no host",
            Self::NotJustHostAndPort => "it must be https://<host>:<port>, without a path",
            Self::BadHost => "its host is neither a DNS name nor an IP address",
        })
    }
}

/// Why a client cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The address is not `https://<host>[:<port>]`.
    #[error("CA address {address:?}: {problem}")]
    Address {
        /// The address.
        address: String,
        /// What is wrong with it.
        problem: AddressProblem,
    },
    /// The roots file cannot be read.
    #[error("CA root certificate file {path}: {source}")]
    RootsUnreadable {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The roots file holds no PEM certificate.
    #[error("CA root certificate file {path} holds no PEM certificate")]
    NoRoots {
        /// The file.
        path: PathBuf,
    },
    /// A root is not a usable trust anchor.
    #[error("CA root certificate file {path}: {source}")]
    InvalidRoots {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: Box<CaError>,
    },
    /// The trust domain is not valid.
    #[error("trust domain {trust_domain:?}: {source}")]
    TrustDomain {
        /// The trust domain.
        trust_domain: String,
        /// The cause.
        source: IdentityError,
    },
    /// The TLS configuration cannot be built.
    #[error("TLS configuration of the CA client: {0}")]
    Tls(#[source] rustls::Error),
}

/// A [`CertificateAuthority`] reached over Istio's certificate API.
pub struct IstioCaClient {
    options: IstioCaOptions,
    bundle: TrustBundle,
    endpoint: Endpoint,
    connector: connector::Connector,
    /// The channel of the last successful connection; dropped after a transport failure, so
    /// that the next request connects (and resolves) anew.
    channel: Mutex<Option<Channel>>,
}

impl fmt::Debug for IstioCaClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IstioCaClient")
            .field("options", &self.options)
            .field("roots", &self.bundle.roots().len())
            .finish_non_exhaustive()
    }
}

impl IstioCaClient {
    /// A client for `options`, resolving the CA's host with `resolver`. Reads the roots file;
    /// connects at the first signing, not here.
    pub fn new(options: IstioCaOptions, resolver: Arc<dyn Resolve>) -> Result<Self, ClientError> {
        mesh_identity::spiffe::validate_trust_domain(&options.trust_domain).map_err(|source| {
            ClientError::TrustDomain {
                trust_domain: options.trust_domain.clone(),
                source,
            }
        })?;
        let (host, port) = parse_address(&options.address)?;
        let server_name = ServerName::try_from(host.clone()).map_err(|_| ClientError::Address {
            address: options.address.clone(),
            problem: AddressProblem::BadHost,
        })?;
        let bundle = read_roots(&options.root_cert)?;
        let mut roots = rustls::RootCertStore::empty();
        let (_, _) = roots.add_parsable_certificates(bundle.roots().iter().cloned());
        let mut tls =
            rustls::ClientConfig::builder_with_provider(Arc::new(CryptoProvider::AwsLcRs.build()))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(ClientError::Tls)?
                .with_root_certificates(roots)
                .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let endpoint = Endpoint::from_shared(options.address.clone())
            .map_err(|_| ClientError::Address {
                address: options.address.clone(),
                problem: AddressProblem::NotAUri,
            })?
            .connect_timeout(options.connect_timeout)
            .timeout(options.request_timeout);
        let connector = connector::Connector {
            host,
            port,
            server_name,
            tls: TlsConnector::from(Arc::new(tls)),
            resolver,
            timeout: options.connect_timeout,
        };
        Ok(Self {
            options,
            bundle,
            endpoint,
            connector,
            channel: Mutex::new(None),
        })
    }

    /// The options the client was made with.
    pub fn options(&self) -> &IstioCaOptions {
        &self.options
    }

    fn unreachable(&self, source: &dyn StdError) -> CaError {
        CaError::Unreachable {
            address: self.options.address.clone(),
            source: Box::new(Flattened(flatten(source))),
        }
    }

    /// The channel of the last connection, or a new one.
    async fn channel(&self) -> Result<Channel, CaError> {
        let current = self
            .channel
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(channel) = current {
            return Ok(channel);
        }
        let channel = self
            .endpoint
            .connect_with_connector(self.connector.clone())
            .await
            .map_err(|e| self.unreachable(&e))?;
        *self.channel.lock().unwrap_or_else(PoisonError::into_inner) = Some(channel.clone());
        Ok(channel)
    }

    fn forget_channel(&self) {
        self.channel
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    async fn sign_now(&self, request: CsrRequest) -> Result<IssuedChain, CaError> {
        let identity = request.identity.clone();
        let token = read_token(&self.options.token_file)?;
        let csr = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", request.csr_der));
        let validity_duration = request
            .lifetime
            .map_or(0, |l| i64::try_from(l.as_secs()).unwrap_or(i64::MAX));
        let metadata = self.options.impersonate.then(|| Struct {
            fields: BTreeMap::from([(
                IMPERSONATED_IDENTITY.to_owned(),
                Value {
                    kind: Some(Kind::StringValue(identity.to_string())),
                },
            )]),
        });
        let mut grpc = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration,
            metadata,
        });
        let bearer = MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
            CaError::UnusableToken {
                path: self.options.token_file.clone(),
            }
        })?;
        grpc.metadata_mut().insert("authorization", bearer);
        grpc.set_timeout(self.options.request_timeout);
        let channel = self.channel().await?;
        let mut client = IstioCertificateServiceClient::new(channel);
        let call = client.create_certificate(grpc);
        let Ok(answer) = tokio::time::timeout(self.options.request_timeout, call).await else {
            self.forget_channel();
            let timed_out = std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {:?}", self.options.request_timeout),
            );
            return Err(self.unreachable(&timed_out));
        };
        let response = match answer {
            Ok(response) => response.into_inner(),
            // A status made from a transport error carries it as its source; the server's own
            // statuses have none.
            Err(status) if status.source().is_some() => {
                self.forget_channel();
                return Err(self.unreachable(&status));
            }
            Err(status) => {
                return Err(CaError::Refused {
                    address: self.options.address.clone(),
                    identity,
                    code: format!("{:?}", status.code()),
                    message: status.message().to_owned(),
                })
            }
        };
        let chain = response::issued_chain(
            &response.cert_chain,
            &identity,
            &self.bundle,
            SystemTime::now(),
        )
        .map_err(|problem| CaError::BadResponse {
            address: self.options.address.clone(),
            identity: identity.clone(),
            problem: Box::new(problem),
        })?;
        tracing::debug!(%identity, ca = %self.options.address, "the CA signed a workload certificate");
        Ok(IssuedChain { chain })
    }
}

impl CertificateAuthority for IstioCaClient {
    fn trust_domain(&self) -> &str {
        &self.options.trust_domain
    }

    fn sign(&self, request: CsrRequest) -> CaFuture<'_, Result<IssuedChain, CaError>> {
        Box::pin(self.sign_now(request))
    }

    fn trust_bundle(&self) -> TrustBundle {
        self.bundle.clone()
    }
}

/// The host (without brackets) and port (443 by default) of `https://<host>[:<port>]`.
pub fn parse_address(address: &str) -> Result<(String, u16), ClientError> {
    let problem = |problem| ClientError::Address {
        address: address.to_owned(),
        problem,
    };
    let uri: http::Uri = address
        .parse()
        .map_err(|_| problem(AddressProblem::NotAUri))?;
    if uri.scheme_str() != Some("https") {
        return Err(problem(AddressProblem::NotHttps));
    }
    let authority = uri.authority().ok_or(problem(AddressProblem::NoHost))?;
    let path_ok = matches!(uri.path(), "" | "/") && uri.query().is_none();
    if !path_ok || authority.as_str().contains('@') {
        return Err(problem(AddressProblem::NotJustHostAndPort));
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    if host.is_empty() {
        return Err(problem(AddressProblem::NoHost));
    }
    Ok((host.to_owned(), authority.port_u16().unwrap_or(443)))
}

/// The roots of the PEM file at `path`, as a trust bundle.
///
/// # Errors
///
/// When the file cannot be read, holds no certificate, or one that is not a root.
pub fn read_roots(path: &Path) -> Result<TrustBundle, ClientError> {
    let pem = std::fs::read(path).map_err(|source| ClientError::RootsUnreadable {
        path: path.to_owned(),
        source,
    })?;
    let roots: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|source| ClientError::RootsUnreadable {
            path: path.to_owned(),
            source,
        })?;
    if roots.is_empty() {
        return Err(ClientError::NoRoots {
            path: path.to_owned(),
        });
    }
    TrustBundle::new(roots).map_err(|source| ClientError::InvalidRoots {
        path: path.to_owned(),
        source: Box::new(source),
    })
}

/// The token in `path`, without surrounding white space; an error names the file when it
/// cannot be read or is empty.
fn read_token(path: &Path) -> Result<String, CaError> {
    let text = std::fs::read_to_string(path).map_err(|source| CaError::TokenFile {
        path: path.to_owned(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(CaError::EmptyToken {
            path: path.to_owned(),
        });
    }
    Ok(token.to_owned())
}

/// `error: cause: cause...`, each message once.
fn flatten(error: &dyn StdError) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let message = cause.to_string();
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = cause.source();
    }
    text
}

/// A transport failure's whole chain of causes, as one message (tonic's own errors say little
/// more than "transport error" at the top).
#[derive(Debug)]
struct Flattened(String);

impl fmt::Display for Flattened {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl StdError for Flattened {}
