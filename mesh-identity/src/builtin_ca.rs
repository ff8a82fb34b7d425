//! The built-in certificate authority: a self-signed root kept in two files, signing workload
//! CSRs in process.

use std::fmt;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
    PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::CertificateDer;

use crate::ca::{
    verify_csr, CaError, CaFuture, CertificateAuthority, CsrRequest, IssuedChain, TrustBundle,
};
use crate::cert::{fill_random, hex, offset_date_time, parse_cert};
use crate::spiffe::validate_trust_domain;

/// File name of the root certificate (PEM) in the CA directory.
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
/// File name of the root private key (PKCS #8 PEM, mode 0600) in the CA directory.
pub const ROOT_KEY_FILE: &str = "root-key.pem";

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// Settings of the built-in CA.
#[derive(Debug, Clone)]
pub struct BuiltinCaOptions {
    /// Lifetime of workload certificates when the request names none (default 24 h).
    pub default_lifetime: Duration,
    /// Longest lifetime granted; longer requests are shortened to it (default 7 days).
    pub max_lifetime: Duration,
    /// How far `notBefore` is set in the past, to tolerate clock skew between nodes (default
    /// 5 minutes). Capped at a tenth of the certificate's lifetime so that very short-lived
    /// certificates (tests) still rotate after the half of their lifetime.
    pub clock_skew: Duration,
    /// Validity of a newly created root (default 10 years).
    pub root_validity: Duration,
}

impl Default for BuiltinCaOptions {
    fn default() -> Self {
        Self {
            default_lifetime: DAY,
            max_lifetime: 7 * DAY,
            clock_skew: Duration::from_secs(5 * 60),
            root_validity: 3650 * DAY,
        }
    }
}

/// A CA whose ECDSA P-256 root lives in `<dir>/root-cert.pem` and `<dir>/root-key.pem`.
///
/// Workload certificates carry only a URI SAN (the SPIFFE id), EKU serverAuth and clientAuth,
/// key usage digitalSignature, `CA:false`, a random serial and the root as issuer.
pub struct BuiltinCa {
    trust_domain: String,
    /// The root as rcgen's issuer (rebuilt from the file on load; only its name, key identifier
    /// and key usages are used).
    issuer: Certificate,
    key: KeyPair,
    root_not_after: SystemTime,
    bundle: TrustBundle,
    options: BuiltinCaOptions,
    cert_path: PathBuf,
    key_path: PathBuf,
}

impl BuiltinCa {
    /// Opens the CA in `dir`, creating the directory (mode 0700) and a new root on first use.
    ///
    /// A new root is self-signed, `CA:true`, keyCertSign, valid for `options.root_validity`, with
    /// subject `O=<trust_domain>, CN=mesh root CA <random>`; its key file is created with mode 0600. An existing root is
    /// checked: the key file must not be accessible to group or others, the key must match the
    /// certificate, and the certificate must be an unexpired CA for `trust_domain`.
    pub fn load_or_create(
        dir: &Path,
        trust_domain: &str,
        options: BuiltinCaOptions,
    ) -> Result<Self, CaError> {
        validate_trust_domain(trust_domain)
            .map_err(|source| CaError::InvalidTrustDomain { source })?;
        let cert_path = dir.join(ROOT_CERT_FILE);
        let key_path = dir.join(ROOT_KEY_FILE);
        let exists = |path: &Path| {
            path.try_exists().map_err(|source| CaError::ReadFile {
                path: path.to_owned(),
                source,
            })
        };
        match (exists(&cert_path)?, exists(&key_path)?) {
            (true, true) => Self::load(trust_domain, options, cert_path, key_path),
            (false, false) => Self::create(dir, trust_domain, options, cert_path, key_path),
            (true, false) => Err(CaError::IncompleteStore {
                present: cert_path,
                missing: key_path,
            }),
            (false, true) => Err(CaError::IncompleteStore {
                present: key_path,
                missing: cert_path,
            }),
        }
    }

