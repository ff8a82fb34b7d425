//! Workload identity and mutual TLS for the mesh.
//!
//! The node agent holds certificates for the workloads (pods) on its node and speaks HBONE
//! (HTTP/2 CONNECT over mutual TLS 1.3) to the agents of other nodes. This crate provides:
//!
//! - [`Identity`]: a workload's SPIFFE id, `spiffe://<trust-domain>/ns/<namespace>/sa/<sa>`.
//! - [`CertificateAuthority`]: the interface to a CA. The agent sends a CSR for one identity
//!   ([`CsrRequest`]) and gets a certificate chain back ([`IssuedChain`]); private keys never
//!   leave the agent. [`verify_csr`] holds the checks every CA applies (signature, exactly the
//!   requested identity, the CA's trust domain). [`TrustBundle`] is the set of roots.
//! - [`BuiltinCa`]: a CA whose self-signed ECDSA P-256 root lives in two files
//!   (`root-cert.pem`, `root-key.pem` with mode 0600), created on first use.
//! - [`WorkloadKey`] and [`WorkloadCert`]: the agent's key pairs and CSRs, and the certificate
//!   it holds per identity; [`spiffe_ids_of`] reads SPIFFE ids out of a certificate.
//! - [`CertManager`]: obtains a certificate for each wanted identity, rotates it at about half
//!   its lifetime, retries failures with backoff, and publishes immutable [`CertSnapshot`]s on
//!   a `tokio::sync::watch` channel.
//! - [`tls`]: rustls server and client configurations (TLS 1.3, ALPN `h2`, no resumption) that
//!   present the current certificate from the snapshots at each handshake and authenticate
//!   peers by SPIFFE id: the server accepts clients of its trust domain, the client accepts only
//!   the exact identity it meant to reach. [`CryptoProvider`] selects aws-lc-rs or *ring*.

#![forbid(unsafe_code)]

pub mod builtin_ca;
pub mod ca;
pub mod cert;
pub mod manager;
pub mod spiffe;
pub mod tls;

#[cfg(test)]
mod test_support;

pub use builtin_ca::{BuiltinCa, BuiltinCaOptions};
pub use ca::{
    verify_csr, CaError, CaFuture, CertificateAuthority, CsrRequest, IssuedChain, ResponseProblem,
    TrustBundle,
};
pub use cert::{spiffe_ids_of, CertError, WorkloadCert, WorkloadKey};
pub use manager::{CertManager, CertSnapshot, ManagerError, ManagerOptions};
pub use spiffe::{Identity, IdentityError};
pub use tls::{
    client_config, https_client_config, https_server_config, peer_identity, server_config,
    CryptoProvider, TlsError, ALPN_HTTP11,
};
