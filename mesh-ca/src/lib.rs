//! The mesh's certificate authority as a service of its own, speaking Istio's certificate API
//! (`istio.v1.auth.IstioCertificateService/CreateCertificate`, gRPC over TLS 1.3):
//!
//! - [`client`]: [`IstioCaClient`], the agents' [`mesh_identity::CertificateAuthority`] backed
//!   by such a service (this crate's server, or istiod): a projected `ServiceAccount` token as
//!   bearer, the workload's identity as `ImpersonatedIdentity`, the server verified by DNS name
//!   against the mesh's roots, and every answer checked (the exact identity, a chain to the
//!   roots).
//! - [`server`]: `mesh-agent ca`: authenticates callers with `TokenReview`, authorizes node agents
//!   to impersonate the workloads of their node ([`server::authorize`], as istiod's node
//!   authorizer), signs with [`mesh_identity::BuiltinCa`] whose root is kept in a Kubernetes
//!   Secret, and publishes the trust bundle in a `ConfigMap`.
//! - [`proto`]: the messages and service, generated from `proto/istio/v1/auth/ca.proto`.

#![forbid(unsafe_code)]

pub mod client;
pub mod proto;
pub mod server;

pub use client::{
    read_roots, IstioCaClient, IstioCaOptions, Resolve, StaticResolver, SystemResolver,
};
