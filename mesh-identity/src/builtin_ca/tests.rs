use std::os::unix::fs::PermissionsExt;

use rustls::pki_types::UnixTime;
use x509_parser::extensions::{GeneralName, ParsedExtension};

use super::*;
use crate::cert::{WorkloadCert, WorkloadKey};
use crate::spiffe::Identity;
use crate::test_support::{cert, cert_with_validity, identity, new_ca, TempDir};
use crate::tls::verify_chain;

const HOUR: Duration = Duration::from_secs(3600);

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn verify(
    bundle: &TrustBundle,
    cert: &WorkloadCert,
    at: SystemTime,
    usage: webpki::KeyUsage,
) -> Result<(), rustls::Error> {
    let algorithms =
        rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms;
    verify_chain(
        bundle,
        algorithms.all,
        cert.leaf(),
        &cert.chain()[1..],
        UnixTime::since_unix_epoch(at.duration_since(std::time::UNIX_EPOCH).unwrap()),
        usage,
    )
}

fn request_for(key: &WorkloadKey, id: &Identity, lifetime: Option<Duration>) -> CsrRequest {
    CsrRequest {
        csr_der: key.csr(id).unwrap(),
        identity: id.clone(),
        lifetime,
    }
}

#[test]
fn creates_a_root_with_private_key_file_and_directory() {
    let tmp = TempDir::new("create");
    let dir = tmp.path().join("nested").join("ca");
    let ca = BuiltinCa::load_or_create(&dir, "cluster.local", BuiltinCaOptions::default()).unwrap();
    assert_eq!(ca.root_key_path(), dir.join(ROOT_KEY_FILE));
    assert_eq!(mode(&dir.join(ROOT_KEY_FILE)), 0o600);
    assert_eq!(mode(&dir), 0o700);

    let roots = ca.trust_bundle();
    assert_eq!(roots.roots().len(), 1);
    let pem = std::fs::read(dir.join(ROOT_CERT_FILE)).unwrap();
    let from_file = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    assert_eq!(from_file, roots.roots());

    let (_, root) = x509_parser::parse_x509_certificate(&roots.roots()[0]).unwrap();
    assert!(root.is_ca());
    assert_eq!(
        root.subject()
            .iter_organization()
            .next()
            .unwrap()
            .as_str()
            .unwrap(),
        "cluster.local"
    );
    let usage = root.key_usage().unwrap().unwrap().value;
    assert!(usage.key_cert_sign());
    let validity = root.validity().time_to_expiration().unwrap();
    let ten_years = 3650 * 24 * HOUR;
    assert!(validity <= time::Duration::try_from(ten_years).unwrap());
    assert!(validity > time::Duration::try_from(ten_years.checked_sub(2 * HOUR).unwrap()).unwrap());
}

#[test]
fn workload_certificates_carry_only_the_spiffe_id_and_mtls_usages() {
    let tmp = TempDir::new("leaf");
    let ca = new_ca(&tmp, "cluster.local");
    let id = identity("cluster.local", "web");
    let before = SystemTime::now();
    let issued = cert(&ca, &id);
    let (_, leaf) = x509_parser::parse_x509_certificate(issued.leaf()).unwrap();
    let bundle = ca.trust_bundle();
    let (_, root) = x509_parser::parse_x509_certificate(&bundle.roots()[0]).unwrap();

    assert_eq!(leaf.issuer(), root.subject());
    assert!(!leaf.is_ca());
    let mut saw_san = false;
    for ext in leaf.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                saw_san = true;
                assert_eq!(
                    san.general_names,
                    vec![GeneralName::URI("spiffe://cluster.local/ns/default/sa/web")]
                );
            }
            ParsedExtension::ExtendedKeyUsage(eku) => {
                assert!(eku.server_auth && eku.client_auth);
                assert!(!eku.any && !eku.code_signing && eku.other.is_empty());
            }
            ParsedExtension::KeyUsage(ku) => {
                assert!(ku.digital_signature());
                assert!(!ku.key_cert_sign() && !ku.crl_sign());
            }
            ParsedExtension::BasicConstraints(bc) => assert!(!bc.ca),
            _ => {}
        }
    }
    assert!(saw_san);

    // Default lifetime 24 h, backdated by the 5 minutes of clock skew.
    let not_before = before.duration_since(issued.not_before()).unwrap();
    assert!(not_before >= Duration::from_secs(299) && not_before <= Duration::from_secs(301));
    let lifetime = issued.lifetime();
    assert!(lifetime >= 24 * HOUR + Duration::from_secs(299));
    assert!(lifetime <= 24 * HOUR + Duration::from_secs(302));

    // Random serials: two certificates for the same identity differ.
    let again = cert(&ca, &id);
    assert_ne!(issued.serial_hex(), again.serial_hex());
    assert!(issued.serial_hex().len() >= 30);

    // And they verify for both directions of mutual TLS.
    let now = SystemTime::now();
    verify(&bundle, &issued, now, webpki::KeyUsage::client_auth()).unwrap();
    verify(&bundle, &issued, now, webpki::KeyUsage::server_auth()).unwrap();
}

