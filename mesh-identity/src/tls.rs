//! rustls configurations of the mesh's mutual TLS: TLS 1.3 only, ALPN `h2`, no resumption,
//! certificates taken from the latest [`CertSnapshot`] at every handshake, peers authenticated
//! by SPIFFE id rather than by DNS name.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, SignatureVerificationAlgorithm, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    OtherError, ServerConfig, SignatureScheme,
};
use tokio::sync::watch;
use tracing::warn;

use crate::ca::TrustBundle;
use crate::cert::{spiffe_ids_of, PROVIDER_SLOTS};
use crate::manager::CertSnapshot;
use crate::spiffe::Identity;

/// The one application protocol the mesh speaks over TLS (HTTP/2, for HBONE).
pub const ALPN_H2: &[u8] = b"h2";

/// Errors building TLS configurations.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A crypto provider name is not known.
    #[error("unknown crypto provider {name:?}; expected \"aws-lc-rs\" or \"ring\"")]
    UnknownCryptoProvider {
        /// The name given.
        name: String,
    },
    /// rustls refused the configuration.
    #[error("building a TLS 1.3 configuration with the {provider} crypto provider: {source}")]
    Config {
        /// The crypto provider.
        provider: CryptoProvider,
        /// The cause.
        source: rustls::Error,
    },
}

/// The rustls crypto provider to build configurations with. Both are compiled in; the choice
/// is explicit and never depends on a process-wide default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CryptoProvider {
    /// AWS-LC (`aws-lc-rs`).
    #[default]
    AwsLcRs,
    /// *ring*.
    Ring,
}

impl CryptoProvider {
    /// Every provider.
    pub const ALL: [Self; PROVIDER_SLOTS] = [Self::AwsLcRs, Self::Ring];

    /// The provider's name as accepted by [`FromStr`]: `aws-lc-rs` or `ring`.
    pub fn name(self) -> &'static str {
        match self {
            Self::AwsLcRs => "aws-lc-rs",
            Self::Ring => "ring",
        }
    }

    /// The rustls provider with its default cipher suites, key exchange groups and algorithms.
    pub fn build(self) -> rustls::crypto::CryptoProvider {
        match self {
            Self::AwsLcRs => rustls::crypto::aws_lc_rs::default_provider(),
            Self::Ring => rustls::crypto::ring::default_provider(),
        }
    }

    /// Index of the provider's signing-key cache in a [`crate::WorkloadCert`].
    fn slot(self) -> usize {
        match self {
            Self::AwsLcRs => 0,
            Self::Ring => 1,
        }
    }
}

impl fmt::Display for CryptoProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CryptoProvider {
    type Err = TlsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| TlsError::UnknownCryptoProvider { name: s.to_owned() })
    }
}

/// The server side of a mesh connection, as `own`.
///
/// Presents `own`'s current certificate from `certs` (read at each handshake, so rotation
/// applies to new handshakes) and requires a client certificate that chains to the current
/// trust bundle, is valid now, allows client authentication and names exactly one SPIFFE id in
/// `own`'s trust domain. Use [`peer_identity`] to learn which.
pub fn server_config(
    provider: CryptoProvider,
    certs: watch::Receiver<Arc<CertSnapshot>>,
    own: Identity,
) -> Result<Arc<ServerConfig>, TlsError> {
    let rustls_provider = Arc::new(provider.build());
    let verifier = Arc::new(SpiffeClientVerifier {
        peers: PeerVerifier::new(&rustls_provider, certs.clone()),
        trust_domain: own.trust_domain().to_owned(),
    });
    let resolver = SnapshotCertResolver::new(provider, &rustls_provider, certs, own);
    let config = ServerConfig::builder_with_provider(rustls_provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Config { provider, source })?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    Ok(Arc::new(server_without_resumption(config, ALPN_H2)))
}

/// The client side of a mesh connection from `own` to `expected_server`.
///
/// Presents `own`'s current certificate from `certs`, sends no SNI, and accepts only a server
/// certificate that chains to the current trust bundle, is valid now, allows server
/// authentication and has `expected_server` among its URI SANs.
pub fn client_config(
    provider: CryptoProvider,
    certs: watch::Receiver<Arc<CertSnapshot>>,
    own: Identity,
    expected_server: Identity,
) -> Result<Arc<ClientConfig>, TlsError> {
    let rustls_provider = Arc::new(provider.build());
    let verifier = Arc::new(SpiffeServerVerifier {
        peers: PeerVerifier::new(&rustls_provider, certs.clone()),
        expected: expected_server,
    });
    let resolver = SnapshotCertResolver::new(provider, &rustls_provider, certs, own);
    let config = ClientConfig::builder_with_provider(rustls_provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Config { provider, source })?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(resolver);
    Ok(Arc::new(client_without_resumption(config, ALPN_H2)))
}

