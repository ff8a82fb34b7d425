//! The built-in certificate authority: a self-signed root kept in two files, signing workload
//! CSRs in process.

use std::fmt;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

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

/// How long an opener that finds the root key without its certificate waits for the agent that
/// is publishing the pair (the certificate follows the key within microseconds) before it
/// reports the store as incomplete.
const PUBLISH_WAIT: Duration = Duration::from_secs(2);
/// How often it looks again meanwhile.
const PUBLISH_POLL: Duration = Duration::from_millis(5);

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
    /// The root certificate as loaded, compared with the file before each signing.
    root_der: CertificateDer<'static>,
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
    /// subject `O=<trust_domain>, CN=mesh root CA <random>`; its key file has mode 0600. Both
    /// files are written under temporary names, flushed, then linked to their names (key first),
    /// so a root file is never seen half-written, and of several agents creating the root at
    /// once exactly one publishes it and the others load it. An existing root is checked: the
    /// files must not be empty, the key file must not be accessible to group or others, the key
    /// must match the certificate, and the certificate must be an unexpired CA for
    /// `trust_domain`. Existing files are never replaced.
    pub fn load_or_create(
        dir: &Path,
        trust_domain: &str,
        options: BuiltinCaOptions,
    ) -> Result<Self, CaError> {
        validate_trust_domain(trust_domain)
            .map_err(|source| CaError::InvalidTrustDomain { source })?;
        let cert_path = dir.join(ROOT_CERT_FILE);
        let key_path = dir.join(ROOT_KEY_FILE);
        let deadline = Instant::now() + PUBLISH_WAIT;
        loop {
            // The certificate is looked at first: it is published after the key, so once it is
            // seen the key is there too, unless the store is really incomplete.
            match (exists(&cert_path)?, exists(&key_path)?) {
                (true, true) => return Self::load(trust_domain, options, cert_path, key_path),
                (false, false) => create_root(dir, trust_domain, &options, &cert_path, &key_path)?,
                (false, true) => wait_for_cert(&key_path, &cert_path, deadline)?,
                (true, false) => {
                    return Err(CaError::IncompleteStore {
                        present: cert_path,
                        missing: key_path,
                    })
                }
            }
        }
    }

    fn load(
        trust_domain: &str,
        options: BuiltinCaOptions,
        cert_path: PathBuf,
        key_path: PathBuf,
    ) -> Result<Self, CaError> {
        let key = read_root_key(&key_path)?;
        let root_der = read_root_cert(&cert_path)?;
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
        let bundle = TrustBundle::new(vec![root_der.clone()])?;
        tracing::info!(trust_domain, cert = %cert_path.display(), "loaded the built-in CA's root");
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            issuer,
            key,
            root_der,
            root_not_after: parsed.not_after,
            bundle,
            options,
            cert_path,
            key_path,
        })
    }

    /// Checks that the root files still hold the root this CA loaded, with the key file still
    /// private, so that a root changed or exposed while the agent runs stops the signing.
    fn check_root_files(&self) -> Result<(), CaError> {
        let key = read_root_key(&self.key_path)?;
        if key.serialized_der() != self.key.serialized_der() {
            return Err(CaError::RootFileReplaced {
                path: self.key_path.clone(),
            });
        }
        let root_der = read_root_cert(&self.cert_path)?;
        if root_der != self.root_der {
            // Name what is wrong with it when it is not a certificate at all.
            parse_cert(&root_der).map_err(|source| CaError::InvalidRootCert {
                path: self.cert_path.clone(),
                source,
            })?;
            return Err(CaError::RootFileReplaced {
                path: self.cert_path.clone(),
            });
        }
        Ok(())
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
    ///
    /// Nothing is signed unless the root files still hold the loaded root and the key file is
    /// still not accessible to group or others (both are read again for every signing).
    pub fn issue_with_validity(
        &self,
        request: &CsrRequest,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<IssuedChain, CaError> {
        let identity = &request.identity;
        self.check_root_files()?;
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

/// Whether `path` exists (a broken symbolic link does not).
fn exists(path: &Path) -> Result<bool, CaError> {
    path.try_exists().map_err(|source| CaError::ReadFile {
        path: path.to_owned(),
        source,
    })
}

/// Creates a new root and publishes it in `dir`, unless another agent publishes its own first
/// (then the caller loads that one). Leaves no file behind when it fails.
fn create_root(
    dir: &Path,
    trust_domain: &str,
    options: &BuiltinCaOptions,
    cert_path: &Path,
    key_path: &Path,
) -> Result<(), CaError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CaError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
    let (key, root) = new_root(trust_domain, options, cert_path)?;
    let key_file = TempFile::write(key_path, 0o600, key.serialize_pem().as_bytes())?;
    let cert_file = TempFile::write(cert_path, 0o644, root.pem().as_bytes())?;
    // Linking the key decides: link() never replaces a file, so exactly one creator succeeds.
    if !key_file.publish()? {
        tracing::debug!(key = %key_path.display(), "another agent created the built-in CA's root first");
        return Ok(());
    }
    let published = match cert_file.publish() {
        Ok(true) => Ok(()),
        // A certificate without its key (no agent publishes one) appeared meanwhile.
        Ok(false) => Err(CaError::IncompleteStore {
            present: cert_path.to_owned(),
            missing: key_path.to_owned(),
        }),
        Err(e) => Err(e),
    };
    if let Err(e) = published {
        // Take back the key just published (nobody loads a key without its certificate), so
        // that the directory is as it was.
        let _ = std::fs::remove_file(key_path);
        return Err(e);
    }
    sync_dir(dir)?;
    tracing::info!(
        trust_domain,
        cert = %cert_path.display(),
        key = %key_path.display(),
        "created a new root certificate for the built-in CA"
    );
    Ok(())
}

/// A new self-signed root for `trust_domain` and its key.
fn new_root(
    trust_domain: &str,
    options: &BuiltinCaOptions,
    cert_path: &Path,
) -> Result<(KeyPair, Certificate), CaError> {
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
    let root = params
        .self_signed(&key)
        .map_err(|source| CaError::UnusableRootCert {
            path: cert_path.to_owned(),
            source,
        })?;
    Ok((key, root))
}

/// The key is there but its certificate is not: another agent is between its two links, or
/// the store is incomplete. A key no creator would publish (empty, unparsable, too open) is
/// reported at once; otherwise this waits a little, until `deadline`.
fn wait_for_cert(key_path: &Path, cert_path: &Path, deadline: Instant) -> Result<(), CaError> {
    match read_root_key(key_path) {
        Ok(_) => {}
        // Its creator took it back (its certificate could not be published): start over.
        Err(CaError::ReadFile { source, .. }) if source.kind() == ErrorKind::NotFound => {
            return Ok(())
        }
        Err(e) => return Err(e),
    }
    if Instant::now() >= deadline {
        return Err(CaError::IncompleteStore {
            present: key_path.to_owned(),
            missing: cert_path.to_owned(),
        });
    }
    std::thread::sleep(PUBLISH_POLL);
    Ok(())
}

/// Flushes `dir` itself, so that the names linked in it survive a crash.
fn sync_dir(dir: &Path) -> Result<(), CaError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| CaError::SyncDir {
            path: dir.to_owned(),
            source,
        })
}

