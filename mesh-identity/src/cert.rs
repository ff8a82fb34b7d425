//! The agent's side of certificate issuance: workload keys and CSRs, the certificates obtained
//! for them, and helpers that read SPIFFE ids and validity out of certificates.

use std::fmt;
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use rustls::crypto::{GetRandomFailed, SecureRandom};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::X509Error;

use crate::spiffe::{Identity, IdentityError};

/// Problems with workload keys, CSRs and certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// Generating a key pair failed.
    #[error("generating an ECDSA P-256 key pair: {source}")]
    KeyGeneration {
        /// The cause.
        source: rcgen::Error,
    },
    /// Building the CSR of an identity failed.
    #[error("building the certificate signing request of {identity}: {source}")]
    Csr {
        /// The identity the CSR was for.
        identity: Identity,
        /// The cause.
        source: rcgen::Error,
    },
    /// A certificate could not be parsed.
    #[error("parsing a certificate: {source}")]
    Parse {
        /// The cause.
        source: X509Error,
    },
    /// A certificate's validity dates are not representable.
    #[error("the certificate's {field} ({unix_seconds} s after the epoch) is out of range")]
    ValidityOutOfRange {
        /// `notBefore` or `notAfter`.
        field: &'static str,
        /// The date in seconds since the Unix epoch.
        unix_seconds: i64,
    },
    /// A certificate ends before it begins.
    #[error("the certificate of {identity} ends before it begins")]
    InvertedValidity {
        /// The identity the certificate is for.
        identity: Identity,
    },
    /// A certificate has a `spiffe://` URI SAN that is not a workload identity.
    #[error("the certificate names {uri:?}, which is not a workload identity: {source}")]
    InvalidSpiffeId {
        /// The URI SAN.
        uri: String,
        /// Why it is not an identity.
        source: IdentityError,
    },
    /// An issued chain is empty.
    #[error("the certificate chain issued for {identity} is empty")]
    EmptyChain {
        /// The identity the chain was for.
        identity: Identity,
    },
    /// The leaf certificate does not name exactly the identity it was issued for.
    #[error("the certificate issued for {expected} names {presented:?} instead")]
    IdentityMismatch {
        /// The identity the certificate was requested for.
        expected: Identity,
        /// The SPIFFE ids in the certificate.
        presented: Vec<Identity>,
    },
    /// The leaf certificate's public key is not the workload key's.
    #[error(
        "the certificate issued for {identity} does not carry the public key of its workload key"
    )]
    KeyMismatch {
        /// The identity the certificate was issued for.
        identity: Identity,
    },
}

/// An ECDSA P-256 key pair of a workload, generated on the agent. Its private half never leaves
/// the agent: the certificate authority only sees CSRs.
pub struct WorkloadKey {
    key: KeyPair,
}

impl WorkloadKey {
    /// Generates a fresh ECDSA P-256 key pair.
    pub fn generate() -> Result<Self, CertError> {
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map(|key| Self { key })
            .map_err(|source| CertError::KeyGeneration { source })
    }

    /// A PKCS #10 certificate signing request (DER) for `identity`, signed by this key, whose
    /// only subject alternative name is the identity's SPIFFE id and whose subject is empty.
    pub fn csr(&self, identity: &Identity) -> Result<Vec<u8>, CertError> {
        let csr_error = |source| CertError::Csr {
            identity: identity.clone(),
            source,
        };
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            identity.to_string().try_into().map_err(csr_error)?,
        )];
        let csr = params.serialize_request(&self.key).map_err(csr_error)?;
        Ok(csr.der().to_vec())
    }

    /// The raw public key (for ECDSA, the uncompressed curve point).
    pub fn public_key_raw(&self) -> &[u8] {
        self.key.public_key_raw()
    }

    /// The private key in PKCS #8 DER.
    pub fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }

    /// The key pair, for the CA to certify its public key.
    pub(crate) fn key_pair(&self) -> &KeyPair {
        &self.key
    }
}

