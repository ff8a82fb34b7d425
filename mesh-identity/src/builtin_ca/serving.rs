//! Serving certificates under the built-in CA's root: for a service of the mesh's own (the CA's
//! gRPC endpoint), which clients verify by DNS name against the same trust bundle as workloads.

use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType};
use rustls::pki_types::{CertificateDer, DnsName};

use super::{organization, random_serial, BuiltinCa};
use crate::ca::CaError;
use crate::cert::{offset_date_time, WorkloadKey};

impl BuiltinCa {
    /// A TLS serving certificate for `dns_names` certifying `key`'s public key: EKU serverAuth
    /// only, key usage digitalSignature, `CA:false`, the first name as its common name, valid
    /// from now (less the clock skew allowance) for `lifetime`, never past the root's end. Like
    /// every signing, nothing is signed unless the root files still hold the loaded root.
    pub fn issue_serving(
        &self,
        key: &WorkloadKey,
        dns_names: &[String],
        lifetime: Duration,
    ) -> Result<CertificateDer<'static>, CaError> {
        let Some(first) = dns_names.first() else {
            return Err(CaError::NoServingNames);
        };
        self.check_root_files()?;
        let mut params = CertificateParams::default();
        let signing = |source| CaError::ServingSigning {
            names: dns_names.to_vec(),
            source,
        };
        for name in dns_names {
            DnsName::try_from(name.as_str()).map_err(|source| CaError::InvalidServingName {
                name: name.clone(),
                source,
            })?;
        }
        params.subject_alt_names = dns_names
            .iter()
            .map(|name| name.clone().try_into().map(SanType::DnsName))
            .collect::<Result<_, _>>()
            .map_err(signing)?;
        let now = SystemTime::now();
        let not_before = now
            .checked_sub(self.options.clock_skew.min(lifetime / 10))
            .unwrap_or(now);
        let not_after = now
            .checked_add(lifetime)
            .map_or(self.root_not_after, |end| end.min(self.root_not_after));
        let out_of_range = || CaError::ServingLifetime { lifetime };
        if lifetime.is_zero() || not_after <= not_before {
            return Err(out_of_range());
        }
        params.not_before = offset_date_time(not_before).ok_or_else(out_of_range)?;
        params.not_after = offset_date_time(not_after).ok_or_else(out_of_range)?;
        params.serial_number = Some(random_serial()?);
        params.distinguished_name = organization(&self.trust_domain);
        params
            .distinguished_name
            .push(DnType::CommonName, first.as_str());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(key.key_pair(), &self.issuer, &self.key)
            .map_err(signing)?;
        tracing::info!(
            names = ?dns_names,
            not_after = %time::OffsetDateTime::from(not_after),
            "built-in CA issued a serving certificate"
        );
        Ok(cert.der().clone())
    }
}

#[cfg(test)]
mod tests;
