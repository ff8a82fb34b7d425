//! The checks of a CA's answer: PEM certificates, the leaf naming exactly the identity asked
//! for, the chain verifying to the trust bundle.

use std::time::SystemTime;

use mesh_identity::{spiffe_ids_of, Identity, ResponseProblem, TrustBundle};
use rustls::pki_types::{CertificateDer, UnixTime};

/// The chain to hold from the CA's `cert_chain` (leaf first, then intermediates; roots of the
/// bundle are left out, peers have them), once checked: each entry is one PEM certificate, the
/// leaf's only SPIFFE id is `identity`, and the leaf verifies to `bundle` for client
/// authentication at `now`.
pub(crate) fn issued_chain(
    cert_chain: &[String],
    identity: &Identity,
    bundle: &TrustBundle,
    now: SystemTime,
) -> Result<Vec<CertificateDer<'static>>, ResponseProblem> {
    if cert_chain.is_empty() {
        return Err(ResponseProblem::EmptyChain);
    }
    let mut certs = Vec::with_capacity(cert_chain.len());
    for (index, pem) in cert_chain.iter().enumerate() {
        let parsed: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_bytes())
            .filter_map(Result::ok)
            .collect();
        let count = parsed.len();
        let [cert] = <[CertificateDer<'static>; 1]>::try_from(parsed)
            .map_err(|_| ResponseProblem::NotOneCertificate { index, count })?;
        certs.push(cert);
    }
    let leaf = certs.remove(0);
    let presented =
        spiffe_ids_of(&leaf).map_err(|source| ResponseProblem::Unparsable { source })?;
    if presented.as_slice() != std::slice::from_ref(identity) {
        return Err(ResponseProblem::IdentityMismatch { presented });
    }
    let intermediates: Vec<CertificateDer<'static>> = certs
        .into_iter()
        .filter(|cert| !bundle.roots().contains(cert))
        .collect();
    let untrusted = |source| ResponseProblem::Untrusted { source };
    let end_entity = webpki::EndEntityCert::try_from(&leaf).map_err(untrusted)?;
    let since_epoch = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let algorithms =
        rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms;
    end_entity
        .verify_for_usage(
            algorithms.all,
            &bundle.trust_anchors(),
            &intermediates,
            UnixTime::since_unix_epoch(since_epoch),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(untrusted)?;
    Ok(std::iter::once(leaf).chain(intermediates).collect())
}
