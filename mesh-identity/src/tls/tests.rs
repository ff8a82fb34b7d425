use std::time::{Duration, SystemTime};

use rustls::{CertificateError, Error as RustlsError, ProtocolVersion};

use super::*;
use crate::ca::CertificateAuthority;
use crate::test_support::{
    cert, cert_with_validity, exchange, fixed_snapshots, handshake, identity, new_ca, rustls_error,
    TempDir,
};

const TD: &str = "cluster.local";

/// Asserts that a handshake side failed with `expected`.
fn assert_refused<T: fmt::Debug>(result: &std::io::Result<T>, expected: &RustlsError) {
    let error = result
        .as_ref()
        .expect_err("the handshake should have been refused");
    assert_eq!(rustls_error(error), Some(expected), "{error:?}");
}

fn assert_invalid_certificate<T: fmt::Debug>(
    result: &std::io::Result<T>,
    check: impl Fn(&CertificateError) -> bool,
) {
    let error = result
        .as_ref()
        .expect_err("the handshake should have been refused");
    match rustls_error(error) {
        Some(RustlsError::InvalidCertificate(e)) if check(e) => {}
        other => panic!("unexpected error {other:?} ({error:?})"),
    }
}

#[tokio::test]
async fn mutual_handshake_shows_both_identities_with_either_provider() {
    let tmp = TempDir::new("tls-ok");
    let ca = new_ca(&tmp, TD);
    let server_id = identity(TD, "server");
    let client_id = identity(TD, "client");
    let (_server_tx, server_certs) =
        fixed_snapshots(&ca.trust_bundle(), vec![cert(&ca, &server_id)]);
    let (_client_tx, client_certs) =
        fixed_snapshots(&ca.trust_bundle(), vec![cert(&ca, &client_id)]);

    for server_provider in CryptoProvider::ALL {
        for client_provider in CryptoProvider::ALL {
            let server =
                server_config(server_provider, server_certs.clone(), server_id.clone()).unwrap();
            let client = client_config(
                client_provider,
                client_certs.clone(),
                client_id.clone(),
                server_id.clone(),
            )
            .unwrap();
            let (server, client) = handshake(server, client).await;
            let (mut server, mut client) = (server.unwrap(), client.unwrap());
            let (_, server_conn) = server.get_ref();
            let (_, client_conn) = client.get_ref();
            assert_eq!(peer_identity(server_conn), Some(client_id.clone()));
            assert_eq!(peer_identity(client_conn), Some(server_id.clone()));
            assert_eq!(server_conn.alpn_protocol(), Some(ALPN_H2));
            assert_eq!(
                client_conn.protocol_version(),
                Some(ProtocolVersion::TLSv1_3)
            );
            assert_eq!(server_conn.server_name(), None, "SNI must not be sent");
            exchange(&mut client, &mut server, b"CONNECT over h2").await;
            exchange(&mut server, &mut client, b"200 OK").await;
        }
    }
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused() {
    let tmp = TempDir::new("tls-other-ca");
    let ca = new_ca(&tmp, TD);
    let other_tmp = TempDir::new("tls-other-ca-2");
    // Same trust domain name, different root: still not trusted.
    let other_ca = new_ca(&other_tmp, TD);
    let server_id = identity(TD, "server");
    let client_id = identity(TD, "client");
    let (_s, server_certs) = fixed_snapshots(&ca.trust_bundle(), vec![cert(&ca, &server_id)]);
    let (_c, client_certs) = fixed_snapshots(&ca.trust_bundle(), vec![cert(&other_ca, &client_id)]);

    let server = server_config(CryptoProvider::AwsLcRs, server_certs, server_id.clone()).unwrap();
    let client =
        client_config(CryptoProvider::AwsLcRs, client_certs, client_id, server_id).unwrap();
    let (server, _client) = handshake(server, client).await;
    assert_refused(
        &server,
        &RustlsError::InvalidCertificate(CertificateError::UnknownIssuer),
    );
}

#[tokio::test]
async fn an_expired_client_certificate_is_refused() {
    let tmp = TempDir::new("tls-expired");
    let ca = new_ca(&tmp, TD);
    let server_id = identity(TD, "server");
    let client_id = identity(TD, "client");
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let expired = cert_with_validity(&ca, &client_id, now - 2 * hour, now - hour);
    let (_s, server_certs) = fixed_snapshots(&ca.trust_bundle(), vec![cert(&ca, &server_id)]);
    let (_c, client_certs) = fixed_snapshots(&ca.trust_bundle(), vec![expired]);

    let server = server_config(CryptoProvider::Ring, server_certs, server_id.clone()).unwrap();
    let client = client_config(CryptoProvider::Ring, client_certs, client_id, server_id).unwrap();
    let (server, _client) = handshake(server, client).await;
    assert_invalid_certificate(&server, |e| {
        matches!(
            e,
            CertificateError::ExpiredContext { .. } | CertificateError::Expired
        )
    });
}

#[tokio::test]
async fn a_server_with_another_identity_is_refused_by_the_client() {
    let tmp = TempDir::new("tls-wrong-san");
    let ca = new_ca(&tmp, TD);
    let wanted = identity(TD, "payments");
    let impostor = identity(TD, "frontend");
    let client_id = identity(TD, "client");
    // The impostor's node holds a valid certificate of the same CA, for another identity.
    let (_s, server_certs) = fixed_snapshots(&ca.trust_bundle(), vec![cert(&ca, &impostor)]);
    let (_c, client_certs) = fixed_snapshots(&ca.trust_bundle(), vec![cert(&ca, &client_id)]);

    let server = server_config(CryptoProvider::AwsLcRs, server_certs, impostor).unwrap();
    let client = client_config(CryptoProvider::AwsLcRs, client_certs, client_id, wanted).unwrap();
    let (_server, client) = handshake(server, client).await;
    assert_refused(
        &client,
        &RustlsError::InvalidCertificate(CertificateError::NotValidForName),
    );
}

#[tokio::test]
async fn a_server_certificate_from_another_ca_is_refused_by_the_client() {
    let tmp = TempDir::new("tls-server-other-ca");
    let ca = new_ca(&tmp, TD);
    let other_tmp = TempDir::new("tls-server-other-ca-2");
    let other_ca = new_ca(&other_tmp, TD);
    let server_id = identity(TD, "server");
    let client_id = identity(TD, "client");
    let (_s, server_certs) = fixed_snapshots(&ca.trust_bundle(), vec![cert(&other_ca, &server_id)]);
    let (_c, client_certs) = fixed_snapshots(&ca.trust_bundle(), vec![cert(&ca, &client_id)]);

    let server = server_config(CryptoProvider::Ring, server_certs, server_id.clone()).unwrap();
    let client = client_config(CryptoProvider::Ring, client_certs, client_id, server_id).unwrap();
    let (_server, client) = handshake(server, client).await;
    assert_refused(
        &client,
        &RustlsError::InvalidCertificate(CertificateError::UnknownIssuer),
    );
}

#[tokio::test]
async fn a_client_of_another_trust_domain_is_refused() {
    let tmp = TempDir::new("tls-foreign-td");
    let ca = new_ca(&tmp, TD);
    let foreign_tmp = TempDir::new("tls-foreign-td-2");
    let foreign_ca = new_ca(&foreign_tmp, "partner.example");
    // The server trusts both roots (federation), so the chain verifies; the trust domain does not.
    let federated = ca.trust_bundle().merged(&foreign_ca.trust_bundle());
    let server_id = identity(TD, "server");
    let client_id = identity("partner.example", "client");
    let (_s, server_certs) = fixed_snapshots(&federated, vec![cert(&ca, &server_id)]);
    let (_c, client_certs) = fixed_snapshots(&federated, vec![cert(&foreign_ca, &client_id)]);

    let server = server_config(CryptoProvider::AwsLcRs, server_certs, server_id.clone()).unwrap();
    let client =
        client_config(CryptoProvider::AwsLcRs, client_certs, client_id, server_id).unwrap();
    let (server, _client) = handshake(server, client).await;
    assert_refused(
        &server,
        &RustlsError::InvalidCertificate(CertificateError::ApplicationVerificationFailure),
    );
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let tmp = TempDir::new("tls-no-client-cert");
    let ca = new_ca(&tmp, TD);
    let server_id = identity(TD, "server");
    let (_s, server_certs) = fixed_snapshots(&ca.trust_bundle(), vec![cert(&ca, &server_id)]);
    let (_c, client_certs) = fixed_snapshots(&ca.trust_bundle(), Vec::new());

    let server = server_config(CryptoProvider::AwsLcRs, server_certs, server_id.clone()).unwrap();
    let client = client_config(
        CryptoProvider::AwsLcRs,
        client_certs,
        identity(TD, "client"),
        server_id,
    )
    .unwrap();
    let (server, _client) = handshake(server, client).await;
    assert_refused(&server, &RustlsError::NoCertificatesPresented);
}

#[tokio::test]
async fn new_handshakes_present_the_latest_certificate() {
    let tmp = TempDir::new("tls-latest");
    let ca = new_ca(&tmp, TD);
    let server_id = identity(TD, "server");
    let client_id = identity(TD, "client");
    let first = cert(&ca, &server_id);
    let first_leaf = first.leaf().clone();
    let (server_tx, server_certs) = fixed_snapshots(&ca.trust_bundle(), vec![first]);
    let (_c, client_certs) = fixed_snapshots(&ca.trust_bundle(), vec![cert(&ca, &client_id)]);
    let server = server_config(CryptoProvider::AwsLcRs, server_certs, server_id.clone()).unwrap();
    let client = client_config(
        CryptoProvider::AwsLcRs,
        client_certs,
        client_id,
        server_id.clone(),
    )
    .unwrap();

    let (_, before) = handshake(Arc::clone(&server), Arc::clone(&client)).await;
    let before = before.unwrap();
    assert_eq!(
        before.get_ref().1.peer_certificates().unwrap()[0],
        first_leaf
    );

    let second = cert(&ca, &server_id);
    let second_leaf = second.leaf().clone();
    server_tx.send_modify(|snapshot| {
        let mut next = CertSnapshot::clone(snapshot);
        next.certs.insert(server_id.clone(), Arc::new(second));
        next.generation += 1;
        *snapshot = Arc::new(next);
    });
    let (_, after) = handshake(server, client).await;
    assert_eq!(
        after.unwrap().get_ref().1.peer_certificates().unwrap()[0],
        second_leaf
    );
}

#[test]
fn provider_names_round_trip() {
    for provider in CryptoProvider::ALL {
        assert_eq!(
            provider.to_string().parse::<CryptoProvider>().unwrap(),
            provider
        );
    }
    assert_eq!(
        "aws-lc-rs".parse::<CryptoProvider>().unwrap(),
        CryptoProvider::AwsLcRs
    );
    assert_eq!(
        "ring".parse::<CryptoProvider>().unwrap(),
        CryptoProvider::Ring
    );
    let err = "openssl".parse::<CryptoProvider>().unwrap_err();
    assert!(matches!(&err, TlsError::UnknownCryptoProvider { name } if name == "openssl"));
}

#[test]
fn configs_use_h2_without_sni_or_resumption() {
    let tmp = TempDir::new("tls-config");
    let ca = new_ca(&tmp, TD);
    let (_tx, certs) = fixed_snapshots(&ca.trust_bundle(), Vec::new());
    let id = identity(TD, "a");
    for provider in CryptoProvider::ALL {
        let server = server_config(provider, certs.clone(), id.clone()).unwrap();
        assert_eq!(server.send_tls13_tickets, 0);
        assert!(!server.session_storage.can_cache());
        assert_eq!(server.alpn_protocols, vec![b"h2".to_vec()]);
        let client = client_config(provider, certs.clone(), id.clone(), id.clone()).unwrap();
        assert!(!client.enable_sni);
        assert_eq!(client.alpn_protocols, vec![b"h2".to_vec()]);
    }
}