    fn create(
        dir: &Path,
        trust_domain: &str,
        options: BuiltinCaOptions,
        cert_path: PathBuf,
        key_path: PathBuf,
    ) -> Result<Self, CaError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| CaError::CreateDir {
                path: dir.to_owned(),
                source,
            })?;
        let root_error = |source| CaError::UnusableRootCert {
            path: cert_path.clone(),
            source,
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|source| CaError::RootKeyGeneration { source })?;
        let now = SystemTime::now();
        let out_of_range = || CaError::RootValidityOutOfRange {
            validity: options.root_validity,
        };
        let not_before = now.checked_sub(options.clock_skew).unwrap_or(now);
        let not_after = now
            .checked_add(options.root_validity)
            .ok_or_else(out_of_range)?;
        let mut params = CertificateParams::default();
        let serial = random_serial()?;
        // O names the trust domain; the CN, unique per root, keeps the roots of two CAs for the
        // same trust domain apart, so a chain from the other one fails as UnknownIssuer.
        params.distinguished_name = organization(trust_domain);
        params.distinguished_name.push(
            DnType::CommonName,
            format!("mesh root CA {}", hex(&serial.to_bytes()[..8])),
        );
        params.serial_number = Some(serial);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = offset_date_time(not_before).ok_or_else(out_of_range)?;
        params.not_after = offset_date_time(not_after).ok_or_else(out_of_range)?;
        let root = params.self_signed(&key).map_err(root_error)?;

        write_new_file(&key_path, 0o600, key.serialize_pem().as_bytes())?;
        if let Err(e) = write_new_file(&cert_path, 0o644, root.pem().as_bytes()) {
            // Leave no half-created store behind: the next start would refuse it.
            let _ = std::fs::remove_file(&key_path);
            return Err(e);
        }
        tracing::info!(
            trust_domain,
            cert = %cert_path.display(),
            key = %key_path.display(),
            "created a new root certificate for the built-in CA"
        );
        let bundle = TrustBundle::new(vec![root.der().clone()])?;
        let root_not_after = parse_cert(root.der())
            .map_err(|source| CaError::InvalidRootCert {
                path: cert_path.clone(),
                source,
            })?
            .not_after;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            issuer: root,
            key,
            root_not_after,
            bundle,
            options,
            cert_path,
            key_path,
        })
    }

    fn load(
        trust_domain: &str,
        options: BuiltinCaOptions,
        cert_path: PathBuf,
        key_path: PathBuf,
    ) -> Result<Self, CaError> {
        let key_pem = read_private_file(&key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|source| CaError::InvalidRootKey {
            path: key_path.clone(),
            source,
        })?;
        let cert_pem = std::fs::read(&cert_path).map_err(|source| CaError::ReadFile {
            path: cert_path.clone(),
            source,
        })?;
        let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| CaError::ReadFile {
                path: cert_path.clone(),
                source,
            })?;
        let [root_der] = <[CertificateDer<'static>; 1]>::try_from(certs).map_err(|certs| {
            CaError::RootCertCount {
                path: cert_path.clone(),
                count: certs.len(),
            }
        })?;
        let parsed = parse_cert(&root_der).map_err(|source| CaError::InvalidRootCert {
            path: cert_path.clone(),
            source,
        })?;
        if parsed.public_key != key.public_key_raw() {
            return Err(CaError::KeyMismatch {
                cert_path,
                key_path,
            });
        }
        if !parsed.is_ca {
            return Err(CaError::RootNotCa { path: cert_path });
        }
        if parsed.organization.as_deref() != Some(trust_domain) {
            return Err(CaError::RootTrustDomainMismatch {
                path: cert_path,
                found: parsed.organization,
                expected: trust_domain.to_owned(),
            });
        }
        if parsed.not_after <= SystemTime::now() {
            return Err(CaError::RootExpired {
                path: cert_path,
                not_after: parsed.not_after,
            });
        }
        let unusable = |source| CaError::UnusableRootCert {
            path: cert_path.clone(),
            source,
        };
        let issuer = CertificateParams::from_ca_cert_der(&root_der)
            .map_err(unusable)?
            .self_signed(&key)
            .map_err(unusable)?;
        let bundle = TrustBundle::new(vec![root_der])?;
        tracing::info!(trust_domain, cert = %cert_path.display(), "loaded the built-in CA's root");
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            issuer,
            key,
            root_not_after: parsed.not_after,
            bundle,
            options,
            cert_path,
            key_path,
        })
    }

    /// Path of the root certificate file.
    pub fn root_cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// Path of the root key file.
    pub fn root_key_path(&self) -> &Path {
        &self.key_path
    }

    /// The options the CA was opened with.
    pub fn options(&self) -> &BuiltinCaOptions {
        &self.options
    }

    /// Signs `request` with the lifetime it asks for (or the default), at most
    /// `max_lifetime` and never past the root's own end of validity.
    pub fn issue(&self, request: &CsrRequest) -> Result<IssuedChain, CaError> {
        let lifetime = request
            .lifetime
            .unwrap_or(self.options.default_lifetime)
            .min(self.options.max_lifetime);
        if lifetime.is_zero() {
            return Err(CaError::ZeroLifetime {
                identity: request.identity.clone(),
            });
        }
        let now = SystemTime::now();
        let backdate = self.options.clock_skew.min(lifetime / 10);
        let not_after = now
            .checked_add(lifetime)
            .map_or(self.root_not_after, |end| end.min(self.root_not_after));
        let not_before = now.checked_sub(backdate).unwrap_or(now);
        self.issue_with_validity(request, not_before, not_after)
    }

    /// Signs `request` for exactly `not_before..not_after`, which may lie in the past (to make
    /// expired certificates in tests) and is not limited by `max_lifetime`. The CSR is checked
    /// as for [`CertificateAuthority::sign`].
    pub fn issue_with_validity(
        &self,
        request: &CsrRequest,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<IssuedChain, CaError> {
        let identity = &request.identity;
        let public_key = verify_csr(request, &self.trust_domain)?;
        let invalid = || CaError::InvalidValidity {
            identity: identity.clone(),
            not_before,
            not_after,
        };
        if not_after <= not_before {
            return Err(invalid());
        }
        let mut params = CertificateParams::default();
        params.not_before = offset_date_time(not_before).ok_or_else(invalid)?;
        params.not_after = offset_date_time(not_after).ok_or_else(invalid)?;
        params.serial_number = Some(random_serial()?);
        // A non-empty subject keeps the (non-critical) SAN extension RFC 5280-conformant.
        params.distinguished_name = organization(&self.trust_domain);
        params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into().map_err(
            |source| CaError::Signing {
                identity: identity.clone(),
                source,
            },
        )?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&public_key, &self.issuer, &self.key)
            .map_err(|source| CaError::Signing {
                identity: identity.clone(),
                source,
            })?;
        tracing::debug!(%identity, ?not_after, "built-in CA issued a workload certificate");
        Ok(IssuedChain {
            chain: vec![cert.der().clone()],
        })
    }
}

