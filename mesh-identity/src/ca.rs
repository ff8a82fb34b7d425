//! The certificate authority interface: what the agent sends (a CSR for one identity), what it
//! gets back (a certificate chain, never a key) and the roots it trusts.

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateSigningRequestParams, PublicKey, SanType};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, TrustAnchor};

use crate::cert::CertError;
use crate::spiffe::{Identity, IdentityError};

/// Errors of certificate authorities: refused requests, signing failures and, for the built-in
/// CA, problems with its files.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The CSR could not be parsed, or its signature does not verify.
    #[error("the certificate signing request for {identity} is malformed or its signature does not verify: {source}")]
    InvalidCsr {
        /// The identity the CSR was sent for.
        identity: Identity,
        /// The cause.
        source: rcgen::Error,
    },
    /// The CSR's subject alternative names are not exactly the requested identity.
    #[error(
        "the certificate signing request for {identity} names {presented:?}; it must name exactly \
         that identity as its only subject alternative name"
    )]
    CsrNamesMismatch {
        /// The identity the CSR was sent for.
        identity: Identity,
        /// The subject alternative names in the CSR.
        presented: Vec<String>,
    },
    /// The identity belongs to another trust domain than the CA's.
    #[error("{identity} is not in trust domain {ca_trust_domain}, the only one this CA signs for")]
    WrongTrustDomain {
        /// The identity requested.
        identity: Identity,
        /// The CA's trust domain.
        ca_trust_domain: String,
    },
    /// A zero lifetime was requested.
    #[error("a zero certificate lifetime was requested for {identity}")]
    ZeroLifetime {
        /// The identity requested.
        identity: Identity,
    },
    /// An explicit validity window is empty, inverted or out of range.
    #[error("invalid validity window for {identity}: {not_before:?} to {not_after:?}")]
    InvalidValidity {
        /// The identity requested.
        identity: Identity,
        /// Requested start.
        not_before: SystemTime,
        /// Requested end.
        not_after: SystemTime,
    },
    /// Building or signing a certificate failed.
    #[error("signing the certificate of {identity}: {source}")]
    Signing {
        /// The identity requested.
        identity: Identity,
        /// The cause.
        source: rcgen::Error,
    },
    /// The system random number generator failed (serial numbers).
    #[error("the system random number generator failed")]
    Random,
    /// A trust bundle entry is not a usable trust anchor.
    #[error("trust bundle entry {index} is not a usable root certificate: {source}")]
    InvalidTrustAnchor {
        /// Position of the certificate in the bundle.
        index: usize,
        /// The cause.
        source: webpki::Error,
    },
    /// The CA's trust domain is not valid.
    #[error("invalid trust domain for the CA: {source}")]
    InvalidTrustDomain {
        /// The cause.
        source: IdentityError,
    },
    /// Creating the CA directory failed.
    #[error("creating CA directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Reading a CA file failed.
    #[error("reading {path}: {source}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Writing a new root file under its temporary name failed (a full disk, for instance); the
    /// temporary file has been removed and nothing was published.
    #[error("writing the new {path} (through temporary file {temp}, now removed): {source}")]
    WriteTempFile {
        /// The file being created.
        path: PathBuf,
        /// Its temporary name in the same directory.
        temp: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Linking a complete temporary file to its final name failed.
    #[error("publishing {temp} as {path}: {source}")]
    PublishFile {
        /// The file being created.
        path: PathBuf,
        /// Its temporary name in the same directory.
        temp: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Flushing the CA directory after publishing a new root failed; the root's files are in
    /// place but may not survive a crash.
    #[error("flushing directory {path} to disk after publishing a new root: {source}")]
    SyncDir {
        /// The CA directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A root file is empty, as an interrupted write leaves it.
    #[error(
        "{path} is empty (0 bytes), as an interrupted write (a full disk?) leaves it; restore it \
         from a backup, or remove it and the other root file to create a new root"
    )]
    EmptyFile {
        /// The file.
        path: PathBuf,
    },
    /// A root file now holds another certificate or key than the one the CA loaded.
    #[error(
        "{path} no longer holds the root the CA loaded: it was replaced while the agent ran, so \
         nothing is signed; restore it, or restart the agents sharing the directory to use the \
         new root"
    )]
    RootFileReplaced {
        /// The file.
        path: PathBuf,
    },
    /// Only one of the root certificate and root key files exists.
    #[error("{present} exists but {missing} does not; restore it, or remove {present} to create a new root")]
    IncompleteStore {
        /// The file that exists.
        present: PathBuf,
        /// The file that is missing.
        missing: PathBuf,
    },
    /// The root key file is readable or writable by group or others.
    #[error("root key file {path} has mode {mode:04o}; it must not be accessible to group or others (chmod 600)")]
    KeyFileTooOpen {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The root key file does not hold a usable private key.
    #[error("root key file {path} does not hold a usable private key: {source}")]
    InvalidRootKey {
        /// The key file.
        path: PathBuf,
        /// The cause.
        source: rcgen::Error,
    },
    /// The root certificate file does not hold exactly one certificate.
    #[error("root certificate file {path} holds {count} certificates; expected exactly one")]
    RootCertCount {
        /// The certificate file.
        path: PathBuf,
        /// How many it holds.
        count: usize,
    },
    /// The root certificate cannot be parsed.
    #[error("root certificate file {path}: {source}")]
    InvalidRootCert {
        /// The certificate file.
        path: PathBuf,
        /// The cause.
        source: CertError,
    },
    /// The root certificate cannot be used to sign.
    #[error("root certificate file {path} cannot be used to issue certificates: {source}")]
    UnusableRootCert {
        /// The certificate file.
        path: PathBuf,
        /// The cause.
        source: rcgen::Error,
    },
    /// The root certificate is not a CA certificate.
    #[error("root certificate file {path} holds a certificate that is not a CA (basicConstraints CA:false or absent)")]
    RootNotCa {
        /// The certificate file.
        path: PathBuf,
    },
    /// The root key does not belong to the root certificate.
    #[error(
        "root key file {key_path} does not hold the key of the root certificate in {cert_path}"
    )]
    KeyMismatch {
        /// The certificate file.
        cert_path: PathBuf,
        /// The key file.
        key_path: PathBuf,
    },
    /// The root certificate was made for another trust domain.
    #[error("root certificate file {path} is for trust domain {found:?}, not {expected:?}")]
    RootTrustDomainMismatch {
        /// The certificate file.
        path: PathBuf,
        /// The organization (O) of its subject, if any.
        found: Option<String>,
        /// The trust domain the CA was opened for.
        expected: String,
    },
    /// Generating the key of a new root failed.
    #[error("generating the root key pair: {source}")]
    RootKeyGeneration {
        /// The cause.
        source: rcgen::Error,
    },
    /// The validity configured for a new root cannot be represented.
    #[error("a root validity of {validity:?} reaches beyond the dates a certificate can hold")]
    RootValidityOutOfRange {
        /// The configured validity.
        validity: Duration,
    },
    /// The root certificate has expired.
    #[error("root certificate file {path} expired at {not_after:?}; remove it and its key to create a new root")]
    RootExpired {
        /// The certificate file.
        path: PathBuf,
        /// Its end of validity.
        not_after: SystemTime,
    },
    /// The token a remote CA is called with cannot be read (a projected `ServiceAccount` token,
    /// re-read at every request since the kubelet rotates it).
    #[error("reading the CA token file {path}: {source}")]
    TokenFile {
        /// The token file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The token file is empty.
    #[error("the CA token file {path} is empty")]
    EmptyToken {
        /// The token file.
        path: PathBuf,
    },
    /// The token holds characters that a request header cannot carry.
    #[error("the CA token in {path} holds characters that a request header cannot carry")]
    UnusableToken {
        /// The token file.
        path: PathBuf,
    },
    /// A remote CA could not be reached (name resolution, connection, TLS, timeout).
    #[error("the CA at {address} is unreachable: {source}")]
    Unreachable {
        /// The CA's address (`https://host:port`).
        address: String,
        /// The cause.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A remote CA answered the request with an error.
    #[error("the CA at {address} refused the certificate of {identity}: {code}: {message}")]
    Refused {
        /// The CA's address.
        address: String,
        /// The identity requested.
        identity: Identity,
        /// The gRPC status code, by name (`Unauthenticated`, `Internal`, ...).
        code: String,
        /// The status message, as the CA wrote it.
        message: String,
    },
    /// A remote CA answered with a chain that is not a certificate of the identity requested
    /// issued under the trust bundle.
    #[error("the CA at {address} returned an unusable certificate for {identity}: {problem}")]
    BadResponse {
        /// The CA's address.
        address: String,
        /// The identity requested.
        identity: Identity,
        /// What is wrong with the answer.
        problem: Box<ResponseProblem>,
    },
    /// A serving certificate was asked for without any name.
    #[error("a serving certificate needs at least one DNS name")]
    NoServingNames,
    /// A serving certificate's name is not a DNS name.
    #[error("{name:?} cannot be a DNS name of a serving certificate: {source}")]
    InvalidServingName {
        /// The name.
        name: String,
        /// The cause.
        source: rustls::pki_types::InvalidDnsNameError,
    },
    /// A serving certificate's lifetime is zero or beyond the dates a certificate can hold.
    #[error("a serving certificate lifetime of {lifetime:?} is zero or out of range")]
    ServingLifetime {
        /// The lifetime asked for.
        lifetime: Duration,
    },
    /// Signing a serving certificate failed.
    #[error("signing the serving certificate for {names:?}: {source}")]
    ServingSigning {
        /// Its DNS names.
        names: Vec<String>,
        /// The cause.
        source: rcgen::Error,
    },
}

/// What is wrong with a remote CA's answer ([`CaError::BadResponse`]).
#[derive(Debug)]
pub enum ResponseProblem {
    /// The chain is empty.
    EmptyChain,
    /// An entry of the chain is not exactly one PEM certificate.
    NotOneCertificate {
        /// Position in the chain.
        index: usize,
        /// How many certificates it holds.
        count: usize,
    },
    /// The leaf certificate cannot be parsed.
    Unparsable {
        /// The cause.
        source: CertError,
    },
    /// The leaf does not name exactly the identity requested.
    IdentityMismatch {
        /// The SPIFFE ids it names.
        presented: Vec<Identity>,
    },
    /// The chain does not verify to the trust bundle.
    Untrusted {
        /// The cause.
        source: webpki::Error,
    },
}

impl fmt::Display for ResponseProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::EmptyChain => f.write_str("the certificate chain is empty"),
            Self::NotOneCertificate { index, count } => write!(
                f,
                "chain entry {index} holds {count} PEM certificates; expected exactly one"
            ),
            Self::Unparsable { source } => write!(f, "the leaf certificate: {source}"),
            Self::IdentityMismatch { presented } => {
                let names: Vec<&str> = presented.iter().map(Identity::as_str).collect();
                write!(
                    f,
                    "the leaf names {names:?} rather than exactly the identity requested"
                )
            }
            Self::Untrusted { source } => {
                write!(
                    f,
                    "the chain does not verify to the trust bundle: {source:?}"
                )
            }
        }
    }
}