impl fmt::Debug for WorkloadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadKey")
            .field("algorithm", &"ECDSA P-256")
            .finish_non_exhaustive()
    }
}

/// Number of per-provider signing key caches in a [`WorkloadCert`] (see `tls::CryptoProvider`).
pub(crate) const PROVIDER_SLOTS: usize = 2;

/// A workload's certificate chain (leaf first) and private key, as held by the agent.
///
/// Immutable: rotation creates a new `WorkloadCert`, so anything holding an `Arc` to this one
/// (an established TLS session) is unaffected.
pub struct WorkloadCert {
    identity: Identity,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    not_before: SystemTime,
    not_after: SystemTime,
    serial: Vec<u8>,
    /// rustls signing keys, built on first use per crypto provider.
    certified_keys: [OnceLock<Arc<CertifiedKey>>; PROVIDER_SLOTS],
}

impl WorkloadCert {
    /// Assembles the certificate of `identity` from an issued chain (leaf first) and the key whose
    /// CSR was signed. Checks that the leaf names exactly `identity` and carries `key`'s public key.
    pub fn new(
        identity: Identity,
        chain: Vec<CertificateDer<'static>>,
        key: &WorkloadKey,
    ) -> Result<Self, CertError> {
        let Some(leaf) = chain.first() else {
            return Err(CertError::EmptyChain { identity });
        };
        let parsed = parse_cert(leaf)?;
        if parsed.spiffe_ids.len() != 1 || parsed.spiffe_ids[0] != identity {
            return Err(CertError::IdentityMismatch {
                expected: identity,
                presented: parsed.spiffe_ids,
            });
        }
        if parsed.public_key != key.public_key_raw() {
            return Err(CertError::KeyMismatch { identity });
        }
        if parsed.not_after < parsed.not_before {
            return Err(CertError::InvertedValidity { identity });
        }
        Ok(Self {
            identity,
            chain,
            key: Arc::new(key.private_key_der()),
            not_before: parsed.not_before,
            not_after: parsed.not_after,
            serial: parsed.serial,
            certified_keys: Default::default(),
        })
    }

    /// The identity the certificate is for.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The chain, leaf first (never empty).
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// The private key of the leaf certificate.
    pub fn key(&self) -> &Arc<PrivateKeyDer<'static>> {
        &self.key
    }

    /// Start of the leaf's validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of the leaf's validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// `not_after - not_before`.
    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or_default()
    }

    /// When the certificate should be replaced: half way through its lifetime.
    pub fn rotate_at(&self) -> SystemTime {
        self.not_before + self.lifetime() / 2
    }

    /// Whether `now` lies within the validity period.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now <= self.not_after
    }

    /// The leaf's serial number, in hex (for logs).
    pub fn serial_hex(&self) -> String {
        hex(&self.serial)
    }

    /// The cache slot for the rustls signing key of one crypto provider.
    pub(crate) fn certified_key_slot(&self, slot: usize) -> &OnceLock<Arc<CertifiedKey>> {
        &self.certified_keys[slot]
    }
}

impl fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity)
            .field("serial", &self.serial_hex())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// The SPIFFE ids among the URI subject alternative names of a certificate (DER). Other URIs
/// are skipped; a `spiffe://` URI that is not a workload identity is an error.
pub fn spiffe_ids_of(cert_der: &[u8]) -> Result<Vec<Identity>, CertError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).map_err(parse_error)?;
    spiffe_ids(&cert)
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// What the crate needs to know about a certificate.
#[derive(Debug)]
pub(crate) struct ParsedCert {
    pub(crate) not_before: SystemTime,
    pub(crate) not_after: SystemTime,
    pub(crate) spiffe_ids: Vec<Identity>,
    /// The raw subject public key (the BIT STRING's content).
    pub(crate) public_key: Vec<u8>,
    pub(crate) serial: Vec<u8>,
    /// The first organization (O) of the subject, if any.
    pub(crate) organization: Option<String>,
    pub(crate) is_ca: bool,
}

