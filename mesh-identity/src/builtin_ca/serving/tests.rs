use std::time::UNIX_EPOCH;

use rustls::pki_types::{ServerName, UnixTime};

use super::*;
use crate::ca::CertificateAuthority;
use crate::cert::parse_cert;
use crate::test_support::{new_ca, TempDir};

const DAY: Duration = Duration::from_secs(24 * 3600);

fn names() -> Vec<String> {
    [
        "mesh-ca",
        "mesh-ca.mesh-system",
        "mesh-ca.mesh-system.svc",
        "mesh-ca.mesh-system.svc.cluster.local",
    ]
    .map(str::to_owned)
    .to_vec()
}

fn now() -> UnixTime {
    UnixTime::since_unix_epoch(SystemTime::now().duration_since(UNIX_EPOCH).unwrap())
}

#[test]
fn serving_certificate_verifies_for_each_name_as_a_server_only() {
    let tmp = TempDir::new("serving");
    let ca = new_ca(&tmp, "cluster.local");
    let key = WorkloadKey::generate().unwrap();
    let der = ca.issue_serving(&key, &names(), DAY).unwrap();

    let parsed = parse_cert(&der).unwrap();
    assert!(!parsed.is_ca);
    assert!(parsed.spiffe_ids.is_empty(), "no workload identity");
    assert_eq!(parsed.public_key, key.public_key_raw());
    let lifetime = parsed.not_after.duration_since(parsed.not_before).unwrap();
    assert!(lifetime <= DAY + Duration::from_secs(600), "{lifetime:?}");

    let bundle = ca.trust_bundle();
    let anchors = bundle.trust_anchors();
    let algorithms =
        rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms;
    let cert = webpki::EndEntityCert::try_from(&der).unwrap();
    cert.verify_for_usage(
        algorithms.all,
        &anchors,
        &[],
        now(),
        webpki::KeyUsage::server_auth(),
        None,
        None,
    )
    .unwrap();
    for name in names() {
        let name = ServerName::try_from(name.as_str()).unwrap();
        cert.verify_is_valid_for_subject_name(&name).unwrap();
    }
    let other = ServerName::try_from("mesh-ca.other.svc").unwrap();
    assert!(cert.verify_is_valid_for_subject_name(&other).is_err());
    // Not a client certificate: serverAuth only.
    assert!(cert
        .verify_for_usage(
            algorithms.all,
            &anchors,
            &[],
            now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .is_err());
}

#[test]
fn serving_certificate_needs_valid_names_and_a_lifetime() {
    let tmp = TempDir::new("serving-refused");
    let ca = new_ca(&tmp, "cluster.local");
    let key = WorkloadKey::generate().unwrap();
    assert!(matches!(
        ca.issue_serving(&key, &[], DAY),
        Err(CaError::NoServingNames)
    ));
    assert!(matches!(
        ca.issue_serving(&key, &["not a name".to_owned()], DAY),
        Err(CaError::InvalidServingName { name, .. }) if name == "not a name"
    ));
    assert!(matches!(
        ca.issue_serving(&key, &names(), Duration::ZERO),
        Err(CaError::ServingLifetime { .. })
    ));
}