/// The contents of a file to be created, written and flushed under a unique temporary name in
/// the same directory. The temporary name is removed on drop, whatever happened; once
/// [published](Self::publish), the final name keeps the contents.
struct TempFile {
    /// The name it is published under.
    path: PathBuf,
    /// The temporary name.
    temp: PathBuf,
}

impl TempFile {
    /// Writes `contents` to a new temporary file for `path`, with `mode`, and flushes it.
    fn write(path: &Path, mode: u32, contents: &[u8]) -> Result<Self, CaError> {
        let temp = temp_name(path)?;
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temp);
        let write_error = |source| CaError::WriteTempFile {
            path: path.to_owned(),
            temp: temp.clone(),
            source,
        };
        let mut file = file.map_err(write_error)?;
        // From here on the temporary file is ours: dropping `this` removes it.
        let this = Self {
            path: path.to_owned(),
            temp: temp.clone(),
        };
        file.write_all(contents)
            .and_then(|()| file.sync_all())
            .map_err(write_error)?;
        Ok(this)
    }

    /// Links the contents to their final name: `Ok(false)` when that name exists already (it
    /// is never replaced).
    fn publish(&self) -> Result<bool, CaError> {
        match std::fs::hard_link(&self.temp, &self.path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
            Err(source) => Err(CaError::PublishFile {
                path: self.path.clone(),
                temp: self.temp.clone(),
                source,
            }),
        }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.temp) {
            tracing::warn!(file = %self.temp.display(), error = %e, "could not remove a temporary file of the built-in CA");
        }
    }
}

/// `<dir>/.<name>.<pid>.<random>.tmp` for `<dir>/<name>`: unique to this attempt.
fn temp_name(path: &Path) -> Result<PathBuf, CaError> {
    let mut random = [0_u8; 8];
    fill_random(&mut random).map_err(|_| CaError::Random)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    Ok(path.with_file_name(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        hex(&random)
    )))
}

/// Reads and parses the root key file: private, not empty, a PKCS #8 key.
fn read_root_key(path: &Path) -> Result<KeyPair, CaError> {
    let pem = read_private_file(path)?;
    if pem.is_empty() {
        return Err(CaError::EmptyFile {
            path: path.to_owned(),
        });
    }
    KeyPair::from_pem(&pem).map_err(|source| CaError::InvalidRootKey {
        path: path.to_owned(),
        source,
    })
}

/// Reads the root certificate file: not empty, exactly one PEM certificate.
fn read_root_cert(path: &Path) -> Result<CertificateDer<'static>, CaError> {
    let read_error = |source| CaError::ReadFile {
        path: path.to_owned(),
        source,
    };
    let pem = std::fs::read(path).map_err(read_error)?;
    if pem.is_empty() {
        return Err(CaError::EmptyFile {
            path: path.to_owned(),
        });
    }
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_error)?;
    let [root_der] = <[CertificateDer<'static>; 1]>::try_from(certs).map_err(|certs| {
        CaError::RootCertCount {
            path: path.to_owned(),
            count: certs.len(),
        }
    })?;
    Ok(root_der)
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

mod serving;

#[cfg(test)]
mod tests;
