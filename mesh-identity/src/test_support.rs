//! Helpers shared by the crate's tests.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::builtin_ca::{BuiltinCa, BuiltinCaOptions};
use crate::ca::CsrRequest;
use crate::cert::{WorkloadCert, WorkloadKey};
use crate::spiffe::Identity;

/// A fresh directory under the system's temporary directory, removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let path = std::env::temp_dir().join(format!(
            "mesh-identity-{tag}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A built-in CA for `trust_domain` in a subdirectory `ca` of `dir`.
pub(crate) fn new_ca(dir: &TempDir, trust_domain: &str) -> BuiltinCa {
    BuiltinCa::load_or_create(
        &dir.path().join("ca"),
        trust_domain,
        BuiltinCaOptions::default(),
    )
    .unwrap()
}

pub(crate) fn identity(trust_domain: &str, sa: &str) -> Identity {
    Identity::new(trust_domain, "default", sa).unwrap()
}

/// A certificate for `identity` issued by `ca` for `not_before..not_after`.
pub(crate) fn cert_with_validity(
    ca: &BuiltinCa,
    identity: &Identity,
    not_before: SystemTime,
    not_after: SystemTime,
) -> WorkloadCert {
    let key = WorkloadKey::generate().unwrap();
    let request = CsrRequest {
        csr_der: key.csr(identity).unwrap(),
        identity: identity.clone(),
        lifetime: None,
    };
    let issued = ca
        .issue_with_validity(&request, not_before, not_after)
        .unwrap();
    WorkloadCert::new(identity.clone(), issued.chain, &key).unwrap()
}

/// A certificate for `identity` issued by `ca` with the CA's default lifetime.
pub(crate) fn cert(ca: &BuiltinCa, identity: &Identity) -> WorkloadCert {
    let key = WorkloadKey::generate().unwrap();
    let request = CsrRequest {
        csr_der: key.csr(identity).unwrap(),
        identity: identity.clone(),
        lifetime: None,
    };
    let issued = ca.issue(&request).unwrap();
    WorkloadCert::new(identity.clone(), issued.chain, &key).unwrap()
}

/// A receiver that always sees one snapshot: `certs` and `bundle`.
pub(crate) fn fixed_snapshots(
    bundle: &crate::ca::TrustBundle,
    certs: Vec<WorkloadCert>,
) -> (
    tokio::sync::watch::Sender<std::sync::Arc<crate::manager::CertSnapshot>>,
    tokio::sync::watch::Receiver<std::sync::Arc<crate::manager::CertSnapshot>>,
) {
    let mut snapshot = crate::manager::CertSnapshot::empty(bundle.clone());
    for cert in certs {
        snapshot
            .certs
            .insert(cert.identity().clone(), std::sync::Arc::new(cert));
    }
    tokio::sync::watch::channel(std::sync::Arc::new(snapshot))
}

pub(crate) type ServerStream = tokio_rustls::server::TlsStream<tokio::io::DuplexStream>;
pub(crate) type ClientStream = tokio_rustls::client::TlsStream<tokio::io::DuplexStream>;

/// Runs a handshake between the two configurations over an in-memory pipe.
pub(crate) async fn handshake(
    server: std::sync::Arc<rustls::ServerConfig>,
    client: std::sync::Arc<rustls::ClientConfig>,
) -> (std::io::Result<ServerStream>, std::io::Result<ClientStream>) {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    let connector = tokio_rustls::TlsConnector::from(client);
    // The name is ignored by the mesh's verifier and not sent (no SNI).
    let name = rustls::pki_types::ServerName::try_from("mesh.invalid").unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        tokio::join!(
            acceptor.accept(server_io),
            connector.connect(name, client_io)
        )
    })
    .await
    .expect("the handshake hung")
}

/// The rustls error inside an I/O error from tokio-rustls.
pub(crate) fn rustls_error(error: &std::io::Error) -> Option<&rustls::Error> {
    error.get_ref()?.downcast_ref::<rustls::Error>()
}

/// Sends `message` from `from` and reads it at `to`, over an established session.
pub(crate) async fn exchange<A, B>(from: &mut A, to: &mut B, message: &[u8])
where
    A: tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    from.write_all(message).await.unwrap();
    from.flush().await.unwrap();
    let mut buf = vec![0_u8; message.len()];
    tokio::time::timeout(std::time::Duration::from_secs(5), to.read_exact(&mut buf))
        .await
        .expect("no data arrived")
        .unwrap();
    assert_eq!(buf, message);
}
