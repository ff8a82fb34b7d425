//! The control plane's certificates, made fresh for each control plane with rcgen: one CA that
//! signs every serving and client certificate (as kubeadm's cluster CA does), and the
//! service-account key pair that signs and verifies service-account tokens. Files are written
//! under `<scratch>/pki`, keys with mode 0600.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

use super::{Error, Result};

/// DNS names the API server's certificate carries besides its addresses: the in-cluster names
/// of the `kubernetes` Service, so clients inside pods can verify it too.
const APISERVER_NAMES: &[&str] = &[
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
];

/// A client certificate and its key, as files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What a certificate is for.
#[derive(Clone, Copy)]
enum Usage {
    Server,
    Client,
    /// etcd's own certificate: it serves clients and is both ends of peer connections.
    Both,
}

/// A certificate authority: its certificate and key, kept in memory to sign with.
struct Ca {
    cert: Certificate,
    key: KeyPair,
}

impl Ca {
    /// A new self-signed CA `common_name`, written as `<file>.crt` and `<file>.key` in `dir`.
    fn create(dir: &Path, file: &str, common_name: &str) -> Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        write(&dir.join(format!("{file}.crt")), &cert.pem(), false)?;
        write(&dir.join(format!("{file}.key")), &key.serialize_pem(), true)?;
        Ok(Self { cert, key })
    }
}

/// The cluster CA, which signs every serving and client certificate, and the front-proxy CA,
/// which signs only the API server's client certificate toward aggregated API servers (the
/// controller manager and scheduler read its certificate to authenticate such requests).
pub struct Pki {
    dir: PathBuf,
    ca: Ca,
    front_proxy: Ca,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Pki {
    /// Creates `dir` (mode 0700) and both CAs in it (`ca.crt`/`.key`,
    /// `front-proxy-ca.crt`/`.key`).
    pub fn new(dir: &Path) -> Result<Self> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(crate::io_err(format!("creating {}", dir.display())))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            ca: Ca::create(dir, "ca", "mesh-tests kubernetes CA")?,
            front_proxy: Ca::create(dir, "front-proxy-ca", "mesh-tests front-proxy CA")?,
        })
    }

    /// The front-proxy CA's certificate (`--requestheader-client-ca-file`).
    pub fn front_proxy_ca_cert(&self) -> PathBuf {
        self.dir.join("front-proxy-ca.crt")
    }

    /// The API server's client certificate toward aggregated API servers, signed by the
    /// front-proxy CA, with the name `--requestheader-allowed-names` expects.
    pub fn front_proxy_client(&self) -> Result<CertFiles> {
        let usage = Usage::Client;
        self.issue_by(
            &self.front_proxy,
            "front-proxy-client",
            "front-proxy-client",
            None,
            Vec::new(),
            usage,
        )
    }

    /// The CA certificate (PEM), which every component and client trusts.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// The CA key, for the controller manager's CSR signer.
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }

    /// The CA certificate in DER, for rustls trust stores.
    pub fn ca_der(&self) -> Vec<u8> {
        self.ca.cert.der().to_vec()
    }

    /// The API server's serving certificate, valid for 127.0.0.1, `::1`, the in-cluster names of
    /// the `kubernetes` Service and its address `service_ip`.
    pub fn apiserver(&self, service_ip: IpAddr) -> Result<CertFiles> {
        let mut sans = loopback_sans();
        sans.push(SanType::IpAddress(service_ip));
        for name in APISERVER_NAMES {
            sans.push(SanType::DnsName((*name).try_into()?));
        }
        self.issue("apiserver", "kube-apiserver", None, sans, Usage::Server)
    }

    /// etcd's certificate (clients and peers), valid for 127.0.0.1 and localhost.
    pub fn etcd(&self) -> Result<CertFiles> {
        let mut sans = loopback_sans();
        sans.push(SanType::DnsName("localhost".try_into()?));
        self.issue("etcd", "etcd", None, sans, Usage::Both)
    }

    /// A serving certificate for the controller manager's and scheduler's health endpoints.
    pub fn component_serving(&self) -> Result<CertFiles> {
        let mut sans = loopback_sans();
        sans.push(SanType::DnsName("localhost".try_into()?));
        self.issue(
            "components",
            "mesh-tests components",
            None,
            sans,
            Usage::Server,
        )
    }

    /// A client certificate for user `common_name`, in `group` if given (the organisation),
    /// written as `<file>.crt` and `<file>.key`. The API server maps CN to the user name and O
    /// to a group. (One group at most: rcgen keeps one entry per attribute type.)
    pub fn client(&self, file: &str, common_name: &str, group: Option<&str>) -> Result<CertFiles> {
        self.issue(file, common_name, group, Vec::new(), Usage::Client)
    }

    /// The service-account token key pair (`sa.key`, `sa.pub`), returned in that order.
    pub fn service_account_keys(&self) -> Result<(PathBuf, PathBuf)> {
        let key = KeyPair::generate()?;
        let (private, public) = (self.dir.join("sa.key"), self.dir.join("sa.pub"));
        write(&private, &key.serialize_pem(), true)?;
        write(&public, &key.public_key_pem(), false)?;
        Ok((private, public))
    }

    fn issue(
        &self,
        file: &str,
        common_name: &str,
        group: Option<&str>,
        sans: Vec<SanType>,
        usage: Usage,
    ) -> Result<CertFiles> {
        self.issue_by(&self.ca, file, common_name, group, sans, usage)
    }

    fn issue_by(
        &self,
        issuer: &Ca,
        file: &str,
        common_name: &str,
        group: Option<&str>,
        sans: Vec<SanType>,
        usage: Usage,
    ) -> Result<CertFiles> {
        if file.is_empty() || !file.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(Error::Invalid {
                what: format!("certificate file name {file:?}"),
                detail: "use letters, digits and '-'".into(),
            });
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        if let Some(group) = group {
            params
                .distinguished_name
                .push(DnType::OrganizationName, group);
        }
        params.subject_alt_names = sans;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = match usage {
            Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Usage::Both => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        };
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &issuer.cert, &issuer.key)?;
        let files = CertFiles {
            cert: self.dir.join(format!("{file}.crt")),
            key: self.dir.join(format!("{file}.key")),
        };
        write(&files.cert, &cert.pem(), false)?;
        write(&files.key, &key.serialize_pem(), true)?;
        Ok(files)
    }
}

/// Both loopback addresses: the components listen on 127.0.0.1, clients may say `localhost`.
fn loopback_sans() -> Vec<SanType> {
    vec![
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
    ]
}

/// Writes a PEM file; a private key gets mode 0600 from its creation on.
fn write(path: &Path, pem: &str, private: bool) -> Result<()> {
    use std::io::Write as _;
    let mode = if private { 0o600 } else { 0o644 };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(crate::io_err(format!("creating {}", path.display())))?;
    file.write_all(pem.as_bytes())
        .map_err(crate::io_err(format!("writing {}", path.display())))?;
    Ok(())
}