/// A request to sign a workload certificate.
#[derive(Clone)]
pub struct CsrRequest {
    /// PKCS #10 CSR in DER, signed by the workload key.
    pub csr_der: Vec<u8>,
    /// The identity the certificate is wanted for; the CSR must name exactly this identity.
    pub identity: Identity,
    /// The lifetime wanted; `None` leaves it to the CA. CAs may shorten it.
    pub lifetime: Option<Duration>,
}

impl fmt::Debug for CsrRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CsrRequest")
            .field("identity", &self.identity)
            .field("lifetime", &self.lifetime)
            .field("csr_len", &self.csr_der.len())
            .finish()
    }
}

/// A certificate chain issued by a CA: leaf first, then any intermediates (roots are optional
/// and come from the [`TrustBundle`]).
#[derive(Debug, Clone)]
pub struct IssuedChain {
    /// The certificates, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
}

/// The root certificates (DER) peers' chains are verified against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
}

impl TrustBundle {
    /// A bundle of `roots`, each checked to be usable as a trust anchor.
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Result<Self, CaError> {
        for (index, root) in roots.iter().enumerate() {
            webpki::anchor_from_trusted_cert(root)
                .map_err(|source| CaError::InvalidTrustAnchor { index, source })?;
        }
        Ok(Self { roots })
    }

