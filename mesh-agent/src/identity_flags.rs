//! The flags that say where certificates come from, shared by `mesh-agent run` and
//! `mesh-agent waypoint`.

use std::{path::PathBuf, time::Duration};

use crate::config::RemoteCa;

/// Where certificates come from, and how they are used.
#[derive(Debug, clap::Args)]
pub struct IdentityFlags {
    /// Directory of the built-in certificate authority (created on first use; agents on
    /// one machine share it).
    #[arg(long, env = "MESH_CA_DIR", default_value = "/var/lib/mesh-agent/ca")]
    pub ca_dir: PathBuf,
    /// A remote CA speaking Istio's certificate API, `https://<host>:<port>` (the mesh's CA
    /// Deployment, or istiod), instead of the built-in one in `--ca-dir`.
    #[arg(long, env = "MESH_CA_ADDRESS", requires = "ca_root_cert")]
    pub ca_address: Option<String>,
    /// With `--ca-address`: PEM file of the mesh's root certificates, which also verify the
    /// CA's own certificate.
    #[arg(long, env = "MESH_CA_ROOT_CERT", requires = "ca_address")]
    pub ca_root_cert: Option<PathBuf>,
    /// With `--ca-address`: the projected service account token (audience `istio-ca`) sent
    /// to the CA, read at every request.
    #[arg(long, env = "MESH_CA_TOKEN_FILE", default_value = crate::config::DEFAULT_CA_TOKEN_FILE)]
    pub ca_token_file: PathBuf,
    /// rustls crypto provider: aws-lc-rs or ring.
    #[arg(long, env = "MESH_CRYPTO_PROVIDER", default_value = "aws-lc-rs")]
    pub crypto_provider: mesh_identity::CryptoProvider,
    /// Lifetime of workload certificates, in seconds (rotated at about half of it).
    #[arg(long, env = "MESH_CERT_LIFETIME_SECS", default_value_t = 86_400)]
    pub cert_lifetime_secs: u64,
}

impl IdentityFlags {
    /// The remote CA, when `--ca-address` names one.
    pub fn remote_ca(&self) -> Option<RemoteCa> {
        self.ca_address.clone().map(|address| RemoteCa {
            address,
            root_cert: self.ca_root_cert.clone().unwrap_or_default(),
            token_file: self.ca_token_file.clone(),
        })
    }

    /// `--cert-lifetime-secs`.
    pub fn cert_lifetime(&self) -> Duration {
        Duration::from_secs(self.cert_lifetime_secs)
    }
}