impl CertificateAuthority for BuiltinCa {
    fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    fn sign(&self, request: CsrRequest) -> CaFuture<'_, Result<IssuedChain, CaError>> {
        Box::pin(std::future::ready(self.issue(&request)))
    }

    fn trust_bundle(&self) -> TrustBundle {
        self.bundle.clone()
    }
}

impl fmt::Debug for BuiltinCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BuiltinCa")
            .field("trust_domain", &self.trust_domain)
            .field("cert_path", &self.cert_path)
            .field("root_not_after", &self.root_not_after)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

fn organization(trust_domain: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn
}

/// A positive 127-bit random serial number.
fn random_serial() -> Result<SerialNumber, CaError> {
    let mut bytes = [0_u8; 16];
    fill_random(&mut bytes).map_err(|_| CaError::Random)?;
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

/// Creates `path` (which must not exist) with `mode` and writes `contents` to it durably.
fn write_new_file(path: &Path, mode: u32, contents: &[u8]) -> Result<(), CaError> {
    let write_error = |source| CaError::WriteFile {
        path: path.to_owned(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(write_error)?;
    file.write_all(contents).map_err(write_error)?;
    file.sync_all().map_err(write_error)
}

/// Reads a file that must not be accessible to group or others (checked on the open file).
fn read_private_file(path: &Path) -> Result<String, CaError> {
    let read_error = |source| CaError::ReadFile {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read_error)?;
    let mode = file.metadata().map_err(read_error)?.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(CaError::KeyFileTooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    let mut contents = String::new();
    file.read_to_string(&mut contents).map_err(read_error)?;
    Ok(contents)
}

#[cfg(test)]
mod tests;