    /// The root certificates.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The roots as webpki trust anchors (entries that do not parse are left out; [`Self::new`]
    /// has already refused them).
    pub fn trust_anchors(&self) -> Vec<TrustAnchor<'_>> {
        self.roots
            .iter()
            .filter_map(|root| webpki::anchor_from_trusted_cert(root).ok())
            .collect()
    }

    /// This bundle followed by the roots of `other` (federation with another trust domain).
    #[must_use]
    pub fn merged(&self, other: &TrustBundle) -> TrustBundle {
        let mut roots = self.roots.clone();
        roots.extend(
            other
                .roots
                .iter()
                .filter(|r| !self.roots.contains(r))
                .cloned(),
        );
        TrustBundle { roots }
    }
}

/// A boxed, sendable future, as returned by [`CertificateAuthority`] methods.
pub type CaFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A certificate authority for workload certificates of one trust domain.
///
/// The CA never sees nor returns private keys: it signs CSRs. Implementations must refuse a CSR
/// unless [`verify_csr`] accepts it (the CSR's signature verifies, its only subject alternative
/// name is the requested identity, in the CA's trust domain). The built-in CA is
/// [`crate::BuiltinCa`]; external ones (istiod, SPIRE, cert-manager) implement the same trait.
pub trait CertificateAuthority: Send + Sync {
    /// The trust domain this CA issues identities of.
    fn trust_domain(&self) -> &str;