pub(crate) fn parse_cert(cert_der: &[u8]) -> Result<ParsedCert, CertError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).map_err(parse_error)?;
    let validity = cert.validity();
    let organization = cert
        .subject()
        .iter_organization()
        .next()
        .and_then(|o| o.as_str().ok())
        .map(str::to_owned);
    Ok(ParsedCert {
        not_before: system_time("notBefore", validity.not_before.timestamp())?,
        not_after: system_time("notAfter", validity.not_after.timestamp())?,
        spiffe_ids: spiffe_ids(&cert)?,
        public_key: cert.public_key().subject_public_key.data.to_vec(),
        serial: cert.raw_serial().to_vec(),
        organization,
        is_ca: cert.is_ca(),
    })
}

fn spiffe_ids(
    cert: &x509_parser::certificate::X509Certificate<'_>,
) -> Result<Vec<Identity>, CertError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|source| CertError::Parse { source })?;
    let Some(san) = san else {
        return Ok(Vec::new());
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(*uri),
            _ => None,
        })
        .map(|uri| {
            Identity::parse(uri).map_err(|source| CertError::InvalidSpiffeId {
                uri: uri.to_owned(),
                source,
            })
        })
        .collect()
}

fn parse_error(error: x509_parser::nom::Err<X509Error>) -> CertError {
    let source = match error {
        x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e) => e,
        x509_parser::nom::Err::Incomplete(_) => X509Error::InvalidCertificate,
    };
    CertError::Parse { source }
}

fn system_time(field: &'static str, unix_seconds: i64) -> Result<SystemTime, CertError> {
    u64::try_from(unix_seconds)
        .ok()
        .and_then(|s| UNIX_EPOCH.checked_add(Duration::from_secs(s)))
        .ok_or(CertError::ValidityOutOfRange {
            field,
            unix_seconds,
        })
}

/// `time` representation of a `SystemTime`, or `None` when it is out of `time`'s range.
pub(crate) fn offset_date_time(t: SystemTime) -> Option<OffsetDateTime> {
    let seconds = match t.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).ok()?,
        Err(before) => i64::try_from(before.duration().as_secs())
            .ok()?
            .checked_neg()?,
    };
    OffsetDateTime::from_unix_timestamp(seconds).ok()
}

static RANDOM: LazyLock<&'static dyn SecureRandom> =
    LazyLock::new(|| rustls::crypto::aws_lc_rs::default_provider().secure_random);

