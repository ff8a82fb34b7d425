use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::UNIX_EPOCH;

use super::*;
use crate::builtin_ca::{BuiltinCa, BuiltinCaOptions};
use crate::ca::{CaFuture, IssuedChain};
use crate::test_support::{cert_with_validity, exchange, handshake, identity, new_ca, TempDir};
use crate::tls::{client_config, peer_identity, server_config, CryptoProvider};

const TD: &str = "cluster.local";
const WAIT: Duration = Duration::from_secs(10);

fn fast_retries(lifetime: Option<Duration>) -> ManagerOptions {
    ManagerOptions {
        lifetime,
        retry_initial: Duration::from_millis(20),
        retry_max: Duration::from_millis(100),
    }
}

/// Fails the first `failures` signings, then delegates to the built-in CA.
struct FlakyCa {
    inner: BuiltinCa,
    failures: usize,
    calls: AtomicUsize,
}

impl CertificateAuthority for FlakyCa {
    fn trust_domain(&self) -> &str {
        self.inner.trust_domain()
    }

    fn sign(&self, request: CsrRequest) -> CaFuture<'_, Result<IssuedChain, CaError>> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        if call < self.failures {
            // An honest refusal: ask for a certificate of a zero lifetime.
            let refused = CsrRequest {
                lifetime: Some(Duration::ZERO),
                ..request
            };
            return self.inner.sign(refused);
        }
        self.inner.sign(request)
    }

    fn trust_bundle(&self) -> TrustBundle {
        self.inner.trust_bundle()
    }
}

/// Signs a certificate for another identity than the one requested (a broken external CA).
struct ConfusedCa {
    inner: BuiltinCa,
    instead: Identity,
}

impl CertificateAuthority for ConfusedCa {
    fn trust_domain(&self) -> &str {
        self.inner.trust_domain()
    }

    fn sign(&self, _request: CsrRequest) -> CaFuture<'_, Result<IssuedChain, CaError>> {
        let key = WorkloadKey::generate().unwrap();
        let request = CsrRequest {
            csr_der: key.csr(&self.instead).unwrap(),
            identity: self.instead.clone(),
            lifetime: None,
        };
        self.inner.sign(request)
    }

    fn trust_bundle(&self) -> TrustBundle {
        self.inner.trust_bundle()
    }
}

#[tokio::test]
async fn obtains_certificates_for_wanted_identities_and_drops_unwanted_ones() {
    let tmp = TempDir::new("mgr-wanted");
    let ca = Arc::new(new_ca(&tmp, TD));
    let manager = CertManager::new(ca.clone(), fast_retries(None)).unwrap();
    let (a, b, c) = (identity(TD, "a"), identity(TD, "b"), identity(TD, "c"));
    let mut snapshots = manager.subscribe();
    assert!(snapshots.borrow_and_update().certs.is_empty());

    manager.set_wanted([a.clone(), b.clone()]);
    let cert_a = manager.wait_for(&a, WAIT).await.unwrap();
    let cert_b = manager.wait_for(&b, WAIT).await.unwrap();
    assert_eq!(cert_a.identity(), &a);
    assert_eq!(cert_b.identity(), &b);
    assert_eq!(manager.wanted(), vec![a.clone(), b.clone()]);
    let snapshot = manager.snapshot();
    assert_eq!(snapshot.certs.len(), 2);
    assert_eq!(*snapshot.bundle, ca.trust_bundle());
    assert!(snapshot.generation >= 2);
    assert!(snapshots.has_changed().unwrap());

    // Declaring the same set again changes nothing.
    manager.set_wanted([b.clone(), a.clone()]);
    assert!(Arc::ptr_eq(manager.snapshot().get(&a).unwrap(), &cert_a));

    // "a" is dropped at once, "c" appears, "b" keeps its certificate.
    manager.set_wanted([b.clone(), c.clone()]);
    assert!(manager.snapshot().get(&a).is_none());
    assert_eq!(manager.wanted(), vec![b.clone(), c.clone()]);
    manager.wait_for(&c, WAIT).await.unwrap();
    let snapshot = manager.snapshot();
    assert!(snapshot.get(&a).is_none());
    assert!(Arc::ptr_eq(snapshot.get(&b).unwrap(), &cert_b));
    assert_eq!(snapshot.certs.len(), 2);

    manager.set_wanted([]);
    assert!(manager.snapshot().certs.is_empty());
    assert!(manager.wanted().is_empty());
}