    /// Signs the CSR in `request`, returning the chain (leaf first).
    fn sign(&self, request: CsrRequest) -> CaFuture<'_, Result<IssuedChain, CaError>>;

    /// The roots that chains issued by this CA verify against.
    fn trust_bundle(&self) -> TrustBundle;
}

/// Checks a CSR before signing it: it parses, its signature verifies with the key it carries,
/// its only subject alternative name is the URI of `request.identity`, and that identity is in
/// `trust_domain`. Returns the CSR's public key, the one to certify.
pub fn verify_csr(request: &CsrRequest, trust_domain: &str) -> Result<PublicKey, CaError> {
    let identity = &request.identity;
    if identity.trust_domain() != trust_domain {
        return Err(CaError::WrongTrustDomain {
            identity: identity.clone(),
            ca_trust_domain: trust_domain.to_owned(),
        });
    }
    let der = CertificateSigningRequestDer::from(request.csr_der.as_slice());
    let csr =
        CertificateSigningRequestParams::from_der(&der).map_err(|source| CaError::InvalidCsr {
            identity: identity.clone(),
            source,
        })?;
    let names = &csr.params.subject_alt_names;
    let exact =
        matches!(names.as_slice(), [SanType::URI(uri)] if uri.as_str() == identity.as_str());
    if !exact {
        return Err(CaError::CsrNamesMismatch {
            identity: identity.clone(),
            presented: names.iter().map(describe_san).collect(),
        });
    }
    Ok(csr.public_key)
}

fn describe_san(san: &SanType) -> String {
    match san {
        SanType::URI(uri) => format!("URI:{}", uri.as_str()),
        SanType::DnsName(name) => format!("DNS:{}", name.as_str()),
        SanType::Rfc822Name(name) => format!("email:{}", name.as_str()),
        SanType::IpAddress(ip) => format!("IP:{ip}"),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests;
