use super::*;
use crate::cert::WorkloadKey;
use rcgen::{CertificateParams, DistinguishedName};

fn id(td: &str, sa: &str) -> Identity {
    Identity::new(td, "default", sa).unwrap()
}

fn csr_with_sans(key: &WorkloadKey, sans: Vec<SanType>) -> Vec<u8> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans;
    params
        .serialize_request(key.key_pair())
        .unwrap()
        .der()
        .to_vec()
}

fn request(csr_der: Vec<u8>, identity: Identity) -> CsrRequest {
    CsrRequest {
        csr_der,
        identity,
        lifetime: None,
    }
}

#[test]
fn accepts_a_csr_for_exactly_the_requested_identity() {
    let key = WorkloadKey::generate().unwrap();
    let web = id("td", "web");
    let public_key = verify_csr(&request(key.csr(&web).unwrap(), web), "td").unwrap();
    assert_eq!(
        rcgen::PublicKeyData::der_bytes(&public_key),
        key.public_key_raw()
    );
}

#[test]
fn refuses_a_csr_for_another_identity() {
    let key = WorkloadKey::generate().unwrap();
    let csr = key.csr(&id("td", "admin")).unwrap();
    let err = verify_csr(&request(csr, id("td", "web")), "td").unwrap_err();
    assert!(
        matches!(&err, CaError::CsrNamesMismatch { presented, .. }
            if presented == &["URI:spiffe://td/ns/default/sa/admin".to_owned()]),
        "{err}"
    );
}

#[test]
fn refuses_a_csr_with_extra_names() {
    let key = WorkloadKey::generate().unwrap();
    let web = id("td", "web");
    let csr = csr_with_sans(
        &key,
        vec![
            SanType::URI(web.to_string().try_into().unwrap()),
            SanType::DnsName("evil.example.com".try_into().unwrap()),
        ],
    );
    let err = verify_csr(&request(csr, web.clone()), "td").unwrap_err();
    assert!(
        matches!(&err, CaError::CsrNamesMismatch { presented, .. } if presented.len() == 2),
        "{err}"
    );
    let no_names = csr_with_sans(&key, Vec::new());
    assert!(matches!(
        verify_csr(&request(no_names, web), "td"),
        Err(CaError::CsrNamesMismatch { presented, .. }) if presented.is_empty()
    ));
}

#[test]
fn refuses_another_trust_domain() {
    let key = WorkloadKey::generate().unwrap();
    let foreign = id("other.td", "web");
    let err = verify_csr(&request(key.csr(&foreign).unwrap(), foreign), "td").unwrap_err();
    assert!(
        matches!(err, CaError::WrongTrustDomain { ca_trust_domain, .. } if ca_trust_domain == "td")
    );
}

#[test]
fn refuses_a_tampered_csr() {
    let key = WorkloadKey::generate().unwrap();
    let web = id("td", "web");
    let mut csr = key.csr(&web).unwrap();
    // The last bytes are the signature; flip one.
    let last = csr.len() - 3;
    csr[last] ^= 0x01;
    assert!(matches!(
        verify_csr(&request(csr, web.clone()), "td"),
        Err(CaError::InvalidCsr { .. })
    ));
    assert!(matches!(
        verify_csr(&request(b"garbage".to_vec(), web), "td"),
        Err(CaError::InvalidCsr { .. })
    ));
}

#[test]
fn trust_bundle_refuses_garbage_and_merges_without_duplicates() {
    assert!(matches!(
        TrustBundle::new(vec![CertificateDer::from(b"junk".to_vec())]),
        Err(CaError::InvalidTrustAnchor { index: 0, .. })
    ));
    let key = WorkloadKey::generate().unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let root = params.self_signed(key.key_pair()).unwrap().der().clone();
    let a = TrustBundle::new(vec![root]).unwrap();
    assert_eq!(a.trust_anchors().len(), 1);
    assert_eq!(a.merged(&a).roots().len(), 1);
}