#[tokio::test]
async fn a_failed_signing_is_retried() {
    let tmp = TempDir::new("mgr-retry");
    let ca = Arc::new(FlakyCa {
        inner: new_ca(&tmp, TD),
        failures: 3,
        calls: AtomicUsize::new(0),
    });
    let manager = CertManager::new(ca.clone(), fast_retries(None)).unwrap();
    let id = identity(TD, "flaky");
    manager.set_wanted([id.clone()]);
    let cert = manager.wait_for(&id, WAIT).await.unwrap();
    assert_eq!(cert.identity(), &id);
    assert_eq!(ca.calls.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn wait_for_reports_why_no_certificate_came() {
    let tmp = TempDir::new("mgr-timeout");
    let ca = Arc::new(FlakyCa {
        inner: new_ca(&tmp, TD),
        failures: usize::MAX,
        calls: AtomicUsize::new(0),
    });
    let manager = CertManager::new(ca, fast_retries(None)).unwrap();
    let id = identity(TD, "never");

    let err = manager
        .wait_for(&id, Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ManagerError::Timeout { status, .. } if status.contains("not wanted")),
        "{err}"
    );

    manager.set_wanted([id.clone()]);
    let err = manager
        .wait_for(&id, Duration::from_millis(300))
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(message.contains(id.as_str()), "{message}");
    assert!(message.contains("zero certificate lifetime"), "{message}");
}

#[tokio::test]
async fn a_certificate_for_the_wrong_identity_is_not_published() {
    let tmp = TempDir::new("mgr-confused");
    let ca = Arc::new(ConfusedCa {
        inner: new_ca(&tmp, TD),
        instead: identity(TD, "admin"),
    });
    let manager = CertManager::new(ca, fast_retries(None)).unwrap();
    let id = identity(TD, "web");
    manager.set_wanted([id.clone()]);
    let err = manager
        .wait_for(&id, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("spiffe://cluster.local/ns/default/sa/admin"),
        "{err}"
    );
    assert!(manager.snapshot().certs.is_empty());
}

#[test]
fn creating_a_manager_outside_a_runtime_fails() {
    let tmp = TempDir::new("mgr-no-rt");
    let ca = Arc::new(new_ca(&tmp, TD));
    assert!(matches!(
        CertManager::new(ca, ManagerOptions::default()),
        Err(ManagerError::NoRuntime)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_certificates_rotate_without_breaking_open_sessions() {
    let tmp = TempDir::new("mgr-rotate");
    let ca =
        Arc::new(BuiltinCa::load_or_create(tmp.path(), TD, BuiltinCaOptions::default()).unwrap());
    let manager = CertManager::new(ca, fast_retries(Some(Duration::from_secs(4)))).unwrap();
    let (server_id, client_id) = (identity(TD, "server"), identity(TD, "client"));
    manager.set_wanted([server_id.clone(), client_id.clone()]);
    let first = manager.wait_for(&server_id, WAIT).await.unwrap();
    manager.wait_for(&client_id, WAIT).await.unwrap();
    assert!(first.lifetime() <= Duration::from_secs(6), "{first:?}");

    let server = server_config(
        CryptoProvider::AwsLcRs,
        manager.subscribe(),
        server_id.clone(),
    )
    .unwrap();
    let client = client_config(
        CryptoProvider::Ring,
        manager.subscribe(),
        client_id.clone(),
        server_id.clone(),
    )
    .unwrap();
    let (server_stream, client_stream) = handshake(Arc::clone(&server), Arc::clone(&client)).await;
    let (mut server_stream, mut client_stream) = (server_stream.unwrap(), client_stream.unwrap());
    assert_eq!(
        peer_identity(server_stream.get_ref().1),
        Some(client_id.clone())
    );
    exchange(&mut client_stream, &mut server_stream, b"before rotation").await;

    // A new certificate, ending later, replaces the first within a few seconds.
    let mut snapshots = manager.subscribe();
    let rotated = tokio::time::timeout(WAIT, async {
        loop {
            let current = snapshots.borrow_and_update().get(&server_id).cloned();
            if let Some(current) = current {
                if current.not_after() > first.not_after() {
                    return current;
                }
            }
            snapshots.changed().await.unwrap();
        }
    })
    .await
    .expect("the certificate was not rotated in time");
    assert_ne!(rotated.serial_hex(), first.serial_hex());
    assert_ne!(rotated.leaf(), first.leaf());
    // The old certificate is untouched for whoever still holds it.
    assert_eq!(first.identity(), &server_id);

    // The session established with the first certificate keeps working.
    exchange(&mut client_stream, &mut server_stream, b"after rotation").await;
    exchange(
        &mut server_stream,
        &mut client_stream,
        b"reply after rotation",
    )
    .await;

    // New handshakes present the current certificate.
    let (_, fresh) = handshake(server, client).await;
    let fresh = fresh.unwrap();
    let presented = &fresh.get_ref().1.peer_certificates().unwrap()[0];
    let current = manager.snapshot().get(&server_id).cloned().unwrap();
    assert_eq!(presented, current.leaf());
    assert_ne!(presented, first.leaf());
}

#[test]
fn rotation_happens_around_half_the_lifetime() {
    let tmp = TempDir::new("mgr-delay");
    let ca = new_ca(&tmp, TD);
    let start = UNIX_EPOCH + Duration::from_secs(1_900_000_000);
    let cert = cert_with_validity(
        &ca,
        &identity(TD, "x"),
        start,
        start + Duration::from_secs(100),
    );
    assert_eq!(rotation_delay(&cert, start, 0.0), Duration::from_secs(45));
    assert_eq!(rotation_delay(&cert, start, 0.5), Duration::from_secs(50));
    let late = rotation_delay(&cert, start, 0.999_999);
    assert!(
        late > Duration::from_secs(54) && late < Duration::from_secs(55),
        "{late:?}"
    );
    // Ten seconds in, the wait shrinks accordingly.
    assert_eq!(
        rotation_delay(&cert, start + Duration::from_secs(10), 0.5),
        Duration::from_secs(40)
    );
    // Past the rotation time (or expired), the floor applies.
    assert_eq!(
        rotation_delay(&cert, start + Duration::from_secs(99), 0.5),
        MIN_ROTATION_DELAY
    );
    let unit = random_unit();
    assert!((0.0..1.0).contains(&unit));
}