#[test]
fn requested_lifetimes_are_honoured_up_to_the_maximum() {
    let tmp = TempDir::new("lifetime");
    let options = BuiltinCaOptions {
        max_lifetime: 2 * HOUR,
        ..BuiltinCaOptions::default()
    };
    let ca = BuiltinCa::load_or_create(tmp.path(), "td", options).unwrap();
    let id = identity("td", "web");
    let key = WorkloadKey::generate().unwrap();

    let short = ca
        .issue(&request_for(&key, &id, Some(Duration::from_secs(4))))
        .unwrap();
    let short = WorkloadCert::new(id.clone(), short.chain, &key).unwrap();
    // 4 s plus a backdating of at most a tenth of it (and up to 1 s of truncation).
    assert!(short.lifetime() >= Duration::from_secs(4));
    assert!(
        short.lifetime() <= Duration::from_secs(6),
        "{:?}",
        short.lifetime()
    );

    let long = ca.issue(&request_for(&key, &id, Some(100 * HOUR))).unwrap();
    let long = WorkloadCert::new(id.clone(), long.chain, &key).unwrap();
    assert!(long.lifetime() <= 2 * HOUR + Duration::from_secs(302));
    assert!(long.lifetime() >= 2 * HOUR);

    assert!(matches!(
        ca.issue(&request_for(&key, &id, Some(Duration::ZERO))),
        Err(CaError::ZeroLifetime { .. })
    ));
}

#[tokio::test]
async fn sign_refuses_csrs_for_other_identities_and_trust_domains() {
    let tmp = TempDir::new("refuse");
    let ca = new_ca(&tmp, "td");
    let key = WorkloadKey::generate().unwrap();
    let web = identity("td", "web");
    let admin = identity("td", "admin");

    // A CSR naming "admin" sent as a request for "web".
    let err = ca
        .sign(CsrRequest {
            csr_der: key.csr(&admin).unwrap(),
            identity: web.clone(),
            lifetime: None,
        })
        .await
        .unwrap_err();
    assert!(matches!(err, CaError::CsrNamesMismatch { .. }), "{err}");
    assert!(
        err.to_string().contains("spiffe://td/ns/default/sa/admin"),
        "{err}"
    );

    // A CSR with an extra DNS name.
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![
        SanType::URI(web.to_string().try_into().unwrap()),
        SanType::DnsName("web.example.com".try_into().unwrap()),
    ];
    let csr_der = params
        .serialize_request(key.key_pair())
        .unwrap()
        .der()
        .to_vec();
    let err = ca
        .sign(CsrRequest {
            csr_der,
            identity: web.clone(),
            lifetime: None,
        })
        .await
        .unwrap_err();
    assert!(matches!(err, CaError::CsrNamesMismatch { .. }), "{err}");

    // An identity of another trust domain, even with a matching CSR.
    let foreign = identity("other", "web");
    let err = ca
        .sign(request_for(&key, &foreign, None))
        .await
        .unwrap_err();
    assert!(matches!(err, CaError::WrongTrustDomain { .. }), "{err}");

    // The matching request is signed.
    let issued = ca.sign(request_for(&key, &web, None)).await.unwrap();
    WorkloadCert::new(web, issued.chain, &key).unwrap();
}

#[test]
fn a_reloaded_ca_signs_certificates_that_verify_against_the_original_bundle() {
    let tmp = TempDir::new("reload");
    let original = new_ca(&tmp, "cluster.local");
    let bundle = original.trust_bundle();
    drop(original);

    let reloaded = new_ca(&tmp, "cluster.local");
    assert_eq!(reloaded.trust_bundle(), bundle);
    let issued = cert(&reloaded, &identity("cluster.local", "db"));
    verify(
        &bundle,
        &issued,
        SystemTime::now(),
        webpki::KeyUsage::client_auth(),
    )
    .unwrap();

    // A CA with another root does not verify against it.
    let other_tmp = TempDir::new("reload-other");
    let other = new_ca(&other_tmp, "cluster.local");
    let foreign = cert(&other, &identity("cluster.local", "db"));
    assert_eq!(
        verify(
            &bundle,
            &foreign,
            SystemTime::now(),
            webpki::KeyUsage::client_auth()
        ),
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer
        ))
    );
}