/// Fills `buf` from the system's cryptographically secure random number generator.
pub(crate) fn fill_random(buf: &mut [u8]) -> Result<(), GetRandomFailed> {
    RANDOM.fill(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "default", sa).unwrap()
    }

    #[test]
    fn csr_carries_exactly_the_identity_and_a_valid_signature() {
        let key = WorkloadKey::generate().unwrap();
        let csr = key.csr(&id("web")).unwrap();
        let parsed =
            rcgen::CertificateSigningRequestParams::from_der(&csr.as_slice().into()).unwrap();
        assert_eq!(parsed.params.subject_alt_names.len(), 1);
        match &parsed.params.subject_alt_names[0] {
            SanType::URI(uri) => {
                assert_eq!(uri.as_str(), "spiffe://cluster.local/ns/default/sa/web");
            }
            other => panic!("unexpected SAN {other:?}"),
        }
        assert_eq!(
            rcgen::PublicKeyData::der_bytes(&parsed.public_key),
            key.public_key_raw()
        );
    }

    #[test]
    fn two_generated_keys_differ_and_debug_hides_the_key() {
        let a = WorkloadKey::generate().unwrap();
        let b = WorkloadKey::generate().unwrap();
        assert_ne!(a.public_key_raw(), b.public_key_raw());
        let debug = format!("{a:?}");
        assert!(!debug.contains("PrivateKey"), "{debug}");
    }

    /// A self-signed certificate with the given URI SANs, signed by `key`.
    fn self_signed(
        key: &WorkloadKey,
        uris: &[&str],
        not_before: i64,
        not_after: i64,
    ) -> CertificateDer<'static> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        params.not_before = OffsetDateTime::from_unix_timestamp(not_before).unwrap();
        params.not_after = OffsetDateTime::from_unix_timestamp(not_after).unwrap();
        params.self_signed(key.key_pair()).unwrap().der().clone()
    }

    #[test]
    fn spiffe_ids_of_reads_uri_sans_and_skips_other_uris() {
        let key = WorkloadKey::generate().unwrap();
        let cert = self_signed(
            &key,
            &[
                "https://example.org/x",
                "spiffe://cluster.local/ns/default/sa/web",
            ],
            1_700_000_000,
            1_700_086_400,
        );
        assert_eq!(spiffe_ids_of(&cert).unwrap(), vec![id("web")]);
        let bad = self_signed(
            &key,
            &["spiffe://cluster.local/web"],
            1_700_000_000,
            1_700_086_400,
        );
        assert!(matches!(
            spiffe_ids_of(&bad),
            Err(CertError::InvalidSpiffeId { uri, .. }) if uri == "spiffe://cluster.local/web"
        ));
        assert!(matches!(
            spiffe_ids_of(b"not a certificate"),
            Err(CertError::Parse { .. })
        ));
    }

    #[test]
    fn workload_cert_checks_identity_and_key_and_computes_rotation() {
        let key = WorkloadKey::generate().unwrap();
        let cert = self_signed(
            &key,
            &["spiffe://cluster.local/ns/default/sa/web"],
            1_700_000_000,
            1_700_000_100,
        );
        let wc = WorkloadCert::new(id("web"), vec![cert.clone()], &key).unwrap();
        assert_eq!(
            wc.not_before(),
            UNIX_EPOCH + Duration::from_secs(1_700_000_000)
        );
        assert_eq!(
            wc.not_after(),
            UNIX_EPOCH + Duration::from_secs(1_700_000_100)
        );
        assert_eq!(wc.lifetime(), Duration::from_secs(100));
        assert_eq!(
            wc.rotate_at(),
            UNIX_EPOCH + Duration::from_secs(1_700_000_050)
        );
        assert!(wc.is_valid_at(UNIX_EPOCH + Duration::from_secs(1_700_000_001)));
        assert!(!wc.is_valid_at(UNIX_EPOCH + Duration::from_secs(1_700_000_101)));
        assert_eq!(wc.leaf(), &cert);

        assert!(matches!(
            WorkloadCert::new(id("other"), vec![cert.clone()], &key),
            Err(CertError::IdentityMismatch { presented, .. }) if presented == vec![id("web")]
        ));
        let other_key = WorkloadKey::generate().unwrap();
        assert!(matches!(
            WorkloadCert::new(id("web"), vec![cert], &other_key),
            Err(CertError::KeyMismatch { .. })
        ));
        assert!(matches!(
            WorkloadCert::new(id("web"), Vec::new(), &key),
            Err(CertError::EmptyChain { .. })
        ));
        let two = self_signed(
            &key,
            &[
                "spiffe://cluster.local/ns/default/sa/web",
                "spiffe://cluster.local/ns/default/sa/db",
            ],
            1_700_000_000,
            1_700_000_100,
        );
        assert!(matches!(
            WorkloadCert::new(id("web"), vec![two], &key),
            Err(CertError::IdentityMismatch { .. })
        ));
    }

    #[test]
    fn offset_date_time_converts_both_sides_of_the_epoch() {
        let t = UNIX_EPOCH + Duration::from_secs(86_400);
        assert_eq!(offset_date_time(t).unwrap().unix_timestamp(), 86_400);
        let before = UNIX_EPOCH - Duration::from_secs(10);
        assert_eq!(offset_date_time(before).unwrap().unix_timestamp(), -10);
    }
}