/// The application protocol of the mesh's HTTPS control connections (the waypoint
/// controller's view): HTTP/1.1, as the Kubernetes API's clients speak it.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// The server side of an HTTPS control connection, as `own`: presents `own`'s current
/// certificate from `certs`, asks for no client certificate (the client proves itself with a
/// token), ALPN `http/1.1`.
pub fn https_server_config(
    provider: CryptoProvider,
    certs: watch::Receiver<Arc<CertSnapshot>>,
    own: Identity,
) -> Result<Arc<ServerConfig>, TlsError> {
    let rustls_provider = Arc::new(provider.build());
    let resolver = SnapshotCertResolver::new(provider, &rustls_provider, certs, own);
    let config = ServerConfig::builder_with_provider(rustls_provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Config { provider, source })?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    Ok(Arc::new(server_without_resumption(config, ALPN_HTTP11)))
}

/// The client side of an HTTPS control connection: no client certificate (the client sends a
/// token), ALPN `http/1.1`, and only a server certificate that chains to `bundle` (the mesh's
/// root, read from a file: the client may have no certificate yet), is valid now, allows server
/// authentication and has `expected_server` among its URI SANs.
pub fn https_client_config(
    provider: CryptoProvider,
    bundle: TrustBundle,
    expected_server: Identity,
) -> Result<ClientConfig, TlsError> {
    let rustls_provider = Arc::new(provider.build());
    // A snapshot that never changes: the bundle is the file's, and no certificate is presented.
    let (_, roots) = watch::channel(Arc::new(CertSnapshot::empty(bundle)));
    let verifier = Arc::new(SpiffeServerVerifier {
        peers: PeerVerifier::new(&rustls_provider, roots),
        expected: expected_server,
    });
    let config = ClientConfig::builder_with_provider(rustls_provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Config { provider, source })?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(client_without_resumption(config, ALPN_HTTP11))
}