#[test]
fn a_group_or_world_readable_key_file_is_refused() {
    let tmp = TempDir::new("mode");
    drop(new_ca(&tmp, "td"));
    let key_path = tmp.path().join("ca").join(ROOT_KEY_FILE);
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = BuiltinCa::load_or_create(&tmp.path().join("ca"), "td", BuiltinCaOptions::default())
        .unwrap_err();
    assert!(
        matches!(&err, CaError::KeyFileTooOpen { path, mode: 0o644 } if *path == key_path),
        "{err}"
    );
    let message = err.to_string();
    assert!(
        message.contains(&key_path.display().to_string()) && message.contains("0644"),
        "{message}"
    );

    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o640)).unwrap();
    assert!(matches!(
        BuiltinCa::load_or_create(&tmp.path().join("ca"), "td", BuiltinCaOptions::default()),
        Err(CaError::KeyFileTooOpen { mode: 0o640, .. })
    ));
}

#[test]
fn a_key_that_does_not_match_the_certificate_is_refused() {
    let tmp = TempDir::new("mismatch");
    drop(new_ca(&tmp, "td"));
    let dir = tmp.path().join("ca");
    let key_path = dir.join(ROOT_KEY_FILE);
    std::fs::remove_file(&key_path).unwrap();
    let other = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    write_new_file(&key_path, 0o600, other.serialize_pem().as_bytes()).unwrap();
    let err = BuiltinCa::load_or_create(&dir, "td", BuiltinCaOptions::default()).unwrap_err();
    assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");
}

#[test]
fn a_half_present_store_or_another_trust_domain_is_refused() {
    let tmp = TempDir::new("partial");
    drop(new_ca(&tmp, "td"));
    let dir = tmp.path().join("ca");

    let err = BuiltinCa::load_or_create(&dir, "other.td", BuiltinCaOptions::default()).unwrap_err();
    assert!(
        matches!(&err, CaError::RootTrustDomainMismatch { found: Some(found), expected, .. }
            if found == "td" && expected == "other.td"),
        "{err}"
    );

    std::fs::remove_file(dir.join(ROOT_CERT_FILE)).unwrap();
    let err = BuiltinCa::load_or_create(&dir, "td", BuiltinCaOptions::default()).unwrap_err();
    assert!(
        matches!(&err, CaError::IncompleteStore { missing, .. } if *missing == dir.join(ROOT_CERT_FILE)),
        "{err}"
    );

    assert!(matches!(
        BuiltinCa::load_or_create(&dir, "Bad Domain", BuiltinCaOptions::default()),
        Err(CaError::InvalidTrustDomain { .. })
    ));
}

#[test]
fn a_corrupt_certificate_file_is_named() {
    let tmp = TempDir::new("corrupt");
    drop(new_ca(&tmp, "td"));
    let cert_path = tmp.path().join("ca").join(ROOT_CERT_FILE);
    std::fs::write(&cert_path, "not pem at all\n").unwrap();
    let err = BuiltinCa::load_or_create(&tmp.path().join("ca"), "td", BuiltinCaOptions::default())
        .unwrap_err();
    assert!(
        matches!(&err, CaError::RootCertCount { path, count: 0 } if *path == cert_path),
        "{err}"
    );
}

#[test]
fn explicit_validity_windows_make_expired_certificates() {
    let tmp = TempDir::new("expired");
    let ca = new_ca(&tmp, "td");
    let id = identity("td", "old");
    let now = SystemTime::now();
    let expired = cert_with_validity(&ca, &id, now - 2 * HOUR, now - HOUR);
    assert!(!expired.is_valid_at(now));
    let err = verify(
        &ca.trust_bundle(),
        &expired,
        now,
        webpki::KeyUsage::client_auth(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(rustls::CertificateError::ExpiredContext { .. })
        ),
        "{err:?}"
    );
    // It was valid in its window.
    verify(
        &ca.trust_bundle(),
        &expired,
        now - Duration::from_secs(90 * 60),
        webpki::KeyUsage::client_auth(),
    )
    .unwrap();

    let key = WorkloadKey::generate().unwrap();
    assert!(matches!(
        ca.issue_with_validity(&request_for(&key, &id, None), now, now - HOUR),
        Err(CaError::InvalidValidity { .. })
    ));
}