/// A server configuration speaking only `alpn`, with neither session storage nor tickets: every
/// connection is a full handshake, checked against the certificates of its time.
fn server_without_resumption(mut config: ServerConfig, alpn: &[u8]) -> ServerConfig {
    config.alpn_protocols = vec![alpn.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config
}

/// A client configuration speaking only `alpn`, sending no SNI (peers are named by SPIFFE id,
/// not by DNS name) and never resuming a session.
fn client_without_resumption(mut config: ClientConfig, alpn: &[u8]) -> ClientConfig {
    config.alpn_protocols = vec![alpn.to_vec()];
    config.enable_sni = false;
    config.resumption = Resumption::disabled();
    config
}

/// The SPIFFE id of the peer's end-entity certificate (its first, for a certificate naming
/// several), once the handshake has completed.
pub fn peer_identity(conn: &CommonState) -> Option<Identity> {
    let leaf = conn.peer_certificates()?.first()?;
    spiffe_ids_of(leaf).ok()?.into_iter().next()
}

/// Verifies `end_entity` (with `intermediates`) against `bundle` at `now` for `usage`, mapping
/// webpki's errors to the specific rustls certificate errors.
pub(crate) fn verify_chain(
    bundle: &TrustBundle,
    algorithms: &[&dyn SignatureVerificationAlgorithm],
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<(), rustls::Error> {
    let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
    let anchors = bundle.trust_anchors();
    cert.verify_for_usage(algorithms, &anchors, intermediates, now, usage, None, None)
        .map(|_| ())
        .map_err(pki_error)
}

fn pki_error(error: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let error = match error {
        E::BadDer | E::BadDerTime | E::TrailingData(_) => CertificateError::BadEncoding,
        E::CertNotValidYet { time, not_before } => {
            CertificateError::NotValidYetContext { time, not_before }
        }
        E::CertExpired { time, not_after } => CertificateError::ExpiredContext { time, not_after },
        E::InvalidCertValidity => CertificateError::Expired,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        E::CertRevoked => CertificateError::Revoked,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(error)
}

/// Presents `own`'s certificate from the latest snapshot.
#[derive(Debug)]
struct SnapshotCertResolver {
    certs: watch::Receiver<Arc<CertSnapshot>>,
    own: Identity,
    provider: CryptoProvider,
    rustls_provider: Arc<rustls::crypto::CryptoProvider>,
}

impl SnapshotCertResolver {
    /// A resolver presenting `own`'s certificate from `certs`, signing with `rustls_provider`
    /// (built from `provider`).
    fn new(
        provider: CryptoProvider,
        rustls_provider: &Arc<rustls::crypto::CryptoProvider>,
        certs: watch::Receiver<Arc<CertSnapshot>>,
        own: Identity,
    ) -> Arc<Self> {
        Arc::new(Self {
            certs,
            own,
            provider,
            rustls_provider: Arc::clone(rustls_provider),
        })
    }

    fn current(&self) -> Option<Arc<CertifiedKey>> {
        let cert = self.certs.borrow().certs.get(&self.own).cloned();
        let Some(cert) = cert else {
            warn!(identity = %self.own, "no certificate to present yet; refusing the handshake");
            return None;
        };
        let slot = cert.certified_key_slot(self.provider.slot());
        if let Some(key) = slot.get() {
            return Some(Arc::clone(key));
        }
        match self
            .rustls_provider
            .key_provider
            .load_private_key(cert.key().clone_key())
        {
            Ok(signing_key) => Some(Arc::clone(slot.get_or_init(|| {
                Arc::new(CertifiedKey::new(cert.chain().to_vec(), signing_key))
            }))),
            Err(error) => {
                warn!(
                    identity = %self.own,
                    provider = %self.provider,
                    %error,
                    "the crypto provider cannot use the workload key"
                );
                None
            }
        }
    }
}

impl ResolvesServerCert for SnapshotCertResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for SnapshotCertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    /// Always true: a certificate may appear between the start of a handshake and the
    /// server's request for it; without one, `resolve` declines and rustls sends none.
    fn has_certs(&self) -> bool {
        true
    }
}

/// Chain and signature checks shared by both directions.
#[derive(Debug)]
struct PeerVerifier {
    certs: watch::Receiver<Arc<CertSnapshot>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PeerVerifier {
    fn new(
        provider: &rustls::crypto::CryptoProvider,
        certs: watch::Receiver<Arc<CertSnapshot>>,
    ) -> Self {
        Self {
            certs,
            algorithms: provider.signature_verification_algorithms,
        }
    }

    /// Verifies the chain against the latest bundle and returns the leaf's SPIFFE ids.
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<Vec<Identity>, rustls::Error> {
        let bundle = Arc::clone(&self.certs.borrow().bundle);
        verify_chain(
            &bundle,
            self.algorithms.all,
            end_entity,
            intermediates,
            now,
            usage,
        )?;
        spiffe_ids_of(end_entity).map_err(|error| {
            warn!(%error, "refusing a peer certificate with an invalid SPIFFE id");
            CertificateError::ApplicationVerificationFailure.into()
        })
    }

    fn tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }
}

/// Server side: clients must present one SPIFFE id of our trust domain.
#[derive(Debug)]
struct SpiffeClientVerifier {
    peers: PeerVerifier,
    trust_domain: String,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ids = self.peers.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        match ids.as_slice() {
            [id] if id.trust_domain() == self.trust_domain => Ok(ClientCertVerified::assertion()),
            [id] => {
                warn!(
                    client = %id,
                    trust_domain = %self.trust_domain,
                    "refusing a client of another trust domain"
                );
                Err(CertificateError::ApplicationVerificationFailure.into())
            }
            _ => {
                warn!(
                    presented = ?ids,
                    "refusing a client certificate that does not name exactly one SPIFFE id"
                );
                Err(CertificateError::ApplicationVerificationFailure.into())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.peers.tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.peers.tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.peers.algorithms.supported_schemes()
    }
}

/// Client side: the server must be exactly the identity we mean to reach.
#[derive(Debug)]
struct SpiffeServerVerifier {
    peers: PeerVerifier,
    expected: Identity,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ids = self.peers.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        if ids.contains(&self.expected) {
            Ok(ServerCertVerified::assertion())
        } else {
            warn!(
                expected = %self.expected,
                presented = ?ids,
                "refusing a server that is not the expected identity"
            );
            Err(CertificateError::NotValidForName.into())
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.peers.tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.peers.tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.peers.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests;
